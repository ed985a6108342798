"""instdisc.py: the non-parametric softmax and NCE against the paper's equations, the normaliser Z,
the memory-bank update, identical banks under DDP, learning, torchrun, bad input."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import instdisc
from conftest import TINY, learning_run, run_distributed, run_script
from test_cli import expect_error
from test_moco import tiny_backbone


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def softmax_reference(f, indices, bank, temperature):
    """Eqs. (2)-(3): -mean_i log exp(v_i.f_i/T) / sum_j exp(v_j.f_i/T)."""
    total = 0.0
    for fi, i in zip(f.tolist(), indices.tolist()):
        scores = [math.exp(dot(v, fi) / temperature) for v in bank.tolist()]
        total += -math.log(scores[i] / sum(scores))
    return total / len(f)


def nce_reference(f, indices, bank, noise, temperature, z):
    """Eqs. (4)-(6) with a given Z: P = exp(v.f/T)/Z, h = P/(P + K/N), J = -mean_i[log h_i + sum_noise log(1-h)]."""
    n_images, k = len(bank), noise.shape[1]
    total = 0.0
    for fi, i, js in zip(f.tolist(), indices.tolist(), noise.tolist()):
        p = lambda j: math.exp(dot(bank[j].tolist(), fi) / temperature) / z  # noqa: E731
        h = lambda j: p(j) / (p(j) + k / n_images)  # noqa: E731
        total += -(math.log(h(i)) + sum(math.log(1 - h(j)) for j in js))
    return total / len(f)


def test_non_parametric_softmax_matches_equations_2_and_3():
    g = torch.Generator().manual_seed(0)
    f, bank = F.normalize(torch.randn(4, 6, generator=g), dim=1), F.normalize(torch.randn(10, 6, generator=g), dim=1)
    indices = torch.tensor([3, 0, 9, 5])
    for temperature in (0.07, 0.5):
        assert math.isclose(float(instdisc.non_parametric_softmax_loss(f, indices, bank, temperature)),
                            softmax_reference(f, indices, bank, temperature), rel_tol=1e-5)


def test_nce_matches_equations_4_to_7_and_z_is_estimated_once():
    g = torch.Generator().manual_seed(0)
    f, bank = F.normalize(torch.randn(4, 6, generator=g), dim=1), F.normalize(torch.randn(20, 6, generator=g), dim=1)
    indices, k, temperature = torch.tensor([3, 0, 19, 5]), 5, 0.5
    z = torch.tensor(-1.0)
    torch.manual_seed(7)
    loss = instdisc.nce_loss(f, indices, bank, z, k, temperature, z_momentum=1.0)
    torch.manual_seed(7)
    noise = torch.randint(len(bank), (4, k))  # the same draw as inside nce_loss
    samples = torch.cat([indices[:, None], noise], 1)
    z_expected = sum(math.exp(dot(bank[j].tolist(), f[r].tolist()) / temperature)
                     for r in range(4) for j in samples[r].tolist()) / samples.numel() * len(bank)  # Eq. (7)
    assert math.isclose(float(z), z_expected, rel_tol=1e-5)
    assert math.isclose(float(loss), nce_reference(f, indices, bank, noise, temperature, z_expected), rel_tol=1e-5)
    instdisc.nce_loss(f * 0 + f[0], indices, bank, z, k, temperature, z_momentum=1.0)
    assert math.isclose(float(z), z_expected, rel_tol=1e-6)  # fixed after the first batch (authors' code)
    torch.manual_seed(8)
    instdisc.nce_loss(f, indices, bank, z, k, temperature, z_momentum=0.5)
    torch.manual_seed(8)
    noise = torch.randint(len(bank), (4, k))
    samples = torch.cat([indices[:, None], noise], 1)
    estimate = torch.exp((bank[samples] * f[:, None]).sum(-1) / temperature).mean() * len(bank)
    assert math.isclose(float(z), 0.5 * z_expected + 0.5 * float(estimate), rel_tol=1e-5)  # moving average


def test_memory_bank_starts_uniform_and_updates_with_momentum():
    model = instdisc.InstDisc(tiny_backbone(), out_dim=12, num_images=50)
    bound = 1 / math.sqrt(12 / 3)
    assert model.memory_bank.shape == (50, 12) and model.memory_bank.abs().max() <= bound
    before = model.memory_bank.clone()
    f, indices = F.normalize(torch.randn(3, 12), dim=1), torch.tensor([4, 7, 30])
    model.update_memory(f, indices, 0.5)
    for row, i in enumerate(indices.tolist()):
        mixed = 0.5 * before[i] + 0.5 * f[row]
        assert torch.allclose(model.memory_bank[i], mixed / mixed.norm(), atol=1e-6)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(model.memory_bank[untouched], before[untouched])


def _instdisc_steps_on_rank(rank, world_size, steps, nce_k):
    torch.manual_seed(0)  # identical init on both ranks, as common.setup does
    model = instdisc.InstDisc(tiny_backbone(), out_dim=4, num_images=40)
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1 + rank)  # each rank its own data and noise samples
    for step in range(steps):
        indices = torch.arange(4) + 8 * step + 4 * rank  # disjoint shards, as the sampler gives
        features = ddp([torch.randn(4, 3, 8, 8)])
        if nce_k:
            loss = instdisc.nce_loss(features, indices, model.memory_bank, model.nce_z, nce_k, 0.1, 0.99)
        else:
            loss = instdisc.non_parametric_softmax_loss(features, indices, model.memory_bank.clone(), 0.1)
        model.update_memory(features, indices, 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return dict(bank=model.memory_bank, z=model.nce_z)


def test_after_ddp_steps_the_memory_bank_is_identical_on_both_ranks(tmp_path):
    for nce_k in (0, 8):
        results = run_distributed(_instdisc_steps_on_rank, 3, nce_k, tmp_path=tmp_path)
        assert torch.equal(results[0]['bank'], results[1]['bank'])
        assert torch.equal(results[0]['z'], results[1]['z'])
        assert torch.allclose(results[0]['bank'][:24].norm(dim=1), torch.ones(24))  # all 24 seen images updated


# The learning test: flags beyond conftest.LEARN, and the asserted kNN gain (tools/measure_learning.py measures both)
LEARNING = ['--min-scale', '0.3', '--lr', '0.25', '--temperature', '0.5']
LEARNING_MARGIN = 15


def test_instdisc_learns_beyond_the_untrained_network(tmp_path):
    gain, _ = learning_run(tmp_path, 'instdisc.py', *LEARNING)
    assert gain > LEARNING_MARGIN, gain  # kNN top-1 gain over the untrained network: smallest of 11 runs +38.9


def test_torchrun_two_processes_nce_and_bad_input(tmp_path):
    run = ['--data', 'procedural:128', *TINY, '--epochs', '1', '--batch-size', '32', '--nce-k', '16',
           '--knn-every', '1', '--knn-k', '20', '--output-dir', tmp_path / 'run']
    out = run_script('instdisc.py', *run, nproc=2)
    assert '2 process(es)' in out.stdout and 'kNN (k=20' in out.stdout
    checkpoint = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)
    assert checkpoint['method'] == 'instdisc' and checkpoint['model']['memory_bank'].shape == (128, 128)
    assert float(checkpoint['model']['nce_z']) > 0
    run_script('eval_knn.py', tmp_path / 'run' / 'checkpoint.pth', '--workers', '0', '--k', '5')
    # resuming on another dataset (whose bank would have another row count) is refused before anything loads
    expect_error('instdisc.py', *run, '--data', 'procedural:96', '--epochs', '2',
                 match='was trained on --data procedural:128, not procedural:96')
    expect_error('instdisc.py', *run, '--nce-k', '128', '--output-dir', tmp_path / 'other',
                 match='--nce-k 128 must be at least 0 and below the 128 training images')
    assert not (tmp_path / 'other').exists()
