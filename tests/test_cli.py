"""Bad input: a one-line error that says what to do, exit code 2, nothing half-written."""
import os
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common
from conftest import TINY, run_script

FAST = ['--epochs', '1', '--batch-size', '16', '--proj-hidden-dim', '16', '--knn-every', '-1']


def expect_error(script, *args, match, code=2, nproc=None):
    result = run_script(script, *args, nproc=nproc, check=False)
    assert result.returncode == code if nproc is None else result.returncode != 0, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert errors and match in errors[0], result.stderr[-2000:]
    if nproc is None:
        assert 'Traceback' not in result.stderr, result.stderr[-2000:]
    return result


def make_folder(root, n_per_class=10, size=24):
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n_per_class):
                pixels = np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f'{i}.png')


def test_missing_or_empty_data_folder(tmp_path):
    out = tmp_path / 'out'
    expect_error('simclr.py', '--data', tmp_path / 'nowhere', '--output-dir', out, match='neither a dataset name')
    os.makedirs(tmp_path / 'empty' / 'train' / 'cls')
    expect_error('simclr.py', '--data', tmp_path / 'empty', '--output-dir', out, match='no images in')
    os.makedirs(tmp_path / 'flat')
    expect_error('simclr.py', '--data', tmp_path / 'flat', '--output-dir', out, match='has no train/ folder')
    assert not out.exists()  # nothing written


def test_bad_model_options(tmp_path):
    out = tmp_path / 'out'
    result = expect_error('simclr.py', '--data', 'procedural', '--arch', 'resnet99', '--output-dir', out,
                          match="unknown --arch 'resnet99'")
    assert 'resnet18, resnet34, resnet50, vit_tiny, vit_small, vit_base' in result.stderr
    expect_error('simclr.py', '--data', 'procedural', '--arch', 'vit_tiny', '--patch-size', '5', '--output-dir', out,
                 match='does not divide')
    expect_error('simclr.py', '--data', 'procedural', '--freeze-patch-embed', '--output-dir', out, match='ViT option')
    expect_error('mocov3.py', '--data', 'procedural', '--lars-eta', '0', '--output-dir', out, match='--lars-eta > 0')
    expect_error('byol.py', '--data', 'procedural', '--lr', '-1', '--output-dir', out, match='--lr and --weight-decay')
    expect_error('dino.py', '--data', 'procedural', '--teacher-temp', '0', '--output-dir', out, match='--teacher-temp must be positive')
    expect_error('simclr.py', '--data', 'procedural', '--warmup-epochs', '-1', '--output-dir', out, match='--warmup-epochs must be >= 0')
    assert not out.exists()


def test_dataset_that_cannot_be_downloaded(tmp_path, monkeypatch):
    def no_network(self):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torchvision.datasets.CIFAR10, 'download', no_network)
    args = common.parse_args(common.get_args_parser('', 'test'), {},
                             ['--data', 'cifar10', '--data-dir', str(tmp_path)])
    with pytest.raises(common.UsageError, match=f'put torchvision.s cifar10 files in {tmp_path}'):
        common.base_dataset(args, 'train')


def test_batch_not_divisible_by_processes(tmp_path):
    expect_error('simclr.py', '--data', 'procedural:64', *TINY, *FAST, '--batch-size', '15',
                 '--output-dir', tmp_path / 'out', match='not divisible by the 2 processes', nproc=2)


def test_resume_refuses_other_method_other_arch_and_corrupt_files(tmp_path):
    run = ['--data', 'procedural:64', *TINY, *FAST, '--output-dir', tmp_path]
    run_script('simclr.py', *run)
    path = tmp_path / 'checkpoint.pth'
    good = torch.load(path, weights_only=True)
    torch.save({**good, 'method': 'byol'}, path)
    expect_error('simclr.py', *run, match='was written by byol, not simclr')
    torch.save({**good, 'args': {**good['args'], 'arch': 'resnet50'}}, path)
    expect_error('simclr.py', *run, match='trained with --arch resnet50, not resnet18')
    torch.save(good, path)
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])
    expect_error('simclr.py', *run, match='is corrupt or truncated')
    expect_error('eval_knn.py', path, match='is corrupt or truncated')
    open(path, 'wb').write(b'not a checkpoint')
    expect_error('simclr.py', *run, match='is corrupt or truncated')


def test_unreadable_image_is_reported_by_path(tmp_path):
    make_folder(tmp_path / 'data')
    bad = tmp_path / 'data' / 'train' / 'b' / '3.png'
    open(bad, 'wb').write(b'\x89PNG broken')
    for workers in ('0', '1'):  # in the main process and in a loader worker
        expect_error('simclr.py', '--data', tmp_path / 'data', *TINY, *FAST, '--workers', workers,
                     '--output-dir', tmp_path / 'out', match=f'cannot read image {bad}')


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run = ['--data', 'procedural:64', *TINY, *FAST, '--output-dir', tmp_path]
    run_script('simclr.py', *run)
    before = open(tmp_path / 'checkpoint.pth', 'rb').read()
    result = expect_error('simclr.py', *run, '--epochs', '3', '--lr', '1e38', match='the loss became', code=1)
    assert 'last good checkpoint' in result.stderr
    assert open(tmp_path / 'checkpoint.pth', 'rb').read() == before


def test_folder_dataset_trains_and_evaluates(tmp_path):
    make_folder(tmp_path / 'data')
    out = run_script('simclr.py', '--data', tmp_path / 'data', *TINY, *FAST, '--knn-every', '1', '--knn-k', '5',
                     '--output-dir', tmp_path / 'out')
    assert 'data ' in out.stdout and '24 px -> image size 16' in out.stdout and 'kNN (k=5' in out.stdout
