"""SwAV: Unsupervised Learning of Visual Features by Contrasting Cluster Assignments.
Mathilde Caron, Ishan Misra, Julien Mairal, Priya Goyal, Piotr Bojanowski, Armand Joulin.
NeurIPS 2020. arXiv:2006.09882.
Docs: docs/swav.md

The idea: instead of comparing the embeddings of two views directly, compare what they say about
a set of K learnable prototypes. Each view's embedding z is scored against the prototypes; the
scores of one view are turned into a soft "code" q (a cluster assignment) by a few Sinkhorn-Knopp
iterations that force the batch to spread evenly over the prototypes (no collapse onto one
cluster), and the OTHER view must predict that code from its own scores (a swapped
cross-entropy). Codes come only from the two full-size crops; extra low-resolution crops
("multi-crop") predict them too, which adds views almost for free. Small batches borrow more
samples for the equipartition from a queue of recent embeddings.

Paper -> code:
  Sec. 3, multi-crop (Sec. 3.2)   2 global + V local crops of each image        -> main(): `crop`
  Sec. 3.1  z = f(x) / ||f(x)||   backbone -> projection head -> L2 normalise   -> SwAV.forward
  Sec. 3.1  scores z^T C          prototypes C (K unit vectors), re-normalised
                                                              -> SwAV.normalize_prototypes, SwAV.forward
  Sec. 3.1  codes Q* = Diag(u) exp(C^T Z / eps) Diag(v), Sinkhorn-Knopp
            (Algorithm 1, appendix), a few iterations, global crops only -> sinkhorn, SwAV.compute_codes
  Sec. 3.1  "working with small batches": a queue of past embeddings -> SwAV.compute_codes, SwAV.enqueue
  Eq. (1)-(2) + multi-crop        l(z_t, q_s) = -sum_k q_s^(k) log p_t^(k),
            p_t = softmax(z_t^T C / tau), over every crop t != s          -> swapped_prediction_loss
  Appendix A.1  prototypes frozen at first; LARS (apex's LARC) on all parameters, warm-up, cosine -> main()
  the recipe (optimizer, lr, weight decay, batch, epochs, ...)  -> the defaults in the Arguments block below

Run:
  python swav.py --data cifar10                                # one GPU (or CPU): CIFAR preset, ResNet-18
  torchrun --nproc_per_node=8 swav.py --data /imagenet         # the paper's ImageNet recipe: the defaults
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
      swav.py --data /imagenet                                 # 4 nodes x 8 GPUs, the same command on each
"""

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# Arguments: shared flags from common.py, then SwAV's own.
# Defaults: the paper's ImageNet recipe (Appendix A.1, swav_800ep_pretrain.sh); CIFAR: SMALL_IMAGE_PRESET.
# -----------------------------------------------------------------------------
parser = common.get_args_parser(__doc__, method='swav')
# lars_denominator: the authors wrap SGD in apex's LARC, trust ratio ||w|| / (||g|| + wd ||w||)
parser.set_defaults(arch='resnet50', epochs=800, batch_size=4096, optimizer='lars', lr=0.3, min_lr=0.0048,
                    weight_decay=1e-6, warmup_epochs=10, lars_denominator='larc')
method = parser.add_argument_group('SwAV')
method.add_argument('--nmb-crops', type=int, nargs='+', default=[2, 6],
                    help='crops per resolution: 2 global (they make the codes), then optional local ones')
method.add_argument('--size-crops', type=int, nargs='+', default=[224, 96],
                    help='crop size per entry of --nmb-crops; the first is the global size = --image-size')
method.add_argument('--min-scale-crops', type=float, nargs='+', default=[0.14, 0.05],
                    help='RandomResizedCrop scale lower bound per entry of --nmb-crops')
method.add_argument('--max-scale-crops', type=float, nargs='+', default=[1.0, 0.14],
                    help='RandomResizedCrop scale upper bound per entry of --nmb-crops')
method.add_argument('--temperature', type=float, default=0.1, help='tau of softmax(z_t^T C / tau), Eq. (2)')
method.add_argument('--epsilon', type=float, default=0.05, help='eps of the codes Q = exp(C^T Z / eps)')
method.add_argument('--sinkhorn-iterations', type=int, default=3, help='Sinkhorn-Knopp iterations')
method.add_argument('--nmb-prototypes', type=int, default=3000, help='K, the number of prototypes')
method.add_argument('--proj-hidden-dim', type=int, default=2048, help='hidden width of the projection head')
method.add_argument('--proj-dim', type=int, default=128, help='output width of the head (z, prototypes)')
method.add_argument('--queue-length', type=int, default=0,
                    help='embeddings kept from past batches, all GPUs together (paper: 3840 for batches '
                         '<= 256, 0 = no queue); a multiple of --batch-size')
method.add_argument('--epoch-queue-starts', type=int, default=15, help='epoch from which the queue is filled')
method.add_argument('--freeze-prototypes-epochs', type=float, default=1,
                    help='the prototypes get no update during this many epochs')
method.add_argument('--start-warmup', type=float, default=0.3, help='lr at the warm-up start (absolute)')
method.add_argument('--color-strength', type=float, default=1.0, help='ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)')
method.add_argument('--blur-prob', type=float, default=0.5, help='Gaussian blur probability (every crop)')
# Small images (CIFAR): the authors' batch-256 recipe (swav_200ep_bs256_pretrain.sh: no warm-up, a queue from
# epoch 15) with ResNet-18, 200 epochs; multi-crop 2x32 + 6x16 (the paper's size ratio, local 16 / global 32
# ~ 96 / 224) at the paper's scales; colour strength 0.5 and no blur as SimCLR on CIFAR.
SMALL_IMAGE_PRESET = dict(arch='resnet18', batch_size=256, epochs=200, lr=0.6, min_lr=0.0006, warmup_epochs=0,
                          size_crops=[32, 16], queue_length=3840, color_strength=0.5, blur_prob=0.0)


# -----------------------------------------------------------------------------
# The method: encoder, projection head and prototypes; Sinkhorn-Knopp codes; the swapped prediction
# -----------------------------------------------------------------------------
class SwAV(nn.Module):
    """The backbone f, the projection head, the prototypes C (Sec. 3.1), the queue of past embeddings.

    z = normalise(head(f(x))) lies on the unit sphere, and so do the K prototypes (rows of
    `prototypes.weight`, re-normalised before every step), so every score z^T c_k is a cosine in
    [-1, 1]. The head is the authors' Linear-BN-ReLU-Linear; the prototypes a Linear without bias.
    """

    def __init__(self, backbone, hidden_dim, out_dim, num_prototypes, queue_length):
        super().__init__()
        self.backbone = backbone  # f
        self.projector = nn.Sequential(
            nn.Linear(backbone.embed_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim))
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False)  # C: one row per prototype c_k
        # queue[i]: the last `queue_length` embeddings of global crop i, from all GPUs (identical on every
        # rank); all zeros until filled. A buffer, so it is saved in the checkpoint with the model.
        self.register_buffer('queue', torch.zeros(2, queue_length, out_dim))

    @torch.no_grad()
    def normalize_prototypes(self):
        """Project each prototype c_k back onto the unit sphere (before every step, Sec. 3.1, Alg. 1)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, views):
        # multi-crop: crops of one size are consecutive; each size goes through the backbone in ONE call
        features = common.forward_by_size(self.backbone, views)      # (V*n, D) a call per crop size
        z = F.normalize(self.projector(features), dim=1)              # (V*n, 128)  z on the unit sphere
        with torch.autocast(z.device.type, enabled=False):            # fp32: bf16 cosines step by ~0.004, and
            scores = self.prototypes(z.float())                       #   Sinkhorn divides them by eps = 0.05
        return z, scores                                              # (V*n, 128), (V*n, K) scores z^T C

    @torch.no_grad()
    def compute_codes(self, z, scores, n, epsilon, iterations, fill_queue):
        """The codes q of the 2 global crops (Sec. 3.1), each (n, K) with rows summing to 1.

        Sinkhorn-Knopp sees this GPU's n scores of the crop and, once the queue is full, this
        GPU's share of the queue (its scores under the CURRENT prototypes): all GPUs together
        equipartition queue_length + N samples, and only the batch's codes are kept. Then the
        crop's embeddings of all GPUs are pushed into the queue (after its use, as the authors).
        """
        rank, world_size = common.get_rank(), common.get_world_size()
        length = self.queue.shape[1]
        codes = []
        for i in range(2):
            crop_scores = scores[i * n:(i + 1) * n].detach().float()            # (n, K)
            if length and self.queue[i, -1].any():                               # full: last slot filled
                # (L/W, 128): this GPU's share of the queue
                share = self.queue[i, rank * length // world_size:(rank + 1) * length // world_size]
                crop_scores = torch.cat([share @ self.prototypes.weight.float().T, crop_scores])  # (L/W+n, K)
            codes.append(sinkhorn(crop_scores, epsilon, iterations)[-n:])        # (n, K) the batch's codes
        if length and fill_queue:
            self.enqueue(z[:2 * n].detach().float().view(2, n, -1))
        return codes

    @torch.no_grad()
    def enqueue(self, z_global):
        """z_global: (2, n, d), this GPU's embeddings of the 2 global crops. Newest first, oldest dropped."""
        gathered = torch.stack([common.all_gather_no_grad(z_global[i]) for i in range(2)])  # (2, N, d) DDP
        self.queue.copy_(torch.cat([gathered, self.queue[:, :-gathered.shape[1]]], dim=1))   # (2, L, d)


@torch.no_grad()
def sinkhorn(scores, epsilon, iterations):
    """Sinkhorn-Knopp (Algorithm 1, appendix; Sec. 3.1): codes Q* = Diag(u) exp(C^T Z / eps) Diag(v) in
    the transportation polytope {Q in R+^(K x B): Q 1_B = 1_K / K, Q^T 1_K = 1_B / B}.

    scores: (b, K) this GPU's z^T C, b of the B = world_size * b samples of all GPUs. The K x B
    matrix Q is split over GPUs by columns, so its total and its row sums (one per prototype) are
    all-reduced; a column (one sample) lives on one GPU. After each iteration the columns sum to
    exactly 1/B and the rows to about 1/K (exactly, in the limit). Returns the codes, (b, K): the
    columns of Q rescaled to sum to 1 (the authors' final step). float32 throughout.
    """
    # exp(z^T c / eps) x exp(-1/eps): cosines are <= 1, so nothing overflows; the common factor cancels below
    Q = torch.exp((scores.float() - 1) / epsilon).T          # (K, b)
    K, B = Q.shape[0], Q.shape[1] * common.get_world_size()  # DDP: B counts the samples of all GPUs
    Q /= common.all_reduce_sum(Q.sum())                      # DDP: total over all GPUs -> Q sums to 1
    for _ in range(iterations):
        Q /= common.all_reduce_sum(Q.sum(dim=1, keepdim=True)) * K   # (K, 1) DDP: per prototype -> 1/K
        Q /= Q.sum(dim=0, keepdim=True) * B                          # (1, b) each sample's total -> 1/B
    return (Q * B).T                                          # (b, K) each sample's code sums to 1


def swapped_prediction_loss(scores, codes, temperature):
    """Eq. (1)-(2) with multi-crop: every crop t predicts the code q_s of each global crop s != t.

    scores: (V*n, K) z_t^T C of all V crops, crop-major; codes: the 2 codes (n, K) of the global
    crops. l(z_t, q_s) = -sum_k q_s^(k) log p_t^(k), p_t = softmax(z_t^T C / tau). For each s the
    mean over the V - 1 other crops, then the mean over the 2 codes, averaged over the n images
    of this GPU (DDP's gradient averaging makes it the mean over the global batch).
    """
    n = codes[0].shape[0]
    num_crops = scores.shape[0] // n
    log_p = F.log_softmax(scores.float() / temperature, dim=1).view(num_crops, n, -1)  # (V, n, K) log p_t
    loss = 0.0
    for s, q in enumerate(codes):                                      # q: (n, K), no gradient (a target)
        others = [t for t in range(num_crops) if t != s]                # swapped: never the crop that made q
        loss = loss - sum((q * log_p[t]).sum(dim=1).mean() for t in others) / len(others)
    return loss / len(codes)


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
def main():
    args = common.parse_args(parser, SMALL_IMAGE_PRESET)
    crops_follow_image_size(args)  # --size-crops not typed: the recipe's crops scaled to --image-size
    check_crops_and_queue(args)  # bad input refused before anything is written (the checks: end of the file)
    device, rank, world_size, is_main = common.setup(args)  # torchrun / one process, seed, output dir

    # ---- data: multi-crop, 2 global crops then the local ones, same augmentation family (Sec. 3.2, App. A.1)
    # crop[0]: the global crops' augmentation, crop[-1]: the local crops'
    crop = [common.augmentation(size, scale=(low, high), jitter=common.simclr_jitter(args.color_strength),
                                jitter_prob=0.8, grayscale_prob=0.2, blur_prob=args.blur_prob)
            for size, low, high in zip(args.size_crops, args.min_scale_crops, args.max_scale_crops)]
    loader = common.build_train_loader(
        args, common.multi_crop_views([crop[0]] * 2, crop[-1], sum(args.nmb_crops[1:])), device)
    eval_loaders = common.build_eval_loaders(args, device)  # for the kNN monitor

    # ---- model: f, head and prototypes; SyncBN and DDP when on several GPUs
    model = SwAV(common.build_backbone(args), args.proj_hidden_dim, args.proj_dim, args.nmb_prototypes,
                 args.queue_length)
    model, raw_model = common.prepare_model(model, args, device)
    eval_backbone = raw_model.backbone  # evaluated by kNN, exported with the checkpoint

    # ---- optimizer and schedules: LARS on ALL parameters with LARC's trust ratio (--lars-denominator larc,
    # the authors' apex LARC), warm-up then cosine to the final lr
    lr = common.scale_lr(args.lr, args.batch_size)
    optimizer = common.build_optimizer(args, common.param_groups(raw_model, args.weight_decay, False), lr)
    lr_schedule = common.cosine_schedule(lr, args.min_lr, args.epochs, len(loader), args.warmup_epochs,
                                         args.start_warmup, warmup_reaches_base=True)  # as SwAV's np.linspace
    freeze_prototypes_steps = round(args.freeze_prototypes_epochs * len(loader))

    # ---- resume from the output directory, if a checkpoint is there
    check_resume(args, world_size)  # a queue resumes only with the same length and processes (end of file)
    start_epoch = common.resume(args, model=raw_model, optimizer=optimizer)

    logger = common.MetricLogger(args, loader)
    for epoch in range(start_epoch, args.epochs):
        common.seed_epoch(args, epoch, rank)
        model.train()
        for it, (views, labels, indices) in enumerate(loader.epoch(epoch)):
            step = epoch * len(loader) + it
            common.set_lr(optimizer, lr_schedule[step])

            # ======== SwAV (Sec. 3.1, Algorithm 1) ========
            raw_model.normalize_prototypes()                          # C back on the unit sphere
            with common.autocast(device, args):
                z, scores = model(views)                              # (V*n, 128), (V*n, K) all crops
            codes = raw_model.compute_codes(z, scores, views[0].shape[0], args.epsilon,
                                            args.sinkhorn_iterations,
                                            fill_queue=epoch >= args.epoch_queue_starts)  # 2 x (n, K) no grad
            loss = swapped_prediction_loss(scores, codes, args.temperature)  # Eq. (1)-(2), float32
            # ======== end of SwAV ========

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step < freeze_prototypes_steps:                        # SwAV: prototypes frozen at the start
                raw_model.prototypes.weight.grad = None               #   (no gradient: LARS leaves them)
            optimizer.step()
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
def crops_follow_image_size(args):
    """--size-crops not typed: the recipe's crop sizes (the preset's 32 + 16, the paper's 224 + 96) follow
    --image-size: the global crop at the image size, each local one in the recipe's ratio (--image-size 16 on
    32-px images: 16 + 8); noted. Typed sizes are the user's, checked as they are."""
    if 'size_crops' in common.explicit_flags(parser, sys.argv[1:]) or args.size_crops[0] == args.image_size:
        return
    ratio = args.image_size / args.size_crops[0]
    args.size_crops = [args.image_size] + [max(min(8, args.image_size), round(size * ratio))
                                           for size in args.size_crops[1:]]
    args.notes.append(f"size_crops={args.size_crops} (the recipe's crops at --image-size {args.image_size})")


def check_crops_and_queue(args):
    """Bad input, refused before anything is written: crop lists that do not match, scales outside
    (0, 1], a queue that is not a whole number of global batches; and a note for a queue this run cannot
    fill (never used)."""
    lists = dict(size_crops=args.size_crops, min_scale_crops=args.min_scale_crops,
                 max_scale_crops=args.max_scale_crops)
    def flag(name):  # e.g. '--size-crops 224 96', as typed
        return '--' + name.replace('_', '-') + ' ' + ' '.join(str(v) for v in getattr(args, name))
    if len(args.nmb_crops) not in (1, 2) or args.nmb_crops[0] != 2 or min(args.nmb_crops) <= 0:
        raise common.UsageError(f'{flag("nmb_crops")}: give 2 global crops and optionally a number of local '
                                'crops, e.g. --nmb-crops 2 6')
    for name, values in lists.items():
        if len(values) != len(args.nmb_crops):
            raise common.UsageError(f'{flag("nmb_crops")} has {len(args.nmb_crops)} resolution(s) but '
                                    f'{flag(name)} has {len(values)}; give one value per entry of '
                                    '--nmb-crops, '
                                    'e.g. --nmb-crops 2 6 --size-crops 224 96')
    if args.size_crops[0] != args.image_size or min(args.size_crops) <= 0:
        raise common.UsageError(f'{flag("size_crops")}: the first size is the global crop and must equal '
                                f'--image-size {args.image_size} (the size the backbone is evaluated at); '
                                'the others must be positive')
    common.check_crops(args, args.size_crops, list(zip(args.min_scale_crops, args.max_scale_crops)))
    if args.queue_length < 0 or args.queue_length % args.batch_size:
        raise common.UsageError(f'--queue-length {args.queue_length} is not a multiple of the global batch '
                                f'--batch-size {args.batch_size}; use e.g. '
                                f'{max(1, round(args.queue_length / args.batch_size)) * args.batch_size} '
                                'or 0 (no queue)')
    steps = args.dataset_info['num_train'] // args.batch_size  # per epoch, each storing the global batch
    filled = max(0, math.ceil(args.epochs - args.epoch_queue_starts)) * steps * args.batch_size
    if args.queue_length > filled:  # the queue is used once full (the authors' use_the_queue)
        common.print0(f'  note: --queue-length {args.queue_length} is more than the {filled} embeddings '
                      f'this run stores from epoch {args.epoch_queue_starts:g} on: the queue never fills, so '
                      'it is never used (it still takes its memory)')
    if args.epsilon <= 0 or args.temperature <= 0 or args.sinkhorn_iterations < 1 or args.nmb_prototypes < 1:
        raise common.UsageError('--epsilon and --temperature must be positive, --sinkhorn-iterations and '
                                '--nmb-prototypes at least 1')


def check_resume(args, world_size):
    """A queue is not carried over to another --queue-length or another number of processes (the
    reference code keeps one queue file per GPU; a resumed run should continue the same run)."""
    saved = common.checkpoint_args(args)
    if saved is not None and (args.queue_length or saved.get('queue_length')):
        if saved.get('queue_length') != args.queue_length:
            raise common.UsageError(f'the checkpoint in {args.output_dir} has --queue-length '
                                    f"{saved.get('queue_length')}, not {args.queue_length}; use the same "
                                    'value or another --output-dir')
        if saved.get('world_size') != world_size:
            raise common.UsageError(f'the checkpoint in {args.output_dir} was trained on '
                                    f"{saved.get('world_size')} process(es) with a queue; resume it on "
                                    f'{saved.get("world_size")}, or use another --output-dir')
    args.world_size = world_size  # saved with the args in every checkpoint


if __name__ == '__main__':
    common.run(main)
