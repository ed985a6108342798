"""DINO: Emerging Properties in Self-Supervised Vision Transformers.
Mathilde Caron, Hugo Touvron, Ishan Misra, Herve Jegou, Julien Mairal, Piotr Bojanowski, Armand Joulin.
ICCV 2021. arXiv:2104.14294.
Docs: docs/dino.md

The idea: self-distillation with no labels. A student network g_s and a teacher g_t of the same
architecture (backbone + DINO head ending in K output dimensions) look at different crops of an
image; the student is trained to predict the teacher's output distribution over the K dimensions,
from every crop, including small local crops the teacher never sees. The teacher is no trained
network but an exponential moving average of the student. Nothing contrasts images: collapse is
avoided by centering the teacher's outputs (an EMA of their batch mean is subtracted: no dimension
may dominate) and sharpening them (a low teacher temperature: the distribution may not be uniform).
The representation that is evaluated is the TEACHER's backbone output.

Paper -> code:
  Alg. 1 line 4      x1, x2 = augment(x), augment(x): 2 global (+ local) crops, Sec. 3.1 -> main(): `views`
  Alg. 1 lines 5-6   s1, s2 = g_s(x1), g_s(x2); t1, t2 = g_t(x1), g_t(x2), global crops -> DINO.forward
  Alg. 1 lines 8, 16 H(t, s) = - sum softmax((t - C) / tau_t) log softmax(s / tau_s), teacher detached,
                     over every (teacher global crop, student crop) pair of different crops -> dino_loss
  Alg. 1 line 10     update g_s (AdamW; per-parameter gradient clipping; last layer frozen at first) -> main()
  Alg. 1 line 11     g_t = l g_t + (1 - l) g_s, l: cosine to 1, after the student's step -> main(): ema_update
  Alg. 1 line 12     C = m C + (1 - m) mean(t1, t2), over all GPUs                         -> update_center
  Sec. 3.1, App. A   DINO head: 3-layer MLP (GELU) -> L2-normalised bottleneck -> weight-normalised linear
                     layer to K dimensions with the norm fixed at 1                       -> DINOHead
  the recipe (optimizer, lr, weight decay, batch, epochs, ...)  -> the defaults in the Arguments block below

Run:
  python dino.py --data cifar10                              # one GPU (or CPU): CIFAR preset, ResNet-18
  torchrun --nproc_per_node=8 dino.py --data /imagenet       # the paper's ImageNet recipe: the defaults
  torchrun --nproc_per_node=8 dino.py --data /imagenet --arch resnet50       # the authors' ResNet-50 recipe
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
      dino.py --data /imagenet                                 # 4 nodes x 8 GPUs, the same command on each
"""
import argparse
import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# Arguments: shared flags from common.py, then DINO's own.
# Defaults: the paper's ImageNet recipe (ViT-S/16, Sec. 4 and Appendix A); CIFAR: SMALL_IMAGE_PRESET.
# -----------------------------------------------------------------------------
parser = common.get_args_parser(__doc__, method='dino')
parser.set_defaults(arch='vit_small', epochs=100, batch_size=1024, optimizer='adamw', lr=0.0005,
                    weight_decay=0.04, warmup_epochs=10, min_lr=1e-6, drop_path=0.1)
method = parser.add_argument_group('DINO')
method.add_argument('--weight-decay-end', type=float, default=0.4, help='final weight decay (cosine)')
method.add_argument('--momentum-teacher', type=float, default=0.996,
                    help='initial EMA rate l of the teacher; cosine to 1')
method.add_argument('--out-dim', type=int, default=65536, help='K, the output dimension of the DINO head')
method.add_argument('--hidden-dim', type=int, default=2048, help='hidden width of the head MLP')
method.add_argument('--bottleneck-dim', type=int, default=256, help='width of the L2-normalised bottleneck')
method.add_argument('--norm-last-layer', action=argparse.BooleanOptionalAction, default=True,
                    help='fix the weight-norm gain of the last layer at 1')
method.add_argument('--use-bn-in-head', action=argparse.BooleanOptionalAction, default=False,
                    help='BatchNorm in the head MLP')
method.add_argument('--student-temp', type=float, default=0.1, help='tau_s')
method.add_argument('--teacher-temp', type=float, default=0.07, help='tau_t after the warm-up')
method.add_argument('--warmup-teacher-temp', type=float, default=0.04, help='tau_t at the start')
method.add_argument('--warmup-teacher-temp-epochs', type=int, default=30, help='tau_t warm-up, in epochs')
method.add_argument('--center-momentum', type=float, default=0.9, help='m of the center EMA')
method.add_argument('--clip-grad', type=float, default=3.0, help='per-parameter grad norm clip, 0 = off')
method.add_argument('--freeze-last-layer', type=int, default=1, help='epochs with a frozen last layer')
method.add_argument('--global-scale', type=float, nargs=2, default=[0.4, 1.0], help='global crop scale range')
method.add_argument('--local-scale', type=float, nargs=2, default=[0.05, 0.4], help='local crop scale range')
method.add_argument('--num-local-crops', type=int, default=8, help='local crops per image (0: none)')
method.add_argument('--local-crop-size', type=int, default=96, help='side of the local crops, px')
method.add_argument('--blur-probs', type=float, nargs=3, default=[1.0, 0.1, 0.5],
                    help='Gaussian blur probability of global crop 1, global crop 2, local crops')
method.add_argument('--solarize-prob', type=float, default=0.2, help='solarize probability of global crop 2')
# Per architecture (from --arch; every matching row applies):
#   resnet:    the authors' ResNet-50 command: SGD, a constant weight decay, smaller crops
ARCH_PRESETS = {'resnet':    dict(optimizer='sgd', lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4,
                                  global_scale=[0.14, 1.0], local_scale=[0.05, 0.14], drop_path=0.0)}
# Small images (CIFAR, solo-learn's recipe): ResNet-18, LARS with trust coefficient 0.02 and clipping (with
# ImageNet's 0.001 a step moves a weight by only 0.03% of its norm at lr 0.3; in a CPU learning-test setting
# with this LARS, DINO reached 29.5% with 0.001 and 34.5% with 0.02 + clipping), a constant weight decay,
# 2 global 32-px crops + 6 local 16-px crops, no blur.
SMALL_IMAGE_PRESET = dict(arch='resnet18', batch_size=256, epochs=200, optimizer='lars', lr=0.3,
                          lars_eta=0.02, lars_clip=True, weight_decay=1e-5,
                          weight_decay_end=1e-5, min_lr=0.0, out_dim=4096, global_scale=[0.4, 1.0],
                          local_scale=[0.05, 0.4], num_local_crops=6, local_crop_size=16,
                          blur_probs=[0.0, 0.0, 0.0])


# -----------------------------------------------------------------------------
# The method: student and teacher (backbone + DINO head), the loss, centering
# -----------------------------------------------------------------------------
class DINOHead(nn.Module):
    """The projection head (Sec. 3.1, Appendix A): a 3-layer MLP (hidden 2048, GELU) to a 256-d
    bottleneck, L2 normalisation, then a weight-normalised linear layer (no bias) to K dimensions.
    Weight norm: row k of the last weight is w_k = g_k v_k / ||v_k||; with `norm_last_layer` the gain
    g is fixed at 1, so the logits are cosines between the bottleneck and K unit prototypes."""

    def __init__(self, in_dim, hidden_dim, bottleneck_dim, out_dim, norm_last_layer=True, use_bn=False):
        super().__init__()
        layers, dims = [], [in_dim, hidden_dim, hidden_dim, bottleneck_dim]
        for i in range(3):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < 2:
                layers += ([nn.BatchNorm1d(dims[i + 1])] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))  # direction v of each row
        nn.init.kaiming_uniform_(self.last_layer_v, a=5 ** 0.5)                  # nn.Linear's default init
        self.last_layer_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)  # gain g

    def forward(self, x):
        z = F.normalize(self.mlp(x), dim=-1)                                # (B, 256) on the unit sphere
        weight = self.last_layer_g * F.normalize(self.last_layer_v, dim=1)  # (K, 256) ||w_k|| = g_k
        with torch.autocast(z.device.type, enabled=False):                 # fp32: bf16 cosines step by
            return F.linear(z.float(), weight.float())                      # (B, K) ~0.004, x 1/tau_t = 25

    def last_layer(self):
        return [self.last_layer_v, self.last_layer_g]


class Network(nn.Module):
    """g = head(backbone(x)), for a list of crops: crops of one size go through the backbone in one
    call (one batch per resolution; the ViT interpolates its position embedding for local crops),
    the head sees all of them together (as the authors' multi-crop wrapper)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        features = common.forward_by_size(self.backbone, crops)             # (len(crops) * n, D)
        return self.head(features)                                          # (len(crops) * n, K)


class DINO(nn.Module):
    """Student g_s and teacher g_t (Alg. 1), and the center C (a buffer, saved in checkpoints).

    The teacher starts as a copy of the student and is only ever updated by the EMA: no gradient,
    not in the optimizer, and no drop-path (the authors build it without stochastic depth)."""

    def __init__(self, backbone, head, out_dim):
        super().__init__()
        self.student = Network(backbone, head)
        self.teacher = copy.deepcopy(self.student)  # g_t = g_s at the start
        self.teacher.requires_grad_(False)
        for module in self.teacher.modules():       # no drop-path in the teacher
            if hasattr(module, 'drop_path_rate'):
                module.drop_path_rate = 0.0
        self.register_buffer('center', torch.zeros(1, out_dim))  # C, line 12

    def forward(self, views):
        n = views[0].shape[0]
        student_out = self.student(views).view(len(views), n, -1)  # (V, n, K) every crop, lines 5
        with torch.no_grad():                                       # teacher: no gradient, global crops only
            teacher_out = self.teacher(views[:2]).view(2, n, -1)    # (2, n, K) line 6
        return student_out, teacher_out


def dino_loss(student_out, teacher_out, center, student_temp, teacher_temp):
    """The DINO loss (Eq. 3; Alg. 1 lines 8, 16), averaged over the crop pairs.

    student_out: (V, n, K) logits of the student for the V crops (the 2 global crops first);
    teacher_out: (2, n, K) logits of the teacher for the 2 global crops. With
        P_t = softmax((t - C) / tau_t)   (centering and sharpening; detached: stop-gradient)
        log P_s = log_softmax(s / tau_s)
    the loss is the mean over every pair (teacher crop a, student crop b) with a != b of
    H(P_t[a], P_s[b]) = - sum_k P_t[a]_k log P_s[b]_k, averaged over the n images.
    """
    n = student_out.shape[1]
    teacher_probs = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).detach()  # (2, n, K) P_t
    student_log_probs = F.log_softmax(student_out.float() / student_temp, dim=-1)       # (V, n, K) log P_s
    cross_entropy = -torch.einsum('ank,bnk->ab', teacher_probs, student_log_probs) / n  # (2, V) H(a, b)
    # (2, V) a != b: a crop is never compared with itself
    different = ~torch.eye(*cross_entropy.shape, dtype=torch.bool, device=cross_entropy.device)
    return cross_entropy[different].mean()


@torch.no_grad()
def teacher_entropy(teacher_out, center, teacher_temp):
    """Mean entropy of P_t, the collapse diagnostic of the paper's Sec. 5.3 (Fig. 7): near ln K the teacher is
    uniform (centering wins), near 0 it is one-hot (sharpening wins); a learning run stays in between."""
    probs = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1)    # (2, n, K) P_t
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1).mean()     # scalar in [0, ln K]


@torch.no_grad()
def update_center(center, teacher_out, momentum):
    """C = m C + (1 - m) mean(t1, t2) (Eq. 4; Alg. 1 line 12): the mean of the teacher logits of both
    global crops over the GLOBAL batch, so every GPU keeps the same center."""
    batch_sum = teacher_out.float().sum(dim=(0, 1))                    # (K,) this GPU's 2n rows
    common.all_reduce_sum(batch_sum)                                   # DDP: sum over all GPUs
    batch_mean = batch_sum / (teacher_out.shape[0] * teacher_out.shape[1] * common.get_world_size())  # (K,)
    center.mul_(momentum).add_(batch_mean, alpha=1 - momentum)         # (1, K)


def teacher_temperature_schedule(args):
    """tau_t per EPOCH: linear from --warmup-teacher-temp to --teacher-temp over the warm-up epochs,
    then constant."""
    warmup = np.linspace(args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_temp_epochs)
    return np.concatenate([warmup, np.full(max(0, args.epochs - len(warmup)), args.teacher_temp)])


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
def main():
    args = common.parse_args(parser, SMALL_IMAGE_PRESET)
    common.apply_arch_preset(parser, args, ARCH_PRESETS, SMALL_IMAGE_PRESET)  # ViT or ResNet recipe, printed
    if args.num_local_crops and args.local_crop_size > args.image_size:  # local crops are the small views
        raise common.UsageError(f'--local-crop-size {args.local_crop_size} is larger than the global crops '
                                f'(--image-size {args.image_size}); use --local-crop-size '
                                f'{args.image_size} or less')
    common.check_crops(args, [args.image_size] + [args.local_crop_size] * (args.num_local_crops > 0),
                       [args.global_scale, args.local_scale])
    device, rank, world_size, is_main = common.setup(args)  # torchrun / one process, seed, output dir

    # ---- data: multi-crop (Sec. 3.1): 2 global crops, asymmetric (crop 1 always blurred, crop 2 sometimes
    # solarized), and small local crops; bicubic resizing, BYOL's colour jitter (Appendix A)
    global1, global2, local = (common.augmentation(size, scale=scale, jitter=(0.4, 0.4, 0.2, 0.1),
                                                   jitter_prob=0.8, grayscale_prob=0.2, blur_prob=blur,
                                                   solarize_prob=solarize, interpolation='bicubic')
                               for size, scale, blur, solarize in zip(
                                   [args.image_size, args.image_size, args.local_crop_size],
                                   [args.global_scale, args.global_scale, args.local_scale],
                                   args.blur_probs, [0.0, args.solarize_prob, 0.0]))
    loader = common.build_train_loader(
        args, common.multi_crop_views([global1, global2], local, args.num_local_crops), device)
    eval_loaders = common.build_eval_loaders(args, device)  # for the kNN monitor

    # ---- model: student and teacher (backbone + DINO head); SyncBN and DDP when on several GPUs
    backbone = common.build_backbone(args)
    head = DINOHead(backbone.embed_dim, args.hidden_dim, args.bottleneck_dim, args.out_dim,
                    args.norm_last_layer, args.use_bn_in_head)
    model = DINO(backbone, head, args.out_dim)
    model, raw_model = common.prepare_model(model, args, device)
    eval_backbone = raw_model.teacher.backbone  # the TEACHER's: evaluated by kNN, exported

    # ---- optimizer and schedules, all per iteration except tau_t (per epoch): lr warm-up then cosine to
    # --min-lr, weight decay cosine to --weight-decay-end (biases, norms excluded), teacher EMA cosine to 1
    lr = common.scale_lr(args.lr, args.batch_size)
    optimizer = common.build_optimizer(args, common.param_groups(raw_model, args.weight_decay), lr)
    lr_schedule = common.cosine_schedule(lr, args.min_lr, args.epochs, len(loader), args.warmup_epochs,
                                         warmup_reaches_base=True)  # as DINO's cosine_scheduler
    weight_decay_schedule = common.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs,
                                                   len(loader))
    momentum_schedule = common.cosine_schedule(args.momentum_teacher, 1.0, args.epochs, len(loader))
    teacher_temp_schedule = teacher_temperature_schedule(args)

    # ---- resume from the output directory, if a checkpoint is there
    start_epoch = common.resume(args, model=raw_model, optimizer=optimizer)

    logger = common.MetricLogger(args, loader)
    for epoch in range(start_epoch, args.epochs):
        common.seed_epoch(args, epoch, rank)
        model.train()
        for it, (views, labels, indices) in enumerate(loader.epoch(epoch)):
            step = epoch * len(loader) + it
            common.set_lr(optimizer, lr_schedule[step])
            common.set_weight_decay(optimizer, weight_decay_schedule[step])

            # ======== DINO (Algorithm 1) ========
            with common.autocast(device, args):
                student_out, teacher_out = model(views)                # (V, n, K), (2, n, K), lines 4-6
            loss = dino_loss(student_out, teacher_out, raw_model.center, args.student_temp,
                             teacher_temp_schedule[epoch])             # lines 8, 16, float32, with the old C
            entropy = teacher_entropy(teacher_out, raw_model.center, teacher_temp_schedule[epoch])  # logged
            update_center(raw_model.center, teacher_out, args.center_momentum)  # line 12
            # ======== end of DINO ========

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            common.clip_gradients(raw_model.student, args.clip_grad)  # DINO: per-parameter gradient norm
            if epoch < args.freeze_last_layer:                         # DINO: last layer frozen at first
                for p in raw_model.student.head.last_layer():
                    p.grad = None
            optimizer.step()                                          # line 10
            common.ema_update(raw_model.teacher, raw_model.student, momentum_schedule[step])  # line 11
            logger.step(epoch, step, loss, lr=lr_schedule[step], m=momentum_schedule[step],
                        teacher_entropy=entropy)                      # collapse: ln K uniform, 0 one-hot

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
