"""--augment device: the batched augmentation against torchvision's own operations and sampling, views as a
function of (seed, epoch, index, view) only, the data held on (or streamed to) the device, the throughput
command, --compile's graph breaks, and bad input.

Tolerances are in grey levels (0-255). The batched path computes in float what the PIL path computes in
uint8, rounding after every step: each PIL rounding moves a pixel by <= 0.5 level, so a crop-and-resize
(2 passes) is within ~1 level of PIL, a blur (6 box passes, each an average) within 3, and a whole view
(crop, 3 blends that scale differences by up to 1.4, grayscale, blur) within a few levels."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.utils._python_dispatch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

import common
import device_augment
from conftest import TINY, learning_run, run_script
from test_simclr import LEARNING as SIMCLR_LEARNING
from test_cli import expect_error

FAST = ['--epochs', '1', '--batch-size', '16', '--proj-hidden-dim', '16', '--knn-every', '-1']


def photo(seed, height, width):
    """A smooth random picture with pixel noise (colours and edges like a photo's, not a texture's)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse).astype(np.int16) + rng.integers(-10, 11, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def as_tensor(image):
    return TF.pil_to_tensor(image)  # uint8 (3, H, W)


def batch_of(images):
    canvas = torch.stack([as_tensor(image) for image in images])
    n, _, height, width = canvas.shape
    return canvas, torch.full((n,), height), torch.full((n,), width)


def views_of(transform, images, indices=None, epoch=0, seed=0, view=0):
    """The batched view (float (B, 3, S, S) in 0-255) of `images` and the parameters it was drawn with."""
    canvas, heights, widths = batch_of(images)
    indices = torch.arange(len(images)) if indices is None else torch.as_tensor(indices)
    p = transform.draw(device_augment.view_keys(seed, epoch, view, indices), heights, widths)
    x = device_augment.colour_views(device_augment.crop_views([(canvas, None)], [transform], p, len(images)), p, 128)
    return x * 255, p


def colour_params(n, **values):
    """Parameters that switch every photometric step off, then `values` on top."""
    off = torch.zeros(n, dtype=torch.bool)
    p = dict(order=torch.arange(4).repeat(n, 1), jitter_ops=torch.zeros(n, 4, dtype=torch.bool),
             factors=torch.zeros(n, 4), grayscale=off, blur=off, sigma=torch.zeros(n, dtype=torch.float64), solarize=off)
    p.update(values)
    return p


# ---- the counter-based random numbers ----------------------------------------------------------------

def test_hash_is_the_same_on_tensors_as_on_python_integers():
    values = [0, 1, 2, 12345, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1] + [int(v) for v in np.random.default_rng(0).integers(0, 2 ** 32, 200)]
    hashed = device_augment.mix32(torch.tensor(values, dtype=torch.int64))
    assert hashed.tolist() == [device_augment.mix32(v) for v in values]  # Python ints are exact: no int64 overflow
    assert ((hashed >= 0) & (hashed < 2 ** 32)).all()
    assert len(set(hashed.tolist())) == len(set(values))  # a bijection
    for v in values[:20]:  # the split multiplication is the true product mod 2^32
        assert device_augment.mul32(v, 0x846CA68B) == v * 0x846CA68B % 2 ** 32
    keys = device_augment.view_keys(3, 7, 1, torch.arange(10000))
    assert len(set(keys.tolist())) == 10000  # distinct images of one (seed, epoch, view): distinct keys
    u = device_augment.key_uniforms(keys, 36)
    assert u.shape == (10000, 36) and (u >= 0).all() and (u < 1).all()
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(torch.corrcoef(u[:, :6].T)[0, 1:].abs().max())) < 0.05


# ---- each batched operation against torchvision's on the same image and parameters ----------------------

@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic'])
def test_crop_and_resize_match_torchvision_resized_crop(interpolation):
    image = photo(0, 40, 53)
    x = as_tensor(image)[None].float()
    mode = T.InterpolationMode.BILINEAR if interpolation == 'bilinear' else T.InterpolationMode.BICUBIC
    f64 = lambda v: torch.tensor([float(v)], dtype=torch.float64)  # noqa: E731
    for top, left, height, width, size in [(3, 5, 20, 30, 24), (0, 0, 40, 53, 16), (10, 2, 9, 7, 32), (0, 0, 40, 53, 64),
                                           (39, 52, 1, 1, 8)]:
        rows = device_augment.resample_weights(f64(top), f64(height), f64(size), f64(0), size, 40, interpolation)
        columns = device_augment.resample_weights(f64(left), f64(width), f64(size), f64(0), size, 53, interpolation)
        mine = device_augment.resample(x, rows, columns)[0] * 255
        pil = as_tensor(TF.resized_crop(image, top, left, height, width, [size, size], mode)).float()
        # PIL rounds its horizontal pass and its output: <= 0.5 + 0.5 x (sum |w|, 1 bilinear, < 1.25 bicubic)
        assert (mine - pil).abs().max() <= (1.01 if interpolation == 'bilinear' else 1.25), (top, left, height, width)
        assert (mine - pil).abs().mean() < 0.4
        if interpolation == 'bilinear':  # torchvision's float antialiased kernel is PIL's filter without rounding
            tensor = TF.resized_crop(x[0], top, left, height, width, [size, size], mode, antialias=True)
            assert torch.allclose(mine, tensor, atol=1e-3)
        flipped = device_augment.resample(x, rows, columns.flip(1))[0] * 255  # a flip is the reversed column weights
        assert torch.allclose(flipped, TF.hflip(mine), atol=1e-4)


def test_brightness_contrast_saturation_and_hue_match_torchvision():
    images = [photo(seed, 24, 24) for seed in range(8)]
    x = torch.stack([as_tensor(image) for image in images]).float() / 255
    functions = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for op, factors in [(0, (0.6, 1.4)), (1, (0.6, 1.4)), (2, (0.0, 0.6, 1.4, 2.0)), (3, (-0.5, -0.1, 0.1, 0.37))]:
        for factor in factors:
            order = torch.tensor([[op] + [k for k in range(4) if k != op]] * len(images))
            switched = torch.zeros(len(images), 4, dtype=torch.bool)
            switched[:, op] = True
            values = torch.zeros(len(images), 4)
            values[:, op] = factor
            p = colour_params(len(images), order=order, jitter_ops=switched, factors=values)
            mine = device_augment.colour_views(x.clone(), p, 128) * 255
            tensor = functions[op](x, factor) * 255  # torchvision on float tensors: the same formula, unrounded
            assert (mine - tensor).abs().max() < 0.05, (op, factor)  # (grey: PIL's 0.299 R, torchvision's 0.2989 R)
            pil = torch.stack([as_tensor(functions[op](image, factor)) for image in images]).float()
            if op < 3:  # PIL rounds the blend (and the contrast's mean grey): within ~1 level
                assert (mine - pil).abs().max() < 1.3 and (mine - pil).abs().mean() < 0.5, (op, factor)
            else:  # PIL's hue goes through 8-bit HSV: saturated pixels move by up to ~15 levels
                assert (mine - pil).abs().max() < 20 and (mine - pil).abs().mean() < 2, factor


def test_grayscale_solarize_and_blur_match_torchvision_and_pil():
    images = [photo(seed, 20, 28) for seed in range(4)]
    uint8 = torch.stack([as_tensor(image) for image in images])
    x = uint8.float() / 255
    on = torch.ones(len(images), dtype=torch.bool)
    grey = device_augment.colour_views(x.clone(), colour_params(len(images), grayscale=on), 128) * 255
    assert torch.allclose(grey, TF.rgb_to_grayscale(x, 3) * 255, atol=0.05)
    pil_grey = torch.stack([as_tensor(TF.rgb_to_grayscale(image, 3)) for image in images]).float()
    assert (grey - pil_grey).abs().max() <= 0.51  # PIL rounds L
    solarized = device_augment.colour_views(x.clone(), colour_params(len(images), solarize=on), 128) * 255
    assert torch.allclose(solarized, TF.solarize(uint8, 128).float(), atol=1e-3)  # v >= 128 -> 255 - v, exactly
    for sigma in (0.1, 0.5, 1.0, 1.7, 2.0):
        p = colour_params(len(images), blur=on, sigma=torch.full((len(images),), sigma, dtype=torch.float64))
        blurred = device_augment.colour_views(x.clone(), p, 128) * 255
        pil = torch.stack([as_tensor(image.filter(ImageFilter.GaussianBlur(radius=sigma))) for image in images]).float()
        # 6 box passes, each an average (no gain) and a rounding of <= 0.5 in PIL: <= 3 levels
        assert (blurred - pil).abs().max() <= 3.01 and (blurred - pil).abs().mean() < 1.0, sigma


def pil_pipeline(transform, image, p, b):
    """torchvision's functional operations on the PIL image, in the PIL path's order, with sample b's
    parameters; hue by torchvision's float-tensor formula (PIL's 8-bit HSV is tested on its own above)."""
    image = TF.resized_crop(image, int(p['top'][b]), int(p['left'][b]), int(p['height'][b]), int(p['width'][b]),
                            list(transform.size), transform.interpolation, antialias=True)
    if p['flip'][b]:
        image = TF.hflip(image)
    functions = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for op in p['order'][b].tolist():
        if p['jitter_ops'][b, op] and op < 3:
            image = functions[op](image, float(p['factors'][b, op]))
        elif p['jitter_ops'][b, op]:
            hue = TF.adjust_hue(as_tensor(image).float() / 255, float(p['factors'][b, op]))
            image = TF.to_pil_image((hue * 255).round().to(torch.uint8))
    if p['grayscale'][b]:
        image = TF.rgb_to_grayscale(image, 3)
    if p['blur'][b]:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(p['sigma'][b])))
    if p['solarize'][b]:
        image = TF.solarize(image, 128)
    return as_tensor(image).float()


@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic'])
def test_whole_view_matches_the_pil_path_with_the_same_parameters(interpolation):
    transform = common.augmentation(24, (0.08, 1.0), (0.4, 0.4, 0.4, 0.1), blur_prob=0.5, solarize_prob=0.2,
                                    interpolation=interpolation)
    images = [photo(seed, 40, 52) for seed in range(48)]
    x, p = views_of(transform, images)
    errors = torch.stack([(x[b] - pil_pipeline(transform, images[b], p, b)).abs().flatten() for b in range(len(images))])
    # measured: max 6.7 levels, mean 1.2 (every view's mean <= 1.72): PIL's roundings, compounded
    assert errors.max() < 9 and errors.mean(dim=1).max() < 2.5 and errors.mean() < 1.6
    # the same Compose, called on a PIL image, is still the cpu path: PIL in, uint8 tensor out
    out = transform(images[0])
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)


# ---- the drawn parameters against torchvision's own sampling ---------------------------------------------

def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, side='right') / len(a) - np.searchsorted(b, grid, side='right') / len(b)).max()


KS_BOUND = 0.07  # 3000 vs 3000 draws: the statistic exceeds 0.07 with probability < 1e-6 under equal laws


@pytest.mark.parametrize('height, width, scale', [(40, 53, (0.08, 1.0)), (12, 160, (0.5, 1.0)), (96, 96, (0.14, 1.0))])
def test_crop_boxes_follow_torchvision_random_resized_crop(height, width, scale):
    n = 3000
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    theirs = np.array([T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])
    transform = common.augmentation(16, scale)
    p = transform.draw(device_augment.view_keys(1, 2, 0, torch.arange(n)), torch.full((n,), height), torch.full((n,), width))
    ours = torch.stack([p['top'], p['left'], p['height'], p['width']], 1).numpy()
    for name, a, b in [('area', ours[:, 2] * ours[:, 3], theirs[:, 2] * theirs[:, 3]),
                       ('log ratio', np.log(ours[:, 3] / ours[:, 2]), np.log(theirs[:, 3] / theirs[:, 2])),
                       ('top', ours[:, 0], theirs[:, 0]), ('left', ours[:, 1], theirs[:, 1])]:
        assert ks_distance(a, b) < KS_BOUND, name
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    # the fallback (no attempt fits): torchvision's centre crop, its aspect ratio clamped to 4/3
    fallback = (0, (width - round(height * 4 / 3)) // 2, height, round(height * 4 / 3))
    ours_rate, theirs_rate = (ours == fallback).all(1).mean(), (theirs == fallback).all(1).mean()
    assert abs(ours_rate - theirs_rate) < 0.04, (ours_rate, theirs_rate)
    if height == 12:  # a 12 x 160 image with scale >= 0.5 mostly falls back
        assert ours_rate > 0.5


def test_application_rates_factors_and_order_follow_torchvision():
    n = 20000
    transform = common.augmentation(16, (0.2, 1.0), (0.4, 0.3, 0.2, 0.1), jitter_prob=0.8, grayscale_prob=0.2,
                                    blur_prob=0.5, solarize_prob=0.2)
    p = transform.draw(device_augment.view_keys(0, 0, 0, torch.arange(n)), torch.full((n,), 32), torch.full((n,), 32))
    margin = 5 * math.sqrt(0.25 / n)  # five standard deviations of a rate
    for name, rate in [('flip', 0.5), ('jitter', 0.8), ('grayscale', 0.2), ('blur', 0.5), ('solarize', 0.2)]:
        assert abs(float(p[name].float().mean()) - rate) < margin, name
    torch.manual_seed(0)
    jitter = T.ColorJitter(0.4, 0.3, 0.2, 0.1)
    theirs = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) for _ in range(3000)]
    ranges = [(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]
    for k, (low, high) in enumerate(ranges):
        ours = p['factors'][:, k].numpy()
        assert ours.min() >= low - 1e-6 and ours.max() <= high + 1e-6
        assert ks_distance(ours[:3000], [t[1 + k] for t in theirs]) < KS_BOUND, k
    assert ks_distance(p['sigma'][:3000].numpy(), np.random.default_rng(0).uniform(0.1, 2.0, 3000)) < KS_BOUND
    orders = [tuple(o) for o in p['order'].tolist()]  # ColorJitter's randperm(4): all 24 orders, equally often
    counts = np.array([orders.count(o) for o in set(orders)])
    assert len(counts) == 24 and counts.min() > 0.8 * n / 24 and counts.max() < 1.2 * n / 24
    assert (p['jitter_ops'] == p['jitter'][:, None]).all()  # every adjustment is on here (none is 0)
    off = common.augmentation(16, (0.2, 1.0), (0.4, 0.0, 0.4, 0.0)).draw(device_augment.view_keys(0, 0, 0, torch.arange(50)),
                                                                           torch.full((50,), 32), torch.full((50,), 32))
    assert not off['jitter_ops'][:, 1].any() and not off['jitter_ops'][:, 3].any()  # a 0 strength: no adjustment


def test_samples_of_a_batch_get_different_parameters():
    transform = common.augmentation(16, (0.08, 1.0), common.simclr_jitter(1.0), blur_prob=0.5)
    images = [photo(0, 32, 32)] * 16  # one picture, 16 times: only the parameters tell the views apart
    x, p = views_of(transform, images)
    boxes = set(zip(*(p[k].tolist() for k in ('top', 'left', 'height', 'width'))))
    assert len(boxes) > 12 and len(set(p['factors'][:, 0].tolist())) == 16
    assert len({tuple(v.flatten().round().tolist()) for v in x}) == 16
    x2, _ = views_of(transform, images, view=1)  # another view number of the same images
    assert all(not torch.allclose(a, b) for a, b in zip(x, x2))


# ---- a view is a function of (seed, epoch, index, view) only ---------------------------------------------

def device_loader(args, views, rank=0, world_size=1, batch_size=8):
    base = common.base_dataset(args, 'train')
    sampler = common.EpochSampler(len(base), batch_size, rank, world_size, args.seed)
    return common.DeviceLoader(common.device_source(args, 'train', base, sampler, torch.device('cpu')), views,
                               sampler, torch.device('cpu'), args.seed)


def procedural_args(n=24, seed=0, **extra):
    import argparse
    info = common.inspect_dataset(f'procedural:{n}', '')
    return argparse.Namespace(**{**dict(data=f'procedural:{n}', data_dir='', dataset_info=info, seed=seed, workers=0,
                                        device_data_gb=None), **extra})


def collect(loader, epoch):
    """{dataset index: (view 0, view 1)} and the (indices, labels) of every step."""
    out, steps = {}, []
    for views, labels, indices in loader.epoch(epoch):
        steps.append((indices.tolist(), labels.tolist()))
        for k, i in enumerate(indices.tolist()):
            out[i] = tuple(v[k] for v in views)
    return out, steps


def test_views_do_not_depend_on_batch_world_size_resume_or_global_rng():
    args = procedural_args()
    view = common.augmentation(16, (0.2, 1.0), common.simclr_jitter(1.0), blur_prob=0.5, solarize_prob=0.2)
    views = common.Views([view, view])
    single, _ = collect(device_loader(args, views, batch_size=8), 1)
    torch.manual_seed(123)  # the global RNG plays no part
    shards = [collect(device_loader(args, views, rank, 2, batch_size=4), 1)[0] for rank in range(2)]
    assert sorted(single) == sorted(list(shards[0]) + list(shards[1]))  # the same images, split over 2 ranks
    for shard in shards:  # the same views: other batch-mates, another rank and world size (to float rounding:
        for i, (a, b) in shard.items():  # 1e-4 of a standard deviation is 0.006 grey levels)
            assert torch.allclose(a, single[i][0], atol=1e-4) and torch.allclose(b, single[i][1], atol=1e-4)
    loader = device_loader(args, views, batch_size=12)  # other batches again, after an epoch 0 (resume = a fresh loader)
    collect(loader, 0)
    again, _ = collect(loader, 1)
    assert all(torch.allclose(again[i][0], single[i][0], atol=1e-4) for i in single)
    assert not torch.allclose(single[0][0], single[0][1])  # two views of an image differ
    other_epoch, _ = collect(device_loader(args, views, batch_size=8), 2)
    assert not torch.allclose(other_epoch[0][0], single[0][0])
    other_seed, _ = collect(device_loader(procedural_args(seed=1), views, batch_size=8), 1)
    assert not torch.allclose(other_seed[0][0], single[0][0])


def test_device_loader_visits_the_images_of_the_cpu_loader():
    args = procedural_args(n=50)
    view = common.augmentation(16, (0.2, 1.0))
    base = common.base_dataset(args, 'train')
    for rank in range(2):
        sampler = common.EpochSampler(len(base), 8, rank, 2, seed=0)
        cpu = common.Loader(common.ViewDataset(base, common.Views([view]), 0), 8, sampler, 0, torch.device('cpu'))
        device = device_loader(args, common.Views([view]), rank, 2)
        assert len(cpu) == len(device) == 3 and device.dataset_size == 50  # 50 trimmed to 2 ranks x 3 x 8
        for (_, cpu_labels, cpu_indices), (views, labels, indices) in zip(cpu.epoch(3), device.epoch(3)):
            assert indices.tolist() == cpu_indices.tolist() and labels.tolist() == cpu_labels.tolist()
            assert views[0].shape == (8, 3, 16, 16) and views[0].dtype == torch.float32


def test_eval_views_match_eval_transform():
    for native, size, image_size in [(32, (32, 32), 32), (32, (32, 32), 16), (32, (24, 32), 28), (96, (96, 96), 96),
                                     (100, (75, 100), 64)]:
        transform = common.eval_transform(image_size, native)
        images = [photo(seed, *size) for seed in range(3)]
        canvas, heights, widths = batch_of(images)
        (x,) = common.Views([transform]).batch([(canvas, None)], torch.arange(3), heights, widths, 0, 0)
        pil = torch.stack([transform(image) for image in images]).float()
        assert x.shape == pil.shape == (3, 3, image_size, image_size)
        # PIL's resize rounds (<= 1 level bilinear, 1.25 bicubic); at the native size both are the image itself
        assert (x * 255 - pil).abs().max() <= (1e-3 if native <= 64 and size == (image_size, image_size) else 1.25), (native, size)


class DeviceOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations that touch a tensor on the meta device (kernels, on a GPU), views excluded."""

    VIEWS = ('aten::view', 'aten::_unsafe_view', 'aten::as_strided', 'aten::slice', 'aten::select', 'aten::unsqueeze',
             'aten::expand', 'aten::t', 'aten::transpose', 'aten::alias', 'aten::unbind', 'aten::split', 'aten::detach',
             'aten::permute', 'aten::squeeze', 'aten::_reshape_alias', 'aten::empty', 'aten::lift_fresh')

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
        if any(isinstance(t, torch.Tensor) and t.device.type == 'meta' for t in leaves) \
                and not func._schema.name.startswith(self.VIEWS):
            self.count += 1
        return out


def test_the_device_path_never_waits_for_the_device():
    """The whole per-step path runs on the meta device, where tensors have no values: any read of a device
    value on the host (.item(), .tolist(), bool(), a data-dependent shape) would raise. Also counts the
    device operations of a step (each a kernel launch on a GPU) to keep them from creeping up."""
    args = procedural_args(n=64)
    simclr = common.augmentation(32, (0.08, 1.0), common.simclr_jitter(0.5), jitter_prob=0.8, grayscale_prob=0.2)
    dino = [common.augmentation(size, scale, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, blur, solarize, interpolation='bicubic')
            for size, scale, blur, solarize in [(32, (0.4, 1), 1.0, 0.0), (32, (0.4, 1), 0.1, 0.2), (16, (0.05, 0.4), 0.5, 0.0)]]
    meta = torch.device('meta')
    for views, bound in [(common.Views([simclr, simclr]), 400), (common.multi_crop_views(dino[:2], dino[2], 6), 1400),
                         (common.Views([common.eval_transform(16, 32)]), 100)]:
        base = common.base_dataset(args, 'train')
        sampler = common.EpochSampler(len(base), 32, 0, 1, 0)
        images = common.DeviceImages(*common.decoded_split(args, base), meta)
        loader = common.DeviceLoader(images, views, sampler, meta, 0, channels_last=True)
        with DeviceOps() as ops:
            for batch, labels, indices in loader.epoch(0):
                assert all(v.device == meta and v.shape[0] == 32 for v in batch) and labels.device == meta
        assert 0 < ops.count / len(loader) <= bound, ops.count / len(loader)  # measured: 343, 1,300, 76


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU: run on a machine with CUDA')
def test_cuda_gives_the_views_of_the_cpu(tmp_path):
    """The same code on CUDA: the same keys (integer hash), the same views to float rounding, held in memory
    and (JPEGs decoded by nvJPEG) streamed."""
    indices = torch.randint(0, 2 ** 31, (1000,))
    assert torch.equal(device_augment.view_keys(5, 3, 2, indices.cuda()).cpu(), device_augment.view_keys(5, 3, 2, indices))
    view = common.augmentation(24, (0.08, 1.0), common.simclr_jitter(1.0), blur_prob=0.5, solarize_prob=0.2,
                               interpolation='bicubic')
    images = [photo(seed, 40, 52) for seed in range(16)]
    canvas, heights, widths = batch_of(images)
    on_cpu = common.Views([view, view]).batch([(canvas, None)], torch.arange(16), heights, widths, 1, 0)
    on_gpu = common.Views([view, view]).batch([(canvas.cuda(), None)], torch.arange(16), heights, widths, 1, 0)
    for a, b in zip(on_cpu, on_gpu):
        assert (a - b.cpu()).abs().max() * 255 < 0.1  # grey levels
    make_jpeg_folder(tmp_path / 'data')
    views = common.Views([view])
    loaders = []
    for device, budget in (('cpu', None), ('cuda', 0.0)):
        common.HELD.clear()
        args = folder_args(tmp_path / 'data', tmp_path, device_data_gb=budget)
        base = common.base_dataset(args, 'train')
        sampler = common.EpochSampler(len(base), 5, 0, 1, 0)
        loaders.append(common.DeviceLoader(common.device_source(args, 'train', base, sampler, torch.device(device)),
                                           views, sampler, torch.device(device), 0))
    for (a, _, i), (b, _, j) in zip(loaders[0].epoch(0), loaders[1].epoch(0)):
        assert torch.equal(i, j.cpu())
        std = torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
        assert ((a[0] - b[0].cpu()) * std * 255).abs().mean() < 3  # PIL's vs nvJPEG's decoding
    common.HELD.clear()


# ---- data held on the device, files decoded there -------------------------------------------------------

def make_jpeg_folder(root, sizes=((40, 30), (44, 30), (100, 70), (30, 40)), per_class=6):
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                width, height = sizes[(i + len(c)) % len(sizes)]
                photo(i + 10 * len(c), height, width).save(root / split / c / f'{i}.jpg', quality=90)
    photo(7, 30, 40).save(root / 'train' / 'a' / 'extra.png')  # a non-JPEG file among them


def folder_args(root, tmp_path, **extra):
    import argparse
    info = common.inspect_dataset(str(root), '')
    return argparse.Namespace(**{**dict(data=str(root), data_dir=str(tmp_path / 'data-dir'), dataset_info=info, seed=0,
                                        workers=0, device_data_gb=None), **extra})


def test_folder_of_mixed_sizes_held_in_memory_or_streamed_gives_the_same_views(tmp_path):
    make_jpeg_folder(tmp_path / 'data')
    view = common.augmentation(24, (0.3, 1.0), common.simclr_jitter(1.0))
    views = common.Views([view, common.augmentation(16, (0.1, 0.5))])
    common.HELD.clear()
    held = device_loader(folder_args(tmp_path / 'data', tmp_path), views, batch_size=5)
    assert isinstance(held.source, common.DeviceImages) and held.source.images.shape[2:] == (70, 100)  # a canvas
    assert os.listdir(tmp_path / 'data' / '.decoded')[0].startswith('train-')  # the decoded cache, next to the data
    common.HELD.clear()
    streamed = device_loader(folder_args(tmp_path / 'data', tmp_path, device_data_gb=0.0), views, batch_size=5)
    assert isinstance(streamed.source, common.StreamedFiles)
    a, steps_a = collect(held, 0)
    b, steps_b = collect(streamed, 0)
    assert steps_a == steps_b and len(steps_a) == 2  # 13 files, batches of 5, drop_last
    for i in a:  # PIL and torchvision.io decode the JPEGs a little differently: within a few levels on average
        for view_a, view_b in zip(a[i], b[i]):
            std = torch.tensor(common.IMAGENET_STD).view(3, 1, 1)
            assert ((view_a - view_b) * std * 255).abs().mean() < 3
    images, heights, widths, labels = common.decoded_split(folder_args(tmp_path / 'data', tmp_path),
                                                           common.base_dataset(folder_args(tmp_path / 'data', tmp_path), 'train'))
    base = common.base_dataset(folder_args(tmp_path / 'data', tmp_path), 'train')
    for k in (0, 5, 12):  # the held images are PIL's, bit for bit, each in the top-left of the canvas
        pil = as_tensor(base[k][0])
        assert torch.equal(images[k, :, :heights[k], :widths[k]], pil) and labels[k] == base[k][1]
    common.HELD.clear()


def test_worker_processes_decode_and_stream_the_images_of_the_main_process(tmp_path):
    make_jpeg_folder(tmp_path / 'data', per_class=2)
    views = common.Views([common.augmentation(16, (0.3, 1.0))])
    seen = {}
    for workers in (0, 2):
        for budget in (None, 0.0):  # held on the device (decoded once, in the workers), or streamed by the workers
            common.HELD.clear()
            shutil.rmtree(tmp_path / 'data' / '.decoded', ignore_errors=True)
            loader = device_loader(folder_args(tmp_path / 'data', tmp_path, workers=workers, device_data_gb=budget), views,
                                   batch_size=2)
            seen[workers, budget] = collect(loader, 0)
    for budget in (None, 0.0):
        (a, steps_a), (b, steps_b) = seen[0, budget], seen[2, budget]
        assert steps_a == steps_b and all(torch.equal(a[i][0], b[i][0]) for i in a)
    common.HELD.clear()


def test_decoded_cache_is_reused_invalidated_and_written_elsewhere_when_read_only(tmp_path, capsys):
    make_jpeg_folder(tmp_path / 'data', per_class=2)
    args = folder_args(tmp_path / 'data', tmp_path)
    base = common.base_dataset(args, 'train')
    first = common.cached_folder_split(args, base)
    assert 'cached in' in capsys.readouterr().out
    second = common.cached_folder_split(args, base)
    assert 'read from' in capsys.readouterr().out and all(torch.equal(a, b) for a, b in zip(first, second))
    photo(99, 30, 40).save(tmp_path / 'data' / 'train' / 'a' / '0.jpg')  # the folder changes
    third = common.cached_folder_split(args, common.base_dataset(args, 'train'))
    assert 'cached in' in capsys.readouterr().out and not torch.equal(third[0], first[0])
    assert len(os.listdir(tmp_path / 'data' / '.decoded')) == 1  # the stale cache is gone, no .tmp left
    if os.geteuid() != 0:  # root writes anywhere: a read-only folder cannot be simulated
        os.chmod(tmp_path / 'data' / '.decoded', 0o500)
        photo(98, 30, 40).save(tmp_path / 'data' / 'train' / 'a' / '1.jpg')
        common.cached_folder_split(args, common.base_dataset(args, 'train'))
        assert str(tmp_path / 'data-dir' / 'decoded') in capsys.readouterr().out
        os.chmod(tmp_path / 'data' / '.decoded', 0o700)


# ---- training with --augment device, the throughput command, --compile -----------------------------------

TRAIN = ['--data', 'procedural:192', *TINY, '--epochs', '3', '--batch-size', '32', '--proj-hidden-dim', '32',
         '--knn-every', '-1', '--augment', 'device']


def test_training_on_the_device_path_resumes_exactly(tmp_path):
    out = run_script('simclr.py', *TRAIN, '--output-dir', tmp_path / 'straight')
    assert 'augment device' in out.stdout and 'held on cpu' in out.stdout
    run_script('simclr.py', *TRAIN, '--output-dir', tmp_path / 'resumed', '--stop-after-epoch', '1')
    run_script('simclr.py', *TRAIN, '--output-dir', tmp_path / 'resumed')
    straight = torch.load(tmp_path / 'straight' / 'checkpoint.pth', weights_only=True)
    resumed = torch.load(tmp_path / 'resumed' / 'checkpoint.pth', weights_only=True)
    for key, value in straight['model'].items():
        assert torch.equal(value, resumed['model'][key]), key
    losses = [r['epoch_loss'] for r in common.read_metrics(tmp_path / 'straight' / 'metrics.jsonl') if 'epoch_loss' in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


# SimCLR's learning test on the cpu (PIL) path, 300 steps (tools/measure_learning.py measures it as simclr-cpu)
LEARNING_CPU = [*SIMCLR_LEARNING, '--augment', 'cpu', '--epochs', '10']
LEARNING_CPU_MARGIN = 18


def test_simclr_learns_on_the_cpu_path(tmp_path):
    gain, _ = learning_run(tmp_path, 'simclr.py', *LEARNING_CPU)
    assert gain > LEARNING_CPU_MARGIN, gain  # kNN top-1 gain over the untrained network: smallest of 18 runs +37.0


def test_torchrun_two_processes_on_the_device_path(tmp_path):
    out = run_script('simclr.py', '--data', 'procedural:64', *TINY, '--epochs', '1', '--batch-size', '16',
                     '--proj-hidden-dim', '16', '--knn-every', '1', '--knn-k', '5', '--augment', 'device',
                     '--output-dir', tmp_path, nproc=2)
    assert '2 process(es)' in out.stdout and out.stdout.count('kNN (k=5') == 1 and 'held on cpu' in out.stdout


def test_multi_crop_methods_and_instdisc_run_on_the_device_path(tmp_path):
    for script, extra in [('instdisc.py', []), ('swav.py', ['--size-crops', '16', '8', '--nmb-crops', '2', '2']),
                          ('dino.py', ['--local-crop-size', '8', '--num-local-crops', '2'])]:
        out = run_script(script, '--data', 'procedural:32', *TINY, *extra, '--epochs', '1', '--batch-size', '16',
                         '--knn-every', '1', '--knn-k', '5', '--augment', 'device', '--output-dir', tmp_path / script)
        assert 'kNN (k=5' in out.stdout and 'held on cpu' in out.stdout, script


def test_throughput_command_measures_both_paths(tmp_path):
    run_script('tools/throughput.py', 'simclr.py', '--data', 'procedural:32', *TINY, '--batch-size', '16',
               '--proj-hidden-dim', '16', '--augment', 'cpu', 'device', '--steps', '1', '--warmup', '1', '--json',
               tmp_path / 't.json')
    rows = json.load(open(tmp_path / 't.json'))['rows']
    assert [r['augment'] for r in rows] == ['cpu', 'device']
    for r in rows:
        assert r['pipeline_images_per_s'] > 0 and r['training_images_per_s'] > 0 and r['epoch_seconds'] > 0


def test_backbones_compile_without_graph_breaks():
    """--compile traces each backbone as one graph (common.prepare_model's comment): the ResNet, and the ViT
    (2 blocks: every block is the same code) at a global and a local crop size (position embedding resampled)."""
    import argparse
    import torch._dynamo as dynamo
    args = argparse.Namespace(arch='resnet18', width=8, cifar_stem=True, zero_init_residual=False, image_size=16)
    vit = common.VisionTransformer(16, 4, 64, 2, 2, drop_path_rate=0.1)
    for backbone, sizes in ((common.build_backbone(args), (16,)), (vit, (16, 8))):
        backbone.train()
        for size in sizes:
            explanation = dynamo.explain(backbone)(torch.randn(2, 3, size, size))
            assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
        dynamo.reset()


# ---- bad input --------------------------------------------------------------------------------------------

def test_data_over_the_device_budget_stops_in_one_line(tmp_path):
    result = expect_error('simclr.py', '--data', 'procedural:64', *TINY, *FAST, '--augment', 'device',
                          '--device-data-gb', '0.0001', '--output-dir', tmp_path / 'out', match='--augment cpu')
    assert 'more than the 0.00 GB budget' in result.stderr and not (tmp_path / 'out').exists()  # nothing written
    expect_error('simclr.py', '--data', 'procedural:64', *TINY, *FAST, '--device-data-gb', '-1',
                 '--output-dir', tmp_path / 'out', match='--device-data-gb -1.0 is outside [0, 1e6]')


def test_auto_falls_back_to_the_cpu_path_with_a_note(capsys):
    args = procedural_args(n=64, augment='device', augment_requested='auto', device_data_gb=1e-6, batch_size=16,
                           arch='resnet18')  # what --augment auto resolves to on a GPU
    common.HELD.clear()
    loader = common.build_train_loader(args, common.Views([common.augmentation(16, (0.2, 1.0))]), torch.device('cpu'))
    assert isinstance(loader, common.Loader) and 'note: the 64 decoded training images' in capsys.readouterr().out
    assert len(loader) == 4


def test_corrupt_jpeg_is_reported_by_path_on_the_device_path(tmp_path):
    make_jpeg_folder(tmp_path / 'data')
    bad = tmp_path / 'data' / 'train' / 'b' / '1.jpg'
    open(bad, 'wb').write(open(bad, 'rb').read()[:40])  # a JPEG cut short
    for budget in ('1', '0'):  # decoded into memory by PIL; streamed and decoded by torchvision.io
        expect_error('simclr.py', '--data', tmp_path / 'data', *TINY, *FAST, '--batch-size', '4', '--augment', 'device',
                     '--device-data-gb', budget, '--output-dir', tmp_path / 'out', match=f'cannot read image {bad}')
