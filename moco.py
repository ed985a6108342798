"""MoCo: Momentum Contrast for Unsupervised Visual Representation Learning (v1), and MoCo v2.
Kaiming He, Haoqi Fan, Yuxin Wu, Saining Xie, Ross Girshick. CVPR 2020. arXiv:1911.05722.
Xinlei Chen, Haoqi Fan, Ross Girshick, Kaiming He. Improved Baselines with Momentum Contrastive
Learning. Tech. report 2020. arXiv:2003.04297.
Docs: docs/moco.md

The idea: contrastive learning as looking up a dictionary. An encoded query q should match its
key k+ (another view of the same image) and no other key. The dictionary is a queue of the keys
of the last K images, so it can be far larger than a batch; its keys come from a key encoder f_k
that is a slowly moving average of the query encoder f_q, so keys enqueued many steps apart stay
comparable. Only f_q is trained. Shuffling the key batch across GPUs before f_k ("shuffle BN")
keeps BatchNorm from leaking which key belongs to which query. MoCo v2 adds SimCLR's two
findings: an MLP head and stronger augmentation (blur), plus a cosine learning rate.

Paper -> code:
  Alg. 1             two views x_q = aug(x), x_k = aug(x)            -> main(): `view`, `views`
  Alg. 1, Sec. 3.3   q = f_q(x_q), k = f_k(x_k), L2-normalised       -> MoCo.forward
  Sec. 3.3           shuffle BN (DDP), split BN (one device) -> batch_shuffle, batch_unshuffle, SplitBatchNorm
  Eq. (1), Alg. 1    InfoNCE: logits [q.k+, q.queue] / T, label 0    -> info_nce_loss
  Eq. (2), Alg. 1    f_k <- m f_k + (1 - m) f_q, before the keys      -> main(): common.ema_update
  Alg. 1, Sec. 3.2   enqueue the batch's keys, dequeue the oldest    -> MoCo.enqueue
  v2 Sec. 2-3        v2 = v1 + MLP head + blur + cosine lr (+ its temperature) -> VERSIONS, apply_version
  the recipe (optimizer, lr, weight decay, batch, epochs, ...)  -> the defaults in the Arguments block below

Run:
  python moco.py --data cifar10                                # one GPU (or CPU): CIFAR preset, ResNet-18
  torchrun --nproc_per_node=8 moco.py --data /imagenet         # the paper's ImageNet recipe: the defaults
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
      moco.py --data /imagenet                                 # 4 nodes x 8 GPUs, the same command on each
"""
import argparse
import copy
import os
import sys
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# Arguments: shared flags from common.py, then MoCo's own.
# Defaults: the papers' ImageNet recipe (v1 Sec. 3.3, 4; v2 Sec. 3; VERSIONS); CIFAR: SMALL_IMAGE_PRESET.
# -----------------------------------------------------------------------------
parser = common.get_args_parser(__doc__, method='moco')
parser.set_defaults(arch='resnet50', epochs=200, batch_size=256, optimizer='sgd', lr=0.03, weight_decay=1e-4,
                    sync_bn=False)  # shuffle BN replaces SyncBN (Sec. 3.3)
method = parser.add_argument_group('MoCo')
method.add_argument('--moco-version', default='v2', choices=('v1', 'v2'),
                    help="the paper's recipe: v1, or v2 = v1 + MLP head + blur + cosine lr + T 0.2; "
                         '--mlp, --aug-plus, --cos, --temperature and --blur-prob override its pieces')
method.add_argument('--mlp', action=argparse.BooleanOptionalAction, default=None,
                    help='2-layer MLP head instead of one linear layer (default: on for v2)')
method.add_argument('--aug-plus', action=argparse.BooleanOptionalAction, default=None,
                    help='v2 colour jitter: (0.4, 0.4, 0.4, 0.1) p 0.8 (v1: (0.4, 0.4, 0.4, 0.4) always)')
method.add_argument('--cos', action=argparse.BooleanOptionalAction, default=None,
                    help='cosine lr schedule (default: on for v2; v1 multiplies lr by 0.1 at --lr-steps)')
method.add_argument('--temperature', type=float, default=None, help='InfoNCE tau, Eq. (1): per version')
method.add_argument('--blur-prob', type=float, default=None, help='blur probability (0.5 with --aug-plus)')
method.add_argument('--queue-size', type=int, default=65536, help='K: queued keys (a multiple of the batch)')
method.add_argument('--key-momentum', type=float, default=0.999, help='m of the key encoder update, Eq. (2)')
method.add_argument('--proj-dim', type=int, default=128, help='output width of the encoders (q, k)')
method.add_argument('--min-scale', type=float, default=0.2, help='RandomResizedCrop scale lower bound')
method.add_argument('--lr-steps', type=int, nargs='+', default=[120, 160], help='epochs: lr x0.1 (no --cos)')
method.add_argument('--symmetric', action=argparse.BooleanOptionalAction, default=False,
                    help='symmetrised loss: both views serve as query and as key (authors\' CIFAR demo)')
method.add_argument('--bn-splits', type=int, default=8,
                    help='one device only: BatchNorm statistics over this many sub-batches (split BN)')
# Small images (CIFAR): the authors' CIFAR-10 demo (lr 0.06 per 512 = 0.03 per 256, cosine, split BN 8,
# RandomResizedCrop default scale, symmetric loss) with v2's MLP head; no blur at 32 px.
SMALL_IMAGE_PRESET = dict(arch='resnet18', batch_size=512, epochs=200, lr=0.03, weight_decay=5e-4,
                          queue_size=4096, key_momentum=0.99, temperature=0.1, min_scale=0.08, blur_prob=0.0,
                          symmetric=True)
# The pieces of each version (v1: Sec. 3.3; v2: Chen et al. Sec. 2), for every one of these flags left unset
VERSIONS = dict(v1=dict(mlp=False, aug_plus=False, cos=False, temperature=0.07),
                v2=dict(mlp=True,  aug_plus=True,  cos=True,  temperature=0.2))


def apply_version(args):
    """Fill in the pieces of --moco-version the user (or the preset) did not set; printed."""
    recipe = {key: value for key, value in VERSIONS[args.moco_version].items() if getattr(args, key) is None}
    for key, value in recipe.items():
        setattr(args, key, value)
    if args.blur_prob is None:  # blur belongs to v2's stronger augmentation
        args.blur_prob = recipe['blur_prob'] = 0.5 if args.aug_plus else 0.0
    args.notes.append(f'MoCo {args.moco_version} (' + ', '.join(f'{k}={v}' for k, v in recipe.items()) + ')')


# -----------------------------------------------------------------------------
# The method: query and key encoders, the queue, shuffle BN, and the InfoNCE loss
# -----------------------------------------------------------------------------
class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from `num_splits` sub-batches (sample j goes to
    sub-batch j % num_splits), as if each ran on its own GPU: on one device this is what gives
    shuffle BN its meaning (the authors' CIFAR demo). Running statistics: the mean over the
    sub-batches. Evaluation mode is plain BatchNorm; the state dict is BatchNorm2d's."""

    def __init__(self, num_features, num_splits):
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.num_splits
        running_mean, running_var = self.running_mean.repeat(s), self.running_var.repeat(s)
        # (n/s, c*s, H, W): one set of channels per split
        y = F.batch_norm(x.reshape(n // s, c * s, h, w), running_mean, running_var,
                         self.weight.repeat(s), self.bias.repeat(s), True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(s, c).mean(0))
            self.running_var.copy_(running_var.view(s, c).mean(0))
            self.num_batches_tracked.add_(1)
        return y.reshape(n, c, h, w)


def split_batchnorm(module, num_splits):
    """Replace every BatchNorm2d inside `module` by a SplitBatchNorm (weights kept); returns module."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and num_splits > 1:
            split = SplitBatchNorm(child.num_features, num_splits)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batchnorm(child, num_splits)
    return module


@torch.no_grad()
def batch_shuffle(x):
    """Shuffle BN, step 1 (Sec. 3.3): gather the key images of all GPUs, permute them with ONE
    permutation shared by all ranks, and return this GPU's slice of the shuffled batch, so that
    f_k's BatchNorm statistics come from other images than the queries'. Returns (slice, permutation)."""
    rank, world_size = common.get_rank(), common.get_world_size()
    x_all = common.all_gather_no_grad(x)                             # (N, 3, H, W) DDP: the global key batch
    permutation = torch.randperm(len(x_all), device=x.device)        # (N,)
    common.broadcast(permutation, src=0)                             # DDP: every rank uses rank 0's draw
    return x_all[permutation.view(world_size, -1)[rank]], permutation  # (n, 3, H, W) this GPU's slice


@torch.no_grad()
def batch_unshuffle(k, permutation):
    """Shuffle BN, step 2: gather the keys encoded by all GPUs and give each GPU back the keys of
    its own images, in their original order (shuffled row j holds image permutation[j])."""
    rank, world_size = common.get_rank(), common.get_world_size()
    k_all = common.all_gather_no_grad(k)                             # (N, d) DDP: keys in shuffled order
    return k_all[torch.argsort(permutation).view(world_size, -1)[rank]]  # (n, d) in this GPU's order


class MoCo(nn.Module):
    """The query encoder f_q (backbone + head), the key encoder f_k (its momentum copy, Eq. 2,
    no gradient) and the queue of K keys (Sec. 3.2), a buffer that checkpoints carry.

    The head is one linear layer to 128-d (v1) or Linear-ReLU-Linear (v2, Sec. 2 of Chen et al.).
    With `symmetric`, both views serve as query and as key (the authors' CIFAR demo)."""

    def __init__(self, backbone, out_dim, mlp, queue_size, symmetric, bn_splits):
        super().__init__()
        dim = backbone.embed_dim
        head = (nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim)) if mlp
                else nn.Linear(dim, out_dim))
        self.f_q = split_batchnorm(nn.Sequential(OrderedDict(backbone=backbone, head=head)), bn_splits)
        self.f_k = copy.deepcopy(self.f_q).requires_grad_(False)  # initialised as f_q (Alg. 1)
        self.symmetric = symmetric
        self.register_buffer('queue', F.normalize(torch.randn(queue_size, out_dim), dim=1))  # (K, 128) unit
        self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))  # where the next keys go

    def forward(self, views):
        pairs = [(views[0], views[1])] + ([(views[1], views[0])] if self.symmetric else [])  # (query, key)
        queries = [F.normalize(self.f_q(x_q), dim=1) for x_q, _ in pairs]   # (n, 128) each, unit length
        keys = []
        with torch.no_grad():                                           # no gradient to keys (Alg. 1)
            for _, x_k in pairs:
                x_k, permutation = batch_shuffle(x_k)                   # (n, 3, H, W) DDP: shuffle BN
                k = F.normalize(self.f_k(x_k), dim=1)                   # (n, 128)
                keys.append(batch_unshuffle(k, permutation))            # (n, 128) DDP: back in order
        return queries, keys

    @torch.no_grad()
    def enqueue(self, keys):
        """Enqueue the keys of the global batch, overwriting the oldest ones (Alg. 1, Sec. 3.2)."""
        keys = common.all_gather_no_grad(keys.float())                  # (N, 128) DDP: the same queue on all
        positions = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)  # (N,)
        self.queue.index_copy_(0, positions, keys)
        self.queue_ptr.add_(len(keys)).remainder_(len(self.queue))


def info_nce_loss(q, k, queue, temperature):
    """InfoNCE (Eq. 1; Alg. 1) for this GPU's queries, with the queue as the negatives.

    q: (n, d) queries, k: (n, d) their positive keys, queue: (K, d) negative keys, all L2-normalised.
        L_q = -log  exp(q.k+ / T) / (exp(q.k+ / T) + sum_{i=1..K} exp(q.k_i / T))
    i.e. a (K+1)-way cross-entropy whose correct class is 0, the positive. Mean over the n queries.
    """
    q, k = q.float(), k.float()
    l_pos = (q * k).sum(dim=1, keepdim=True)                         # (n, 1)   q.k+
    l_neg = q @ queue.T                                              # (n, K)   q.k_i for the queued keys
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature          # (n, 1+K)
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)  # (n,)     the positive is class 0
    return F.cross_entropy(logits, labels)


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
def main():
    args = common.parse_args(parser, SMALL_IMAGE_PRESET)
    apply_version(args)  # v1 or v2 pieces not typed
    check_args(args)  # bad input refused before anything is written (the checks: end of the file)
    device, rank, world_size, is_main = common.setup(args)  # torchrun / one process, seed, output dir

    # ---- data: two views of every image, query and key, from the same augmentation (Sec. 3.3; v2 Sec. 2)
    view = common.augmentation(args.image_size, scale=(args.min_scale, 1.0),
                               jitter=(0.4, 0.4, 0.4, 0.1) if args.aug_plus else (0.4, 0.4, 0.4, 0.4),
                               jitter_prob=0.8 if args.aug_plus else 1.0,
                               grayscale_prob=0.2, blur_prob=args.blur_prob)
    loader = common.build_train_loader(args, common.Views([view, view]), device)
    eval_loaders = common.build_eval_loaders(args, device)  # for the kNN monitor

    # ---- model: f_q, f_k and the queue; split BN on one device, shuffle BN and DDP when on several GPUs
    model = MoCo(common.build_backbone(args), args.proj_dim, args.mlp, args.queue_size, args.symmetric,
                 args.bn_splits if world_size == 1 else 1)
    model, raw_model = common.prepare_model(model, args, device)
    eval_backbone = raw_model.f_q.backbone  # evaluated by kNN, exported with the checkpoint

    # ---- optimizer and schedules: SGD, weight decay on every parameter (authors' code); cosine (v2) or steps
    lr = common.scale_lr(args.lr, args.batch_size)
    optimizer = common.build_optimizer(args, common.param_groups(raw_model, args.weight_decay, False), lr)
    lr_schedule = (common.cosine_schedule(lr, args.min_lr, args.epochs, len(loader), args.warmup_epochs)
                   if args.cos else common.step_schedule(lr, args.epochs, len(loader), args.lr_steps))

    # ---- resume from the output directory, if a checkpoint is there
    start_epoch = common.resume(args, model=raw_model, optimizer=optimizer)

    logger = common.MetricLogger(args, loader)
    for epoch in range(start_epoch, args.epochs):
        common.seed_epoch(args, epoch, rank)
        model.train()
        for it, (views, labels, indices) in enumerate(loader.epoch(epoch)):
            step = epoch * len(loader) + it
            common.set_lr(optimizer, lr_schedule[step])

            # ======== MoCo (Algorithm 1) ========
            common.ema_update(raw_model.f_k, raw_model.f_q, args.key_momentum)  # Eq. (2), BEFORE the keys
            with common.autocast(device, args):
                queries, keys = model(views)                          # (n, 128) each
            loss = sum(info_nce_loss(q, k, raw_model.queue.clone(), args.temperature)  # Eq. (1), float32
                       for q, k in zip(queries, keys))                # symmetric: loss_12 + loss_21
            raw_model.enqueue(torch.cat(keys))                        # DDP: keys of all GPUs
            # ======== end of MoCo ========

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()                                          # update f_q only
            logger.step(epoch, step, loss, lr=lr_schedule[step])

        # ---- end of epoch: loss check, kNN monitor, checkpoint
        logger.end_epoch(epoch)
        if common.knn_due(args, epoch):
            logger.log(epoch=epoch + 1, **common.knn_monitor(eval_backbone, eval_loaders, device, args))
        common.save_checkpoint(args, epoch + 1, backbone=eval_backbone, model=raw_model, optimizer=optimizer)
        if epoch + 1 == args.stop_after_epoch:
            break
    common.plot_metrics(args.output_dir)


# ---- input checks, called at the start of main(): a one-line error before anything is written
def check_args(args):
    """The queue holds a whole number of steps' keys; split BN divides the batch (one device); --lr-steps only
    with the step schedule."""
    if args.cos and 'lr_steps' in common.explicit_flags(parser, sys.argv[1:]):  # the cosine would ignore them
        raise common.UsageError(f'--lr-steps sets the step schedule, but the lr of this run follows the '
                                f'cosine (--cos, MoCo {args.moco_version}\'s); add --no-cos to multiply the '
                                f'lr by 0.1 at --lr-steps {" ".join(map(str, args.lr_steps))}')
    keys_per_step = args.batch_size * (2 if args.symmetric else 1)
    if args.queue_size <= 0 or args.queue_size % keys_per_step:
        symmetric = ' x 2, --symmetric' if args.symmetric else ''
        raise common.UsageError(f'--queue-size {args.queue_size} is not a multiple of the {keys_per_step} '
                                f'keys enqueued per step (global batch{symmetric}); '
                                f'use e.g. {max(1, args.queue_size // keys_per_step) * keys_per_step}')
    one_device = int(os.environ.get('WORLD_SIZE', 1)) == 1
    if one_device and (args.bn_splits < 1 or args.batch_size % args.bn_splits):
        raise common.UsageError(f'--bn-splits {args.bn_splits} does not divide --batch-size '
                                f'{args.batch_size}; use a divisor (1 = plain BatchNorm)')


if __name__ == '__main__':
    common.run(main)
