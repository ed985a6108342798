"""Shared helpers: run a method file as a subprocess (alone or under torchrun), run a function
on 2 gloo processes, and the tiny settings that keep every training run to seconds on 2 CPUs."""
import importlib
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

import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402 (after the path)

# A ResNet-18 of base width 8 on 16-px crops of the procedural textures: ~0.03 s a step on 2 CPUs.
TINY_BACKBONE = ['--arch', 'resnet18', '--width', '8', '--image-size', '16', '--workers', '0']  # eval_knn.py takes these
TINY = TINY_BACKBONE + ['--log-every', '10']


IN_PROCESS = ('instdisc.py', 'simclr.py', 'moco.py', 'byol.py', 'simsiam.py', 'swav.py', 'mocov3.py', 'dino.py',
              'eval_knn.py', 'eval_linear.py', 'tools/released.py')


def run_script(script, *args, nproc=None, timeout=600, check=True, alone=False):
    """Run `python script args` (or torchrun with nproc processes); return a CompletedProcess. The entry points
    (IN_PROCESS) run in this process unless `alone` (a test of the process itself: its signals, its exit,
    its start-up): a subprocess would add only Python's and torch's start-up, seconds each time."""
    if not nproc and not alone and script in IN_PROCESS:
        code, out, err = run_in_process(script, args)
        result = subprocess.CompletedProcess([script, *map(str, args)], code, out, err)
    else:
        env = dict(os.environ, PYTHONUNBUFFERED='1',
                   OMP_NUM_THREADS='1' if nproc else os.environ.get('OMP_NUM_THREADS', '2'))
        if nproc:
            command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
                       '--master_port', str(free_port()), os.path.join(ROOT, script)]
        else:
            command = [sys.executable, os.path.join(ROOT, script)]
        result = subprocess.run(command + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f'{script} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n'
                             f'stderr:\n{result.stderr[-3000:]}')
    return result


def run_in_process(script, argv):
    """`python script argv` in this process, as run_script's subprocess would run it (common.run_in_process: in
    the repository's root, with OMP_NUM_THREADS threads, 2 if unset). Returns (exit code, stdout, stderr)."""
    module = importlib.import_module(script.removesuffix('.py').replace('/', '.'))
    return common.run_in_process(module.main, [script, *argv], ROOT, int(os.environ.get('OMP_NUM_THREADS', '2')))


_UNTRAINED = {}  # kNN of the untrained TINY backbone per --seed: measured once per test session

# The learning tests: 600 steps (20 epochs of 960 images, batch 32) of the TINY backbone, then the run's own kNN
# monitor after the last epoch (k=20, T=0.1, on the 1,000 test images of procedural:960; 10 classes, chance 10%).
# They augment on the device path, which on a CPU makes a step in about half the time of the PIL path.
LEARN = ['--data', 'procedural:960', *TINY, '--epochs', '20', '--batch-size', '32', '--augment', 'device', '--knn-every',
         '0', '--knn-k', '20', '--knn-t', '0.1']


def learning_run(tmp_path, script, *train_args, seed=0):
    """Train `script` with LEARN + train_args and --seed into tmp_path/run. Returns (the kNN top-1 gain of the
    trained backbone over the same backbone untrained, the run's metrics records). The untrained network is the
    training run's initial one: `eval_knn.py --random-init --seed` builds the backbone as training does, so the
    gain measures what training added to that very network (the untrained kNN alone moves by ~9 points between
    seeds: 41.0, 31.8, 39.8, 34.9, 37.3 for seeds 0-4). The run's monitor scores the device path's evaluation views,
    eval_knn.py the PIL path's (within 1.25 grey levels): a SimSiam checkpoint measured 72.3 by one, 72.2 by the other."""
    run_script(script, *LEARN, *train_args, '--seed', str(seed), '--output-dir', tmp_path / 'run')
    records = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
    if seed not in _UNTRAINED:
        run_script('eval_knn.py', '--random-init', '--data', 'procedural:960', *TINY_BACKBONE, '--k', '20',
                   '--temperature', '0.1', '--seed', str(seed), '--json', tmp_path / 'random.json')
        _UNTRAINED[seed] = json.load(open(tmp_path / 'random.json'))['results']['20']['top1']
    trained = [r['knn_top1'] for r in records if 'knn_top1' in r][-1]
    return trained - _UNTRAINED[seed], records


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
    fn must be a module-level function (pickled to the workers where they are spawned). On Linux the workers
    are forked from this process, which has imported torch already: a test takes under a second instead of
    the ~4 s of two fresh interpreters' start-up."""
    mp.start_processes(_worker, args=(world_size, free_port(), fn, args, str(tmp_path)), nprocs=world_size, join=True,
                       start_method=common.WORKER_START_METHOD)
    return [torch.load(os.path.join(tmp_path, f'rank{r}.pt'), weights_only=False) for r in range(world_size)]


@pytest.fixture(autouse=True)
def _threads():
    """In-process tests run with SSL_TEST_THREADS threads (2, as on CI's machine, unless set): a result must not
    depend on it, and tests/test_suite.py checks that with 1."""
    torch.set_num_threads(int(os.environ.get('SSL_TEST_THREADS', '2')))
    yield


SLOW = ('learns', 'torchrun', 'two_processes', 'across_two', 'across_ranks', 'on_both_ranks', 'another_order')
SLOW_FIXTURES = {'straight', 'cpu_run'}  # tests/test_benchmark.py's benchmark runs of several methods


def pytest_collection_modifyitems(config, items):
    """Marks `slow` the tests that train for hundreds of steps (the learning tests), start processes under
    torchrun, run the benchmark runner on several methods, or rerun other tests (SLOW names them by their names,
    SLOW_FIXTURES by the fixtures they use), so `pytest -m "not slow and not
    assignments"` is the quick subset. SSL_TEST_ORDER=reverse or shuffle:SEED reorders the collected tests
    (tests/test_suite.py uses it to check that no test depends on another having run first)."""
    for item in items:
        if any(word in item.name for word in SLOW) or SLOW_FIXTURES & set(getattr(item, 'fixturenames', ())) \
                or 'speed_runs' in item.name:
            item.add_marker(pytest.mark.slow)
    order = os.environ.get('SSL_TEST_ORDER', '')
    if order == 'reverse':
        items.reverse()
    elif order.startswith('shuffle:'):
        random.Random(int(order.split(':', 1)[1])).shuffle(items)


def pytest_addoption(parser):
    sharding.add_options(parser)


def pytest_configure(config):
    config.pluginmanager.register(sharding.Shards(config), 'ssl-shards')
