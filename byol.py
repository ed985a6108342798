"""BYOL: Bootstrap Your Own Latent - A New Approach to Self-Supervised Learning.
Jean-Bastien Grill, Florian Strub, Florent Altche, Corentin Tallec, et al. NeurIPS 2020. arXiv:2006.07733.
Docs: docs/byol.md

The idea: no negative pairs. An online network (encoder f, projector g, predictor q) predicts the
projection that a target network (f' and g', no predictor) makes of another view of the image.
The target gets no gradient: it is a slow moving average of the online weights.

Paper -> code:
  Sec. 3.3, Table 6  views v = t(x), v' = t'(x), t ~ T, t' ~ T' (asymmetric) -> main(): `view`, `view_prime`
  Sec. 3.1           online prediction q(g(f(v))); target projection z' = g'(f'(v')) -> BYOL.forward
  Eq. (2), Sec. 3.1  L = 2 - 2 cos(q, sg(z')); L_BYOL = L + L~ (views swapped) -> regression_loss, byol_loss
  Eq. (3), Eq. (1)   theta <- optimizer(theta, grad L_BYOL); xi <- tau xi + (1 - tau) theta -> main()
  the recipe (optimizer, lr, weight decay, batch, epochs, ...)  -> the defaults in the Arguments block below

Run:
  python byol.py --data cifar10                                # one GPU (or CPU): CIFAR preset, ResNet-18
  torchrun --nproc_per_node=8 byol.py --data /imagenet         # the paper's ImageNet recipe: the defaults
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
      byol.py --data /imagenet                                 # 4 nodes x 8 GPUs, the same command on each
"""
import copy
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# Arguments: shared flags from common.py, then the method's own.
# Defaults: the paper's ImageNet recipe (the block below); CIFAR: SMALL_IMAGE_PRESET.
# -----------------------------------------------------------------------------
parser = common.get_args_parser(__doc__, method='byol')
method = parser.add_argument_group('BYOL')
method.add_argument('--tau-base', type=float, help='EMA rate of the target at step 0 (tau_base)')
method.add_argument('--proj-hidden-dim', type=int, help='hidden width of the projector')
method.add_argument('--proj-dim', type=int, help='output width of the projector (z)')
method.add_argument('--proj-layers', type=int, help='layers of the projector')
method.add_argument('--pred-hidden-dim', type=int, help='hidden width of the predictor')
method.add_argument('--blur-probs', type=float, nargs=2, help="blur probability of the two views (T, T')")
method.add_argument('--solarize-probs', type=float, nargs=2,
                    help="solarize probability of the two views (T, T')")
method.add_argument('--jitter', type=float, nargs=4, help='ColorJitter strengths (p 0.8)')
method.add_argument('--min-scale', type=float, help='RandomResizedCrop scale lower bound')
# The paper's recipe (Sec. 3.3): optimisation, heads, two DIFFERENT view distributions (Table 6)
parser.set_defaults(arch='resnet50', epochs=1000, batch_size=4096, optimizer='lars', warmup_epochs=10,
                    lr=None, weight_decay=None,  # and tau_base: EPOCH_PRESETS' row for --epochs
                    proj_hidden_dim=4096, proj_dim=256, proj_layers=2, pred_hidden_dim=4096, min_scale=0.08,
                    blur_probs=(1.0, 0.1), solarize_probs=(0.0, 0.2), jitter=(0.4, 0.4, 0.2, 0.1))
# ImageNet lr, weight decay, tau_base: the row of the shortest length >= --epochs (the authors' config)
EPOCH_PRESETS = {40:   dict(lr=0.45, weight_decay=1e-6,   tau_base=0.97),
                 100:  dict(lr=0.45, weight_decay=1e-6,   tau_base=0.99),
                 300:  dict(lr=0.3,  weight_decay=1e-6,   tau_base=0.99),
                 1000: dict(lr=0.2,  weight_decay=1.5e-6, tau_base=0.996)}
# Small images (CIFAR): SGD lr 0.12 per 256, wd 5e-4 (Lightly's CIFAR-10 benchmark), tau_base 0.99, no blur;
# ResNet-18, batch 512, 200 epochs (this project's budget).
SMALL_IMAGE_PRESET = dict(arch='resnet18', batch_size=512, epochs=200,
                          optimizer='sgd', lr=0.12, weight_decay=5e-4, tau_base=0.99, blur_probs=(0.0, 0.0))


# -----------------------------------------------------------------------------
# The method: online network (f, g, q), target network (f', g'), and the loss
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


class BYOL(nn.Module):
    """Online network theta: encoder f (backbone, evaluated), projector g, predictor q (Sec. 3.1). Target
    network xi: a copy of f and g, no gradient, moved only by the EMA of Eq. (1); it keeps its own BN."""

    def __init__(self, backbone, proj_hidden_dim, proj_dim, pred_hidden_dim, proj_layers):
        super().__init__()
        self.online = nn.Sequential(OrderedDict(  # f_theta and g_theta
            backbone=backbone, projector=mlp(backbone.embed_dim, proj_hidden_dim, proj_dim, proj_layers)))
        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim)  # q_theta
        self.target = copy.deepcopy(self.online).requires_grad_(False)  # f_xi, g_xi: no grad, no optimizer

    def forward(self, views):
        p, z = [], []
        for x in views:  # each view in its own call: BatchNorm statistics per view
            p.append(self.predictor(self.online(x)))   # (n, d) q_theta(z_theta), the online prediction
            with torch.no_grad():
                z.append(self.target(x))               # (n, d) z'_xi, the target projection
        return p[0], p[1], z[0], z[1]                  # (n, d) each: view 1, view 2


def regression_loss(p, z):
    """Eq. (2): || p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z), averaged over the batch; z is a constant (sg)."""
    p = F.normalize(p.float(), dim=1)                  # (n, d) unit prediction
    z = F.normalize(z.detach().float(), dim=1)         # (n, d) unit target, stop-gradient
    return (2 - 2 * (p * z).sum(dim=1)).mean()         # (n,) -> scalar in [0, 4]


def byol_loss(p1, p2, z1, z2):
    """L_BYOL = L + L~ (Sec. 3.1): each view's prediction regresses the other view's target; summed."""
    return regression_loss(p1, z2) + regression_loss(p2, z1)


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
def main():
    args = common.parse_args(parser, SMALL_IMAGE_PRESET)
    common.apply_epoch_preset(args, EPOCH_PRESETS)          # the paper's lr, wd, tau_base for --epochs
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

    # ---- model: online (f, g, q) and target (f', g'); SyncBN and DDP when on several GPUs
    model = BYOL(
        common.build_backbone(args), args.proj_hidden_dim, args.proj_dim, args.pred_hidden_dim,
        args.proj_layers)
    model, raw_model = common.prepare_model(model, args, device)
    eval_backbone = raw_model.online.backbone  # evaluated by kNN, exported with the checkpoint

    # ---- optimizer and schedules: LARS (biases and BN excluded), linear warm-up then cosine; tau cosine to 1
    lr = common.scale_lr(args.lr, args.batch_size)
    optimizer = common.build_optimizer(args, common.param_groups(raw_model, args.weight_decay), lr)
    lr_schedule = common.cosine_schedule(lr, args.min_lr, args.epochs, len(loader), args.warmup_epochs)
    tau_schedule = common.cosine_schedule(args.tau_base, 1.0, args.epochs, len(loader))  # Sec. 3.3

    # ---- resume from the output directory, if a checkpoint is there
    start_epoch = common.resume(args, model=raw_model, optimizer=optimizer)

    logger = common.MetricLogger(args, loader)
    for epoch in range(start_epoch, args.epochs):
        common.seed_epoch(args, epoch, rank)
        model.train()
        for it, (views, labels, indices) in enumerate(loader.epoch(epoch)):
            step = epoch * len(loader) + it
            common.set_lr(optimizer, lr_schedule[step])

            # ======== BYOL (Sec. 3.1) ========
            with common.autocast(device, args):
                p1, p2, z1, z2 = model(views)                         # (n, d) each: predictions, projections
            loss = byol_loss(p1, p2, z1, z2)                          # Eq. (2), symmetrised, float32
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()                                          # DDP: the same step on all ranks
            common.ema_update(raw_model.target, raw_model.online, tau_schedule[step])  # Eq. (1) after (3)
            # ======== end of BYOL ========

            logger.step(epoch, step, loss, lr=lr_schedule[step], tau=tau_schedule[step],
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
