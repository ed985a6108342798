"""What CI cannot see: the suite itself depends on nothing that only one machine has (packages, files), nor
on the order its tests run in or the number of threads; and each learning test's margin was measured, over
seeds and CPU rounding variants, with the flags it runs (tools/measure_learning.py)."""
import ast
import os
import re
import subprocess
import sys

from conftest import ROOT

# The distributions requirements.txt installs, by the name they are imported under. Pillow (PIL) comes with
# torchvision, which needs it; it is imported directly for image files.
IMPORT_NAMES = {'torch': 'torch', 'torchvision': 'torchvision', 'numpy': 'numpy', 'matplotlib': 'matplotlib',
                'pytest': 'pytest', 'PIL': 'torchvision'}


def repository_files(suffix):
    listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                            capture_output=True, text=True)
    names = listed.stdout.split() if listed.returncode == 0 else [
        os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(ROOT) for f in files]
    return [n for n in names if n.endswith(suffix) and os.path.exists(os.path.join(ROOT, n))]


def test_every_import_is_the_standard_library_the_repository_or_a_requirement():
    requirements = {re.split(r'[<>=!~\[ ]', line.strip())[0].lower()
                    for line in open(os.path.join(ROOT, 'requirements.txt')) if line.strip() and not line.startswith('#')}
    files = repository_files('.py')
    local = {os.path.splitext(os.path.basename(f))[0] for f in files} | {
        os.path.dirname(f) for f in files if f.endswith('/__init__.py')}  # packages: tools
    assert {'common', 'simclr', 'conftest'} <= local
    missing = set()
    for name in files:
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, name)).read(), name)):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for module in modules:
                top = module.split('.')[0]
                if top in sys.stdlib_module_names or top in local:
                    continue
                if IMPORT_NAMES.get(top, top).lower() not in requirements:
                    missing.add(f'{name}: {module}')
    assert not missing, f'imported but not in requirements.txt: {sorted(missing)}'


def test_no_test_reads_files_outside_the_repository():
    outside = re.compile(r"""['"](/work|/home|/root|~|\.\./|/tmp/)|shared/data""")
    offenders = [f'{name}:{i + 1}' for name in repository_files('.py') if name.startswith('tests/')
                 for i, line in enumerate(open(os.path.join(ROOT, name))) if outside.search(line)
                 and 'outside = re.compile' not in line and 'never read' not in line]
    assert not offenders, offenders


def test_unit_tests_pass_in_another_order_and_with_one_thread():
    for order in ('reverse', 'shuffle:1'):
        env = dict(os.environ, SSL_TEST_ORDER=order, SSL_TEST_THREADS='1', OMP_NUM_THREADS='1')
        result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider',
                                 'tests/test_common.py'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f'SSL_TEST_ORDER={order}:\n{result.stdout[-3000:]}'


def test_every_learning_margin_is_at_most_half_the_smallest_gain_measured_with_its_flags():
    from tools import measure_learning  # the learning tests' settings are measured before they are trusted (README, Results)
    records = measure_learning.read_records()
    for name in measure_learning.METHODS:
        script, flags, margin = measure_learning.setting(name)
        mine = [r for r in records if r['method'] == name and r['script'] == script and r['flags'] == flags]
        assert {r['seed'] for r in mine} >= {0, 1, 2, 3, 4}, f'{name}: measure seeds 0-4 with tools/measure_learning.py'
        assert {r['variant'] for r in mine} >= {'2t', '2t-avx2'}, f'{name}: measure 2 threads, and with AVX2 kernels'
        assert margin <= min(r['gain'] for r in mine) / 2, (name, margin, min(r['gain'] for r in mine))


def test_the_readmes_learning_table_is_the_one_its_records_give():
    from tools import measure_learning
    readme = open(os.path.join(ROOT, 'README.md')).read()
    assert measure_learning.rendered(readme, measure_learning.read_records()) == readme, \
        'run python tools/measure_learning.py --report'
