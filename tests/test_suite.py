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
# Optional extras, by the files allowed to import them: each stops with one line where it is missing (tested).
OPTIONAL = {'lightly': {'tools/peer_lightly.py',  # the speed target's peer (test_benchmark: ..._without_lightly_...)
                        'tests/test_benchmark.py'}}  # that test, which skips where lightly is installed


def repository_files(suffix):
    listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                            capture_output=True, text=True)
    names = listed.stdout.split() if listed.returncode == 0 else [
        os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(ROOT) for f in files]
    return [n for n in names if n.endswith(suffix) and os.path.exists(os.path.join(ROOT, n))]


def test_every_import_is_the_standard_library_the_repository_or_a_requirement():
    requirements = {re.split(r'[<>=!~\[ ]', line.strip())[0].lower()
                    for line in open(os.path.join(ROOT, 'requirements.txt'))
                    if line.strip() and not line.startswith('#')}
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
                if top in sys.stdlib_module_names or top in local or name in OPTIONAL.get(top, ()):
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
        env = dict(os.environ, SSL_TEST_ORDER=order, SSL_TEST_THREADS='1', OMP_NUM_THREADS='1', SSL_TEST_SHARDS='1')
        result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider',
                                 'tests/test_common.py'], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f'SSL_TEST_ORDER={order}:\n{result.stdout[-3000:]}'


def test_every_learning_margin_is_at_most_half_the_smallest_gain_measured_with_its_flags():
    from tools import measure_learning  # a learning test's setting is measured before it is trusted
    records = measure_learning.read_records()
    for name in measure_learning.METHODS:
        script, flags, margin = measure_learning.setting(name)
        mine = [r for r in records if r['method'] == name and r['script'] == script and r['flags'] == flags]
        assert {r['seed'] for r in mine} >= {0, 1, 2, 3, 4}, \
            f'{name}: measure seeds 0-4 with tools/measure_learning.py'
        assert {r['variant'] for r in mine} >= {'1t', '2t', '2t-avx2'}, \
            f'{name}: measure 1 thread (the suite\'s shards), 2 threads (one process), and with AVX2 kernels'
        assert margin <= min(r['gain'] for r in mine) / 2, (name, margin, min(r['gain'] for r in mine))


def test_the_learning_table_in_docs_results_is_the_one_its_records_give():
    from tools import measure_learning
    results = open(os.path.join(ROOT, 'docs', 'results.md')).read()
    assert measure_learning.rendered(results, measure_learning.read_records()) == results, \
        'run python tools/measure_learning.py --report'


# -----------------------------------------------------------------------------
# The documents: README.md is a short user's guide; its links and commands work
# -----------------------------------------------------------------------------
README_MAX_LINES = 300
FENCE = re.compile(r' {0,3}(`{3}|~{3})')  # the two ways to open and close a fenced code block


def documents():
    """README.md, docs/*.md and the assignments' READMEs, relative to ROOT."""
    names = ['README.md'] + sorted(
        n for n in repository_files('.md')
        if n.startswith('docs/') or (n.startswith('assignments/') and n.endswith('README.md')))
    return [n for n in names if os.path.isfile(os.path.join(ROOT, n))]


def outside_code(text):
    """The Markdown text with fenced code blocks and inline code spans blanked (their links are not links)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append('')
            continue
        lines.append('' if fenced else re.sub(r'`+[^`]*`+', '', line))
    return lines


def heading_anchors(text):
    """The #anchors GitHub gives a Markdown file's headings: the heading's text (link targets and code marks
    dropped), lower-cased, every character but letters, digits, spaces, '-' and '_' removed, spaces
    turned into '-'; a repeated anchor gets -1, -2, ..."""
    anchors, fenced = set(), False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        heading = None if fenced else re.match(r'^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$', line)
        if not heading:
            continue
        words = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading.group(1))  # [text](url) -> text
        slug = re.sub(r'[^\w\- ]', '', words.replace('`', '').lower()).replace(' ', '-')
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f'{slug}-{n}'
        anchors.add(anchor)
    return anchors


def test_the_readme_is_a_short_users_guide():
    lines = open(os.path.join(ROOT, 'README.md')).read().splitlines()
    assert len(lines) <= README_MAX_LINES, \
        f'README.md has {len(lines)} lines; at most {README_MAX_LINES} (docs/ for the rest)'


def test_the_rendered_blocks_have_their_markers():
    """The renderers (tools/benchmark.py, tools/measure_learning.py) replace what lies between these lines."""
    wanted = {'README.md': ['cpu-summary'],
              'docs/results.md': ['cpu-benchmark', 'benchmark-table', 'learning-table']}
    for name, blocks in wanted.items():
        lines = open(os.path.join(ROOT, name)).read().splitlines()
        for block in blocks:
            start, end = f'<!-- {block}:start -->', f'<!-- {block}:end -->'
            assert lines.count(start) == 1 and lines.count(end) == 1, f'{name}: one {start} ... {end} block'
            assert lines.index(start) < lines.index(end), f'{name}: {start} after {end}'


def test_every_relative_link_in_the_documents_points_to_a_file_and_heading_that_exist():
    broken = []
    for name in documents():
        text = open(os.path.join(ROOT, name)).read()
        for i, line in enumerate(outside_code(text)):
            targets = re.findall(r'\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)', line)  # [text](target)
            targets += re.findall(r'^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)', line)  # [label]: target
            for target in targets:
                if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I):  # https:, mailto:
                    continue
                path, _, anchor = target.partition('#')
                file = os.path.normpath(os.path.join(ROOT, os.path.dirname(name), path)) if path else \
                    os.path.join(ROOT, name)
                if not os.path.exists(file):
                    broken.append(f'{name}:{i + 1}: {target} (no such file)')
                elif anchor and file.endswith('.md') and anchor not in heading_anchors(open(file).read()):
                    broken.append(f'{name}:{i + 1}: {target} (no such heading)')
    assert not broken, '\n'.join(broken)


class Parsed(BaseException):
    """Raised by the intercepted argparse once a script's own parser has read its command line."""


def parse_with_the_scripts_parser(script, flags):
    """Parse `flags` with `script`'s own argparse parser: the script is loaded as a module (not run) and its
    main() is called with the flags as its command line; the first parse of the outermost parser ends the call
    before anything else runs. Returns (namespace, the flags a parse_known_args left over); raises SystemExit
    (argparse's error) for a flag the parser does not accept."""
    import argparse
    import contextlib
    import io
    import runpy
    calls = {'depth': 0}
    original = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def intercepted(which):
        def parse(self, args=None, namespace=None):
            calls['depth'] += 1
            try:
                result = original[which](self, args, namespace)
            finally:
                calls['depth'] -= 1
            if calls['depth'] == 0:
                raise Parsed((result, []) if which == 0 else result)
            return result
        return parse

    saved_argv, saved_path = sys.argv, list(sys.path)
    argparse.ArgumentParser.parse_args = intercepted(0)
    argparse.ArgumentParser.parse_known_args = intercepted(1)
    sys.argv = [script] + flags
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            module = runpy.run_path(os.path.join(ROOT, script), run_name='readme_command')
            module['main']()
    except Parsed as done:
        return done.args[0]
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = original
        sys.argv, sys.path[:] = saved_argv, saved_path
    raise AssertionError(f'{script}: main() returned without parsing its command line')


def readme_commands():
    """(line, script, flags) of every `python X.py ...`, `python tools/X.py ...` and `torchrun ... X.py ...`
    in README.md's fenced code blocks (continuation lines joined; comments and variable assignments dropped).
    """
    import shlex
    commands, fenced, pending = [], False, ''
    for i, line in enumerate(open(os.path.join(ROOT, 'README.md')).read().splitlines()):
        if line.lstrip().startswith('```'):
            fenced = not fenced
            continue
        if not fenced:
            continue
        pending += line
        if pending.endswith('\\'):
            pending = pending[:-1] + ' '
            continue
        words, pending = shlex.split(pending, comments=True), ''
        while words and re.match(r'^\w+=', words[0]):  # OMP_NUM_THREADS=2 python ...
            words = words[1:]
        if words and words[0] in ('python', 'python3') and len(words) > 1 and words[1].endswith('.py'):
            commands.append((i + 1, words[1], words[2:]))
        elif words and words[0] == 'torchrun':
            script = next((n for n, w in enumerate(words) if w.endswith('.py')), None)
            assert script is not None, f'README.md:{i + 1}: torchrun without a script'
            commands.append((i + 1, words[script], words[script + 1:]))
    return commands


def test_every_readme_command_names_a_script_that_exists_and_flags_its_parser_accepts():
    import contextlib
    import io
    commands = readme_commands()
    assert len(commands) >= 3, 'README.md: no commands found in its code blocks'
    bad = []
    for line, script, flags in commands:
        if not os.path.isfile(os.path.join(ROOT, script)):
            bad.append(f'README.md:{line}: {script} does not exist')
            continue
        if '--help' in flags or '-h' in flags:
            continue
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                args, rest = parse_with_the_scripts_parser(script, flags)
                if script == 'tools/throughput.py':  # the flags it does not know go to the method file
                    args, rest = parse_with_the_scripts_parser(args.script, rest)
            if rest:  # a parse_known_args left them over: nothing reads them
                bad.append(f'README.md:{line}: {script}: flags not accepted: {" ".join(rest)}')
        except SystemExit:
            reason = (errors.getvalue().strip().splitlines() or ['exited'])[-1]
            bad.append(f'README.md:{line}: {script} {" ".join(flags)}\n  {reason}')
    assert not bad, '\n'.join(bad)


def test_the_linter_passes():
    """ruff (requirements.txt) with the repository's ruff.toml: lines of at most 110 characters where students
    read, no unused import or undefined name anywhere."""
    result = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', '.'], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
