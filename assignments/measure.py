"""Measure what a checker's verdict rests on, over seeds and thread counts, before trusting a threshold.

A checker that trains defines `measure(submission, output_dir, *flags) -> number` and `ARMS`
({arm name: flags, or (another such function, flags)}); this script applies the assignment's reference
solution in a temporary copy of the repository and prints the value for every arm, seed and
OMP_NUM_THREADS, then each arm's range:
  python assignments/measure.py simsiam-stop-gradient --seeds 0 1 2 3 4 --threads 1 2
Nothing in the repository is changed. The numbers are what the checker's comments quote.
"""
import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def solution_copy(name, root):
    """Copy the repository's *.py files, assignments/ and tools/ into root; apply handout.patch, then solution.patch."""
    for file in os.listdir(REPO):
        if file.endswith('.py'):
            shutil.copy(os.path.join(REPO, file), root)
    for folder in (HERE, os.path.join(REPO, 'tools')):  # tools/: eval_knn.py and eval_linear.py import it
        shutil.copytree(folder, os.path.join(root, os.path.basename(folder)),
                        ignore=shutil.ignore_patterns('__pycache__'))
    for patch in ('handout.patch', 'solution.patch'):
        path = os.path.join(HERE, name, patch)
        if os.path.exists(path):
            subprocess.run(['git', 'apply', path], cwd=root, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('name', help='assignment folder, e.g. simsiam-stop-gradient')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--arms', nargs='+', default=None, help='only these arms (default: all)')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        solution_copy(args.name, root)
        sys.path[:0] = [os.path.join(root, 'assignments'), root]
        grading = importlib.import_module('grading')
        [checker_path] = glob.glob(os.path.join(root, 'assignments', args.name, 'test_*.py'))
        spec = importlib.util.spec_from_file_location('checker', checker_path)
        checker = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(checker)
        submission = grading.Submission(root, checker.METHOD_FILE)
        values = {}
        for arm, flags in checker.ARMS.items():
            if args.arms and arm not in args.arms:
                continue
            function, flags = (checker.measure, flags) if isinstance(flags, list) else flags
            for threads in args.threads:
                os.environ['OMP_NUM_THREADS'] = str(threads)
                for seed in args.seeds:
                    folder = tempfile.mkdtemp(dir=root)
                    value = function(submission, folder, *flags, '--seed', str(seed))
                    values.setdefault(arm, []).append(value)
                    print(f'{args.name}  {arm:24s} threads {threads} seed {seed}: {value:.4g}', flush=True)
        for arm, numbers in values.items():
            print(f'{args.name}  {arm:24s} min {min(numbers):.4g} max {max(numbers):.4g} ({len(numbers)} runs)')


if __name__ == '__main__':
    main()
