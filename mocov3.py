"""MoCo v3: An Empirical Study of Training Self-Supervised Vision Transformers.
Xinlei Chen, Saining Xie, Kaiming He. ICCV 2021. arXiv:2104.02057.
Docs: docs/mocov3.md

The idea: MoCo without the queue. A base encoder f_q (backbone, projection MLP, prediction MLP)
embeds two crops of each image as queries; a momentum encoder f_k (backbone, projection MLP; an
exponential moving average of f_q's, no predictor) embeds them as keys. Each query must pick out
the key of its own image among the keys of the whole (large) batch, in both directions. The paper
is mostly about making this stable for ViTs: a random patch projection that is never trained, a
fixed sin-cos position embedding, AdamW, a long warm-up and BatchNorm inside the MLP heads.
The representation that is evaluated is the base encoder's backbone output.

Paper -> code:
  Alg. 1 line 5      x1, x2 = aug(x), aug(x)   (BYOL's asymmetric augmentation, Appendix A) -> main(): `views`
  Alg. 1 lines 6-7   q1, q2 = f_q(x1), f_q(x2)  (backbone + projector + predictor)          -> MoCoV3.forward
  Alg. 1 line 8      k1, k2 = f_k(x1), f_k(x2)  (momentum encoder, no gradient)              -> MoCoV3.forward
  Alg. 1 line 10     loss = ctr(q1, k2) + ctr(q2, k1)                              -> contrastive_loss, main()
  Alg. 1 lines 12-13 update f_q; f_k = m * f_k + (1 - m) * f_q, m: cosine to 1 (Sec. 4) -> main(): ema_update,
                     done at the start of the step, BEFORE the keys are computed (authors' code)
  Alg. 1 lines 15-20 ctr(q, k): logits q k^T / tau over all keys of the global batch, labels = own key,
                     cross-entropy x 2 tau                                              -> contrastive_loss
  Sec. 4.2           random patch projection (frozen; the authors' init) and fixed 2-D sin-cos position
                     embedding                                                          -> ARCH_PRESETS['vit']
  Appendix B         MLP heads (no bias, BN, last BN without affine)                    -> mlp, MoCoV3
  the recipe (optimizer, lr, weight decay, batch, epochs, ...)  -> the defaults in the Arguments block below

Run:
  python mocov3.py --data cifar10                              # one GPU (or CPU): CIFAR preset, ResNet-18
  torchrun --nproc_per_node=8 mocov3.py --data /imagenet --batch-size 1024   # ViT-S/16, the paper's recipe
  torchrun --nproc_per_node=8 mocov3.py --data /imagenet --arch resnet50     # the paper's ResNet-50 recipe
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
      mocov3.py --data /imagenet                               # 4 nodes x 8 GPUs, the same command on each
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# Arguments: shared flags from common.py, then MoCo v3's own.
# Defaults: the paper's ImageNet recipe (ViT-S/16 and ViT-B/16, Appendix B); CIFAR: SMALL_IMAGE_PRESET.
# -----------------------------------------------------------------------------
parser = common.get_args_parser(__doc__, method='mocov3')
parser.set_defaults(arch='vit_small', epochs=300, batch_size=4096, optimizer='adamw', lr=1.5e-4,
                    weight_decay=0.1, warmup_epochs=40)
method = parser.add_argument_group('MoCo v3')
method.add_argument('--temperature', type=float, default=0.2, help='tau of ctr(q, k), Alg. 1')
method.add_argument('--moco-m', type=float, default=0.99, help='initial momentum of f_k; cosine to 1')
method.add_argument('--mlp-hidden-dim', type=int, default=4096, help='hidden width of both MLP heads')
method.add_argument('--proj-dim', type=int, default=256, help='output width of the projector and predictor')
method.add_argument('--blur-probs', type=float, nargs=2, default=[1.0, 0.1],
                    help='Gaussian blur probability of views 1, 2')
method.add_argument('--solarize-probs', type=float, nargs=2, default=[0.0, 0.2],
                    help='solarize probability of views 1, 2')
method.add_argument('--min-scale', type=float, default=0.08, help='RandomResizedCrop scale lower bound')
# Per architecture (from --arch; every matching row applies):
#   vit:       the random patch projection and sin-cos position embedding (Sec. 4.2), initialised as the
#              authors' vits.py (q/k/v and every Linear xavier-uniform, the patch projection xavier-uniform
#              with a zero bias: the frozen projection IS this init, common.VisionTransformer)
#   vit_small: MoCo v3's ViT-S has 12 heads (Table 1, unlike DINO's 6)
#   resnet:    the ResNet-50 recipe of the authors' code
ARCH_PRESETS = {'vit':       dict(freeze_patch_embed=True, pos_embed='sincos', vit_init='mocov3'),
                'vit_small': dict(num_heads=12),
                'resnet':    dict(epochs=100, optimizer='lars', lr=0.6, weight_decay=1e-6, warmup_epochs=10,
                                  temperature=1.0, min_scale=0.2)}
# Small images (CIFAR, solo-learn's recipe): ResNet-18, LARS with trust coefficient 0.02 and clipping (with
# ImageNet's 0.001 a step moves a weight by only 0.03% of its norm at lr 0.3; in the CPU learning test's
# setting with this LARS, MoCo v3 reached 26.5% with 0.001 and 56.5% with 0.02 + clipping), no blur (the
# 32-px images are blurry already).
SMALL_IMAGE_PRESET = dict(arch='resnet18', batch_size=256, epochs=200, optimizer='lars', lr=0.3,
                          lars_eta=0.02, lars_clip=True, weight_decay=1e-5,
                          warmup_epochs=10, temperature=0.2, min_scale=0.08, blur_probs=[0.0, 0.0])


# -----------------------------------------------------------------------------
# The method: base encoder f_q, momentum encoder f_k, and the contrastive loss
# -----------------------------------------------------------------------------
def mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn=True):
    """The MLP heads of Appendix B: Linear (no bias) - BN - ReLU for every hidden layer, then a
    Linear (no bias) followed, if `last_bn`, by a BN without learnable affine parameters."""
    layers = []
    for i in range(num_layers):
        dim_in, dim_out = in_dim if i == 0 else hidden_dim, out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Backbone + projection MLP: the part shared by f_q and f_k (their parameters correspond one to one)."""

    def __init__(self, backbone, projector):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, x):
        return self.projector(self.backbone(x))


class MoCoV3(nn.Module):
    """f_q = base encoder + predictor (Alg. 1 lines 6-7) and f_k = momentum encoder (line 8).

    Heads (Appendix B, authors' code): ViT: projector 3 layers (D -> 4096 -> 4096 -> 256), predictor
    2 layers (256 -> 4096 -> 256), both ending in BN without affine. ResNet: projector 2 layers,
    predictor 2 layers without the last BN. f_k starts as a copy of the base encoder and is only
    ever updated by the EMA: no gradient, not in the optimizer."""

    def __init__(self, backbone, hidden_dim, out_dim):
        super().__init__()
        vit = isinstance(backbone, common.VisionTransformer)
        self.base_encoder = Encoder(backbone, mlp(3 if vit else 2, backbone.embed_dim, hidden_dim, out_dim))
        self.predictor = mlp(2, out_dim, hidden_dim, out_dim, last_bn=vit)
        self.momentum_encoder = copy.deepcopy(self.base_encoder)  # f_k = f_q at the start (Alg. 1 line 2)
        self.momentum_encoder.requires_grad_(False)

    def forward(self, views):
        x1, x2 = views                                 # (n, 3, H, W) each; its own BN batch (authors' code)
        q1 = self.predictor(self.base_encoder(x1))     # (n, 256) queries, line 6
        q2 = self.predictor(self.base_encoder(x2))     # (n, 256)
        with torch.no_grad():                          # keys: no gradient into f_k
            k1 = self.momentum_encoder(x1)             # (n, 256) keys, line 8
            k2 = self.momentum_encoder(x2)             # (n, 256)
        return q1, q2, k1, k2


def contrastive_loss(q, k, temperature):
    """ctr(q, k) of Eq. (1) and Alg. 1 (lines 15-20), InfoNCE against the keys of the global batch.

    q: (n, d) this GPU's queries; k: (n, d) the keys of the same n images (no gradient). Query i's
    positive is the key of its own image; its negatives are the other N - 1 keys of ALL GPUs:
        ctr(q, k) = 2 tau * mean_i [ -log exp(q_i . k_i / tau) / sum_j exp(q_i . k_j / tau) ]
    with q and k L2-normalised. The factor 2 tau (Alg. 1 line 20) makes the gradient's scale
    independent of tau. Returns the mean over this GPU's n queries; DDP's gradient averaging turns
    it into the mean over the global batch.
    """
    n, rank = q.shape[0], common.get_rank()
    q = F.normalize(q.float(), dim=1)                          # (n, d)
    k = F.normalize(k.float(), dim=1)                          # (n, d)
    # DDP: every GPU's keys, rank-major; keys come from f_k and need no gradient
    keys = common.all_gather_no_grad(k)                        # (N, d)
    logits = q @ keys.T / temperature                          # (n, N) q_i . k_j / tau
    labels = torch.arange(n, device=q.device) + n * rank       # (n,) DDP: this GPU's keys among the N
    return F.cross_entropy(logits, labels) * (2 * temperature)


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
def main():
    args = common.parse_args(parser, SMALL_IMAGE_PRESET)
    common.apply_arch_preset(parser, args, ARCH_PRESETS, SMALL_IMAGE_PRESET)  # ViT or ResNet recipe, printed
    common.check_crops(args, [args.image_size], [(args.min_scale, 1.0)])
    device, rank, world_size, is_main = common.setup(args)  # torchrun / one process, seed, output dir

    # ---- data: two views, asymmetric as in BYOL: view 1 blurred, view 2 sometimes solarized (Appendix A)
    view1, view2 = (common.augmentation(args.image_size, scale=(args.min_scale, 1.0),
                                        jitter=(0.4, 0.4, 0.2, 0.1), jitter_prob=0.8, grayscale_prob=0.2,
                                        blur_prob=blur, solarize_prob=solarize)
                    for blur, solarize in zip(args.blur_probs, args.solarize_probs))
    loader = common.build_train_loader(args, common.Views([view1, view2]), device)
    eval_loaders = common.build_eval_loaders(args, device)  # for the kNN monitor

    # ---- model: f_q (backbone, projector, predictor) and f_k; SyncBN and DDP when on several GPUs
    model = MoCoV3(common.build_backbone(args), args.mlp_hidden_dim, args.proj_dim)
    model, raw_model = common.prepare_model(model, args, device)
    eval_backbone = raw_model.base_encoder.backbone  # evaluated by kNN, exported with the checkpoint

    # ---- optimizer and schedules: AdamW (ViT; weight decay on every parameter, as the authors' code) or
    # LARS (ResNet; biases and BN excluded), linear warm-up then cosine; momentum of f_k: cosine to 1
    lr = common.scale_lr(args.lr, args.batch_size)
    groups = common.param_groups(raw_model, args.weight_decay, args.optimizer != 'adamw')  # LARS: no bias, BN
    optimizer = common.build_optimizer(args, groups, lr)
    lr_schedule = common.cosine_schedule(lr, args.min_lr, args.epochs, len(loader), args.warmup_epochs)
    momentum_schedule = common.cosine_schedule(args.moco_m, 1.0, args.epochs, len(loader))

    # ---- resume from the output directory, if a checkpoint is there
    start_epoch = common.resume(args, model=raw_model, optimizer=optimizer)

    logger = common.MetricLogger(args, loader)
    for epoch in range(start_epoch, args.epochs):
        common.seed_epoch(args, epoch, rank)
        model.train()
        for it, (views, labels, indices) in enumerate(loader.epoch(epoch)):
            step = epoch * len(loader) + it
            common.set_lr(optimizer, lr_schedule[step])

            # ======== MoCo v3 (Algorithm 1) ========
            # f_k = m f_k + (1 - m) f_q, BEFORE the keys are computed (authors' code; line 13 of last step)
            common.ema_update(raw_model.momentum_encoder, raw_model.base_encoder, momentum_schedule[step])
            with common.autocast(device, args):
                q1, q2, k1, k2 = model(views)                         # (n, 256) each, lines 5-8
            loss = sum(contrastive_loss(q, k, args.temperature) for q, k in ((q1, k2), (q2, k1)))  # line 10
            # ======== end of MoCo v3 ========

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()                                          # line 12
            logger.step(epoch, step, loss, lr=lr_schedule[step], m=momentum_schedule[step])

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
