"""Write every assignment's handout.patch and solution.patch from the method files as they are now.

The source of the patches is assignments/<name>/edits.py: FILE (the one method file the assignment
is about), HANDOUT (text edits that turn the reference file into the students' starting point; empty
when they start from the file as it is) and SOLUTION (edits that turn the starting point into the
reference solution; None: undo HANDOUT). An edit is a pair (old, new): `old` must occur exactly once.
When a method file changes, rerun this script; if an edit no longer applies it says which one.

  python assignments/make_patches.py            # rewrite the patches (paths relative to the repo root)
  python assignments/make_patches.py --check    # only check: every edit applies, and the committed
                                                # patches produce exactly what the edits produce
The patches apply with `git apply` and with `patch -p1`, from the repository root.
"""
import argparse
import difflib
import importlib.util
import os
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def assignments():
    """Names of the assignment folders (those with an edits.py), sorted."""
    return sorted(name for name in os.listdir(HERE) if os.path.isfile(os.path.join(HERE, name, 'edits.py')))


def load_edits(name):
    spec = importlib.util.spec_from_file_location(f'edits_{name.replace("-", "_")}', os.path.join(HERE, name, 'edits.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_edits(text, edits, where):
    for number, (old, new) in enumerate(edits, 1):
        count = text.count(old)
        if count != 1:
            raise SystemExit(f'error: {where}, edit {number}: its old text occurs {count} times in the file (must be '
                             f'once); the method file changed there: update the edit. It begins:\n{old[:300]}')
        text = text.replace(old, new)
    return text


def versions(name):
    """(method file, reference text, starting-point text, solution text) of one assignment."""
    edits = load_edits(name)
    reference = open(os.path.join(REPO, edits.FILE)).read()
    handout = apply_edits(reference, edits.HANDOUT, f'{name}/edits.py HANDOUT')
    solution_edits = edits.SOLUTION if edits.SOLUTION is not None else [(new, old) for old, new in reversed(edits.HANDOUT)]
    solution = apply_edits(handout, solution_edits, f'{name}/edits.py SOLUTION')
    if handout == reference and edits.HANDOUT:
        raise SystemExit(f'error: {name}: HANDOUT changes nothing')
    return edits.FILE, reference, handout, solution


def unified_diff(file, before, after):
    return ''.join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        fromfile=f'a/{file}', tofile=f'b/{file}'))


def apply_patch(file, text, patch_path):
    """`text` with the patch at patch_path applied by git apply, in a scratch folder."""
    with tempfile.TemporaryDirectory() as scratch:
        with open(os.path.join(scratch, file), 'w') as f:
            f.write(text)
        result = subprocess.run(['git', 'apply', os.path.abspath(patch_path)], cwd=scratch, capture_output=True, text=True)
        if result.returncode != 0:
            return None
        return open(os.path.join(scratch, file)).read()


def write(path, text):
    if os.path.exists(path) and not text:
        os.remove(path)
    elif text:
        with open(path + '.tmp', 'w') as f:
            f.write(text)
        os.replace(path + '.tmp', path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--check', action='store_true', help='check the committed patches, write nothing')
    args = parser.parse_args()
    if shutil.which('git') is None:
        raise SystemExit('error: git is needed (git apply checks the patches)')
    stale = []
    for name in assignments():
        file, reference, handout, solution = versions(name)
        folder = os.path.join(HERE, name)
        for patch_name, before, after in (('handout.patch', reference, handout), ('solution.patch', handout, solution)):
            path = os.path.join(folder, patch_name)
            if args.check:
                if before == after:
                    if os.path.exists(path):
                        stale.append(f'{name}/{patch_name} exists but the edits make no change')
                elif not os.path.exists(path) or apply_patch(file, before, path) != after:
                    stale.append(f'{name}/{patch_name}')
            else:
                write(path, unified_diff(file, before, after))
        print(f'{name}: {file}' + (', handout.patch' if handout != reference else '') + ', solution.patch')
    if stale:
        raise SystemExit('error: out of date (run python assignments/make_patches.py): ' + ', '.join(stale))


if __name__ == '__main__':
    main()
