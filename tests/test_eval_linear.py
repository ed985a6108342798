"""eval_linear.py: the fast probe against known answers (a linear separation, random labels, the optimum of
its objective), its weight-decay choice blind to the test labels, one process vs two, the --augment
protocol (frozen backbone, exact resume, every recipe) and its one-line errors."""
import json

import pytest
import torch
import torch.nn.functional as F

import common
import eval_linear
from conftest import TINY_BACKBONE, run_script
from test_cli import expect_error

TINY_DATA = ['--random-init', '--data', 'procedural:64', *TINY_BACKBONE]


@pytest.fixture
def one_thread():
    """The fits are thousands of tiny float64 products: one thread is several times faster on a busy CPU."""
    torch.set_num_threads(1)
    yield


def linearly_separable(n, seed, dim=16, classes=10, margin=2.0):
    """n features whose label is the argmax of one fixed linear map (the same for every seed), kept only
    where the best score beats the second by `margin`: separable by a linear classifier with a margin.
    Scaled and shifted so that the probe's standardisation has something to undo."""
    true_map = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(20 * n, dim, generator=torch.Generator().manual_seed(seed))
    scores = x @ true_map.T  # (20n, classes)
    top2 = scores.topk(2, dim=1).values
    keep = top2[:, 0] - top2[:, 1] > margin
    x, labels = x[keep][:n], scores[keep][:n].argmax(dim=1)
    assert len(x) == n
    return x * 5 + 3, labels


def test_probe_separates_a_linear_separation_and_stays_at_chance_on_random_labels(one_thread):
    train_x, train_y = linearly_separable(1000, seed=0)
    test_x, test_y = linearly_separable(500, seed=1)
    result = eval_linear.fast_linear_probe(train_x, train_y, test_x, test_y, 10, [1e-4, 1e-2], max_iter=200)
    assert result['top1'] >= 97.0, result['top1']  # 99.8 measured: some classes have few training images
    # control: labels that the features say nothing about (train and test drawn independently)
    random_train = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(2))
    random_test = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(3))
    control = eval_linear.fast_linear_probe(train_x, random_train, test_x, random_test, 10, [1e-4, 1e-2], max_iter=200)
    assert abs(control['top1'] - 10.0) < 6.0, control['top1']  # chance 10%; 1 s.d. = 1.3 points at 500 images


def test_weight_decay_choice_never_reads_test_labels(one_thread):
    train_x, train_y = linearly_separable(600, seed=0)
    test_x, test_y = linearly_separable(300, seed=1)
    poisoned = (test_y + 1) % 10  # every test label wrong
    grid = [1e-4, 1e3]
    clean = eval_linear.fast_linear_probe(train_x, train_y, test_x, test_y, 10, grid, max_iter=200)
    dirty = eval_linear.fast_linear_probe(train_x, train_y, test_x, poisoned, 10, grid, max_iter=200)
    assert clean['weight_decay'] == dirty['weight_decay'] == 1e-4  # the held-out TRAIN images prefer the weak decay
    assert clean['sweep'] == dirty['sweep']
    assert torch.allclose(clean['weight'], dirty['weight'], rtol=1e-9, atol=1e-12)
    assert torch.allclose(clean['bias'], dirty['bias'], rtol=1e-9, atol=1e-12)
    assert clean['top1'] > 95 and dirty['top1'] < 5
    # control: a choice made on the poisoned test labels would have picked the other weight decay
    on_test = {}
    for wd in grid:
        weight, bias = eval_linear.fit_logistic_regression(train_x, train_y, 10, wd, max_iter=200)
        on_test[wd] = eval_linear.topk_accuracy(test_x.double() @ weight.T + bias, poisoned)[0]
    assert on_test[1e3] > on_test[1e-4]


def test_fit_reaches_the_minimum_of_its_objective(one_thread):
    """At the returned classifier the gradient of the objective in the docstring (mean cross-entropy on
    standardised features + wd/2 ||W||^2) vanishes, written here from the formula, not from the fit's code."""
    x, y = linearly_separable(300, seed=4)
    x = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))  # not separable any more
    weight, bias = eval_linear.fit_logistic_regression(x, y, 10, weight_decay=1e-2)
    mean, std = x.double().mean(0), x.double().std(0)
    w = (weight * std).requires_grad_()  # back to standardised coordinates: W_z = W std, b_z = b + W mean
    b = (bias + weight @ mean).requires_grad_()
    z = (x.double() - mean) / std
    objective = F.cross_entropy(z @ w.T + b, y) + 0.5 * 1e-2 * w.square().sum()
    objective.backward()
    assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5


def test_vit_intermediate_layers_and_dino_features():
    torch.manual_seed(0)
    vit = common.VisionTransformer(16, 4, 48, 6, 3).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        layers = vit.get_intermediate_layers(x, 4)
        tokens, reference = vit.tokens(x), []
        for block in vit.blocks:  # the same by hand: each block's output through the final norm
            tokens, _ = block(tokens)
            reference.append(vit.norm(tokens))
        features = eval_linear.ProbeFeatures(vit, 4, avgpool=True)
        out = features(x)
    assert len(layers) == 4 and all(torch.allclose(a, b) for a, b in zip(layers, reference[-4:]))
    assert torch.allclose(layers[-1][:, 0], vit(x), atol=1e-6)  # the last one's CLS token is the backbone output
    assert out.shape == (2, 5 * 48) == (2, features.embed_dim)
    assert torch.allclose(out[:, 3 * 48:4 * 48], vit(x), atol=1e-6)
    assert torch.allclose(out[:, 4 * 48:], reference[-1][:, 1:].mean(dim=1), atol=1e-6)


def test_unnormalised_features_are_the_backbone_outputs(one_thread):
    args, _ = common.parse_eval_args(eval_linear.parser, [str(a) for a in TINY_DATA])
    args.workers = 0
    torch.manual_seed(0)
    backbone = common.load_eval_backbone(args, None, torch.device('cpu'))
    loader = common.build_eval_loaders(args, torch.device('cpu'))[0]
    raw, labels = common.extract_features(backbone, loader, torch.device('cpu'), args, normalize=False)
    unit, _ = common.extract_features(backbone, loader, torch.device('cpu'), args)
    views, y, _ = next(iter(loader.epoch(0)))
    with torch.no_grad():
        assert torch.allclose(raw[:len(y)], backbone(views[0]), atol=1e-5)
    assert torch.allclose(F.normalize(raw, dim=1), unit, atol=1e-6)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(len(raw)))


def test_two_processes_give_the_same_probe_as_one(tmp_path):
    run = ['--random-init', '--data', 'procedural:200', *TINY_BACKBONE, '--weight-decays', '1e-4', '1e-2', '1',
           '--max-iter', '300']
    run_script('eval_linear.py', *run, '--json', tmp_path / 'one.json')
    run_script('eval_linear.py', *run, '--json', tmp_path / 'two.json', nproc=2)
    one, two = json.load(open(tmp_path / 'one.json')), json.load(open(tmp_path / 'two.json'))
    assert one['weight_decay'] == two['weight_decay'] and one['protocol'] == 'fast'
    for wd, top1 in one['weight_decay_sweep'].items():  # the processes' features agree up to float rounding:
        assert abs(top1 - two['weight_decay_sweep'][wd]) <= 100 / one['val_images'] + 1e-9  # one image at most
    assert abs(one['top1'] - two['top1']) <= 100 / 200 + 1e-9 and abs(one['top5'] - two['top5']) <= 100 / 200 + 1e-9


def test_augment_keeps_the_backbone_frozen_and_resumes_exactly(tmp_path):
    run = [*TINY_DATA, '--augment', '--recipe', 'moco', '--epochs', '2', '--batch-size', '16', '--lr', '1',
           '--log-every', '2']
    out = run_script('eval_linear.py', *run, '--output-dir', tmp_path / 'straight', '--json', tmp_path / 'straight.json')
    assert 'recipe: MoCo (He et al., CVPR 2020; facebookresearch/moco main_lincls.py)' in out.stdout
    out = run_script('eval_linear.py', *run, '--output-dir', tmp_path / 'resumed', '--stop-after-epoch', '1')
    assert 'stopped after epoch 1' in out.stdout and 'top-1' not in out.stdout
    out = run_script('eval_linear.py', *run, '--output-dir', tmp_path / 'resumed', '--json', tmp_path / 'resumed.json')
    assert 'resumed from' in out.stdout
    straight = torch.load(tmp_path / 'straight' / 'checkpoint.pth', weights_only=True)
    resumed = torch.load(tmp_path / 'resumed' / 'checkpoint.pth', weights_only=True)
    assert straight['epoch'] == resumed['epoch'] == 2
    for key, value in straight['classifier'].items():
        assert torch.allclose(value, resumed['classifier'][key], atol=1e-6), key
    results = json.load(open(tmp_path / 'straight.json')), json.load(open(tmp_path / 'resumed.json'))
    assert results[0]['top1'] == results[1]['top1'] and results[0]['protocol'] == 'augment'
    # frozen: the saved backbone (BN running statistics included) is still the untrained network
    args, _ = common.parse_eval_args(eval_linear.parser, [str(a) for a in TINY_DATA])
    torch.manual_seed(0)  # what common.setup does before the backbone is built
    untrained = common.build_backbone(args).state_dict()
    assert all(torch.equal(untrained[key], value) for key, value in straight['backbone'].items())
    expect_error('eval_linear.py', *run, '--recipe', 'simsiam', '--output-dir', tmp_path / 'straight',
                 match='was trained with recipe moco, not simsiam')


def test_simsiam_and_dino_recipes_run(tmp_path):
    out = run_script('eval_linear.py', *TINY_DATA, '--augment', '--recipe', 'simsiam', '--epochs', '1', '--batch-size',
                     '16', '--output-dir', tmp_path / 'simsiam')
    assert 'SimSiam (Chen & He' in out.stdout and 'LARS' in out.stdout and 'top-1' in out.stdout
    vit = ['--random-init', '--data', 'procedural:64', '--arch', 'vit_tiny', '--image-size', '16', '--workers', '0']
    out = run_script('eval_linear.py', *vit, '--augment', '--epochs', '1', '--batch-size', '16',
                     '--output-dir', tmp_path / 'dino', '--json', tmp_path / 'dino.json')
    record = json.load(open(tmp_path / 'dino.json'))
    assert 'DINO (Caron et al.' in out.stdout and record['recipe'] == 'dino'  # the default for a ViT
    assert record['features'] == 'CLS tokens of the last 4 blocks' and record['feature_dim'] == 4 * 192


def test_bad_input_gets_a_one_line_error(tmp_path):
    expect_error('eval_linear.py', tmp_path / 'nowhere.pth', match='no checkpoint at')
    (tmp_path / 'folder').mkdir()
    expect_error('eval_linear.py', *TINY_DATA, '--json', tmp_path / 'folder', match='is a folder')
    expect_error('eval_linear.py', *TINY_DATA, '--augment', '--recipe', 'byol', '--output-dir', tmp_path / 'out',
                 match="unknown --recipe 'byol'; choose one of: moco, simsiam, dino")
    assert not (tmp_path / 'out').exists()
    for flags, match in ((['--recipe', 'moco'], "--recipe belongs to the papers' protocol; add --augment"),
                         (['--epochs', '3'], '--epochs belongs to'),
                         (['--augment', '--weight-decays', '1'], '--weight-decays belongs to the fast protocol'),
                         (['--n-last-blocks', '4'], 'read ViT blocks; this backbone is a ResNet')):
        args, _ = common.parse_eval_args(eval_linear.parser, [str(a) for a in TINY_DATA] + flags)
        with pytest.raises(common.UsageError, match=match.replace('(', r'\(').replace(')', r'\)')):
            eval_linear.check_linear_args(args)
