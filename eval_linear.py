"""Linear probe: a linear classifier trained on the frozen features of any method's checkpoint.

Every one of the eight papers reports it: the backbone stored in the checkpoint (the encoder, not the
projection head; DINO's teacher) stays frozen, in eval mode (BatchNorm statistics frozen too), and only
a linear layer on top of its features learns the labels. Two protocols:

Fast (default). Features of the training and test images, without augmentation (the evaluation
transform, as for the kNN), are extracted once; an L2-regularised multinomial logistic regression is
fitted to them by full-batch L-BFGS, the recipe of SimCLR's and BYOL's transfer-learning linear
evaluation and of CLIP's linear probes (Chen et al. 2020, Grill et al. 2020, Radford et al. 2021):
  1. features are standardised with the mean and standard deviation of the images being fitted;
  2. minimise mean_i CE(W z_i + b, y_i) + wd / 2 * ||W||^2 (bias not decayed), W and b from zero,
     L-BFGS with a strong-Wolfe line search, in float64, at most --max-iter iterations;
  3. the weight decay wd is chosen from --weight-decays by top-1 on a held-out --val-fraction of the
     TRAINING images (a permutation drawn from --seed; ties go to the larger wd); the test labels are
     read only to score the final classifier, refitted with that wd on all training images.
It is deterministic, has no learning rate to tune, and takes seconds on a GPU for CIFAR-size data.
It is not the papers' number: without augmentation it is usually a little lower than theirs.

Papers' protocol (--augment). The classifier is trained by SGD on RandomResizedCrop (scale 0.08-1) +
horizontal flip views passed through the frozen backbone, then scored on the centre view of the test
images, with the recipe of one paper's linear-classification script (--recipe; --epochs, --lr,
--batch-size override it; lr is per 256 images, scaled linearly):
  moco     MoCo v1/v2 (He et al. 2020; facebookresearch/moco main_lincls.py): SGD lr 30, momentum 0.9,
           weight decay 0, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80 (the same fractions of
           --epochs).
  simsiam  SimSiam (Chen & He 2021; facebookresearch/simsiam main_lincls.py --lars): LARS (trust
           coefficient 0.001, on the bias too, as apex's LARC), lr 0.1 per 256, momentum 0.9, weight
           decay 0, batch 4096, 90 epochs, cosine. (The paper's appendix gives lr 0.02; the code's 0.1 is
           used.)
  dino     DINO (Caron et al. 2021; facebookresearch/dino eval_linear.py): SGD lr 0.001 per 256,
           momentum 0.9, weight decay 0, batch 1024 (8 GPUs x 128), 100 epochs, cosine; on a ViT the
           features are the CLS tokens of the last 4 blocks, concatenated (ViT-B: the last block's CLS
           token and its patch tokens' average).
The default recipe is dino for ViTs and moco for ResNets. All three init the classifier N(0, 0.01) with
a zero bias and set the lr once per epoch, as here. The authors' scripts print the best test accuracy
over the epochs (chosen on the test set); this one reports the last epoch. A checkpoint of the
classifier is written to --output-dir after every epoch; rerunning the same command resumes from it.

Run:
  python eval_linear.py runs/simclr-cifar10-resnet18/checkpoint.pth                 # fast protocol
  python eval_linear.py --random-init --arch resnet18 --data cifar10                 # the untrained baseline
  python eval_linear.py runs/simsiam-imagenet-resnet50/checkpoint.pth --augment --recipe simsiam
  torchrun --nproc_per_node=8 eval_linear.py runs/dino-imagenet-vit_small/checkpoint.pth --augment \
      --json linear.json

Label efficiency (fast protocol): `--labels-per-class 1 10 100 all --plot curve.png` fits the fast probe on
that many labelled training images per class (nested subsets drawn from --seed), scores each on the whole
test split, and plots top-1 against labels per class; `--compare-random-init` adds the untrained network
of the same seed.
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from tools import released

parser = common.get_eval_parser(__doc__, 'eval_linear')
parser.set_defaults(sync_bn=False, compile=False)  # common.prepare_model reads them; a linear layer has no BN
probe = parser.add_argument_group('linear probe')
probe.add_argument('--json', default=None, help='also write the results to this JSON file')
probe.add_argument('--n-last-blocks', type=int, default=None,
                   help="ViT: concatenate the CLS tokens of the last n blocks; None: 1, or with --recipe "
                   "dino DINO's 4 (ViT-B: 1)")
probe.add_argument('--avgpool-patchtokens', action=argparse.BooleanOptionalAction,
                   default=None,
                   help="ViT: append the last block's average patch token; None: off, or with --recipe "
                   'dino on for ViT-B')
fast = parser.add_argument_group(
    'fast protocol (default): L-BFGS logistic regression on non-augmented features')
fast.add_argument('--weight-decays', type=float, nargs='+', default=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
                  help='the L2 strengths tried on the held-out part of the training set')
fast.add_argument('--val-fraction', type=float, default=0.1,
                  help='training images held out to choose the weight decay')
fast.add_argument('--max-iter', type=int, default=1000, help='L-BFGS iterations at most, per fit')
curve = parser.add_argument_group('label efficiency (fast protocol)')
curve.add_argument('--labels-per-class', nargs='+', default=None, metavar='N',
                   help='fit the fast probe on N labelled training images per class (nested subsets drawn '
                        'from --seed; "all": every one) and score each on the whole test split')
curve.add_argument('--plot', default=None, metavar='PNG', help='draw top-1 against labels per class')
curve.add_argument('--compare-random-init', action='store_true',
                   help='the same curve for the untrained network of the same seed (the one the run '
                        'started from)')
papers = parser.add_argument_group("papers' protocol (--augment): SGD on augmented views, one paper's recipe")
papers.add_argument('--augment', action='store_true',
                    help="train on RandomResizedCrop + flip views (the papers' protocol)")
papers.add_argument('--recipe', default=None,
                    help='moco | simsiam | dino; None: dino for ViTs, moco for ResNets')
papers.add_argument('--epochs', type=int, default=None, help="None: the recipe's")
papers.add_argument('--lr', type=float, default=None,
                    help="base learning rate per 256 images; None: the recipe's")
papers.add_argument('--batch-size', type=int, default=None, help="GLOBAL batch size; None: the recipe's")
papers.add_argument('--output-dir', default=None, help='classifier checkpoints and metrics.jsonl; None: '
                    'linear-<recipe>/ beside the checkpoint. Rerunning the same command resumes from it')
papers.add_argument('--stop-after-epoch', type=int, default=None,
                    help='exit after this epoch; rerun to resume')
papers.add_argument('--log-every', type=int, default=50, help='steps between progress lines')

# The three papers' linear-classification recipes (their scripts' defaults and README commands).
RECIPES = {
    'moco': dict(paper='MoCo (He et al., CVPR 2020; facebookresearch/moco main_lincls.py)', optimizer='sgd',
                 lr=30.0, batch_size=256, epochs=100, schedule='step', milestones=(0.6, 0.8)),
    'simsiam': dict(paper='SimSiam (Chen & He, CVPR 2021; facebookresearch/simsiam main_lincls.py --lars)',
                    optimizer='lars', lr=0.1, batch_size=4096, epochs=90, schedule='cosine'),
    'dino': dict(paper='DINO (Caron et al., ICCV 2021; facebookresearch/dino eval_linear.py)',
                 optimizer='sgd', lr=0.001, batch_size=1024, epochs=100, schedule='cosine'),
}
AUGMENT_ONLY = ('recipe', 'epochs', 'lr', 'batch_size', 'output_dir', 'stop_after_epoch')
FAST_ONLY = ('weight_decays', 'val_fraction', 'max_iter')


def check_linear_args(args):
    """One-line errors for the probe's flags, and the recipe's values filled in, before any work."""
    if not args.augment:
        typed = [name for name in AUGMENT_ONLY if getattr(args, name) is not None]
        if typed:
            raise common.UsageError(f"--{typed[0].replace('_', '-')} belongs to the papers' protocol; add "
                                    '--augment (the default fast protocol has no epochs, lr or batches)')
    else:
        changed = [name for name in FAST_ONLY if getattr(args, name) != parser.get_default(name)]
        if changed:
            raise common.UsageError(f"--{changed[0].replace('_', '-')} belongs to the fast protocol; "
                                    'drop it or --augment')
    if not args.weight_decays or not all(math.isfinite(wd) and wd >= 0 for wd in args.weight_decays):
        raise common.UsageError(f'--weight-decays must be finite numbers >= 0, not {args.weight_decays}')
    if not 0 < args.val_fraction < 1:
        raise common.UsageError(f'--val-fraction must be in (0, 1), not {args.val_fraction}')
    common.check_ranges(args, positive=('max_iter', 'log_every'))
    vit = args.arch.startswith('vit')
    if not vit and ((args.n_last_blocks or 1) != 1 or args.avgpool_patchtokens):
        raise common.UsageError('--n-last-blocks and --avgpool-patchtokens read ViT blocks; '
                                'this backbone is a ResNet')
    depth = common.VIT_SIZES[args.arch][1] if vit else 1
    if args.n_last_blocks is not None and not 1 <= args.n_last_blocks <= depth:
        raise common.UsageError(f'--n-last-blocks must be between 1 and the {depth} blocks of {args.arch}, '
                                f'not {args.n_last_blocks}')
    if args.augment:
        if args.recipe is None:
            args.recipe = 'dino' if vit else 'moco'
        if args.recipe not in RECIPES:
            raise common.UsageError(f"unknown --recipe '{args.recipe}'; choose one of: {', '.join(RECIPES)}")
        recipe = RECIPES[args.recipe]
        for key in ('epochs', 'lr', 'batch_size'):
            if getattr(args, key) is None:
                setattr(args, key, recipe[key])
        if not (math.isfinite(args.lr) and args.lr > 0):
            raise common.UsageError(f'--lr must be a positive number, not {args.lr}')
        common.check_ranges(args, positive=('epochs', 'batch_size'))
        if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
            raise common.UsageError(f'--stop-after-epoch must be at least 1, not {args.stop_after_epoch}')
        # what common.build_optimizer / prepare_model / resume read: the recipe's optimiser
        args.optimizer, args.momentum, args.lars_eta, args.lars_clip = recipe['optimizer'], 0.9, 0.001, False
        # SimSiam's main_lincls wraps SGD in apex's LARC (the same as 'update' at wd 0)
        args.lars_denominator = 'larc'
        if args.recipe == 'dino' and vit:  # DINO: n=4 for ViT-S (and smaller), n=1 + avgpool for ViT-B
            if args.n_last_blocks is None:
                args.n_last_blocks = 1 if args.arch == 'vit_base' else 4
            if args.avgpool_patchtokens is None:
                args.avgpool_patchtokens = args.arch == 'vit_base'
        if args.output_dir is None:
            data_name = os.path.basename(os.path.normpath(args.data)).replace(':', '')
            folder = (os.path.dirname(os.path.abspath(args.checkpoint)) if args.checkpoint else
                      os.path.join('runs', f'random-init-{data_name}-{args.arch}'))
            args.output_dir = os.path.join(folder, f'linear-{args.recipe}')
    args.n_last_blocks = args.n_last_blocks or 1
    args.avgpool_patchtokens = bool(args.avgpool_patchtokens)
    check_curve_args(args)


def check_curve_args(args):
    """One-line errors for the label-efficiency flags; --labels-per-class becomes a list of ints and 'all'."""
    if args.labels_per_class is None:
        if args.plot or args.compare_random_init:
            raise common.UsageError('--plot and --compare-random-init draw the label-efficiency curve; add '
                                    '--labels-per-class, e.g. --labels-per-class 1 10 100 all')
        return
    if args.augment:
        raise common.UsageError('--labels-per-class fits the fast probe; drop --augment')
    if args.compare_random_init and args.random_init:
        raise common.UsageError('--compare-random-init compares a checkpoint with its untrained network; '
                                'with --random-init there is no checkpoint: drop one of the two')
    counts = []
    for value in args.labels_per_class:
        if value != 'all' and not (value.isdigit() and int(value) > 0):
            raise common.UsageError(f"--labels-per-class takes whole numbers >= 1 and 'all', not '{value}'")
        counts.append(value if value == 'all' else int(value))
    if len(set(counts)) < len(counts):  # each point is fitted once: say so rather than merge them silently
        raise common.UsageError(f'--labels-per-class {" ".join(args.labels_per_class)} names a count twice; '
                                'name each once')
    args.labels_per_class = sorted(set(counts), key=lambda n: math.inf if n == 'all' else n)
    if args.plot:
        common.check_writable_file(args.plot, '--plot')


# =============================================================================
# Label efficiency: the fast probe on nested subsets of the labelled images
# =============================================================================

def nested_subsets(labels, counts, seed):
    """{n: indices} of the training images kept with n labels per class ('all': every image), sorted. Each
    class's images are put in the order of one permutation drawn from `seed`; subset n takes the first n of
    every class, so a smaller subset lies inside every larger one and holds exactly n images per class."""
    labels = labels.cpu()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    by_class = [order[labels[order] == c] for c in labels.unique().tolist()]
    return {n: torch.arange(len(labels)) if n == 'all' else
            torch.cat([kept[:n] for kept in by_class]).sort().values for n in counts}


def check_subsets(args, labels):
    """Before any fit: each n at most the smallest class, and 2 images left to fit beside the held-out."""
    sizes = torch.bincount(labels.cpu())
    sizes = sizes[sizes > 0]
    largest = max([n for n in args.labels_per_class if n != 'all'], default=0)
    if largest > int(sizes.min()):
        raise common.UsageError(f'--labels-per-class {largest} is more than the {int(sizes.min())} training '
                                f'images of the smallest class; use {int(sizes.min())} or fewer (or all)')
    for n in args.labels_per_class:
        total = len(labels) if n == 'all' else n * len(sizes)
        if total - max(1, round(args.val_fraction * total)) < 2:
            raise common.UsageError(f'--labels-per-class {n} leaves fewer than 2 images to fit beside the '
                                    f'held-out ones ({total} in all); ask for more labels per class')


def labelled_labels(args):
    """The labels of the labelled training images (from the dataset, before any image is read)."""
    base = common.base_dataset(args, common.labelled_split(args))
    return torch.as_tensor(list(base.targets) if hasattr(base, 'targets') else base.labels.tolist()).long()


def label_efficiency(args, features, subsets, num_classes):
    """The fast probe fitted on each subset of the training features (its weight decay chosen on a held-out
    part of that subset alone) and scored on the whole test split: a list of points (dicts)."""
    train_x, train_y, test_x, test_y = features
    points = []
    for n, kept in subsets.items():
        kept = kept.to(train_x.device)
        result = fast_linear_probe(train_x[kept], train_y[kept], test_x, test_y, num_classes,
                                   args.weight_decays, args.val_fraction, args.seed, args.max_iter)
        common.print0(f"  {n} labels per class ({len(kept)} images): top-1 {result['top1']:6.2f}  "
                      f"top-5 {result['top5']:6.2f}")
        points.append(dict(labels_per_class=n, images=len(kept), top1=result['top1'], top5=result['top5'],
                           weight_decay=result['weight_decay'], result=result))
    return points


def plot_label_efficiency(curves, per_class_all, path, title):
    """Top-1 against labels per class (log axis), one line per network in `curves` ({name: points}); 'all'
    is drawn at the mean number of training images per class, `per_class_all`."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        x = [per_class_all if p['labels_per_class'] == 'all' else p['labels_per_class'] for p in points]
        ax.plot(x, [p['top1'] for p in points], marker='o', label=name)
    ticks = [p['labels_per_class'] for p in next(iter(curves.values()))]
    ax.set_xscale('log')
    ax.set_xticks([per_class_all if t == 'all' else t for t in ticks],
                  [f'all ({per_class_all:g})' if t == 'all' else str(t) for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel='labelled training images per class', ylabel='test top-1 (%)', title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# =============================================================================
# What the classifier sees
# =============================================================================

class ProbeFeatures(nn.Module):
    """The frozen features: the backbone's output (ResNet: global-average-pooled, ViT: CLS token after
    the final norm), or, for a ViT, the CLS tokens of its last n blocks (each through the final norm),
    concatenated, optionally with the average of the last block's patch tokens (DINO's eval_linear.py;
    it interleaves the two halves, a permutation that changes nothing for a linear classifier)."""

    def __init__(self, backbone, n_last_blocks=1, avgpool=False):
        super().__init__()
        self.backbone, self.n_last_blocks, self.avgpool = backbone, n_last_blocks, avgpool
        self.embed_dim = backbone.embed_dim * (n_last_blocks + int(avgpool))

    def describe(self):
        if self.n_last_blocks == 1 and not self.avgpool:
            return 'backbone output'
        return (f'CLS tokens of the last {self.n_last_blocks} blocks'
                + (' + average patch token' if self.avgpool else ''))

    def forward(self, x):
        if self.n_last_blocks == 1 and not self.avgpool:
            return self.backbone(x)  # (B, D)
        layers = self.backbone.get_intermediate_layers(x, self.n_last_blocks)  # n x (B, 1 + N, D)
        outputs = [tokens[:, 0] for tokens in layers]
        if self.avgpool:
            outputs.append(layers[-1][:, 1:].mean(dim=1))
        return torch.cat(outputs, dim=1)  # (B, (n + avgpool) * D)


def topk_accuracy(logits, labels):
    """(top-1, top-5) in percent; top-5 is over min(5, classes) guesses."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, k)
    hit = ranked == labels[:, None]
    return 100 * hit[:, 0].double().mean().item(), 100 * hit.any(dim=1).double().mean().item()


# =============================================================================
# Fast protocol: L-BFGS logistic regression, weight decay chosen on held-out training images
# =============================================================================

def fit_logistic_regression(features, labels, num_classes, weight_decay, max_iter=1000, chunk=65536):
    """Multinomial logistic regression by full-batch L-BFGS (float64), on standardised features:
        minimise  1/N sum_i CE(W z_i + b, y_i) + wd / 2 * ||W||_F^2,   z = (x - mean) / std,
    mean and std over these N images; features that do not vary (dead units) get weight 0.
    Returns (weight (C, D), bias (C,)) acting on the raw features x: the standardisation folded in."""
    z, y = features.to(torch.float64, copy=True), labels  # (N, D), standardised in place below
    mean, std = z.mean(dim=0), z.std(dim=0)
    # constant feature -> z = 0
    std = torch.where(std > 1e-8 * std.max(), std, torch.full_like(std, math.inf))
    z.sub_(mean).div_(std)
    weight = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, device=z.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=z.dtype, device=z.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, line_search_fn='strong_wolfe')

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        total = loss.detach()
        for start in range(0, len(z), chunk):  # the logits of a large dataset, a chunk at a time
            part = F.cross_entropy(z[start:start + chunk] @ weight.T + bias, y[start:start + chunk],
                                   reduction='sum') / len(z)  # (c, C) logits
            part.backward()
            total = total + part.detach()
        return total

    optimizer.step(closure)
    weight, bias = weight.detach() / std, bias.detach()  # W z + b = (W / std) x + (b - (W / std) mean)
    return weight, bias - weight @ mean


def split_train_val(n, val_fraction, seed):
    """Indices (fit, val) of a random split of n training images: val holds round(val_fraction * n)
    (at least 1), drawn from `seed` alone, so every process and every run draws the same."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(val_fraction * n))
    return order[n_val:], order[:n_val]


def fast_linear_probe(train_features, train_labels, test_features, test_labels, num_classes, weight_decays,
                      val_fraction=0.1, seed=0, max_iter=1000):
    """The fast protocol. The weight decay is chosen on a held-out part of TRAIN (top-1; ties: the larger
    wd), the classifier refitted with it on all of train; the test labels are read only for the score.
    Returns dict(weight, bias, weight_decay, sweep={wd: val top-1}, top1, top5)."""
    device = train_features.device
    fit, val = (i.to(device) for i in split_train_val(len(train_features), val_fraction, seed))
    sweep = {}
    for wd in weight_decays:
        weight, bias = fit_logistic_regression(train_features[fit], train_labels[fit], num_classes, wd,
                                               max_iter)
        sweep[wd] = topk_accuracy(train_features[val].double() @ weight.T + bias, train_labels[val])[0]
        common.print0(f'  weight decay {wd:g}: top-1 {sweep[wd]:6.2f} on {len(val)} held-out training images')
    best = max(sweep.values())
    chosen = max(wd for wd in weight_decays if sweep[wd] == best)
    weight, bias = fit_logistic_regression(train_features, train_labels, num_classes, chosen, max_iter)
    # DDP: every rank reports rank 0's classifier
    weight, bias = common.broadcast(weight), common.broadcast(bias)
    top1, top5 = topk_accuracy(test_features.double() @ weight.T + bias, test_labels)
    return dict(weight=weight, bias=bias, weight_decay=chosen, sweep=sweep, top1=top1, top5=top5)


# =============================================================================
# Papers' protocol: SGD on augmented views through the frozen backbone
# =============================================================================

def train_on_augmented_views(args, features, backbone, eval_loaders, device):
    """The --augment protocol with args.recipe; returns dict(top1, top5), or None when stopped early."""
    recipe = RECIPES[args.recipe]
    num_classes = args.dataset_info['num_classes']
    optimizer_name = 'LARS (trust coefficient 0.001, bias included)' if args.optimizer == 'lars' else 'SGD'
    common.print0(f"  recipe: {recipe['paper']}: {optimizer_name} momentum {args.momentum}, weight decay 0, "
                  f"lr {args.lr:g} per 256, batch {args.batch_size}, {args.epochs} epochs, "
                  + ('lr x0.1 at epochs ' + ' and '.join(str(m) for m in milestones(args))
                     if recipe['schedule'] == 'step' else 'cosine') + f'; features: {features.describe()}')
    train_views = common.Views([common.augmentation(args.image_size, scale=(0.08, 1.0), jitter_prob=0.0,
                                                    # RandomResizedCrop + flip
                                                    grayscale_prob=0.0, flip=True)])
    loader = common.build_train_loader(args, train_views, device, split=common.labelled_split(args))

    classifier = nn.Linear(features.embed_dim, num_classes)
    nn.init.normal_(classifier.weight, std=0.01)  # all three authors' init
    nn.init.zeros_(classifier.bias)
    model, classifier = common.prepare_model(classifier, args, device)  # DDP: gradients averaged over ranks
    lr = common.scale_lr(args.lr, args.batch_size)
    # wd 0; LARC scales the bias too
    groups = common.param_groups(classifier, 0.0, exclude_bias_and_norm=False)
    optimizer = common.build_optimizer(args, groups, lr)
    if recipe['schedule'] == 'step':  # one value per epoch, as the authors set it
        lr_schedule = common.step_schedule(lr, args.epochs, 1, milestones(args))
    else:
        lr_schedule = common.cosine_schedule(lr, 0.0, args.epochs, 1)

    start_epoch = common.resume(args, classifier=classifier, optimizer=optimizer)
    logger = common.MetricLogger(args, loader)
    for epoch in range(start_epoch, args.epochs):
        common.set_lr(optimizer, lr_schedule[epoch])
        for i, (views, labels, _) in enumerate(loader.epoch(epoch)):
            step = epoch * len(loader) + i
            with torch.no_grad(), common.autocast(device, args):
                x = features(views[0]).float()  # frozen backbone, eval mode: (B, D)
            loss = F.cross_entropy(model(x), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            logger.step(epoch, step, loss, lr=lr_schedule[epoch])
        logger.end_epoch(epoch)
        common.save_checkpoint(args, epoch + 1, backbone, classifier=classifier, optimizer=optimizer)
        if args.stop_after_epoch == epoch + 1 and epoch + 1 < args.epochs:
            common.print0(f'  stopped after epoch {epoch + 1}; the same command resumes from '
                          f'{common.checkpoint_path(args)}')
            return None

    test_features, test_labels = common.extract_features(features, eval_loaders[1], device, args,
                                                         normalize=False)
    with torch.no_grad():
        top1, top5 = topk_accuracy(classifier(test_features), test_labels)
    logger.log(epoch=args.epochs, linear_top1=top1, linear_top5=top5)
    return dict(top1=top1, top5=top5)


def milestones(args):
    """MoCo's lr steps at epochs 60 and 80 of 100: the same fractions of --epochs."""
    return [round(fraction * args.epochs) for fraction in RECIPES['moco']['milestones']]


def check_resume_source(args):
    """A classifier checkpoint in --output-dir must come from the same backbone, data, recipe and features."""
    saved = common.checkpoint_args(args)
    if saved is None:
        return
    for key in ('checkpoint', 'random_init', 'data', 'recipe', 'n_last_blocks', 'avgpool_patchtokens'):
        ours, theirs = getattr(args, key), saved.get(key, getattr(args, key))
        if key == 'checkpoint' and ours and theirs:  # the same file, however it is spelled
            ours, theirs = os.path.abspath(ours), os.path.abspath(theirs)
        if ours != theirs:
            raise common.UsageError(f"{common.checkpoint_path(args)} was trained with "
                                    f"{key.replace('_', '-')} {saved[key]}, not {getattr(args, key)}; "
                                    'use another --output-dir')


def main():
    args, state = common.parse_eval_args(parser, load_released=released.load)
    check_linear_args(args)
    if args.json:
        common.check_writable_file(args.json, '--json')
    if args.augment:
        check_resume_source(args)
    if args.dataset_info['num_classes'] < 2:
        raise common.UsageError(f"--data {args.data} has {args.dataset_info['num_classes']} class: a linear "
                                'probe needs at least 2 classes (with one, every prediction is right)')
    device, rank, world_size, is_main = common.setup(args)
    backbone = common.load_eval_backbone(args, state, device)
    features = ProbeFeatures(backbone, args.n_last_blocks, args.avgpool_patchtokens)
    eval_loaders = common.build_eval_loaders(args, device)
    if eval_loaders is None:
        raise common.UsageError(f'{args.data} has no labelled test split to evaluate on')
    num_classes = args.dataset_info['num_classes']
    start = time.time()

    if args.augment:
        results = train_on_augmented_views(args, features, backbone, eval_loaders, device)
        if results is None:
            return
        record = dict(protocol='augment', recipe=args.recipe, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, weight_decay=0.0)
    else:
        num_train = eval_loaders[0].dataset_size
        if num_train - max(1, round(args.val_fraction * num_train)) < 2:
            raise common.UsageError(f'--val-fraction {args.val_fraction} leaves fewer than 2 of the '
                                    f'{num_train} training images to fit; use a smaller fraction')
        if round(args.val_fraction * num_train) < 5:  # the weight decay would be picked on a coin toss
            held_out = round(args.val_fraction * num_train)
            raise common.UsageError(f'--val-fraction {args.val_fraction} holds out {held_out} of the '
                                    f'{num_train} training images, too few to choose the weight decay on; '
                                    f'use at least {5 / num_train:.3g}')
        common.print0(f'  fast linear probe: L-BFGS logistic regression on the standardised '
                      f'{features.describe()} ({features.embed_dim}-d), weight decay chosen on held-out '
                      f'training images (seed {args.seed})')
        if args.labels_per_class:
            check_subsets(args, labelled_labels(args))
        train_x, train_y, test_x, test_y = common.extract_train_test_features(
            features, eval_loaders, device, args, normalize=False)
        curves = {}
        if args.labels_per_class:
            subsets = nested_subsets(train_y, args.labels_per_class, args.seed)
            name = f"{state['method']} epoch {state['epoch']}" if state else 'random-init'
            curves[name] = label_efficiency(args, (train_x, train_y, test_x, test_y), subsets, num_classes)
            if args.compare_random_init:
                untrained = ProbeFeatures(common.load_untrained_backbone(args, state, device),
                                          args.n_last_blocks, args.avgpool_patchtokens)
                common.print0('  the untrained network of the same seed:')
                untrained_features = common.extract_train_test_features(untrained, eval_loaders, device, args,
                                                                        normalize=False)
                curves['untrained (same seed)'] = label_efficiency(args, untrained_features, subsets,
                                                                   num_classes)
            if args.plot and is_main:
                data_name = os.path.basename(os.path.normpath(args.data))
                plot_label_efficiency(curves, len(train_y) / len(train_y.unique()), args.plot,
                                      f'linear probe (fast) on {data_name}')
                common.print0(f'  label-efficiency curve -> {args.plot}')
        everything = [p for p in next(iter(curves.values()), []) if p['labels_per_class'] == 'all']
        if everything:  # the 'all' point is the plain fast probe: not fitted twice
            results = everything[0]['result']
        else:
            results = fast_linear_probe(train_x, train_y, test_x, test_y, num_classes, args.weight_decays,
                                        args.val_fraction, args.seed, args.max_iter)
        curve_record = {}
        if curves:  # every point of every curve (the classifiers left out)
            curve_record = dict(subsets_seed=args.seed, label_efficiency={
                name: [{k: v for k, v in p.items() if k != 'result'} for p in points]
                for name, points in curves.items()})
        record = dict(**curve_record,protocol='fast', recipe=None, weight_decay=results['weight_decay'],
                      weight_decay_sweep={f'{wd:g}': top1 for wd, top1 in results['sweep'].items()},
                      val_images=max(1, round(args.val_fraction * num_train)), max_iter=args.max_iter)
    seconds = time.time() - start
    common.print0(f"linear probe ({record['protocol']}{', ' + args.recipe if args.augment else ''}): "
                  f"top-1 {results['top1']:6.2f}  top-5 {results['top5']:6.2f}  "
                  f"(weight decay {record['weight_decay']:g}, {seconds:.0f} s)")
    if args.json and is_main:
        common.write_json(args.json, dict(
            checkpoint=args.checkpoint, method=state['method'] if state else 'random-init',
            epoch=state['epoch'] if state else 0, data=args.data, arch=args.arch,
            features=features.describe(), feature_dim=features.embed_dim, **record, top1=results['top1'],
            top5=results['top5'], seconds=seconds))


if __name__ == '__main__':
    common.run(main)
