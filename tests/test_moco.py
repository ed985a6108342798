"""moco.py: InfoNCE against Eq. (1), the queue, shuffle BN across 2 processes, split BN, the momentum
update, identical queues under DDP, learning, torchrun, bad input."""
import math
from collections import deque

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import moco
from conftest import TINY, learning_run, run_distributed, run_script
from test_cli import expect_error


def tiny_backbone():
    """A 2-layer CNN with a BatchNorm: enough to exercise the encoders in milliseconds."""
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.embed_dim = 6
    return backbone


def info_nce_reference(q, k, queue, temperature):
    """Eq. (1), one query at a time: -log exp(q.k+/T) / sum_{i=0..K} exp(q.k_i/T), k_0 = k+."""
    total = 0.0
    for qi, ki in zip(q.tolist(), k.tolist()):
        dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
        positive = math.exp(dot(qi, ki) / temperature)
        negatives = sum(math.exp(dot(qi, key) / temperature) for key in queue.tolist())
        total += -math.log(positive / (positive + negatives))
    return total / len(q)


def test_info_nce_matches_equation_1():
    g = torch.Generator().manual_seed(0)
    q, k = F.normalize(torch.randn(5, 8, generator=g), dim=1), F.normalize(torch.randn(5, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    for temperature in (0.07, 0.2):
        assert math.isclose(float(moco.info_nce_loss(q, k, queue, temperature)),
                            info_nce_reference(q, k, queue, temperature), rel_tol=1e-5)


def test_queue_starts_normalised_wraps_around_and_keeps_the_newest_keys():
    model = moco.MoCo(tiny_backbone(), out_dim=4, mlp=False, queue_size=12, symmetric=False, bn_splits=1)
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(12))
    reference = deque(model.queue.clone(), maxlen=12)  # oldest first
    for step in range(5):  # 5 batches of 4 keys: the pointer wraps around after 3
        keys = F.normalize(torch.randn(4, 4), dim=1)
        model.enqueue(keys)
        reference.extend(keys)
        assert int(model.queue_ptr) == 4 * (step + 1) % 12
    ptr = int(model.queue_ptr)  # the slot of the oldest key
    in_age_order = torch.cat([model.queue[ptr:], model.queue[:ptr]])
    assert torch.equal(in_age_order, torch.stack(list(reference)))


def test_momentum_update_formula_and_key_encoder_has_no_gradient():
    model = moco.MoCo(tiny_backbone(), out_dim=4, mlp=True, queue_size=8, symmetric=False, bn_splits=1)
    for p in model.f_q.parameters():
        p.data.normal_()
    before = [p.clone() for p in model.f_k.parameters()]
    common.ema_update(model.f_k, model.f_q, 0.9)
    for old, new, q in zip(before, model.f_k.parameters(), model.f_q.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * q)  # Eq. (2)
        assert not new.requires_grad
    optimized = {id(p) for group in common.param_groups(model, 1e-4, False) for p in group['params']}
    assert optimized == {id(p) for p in model.f_q.parameters()}


def test_split_batchnorm_equals_batchnorm_on_each_sub_batch():
    x = torch.randn(8, 3, 4, 4)
    split = moco.SplitBatchNorm(3, num_splits=2)
    plain = nn.BatchNorm2d(3)
    with torch.no_grad():
        split.weight.uniform_(), split.bias.normal_()
        plain.load_state_dict(split.state_dict())
    y = split(x)
    for j in range(2):  # sample i belongs to sub-batch i % 2
        reference = nn.BatchNorm2d(3)
        reference.load_state_dict(plain.state_dict())
        assert torch.allclose(y[j::2], reference(x[j::2]), atol=1e-5)
    expected_mean = 0.9 * torch.zeros(3) + 0.1 * (x[0::2].mean((0, 2, 3)) + x[1::2].mean((0, 2, 3))) / 2
    assert torch.allclose(split.running_mean, expected_mean, atol=1e-6)
    split.eval(), plain.eval()
    plain.load_state_dict(split.state_dict())
    assert torch.allclose(split(x), plain(x))  # evaluation: plain BatchNorm, same state dict


def _shuffle_on_rank(rank, world_size):
    torch.manual_seed(rank)  # different RNG on each rank: only the broadcast makes the permutations agree
    x = torch.arange(8.0).view(8, 1) + 100 * rank  # (8, 1) this rank's "images"
    shuffled, permutation = moco.batch_shuffle(x)
    return dict(x=x, shuffled=shuffled, permutation=permutation, restored=moco.batch_unshuffle(shuffled, permutation))


def test_shuffle_bn_permutation_is_shared_and_unshuffle_restores_the_order(tmp_path):
    results = run_distributed(_shuffle_on_rank, tmp_path=tmp_path)
    assert torch.equal(results[0]['permutation'], results[1]['permutation'])
    permutation = results[0]['permutation']
    assert not torch.equal(permutation, torch.arange(16))
    x_all = torch.cat([r['x'] for r in results])
    for rank, r in enumerate(results):
        assert torch.equal(r['shuffled'], x_all[permutation[rank * 8:(rank + 1) * 8]])  # this rank's slice
        assert torch.equal(r['restored'], r['x'])  # shuffle then un-shuffle is the identity


def _moco_steps_on_rank(rank, world_size, steps):
    torch.manual_seed(0)  # identical init on both ranks, as common.setup does
    model = moco.MoCo(tiny_backbone(), out_dim=4, mlp=True, queue_size=16, symmetric=True, bn_splits=1)
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1 + rank)  # each rank its own data
    for _ in range(steps):
        views = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
        common.ema_update(model.f_k, model.f_q, 0.9)
        queries, keys = ddp(views)
        loss = sum(moco.info_nce_loss(q, k, model.queue.clone(), 0.2) for q, k in zip(queries, keys))
        model.enqueue(torch.cat(keys))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return dict(queue=model.queue, ptr=model.queue_ptr, f_k=[p.detach() for p in model.f_k.parameters()])


def test_after_ddp_steps_the_queue_is_identical_on_both_ranks(tmp_path):
    results = run_distributed(_moco_steps_on_rank, 3, tmp_path=tmp_path)
    # 3 steps x 2 ranks x 4 images x 2 views = 48 keys through a queue of 16: wrapped around
    assert int(results[0]['ptr']) == int(results[1]['ptr']) == 48 % 16
    assert torch.equal(results[0]['queue'], results[1]['queue'])
    for a, b in zip(results[0]['f_k'], results[1]['f_k']):
        assert torch.equal(a, b)


def test_torchrun_two_processes_train_and_resume(tmp_path):
    run = ['--data', 'procedural:128', *TINY, '--epochs', '2', '--batch-size', '32', '--queue-size', '128',
           '--knn-every', '1', '--knn-k', '20', '--output-dir', tmp_path / 'run']
    out = run_script('moco.py', *run, '--stop-after-epoch', '1', nproc=2)
    assert '2 process(es)' in out.stdout and 'kNN (k=20' in out.stdout and 'SyncBatchNorm' not in out.stdout
    out = run_script('moco.py', *run, nproc=2)
    assert 'resumed from' in out.stdout
    checkpoint = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)
    assert checkpoint['epoch'] == 2 and checkpoint['method'] == 'moco'
    assert checkpoint['model']['queue'].shape == (128, 128) and int(checkpoint['model']['queue_ptr']) == 0
    run_script('eval_knn.py', tmp_path / 'run' / 'checkpoint.pth', '--workers', '0', '--k', '5')


def test_version_recipes_and_bad_queue_size(tmp_path):
    args = moco.parser.parse_args(['--data', 'procedural', '--moco-version', 'v1'])
    args.notes = []
    moco.apply_version(args)
    assert (args.mlp, args.aug_plus, args.cos, args.temperature, args.blur_prob) == (False, False, False, 0.07, 0.0)
    args = moco.parser.parse_args(['--data', 'procedural', '--no-cos', '--blur-prob', '0.1'])
    args.notes = []
    moco.apply_version(args)
    assert (args.mlp, args.aug_plus, args.cos, args.temperature, args.blur_prob) == (True, True, False, 0.2, 0.1)
    out = tmp_path / 'out'
    expect_error('moco.py', '--data', 'procedural:64', *TINY, '--batch-size', '16', '--queue-size', '40',
                 '--output-dir', out, match='--queue-size 40 is not a multiple of the 32 keys')
    expect_error('moco.py', '--data', 'procedural:64', *TINY, '--batch-size', '12', '--queue-size', '48',
                 '--no-symmetric', '--output-dir', out, match='--bn-splits 8 does not divide --batch-size 12')
    assert not out.exists()


# The learning test: flags beyond conftest.LEARN, and the asserted kNN gain (tools/measure_learning.py measures both)
LEARNING = ['--min-scale', '0.3', '--lr', '0.5', '--queue-size', '256', '--key-momentum', '0.99', '--temperature', '0.5',
            '--no-symmetric']
LEARNING_MARGIN = 5


def test_moco_v2_learns_beyond_the_untrained_network(tmp_path):
    gain, _ = learning_run(tmp_path, 'moco.py', *LEARNING)
    assert gain > LEARNING_MARGIN, gain  # kNN top-1 gain over the untrained network: smallest of 20 runs +10.6
