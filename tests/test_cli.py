"""Bad input: a one-line error that says what to do, exit code 2, nothing half-written."""
import os
import re
import shutil
import subprocess
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common
from conftest import TINY, run_script, run_in_process

FAST = ['--epochs', '1', '--batch-size', '16', '--proj-hidden-dim', '16', '--knn-every', '-1']


def expect_error(script, *args, match, code=2, nproc=None):
    """Run script (in this process; under torchrun with nproc) and expect one line `error: ...match...`."""
    if nproc is None:  # a subprocess would only add Python's and torch's start-up
        result = subprocess.CompletedProcess(script, *run_in_process(script, args))
    else:
        result = run_script(script, *args, nproc=nproc, check=False)
    assert result.returncode == code if nproc is None else result.returncode != 0, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert errors and match in errors[0], result.stderr[-2000:]
    if nproc is None:
        assert 'Traceback' not in result.stderr, result.stderr[-2000:]
    return result


def run_ok(script, *args):
    """Run script in this process (what a subprocess adds is Python's and torch's start-up) and expect exit
    code 0; returns a CompletedProcess, as run_script does."""
    result = subprocess.CompletedProcess(script, *run_in_process(script, args))
    assert result.returncode == 0, f'{script} exited {result.returncode}\n{result.stderr[-3000:]}'
    return result


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One SimCLR checkpoint (1 epoch of TINY on procedural:64), trained once for the tests that read it."""
    out = tmp_path_factory.mktemp('trained')
    run_ok('simclr.py', '--data', 'procedural:64', *TINY, *FAST, '--output-dir', out)
    return out / 'checkpoint.pth'


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
    for script, flag, value, match in (('mocov3.py', '--lars-eta', '0', '--lars-eta 0.0 is outside (0, 1e6]'),
                                       ('byol.py', '--lr', '-1', '--lr -1.0 is outside [0, 1e38]'),
                                       ('dino.py', '--teacher-temp', '0', '0.0 is outside (0, 1e6]'),
                                       ('simclr.py', '--warmup-epochs', '-1', '-1.0 is outside [0, 10000]')):
        expect_error(script, '--data', 'procedural', flag, value, '--output-dir', out, match=match)
    assert not out.exists()


def test_dataset_that_cannot_be_downloaded(tmp_path, monkeypatch):
    def no_network(self):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torchvision.datasets.CIFAR10, 'download', no_network)
    args = common.parse_args(common.get_args_parser('', 'test'), {},
                             ['--data', 'cifar10', '--data-dir', str(tmp_path)])
    with pytest.raises(common.UsageError, match=f'put torchvision.s cifar10 files in {tmp_path}'):
        common.base_dataset(args, 'train')
    # the quick start without network: no empty runs/ and no empty dataset cache left behind
    expect_error('simclr.py', '--data', 'cifar10', '--data-dir', tmp_path / 'cache', *TINY, *FAST,
                 '--output-dir', tmp_path / 'runs' / 'simclr', match='could not find or download cifar10')
    assert not (tmp_path / 'runs').exists() and not (tmp_path / 'cache').exists()


def test_batch_not_divisible_by_processes(tmp_path):
    expect_error('simclr.py', '--data', 'procedural:64', *TINY, *FAST, '--batch-size', '15',
                 '--output-dir', tmp_path / 'out', match='not divisible by the 2 processes', nproc=2)


def test_resume_refuses_other_method_other_arch_and_corrupt_files(tmp_path, trained):
    run = ['--data', 'procedural:64', *TINY, *FAST, '--output-dir', tmp_path]
    shutil.copy(trained, tmp_path)
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
    make_folder(tmp_path / 'data', n_per_class=40)
    folder = tmp_path / 'data' / 'train' / 'b'
    sampled = common.count_images(str(folder.parent), ['b'], sample=32)[1]  # headers read before any work
    open(sampled[1], 'wb').write(b'\x89PNG broken')
    expect_error('simclr.py', '--data', tmp_path / 'data', *TINY, *FAST, '--output-dir', tmp_path / 'out',
                 match=f'cannot read image {sampled[1]}')
    os.remove(sampled[1])
    bad = next(str(path) for path in sorted(folder.iterdir()) if str(path) not in sampled)
    open(bad, 'wb').write(b'\x89PNG broken')
    for workers in ('0', '1'):  # found by the loader: in the main process and in a loader worker
        expect_error('simclr.py', '--data', tmp_path / 'data', *TINY, *FAST, '--workers', workers,
                     '--output-dir', tmp_path / 'out', match=f'cannot read image {bad}')
    # a process of its own: with 2 workers, the exit used to add 15 lines ("Exception ignored in atexit")
    result = run_script('simclr.py', '--data', tmp_path / 'data', *TINY, *FAST, '--workers', '2',
                        '--output-dir', tmp_path / 'out', check=False)
    assert result.returncode == 2 and result.stderr.startswith(f'error: cannot read image {bad}'), result.stderr
    assert result.stderr.count('\n') == 1 and not (tmp_path / 'out').exists(), result.stderr


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, trained):
    run = ['--data', 'procedural:64', *TINY, *FAST, '--output-dir', tmp_path]
    shutil.copy(trained, tmp_path)
    before = open(tmp_path / 'checkpoint.pth', 'rb').read()
    result = expect_error('simclr.py', *run, '--epochs', '3', '--lr', '1e38', match='the loss became', code=1)
    assert 'last good checkpoint' in result.stderr
    assert open(tmp_path / 'checkpoint.pth', 'rb').read() == before


def test_folder_dataset_trains_and_evaluates(tmp_path):
    make_folder(tmp_path / 'data')
    out = run_ok('simclr.py', '--data', tmp_path / 'data', *TINY, *FAST, '--knn-every', '1', '--knn-k', '5',
                 '--output-dir', tmp_path / 'out')
    assert 'data ' in out.stdout and '24 px -> image size 16' in out.stdout and 'kNN (k=5' in out.stdout


def test_bad_combinations_are_one_line_errors_and_nothing_is_written(tmp_path):
    """Values inside their ranges (tests/test_ranges.py walks those) that do not fit together."""
    out = tmp_path / 'out'
    run = ['--data', 'procedural:64', *TINY, *FAST, '--output-dir', out]
    for flags, match in ((['--arch', 'vit_tiny', '--patch-size', '5'], '--patch-size 5 does not divide'),
                         (['--arch', 'vit_tiny', '--num-heads', '5'], '--num-heads 5 does not divide the width 192'),
                         (['--output-dir', ''], "--output-dir '' names no folder")):
        code, _, err = run_in_process('simclr.py', run + flags)
        assert code == 2 and err.count('\n') == 1 and match in err, err
    assert not out.exists()


def test_output_dir_that_cannot_be_written(tmp_path):
    a_file = tmp_path / 'a_file'
    a_file.write_text('')
    run = ['--data', 'procedural:64', *TINY, *FAST]
    expect_error('simclr.py', *run, '--output-dir', a_file, match='is a file, not a folder')
    if os.path.isdir('/proc/1'):  # Linux: a place nobody, root included, can create files in
        expect_error('simclr.py', *run, '--output-dir', '/proc/ssl-test/run', match='cannot write there')
        expect_error('simclr.py', *run, '--output-dir', '/proc/1', match='cannot write there')


def test_an_error_after_setup_leaves_no_empty_output_dir(tmp_path):
    out = tmp_path / 'runs' / 'out'  # --knn-k is checked against the labelled training images once loaded
    expect_error('simclr.py', '--data', 'procedural:64', *TINY, *FAST, '--knn-every', '1', '--knn-k', '65',
                 '--output-dir', out, match='--knn-k 65 is more neighbours than the 64 labelled training images')
    assert not (tmp_path / 'runs').exists()  # the folder made for it went too
    args = common.parse_args(common.get_args_parser('', 'test'), {}, ['--data', 'procedural:50'])
    assert args.knn_k == 50  # the small-image default (200) never asks for more neighbours than there are
    expect_error('byol.py', '--data', 'procedural:64', *TINY, *FAST, '--batch-size', '1', '--output-dir', out,
                 match='--batch-size 1 leaves 1 image per process, and the heads of this model use BatchNorm')
    expect_error('simclr.py', '--data', 'procedural:64', *TINY, *FAST, '--lr', '1e38', '--output-dir', out,
                 match='the loss became', code=1)  # in the first epoch: its records go with the folder
    assert not (tmp_path / 'runs').exists()
    (tmp_path / 'runs').mkdir()
    expect_error('eval_knn.py', tmp_path / 'runs', match='is a folder, not a checkpoint; give the checkpoint file')


def test_resume_with_fewer_or_as_many_epochs_as_done(tmp_path):
    run = ['--data', 'procedural:64', *TINY, *FAST, '--epochs', '2', '--output-dir', tmp_path]
    run_ok('simclr.py', *run)
    expect_error('simclr.py', *run[:-4], '--epochs', '1', '--output-dir', tmp_path,
                 match='holds 2 epochs, more than --epochs 1; give --epochs 2 or more')
    out = run_ok('simclr.py', *run)
    assert 'nothing left to train' in out.stdout and 'epoch 1/2' not in out.stdout


def test_eval_knn_bad_settings(tmp_path, trained):
    checkpoint = trained
    for flags, match in ((['--k', '0'], '--k 0: value 1 (0) is outside [1, 1e12]'),
                         (['--k', '65'], '--k 65 is more neighbours than the 64 training images'),
                         (['--temperature', '0'], '--temperature 0.0 is outside (0, 1e6]'),
                         (['--json', tmp_path], 'is a folder; give a file name')):
        expect_error('eval_knn.py', checkpoint, '--workers', '0', *flags, match=match)
    if os.path.isdir('/proc/1'):
        expect_error('eval_knn.py', checkpoint, '--json', '/proc/1/knn.json', match='cannot write in /proc/1')
    assert not list(tmp_path.glob('*.tmp')) and not os.path.exists('/proc/1/knn.json.tmp')
    state = torch.load(checkpoint, weights_only=True)
    del state['backbone']['layer4.1.bn2.weight']
    torch.save(state, tmp_path / 'missing.pth')
    expect_error('eval_knn.py', tmp_path / 'missing.pth', match='its backbone does not fit --arch resnet18: 1 missing '
                 '(e.g. layer4.1.bn2.weight)')
    state = torch.load(checkpoint, weights_only=True)
    state['backbone']['conv1.weight'][0, 0, 0, 0] = float('nan')
    torch.save(state, tmp_path / 'nan.pth')
    expect_error('eval_knn.py', tmp_path / 'nan.pth', match='the backbone tensor conv1.weight holds NaN or inf')


def test_eval_knn_help_lists_only_what_it_uses():
    out = run_ok('eval_knn.py', '--help').stdout
    assert '--k K' in out and '--random-init' in out and '--arch' in out
    for training_flag in ('--lr', '--epochs', '--optimizer', '--knn-every', '--lars-eta', '--output-dir'):
        assert training_flag not in out, training_flag


def test_method_help_shows_every_default_and_the_small_image_preset():
    out = run_ok('byol.py', '--help').stdout
    flat = ' '.join(re.sub(r'-\n\s*', '-', out).split())  # argparse wraps lines, also at hyphens
    assert 'small-image preset replaces them for every flag you do not type' in flat and '--tau-base 0.99' in flat
    entries = [e for e in out.split('\n  -')[1:] if not e.startswith('h,')]
    assert entries and all('(default' in e for e in entries), [e.split()[0] for e in entries if '(default' not in e]


def test_test_classes_are_numbered_as_in_train(tmp_path):
    """A val/ folder with fewer classes than train/ keeps each class's training label (ImageFolder alone
    would number val's own classes 0, 1, ... and shift every label); a class train/ lacks is refused."""
    make_folder(tmp_path / 'data')  # classes a, b in train and val
    os.makedirs(tmp_path / 'data' / 'train' / 'c')
    for i in range(3):
        Image.fromarray(np.full((24, 24, 3), 40 * i, dtype=np.uint8)).save(tmp_path / 'data' / 'train' / 'c' / f'{i}.png')
    import shutil
    shutil.rmtree(tmp_path / 'data' / 'val' / 'a')
    args = common.parse_args(common.get_args_parser('', 'test'), {}, ['--data', str(tmp_path / 'data')])
    train, test = common.base_dataset(args, 'train'), common.base_dataset(args, 'test')
    assert train.classes == ['a', 'b', 'c'] and args.dataset_info['num_classes'] == 3
    assert set(test.targets) == {1}  # val/b holds class b of train, label 1 (ImageFolder alone: 0)
    os.makedirs(tmp_path / 'data' / 'val' / 'zebra')
    Image.fromarray(np.zeros((24, 24, 3), dtype=np.uint8)).save(tmp_path / 'data' / 'val' / 'zebra' / '0.png')
    expect_error('simclr.py', '--data', tmp_path / 'data', *TINY, *FAST, '--output-dir', tmp_path / 'out',
                 match='val/ has classes that train/ lacks (zebra)')


def test_image_count_skips_files_that_are_not_images(tmp_path):
    make_folder(tmp_path / 'data', n_per_class=3)
    for junk in ('.DS_Store', 'notes.txt'):
        (tmp_path / 'data' / 'train' / 'a' / junk).write_text('x')
    info = common.inspect_dataset(str(tmp_path / 'data'), str(tmp_path))
    assert (info['num_train'], info['num_test'], info['num_classes']) == (6, 6, 2)


def test_export_refuses_to_overwrite_its_checkpoint_or_to_export_nan(tmp_path):
    import argparse
    args = argparse.Namespace(method='simclr', output_dir=str(tmp_path), arch='resnet18', width=8, patch_size=4,
                              cifar_stem=True, epochs=3)
    model = torch.nn.Linear(3, 2)
    common.save_checkpoint(args, 1, model)
    before = open(tmp_path / 'checkpoint.pth', 'rb').read()
    for out in (tmp_path / 'checkpoint.pth', tmp_path / '.' / 'checkpoint.pth'):
        expect_error('tools/released.py', 'export', tmp_path / 'checkpoint.pth', out, match='is the checkpoint itself')
    assert open(tmp_path / 'checkpoint.pth', 'rb').read() == before
    state = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    state['backbone']['weight'][0, 0] = float('nan')
    torch.save(state, tmp_path / 'nan.pth')
    expect_error('tools/released.py', 'export', tmp_path / 'nan.pth', tmp_path / 'out.pth',
                 match='the backbone tensor weight holds NaN or inf')
    assert not (tmp_path / 'out.pth').exists()
