"""What every checker shares: which submission it grades, and three ways to look at it.

A checker (assignments/<name>/test_*.py) grades ONE method file, named by its module-level
`METHOD_FILE` (e.g. 'simsiam.py'):
  pytest assignments/<name>                                    this clone's file (the student's own clone)
  pytest assignments/<name> --submission PATH                  PATH: the student's method file (any name),
  SUBMISSION=PATH pytest assignments/<name>                      or a student's clone (its METHOD_FILE is used)
A submission from elsewhere is graded in a temporary copy of this repository with the student's file
dropped in, so every other file (common.py above all) is the teacher's.

The `submission` fixture gives the checker: .run(script, *args) (the method file as a subprocess, as a
student runs it), .module(name) (the file imported afresh, to call its functions), .metrics(folder)
(metrics.jsonl of a run), and run_distributed(fn, ...) runs fn on 2 gloo processes (DDP code paths).
"""
import importlib.util
import itertools
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402  (this repository's: the teacher's plumbing)

# tests/conftest.py's TINY_BACKBONE: a ResNet-18 of base width 8 on 16-px crops, no data-loading processes.
TINY = ['--arch', 'resnet18', '--width', '8', '--image-size', '16', '--workers', '0']


def pytest_addoption(parser):
    parser.addoption('--submission', default=os.environ.get('SUBMISSION'),
                     help="the method file to grade (any file name), or a student's clone holding it; "
                          'default: this repository ($SUBMISSION works too)')


class Submission:
    """The folder a checker grades: common.py, the method files, the student's METHOD_FILE among them."""

    _loaded = itertools.count()

    def __init__(self, root, method_file):
        self.root, self.method_file = root, method_file
        self.path = os.path.join(root, method_file)

    def run(self, script, *args, check=True, timeout=900):
        """`python script args` in the submission's folder, with this process's thread setting (2 if unset);
        returns the CompletedProcess. With check, a non-zero exit fails the test with the script's output."""
        env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '2'))
        command = [sys.executable, os.path.join(self.root, script)] + [str(a) for a in args]
        try:
            result = subprocess.run(command, cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f'{script} {" ".join(str(a) for a in args)}\nran longer than {timeout} s (the checker\'s runs '
                        'take seconds to a minute): an endless loop?', pytrace=False)
        if check and result.returncode != 0:
            pytest.fail(f'{script} {" ".join(str(a) for a in args)}\nexited {result.returncode}:\n'
                        f'{result.stdout[-1500:]}\n{result.stderr[-3000:]}', pytrace=False)
        return result

    def module(self, name=None):
        """The method file (or another module of the submission) imported afresh under a unique name."""
        return load_module(os.path.join(self.root, (name or self.method_file[:-3]) + '.py'))

    def metrics(self, output_dir):
        """The step records (the ones with a `step`) of output_dir/metrics.jsonl, in order."""
        return [r for r in common.read_metrics(os.path.join(output_dir, 'metrics.jsonl')) if 'step' in r]


def expect(condition, message):
    """Fail the test with `message` alone (no traceback: a student reads what is wrong and where to look)."""
    if not condition:
        pytest.fail(message, pytrace=False)


def load_module(path):
    """Import the file at `path` under a fresh name (the student's file never hides behind a cached module);
    its folder goes first on sys.path so that its `import common` finds the common.py beside it."""
    folder = os.path.dirname(os.path.abspath(path))
    if sys.path[0] != folder:
        sys.path.insert(0, folder)
    name = f'submission_{os.path.basename(path)[:-3]}_{next(Submission._loaded)}'
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # spawned processes and dataclasses look modules up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def submission(request, tmp_path_factory):
    """The Submission for the checker module's METHOD_FILE (see the module docstring)."""
    method_file = request.module.METHOD_FILE
    given = request.config.getoption('--submission')
    if not given:
        return Submission(REPO, method_file)
    given = os.path.abspath(os.path.expanduser(given))
    source = os.path.join(given, method_file) if os.path.isdir(given) else given
    if not os.path.isfile(source):
        pytest.fail(f'--submission {given}: no such file' + (f' (looked for {method_file} in that folder)'
                                                               if os.path.isdir(given) else ''), pytrace=False)
    root = str(tmp_path_factory.mktemp('submission'))
    for name in os.listdir(REPO):  # the teacher's common.py and method files; the student's one file replaces its own
        if name.endswith('.py'):
            shutil.copy(os.path.join(REPO, name), root)
    shutil.copy(source, os.path.join(root, method_file))
    return Submission(root, method_file)


@pytest.fixture(autouse=True)
def _threads():
    """Functions called in this process use the thread count the scripts get (OMP_NUM_THREADS, else 2)."""
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '2')))
    yield


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, *args, tmp_path, world_size=2):
    """fn(rank, world_size, *args) on `world_size` gloo processes; returns their results by rank.
    fn must be a module-level function of the checker (it is pickled to the processes)."""
    mp.spawn(_worker, args=(world_size, free_port(), fn, args, str(tmp_path)), nprocs=world_size, join=True)
    return [torch.load(os.path.join(tmp_path, f'rank{r}.pt'), weights_only=False) for r in range(world_size)]
