"""SimSiam: Exploring Simple Siamese Representation Learning.
Xinlei Chen, Kaiming He. CVPR 2021. arXiv:2011.10566.
Docs: docs/simsiam.md

The idea: BYOL without the momentum encoder. One encoder f (backbone, projector) sees both views;
a predictor h on one branch matches the other branch's projection z, held by a stop-gradient.
Stop-gradient and predictor together prevent collapse (Sec. 4.1-4.2; without either it collapses):
no negatives, no large batch, no moving average.

Paper -> code:
  Alg. 1, Sec. 3     views x1, x2 = aug(x), aug(x): two draws from T (T' = T) -> main(): `view`, `view_prime`
  Alg. 1, Sec. 3     projection z = f(x) (one f for both views), prediction p = h(z)   -> SimSiam.forward
  Eq. (1), (3), (4)  L = D(p1, sg(z2))/2 + D(p2, sg(z1))/2, D = -cosine -> negative_cosine, simsiam_loss
  Alg. 1, Sec. 4.2   update f and h, h at a fixed lr (no decay); no target network     -> main()
  the recipe (optimizer, lr, weight decay, batch, epochs, ...)  -> the defaults in the Arguments block below

Run:
  python simsiam.py --data cifar10                             # one GPU (or CPU): CIFAR preset, ResNet-18
  torchrun --nproc_per_node=8 simsiam.py --data /imagenet      # the paper's ImageNet recipe: the defaults
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
      simsiam.py --data /imagenet                              # 4 nodes x 8 GPUs, the same command on each
"""
import argparse
from collections import OrderedDict

import torch.nn as nn
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# Arguments: shared flags from common.py, then the method's own.
# Defaults: the paper's ImageNet recipe (the block below); CIFAR: SMALL_IMAGE_PRESET.
# -----------------------------------------------------------------------------
parser = common.get_args_parser(__doc__, method='simsiam')
method = parser.add_argument_group('SimSiam')
method.add_argument('--fix-pred-lr', action=argparse.BooleanOptionalAction, default=True,
                    help='predictor lr fixed')
method.add_argument('--proj-hidden-dim', type=int, help='hidden width of the projector')
method.add_argument('--proj-dim', type=int, help='output width of the projector (z)')
method.add_argument('--proj-layers', type=int, help='layers of the projector')
method.add_argument('--pred-hidden-dim', type=int, help='hidden width of the predictor')
method.add_argument('--blur-probs', type=float, nargs=2, help="blur probability of the two views (T, T')")
method.add_argument('--solarize-probs', type=float, nargs=2,
                    help="solarize probability of the two views (T, T')")
method.add_argument('--jitter', type=float, nargs=4, help='ColorJitter strengths (p 0.8)')
method.add_argument('--min-scale', type=float, help='RandomResizedCrop scale lower bound')
# The paper's recipe (Sec. 3): optimisation, heads (a 512-d predictor bottleneck), the SAME T for both views
parser.set_defaults(arch='resnet50', epochs=100, batch_size=512, optimizer='sgd', warmup_epochs=0,
                    lr=0.05, weight_decay=1e-4, zero_init_residual=True,
                    proj_hidden_dim=2048, proj_dim=2048, proj_layers=3, pred_hidden_dim=512, min_scale=0.2,
                    blur_probs=(0.5, 0.5), solarize_probs=(0.0, 0.0), jitter=(0.4, 0.4, 0.4, 0.1))
# Small images (CIFAR): SGD lr 0.03 per 256, wd 5e-4, a 2-layer projector, no blur (the paper's appendix);
# ResNet-18, batch 512, 200 epochs (this project's budget).
SMALL_IMAGE_PRESET = dict(arch='resnet18', batch_size=512, epochs=200,
                          lr=0.03, weight_decay=5e-4, proj_layers=2, blur_probs=(0.0, 0.0))


# -----------------------------------------------------------------------------
# The method: encoder f (backbone, projector), predictor h, and the loss
# -----------------------------------------------------------------------------
def mlp(in_dim, hidden_dim, out_dim, num_layers=2, bn_on_output=False):
    """(Linear - BN - ReLU) x (num_layers - 1), then Linear: BYOL's projector and predictor,
    SimSiam's predictor. bn_on_output: the last Linear is followed by a BN without affine parameters
    (SimSiam's projector). A Linear followed by BN has no bias: the BN would cancel it (its shift
    plays that role)."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1)
    layers = [m for a, b in zip(dims, dims[1:])
              for m in (nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True))]
    if bn_on_output:
        return nn.Sequential(*layers, nn.Linear(dims[-1], out_dim, bias=False),
                             nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers, nn.Linear(dims[-1], out_dim))


class SimSiam(nn.Module):
    """Encoder f: the backbone (evaluated) and the projector; predictor h (Sec. 3, Alg. 1). Both branches
    share f: no second, moving-average network. The stop-gradient is in the loss, where it is read."""

    def __init__(self, backbone, proj_hidden_dim, proj_dim, pred_hidden_dim, proj_layers):
        super().__init__()
        self.encoder = nn.Sequential(OrderedDict(  # f: backbone and projector, with BN on its output z
            backbone=backbone, projector=mlp(backbone.embed_dim, proj_hidden_dim, proj_dim, proj_layers,
                                             bn_on_output=True)))
        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim)  # h

    def forward(self, views):
        p, z = [], []
        for x in views:  # each view in its own call: BatchNorm statistics per view
            z.append(self.encoder(x))                  # (n, d) z = f(x), the projection
            p.append(self.predictor(z[-1]))            # (n, d) p = h(z), the prediction
        return p[0], p[1], z[0], z[1]                  # (n, d) each: view 1, view 2


def negative_cosine(p, z):
    """Eq. (1) with Eq. (3): D(p, sg(z)) = - p/|p| . z/|z|, averaged over the batch; z is a constant (sg)."""
    p = F.normalize(p.float(), dim=1)                  # (n, d) unit prediction
    z = F.normalize(z.detach().float(), dim=1)         # (n, d) unit target, stop-gradient
    return -(p * z).sum(dim=1).mean()                  # (n,) -> scalar in [-1, 1]


def simsiam_loss(p1, p2, z1, z2):
    """Eq. (4): L = D(p1, sg(z2))/2 + D(p2, sg(z1))/2: each prediction matches the other view's z."""
    return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
def main():
    args = common.parse_args(parser, SMALL_IMAGE_PRESET)
    device, rank, world_size, is_main = common.setup(args)  # torchrun / one process, seed, output dir

    # ---- data: two views of every image, v ~ T and v' ~ T' (the recipe above says whether T' = T)
    view = common.augmentation(args.image_size, scale=(args.min_scale, 1.0), jitter=args.jitter,
                               jitter_prob=0.8, grayscale_prob=0.2, blur_prob=args.blur_probs[0],
                               solarize_prob=args.solarize_probs[0])
    view_prime = common.augmentation(args.image_size, scale=(args.min_scale, 1.0), jitter=args.jitter,
                                     jitter_prob=0.8, grayscale_prob=0.2, blur_prob=args.blur_probs[1],
                                     solarize_prob=args.solarize_probs[1])
    loader = common.build_train_loader(args, common.Views([view, view_prime]), device)
    eval_loaders = common.build_eval_loaders(args, device)  # for the kNN monitor

    # ---- model: encoder f and predictor h; SyncBN and DDP when on several GPUs
    model = SimSiam(
        common.build_backbone(args), args.proj_hidden_dim, args.proj_dim, args.pred_hidden_dim,
        args.proj_layers)
    model, raw_model = common.prepare_model(model, args, device)
    eval_backbone = raw_model.encoder.backbone  # evaluated by kNN, exported with the checkpoint

    # ---- optimizer and schedules: SGD (weight decay on every parameter, as the authors), cosine; h: fixed lr
    lr = common.scale_lr(args.lr, args.batch_size)
    groups = [dict(group, fixed_lr=args.fix_pred_lr and part is raw_model.predictor)  # set_lr skips fixed_lr
              for part in (raw_model.encoder, raw_model.predictor)
              for group in common.param_groups(part, args.weight_decay, exclude_bias_and_norm=False)]
    optimizer = common.build_optimizer(args, groups, lr)
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

            # ======== SimSiam (Algorithm 1) ========
            with common.autocast(device, args):
                p1, p2, z1, z2 = model(views)                         # (n, d) each: predictions, projections
            loss = simsiam_loss(p1, p2, z1, z2)                       # Eq. (4), symmetrised, float32
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()                                          # DDP: the same step on all ranks
            # no target network to update: SimSiam is BYOL without the momentum encoder
            # ======== end of SimSiam ========

            logger.step(epoch, step, loss, lr=lr_schedule[step],
                        output_std=common.normalized_output_std(z1))  # ~1/sqrt(d) healthy, 0 collapsed

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
