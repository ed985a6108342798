"""swav.py: Sinkhorn-Knopp against the paper's algorithm and its DDP version, the swapped loss against a
plain loop over crop pairs, the queue, the prototype freeze, bad input, learning and torchrun."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import swav
from conftest import TINY, learning_run, run_distributed, run_script
from test_cli import expect_error


def sinkhorn_reference(scores, epsilon, iterations):
    """Algorithm 1 of the paper's appendix, literally, in float64: Q = exp(scores / eps)^T normalised to
    sum 1, then alternately u = row sums, Q *= r / u (r = 1/K), Q *= c / column sums (c = 1/B); the
    codes are Q's columns normalised to sum 1."""
    Q = torch.exp(scores.double() / epsilon).T
    Q /= Q.sum()
    K, B = Q.shape
    r, c = torch.ones(K, dtype=torch.float64) / K, torch.ones(B, dtype=torch.float64) / B
    for _ in range(iterations):
        u = Q.sum(dim=1)
        Q *= (r / u)[:, None]
        Q *= (c / Q.sum(dim=0))[None, :]
    return (Q / Q.sum(dim=0, keepdim=True)).T


def random_scores(b, k, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z, c = F.normalize(torch.randn(b, d, generator=g), dim=1), F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.T  # (b, K) cosines, as the model produces them


def test_sinkhorn_matches_the_papers_algorithm_and_its_marginals():
    scores = random_scores(24, 6)
    for iterations in (1, 3, 10):
        codes = swav.sinkhorn(scores, 0.05, iterations)
        assert torch.allclose(codes.double(), sinkhorn_reference(scores, 0.05, iterations), atol=1e-5)
    # the transport plan P = codes / B: every sample's column sums to exactly 1/B after each iteration ...
    B, K = scores.shape
    plan = swav.sinkhorn(scores, 0.05, 3) / B
    assert torch.allclose(plan.sum(dim=1), torch.full((B,), 1 / B), rtol=1e-5)
    # ... and every prototype's row to 1/K: approximately after 3 iterations, exactly in the limit
    gap = [(swav.sinkhorn(scores, 0.05, n) / B).sum(dim=0).sub(1 / K).abs().max().item() for n in (1, 3, 300)]
    assert gap[0] > gap[1] > gap[2] and gap[2] < 1e-5 and gap[1] < 0.5 / K, gap
    # the epsilon = 0.05 codes are sharp but not one-hot, and they must not all pick one prototype
    assert (swav.sinkhorn(scores, 0.05, 300).argmax(dim=1).bincount(minlength=K) > 0).all()


def _sinkhorn_on_rank(rank, world_size, b, k):
    scores = random_scores(world_size * b, k, seed=1)
    return swav.sinkhorn(scores[rank * b:(rank + 1) * b], 0.05, 3)


def test_distributed_sinkhorn_equals_single_process_on_the_concatenated_batch(tmp_path):
    b, k = 6, 5
    results = run_distributed(_sinkhorn_on_rank, b, k, tmp_path=tmp_path)
    single = swav.sinkhorn(random_scores(2 * b, k, seed=1), 0.05, 3)
    assert torch.allclose(torch.cat(results), single, atol=1e-6)


def swapped_loss_reference(scores, codes, n, temperature):
    """Eq. (1)-(2) with multi-crop, one (code crop s, predicting crop t) pair and one image at a time."""
    num_crops, K = scores.shape[0] // n, scores.shape[1]
    total = 0.0
    for s in range(2):
        pair_losses = []
        for t in range(num_crops):
            if t == s:
                continue
            pair = 0.0
            for image in range(n):
                row = scores[t * n + image]
                denominator = sum(math.exp(float(row[j]) / temperature) for j in range(K))
                pair -= sum(float(codes[s][image, j]) * math.log(math.exp(float(row[j]) / temperature) / denominator)
                            for j in range(K))
            pair_losses.append(pair / n)
        total += sum(pair_losses) / len(pair_losses)
    return total / 2


def test_swapped_prediction_loss_matches_a_plain_loop_over_crop_pairs():
    n, num_crops, k = 3, 5, 4
    scores = random_scores(num_crops * n, k, seed=2)
    codes = [swav.sinkhorn(scores[s * n:(s + 1) * n], 0.05, 3) for s in range(2)]
    for temperature in (0.1, 0.5):
        loss = swav.swapped_prediction_loss(scores, codes, temperature)
        assert math.isclose(float(loss), swapped_loss_reference(scores, codes, n, temperature), rel_tol=1e-5)


class Features(nn.Module):  # a stand-in backbone: the image pooled to 2x2, flattened
    embed_dim = 12

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 2).flatten(1)


def tiny_swav(queue_length):
    torch.manual_seed(0)
    return swav.SwAV(Features(), hidden_dim=16, out_dim=8, num_prototypes=5, queue_length=queue_length)


def _codes_with_queue_on_rank(rank, world_size, n, steps):
    model, g = tiny_swav(queue_length=4 * n * world_size), torch.Generator().manual_seed(3)
    model.eval()  # BN with fixed statistics: each image's z no longer depends on the rest of its batch
    codes = []
    for _ in range(steps):  # each step: 2 global + 1 local crop of world_size * n images; this rank takes its n
        views = [torch.randn(world_size * n, 3, 2, 2, generator=g) for _ in range(2)] + \
                [torch.randn(world_size * n, 3, 1, 1, generator=g)]
        model.normalize_prototypes()
        z, scores = model([v[rank * n:(rank + 1) * n] for v in views])
        codes.append(torch.stack(model.compute_codes(z, scores, n, 0.05, 3, fill_queue=True)))
    return dict(codes=codes, queue=model.queue.clone())


def test_queue_and_codes_under_ddp_equal_one_process_on_the_global_batch(tmp_path):
    n, steps = 2, 6  # queue of 4 global batches: empty for 4 steps, then used
    ranks = run_distributed(_codes_with_queue_on_rank, n, steps, tmp_path=tmp_path)
    single = _codes_with_queue_on_rank(0, 1, 2 * n, steps)  # one process, the concatenated batch
    for step in range(steps):
        assert torch.allclose(torch.cat([r['codes'][step] for r in ranks], dim=1), single['codes'][step], atol=1e-5)
    assert torch.equal(ranks[0]['queue'], ranks[1]['queue'])  # every rank holds the same queue
    assert ranks[0]['queue'][:, -1].any() and single['queue'][:, -1].any()


def test_queue_scores_enter_sinkhorn_once_full():
    n = 3
    model = tiny_swav(queue_length=2 * n)
    model.normalize_prototypes()
    views = [torch.randn(n, 3, 2, 2) for _ in range(2)]
    z, scores = model(views)
    model.compute_codes(z, scores, n, 0.05, 3, fill_queue=True)
    assert not model.queue[:, -1].any() and torch.equal(model.queue[:, :n], z.detach().view(2, n, -1))
    model.compute_codes(z, scores, n, 0.05, 3, fill_queue=True)  # now full: the next call uses it
    queue = model.queue.clone()
    codes = model.compute_codes(z, scores, n, 0.05, 3, fill_queue=False)
    for i in range(2):
        expected = swav.sinkhorn(torch.cat([queue[i] @ model.prototypes.weight.T, scores[i * n:(i + 1) * n]]), 0.05, 3)
        assert torch.allclose(codes[i], expected[-n:], atol=1e-6)
    assert torch.equal(model.queue, queue)  # fill_queue=False leaves it alone


def test_forward_batches_same_size_crops_and_normalises():
    model = tiny_swav(queue_length=0)
    calls = []
    model.backbone.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[-1]))
    model.prototypes.weight.data.mul_(3.0)
    model.normalize_prototypes()
    assert torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(5))
    views = [torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)] + [torch.randn(4, 3, 1, 1) for _ in range(3)]
    z, scores = model(views)
    assert calls == [2, 1]  # one backbone call per crop size
    assert z.shape == (20, 8) and scores.shape == (20, 5)
    assert torch.allclose(z.norm(dim=1), torch.ones(20)) and scores.abs().max() <= 1 + 1e-6


SMALL = ['--size-crops', '16', '8', '--nmb-prototypes', '20', '--proj-hidden-dim', '32', '--knn-every', '-1']


def test_prototypes_frozen_in_the_first_epoch_and_unit_norm_when_used(tmp_path):
    run = ['--data', 'procedural:64', *TINY, *SMALL, '--nmb-crops', '2', '1', '--epochs', '2', '--batch-size', '16',
           '--queue-length', '32', '--epoch-queue-starts', '0', '--output-dir', tmp_path]
    run_script('swav.py', *run, '--stop-after-epoch', '1')
    first = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    buffers = ('running_mean', 'running_var', 'num_batches_tracked', 'queue')
    index = [k for k in first['model'] if not k.endswith(buffers)].index('prototypes.weight')  # optimizer's numbering
    prototypes = first['model']['prototypes.weight']
    # frozen: normalised before step 1, then never updated (no gradient -> LARS keeps no momentum for them)
    assert torch.allclose(prototypes.norm(dim=1), torch.ones(20), atol=1e-6)
    assert index not in first['optimizer']['state'] and len(first['optimizer']['state']) > 0
    assert first['model']['queue'][:, -1].any()  # 4 steps of 16 filled the queue of 32
    out = run_script('swav.py', *run)
    assert 'resumed from' in out.stdout
    second = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert index in second['optimizer']['state'] and not torch.equal(second['model']['prototypes.weight'], prototypes)


def test_lars_uses_larcs_trust_ratio():
    # the authors wrap SGD in apex's LARC: eta ||w|| / (||g|| + wd ||w||), on every parameter
    args = common.parse_args(swav.parser, swav.SMALL_IMAGE_PRESET, ['--data', 'procedural', *TINY])
    assert args.optimizer == 'lars' and args.lars_denominator == 'larc'
    model = nn.Linear(4, 3)
    optimizer = common.build_optimizer(args, common.param_groups(model, args.weight_decay, False), 0.1)
    assert isinstance(optimizer, common.LARS) and all(g['denominator'] == 'larc' for g in optimizer.param_groups)
    typed = common.parse_args(swav.parser, swav.SMALL_IMAGE_PRESET,
                              ['--data', 'procedural', *TINY, '--lars-denominator', 'update'])
    assert typed.lars_denominator == 'update'


def test_bad_crop_and_queue_arguments(tmp_path):
    out = tmp_path / 'out'
    run = ['--data', 'procedural:64', *TINY, '--output-dir', out]
    expect_error('swav.py', *run, '--nmb-crops', '2', '6', '--size-crops', '16', match='has 2 resolution(s) but --size-crops 16 has 1')
    expect_error('swav.py', *run, '--size-crops', '16', '8', '--min-scale-crops', '0.14', '0',
                 match='--min-scale-crops 0.14 0.0: value 2 (0.0) is outside (0, 1]')
    expect_error('swav.py', *run, '--size-crops', '16', '8', '--max-scale-crops', '1.5', '0.14',
                 match='--max-scale-crops')
    expect_error('swav.py', *run, '--size-crops', '16', '8', '--min-scale-crops', '0.5', '0.05', '--max-scale-crops',
                 '0.4', '0.14', match='0 < low <= high <= 1')
    expect_error('swav.py', *run, '--size-crops', '16', '8', '--nmb-crops', '3', '6', match='give 2 global crops')
    expect_error('swav.py', *run, '--size-crops', '32', '8', match='must equal --image-size 16')
    expect_error('swav.py', *run, '--size-crops', '16', '8', '--batch-size', '48', '--queue-length', '100',
                 match='--queue-length 100 is not a multiple of the global batch --batch-size 48; use e.g. 96')
    assert not out.exists()  # nothing written


def test_torchrun_two_processes_with_a_queue_and_no_resume_on_another_world_size(tmp_path):
    run = ['--data', 'procedural:128', *TINY, *SMALL, '--nmb-crops', '2', '1', '--epochs', '2', '--batch-size', '32',
           '--queue-length', '64', '--epoch-queue-starts', '0', '--knn-every', '1', '--knn-k', '20',
           '--output-dir', tmp_path / 'run']
    out = run_script('swav.py', *run, nproc=2)
    assert '2 process(es)' in out.stdout and out.stdout.count('kNN (k=20') == 2
    checkpoint = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)
    assert checkpoint['epoch'] == 2 and checkpoint['method'] == 'swav' and checkpoint['args']['world_size'] == 2
    assert checkpoint['model']['queue'][:, -1].any()
    expect_error('swav.py', *run, '--epochs', '3', match='was trained on 2 process(es) with a queue; resume it on 2')
    expect_error('swav.py', *run, '--epochs', '3', '--queue-length', '0', match='has --queue-length 64, not 0')


# The learning test: flags beyond conftest.LEARN, and the asserted kNN gain (tools/measure_learning.py measures both)
LEARNING = ['--size-crops', '16', '8', '--nmb-crops', '2', '2', '--min-scale-crops', '0.3', '0.1', '--max-scale-crops', '1.0',
            '0.3', '--optimizer', 'sgd', '--lr', '1.0', '--nmb-prototypes', '32', '--temperature', '0.2',
            '--proj-hidden-dim', '128', '--warmup-epochs', '1', '--start-warmup', '0']
LEARNING_MARGIN = 15


def test_swav_learns_beyond_the_untrained_network(tmp_path):
    gain, _ = learning_run(tmp_path, 'swav.py', *LEARNING)
    assert gain > LEARNING_MARGIN, gain  # kNN top-1 gain over the untrained network: smallest of 11 runs +36.3
