"""released.py: each authors' layout, made from our module by the inverse mapping, loads back with every key
used and identical outputs; wrong files are refused in one line; eval_knn.py --pretrained evaluates such a file
and draws its attention maps; export writes state dicts that torchvision's ResNets and DINO's ViT names take."""
import argparse
import json
import sys
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import common
from tools import released
from conftest import run_script
from test_cli import expect_error


def build(**kw):
    defaults = dict(arch='resnet18', width=8, cifar_stem=False, zero_init_residual=False, image_size=32, patch_size=4,
                    num_heads=None, drop_path=0.0, pos_embed='learned', freeze_patch_embed=False)
    return common.build_backbone(argparse.Namespace(**{**defaults, **kw})).eval()


def randomise_bn(backbone, seed=1):
    """BatchNorm statistics away from 0 / 1, so that a mix-up of buffers would show in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(1 + 0.5 * torch.rand(m.running_var.shape, generator=g))
            m.num_batches_tracked.fill_(7)
    return backbone


VIT = dict(arch='vit_tiny', image_size=16, patch_size=4, num_heads=3)
MOCOV3_VIT = dict(arch='vit_small', image_size=16, patch_size=8, num_heads=12, pos_embed='sincos')
RESNET = dict(arch='resnet18', width=8)
BOTTLENECK = dict(arch='resnet50', width=8)


def t(*shape):
    return torch.randn(*shape)


# Each authors' other parts, as their training code names them (DDP's `module.` is added by to_layout):
# DINO's DINOHead (mlp, last_layer weight-norm), MoCo v3's projector as timm's `head` / torchvision's `fc` plus the
# momentum encoder and the predictor, MoCo's encoder_k and queue, SimSiam's projector `fc` and predictor, SwAV's
# projection_head and prototypes, InstDisc's 128-d `fc`.
HEAD = {'head.mlp.0.weight': t(16, 192), 'head.mlp.0.bias': t(16), 'head.last_layer.weight_g': t(32, 1),
        'head.last_layer.weight_v': t(32, 16)}
CASES = {
    'DINO ViT': ('DINO', VIT, HEAD),
    'DINO ResNet': ('DINO', RESNET, {**HEAD, 'head.mlp.0.weight': t(16, 64)}),
    'MoCo v3 ViT-S': ('MoCo v3', MOCOV3_VIT, {'base_encoder.head.0.weight': t(32, 384), 'base_encoder.head.1.weight': t(32),
                                              'base_encoder.head.1.running_mean': t(32), 'momentum_encoder.cls_token': t(1, 1, 384),
                                              'momentum_encoder.head.0.weight': t(32, 384), 'predictor.0.weight': t(32, 16)}),
    'MoCo v3 ResNet': ('MoCo v3', BOTTLENECK, {'base_encoder.fc.0.weight': t(32, 256), 'momentum_encoder.conv1.weight': t(8, 3, 7, 7),
                                               'momentum_encoder.fc.0.weight': t(32, 256), 'predictor.0.weight': t(32, 16)}),
    'MoCo v2': ('MoCo v1/v2', BOTTLENECK, {'encoder_q.fc.0.weight': t(256, 256), 'encoder_q.fc.0.bias': t(256),
                                           'encoder_q.fc.2.weight': t(128, 256), 'encoder_k.conv1.weight': t(8, 3, 7, 7),
                                           'queue': t(128, 64), 'queue_ptr': torch.zeros(1, dtype=torch.long)}),
    'SimSiam': ('SimSiam', BOTTLENECK, {'encoder.fc.0.weight': t(256, 256), 'encoder.fc.1.running_var': t(256),
                                        'encoder.fc.6.weight': t(64, 256), 'predictor.0.weight': t(16, 64)}),
    'SwAV': ('SwAV', BOTTLENECK, {'projection_head.0.weight': t(64, 256), 'projection_head.1.running_mean': t(64),
                                  'projection_head.3.weight': t(16, 64), 'prototypes.weight': t(30, 16)}),
    'InstDisc': ('InstDisc', BOTTLENECK, {'fc.weight': t(128, 256), 'fc.bias': t(128)}),
    'DINO pure ViT': ('DINO-layout ViT', VIT, {}),
    'DINO pure ResNet': ('torchvision ResNet', BOTTLENECK, {}),
    'torchvision classifier': ('torchvision ResNet', RESNET, {'fc.weight': t(1000, 64), 'fc.bias': t(1000)}),
}


def memory_bank_module(monkeypatch):
    """An object of a class the file's readers cannot import, as lemniscate's `lib.NCEAverage.NCEAverage`."""
    package, module = types.ModuleType('lib'), types.ModuleType('lib.NCEAverage')

    class NCEAverage(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer('memory', torch.rand(10, 128))
            self.register_buffer('params', torch.tensor([4096, 0.07, -1, 0.5]))
    NCEAverage.__module__, NCEAverage.__qualname__ = 'lib.NCEAverage', 'NCEAverage'
    package.NCEAverage, module.NCEAverage = module, NCEAverage
    monkeypatch.setitem(sys.modules, 'lib', package)
    monkeypatch.setitem(sys.modules, 'lib.NCEAverage', module)
    return NCEAverage()


def write_case(name, path, monkeypatch):
    """(our backbone, its settings) after writing the file of case `name` to `path`."""
    layout, settings, extras = CASES[name]
    torch.manual_seed(0)
    backbone = build(**settings)
    if not settings['arch'].startswith('vit'):
        randomise_bn(backbone)
    state = backbone.state_dict()
    if layout == 'InstDisc':  # written by PyTorch 0.3: the legacy format, no num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.num_batches_tracked.zero_()
    file = released.to_layout(state, layout, extras)
    if layout == 'InstDisc':
        file['lemniscate'] = memory_bank_module(monkeypatch)
        with warnings.catch_warnings():  # torch cannot find the source of a class defined here
            warnings.simplefilter('ignore')
            torch.save(file, path, _use_new_zipfile_serialization=False)
        monkeypatch.delitem(sys.modules, 'lib.NCEAverage')  # as on a machine without lemniscate's code
    elif layout == 'DINO':  # DINO's full checkpoint also pickles its argparse.Namespace of arguments
        torch.save({**file, 'args': argparse.Namespace(arch=settings['arch'], patch_size=settings.get('patch_size', 16))}, path)
    else:
        torch.save(file, path)
    return backbone, settings, len(extras)


@pytest.mark.parametrize('name', list(CASES))
def test_each_layout_loads_back_with_every_key_used_and_identical_outputs(name, tmp_path, monkeypatch):
    backbone, settings, extras = write_case(name, tmp_path / 'released.pth', monkeypatch)
    state = released.load(str(tmp_path / 'released.pth'))
    assert state['layout'] == CASES[name][0]
    for key, value in settings.items():  # the architecture inferred from the shapes (heads: the layout's)
        assert state['args'][key] == value, (key, state['args'])
    expected_keys = {k for k in backbone.state_dict() if not (CASES[name][0] == 'InstDisc' and k.endswith('tracked'))}
    assert state['used'] == len(expected_keys) and state['dropped'] == extras  # every key of the file accounted for
    loaded = build(**{**settings, **state['args']})
    loaded.load_state_dict(state['backbone'])  # strict: every tensor of ours filled
    x = torch.randn(2, 3, 16 if settings['arch'].startswith('vit') else 32, 16 if settings['arch'].startswith('vit') else 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), backbone(x))
        if settings['arch'].startswith('vit'):  # at another input size too (the interpolated position embedding)
            other = torch.randn(2, 3, 24, 24)
            assert torch.equal(loaded(other), backbone(other))


def test_a_bare_vit_with_moco_v3s_sincos_table_is_read_as_moco_v3(tmp_path):
    # MoCo v3's linear-probe files ({'state_dict': module.<vit>, module.head}) and convert_to_deit.py output
    torch.manual_seed(0)
    backbone = build(**MOCOV3_VIT)
    file = {'state_dict': {'module.' + k: v for k, v in released.to_layout(backbone.state_dict(), 'DINO-layout ViT').items()}}
    file['state_dict'].update({'module.head.weight': t(1000, 384), 'module.head.bias': t(1000)})
    torch.save(file, tmp_path / 'linear-vit-s-300ep.pth.tar')
    state = released.load(str(tmp_path / 'linear-vit-s-300ep.pth.tar'))
    assert state['layout'] == 'MoCo v3' and state['args']['num_heads'] == 12 and state['dropped'] == 2
    six_heads = build(**{**MOCOV3_VIT, 'num_heads': 6})  # DINO's ViT-S: the same tensors, other outputs
    six_heads.load_state_dict(state['backbone'])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(six_heads(x), backbone(x), atol=1e-3)


def test_wrong_files_are_refused_in_one_line(tmp_path, monkeypatch):
    torch.save({'weights': t(3)}, tmp_path / 'unknown.pth')
    with pytest.raises(common.UsageError, match='not a layout released.py knows .* known layouts: DINO'):
        released.load(str(tmp_path / 'unknown.pth'))
    backbone, _, _ = write_case('MoCo v3 ResNet', tmp_path / 'mocov3.pth', monkeypatch)
    file = torch.load(tmp_path / 'mocov3.pth', weights_only=True)
    file['state_dict']['module.queue'] = t(16, 8)  # not part of MoCo v3's model
    torch.save(file, tmp_path / 'mixed.pth')
    with pytest.raises(common.UsageError, match='key queue belongs to no part of the MoCo v3 layout'):
        released.load(str(tmp_path / 'mixed.pth'))
    wide = {k: (torch.zeros(16, *v.shape[1:]) if k == 'layer1.0.conv1.weight' else v) for k, v in backbone.state_dict().items()}
    torch.save(wide, tmp_path / 'wide.pth')
    with pytest.raises(common.UsageError, match=r'layer1.0.conv1.weight is \(16, 8, 1, 1\), resnet50 has \(8, 8, 1, 1\)'):
        released.load(str(tmp_path / 'wide.pth'))
    deep = {'conv1.weight': t(64, 3, 7, 7), 'layer1.0.conv3.weight': t(1)}
    deep.update({f'layer{i}.{j}.conv1.weight': t(1) for i, n in enumerate((3, 4, 23, 3), 1) for j in range(n)})
    torch.save(deep, tmp_path / 'resnet101.pth')
    with pytest.raises(common.UsageError, match=r'bottleneck blocks \[3, 4, 23, 3\], not one of'):
        released.load(str(tmp_path / 'resnet101.pth'))
    torch.save(dict(method='simclr', args={}, epoch=1, backbone={}), tmp_path / 'ours.pth')
    with pytest.raises(common.UsageError, match='is a checkpoint of this project'):
        released.load(str(tmp_path / 'ours.pth'))
    (tmp_path / 'text.pth').write_text('not a torch file')
    with pytest.raises(common.UsageError, match='is not a readable torch file'):
        released.load(str(tmp_path / 'text.pth'))
    expect_error('eval_knn.py', '--pretrained', tmp_path / 'unknown.pth', '--data', 'procedural:40',
                 match='not a layout released.py knows')
    expect_error('eval_knn.py', '--pretrained', tmp_path / 'mocov3.pth', match='--pretrained needs --data')


def our_checkpoint(path, backbone, method='simclr', **args):
    defaults = dict(arch='resnet18', width=8, cifar_stem=False, patch_size=4, num_heads=None, pos_embed='learned',
                    image_size=32, data='procedural:40')
    torch.save(dict(method=method, args={**defaults, **args}, epoch=3, backbone=backbone.state_dict()), path)


def test_eval_knn_pretrained_gives_the_result_of_the_same_backbone_as_our_checkpoint(tmp_path, monkeypatch):
    backbone, settings, _ = write_case('MoCo v2', tmp_path / 'moco_v2.pth.tar', monkeypatch)
    our_checkpoint(tmp_path / 'ours.pth', backbone, **settings)
    knn = ['--data', 'procedural:40', '--image-size', '32', '--workers', '0', '--k', '5', '--temperature', '0.1', '--json']
    out = run_script('eval_knn.py', '--pretrained', tmp_path / 'moco_v2.pth.tar', *knn, tmp_path / 'released.json')
    assert 'MoCo v1/v2 checkpoint' in out.stdout and 'resnet50, width 8, ImageNet stem' in out.stdout
    run_script('eval_knn.py', tmp_path / 'ours.pth', *knn, tmp_path / 'ours.json')
    theirs, ours = json.load(open(tmp_path / 'released.json')), json.load(open(tmp_path / 'ours.json'))
    assert theirs['method'] == 'MoCo v1/v2' and theirs['results'] == ours['results']


def test_eval_knn_pretrained_draws_the_attention_maps_of_a_released_vit(tmp_path, monkeypatch):
    write_case('MoCo v3 ViT-S', tmp_path / 'vit-s-300ep.pth.tar', monkeypatch)
    Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(tmp_path / 'img.jpg')
    out = run_script('eval_knn.py', '--pretrained', tmp_path / 'vit-s-300ep.pth.tar', '--data', 'procedural:40',
                     '--workers', '0', '--attention-image', tmp_path / 'img.jpg', '--attention-out', tmp_path / 'maps.png')
    assert 'attention maps of 12 heads (2x2 patches)' in out.stdout and (tmp_path / 'maps.png').stat().st_size > 0


# ---- export -----------------------------------------------------------------

@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_export_gives_a_plain_torchvision_resnet(arch, tmp_path):
    torch.manual_seed(0)
    backbone = randomise_bn(build(arch=arch, width=64))
    our_checkpoint(tmp_path / 'checkpoint.pth', backbone, arch=arch, width=64)
    out = run_script('tools/released.py', 'export', tmp_path / 'checkpoint.pth', tmp_path / f'{arch}.pth')
    assert "torchvision's layout" in out.stdout and 'misses only fc.weight, fc.bias' in out.stdout
    reference = getattr(torchvision.models, arch)()
    result = reference.load_state_dict(torch.load(tmp_path / f'{arch}.pth', weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ['fc.bias', 'fc.weight'] and not result.unexpected_keys
    reference.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reference.eval()(x), backbone(x))
    assert not list(tmp_path.glob('*.tmp'))


def test_export_of_a_vit_has_dinos_names_and_loads_back(tmp_path):
    torch.manual_seed(0)
    backbone = build(**VIT)
    our_checkpoint(tmp_path / 'checkpoint.pth', backbone, method='dino', **VIT)
    lines = released.export(str(tmp_path / 'checkpoint.pth'), str(tmp_path / 'vit.pth'))
    assert 'vision_transformer.vit_tiny(patch_size=4, img_size=[16])' in lines[1] and len(lines) == 2  # DINO's 3 heads
    exported = torch.load(tmp_path / 'vit.pth', weights_only=True)
    # DINO's vision_transformer.py: PatchEmbed.proj, Block(norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), norm
    block = ['norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2']
    dino_names = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias'}
    dino_names |= {f'blocks.{i}.{layer}.{p}' for i in range(12) for layer in block for p in ('weight', 'bias')}
    assert set(exported) == dino_names
    state = released.load(str(tmp_path / 'vit.pth'))
    loaded = build(**state['args'])
    loaded.load_state_dict(state['backbone'])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), backbone(x))
    six = {**VIT, 'num_heads': 6, 'pos_embed': 'sincos'}  # heads that DINO's names cannot carry
    our_checkpoint(tmp_path / 'six.pth', build(**six), method='mocov3', **six)
    lines = released.export(str(tmp_path / 'six.pth'), str(tmp_path / 'six-vit.pth'))
    assert 'num_heads=6' in lines[1] and "6 heads, not DINO's 3" in lines[2] and 'needs --num-heads 6' in lines[2]


def test_export_says_when_a_resnet_is_no_plain_torchvision_one_and_refuses_other_files(tmp_path):
    our_checkpoint(tmp_path / 'cifar.pth', build(cifar_stem=True), cifar_stem=True)
    lines = released.export(str(tmp_path / 'cifar.pth'), str(tmp_path / 'cifar-export.pth'))
    assert 'the CIFAR stem' in lines[1] and 'width 8' in lines[1] and 'not a plain torchvision resnet18' in lines[1]
    torch.save({'conv1.weight': t(8, 3, 7, 7)}, tmp_path / 'released.pth')
    expect_error('tools/released.py', 'export', tmp_path / 'released.pth', tmp_path / 'out.pth',
                 match='is not a checkpoint of this project')
    expect_error('tools/released.py', 'export', tmp_path / 'cifar.pth', tmp_path, match='is a folder')
    assert not (tmp_path / 'out.pth').exists()
