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
  python eval_knn.py --pretrained dino_deitsmall16_pretrain.pth --data /imagenet   # the authors' weights
  torchrun --nproc_per_node=8 eval_knn.py runs/dino-imagenet-vit_small/checkpoint.pth --json knn.json
  python eval_knn.py runs/dino-cifar10-vit_tiny/checkpoint.pth --attention-image img.jpg \
      --attention-out maps.png

Did training help? `--compare-random-init` also scores the same network untrained (the one the checkpoint's
run started from: same architecture and seed), row by row beside the checkpoint's:
  python eval_knn.py CKPT --temperature 0.1 --compare-random-init

Pictures (docs/gallery.md), drawn from the features the kNN uses, next to the evaluation:
  python eval_knn.py CKPT --neighbours neighbours.png --compare-random-init   # test images, their top-k
  python eval_knn.py CKPT --feature-map map.png --compare-random-init         # PCA map, class similarities

ViT checkpoints (ours or --pretrained): `--attention-image` draws, instead of evaluating, the last block's
attention from the CLS token to every patch, one panel per head, over the image (as in the DINO paper's
figures).
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
evaluation.add_argument('--attention-image', default=None,
                        help='ViT: draw the CLS attention maps over this image (resized to --image-size) '
                        'instead of evaluating')
evaluation.add_argument('--attention-out', default='attention.png',
                        help='where to write the attention figure')
pictures = parser.add_argument_group('pictures (drawn as well as the kNN evaluation)')
pictures.add_argument('--neighbours', default=None, metavar='PNG',
                      help='draw test images (--queries) and their --neighbours-k most cosine-similar '
                           'training images, framed green (same class) or red')
pictures.add_argument('--neighbours-k', type=int, default=8, help='training neighbours drawn per test image')
pictures.add_argument('--queries', type=int, default=8,
                      help='test images drawn: a fixed set, drawn from --seed')
pictures.add_argument('--feature-map', default=None, metavar='PNG',
                      help='draw the test features projected on their first 2 principal components, coloured '
                           "by class, and the classes' mean cosine similarity matrix")
evaluation.add_argument('--compare-random-init', action='store_true',
                        help='also score the untrained network of the same seed (the one the checkpoint\'s '
                             'run started from), and draw its pictures below')


# -----------------------------------------------------------------------------
# Pictures: nearest neighbours and the map of the features
# -----------------------------------------------------------------------------
def check_picture_args(args):
    """One-line errors for the picture flags, before any work."""
    for path, flag in ((args.neighbours, '--neighbours'), (args.feature_map, '--feature-map')):
        if path:
            common.check_writable_file(path, flag)
    if (args.neighbours or args.feature_map) and args.attention_image:
        raise common.UsageError('--attention-image draws instead of evaluating; run --neighbours / '
                                '--feature-map in another command')
    if args.compare_random_init and args.random_init:
        raise common.UsageError('--compare-random-init compares a checkpoint with its untrained network; '
                                'with --random-init there is no checkpoint: drop one of the two')


def query_indices(num_test, queries, seed):
    """The fixed test images of the neighbours picture: `queries` of them, drawn from `seed` alone, sorted."""
    return torch.randperm(num_test, generator=torch.Generator().manual_seed(seed))[:queries].sort().values


def nearest_neighbours(train_features, test_features, queries, k):
    """(similarities, indices), each (Q, k): the k training features most cosine-similar to each of the
    test features `queries` (the features are L2-normalised, so cosine = dot product), most similar first."""
    similarity = test_features[queries.to(test_features.device)] @ train_features.T  # (Q, N_train)
    top_sim, top_idx = similarity.topk(k, dim=1)                                     # (Q, k) each
    return top_sim.cpu(), top_idx.cpu()


def same_class_rate(train_labels, test_labels, queries, indices):
    """Percentage of the drawn neighbours (Q, k) whose class is their query's."""
    same = train_labels.cpu()[indices] == test_labels.cpu()[queries][:, None]  # (Q, k)
    return 100 * same.double().mean().item()


def as_picture(image):
    """A dataset item's PIL image -> (H, W, 3) uint8 array for imshow."""
    import numpy as np
    return np.asarray(image.convert('RGB'))


def plot_neighbours(blocks, train_base, test_base, names, path):
    """The neighbours picture: one row per query (and a block of rows per network in `blocks`, a list of
    dict(title, queries, indices, similarities, rate, train_labels, test_labels)): the test image, then its
    neighbours, most similar first, each framed green when its class is the query's, red when not."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows, k = sum(len(b['queries']) for b in blocks), blocks[0]['indices'].shape[1]
    fig, axes = plt.subplots(rows, 1 + k, figsize=neighbours_figsize(rows, k), squeeze=False)
    row = 0
    for block in blocks:
        for q, query in enumerate(block['queries'].tolist()):
            query_label = int(block['test_labels'][query])
            panels = [(test_base[query][0], 'black', f"{names[query_label]}" if q else
                       f"{block['title']}\n{names[query_label]}")]
            for similarity, index in zip(block['similarities'][q].tolist(), block['indices'][q].tolist()):
                same = int(block['train_labels'][index]) == query_label
                panels.append((train_base[index][0], 'tab:green' if same else 'tab:red', f'{similarity:.2f}'))
            for ax, (image, colour, label) in zip(axes[row], panels):
                ax.imshow(as_picture(image), interpolation='nearest')
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set(color=colour, linewidth=3)
                ax.set_title(label, fontsize=7)
            row += 1
        axes[row - len(block['queries']), 0].set_ylabel(f"{block['rate']:.0f}% same class", fontsize=7)
    fig.suptitle('test image | its nearest training images by cosine similarity '
                 '(green: same class, red: other)', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def neighbours_figsize(rows, k):
    """(width, height) in inches of the neighbours picture (100 px each)."""
    return 0.8 * (1 + k), 0.9 * rows + 0.4


def feature_map(features, labels, num_classes):
    """The data of the map picture: (coordinates (N, 2) of the features on their first two principal
    components, the fraction of the variance they explain, the (C, C) matrix of the mean cosine
    similarity between the test images of class a and those of class b). The features are L2-normalised,
    so the mean of the pairwise cosines of two classes is the dot product of their mean features."""
    x = features.double().cpu()
    centred = x - x.mean(dim=0)
    _, singular, directions = torch.linalg.svd(centred, full_matrices=False)  # principal axes: rows of Vh
    coordinates = centred @ directions[:2].T                                  # (N, 2)
    explained = (singular[:2].square().sum() / singular.square().sum()).item()
    means = torch.stack([x[labels.cpu() == c].mean(dim=0) if (labels == c).any() else torch.zeros(x.shape[1])
                         for c in range(num_classes)])                         # (C, D)
    return coordinates, explained, means @ means.T


def plot_feature_map(blocks, names, path):
    """The map picture, one row per network in `blocks` (dict(title, coordinates, explained, similarity,
    labels)): the test features on their first two principal components coloured by class, and the classes'
    mean cosine similarity matrix (a bright diagonal and a dark rest: classes apart)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(blocks), 2, figsize=(11, 4.6 * len(blocks)), squeeze=False)
    colours = plt.get_cmap('tab10' if len(names) <= 10 else 'tab20')
    for (scatter, matrix), block in zip(axes, blocks):
        labels = block['labels'].cpu()
        for c, name in enumerate(names):
            chosen = labels == c
            scatter.scatter(block['coordinates'][chosen, 0], block['coordinates'][chosen, 1], s=3,
                            color=colours(c % colours.N), label=name if len(names) <= 20 else None)
        scatter.set(title=f"{block['title']}: test features, PCA "
                          f"({100 * block['explained']:.0f}% of the variance)",
                    xlabel='principal component 1', ylabel='principal component 2')
        if len(names) <= 20:
            scatter.legend(fontsize=6, markerscale=3, loc='best')
        shown = matrix.imshow(block['similarity'].numpy(), cmap='viridis')
        matrix.set(title=f"{block['title']}: mean cosine similarity between classes")
        if len(names) <= 20:
            matrix.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
            matrix.set_yticks(range(len(names)), names, fontsize=6)
        fig.colorbar(shown, ax=matrix)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_pictures(args, networks, eval_loaders):
    """--neighbours and --feature-map, from the kNN's features of each of `networks` ([(title, features)]: the
    checkpoint's and, with --compare-random-init, the untrained network's). Returns what the JSON record keeps
    of them."""
    if not (args.neighbours or args.feature_map):
        return {}
    num_classes = args.dataset_info['num_classes']
    train_base = common.base_dataset(args, common.labelled_split(args))
    test_base = common.base_dataset(args, 'test')
    names = common.class_names(args, train_base)
    record = {}
    if args.neighbours:
        queries = query_indices(len(networks[0][1][2]), args.queries, args.seed)
        blocks = []
        for title, (train_x, train_y, test_x, test_y) in networks:
            similarities, indices = nearest_neighbours(train_x, test_x, queries, args.neighbours_k)
            rate = same_class_rate(train_y, test_y, queries, indices)
            common.print0(f'  neighbours, {title}: {rate:.1f}% of the {args.neighbours_k} nearest training '
                          f'images of {len(queries)} test images share their class')
            blocks.append(dict(title=title, queries=queries, indices=indices, similarities=similarities,
                               rate=rate, train_labels=train_y.cpu(), test_labels=test_y.cpu()))
        if common.get_rank() == 0:
            plot_neighbours(blocks, train_base, test_base, names, args.neighbours)
        common.print0(f'  neighbours picture -> {args.neighbours}')
        record['neighbours'] = [dict(network=b['title'], k=args.neighbours_k, queries=queries.tolist(),
                                     indices=b['indices'].tolist(), same_class_percent=b['rate'])
                                for b in blocks]
    if args.feature_map:
        blocks = []
        for title, (_, _, test_x, test_y) in networks:
            coordinates, explained, similarity = feature_map(test_x, test_y, num_classes)
            blocks.append(dict(title=title, coordinates=coordinates, explained=explained,
                               similarity=similarity, labels=test_y))
        if common.get_rank() == 0:
            plot_feature_map(blocks, names, args.feature_map)
        common.print0(f'  feature map -> {args.feature_map}')
    return record


def main():
    args, state = common.parse_eval_args(parser, load_released=released.load)  # ranges: common.RANGES
    if len(set(args.k)) < len(args.k):  # each k is scored once: a repeated one would count its hits twice
        raise common.UsageError(f'--k {" ".join(map(str, args.k))} names a number of neighbours twice; '
                                'name each once')
    if args.dataset_info['num_classes'] < 2:
        raise common.UsageError(f"--data {args.data} has {args.dataset_info['num_classes']} class: the kNN "
                                'evaluation needs at least 2 classes (with one, every prediction is right)')
    if args.json:
        common.check_writable_file(args.json, '--json')
    if args.attention_image:
        common.check_writable_file(args.attention_out, '--attention-out')
    check_picture_args(args)
    device, rank, world_size, is_main = common.setup(args)
    backbone = common.load_eval_backbone(args, state, device)

    if args.attention_image:
        if not isinstance(backbone, common.VisionTransformer):
            raise common.UsageError('--attention-image needs a ViT checkpoint (--arch vit_*); '
                                    'this backbone is a ResNet')
        resize = T.Compose([T.Resize(args.image_size, antialias=True), T.CenterCrop(args.image_size),
                            T.PILToTensor()])
        image = resize(common.load_image(args.attention_image))  # uint8 (3, H, W)
        mean = 255 * torch.tensor(common.IMAGENET_MEAN, device=device)[:, None, None]
        std = 255 * torch.tensor(common.IMAGENET_STD, device=device)[:, None, None]
        x = (image.float().to(device) - mean) / std  # (3, H, W), normalised as in training
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
    if args.neighbours and args.neighbours_k > num_train:
        raise common.UsageError(f'--neighbours-k {args.neighbours_k} is more neighbours than the {num_train} '
                                f'training images; use --neighbours-k {num_train} or fewer')
    if args.neighbours and args.queries > eval_loaders[1].dataset_size:
        raise common.UsageError(f'--queries {args.queries} is more than the {eval_loaders[1].dataset_size} '
                                'test images; ask for fewer')

    features = common.extract_train_test_features(backbone, eval_loaders, device, args)
    results = common.knn_accuracy(*features, args.dataset_info['num_classes'], args.k, args.temperature)
    networks = [(f"{state['method']} epoch {state['epoch']}" if state else 'random-init', features)]
    untrained_results = {}
    if args.compare_random_init:
        untrained = common.load_untrained_backbone(args, state, device)
        networks.append(('untrained (same seed)',
                         common.extract_train_test_features(untrained, eval_loaders, device, args)))
        untrained_results = common.knn_accuracy(*networks[1][1], args.dataset_info['num_classes'], args.k,
                                                args.temperature)
    for k, (top1, top5) in results.items():
        beside = ''
        if untrained_results:
            top1_0, top5_0 = untrained_results[k]
            beside = (f'   untrained (same seed): top-1 {top1_0:6.2f}  top-5 {top5_0:6.2f}   '
                      f'gain {top1 - top1_0:+6.2f}')
        common.print0(f'kNN k={k:<4d} T={args.temperature}: top-1 {top1:6.2f}  top-5 {top5:6.2f}{beside}')
    pictures_record = draw_pictures(args, networks, eval_loaders)
    if args.json and is_main:
        scored = lambda found: {str(k): dict(top1=top1, top5=top5) for k, (top1, top5) in found.items()}  # noqa: E731
        common.write_json(args.json, dict(**pictures_record,
            checkpoint=args.checkpoint, method=state['method'] if state else 'random-init',
            epoch=state['epoch'] if state else 0, data=args.data, arch=args.arch, image_size=args.image_size,
            temperature=args.temperature, results=scored(results),
            **(dict(untrained_results=scored(untrained_results)) if untrained_results else {})))


if __name__ == '__main__':
    common.run(main)
