"""Weighted k-nearest-neighbour evaluation of frozen features, for any method's checkpoint.

The backbone stored in the checkpoint (the weights each paper evaluates: the encoder, not the
projection head; DINO's teacher) embeds every training and test image with the evaluation
transform; features are L2-normalised; each test image takes the k most cosine-similar
training images, which vote for their label with weight exp(similarity / T) (Wu et al. 2018).

Conventions: ImageNet (DINO) k=20, T=0.07, also k=10/100/200 -- the default here;
CIFAR (InstDisc, MoCo's CIFAR demo) k=200, T=0.1 -- `--temperature 0.1` and read the k=200 row.

Run:
  python eval_knn.py runs/simclr-cifar10-resnet18/checkpoint.pth --temperature 0.1
  python eval_knn.py --random-init --arch resnet18 --data cifar10          # the untrained baseline
  python eval_knn.py --pretrained dino_deitsmall16_pretrain.pth --data /imagenet   # the authors' weights (released.py)
  torchrun --nproc_per_node=8 eval_knn.py runs/dino-imagenet-vit_small/checkpoint.pth --json knn.json
  python eval_knn.py runs/dino-cifar10-vit_tiny/checkpoint.pth --attention-image img.jpg --attention-out maps.png

ViT checkpoints (ours or --pretrained): `--attention-image` draws, instead of evaluating, the last block's attention from the
CLS token to every patch, one panel per head, over the image (as in the DINO paper's figures).
"""
import torch
import torchvision.transforms as T

import common
from tools import released

parser = common.get_eval_parser(__doc__, 'eval_knn')
evaluation = parser.add_argument_group('kNN evaluation')
evaluation.add_argument('--k', type=int, nargs='+', default=[10, 20, 100, 200], help='numbers of neighbours')
evaluation.add_argument('--temperature', type=float, default=0.07, help='T of the vote weights exp(sim / T)')
evaluation.add_argument('--json', default=None, help='also write the results to this JSON file')
evaluation.add_argument('--attention-image', default=None, help='ViT: draw the CLS attention maps over this image '
                        '(resized to --image-size) instead of evaluating')
evaluation.add_argument('--attention-out', default='attention.png', help='where to write the attention figure')


def main():
    args, state = common.parse_eval_args(parser, load_released=released.load)  # ranges: common.RANGES
    if args.json:
        common.check_writable_file(args.json, '--json')
    if args.attention_image:
        common.check_writable_file(args.attention_out, '--attention-out')
    device, rank, world_size, is_main = common.setup(args)
    backbone = common.load_eval_backbone(args, state, device)

    if args.attention_image:
        if not isinstance(backbone, common.VisionTransformer):
            raise common.UsageError('--attention-image needs a ViT checkpoint (--arch vit_*); this backbone is a ResNet')
        resize = T.Compose([T.Resize(args.image_size, antialias=True), T.CenterCrop(args.image_size), T.PILToTensor()])
        image = resize(common.load_image(args.attention_image))  # uint8 (3, H, W)
        x = (image.float().to(device) - 255 * torch.tensor(common.IMAGENET_MEAN, device=device)[:, None, None]) \
            / (255 * torch.tensor(common.IMAGENET_STD, device=device)[:, None, None])  # (3, H, W) as in training
        maps = common.attention_maps(backbone, x)  # (heads, H / patch, W / patch)
        if is_main:
            common.plot_attention_maps(image, maps, args.attention_out,
                                       title=f"{state['method'] if state else 'random-init'} {args.arch}: "
                                             'last-layer CLS attention per head')
        common.print0(f'  attention maps of {maps.shape[0]} heads ({maps.shape[1]}x{maps.shape[2]} patches) '
                      f'-> {args.attention_out}')
        return
    eval_loaders = common.build_eval_loaders(args, device)
    if eval_loaders is None:
        raise common.UsageError(f'{args.data} has no labelled test split to evaluate on')
    num_train = eval_loaders[0].dataset_size
    if max(args.k) > num_train:
        raise common.UsageError(f'--k {max(args.k)} is more neighbours than the {num_train} training images; '
                                f'use k <= {num_train}')

    features = common.extract_train_test_features(backbone, eval_loaders, device, args)
    results = common.knn_accuracy(*features, args.dataset_info['num_classes'], args.k, args.temperature)
    for k, (top1, top5) in results.items():
        common.print0(f'kNN k={k:<4d} T={args.temperature}: top-1 {top1:6.2f}  top-5 {top5:6.2f}')
    if args.json and is_main:
        common.write_json(args.json, dict(
            checkpoint=args.checkpoint, method=state['method'] if state else 'random-init',
            epoch=state['epoch'] if state else 0, data=args.data, arch=args.arch, image_size=args.image_size,
            temperature=args.temperature,
            results={str(k): dict(top1=top1, top5=top5) for k, (top1, top5) in results.items()}))


if __name__ == '__main__':
    common.run(main)
