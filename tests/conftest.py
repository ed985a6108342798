"""Shared helpers: run a method file as a subprocess (alone or under torchrun), run a function
on 2 gloo processes, and the tiny settings that keep every training run to seconds on 2 CPUs."""
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A ResNet-18 of base width 8 on 16-px crops of the procedural textures: ~0.03 s a step on 2 CPUs.
TINY_BACKBONE = ['--arch', 'resnet18', '--width', '8', '--image-size', '16', '--workers', '0']  # eval_knn.py takes these
TINY = TINY_BACKBONE + ['--log-every', '10']


def run_script(script, *args, nproc=None, timeout=600, check=True):
    """Run `python script args` (or torchrun with nproc processes); return the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1' if nproc else os.environ.get('OMP_NUM_THREADS', '2'))
    if nproc:
        command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
                   '--master_port', str(free_port()), os.path.join(ROOT, script)]
    else:
        command = [sys.executable, os.path.join(ROOT, script)]
    result = subprocess.run(command + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f'{script} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n'
                             f'stderr:\n{result.stderr[-3000:]}')
    return result


_UNTRAINED = {}  # kNN of the untrained TINY backbone, per --data: measured once per test session


def knn_trained_and_untrained(tmp_path, script, *train_args):
    """Train `script` with `train_args` into tmp_path/run, then return the kNN top-1 (k=20, T=0.1, eval_knn.py
    --json) of its checkpoint and of the same backbone untrained (--random-init), on the same --data."""
    run_script(script, *train_args, '--output-dir', tmp_path / 'run')
    knn = ['--workers', '0', '--k', '20', '--temperature', '0.1', '--json']
    run_script('eval_knn.py', tmp_path / 'run' / 'checkpoint.pth', *knn, tmp_path / 'trained.json')
    data = train_args[list(train_args).index('--data') + 1]
    if data not in _UNTRAINED:
        run_script('eval_knn.py', '--random-init', '--data', data, *TINY_BACKBONE, *knn, tmp_path / 'random.json')
        _UNTRAINED[data] = json.load(open(tmp_path / 'random.json'))['results']['20']['top1']
    return json.load(open(tmp_path / 'trained.json'))['results']['20']['top1'], _UNTRAINED[data]


def knn_gain_over_seeds(tmp_path, script, margin, *train_args, seeds=(0, 1, 2)):
    """knn_trained_and_untrained with --seed 0; if that run does not beat the untrained network by `margin`,
    the next seed is tried. 300 steps on the tiny data are seed-sensitive for some methods (SimSiam measured
    62.0 / 42.0 / 66.5 for seeds 0 / 1 / 2; BYOL 55.0 / 55.0 / 42.5), and another CPU's rounding makes another
    trajectory; a method that does not learn fails with every seed. Returns (trained, untrained, run folder)."""
    for seed in seeds:
        folder = tmp_path / f'seed{seed}'
        folder.mkdir()
        trained, untrained = knn_trained_and_untrained(folder, script, *train_args, '--seed', str(seed))
        if trained > untrained + margin:
            break
    return trained, untrained, folder / 'run'


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, *args, world_size=2, tmp_path):
    """Run fn(rank, world_size, *args) on `world_size` gloo processes; return their results by rank.
    fn must be a module-level function (it is pickled to the workers)."""
    mp.spawn(_worker, args=(world_size, free_port(), fn, args, str(tmp_path)), nprocs=world_size, join=True)
    return [torch.load(os.path.join(tmp_path, f'rank{r}.pt'), weights_only=False) for r in range(world_size)]


@pytest.fixture(autouse=True)
def _threads():
    """In-process tests run with SSL_TEST_THREADS threads (2, as on CI's machine, unless set): a result must not
    depend on it, and tests/test_suite.py checks that with 1."""
    torch.set_num_threads(int(os.environ.get('SSL_TEST_THREADS', '2')))
    yield


def pytest_collection_modifyitems(config, items):
    """SSL_TEST_ORDER=reverse or shuffle:SEED reorders the collected tests (tests/test_suite.py uses it to check
    that no test depends on another having run first)."""
    order = os.environ.get('SSL_TEST_ORDER', '')
    if order == 'reverse':
        items.reverse()
    elif order.startswith('shuffle:'):
        random.Random(int(order.split(':', 1)[1])).shuffle(items)
