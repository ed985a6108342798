"""simclr.py: NT-Xent against the paper's equation, its DDP gradient, learning, torchrun, resuming."""
import json
import math
import os

import torch

import simclr
from conftest import TINY, learning_run, run_distributed, run_script
from test_cli import expect_error


def nt_xent_reference(z1, z2, temperature):
    """Eq. (1) and Alg. 1 of the paper, literally: views 2k-1 and 2k are the two views of image k;
    L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]."""
    z = torch.stack([z1, z2], dim=1).reshape(-1, z1.shape[1])  # interleaved: z_1, z_2 of image 1, then image 2...
    n2 = z.shape[0]
    sim = lambda a, b: float(z[a] @ z[b] / (z[a].norm() * z[b].norm()))  # noqa: E731

    def loss(i, j):
        denominator = sum(math.exp(sim(i, k) / temperature) for k in range(n2) if k != i)
        return -math.log(math.exp(sim(i, j) / temperature) / denominator)
    return sum(loss(2 * k, 2 * k + 1) + loss(2 * k + 1, 2 * k) for k in range(n2 // 2)) / n2


def test_nt_xent_matches_equation_1():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for temperature in (0.1, 0.5):
        assert math.isclose(float(simclr.nt_xent_loss(z1, z2, temperature)), nt_xent_reference(z1, z2, temperature),
                            rel_tol=1e-5)


def _nt_xent_on_rank(rank, world_size, n, d, temperature):
    g = torch.Generator().manual_seed(1)
    z1_all, z2_all = torch.randn(world_size * n, d, generator=g), torch.randn(world_size * n, d, generator=g)
    z1 = z1_all[rank * n:(rank + 1) * n].clone().requires_grad_()
    z2 = z2_all[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = simclr.nt_xent_loss(z1, z2, temperature)
    loss.backward()
    return dict(loss=loss.detach(), grad1=z1.grad, grad2=z2.grad)


def test_nt_xent_ddp_equals_single_process_on_the_global_batch(tmp_path):
    world_size, n, d, temperature = 2, 4, 8, 0.2
    results = run_distributed(_nt_xent_on_rank, n, d, temperature, tmp_path=tmp_path)
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(world_size * n, d, generator=g).requires_grad_()
    z2 = torch.randn(world_size * n, d, generator=g).requires_grad_()
    loss = simclr.nt_xent_loss(z1, z2, temperature)
    loss.backward()
    # DDP averages the ranks' gradients: (1/world) * sum of per-rank losses = the global loss
    assert math.isclose(sum(float(r['loss']) for r in results) / world_size, float(loss.detach()), rel_tol=1e-5)
    for rank, r in enumerate(results):
        rows = slice(rank * n, (rank + 1) * n)
        assert torch.allclose(r['grad1'] / world_size, z1.grad[rows], atol=1e-6)
        assert torch.allclose(r['grad2'] / world_size, z2.grad[rows], atol=1e-6)


def test_model_forward_shapes_and_one_bn_batch():
    args = simclr.parser.parse_args(['--data', 'procedural', *TINY])
    args.cifar_stem = True
    model = simclr.SimCLR(simclr.common.build_backbone(args), 32, 16)
    z1, z2 = model([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)])
    assert z1.shape == z2.shape == (4, 16)
    assert not model.projector[-1].bias.requires_grad


# The learning test: flags beyond conftest.LEARN, and the asserted kNN gain (tools/measure_learning.py measures both)
LEARNING = ['--optimizer', 'sgd', '--lr', '0.5', '--min-scale', '0.3', '--proj-hidden-dim', '128', '--warmup-epochs', '1']
LEARNING_MARGIN = 20


def test_simclr_learns_beyond_the_untrained_network(tmp_path):
    gain, records = learning_run(tmp_path, 'simclr.py', *LEARNING)
    assert gain > LEARNING_MARGIN, gain  # kNN top-1 gain over the untrained network: smallest of 11 runs +44.7
    assert os.path.exists(tmp_path / 'run' / 'metrics.png')
    steps = [r for r in records if 'step' in r]
    assert steps[0]['loss'] > steps[-1]['loss']


def test_torchrun_two_processes_train_and_evaluate(tmp_path):
    common_args = ['--data', 'procedural:200', *TINY, '--epochs', '2', '--batch-size', '32', '--proj-hidden-dim', '32',
                   '--knn-every', '1', '--knn-k', '20', '--output-dir', tmp_path / 'run']
    out = run_script('simclr.py', *common_args, nproc=2)
    assert '2 process(es)' in out.stdout and out.stdout.count('kNN (k=20') == 2
    checkpoint = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)
    assert checkpoint['epoch'] == 2 and checkpoint['method'] == 'simclr' and 'backbone' in checkpoint
    knn = [tmp_path / 'run' / 'checkpoint.pth', '--workers', '0', '--k', '5', '20']
    run_script('eval_knn.py', *knn, '--json', tmp_path / 'ddp.json', nproc=2)
    run_script('eval_knn.py', *knn, '--json', tmp_path / 'one.json')
    ddp, one = json.load(open(tmp_path / 'ddp.json')), json.load(open(tmp_path / 'one.json'))
    assert ddp['results'].keys() == one['results'].keys() == {'5', '20'}
    for k in ddp['results']:  # distributed feature extraction gathers the same features
        assert abs(ddp['results'][k]['top1'] - one['results'][k]['top1']) < 1e-6


def test_resumed_run_continues_exactly(tmp_path):
    run = ['--data', 'procedural:192', *TINY, '--epochs', '3', '--batch-size', '32', '--proj-hidden-dim', '32',
           '--knn-every', '-1']
    run_script('simclr.py', *run, '--output-dir', tmp_path / 'straight')
    out = run_script('simclr.py', *run, '--output-dir', tmp_path / 'resumed', '--stop-after-epoch', '1')
    assert 'epoch 2/3' not in out.stdout
    assert torch.load(tmp_path / 'resumed' / 'checkpoint.pth', weights_only=True)['epoch'] == 1
    out = run_script('simclr.py', *run, '--output-dir', tmp_path / 'resumed')
    assert 'resumed from' in out.stdout and 'epoch 1/3' not in out.stdout
    straight = torch.load(tmp_path / 'straight' / 'checkpoint.pth', weights_only=True)
    resumed = torch.load(tmp_path / 'resumed' / 'checkpoint.pth', weights_only=True)
    assert straight['epoch'] == resumed['epoch'] == 3
    for key, value in straight['model'].items():
        assert torch.equal(value, resumed['model'][key]), key
    for key, value in straight['optimizer']['state'].items():
        assert torch.equal(value['momentum_buffer'], resumed['optimizer']['state'][key]['momentum_buffer'])


def test_a_batch_of_one_is_refused(tmp_path):
    """One image per step has no negative: NT-Xent would be 0 at every step, and nothing would train."""
    expect_error('simclr.py', '--data', 'procedural:64', *TINY, '--batch-size', '1', '--output-dir', tmp_path / 'o',
                 match='--batch-size 1: NT-Xent needs at least 2 images')
    assert not (tmp_path / 'o').exists()
