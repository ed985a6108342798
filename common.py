"""What every method file shares: the building blocks of the papers first, then the plumbing.
Nothing in here is a method: each method file decides every hyper-parameter and passes it in.
Docs: docs/input-pipeline.md (the two input paths), docs/evaluation.md (kNN, linear probe).

Contents (what the method files call, in the order a method file uses it):
  A. Building blocks
  A1. backbones       build_backbone: ResNet (CIFAR stem, width), VisionTransformer (DINO / MoCo v3 style)
  A2. views           augmentation (one random view), simclr_jitter, Views (2 views, asymmetric, multi-crop),
                      multi_crop_views, forward_by_size; their batched twin is device_augment.py
  A3. optimisation    scale_lr, param_groups, LARS, build_optimizer, cosine_schedule, step_schedule,
                      set_lr, set_weight_decay, ema_update, clip_gradients
  A4. collectives     all_gather_with_grad (SimCLR's negatives), all_gather_no_grad, all_reduce_sum, broadcast
  A5. measures        knn_monitor / knn_accuracy (weighted kNN), normalized_output_std (collapse indicator)
  B. Plumbing
  B1. arguments       run (the entry wrapper: one-line errors), UsageError, get_args_parser, parse_args,
                      check_ranges, apply_arch_preset, apply_epoch_preset
  B2. processes       setup (torchrun or one process, seed, output directory), prepare_model (SyncBN, DDP),
                      seed_epoch, get_rank, get_world_size
  B3. data            build_train_loader, build_eval_loaders (datasets, the epoch-seeded sampler, Loader)
  B4. running         autocast, resume, save_checkpoint, MetricLogger, plot_metrics
  B5. evaluation      what eval_knn.py and eval_linear.py share (their parser, the backbone of a checkpoint)
  B6. device data     --augment device: images held on (or JPEGs decoded on) the device, DeviceLoader

Training-loop contract (fixed, so method files never change when the input pipeline does):
`loader.epoch(epoch)` yields `(views, labels, indices)`; `views` is a list of float tensors
(B, 3, H, W), already on the training device and normalised; `indices` are dataset indices.
The augmentation of image i in epoch e is a function of (seed, e, i) only, so a resumed run
sees exactly the views an uninterrupted run would have seen.
"""
import argparse
import datetime
import errno
import hashlib
import itertools
import json
import math
import os
import platform
import signal
import sys
import threading
import time
import traceback
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageFilter

import device_augment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ('resnet18', 'resnet34', 'resnet50', 'vit_tiny', 'vit_small', 'vit_base')
DATASETS = ('cifar10', 'cifar100', 'stl10', 'procedural')


# =============================================================================
# A1. Backbones: features only, `embed_dim` tells their size
# =============================================================================

class ResNet(torchvision.models.ResNet):
    """torchvision's ResNet with the classifier removed, an optional CIFAR stem
    (3x3 stride-1 conv1, no max-pool) and a base width (64 = the standard network).
    State-dict keys match torchvision's, so weights load into `torchvision.models.resnet50`."""

    def __init__(self, block, layers, width=64, cifar_stem=False, zero_init_residual=False):
        self._width = width
        super().__init__(block, layers, zero_init_residual=zero_init_residual)
        self.embed_dim = 8 * width * block.expansion
        if cifar_stem or width != 64:
            self.conv1 = nn.Conv2d(3, width, 3 if cifar_stem else 7, 1 if cifar_stem else 2,
                                   1 if cifar_stem else 3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            nn.init.kaiming_normal_(self.conv1.weight, mode='fan_out', nonlinearity='relu')
        if cifar_stem:
            self.maxpool = nn.Identity()
        self.fc = nn.Identity()

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # first stage: the stem's output width
            self.inplanes = self._width
        return super()._make_layer(block, planes * self._width // 64, blocks, stride, dilate)


def drop_path(x, rate, training):
    """Stochastic depth: drop a residual branch for whole samples, rescale the kept ones."""
    if rate == 0.0 or not training:
        return x
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # (B, 1, ..., 1): one draw per sample
    keep = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attention=False):
        B, N, C = x.shape
        # (B, h, N, d)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if return_attention:  # explicit softmax, to look at it
            attention = (q * q.shape[-1] ** -0.5 @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, N, N)
            x = attention @ v
        else:  # fused kernel (flash / memory-efficient attention)
            attention, x = None, F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C)), attention


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)), with drop-path."""

    def __init__(self, dim, num_heads, mlp_ratio, drop_path_rate):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path_rate = drop_path_rate

    def forward(self, x, return_attention=False):
        y, attention = self.attn(self.norm1(x), return_attention)
        x = x + drop_path(y, self.drop_path_rate, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)
        return x, attention


def sincos_pos_embed(grid_h, grid_w, dim, temperature=10000.0):
    """Fixed 2-D sin-cos position embedding (MoCo v3): (1, 1 + h*w, dim), zeros for the CLS token.
    A quarter of the channels each, in the order of the authors' vits.py: sin(y*w_k), cos(y*w_k), sin(x*w_k),
    cos(x*w_k), w_k = T^(-k/(dim/4)), with y the patch's row and x its column (their code names the row
    coordinate `grid_w`: the row frequencies come first). The order is arbitrary for training from scratch,
    but a released MoCo v3 checkpoint was trained with this one. (They only ever build square grids.)"""
    assert dim % 4 == 0, 'sin-cos position embedding needs a dim divisible by 4'
    y, x = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                          torch.arange(grid_w, dtype=torch.float64), indexing='ij')
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    # (h*w, dim/4), tokens row-major
    out_y, out_x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    pe = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), pe]).float()[None]

VIT_INITS = ('dino', 'mocov3')


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021) as used by DINO and MoCo v3: patch embedding, CLS token,
    pre-norm blocks, final LayerNorm; returns the CLS token (B, D). The position embedding
    (learned, or fixed 2-D sin-cos) is interpolated for inputs of another size than `image_size`.

    `init` chooses the authors' initialisation (the method file asks for its own):
      'dino'   (DINO's vision_transformer.py): every Linear trunc-normal std 0.02 with zero bias, the CLS
               token and a learned position embedding trunc-normal 0.02, the patch projection left at
               Conv2d's default init (kaiming-uniform weight, random bias).
      'mocov3' (MoCo v3's vits.py): the q, k and v thirds of the qkv Linear each uniform in
               +-sqrt(6 / (D + D)) (xavier as if they were three D x D layers), every other Linear
               xavier-uniform, all biases zero, the CLS token N(0, 1e-6), the patch projection
               xavier-uniform over its flattened fan, +-sqrt(6 / (3 p^2 + D)), with a zero bias. With the
               patch projection frozen (Sec. 4.2) this init IS the layer used for the whole run."""

    def __init__(self, image_size, patch_size, embed_dim, depth, num_heads, mlp_ratio=4.0,
                 drop_path_rate=0.0, pos_embed='learned', freeze_patch_embed=False, init='dino'):
        super().__init__()
        if init not in VIT_INITS:
            raise UsageError(f"unknown ViT init '{init}'; choose one of: {', '.join(VIT_INITS)}")
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        grid = image_size // patch_size
        if pos_embed == 'sincos':
            self.register_buffer('pos_embed', sincos_pos_embed(grid, grid, embed_dim))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # stochastic depth grows with depth
        rates = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        # (device='cpu': released.py builds backbones on the meta device to read their shapes)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if init == 'dino':
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        else:
            nn.init.normal_(self.cls_token, std=1e-6)
            for name, m in self.named_modules():
                if isinstance(m, nn.Linear) and name.endswith('qkv'):  # (3D, D): q, k, v are each D x D
                    bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                elif isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
            # the (D, 3, p, p) kernel seen as a Linear 3 p^2 -> D
            fan = 3 * patch_size * patch_size + embed_dim
            nn.init.uniform_(self.patch_embed.weight, -math.sqrt(6.0 / fan), math.sqrt(6.0 / fan))
            nn.init.zeros_(self.patch_embed.bias)
        if freeze_patch_embed:  # MoCo v3 "random patch projection": weight AND bias stay at init
            self.patch_embed.weight.requires_grad_(False)
            self.patch_embed.bias.requires_grad_(False)

    def interpolate_pos_embed(self, grid_h, grid_w):
        """(1, 1 + grid_h*grid_w, D): the stored embedding resampled (bicubic) to another grid, as DINO's
        interpolate_pos_encoding does it: F.interpolate with scale_factor (g + 0.1) / N per axis (N the
        stored side, g the new one; the 0.1 makes floor(N * scale) land on g despite rounding). The scale,
        not the output size, then sets where the samples fall: output cell i reads the source at
        (i + 0.5) * N / (g + 0.1) - 0.5, not (i + 0.5) * N / g - 0.5, up to 0.2 cells apart for 14 -> 6.
        Released DINO weights give the authors' outputs on other input sizes only this way."""
        n = self.pos_embed.shape[1] - 1
        side = int(math.sqrt(n))
        if grid_h == grid_w == side:
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        patches = F.interpolate(patches.float(), scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side),
                                mode='bicubic', align_corners=False)    # (1, D, grid_h, grid_w)
        assert patches.shape[-2:] == (grid_h, grid_w), (patches.shape, grid_h, grid_w)
        patches = patches.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)  # (1, grid_h * grid_w, D)
        return torch.cat([cls, patches.to(cls.dtype)], dim=1)

    def tokens(self, x):
        B, _, H, W = x.shape
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + N, D)
        return x + self.interpolate_pos_embed(H // self.patch_size, W // self.patch_size)

    def forward(self, x):
        x = self.tokens(x)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)[:, 0]  # CLS token after the final norm, (B, D)

    def get_intermediate_layers(self, x, n=1):
        """Tokens after each of the last `n` blocks, each through the final norm (DINO's linear
        protocol reads their CLS tokens): a list of n tensors (B, 1 + N, D), the last block's last."""
        x = self.tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x, _ = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs

    @torch.no_grad()
    def get_last_selfattention(self, x):
        """Attention of the last block, (B, heads, 1 + N, 1 + N); row 0 is the CLS token's."""
        x = self.tokens(x)
        for block in self.blocks[:-1]:
            x, _ = block(x)
        return self.blocks[-1](x, return_attention=True)[1]

# dim, depth, heads
VIT_SIZES = {'vit_tiny': (192, 12, 3), 'vit_small': (384, 12, 6), 'vit_base': (768, 12, 12)}


def build_backbone(args):
    """The backbone named by args.arch (features only; `.embed_dim` is their size)."""
    if args.arch.startswith('resnet'):
        block, layers = {'resnet18': (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
                         'resnet34': (torchvision.models.resnet.BasicBlock, [3, 4, 6, 3]),
                         'resnet50': (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3])}[args.arch]
        return ResNet(block, layers, args.width, args.cifar_stem, args.zero_init_residual)
    dim, depth, heads = VIT_SIZES[args.arch]
    return VisionTransformer(args.image_size, args.patch_size, dim, depth, args.num_heads or heads,
                             drop_path_rate=args.drop_path, pos_embed=args.pos_embed,
                             freeze_patch_embed=args.freeze_patch_embed,
                             init=getattr(args, 'vit_init', 'dino'))


# =============================================================================
# A2. Augmentations and views (the batched device version: device_augment.py)
# =============================================================================

def augmentation(size, scale, jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, grayscale_prob=0.2,
                 blur_prob=0.0, solarize_prob=0.0, flip=True, interpolation='bilinear'):
    """One random view: RandomResizedCrop -> flip -> colour jitter -> grayscale -> blur -> solarize.

    Every probability and strength is the method's to choose (they differ per paper and,
    for BYOL/MoCo v3/DINO, per view). Blur: Gaussian, sigma in [0.1, 2]. Returns an Augmentation:
    called on a PIL image (--augment cpu) it gives a uint8 (3, size, size) tensor; Views.batch does
    the same to batches of uint8 tensors on the device (--augment device). Normalisation happens on
    the device.
    """
    mode = {'bilinear': T.InterpolationMode.BILINEAR, 'bicubic': T.InterpolationMode.BICUBIC}[interpolation]
    steps = [T.RandomResizedCrop(size, scale=scale, interpolation=mode, antialias=True)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    if jitter_prob > 0:
        steps.append(T.RandomApply([T.ColorJitter(*jitter)], p=jitter_prob))
    if grayscale_prob > 0:
        steps.append(T.RandomGrayscale(p=grayscale_prob))
    if blur_prob > 0:
        steps.append(T.RandomApply([GaussianBlur(sigma=(0.1, 2.0))], p=blur_prob))
    if solarize_prob > 0:
        steps.append(T.RandomSolarize(threshold=128, p=solarize_prob))  # BYOL: invert pixels above 128
    steps.append(T.PILToTensor())
    return device_augment.Augmentation(steps)


class GaussianBlur:
    """Gaussian blur with sigma ~ U(sigma) (SimCLR Appendix A: sigma in [0.1, 2.0]).

    PIL's filter (its `radius` is the standard deviation) as in the PyTorch code of MoCo v2,
    SwAV, DINO and MoCo v3. SimCLR's TF code truncates the kernel at 10% of the image side,
    which changes nothing visible at 224 px. torchvision's GaussianBlur on a PIL image is
    about 10x slower (27 ms vs 1-3 ms for a 224-px crop) and starved the GPU in multi-crop.
    sigma is drawn from torch's generator, so the view stays a function of (seed, epoch, i)."""

    # device_augment.Augmentation draws this blur in batches (device_augment.gaussian_blur)
    batched_blur = True

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        sigma = torch.empty(()).uniform_(*self.sigma).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def simclr_jitter(strength):
    """SimCLR's colour distortion strength s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)."""
    return (0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)


def eval_transform(image_size, native_size):
    """Deterministic view for evaluation: small images as they are (resized if needed);
    large ones resized to 256/224 of the crop, then centre-cropped."""
    if native_size <= 64:
        steps = [] if native_size == image_size else [T.Resize(image_size, antialias=True)]
        return device_augment.Augmentation(steps + [T.CenterCrop(image_size), T.PILToTensor()])
    resize = T.Resize(int(round(image_size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC,
                      antialias=True)
    return device_augment.Augmentation([resize, T.CenterCrop(image_size), T.PILToTensor()])


class Views:
    """Applies a list of transforms to one image and returns the list of views:
    [t, t] = two symmetric views (SimCLR, MoCo, SimSiam); [t1, t2] = asymmetric views (BYOL,
    MoCo v3); [global1, global2, local, ..., local] = multi-crop (SwAV, DINO)."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, img):
        return [t(img) for t in self.transforms]

    def batch(self, groups, indices, heights, widths, epoch, seed):
        """--augment device: the same list of views for a whole batch, each float (B, 3, S, S) in [0, 1] on
        the device. `groups` holds the batch's images as [(canvas, members)]: uint8 (b, 3, Hc, Wc) canvases
        on the device, image k in the top-left heights[k] x widths[k] pixels of its canvas, and members,
        the (b,) places of these images in the batch (a host tensor; None: the whole batch in one canvas).
        `indices`, `heights`, `widths` (B,) are host int64 tensors: view number v of dataset image i in
        epoch e is drawn from the key (seed, e, i, v) alone, so it does not depend on the batch, the rank
        or a resume. Views of one size and filter are cropped and coloured together, in one batch."""
        views = [None] * len(self.transforms)
        shapes = {}
        for number, t in enumerate(self.transforms):
            shapes.setdefault((t.size, t.mode, t.threshold), []).append(number)
        for numbers in shapes.values():
            drawn = [self.transforms[v].draw(device_augment.view_keys(seed, epoch, v, indices),
                                             heights, widths) for v in numbers]
            # view-major, (V*B, ...)
            p = {name: torch.cat([d[name] for d in drawn]) for name in drawn[0]}
            x = device_augment.crop_views(groups, [self.transforms[v] for v in numbers], p, len(indices))
            x = device_augment.colour_views(x, p, self.transforms[numbers[0]].threshold)
            for j, v in enumerate(numbers):
                views[v] = x[j * len(indices):(j + 1) * len(indices)]
        return views


def forward_by_size(backbone, crops):
    """Multi-crop forward (SwAV, DINO): crops of one size are consecutive in `crops` (multi_crop_views
    orders them so); each size goes through the backbone in ONE call, so a batch's BN statistics and
    the ViT's position-embedding interpolation are per size. Returns (len(crops) * n, D) features."""
    groups = itertools.groupby(crops, key=lambda crop: crop.shape[-2:])
    return torch.cat([backbone(torch.cat(list(same_size))) for _, same_size in groups])


def multi_crop_views(global_transforms, local_transform, num_local):
    """Multi-crop (SwAV, DINO): the global views (each its own transform, they may differ) then
    `num_local` local views. Views of one size come next to each other, so a method can batch
    them into one backbone call."""
    return Views(list(global_transforms) + [local_transform] * num_local)


# =============================================================================
# A3. Optimisation: LARS, lr scaling, schedules, EMA
# =============================================================================

def scale_lr(base_lr, batch_size):
    """The linear scaling rule, applied once: lr = base_lr * batch_size / 256."""
    lr = base_lr * batch_size / 256
    print0(f'  lr = {base_lr} x {batch_size} / 256 = {lr:.6g}')
    return lr


def param_groups(module, weight_decay, exclude_bias_and_norm=True):
    """Two groups: weights with weight decay, and biases / norm parameters (1-d tensors)
    without it, marked `bias_and_norm` so LARS skips its trust ratio for them too.
    Parameters that do not require gradients are left out."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if exclude_bias_and_norm and p.ndim <= 1 else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, bias_and_norm=False)]
    if no_decay:
        groups.append(dict(params=no_decay, weight_decay=0.0, bias_and_norm=True))
    return groups

LARS_DENOMINATORS = ('update', 'larc')

class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017): for each parameter w with gradient g and weight decay wd,
        g' = g + wd * w;  g' *= trust * ||w|| / denominator  (when ||w|| = 0: g' = g, a plain SGD step);
        buf = momentum * buf + g';  w -= lr * buf.
    The authors' optimizers differ in two details, both chosen by `denominator`:
      'update': the trust ratio's denominator is ||g + wd * w||, the norm of the decayed update, as in
                SimCLR's LARSOptimizer, BYOL's LARS (optax chain: decay, then the ratio), MoCo v3's and
                DINO's LARS (their ResNet-50 recipes). A tensor whose gradient is exactly zero still gets
                g' = wd * w rescaled to eta * w, a shrinking step of lr * eta (all four codes do this).
      'larc':   ||g|| + wd * ||w|| (+ 1e-8), as NVIDIA apex's LARC, which SwAV wraps around SGD (and
                solo-learn's LARS). A tensor whose gradient is exactly zero gets no step of its own
                (LARC then leaves the gradient, zero, undecayed); its momentum buffer still moves it, as
                torch's SGD.
    clip (LARC's clip mode, used by solo-learn's CIFAR recipes): the factor becomes
    min(trust * ||w|| / denominator, lr) / lr, so no parameter moves faster than plain SGD at lr.
    Groups marked `bias_and_norm` get plain SGD with momentum and no decay."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, clip=False,
                 denominator='update'):
        if denominator not in LARS_DENOMINATORS:
            raise UsageError(f"unknown LARS denominator '{denominator}'; choose one of: "
                             f"{', '.join(LARS_DENOMINATORS)}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, clip=clip, denominator=denominator,
                                      bias_and_norm=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                update = p.grad
                if not group['bias_and_norm']:
                    wd = group['weight_decay']
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    update = update.add(p, alpha=wd)
                    if group.get('denominator', 'update') == 'larc':
                        denominator = g_norm + wd * w_norm + 1e-8
                    else:
                        denominator = torch.linalg.vector_norm(update)
                    ratio = group['trust_coefficient'] * w_norm / denominator
                    if group.get('clip') and group['lr'] > 0:
                        ratio = torch.clamp(ratio / group['lr'], max=1.0)
                    trust = torch.where((w_norm > 0) & (denominator > 0), ratio, torch.ones_like(ratio))
                    update = update * trust
                    if group.get('denominator', 'update') == 'larc':
                        update = update * (g_norm > 0)  # a zero gradient: no decay-only step (LARC)
                state = self.state[p]
                if 'momentum_buffer' not in state:
                    state['momentum_buffer'] = torch.zeros_like(p)
                buf = state['momentum_buffer']
                buf.mul_(group['momentum']).add_(update)
                p.add_(buf, alpha=-group['lr'])


def build_optimizer(args, groups, lr):
    """SGD (momentum), LARS or AdamW (args.optimizer) over param groups that carry their own weight decay."""
    if args.optimizer == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum)
    if args.optimizer == 'lars':
        return LARS(groups, lr=lr, momentum=args.momentum, trust_coefficient=args.lars_eta,
                    clip=args.lars_clip, denominator=args.lars_denominator)
    if args.optimizer == 'adamw':
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    raise UsageError(f"unknown optimizer '{args.optimizer}'; choose sgd, lars or adamw")


def cosine_schedule(base, final, epochs, steps_per_epoch, warmup_epochs=0, warmup_start=0.0,
                    warmup_reaches_base=False):
    """One value per iteration: linear warm-up from `warmup_start` to `base` over
    `warmup_epochs`, then half a cosine from `base` to `final`. Used for lr, weight decay
    and EMA momentum (base 0.996 -> final 1). Step i < W of a W-step warm-up is
      warmup_reaches_base=False: warmup_start + (base - warmup_start) * i / W: `base` first at the cosine's
                                 first step (MoCo v3's, SimCLR's and BYOL's lr * t / W);
      warmup_reaches_base=True:  warmup_start + (base - warmup_start) * i / (W - 1): `base` at the last
                                 warm-up step, and again at the cosine's first (DINO's cosine_scheduler,
                                 SwAV's schedule: np.linspace with both ends)."""
    total, warmup = epochs * steps_per_epoch, int(round(warmup_epochs * steps_per_epoch))
    warm = np.linspace(warmup_start, base, warmup, endpoint=warmup_reaches_base)
    t = np.arange(total - warmup)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(1, len(t))))
    return np.concatenate([warm, cosine])


def step_schedule(base, epochs, steps_per_epoch, milestones, gamma=0.1):
    """One value per iteration: `base`, multiplied by `gamma` at each milestone epoch."""
    epoch = np.arange(epochs * steps_per_epoch) / steps_per_epoch
    return base * gamma ** np.searchsorted(np.asarray(milestones), epoch, side='right')


def set_lr(optimizer, lr):
    """Set every group's lr, except groups marked `fixed_lr` (SimSiam's predictor)."""
    for group in optimizer.param_groups:
        if not group.get('fixed_lr', False):
            group['lr'] = float(lr)


def set_weight_decay(optimizer, weight_decay):
    """Set the weight decay of every group except the biases and norms (DINO's schedule)."""
    for group in optimizer.param_groups:
        if not group.get('bias_and_norm', False):
            group['weight_decay'] = float(weight_decay)


@torch.no_grad()
def ema_update(target, online, momentum):
    """target <- momentum * target + (1 - momentum) * online, parameters only (buffers such as
    BN statistics are the target's own). The target gets no gradient and no optimizer."""
    target_params = [p for p in target.parameters()]
    online_params = [p.detach() for p in online.parameters()]
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, online_params, alpha=1 - momentum)


@torch.no_grad()
def clip_gradients(module, max_norm):
    """Per-parameter gradient clipping (DINO): each parameter's gradient whose L2 norm exceeds
    `max_norm` is rescaled to that norm, independently of the others (unlike
    torch.nn.utils.clip_grad_norm_, which uses one global norm). 0 = off."""
    if max_norm <= 0:
        return
    for p in module.parameters():
        if p.grad is not None:
            norm = torch.linalg.vector_norm(p.grad)
            p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


# =============================================================================
# A4. Collectives: what crosses GPUs inside a loss (DDP:)
# =============================================================================

class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        # every rank's loss may depend on our slice: sum the gradients of all ranks, keep our slice
        grad = torch.stack(grads)
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def all_gather_with_grad(x):
    """(n, ...) on each rank -> (world * n, ...), rank-major; gradients flow back to every rank's input.

    Use it when the loss on one GPU depends on other GPUs' embeddings AND they need gradients
    (SimCLR's negatives). A plain all_gather returns tensors detached from the graph.
    """
    if get_world_size() == 1:
        return x
    return torch.cat(_AllGatherWithGrad.apply(x))


@torch.no_grad()
def all_gather_no_grad(x):
    """(n, ...) on each rank -> (world * n, ...), rank-major, no gradient (keys, queue entries, indices)."""
    if get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_reduce_sum(x):
    """Sum over all ranks, in place (no-op on one process)."""
    if get_world_size() > 1:
        dist.all_reduce(x)
    return x


def broadcast(x, src=0):
    """Overwrite x, in place, with rank `src`'s x on every rank (no-op on one process): a random
    draw that all ranks must share (e.g. MoCo's shuffle-BN permutation)."""
    if get_world_size() > 1:
        dist.broadcast(x, src)
    return x


# =============================================================================
# A5. Measures: features, weighted kNN, collapse indicators
# =============================================================================

@torch.no_grad()
def normalized_output_std(z):
    """Collapse indicator (SimSiam, Sec. 4.1 and Fig. 2): the standard deviation over the batch of
    each channel of z / ||z||, averaged over the channels. About 1/sqrt(d) when the (n, d) outputs
    spread over the unit sphere, 0 when they collapse to one point. Returns a tensor, so that
    MetricLogger reads it (a host sync) only on logging steps."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def attention_maps(backbone, image):
    """The last block's attention from the CLS token to every patch, per head, as DINO's
    figures show it: image (3, H, W) normalised, H and W multiples of the patch size ->
    (heads, H / patch, W / patch); each map is a probability over patches minus the CLS's own share."""
    if not isinstance(backbone, VisionTransformer):
        raise UsageError('attention maps need a ViT backbone (--arch vit_*); this one is a ResNet')
    was_training = backbone.training
    backbone.eval()
    attention = backbone.get_last_selfattention(image[None])  # (1, heads, 1 + N, 1 + N)
    backbone.train(was_training)
    grid_h, grid_w = image.shape[1] // backbone.patch_size, image.shape[2] // backbone.patch_size
    return attention[0, :, 0, 1:].reshape(-1, grid_h, grid_w).float()  # (heads, grid_h, grid_w)


@torch.no_grad()
def extract_features(backbone, loader, device, args, normalize=True):
    """L2-normalised (or, normalize=False, raw float32) backbone features and labels of a whole
    (sharded) dataset, gathered from all ranks and put back in dataset order: ((N, D), (N,)).
    Runs in eval mode (BN frozen)."""
    was_training = backbone.training
    backbone.eval()
    features, labels, indices = [], [], []
    for views, y, i in loader.epoch(0):
        with autocast(device, args):
            output = backbone(views[0]).float()  # (B, D)
        features.append(F.normalize(output, dim=1) if normalize else output)
        labels.append(y)
        indices.append(i)
    backbone.train(was_training)
    features, labels, indices = torch.cat(features), torch.cat(labels), torch.cat(indices)
    bad = int((~torch.isfinite(features).all(dim=1)).sum())
    if bad:  # a NaN feature is most similar to nothing: the kNN would silently score 0%
        raise TrainingError(f'the backbone gives non-finite features for {bad} of {len(features)} images '
                            '(NaN/inf weights, or an overflow in bf16: try --precision fp32)')
    # DDP: shards have different lengths; pad to the longest, gather, drop the padding
    if get_world_size() > 1:
        n = torch.tensor([len(indices)], device=device)
        longest = int(all_gather_no_grad(n).max())
        pad = longest - len(indices)
        features = F.pad(features, (0, 0, 0, pad))
        labels, indices = F.pad(labels, (0, pad), value=-1), F.pad(indices, (0, pad), value=-1)
        features, labels, indices = (all_gather_no_grad(features), all_gather_no_grad(labels),
                                     all_gather_no_grad(indices))
        keep = indices >= 0
        features, labels, indices = features[keep], labels[keep], indices[keep]
    order = torch.argsort(indices)
    return features[order], labels[order]


@torch.no_grad()
def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, ks, temperature,
                 chunk=512):
    """Weighted kNN classifier (Wu et al. 2018): each test feature's k most cosine-similar
    training features vote for their class with weight exp(similarity / T). Features must be
    L2-normalised. Returns {k: (top-1, top-5)} in percent, for every k in `ks` (1 <= k <= N_train).
    The votes are summed in log space (log sum_j exp(s_j / T) per class): at a small T, exp(s / T)
    overflows even float64 (T = 0.001: e^1000), and every class would tie at inf."""
    if not all(1 <= k <= len(train_features) for k in ks) or not temperature > 0:
        raise ValueError(f'kNN needs 1 <= k <= {len(train_features)} and T > 0, not k={ks}, T={temperature}')
    k_max = max(ks)
    correct = {k: torch.zeros(2, device=test_features.device) for k in ks}
    for start in range(0, len(test_features), chunk):
        similarity = test_features[start:start + chunk] @ train_features.T  # (c, N_train)
        top_sim, top_idx = similarity.topk(k_max, dim=1)                   # (c, k_max), sorted
        logits, neighbour_labels = top_sim.double() / temperature, train_labels[top_idx]  # (c, k_max) log w
        labels = test_labels[start:start + chunk, None]
        for k in correct:  # each k once, even if `ks` repeats one
            votes = torch.full((len(top_sim), num_classes), -math.inf, device=top_sim.device,
                               dtype=torch.float64)
            peak = votes.scatter_reduce(1, neighbour_labels[:, :k], logits[:, :k], 'amax')  # (c, classes)
            shifted = (logits[:, :k] - peak.gather(1, neighbour_labels[:, :k])).exp()      # <= 1: no overflow
            sums = torch.zeros_like(votes).scatter_add_(1, neighbour_labels[:, :k], shifted)
            votes = peak + sums.log()  # log of the summed weights; -inf for a class without votes
            top_votes, ranked = votes.topk(min(5, num_classes), dim=1)
            hit = (ranked == labels) & (top_votes > -math.inf)  # a class without votes is no prediction
            correct[k] += torch.stack([hit[:, 0].sum(), hit.any(1).sum()])
    return {k: tuple((100 * c / len(test_features)).tolist()) for k, c in correct.items()}


def extract_train_test_features(backbone, eval_loaders, device, args, normalize=True):
    """Features and labels of the labelled train split and of the test split."""
    return (*extract_features(backbone, eval_loaders[0], device, args, normalize),
            *extract_features(backbone, eval_loaders[1], device, args, normalize))


def knn_due(args, epoch):
    """Is the kNN monitor due after `epoch`? Every --knn-every epochs and after the last."""
    if args.knn_every < 0:
        return False
    return epoch + 1 == args.epochs or (args.knn_every > 0 and (epoch + 1) % args.knn_every == 0)


def knn_monitor(backbone, eval_loaders, device, args):
    """kNN top-1/top-5 of `backbone` with the monitor's k and T (and top-1 at k=20, the ImageNet
    convention, for comparison): a dict to log, {} if there is no test split."""
    if eval_loaders is None:
        return {}
    start = active_time()
    HOLD_STOP['active'] = True  # Ctrl-C / SIGTERM now: the epoch's checkpoint comes first (the loader's next
    try:                        # check_stop() raises); a second one stops at once
        features = extract_train_test_features(backbone, eval_loaders, device, args)
    finally:
        HOLD_STOP['active'] = False
    k20 = min(20, len(features[0]))
    results = knn_accuracy(*features, args.dataset_info['num_classes'], sorted({args.knn_k, k20}), args.knn_t)
    top1, top5 = results[args.knn_k]
    seconds = active_time() - start
    print0(f'  kNN (k={args.knn_k}, T={args.knn_t}): top-1 {top1:.2f}  top-5 {top5:.2f}  ({seconds:.0f} s)')
    return dict(knn_top1=top1, knn_top5=top5, knn_top1_k20=results[k20][0], knn_seconds=seconds)


# =============================================================================
# B1. Plumbing: errors, the entry wrapper, arguments and presets
# =============================================================================

class UsageError(Exception):
    """Bad input: printed as one line `error: ...` and the process exits with code 2."""


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss): one line, exit code 1."""


class Interrupted(Exception):
    """SIGTERM (a job scheduler, torchrun, `kill`): turned into an exception so that run() can say where the
    last checkpoint is, as for Ctrl-C."""

STOP = {}  # the signal that asked this process to stop: set by the handler, checked at every step
HOLD_STOP = {'active': False}  # set during a kNN pass: a first stop waits for it and the epoch's checkpoint


def _raise_interrupted(signum, frame):
    if HOLD_STOP['active'] and not STOP:  # the epoch is trained: finish its kNN pass, write its checkpoint
        STOP['signal'] = signum
        print0('  stop requested: finishing the kNN pass, then the checkpoint of the epoch just trained; '
               'send it again to stop at once')
        return
    STOP['signal'] = signum
    raise Interrupted() if signum == signal.SIGTERM else KeyboardInterrupt()


PAUSED = {'seconds': 0.0}  # how long this process was stopped by Ctrl-Z (SIGTSTP) so far


def _pause(signum, frame):
    """Ctrl-Z (SIGTSTP): stop, as the default action does; once continued (fg, SIGCONT), count the time
    stopped."""
    stopped = time.time()
    os.kill(os.getpid(), signal.SIGSTOP)
    PAUSED['seconds'] += time.time() - stopped


def active_time():
    """time.time() less the time this process was stopped by Ctrl-Z (SIGTSTP): the epoch and kNN timings
    use it, so a run paused to free the machine (`kill -TSTP PID`, later `kill -CONT PID`) still records
    its own speed."""
    return time.time() - PAUSED['seconds']


def cpu_name():
    """The CPU's model name from /proc/cpuinfo, else what platform knows (records name the hardware)."""
    try:
        with open('/proc/cpuinfo') as f:
            name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), None)
    except OSError:
        name = None
    return name or platform.processor() or platform.machine()


def busy_cpu_seconds():
    """CPU seconds every process on the machine has used since boot (/proc/stat; None without it): the
    difference over a run, less the run's own CPU time, is what other processes took from it."""
    try:
        with open('/proc/stat') as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _, _, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf('SC_CLK_TCK')


def check_stop():
    """Raise again the stop a signal asked for: its first exception can be swallowed where Python ignores
    exceptions (a DataLoader iterator's __del__ at an epoch's end prints "Exception ignored" and goes on)."""
    if STOP and not HOLD_STOP['active']:  # held during a kNN pass (knn_monitor)
        raise Interrupted() if STOP['signal'] == signal.SIGTERM else KeyboardInterrupt()


def run(main):
    """Call main() and turn every expected failure into a one-line message and an exit code:
    UsageError (bad input) 2, TrainingError (e.g. a non-finite loss) 1, a collective that timed
    out (a stuck or lost rank) 1, Ctrl-C 130 and SIGTERM 143 (each naming the last checkpoint).

    A usage error found before the process group is joined is the same on every rank and printed
    by rank 0 only; later ones by the rank that hit them. An output directory this process made
    and left empty is removed. After a normal end, all ranks meet at a barrier and leave the
    process group (a process that exits with gloo/NCCL threads alive can abort with "terminate
    called without an active exception"). After an error, the rank exits at once: tearing down a
    group whose other ranks may be stuck in a collective can block until NCCL's watchdog fires."""
    signal.signal(signal.SIGTERM, _raise_interrupted)
    # not when the caller chose to ignore Ctrl-C
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupted)
    if signal.getsignal(signal.SIGTSTP) == signal.SIG_DFL:
        signal.signal(signal.SIGTSTP, _pause)
    try:
        main()
        check_stop()  # a stop signal whose exception was swallowed in the last step
    except (UsageError, TrainingError, Interrupted, KeyboardInterrupt, RuntimeError) as e:
        joined = dist.is_available() and dist.is_initialized()
        if isinstance(e, RuntimeError) and not is_timeout(e) and not isinstance(e, torch.OutOfMemoryError):
            remove_empty_output_dirs()  # a bug's traceback: still nothing half-written
            raise
        if isinstance(e, torch.OutOfMemoryError):
            message, code = out_of_memory_message(e), 1
        elif isinstance(e, (UsageError, TrainingError)):
            message = str(e).strip()
            if 'Original Traceback' in message:  # raised inside a DataLoader worker: keep its last line
                message = message.splitlines()[-1].split('Error: ', 1)[-1]
            code = 2 if isinstance(e, UsageError) else 1
        elif isinstance(e, RuntimeError):
            message, code = (f'a collective operation timed out {where_in_repo(e)}'
                             f'({str(e).strip().splitlines()[0][:160]}): another process is stuck or gone. '
                             f'{LAST_CHECKPOINT.get("note", "")}').strip(), 1
        else:
            name = 'Ctrl-C' if isinstance(e, KeyboardInterrupt) else 'SIGTERM'
            message = f'stopped by {name}. ' + LAST_CHECKPOINT.get('note', 'No checkpoint was written.')
            code = 130 if isinstance(e, KeyboardInterrupt) else 143
        rank = int(os.environ.get('RANK', 0))
        if rank == 0 or joined:
            prefix = f'rank {rank}: ' if joined and int(os.environ.get('WORLD_SIZE', 1)) > 1 and rank else ''
            print(f'error: {prefix}{message}', file=sys.stderr, flush=True)
        # shutting down: loader threads talking to stopped workers
        threading.excepthook = lambda hook_args: None
        sys.excepthook = lambda *exc_info: None
        # DataLoader's handler would raise as the exit stops its workers: 15 lines
        if hasattr(signal, 'SIGCHLD'):
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        remove_empty_output_dirs()
        if joined:
            sys.stdout.flush()
            os._exit(code)
        sys.exit(code)
    except BaseException:  # a bug's traceback (or argparse's exit): still nothing half-written
        remove_empty_output_dirs()
        raise
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down while another still talks to it
        dist.destroy_process_group()


def remove_empty_output_dirs():
    """Nothing half-written: an output folder this run made is removed if it holds nothing, or only the
    records of a first epoch that never ended in a checkpoint."""
    for path in _CREATED_OUTPUT_DIRS:
        if not os.path.isdir(path):
            continue
        names = set(os.listdir(path))
        if names and names <= {'metrics.jsonl', 'metrics.png'}:
            for name in names:
                os.remove(os.path.join(path, name))
        if not os.listdir(path):
            os.rmdir(path)


def out_of_memory_message(error):
    """The device's out-of-memory error in one line: the batch each process held, and what to try."""
    first = '. '.join(str(error).strip().split('. ')[:2])[:160]
    batch, world_size = RUNNING.get('batch_size'), RUNNING.get('world_size', 1)
    held = (f'with a per-GPU batch of {batch // world_size} (--batch-size {batch} over {world_size} '
            'process(es))' if batch else 'evaluating in batches of 256 images per process')
    advice = ('give a smaller --batch-size (the lr is scaled with it), or spread the batch over more GPUs '
              '(torchrun --nproc_per_node=N)' if batch else
              'try a smaller --image-size, or more GPUs (torchrun)')
    return (f'the device ran out of memory {held} ({first}): {advice}. '
            f'{LAST_CHECKPOINT.get("note", "")}').strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose own errors (an unknown flag, 'invalid int value') are one line and exit
    code 2, as every other bad input is, instead of 20 lines of usage before the error."""

    def error(self, message):
        if int(os.environ.get('RANK', 0)) == 0:
            print(f'error: {message}; see {self.prog} --help', file=sys.stderr, flush=True)
        sys.exit(2)


# How the test suite and the checkers start their 2-process (gloo) checks: forked from the process that has
# torch imported already where that is safe (Linux), spawned elsewhere (macOS, Windows).
WORKER_START_METHOD = 'fork' if sys.platform.startswith('linux') else 'spawn'

_INTERPRETER_WARNINGS = warnings.filters[:]  # as a script run alone has them (a test runner changes them)


def run_in_process(main, argv, cwd, threads):
    """`python SCRIPT ARGS` (argv = [SCRIPT, *ARGS]) in this process, as a subprocess would run it: main (the
    script's main) through run(), in the directory cwd, with `threads` torch threads and the interpreter's
    warning filters. Returns (exit code, stdout, stderr); an uncaught exception gives code 1 and its traceback
    on stderr, as the interpreter would. What run() changes for the process (signal handlers, excepthooks,
    the thread count, the directory) and this module's per-run state are put back. The test suite and the
    assignments' checkers run the entry points this way: a subprocess would add only Python's and torch's
    start-up, 2-3 s each time."""
    import contextlib
    import io
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGTSTP)
    saved = (sys.argv, sys.excepthook, threading.excepthook, {s: signal.getsignal(s) for s in signals},
             torch.get_num_threads(), os.getcwd())
    for state in (LAST_CHECKPOINT, STOP, RUNNING, HELD):
        state.clear()
    _CREATED_OUTPUT_DIRS.clear()
    sys.argv = [str(a) for a in argv]
    torch.set_num_threads(threads)
    os.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.filters[:] = _INTERPRETER_WARNINGS
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                err.write(warnings.formatwarning(message, category, filename, lineno, line))
            try:
                run(main)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.excepthook, threading.excepthook = saved[:3]
        for s, handler in saved[3].items():
            signal.signal(s, handler)
        torch.set_num_threads(saved[4])
        os.chdir(saved[5])
        HELD.clear()
    return code, out.getvalue(), err.getvalue()


def where_in_repo(error):
    """'in common.py:123 all_reduce_sum, called from swav.py:170 sinkhorn ': the innermost two frames of the
    error's traceback that lie in this repository, to say which collective (and which step of the method)
    was waiting."""
    root = os.path.dirname(os.path.abspath(__file__))
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.dirname(os.path.abspath(f.filename)) == root]
    names = [f'{os.path.basename(f.filename)}:{f.lineno} {f.name}' for f in frames[-2:]][::-1]
    return ('in ' + ', called from '.join(names) + ' ') if names else ''


def is_timeout(error):
    """Is this RuntimeError a collective that timed out (gloo: 'Timed out', NCCL: 'timeout')?"""
    text = str(error).lower()
    return 'timed out' in text or 'timeout' in text


def add_data_flags(group, required, image_size_help):
    """--data, --data-dir, --image-size, --workers: shared by the method files and the evaluation scripts."""
    group.add_argument('--data', required=required, default=None,
                       help='cifar10 | cifar100 | stl10 | procedural[:N] | path to a folder with train/ and '
                       'val/ (or test/)')
    group.add_argument('--data-dir',
                       default=os.environ.get('SSL_DATA_DIR', os.path.expanduser('~/.cache/ssl-datasets')),
                       help='where torchvision datasets are downloaded / looked for')
    group.add_argument('--image-size', type=int, default=None, help=image_size_help)
    group.add_argument('--workers', type=int, default=None,
                       help='data-loading processes per GPU (default: CPUs / GPUs - 1, at most 16)')


def get_args_parser(description, method):
    """The flags every method shares. The method file adds its own block and sets defaults."""
    parser = ArgumentParser(description=description.split('\n')[0], allow_abbrev=False,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.set_defaults(method=method)
    g = parser.add_argument_group('data')
    add_data_flags(g, required=True, image_size_help='training crop size (default: follows the dataset)')
    g.add_argument('--augment', default='auto', choices=('auto', 'cpu', 'device'),
                   help='where the views are made: cpu = PIL in DataLoader workers; device = images held '
                   '(or JPEGs decoded) on the training device, augmented there in batches; auto = device on '
                   'a GPU, else cpu')
    g.add_argument('--device-data-gb', type=float, default=None,
                   help='--augment device: at most this many GB of decoded images on the device (default: '
                   '40%% of its free memory); a larger folder is decoded from its files every step')
    g = parser.add_argument_group('model')
    g.add_argument('--arch', default='resnet50', help='one of ' + ', '.join(ARCHS))
    g.add_argument('--width', type=int, default=64,
                   help='ResNet base width (64 = standard; smaller only for smoke runs)')
    g.add_argument('--cifar-stem', action=argparse.BooleanOptionalAction, default=None,
                   help='ResNet 3x3 stride-1 conv1 without max-pool (default: on for images <= 64 px)')
    g.add_argument('--zero-init-residual', action=argparse.BooleanOptionalAction, default=False,
                   help='ResNet: last BN of each residual block starts at zero')
    g.add_argument('--patch-size', type=int, default=None,
                   help='ViT patch size (default: 16, or 4 for images <= 64 px)')
    g.add_argument('--num-heads', type=int, default=None,
                   help='ViT attention heads (default: 3 / 6 / 12 for tiny / small / base)')
    g.add_argument('--drop-path', type=float, default=0.0, help='ViT stochastic depth rate')
    g.add_argument('--pos-embed', default='learned', choices=('learned', 'sincos'),
                   help='ViT position embedding')
    g.add_argument('--freeze-patch-embed', action=argparse.BooleanOptionalAction, default=False,
                   help='ViT: keep the patch projection at its random init (MoCo v3)')
    g.add_argument('--vit-init', default='dino', choices=VIT_INITS,
                   help="ViT initialisation: DINO's (trunc-normal 0.02) or MoCo v3's (xavier-uniform, "
                   'q/k/v apart)')
    g.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=True,
                   help='convert BatchNorm to SyncBatchNorm when training on several GPUs')
    g = parser.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=100, help='training epochs (the schedules span them)')
    g.add_argument('--batch-size', type=int, default=256, help='GLOBAL batch size, all processes together')
    g.add_argument('--optimizer', default='sgd', choices=('sgd', 'lars', 'adamw'),
                   help='SGD with momentum, LARS or AdamW')
    g.add_argument('--lr', type=float, default=0.05,
                   help='base learning rate per 256 images (scaled linearly by batch/256)')
    g.add_argument('--min-lr', type=float, default=0.0,
                   help='final learning rate of the cosine schedule (absolute)')
    g.add_argument('--warmup-epochs', type=float, default=0, help='linear warm-up, in epochs')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD / LARS momentum')
    g.add_argument('--lars-eta', type=float, default=0.001, help='LARS trust coefficient eta')
    g.add_argument('--lars-clip', action=argparse.BooleanOptionalAction, default=False,
                   help="LARS: cap each parameter's adaptive lr at the global lr (LARC's clip mode)")
    g.add_argument('--lars-denominator', default='update', choices=LARS_DENOMINATORS,
                   help='LARS trust ratio eta ||w|| / denominator: update = ||g + wd w|| (SimCLR, BYOL, '
                        "MoCo v3), larc = ||g|| + wd ||w|| (apex's LARC, SwAV)")
    g.add_argument('--weight-decay', type=float, default=1e-4,
                   help='weight decay (L2), excluded from biases and norms where the method says so')
    g = parser.add_argument_group('running')
    g.add_argument('--output-dir', default=None,
                   help='checkpoints and logs (default: runs/<method>-<data>-<arch>); '
                   'rerunning the same command resumes from it')
    g.add_argument('--seed', type=int, default=0,
                   help='random seed (data order and augmentation: seed + rank)')
    g.add_argument('--precision', default='auto', choices=('auto', 'bf16', 'fp32'),
                   help='auto = bf16 autocast on GPUs that support it, fp32 otherwise')
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False,
                   help='torch.compile the model')
    add_channels_last_flag(g)
    g.add_argument('--log-every', type=int, default=50, help='steps between progress lines')
    g.add_argument('--knn-every', type=int, default=10,
                   help='epochs between kNN evaluations (0 = only at the end, -1 = never)')
    g.add_argument('--knn-k', type=int, default=None,
                   help='kNN monitor neighbours (default: 200 small images, 20 else)')
    g.add_argument('--knn-t', type=float, default=None,
                   help='kNN monitor temperature (default: 0.1 small images, 0.07 else)')
    g.add_argument('--stop-after-epoch', type=int, default=None,
                   help='exit after this epoch, e.g. to fit a job time limit; '
                   'rerun the same command to resume')
    g.add_argument('--dist-timeout', type=float, default=1800,
                   help='seconds a collective waits for the other processes before the run stops (torchrun)')
    g.add_argument('--show-views', default=None, metavar='PNG',
                   help='draw a few images of the first training batch and the views the loader makes of '
                        'them (what the network sees) to this PNG, then exit without training (show_views)')
    return parser


def explicit_flags(parser, argv):
    """Destinations of the flags the user typed (so presets never override them)."""
    typed = set()
    for action in parser._actions:
        for option in action.option_strings:
            if any(a == option or a.startswith(option + '=') for a in argv):
                typed.add(action.dest)
    return typed


def parse_args(parser, small_image_preset, argv=None):
    """Parse, validate, and apply the dataset-dependent defaults and the method's preset.

    `small_image_preset` (a dict, written in the method file) replaces the defaults when the
    images are small (CIFAR-like, <= 64 px), for every flag the user did not type.
    """
    argv = sys.argv[1:] if argv is None else argv
    if small_image_preset:  # --help says that the defaults shown are replaced for small images
        shown = {k: ' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v
                 for k, v in small_image_preset.items()}
        parser.epilog = ('The defaults above are the paper\'s ImageNet recipe. For small images (<= 64 px, '
                         'e.g. CIFAR and the procedural data) the method\'s small-image preset replaces them '
                         'for every flag you do not type: '
                         + ', '.join(f'--{k.replace("_", "-")} {v}' for k, v in shown.items()))
    args = parser.parse_args(argv)
    check_declared_ranges(parser, args)
    typed = explicit_flags(parser, argv)
    args.dataset_info = inspect_dataset(args.data, args.data_dir)
    small = args.dataset_info['image_size'] <= 64
    notes = []
    if small and small_image_preset:
        preset = {k: v for k, v in small_image_preset.items() if k not in typed}
        for key, value in preset.items():
            setattr(args, key, value)
        notes.append('small-image preset (' + ', '.join(f'{k}={v}' for k, v in preset.items()) + ')')
    apply_size_defaults(args)
    if args.knn_k is None:  # not more neighbours than a small --data has images
        args.knn_k = min(200 if small else 20, args.dataset_info['num_train'])
    if args.knn_t is None:
        args.knn_t = 0.1 if small else 0.07
    if args.output_dir is None:
        data_name = os.path.basename(os.path.normpath(args.data)).replace(':', '')
        args.output_dir = os.path.join('runs', f'{args.method}-{data_name}-{args.arch}')
    validate_args(args)
    args.notes = [data_note(args), configure_augment(args)] + notes
    if args.show_views:
        check_writable_file(args.show_views, '--show-views')
    return args


def apply_size_defaults(args):
    """Defaults that follow the image size: crops at the native size for small images (224 else),
    the CIFAR stem for crops <= 64 px, ViT patches of 4 px for crops <= 64 px (16 else)."""
    small = args.dataset_info['image_size'] <= 64
    if args.image_size is None:
        args.image_size = args.dataset_info['image_size'] if small else 224
    if args.cifar_stem is None:
        args.cifar_stem = args.image_size <= 64
    if args.patch_size is None:
        args.patch_size = 4 if args.image_size <= 64 else 16


def data_note(args):
    """The printed line that says what --data holds and how the images are fed to the backbone."""
    info = args.dataset_info
    return (f"data {args.data}: {info['num_train']} train / {info['num_test']} test images, "
            f"{info['num_classes']} classes, {info['image_size']} px"
            + (' (median of {2} sampled files: {0}-{1} px)'.format(*info['image_sizes'])
               if info.get('image_sizes') and info['image_sizes'][0] != info['image_sizes'][1] else '')
            + f" -> image size {args.image_size}"
            + (', CIFAR stem' if args.cifar_stem and args.arch.startswith('resnet') else '')
            + (f', patch {args.patch_size}' if args.arch.startswith('vit') else ''))


def apply_epoch_preset(args, presets):
    """Recipes that depend on the training length (BYOL's lr, weight decay and EMA rate): `presets`
    maps a number of epochs to {flag: value}, written in the method file. Every flag still None
    (not typed, not set by the small-image preset) takes the value of the row of the shortest
    listed length >= --epochs (the longest row beyond it); the choice is added to the printed notes."""
    length = min([epochs for epochs in presets if epochs >= args.epochs] or [max(presets)])
    chosen = {key: value for key, value in presets[length].items() if getattr(args, key) is None}
    vars(args).update(chosen)
    if chosen:
        args.notes.append(f'{length}-epoch preset (' + ', '.join(f'{k}={v}' for k, v in chosen.items()) + ')')
    validate_args(args)  # the preset's values against the typed ones (e.g. --min-lr against its lr)


def validate_args(args):
    """One-line errors for shared flags out of range, before anything is written."""
    validate_backbone_args(args)
    if args.batch_size <= 0 or args.epochs <= 0:
        raise UsageError('--batch-size and --epochs must be positive')
    for name in ('lr', 'weight_decay', 'min_lr', 'momentum', 'warmup_epochs', 'lars_eta', 'drop_path'):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):  # None: set later by a preset
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, not {value}")
    if (args.lr or 0) < 0 or (args.weight_decay or 0) < 0 or args.lars_eta <= 0:
        raise UsageError('--lr and --weight-decay must be >= 0 and --lars-eta > 0')
    if args.warmup_epochs < 0:  # longer than --epochs is allowed: a short smoke run stays in its warm-up
        raise UsageError(f'--warmup-epochs must be >= 0, not {args.warmup_epochs}')
    if args.min_lr < 0 or not 0 <= args.momentum < 1 or not 0 <= args.drop_path < 1:
        raise UsageError('--min-lr must be >= 0, --momentum and --drop-path in [0, 1)')
    peak = None if args.lr is None else args.lr * args.batch_size / 256  # scale_lr's; None: set by a preset
    if peak is not None and args.min_lr > peak:  # the cosine would climb from the peak to --min-lr
        raise UsageError(f'--min-lr {args.min_lr:g} is above the peak lr {peak:g} (--lr {args.lr:g} x '
                         f'--batch-size {args.batch_size} / 256): the cosine schedule would climb; give '
                         f'--min-lr {peak:g} or less')
    if args.log_every < 1:
        raise UsageError(f'--log-every must be at least 1 step, not {args.log_every}')
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        raise UsageError(f'--stop-after-epoch must be at least 1, not {args.stop_after_epoch}')
    if args.knn_k is not None and args.knn_k < 1:
        raise UsageError(f'--knn-k must be at least 1 neighbour, not {args.knn_k}')
    if args.knn_t is not None and not (math.isfinite(args.knn_t) and args.knn_t > 0):
        raise UsageError(f'--knn-t must be a positive temperature, not {args.knn_t}')
    min_scale = getattr(args, 'min_scale', None)  # the RandomResizedCrop bound that most method files define
    if min_scale is not None and not 0 < min_scale <= 1:
        raise UsageError(f'--min-scale {min_scale} is outside (0, 1]: it is the smallest crop area, '
                         'as a fraction of the image')


def validate_backbone_args(args):
    """The flags that build the backbone, and the data flags shared by training and evaluation."""
    if args.arch not in ARCHS:
        raise UsageError(f"unknown --arch '{args.arch}'; choose one of: {', '.join(ARCHS)}")
    if args.image_size <= 0:
        raise UsageError(f'--image-size must be a positive number of pixels, not {args.image_size}')
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise UsageError(f'--dist-timeout must be a positive number of seconds, not {args.dist_timeout}')
    if args.workers is not None and args.workers < 0:
        raise UsageError(f'--workers must be >= 0 (0 = load in the main process), not {args.workers}')
    if args.width <= 0:
        raise UsageError('--width must be positive')
    if getattr(args, 'channels_last', None) and args.arch.startswith('resnet') and args.width < 8 \
            and not torch.cuda.is_available():
        # torch 2.14's CPU convolutions corrupt the heap in channels-last with fewer than 8 channels
        # (measured: --width 2 to 7 crash, on 1 thread, in the first backward pass)
        raise UsageError(f'--channels-last with --width {args.width} crashes PyTorch\'s CPU convolutions '
                         '(fewer than 8 channels); use --width 8 or more, or --no-channels-last')
    if args.arch.startswith('vit'):
        if args.patch_size <= 0:
            raise UsageError(f'--patch-size must be a positive number of pixels, not {args.patch_size}')
        if args.image_size % args.patch_size:
            raise UsageError(f'--patch-size {args.patch_size} does not divide '
                             f'--image-size {args.image_size}; pick a patch size that divides the crop size')
        dim, _, heads = VIT_SIZES[args.arch]
        if args.num_heads is not None and (args.num_heads <= 0 or dim % args.num_heads):
            raise UsageError(f'--num-heads {args.num_heads} does not divide the width {dim} of {args.arch}; '
                             f'use a divisor such as {heads}')
    if args.arch.startswith('resnet') and getattr(args, 'freeze_patch_embed', False):
        raise UsageError('--freeze-patch-embed is a ViT option; drop it or use a --arch vit_*')


def check_ranges(args, positive=(), non_negative=(), probabilities=()):
    """One-line errors for a method's flags out of range: `positive` > 0, `non_negative` >= 0,
    `probabilities` (also EMA rates; single values or lists) in [0, 1]. Names are attribute names."""
    def flag(name):
        return '--' + name.replace('_', '-')
    for name in positive:
        if not getattr(args, name) > 0:
            raise UsageError(f'{flag(name)} must be positive, not {getattr(args, name)}')
    for name in non_negative:
        if not getattr(args, name) >= 0:
            raise UsageError(f'{flag(name)} must be >= 0, not {getattr(args, name)}')
    for name in probabilities:
        values = getattr(args, name)
        if any(not 0 <= v <= 1 for v in (values if isinstance(values, (list, tuple)) else [values])):
            raise UsageError(f'{flag(name)} must be in [0, 1], not {values}')


# The range of every numeric flag of every entry point (the shared flags, each method file's and the
# evaluation scripts'), one declaration per flag, by its dest: '[a, b]' closed, '(a, b)' open ends.
# parse_args and parse_eval_args check each flag a parser has against it, before any work. A flag of several
# values (nargs) is checked value by value, against one range or a tuple of one range per value. Caps keep a
# run from allocating what no machine holds (the schedules of 10^9 epochs, a 99999-px image); inf and nan are
# outside every range.
EPOCHS, PIXELS, WIDTH = '[0, 10000]', '[8, 1024]', '[1, 65536]'

RANGES = dict(
    # shared: data, model, optimisation, running
    image_size=PIXELS, workers='[0, 256]', device_data_gb='[0, 1e6]', width='[1, 1024]',
    patch_size='[1, 1024]', num_heads='[1, 1024]', drop_path='[0, 1)', epochs='[1, 10000]',
    batch_size='[1, 1048576]', lr='[0, 1e38]',
    min_lr='[0, 1e38]', warmup_epochs=EPOCHS, momentum='[0, 1)', lars_eta='(0, 1e6]', weight_decay='[0, 1e6]',
    seed=f'[0, {2 ** 32 - 1}]', log_every='[1, 1e12]', knn_every='[-1, 10000]', knn_k='[1, 1e12]',
    knn_t='(0, 1e6]', stop_after_epoch='[1, 10000]', dist_timeout='(0, 1e7]',
    # heads
    proj_dim=WIDTH, proj_hidden_dim=WIDTH, pred_hidden_dim=WIDTH, mlp_hidden_dim=WIDTH, hidden_dim=WIDTH,
    bottleneck_dim=WIDTH, out_dim='[1, 1048576]', proj_layers='[1, 16]', nmb_prototypes='[1, 1048576]',
    # losses, targets and queues
    temperature='(0, 1e6]', student_temp='(0, 1e6]', teacher_temp='(0, 1e6]', warmup_teacher_temp='(0, 1e6]',
    epsilon='(0, 1e6]', sinkhorn_iterations='[1, 10000]', nce_k='[0, 1e9]', nce_z_momentum='[0, 1]',
    memory_momentum='[0, 1]', queue_size='[1, 1e9]', queue_length='[0, 1e9]', bn_splits='[1, 1024]',
    key_momentum='[0, 1]', moco_m='[0, 1]', tau_base='[0, 1]', momentum_teacher='[0, 1]',
    center_momentum='[0, 1]',
    # schedules, in epochs (negative values are not "off")
    lr_steps=EPOCHS, epoch_queue_starts=EPOCHS, freeze_prototypes_epochs=EPOCHS,
    warmup_teacher_temp_epochs=EPOCHS, freeze_last_layer=EPOCHS, start_warmup='[0, 1e6]',
    weight_decay_end='[0, 1e6]', clip_grad='[0, 1e6]',
    # augmentations: torchvision's ColorJitter takes hue in [0, 0.5] (SimCLR's strength s gives hue 0.2 s)
    color_strength='[0, 2.5]', jitter=('[0, 10]', '[0, 10]', '[0, 10]', '[0, 0.5]'), blur_prob='[0, 1]',
    blur_probs='[0, 1]', solarize_probs='[0, 1]', solarize_prob='[0, 1]', min_scale='(0, 1]',
    min_scale_crops='(0, 1]', max_scale_crops='(0, 1]', global_scale='(0, 1]', local_scale='(0, 1]',
    nmb_crops='[0, 64]', size_crops=PIXELS, num_local_crops='[0, 64]', local_crop_size=PIXELS,
    # evaluation
    k='[1, 1e12]', n_last_blocks='[1, 64]', weight_decays='[0, 1e6]', val_fraction='(0, 1)',
    max_iter='[1, 1e7]', neighbours_k='[1, 1000]', queries='[1, 1000]',
)


# The flags that name a file or a folder, by dest. '' names neither: `if args.json:` would read it as "not
# given", and os.path.join('', 'checkpoint.pth') writes into the current folder. check_declared_ranges refuses
# it, in every entry point's parser.
PATHS = ('output_dir', 'show_views', 'pretrained', 'json', 'plot', 'neighbours', 'feature_map',
         'attention_image', 'attention_out', 'data_dir')


def check_path_given(path, flag):
    """One-line error for an empty path ('' on the command line)."""
    if path == '':
        raise UsageError(f"{flag} '' names no {'folder' if flag.endswith('-dir') else 'file'}; give a path"
                         + (', or leave the flag out' if flag.startswith('--') else ''))


def in_range(value, interval):
    """Is `value` inside `interval` ('[0, 1)', ...)? nan never is."""
    low, high = (float(bound) for bound in interval[1:-1].split(','))
    above = value >= low if interval[0] == '[' else value > low
    below = value <= high if interval[-1] == ']' else value < high
    return bool(above and below)


def check_declared_ranges(parser, args):
    """One-line error for the first flag of `parser` whose value is outside its declared range (RANGES), or
    that names a file or folder (PATHS) by an empty path."""
    for action in parser._actions:
        if action.dest in PATHS and action.option_strings:
            check_path_given(getattr(args, action.dest, None), action.option_strings[0])
        interval, value = RANGES.get(action.dest), getattr(args, action.dest, None)
        if interval is None or value is None or not action.option_strings:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        intervals = interval if isinstance(interval, tuple) else [interval] * len(values)
        bad = [(n, v, i) for n, (v, i) in enumerate(zip(values, intervals)) if not in_range(v, i)]
        if bad:
            flag, (n, v, i) = action.option_strings[0], bad[0]
            listed = isinstance(value, (list, tuple))
            which = f'{flag} {" ".join(map(str, values))}: value {n + 1} ({v})' if listed else f'{flag} {v}'
            raise UsageError(f'{which} is outside {i}; see --help for what it sets')
        if action.dest in INCREASING and list(value) != sorted(set(value)):
            increasing = ' '.join(map(str, sorted(set(value))))
            raise UsageError(f'{action.option_strings[0]} {" ".join(map(str, value))}: give increasing '
                             f'epochs, e.g. {increasing} (each is a step of the schedule)')


INCREASING = ('lr_steps',)  # milestone lists: a step schedule counts the milestones already passed


def apply_arch_preset(parser, args, presets, small_image_preset, argv=None):
    """A method's recipe for one family of architectures, e.g. MoCo v3's ResNet-50 recipe next to
    its ViT default. `presets` maps an --arch prefix ('resnet', 'vit', 'vit_small') to flag values;
    every matching preset is applied to the flags the user did not type and the small-image preset
    did not set (precedence: typed > small-image preset > architecture preset > parser defaults).
    Noted (printed at start) and validated again."""
    argv = sys.argv[1:] if argv is None else argv
    keep = explicit_flags(parser, argv)
    if args.dataset_info['image_size'] <= 64 and small_image_preset:
        keep |= set(small_image_preset)
    for prefix, preset in presets.items():
        if not args.arch.startswith(prefix):
            continue
        applied = {k: v for k, v in preset.items() if k not in keep}
        for key, value in applied.items():
            setattr(args, key, value)
        if applied:
            args.notes.append(f'{prefix} preset (' + ', '.join(f'{k}={v}' for k, v in applied.items()) + ')')
    validate_args(args)
    return args


def check_crops(args, sizes, scales):
    """Crops a method trains on: a ViT's patch size must divide every crop size (global AND local),
    and every RandomResizedCrop scale range (low, high) must satisfy 0 < low <= high <= 1."""
    for size in sizes:
        if size <= 0:
            raise UsageError(f'crop size {size} must be positive')
        if args.arch.startswith('vit') and size % args.patch_size:
            raise UsageError(f'--patch-size {args.patch_size} does not divide the {size}-px crops; '
                             'pick a patch size that divides every crop size')
    for low, high in scales:
        if not 0 < low <= high <= 1:
            raise UsageError(f'crop scale range ({low}, {high}) is outside (0, 1]; '
                             'give two numbers 0 < low <= high <= 1')


def print0(*a, **k):
    """print on the main process only."""
    if get_rank() == 0:
        print(*a, **k, flush=True)


# =============================================================================
# B2. Plumbing: processes, devices, output directory, DDP wrapping
# =============================================================================

def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

RUNNING = {}  # the global batch and the number of processes: what an out-of-memory error names


def setup(args):
    """Join the torchrun process group if there is one (multi-node too); else one process.

    Returns (device, rank, world_size, is_main). Also sets the seed so that model
    initialisation is identical on every rank, and creates the output directory (checked to be
    writable). Input errors that every rank would see are raised before the group is joined,
    so they are printed once (by rank 0, see run())."""
    distributed = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ  # DDP: launched by torchrun
    rank, world_size = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if distributed else (0, 1)
    batch_size = getattr(args, 'batch_size', None)  # training: the global batch
    RUNNING.update(batch_size=batch_size, world_size=world_size)
    if batch_size is not None and batch_size % world_size:
        raise UsageError(f'--batch-size {batch_size} is not divisible by the {world_size} processes; '
                         f'use a multiple of {world_size}')
    if rank == 0 and args.output_dir and not getattr(args, 'show_views', None):  # --show-views: no run folder
        prepare_output_dir(args.output_dir)
    if distributed:
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        # a stuck rank fails the others after this long
        timeout = datetime.timedelta(seconds=args.dist_timeout)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device('cuda', local_rank)
            dist.init_process_group('nccl', device_id=device, timeout=timeout)
        else:
            device = torch.device('cpu')
            dist.init_process_group('gloo', timeout=timeout)
    else:  # one process: one GPU, or the CPU
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if args.workers is None:
        per_gpu = (os.cpu_count() or 2) // max(1, int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
        args.workers = max(0, min(16, per_gpu - 1))  # augmentation is the bottleneck for small models
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)  # model init identical on all ranks
    np.random.seed((args.seed + rank) % 2 ** 32)  # numpy takes seeds < 2^32
    if rank == 0:
        print(f'{args.method}: {world_size} process(es) on {device.type}'
              + (f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''), flush=True)
        for note in args.notes:
            print('  ' + note, flush=True)
        print('  args: ' + ' '.join(f'{k}={v}' for k, v in sorted(vars(args).items())
                                   if k not in ('notes', 'dataset_info')), flush=True)
    return device, rank, world_size, rank == 0

_CREATED_OUTPUT_DIRS = []  # made by this process: removed again if a run fails before writing anything there


def prepare_output_dir(path):
    """Create --output-dir and check that files can be written in it, before any work is done."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f'--output-dir {path} is a file, not a folder; choose another --output-dir')
    created, made = not os.path.exists(path), created_folders(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write-test-{os.getpid()}')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f'--output-dir {path}: cannot write there ({e.strerror}); '
                         'choose a writable folder') from None
    if created:
        _CREATED_OUTPUT_DIRS.extend(made)


def created_folders(path):
    """The folders os.makedirs(path) would create (e.g. runs/ too), innermost first."""
    made, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    return made


def seed_epoch(args, epoch, rank):
    """Re-seed the global RNG at every epoch start (seed + rank, offset by the epoch): dropout, drop-path,
    random permutations... become a function of (seed, rank, epoch), so resuming is exact."""
    torch.manual_seed(args.seed + rank + 100_003 * epoch)


def prepare_model(model, args, device):
    """SyncBN (several processes), device, channels-last (CNNs), torch.compile, DDP.

    Returns (model, raw_model): call `model(...)` for the training forward pass (DDP syncs
    its gradients) and use `raw_model` for everything else (EMA, checkpoints, evaluation).
    """
    world_size = get_world_size()
    per_process = (getattr(args, 'batch_size', None) or 2) // world_size
    if per_process < 2 and any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        raise UsageError(f'--batch-size {args.batch_size} leaves {per_process} image per process, and the '
                         'heads of this model use BatchNorm, which needs 2 or more; use --batch-size '
                         f'{2 * world_size} or more')
    if world_size > 1 and args.sync_bn:
        if device.type == 'cuda':
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # DDP: BN statistics over the global batch
        else:
            print0('  note: SyncBatchNorm needs GPUs; on CPU processes each keeps per-process BN statistics')
    model = model.to(device)
    if uses_channels_last(args, device):
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    # the whole method model's forward, backbone and heads: one graph per set of input shapes
    if args.compile:
        # (torch._dynamo.explain: 1 graph, no break, for every method file on one process; DDP splits it at
        # its gradient buckets). The loss, the optimizer step and the EMA / queue / bank updates stay eager:
        # small, and some hold collectives. The --augment device views are made eagerly too: their per-step
        # subsets change size every step, which would recompile.
        model = torch.compile(model)
    if world_size > 1:  # DDP: averages gradients over processes during backward. Buffers (BN statistics,
        # queues, memory banks) are not re-broadcast from rank 0 every step: each rank keeps its own,
        # and the methods keep the ones that must agree identical by updating them from gathered data.
        with warnings.catch_warnings():  # newer torch renames the flag; its replacement still syncs at init
            warnings.filterwarnings('ignore', message='.*broadcast_buffers.*', category=FutureWarning)
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)
    return model, raw_model


# =============================================================================
# B3. Plumbing: datasets, the epoch-seeded sampler, loaders
# =============================================================================

def inspect_dataset(data, data_dir):
    """What we know about --data before loading it: sizes, classes, native image size."""
    if data == 'procedural' or data.startswith('procedural:'):
        n = ProceduralTextures.parse(data)
        return dict(kind='procedural', num_train=n, num_test=max(1000, n // 5), num_classes=10, image_size=32)
    known = {'cifar10': (50000, 10000, 10, 32), 'cifar100': (50000, 10000, 100, 32),
             'stl10': (105000, 8000, 10, 96)}
    if data in known:
        n_train, n_test, classes, size = known[data]
        return dict(kind='torchvision', num_train=n_train, num_test=n_test, num_classes=classes,
                    image_size=size)
    if not os.path.isdir(data):
        raise UsageError(f"--data '{data}' is neither a dataset name ({', '.join(DATASETS)}) "
                         'nor an existing folder')
    train = os.path.join(data, 'train')
    if not os.path.isdir(train):
        raise UsageError(f"--data '{data}' has no train/ folder; "
                         'expected train/<class>/*.jpg and val/ (or test/) alike')
    test = next((os.path.join(data, s) for s in ('val', 'test')
                 if os.path.isdir(os.path.join(data, s))), None)
    classes = class_folders(train)
    num_train, sample, empty = count_images(train, classes, sample=64)
    if not num_train:
        raise UsageError(f"--data '{data}': no images in {train}/<class>/ "
                         f"(expected {', '.join(IMAGE_EXTENSIONS)})")
    if empty:  # a class without training images can never be predicted, yet its test images are scored
        raise UsageError(f"--data '{data}': the class folder {os.path.join(train, empty[0])} holds no images "
                         f"(expected {', '.join(IMAGE_EXTENSIONS)}); add its images or remove the folder")
    sizes = sorted(max(image_size(path)) for path in sample)  # not the first file alone: it may be an odd one
    size = sizes[(len(sizes) - 1) // 2]
    if size < 8:
        raise UsageError(f"--data '{data}': its images are {size} px (the median of {len(sizes)} sampled); "
                         'a backbone needs at least 8 px')
    test_classes = class_folders(test) if test else []
    unknown = [c for c in test_classes if c not in classes]
    if unknown:  # each split would number its own classes: the test labels would be shifted
        raise UsageError(f"--data '{data}': {os.path.basename(test)}/ has classes that train/ lacks "
                         f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); every test class "
                         'needs training images of the same name')
    num_test = count_images(test, test_classes)[0] if test else 0
    if test and not num_test:  # the kNN and the linear probe would score nothing (after a whole epoch)
        raise UsageError(f"--data '{data}': the test split {os.path.basename(test)}/ has no images in its "
                         'class folders; put the test images there, or remove the folder (training then '
                         'runs without the kNN monitor)')
    return dict(kind='folder', num_train=num_train, num_test=num_test,
                num_classes=len(classes), image_size=size, image_sizes=(sizes[0], sizes[-1], len(sizes)),
                train=train, test=test, classes=classes)


def class_folders(root):
    """The class folders of a split: its subfolders, but not hidden ones (.ipynb_checkpoints, .git)."""
    return sorted(d for d in os.listdir(root)
                  if os.path.isdir(os.path.join(root, d)) and not d.startswith('.'))


def count_images(root, classes, sample=0):
    """(number, a sample of paths, the classes without any) of the image files (by extension) under
    root/<class>/, as ImageFolder finds them: no .DS_Store or notes.txt. The sample: about `sample` files
    spread over the classes and over each class's files. A link to a folder inside a class folder is refused:
    followed, `loop -> .` would count the class's images again and again, `up -> ..` would give every class's
    images this class's label."""
    count, paths, empty = 0, [], []
    per_class = -(-sample // max(1, len(classes)))
    for c in classes:
        files = []
        for folder, subfolders, names in os.walk(os.path.join(root, c)):  # links to folders are not walked
            links = [d for d in subfolders if os.path.islink(os.path.join(folder, d))]
            if links:
                raise UsageError(f'{os.path.join(folder, links[0])} is a link to a folder inside a class '
                                 'folder; '
                                 'such links are not followed (a loop, or another class\'s images under this '
                                 'label): remove it, or put the images themselves there')
            files += [os.path.join(folder, f) for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
        count += len(files)
        if not files:
            empty.append(c)
        files.sort()
        chosen = min(per_class, len(files))
        paths += [files[i * len(files) // chosen] for i in range(chosen)]
    return count, paths, empty


def image_size(path):
    """(width, height) of an image file, read from its header (one line when it cannot be read)."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as e:
        raise UsageError(f'cannot read image {path} ({type(e).__name__}: {e}); remove or replace the '
                         'file') from None


class ClassFolder(torchvision.datasets.ImageFolder):
    """ImageFolder whose labels are those of the training split's classes (by name), so that a test
    folder with fewer classes than train/ keeps its labels right instead of numbering its own."""

    def __init__(self, root, classes, loader):
        self.train_classes = classes
        super().__init__(root, loader=loader, allow_empty=True)

    def find_classes(self, directory):
        present = class_folders(directory)
        return present, {c: self.train_classes.index(c) for c in present}

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def load_image(path):
    """An image file as 8-bit RGB. 16-bit greys (a PNG's mode I;16, or I) are scaled to 8 bits: convert('RGB')
    would clip every value above 255 to white."""
    try:
        with open(path, 'rb') as f:
            image = Image.open(f)
            if image.mode.startswith('I') and (image.mode != 'I' or image.getextrema()[1] > 255):
                image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8))
            return image.convert('RGB')
    except Exception as e:
        raise UsageError(f'cannot read image {path} ({type(e).__name__}: {e}); '
                         'remove or replace the file') from None


class ProceduralTextures(torch.utils.data.Dataset):
    """An offline dataset for smoke runs and tests: 10 classes of two-tone textures
    (horizontal, vertical and diagonal stripes, checkerboard, dots, cross-hatch, grid lines,
    rings, sectors, blobs) at a random phase, period and rotation jitter: a dark and a light
    grey (which is which at random), a faint colour cast and pixel noise. Brightness says
    nothing about the class and every crop of an image shows the same texture, so crop +
    colour augmentations teach what the labels need, and the grey levels vary little between
    images, so they are no shortcut to telling images apart (with tones drawn anywhere in
    0-255, only SimCLR learned the textures in a few hundred steps). Image i is a pure
    function of (split, i)."""

    classes = ['horizontal stripes', 'vertical stripes', 'diagonal stripes', 'checkerboard', 'dots',
               'cross-hatch', 'grid lines', 'rings', 'sectors', 'blobs']  # by label

    def __init__(self, n, split, size=32):
        self.n, self.split, self.size = n, split, size
        self.targets = [i % 10 for i in range(n)]

    @staticmethod
    def parse(data):
        try:
            n = int(data.split(':', 1)[1]) if ':' in data else 5000
        except ValueError:
            n = 0
        if n < 10:
            raise UsageError(f"--data '{data}': write procedural or procedural:N "
                             'with N >= 10 training images')
        return n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng([0 if self.split == 'train' else 1, i])
        s, label = self.size, self.targets[i]
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        a = rng.uniform(-0.15, 0.15)  # small rotation jitter, radians
        u, v = xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)
        period, phase = rng.uniform(0.15, 0.3), rng.uniform(0, 1)
        cy, cx = rng.uniform(0.2, 0.8, 2)
        wave = lambda t: np.sin(2 * np.pi * (t / period + phase))  # noqa: E731
        mask = [
            lambda: wave(v) > 0,                                              # horizontal stripes
            lambda: wave(u) > 0,                                              # vertical stripes
            lambda: wave((u + rng.choice([-1, 1]) * v) / 1.4) > 0,            # diagonal stripes
            lambda: wave(u) * wave(v) > 0,                                    # checkerboard
            lambda: (wave(u) > 0.5) & (wave(v) > 0.5),                        # dots
            lambda: (abs(wave((u + v) / 1.4)) > 0.8) | (abs(wave((u - v) / 1.4)) > 0.8),  # cross-hatch
            lambda: (wave(u) > 0.8) | (wave(v) > 0.8),                        # grid lines
            lambda: wave(np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)) > 0,       # rings
            lambda: np.sin(6 * np.arctan2(yy - cy, xx - cx) + 6 * phase) > 0,  # sectors
            lambda: self._blobs(rng, s) > 0,                                  # blobs
        ][label]()
        tint = rng.uniform(-20, 20, 3)  # a faint colour cast
        dark = rng.uniform(40, 80)
        background, foreground = (dark, 255 - dark) if rng.random() < 0.5 else (255 - dark, dark)
        background, foreground = background + tint, foreground + tint
        img = np.where(mask[..., None], foreground, background) + rng.normal(0, 8, (s, s, 3))
        return Image.fromarray(img.clip(0, 255).astype(np.uint8)), label

    @staticmethod
    def _blobs(rng, s):
        coarse = rng.normal(size=(4, 4)).astype(np.float32)
        return np.asarray(Image.fromarray(coarse, mode='F').resize((s, s), Image.BICUBIC))


def base_dataset(args, split):
    """The raw dataset (PIL image, label) for split 'train' or 'test'; None if there is no such split."""
    info, data = args.dataset_info, args.data
    if info['kind'] == 'procedural':
        return ProceduralTextures(info['num_train'] if split == 'train' else info['num_test'], split)
    if info['kind'] == 'folder':
        root = info['train'] if split == 'train' else info['test']
        if root is None:
            return None
        try:
            return ClassFolder(root, info['classes'], load_image)
        except (FileNotFoundError, RuntimeError) as e:
            raise UsageError(f"--data '{data}': {e}") from None
    cls = {'cifar10': torchvision.datasets.CIFAR10, 'cifar100': torchvision.datasets.CIFAR100,
           'stl10': torchvision.datasets.STL10}[data]
    kwargs = (dict(split={'train': 'train+unlabeled', 'labelled': 'train', 'test': 'test'}[split])
              if data == 'stl10' else dict(train=split != 'test'))
    root = os.path.join(args.data_dir, data)
    try:
        return cls(root, download=False, **kwargs)
    except RuntimeError:
        pass
    _CREATED_OUTPUT_DIRS.extend(created_folders(root))  # a failed download leaves no empty cache folder
    try:
        if get_rank() == 0:
            cls(root, download=True, **kwargs)
        if get_world_size() > 1:
            dist.barrier()
        return cls(root, download=False, **kwargs)
    except Exception as e:
        raise UsageError(f"could not find or download {data} ({type(e).__name__}); without network, put "
                         f"torchvision's {data} files in {root} (or pass --data-dir), or give --data an "
                         'image folder') from None


class ViewDataset(torch.utils.data.Dataset):
    """Wraps a raw dataset: item (epoch, i) -> (views, label, i). The random augmentation is
    seeded from (seed, epoch, i), so it does not depend on workers, processes or resuming."""

    def __init__(self, base, transform, seed):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        epoch, i = item
        img, label = self.base[i]
        rng = torch.default_generator  # the CPU generator torchvision's random transforms draw from
        state = rng.get_state()  # (torch.random.fork_rng does the same, ~40x slower)
        rng.manual_seed((self.seed * 1_000_003 + epoch * 998_244_353 + i) % 2 ** 63)
        views = self.transform(img)
        rng.set_state(state)
        return views, label, i


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler that yields (epoch, index): a permutation seeded by (seed, epoch),
    split over ranks. drop_last trims the permutation to a multiple of world size * batch."""

    def __init__(self, n, batch_size, rank, world_size, seed, shuffle=True, drop_last=True):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.epoch = seed, shuffle, drop_last, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def order(self):
        """This rank's indices of the current epoch, in the order its batches take them: (n_rank,) int64,
        CPU."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.drop_last:
            order = order[:self.n // (self.world * self.batch_size) * self.world * self.batch_size]
        return order[self.rank::self.world]

    def steps(self):
        """Batches per epoch on this rank (the last one short unless drop_last)."""
        return len(self) // self.batch_size if self.drop_last else -(-len(self) // self.batch_size)

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.order().tolist()])

    def __len__(self):
        global_batch = self.world * self.batch_size
        used = self.n // global_batch * global_batch if self.drop_last else self.n
        return len(range(self.rank, used, self.world))


class Loader:
    """Batches of views already on the device: `for views, labels, indices in loader.epoch(e)`.
    Workers decode and augment on the CPU and return uint8; the device converts to float,
    normalises and (for CNNs) makes the tensors channels-last."""

    def __init__(self, dataset, batch_size, sampler, workers, device, channels_last=False):
        self.sampler, self.device, self.channels_last = sampler, device, channels_last
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=sampler.drop_last,
            pin_memory=device.type == 'cuda', persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None, worker_init_fn=quiet_worker if workers > 0 else None)
        self.epoch_started = active_time()
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def __len__(self):
        return len(self.loader)

    @property
    def dataset_size(self):
        return len(self.loader.dataset)

    def _to_device(self, images):
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def epoch(self, epoch):
        self.sampler.set_epoch(epoch)
        self.epoch_started = active_time()  # MetricLogger times the epoch from here
        self.epoch_cpu_started = process_cpu_seconds()
        for views, labels, indices in self.loader:
            check_stop()
            yield ([self._to_device(v) for v in views], labels.to(self.device, non_blocking=True),
                   indices.to(self.device, non_blocking=True))


def quiet_worker(worker_id):
    """DataLoader workers leave Ctrl-C to the main process, which stops them cleanly; SIGTERM (the main
    process's shutdown, or a signal to the whole process group) ends a worker quietly, and so does the
    main process going away while a worker's thread still hands it a batch (no thread traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.excepthook = lambda hook_args: None
    sys.excepthook = lambda *exc_info: None  # multiprocessing's fd-sharing thread reports through this one


# A dataset that fits the memory budget is decoded once (by PIL, as the cpu path decodes it) into one
# uint8 (N, 3, H, W) tensor on the device; each step gathers a batch of it and Views.batch makes the views.
# A folder that does not fit (ImageNet) is read file by file in a few DataLoader workers and its JPEGs are
# decoded on the device in batches (torchvision.io.decode_jpeg). Either way each rank takes its shard of
# the epoch's permutation from EpochSampler, as the cpu path does: both visit the same images per rank
# and step, and nothing is read back to the host per step (in memory).

def configure_augment(args):
    """Resolve --augment auto (device on a GPU, cpu otherwise) and check --device-data-gb; the start-up
    note."""
    if args.device_data_gb is not None and not (math.isfinite(args.device_data_gb)
                                                 and args.device_data_gb >= 0):
        raise UsageError(f'--device-data-gb must be a number of GB >= 0, not {args.device_data_gb}')
    args.augment_requested = args.augment
    if args.augment == 'auto':
        args.augment = 'device' if torch.cuda.is_available() else 'cpu'
    if args.augment == 'cpu':
        return 'augment cpu: PIL transforms, one image at a time, in DataLoader workers'
    return 'augment device: images held (or decoded) on the training device, views made there in batches'


def build_train_loader(args, transform, device, split='train'):
    """The training loader: `transform` (a Views) makes the list of views from one image. --augment cpu:
    PIL in DataLoader workers (Loader); --augment device: DeviceLoader, or the cpu path with a note when
    the data does not fit the device's budget (a typed --augment device stops with a one-line error).
    `split`: 'train', or labelled_split(args) for the labelled images only (a linear probe on STL-10)."""
    rank, world_size = get_rank(), get_world_size()
    base = base_dataset(args, split)
    per_rank = args.batch_size // world_size
    if len(base) < args.batch_size:
        raise UsageError(f'--batch-size {args.batch_size} is larger than the {len(base)} training images')
    sampler = EpochSampler(len(base), per_rank, rank, world_size, args.seed)
    channels_last = uses_channels_last(args, device)
    if getattr(args, 'augment', 'cpu') == 'device':
        source = device_source(args, split, base, sampler, device)
        if source is not None:
            loader = DeviceLoader(source, transform, sampler, device, args.seed, channels_last)
            return show_views(args, base, loader)
        need = len(base) * 3 * args.dataset_info['image_size'] ** 2 / 1e9
        budget, budget_note = device_budget(args, device)
        message = (f'the {len(base)} decoded training images of {args.data} need {need:.2f} GB '
                   f'on {device.type}, more than the {budget / 1e9:.2f} GB budget ({budget_note})')
        if args.augment_requested == 'device':
            raise UsageError(f'--augment device: {message}; raise --device-data-gb or use --augment cpu')
        print0(f'  note: {message}: --augment cpu instead')
    dataset = ViewDataset(base, transform, args.seed)
    loader = Loader(dataset, per_rank, sampler, args.workers, device, channels_last=channels_last)
    return show_views(args, base, loader)


def show_views(args, base, loader):
    """--show-views PNG: draw what the network sees, then exit (code 0) without training; without the flag,
    return `loader` as it is. The picture holds the first images (8 at most) of this rank's first batch of
    epoch 0, exactly as the training loop receives it (the same loader, path and seed): one row per image,
    the image as stored, then each view un-normalised (x * std + mean) and drawn pixel for pixel, enlarged
    by a whole factor, at its own size (a multi-crop's local crops are smaller than its global ones).
    Nothing is trained and no output folder or checkpoint is written."""
    if not getattr(args, 'show_views', None):
        return loader
    seed_epoch(args, 0, get_rank())  # as the training loop does before its first epoch
    views, labels, indices = next(iter(loader.epoch(0)))
    shown = indices[:8].tolist()
    views = [denormalise(view[:len(shown)]) for view in views]  # uint8 (n, 3, S, S) each, on the host
    originals = [torch.from_numpy(np.asarray(base[i][0].convert('RGB')).copy()).permute(2, 0, 1)
                 for i in shown]  # uint8 (3, h, w): the images as stored
    if get_rank() == 0:
        mosaic, _ = views_mosaic(originals, views)
        sizes = [view.shape[-1] for view in views]
        names = ['image'] + [(f'view {v + 1}' if min(sizes) == max(sizes) else
                              f"{'global' if size == max(sizes) else 'local'} {v + 1}") + f' ({size} px)'
                             for v, size in enumerate(sizes)]
        title = f'{args.method}: first batch, --augment {args.augment}, seed {args.seed}'
        header = text_header(title, names, mosaic.shape[1] // len(names), mosaic.shape[1])
        save_png(np.concatenate([header, mosaic]), args.show_views)
        print0(f'  views of {len(shown)} training images ({len(views)} views each) -> {args.show_views}; '
               'nothing trained')
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # DDP: every rank made its first batch; leave the group together
        dist.destroy_process_group()
    raise SystemExit(0)


def denormalise(x):
    """Normalised float views (B, 3, H, W) -> uint8 (B, 3, H, W) on the host: x * std + mean, as stored."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.detach().float().cpu() * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


def views_mosaic(originals, views, pad=4):
    """The grid of show_views as an (H, W, 3) uint8 array, and where each view lies in it: {(row, view):
    (top, left, side)}. originals: uint8 (3, h, w) images, views: uint8 (n, 3, S, S) per view. Every cell
    is as large as the largest crop times `scale` (a whole number: 96 px or more for small crops) plus a
    white border; a view is enlarged by `scale` (each pixel repeated) and centred in its cell; the image
    is fitted into its cell (nearest when enlarged)."""
    largest = max(view.shape[-1] for view in views)
    scale = max(1, 96 // largest)
    inner = largest * scale
    cell = inner + 2 * pad
    mosaic = np.full((len(originals) * cell, (1 + len(views)) * cell, 3), 255, dtype=np.uint8)
    boxes = {}
    for row, image in enumerate(originals):
        h, w = image.shape[1:]
        factor = inner / max(h, w)
        picture = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(
            (max(1, round(w * factor)), max(1, round(h * factor))),
            Image.NEAREST if factor >= 1 else Image.BICUBIC)
        top, left = row * cell + pad + (inner - picture.height) // 2, pad + (inner - picture.width) // 2
        mosaic[top:top + picture.height, left:left + picture.width] = np.asarray(picture)
        for v, view in enumerate(views):
            side = view.shape[-1] * scale
            top = row * cell + pad + (inner - side) // 2
            left = (1 + v) * cell + pad + (inner - side) // 2
            enlarged = view[row].repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # (3, side, side)
            mosaic[top:top + side, left:left + side] = enlarged.permute(1, 2, 0).numpy()
            boxes[row, v] = (top, left, side)
    return mosaic, boxes


def text_header(title, names, column_width, width, height=44):
    """A white (height, width, 3) uint8 strip drawn by matplotlib: `title` on its first line, then each
    of `names` centred over its column of `column_width` pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    fig.text(4 / width, 1 - 4 / height, title, fontsize=7, va='top', ha='left')
    for k, name in enumerate(names):
        fig.text((k + 0.5) * column_width / width, 4 / height, name, fontsize=7, va='bottom', ha='center')
    canvas.draw()
    strip = np.asarray(canvas.buffer_rgba())[..., :3]
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    out[:min(height, strip.shape[0]), :min(width, strip.shape[1])] = strip[:height, :width]
    return out


def save_png(array, path):
    """Write an (H, W, 3) uint8 array as a PNG, atomically (a temporary file renamed over `path`)."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        Image.fromarray(array).save(tmp, format='PNG')
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UsageError(f'cannot write {path} ({e.strerror or e}); choose a writable place') from None


def build_eval_loaders(args, device, batch_size=256):
    """(train, test) loaders with the evaluation transform, each rank a shard, or None when
    there is no labelled test split (kNN then skipped)."""
    if getattr(args, 'knn_every', 0) < 0:
        return None
    test = base_dataset(args, 'test')
    if test is None:
        print0(f'  note: {args.data} has no val/ or test/ split; no kNN evaluation')
        return None
    split_train = labelled_split(args)
    rank, world_size = get_rank(), get_world_size()
    transform = Views([eval_transform(args.image_size, args.dataset_info['image_size'])])
    labelled = base_dataset(args, split_train)
    k = getattr(args, 'knn_k', None)
    if k is not None and k > len(labelled):
        raise UsageError(f'--knn-k {k} is more neighbours than the {len(labelled)} labelled training images; '
                         f'use --knn-k {len(labelled)} or fewer')
    samplers = [EpochSampler(len(base), batch_size, rank, world_size, args.seed, shuffle=False,
                             drop_last=False) for base in (labelled, test)]
    if getattr(args, 'augment', 'cpu') == 'device':  # the same eval transform, batched (within ~1 grey level)
        sources = [device_source(args, split, base, sampler, device)
                   for split, base, sampler in zip((split_train, 'test'), (labelled, test), samplers)]
        if all(source is not None for source in sources):
            return tuple(DeviceLoader(source, transform, sampler, device, args.seed,
                                      uses_channels_last(args, device))
                         for source, sampler in zip(sources, samplers))
        print0('  note: the kNN splits do not fit the device budget; they are read by the PIL path')
    return tuple(Loader(ViewDataset(base, transform, args.seed), batch_size, sampler, min(args.workers, 4),
                        device, channels_last=uses_channels_last(args, device))
                 for base, sampler in zip((labelled, test), samplers))


def labelled_split(args):
    """The split that holds the labelled training images: STL-10's 'labelled' 5k (its 'train' adds the
    100k unlabelled ones), 'train' for every other dataset."""
    return 'labelled' if args.data == 'stl10' else 'train'


def add_channels_last_flag(group):
    """--channels-last, for the training and the evaluation parsers."""
    group.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                       help='ResNets in channels-last memory (default: on GPUs only; on a CPU it pays where '
                       'oneDNN has channels-last kernels: the CPU benchmark turns it on)')


def uses_channels_last(args, device):
    """--channels-last: ResNets only; by default on GPUs (their convolutions are fastest in it)."""
    chosen = getattr(args, 'channels_last', None)
    return args.arch.startswith('resnet') and (device.type == 'cuda' if chosen is None else chosen)


# =============================================================================
# B4. Plumbing: precision, checkpoints, metrics, plots
# =============================================================================

def autocast(device, args):
    """bf16 autocast on GPUs that support it (no loss scaling needed); float32 elsewhere."""
    if device.type == 'cuda' and args.precision != 'fp32' and torch.cuda.is_bf16_supported():
        return torch.autocast('cuda', dtype=torch.bfloat16)
    if args.precision == 'bf16' and device.type != 'cuda':
        return torch.autocast('cpu', dtype=torch.bfloat16)
    return nullcontext()


def check_writable_file(path, flag):
    """One-line error, before any work, when `path` cannot be written: a folder, or a place that
    refuses new files (a missing or read-only folder). Probes with a file that it removes."""
    check_path_given(path, flag)
    if os.path.isdir(path):
        raise UsageError(f'{flag} {path} is a folder; give a file name')
    folder = os.path.dirname(os.path.abspath(path))
    probe = os.path.join(folder, f'.write-test-{os.getpid()}')
    try:
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f'{flag} {path}: cannot write in {folder} ({e.strerror}); '
                         'choose a writable place') from None


def write_json(path, record):
    """Write `record` as JSON to `path` atomically: a temporary file is renamed over the old one;
    on failure nothing is left behind and the error is one line."""
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'w') as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise TrainingError(f'could not write {path} ({e.strerror})') from None


def checkpoint_path(args):
    return os.path.join(args.output_dir, 'checkpoint.pth')

LAST_CHECKPOINT = {}  # 'note': where the last good checkpoint is, for the messages of a run that stops


def last_checkpoint_note(args):
    return LAST_CHECKPOINT.get('note', f'No checkpoint was written to {args.output_dir}.')


class _RecordedWrites:
    """A file whose first failed write is kept: torch.save turns the OSError of a full disk into a
    RuntimeError ('unexpected pos ...') that names no cause."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        return self.file.flush()


def save_atomically(obj, path):
    """torch.save to path.tmp, flushed to disk, then renamed over path: a reader sees the old file or the
    new one, never half of one. On a failed write (e.g. a full disk) the partial .tmp is removed and an
    OSError raised (the one the write met, also when torch.save reported it as a RuntimeError)."""
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'wb') as f:
            recorded = _RecordedWrites(f)
            try:
                torch.save(obj, recorded)
            except RuntimeError as e:
                failed = OSError(errno.EIO, f'torch.save failed: {str(e).strip()[:160]}')
                raise recorded.error or failed from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(args, epoch, backbone, **objects):
    """Atomically write <output-dir>/checkpoint.pth: method, args, epochs done, `backbone` (the
    weights the paper evaluates, loadable by eval_knn.py) and the state of every named object
    (model, optimizer, ...). A temporary file, flushed to disk, is renamed over the old one, so a
    crash, a full disk or a signal never leaves half a checkpoint (the temporary file is removed).
    Weights or optimizer state that are not finite are never saved: the run stops instead, and the
    previous checkpoint stays the last good one."""
    if get_rank() != 0:
        return
    state = dict(method=args.method, args={k: v for k, v in vars(args).items() if k != 'notes'}, epoch=epoch,
                 backbone=backbone.state_dict(), **{name: obj.state_dict() for name, obj in objects.items()})
    bad = next((name for name, tensor in named_tensors(state) if tensor.is_floating_point()
                and not bool(torch.isfinite(tensor).all())), None)
    if bad is not None:
        raise TrainingError(f'after epoch {epoch} the tensor {bad} holds NaN or inf; nothing was saved. '
                            f'{last_checkpoint_note(args)} (try a lower --lr or --precision fp32)')
    path = checkpoint_path(args)
    try:
        save_atomically(state, path)
    except OSError as e:
        raise TrainingError(f'could not write the checkpoint of epoch {epoch} to {path} ({e.strerror}). '
                            f'{last_checkpoint_note(args)}') from None
    LAST_CHECKPOINT['note'] = (f'The last good checkpoint is {path} ({epoch} epoch(s) done); '
                               'the same command resumes from it.')


def named_tensors(tree, prefix=''):
    """(dotted name, tensor) of every tensor inside nested dicts / lists (a checkpoint's state)."""
    if torch.is_tensor(tree):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from named_tensors(value, f'{prefix}.{key}' if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from named_tensors(value, f'{prefix}.{i}')


def read_checkpoint(path):
    """torch.load with a one-line error for missing, corrupt or truncated files."""
    if os.path.isdir(path):
        raise UsageError(f'{path} is a folder, not a checkpoint; give the checkpoint file (e.g. '
                         f'{os.path.join(path, "checkpoint.pth")})')
    if not os.path.isfile(path):
        raise UsageError(f'no checkpoint at {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UsageError(f'checkpoint {path} is corrupt or truncated ({type(e).__name__}); '
                         'delete it to start over, or point --output-dir elsewhere') from None


def checkpoint_args(args):
    """The args saved in <output-dir>/checkpoint.pth (a dict), or None when there is no checkpoint
    yet. Lets a method refuse, before anything is loaded, a resume with settings it cannot change
    mid-run (e.g. a queue's length)."""
    path = checkpoint_path(args)
    if not os.path.exists(path):
        return None
    state = read_checkpoint(path)
    return state.get('args', {}) if isinstance(state, dict) else {}


def resume(args, **objects):
    """Resume from <output-dir>/checkpoint.pth if it exists: load each named object's state
    (model, optimizer, ...) and return the number of epochs already done (0 for a fresh run).
    Refuses a checkpoint written by another method or for another architecture."""
    path = checkpoint_path(args)
    if not os.path.exists(path):
        trim_metrics(args.output_dir, 0)  # a run killed in its first epoch left records but no checkpoint
        return 0
    state = read_checkpoint(path)
    if not isinstance(state, dict) or 'method' not in state or 'args' not in state:
        raise UsageError(f'{path} is not a checkpoint of this project; delete it or use another --output-dir')
    if state['method'] != args.method:
        raise UsageError(f"{path} was written by {state['method']}, not {args.method}; "
                         'use another --output-dir')
    for key in ('arch', 'width', 'patch_size', 'cifar_stem'):
        if key in state['args'] and state['args'][key] != getattr(args, key):
            raise UsageError(f"{path} was trained with --{key.replace('_', '-')} {state['args'][key]}, "
                             f"not {getattr(args, key)}; use the same value or another --output-dir")
    if not same_data(state['args'].get('data'), getattr(args, 'data', None)):
        raise UsageError(f"{path} was trained on --data {state['args'].get('data')}, not {args.data}; use "
                         'the same --data to resume, or another --output-dir')
    changed = changed_settings(state['args'], args)
    if changed:
        print0(f'  resuming with settings that differ from the checkpoint\'s: {", ".join(changed)}')
    done = state.get('epoch')
    if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done:  # True is an int
        raise UsageError(f'{path} is not a checkpoint of this project (its epoch is {done!r}); delete it or '
                         'use another --output-dir')
    if done > args.epochs:
        raise UsageError(f'{path} holds {done} epochs, more than --epochs {args.epochs}; '
                         f'give --epochs {done} or more to go on training, or use another --output-dir')
    for name, obj in objects.items():
        if isinstance(obj, nn.Module) and isinstance(state.get(name), dict):
            check_shapes(path, name, state[name], obj.state_dict())
        try:
            obj.load_state_dict(state[name])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:  # an edited checkpoint
            problem = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise UsageError(f'{path}: its {name} does not load into this run ({problem}); delete it or use '
                             'another --output-dir') from None
        if isinstance(obj, LARS):  # load_state_dict restores the saved hyper-parameters: the flags win
            for group in obj.param_groups:
                group.update(trust_coefficient=args.lars_eta, clip=args.lars_clip,
                             denominator=args.lars_denominator)
    trim_metrics(args.output_dir, done)  # the records of a killed, unfinished epoch go: it is trained again
    LAST_CHECKPOINT['note'] = (f'The last good checkpoint is {path} ({done} epoch(s) done); '
                               'the same command resumes from it.')
    print0(f'  resumed from {path}: {done} epoch(s) done'
           + (f'; --epochs is {args.epochs}: nothing left to train (raise --epochs to train longer)'
              if done == args.epochs else ''))
    return done

# What resume() names when it differs from the checkpoint's (refused if it cannot change: data, arch, ...):
# everything but where and how this process runs.
NOT_SETTINGS = {'output_dir', 'data_dir', 'dataset_info', 'notes', 'workers', 'augment', 'device_data_gb',
                'epochs', 'stop_after_epoch', 'log_every', 'knn_every', 'dist_timeout', 'compile',
                'precision'}


def same_data(saved, data):
    """Is --data the data a checkpoint was trained on? A folder given by another path counts as the same."""
    if saved == data or saved is None or data is None:  # None: not recorded (an older or a test's checkpoint)
        return True
    return bool(saved) and os.path.isdir(saved) and os.path.isdir(data) and os.path.samefile(saved, data)


def changed_settings(saved, args):
    """'--lr 0.1 (checkpoint: 0.05)' for every setting of this run that differs from the checkpoint's."""
    def plain(value):
        return list(value) if isinstance(value, tuple) else value
    return [f"--{key.replace('_', '-')} {value} (checkpoint: {saved[key]})"
            for key, value in sorted(vars(args).items())
            if key in saved and key not in NOT_SETTINGS and plain(saved[key]) != plain(value)]


def check_shapes(path, name, saved, current):
    """One-line error when a checkpoint's tensor has another shape than the model's (e.g. a memory
    bank with one row per training image, resumed on another dataset), instead of a traceback."""
    for key, tensor in current.items():
        if key in saved and saved[key].shape != tensor.shape:
            raise UsageError(f'{path}: {name}.{key} has shape {tuple(saved[key].shape)} in the checkpoint '
                             f'but {tuple(tensor.shape)} in this run (other data or settings?); use the '
                             'same --data and settings, or another --output-dir')


def process_cpu_seconds():
    """CPU time (user + sys) of this process, its finished children and its live DataLoader workers
    (Linux /proc); beside the wall-clock it shows how much of the machine the run had."""
    import resource
    total = sum(getattr(resource.getrusage(who), field)
                for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                for field in ('ru_utime', 'ru_stime'))
    for stat in glob_proc_stats():
        # after the command name: state, ppid, ... utime (12), stime (13)
        fields = stat.rsplit(')', 1)[-1].split()
        if int(fields[1]) == os.getpid():
            total += (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    return total


def glob_proc_stats():
    """The /proc/<pid>/stat lines of every process (none where there is no /proc)."""
    for name in os.listdir('/proc') if os.path.isdir('/proc') else []:
        if name.isdigit():
            try:
                with open(f'/proc/{name}/stat') as f:
                    yield f.read()
            except OSError:
                continue


class MetricLogger:
    """Progress lines on the main rank and a JSON-lines file `metrics.jsonl` in the output
    directory. Values are read from the device (a host sync) only on logging steps; the
    running loss sum lets every step's loss be checked for NaN/inf at those points.

    Every record has `epoch`, the 1-based epoch it belongs to (so a resume can drop the records
    of epochs its checkpoint does not hold):
      step:  step, loss, images_per_s, the method's values (lr, tau, ...): the first and the tenth step this
             process runs (they estimate the run's duration early), then every --log-every steps
      epoch: epoch_loss, epoch_seconds (the epoch's loading and training; no kNN, no checkpoint),
             train_seconds (their sum over the run, resumes included), epoch_images_per_s,
             epoch_cpu_seconds (the epoch's CPU time, user + sys, workers included: process_cpu_seconds)
      kNN:   knn_top1, knn_top5 (and knn_top1_k20), knn_seconds -- written by the method file
    """

    def __init__(self, args, loader):
        self.args, self.loader, self.steps_per_epoch = args, loader, len(loader)
        self.total_steps = args.epochs * self.steps_per_epoch
        self.path = os.path.join(args.output_dir, 'metrics.jsonl')
        self.is_main = get_rank() == 0
        self.loss_sum, self.count, self.seen, self.tic_step = None, 0, 0, None
        # kept by resume()
        self.train_seconds = sum(r.get('epoch_seconds', 0.0) for r in read_metrics(self.path))

    def log(self, **values):
        """Append one record (e.g. kNN accuracy) to metrics.jsonl."""
        if self.is_main:
            with open(self.path, 'a') as f:
                f.write(json.dumps(values) + '\n')

    def step(self, epoch, step, loss, **values):
        """Call once per training step. `values` may hold tensors; they are read only when logging."""
        loss = loss.detach().float()
        self.loss_sum = loss.clone() if self.loss_sum is None else self.loss_sum + loss
        self.count, self.seen = self.count + 1, self.seen + 1
        if self.count == 1:  # the epoch's first step: time from the epoch's start
            self.tic, self.tic_step = self.loader.epoch_started, step
        done = step + 1
        if done % self.args.log_every and done != self.total_steps and self.seen not in (1, 10):
            return
        loss_value = loss.item()
        self.check_finite(float(self.loss_sum), epoch, step)
        now = active_time()
        images_per_s = (done - self.tic_step) * self.args.batch_size / max(now - self.tic, 1e-9)
        self.tic, self.tic_step = now, done
        eta = (self.total_steps - done) * self.args.batch_size / max(images_per_s, 1e-9)
        values = {k: (v.item() if torch.is_tensor(v) else float(v)) for k, v in values.items()}
        record = dict(epoch=epoch + 1, step=done, loss=loss_value, images_per_s=images_per_s, **values)
        if self.is_main:
            print(f'epoch {epoch + 1}/{self.args.epochs} step {done}/{self.total_steps} '
                  f'loss {loss_value:.4f} '
                  + ' '.join(f'{k} {v:.4g}' for k, v in values.items())
                  + f' | {images_per_s:.0f} img/s eta {datetime.timedelta(seconds=int(eta))}', flush=True)
        self.log(**record)

    def end_epoch(self, epoch):
        """Mean loss of the epoch (checked to be finite) and the epoch's time, logged; resets the running
        sum."""
        mean = float(self.loss_sum) / max(1, self.count)
        self.check_finite(mean, epoch, None)
        seconds = active_time() - self.loader.epoch_started
        cpu_seconds = process_cpu_seconds() - getattr(self.loader, 'epoch_cpu_started', 0.0)
        self.train_seconds += seconds
        self.log(epoch=epoch + 1, epoch_loss=mean, epoch_seconds=seconds, train_seconds=self.train_seconds,
                 epoch_images_per_s=self.count * self.args.batch_size / max(seconds, 1e-9),
                 epoch_cpu_seconds=cpu_seconds)
        self.loss_sum, self.count = None, 0
        return mean

    def check_finite(self, value, epoch, step):
        if not math.isfinite(value):
            where = f'epoch {epoch + 1}' + (f' (by step {step + 1})' if step is not None else '')
            raise TrainingError(f'the loss became {value} in {where}; stopping. '
                                f'{last_checkpoint_note(self.args)} (try a lower --lr or --precision fp32)')


def read_metrics(path):
    """The records of a metrics.jsonl file, skipping a line that is not whole JSON (a run killed
    while writing it); [] when there is no file."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def trim_metrics(output_dir, epochs_done):
    """Keep only the records of the epochs a checkpoint holds (a run killed mid-epoch, then resumed,
    would log its epoch twice); rewrites the file atomically. Main rank only."""
    path = os.path.join(output_dir, 'metrics.jsonl')
    if get_rank() != 0 or not os.path.exists(path):
        return
    kept = [r for r in read_metrics(path)
            if isinstance(r.get('epoch'), (int, float)) and r['epoch'] <= epochs_done]
    with open(path) as f:
        if len(kept) == sum(1 for line in f if line.strip()):  # nothing to drop, no torn line
            return
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
    os.replace(tmp, path)

# What each per-step scalar a method file logs means, and the levels drawn with it: (title, [(level, label)]).
# `d` and `K` are read from the run's checkpoint (its args); a level that needs one it lacks is left out.
PANEL_GUIDES = {
    'output_std': ('output std of z / ||z|| (collapse: 0)',
                   [(lambda d, K: d ** -0.5, 'healthy 1/sqrt(d)'), (lambda d, K: 0.0, 'collapsed 0')]),
    'teacher_entropy': ('teacher entropy (0: one-hot, ln K: uniform)',
                        [(lambda d, K: math.log(K), 'ln K (uniform)'), (lambda d, K: 0.0, '0 (one-hot)')]),
    'tau': ('EMA rate tau of the target', [(lambda d, K: 1.0, '1 (target frozen)')]),
    'm': ('EMA momentum m of the teacher / key encoder', [(lambda d, K: 1.0, '1 (frozen)')]),
}

STEP_FIELDS = ('epoch', 'step', 'loss', 'images_per_s', 'lr')  # in every step record (lr: its own panel)


def metric_panels(records, run_args=None):
    """The panels of metrics.png beyond loss, lr and kNN: one per scalar the method logs every step
    (BYOL, SimSiam: output_std; DINO: teacher_entropy; the EMA rates tau, m; any other), in the order
    they first appear, each a dict(name, title, steps, values, levels=[(value, label)]). The levels are
    the healthy and collapsed values where they are known: output_std 1/sqrt(d) (d = --proj-dim, the
    width of z) and 0; teacher_entropy ln K (K = --out-dim) and 0; the EMA rates 1. `run_args`: the run's
    args (a dict, from its checkpoint), or None when there is none."""
    run_args = run_args or {}
    d, K = run_args.get('proj_dim'), run_args.get('out_dim')
    names = []
    for record in records:
        if 'step' in record:
            names += [k for k, v in record.items() if k not in STEP_FIELDS and k not in names
                      and isinstance(v, (int, float))]
    panels = []
    for name in names:
        shown = [r for r in records if 'step' in r and isinstance(r.get(name), (int, float))]
        title, guides = PANEL_GUIDES.get(name, (name, []))
        levels = []
        for level, label in guides:
            try:
                levels.append((float(level(d, K)), label))
            except (TypeError, ValueError):  # d or K unknown (no checkpoint)
                pass
        panels.append(dict(name=name, title=title, steps=[r['step'] for r in shown],
                           values=[r[name] for r in shown], levels=levels))
    return panels


def plot_metrics(output_dir, run_args=None):
    """metrics.jsonl -> metrics.png: loss and lr per step, kNN accuracy per epoch, then a panel for every
    other scalar logged per step (metric_panels: the collapse indicators and EMA rates, with their levels).
    `run_args` (a dict): the run's args, read from its checkpoint when not given."""
    if get_rank() != 0:
        return
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    path = os.path.join(output_dir, 'metrics.jsonl')
    if not os.path.exists(path):
        return
    records = read_metrics(path)
    steps = [r for r in records if 'step' in r]
    knn = [r for r in records if 'knn_top1' in r]
    checkpoint = os.path.join(output_dir, 'checkpoint.pth')
    if run_args is None and os.path.exists(checkpoint):  # d and K for the levels (mmap: no weights read)
        try:
            run_args = torch.load(checkpoint, map_location='cpu', weights_only=True, mmap=True).get('args')
        except Exception:
            run_args = None
    panels = metric_panels(records, run_args)
    rows = 1 + -(-len(panels) // 3)
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4 * rows), squeeze=False)
    axes = axes.flatten()
    axes[0].plot([r['step'] for r in steps], [r['loss'] for r in steps])
    axes[0].set(xlabel='step', ylabel='loss', title='training loss')
    if steps and 'lr' in steps[0]:
        axes[1].plot([r['step'] for r in steps], [r['lr'] for r in steps])
    axes[1].set(xlabel='step', ylabel='lr', title='learning rate')
    axes[2].plot([r['epoch'] for r in knn], [r['knn_top1'] for r in knn], marker='o')
    axes[2].set(xlabel='epoch', ylabel='top-1 (%)', title='kNN accuracy')
    for ax, panel in zip(axes[3:], panels):
        ax.plot(panel['steps'], panel['values'], label=panel['name'])
        for (value, label), style in zip(panel['levels'], ('--', ':', '-.')):
            ax.axhline(value, color='grey', linestyle=style, label=label)
        ax.set(xlabel='step', ylabel=panel['name'], title=panel['title'])
        ax.legend(fontsize=8)
    for ax in axes[3 + len(panels):]:
        ax.axis('off')
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, 'metrics.png'), dpi=100)
    plt.close(fig)


def plot_attention_maps(image, maps, path, title=''):
    """The image, then one panel per head with its CLS attention map upsampled (nearest) to
    the image and drawn over it. image: uint8 (3, H, W); maps: (heads, h, w)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    picture = image.permute(1, 2, 0).cpu().numpy()
    upsampled = F.interpolate(maps[None].cpu(), size=picture.shape[:2], mode='nearest')[0]  # (heads, H, W)
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(2.2 * (1 + len(maps)), 2.6), squeeze=False)
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title('image')
    for head, (ax, heat) in enumerate(zip(axes[0, 1:], upsampled)):
        ax.imshow(picture)
        ax.imshow(heat.numpy(), cmap='inferno', alpha=0.6)
        ax.set_title(f'head {head}')
    for ax in axes[0]:
        ax.axis('off')
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# =============================================================================
# B5. Plumbing: what eval_knn.py and eval_linear.py share
# =============================================================================

# What the backbone is built from: evaluation takes these from the checkpoint unless they are typed.
BACKBONE_KEYS = ('arch', 'width', 'cifar_stem', 'zero_init_residual', 'patch_size', 'num_heads', 'pos_embed',
                 'image_size')


def get_eval_parser(description, name):
    """The flags of an evaluation script (eval_knn.py, eval_linear.py): a checkpoint of any method
    file, --pretrained (an authors' released file, released.py), or --random-init; the data and backbone
    flags, whose defaults are the checkpoint's."""
    parser = ArgumentParser(description=description.split('\n')[0], allow_abbrev=False,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.set_defaults(method=name, freeze_patch_embed=False, drop_path=0.0)
    parser.add_argument('checkpoint', nargs='?', help='checkpoint.pth written by any method file')
    parser.add_argument('--pretrained', default=None, metavar='FILE',
                        help="instead of a checkpoint: weights released by a method's authors (DINO, "
                             'MoCo v1/v2/v3, SimSiam, SwAV, InstDisc; see tools/released.py), backbone '
                             'settings read from the file')
    parser.add_argument('--random-init', action='store_true',
                        help='evaluate an untrained backbone (give --data and --arch)')
    g = parser.add_argument_group('data (default: the checkpoint\'s)')
    add_data_flags(g, required=False, image_size_help="evaluation crop size (default: the checkpoint's, "
                   'else follows the dataset)')
    g = parser.add_argument_group('backbone (default: the checkpoint\'s)')
    g.add_argument('--arch', default='resnet50', help='one of ' + ', '.join(ARCHS))
    g.add_argument('--width', type=int, default=64, help='ResNet base width')
    g.add_argument('--cifar-stem', action=argparse.BooleanOptionalAction, default=None,
                   help='ResNet 3x3 stride-1 conv1 without max-pool (default: on for images <= 64 px)')
    g.add_argument('--zero-init-residual', action=argparse.BooleanOptionalAction, default=False,
                   help='ResNet, --random-init: last BN of each residual block starts at zero')
    g.add_argument('--patch-size', type=int, default=None,
                   help='ViT patch size (default: 16, or 4 for images <= 64 px)')
    g.add_argument('--num-heads', type=int, default=None,
                   help='ViT attention heads (default: 3 / 6 / 12 for tiny / small / base)')
    g.add_argument('--pos-embed', default='learned', choices=('learned', 'sincos'),
                   help='ViT position embedding')
    g = parser.add_argument_group('running')
    g.add_argument('--seed', type=int, default=0,
                   help='random seed (data order and augmentation: seed + rank)')
    g.add_argument('--precision', default='auto', choices=('auto', 'bf16', 'fp32'),
                   help='auto = bf16 autocast on GPUs that support it, fp32 otherwise')
    add_channels_last_flag(g)
    g.add_argument('--dist-timeout', type=float, default=1800,
                   help='seconds a collective waits for the other processes before the run stops (torchrun)')
    return parser


def parse_eval_args(parser, argv=None, load_released=None):
    """Parse an evaluation script's flags. Returns (args, state): the checkpoint's contents (None with
    --random-init; for --pretrained, `load_released`'s mapping of the file into a checkpoint's form: the
    evaluation scripts pass tools/released.py's `load`), its data and backbone settings filled in for every
    flag not typed."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    check_declared_ranges(parser, args)
    if sum((bool(args.checkpoint), bool(args.pretrained), args.random_init)) != 1:
        raise UsageError('give one of: a checkpoint to evaluate, --pretrained FILE (the authors\' weights), '
                         'or --random-init with --data and --arch')
    state = None
    # the authors' layout mapped onto our backbone; its settings inferred (tools/released.py)
    if args.pretrained:
        state, args.checkpoint = load_released(args.pretrained), args.pretrained
    elif args.checkpoint:
        state = read_checkpoint(args.checkpoint)
        if not (isinstance(state, dict) and isinstance(state.get('backbone'), dict) and 'args' in state):
            raise UsageError(f'{args.checkpoint} is not a checkpoint of this project (no backbone / args); '
                             "the authors' released weights load with --pretrained FILE")
    if state is not None:
        typed = explicit_flags(parser, argv)
        for key in BACKBONE_KEYS + ('data', 'data_dir'):
            if key in state['args'] and key not in typed:
                setattr(args, key, state['args'][key])
    if args.data is None:
        raise UsageError(f"{'--pretrained' if args.pretrained else '--random-init'} needs --data "
                         '(the dataset to evaluate on)')
    args.dataset_info = inspect_dataset(args.data, args.data_dir)
    apply_size_defaults(args)
    validate_backbone_args(args)
    args.output_dir = getattr(args, 'output_dir', None)  # None: writes no run folder
    args.notes = [data_note(args)] + (state.get('notes', []) if state else [])
    return args, state


def load_eval_backbone(args, state, device):
    """The backbone of `state` (a checkpoint of this project, or a released file as released.load maps it)
    or, without one, an untrained backbone;
    in eval mode on `device`. A checkpoint whose backbone does not fit the architecture is refused
    in one line. A ViT is built at the size it was trained at (its position embedding's grid) and
    evaluated at --image-size through the interpolation."""
    trained_size = state['args'].get('image_size', args.image_size) if state is not None else args.image_size
    backbone = build_backbone(argparse.Namespace(**{**vars(args), 'image_size': trained_size}))
    if state is not None:
        saved, expected = state['backbone'], backbone.state_dict()
        missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        wrong = sorted(k for k in set(saved) & set(expected) if saved[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            problem = (f'{len(missing)} missing (e.g. {missing[0]})' if missing else
                       f'{len(unexpected)} unexpected (e.g. {unexpected[0]})' if unexpected else
                       f'{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(saved[wrong[0]].shape)} '
                       f'saved, {tuple(expected[wrong[0]].shape)} here)')
            raise UsageError(f'{args.checkpoint}: its backbone does not fit --arch {args.arch}: {problem} '
                             'tensors; pass the architecture it was trained with (--arch, --width, '
                             '--patch-size, ...)')
        bad = next((key for key, tensor in saved.items() if tensor.is_floating_point()
                    and not bool(torch.isfinite(tensor).all())), None)
        if bad is not None:
            raise UsageError(f'{args.checkpoint}: the backbone tensor {bad} holds NaN or inf; '
                             'evaluate another checkpoint')
        backbone.load_state_dict(saved)
        print0(f"  {state.get('method', '?')} backbone from {args.checkpoint}, "
               f"epoch {state.get('epoch', '?')}")
    backbone = backbone.to(device).eval()
    if uses_channels_last(args, device):
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone


def load_untrained_backbone(args, state, device):
    """--compare-random-init: the untrained network of the same seed, the one the checkpoint's run started
    from: seeded with that run's --seed (else this --seed), then built as load_eval_backbone builds one (a
    method file builds its backbone first after common.setup's seeding, and so does this)."""
    torch.manual_seed((state or {}).get('args', {}).get('seed', args.seed))
    return load_eval_backbone(args, None, device)


def class_names(args, base):
    """The names of the classes of --data (a folder's class folders, torchvision's names, the textures of the
    procedural data), by label."""
    names = args.dataset_info.get('classes') or getattr(base, 'classes', None)
    return list(names) if names else [str(c) for c in range(args.dataset_info['num_classes'])]


# =============================================================================
# B6. --augment device: images held on (or JPEGs decoded on) the device
# =============================================================================

# A dataset that fits the memory budget is decoded once (by PIL, as the cpu path decodes it) into one
# uint8 (N, 3, H, W) tensor on the device; each step gathers a batch of it and Views.batch makes the views.
# A folder that does not fit (ImageNet) is read file by file in a few DataLoader workers and its JPEGs are
# decoded on the device in batches (torchvision.io.decode_jpeg). Either way each rank takes its shard of
# the epoch's permutation from EpochSampler, as the cpu path does: both visit the same images per rank
# and step, and nothing is read back to the host per step (in memory).

def free_memory(device):
    """Bytes free on `device`: the GPU's free memory, or the host's available memory."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def device_budget(args, device):
    """(bytes, note): how much decoded data --augment device may hold on `device` (all splits together)."""
    if args.device_data_gb is not None:
        return args.device_data_gb * 1e9, f'--device-data-gb {args.device_data_gb:g}'
    free = free_memory(device)
    return 0.4 * free, f'40% of the {free / 1e9:.1f} GB free on {device.type}; --device-data-gb sets it'


class DeviceImages:
    """A split decoded once and held on the device: images uint8 (N, 3, Hc, Wc) (one canvas size; when
    the images differ in size, image n fills the top-left heights[n] x widths[n] pixels), heights, widths
    and labels (N,) int64."""

    def __init__(self, images, heights, widths, labels, device):
        self.images, self.labels, self.device = images.to(device), labels.to(device), device
        self.host_heights, self.host_widths = heights, widths  # the crop parameters are drawn on the host
        self.nbytes = images.numel()

    def __len__(self):
        return len(self.images)

    def batches(self, sampler):
        """Per step (groups, indices on the host and on the device, heights, widths (host), labels (device)):
        the batch is an index gather on the device; its indices come from the host's copy of the order."""
        order = sampler.order()  # (n_rank,) the rank's shard of the epoch's permutation: one copy per epoch
        order_on_device = device_augment.send(self.device, order=order)['order']
        for step in range(sampler.steps()):
            rows = slice(step * sampler.batch_size, (step + 1) * sampler.batch_size)
            indices, on_device = order[rows], order_on_device[rows]
            yield ([(self.images[on_device], None)], indices, on_device, self.host_heights[indices],
                   self.host_widths[indices], self.labels[on_device])


def is_jpeg(data):
    return len(data) > 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF


def decode_file(path, data=None):
    """uint8 (3, h, w) of an image file, on the CPU: torchvision.io (JPEG, PNG, WebP, GIF), else PIL (BMP,
    TIFF, PPM...); a file neither can read is reported by path (UsageError), as the PIL path does."""
    try:
        image = torchvision.io.decode_image(torchvision.io.read_file(path) if data is None else data,
                                            mode=torchvision.io.ImageReadMode.RGB)
        if image.dtype == torch.uint8:
            return image
    except (RuntimeError, ValueError):
        pass
    return torch.from_numpy(np.asarray(load_image(path)).copy()).permute(2, 0, 1)


class EncodedFiles(torch.utils.data.Dataset):
    """Item (epoch, i) -> (data, label, i) for the files of a folder split: a JPEG's bytes (uint8 (n,)),
    decoded later on the device; any other file decoded here, in the worker, to uint8 (3, h, w)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        _, i = item
        path, label = self.samples[i]
        try:
            # a worker cannot send read_file's own storage: it hangs
            data = torchvision.io.read_file(path).clone()
        except (OSError, RuntimeError) as e:
            raise UsageError(f'cannot read image {path} ({type(e).__name__}: {e}); '
                             'remove or replace the file') from None
        return (data if is_jpeg(data) else decode_file(path, data)), label, i


def collate_lists(batch):
    """A batch of (data, label, index) whose data differ in size: (list of tensors, labels (B,),
    indices (B,))."""
    data, labels, indices = zip(*batch)
    return list(data), torch.tensor(labels), torch.tensor(indices)


def decode_on_device(datas, paths, device):
    """Decode a batch of files (JPEG bytes, or images already decoded by the worker) into uint8 (3, h, w)
    tensors on `device`: the JPEGs in one batched torchvision.io.decode_jpeg call (nvJPEG on a GPU); if that
    fails, one by one, then on the CPU (e.g. CMYK JPEGs), then with PIL, so a broken file is named."""
    images = [None] * len(datas)
    jpegs = [k for k, data in enumerate(datas) if data.dim() == 1]
    try:
        decoded = torchvision.io.decode_jpeg([datas[k] for k in jpegs], mode=torchvision.io.ImageReadMode.RGB,
                                             device=device) if jpegs else []
    except RuntimeError:
        decoded = []
        for k in jpegs:
            try:
                decoded.append(torchvision.io.decode_jpeg(datas[k], mode=torchvision.io.ImageReadMode.RGB,
                                                          device=device))
            except RuntimeError:
                decoded.append(decode_file(paths[k]).to(device))
    for k, image in zip(jpegs, decoded):
        images[k] = image
    for k, data in enumerate(datas):
        if images[k] is None:
            images[k] = data.to(device, non_blocking=True)
    return images


class StreamedFiles:
    """A folder split too large for the device: each step's files are read by a few DataLoader workers
    (bytes only, so few are needed), decoded on the device in one batch, and put on canvases by size
    (one per 64-px bucket of height and width), because a batched crop needs one canvas size."""

    BUCKET = 64

    def __init__(self, samples, sampler, workers, device):
        self.samples, self.device = samples, device
        self.loader = torch.utils.data.DataLoader(
            EncodedFiles(samples), batch_size=sampler.batch_size, sampler=sampler, num_workers=workers,
            collate_fn=collate_lists, drop_last=sampler.drop_last, pin_memory=device.type == 'cuda',
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=quiet_worker if workers > 0 else None)

    def __len__(self):
        return len(self.samples)

    def batches(self, sampler):
        for datas, labels, indices in self.loader:
            images = decode_on_device(datas, [self.samples[i][0] for i in indices.tolist()], self.device)
            buckets = {}
            for k, image in enumerate(images):
                h, w = image.shape[1:]
                buckets.setdefault((-(-h // self.BUCKET), -(-w // self.BUCKET)), []).append(k)
            groups = []
            for members in buckets.values():  # a loop over images only where their sizes differ
                height = max(images[k].shape[1] for k in members)
                width = max(images[k].shape[2] for k in members)
                canvas = torch.empty(len(members), 3, height, width, dtype=torch.uint8, device=self.device)
                for slot, k in enumerate(members):  # outside its image a canvas is never read (weight 0)
                    canvas[slot, :, :images[k].shape[1], :images[k].shape[2]] = images[k]
                groups.append((canvas, None if len(buckets) == 1 else torch.tensor(members)))
            yield (groups, indices, indices.to(self.device, non_blocking=True),
                   torch.tensor([image.shape[1] for image in images]),
                   torch.tensor([image.shape[2] for image in images]),
                   labels.to(self.device, non_blocking=True))


class DeviceLoader:
    """--augment device: the Loader contract (len, epoch(e) yields (views, labels, indices) on the device,
    normalised, channels-last for CNNs on a GPU; epoch_started, dataset_size) over DeviceImages or
    StreamedFiles, with the views made by Views.batch."""

    def __init__(self, source, views, sampler, device, seed, channels_last=False):
        self.source, self.views, self.sampler, self.device, self.seed = source, views, sampler, device, seed
        self.channels_last, self.epoch_started = channels_last, active_time()
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __len__(self):
        return self.sampler.steps()

    @property
    def dataset_size(self):
        return len(self.source)

    def _normalise(self, x):
        x = x.sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def epoch(self, epoch):
        self.sampler.set_epoch(epoch)
        self.epoch_started = active_time()  # MetricLogger times the epoch from here
        self.epoch_cpu_started = process_cpu_seconds()
        for groups, indices, on_device, heights, widths, labels in self.source.batches(self.sampler):
            check_stop()
            views = self.views.batch(groups, indices, heights, widths, epoch, self.seed)
            yield [self._normalise(v) for v in views], labels, on_device


class ImageList(torch.utils.data.Dataset):
    """Item i -> (uint8 (3, h, w) tensor, label) of a dataset of (PIL image, label): its images as the PIL
    path reads them."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return torch.from_numpy(np.asarray(image.convert('RGB')).copy()).permute(2, 0, 1), label, i


def stack_canvas(images):
    """uint8 (N, 3, Hc, Wc), heights (N,), widths (N,) of a list of uint8 (3, h, w) images (a canvas of the
    largest height and width, each image top-left, zeros around it)."""
    heights = torch.tensor([image.shape[1] for image in images], dtype=torch.int64)
    widths = torch.tensor([image.shape[2] for image in images], dtype=torch.int64)
    if bool((heights == heights[0]).all() and (widths == widths[0]).all()):
        return torch.stack(images), heights, widths
    canvas = torch.zeros(len(images), 3, int(heights.max()), int(widths.max()), dtype=torch.uint8)
    for k, image in enumerate(images):
        canvas[k, :, :image.shape[1], :image.shape[2]] = image
    return canvas, heights, widths


def decode_all(base, workers):
    """(canvas, heights, widths, labels) of a whole dataset of PIL images, decoded in `workers` processes."""
    loader = torch.utils.data.DataLoader(ImageList(base), batch_size=64, num_workers=workers,
                                         collate_fn=collate_lists,
                                         worker_init_fn=quiet_worker if workers > 0 else None)
    images, labels = [], []
    for batch, batch_labels, _ in loader:
        images += batch
        labels.append(batch_labels)
    return (*stack_canvas(images), torch.cat(labels).long())

CACHE_VERSION = 1


def cached_folder_split(args, base):
    """decode_all of a folder split, through a cache on disk: <data>/.decoded/<split>-<fingerprint>.pt (or,
    when the folder is not writable, under --data-dir/decoded/). The fingerprint hashes every file's path,
    size, modification time and label, so a changed folder is decoded again (and its old cache removed).
    Written atomically; rank 0 writes it while the other ranks wait, then they read it."""
    root = os.path.normpath(base.root)
    files = [(os.path.relpath(path, root), os.stat(path).st_size, os.stat(path).st_mtime_ns, label)
             for path, label in base.samples]
    fingerprint = hashlib.sha1(repr((CACHE_VERSION, files)).encode()).hexdigest()[:16]
    dataset_root, split = os.path.dirname(root), os.path.basename(root)
    root_hash = hashlib.sha1(os.path.abspath(dataset_root).encode()).hexdigest()[:12]
    places = [os.path.join(dataset_root, '.decoded'), os.path.join(args.data_dir, 'decoded', root_hash)]
    name = f'{split}-{fingerprint}.pt'
    distributed = get_world_size() > 1
    if distributed and get_rank() != 0:
        dist.barrier()  # DDP: rank 0 decodes and writes the cache first
    data = None
    for place in places:
        path = os.path.join(place, name)
        if os.path.exists(path):
            try:
                record = torch.load(path, weights_only=True)
                data = record['images'], record['heights'], record['widths'], record['labels']
                print0(f'  decoded images of {root} read from {path}')
                break
            except Exception:  # a cache that cannot be read is decoded again
                pass
    if data is None:
        data = decode_all(base, args.workers)
        if get_rank() == 0:
            for place in places:
                if write_decoded_cache(place, name, split, data):
                    print0(f'  decoded images of {root} cached in {os.path.join(place, name)}')
                    break
    if distributed and get_rank() == 0:
        dist.barrier()
    return data


def write_decoded_cache(place, name, split, data):
    """Write the cache atomically (tmp + rename) and remove older caches of the split; False if not
    writable."""
    path = os.path.join(place, name)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        os.makedirs(place, exist_ok=True)
        torch.save(dict(zip(('images', 'heights', 'widths', 'labels'), data)), tmp)
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        return False
    for old in os.listdir(place):
        if old.startswith(f'{split}-') and old.endswith('.pt') and old != name:
            try:
                os.remove(os.path.join(place, old))
            except OSError:
                pass
    return True


def decoded_split(args, base):
    """(images uint8 (N, 3, Hc, Wc), heights, widths, labels) of a whole split on the CPU, as the PIL path
    sees them: the arrays torchvision keeps in memory (CIFAR, STL-10), the folder's files decoded by PIL
    (through the cache), or the images of any other dataset (procedural) one by one."""
    if isinstance(base, torchvision.datasets.CIFAR10):  # CIFAR-100 too: (N, 32, 32, 3) uint8
        images = torch.from_numpy(base.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor(base.targets, dtype=torch.int64)
    elif isinstance(base, torchvision.datasets.STL10):  # (N, 3, 96, 96) uint8, label -1 for the unlabelled
        images, labels = torch.from_numpy(base.data).contiguous(), torch.from_numpy(base.labels).long()
    elif isinstance(base, ClassFolder):
        return cached_folder_split(args, base)
    else:
        return decode_all(base, 0)
    n, _, h, w = images.shape
    return images, torch.full((n,), h), torch.full((n,), w), labels

# (data, split, device) -> DeviceImages: each split is decoded once per process (train = kNN's labelled)
HELD = {}


def device_source(args, split, base, sampler, device):
    """The images of `split` for --augment device: DeviceImages when the decoded split fits what is left of
    the budget (other held splits count), StreamedFiles for a folder that does not, else None."""
    info = args.dataset_info
    key = (args.data, 'train' if split == 'labelled' and args.data != 'stl10' else split, str(device))
    if key in HELD:
        return HELD[key]
    budget, budget_note = device_budget(args, device)
    left = budget - sum(images.nbytes for (_, _, where), images in HELD.items() if where == str(device))
    # exact for the named datasets; a folder: its first image's size
    estimate = len(base) * 3 * info['image_size'] ** 2
    if estimate <= left:
        images, heights, widths, labels = decoded_split(args, base)
        if images.numel() <= left:  # a folder of mixed sizes needs a canvas of its largest height and width
            HELD[key] = DeviceImages(images, heights, widths, labels, device)
            print0(f'  {args.data} {split}: {len(images)} images held on {device.type} as uint8 '
                   f'{tuple(images.shape[1:])}, {images.numel() / 1e9:.2f} GB of the {budget / 1e9:.1f} GB '
                   f'budget ({budget_note})')
            return HELD[key]
    if info['kind'] == 'folder':
        workers = min(args.workers, 4)
        print0(f'  {args.data} {split}: {len(base)} files read by {workers} workers and decoded '
               f'on {device.type} in batches (decoded they would need more than the {left / 1e9:.2f} GB left '
               f'of the {budget / 1e9:.1f} GB budget: {budget_note})')
        return StreamedFiles(base.samples, sampler, workers, device)
    return None
