"""Faults during a run: each ends in one line that names the last good checkpoint, with a non-zero exit code,
and leaves the checkpoint and metrics.jsonl whole: a divergence, a full disk, Ctrl-C / SIGTERM, a stuck
process under torchrun, a kill in the middle of an epoch (duplicate and torn records)."""
import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import common
from conftest import ROOT, TINY, free_port, run_script, run_in_process
from test_cli import FAST, expect_error, run_ok


def checkpoint_args(tmp_path):
    return argparse.Namespace(method='simclr', output_dir=str(tmp_path), arch='resnet18', width=8, patch_size=4,
                              cifar_stem=True, lars_eta=0.001, lars_clip=False, epochs=3)


def test_non_finite_weights_are_never_saved(tmp_path):
    args = checkpoint_args(tmp_path)
    model = nn.Linear(3, 2)
    common.save_checkpoint(args, 1, model, model=model)
    before = open(tmp_path / 'checkpoint.pth', 'rb').read()
    with torch.no_grad():
        model.weight[0, 0] = float('nan')  # e.g. the last step of an epoch diverged: its loss was still finite
    with pytest.raises(common.TrainingError, match=r'tensor backbone.weight holds NaN or inf; nothing was saved\. '
                       r'The last good checkpoint is .*checkpoint.pth \(1 epoch\(s\) done\)'):
        common.save_checkpoint(args, 2, model, model=model)
    assert open(tmp_path / 'checkpoint.pth', 'rb').read() == before and not (tmp_path / 'checkpoint.pth.tmp').exists()


def test_full_disk_keeps_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    args = checkpoint_args(tmp_path)
    model = nn.Linear(3, 2)
    common.save_checkpoint(args, 1, model, model=model)
    before = open(tmp_path / 'checkpoint.pth', 'rb').read()

    def full_disk(state, f):
        f.write(b'partial')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(common.TrainingError, match=r'could not write the checkpoint of epoch 2 .*No space left on '
                       r'device.*The last good checkpoint is .* \(1 epoch\(s\) done\)'):
        common.save_checkpoint(args, 2, model, model=model)
    assert open(tmp_path / 'checkpoint.pth', 'rb').read() == before and not (tmp_path / 'checkpoint.pth.tmp').exists()


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 512 KiB filesystem (tmpfs, mounted when this runs as root on Linux; skipped elsewhere)."""
    place = tmp_path / 'small'
    place.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=512k', 'tmpfs', str(place)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f'cannot mount a small tmpfs here ({mounted.stderr.decode().strip()[:80]})')
    try:
        yield place
    finally:
        subprocess.run(['umount', str(place)], check=True)


def test_a_real_full_disk_keeps_the_previous_checkpoint_and_export_in_one_line(small_filesystem, tmp_path):
    args = checkpoint_args(small_filesystem)
    model = nn.Linear(256, 300)  # 300 KiB: the filesystem holds one checkpoint, not a second beside it
    common.save_checkpoint(args, 1, model)
    before = open(small_filesystem / 'checkpoint.pth', 'rb').read()
    with pytest.raises(common.TrainingError, match=r'could not write the checkpoint of epoch 2 .*\(No space '
                       r'left on device\)\. The last good checkpoint is .* \(1 epoch\(s\) done\)'):
        common.save_checkpoint(args, 2, model)  # torch.save itself reports the full disk as a RuntimeError
    assert open(small_filesystem / 'checkpoint.pth', 'rb').read() == before
    assert os.listdir(small_filesystem) == ['checkpoint.pth']
    common.save_checkpoint(checkpoint_args(tmp_path), 1, model)
    code, _, err = run_in_process('tools/released.py', ['export', tmp_path / 'checkpoint.pth',
                                                        small_filesystem / 'export.pth'])
    assert code == 1 and err.count('\n') == 1 and '(No space left on device)' in err, err  # a fault: exit 1
    assert os.listdir(small_filesystem) == ['checkpoint.pth']


def test_out_of_memory_on_the_device_is_one_line_naming_the_batch(tmp_path, monkeypatch):
    import simclr

    def out_of_memory(*args, **kwargs):  # what a step on a GPU too small for the batch raises
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total '
                                     'capacity of 15.77 GiB of which 1.2 GiB is free. Of the allocated ...')
    monkeypatch.setattr(simclr, 'nt_xent_loss', out_of_memory)
    out = tmp_path / 'out'
    code, _, err = run_in_process('simclr.py', ['--data', 'procedural:64', *TINY, *FAST, '--output-dir', out])
    assert code == 1 and err.count('\n') == 1 and 'Traceback' not in err, err
    assert ('error: the device ran out of memory with a per-GPU batch of 16 (--batch-size 16 over 1 '
            'process(es)) (CUDA out of memory. Tried to allocate 2.00 GiB): give a smaller') in err
    assert 'more GPUs' in err and not out.exists()  # nothing was written: the empty folder went too


def test_divergence_names_a_checkpoint_that_exists(tmp_path):
    run = ['--data', 'procedural:64', *TINY, *FAST, '--output-dir', tmp_path]
    result = expect_error('simclr.py', *run, '--lr', '1e38', match='the loss became', code=1)
    assert f'No checkpoint was written to {tmp_path}' in result.stderr  # nothing good to name yet
    run_ok('simclr.py', *run)
    result = expect_error('simclr.py', *run, '--epochs', '3', '--lr', '1e38', match='the loss became', code=1)
    assert f'The last good checkpoint is {tmp_path}/checkpoint.pth (1 epoch(s) done)' in result.stderr
    assert torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['epoch'] == 1


def start_training(tmp_path, *extra, nproc=None):
    """A slow-enough run in the background (many small steps), stdout/stderr to files."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    run = ['--data', 'procedural:256', *TINY, '--epochs', '50', '--batch-size', '16', '--proj-hidden-dim', '16',
           '--knn-every', '-1', '--log-every', '1', '--output-dir', str(tmp_path / 'run'), *map(str, extra)]
    launcher = ([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port',
                 str(free_port())] if nproc else [sys.executable])
    out, err = open(tmp_path / 'stdout', 'w'), open(tmp_path / 'stderr', 'w')
    return subprocess.Popen(launcher + [os.path.join(ROOT, 'simclr.py'), *run], cwd=ROOT, env=env, stdout=out, stderr=err,
                            preexec_fn=default_sigint)


def default_sigint():
    """A child of a background job inherits an ignored SIGINT (and Python then leaves Ctrl-C ignored): restore it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(predicate, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_ctrl_z_stops_the_process_and_its_stopped_time_is_not_counted(tmp_path):
    """SIGTSTP stops a run as the default action would; the time until SIGCONT stays out of common.active_time,
    the clock of the epoch and kNN timings."""
    code = ("import os, signal, sys, time, common\n"
            "signal.signal(signal.SIGTSTP, common._pause)\n"
            "wall, active = time.time(), common.active_time()\n"
            "print('ready', flush=True)\n"
            "while common.PAUSED['seconds'] == 0 and time.time() - wall < 30: time.sleep(0.01)\n"
            "print(round(time.time() - wall, 2), round(common.active_time() - active, 2), flush=True)\n")
    child = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == 'ready\n'
    child.send_signal(signal.SIGTSTP)
    assert wait_for(lambda: _state(child.pid) == 'T', timeout=30)
    time.sleep(1.5)
    child.send_signal(signal.SIGCONT)
    wall, active = map(float, child.stdout.readline().split())
    assert child.wait(timeout=30) == 0
    assert wall >= 1.5 and active < wall - 1.4, (wall, active)


@pytest.mark.parametrize('sig, code, name', [(signal.SIGINT, 130, 'Ctrl-C'), (signal.SIGTERM, 143, 'SIGTERM')])
def test_interrupt_says_where_the_last_checkpoint_is(tmp_path, sig, code, name):
    process = start_training(tmp_path, '--workers', '1')  # with a loader worker: it must stop quietly too
    try:
        assert wait_for(lambda: 'epoch 2/50' in open(tmp_path / 'stdout').read()), open(tmp_path / 'stderr').read()
        process.send_signal(sig)
        assert process.wait(timeout=60) == code
    finally:
        process.kill()
    stderr = open(tmp_path / 'stderr').read()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f'error: stopped by {name}. The last good checkpoint is '), stderr
    assert 'epoch(s) done); the same command resumes from it.' in lines[0]
    assert torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)['epoch'] >= 1
    assert not (tmp_path / 'run' / 'checkpoint.pth.tmp').exists()


def test_a_stuck_process_under_torchrun_times_out_with_one_line(tmp_path):
    process = start_training(tmp_path, '--dist-timeout', '8', nproc=2)
    try:
        assert wait_for(lambda: 'epoch 1/50 step 10/' in open(tmp_path / 'stdout').read()), open(tmp_path / 'stderr').read()
        ranks = [pid for pid in os.listdir('/proc') if pid.isdigit() and _is_rank(pid, '1')]
        first = [pid for pid in os.listdir('/proc') if pid.isdigit() and _is_rank(pid, '0')]
        assert len(ranks) == 1 and len(first) == 1
        os.kill(int(ranks[0]), signal.SIGSTOP)  # rank 1 stops answering
        # rank 0 says so and exits; torchrun itself then waits ~30 s for the stopped rank to take its SIGTERM
        assert wait_for(lambda: not _is_rank(first[0], '0') or _state(first[0]) == 'Z', timeout=120)
        assert wait_for(lambda: 'error: ' in open(tmp_path / 'stderr').read(), timeout=10)
    finally:
        for pid in [pid for pid in os.listdir('/proc') if pid.isdigit() and _is_rank(pid, '1')]:
            os.kill(int(pid), signal.SIGKILL)
        process.kill()
    errors = [line for line in open(tmp_path / 'stderr').read().splitlines() if line.startswith('error: ')]
    assert errors and 'a collective operation timed out in ' in errors[0] and 'another process is stuck or gone' in errors[0]


def _state(pid):
    """The state letter of /proc/pid (R, S, T, Z, ...), or '' if it is gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except OSError:
        return ''


def _is_rank(pid, rank):
    """Is /proc/pid a simclr.py process of this test's torchrun with RANK=rank?"""
    try:
        cmdline = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\0')
        environ = open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')
    except OSError:
        return False
    return (any(part.endswith(b'simclr.py') for part in cmdline) and f'RANK={rank}'.encode() in environ
            and b'LOCAL_RANK=' + rank.encode() in environ and any(b'procedural:256' == part for part in cmdline))


def test_batch_not_divisible_under_torchrun_is_said_once(tmp_path):
    result = run_script('simclr.py', '--data', 'procedural:64', *TINY, *FAST, '--batch-size', '15',
                        '--output-dir', tmp_path / 'out', nproc=2, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert result.returncode != 0 and errors == ['error: --batch-size 15 is not divisible by the 2 processes; use a '
                                                 'multiple of 2']
    assert 'exitcode  : 2' in result.stderr and not (tmp_path / 'out').exists()


def test_resume_drops_the_records_of_an_unfinished_epoch_and_a_torn_line(tmp_path):
    run = ['--data', 'procedural:64', *TINY, *FAST, '--epochs', '3', '--log-every', '2', '--output-dir', tmp_path]
    run_ok('simclr.py', *run, '--stop-after-epoch', '1')
    path = tmp_path / 'metrics.jsonl'
    with open(path, 'a') as f:  # what a kill in the middle of epoch 2 leaves: its first records, a torn line
        f.write(json.dumps(dict(epoch=2, step=6, loss=1.0, images_per_s=1.0)) + '\n')
        f.write('{"epoch": 2, "step": 8, "lo')
    run_ok('simclr.py', *run)  # resumes from epoch 1; plotting the file must not fail either
    records = [json.loads(line) for line in open(path)]  # every line whole
    steps = [r['step'] for r in records if 'step' in r]
    assert steps == sorted(set(steps)) and [r['epoch'] for r in records if 'epoch_loss' in r] == [1, 2, 3]
    assert [r['epoch'] for r in records if 'step' in r] == [(s - 1) // 4 + 1 for s in steps]  # 4 steps an epoch
    assert (tmp_path / 'metrics.png').exists()
    assert [r['train_seconds'] for r in records if 'train_seconds' in r] == sorted(
        r['train_seconds'] for r in records if 'train_seconds' in r)


def test_the_first_progress_lines_come_early_with_an_estimate(tmp_path):
    out = run_ok('simclr.py', '--data', 'procedural:64', *TINY, *FAST, '--epochs', '3', '--log-every', '50',
                 '--output-dir', tmp_path).stdout
    lines = [line for line in out.splitlines() if line.startswith('epoch ')]
    assert lines[0].startswith('epoch 1/3 step 1/12 ') and 'eta' in lines[0] and lines[1].startswith('epoch 3/3 step 10/12')


def test_a_stop_signal_whose_exception_was_swallowed_still_stops(tmp_path):
    # Python swallows an exception raised inside a __del__ (a DataLoader iterator's, at an epoch's end): the stop
    # a signal asked for must not be lost with it
    script = tmp_path / 'swallow.py'
    script.write_text('import os, signal, sys\nsys.path.insert(0, sys.argv[1])\nimport common\n\n\ndef main():\n'
                      '    try:\n        os.kill(os.getpid(), signal.SIGINT)\n    except KeyboardInterrupt:\n'
                      '        pass  # swallowed\n    print("went on")\n\n\ncommon.run(main)\n')
    result = subprocess.run([sys.executable, str(script), ROOT], capture_output=True, text=True, timeout=120,
                            preexec_fn=default_sigint)
    assert result.returncode == 130 and 'error: stopped by Ctrl-C.' in result.stderr, (result.returncode, result.stderr)
    common.STOP['signal'] = signal.SIGTERM
    try:
        with pytest.raises(common.Interrupted):
            common.check_stop()
    finally:
        common.STOP.clear()


def test_a_stop_during_the_knn_pass_waits_for_the_checkpoint_of_the_epoch_just_trained(monkeypatch, capsys):
    """SIGTERM or Ctrl-C during the kNN monitor's pass (after an epoch's training, before its checkpoint) lets
    the pass finish, so the epoch is checkpointed, then stops at the loader's next check; a second signal
    during a pass stops at once. (Stopped inside the pass, a whole epoch of training was lost.)"""
    from types import SimpleNamespace
    monkeypatch.setattr(common, 'STOP', {})
    features = torch.nn.functional.normalize(torch.randn(20, 4, generator=torch.Generator().manual_seed(0)), dim=1)

    def extract(backbone, eval_loaders, device, args):  # the pass: a signal arrives, the loader checks for stops
        os.kill(os.getpid(), signal.SIGTERM)
        common.check_stop()
        return features, torch.arange(20) % 2, features, torch.arange(20) % 2

    monkeypatch.setattr(common, 'extract_train_test_features', extract)
    args = SimpleNamespace(knn_k=5, knn_t=0.1, dataset_info={'num_classes': 2})
    previous = signal.signal(signal.SIGTERM, common._raise_interrupted)
    try:
        result = common.knn_monitor(None, object(), 'cpu', args)
        assert result['knn_top1'] == 100.0 and common.STOP['signal'] == signal.SIGTERM
        assert 'stop requested: finishing the kNN pass' in capsys.readouterr().out
        with pytest.raises(common.Interrupted):
            common.check_stop()  # the next step's check, once the checkpoint is written
        with pytest.raises(common.Interrupted):  # asked again during a pass: at once
            common.knn_monitor(None, object(), 'cpu', args)
        assert not common.HOLD_STOP['active']
    finally:
        signal.signal(signal.SIGTERM, previous)
