"""Lightly's SimCLR on the CPU benchmark's settings: the peer `tools/benchmark.py --speed --peer PYTHON` times
simclr.py against (the CPU benchmark's speed target: whole training steps at least as fast as the peer's).

The peer's own pieces, as its CIFAR-10 benchmark uses them: lightly.transforms.SimCLRTransform (PIL, one image at
a time, in DataLoader workers; 32 px, colour strength 0.5, no blur), lightly.models.modules.SimCLRProjectionHead
and lightly.loss.NTXentLoss, in the plain PyTorch loop of Lightly's examples (SGD, fp32). The backbone is this
repository's ResNet-18 with the CIFAR stem at --width (common.ResNet), so that what differs is the input
pipeline and the loop, not the network. Each epoch appends its wall-clock, images/s and CPU time (workers
included) to OUTPUT/metrics.jsonl, as the method files do:

  python tools/peer_lightly.py --data /tmp/cifar10 --epochs 2 --workers 2 --output-dir /tmp/peer

It needs `lightly` (pip install lightly; a virtual environment with --system-site-packages keeps this
repository's torch); without it, it stops with one line.
"""
import json
import os
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))
import common  # noqa: E402 (after the path)


def main():
    parser = common.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', required=True, help='a folder with train/<class>/<image> (CIFAR-10 as images)')
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--workers', type=int, default=0, help='DataLoader worker processes')
    parser.add_argument('--width', type=int, default=16, help='base width of the ResNet-18 (64: the standard one)')
    parser.add_argument('--lr', type=float, default=0.5)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output-dir', required=True)
    args = parser.parse_args()
    if args.epochs < 1 or args.batch_size < 2 or args.workers < 0 or args.width < 1:
        parser.error('--epochs and --width must be >= 1, --batch-size >= 2, --workers >= 0')
    train = os.path.join(args.data, 'train')
    if not os.path.isdir(train):
        parser.error(f'--data {args.data} has no train/ folder: give a folder with train/<class>/<image>')
    try:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead
        from lightly.transforms import SimCLRTransform
    except ImportError as error:
        parser.error(f'lightly is not importable here ({error}): pip install lightly, in a virtual environment '
                     'made with --system-site-packages, and give its python to --peer')
    import torch
    import torchvision

    torch.manual_seed(args.seed)
    transform = SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
    dataset = torchvision.datasets.ImageFolder(train, transform=transform)
    if len(dataset) < args.batch_size:
        parser.error(f'--data {args.data} has {len(dataset)} training images, fewer than --batch-size {args.batch_size}')
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    backbone = common.ResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], args.width, cifar_stem=True)
    model = torch.nn.Sequential(backbone, SimCLRProjectionHead(backbone.embed_dim, 2048, 128))
    criterion = NTXentLoss(temperature=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * args.batch_size / 256, momentum=0.9,
                                weight_decay=1e-4)
    os.makedirs(args.output_dir, exist_ok=True)
    metrics = os.path.join(args.output_dir, 'metrics.jsonl')
    model.train()
    for epoch in range(1, args.epochs + 1):
        started, cpu_started, images = time.time(), common.process_cpu_seconds(), 0
        for (view1, view2), _ in loader:
            loss = criterion(model(view1), model(view2))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            images += view1.shape[0]
        seconds = time.time() - started
        record = dict(epoch=epoch, epoch_loss=loss.item(), epoch_seconds=seconds, epoch_images_per_s=images / seconds,
                      epoch_cpu_seconds=common.process_cpu_seconds() - cpu_started)
        with open(metrics, 'a') as f:
            f.write(json.dumps(record) + '\n')
        print(f"epoch {epoch}/{args.epochs}: {record['epoch_images_per_s']:.1f} img/s, loss {loss.item():.4f}",
              flush=True)


if __name__ == '__main__':
    main()
