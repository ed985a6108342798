"""The authors' released checkpoints: load them into our backbones, export ours in their layouts.

Every method's authors published pre-trained weights, each in the layout of their own training code:
the backbone's tensors sit under a prefix (`module.base_encoder.` in MoCo v3, `module.encoder_q.` in
MoCo v1/v2, ...), next to heads, momentum encoders and queues, and the ViTs name two layers differently
from ours. This file writes each layout out as a table (LAYOUTS), detects which one a file has from its
keys, infers the architecture from the tensors' shapes (where the file does not say it), and returns our
backbone's state dict together with the flags that build that backbone. Nothing is downloaded.

  python eval_knn.py --pretrained dino_deitsmall16_pretrain.pth --data /imagenet       # kNN of DINO's ViT-S/16
  python eval_knn.py --pretrained vit-s-300ep.pth.tar --data /imagenet --attention-image img.jpg
  python tools/released.py inspect moco_v2_800ep_pretrain.pth.tar        # which layout, which architecture
  python tools/released.py export runs/dino-cifar10-vit_tiny/checkpoint.pth vit_tiny.pth   # ours, in DINO's layout

Export writes the backbone of any of our checkpoints as a plain torchvision ResNet state dict
(`torchvision.models.resnet50().load_state_dict(sd, strict=False)` misses only fc.weight / fc.bias) or, for
a ViT, in DINO's layout (it loads into DINO's vision_transformer.vit_small with their key names).
"""
import argparse
import os
import pickle
import re
import sys
import warnings
from typing import NamedTuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's root
import common  # noqa: E402 (after the path)

# =============================================================================
# 1. Reading a released file
# =============================================================================


def stand_in(full_name):
    """An inert class that takes the place of a class the file pickled besides tensors, e.g. InstDisc's
    memory bank `lib.NCEAverage.NCEAverage` (lemniscate's main.py saves the whole module object) or DINO's
    `argparse.Namespace` of arguments. It accepts any constructor arguments and any state and runs nothing."""
    module, _, name = full_name.rpartition('.')

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    return type(name, (), dict(__init__=__init__, __setstate__=__setstate__, __module__=module, __qualname__=name))


def allowed_globals():
    """The names torch's weights-only mode hands out (tensor rebuild functions, storages, dtypes,
    OrderedDict, ...), by full name."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        return _get_allowed_globals()
    except ImportError:  # a torch without it: the few that state dicts need
        import collections
        return {f'{f.__module__}.{f.__name__}': f for f in (
            collections.OrderedDict, torch._utils._rebuild_tensor, torch._utils._rebuild_tensor_v2,
            torch._utils._rebuild_parameter, torch.Size)}


class RestrictedUnpickler(pickle.Unpickler):
    """Python's "restricting globals" unpickler: a name torch's weights-only mode allows is handed out,
    any other becomes an inert stand-in; nothing else can be called while the file is read."""

    def find_class(self, module, name):
        return allowed_globals().get(f'{module}.{name}') or stand_in(f'{module}.{name}')


RESTRICTED_PICKLE = argparse.Namespace(Unpickler=RestrictedUnpickler, __name__='released.restricted_pickle',
                                       load=lambda f, **kw: RestrictedUnpickler(f, **kw).load())


def read(path):
    """Load a released file without running code from it, with one-line errors for a missing or unreadable file.
    First torch.load in weights-only mode (tensors and plain containers), with each class that it refuses (the
    authors pickled e.g. DINO's argparse.Namespace of arguments) replaced by an inert stand-in, one by one as torch
    names them. Files in PyTorch's legacy format (before 1.6) that pickle a whole nn.Module, as InstDisc's does
    with its memory bank (lemniscate's `lib.NCEAverage.NCEAverage`), weights-only mode refuses outright; those
    are read with RestrictedUnpickler, which hands out only what weights-only mode allows."""
    if os.path.isdir(path):
        raise common.UsageError(f'{path} is a folder; give the released file in it (e.g. a .pth)')
    if not os.path.isfile(path):
        raise common.UsageError(f'no file at {path}')
    stand_ins = []
    for _ in range(64):
        try:
            with torch.serialization.safe_globals(stand_ins):
                return torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as e:
            refused = re.search(r'Unsupported global: GLOBAL (\S+) was not an allowed global', str(e))
            if refused is not None:
                stand_ins.append((stand_in(refused.group(1)), refused.group(1)))
                continue
            if 'Weights only load failed' in str(e):
                break  # e.g. a module object pickled in the legacy format: read it the restricted way
            raise common.UsageError(f'{path} is not a readable torch file (UnpicklingError: {str(e)[:200]})') from None
        except Exception as e:
            raise common.UsageError(f'{path} is not a readable torch file ({type(e).__name__}: '
                                    f'{str(e).strip().splitlines()[0][:200] if str(e).strip() else ""})') from None
    try:
        with warnings.catch_warnings():  # torch warns that the stand-ins' source code cannot be checked
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=False, pickle_module=RESTRICTED_PICKLE)
    except Exception as e:
        raise common.UsageError(f'{path} is not a readable torch file ({type(e).__name__}: '
                                f'{str(e).strip().splitlines()[0][:200] if str(e).strip() else ""})') from None


# =============================================================================
# 2. The layouts
# =============================================================================
# After the DDP / DataParallel wrapper's `module.` is taken off every key (when every key has it), each file
# holds a state dict in which
#   <backbone> + <key>     is the backbone, in torchvision's names (ResNet) or timm's / DINO's names (ViT),
#   <backbone> + <head>    is a head inside that network (torchvision's `fc`, timm's `head`): dropped,
#   <other>                are the method's other modules (heads, momentum encoder, queue): dropped.
# `container` says where the state dict is in the file (None: the file is the state dict), `marker` a key the
# file must also hold. Every key of the state dict must fall in one of the three groups: a key that does not
# is refused (a file of another layout is never half loaded).


class Layout(NamedTuple):
    name: str          # short name, printed
    files: str         # which released files have this layout
    container: tuple   # where the state dict is: keys of the file dict, None = the file itself
    backbone: str      # prefix of the backbone's keys (after `module.` is removed)
    heads: tuple       # prefixes, relative to the backbone, of layers that are not the backbone
    others: tuple      # prefixes of the state dict that are not the backbone
    marker: str = None  # a key of the file that must be there too (InstDisc's memory bank)
    vit_heads: dict = None  # attention heads by ViT width, where the authors' ViT differs from DINO's
    pos_embed: str = 'learned'  # the authors' position embedding (ours is built the same way)


LAYOUTS = (
    # DINO main_dino.py checkpoint.pth and the *_full_checkpoint.pth releases: {'teacher', 'student', 'optimizer',
    # 'epoch', 'args', 'dino_loss'}; each network is MultiCropWrapper(backbone, DINOHead). DINO evaluates the
    # teacher. The teacher of a ResNet is DDP-wrapped (it has BatchNorm: `module.backbone.`), a ViT's is not.
    Layout('DINO', 'dino_*_pretrain_full_checkpoint.pth, main_dino.py checkpoint.pth (the teacher)',
           container=('teacher',), backbone='backbone.', heads=('fc.', 'head.'), others=('head.',)),
    # MoCo v3 main_moco.py checkpoints (vit-s-300ep.pth.tar, vit-b-300ep.pth.tar, r-50-{100,300,1000}ep.pth.tar):
    # {'state_dict', 'optimizer', 'epoch', 'arch', 'scaler'}; the projector replaced timm's `head` (ViT) or
    # torchvision's `fc` (ResNet); momentum encoder and predictor beside it. Its ViTs have 12 heads (ViT-S too)
    # and the fixed 2-D sin-cos position embedding, stored as a (frozen) parameter.
    Layout('MoCo v3', 'vit-s-300ep.pth.tar, vit-b-300ep.pth.tar, r-50-{100,300,1000}ep.pth.tar',
           container=('state_dict',), backbone='base_encoder.', heads=('head.', 'fc.'),
           others=('momentum_encoder.', 'predictor.'), vit_heads={384: 12, 768: 12}, pos_embed='sincos'),
    # MoCo v1 / v2 main_moco.py (moco_v1_200ep_pretrain.pth.tar, moco_v2_{200,800}ep_pretrain.pth.tar): the query
    # encoder f_q with its head as torchvision's `fc` (Linear, or the v2 MLP fc.0 / fc.2), f_k, the queue.
    Layout('MoCo v1/v2', 'moco_v1_200ep_pretrain.pth.tar, moco_v2_{200,800}ep_pretrain.pth.tar',
           container=('state_dict',), backbone='encoder_q.', heads=('fc.',),
           others=('encoder_k.', 'queue', 'queue_ptr')),
    # SimSiam main_simsiam.py (checkpoint_0099.pth.tar): the encoder with its 3-layer projector as `fc`, the predictor.
    Layout('SimSiam', 'checkpoint_0099.pth.tar (100 epochs, batch 256 or 512)',
           container=('state_dict',), backbone='encoder.', heads=('fc.',), others=('predictor.',)),
    # SwAV (swav_{100,200,400,800}ep_pretrain.pth.tar, also DeepCluster-v2 / SeLa-v2): a bare DDP state dict of
    # src/resnet50.py, torchvision's names (its extra ConstantPad2d(1) + conv1 padding 2 is torchvision's padding
    # 3) plus projection_head and prototypes; main_swav.py's checkpoint.pth.tar holds the same under 'state_dict'.
    Layout('SwAV', 'swav_{100,200,400,800}ep_pretrain.pth.tar, swav_400ep_2x224_pretrain.pth.tar, checkpoint.pth.tar',
           container=(None, 'state_dict'), backbone='', heads=(), others=('projection_head.', 'prototypes')),
    # InstDisc, lemniscate.pytorch main.py (the ResNet-50 release): {'state_dict', 'lemniscate', 'optimizer',
    # 'epoch', 'arch', 'best_prec1'}, a DataParallel torchvision-style ResNet whose `fc` is the 128-d embedding;
    # 'lemniscate' is the memory bank, pickled as a module object (read through a stand-in, see read()).
    Layout('InstDisc', 'lemniscate_resnet50.pth.tar, lemniscate_resnet18.pth.tar (lemniscate.pytorch)',
           container=('state_dict',), backbone='', heads=('fc.',), others=(), marker='lemniscate'),
    # A bare ViT in DINO's (= timm's) names: DINO's dino_{deitsmall,vitbase}{16,8}_pretrain.pth (what their
    # hubconf loads strictly into vit_small / vit_base), `released.py export` of our ViTs, MoCo v3's
    # convert_to_deit.py output ({'model': ...}) and its linear-probe files (`head` dropped).
    Layout('DINO-layout ViT', 'dino_deitsmall16_pretrain.pth, dino_deitsmall8_pretrain.pth, '
           'dino_vitbase16_pretrain.pth, dino_vitbase8_pretrain.pth; `released.py export` of a ViT',
           container=(None, 'model', 'state_dict'), backbone='', heads=('head.',), others=()),
    # A bare torchvision ResNet: DINO's dino_resnet50_pretrain.pth (fc removed), `released.py export` of our
    # ResNets, any torchvision classifier (its fc dropped).
    Layout('torchvision ResNet', 'dino_resnet50_pretrain.pth; `released.py export` of a ResNet',
           container=(None, 'state_dict'), backbone='', heads=('fc.',), others=()),
)

# What identifies each layout among the keys of its state dict (after `module.` is removed).
SIGNATURES = {'DINO': 'backbone.', 'MoCo v3': 'base_encoder.', 'MoCo v1/v2': 'encoder_q.', 'SimSiam': 'encoder.',
              'SwAV': 'prototypes', 'InstDisc': 'conv1.weight', 'DINO-layout ViT': 'cls_token',
              'torchvision ResNet': 'conv1.weight'}

KNOWN = ('DINO (teacher/student, backbone.), MoCo v3 (module.base_encoder.), MoCo v1/v2 (module.encoder_q.), '
         'SimSiam (module.encoder.), SwAV (module. + prototypes), InstDisc (state_dict + lemniscate), '
         'a DINO-layout ViT (cls_token, patch_embed.proj.), a torchvision ResNet (conv1., layer1.)')

# Our ViT names two layers differently from timm's / DINO's (the rest is identical: cls_token, pos_embed,
# blocks.N.norm1 / attn.qkv / attn.proj / norm2, norm; the ResNets use torchvision's names everywhere).
VIT_RENAMES = (  # (theirs, ours), matched as whole name components
    ('patch_embed.proj.', 'patch_embed.'),  # DINO's PatchEmbed module holds the Conv2d as `proj`; ours is the Conv2d
    ('.mlp.fc1.', '.mlp.0.'),               # their Mlp(fc1, act, fc2); ours nn.Sequential(Linear, GELU, Linear)
    ('.mlp.fc2.', '.mlp.2.'),
)


def theirs_to_ours(key):
    for theirs, ours in VIT_RENAMES:
        key = key.replace(theirs, ours) if theirs.startswith('.') else (ours + key[len(theirs):] if key.startswith(theirs) else key)
    return key


def ours_to_theirs(key):
    for theirs, ours in VIT_RENAMES:
        key = key.replace(ours, theirs) if ours.startswith('.') else (theirs + key[len(ours):] if key.startswith(ours) else key)
    return key


def strip_module(state_dict):
    """Take the DDP / DataParallel wrapper's `module.` off the keys, when every key has it."""
    if state_dict and all(key.startswith('module.') for key in state_dict):
        return {key[len('module.'):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def detect(file, path):
    """(layout, state dict without `module.`, where it was) of a released file; one-line error if none fits."""
    if isinstance(file, dict) and {'method', 'args', 'backbone'} <= set(file):
        raise common.UsageError(f'{path} is a checkpoint of this project: give it as the checkpoint argument, '
                                'without --pretrained')
    for layout in LAYOUTS:
        if layout.marker is not None and not (isinstance(file, dict) and layout.marker in file):
            continue
        for where in layout.container:
            state_dict = file if where is None else file.get(where) if isinstance(file, dict) else None
            if not is_state_dict(state_dict):
                continue
            state_dict = strip_module(state_dict)
            if any(key.startswith(SIGNATURES[layout.name]) for key in state_dict):
                return layout, state_dict, where
    keys = ', '.join(map(str, list(file)[:6])) if isinstance(file, dict) else type(file).__name__
    raise common.UsageError(f'{path}: not a layout released.py knows (it holds: {keys}); known layouts: {KNOWN}')


# =============================================================================
# 3. The architecture, from the tensors' shapes
# =============================================================================

RESNETS = {('basic', (2, 2, 2, 2)): 'resnet18', ('basic', (3, 4, 6, 3)): 'resnet34',
           ('bottleneck', (3, 4, 6, 3)): 'resnet50'}


def infer_backbone_args(layout, backbone, path):
    """The flags that build our backbone for these tensors (their names): arch, width and stem of a ResNet;
    arch, patch size, heads and position embedding of a ViT, and the image size it was trained at. Plus the
    notes that say what was inferred rather than read, and the layout (a bare ViT with MoCo v3's fixed sin-cos
    table is MoCo v3's)."""
    notes = []
    if 'cls_token' in backbone:  # a ViT
        dim = backbone['cls_token'].shape[-1]
        depth = 1 + max((int(k.split('.')[1]) for k in backbone if k.startswith('blocks.')), default=-1)
        arch = next((a for a, (d, n, _) in common.VIT_SIZES.items() if (d, n) == (dim, depth)), None)
        if arch is None or 'patch_embed.proj.weight' not in backbone or 'pos_embed' not in backbone:
            raise common.UsageError(f'{path}: a ViT of width {dim} and depth {depth}, not one of this project\'s '
                                    f"({', '.join(f'{a} {d}x{n}' for a, (d, n, _) in common.VIT_SIZES.items())})")
        patch = backbone['patch_embed.proj.weight'].shape[-1]
        grid = int(round((backbone['pos_embed'].shape[1] - 1) ** 0.5))
        if grid * grid != backbone['pos_embed'].shape[1] - 1:
            raise common.UsageError(f'{path}: its position embedding has {backbone["pos_embed"].shape[1] - 1} patch '
                                    'tokens, not a square grid')
        heads, pos_embed = common.VIT_SIZES[arch][2], layout.pos_embed
        fixed = common.sincos_pos_embed(grid, grid, dim)
        if layout.vit_heads is None and torch.allclose(backbone['pos_embed'].float(), fixed, atol=1e-4):
            # a bare ViT whose position embedding is MoCo v3's fixed sin-cos table: MoCo v3's ViT (12 heads)
            pos_embed, layout = 'sincos', LAYOUTS[1]
            notes.append('its position embedding is the fixed 2-D sin-cos table: a MoCo v3 ViT')
        if layout.vit_heads is not None:
            heads = layout.vit_heads.get(dim, heads)
        notes.append(f"{arch}/{patch} with {heads} heads ({'MoCo v3' if layout.vit_heads else 'DINO'}'s {arch}; "
                     f'the file does not store them: --num-heads to change), trained at {grid * patch} px')
        return dict(arch=arch, patch_size=patch, num_heads=heads, pos_embed=pos_embed, image_size=grid * patch,
                    width=64, cifar_stem=False), notes, layout
    if 'conv1.weight' not in backbone:
        raise common.UsageError(f'{path}: its backbone has neither cls_token (ViT) nor conv1.weight (ResNet)')
    width, kernel = backbone['conv1.weight'].shape[0], backbone['conv1.weight'].shape[-1]
    block = 'bottleneck' if 'layer1.0.conv3.weight' in backbone else 'basic'
    layers = tuple(len({k.split('.')[1] for k in backbone if k.startswith(f'layer{i}.')}) for i in range(1, 5))
    arch = RESNETS.get((block, layers))
    if arch is None:
        raise common.UsageError(f'{path}: a ResNet with {block} blocks {list(layers)}, not one of this project\'s '
                                'architectures (resnet18, resnet34, resnet50)')
    args = dict(arch=arch, width=width, cifar_stem=kernel == 3, patch_size=16, num_heads=None, pos_embed='learned')
    if kernel == 7:  # the ImageNet stem: trained on 224-px crops
        args['image_size'] = 224
    notes.append(f'{arch}, width {width}, {"CIFAR" if kernel == 3 else "ImageNet"} stem')
    return args, notes, layout


# =============================================================================
# 4. Loading: a released file -> (our backbone's state dict, its flags)
# =============================================================================

def load(path):
    """A released file as a checkpoint of this project would hold it: dict(method, epoch, backbone (our key
    names), args (the backbone flags), layout, notes). Every key of the file's state dict is either mapped onto
    a tensor of our backbone or belongs to a part listed as dropped in its layout; every tensor of our backbone
    is filled (BatchNorm's num_batches_tracked, which PyTorch < 0.4.1 files such as InstDisc's lack, as 0)."""
    file = read(path)
    layout, state_dict, where = detect(file, path)
    backbone, dropped = {}, 0
    for key, tensor in state_dict.items():
        if any(key.startswith(other) for other in layout.others):  # heads, momentum encoder, queue
            dropped += 1
        elif key.startswith(layout.backbone) and any(key[len(layout.backbone):].startswith(h) for h in layout.heads):
            dropped += 1                                             # a head inside the backbone network
        elif key.startswith(layout.backbone):
            backbone[key[len(layout.backbone):]] = tensor
        else:
            raise common.UsageError(f'{path}: key {key} belongs to no part of the {layout.name} layout '
                                    f'(expected {layout.backbone or "backbone keys"}, {", ".join(layout.others) or "nothing else"}); '
                                    'it is another kind of file')
    args, notes, layout = infer_backbone_args(layout, backbone, path)
    ours = {(theirs_to_ours(key) if "cls_token" in backbone else key): tensor for key, tensor in backbone.items()}
    with torch.device('meta'):  # shapes only: nothing allocated, nothing initialised
        expected = common.build_backbone(argparse.Namespace(
            drop_path=0.0, freeze_patch_embed=False, zero_init_residual=False, **args,
            **({} if 'image_size' in args else dict(image_size=32)))).state_dict()
    for key, tensor in expected.items():
        if key.endswith('num_batches_tracked') and key not in ours:
            ours[key] = torch.zeros((), dtype=torch.long)
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    wrong = sorted(k for k in set(ours) & set(expected) if ours[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        problem = (f'{len(missing)} tensor(s) missing (e.g. {ours_to_theirs(missing[0])})' if missing else
                   f'{len(unexpected)} unexpected tensor(s) (e.g. {ours_to_theirs(unexpected[0])})' if unexpected else
                   f'{wrong[0]} is {tuple(ours[wrong[0]].shape)}, {args["arch"]} has {tuple(expected[wrong[0]].shape)}')
        raise common.UsageError(f'{path}: a {layout.name} file whose backbone is not our {args["arch"]}: {problem}'
                                + ('; wide ResNets that widen the bottleneck (SwAV RN50w2/w4/w5) are not --width'
                                   if wrong and args['arch'].startswith('resnet') else ''))
    epoch = file.get('epoch') if isinstance(file, dict) and isinstance(file.get('epoch'), int) else '?'
    notes = [f"{layout.name} checkpoint {path} ({where or 'the file'}: {len(backbone)} backbone tensors, "
             f'{dropped} dropped)'] + notes
    return dict(method=layout.name, epoch=epoch, backbone={k: ours[k] for k in expected}, args=args,
                layout=layout.name, notes=notes, used=len(backbone), dropped=dropped)


# =============================================================================
# 5. Writing: our backbone in an authors' layout
# =============================================================================

def to_layout(backbone, layout_name, extras=None, vit=None):
    """The inverse mapping: our backbone's state dict (our names) as the file `layout_name` would hold it,
    with `extras` ({key: tensor}: the layout's other parts, keyed as in the authors' state dict without DDP's
    `module.`) added. `module.` is put back where the authors' training wrapped the model in DDP."""
    layout = next(known for known in LAYOUTS if known.name == layout_name)
    vit = 'cls_token' in backbone if vit is None else vit
    theirs = {layout.backbone + (ours_to_theirs(k) if vit else k): v for k, v in backbone.items()}
    theirs.update(extras or {})
    if layout.name in ('DINO-layout ViT', 'torchvision ResNet'):
        return theirs
    wrapped = {'module.' + k: v for k, v in theirs.items()}
    if layout.name == 'DINO':  # the ViT teacher is not DDP-wrapped, the ResNet teacher is; the student always is
        return dict(teacher=theirs if vit else wrapped, student=wrapped, epoch=100)
    if layout.name == 'SwAV':
        return wrapped
    file = dict(state_dict=wrapped, epoch=100)
    if layout.name == 'InstDisc':
        file['lemniscate'] = None  # replaced by the caller's memory bank object
    return file


def export(checkpoint, out):
    """Write the backbone of our checkpoint `checkpoint` to `out` (atomically) in torchvision's layout (ResNet)
    or DINO's (ViT); returns the lines that say how to load it."""
    state = common.read_checkpoint(checkpoint)
    if not (isinstance(state, dict) and isinstance(state.get('backbone'), dict) and 'args' in state):
        raise common.UsageError(f'{checkpoint} is not a checkpoint of this project (no backbone / args); '
                                'a released file loads with eval_knn.py --pretrained as it is')
    args, backbone = state['args'], state['backbone']
    if os.path.exists(out) and os.path.samefile(out, checkpoint):
        raise common.UsageError(f'OUT {out} is the checkpoint itself: exporting would overwrite it with a '
                                'bare state dict; give another file name')
    bad = next((key for key, tensor in backbone.items() if torch.is_tensor(tensor)
                and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)
    if bad is not None:
        raise common.UsageError(f'{checkpoint}: the backbone tensor {bad} holds NaN or inf; export another '
                                'checkpoint')
    vit = args.get('arch', '').startswith('vit')
    sd = to_layout(backbone, 'DINO-layout ViT' if vit else 'torchvision ResNet')
    if vit:
        dim, _, dino_heads = common.VIT_SIZES[args['arch']]
        heads, patch, size = args.get('num_heads') or dino_heads, args['patch_size'], args['image_size']
        lines = [f"{args['arch']}/{patch} in DINO's layout: vision_transformer.{args['arch']}(patch_size={patch}"
                 + (f', img_size=[{size}]' if size != 224 else '') + (f', num_heads={heads}' if heads != dino_heads else '')
                 + ').load_state_dict(torch.load(OUT)) takes every tensor']
        inferred = (LAYOUTS[1].vit_heads.get(dim, dino_heads) if args.get('pos_embed') == 'sincos' else dino_heads)
        if heads != dino_heads or heads != inferred:  # the file cannot say how many heads: whoever loads it must
            lines.append(f"note: {heads} heads, not DINO's {dino_heads}: give DINO's code num_heads={heads}"
                         + (f'; eval_knn.py --pretrained OUT needs --num-heads {heads}' if heads != inferred else
                            ' (eval_knn.py --pretrained infers it from the fixed sin-cos position embedding)'))
    else:
        lines = [f"{args['arch']} in torchvision's layout: torchvision.models.{args['arch']}()"
                 ".load_state_dict(torch.load(OUT), strict=False) misses only fc.weight, fc.bias"]
        if args.get('cifar_stem') or args.get('width', 64) != 64:
            variant = ' and '.join((['the CIFAR stem (3x3 stride-1 conv1, no max-pool)'] if args.get('cifar_stem') else [])
                                   + ([f"width {args['width']}"] if args.get('width', 64) != 64 else []))
            lines = [f"{args['arch']} with {variant}: torchvision's key names, but not a plain torchvision "
                     f"{args['arch']} (conv1{' and the layers' if args.get('width', 64) != 64 else ''} differ in "
                     f"shape); it loads into common.ResNet (eval_knn.py --pretrained OUT)"
                     + (", or into a torchvision resnet whose conv1 is Conv2d(3, 64, 3, 1, 1, bias=False) and "
                        "maxpool Identity" if args.get('width', 64) == 64 else '')]
    common.check_writable_file(out, 'OUT')
    try:
        common.save_atomically(sd, out)
    except OSError as e:  # a full disk: a fault, not bad input (exit 1, as a checkpoint's write)
        raise common.TrainingError(f'could not write {out} ({e.strerror}); {out} was left as it was') from None
    return [f"wrote {out}: {len(sd)} tensors, the {state.get('method', '?')} backbone of {checkpoint} "
            f"(epoch {state.get('epoch', '?')})"] + [line.replace('OUT', out) for line in lines]


# =============================================================================
# 6. Command line
# =============================================================================

def main(argv=None):
    parser = common.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest='command', required=True)
    inspect = commands.add_parser('inspect', help="say which authors' layout FILE has and the backbone it holds")
    inspect.add_argument('file')
    out = commands.add_parser('export', help="write CKPT's backbone as a torchvision ResNet / DINO-layout ViT state dict")
    out.add_argument('checkpoint', help='checkpoint.pth written by any method file of this project')
    out.add_argument('out', help='the file to write (.pth)')
    args = parser.parse_args(argv)
    for name in ('file', 'checkpoint', 'out'):  # '' would be read as the current folder
        if name in vars(args):
            common.check_path_given(getattr(args, name), name.upper())
    if args.command == 'inspect':
        state = load(args.file)
        for note in state['notes']:
            print(note)
        vit = state['args']['arch'].startswith('vit')
        flags = [k for k in (('arch', 'patch_size', 'num_heads', 'image_size') if vit else ('arch', 'width', 'image_size'))
                 if k in state['args']]
        print('  backbone flags: ' + ' '.join(f'--{k.replace("_", "-")} {state["args"][k]}' for k in flags)
              + (' --cifar-stem' if state['args'].get('cifar_stem') else ''))
    else:
        for line in export(args.checkpoint, args.out):
            print(line)


if __name__ == '__main__':
    common.run(main)
