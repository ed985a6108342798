"""assignments/: every checker fails on its starting point (saying which README step is missing) and passes on
the reference solution, each in a temporary copy of the repository (never this one); the patches are exactly
what make_patches.py makes of the current method files; every method file has an assignment; a submission is
graded from a file (--submission) or a clone ($SUBMISSION). Marked `assignments` (pytest -m "not assignments"
skips them): each runs a checker twice, tens of seconds."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

ASSIGNMENTS = os.path.join(ROOT, 'assignments')
NAMES = sorted(name for name in os.listdir(ASSIGNMENTS)
               if os.path.isfile(os.path.join(ASSIGNMENTS, name, 'edits.py')))
METHOD_FILES = {'instdisc.py', 'simclr.py', 'moco.py', 'byol.py', 'simsiam.py', 'swav.py', 'mocov3.py',
                'dino.py'}

pytestmark = pytest.mark.assignments


def method_file(name):
    spec = importlib.util.spec_from_file_location('edits', os.path.join(ASSIGNMENTS, name, 'edits.py'))
    edits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(edits)
    return edits.FILE


def load(name, file):
    """assignments/<name>/<file> as a module (make_patches.py, an edits.py, a submissions.py)."""
    path = os.path.join(ASSIGNMENTS, name, file) if name else os.path.join(ASSIGNMENTS, file)
    spec = importlib.util.spec_from_file_location(f'{name}_{file[:-3]}'.replace('-', '_'), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def submissions():
    """(assignment, 'WRONG' or 'CORRECT', label) of every submission kept beside a checker."""
    found = []
    for name in NAMES:
        if os.path.exists(os.path.join(ASSIGNMENTS, name, 'submissions.py')):
            module = load(name, 'submissions.py')
            found += [(name, kind, label) for kind in ('WRONG', 'CORRECT') for label in getattr(module, kind)]
    return found


def copy_repository(destination):
    """What a fresh clone holds that the checkers need: the scripts, pytest.ini and assignments/."""
    os.makedirs(destination)
    for name in os.listdir(ROOT):
        if name.endswith('.py') or name == 'pytest.ini':
            shutil.copy(os.path.join(ROOT, name), destination)
    shutil.copytree(ASSIGNMENTS, os.path.join(destination, 'assignments'),
                    ignore=shutil.ignore_patterns('__pycache__'))
    return destination


def git_apply(root, patch):
    result = subprocess.run(['git', 'apply', patch], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, f'git apply {patch}: {result.stderr}'


@pytest.fixture
def run_checker(pytester):
    """run_checker(root, name, *options, env=None): `pytest assignments/<name> -x` in root, as a teacher or a student
    types it (env: the variables it is typed with); a CompletedProcess. It runs in this process (pytester puts
    sys.modules and sys.path back after it), and so do the checker's own training runs (SSL_GRADE_IN_PROCESS),
    which spares each of them Python's and torch's start-up."""
    def run(root, name, *options, env=None):
        with pytest.MonkeyPatch.context() as patch:
            for key, value in (env or {}).items():
                patch.setenv(key, str(value))
            patch.setenv('OMP_NUM_THREADS', os.environ.get('OMP_NUM_THREADS', '2'))
            patch.setenv('SSL_GRADE_IN_PROCESS', '1')  # the checkers' training runs too (grading.Submission.run)
            patch.chdir(root)
            result = pytester.runpytest_inprocess(os.path.join(root, 'assignments', name), '-x', '--rootdir', root,
                                                  '-c', os.path.join(root, 'pytest.ini'), *options)
        return subprocess.CompletedProcess(name, int(result.ret), str(result.stdout), str(result.stderr))
    return run


@pytest.mark.parametrize('name', NAMES)
def test_checker_fails_on_the_starting_point_and_passes_on_the_solution(name, tmp_path, run_checker):
    root = copy_repository(tmp_path / 'clone')
    handout = os.path.join(ASSIGNMENTS, name, 'handout.patch')
    if os.path.exists(handout):
        git_apply(root, handout)  # what the teacher hands out
    before = run_checker(root, name)
    assert before.returncode == 1 and 'README.md, step' in before.stdout, (before.stdout[-3000:]
                                                                            + before.stderr[-2000:])
    git_apply(root, os.path.join(ASSIGNMENTS, name, 'solution.patch'))
    after = run_checker(root, name)
    assert after.returncode == 0, after.stdout[-4000:] + after.stderr[-2000:]


def test_patches_are_what_the_edits_make_of_the_method_files_and_apply_with_patch_too(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ASSIGNMENTS, 'make_patches.py'), '--check'],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    if shutil.which('patch') is None:
        return  # git apply has been checked; GNU patch is only the teacher's alternative
    root = copy_repository(tmp_path / 'clone')
    for name in NAMES:
        for patch in ('handout.patch', 'solution.patch'):
            path = os.path.join(ASSIGNMENTS, name, patch)
            if os.path.exists(path):
                result = subprocess.run(['patch', '-p1', '--forward', '-i', path], cwd=root,
                                        capture_output=True, text=True)
                assert result.returncode == 0 and 'fuzz' not in result.stdout, (f'patch -p1 < {path}: '
                                                                                f'{result.stdout}')


def test_every_method_file_has_an_assignment_with_readme_checker_and_solution():
    assert len(NAMES) >= 8 and {method_file(name) for name in NAMES} == METHOD_FILES
    for name in NAMES:
        files = os.listdir(os.path.join(ASSIGNMENTS, name))
        assert {'README.md', 'solution.patch', 'edits.py'} <= set(files), name
        assert len([f for f in files if f.startswith('test_') and f.endswith('.py')]) == 1, name


def test_a_submission_is_graded_from_a_file_or_from_a_clone(tmp_path, run_checker):
    root = copy_repository(tmp_path / 'teacher')  # the reference files stay as they are
    student = copy_repository(tmp_path / 'student')
    # a clone holds the repository's tests/conftest.py, which pytest loads when it reads PATH as a path
    os.makedirs(os.path.join(student, 'tests'))
    shutil.copy(os.path.join(ROOT, 'tests', 'conftest.py'), os.path.join(student, 'tests'))
    git_apply(student, os.path.join(ASSIGNMENTS, 'simclr-nt-xent', 'handout.patch'))
    os.makedirs(tmp_path / 'inbox')
    alice = str(tmp_path / 'inbox' / 'alice_simclr.py')  # any file name
    shutil.copy(os.path.join(student, 'simclr.py'), alice)
    for options in (['--submission', alice], [f'--submission={alice}']):
        stub = run_checker(root, 'simclr-nt-xent', *options, '-k', 'equation and not gradient')
        assert stub.returncode == 1 and 'nt_xent_loss is still the stub' in stub.stdout, (options,
                                                                                          stub.stdout[-3000:])
    git_apply(student, os.path.join(ASSIGNMENTS, 'simclr-nt-xent', 'solution.patch'))
    for options in (['--submission', student], [f'--submission={student}']):  # a clone: its simclr.py
        solved = run_checker(root, 'simclr-nt-xent', *options, '-k', 'equation')
        assert solved.returncode == 0 and '5 passed' in solved.stdout, (options, solved.stdout[-3000:])
    solved = run_checker(root, 'simclr-nt-xent', env={'SUBMISSION': student})  # every check
    assert solved.returncode == 0, solved.stdout[-3000:] + solved.stderr[-2000:]
    missing = run_checker(root, 'simclr-nt-xent', '--submission', str(tmp_path / 'nowhere.py'))
    assert missing.returncode != 0 and 'no such file' in missing.stdout, missing.stdout[-2000:]


@pytest.mark.submissions
@pytest.mark.assignments
@pytest.mark.parametrize('name, kind, label', submissions())
def test_checker_on_the_submissions_kept_beside_it(name, kind, label, tmp_path, run_checker):
    """A wrong submission fails with its expected message, on one line; a correct one passes."""
    make_patches = load(None, 'make_patches.py')
    file, _, _, solution = make_patches.versions(name)
    entry = getattr(load(name, 'submissions.py'), kind)[label]
    edits = entry['edits'] if kind == 'WRONG' else entry
    path = tmp_path / f'{label}_{file}'
    path.write_text(make_patches.apply_edits(solution, edits, f'{name}/submissions.py {kind} {label}'))
    only = ['-k', entry['tests']] if kind == 'WRONG' and 'tests' in entry else []
    options = ['--submission', str(path)] + only
    result = run_checker(ROOT, name, *options)
    if kind == 'CORRECT':
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        return
    assert result.returncode == 1 and entry['message'] in result.stdout, (result.stdout[-4000:]
                                                                          + result.stderr[-2000:])
    section = '= FAILURES =' if '= FAILURES =' in result.stdout else '= ERRORS ='  # ERRORS: failed in set-up
    report = result.stdout[result.stdout.index(section):result.stdout.index('short test summary')]
    said, captured = [], False  # the failure's own lines, not the output pytest captured beside it
    for line in report.splitlines():
        header = (re.match(r'_+ \S.* _+$', line) or line.startswith(('= ', '===')) or line.startswith('---')
                  and ' Captured ' in line)  # a long test's name has only '__' either side
        captured = line.startswith('---') and ' Captured ' in line or (captured and not line.startswith('___'))
        if line.strip() and not header and not captured:
            said.append(line)
    assert len(said) == 1 and entry['message'] in said[0], report  # one line: no traceback, no tensor dump


def test_plot_draws_each_runs_measure_and_refuses_bad_input_with_one_line(tmp_path):
    """assignments/plot.py: the curves are the records' values, in order; a folder without the measure is
    refused with `error: ...` and exit code 2, before any picture is written."""
    runs = {'sg': [(4, 0.17), (8, 0.16)], 'no-sg': [(4, 0.12), (8, 0.07)]}
    for name, points in runs.items():
        os.makedirs(tmp_path / name)
        lines = [json.dumps(dict(step=step, output_std=value, loss=-value)) for step, value in points]
        lines = [json.dumps(dict(epoch=0))] + lines + ['{"st']  # a record without a step; a line cut short
        (tmp_path / name / 'metrics.jsonl').write_text('\n'.join(lines))
    plot = load(None, 'plot.py')
    found = plot.curves([str(tmp_path / 'sg'), str(tmp_path / 'no-sg')], 'output_std')
    assert found == {name: ([s for s, _ in points], [v for _, v in points]) for name, points in runs.items()}
    command = [sys.executable, os.path.join(ASSIGNMENTS, 'plot.py'), str(tmp_path / 'sg'),
               str(tmp_path / 'no-sg')]
    done = subprocess.run(command + ['--measure', 'output_std', '--output', str(tmp_path / 'fig.png')],
                          capture_output=True, text=True)
    assert done.returncode == 0 and (tmp_path / 'fig.png').read_bytes()[:4] == b'\x89PNG', done.stderr
    refused = subprocess.run(command + ['--measure', 'teacher_entropy', '--output', str(tmp_path / 'no.png')],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.startswith('error: ')
    assert len(refused.stderr.splitlines()) == 1
    assert 'teacher_entropy' in refused.stderr and not os.path.exists(tmp_path / 'no.png')


def test_payoff_runs_are_the_learning_tests_and_the_readmes_show_their_records():
    """assignments/payoff.py: each "write the method" assignment's payoff run trains with the settings of its
    method's learning test (whose margins are measured over seeds and thread counts); each README's block is
    the one its records give, and the records show the features beating the untrained network."""
    import importlib
    from conftest import LEARN
    payoff = load(None, 'payoff.py')
    records = payoff.read_records()
    for name, (script, flags, _) in payoff.RUNS.items():
        learning = importlib.import_module('test_' + script.removesuffix('.py')).LEARNING
        expected = [f for i, f in enumerate(LEARN) if '--log-every' not in LEARN[max(i - 1, 0):i + 1]]
        assert payoff.COMMON + flags == expected + learning, name
        path = os.path.join(ASSIGNMENTS, name, 'README.md')
        text = open(path).read()
        assert payoff.rendered(text, name, records, payoff.tracks_of(name)) == text, \
            f'{path}: run python assignments/payoff.py --report'
        mine = [r for r in records if r['assignment'] == name and r['commands']['train'][1:] ==
                payoff.commands(name, r['seed'], 'run')[0][1][1:]]
        assert any(r['seed'] == 0 for r in mine), f'{name}: no record of seed 0 with the current flags'
        for r in mine:
            assert r['knn_trained'] > r['knn_untrained'] + 10 and r['probe_trained'] > r['probe_untrained'] + 5, r


def test_payoff_on_photographs_uses_the_cpu_benchmark_recipe_and_shows_its_records():
    """The optional CIFAR-10 track: one epoch with the CPU benchmark's settings for the method (read from
    tools/benchmark.py, not retyped), scored like the benchmark (k=200); every record of the methods said to
    gain in one epoch shows the gain, and the others' READMEs say that one epoch does not show it."""
    payoff = load(None, 'payoff.py')
    records = payoff.read_records()
    for name, folder in payoff.CIFAR10.items():
        script = payoff.RUNS[name][0]
        train = payoff.commands(name, 0, folder, 'cifar10')[0][1]
        assert train[:3] == [script, '--data', 'cifar10'] and train[-2:] == ['--output-dir', folder]
        assert train[3:-6] == payoff.benchmark.cpu_flags(script.removesuffix('.py')), name
        mine = [r for r in records if r['assignment'] == name and r.get('track') == 'cifar10'
                and r['commands']['train'] == payoff.commands(name, r['seed'], 'run', 'cifar10')[0][1]]
        assert any(r['seed'] == 0 for r in mine), f'{name}: no CIFAR-10 record of seed 0 with the current flags'
        for r in mine:
            gains = r['knn_trained'] > r['knn_untrained'] + 3 and r['probe_trained'] > r['probe_untrained']
            assert gains == (name in payoff.CIFAR10_GAINS), r
        text = open(os.path.join(ASSIGNMENTS, name, 'README.md')).read()
        assert (name in payoff.CIFAR10_GAINS) == ('One epoch of photographs is not enough' not in text), name


def test_suggested_runs_are_measured_and_the_readmes_show_their_records():
    """assignments/runs.py: every assignment's suggested runs (the commands its README shows, rendered from
    RUNS) have a record made with exactly those commands, and the README shows what the records say."""
    runs = load(None, 'runs.py')
    records = runs.payoff.read_records(runs.RECORDS)
    assert sorted(runs.RUNS) == sorted(NAMES)
    for name in runs.RUNS:
        path = os.path.join(ASSIGNMENTS, name, 'README.md')
        text = open(path).read()
        for track in runs.tracks_of(name):
            assert runs.rendered(text, name, records, track) == text, f'{path}: run python assignments/runs.py --report'
            spec = runs.spec(name, track)
            missing = [run[0] for run, r in zip(spec['runs'], runs.current(name, records, track)) if r is None]
            assert not missing, f'{name}: {missing} not measured with the current command ({track})'
            for _, _, picture in spec['plots']:
                assert os.path.isfile(os.path.join(ASSIGNMENTS, name, picture)) and f']({picture})' in text, picture


def test_suggested_runs_make_the_files_the_readme_asks_for(tmp_path):
    """byol-to-simsiam's runs need the original byol.py and the solution without its .detach()."""
    runs = load(None, 'runs.py')
    runs.payoff.thresholds.solution_copy('byol-to-simsiam', str(tmp_path))
    runs.prepare('byol-to-simsiam', str(tmp_path))
    original, solution, no_detach = (open(tmp_path / f).read() for f in ('byol_original.py', 'byol.py',
                                                                          'byol_no_detach.py'))
    assert original == open(os.path.join(ROOT, "byol.py")).read() and 'self.target' not in solution
    assert no_detach.replace('z.float()', 'z.detach().float()') == solution and no_detach != solution


def test_pictures_are_drawn_from_the_curves_the_records_keep(tmp_path, monkeypatch):
    """runs.py keeps each run's plotted curve in its record and draws the pictures from the records (so --report
    redraws them); records made before they kept curves leave the picture as it is."""
    runs = load(None, 'runs.py')
    monkeypatch.setattr(runs, 'HERE', str(tmp_path))
    name = 'simsiam-stop-gradient'
    (tmp_path / name).mkdir()
    records = [dict(run=folder, curves={'output_std': [[4, 0.17], [8, value]]})
               for (folder, _, _), value in zip(runs.RUNS[name]['runs'], (0.16, 0.07))]
    assert runs.draw(name, 'textures', records)
    picture = tmp_path / name / runs.RUNS[name]['plots'][0][2]
    assert picture.read_bytes().startswith(b'\x89PNG')
    picture.unlink()
    assert not runs.draw(name, 'textures', [dict(run='runs/sg')]) and not picture.exists()


def test_runs_on_photographs_use_the_cpu_benchmark_recipe():
    """The CIFAR-10 track of the suggested runs: the method's CPU benchmark flags (read from tools/benchmark.py,
    not retyped), then one epoch and the benchmark's kNN, then the assignment's own additions."""
    runs = load(None, 'runs.py')
    for name, spec in runs.CIFAR10.items():
        for run in spec['runs']:
            command = runs.argv(name, run, 'cifar10')
            recipe = runs.payoff.benchmark.cpu_flags(spec['method'])
            assert command[1:3] == ['--data', 'cifar10'] and command[3:3 + len(recipe)] == recipe, name
            rest = ' '.join(command[3 + len(recipe):])
            assert rest.startswith(runs.CIFAR10_MONITOR) and '--knn-k 200 --knn-t 0.1' in rest, name


def test_runs_on_photographs_show_the_collapse_in_the_knn():
    """Each collapse assignment's CIFAR-10 track, as its README says: the method's run ends more than a point
    above the untrained network of the same seed (the CPU benchmark's untrained row) in kNN top-1; every run that
    collapses ends below the method's and no better than the untrained network (within half a point)."""
    runs = load(None, 'runs.py')
    records = runs.payoff.read_records(runs.RECORDS)
    with open(os.path.join(ROOT, 'results', runs.payoff.benchmark.CPU_NAME, 'random-init.json')) as f:
        untrained = json.load(f)['knn_top1']
    for name in runs.CIFAR10:
        method, *collapsed = runs.current(name, records, 'cifar10')
        assert method and method['measures']['knn_top1']['final'] > untrained + 1, (name, method)
        for r in collapsed:
            knn = r['measures']['knn_top1']['final']
            assert knn < method['measures']['knn_top1']['final'] and knn < untrained + 0.5, (name, r)


@pytest.mark.parametrize('script, argv', [
    ('runs.py', []), ('runs.py', ['no-such-assignment']), ('runs.py', ['simsiam-stop-gradient', '--threads', '0']),
    ('runs.py', ['simsiam-stop-gradient', '--track', 'cifar10']),
    ('runs.py', ['simsiam-stop-gradient', '--track', 'cifar10', '--cifar10', 'EMPTY']),
    ('runs.py', ['mocov3-patch-projection', '--track', 'cifar10', '--cifar10', 'CIFAR']),
    ('payoff.py', []), ('payoff.py', ['simsiam-stop-gradient']), ('payoff.py', ['moco-queue', '--seeds', '-1']),
    ('payoff.py', ['moco-queue', '--track', 'cifar10', '--cifar10', 'EMPTY']),
])
def test_measuring_scripts_refuse_bad_input_in_one_line(script, argv, tmp_path):
    """runs.py and payoff.py: a bad name, no name, a bad number, the CIFAR-10 track without a CIFAR-10 folder
    or for an assignment without that track: one line, exit 2, no record written."""
    (tmp_path / 'EMPTY').mkdir()
    for split in ('train', 'test'):
        (tmp_path / 'CIFAR' / split).mkdir(parents=True)
    argv = [str(tmp_path / a) if a in ('EMPTY', 'CIFAR') else a for a in argv]
    records = [os.path.join(ROOT, 'results', 'assignments', f) for f in ('runs.jsonl', 'payoff.jsonl')]
    before = [os.path.getmtime(f) for f in records]
    done = subprocess.run([sys.executable, os.path.join(ASSIGNMENTS, script), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith('error: ') and len(done.stderr.splitlines()) == 1, \
        done.stderr
    assert [os.path.getmtime(f) for f in records] == before
