"""InstDisc: Unsupervised Feature Learning via Non-Parametric Instance Discrimination.
Zhirong Wu, Yuanjun Xiong, Stella X. Yu, Dahua Lin. CVPR 2018. arXiv:1805.01978.
Docs: docs/instdisc.md

The idea: treat every training image as its own class and learn a 128-d unit-length embedding
that tells each image apart from all the others. A parametric classifier with one weight vector
per image would not scale and would not generalise, so the class weights are replaced by the
embeddings themselves: a memory bank keeps one (slightly stale) embedding per training image,
and an image's score for "class" j is its cosine with bank entry j, divided by a temperature
(the non-parametric softmax). With a million classes the softmax's denominator is too costly,
so noise-contrastive estimation tells the true entry apart from K random ones. After each step
the batch's fresh embeddings are written back into the bank. It is MoCo's ancestor: MoCo replaces
the bank by a queue filled by a momentum encoder (`diff instdisc.py moco.py`).

Paper -> code:
  Sec. 3.1           one view x_i = aug(x) and its index i             -> main(): `view`, `views`, `indices`
  Sec. 3.1           f_i = normalise(f(x_i)) (ResNet + linear, 128-d)  -> InstDisc.forward
  Eqs. (2), (3)      non-parametric softmax over the whole bank     -> non_parametric_softmax_loss (--nce-k 0)
  Eqs. (4)-(7)       NCE with K noise entries and normaliser Z        -> nce_loss
  Sec. 3.2           memory bank V, v_i <- f_i after each step         -> InstDisc.update_memory
  the recipe (optimizer, lr, weight decay, batch, epochs, ...)  -> the defaults in the Arguments block below

Run:
  python instdisc.py --data cifar10                            # one GPU (or CPU): CIFAR preset, ResNet-18
  torchrun --nproc_per_node=8 instdisc.py --data /imagenet     # the paper's ImageNet recipe: the defaults
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
      instdisc.py --data /imagenet                             # 4 nodes x 8 GPUs, the same command on each
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# Arguments: shared flags from common.py, then InstDisc's own.
# Defaults: the paper's ImageNet recipe (Sec. 4 and the authors' code); CIFAR: SMALL_IMAGE_PRESET.
# -----------------------------------------------------------------------------
parser = common.get_args_parser(__doc__, method='instdisc')
parser.set_defaults(arch='resnet50', epochs=200, batch_size=256, optimizer='sgd', lr=0.03, weight_decay=1e-4)
method = parser.add_argument_group('InstDisc')
method.add_argument('--temperature', type=float, default=0.07, help='softmax temperature tau, Eq. (2)')
method.add_argument('--nce-k', type=int, default=4096,
                    help='K: noise samples per image for NCE, Eq. (6); 0 = the exact softmax over the bank')
method.add_argument('--nce-z-momentum', type=float, default=1.0,
                    help='normaliser Z, Eq. (7): 1 = estimated on the first batch, then fixed (authors\' '
                         'code); < 1 = moving average of every batch\'s estimate (e.g. 0.99)')
method.add_argument('--memory-momentum', type=float, default=0.5,
                    help='bank update v_i <- normalise(m v_i + (1-m) f_i)')
method.add_argument('--proj-dim', type=int, default=128, help='width of the embedding f_i and of the bank')
method.add_argument('--min-scale', type=float, default=0.2, help='RandomResizedCrop scale lower bound')
method.add_argument('--lr-steps', type=int, nargs='+', default=[120, 160], help='epochs where lr x0.1')
# Small images (CIFAR): the authors' CIFAR-10 command (lr 0.03 per 128 = 0.06 per 256, the exact softmax
# over all 50k bank entries: --nce-k 0), 200 epochs, lr x0.1 at 120 and 160.
SMALL_IMAGE_PRESET = dict(arch='resnet18', batch_size=128, epochs=200, lr=0.06, weight_decay=5e-4,
                          temperature=0.1, nce_k=0)


# -----------------------------------------------------------------------------
# The method: the embedding network, the memory bank, and the two losses
# -----------------------------------------------------------------------------
class InstDisc(nn.Module):
    """The network f (backbone + a linear layer to 128-d, L2-normalised: Sec. 3.1) and the memory
    bank V with one row per training image (Sec. 3.2), a buffer that checkpoints carry, as is the
    NCE normaliser Z (negative until estimated).

    The bank starts uniform in +-1/sqrt(d/3) (not normalised), as in the authors' code."""

    def __init__(self, backbone, out_dim, num_images):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, out_dim)
        bound = 1 / math.sqrt(out_dim / 3)
        self.register_buffer('memory_bank', (torch.rand(num_images, out_dim) * 2 - 1) * bound)  # (N, 128) V
        self.register_buffer('nce_z', torch.tensor(-1.0))  # Z of Eq. (7); < 0: not estimated yet

    def forward(self, views):
        return F.normalize(self.head(self.backbone(views[0])), dim=1)  # (n, 128) f_i, unit length

    @torch.no_grad()
    def update_memory(self, f, indices, momentum):
        """Sec. 3.2: after the step, each image's fresh feature goes into its memory entry, mixed
        with the old entry (momentum 0.5 in the authors' code; 0 = plain replacement) and
        re-normalised: v_i <- normalise(m v_i + (1 - m) f_i)."""
        f = common.all_gather_no_grad(f.float())                        # (B, 128) DDP: the global batch's f
        indices = common.all_gather_no_grad(indices)                    # (B,)     DDP: and their indices
        mixed = momentum * self.memory_bank[indices] + (1 - momentum) * f  # (B, 128)
        self.memory_bank.index_copy_(0, indices, F.normalize(mixed, dim=1))


def non_parametric_softmax_loss(f, indices, memory_bank, temperature):
    """Eq. (3) with the exact non-parametric softmax of Eq. (2), over all N bank entries:
        P(i | f_i) = exp(v_i.f_i / T) / sum_{j=1..N} exp(v_j.f_i / T),    J = -mean_i log P(i | f_i)
    f: (n, d) features (unit length), indices: (n,) their images, memory_bank: (N, d) V."""
    logits = f.float() @ memory_bank.T / temperature                 # (n, N)  v_j.f_i / T for every image j
    return F.cross_entropy(logits, indices)                          # image i is the class of f_i


def nce_loss(f, indices, memory_bank, z, num_noise, temperature, z_momentum):
    """NCE (Eqs. 4-7): tell the data sample (v_i, f_i) apart from K noise samples j ~ P_n = 1/N.

        P(j | f_i) = exp(v_j.f_i / T) / Z                                 Eq. (4), one Z for all i
        h(j, f_i)  = P(j | f_i) / (P(j | f_i) + K P_n(j))                 Eq. (5)
        J_NCE      = -mean_i [ log h(i, f_i) + sum_{K noise j} log(1 - h(j, f_i)) ]   Eq. (6)
        Z          = N mean_j exp(v_j.f_i / T) over the batch's samples  Eq. (7)
    Z (the buffer `z`) is estimated on the first batch and then kept (authors' code), or, with
    z_momentum < 1, moved towards every batch's estimate. Noise indices: torch.randint(N, (n, K)),
    uniform, and may include i itself, as in the authors' code.
    """
    f = f.float()
    n, num_images = len(f), len(memory_bank)
    noise = torch.randint(num_images, (n, num_noise), device=f.device)  # (n, K) j ~ P_n
    v = memory_bank[torch.cat([indices[:, None], noise], dim=1)]     # (n, 1+K, d) v_i, then the K noise
    scores = torch.exp(torch.einsum('nkd,nd->nk', v, f) / temperature)  # (n, 1+K) exp(v_j.f_i / T)
    # Eq. (7); DDP: the mean of every GPU's estimate
    estimate = common.all_reduce_sum(scores.detach().mean() * num_images) / common.get_world_size()
    z.copy_(torch.where(z < 0, estimate, z_momentum * z + (1 - z_momentum) * estimate))
    p = scores / z                                                   # (n, 1+K) P(j | f_i), Eq. (4)
    noise_mass = num_noise / num_images                              # K P_n(j)
    eps = 1e-7  # in both denominators, as the authors' NCECriterion (lemniscate.pytorch, lib/NCECriterion.py)
    log_h = torch.log(p[:, 0] / (p[:, 0] + noise_mass + eps))        # (n,)   log h(i, f_i): the data sample
    log_not_h = torch.log(noise_mass / (p[:, 1:] + noise_mass + eps))  # (n, K) log(1 - h(j, f_i)): the noise
    return -(log_h + log_not_h.sum(dim=1)).mean()                    # Eq. (6)


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
def main():
    args = common.parse_args(parser, SMALL_IMAGE_PRESET)
    check_args(args)  # bad input refused before anything is written (the checks: end of the file)
    device, rank, world_size, is_main = common.setup(args)  # torchrun / one process, seed, output dir

    # ---- data: one view of every image and its index i: each image is its own class (Sec. 3.1)
    view = common.augmentation(args.image_size, scale=(args.min_scale, 1.0),
                               jitter=(0.4, 0.4, 0.4, 0.4),
                               jitter_prob=1.0,
                               grayscale_prob=0.2)
    loader = common.build_train_loader(args, common.Views([view]), device)
    eval_loaders = common.build_eval_loaders(args, device)  # for the kNN monitor

    # ---- model: f and the memory bank (one row per training image); SyncBN and DDP when on several GPUs
    model = InstDisc(common.build_backbone(args), args.proj_dim, num_images=loader.dataset_size)
    model, raw_model = common.prepare_model(model, args, device)
    eval_backbone = raw_model.backbone  # evaluated by kNN, exported with the checkpoint

    # ---- optimizer and schedules: SGD, weight decay on every parameter (authors' code); lr x0.1 at steps
    lr = common.scale_lr(args.lr, args.batch_size)
    optimizer = common.build_optimizer(args, common.param_groups(raw_model, args.weight_decay, False), lr)
    lr_schedule = common.step_schedule(lr, args.epochs, len(loader), args.lr_steps)

    # ---- resume from the output directory, if a checkpoint is there
    start_epoch = common.resume(args, model=raw_model, optimizer=optimizer)

    logger = common.MetricLogger(args, loader)
    for epoch in range(start_epoch, args.epochs):
        common.seed_epoch(args, epoch, rank)
        model.train()
        for it, (views, labels, indices) in enumerate(loader.epoch(epoch)):
            step = epoch * len(loader) + it
            common.set_lr(optimizer, lr_schedule[step])

            # ======== InstDisc (Sec. 3) ========
            with common.autocast(device, args):
                features = model(views)                               # (n, 128) f_i
            if args.nce_k > 0:                                        # Eqs. (4)-(7), float32
                loss = nce_loss(features, indices, raw_model.memory_bank, raw_model.nce_z, args.nce_k,
                                args.temperature, args.nce_z_momentum)
            else:                                                     # Eqs. (2)-(3), float32
                loss = non_parametric_softmax_loss(features, indices, raw_model.memory_bank.clone(),
                                                   args.temperature)
            raw_model.update_memory(features, indices, args.memory_momentum)  # DDP: features of all GPUs
            # ======== end of InstDisc ========

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()                                          # update f
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
    """NCE needs fewer noise samples than images; the momenta are fractions."""
    num_images = args.dataset_info['num_train']
    if not 0 <= args.nce_k < num_images:
        raise common.UsageError(f'--nce-k {args.nce_k} must be at least 0 and below the {num_images} '
                                'training images; use a smaller K, or 0 for the exact softmax over the '
                                'memory bank')
    if not (0 <= args.memory_momentum < 1 and 0 <= args.nce_z_momentum <= 1):
        raise common.UsageError('--memory-momentum must be in [0, 1) and --nce-z-momentum in [0, 1]')


if __name__ == '__main__':
    common.run(main)
