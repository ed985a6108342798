"""Inputs that used to give a wrong result without a word: each now gives the right one, or one line."""
import argparse
import importlib
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
from conftest import ROOT, TINY, TINY_BACKBONE
from test_cli import expect_error, run_ok
from tools import benchmark


def knn_reference(train, train_labels, test, test_labels, num_classes, k, temperature):
    """Weighted kNN written from its definition, in float64 log space: each class scores
    log sum over its neighbours among the k nearest of exp(cos / T). Returns (top-1, top-5) in percent."""
    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    top1 = top5 = 0
    for feature, label in zip(test, np.asarray(test_labels)):
        similarity = train @ feature
        nearest = np.argsort(-similarity, kind='stable')[:k]
        scores = {}
        for j in nearest:
            c = int(train_labels[j])
            scores[c] = np.logaddexp(scores.get(c, -np.inf), similarity[j] / temperature)
        ranked = sorted(scores, key=lambda c: -scores[c])[:5]
        top1 += ranked[0] == label
        top5 += label in ranked
    return 100 * top1 / len(test), 100 * top5 / len(test)


def test_knn_votes_do_not_overflow_at_small_temperatures():
    # clustered features: neighbours have cosine ~0.9, so exp(cos / 0.001) = e^900 overflows even float64
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(10, 32, generator=generator), dim=1)
    train_labels = torch.arange(400) % 10
    test_labels = torch.arange(97) % 10
    train = F.normalize(centres[train_labels] + 0.35 * torch.randn(400, 32, generator=generator), dim=1)
    test = F.normalize(centres[test_labels] + 0.35 * torch.randn(97, 32, generator=generator), dim=1)
    for temperature in (0.001, 0.0001, 0.07, 1.0):
        results = common.knn_accuracy(train, train_labels, test, test_labels, 10, [1, 20, 200], temperature,
                                      chunk=32)
        for k, (top1, top5) in results.items():
            expected = knn_reference(train, train_labels, test, test_labels, 10, k, temperature)
            assert abs(top1 - expected[0]) < 1e-3 and abs(top5 - expected[1]) < 1e-3, (temperature, k)
    assert results[20][0] > 50  # the case is not trivial: far above chance (10%)


def write_folder(root, sizes, per_class=6):
    """root/train/<a|b>/<i>.png and root/val/ alike; `sizes[i]` is the side of the i-th file of each class."""
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                size = sizes[i] if i < len(sizes) else sizes[-1]
                pixels = np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f'{i}.png')


@pytest.mark.parametrize('odd, bulk', [(1, 48), (32, 128)])
def test_image_size_is_not_decided_by_the_first_file_alone(tmp_path, odd, bulk):
    # the first file of each class (in sorted order) has an odd size: a 1-px PNG, a 32-px image among 128-px
    write_folder(tmp_path / 'data', [odd] + [bulk] * 5)
    args = common.parse_args(common.get_args_parser('', 'test'), {}, ['--data', str(tmp_path / 'data')])
    assert args.dataset_info['image_size'] == bulk
    assert args.image_size == (bulk if bulk <= 64 else 224)  # the small-image defaults follow the bulk
    assert f'{odd}-{bulk} px' in common.data_note(args)  # the spread is said


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    grey = np.random.default_rng(0).integers(0, 65536, (20, 30)).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / 'grey16.png')
    assert Image.open(tmp_path / 'grey16.png').mode.startswith('I')  # the file is 16-bit
    image = np.asarray(common.load_image(str(tmp_path / 'grey16.png')))  # (H, W, 3) uint8
    expected = np.floor(grey.astype(np.float64) * 255 / 65535 + 0.5)  # 0..65535 -> 0..255, to the nearest
    assert image.shape == (20, 30, 3) and np.abs(image.astype(np.float64) - expected[..., None]).max() <= 1
    decoded = common.decode_file(str(tmp_path / 'grey16.png'))  # the device path: (3, H, W)
    assert torch.equal(decoded, torch.from_numpy(image.copy()).permute(2, 0, 1))


@pytest.mark.parametrize('target', ['.', '..', '../../val'])  # links inside tmp_path: never read outside
def test_links_to_folders_inside_a_class_folder_are_refused(tmp_path, target):
    write_folder(tmp_path / 'data', [24])
    os.symlink(target, tmp_path / 'data' / 'train' / 'a' / 'link')
    with pytest.raises(common.UsageError, match=r'train/a/link is a link to a folder inside a class folder'):
        common.inspect_dataset(str(tmp_path / 'data'), str(tmp_path))
    os.remove(tmp_path / 'data' / 'train' / 'a' / 'link')
    os.symlink(tmp_path / 'data' / 'train' / 'b' / '0.png', tmp_path / 'data' / 'train' / 'a' / 'linked.png')
    info = common.inspect_dataset(str(tmp_path / 'data'), str(tmp_path))  # a link to a file is an image
    assert info['num_train'] == 13 and info['num_test'] == 12


def test_resume_refuses_other_data_and_names_every_changed_setting(tmp_path, capsys):
    def run_args(**changes):
        settings = dict(method='simclr', output_dir=str(tmp_path), data='procedural:64',
                        data_dir=str(tmp_path), arch='resnet18', width=8, patch_size=4, cifar_stem=True,
                        lars_eta=0.001, lars_clip=False,
                        lars_denominator='update', epochs=3, batch_size=16, lr=0.5, seed=0, image_size=16,
                        workers=0, notes=[])
        return argparse.Namespace(**{**settings, **changes})
    model = nn.Linear(3, 2)
    common.save_checkpoint(run_args(), 1, model, model=model)
    with pytest.raises(common.UsageError, match=r'was trained on --data procedural:64, not procedural:128; '
                       'use the same --data'):
        common.resume(run_args(data='procedural:128'), model=model)
    capsys.readouterr()
    assert common.resume(run_args(batch_size=32, lr=0.1, seed=7, workers=2, epochs=5), model=model) == 1
    out = capsys.readouterr().out
    assert ('differ from the checkpoint\'s: --batch-size 32 (checkpoint: 16), --lr 0.1 (checkpoint: 0.5), '
            '--seed 7 (checkpoint: 0)\n') in out  # and nothing else: --workers, --epochs are not settings
    state = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    for edit in ({'model': {'weight': state['model']['weight']}}, {'epoch': 'one'}, {'model': [1, 2]},
                 {'epoch': True}):  # a bool is an int to isinstance
        torch.save({**state, **edit}, tmp_path / 'checkpoint.pth')
        with pytest.raises(common.UsageError, match='checkpoint.pth'):
            common.resume(run_args(), model=model)


# ---- bad input that used to give a wrong result (or a traceback after an epoch): one line, nothing written
RUN = ['--data', 'procedural:64', *TINY, '--batch-size', '16', '--epochs', '1', '--knn-every', '-1']
ENTRY_POINTS = ('instdisc', 'simclr', 'moco', 'byol', 'simsiam', 'swav', 'mocov3', 'dino', 'eval_knn',
                'eval_linear')
NOT_PATHS = ('data', 'data_dir', 'arch', 'recipe')  # --data '' is refused as no dataset; --data-dir may be '' in
# SSL_DATA_DIR, and only torchvision's datasets read it


def parse_as(module, argv, monkeypatch):
    """A method file's args as its main() has them before its own checks (which read sys.argv)."""
    monkeypatch.setattr(sys, 'argv', [f'{module.__name__}.py', *map(str, argv)])
    return common.parse_args(module.parser, module.SMALL_IMAGE_PRESET)


def test_a_repeated_k_is_refused_and_never_counted_twice():
    expect_error('eval_knn.py', '--random-init', '--data', 'procedural:64', *TINY_BACKBONE, '--k', '5', '5',
                 match='--k 5 5 names a number of neighbours twice')
    generator = torch.Generator().manual_seed(0)
    train, test = (F.normalize(torch.randn(n, 8, generator=generator), dim=1) for n in (40, 20))
    train_labels, test_labels = torch.arange(40) % 4, torch.arange(20) % 4
    once = common.knn_accuracy(train, train_labels, test, test_labels, 4, [5], 0.1)
    assert common.knn_accuracy(train, train_labels, test, test_labels, 4, [5, 5], 0.1) == once
    assert once[5] == pytest.approx(knn_reference(train, train_labels, test, test_labels, 4, 5, 0.1))


def test_a_test_split_without_images_is_refused_before_training(tmp_path):
    write_folder(tmp_path / 'data', [24])
    for c in ('a', 'b'):  # val/a/ and val/b/ are there, but empty
        for name in os.listdir(tmp_path / 'data' / 'val' / c):
            os.remove(tmp_path / 'data' / 'val' / c / name)
    data = ['--data', tmp_path / 'data']
    match = 'the test split val/ has no images in its class folders'
    expect_error('eval_knn.py', '--random-init', *data, *TINY_BACKBONE, '--k', '5', match=match)
    expect_error('eval_linear.py', '--random-init', *data, *TINY_BACKBONE, match=match)
    expect_error('simclr.py', *RUN, *data, '--knn-every', '1', '--output-dir', tmp_path / 'out', match=match)
    assert not (tmp_path / 'out').exists()


def test_class_folders_empty_hidden_or_alone(tmp_path):
    write_folder(tmp_path / 'data', [24])
    hidden = tmp_path / 'data' / 'train' / '.ipynb_checkpoints'  # a notebook's: not a class
    os.makedirs(hidden)
    Image.new('RGB', (24, 24)).save(hidden / 'x.png')
    info = common.inspect_dataset(str(tmp_path / 'data'), str(tmp_path))
    assert (info['classes'], info['num_classes'], info['num_train']) == (['a', 'b'], 2, 12)
    args = argparse.Namespace(data=str(tmp_path / 'data'), dataset_info=info)
    assert common.base_dataset(args, 'train').classes == ['a', 'b']
    os.makedirs(tmp_path / 'data' / 'train' / 'c')  # a class that could never be predicted
    with pytest.raises(common.UsageError, match=r'the class folder \S+/train/c holds no images'):
        common.inspect_dataset(str(tmp_path / 'data'), str(tmp_path))
    for split in ('train', 'val'):  # one class: every kNN prediction is right
        shutil.rmtree(tmp_path / 'data' / split / 'b')
    os.rmdir(tmp_path / 'data' / 'train' / 'c')
    expect_error('eval_knn.py', '--random-init', '--data', tmp_path / 'data', *TINY_BACKBONE, '--k', '1',
                 match='the kNN evaluation needs at least 2 classes')
    expect_error('eval_linear.py', '--random-init', '--data', tmp_path / 'data', *TINY_BACKBONE,
                 '--val-fraction', '0.625', match='a linear probe needs at least 2 classes')


@pytest.mark.parametrize('script', ENTRY_POINTS)
def test_every_path_flag_refuses_an_empty_path(script, tmp_path):
    parser = importlib.import_module(script).parser
    strings = [a for a in parser._actions if a.option_strings and a.type is None and a.nargs is None
               and not a.choices and not isinstance(a.default, bool) and a.const is None]
    undeclared = [a.option_strings[0] for a in strings if a.dest not in common.PATHS + NOT_PATHS]
    assert not undeclared, f'{script}: declare {undeclared} in common.PATHS (or NOT_PATHS here)'
    base = RUN if not script.startswith('eval') else ['--random-init', '--data', 'procedural:64', *TINY_BACKBONE]
    flags = [a.option_strings[0] for a in strings if a.dest in common.PATHS]
    for flag in flags:  # eval_linear.py --augment --output-dir '' wrote checkpoint.pth into the current folder
        extra = ['--augment'] if script == 'eval_linear' and flag == '--output-dir' else []
        expect_error(f'{script}.py', *base, *extra, flag, '', match=f"{flag} '' names no")
    assert flags and not os.path.exists(os.path.join(ROOT, 'checkpoint.pth'))


def test_released_names_an_empty_out_and_a_folder(tmp_path):
    torch.save({}, tmp_path / 'ck.pth')
    expect_error('tools/released.py', 'export', tmp_path / 'ck.pth', '', match="OUT '' names no file; give a path")
    expect_error('tools/released.py', 'inspect', tmp_path, match=f'{tmp_path} is a folder; give the released file')
    expect_error('tools/released.py', 'inspect', '', match="FILE '' names no file")


def test_benchmark_report_refuses_what_would_destroy_or_ignore(tmp_path):
    results = tmp_path / 'results'
    os.makedirs(results / 'x')
    page, readme = tmp_path / 'results.md', tmp_path / 'README.md'
    common_flags = ['--report', '--page', str(page), '--readme', str(readme)]
    for argv, match in (([], f'--results {tmp_path}/nothing is not a folder'),
                        ([], 'holds no benchmark records'),
                        (['--readme', str(tmp_path)], f'--readme {tmp_path} is a folder'),
                        (['--data', 'procedural:64'], '--data would be ignored'),
                        (['--', '--lr', '1'], 'flags after -- would be ignored')):
        where = str(tmp_path / 'nothing') if 'not a folder' in match else str(results)
        with pytest.raises(common.UsageError, match=re.escape(match)):
            benchmark.parse_args(common_flags + ['--results', where] + argv)
        if match == 'holds no benchmark records':
            (results / 'x' / 'simclr.json').write_text(json.dumps(dict(schema=benchmark.SCHEMA, name='x')))
    args, _ = benchmark.parse_args(common_flags + ['--results', str(results), '--name', 'x'])  # records: renders
    with pytest.raises(common.UsageError, match="holds no benchmark records named 'y'"):
        benchmark.parse_args(common_flags + ['--results', str(results), '--name', 'y'])


def test_min_lr_above_the_peak_lr_is_refused(monkeypatch):
    # the peak is the scaled lr: 0.1 x 16 / 256 = 0.00625
    expect_error('simclr.py', *RUN, '--lr', '0.1', '--min-lr', '0.01',
                 match='--min-lr 0.01 is above the peak lr 0.00625 (--lr 0.1 x --batch-size 16 / 256)')
    args = parse_as(importlib.import_module('simclr'), RUN + ['--lr', '0.1', '--min-lr', '0.006'], monkeypatch)
    assert args.min_lr == 0.006
    byol = importlib.import_module('byol')  # for large images BYOL's lr comes from its epoch preset
    args = parse_as(byol, RUN, monkeypatch)
    args.lr, args.min_lr = None, 1.0
    with pytest.raises(common.UsageError, match=r'--min-lr 1 is above the peak lr 0.028125 \(--lr 0.45 x'):
        common.apply_epoch_preset(args, byol.EPOCH_PRESETS)


def test_moco_lr_steps_with_the_cosine_schedule_are_refused(monkeypatch):
    expect_error('moco.py', *RUN, '--lr-steps', '50', match='--lr-steps sets the step schedule, but the lr of this '
                 "run follows the cosine (--cos, MoCo v2's); add --no-cos")
    moco = importlib.import_module('moco')
    args = parse_as(moco, RUN + ['--no-cos', '--lr-steps', '1'], monkeypatch)
    moco.apply_version(args)
    moco.check_args(args)  # the step schedule takes them
    assert not args.cos and args.lr_steps == [1]


def test_milestones_out_of_order_and_repeated_counts_are_refused(tmp_path):
    # a step schedule counts the milestones passed: --lr-steps 5 3 gave lr x0.01 after epoch 3, never x0.1
    for script, extra in (('instdisc.py', []), ('moco.py', ['--no-cos'])):
        expect_error(script, *RUN, *extra, '--lr-steps', '5', '3', '--output-dir', tmp_path / 'out',
                     match='--lr-steps 5 3: give increasing epochs, e.g. 3 5')
    assert not (tmp_path / 'out').exists()
    expect_error('eval_linear.py', '--random-init', '--data', 'procedural:64', *TINY_BACKBONE,
                 '--labels-per-class', '1', '1', 'all', match='--labels-per-class 1 1 all names a count twice')


def test_a_dry_run_checks_its_folders_as_a_run_does(tmp_path):
    (tmp_path / 'file').write_text('')
    expect_error('tools/benchmark.py', '--data', 'procedural:64', '--dry-run', '--results', tmp_path / 'file',
                 match='is a file, not a folder')
    assert os.listdir(tmp_path) == ['file']


def test_dino_local_crops_no_larger_than_the_global_ones(tmp_path):
    expect_error('dino.py', *RUN, '--local-crop-size', '24', '--output-dir', tmp_path / 'out',
                 match='--local-crop-size 24 is larger than the global crops (--image-size 16)')
    assert not (tmp_path / 'out').exists()


def test_swav_crops_follow_the_image_size_unless_typed(tmp_path, monkeypatch):
    swav = importlib.import_module('swav')
    args = parse_as(swav, RUN, monkeypatch)
    swav.crops_follow_image_size(args)
    assert args.size_crops == [16, 8]  # the preset's 32 + 16 for 32-px images, at --image-size 16
    swav.check_crops_and_queue(args)
    expect_error('swav.py', *RUN, '--size-crops', '32', '16', match='--size-crops 32 16: the first size')
    run_ok('swav.py', *RUN, '--output-dir', tmp_path / 'out')  # was refused
    assert (tmp_path / 'out' / 'checkpoint.pth').exists()
