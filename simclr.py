"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations.
Ting Chen, Simon Kornblith, Mohammad Norouzi, Geoffrey Hinton. ICML 2020. arXiv:2002.05709.
Docs: docs/simclr.md

The idea: show the network two random augmentations of the same image and train it so that
their embeddings are closer to each other than to the embeddings of every other image in
the batch. No memory bank and no momentum encoder: the negatives are simply the other 2N-2
views of the (large) batch, which is why SimCLR needs big batches, LARS and a strong
colour distortion. A small MLP "projection head" g sits on top of the encoder f during
training; the representation that is evaluated is h = f(x), before the head.

Paper -> code:
  Alg. 1 lines 3-6   two views x~_2k-1 = t(x_k), x~_2k = t'(x_k)   -> main(): `view`, `views`
  Alg. 1 lines 4, 7  h = f(x~)  (ResNet, global-pooled)            -> SimCLR.forward, self.backbone
  Alg. 1 lines 5, 8  z = g(h)   (projection head, Sec. 4.2)        -> SimCLR.forward, self.projector
  Alg. 1 lines 10-13 / Eq. (1)  NT-Xent over the 2N views          -> nt_xent_loss
  Alg. 1 line 14     update f and g                                -> main(): LARS step
  the recipe (optimizer, lr, weight decay, batch, epochs, ...)  -> the defaults in the Arguments block below

Run:
  python simclr.py --data cifar10                              # one GPU (or CPU): CIFAR preset, ResNet-18
  torchrun --nproc_per_node=8 simclr.py --data /imagenet       # the paper's ImageNet recipe: the defaults
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
      simclr.py --data /imagenet                               # 4 nodes x 8 GPUs, the same command on each
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# Arguments: shared flags from common.py, then SimCLR's own.
# Defaults: the paper's ImageNet recipe (Appendix B.1, Sec. 4.2, Appendix A); CIFAR: SMALL_IMAGE_PRESET.
# -----------------------------------------------------------------------------
parser = common.get_args_parser(__doc__, method='simclr')
parser.set_defaults(arch='resnet50', epochs=1000, batch_size=4096, optimizer='lars', lr=0.3,
                    weight_decay=1e-6, warmup_epochs=10)
method = parser.add_argument_group('SimCLR')
method.add_argument('--temperature', type=float, default=0.1, help='tau of NT-Xent, Eq. (1)')
method.add_argument('--proj-hidden-dim', type=int, default=2048, help='hidden width of the projection head g')
method.add_argument('--proj-dim', type=int, default=128, help='output width of g (z)')
method.add_argument('--color-strength', type=float, default=1.0, help='ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)')
method.add_argument('--blur-prob', type=float, default=0.5, help='Gaussian blur probability (ImageNet only)')
method.add_argument('--min-scale', type=float, default=0.08, help='RandomResizedCrop scale lower bound')
# Small images (CIFAR): the authors' CIFAR-10 reference command (no blur, colour strength 0.5),
# trained 200 epochs (this project's budget; theirs: 1000).
SMALL_IMAGE_PRESET = dict(arch='resnet18', batch_size=512, epochs=200, lr=1.0, weight_decay=1e-4,
                          temperature=0.5, color_strength=0.5, blur_prob=0.0)


# -----------------------------------------------------------------------------
# The method: encoder f + projection head g, and the NT-Xent loss
# -----------------------------------------------------------------------------
class SimCLR(nn.Module):
    """f (the backbone: h = f(x), Alg. 1 lines 4, 7) and the projection head g (z = g(h), lines 5, 8).

    g is the paper's MLP with one hidden layer, W2 ReLU(W1 h) (Sec. 4.2), with BatchNorm after
    each linear layer as in the authors' code (the last one with a scale but no shift)."""

    def __init__(self, backbone, hidden_dim, out_dim):
        super().__init__()
        self.backbone = backbone  # f
        self.projector = nn.Sequential(  # g
            nn.Linear(backbone.embed_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim))
        self.projector[-1].bias.requires_grad_(False)  # no shift on z (center=False in the authors' code)

    def forward(self, views):
        n = views[0].shape[0]
        x = torch.cat(views)                   # (2n, 3, H, W): both views in one batch, so BN sees all 2n
        h = self.backbone(x)                   # (2n, D)    the representation that is evaluated
        z = self.projector(h)                  # (2n, 128)  where the loss is applied
        return z[:n], z[n:]                    # (n, 128) each: z_2k-1 and z_2k of Alg. 1


def nt_xent_loss(z1, z2, temperature):
    """NT-Xent (Eq. 1; Alg. 1 lines 10-13) of this GPU's anchors against the views of ALL GPUs.

    z1, z2: (n, d) projections of the two views of this GPU's n images. Every one of the 2n
    views is an anchor i; its positive j is the other view of the same image, and the
    denominator runs over all 2N views of the global batch except i itself:
        l(i, j) = -log  exp(sim(z_i, z_j) / T) / sum_{k != i} exp(sim(z_i, z_k) / T)
    with sim the cosine similarity. Returns the mean over this GPU's 2n anchors, so that the
    mean over GPUs (what DDP's gradient averaging optimises) is the paper's 1/2N sum.
    """
    n, rank = z1.shape[0], common.get_rank()
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)            # (2n, d) anchors; unit norm: dot = cosine
    # DDP: every GPU's 2n views, rank-major; gradients flow back to the GPU that made them
    keys = common.all_gather_with_grad(z)                           # (2N, d)
    logits = z @ keys.T / temperature                               # (2n, 2N) sim(z_i, z_k) / T
    anchor = torch.arange(2 * n, device=z.device)                   # (2n,) anchor i, local position
    self_index = rank * 2 * n + anchor                              # (2n,) where anchor i sits among the keys
    positive_index = rank * 2 * n + (anchor + n) % (2 * n)          # (2n,) its other view, j
    logits = logits.masked_fill(F.one_hot(self_index, keys.shape[0]).bool(), float('-inf'))  # k != i
    return F.cross_entropy(logits, positive_index)                  # mean over anchors of l(i, j)


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
def main():
    args = common.parse_args(parser, SMALL_IMAGE_PRESET)
    if args.batch_size < 2:  # one image has no negative: the loss is 0 at every step
        raise common.UsageError(f'--batch-size {args.batch_size}: NT-Xent needs at least 2 images')
    device, rank, world_size, is_main = common.setup(args)  # torchrun / one process, seed, output dir

    # ---- data: two views of every image, each drawn from the same family T (Sec. 3, Appendix A)
    view = common.augmentation(args.image_size, scale=(args.min_scale, 1.0),
                               jitter=common.simclr_jitter(args.color_strength), jitter_prob=0.8,
                               grayscale_prob=0.2, blur_prob=args.blur_prob)
    loader = common.build_train_loader(args, common.Views([view, view]), device)
    eval_loaders = common.build_eval_loaders(args, device)  # for the kNN monitor

    # ---- model: f and g; SyncBN and DDP when on several GPUs
    model = SimCLR(common.build_backbone(args), args.proj_hidden_dim, args.proj_dim)
    model, raw_model = common.prepare_model(model, args, device)
    eval_backbone = raw_model.backbone  # evaluated by kNN, exported with the checkpoint

    # ---- optimizer and schedules: LARS (biases and BN excluded), linear warm-up then cosine
    lr = common.scale_lr(args.lr, args.batch_size)
    optimizer = common.build_optimizer(args, common.param_groups(raw_model, args.weight_decay), lr)
    lr_schedule = common.cosine_schedule(lr, args.min_lr, args.epochs, len(loader), args.warmup_epochs)

    # ---- resume from the output directory, if a checkpoint is there
    start_epoch = common.resume(args, model=raw_model, optimizer=optimizer)

    logger = common.MetricLogger(args, loader)
    for epoch in range(start_epoch, args.epochs):
        common.seed_epoch(args, epoch, rank)
        model.train()
        for it, (views, labels, indices) in enumerate(loader.epoch(epoch)):
            step = epoch * len(loader) + it
            common.set_lr(optimizer, lr_schedule[step])

            # ======== SimCLR (Algorithm 1) ========
            with common.autocast(device, args):
                z1, z2 = model(views)                                 # (n, 128) each, lines 3-8
            loss = nt_xent_loss(z1, z2, args.temperature)             # lines 10-13, float32
            # ======== end of SimCLR ========

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()                                          # line 14
            logger.step(epoch, step, loss, lr=lr_schedule[step])

        # ---- end of epoch: loss check, kNN monitor, checkpoint
        logger.end_epoch(epoch)
        if common.knn_due(args, epoch):
            logger.log(epoch=epoch + 1, **common.knn_monitor(eval_backbone, eval_loaders, device, args))
        common.save_checkpoint(args, epoch + 1, backbone=eval_backbone, model=raw_model, optimizer=optimizer)
        if epoch + 1 == args.stop_after_epoch:
            break
    common.plot_metrics(args.output_dir)


if __name__ == '__main__':
    common.run(main)
