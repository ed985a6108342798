"""mocov3.py: ctr(q, k) against Alg. 1, its rank-offset labels across 2 processes, the heads, the frozen
patch projection, bad input, learning, torchrun with a ViT."""
import math

import pytest
import torch

import common
import mocov3
from conftest import TINY, learning_run, run_distributed, run_script
from test_cli import expect_error


def ctr_reference(q, k, temperature):
    """Alg. 1 lines 15-20 as a plain loop: query i's positive is key i, its negatives all other keys."""
    total = 0.0
    for i in range(len(q)):
        qi = q[i] / q[i].norm()
        logits = [float(qi @ (kj / kj.norm())) / temperature for kj in k]
        total += -math.log(math.exp(logits[i]) / sum(math.exp(x) for x in logits))
    return total / len(q) * 2 * temperature


def test_contrastive_loss_matches_algorithm_1():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for temperature in (0.2, 1.0):
        assert math.isclose(float(mocov3.contrastive_loss(q, k, temperature)), ctr_reference(q, k, temperature),
                            rel_tol=1e-5)


def _ctr_on_rank(rank, world_size, n, d, temperature):
    g = torch.Generator().manual_seed(1)
    q_all, k_all = torch.randn(world_size * n, d, generator=g), torch.randn(world_size * n, d, generator=g)
    q = q_all[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = mocov3.contrastive_loss(q, k_all[rank * n:(rank + 1) * n], temperature)
    loss.backward()
    return dict(loss=loss.detach(), grad=q.grad)


def test_rank_offset_labels_across_two_processes_equal_the_global_batch(tmp_path):
    world_size, n, d, temperature = 2, 4, 8, 0.2
    results = run_distributed(_ctr_on_rank, n, d, temperature, tmp_path=tmp_path)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(world_size * n, d, generator=g).requires_grad_()
    k = torch.randn(world_size * n, d, generator=g)
    loss = mocov3.contrastive_loss(q, k, temperature)
    loss.backward()
    assert math.isclose(sum(float(r['loss']) for r in results) / world_size, float(loss.detach()), rel_tol=1e-5)
    for rank, r in enumerate(results):  # DDP averages gradients over ranks
        assert torch.allclose(r['grad'] / world_size, q.grad[rank * n:(rank + 1) * n], atol=1e-6)


def _args(*extra):
    args = common.parse_args(mocov3.parser, mocov3.SMALL_IMAGE_PRESET, ['--data', 'procedural', *TINY, *extra])
    return common.apply_arch_preset(mocov3.parser, args, mocov3.ARCH_PRESETS, mocov3.SMALL_IMAGE_PRESET,
                                    ['--data', 'procedural', *TINY, *extra])


def test_heads_follow_the_paper():
    resnet = mocov3.MoCoV3(common.build_backbone(_args()), 32, 16)
    vit = mocov3.MoCoV3(common.build_backbone(_args('--arch', 'vit_tiny')), 32, 16)
    for model, projector_layers, predictor_last_bn in ((resnet, 2, False), (vit, 3, True)):
        linears = [m for m in model.base_encoder.projector if isinstance(m, torch.nn.Linear)]
        assert len(linears) == projector_layers and all(m.bias is None for m in linears)
        last = model.base_encoder.projector[-1]
        assert isinstance(last, torch.nn.BatchNorm1d) and not last.affine
        assert isinstance(model.predictor[-1], torch.nn.BatchNorm1d) == predictor_last_bn
        assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    assert vit.base_encoder.backbone.pos_embed.requires_grad is False  # fixed sin-cos buffer
    assert 'pos_embed' in dict(vit.base_encoder.backbone.named_buffers())


def test_vit_asks_for_the_authors_init():
    # MoCo v3's vits.py: the (frozen) patch projection xavier-uniform over 3 p^2 -> D with a zero bias, CLS ~ N(0, 1e-6)
    args = _args('--arch', 'vit_tiny')
    assert args.vit_init == 'mocov3' and _args().vit_init == 'dino'  # ResNets: the flag is not used
    backbone = common.build_backbone(args)
    bound = math.sqrt(6 / (3 * args.patch_size ** 2 + backbone.embed_dim))
    weight = backbone.patch_embed.weight.detach()
    assert torch.all(backbone.patch_embed.bias == 0) and float(weight.abs().max()) <= bound
    assert math.isclose(float(weight.std()), bound / math.sqrt(3), rel_tol=0.05)
    assert float(backbone.cls_token.detach().abs().max()) < 1e-5
    assert common.build_backbone(_args('--arch', 'vit_tiny', '--vit-init', 'dino')).patch_embed.bias.abs().max() > 0


def test_patch_projection_stays_frozen_and_momentum_encoder_follows_by_ema():
    torch.manual_seed(0)
    model = mocov3.MoCoV3(common.build_backbone(_args('--arch', 'vit_tiny')), 32, 16)
    patch = model.base_encoder.backbone.patch_embed
    before = [patch.weight.clone(), patch.bias.clone()]
    block_before = model.base_encoder.backbone.blocks[0].mlp[0].weight.clone()
    groups = common.param_groups(model, 0.1, exclude_bias_and_norm=False)
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    assert not any(p is patch.weight or p is patch.bias for g in groups for p in g['params'])
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    for _ in range(2):
        online = [p.detach().clone() for p in model.base_encoder.parameters()]
        target = [p.detach().clone() for p in model.momentum_encoder.parameters()]
        common.ema_update(model.momentum_encoder, model.base_encoder, 0.9)
        for p, t, o in zip(model.momentum_encoder.parameters(), target, online):
            assert torch.allclose(p, 0.9 * t + 0.1 * o)
        q1, q2, k1, k2 = model(views)
        loss = mocov3.contrastive_loss(q1, k2, 0.2) + mocov3.contrastive_loss(q2, k1, 0.2)
        optimizer.zero_grad()
        loss.backward()
        assert patch.weight.grad is None and all(p.grad is None for p in model.momentum_encoder.parameters())
        optimizer.step()
    assert torch.equal(patch.weight, before[0]) and torch.equal(patch.bias, before[1])
    assert not torch.equal(model.base_encoder.backbone.blocks[0].mlp[0].weight, block_before)


def test_bad_input(tmp_path):
    for extra, match in ((['--arch', 'resnet50', '--freeze-patch-embed'], 'ViT option'),
                         (['--arch', 'vit_tiny', '--patch-size', '5'], 'does not divide')):
        with pytest.raises(common.UsageError, match=match):
            _args(*extra)
    with pytest.raises(common.UsageError, match=r'outside \(0, 1\]'):
        common.check_crops(_args(), [16], [(0.0, 1.0)])
    out = tmp_path / 'out'  # the script: one line, exit code 2, nothing written
    expect_error('mocov3.py', '--data', 'procedural', '--min-scale', '0', '--output-dir', out, match='outside (0, 1]')
    assert not out.exists()


def test_torchrun_two_processes_with_a_vit(tmp_path):
    run = ['--data', 'procedural:128', *TINY, '--arch', 'vit_tiny', '--epochs', '1', '--batch-size', '32',
           '--mlp-hidden-dim', '32', '--knn-every', '1', '--knn-k', '20', '--output-dir', tmp_path / 'run']
    out = run_script('mocov3.py', *run, nproc=2)
    assert '2 process(es)' in out.stdout and 'vit preset (freeze_patch_embed=True, pos_embed=sincos, vit_init=mocov3)' in out.stdout
    assert 'kNN (k=20' in out.stdout
    checkpoint = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)
    assert checkpoint['method'] == 'mocov3' and checkpoint['args']['freeze_patch_embed']
    # the trained patch projection is still the random one the model was built with
    torch.manual_seed(checkpoint['args']['seed'])
    args = _args('--arch', 'vit_tiny')
    fresh = common.build_backbone(args)
    assert torch.equal(checkpoint['backbone']['patch_embed.weight'], fresh.patch_embed.weight)


# The learning test: flags beyond conftest.LEARN, and the asserted kNN gain (tools/measure_learning.py measures both)
LEARNING = ['--min-scale', '0.3', '--optimizer', 'sgd', '--lr', '1.0', '--mlp-hidden-dim', '128', '--warmup-epochs', '1']
LEARNING_MARGIN = 5


def test_mocov3_learns_beyond_the_untrained_network(tmp_path):
    gain, _ = learning_run(tmp_path, 'mocov3.py', *LEARNING)
    assert gain > LEARNING_MARGIN, gain  # kNN top-1 gain over the untrained network: smallest of 20 runs +11.7
