"""byol.py: the loss against Eq. (2), the stop-gradient, the EMA and tau schedule, the presets, DDP, learning."""
import json
import math

import torch

import byol
from conftest import TINY, learning_run, run_distributed, run_script


def regression_reference(p, z):
    """Eq. (2) literally: the squared Euclidean distance between the L2-normalised vectors, batch mean."""
    total = 0.0
    for i in range(p.shape[0]):
        p_unit = [float(v) / math.sqrt(sum(float(u) ** 2 for u in p[i])) for v in p[i]]
        z_unit = [float(v) / math.sqrt(sum(float(u) ** 2 for u in z[i])) for v in z[i]]
        total += sum((a - b) ** 2 for a, b in zip(p_unit, z_unit))
    return total / p.shape[0]


def test_loss_matches_equation_2_symmetrised():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(5, 7, generator=g) for _ in range(4))
    assert math.isclose(float(byol.regression_loss(p1, z2)), regression_reference(p1, z2), rel_tol=1e-5)
    expected = regression_reference(p1, z2) + regression_reference(p2, z1)  # L + L~, summed (Sec. 3.1)
    assert math.isclose(float(byol.byol_loss(p1, p2, z1, z2)), expected, rel_tol=1e-5)
    assert float(byol.regression_loss(p1, 3 * p1)) < 1e-6  # scale-free: only the direction counts


def tiny_model(seed=0):
    torch.manual_seed(seed)
    args = byol.parser.parse_args(['--data', 'procedural', *TINY])
    args.cifar_stem = True
    return byol.BYOL(byol.common.build_backbone(args), 32, 16, 32, 2)


def test_stop_gradient_no_gradient_reaches_the_target():
    model = tiny_model()
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    p1, p2, z1, z2 = model(views)
    assert p1.shape == z1.shape == (4, 16) and p1.requires_grad and not z1.requires_grad
    byol.byol_loss(p1, p2, z1, z2).backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert all(p.grad is not None for p in model.online.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in model.predictor.parameters())
    param_ids = {id(p) for group in byol.common.param_groups(model, 1e-6) for p in group['params']}
    assert not param_ids & {id(p) for p in model.target.parameters()}  # the target is not in the optimizer


def test_ema_update_after_the_step_and_tau_schedule_end_points():
    model = tiny_model()
    for online, target in zip(model.online.parameters(), model.target.parameters()):
        assert torch.equal(online, target)  # the target starts as a copy
    optimizer = torch.optim.SGD(byol.common.param_groups(model, 0.0), lr=0.5)
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    byol.byol_loss(*model(views)).backward()
    optimizer.step()
    before = [t.detach().clone() for t in model.target.parameters()]
    buffers = [b.clone() for b in model.target.buffers()]
    tau = 0.9
    byol.common.ema_update(model.target, model.online, tau)  # xi <- tau xi + (1 - tau) theta
    for xi, xi_old, theta in zip(model.target.parameters(), before, model.online.parameters()):
        assert torch.allclose(xi, tau * xi_old + (1 - tau) * theta.detach())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.target.buffers()))  # BN statistics: its own
    # tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2: tau_base at k = 0, rising to 1 at k = K
    K, tau_base = 50, 0.99
    schedule = byol.common.cosine_schedule(tau_base, 1.0, 5, 10)
    expected = [1 - (1 - tau_base) * (math.cos(math.pi * k / K) + 1) / 2 for k in range(K)]
    assert schedule[0] == tau_base and all(math.isclose(a, b, abs_tol=1e-12) for a, b in zip(schedule, expected))
    assert all(a <= b for a, b in zip(schedule, schedule[1:])) and 1 - schedule[-1] < 2e-5


def test_epoch_presets_and_the_small_image_preset():
    def parsed(*argv):  # STL-10 (96 px) is not small: the ImageNet recipe applies
        args = byol.common.parse_args(byol.parser, byol.SMALL_IMAGE_PRESET, ['--data', 'stl10', *argv])
        byol.common.apply_epoch_preset(args, byol.EPOCH_PRESETS)
        return args
    args = parsed()
    assert (args.epochs, args.lr, args.weight_decay, args.tau_base, args.optimizer) == (1000, 0.2, 1.5e-6, 0.996, 'lars')
    assert '1000-epoch preset' in args.notes[-1]
    assert (parsed('--epochs', '300').lr, parsed('--epochs', '300').tau_base) == (0.3, 0.99)
    assert (parsed('--epochs', '100').lr, parsed('--epochs', '100').weight_decay) == (0.45, 1e-6)
    assert parsed('--epochs', '100', '--lr', '1.0').lr == 1.0  # a typed flag wins
    small = byol.common.parse_args(byol.parser, byol.SMALL_IMAGE_PRESET, ['--data', 'procedural'])
    byol.common.apply_epoch_preset(small, byol.EPOCH_PRESETS)
    assert (small.arch, small.lr, small.tau_base, small.blur_probs, small.solarize_probs) == \
        ('resnet18', 0.12, 0.99, (0.0, 0.0), (0.0, 0.2))


def _ddp_steps_on_rank(rank, world_size):
    model = torch.nn.parallel.DistributedDataParallel(tiny_model(), broadcast_buffers=False)
    raw_model = model.module
    optimizer = torch.optim.SGD(byol.common.param_groups(raw_model, 0.0), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(10 + rank)  # every rank sees different images
    for step in range(3):
        views = [torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)]
        loss = byol.byol_loss(*model(views))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        byol.common.ema_update(raw_model.target, raw_model.online, 0.9)
    return torch.cat([p.detach().flatten() for p in raw_model.target.parameters()])


def test_target_stays_identical_across_ranks_without_broadcast(tmp_path):
    targets = run_distributed(_ddp_steps_on_rank, tmp_path=tmp_path)
    initial = torch.cat([p.detach().flatten() for p in tiny_model().target.parameters()])
    assert torch.equal(targets[0], targets[1]) and not torch.equal(targets[0], initial)


# 300 steps on the procedural textures; tau_base 0.9 lets the target follow within so few steps.
# The learning test: flags beyond conftest.LEARN, and the asserted kNN gain (tools/measure_learning.py measures both)
LEARNING = ['--optimizer', 'sgd', '--lr', '1.0', '--tau-base', '0.9', '--min-scale', '0.3', '--proj-hidden-dim', '128',
            '--proj-dim', '128', '--pred-hidden-dim', '32', '--warmup-epochs', '1']
LEARNING_MARGIN = 6


def test_byol_learns_beyond_the_untrained_network_without_collapse(tmp_path):
    gain, records = learning_run(tmp_path, 'byol.py', *LEARNING)
    assert gain > LEARNING_MARGIN, gain  # kNN top-1 gain over the untrained network: smallest of 20 runs +13.4
    epoch_loss = [r['epoch_loss'] for r in records if 'epoch_loss' in r]  # the mean loss of each epoch
    assert epoch_loss[-1] < 0.6 * epoch_loss[0], epoch_loss  # measured (last / first): 0.14-0.29
    # no collapse: output_std ~1/sqrt(128) = 0.088 when spread, 0 when collapsed; the smallest logged: 0.040-0.059
    assert all(r['output_std'] > 0.25 / math.sqrt(128) for r in records if 'step' in r)


def test_torchrun_two_processes_and_tau_end_points(tmp_path):
    out = run_script('byol.py', '--data', 'procedural:200', *TINY, '--epochs', '2', '--batch-size', '32',
                     '--proj-hidden-dim', '32', '--pred-hidden-dim', '32', '--log-every', '1', '--tau-base', '0.9',
                     '--knn-every', '1', '--knn-k', '20', '--output-dir', tmp_path / 'run', nproc=2)
    assert '2 process(es)' in out.stdout and out.stdout.count('kNN (k=20') == 2 and 'output_std' in out.stdout
    checkpoint = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)
    assert checkpoint['epoch'] == 2 and checkpoint['method'] == 'byol'
    assert any(k.startswith('target.') for k in checkpoint['model'])  # the target is saved, to resume
    assert torch.equal(checkpoint['backbone']['conv1.weight'], checkpoint['model']['online.backbone.conv1.weight'])
    taus = [json.loads(line)['tau'] for line in open(tmp_path / 'run' / 'metrics.jsonl') if '"tau"' in line]
    assert taus[0] == 0.9 and 1 - taus[-1] < 1e-2 and taus == sorted(taus)  # tau_base -> 1 over the run
