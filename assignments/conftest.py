"""pytest's side of the checkers: the --submission option, the `submission` fixture, the thread count,
and one-line failures whatever a submission raises. The helpers are in grading.py (see its docstring)."""
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grading  # noqa: E402


def pytest_addoption(parser):
    parser.addoption('--submission', default=os.environ.get('SUBMISSION'),
                     help="the method file to grade (any file name), or a student's clone holding it; "
                          'default: this repository ($SUBMISSION works too)')


@pytest.fixture(scope='module')
def submission(request, tmp_path_factory):
    """The grading.Submission for the checker module's METHOD_FILE (see grading.py's docstring)."""
    method_file = request.module.METHOD_FILE
    given = request.config.getoption('--submission')
    if not given:
        return grading.Submission(grading.REPO, method_file)
    given = os.path.abspath(os.path.expanduser(given))
    source = os.path.join(given, method_file) if os.path.isdir(given) else given
    if not os.path.isfile(source):
        grading.fail(f'--submission {given}: no such file' + (f' (looked for {method_file} in that folder)'
                                                               if os.path.isdir(given) else ''))
    root = str(tmp_path_factory.mktemp('submission'))
    for name in os.listdir(grading.REPO):  # the teacher's common.py and method files; the student's one file
        if name.endswith('.py'):           # replaces its own
            shutil.copy(os.path.join(grading.REPO, name), root)
    shutil.copy(source, os.path.join(root, method_file))
    return grading.Submission(root, method_file)


@pytest.fixture(autouse=True)
def _threads():
    """Functions called in this process use the thread count the scripts get (OMP_NUM_THREADS, else 2)."""
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '2')))
    yield


def _as_one_line():
    """Wrap a test phase: what the submission raises (not a check's own failure) fails with one line."""
    try:
        return (yield)
    except (pytest.fail.Exception, pytest.skip.Exception):
        raise
    except Exception as error:  # noqa: BLE001  (an `assert` of the submission's too: the checks use expect)
        grading.fail(f'the submission raised {grading.one_line(error)}')


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _as_one_line())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _as_one_line())
