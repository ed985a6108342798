"""common.py against independent references: collectives, LARS, schedules, backbones, kNN, data."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import run_distributed


def backbone_args(**kw):
    defaults = dict(arch='resnet18', width=64, cifar_stem=False, zero_init_residual=False, image_size=32,
                    patch_size=4, num_heads=None, drop_path=0.0, pos_embed='learned', freeze_patch_embed=False)
    return argparse.Namespace(**{**defaults, **kw})


def test_apply_epoch_preset_picks_the_row_and_keeps_set_flags(monkeypatch):
    validated = []  # the preset's values are checked again, as typed ones are (e.g. --min-lr against the lr)
    monkeypatch.setattr(common, 'validate_args', lambda args: validated.append(dict(vars(args))))
    presets = {100: dict(lr=0.45, tau_base=0.99), 300: dict(lr=0.3, tau_base=0.99), 1000: dict(lr=0.2, tau_base=0.996)}
    for epochs, lr, tau_base in ((50, 0.45, 0.99), (100, 0.45, 0.99), (200, 0.3, 0.99), (1000, 0.2, 0.996),
                                 (2000, 0.2, 0.996)):
        args = argparse.Namespace(epochs=epochs, lr=None, tau_base=None, notes=[])
        common.apply_epoch_preset(args, presets)
        assert (args.lr, args.tau_base) == (lr, tau_base) and 'epoch preset' in args.notes[-1]
    args = argparse.Namespace(epochs=200, lr=1.5, tau_base=None, notes=[])  # a typed / preset flag wins
    common.apply_epoch_preset(args, presets)
    assert (args.lr, args.tau_base) == (1.5, 0.99) and args.notes == ['300-epoch preset (tau_base=0.99)']
    assert len(validated) == 6 and validated[-1]['lr'] == 1.5 and validated[-1]['tau_base'] == 0.99


# ---- distributed collectives -------------------------------------------------

def _gather_grad(rank, world_size, n, d):
    x = torch.randn(world_size, n, d, generator=torch.Generator().manual_seed(0))[rank].requires_grad_()
    gathered = common.all_gather_with_grad(x)                       # (world * n, d)
    weights = torch.arange(world_size * n * d, dtype=torch.float32).view(world_size * n, d) * (rank + 1)
    (gathered * weights).sum().backward()                            # each rank's loss uses every rank's rows
    return dict(gathered=gathered.detach(), grad=x.grad, no_grad=common.all_gather_no_grad(x.detach()))


def test_all_gather_with_grad_matches_single_process(tmp_path):
    world_size, n, d = 2, 3, 4
    results = run_distributed(_gather_grad, n, d, tmp_path=tmp_path)
    full = torch.randn(world_size, n, d, generator=torch.Generator().manual_seed(0))
    for rank, r in enumerate(results):
        assert torch.equal(r['gathered'], full.reshape(-1, d))
        assert torch.equal(r['no_grad'], full.reshape(-1, d))
        # single process: the sum of all ranks' losses, differentiated w.r.t. this rank's rows
        x = full.clone().requires_grad_()
        total = sum((x.reshape(-1, d) * torch.arange(world_size * n * d, dtype=torch.float32).view(-1, d) * (q + 1)).sum()
                    for q in range(world_size))
        total.backward()
        assert torch.allclose(r['grad'], x.grad[rank])


# ---- optimisation ------------------------------------------------------------

def test_param_groups_exclude_bias_and_norm():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2, bias=False))
    decay, no_decay = common.param_groups(model, 0.5)
    assert {id(p) for p in decay['params']} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay['params']} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert decay['weight_decay'] == 0.5 and no_decay['weight_decay'] == 0 and no_decay['bias_and_norm']


def test_lars_step_matches_formula_and_excludes_bias():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    model.weight.grad, model.bias.grad = torch.randn(3, 6), torch.randn(3)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    wd, lr, trust = 0.1, 0.5, 0.001
    optimizer = common.LARS(common.param_groups(model, wd), lr=lr, momentum=0.9, trust_coefficient=trust)
    optimizer.step()
    update = model.weight.grad + wd * w0
    expected_w = w0 - lr * trust * w0.norm() / update.norm() * update
    assert torch.allclose(model.weight, expected_w, atol=1e-7)
    assert torch.allclose(model.bias, b0 - lr * model.bias.grad)  # plain SGD, no decay, no trust ratio
    optimizer.step()  # momentum: buf = 0.9 * buf + update'
    update2 = model.weight.grad + wd * expected_w
    buf = 0.9 * (trust * w0.norm() / update.norm() * update) + trust * expected_w.norm() / update2.norm() * update2
    assert torch.allclose(model.weight, expected_w - lr * buf, atol=1e-6)


def test_lars_clip_caps_each_parameters_lr_at_the_global_lr():
    torch.manual_seed(0)
    small, large = nn.Linear(6, 3, bias=False), nn.Linear(6, 3, bias=False)
    small.weight.grad, large.weight.grad = torch.randn(3, 6), 1e-4 * torch.randn(3, 6)  # trust ratio < lr, > lr
    w_small, w_large = small.weight.detach().clone(), large.weight.detach().clone()
    lr, eta = 0.3, 0.02
    optimizer = common.LARS([dict(params=[small.weight, large.weight], weight_decay=0.0)], lr=lr, trust_coefficient=eta,
                            clip=True)
    optimizer.step()
    adaptive = eta * w_small.norm() / small.weight.grad.norm()
    assert adaptive < lr and torch.allclose(small.weight, w_small - adaptive * small.weight.grad, atol=1e-7)
    assert eta * w_large.norm() / large.weight.grad.norm() > lr  # clipped: a plain SGD step at lr
    assert torch.allclose(large.weight, w_large - lr * large.weight.grad, atol=1e-9)

    zero = nn.Linear(6, 3, bias=False)  # ||w|| = 0: no trust ratio, a plain SGD step at lr (clip or not)
    nn.init.zeros_(zero.weight)
    zero.weight.grad = torch.randn(3, 6)
    common.LARS([dict(params=[zero.weight], weight_decay=0.0)], lr=2.0, trust_coefficient=eta, clip=True).step()
    assert torch.allclose(zero.weight, -2.0 * zero.weight.grad)


def test_lars_on_a_tensor_whose_gradient_is_exactly_zero():
    # LARC (apex; solo-learn): no trust ratio and no weight decay when ||g|| = 0, the momentum buffer still moves it.
    # SimCLR's, BYOL's, MoCo v3's LARS: g' = wd * w, rescaled to eta * w (a decay-only step of lr * eta)
    torch.manual_seed(0)
    lr, eta = 0.5, 0.001
    for denominator in ('update', 'larc'):
        layer = nn.Linear(6, 3, bias=False)
        w0 = layer.weight.detach().clone()
        optimizer = common.LARS([dict(params=[layer.weight], weight_decay=0.1)], lr=lr, momentum=0.9,
                                trust_coefficient=eta, denominator=denominator)
        layer.weight.grad = torch.zeros(3, 6)
        optimizer.step()
        if denominator == 'larc':
            assert torch.equal(layer.weight, w0)
            layer.weight.grad = torch.randn(3, 6)
            optimizer.step()
            w1, buf = layer.weight.detach().clone(), (w0 - layer.weight.detach()) / lr  # buf after the real step
            layer.weight.grad = torch.zeros(3, 6)
            optimizer.step()
            assert torch.allclose(layer.weight, w1 - lr * 0.9 * buf, atol=1e-7)
        else:
            assert torch.allclose(layer.weight, w0 - lr * eta * w0, atol=1e-8)


def test_lars_trust_ratio_denominators():
    # 'update': eta ||w|| / ||g + wd w|| (SimCLR, BYOL, MoCo v3); 'larc': eta ||w|| / (||g|| + wd ||w|| + 1e-8) (SwAV)
    torch.manual_seed(0)
    w, g, wd, eta, lr = torch.randn(4, 5), torch.randn(4, 5), 0.3, 0.02, 0.7
    for denominator, norm in (('update', (g + wd * w).norm()), ('larc', g.norm() + wd * w.norm() + 1e-8)):
        p = nn.Parameter(w.clone())
        p.grad = g.clone()
        common.LARS([dict(params=[p], weight_decay=wd)], lr=lr, trust_coefficient=eta, denominator=denominator).step()
        assert torch.allclose(p, w - lr * eta * w.norm() / norm * (g + wd * w), atol=1e-7)
    assert (g + wd * w).norm() < g.norm() + wd * w.norm()  # the two differ (triangle inequality, strict here)
    with pytest.raises(common.UsageError, match='unknown LARS denominator'):
        common.LARS([nn.Parameter(w)], lr=lr, denominator='sum')


def test_resume_takes_the_lars_settings_from_the_command_line(tmp_path):
    model = nn.Linear(4, 2)
    args = argparse.Namespace(method='simclr', output_dir=str(tmp_path), arch='resnet18', width=8, patch_size=4,
                              cifar_stem=True, lars_eta=0.001, lars_clip=False, lars_denominator='update', epochs=2)
    saved = common.LARS(common.param_groups(model, 1e-4), lr=0.1, trust_coefficient=0.001, clip=False)
    common.save_checkpoint(args, 1, model, model=model, optimizer=saved)
    args.lars_eta, args.lars_clip, args.lars_denominator = 0.02, True, 'larc'
    resumed = common.LARS(common.param_groups(model, 1e-4), lr=0.1, trust_coefficient=0.02, clip=True)
    assert common.resume(args, model=model, optimizer=resumed) == 1
    assert all(g['trust_coefficient'] == 0.02 and g['clip'] and g['denominator'] == 'larc' for g in resumed.param_groups)

def test_cosine_schedule_values():
    s = common.cosine_schedule(1.0, 0.1, epochs=10, steps_per_epoch=4, warmup_epochs=2, warmup_start=0.0)
    assert len(s) == 40
    # MoCo v3's, SimCLR's, BYOL's warm-up (the default): lr * t / W, the base value first reached by the cosine
    assert np.allclose(s[:8], np.arange(8) / 8) and s[8] == 1.0
    t = np.arange(32)
    assert np.allclose(s[8:], 0.1 + 0.45 * (1 + np.cos(np.pi * t / 32)))
    assert s[-1] > 0.1 and np.all(np.diff(s[8:]) < 0)
    # DINO's / SwAV's: linear from the start value, reaching the base value AT the last warm-up step (8 steps: i / 7)
    dino = common.cosine_schedule(1.0, 0.1, epochs=10, steps_per_epoch=4, warmup_epochs=2, warmup_reaches_base=True)
    assert np.allclose(dino[:8], np.arange(8) / 7) and dino[7] == 1.0 and np.allclose(dino[8:], s[8:])
    swav = common.cosine_schedule(4.8, 0.0048, epochs=4, steps_per_epoch=5, warmup_epochs=2, warmup_start=0.3,
                                  warmup_reaches_base=True)
    assert swav[0] == 0.3 and np.allclose(swav[:10], 0.3 + (4.8 - 0.3) * np.arange(10) / 9) and swav[9] == 4.8
    momentum = common.cosine_schedule(0.996, 1.0, epochs=5, steps_per_epoch=10)
    assert math.isclose(momentum[0], 0.996) and momentum[-1] > 0.9999


def test_step_schedule_values():
    s = common.step_schedule(0.03, epochs=200, steps_per_epoch=2, milestones=[120, 160])
    assert math.isclose(s[0], 0.03) and math.isclose(s[239], 0.03)
    assert math.isclose(s[240], 0.003) and math.isclose(s[319], 0.003) and math.isclose(s[320], 0.0003)


def test_set_lr_skips_fixed_groups_and_weight_decay_skips_bias():
    a, b = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([dict(params=[a], weight_decay=0.1), dict(params=[b], lr=0.05, fixed_lr=True,
                                                                            bias_and_norm=True, weight_decay=0.0)], lr=1)
    common.set_lr(optimizer, np.float64(0.3))
    common.set_weight_decay(optimizer, 0.4)
    assert optimizer.param_groups[0]['lr'] == 0.3 and type(optimizer.param_groups[0]['lr']) is float
    assert optimizer.param_groups[1]['lr'] == 0.05
    assert optimizer.param_groups[0]['weight_decay'] == 0.4 and optimizer.param_groups[1]['weight_decay'] == 0.0


def test_ema_update_formula():
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    expected = [0.9 * t.detach() + 0.1 * o.detach() for t, o in zip(target.parameters(), online.parameters())]
    common.ema_update(target, online, 0.9)
    for t, e in zip(target.parameters(), expected):
        assert torch.allclose(t, e)


def test_normalized_output_std_healthy_and_collapsed():
    d = 256
    spread = torch.randn(4096, d, generator=torch.Generator().manual_seed(0))  # isotropic: unit vectors spread evenly
    assert abs(float(common.normalized_output_std(spread)) - 1 / math.sqrt(d)) < 0.002
    collapsed = torch.ones(64, d) + 1e-4 * spread[:64]  # every output (almost) the same point
    assert float(common.normalized_output_std(collapsed)) < 1e-3
    # per channel over the batch, then averaged: a plain loop
    z = spread[:10, :5]
    unit = [[float(v) / float(row.norm()) for v in row] for row in z]
    per_channel = [float(torch.tensor([unit[i][c] for i in range(10)]).std()) for c in range(5)]
    assert math.isclose(float(common.normalized_output_std(z)), sum(per_channel) / 5, rel_tol=1e-5)


# ---- backbones ---------------------------------------------------------------

def test_resnet_cifar_stem_and_dims():
    r18 = common.build_backbone(backbone_args(cifar_stem=True))
    assert r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1) and isinstance(r18.maxpool, nn.Identity)
    assert r18.embed_dim == 512 and r18(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    r50 = common.build_backbone(backbone_args(arch='resnet50'))
    assert r50.conv1.kernel_size == (7, 7) and r50.embed_dim == 2048
    assert r50(torch.randn(2, 3, 64, 64)).shape == (2, 2048)
    # the standard network keeps torchvision's parameter names and shapes
    import torchvision
    reference = torchvision.models.resnet50()
    reference.fc = nn.Identity()
    assert {k: v.shape for k, v in r50.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    small = common.build_backbone(backbone_args(width=8, cifar_stem=True))
    assert small.embed_dim == 64 and small(torch.randn(2, 3, 16, 16)).shape == (2, 64)
    zero = common.build_backbone(backbone_args(zero_init_residual=True))
    assert torch.all(zero.layer1[0].bn2.weight == 0)


def test_channels_last_is_a_choice_for_resnets_and_computes_the_same_features():
    """--channels-last: on GPUs by default, on a CPU when asked (the CPU benchmark asks), never for a ViT."""
    cpu, gpu = torch.device('cpu'), torch.device('cuda')
    for chosen, arch, device, expected in [(None, 'resnet18', cpu, False), (None, 'resnet18', gpu, True),
                                           (True, 'resnet18', cpu, True), (False, 'resnet18', gpu, False),
                                           (True, 'vit_tiny', cpu, False), (None, 'vit_tiny', gpu, False)]:
        args = argparse.Namespace(arch=arch, channels_last=chosen)
        assert common.uses_channels_last(args, device) == expected, (chosen, arch, device)
    torch.manual_seed(0)
    net = common.build_backbone(backbone_args(width=8, cifar_stem=True)).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        plain = net(x)
        last = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(last, plain, rtol=1e-4, atol=1e-5)
    if not torch.cuda.is_available():  # below 8 channels PyTorch's CPU convolutions crash in channels-last
        with pytest.raises(common.UsageError, match='--channels-last with --width 4 crashes'):
            common.validate_backbone_args(argparse.Namespace(**{**vars(backbone_args(width=4, cifar_stem=True)),
                                                                'channels_last': True, 'image_size': 16,
                                                                'dist_timeout': 60.0, 'workers': 0}))


def test_sincos_position_embedding_values():
    pe = common.sincos_pos_embed(3, 4, 8)  # (1, 1 + 12, 8)
    assert pe.shape == (1, 13, 8) and torch.all(pe[0, 0] == 0)
    row, col = 2, 3  # patch (y=2, x=3) is token 1 + 2*4 + 3
    omega = 1 / 10000 ** (torch.arange(2) / 2)
    # MoCo v3's channel order: the row's frequencies first (sin, cos), then the column's
    expected = torch.cat([torch.sin(row * omega), torch.cos(row * omega), torch.sin(col * omega), torch.cos(col * omega)])
    assert torch.allclose(pe[0, 1 + row * 4 + col], expected.float(), atol=1e-6)


def bicubic_reference(values, out_h, out_w, scale_h, scale_w):
    """Bicubic resampling of values (h, w, C) as PyTorch defines it for align_corners=False: output cell i
    reads the source at x = (i + 0.5) / scale - 0.5, a cubic convolution (Keys, a = -0.75) over the 4 cells
    around x, indices clamped to the border; separable (rows, then columns). Plain numpy loops."""
    def kernel(t, a=-0.75):
        t = abs(t)
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1 if t <= 1 else a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0

    def along_first_axis(v, out, scale):
        result = np.zeros((out,) + v.shape[1:])
        for i in range(out):
            x = (i + 0.5) / scale - 0.5
            x0 = math.floor(x)
            for k in (-1, 0, 1, 2):
                result[i] += kernel(x - (x0 + k)) * v[min(max(x0 + k, 0), len(v) - 1)]
        return result
    rows = along_first_axis(values, out_h, scale_h)                                        # (out_h, w, C)
    return along_first_axis(rows.transpose(1, 0, 2), out_w, scale_w).transpose(1, 0, 2)   # (out_h, out_w, C)


@pytest.mark.parametrize('pos_embed', ['learned', 'sincos'])
def test_vit_position_embedding_interpolation(pos_embed):
    torch.manual_seed(0)
    vit = common.build_backbone(backbone_args(arch='vit_tiny', image_size=32, patch_size=4, pos_embed=pos_embed))
    assert vit.pos_embed.shape == (1, 1 + 64, 192)
    assert vit.interpolate_pos_embed(8, 8) is vit.pos_embed  # same grid: untouched
    stored = vit.pos_embed[0, 1:].detach().double().view(8, 8, 192).numpy()
    for grid_h, grid_w in ((4, 4), (6, 6), (3, 5), (12, 8)):
        resampled = vit.interpolate_pos_embed(grid_h, grid_w)
        assert resampled.shape == (1, 1 + grid_h * grid_w, 192) and torch.equal(resampled[:, 0], vit.pos_embed[:, 0])
        # DINO's sample grid: F.interpolate with scale_factor (g + 0.1) / N, so that cell i reads (i + 0.5) N / (g + 0.1) - 0.5
        expected = bicubic_reference(stored, grid_h, grid_w, (grid_h + 0.1) / 8, (grid_w + 0.1) / 8)
        assert np.allclose(resampled[0, 1:].detach().view(grid_h, grid_w, 192).double().numpy(), expected, atol=1e-5)
        if grid_h != 8:  # the grid given as an output size samples elsewhere: (i + 0.5) N / g - 0.5
            by_size = bicubic_reference(stored, grid_h, grid_w, grid_h / 8, grid_w / 8)
            assert np.abs(by_size - expected).max() > 1e-3
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 192) and vit(torch.randn(2, 3, 16, 16)).shape == (2, 192)


def test_vit_init_mocov3_bounds_and_statistics():
    # MoCo v3's vits.py: q, k, v each xavier-uniform as D x D layers, every other Linear xavier-uniform, biases 0,
    # CLS token N(0, 1e-6), patch projection xavier-uniform over (3 p^2 -> D) with a zero bias
    torch.manual_seed(0)
    dim, patch = 192, 4
    vit = common.build_backbone(backbone_args(arch='vit_tiny', image_size=32, patch_size=patch, vit_init='mocov3'))

    def uniform_with_bound(w, bound):  # U(-b, b): fills the interval, std b / sqrt(3), mean 0
        w = w.detach()
        return (float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
                and math.isclose(float(w.std()), bound / math.sqrt(3), rel_tol=0.03) and abs(float(w.mean())) < 0.03 * bound)
    for block in vit.blocks:
        assert uniform_with_bound(block.attn.qkv.weight, math.sqrt(6 / (dim + dim)))  # not xavier over (3D, D)
        assert uniform_with_bound(block.attn.proj.weight, math.sqrt(6 / (dim + dim)))
        assert uniform_with_bound(block.mlp[0].weight, math.sqrt(6 / (dim + 4 * dim)))
        assert uniform_with_bound(block.mlp[2].weight, math.sqrt(6 / (4 * dim + dim)))
        assert all(torch.all(m.bias == 0) for m in block.modules() if isinstance(m, nn.Linear))
    assert not uniform_with_bound(vit.blocks[0].attn.qkv.weight, math.sqrt(6 / (dim + 3 * dim)))
    assert uniform_with_bound(vit.patch_embed.weight, math.sqrt(6 / (3 * patch * patch + dim)))
    assert torch.all(vit.patch_embed.bias == 0)
    assert 0.7e-6 < float(vit.cls_token.detach().std()) < 1.3e-6
    # DINO's (the default): trunc-normal 0.02 Linears with zero bias; the patch projection at Conv2d's default
    # init, U(+-1 / sqrt(fan_in)) for weight and bias (half MoCo v3's bound at ViT-S/16: 1/sqrt(768) vs sqrt(6/1152))
    dino = common.build_backbone(backbone_args(arch='vit_tiny', image_size=32, patch_size=patch))
    assert math.isclose(float(dino.blocks[0].attn.qkv.weight.detach().std()), 0.02, rel_tol=0.03)
    assert torch.all(dino.blocks[0].attn.qkv.bias == 0) and math.isclose(float(dino.cls_token.detach().std()), 0.02, rel_tol=0.3)
    assert uniform_with_bound(dino.patch_embed.weight, 1 / math.sqrt(3 * patch * patch))
    assert float(dino.patch_embed.bias.detach().abs().max()) > 0
    with pytest.raises(common.UsageError, match="unknown ViT init 'timm'"):
        common.build_backbone(backbone_args(arch='vit_tiny', vit_init='timm'))


def test_vit_attention_maps_and_frozen_patch_embed():
    torch.manual_seed(0)
    vit = common.build_backbone(backbone_args(arch='vit_tiny', freeze_patch_embed=True, drop_path=0.1))
    vit.eval()
    x = torch.randn(2, 3, 32, 32)
    attention = vit.get_last_selfattention(x)
    assert attention.shape == (2, 3, 65, 65) and torch.allclose(attention.sum(-1), torch.ones(2, 3, 65))
    # the explicit attention path computes what the fused kernel computes
    tokens = vit.tokens(x)
    fused, _ = vit.blocks[0](tokens)
    explicit, _ = vit.blocks[0](tokens, return_attention=True)
    assert torch.allclose(fused, explicit, atol=1e-5)
    vit.train()
    weight = vit.patch_embed.weight.detach().clone()
    optimizer = torch.optim.SGD(common.param_groups(vit, 0.1)[0]['params'], lr=1.0)
    vit(x).sum().backward()
    optimizer.step()
    assert vit.patch_embed.weight.grad is None and torch.equal(vit.patch_embed.weight, weight)
    assert all(p is not vit.patch_embed.weight for g in common.param_groups(vit, 0.1) for p in g['params'])


# ---- kNN -------------------------------------------------------------------

def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    train_labels = torch.randint(0, 7, (300,), generator=g)
    test = F.normalize(torch.randn(50, 16, generator=g), dim=1)
    test_labels = torch.randint(0, 7, (50,), generator=g)
    results = common.knn_accuracy(train, train_labels, test, test_labels, 7, [1, 5, 20], 0.1, chunk=7)
    for k in (1, 5, 20):
        top1 = top5 = 0
        for i in range(50):  # the definition, one test image at a time
            similarity = [float(test[i] @ train[j]) for j in range(300)]
            neighbours = sorted(range(300), key=lambda j: -similarity[j])[:k]
            votes = [0.0] * 7
            for j in neighbours:
                votes[int(train_labels[j])] += math.exp(similarity[j] / 0.1)
            ranked = sorted(range(7), key=lambda c: -votes[c])
            top1 += ranked[0] == int(test_labels[i])
            top5 += int(test_labels[i]) in [c for c in ranked[:5] if votes[c] > 0]
        assert results[k][0] == pytest.approx(100 * top1 / 50) and results[k][1] == pytest.approx(100 * top5 / 50)


# ---- data ------------------------------------------------------------------

def test_views_are_a_function_of_seed_epoch_and_index():
    base = common.ProceduralTextures(20, 'train')
    view = common.augmentation(16, (0.2, 1.0), common.simclr_jitter(1.0), blur_prob=0.5, solarize_prob=0.5)
    dataset = common.ViewDataset(base, common.Views([view, view]), seed=3)
    a, label, index = dataset[(2, 5)]
    torch.manual_seed(123)  # the global RNG does not matter
    b, _, _ = dataset[(2, 5)]
    assert label == 5 % 10 and index == 5 and a[0].dtype == torch.uint8 and a[0].shape == (3, 16, 16)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])                      # two different views
    assert not torch.equal(a[0], dataset[(3, 5)][0][0])    # another epoch, other views
    assert np.array_equal(np.asarray(base[7][0]), np.asarray(common.ProceduralTextures(20, 'train')[7][0]))


def test_epoch_sampler_shards_cover_the_data_once():
    shards = [list(common.EpochSampler(103, 10, rank, 3, seed=0)) for rank in range(3)]
    indices = [i for shard in shards for _, i in shard]
    assert all(len(s) == 30 for s in shards) and len(set(indices)) == 90  # 103 trimmed to 3 ranks x 3 batches x 10
    assert all(e == 0 for shard in shards for e, _ in shard)
    sampler = common.EpochSampler(103, 10, 0, 1, seed=0)
    sampler.set_epoch(1)
    assert [i for _, i in sampler] != [i for _, i in shards[0]]
    eval_shards = [list(common.EpochSampler(7, 4, r, 2, 0, shuffle=False, drop_last=False)) for r in range(2)]
    assert sorted(i for s in eval_shards for _, i in s) == list(range(7))


def test_loader_yields_normalised_views_on_device():
    base = common.ProceduralTextures(16, 'train')
    dataset = common.ViewDataset(base, common.Views([common.eval_transform(16, 32)] * 2), seed=0)
    loader = common.Loader(dataset, 8, common.EpochSampler(16, 8, 0, 1, 0), 0, torch.device('cpu'))
    views, labels, indices = next(loader.epoch(0))
    assert len(views) == 2 and views[0].shape == (8, 3, 16, 16) and views[0].dtype == torch.float32
    raw = common.eval_transform(16, 32)(base[int(indices[0])][0]).float()
    mean, std = torch.tensor(common.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(common.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(views[0][0], (raw / 255 - mean) / std, atol=1e-5)
    assert torch.equal(labels, indices % 10)


class FakeLoader:
    """What MetricLogger reads of a loader: its length and when the epoch started."""
    def __init__(self, steps):
        self.steps, self.epoch_started = steps, 0.0

    def __len__(self):
        return self.steps


def test_metric_logger_stops_on_non_finite_loss(tmp_path):
    args = argparse.Namespace(output_dir=str(tmp_path), epochs=1, log_every=100, batch_size=4)
    logger = common.MetricLogger(args, FakeLoader(10))
    logger.step(0, 0, torch.tensor(1.0))
    logger.step(0, 1, torch.tensor(float('nan')))  # not a logging step: no host sync yet
    with pytest.raises(common.TrainingError, match='nan'):
        logger.end_epoch(0)


def test_forward_by_size_makes_one_backbone_call_per_crop_size_in_order():
    calls = []
    def backbone(x):
        calls.append(tuple(x.shape))
        return x.mean(dim=(2, 3))  # (B, 3): a per-image value to check the order
    crops = [torch.full((2, 3, 8, 8), 0.0), torch.full((2, 3, 8, 8), 1.0), torch.full((2, 3, 4, 4), 2.0)]
    features = common.forward_by_size(backbone, crops)
    assert calls == [(4, 3, 8, 8), (2, 3, 4, 4)]
    assert features[:, 0].tolist() == [0, 0, 1, 1, 2, 2]


def test_check_ranges_gives_one_line_errors():
    args = argparse.Namespace(temperature=0.0, num_local_crops=-1, blur_probs=[1.0, 1.5], moco_m=0.99)
    with pytest.raises(common.UsageError, match='--temperature must be positive, not 0.0'):
        common.check_ranges(args, positive=['temperature'])
    with pytest.raises(common.UsageError, match='--num-local-crops must be >= 0'):
        common.check_ranges(args, non_negative=['num_local_crops'])
    with pytest.raises(common.UsageError, match=r'--blur-probs must be in \[0, 1\]'):
        common.check_ranges(args, probabilities=['moco_m', 'blur_probs'])
    common.check_ranges(args, probabilities=['moco_m'])  # in range: no error
