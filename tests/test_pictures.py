"""The pictures (docs/gallery.md): --show-views, eval_knn.py --neighbours / --feature-map, eval_linear.py
--labels-per-class / --plot, and metrics.png's extra panels, each checked against an independent reference:
the loader's own first batch, a brute-force cosine search, the plain fast probe, counted subsets, the logged
records."""
import json
import math
import os
import runpy
import signal
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import ROOT, TINY, TINY_BACKBONE, run_script

DATA = ['--data', 'procedural:64']  # 64 training images: 7 of classes 0-3, 6 of the others; 1000 test images
FAST = ['--weight-decays', '0.01', '0.1', '--max-iter', '30']  # a fast probe that takes a second


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A 4-step BYOL run of the tiny backbone (it logs output_std and tau): its checkpoint and metrics."""
    out = tmp_path_factory.mktemp('pictures') / 'run'
    run_script('byol.py', *DATA, *TINY, '--batch-size', '32', '--epochs', '2', '--knn-every', '-1',
               '--output-dir', out)
    return out


def png(path):
    return np.asarray(Image.open(path).convert('RGB'))


def assert_usage_error(result, words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and words in lines[0], result.stderr


# ---- --show-views: the loader's first batch ---------------------------------------------------------

def first_batch(script, argv, output_dir):
    """The (views, indices) of the first batch the training loop of `script` gets with these flags: the method
    file runs in this process up to its build_train_loader, whose loader gives its first batch of epoch 0."""
    build, saved_argv = common.build_train_loader, sys.argv
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    got = {}

    class Got(Exception):
        pass

    def capture(args, transform, device, split='train'):
        loader = build(args, transform, device, split)
        views, _, indices = next(iter(loader.epoch(0)))
        got.update(views=[v.cpu() for v in views], indices=indices.cpu())
        raise Got()

    common.build_train_loader, sys.argv = capture, [script, *argv, '--output-dir', str(output_dir)]
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
    except Got:
        pass
    finally:
        common.build_train_loader, sys.argv = build, saved_argv
        common.HELD.clear()
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return got['views'], got['indices']


@pytest.mark.parametrize('script,augment', [('simclr.py', 'cpu'), ('simclr.py', 'device'), ('dino.py', 'cpu'),
                                            ('dino.py', 'device')])
def test_show_views_draws_the_training_loops_first_batch_and_trains_nothing(tmp_path, script, augment):
    flags = [*DATA, *TINY, '--batch-size', '16', '--augment', augment, '--seed', '3']
    if script == 'dino.py':  # multi-crop: 2 global crops of 16 px, 6 local ones of 8 px
        flags += ['--local-crop-size', '8']
    picture = tmp_path / 'views.png'
    result = run_script(script, *flags, '--show-views', picture, '--output-dir', tmp_path / 'run')
    assert 'nothing trained' in result.stdout
    assert not (tmp_path / 'run').exists()  # no output folder, no checkpoint

    views, indices = first_batch(script, flags, tmp_path / 'reference')
    mean = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    expected = [((v[:8] * std + mean) * 255).round().clamp(0, 255) for v in views]  # (8, 3, S, S)
    assert len(views) == (8 if script == 'dino.py' else 2)
    assert [v.shape[-1] for v in views] == ([16, 16] + [8] * 6 if script == 'dino.py' else [16, 16])

    drawn = png(picture).astype(np.int64)
    base = common.ProceduralTextures(64, 'train')
    originals = [torch.from_numpy(np.array(base[i][0])).permute(2, 0, 1) for i in indices[:8].tolist()]
    mosaic, boxes = common.views_mosaic(originals, [e.to(torch.uint8) for e in expected])
    assert drawn.shape[1] == mosaic.shape[1] and drawn.shape[0] > mosaic.shape[0]  # a header above the grid
    grid = drawn[drawn.shape[0] - mosaic.shape[0]:]
    for (row, view), (top, left, side) in boxes.items():
        scale = side // expected[view].shape[-1]
        pixels = grid[top:top + side:scale, left:left + side:scale]  # (S, S, 3): one per enlarged pixel
        reference = expected[view][row].permute(1, 2, 0).numpy()
        assert np.abs(pixels - reference).max() <= 1, (row, view)  # the loader's view, pixel for pixel
        block = grid[top:top + side, left:left + side]
        assert (block == np.repeat(np.repeat(pixels, scale, 0), scale, 1)).all()  # each pixel enlarged whole


def test_show_views_refuses_an_unwritable_png_before_any_work(tmp_path):
    result = run_script('simclr.py', *DATA, *TINY, '--batch-size', '16',
                        '--show-views', tmp_path / 'no' / 'v.png', '--output-dir', tmp_path / 'run',
                        check=False)
    assert_usage_error(result, '--show-views')
    assert not (tmp_path / 'run').exists()


# ---- eval_knn.py --neighbours: a brute-force cosine search ------------------------------------------

def features_of(backbone_args, seed=None, checkpoint=None):
    """Raw features (train, test) and labels of the tiny backbone, trained (checkpoint) or untrained (built
    after seeding with `seed`, as a training run builds it)."""
    import eval_knn
    argv = [str(checkpoint)] if checkpoint else ['--random-init', *DATA]
    args, state = common.parse_eval_args(eval_knn.parser, argv + backbone_args)
    if checkpoint is None:
        torch.manual_seed(seed)
        backbone = common.build_backbone(args).eval()
    else:
        backbone = common.load_eval_backbone(args, state, torch.device('cpu'))
    loaders = common.build_eval_loaders(args, torch.device('cpu'))
    return common.extract_train_test_features(backbone, loaders, torch.device('cpu'), args, normalize=False)


def brute_force_cosines(train, test, query):
    """Cosine of test image `query` with every training image, one at a time, in float64."""
    q = test[query].double().numpy()
    return np.array([float(q @ t / (np.linalg.norm(q) * np.linalg.norm(t))) for t in train.double().numpy()])


def test_neighbours_are_a_brute_force_cosine_search_and_the_rate_is_the_labels(tmp_path, run_dir):
    picture, record = tmp_path / 'neighbours.png', tmp_path / 'knn.json'
    result = run_script('eval_knn.py', run_dir / 'checkpoint.pth', '--workers', '0', '--k', '20',
                        '--neighbours', picture, '--neighbours-k', '5', '--queries', '6',
                        '--compare-random-init', '--json', record)
    blocks = json.load(open(record))['neighbours']
    assert [b['network'] for b in blocks] == ['byol epoch 2', 'untrained (same seed)']
    references = [features_of(['--workers', '0'], checkpoint=run_dir / 'checkpoint.pth'),
                  features_of(TINY_BACKBONE, seed=0)]  # the run's --seed is 0
    for block, (train_x, train_y, test_x, test_y) in zip(blocks, references):
        queries, indices = block['queries'], np.array(block['indices'])
        assert len(queries) == 6 == len(set(queries)) and indices.shape == (6, 5)
        for query, found in zip(queries, indices):
            cosines = brute_force_cosines(train_x, test_x, query)
            best = np.sort(cosines)[::-1][:5]
            assert np.allclose(cosines[found], best, atol=1e-4), (block['network'], query)  # top 5, in order
        same = (train_y.numpy()[indices] == test_y.numpy()[queries][:, None]).mean() * 100
        assert block['same_class_percent'] == pytest.approx(same)
        assert f"{block['network']}: {same:.1f}% of the 5 nearest" in result.stdout
    # the untrained network's kNN beside the checkpoint's, from the same features
    train_x, train_y, test_x, test_y = references[1]
    untrained = common.knn_accuracy(torch.nn.functional.normalize(train_x, dim=1), train_y,
                                    torch.nn.functional.normalize(test_x, dim=1), test_y, 10, [20], 0.07)[20]
    assert json.load(open(record))['untrained_results']['20']['top1'] == pytest.approx(untrained[0])
    assert f'untrained (same seed): top-1 {untrained[0]:6.2f}' in result.stdout
    width, height = Image.open(picture).size
    import eval_knn
    inches = eval_knn.neighbours_figsize(12, 5)
    assert (width, height) == (round(100 * inches[0]), round(100 * inches[1]))


def test_neighbours_refuse_more_than_the_training_set_and_write_nothing(tmp_path, run_dir):
    result = run_script('eval_knn.py', run_dir / 'checkpoint.pth', '--workers', '0', '--k', '20',
                        '--neighbours', tmp_path / 'n.png', '--neighbours-k', '65', check=False)
    assert_usage_error(result, '--neighbours-k 65')
    assert not (tmp_path / 'n.png').exists()
    result = run_script('eval_knn.py', run_dir / 'checkpoint.pth',
                        '--feature-map', tmp_path / 'missing' / 'm.png', check=False)
    assert_usage_error(result, '--feature-map')


def test_feature_map_is_principal_components_and_mean_pairwise_cosines(tmp_path, run_dir):
    import eval_knn
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(40, 6, generator=generator), dim=1)
    labels = torch.arange(40) % 3
    coordinates, explained, similarity = eval_knn.feature_map(features, labels, 3)
    x = features.double().numpy()
    eigenvalues = np.linalg.eigvalsh(np.cov(x.T))[::-1]  # the covariance's spectrum, largest first
    assert np.allclose(coordinates.numpy().var(axis=0, ddof=1), eigenvalues[:2])
    assert explained == pytest.approx(eigenvalues[:2].sum() / eigenvalues.sum())
    for a in range(3):
        for b in range(3):
            pairs = [x[i] @ x[j] for i in range(40) for j in range(40) if labels[i] == a and labels[j] == b]
            assert similarity[a, b].item() == pytest.approx(np.mean(pairs))
    picture = tmp_path / 'map.png'
    run_script('eval_knn.py', run_dir / 'checkpoint.pth', '--workers', '0', '--k', '20',
               '--feature-map', picture, '--compare-random-init')
    assert Image.open(picture).size == (1100, 920)  # figsize (11, 4.6 per network) at 100 dpi


# ---- eval_linear.py --labels-per-class: nested subsets, the 'all' point --------------------------------

def test_subsets_are_nested_with_exactly_n_per_class_drawn_from_the_seed():
    import eval_linear
    labels = torch.tensor(common.ProceduralTextures(64, 'train').targets)
    subsets = eval_linear.nested_subsets(labels, [1, 3, 6, 'all'], seed=5)
    for n in (1, 3, 6):
        assert torch.bincount(labels[subsets[n]], minlength=10).tolist() == [n] * 10
    assert set(subsets[1].tolist()) < set(subsets[3].tolist()) < set(subsets[6].tolist()) < set(range(64))
    assert subsets['all'].tolist() == list(range(64))
    again = eval_linear.nested_subsets(labels, [3], seed=5)
    other = eval_linear.nested_subsets(labels, [3], seed=6)
    assert torch.equal(again[3], subsets[3]) and not torch.equal(other[3], subsets[3])


def test_the_all_point_is_the_plain_fast_probe_and_the_record_holds_every_point(tmp_path, run_dir):
    checkpoint = run_dir / 'checkpoint.pth'
    run_script('eval_linear.py', checkpoint, '--workers', '0', *FAST, '--json', tmp_path / 'plain.json')
    picture = tmp_path / 'curve.png'
    result = run_script('eval_linear.py', checkpoint, '--workers', '0', *FAST,
                        '--labels-per-class', '2', '1', 'all', '--plot', picture, '--compare-random-init',
                        '--json', tmp_path / 'curve.json')
    plain, curve = json.load(open(tmp_path / 'plain.json')), json.load(open(tmp_path / 'curve.json'))
    points = curve['label_efficiency']
    assert list(points) == ['byol epoch 2', 'untrained (same seed)']
    for name, line in points.items():
        assert [p['labels_per_class'] for p in line] == [1, 2, 'all']
        assert [p['images'] for p in line] == [10, 20, 64]
    assert points['byol epoch 2'][-1]['top1'] == plain['top1'] == curve['top1']
    assert f'label-efficiency curve -> {picture}' in result.stdout
    assert Image.open(picture).size == (600, 400)


def test_labels_per_class_above_the_smallest_class_is_refused_before_any_work(tmp_path, run_dir):
    result = run_script('eval_linear.py', run_dir / 'checkpoint.pth', '--workers', '0',
                        '--labels-per-class', '7', '--plot', tmp_path / 'curve.png', check=False)
    assert_usage_error(result, 'smallest class')
    assert not (tmp_path / 'curve.png').exists()
    result = run_script('eval_linear.py', run_dir / 'checkpoint.pth', '--plot', tmp_path / 'curve.png',
                        check=False)
    assert_usage_error(result, '--labels-per-class')


# ---- metrics.png: a panel per logged scalar, with its levels ------------------------------------------

def test_metric_panels_draw_every_logged_scalar_with_its_levels(run_dir):
    records = common.read_metrics(run_dir / 'metrics.jsonl')
    run_args = torch.load(run_dir / 'checkpoint.pth', map_location='cpu', weights_only=True)['args']
    panels = {p['name']: p for p in common.metric_panels(records, run_args)}
    assert set(panels) == {'tau', 'output_std'}  # what byol.py logs beyond loss and lr
    logged = [r for r in records if 'step' in r]
    assert panels['output_std']['steps'] == [r['step'] for r in logged]
    assert panels['output_std']['values'] == [r['output_std'] for r in logged]
    levels = [level for level, _ in panels['output_std']['levels']]
    assert levels == [1 / math.sqrt(run_args['proj_dim']), 0.0]
    assert panels['tau']['values'] == [r['tau'] for r in logged]
    assert Image.open(run_dir / 'metrics.png').size == (1500, 800)  # two rows of panels

    dino = [dict(epoch=1, step=s, loss=1.0, images_per_s=1.0, lr=0.1, m=0.996, teacher_entropy=4.0 - s)
            for s in (1, 2)]
    panels = {p['name']: p for p in common.metric_panels(dino, dict(out_dim=64))}
    assert [level for level, _ in panels['teacher_entropy']['levels']] == [math.log(64), 0.0]
    assert panels['teacher_entropy']['values'] == [3.0, 2.0] and panels['m']['values'] == [0.996, 0.996]
    assert common.metric_panels([dict(epoch=1, step=1, loss=1.0, images_per_s=1.0, lr=0.1)]) == []
