"""What every checker shares: which submission it grades, and three ways to look at it.

A checker (assignments/<name>/test_*.py) grades ONE method file, named by its module-level
`METHOD_FILE` (e.g. 'simsiam.py'):
  pytest assignments/<name>                           this clone's file (the student's own clone)
  pytest assignments/<name> --submission PATH         PATH: the student's method file (any name),
  pytest assignments/<name> --submission=PATH           or a student's clone (its METHOD_FILE is used)
  SUBMISSION=PATH pytest assignments/<name>
A submission from elsewhere is graded in a temporary copy of this repository with the student's file
dropped in, so every other file (common.py above all) is the teacher's.

The `submission` fixture (assignments/conftest.py) gives the checker a Submission: .run(script, *args)
(the method file as a subprocess, as a student runs it), .module(name) (the file imported afresh, to
call its functions), .metrics(folder) (metrics.jsonl of a run); run_distributed(fn, ...) runs fn on
2 gloo processes (DDP code paths). Whatever the submission does, a check fails with one line
(`expect`, and `one_line` for what the submission raised), never a traceback or a tensor dump.

The helpers live here, not in conftest.py: a module named `conftest` can be shadowed by a student
clone's own tests/conftest.py, which pytest loads when it reads `--submission PATH` as a path.
"""
import importlib.util
import itertools
import os
import re
import socket
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
import common  # noqa: E402  (this repository's: the teacher's plumbing)

# tests/conftest.py's TINY_BACKBONE: a ResNet-18 of base width 8 on 16-px crops, no data-loading processes.
TINY = ['--arch', 'resnet18', '--width', '8', '--image-size', '16', '--workers', '0']
METHOD_FILES = ('instdisc.py', 'simclr.py', 'moco.py', 'byol.py', 'simsiam.py', 'swav.py', 'mocov3.py',
                'dino.py')


class Submission:
    """The folder a checker grades: common.py, the method files, the student's METHOD_FILE among them."""

    _loaded = itertools.count()

    def __init__(self, root, method_file):
        self.root, self.method_file = root, method_file
        self.path = os.path.join(root, method_file)

    def run(self, script, *args, check=True, timeout=900):
        """`python script args` in the submission's folder, with this process's thread setting (2 if
        unset); returns the CompletedProcess. With check, a non-zero exit fails the test with one line:
        the command, the script's last error line and where in the method file it was raised.
        With SSL_GRADE_IN_PROCESS=1 (the repository's own tests of the checkers set it) the script's main runs
        in this process (common.run_in_process), without a subprocess's start-up and without the timeout."""
        threads = os.environ.get('OMP_NUM_THREADS', '2')
        env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=threads)
        command = [sys.executable, os.path.join(self.root, script)] + [str(a) for a in args]
        shown = f'python {script} ' + ' '.join(str(a) for a in args if not str(a).startswith(self.root[:8]))
        try:
            if os.environ.get('SSL_GRADE_IN_PROCESS') == '1':
                main = self.module(script.removesuffix('.py')).main
                code, out, err = common.run_in_process(main, command[1:], self.root, int(threads))
                result = subprocess.CompletedProcess(command, code, out, err)
            else:
                result = subprocess.run(command, cwd=self.root, env=env, capture_output=True, text=True,
                                        timeout=timeout)
        except subprocess.TimeoutExpired:
            fail(f'{shown}: ran longer than {timeout} s (the checker\'s runs take seconds to a '
                        'minute): an endless loop?')
        if check and result.returncode != 0:
            fail(f'{shown}: exited {result.returncode}: '
                        f'{last_error(result.stderr or result.stdout, self.method_file)}')
        return result

    def module(self, name=None):
        """The method file (or another module of the submission) imported afresh under a unique name;
        if the import fails, the test fails with one line."""
        file = (name or self.method_file[:-3]) + '.py'
        try:
            return load_module(os.path.join(self.root, file))
        except Exception as error:  # noqa: BLE001  (whatever the student's file raises on import)
            fail(f'importing {file} failed: {one_line(error)}')

    def metrics(self, output_dir):
        """The step records (the ones with a `step`) of output_dir/metrics.jsonl, in order."""
        return [r for r in common.read_metrics(os.path.join(output_dir, 'metrics.jsonl')) if 'step' in r]


def expect(condition, message):
    """Fail the test with `message` alone (no traceback: a student reads what is wrong and where to look)."""
    if not condition:
        fail(message)


def fail(message):
    """Fail the test with `message` alone, also inside an `except` block (no 'During handling of ...')."""
    raise pytest.fail.Exception(message, pytrace=False) from None


def last_error(text, method_file=None):
    """The last line of a traceback's text (`Type: message`), with the last line of method_file it passed
    through; the text's last line when it holds no traceback."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return '(no output)'
    where = ''
    if method_file:
        places = re.findall(r'File "([^"]*)", line (\d+)', text)
        places = [(path, line) for path, line in places if os.path.basename(path) == method_file]
        if places:
            where = f' (at {method_file} line {places[-1][1]})'
    return shorten(lines[-1]) + where


def shorten(text, limit=300):
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def one_line(error):
    """What an exception says, on one line: its type and message, and the deepest line of a method file it
    passed through (a child process's traceback included)."""
    if isinstance(error, mp.ProcessRaisedException):  # the child's traceback is the message
        return 'in one of the 2 processes: ' + last_error(str(error), _method_file_in(str(error)))
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if os.path.basename(frame.filename) in METHOD_FILES]
    where = f' (at {os.path.basename(frames[-1].filename)} line {frames[-1].lineno})' if frames else ''
    message = str(error).strip().splitlines()
    return shorten(f'{type(error).__name__}: {message[-1] if message else ""}') + where


def _method_file_in(text):
    names = [os.path.basename(path) for path in re.findall(r'File "([^"]*)"', text)]
    names = [name for name in names if name in METHOD_FILES]
    return names[-1] if names else None


def call(function, *args, **kwargs):
    """function(*args, **kwargs), or the marker NotImplemented while it is still the stub."""
    try:
        return function(*args, **kwargs)
    except NotImplementedError:
        return NotImplemented


def load_module(path):
    """Import the file at `path` under a fresh name (the student's file never hides behind a cached
    module); its folder goes first on sys.path so that its `import common` finds the common.py beside it."""
    folder = os.path.dirname(os.path.abspath(path))
    if sys.path[0] != folder:
        sys.path.insert(0, folder)
    name = f'submission_{os.path.basename(path)[:-3]}_{next(Submission._loaded)}'
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # spawned processes and dataclasses look modules up by name
    spec.loader.exec_module(module)
    return module


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
    fn must be a module-level function of the checker (pickled to the processes where they are spawned; on
    Linux they are forked, common.WORKER_START_METHOD). What a process raises fails the test with one line."""
    try:
        mp.start_processes(_worker, args=(world_size, free_port(), fn, args, str(tmp_path)), nprocs=world_size,
                           join=True, start_method=common.WORKER_START_METHOD)
    except mp.ProcessRaisedException as error:
        fail(one_line(error))
    except mp.ProcessExitedException as error:
        fail(f'one of the 2 processes died: {shorten(error)}')
    return [torch.load(os.path.join(tmp_path, f'rank{r}.pt'), weights_only=False) for r in range(world_size)]
