"""The views of common.py, made in batches on the device: `--augment device`.

common.augmentation() and common.eval_transform() return an `Augmentation`: a torchvision Compose that,
called on a PIL image, is the per-image (`--augment cpu`) path a student reads in common.py. This module
is its batched twin, for the training loop's speed on a GPU, and nothing here is part of a method:

  Augmentation.draw   each sample's parameters, from a hash of (seed, epoch, image, view)
  crop_views          RandomResizedCrop / Resize + CenterCrop and the flip, as one resampling per view
  colour_views        colour jitter (in each sample's order), grayscale, blur, solarize
  common.Views.batch  calls the three for a whole list of views

The images reach the device in common.py, section B6. Docs: docs/input-pipeline.md.
"""
import math

import torch
import torch.nn.functional as F
import torchvision.transforms as T

# The PIL path runs one image at a time in DataLoader workers; here a whole batch is augmented at
# once, by tensor operations on whatever device holds the images (the GPU in training, the CPU in
# the tests), each sample with its own parameters. Augmentation (below) reads the recipe from the
# very torchvision steps the PIL path runs, so the two paths cannot drift apart, and draws every
# parameter as torchvision does (RandomResizedCrop's 10 attempts and its fallback, ColorJitter's
# random order...). The pixels follow PIL's arithmetic (its resampling filters, its blur) in float:
# they differ from the PIL path by its uint8 rounding between steps, a level or two (tests/test_augment.py).
#
# Randomness without generator state: each parameter of each view is a hash of (seed, epoch, image
# index, view number, parameter number), computed with int64 tensor operations that give the same
# bits on every device, so a view is the same whatever the batch, the rank, the world size or a
# resume (the PIL path seeds torch's generator per image instead; the two paths draw different
# numbers from the same distributions). The parameters are drawn on the host, from the indices it
# already has, and sent in one copy; nothing is ever read back from the device (no sync per step),
# and knowing them on the host lets each colour step run on just the samples that make it.

MASK32 = 0xFFFFFFFF


def mul32(x, c):
    """(x * c) mod 2^32 for 0 <= x < 2^32 (an int64 tensor or a Python int) and a constant c < 2^32.
    c is split into 16-bit halves so that no product exceeds 2^48: int64 tensors never overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x):
    """A bijective 32-bit integer hash (xor-shift-multiply, the constants of Wellons' 'lowbias32'), the same
    bits for Python ints and for int64 tensors on any device."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def view_keys(seed, epoch, view, indices):
    """(B,) int64 keys of view number `view` of the images `indices` (an int64 tensor) in `epoch`: all the
    randomness of those views. The (seed, epoch, view) part is hashed on the host; distinct images of
    one batch get distinct keys (mix32 is a bijection)."""
    base = mix32(mix32(0x5EED0 ^ (seed & MASK32)) ^ ((seed >> 32) & MASK32))
    base = mix32(mix32(base ^ (epoch & MASK32)) ^ view)
    return mix32(indices.long() ^ base)


def key_uniforms(keys, count):
    """(B, count) float64 uniforms in [0, 1), 32 random bits each: parameter number c of each key."""
    # (count,)
    salt = mix32(torch.arange(1, count + 1, device=keys.device, dtype=torch.int64) * 0x9E3779B1 & MASK32)
    return mix32(mix32(keys[:, None] ^ salt) ^ salt).double() * 2.0 ** -32


def crop_boxes(u, heights, widths, scale, ratio):
    """RandomResizedCrop.get_params for a batch: (top, left, height, width), each (B,) float64 integers.
    u: (B, 22) uniforms; heights, widths: (B,) float64 image sizes. As torchvision: up to 10 attempts of
    (area ~ U(scale) x image area, log aspect ratio ~ U(log ratio)), w = round(sqrt(area * ratio)),
    h = round(sqrt(area / ratio)); the first attempt that fits the image is kept, placed uniformly;
    when none fits, the centre crop of the whole image with its aspect ratio clamped to `ratio`.
    All 10 attempts are drawn for every sample and the first fitting one is selected (no loop, no sync)."""
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    area = (heights * widths)[:, None]                                                    # (B, 1)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0:10])                  # (B, 10) attempts
    aspect = torch.exp(log_low + (log_high - log_low) * u[:, 10:20])                      # (B, 10)
    # round half to even,
    w = torch.round(torch.sqrt(target_area * aspect))
    #   as Python's round
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])           # (B, 10)
    # (B, 1) first fitting
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)                                                               # (B,)
    in_ratio = widths / heights  # fallback: the whole image, its aspect ratio clamped to [ratio[0], ratio[1]]
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(heights * ratio[1]), widths)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(widths / ratio[0]), heights)
    w = torch.where(found, w.gather(1, first)[:, 0], fallback_w)
    h = torch.where(found, h.gather(1, first)[:, 0], fallback_h)
    top = torch.where(found, torch.floor(u[:, 20] * (heights - h + 1)), torch.floor((heights - h) / 2))
    left = torch.where(found, torch.floor(u[:, 21] * (widths - w + 1)), torch.floor((widths - w) / 2))
    return top, left, h, w


def resize_shorter_side(heights, widths, size):
    """T.Resize(size) with an int size: the shorter side becomes `size`, the longer
    int(size * long / short)."""
    short, long = torch.minimum(heights, widths), torch.maximum(heights, widths)
    new_long = torch.floor(size * long / short)
    return torch.where(heights <= widths, size, new_long), torch.where(heights <= widths, new_long, size)


def centre_offset(resized, crop):
    """T.CenterCrop's first row (or column) in the resized image: round((resized - crop) / 2), or minus its
    zero padding when the crop is larger than the image."""
    return torch.where(resized >= crop, torch.round((resized - crop) / 2), -torch.floor((crop - resized) / 2))


def resample_weights(start, length, resized, offset, out_size, in_size, interpolation):
    """(B, out_size, in_size) float32: PIL's resampling of one axis as a matrix. Each sample's box [start,
    start + length) of the input (a crop; pixels outside it get weight 0, as PIL crops first) is resized
    to `resized` pixels, of which pixels offset .. offset + out_size - 1 are kept (a centre crop; rows
    outside the resized image are 0). Output pixel o takes the input pixels p around its centre
    c = start + (offset + o + 0.5) * length / resized with the weights filter((p + 0.5 - c) / stretch),
    normalised to sum 1, where stretch = max(1, length / resized) widens the filter when shrinking
    (antialiasing, Resample.c's precompute_coeffs). Filters: bilinear = triangle of support 1, bicubic =
    Keys' cubic with a = -0.5 and support 2, as PIL's BILINEAR and BICUBIC. All arguments (B,) float64."""
    scale = (length / resized)[:, None]                                                         # (B, 1)
    position = offset[:, None] + torch.arange(out_size, device=start.device, dtype=torch.float64)  # (B, out)
    centre = start[:, None] + (position + 0.5) * scale                                          # (B, out)
    pixel = torch.arange(in_size, device=start.device, dtype=torch.float64)                     # (in,)
    t = ((pixel + 0.5 - centre[:, :, None]) / scale.clamp(min=1.0)[:, :, None]).float()         # (B, out, in)
    if interpolation == 'bilinear':
        weights = (1 - t.abs()).clamp(min=0)
    else:
        a, x = -0.5, t.abs()
        weights = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                              torch.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))
    # (B, in) the box
    inside = (pixel >= start[:, None]) & (pixel < (start + length)[:, None])
    kept = (position >= 0) & (position < resized[:, None])                                       # (B, out)
    weights = weights * (inside[:, None, :] & kept[:, :, None])
    total = weights.sum(dim=2, keepdim=True)
    return weights / torch.where(total != 0, total, 1.0)


def resample(canvas, rows, columns):
    """Crop-and-resize of a batch as two batched matrix products: float (B, 3, Hc, Wc) canvas of values in
    [0, 255], row weights (B, oh, Hc), column weights (B, ow, Wc) -> float (B, 3, oh, ow) in [0, 1].
    Horizontal pass first and each pass clipped to [0, 255], as PIL (which also rounds each to uint8).

    Why matrices: a crop box of any size and position, resized with PIL's antialiasing filter, is exactly
    one (oh, Hc) and one (ow, Wc) weight matrix per sample, zero outside the box, so a whole batch of
    differently sized crops is two batched GEMMs (tensor cores on a GPU). torchvision.ops.roi_align
    averages a fixed grid of bilinear samples per output pixel (a box filter, not PIL's triangle/cubic;
    no bicubic), and a batched grid_sample reads 4 (16) input pixels per output pixel, so it aliases
    when it shrinks (a 400-px crop to 96 px) and would need a pre-blur; both differ from the PIL path by
    more than its rounding. The cost is the dense product: for ImageNet-sized canvases ~0.4 GFLOP per
    224-px crop, far below what the GPU does in the training step."""
    batch, _, height, width = canvas.shape
    # (B, 3 Hc, ow)
    x = torch.bmm(canvas.reshape(batch, 3 * height, width), columns.transpose(1, 2)).clamp_(0, 255)
    # (B, 3, oh, ow)
    return torch.matmul(rows[:, None], x.view(batch, 3, height, -1)).clamp_(0, 255).div_(255)


def luma(x):
    """(B, 1, H, W): PIL's conversion to L (ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B), in float."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def adjust_hue(x, hue):
    """F.adjust_hue for a batch: x (B, 3, H, W) in [0, 1], hue (B,) in [-0.5, 0.5] of a full turn. The hue
    h (in sixths of a turn, from the largest channel) is rotated and the pixel rebuilt from its value
    v = max and chroma c = max - min: channel n (5, 3, 1 for R, G, B) = v - c * clamp(min(k, 4 - k), 0, 1),
    k = (n + h) mod 6 (the closed form of the HSV -> RGB sector table; grey pixels stay grey)."""
    r, g, b = x.unbind(dim=1)                                                    # (B, H, W) each
    value, minimum = x.amax(dim=1), x.amin(dim=1)
    chroma = value - minimum
    safe = torch.where(chroma > 0, chroma, 1.0)
    sixths = torch.where(value == r, (g - b) / safe,
                         torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    sixths = sixths + 6 * hue[:, None, None]
    channels = []
    for n in (5, 3, 1):
        k = torch.remainder(n + sixths, 6)
        channels.append(value - chroma * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(channels, dim=1)                                          # (B, 3, H, W)


def pil_blur_radius(sigma):
    """PIL's ImageFilter.GaussianBlur(radius=sigma) is 3 box blurs of this (fractional) radius, whose
    variances add up to sigma^2 (BoxBlur.c, _gaussian_blur_radius; Gwosdek et al. 2011). In float32 as
    PIL computes it (sigma (B,) any float dtype -> (B,) float32), so the box weights below are PIL's own."""
    sigma = sigma.float()
    variance = sigma * sigma / 3
    length = torch.sqrt(12.0 * variance.double() + 1.0).float()
    whole = torch.floor((length.double() - 1.0) / 2.0).float()
    fraction = ((2 * whole + 1) * (whole * (whole + 1) - 3 * variance)
                / (6 * (variance - (whole + 1) * (whole + 1))))
    return whole + fraction


def box_blur_pass(x, radius, pad):
    """One of PIL's box blurs along the last axis of x (B, C, H, L), per-sample radius (B,) float32 R =
    r + fraction: the 2r + 1 pixels around each pixel weigh ww = 1 / (2R + 1) each, the two next ones
    (1 - (2r + 1) ww) / 2 each, in PIL's 24-bit fixed point; the image edge is repeated. Sums over the
    window come from a cumulative sum, so the cost does not grow with the radius. pad >= r + 1."""
    whole = torch.floor(radius).long()
    ww = torch.floor(2.0 ** 24 / (radius * 2 + 1)).long()              # float32 division, as PIL's C
    fw = torch.div(2 ** 24 - (2 * whole + 1) * ww, 2, rounding_mode='floor')
    ww, fw = ww.float() * 2.0 ** -24, fw.float() * 2.0 ** -24
    length = x.shape[-1]
    padded = F.pad(x, (pad, pad, 0, 0), mode='replicate')                          # (B, C, H, L + 2 pad)
    # sums[k] = padded[:k].sum()
    sums = F.pad(padded.cumsum(dim=-1), (1, 0))
    # (L,) in padded coordinates
    centre = torch.arange(length, device=x.device) + pad
    shape = (x.shape[0], x.shape[1], x.shape[2], length)

    def at(values, where):  # values[..., where[b]] for each sample b
        return values.gather(-1, where.view(-1, 1, 1, length).expand(shape))
    near = at(sums, centre + whole[:, None] + 1) - at(sums, centre - whole[:, None])   # the 2r + 1 pixels
    far = at(padded, centre - whole[:, None] - 1) + at(padded, centre + whole[:, None] + 1)
    return ww.view(-1, 1, 1, 1) * near + fw.view(-1, 1, 1, 1) * far


def gaussian_blur(x, sigma, max_sigma):
    """common.GaussianBlur for a batch: PIL's Gaussian blur of standard deviation sigma (B,), i.e.
    3 box blurs along the rows, then 3 along the columns (ImagingBoxBlur). x: (B, 3, H, W) in [0, 1]."""
    radius = pil_blur_radius(sigma)
    # on the host, no sync
    pad = int(pil_blur_radius(torch.tensor(float(max_sigma), dtype=torch.float64))) + 2
    for _ in range(3):
        x = box_blur_pass(x, radius, pad)
    x = x.transpose(2, 3)
    for _ in range(3):
        x = box_blur_pass(x, radius, pad)
    return x.transpose(2, 3)


class Augmentation(T.Compose):
    """What common.augmentation and common.eval_transform return: a torchvision Compose (called on a PIL
    image it is the --augment cpu path, unchanged) that also runs on batches of uint8 tensors (the
    --augment device path): draw() gives each sample its parameters from its key, and Views.batch
    crops (crop_views) and colours (colour_views) a batch with them. The recipe is read from the
    Compose's own steps:
    RandomResizedCrop, or [Resize] + CenterCrop (evaluation); then, in this order, any of the flip,
    RandomApply([ColorJitter]), RandomGrayscale, RandomApply([GaussianBlur]), RandomSolarize."""

    # which uniforms of a key each parameter uses (key_uniforms): fixed, so adding a step changes no other
    CROP, FLIP, JITTER, ORDER, FACTORS = 0, 22, 23, 24, 28
    GRAYSCALE, BLUR, SIGMA, SOLARIZE, COUNT = 32, 33, 34, 35, 36

    def __init__(self, transforms):
        super().__init__(transforms)
        self.random_crop = self.resize = self.centre_crop = None
        self.flip_prob = self.jitter_prob = self.grayscale_prob = self.blur_prob = self.solarize_prob = 0.0
        self.jitter_ranges, self.sigma_range, self.threshold = [None] * 4, (0.0, 0.0), 128
        for step in transforms:
            inner = step.transforms[0] if isinstance(step, T.RandomApply) else None
            if isinstance(step, T.RandomResizedCrop):
                self.random_crop, self.size, self.interpolation = step, step.size, step.interpolation
            elif isinstance(step, T.Resize):
                self.resize, self.interpolation = step, step.interpolation
            elif isinstance(step, T.CenterCrop):
                self.centre_crop, self.size = step, step.size
            elif isinstance(step, T.RandomHorizontalFlip):
                self.flip_prob = step.p
            elif isinstance(inner, T.ColorJitter):
                self.jitter_prob = step.p
                self.jitter_ranges = [inner.brightness, inner.contrast, inner.saturation, inner.hue]
            elif isinstance(step, T.RandomGrayscale):
                self.grayscale_prob = step.p
            elif getattr(inner, 'batched_blur', False):
                self.blur_prob, self.sigma_range = step.p, inner.sigma
            elif isinstance(step, T.RandomSolarize):
                self.solarize_prob, self.threshold = step.p, step.threshold
            elif not isinstance(step, T.PILToTensor):
                raise ValueError(f'Augmentation has no batched version of {step}')
        if self.centre_crop is None and self.random_crop is None:
            raise ValueError('Augmentation needs a RandomResizedCrop or a CenterCrop')
        if self.random_crop is None and self.resize is None:
            self.interpolation = T.InterpolationMode.BILINEAR
        names = {T.InterpolationMode.BILINEAR: 'bilinear', T.InterpolationMode.BICUBIC: 'bicubic'}
        self.mode = names[self.interpolation]

    def draw(self, keys, heights, widths):
        """The parameters of each sample's view, on the host: a dict of CPU tensors (B,) or (B, 4), from the
        keys (B,) and the image sizes heights, widths (B,) (int64): the box cropped from the image (top,
        left, height, width), the size it is resized to and the offset of the kept window in it (a centre
        crop; 0 for RandomResizedCrop), flip; jitter_ops (B, 4): which of brightness, contrast, saturation,
        hue the sample adjusts (none unless its jitter is applied), with their order and factors;
        grayscale; blur and its sigma; solarize. A probability p means u < p for the sample's own u."""
        u = key_uniforms(keys, self.COUNT)                                       # (B, 36) float64
        heights, widths = heights.double(), widths.double()
        out_h, out_w = self.size
        if self.random_crop is not None:
            top, left, height, width = crop_boxes(u[:, self.CROP:self.FLIP], heights, widths,
                                                  self.random_crop.scale, self.random_crop.ratio)
            resized_h, resized_w = torch.full_like(top, out_h), torch.full_like(top, out_w)
            offset_top, offset_left = torch.zeros_like(top), torch.zeros_like(top)
        else:
            top, left, height, width = torch.zeros_like(heights), torch.zeros_like(heights), heights, widths
            resized_h, resized_w = ((heights, widths) if self.resize is None
                                    else resize_shorter_side(heights, widths, self.resize.size))
            offset_top, offset_left = centre_offset(resized_h, out_h), centre_offset(resized_w, out_w)
        factors = torch.zeros_like(u[:, self.FACTORS:self.GRAYSCALE])
        enabled = torch.tensor([interval is not None for interval in self.jitter_ranges])
        for k, interval in enumerate(self.jitter_ranges):
            if interval is not None:  # ColorJitter's factor ~ U(interval): brightness 0.4 -> [0.6, 1.4]
                factors[:, k] = interval[0] + (interval[1] - interval[0]) * u[:, self.FACTORS + k]
        jitter = u[:, self.JITTER] < self.jitter_prob
        low, high = self.sigma_range
        return dict(top=top, left=left, height=height, width=width, resized_h=resized_h, resized_w=resized_w,
                    offset_top=offset_top, offset_left=offset_left, flip=u[:, self.FLIP] < self.flip_prob,
                    jitter=jitter, jitter_ops=jitter[:, None] & enabled, factors=factors.float(),
                    order=u[:, self.ORDER:self.FACTORS].argsort(dim=1, stable=True),
                    grayscale=u[:, self.GRAYSCALE] < self.grayscale_prob,
                    blur=u[:, self.BLUR] < self.blur_prob, sigma=low + (high - low) * u[:, self.SIGMA],
                    solarize=u[:, self.SOLARIZE] < self.solarize_prob)


def send(device, **tensors):
    """Small host tensors -> `device`, in one pinned, non-blocking copy per dtype (a step's parameters)."""
    by_dtype, out = {}, {}
    for name, tensor in tensors.items():
        by_dtype.setdefault(tensor.dtype, []).append((name, tensor))
    for items in by_dtype.values():
        flat = torch.cat([tensor.reshape(-1) for _, tensor in items])
        flat = (flat.pin_memory() if device.type == 'cuda' else flat).to(device, non_blocking=True)
        for (name, tensor), piece in zip(items, flat.split([tensor.numel() for _, tensor in items])):
            out[name] = piece.view(tensor.shape)
    return out


def crop_views(groups, transforms, p, batch):
    """The crops of V views of a batch of `batch` images: float (V * batch, 3, oh, ow) in [0, 1], view-major.
    All V transforms crop to the same size with the same filter; p holds their parameters (host, view-
    major). groups = [(canvas, members)]: uint8 canvases on the device and the batch positions of their
    images (a host int64 tensor; None: the whole batch)."""
    canvas = groups[0][0]
    device, (out_h, out_w), mode = canvas.device, transforms[0].size, transforms[0].mode
    views = len(transforms)
    names = ('top', 'height', 'resized_h', 'offset_top', 'left', 'width', 'resized_w', 'offset_left')
    geometry = send(device, boxes=torch.stack([p[name] for name in names], dim=1), flip=p['flip'])
    boxes, flip = geometry['boxes'], geometry['flip']                            # (V*B, 8) float64, (V*B,)
    out = torch.empty(views * batch, 3, out_h, out_w, device=device)
    for canvas, members in groups:
        place = None  # where the crops of this canvas go in `out`: (V*b,) on the device
        if members is not None:
            place = send(device, place=(members + batch * torch.arange(views)[:, None]).flatten())['place']
        box, flipped = (boxes, flip) if members is None else (boxes[place], flip[place])
        row_weights = resample_weights(*box[:, 0:4].unbind(1), out_h, canvas.shape[2], mode)   # (V*b, oh, Hc)
        # (V*b, ow, Wc)
        column_weights = resample_weights(*box[:, 4:8].unbind(1), out_w, canvas.shape[3], mode)
        column_weights = torch.where(flipped[:, None, None], column_weights.flip(1), column_weights)  # flip
        image = canvas.float()                                                    # (b, 3, Hc, Wc)
        size = len(canvas)
        for v in range(views):  # the same canvas under each view's weights
            mine = slice(v * size, (v + 1) * size)
            crops = resample(image, row_weights[mine], column_weights[mine])
            if members is None:
                out[v * size:(v + 1) * size] = crops
            else:
                out.index_copy_(0, place[v * size:(v + 1) * size], crops)
    return out


def colour_views(x, p, threshold):
    """The photometric steps on float (N, 3, H, W) in [0, 1], in the PIL path's order, each on the samples
    that make it (subsets known on the host, so the GPU never waits and skips what nobody does).

    Colour jitter in each sample's own order: at each of the 4 positions, the samples whose adjustment
    there is brightness, contrast or saturation blend with a target, f x + (1 - f) target clamped to
    [0, 1] (torchvision's _blend): black, the image's mean grey, the grey image; those whose adjustment
    is hue get adjust_hue. Then grayscale, blur, solarize (v >= threshold -> 255 - v)."""
    def subset(mask):
        return mask.nonzero()[:, 0]  # host

    steps = []                                                        # (name, host indices, host values)
    for position in range(4):
        op = p['order'][:, position]                                  # (N,) the adjustment made here
        active = p['jitter_ops'].gather(1, op[:, None])[:, 0]         # (N,) on for this sample?
        factor = p['factors'].gather(1, op[:, None])[:, 0]            # (N,)
        blend, hue = subset(active & (op < 3)), subset(active & (op == 3))
        steps += [('blend', blend, torch.stack([op[blend].float(), factor[blend]], 1)),
                  ('hue', hue, factor[hue])]
    steps += [('grayscale', subset(p['grayscale']), None), ('blur', subset(p['blur']), p['sigma'][p['blur']]),
              ('solarize', subset(p['solarize']), None)]
    steps = [step for step in steps if len(step[1])]
    if not steps:
        return x
    max_sigma = float(p['sigma'][p['blur']].max()) if p['blur'].any() else 0.0   # a host tensor: no sync
    sent = send(x.device, **{f'i{k}': indices for k, (_, indices, _) in enumerate(steps)},
                **{f'v{k}': values for k, (_, _, values) in enumerate(steps) if values is not None})
    for k, (name, _, _) in enumerate(steps):
        indices, values = sent[f'i{k}'], sent.get(f'v{k}')
        picked = x.index_select(0, indices)                            # (n, 3, H, W)
        if name == 'blend':
            op, factor = values[:, 0, None, None, None], values[:, 1, None, None, None]
            grey = luma(picked)                                        # (n, 1, H, W)
            target = torch.where(op == 1, grey.mean(dim=(1, 2, 3), keepdim=True), grey)
            target = torch.where(op == 0, 0.0, target)
            picked = (factor * picked + (1 - factor) * target).clamp_(0, 1)
        elif name == 'hue':
            picked = adjust_hue(picked, values)
        elif name == 'grayscale':
            picked = luma(picked).expand_as(picked)
        elif name == 'blur':
            picked = gaussian_blur(picked, values, max_sigma)
        else:
            picked = torch.where(picked >= threshold / 255, 1 - picked, picked)
        x.index_copy_(0, indices, picked)
    return x
