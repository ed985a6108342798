"""dino.py: the loss against a plain loop over crop pairs, the center across 2 processes, the teacher
(no gradient, no drop-path), the head, clipping, bad input, learning, torchrun + attention maps."""
import math

import pytest
import torch

import common
import dino
from conftest import TINY, TINY_BACKBONE, learning_run, run_distributed, run_script
from test_cli import expect_error


def dino_loss_reference(student_out, teacher_out, center, student_temp, teacher_temp):
    """Eq. 3 / Alg. 1 literally: for every (teacher global crop a, student crop b != a) and image i,
    H = - sum_k P_t(a, i)_k log P_s(b, i)_k with centering and sharpening; mean over pairs and images."""
    terms = []
    for a in range(teacher_out.shape[0]):
        for b in range(student_out.shape[0]):
            if a == b:
                continue
            for i in range(student_out.shape[1]):
                t = [(float(x) - float(c)) / teacher_temp for x, c in zip(teacher_out[a, i], center[0])]
                s = [float(x) / student_temp for x in student_out[b, i]]
                p_t = [math.exp(x) / sum(math.exp(y) for y in t) for x in t]
                log_z = math.log(sum(math.exp(y) for y in s))
                terms.append(-sum(p * (x - log_z) for p, x in zip(p_t, s)))
    return sum(terms) / len(terms)


def test_dino_loss_matches_a_loop_over_crop_pairs():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    center = torch.randn(1, 7, generator=g)
    for teacher_temp in (0.04, 0.07):
        assert math.isclose(float(dino.dino_loss(student, teacher, center, 0.1, teacher_temp)),
                            dino_loss_reference(student, teacher, center, 0.1, teacher_temp), rel_tol=1e-5)
    # the student gets a gradient, the (detached) teacher does not
    student.requires_grad_(), teacher.requires_grad_()
    dino.dino_loss(student, teacher, center, 0.1, 0.04).backward()
    assert student.grad is not None and teacher.grad is None


def test_teacher_entropy_is_ln_k_when_uniform_and_zero_when_one_hot():
    k = 16
    uniform = torch.zeros(2, 4, k)
    assert math.isclose(float(dino.teacher_entropy(uniform, torch.zeros(1, k), 0.04)), math.log(k), rel_tol=1e-6)
    one_hot = torch.zeros(2, 4, k)
    one_hot[..., 3] = 10.0
    assert float(dino.teacher_entropy(one_hot, torch.zeros(1, k), 0.04)) < 1e-6
    # centering removes a shared offset: the same one-hot logits, centred on themselves, are uniform
    assert math.isclose(float(dino.teacher_entropy(one_hot, one_hot[0, :1], 0.04)), math.log(k), rel_tol=1e-6)


def _center_on_rank(rank, world_size, n, k):
    g = torch.Generator().manual_seed(2)
    teacher_all, center = torch.randn(2, world_size * n, k, generator=g), torch.randn(1, k, generator=g)
    dino.update_center(center, teacher_all[:, rank * n:(rank + 1) * n], 0.9)
    return center


def test_center_update_across_two_processes_equals_the_global_batch(tmp_path):
    world_size, n, k = 2, 3, 6
    results = run_distributed(_center_on_rank, n, k, tmp_path=tmp_path)
    g = torch.Generator().manual_seed(2)
    teacher_all, center = torch.randn(2, world_size * n, k, generator=g), torch.randn(1, k, generator=g)
    expected = 0.9 * center + 0.1 * teacher_all.reshape(-1, k).mean(0, keepdim=True)
    for r in results:
        assert torch.allclose(r, expected, atol=1e-6)


def _model(*extra):
    argv = ['--data', 'procedural', *TINY, '--arch', 'vit_tiny', '--drop-path', '0.5', *extra]
    args = common.parse_args(dino.parser, dino.SMALL_IMAGE_PRESET, argv)
    backbone = common.build_backbone(args)
    return dino.DINO(backbone, dino.DINOHead(backbone.embed_dim, 32, 16, 64), 64)


def test_teacher_gets_no_gradient_and_no_drop_path():
    torch.manual_seed(0)
    model = _model()
    model.train()
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8)]
    student_out, teacher_out = model(views)
    assert student_out.shape == (3, 4, 64) and teacher_out.shape == (2, 4, 64)
    dino.dino_loss(student_out, teacher_out, model.center, 0.1, 0.04).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters() if p.requires_grad)
    assert all(block.drop_path_rate == 0 for block in model.teacher.backbone.blocks)
    assert model.student.backbone.blocks[-1].drop_path_rate == 0.5
    # in train mode the teacher is deterministic (no stochastic depth), the student is not
    assert torch.equal(model.teacher(views[:2]), model.teacher(views[:2]))
    assert not torch.equal(model.student(views[:2]), model.student(views[:2]))
    assert 'center' in model.state_dict() and all(id(p) not in {id(q) for q in model.student.parameters()}
                                                  for p in model.teacher.parameters())


def test_head_weight_norm_and_clipping():
    head = dino.DINOHead(8, 16, 4, 10)
    assert not head.last_layer_g.requires_grad and torch.all(head.last_layer_g == 1)
    x = torch.randn(3, 8)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    weight = head.last_layer_v / head.last_layer_v.norm(dim=1, keepdim=True)
    assert torch.allclose(head(x), z @ weight.T, atol=1e-6)
    assert head(x).abs().max() <= 1 + 1e-5  # cosines
    head = dino.DINOHead(8, 16, 4, 10, norm_last_layer=False)
    assert head.last_layer_g.requires_grad
    # per-parameter clipping: each gradient norm is capped on its own
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])
    module = torch.nn.Module()
    module.a, module.b = a, b
    common.clip_gradients(module, 1.0)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.8, 0.0]), atol=1e-5) and torch.equal(b.grad, torch.tensor([0.3, 0.4]))


def test_teacher_temperature_warms_up_per_epoch():
    args = dino.parser.parse_args(['--data', 'procedural', '--epochs', '40'])
    schedule = dino.teacher_temperature_schedule(args)
    assert len(schedule) == 40 and schedule[0] == 0.04 and math.isclose(schedule[29], 0.07) and schedule[-1] == 0.07


def _check(*extra):
    argv = ['--data', 'procedural', '--arch', 'vit_tiny', '--image-size', '16', *extra]
    args = common.parse_args(dino.parser, dino.SMALL_IMAGE_PRESET, argv)
    common.apply_arch_preset(dino.parser, args, dino.ARCH_PRESETS, dino.SMALL_IMAGE_PRESET, argv)
    common.check_crops(args, [args.image_size, args.local_crop_size], [args.global_scale, args.local_scale])


def test_bad_input(tmp_path):
    _check()  # the CIFAR preset's 16-px local crops fit patch 4
    for extra, match in ((['--local-crop-size', '10'], 'does not divide the 10-px crops'),
                         (['--patch-size', '3'], 'does not divide'),
                         (['--local-scale', '0.05', '1.5'], r'outside \(0, 1\]'),
                         (['--global-scale', '0', '1'], r'outside \(0, 1\]'),
                         (['--arch', 'resnet18', '--freeze-patch-embed'], 'ViT option')):
        with pytest.raises(common.UsageError, match=match):
            _check(*extra)
    out = tmp_path / 'out'  # the script: one line, exit code 2, nothing written
    expect_error('dino.py', '--data', 'procedural', '--arch', 'vit_tiny', '--image-size', '16', '--local-crop-size',
                 '10', '--output-dir', out, match='does not divide the 10-px crops')
    assert not out.exists()


# The learning test: flags beyond conftest.LEARN, and the asserted kNN gain (tools/measure_learning.py measures both).
# A ResNet-18 with a small DINO head (K 64), SGD, 2 local 8-px crops, a sharp teacher (tau_t 0.02, no warm-up).
LEARNING = ['--optimizer', 'sgd', '--lr', '1.0', '--weight-decay', '1e-5', '--weight-decay-end', '1e-5', '--min-lr', '0',
            '--warmup-epochs', '1', '--hidden-dim', '128', '--bottleneck-dim', '64', '--out-dim', '64', '--use-bn-in-head',
            '--num-local-crops', '2', '--local-crop-size', '8', '--teacher-temp', '0.02', '--warmup-teacher-temp', '0.02',
            '--warmup-teacher-temp-epochs', '0', '--momentum-teacher', '0.99']
LEARNING_MARGIN = 2.5


def test_dino_learns_beyond_the_untrained_network_without_collapse(tmp_path):
    gain, records = learning_run(tmp_path, 'dino.py', *LEARNING)
    assert gain > LEARNING_MARGIN, gain  # kNN top-1 gain of the teacher over the untrained network: smallest of 16 runs +5.1
    # neither collapse at the end: the teacher is neither uniform (ln K) nor one-hot (0); measured 0.55-0.71 ln K
    entropy = [r['teacher_entropy'] for r in records if 'step' in r]
    assert 0.1 * math.log(64) < entropy[-1] < 0.9 * math.log(64), entropy


def test_torchrun_vit_then_attention_maps(tmp_path):
    run = ['--data', 'procedural:128', *TINY, '--arch', 'vit_tiny', '--epochs', '1', '--batch-size', '32',
           '--hidden-dim', '32', '--out-dim', '64', '--num-local-crops', '2', '--local-crop-size', '8',
           '--knn-every', '1', '--knn-k', '20', '--output-dir', tmp_path / 'run']
    out = run_script('dino.py', *run, nproc=2)
    assert '2 process(es)' in out.stdout and 'kNN (k=20' in out.stdout and 'teacher_entropy' in out.stdout
    checkpoint = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)
    assert checkpoint['method'] == 'dino' and checkpoint['model']['center'].abs().sum() > 0
    for key, value in checkpoint['backbone'].items():  # the evaluated backbone is the teacher's
        assert torch.equal(value, checkpoint['model']['teacher.backbone.' + key])
    image = common.ProceduralTextures(1, 'test')[0][0]
    image.save(tmp_path / 'img.png')
    run_script('eval_knn.py', tmp_path / 'run' / 'checkpoint.pth', '--attention-image', tmp_path / 'img.png',
               '--attention-out', tmp_path / 'maps.png')
    assert (tmp_path / 'maps.png').stat().st_size > 1000
    # the maps are the CLS row of the last block's attention, one per head
    args = common.parse_args(dino.parser, dino.SMALL_IMAGE_PRESET, ['--data', 'procedural', *TINY, '--arch', 'vit_tiny'])
    backbone = common.build_backbone(args)
    backbone.load_state_dict(checkpoint['backbone'])
    backbone.eval()  # no drop-path
    x = torch.randn(3, 16, 16)
    maps = common.attention_maps(backbone, x)
    assert maps.shape == (3, 4, 4)
    assert torch.allclose(maps.flatten(1), backbone.get_last_selfattention(x[None])[0, :, 0, 1:])
    expect_error('eval_knn.py', '--random-init', '--data', 'procedural', *TINY_BACKBONE, '--attention-image', tmp_path / 'img.png',
                 '--attention-out', tmp_path / 'r.png', match='needs a ViT')
