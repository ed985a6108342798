"""The CIFAR-10 benchmark: every method file trained with its small-image preset, one record per run.

One command trains the methods (all eight, or those named), each as its own process with its own
output folder, several at once on one GPU when --concurrent says so, and resumes each from its
checkpoint when it is run again, so that a job cut by a time limit loses at most the epoch in
flight. A run that has finished (its checkpoint holds --epochs epochs and its metrics the final
kNN) is never trained again. Every finished run leaves a record with its provenance, and the
README's results table and the figures are rendered from the records alone:

  python tools/benchmark.py --data /tmp/cifar10                              # all eight, 200 epochs, one at a time
  python tools/benchmark.py --data /tmp/cifar10 --methods simclr byol --concurrent 2
  python tools/benchmark.py --data /tmp/cifar10 --dry-run --budget-minutes 10   # commands, GPU-time estimates, what fits
  python tools/benchmark.py --report                                         # docs/results.md + figures
  python tools/benchmark.py --report --name cifar10-200ep                    # ... from results/cifar10-200ep/ only
  python tools/benchmark.py --data procedural:256 --epochs 1 --name smoke -- --arch resnet18 --width 8 --workers 0

The CPU benchmark (--preset cpu, issue 22): every method on CIFAR-10 in at most 20 minutes of training on a
2-core CPU, with the settings of CPU_SETTINGS and CPU_RECIPES below (the results page renders them from there),
2 threads, kNN after every epoch, the untrained network's row (eval_knn.py / eval_linear.py --random-init), and
each epoch's CPU time beside its wall-clock; --speed measures the images/s of both input paths side by side:

  python tools/benchmark.py --preset cpu --data /tmp/cifar10                   # all eight and the untrained row
  python tools/benchmark.py --preset cpu --data /tmp/cifar10 --methods simclr  # one row
  python tools/benchmark.py --preset cpu --data /tmp/cifar10 --speed           # images/s, both input paths
  python tools/benchmark.py --preset cpu --data /tmp/cifar10 --seed 1 --methods simsiam   # another seed's row
  python tools/benchmark.py --preset cpu --data /tmp/cifar10 --rerun --methods simsiam    # the row again
  python tools/benchmark.py --report     # docs/results.md (GPU and CPU blocks) and README.md's summary line

Everything after `--` is passed to every method file. What a run is:
  python METHOD.py --data D --epochs E --output-dir RUNS/NAME/METHOD --knn-every K --knn-k 200 --knn-t 0.1 ...
with its log in RUNS/NAME/METHOD/train.log (default RUNS: runs/benchmark; NAME: <data>-<E>ep).

A record, RESULTS/NAME/METHOD.json (default RESULTS: results), holds the method, its command line,
the git commit (and whether the tree had uncommitted changes), Python / torch / torchvision versions,
the device, world size, how many runs shared the machine, the epochs, the final-epoch kNN top-1
(k=200, T=0.1, the CIFAR convention; also top-5 and top-1 at k=20), the best epoch's kNN and that
epoch, the training wall-clock (the sum of the epochs' loading + training time, from metrics.jsonl:
kNN passes, checkpoints and start-up excluded), images/s over it, the per-epoch kNN curve, the full
argument list the run trained with (its preset), one entry per invocation that trained it, and the
linear-probe top-1 (`linear_top1`) when eval_linear.py is in the repository. The run's
metrics.jsonl and log are copied beside it (METHOD.metrics.jsonl, METHOD.log).

Exit codes: 0 every run has its record; 1 a run failed (the others went on; its log's last error
line is printed); 3 nothing failed but a run is unfinished (--budget-minutes ran out, or a
--stop-after-epoch passed after `--`); 2 bad input; 143 / 130 stopped by SIGTERM / Ctrl-C (the
runs keep their checkpoints: the same command goes on).
"""
import argparse
import copy
import datetime
import fcntl
import glob
import importlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import textwrap
import subprocess
import sys
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's root
import common  # noqa: E402 (after the path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = 'ssl-benchmark-record/1'

# -----------------------------------------------------------------------------
# The methods, the published numbers to compare with, and this project's targets.
# The only numbers in this file typed by hand; every other number comes from a record.
# -----------------------------------------------------------------------------
METHODS = ('instdisc', 'simclr', 'moco', 'byol', 'simsiam', 'swav', 'mocov3', 'dino')    # table order (by year)
RUN_ORDER = ('simclr', 'byol', 'simsiam', 'moco', 'swav', 'mocov3', 'dino', 'instdisc')  # default --methods:
# the most informative first (the most cited CIFAR numbers, and the methods whose presets are least tried)
LABELS = dict(instdisc='InstDisc', simclr='SimCLR', moco='MoCo v2', byol='BYOL', simsiam='SimSiam', swav='SwAV',
              mocov3='MoCo v3', dino='DINO')
KNN_K, KNN_T = 200, 0.1  # the kNN every number below uses: CIFAR convention (InstDisc, MoCo demo, Lightly)

SOURCES = {
    'lightly': ("Lightly's CIFAR-10 benchmark: ResNet-18 with the CIFAR stem, 200 epochs, kNN k=200 on the "
                'test set after every epoch, the best epoch reported (lightly-ai/lightly, '
                'docs/source/getting_started/benchmarks.rst at commit 0243660)',
                'https://docs.lightly.ai/self-supervised-learning/getting_started/benchmarks.html'),
    'moco-demo': ("the MoCo authors' CIFAR-10 demo: ResNet-18, 200 epochs, kNN monitor k=200 T=0.1, end of training",
                  'https://colab.research.google.com/github/facebookresearch/moco/blob/colab-notebook/colab/'
                  'moco_cifar10_demo.ipynb'),
    'instdisc': ('Wu et al., CVPR 2018: CIFAR-10 kNN of a ResNet-18 on its 128-d features, about 80%',
                 'https://arxiv.org/abs/1805.01978'),
}
# top1: %, protocol: 'best' epoch or 'final' epoch, setting: what differs between entries of one method.
# Lightly's table at that commit also has the other batch size, given where our preset sits between.
PUBLISHED = {
    'instdisc': [dict(top1=80.0, protocol='final', source='instdisc', setting='128-d features', approximate=True)],
    'simclr': [dict(top1=84.8, protocol='best', source='lightly', setting='bs 512')],
    'moco': [dict(top1=85.3, protocol='final', source='moco-demo', setting='symmetric loss, as our preset'),
             dict(top1=82.6, protocol='final', source='moco-demo', setting='asymmetric loss'),
             dict(top1=84.7, protocol='best', source='lightly', setting='bs 512, queue 8192')],
    'byol': [dict(top1=86.8, protocol='best', source='lightly', setting='bs 512'),
             dict(top1=86.9, protocol='best', source='lightly', setting='bs 128')],
    'simsiam': [dict(top1=76.4, protocol='best', source='lightly', setting='bs 512'),
                dict(top1=81.9, protocol='best', source='lightly', setting='bs 128')],
    'swav': [dict(top1=84.2, protocol='best', source='lightly', setting='bs 512'),
             dict(top1=81.2, protocol='best', source='lightly', setting='bs 128')],
    'mocov3': [],  # no published ResNet-18 CIFAR-10 kNN at 200 epochs
    'dino': [dict(top1=81.3, protocol='best', source='lightly', setting='bs 512'),
             dict(top1=84.0, protocol='best', source='lightly', setting='bs 128')],
}
# This project's goals (issue 12): final epoch, k=200, T=0.1.
TARGETS = dict(instdisc=80.0, simclr=86.0, moco=86.0, byol=88.0, simsiam=85.0, swav=85.5, mocov3=86.0, dino=85.0)

# Throughput measured before this script existed, for --dry-run when no record has one yet:
# all eight methods, 10 epochs of CIFAR-10, 8 processes at once on one H100 (README, "On a GPU").
EARLY_MEASUREMENTS = dict(path=os.path.join(ROOT, 'results', 'h100-2026-11-22', 'cifar10-10ep-concurrent-{}.metrics.jsonl'),
                          at_once=8, device='NVIDIA H100 80GB HBM3')

OWNED_FLAGS = ('--data', '--epochs', '--output-dir', '--knn-every', '--knn-k', '--knn-t')  # set by the benchmark

# -----------------------------------------------------------------------------
# The CPU benchmark (--preset cpu): every method on CIFAR-10 in at most 20 minutes of a 2-core CPU.
# docs/results.md renders these tables (CPU_SETTINGS, CPU_RECIPES) from here; change them here only.
# -----------------------------------------------------------------------------
CPU_NAME = 'cpu-cifar10'
CPU_BUDGET_MINUTES = 20  # of training per method on a 2-core CPU, the input pipeline included
CPU_SETTINGS = {  # every method; a method's row in CPU_RECIPES may replace one of these (and says why)
    '--arch': 'resnet18', '--width': '16',  # ResNet-18 with the CIFAR stem (on by itself for 32-px images), 1/4 wide
    '--batch-size': '256', '--augment': 'device', '--workers': '0', '--seed': '0', '--warmup-epochs': '0',
    '--channels-last': None,  # a switch (value None); --speed measures it against channels-first
}
CPU_EPOCHS = 4  # of a method whose row in CPU_RECIPES does not say otherwise (the 2-view methods)
CPU_THREADS = 2  # OMP_NUM_THREADS of every training and evaluation process
# Per method: what replaces its small-image preset (method file, SMALL_IMAGE_PRESET) for this budget, and why.
# Losses, update rules and view distributions are the method's own; only sizes and schedules change.
CPU_RECIPES = {  # method: (epochs, flags, why)
    'instdisc': (4, {'--lr': '0.06', '--lr-steps': ('3', '4')},
                 "the preset's lr steps (epochs 120 and 160 of 200) moved to epochs 3 and 4 of 4"),
    'simclr': (4, {'--optimizer': 'sgd', '--lr': '0.5'}, 'SGD (lr 0.5 per 256) instead of LARS'),
    'moco': (3, {'--lr': '0.06'}, "lr 0.06 per 256 instead of 0.03; 3 epochs: the preset's symmetric loss (the "
             "authors' CIFAR demo) runs both encoders on both views, about 130 images/s here (the tries below), "
             'so 4 epochs would take about 26 minutes'),
    'byol': (4, {}, 'the preset as it is'),
    'simsiam': (4, {'--lr': '0.5'}, 'lr 0.5 per 256 instead of 0.03: at 0.06 the row fell short of +10 (commit '
                '14b1f2a), and the first of 4 epochs at 0.5 scored above the first at 0.06 (the tries below)'),
    'swav': (4, {'--freeze-prototypes-epochs': '0.2', '--nmb-crops': '2', '--size-crops': '32',
                 '--min-scale-crops': '0.14', '--max-scale-crops': '1'},
             "two 32-px crops (the authors' --nmb-crops 2, the paper's rows without multi-crop), not multi-crop "
             '(2 x 32 + 6 x 16 px): the six small crops about double the CPU time per image, and the multi-crop row '
             '(2 epochs, 33.5, commit 20c1e74) ended below one epoch of two crops (34.6, the swav-sinkhorn '
             "assignment's CIFAR-10 run); prototypes frozen for 0.2 epoch, not 1"),
    'mocov3': (4, {}, 'no warm-up (the preset: 10 epochs)'),
    'dino': (2, {'--warmup-teacher-temp-epochs': '1', '--momentum-teacher': '0.99', '--freeze-last-layer': '0',
                 '--use-bn-in-head': None, '--no-norm-last-layer': None},
             'multi-crop (2 x 32 + 6 x 16 px) and the teacher take at least twice the CPU time per image of two views, '
             'so half the epochs; teacher temperature warmed up over 1 epoch, not 30; teacher EMA from 0.99, not '
             "0.996; last layer not frozen; BatchNorm in the head and a last layer free of weight normalisation "
             "(both options of the authors' code): without them the teacher's entropy reached ln K within 20 "
             'steps and stayed there, the features fell below the untrained ones after one epoch (the tries below)'),
}
# Speed (--speed): images/s of whole training steps, each variant's flags added to the preset's, measured side by
# side: every round runs every variant once, in this order, so that a change in the machine's load hits all alike.
CPU_SPEED_OPTIONS = {  # the cheap wins torch offers on a CPU, measured on SimCLR beside the preset: (flags, threads)
    'channels-first': (['--no-channels-last'], None), 'bf16 autocast': (['--precision', 'bf16'], None),
    'torch.compile': (['--compile'], None), '1 thread': ([], 1),
}
PEER_WORKERS = (0, 1, 2)  # --peer: Lightly's SimCLR with each of these DataLoader worker counts
SPEED_IMAGES = 2560  # training images per speed run (10 steps of 256); 2 epochs, the second one timed
CPU_START, CPU_END = '<!-- cpu-benchmark:start -->', '<!-- cpu-benchmark:end -->'
SUMMARY_START, SUMMARY_END = '<!-- cpu-summary:start -->', '<!-- cpu-summary:end -->'
BASELINE = 'random-init'  # the untrained network's record: RESULTS/NAME/random-init.json


def epochs_of(args, method):
    """The epochs `method` trains: --epochs, or with --preset cpu and no --epochs, its row's (CPU_RECIPES)."""
    return args.method_epochs.get(method, args.epochs)


def settings_flags():
    return [item for flag, value in CPU_SETTINGS.items() for item in switch_or_pair(flag, value)]


def cpu_flags(method):
    """The flags the CPU preset gives `method`: the shared settings, then the method's row (which wins)."""
    _, flags, _ = CPU_RECIPES[method]
    merged = {**CPU_SETTINGS, **flags}
    return [item for flag, value in merged.items() for item in switch_or_pair(flag, value)]


def switch_or_pair(flag, value):
    """A setting's words: the flag alone (a switch: value None), or the flag and its value(s)."""
    return (flag,) if value is None else (flag, *(value if isinstance(value, tuple) else (value,)))

TABLE_START, TABLE_END = '<!-- benchmark-table:start -->', '<!-- benchmark-table:end -->'


# -----------------------------------------------------------------------------
# Arguments
# -----------------------------------------------------------------------------
def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False,
                                     usage='python tools/benchmark.py --data D [options] [-- flags for every method file]'
                                           '\n       python tools/benchmark.py --report [--results R] [--readme README.md]',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group('training')
    g.add_argument('--preset', default='gpu', choices=('gpu', 'cpu'),
                   help=f"gpu: each method file's small-image preset, 200 epochs; cpu: the CPU benchmark ({CPU_NAME}: "
                        f'CPU_SETTINGS and CPU_RECIPES, {CPU_EPOCHS} epochs, {CPU_THREADS} threads, kNN after every '
                        "epoch, and the untrained network's row)")
    g.add_argument('--data', help='the dataset every method trains on, e.g. /tmp/cifar10 (the CIFAR-10 JPEG folders)')
    g.add_argument('--methods', nargs='+', default=list(RUN_ORDER), help='methods to run, in this order')
    g.add_argument('--epochs', type=int, default=None, help=f'epochs of every run; None: 200, or {CPU_EPOCHS} with '
                   '--preset cpu')
    g.add_argument('--threads', type=int, default=None, help=f'OMP_NUM_THREADS of every run; None: {CPU_THREADS} with '
                   "--preset cpu, else the environment's (or the cores shared by --concurrent)")
    g.add_argument('--concurrent', type=int, default=1, help='runs at once (separate processes sharing the GPU)')
    g.add_argument('--name', default=None, help='name of this benchmark, None: <data>-<epochs>ep; with --report: only '
                   'its records, None: all')
    g.add_argument('--knn-every', type=int, default=None, help='epochs between kNN passes (0 = only after the last); '
                   'None: 10, or 1 with --preset cpu')
    g.add_argument('--runs', default=os.path.join('runs', 'benchmark'), help='where the runs train (RUNS/NAME/METHOD)')
    g.add_argument('--results', default='results', help='where the records go (RESULTS/NAME/METHOD.json)')
    g.add_argument('--budget-minutes', type=float, default=None,
                   help='stop every run after this long (they keep their checkpoints); with --dry-run: say what fits')
    g.add_argument('--linear-probe', action=argparse.BooleanOptionalAction, default=None,
                   help='run eval_linear.py on each finished checkpoint; None: when eval_linear.py exists')
    g.add_argument('--dry-run', action='store_true', help='print the commands and their estimated GPU time; run nothing')
    g.add_argument('--speed', action='store_true', help='with --preset cpu: instead of training, measure the images/s '
                   f'of both input paths of every method (and, on SimCLR, {", ".join(CPU_SPEED_OPTIONS)}), side by side, '
                   f'in --speed-rounds rounds, each run 2 epochs of {SPEED_IMAGES} training images, the second timed')
    g.add_argument('--speed-rounds', type=int, default=3, help='rounds of --speed')
    g.add_argument('--peer', metavar='PYTHON', default=None,
                   help="with --speed: also time Lightly's SimCLR (tools/peer_lightly.py, run by PYTHON, a Python that "
                        f"has lightly) with {', '.join(map(str, PEER_WORKERS))} DataLoader workers, in the same rounds")
    g.add_argument('--seed', type=int, default=None,
                   help=f'with --preset cpu: the seed of every run and of the untrained row (None: 0, as CPU_SETTINGS); '
                        f'another seed writes its own table, NAME {CPU_NAME}-seedS, shown beside the first as the spread')
    g.add_argument('--rerun', action='store_true',
                   help=f'with --preset cpu: train the rows again as NAME {CPU_NAME}-rerun (no untrained row), to show '
                        'that a rerun on the same machine and thread count gives the same numbers')
    g = parser.add_argument_group('report')
    g.add_argument('--report', action='store_true', help='render the tables and the figures from the records')
    g.add_argument('--page', default=os.path.join('docs', 'results.md'),
                   help=f'the results page: its {TABLE_START} ... {TABLE_END} block (GPU) and its {CPU_START} ... '
                        f'{CPU_END} block (CPU) are replaced')
    g.add_argument('--readme', default='README.md', help=f'the file whose {SUMMARY_START} ... {SUMMARY_END} line (the '
                   'CPU benchmark in one line) is replaced')
    return parser


def parse_args(argv=None):
    """(args, extra): the benchmark's flags, and those after `--` for every method file. Bad input is
    refused here, in one line, before anything is run or written."""
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    parser = get_parser()
    args = parser.parse_args(argv)
    cpu = args.preset == 'cpu'
    if args.report:
        check_report_args(parser, args, argv, extra)
        return args, extra
    args.method_epochs = {m: CPU_RECIPES[m][0] for m in METHODS} if cpu and args.epochs is None else {}
    args.epochs = args.epochs if args.epochs is not None else CPU_EPOCHS if cpu else 200
    args.knn_every = args.knn_every if args.knn_every is not None else 1 if cpu else 10
    args.threads = args.threads if args.threads is not None else CPU_THREADS if cpu else None
    if args.threads is not None and args.threads < 1:
        raise common.UsageError(f'--threads must be at least 1, not {args.threads}')
    if args.speed and not cpu:
        raise common.UsageError('--speed measures the CPU benchmark: add --preset cpu')
    if args.peer is not None and not (args.speed and os.access(args.peer, os.X_OK) and os.path.isfile(args.peer)):
        raise common.UsageError(f'--peer {args.peer}: give --speed and the path of a Python that has lightly '
                                '(e.g. a virtual environment\'s bin/python)' if args.speed else
                                '--peer times the peer beside --speed: add --speed')
    if args.speed_rounds < 1:
        raise common.UsageError(f'--speed-rounds must be at least 1, not {args.speed_rounds}')
    if (args.seed is not None or args.rerun) and not cpu:
        raise common.UsageError(f"{'--seed' if args.seed is not None else '--rerun'} is for the CPU benchmark: add "
                                '--preset cpu (other benchmarks take a seed after `--`)')
    if args.seed is not None and (args.seed < 0 or '--seed' in extra or args.rerun):
        raise common.UsageError(f'--seed must be >= 0, given once (not also after `--`) and not with --rerun, '
                                f'not {args.seed}')
    if args.seed is not None and args.seed != 0:
        extra = extra + ['--seed', str(args.seed)]  # after the preset's --seed 0: the last one wins
    if cpu and args.concurrent != 1:
        raise common.UsageError('--preset cpu trains one run at a time (its times are those of a whole CPU); '
                                'drop --concurrent')
    if args.data is None:
        raise common.UsageError('--data is required (the dataset every method trains on, e.g. --data /tmp/cifar10); '
                                'or --report to render the table')
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise common.UsageError(f"unknown --methods {' '.join(unknown)}; choose from: {' '.join(RUN_ORDER)}")
    if len(set(args.methods)) != len(args.methods):
        raise common.UsageError(f"--methods names a method twice ({' '.join(args.methods)}); name each once")
    if args.epochs < 1 or args.concurrent < 1:
        raise common.UsageError(f'--epochs and --concurrent must be at least 1, not {args.epochs} and {args.concurrent}')
    if args.knn_every < 0:
        raise common.UsageError(f'--knn-every must be >= 0 (0 = only after the last epoch), not {args.knn_every}: '
                                'every record needs the final kNN')
    if args.budget_minutes is not None and not args.budget_minutes > 0:
        raise common.UsageError(f'--budget-minutes must be positive, not {args.budget_minutes}')
    owned = [a for a in extra if a.split('=', 1)[0] in OWNED_FLAGS]
    if owned:
        raise common.UsageError(f"{owned[0].split('=', 1)[0]} after `--` is the benchmark's own setting "
                                f"({' '.join(OWNED_FLAGS)}): give --data / --epochs / --knn-every before `--`; the kNN "
                                f'is fixed at k={KNN_K}, T={KNN_T} and each run trains in {args.runs}/NAME/METHOD')
    data_dir = flag_value(extra, '--data-dir', os.environ.get('SSL_DATA_DIR', os.path.expanduser('~/.cache/ssl-datasets')))
    args.dataset_info = common.inspect_dataset(args.data, data_dir)  # one-line error for a missing or empty folder
    if args.name is None and cpu:
        args.name = (f'{CPU_NAME}-rerun' if args.rerun else f'{CPU_NAME}-seed{args.seed}' if args.seed else CPU_NAME)
    if args.name is None:
        args.name = f"{os.path.basename(os.path.normpath(args.data)).replace(':', '')}-{args.epochs}ep"
    if not re.fullmatch(r'[A-Za-z0-9._-]+', args.name):
        raise common.UsageError(f"--name '{args.name}' must be letters, digits, '.', '_' or '-' (it names folders)")
    check_method_flags(args, extra)
    return args, extra


def check_report_args(parser, args, argv, extra):
    """--report reads --results (and --name) and rewrites --page and --readme: a training flag would be ignored,
    and a --results without records would render empty tables over the rows already there."""
    training = next(group for group in parser._action_groups if group.title == 'training')
    typed = common.explicit_flags(parser, argv)
    ignored = [a.option_strings[0] for a in training._group_actions if a.dest in typed and a.dest not in
               ('results', 'name')] + (['flags after --'] if extra else [])
    if ignored:
        raise common.UsageError(f'--report renders the records and trains nothing: {ignored[0]} would be ignored; '
                                'drop it (or run the benchmark without --report)')
    for flag, path in (('--page', args.page), ('--readme', args.readme)):
        if os.path.isdir(path):
            raise common.UsageError(f'{flag} {path} is a folder; give the Markdown file to rewrite')
    if not os.path.isdir(args.results):
        raise common.UsageError(f'--results {args.results} is not a folder; give the folder that holds the '
                                'records (RESULTS/NAME/METHOD.json)')
    if not any(args.name in (None, r['name']) for r in load_records(args.results)):
        raise common.UsageError(f'--results {args.results} holds no benchmark records'
                                + (f" named '{args.name}'" if args.name else '')
                                + '; rendering would empty the tables: give the folder the benchmark wrote')


def check_method_flags(args, extra):
    """Each method file's own parser and range checks read its command line (the flags after `--` included)
    before any run starts: a flag a method does not know, or a value out of its range, is refused in one line
    that names the method, instead of failing that run after the others have started."""
    for method in args.methods:
        module = importlib.import_module(method)

        def refuse(message, method=method, usage=True):  # usage: an argparse error (an unknown flag, a bad int)
            raise common.UsageError(f'{method}.py refuses the flags after `--`: {message}'
                                    + (f'; see python {method}.py --help' if usage else ''))

        parser = copy.copy(module.parser)
        parser.error = refuse
        argv = method_command(args, extra, method)[2:]
        try:
            common.parse_args(parser, module.SMALL_IMAGE_PRESET, argv)
        except common.UsageError as error:
            if not str(error).startswith(f'{method}.py refuses'):
                refuse(str(error), usage=False)
            raise


def flag_value(argv, flag, default=None):
    """The value given to `flag` in an argument list (`--flag V` or `--flag=V`), else `default`."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + '='):
            return a.split('=', 1)[1]
    return default


# -----------------------------------------------------------------------------
# Provenance: git, device, the invocations recorded in each run's log
# -----------------------------------------------------------------------------
def git_state():
    """(commit, dirty) of the checkout benchmark.py lives in; dirty = tracked files differ from the
    commit. A copy of the tree without .git (a GPU machine) can be told through BENCHMARK_GIT_COMMIT
    (and BENCHMARK_GIT_DIRTY=0/1), read where the checkout is; else (None, None)."""
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                                capture_output=True, text=True, check=True)
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        if os.environ.get('BENCHMARK_GIT_COMMIT'):
            dirty = os.environ.get('BENCHMARK_GIT_DIRTY')
            return os.environ['BENCHMARK_GIT_COMMIT'], None if dirty is None else dirty == '1'
        return None, None


def cpu_model():
    """'<model name> (<n> cores)'."""
    return f'{common.cpu_name()} ({os.cpu_count()} cores)'


SEGMENT_START, SEGMENT_END = '# benchmark ', '# benchmark-end '
HEADER = re.compile(r'^(\w+): (\d+) process\(es\) on (\w+)(?: \((.+)\))?$')  # common.setup's first line


def read_segments(log_path):
    """One dict per invocation that trained this run, from the lines the benchmark (start, end) and
    the method file (`simclr: 1 process(es) on cuda (NVIDIA H200)`) wrote into its log."""
    segments = []
    if not os.path.exists(log_path):
        return segments
    with open(log_path, errors='replace') as f:
        for line in f:
            line = line.rstrip('\n')
            try:
                if line.startswith(SEGMENT_START):
                    segments.append(json.loads(line[len(SEGMENT_START):]))
                elif line.startswith(SEGMENT_END) and segments:
                    segments[-1].update(json.loads(line[len(SEGMENT_END):]))
            except ValueError:
                continue  # a line cut by a kill
            match = HEADER.match(line)
            if match and segments and 'device' not in segments[-1]:
                kind, name = match.group(3), match.group(4)
                segments[-1].update(world_size=int(match.group(2)), device_type=kind,
                                    device=name if kind == 'cuda' else cpu_model() if kind == 'cpu' else kind)
    return segments


def last_error_line(log_path):
    """The last line of the last invocation's output that reads as an error (`error: ...` from
    common.run, `X.py: error: ...` from argparse, or a traceback's last line); else its last line."""
    lines = []
    if os.path.exists(log_path):
        with open(log_path, errors='replace') as f:
            for line in f:
                lines = [] if line.startswith(SEGMENT_START) else lines + [line.strip()]
    lines = [line for line in lines if line and not line.startswith(SEGMENT_END)]
    errors = [line for line in lines if line.startswith('error:') or ': error: ' in line  # common.run, argparse
              or re.match(r'^[\w.]+(Error|Exception)\b', line)]                             # a traceback's last line
    return (errors or lines or ['(no output)'])[-1]


# -----------------------------------------------------------------------------
# The state of one run: epochs done, finished or not, who is training it
# -----------------------------------------------------------------------------
def run_folder(args, method):
    return os.path.join(args.runs, args.name, method)


def epochs_done(folder):
    """Epochs held by the run's checkpoint (0 without one); a corrupt checkpoint raises UsageError."""
    path = os.path.join(folder, 'checkpoint.pth')
    return common.read_checkpoint(path)['epoch'] if os.path.exists(path) else 0


def is_finished(folder, epochs):
    """Trained for `epochs` AND evaluated after the last one: the state a record is made from."""
    knn_epochs = {r['epoch'] for r in common.read_metrics(os.path.join(folder, 'metrics.jsonl')) if 'knn_top1' in r}
    return epochs_done(folder) == epochs and epochs in knn_epochs


def lock_run(folder):
    """An exclusive lock on folder/benchmark.lock, or None if another process holds it. The training
    process inherits the lock, so a run stays locked while it trains even if the benchmark that
    started it was killed: a second benchmark never trains the same folder at the same time."""
    fd = os.open(os.path.join(folder, 'benchmark.lock'), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


# -----------------------------------------------------------------------------
# Running: one process per method, at most --concurrent at once
# -----------------------------------------------------------------------------
def method_command(args, extra, method):
    """The command line of one run (the method's small-image preset applies by itself on <= 64-px data)."""
    script = os.path.relpath(os.path.join(ROOT, f'{method}.py'))
    command = ['python', script, '--data', args.data, '--epochs', str(epochs_of(args, method)),
               '--output-dir', run_folder(args, method), '--knn-every', str(args.knn_every),
               '--knn-k', str(KNN_K), '--knn-t', str(KNN_T)]
    return command + (cpu_flags(method) if args.preset == 'cpu' else []) + worker_flags(args, extra) + extra


def worker_flags(args, extra):
    """With several runs at once, each gets its share of the CPU cores for data loading (the method
    files' default, all cores but one, would oversubscribe them); a --workers after `--` wins."""
    if args.concurrent == 1 or flag_value(extra, '--workers') is not None:
        return []
    return ['--workers', str(max(1, (os.cpu_count() or 2) // args.concurrent - 1))]


def child_environment(args):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 2) // args.concurrent)))
    if args.threads is not None:
        env['OMP_NUM_THREADS'] = str(args.threads)
    return env


class Run:
    """One method's training process: its folder, lock, log and the most runs that shared the machine with it."""

    def __init__(self, args, extra, method, lock, done):
        self.method, self.lock, self.folder, self.done = method, lock, run_folder(args, method), done
        self.command = method_command(args, extra, method)
        self.log_path = os.path.join(self.folder, 'train.log')
        self.process, self.max_at_once, self.stopped = None, 0, False

    def start(self, args, at_once):
        commit, dirty = git_state()
        with open(self.log_path, 'a') as log:
            log.write(SEGMENT_START + json.dumps(dict(
                started=datetime.datetime.now().astimezone().isoformat(timespec='seconds'), git_commit=commit,
                git_dirty=dirty, concurrent=args.concurrent, epochs_before=self.done,
                threads=child_environment(args)['OMP_NUM_THREADS'],
                command=shlex.join(self.command), benchmark_command=shlex.join(['python', 'tools/benchmark.py'] + sys.argv[1:])))
                + '\n')
            log.flush()
            self.started = time.time()
            self.process = subprocess.Popen([sys.executable] + self.command[1:], stdout=log, stderr=subprocess.STDOUT,
                                            env=child_environment(args), pass_fds=(self.lock,))
        self.max_at_once = at_once
        self.loads = [os.getloadavg()[0]]  # the machine's 1-minute load average, sampled every PROGRESS_SECONDS

    def end(self):
        with open(self.log_path, 'a') as log:
            log.write(SEGMENT_END + json.dumps(dict(exit_code=self.process.returncode, max_at_once=self.max_at_once,
                                                    seconds=round(time.time() - self.started, 1),
                                                    load_average=round(sum(self.loads) / len(self.loads), 2)))
                      + '\n')

    def stop(self):
        """SIGTERM: the method file ends in one line naming its last checkpoint (common.run)."""
        if self.process and self.process.poll() is None:
            self.stopped = True
            self.process.send_signal(signal.SIGTERM)


def train(args, extra):
    """Run every method that is not finished, at most --concurrent at once; write each record as soon
    as its run finishes. Returns the exit code (see the module docstring)."""
    prepare_folder(os.path.join(args.results, args.name), '--results')
    prepare_folder(os.path.join(args.runs, args.name), '--runs')
    planned = ', '.join(f'{m} {epochs_of(args, m)}' for m in args.methods) if args.method_epochs else args.epochs
    print(f"benchmark {args.name}: {' '.join(args.methods)}; {planned} epochs on {args.data}, at most "
          f'{args.concurrent} at once; logs in {os.path.join(args.runs, args.name)}/<method>/train.log', flush=True)
    pending, failed, unfinished = [], [], []
    if args.preset == 'cpu' and not args.rerun and baseline(args, extra) == 'failed':
        failed.append(BASELINE)
    for method in args.methods:
        folder = run_folder(args, method)
        epochs = epochs_of(args, method)
        os.makedirs(folder, exist_ok=True)
        lock = lock_run(folder)
        if lock is None:
            print(f'  {method}: another process is training {folder}; skipped (rerun when it has ended)', flush=True)
            unfinished.append(method)
            continue
        try:
            done = epochs_done(folder)
            if done > epochs:
                raise common.UsageError(f'{folder} holds {done} epochs, more than --epochs {epochs}; use '
                                        f'--epochs {done} or another --name')
            if is_finished(folder, epochs):
                record_path = os.path.join(args.results, args.name, f'{method}.json')
                if os.path.exists(record_path):
                    print(f'  {method}: already finished ({epochs} epochs); nothing left to train, record '
                          f'{record_path} kept', flush=True)
                elif finish(args, extra, method, folder) == 'failed':
                    failed.append(method)
                os.close(lock)
                continue
        except common.UsageError as e:
            print(f'  {method}: FAILED: {e}', flush=True)
            failed.append(method)
            os.close(lock)
            continue
        pending.append(Run(args, extra, method, lock, done))

    deadline = time.time() + 60 * args.budget_minutes if args.budget_minutes else None
    running, last_progress = [], time.time()
    try:
        while pending or running:
            while pending and len(running) < args.concurrent and not (deadline and time.time() > deadline):
                run = pending.pop(0)
                print(f'  {run.method}: starting with {run.done} of {epochs_of(args, run.method)} epochs done: '
                      f'{shlex.join(run.command)}', flush=True)
                run.start(args, len(running) + 1)
                running.append(run)
            for run in running:
                run.max_at_once = max(run.max_at_once, len(running))
            if deadline and time.time() > deadline:
                if pending:
                    print(f"  budget of {args.budget_minutes:g} min spent: not started: "
                          f"{' '.join(r.method for r in pending)}", flush=True)
                    unfinished += [r.method for r in pending]
                    for run in pending:
                        os.close(run.lock)
                    pending = []
                for run in running:
                    if not run.stopped:
                        print(f'  {run.method}: budget of {args.budget_minutes:g} min spent; stopping it', flush=True)
                        run.stop()
            time.sleep(0.2)
            if time.time() > last_progress + PROGRESS_SECONDS:
                last_progress = time.time()
                for run in running:
                    run.loads.append(os.getloadavg()[0])
                    print(f'  {run.method}: {progress(run.folder, epochs_of(args, run.method))}', flush=True)
            for run in [r for r in running if r.process.poll() is not None]:
                running.remove(run)
                run.end()
                outcome = conclude(args, extra, run)
                if outcome == 'failed':
                    failed.append(run.method)
                elif outcome == 'unfinished':
                    unfinished.append(run.method)
                os.close(run.lock)
    finally:  # SIGTERM / Ctrl-C to the benchmark: stop the runs, which keep their last checkpoints
        for run in running:
            run.stop()
        for run in running:
            try:
                run.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                run.process.kill()
                run.process.wait()
            run.end()
            print(f'  {run.method}: stopped after {epochs_done(run.folder)} of {epochs_of(args, run.method)} epochs (checkpoint kept)',
                  flush=True)
    done = [m for m in args.methods if m not in failed and m not in unfinished]
    print(f'benchmark {args.name}: {len(done)} of {len(args.methods)} finished'
          + (f"; failed: {' '.join(failed)}" if failed else '')
          + (f"; unfinished: {' '.join(unfinished)} (rerun the same command to go on)" if unfinished else ''),
          flush=True)
    return 1 if failed else 3 if unfinished else 0


PROGRESS_SECONDS = 60  # how often the benchmark prints where its runs are


def progress(folder, epochs):
    """'epoch 57 of 200 done, 7,530 img/s, kNN top-1 80.12% at epoch 50', from the run's metrics.jsonl."""
    records = common.read_metrics(os.path.join(folder, 'metrics.jsonl'))
    epoch = next((r for r in reversed(records) if 'epoch_seconds' in r), None)
    knn = next((r for r in reversed(records) if 'knn_top1' in r), None)
    if epoch is None:
        return 'in its first epoch'
    return (f"epoch {epoch['epoch']} of {epochs} done, {epoch['epoch_images_per_s']:,.0f} img/s"
            + (f", kNN top-1 {knn['knn_top1']:.2f}% at epoch {knn['epoch']}" if knn else ''))


def conclude(args, extra, run):
    """After a run's process has ended: its record if it finished, else why not. Returns
    'finished', 'unfinished' (stopped with its checkpoint) or 'failed'."""
    code = run.process.returncode
    epochs = epochs_of(args, run.method)
    try:
        done = epochs_done(run.folder)
    except common.UsageError as e:
        print(f'  {run.method}: FAILED (exit {code}): {e}', flush=True)
        return 'failed'
    if code == 0 and is_finished(run.folder, epochs):
        return finish(args, extra, run.method, run.folder)
    if run.stopped or code in (-signal.SIGTERM, 143, 130):
        print(f'  {run.method}: stopped after {done} of {epochs} epochs (checkpoint kept)', flush=True)
        return 'unfinished'
    if code == 0 and done < epochs:
        print(f'  {run.method}: ended after {done} of {epochs} epochs (--stop-after-epoch?); rerun to go on',
              flush=True)
        return 'unfinished'
    reason = (last_error_line(run.log_path) if code else
              f'trained {done} epochs but metrics.jsonl has no kNN record of epoch {epochs}')
    print(f'  {run.method}: FAILED (exit {code}): {reason} (log: {run.log_path})', flush=True)
    return 'failed'


def prepare_folder(path, flag):
    """Create `path` (a folder of --results or --runs) and check that files can be written in it."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise common.UsageError(f'{flag} {path}: cannot create it ({e.strerror}); choose a writable folder') from None
    common.check_writable_file(os.path.join(path, '.probe'), flag)


# -----------------------------------------------------------------------------
# Records
# -----------------------------------------------------------------------------
def finish(args, extra, method, folder):
    """Write RESULTS/NAME/METHOD.json (+ .metrics.jsonl, .log) for a finished run; 'finished', or
    'failed' when its files cannot make a record."""
    results = os.path.join(args.results, args.name)
    try:
        record = make_record(args, extra, method, folder)
    except common.UsageError as e:
        print(f'  {method}: FAILED: {e}', flush=True)
        return 'failed'
    linear = linear_probe_wanted(args)
    if linear:
        record.update(linear_probe(os.path.join(folder, 'checkpoint.pth'), os.path.join(folder, 'train.log'),
                                   os.path.join(ROOT, 'eval_linear.py'), flag_value(extra, '--workers'),
                                   child_environment(args)))
    else:
        record['linear_note'] = 'not run: ' + ('--no-linear-probe' if linear is False else
                                               'eval_linear.py is not in this repository')
    for name in ('metrics.jsonl', 'train.log'):
        source = os.path.join(folder, name)
        if os.path.exists(source):
            tmp = os.path.join(results, f".{method}.{name}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, os.path.join(results, f"{method}.{'log' if name == 'train.log' else name}"))
    common.write_json(os.path.join(results, f'{method}.json'), record)  # last: a record's files are all there
    best = f"best {record['best_knn_top1']:.2f}% at epoch {record['best_epoch']}"
    print(f"  {method}: finished: kNN top-1 {record['knn_top1']:.2f}% ({best}), "
          f"{record['train_seconds'] / 60:.1f} min of training, {record['images_per_s']:,.0f} img/s -> "
          f'{os.path.join(results, method + ".json")}', flush=True)
    return 'finished'


def make_record(args, extra, method, folder):
    """Everything the table, the figures and a reader checking a claim need, from the run's
    checkpoint (its arguments), metrics.jsonl (the numbers) and log (who trained it, where)."""
    state = common.read_checkpoint(os.path.join(folder, 'checkpoint.pth'))
    metrics = common.read_metrics(os.path.join(folder, 'metrics.jsonl'))
    epoch_records = [r for r in metrics if 'epoch_seconds' in r]
    knn = [r for r in metrics if 'knn_top1' in r]
    epochs = epochs_of(args, method)
    if [r['epoch'] for r in epoch_records] != list(range(1, epochs + 1)):
        raise common.UsageError(f'{folder}/metrics.jsonl does not hold one epoch record (epoch_seconds) for each of '
                                f'the {epochs} epochs, so its training time is unknown; was it trained by an '
                                'older version? Train it again in another --name')
    final = next(r for r in reversed(knn) if r['epoch'] == epochs)
    best = max(knn, key=lambda r: (r['knn_top1'], -r['epoch']))  # ties: the earliest epoch
    train_seconds = epoch_records[-1]['train_seconds']
    images = round(sum(r['epoch_images_per_s'] * r['epoch_seconds'] for r in epoch_records))  # steps x batch
    seconds_at = {r['epoch']: r['train_seconds'] for r in epoch_records}
    cpu_known = all('epoch_cpu_seconds' in r for r in epoch_records)
    cpu_at = {r['epoch']: sum(e['epoch_cpu_seconds'] for e in epoch_records[:i + 1])
              for i, r in enumerate(epoch_records)} if cpu_known else {}
    segments = read_segments(os.path.join(folder, 'train.log'))
    last = segments[-1] if segments else {}
    commit, dirty = (last.get('git_commit'), last.get('git_dirty')) if segments else git_state()
    devices = list(dict.fromkeys(s['device'] for s in segments if 'device' in s))
    saved_args = state['args']
    return dict(
        schema=SCHEMA, method=method, label=LABELS[method], name=args.name,
        recorded_at=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        command=last.get('command', shlex.join(method_command(args, extra, method))),
        benchmark=dict(data=args.data, epochs=epochs, knn_every=args.knn_every, extra=extra),
        git_commit=commit, git_dirty=dirty,
        python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
        device=' + '.join(devices) if devices else None,
        device_type=last.get('device_type'), cpu=cpu_model(),
        world_size=last.get('world_size'),
        concurrency=max((s.get('max_at_once', s.get('concurrent', 1)) for s in segments), default=None),
        epochs=state['epoch'], data=saved_args.get('data'),
        dataset={k: saved_args.get('dataset_info', {}).get(k)
                 for k in ('kind', 'num_train', 'num_test', 'num_classes', 'image_size')},
        arch=saved_args.get('arch'), batch_size=saved_args.get('batch_size'),
        knn_k=saved_args.get('knn_k'), knn_t=saved_args.get('knn_t'),
        knn_top1=final['knn_top1'], knn_top5=final.get('knn_top5'), knn_top1_k20=final.get('knn_top1_k20'),
        best_knn_top1=best['knn_top1'], best_epoch=best['epoch'],
        train_seconds=train_seconds,
        train_seconds_note='sum of the epochs\' loading + training wall-clock (metrics.jsonl epoch_seconds, resumes '
                           'included); kNN passes, checkpoints and start-up excluded',
        knn_seconds=sum(r.get('knn_seconds', 0.0) for r in knn),
        images_seen=images, images_per_s=images / max(train_seconds, 1e-9),
        knn_curve=[dict(epoch=r['epoch'], knn_top1=r['knn_top1'], knn_top5=r.get('knn_top5'),
                        knn_top1_k20=r.get('knn_top1_k20'), train_seconds=seconds_at.get(r['epoch']),
                        train_cpu_seconds=cpu_at.get(r['epoch'])) for r in knn],
        epoch_times=[dict(epoch=r['epoch'], seconds=r['epoch_seconds'], cpu_seconds=r.get('epoch_cpu_seconds'),
                          images_per_s=r['epoch_images_per_s']) for r in epoch_records],
        train_cpu_seconds=cpu_at.get(epochs),
        train_cpu_seconds_note="the epochs' CPU time (user + sys of the training process and its workers; "
                               'common.process_cpu_seconds); against train_seconds x threads it shows how much of the '
                               'machine the run had',
        preset=args.preset, threads=int(last['threads']) if last.get('threads') else None,
        cpu_model=common.cpu_name(), cores=os.cpu_count(),
        load_average=max((s['load_average'] for s in segments if 'load_average' in s), default=None),
        load_average_note="the machine's 1-minute load average while the run trained (the mean of one sample a "
                          'minute; the highest over its invocations)',
        settings=cpu_flags(method) if args.preset == 'cpu' else None,  # the CPU preset's flags (before `--`)
        linear_top1=None,
        args={k: v for k, v in saved_args.items() if k != 'dataset_info'},
        segments=segments,
        metrics=f'{method}.metrics.jsonl', log=f'{method}.log')


BACKBONE_FLAGS = ('--arch', '--width', '--image-size', '--seed', '--workers', '--data-dir', '--zero-init-residual',
                  '--no-zero-init-residual', '--cifar-stem', '--no-cifar-stem')  # what eval_*.py --random-init take


def backbone_flags(argv):
    """The backbone, seed and loading flags of a method file's arguments (the last of each wins, as in argparse),
    for eval_knn.py / eval_linear.py --random-init: the same network, untrained."""
    found = {}
    for i, a in enumerate(argv):
        flag = a.split('=', 1)[0]
        if flag in BACKBONE_FLAGS:
            takes_value = not flag.startswith(('--zero', '--no-', '--cifar'))
            key = flag.replace('--no-', '--')  # --cifar-stem and --no-cifar-stem: one setting
            found.pop(key, None)
            found[key] = [a] if '=' in a or not takes_value else [a, argv[i + 1]]
    return [item for items in found.values() for item in items]


def baseline(args, extra):
    """The untrained network's row (--preset cpu): eval_knn.py and eval_linear.py --random-init on the preset's
    backbone with its seed, evaluated as the trained ones are; RESULTS/NAME/random-init.json. 'finished' or
    'failed'; a record already there is kept."""
    path = os.path.join(args.results, args.name, BASELINE + '.json')
    if os.path.exists(path):
        print(f'  {BASELINE}: record {path} kept', flush=True)
        return 'finished'
    folder = os.path.join(args.runs, args.name, BASELINE)
    os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, 'train.log')
    network = ['--random-init', '--data', args.data] + backbone_flags(list(settings_flags()) + extra)
    knn_json, linear_json = os.path.join(folder, 'knn.json'), os.path.join(folder, 'linear.json')
    commands = dict(
        knn=['python', os.path.relpath(os.path.join(ROOT, 'eval_knn.py'))] + network +
            ['--k', str(KNN_K), '--temperature', str(KNN_T), '--json', knn_json],
        linear=['python', os.path.relpath(os.path.join(ROOT, 'eval_linear.py'))] + network + ['--json', linear_json])
    times = {}
    for kind, command in commands.items():
        print(f'  {BASELINE}: {shlex.join(command)}', flush=True)
        started, cpu_started = time.time(), children_cpu_seconds()
        with open(log_path, 'a') as log:
            log.write(f'# {shlex.join(command)}\n')
            log.flush()
            code = subprocess.run([sys.executable] + command[1:], stdout=log, stderr=subprocess.STDOUT,
                                  env=child_environment(args)).returncode
        if code != 0:
            print(f'  {BASELINE}: FAILED (exit {code}): {last_error_line(log_path)} (log: {log_path})', flush=True)
            return 'failed'
        times[kind] = dict(seconds=time.time() - started, cpu_seconds=children_cpu_seconds() - cpu_started)
    with open(knn_json) as f:
        knn = json.load(f)['results'][str(KNN_K)]
    with open(linear_json) as f:
        linear = json.load(f)
    commit, dirty = git_state()
    record = dict(
        schema=SCHEMA, method=BASELINE, label='untrained', name=args.name, preset=args.preset,
        recorded_at=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        command=shlex.join(commands['knn']), linear_command=shlex.join(commands['linear']),
        benchmark=dict(data=args.data, epochs=0, knn_every=args.knn_every, extra=extra),
        git_commit=commit, git_dirty=dirty,
        python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
        device=cpu_model(), device_type='cpu', cpu_model=common.cpu_name(), cores=os.cpu_count(),
        threads=int(child_environment(args)['OMP_NUM_THREADS']), world_size=1, concurrency=1, epochs=0,
        dataset=args.dataset_info and {k: args.dataset_info.get(k) for k in
                                       ('kind', 'num_train', 'num_test', 'num_classes', 'image_size')},
        knn_k=KNN_K, knn_t=KNN_T, knn_top1=knn['top1'], knn_top5=knn['top5'], best_knn_top1=knn['top1'], best_epoch=0,
        train_seconds=0.0, train_cpu_seconds=0.0, images_per_s=None, knn_seconds=times['knn']['seconds'],
        knn_curve=[dict(epoch=0, knn_top1=knn['top1'], knn_top5=knn['top5'], train_seconds=0.0,
                        train_cpu_seconds=0.0)],
        linear_top1=linear['top1'], evaluation_times=times, settings=backbone_flags(list(settings_flags()) + extra),
        log=f'{BASELINE}.log')
    shutil.copyfile(log_path, os.path.join(args.results, args.name, f'{BASELINE}.log'))
    common.write_json(path, record)
    print(f"  {BASELINE}: kNN top-1 {record['knn_top1']:.2f}%, linear {record['linear_top1']:.2f}% -> {path}",
          flush=True)
    return 'finished'


def speed_variants(method, peer=False):
    """{variant: (flags added to the preset's, threads or None)}: both input paths; on SimCLR also the options,
    and with `peer` Lightly's SimCLR (variants 'Lightly, W workers': the flags of tools/peer_lightly.py)."""
    variants = {'device': ([], None),
                'cpu': (['--augment', 'cpu', '--workers', str(max(1, (os.cpu_count() or 2) - 1))], None)}
    if method != 'simclr':
        return variants
    peers = {peer_variant(w): (['--workers', str(w)], None) for w in PEER_WORKERS} if peer else {}
    return {**variants, **CPU_SPEED_OPTIONS, **peers}


def peer_variant(workers):
    return f"Lightly, {workers} worker{'' if workers == 1 else 's'}"


def speed_data(args):
    """What the speed runs train on: SPEED_IMAGES training images of --data (a folder of links to them, the same
    number per class), procedural:N for the procedural data, else --data itself."""
    info = args.dataset_info
    if info['kind'] == 'procedural':
        return f"procedural:{min(SPEED_IMAGES, info['num_train'])}"
    if info['kind'] != 'folder':
        return args.data
    folder = os.path.join(args.runs, args.name, 'speed-data')
    train = os.path.join(args.data, 'train')
    classes = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
    for c in classes:
        os.makedirs(os.path.join(folder, 'train', c), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(train, c)))[:SPEED_IMAGES // len(classes)]:
            link = os.path.join(folder, 'train', c, name)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(train, c, name)), link)
    return folder


def speed(args, extra):
    """--speed: RESULTS/NAME/speed.jsonl, one line per (round, method, variant), the rounds alternating the
    variants; lines already there are kept (the same command goes on)."""
    prepare_folder(os.path.join(args.results, args.name), '--results')
    path = os.path.join(args.results, args.name, 'speed.jsonl')
    done = {(r['method'], r['variant'], r['round']) for r in common.read_metrics(path)}
    data = speed_data(args)
    commit, dirty = git_state()
    for round_ in range(1, args.speed_rounds + 1):
        for method in args.methods:
            for variant, (flags, threads) in speed_variants(method, args.peer is not None).items():
                if (method, variant, round_) in done:
                    continue
                folder = os.path.join(args.runs, args.name, 'speed', f"{method}-{variant.replace(' ', '-')}-{round_}")
                shutil.rmtree(folder, ignore_errors=True)
                os.makedirs(folder)
                command = ['python', os.path.relpath(os.path.join(ROOT, f'{method}.py')), '--data', data, '--epochs',
                           '2', '--output-dir', folder, '--knn-every', '-1'] + cpu_flags(method) + extra + flags
                if variant.startswith('Lightly'):  # the peer: its own loop, the preset's network, batch and lr
                    command = [args.peer, os.path.relpath(os.path.join(ROOT, 'tools', 'peer_lightly.py')), '--data', data,
                               '--epochs', '2', '--output-dir', folder, '--width', CPU_SETTINGS['--width'],
                               '--batch-size', CPU_SETTINGS['--batch-size'],
                               '--lr', CPU_RECIPES['simclr'][1]['--lr']] + flags
                env = child_environment(args)
                if threads:
                    env['OMP_NUM_THREADS'] = str(threads)
                load = os.getloadavg()[0]
                log_path = os.path.join(folder, 'train.log')
                with open(log_path, 'w') as log:
                    code = subprocess.run([command[0] if variant.startswith('Lightly') else sys.executable]
                                          + command[1:], stdout=log, stderr=subprocess.STDOUT, env=env).returncode
                epochs = [m for m in common.read_metrics(os.path.join(folder, 'metrics.jsonl')) if 'epoch_seconds' in m]
                timed = epochs[1] if code == 0 and len(epochs) == 2 else {}
                record = dict(method=method, variant=variant, round=round_, command=shlex.join(command),
                              threads=int(env['OMP_NUM_THREADS']), exit_code=code,
                              images_per_s=timed.get('epoch_images_per_s'), epoch_seconds=timed.get('epoch_seconds'),
                              epoch_cpu_seconds=timed.get('epoch_cpu_seconds'),
                              error=last_error_line(log_path) if code else None,
                              load_average=round((load + os.getloadavg()[0]) / 2, 2), cpu_model=common.cpu_name(),
                              cores=os.cpu_count(), git_commit=commit, git_dirty=dirty,
                              recorded_at=datetime.datetime.now().astimezone().isoformat(timespec='seconds'))
                with open(path, 'a') as f:
                    f.write(json.dumps(record) + '\n')
                rate = f"{record['images_per_s']:,.1f} img/s" if record['images_per_s'] else f'FAILED: {record["error"]}'
                print(f'  speed round {round_}: {method} {variant}: {rate}', flush=True)


def children_cpu_seconds():
    """User + sys CPU time of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def linear_probe_wanted(args):
    """True: run it; None: eval_linear.py absent (skipped); False: --no-linear-probe."""
    if args.linear_probe is False:
        return False
    return os.path.exists(os.path.join(ROOT, 'eval_linear.py')) or None


def linear_probe(checkpoint, log_path, script, workers=None, env=None):
    """`python eval_linear.py CKPT --json FILE` (its fast protocol), output appended to the run's log;
    returns the record's linear_top1 (the JSON's `top1`, at its top level or under `results`) and a
    linear_note when it could not be had."""
    json_path = os.path.join(os.path.dirname(checkpoint), 'linear.json')
    command = [sys.executable, script, checkpoint, '--json', json_path] + (['--workers', workers] if workers else [])
    with open(log_path, 'a') as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                              env=env or dict(os.environ, PYTHONUNBUFFERED='1')).returncode
    if code != 0:
        return dict(linear_top1=None, linear_note=f'eval_linear.py exited {code}: {last_error_line(log_path)}')
    try:
        with open(json_path) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        return dict(linear_top1=None, linear_note=f'eval_linear.py left no readable {json_path} ({type(e).__name__})')
    nested = result.get('results') if isinstance(result.get('results'), dict) else {}
    top1 = result.get('top1', nested.get('top1'))
    if top1 is None:
        return dict(linear_top1=None, linear_note=f'{json_path} has no top1')
    return dict(linear_top1=float(top1), linear_command=shlex.join(['python', os.path.relpath(script)] + command[2:]))


# -----------------------------------------------------------------------------
# Dry run: the commands and what they will cost
# -----------------------------------------------------------------------------
def measured_rate(method, results_dir):
    """(images/s of one process, how many ran at once, seconds per kNN pass or None, where it was measured)
    from the newest GPU record of `method` under results_dir, else the early H100 measurements, else None."""
    records = [r for r in load_records(results_dir) if r['method'] == method and r.get('device_type') == 'cuda']
    if records:
        r = max(records, key=lambda r: r['recorded_at'])
        knn_pass = r['knn_seconds'] / len(r['knn_curve']) if r.get('knn_curve') else None
        return (r['images_per_s'], r.get('concurrency') or 1, knn_pass,
                f"{r['device']}, record {r['name']}/{method}.json")
    path = EARLY_MEASUREMENTS['path'].format(method)
    rates = sorted(r['images_per_s'] for r in common.read_metrics(path) if 'images_per_s' in r)
    if not rates:
        return None
    knn_seconds = []  # the monitor's lines in the run's log: `  kNN (k=200, T=0.1): top-1 45.27  top-5 91.71  (9 s)`
    log = path.replace('.metrics.jsonl', '.log')
    if os.path.exists(log):
        with open(log, errors='replace') as f:
            knn_seconds = [float(m.group(1)) for m in map(re.compile(r'^\s*kNN \(k=.*\((\d+) s\)$').match, f) if m]
    return (rates[len(rates) // 2], EARLY_MEASUREMENTS['at_once'],
            sum(knn_seconds) / len(knn_seconds) if knn_seconds else None,
            f"{EARLY_MEASUREMENTS['device']}, {os.path.relpath(path)} (median of its progress lines)")


def knn_passes(done, epochs, every):
    """kNN passes still to come in epochs done+1 .. epochs (common.knn_due: every `every` epochs, and the last)."""
    return sum(1 for e in range(done + 1, epochs + 1) if e == epochs or (every and e % every == 0))


def dry_run(args, extra):
    """Print each run's command and its estimated GPU time; with --budget-minutes, which runs fit.

    The estimate: remaining epochs x training images / rate, the rate being a measured images/s of one
    process scaled by (runs at once then) / (--concurrent now), i.e. the machine's total throughput
    taken as fixed and shared evenly (on the H100, SimCLR alone: 7,200-7,900 img/s; 8 at once: 1,213
    each, 9,700 together: the scaling is right within ~30% and optimistic for fewer runs at once);
    plus the kNN passes still to come at the measured seconds per pass. Checkpoints and start-up are
    not included. The total is the time until the last run ends, runs starting in --methods order
    whenever a slot is free; a run fits the budget if it ends within it. --results and --runs are checked as
    a real run checks them, without creating anything."""
    for path, flag in ((os.path.join(args.results, args.name), '--results'), (os.path.join(args.runs, args.name), '--runs')):
        existing = path
        while existing and not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if existing and not os.path.isdir(existing):
            raise common.UsageError(f'{flag} {path}: {existing} is a file, not a folder; choose a folder')
    num_train = args.dataset_info['num_train']
    if args.preset == 'cpu':  # the estimates below are of GPU time
        print(f"benchmark {args.name} (dry run): the untrained row, then {' '.join(args.methods)}, one at a time:")
        for method in args.methods:
            print(f'  {shlex.join(method_command(args, extra, method))}')
        return
    print(f"benchmark {args.name} (dry run): {' '.join(args.methods)}; {args.epochs} epochs of {num_train:,} "
          f'images, at most {args.concurrent} at once')
    if worker_flags(args, extra):
        print(f'  (--workers {worker_flags(args, extra)[1]}: this machine\'s {os.cpu_count()} cores shared by '
              f'{args.concurrent} runs; the machine that trains computes its own)')
    slots, fits, unknown = [0.0] * args.concurrent, [], []
    for method in args.methods:
        try:
            done = epochs_done(run_folder(args, method))
        except common.UsageError as e:
            print(f'  {method}: {e}')
            continue
        print(f'  {shlex.join(method_command(args, extra, method))}')
        if done >= epochs_of(args, method):
            print(f'      already trained ({done} epochs): no GPU time')
            fits.append(method)
            continue
        rate = measured_rate(method, args.results)
        if rate is None:
            print(f'      {epochs_of(args, method) - done} epochs to train; estimate unknown (no measured images/s for {method})')
            unknown.append(method)
            continue
        per_process, at_once, knn_pass, source = rate
        here = per_process * at_once / args.concurrent
        train_seconds = (epochs_of(args, method) - done) * num_train / here
        passes = knn_passes(done, epochs_of(args, method), args.knn_every)
        seconds = train_seconds + passes * (knn_pass or 0.0)
        slot = slots.index(min(slots))
        slots[slot] += seconds
        if args.budget_minutes and slots[slot] <= 60 * args.budget_minutes:
            fits.append(method)
        knn = f' + {passes} kNN passes x {knn_pass:.0f} s' if knn_pass else f' + {passes} kNN passes (time unknown)'
        print(f'      {epochs_of(args, method) - done} epochs x {num_train:,} images / {here:,.0f} img/s = '
              f'{train_seconds / 60:.1f} min{knn} = {seconds / 60:.1f} min '
              f'(from {per_process:,.0f} img/s with {at_once} at once: {source})')
    print(f'  total: {max(slots) / 60:.1f} min of GPU time with {args.concurrent} at once'
          + (f", plus {' '.join(unknown)} (unknown)" if unknown else '') + '; checkpoints and start-up not included')
    if args.budget_minutes:
        rest = [m for m in args.methods if m not in fits]
        print(f"  within {args.budget_minutes:g} min: {' '.join(fits) if fits else 'none'}"
              + (f"; not: {' '.join(rest)}" if rest else ''))
        if fits and rest:
            print(f"  to run what fits: --methods {' '.join(fits)}")


# -----------------------------------------------------------------------------
# Report: the README table and the figures, from the records
# -----------------------------------------------------------------------------
def load_records(results_dir):
    """Every benchmark record under results_dir/*/ (other JSON files are ignored)."""
    records = []
    for path in sorted(glob.glob(os.path.join(results_dir, '*', '*.json'))):
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get('schema') == SCHEMA:
            records.append(record)
    return records


def signed(x):
    return f'{x:+.1f}'


def published_cells(method, record):
    """(published, delta) cells: each published number with its protocol and source, and ours minus it,
    ours taken at the same protocol (our best epoch against a best-epoch number, final against final)."""
    numbers, deltas = [], []
    for entry in PUBLISHED[method]:
        approx = '~' if entry.get('approximate') else ''
        source = list(SOURCES).index(entry['source']) + 1
        numbers.append(f"{approx}{entry['top1']:.1f} ({entry['protocol']}; {entry['setting']}) [{source}]")
        if record:
            ours = record['best_knn_top1'] if entry['protocol'] == 'best' else record['knn_top1']
            deltas.append(f"{approx}{signed(ours - entry['top1'])} ({entry['protocol']})")
    if not numbers:
        return 'none published for this setting', ''
    return '<br>'.join(numbers), '<br>'.join(deltas)


CIFAR10 = dict(num_train=50000, num_test=10000, num_classes=10, image_size=32)


def comparable(record):
    """The published numbers and the targets are for CIFAR-10 at 200 epochs: only such a run is compared."""
    return record['epochs'] == 200 and all(record['dataset'].get(k) == v for k, v in CIFAR10.items())


def table_row(method, record, compare, linear):
    """One row: ours (final / best), [linear], [published, ours - published, target], wall-clock, device, epochs."""
    cells = [LABELS[method]]
    if record is None:
        cells += ['owed'] + ([''] if linear else [])
    else:
        cells += [f"**{record['knn_top1']:.2f}** / {record['best_knn_top1']:.2f} ({record['best_epoch']})"]
        if linear:
            cells += [f"{record['linear_top1']:.2f}" if record.get('linear_top1') is not None else '']
    if compare:
        published, delta = published_cells(method, record)
        target = f'{TARGETS[method]:.1f}'
        if record is not None:
            short = record['knn_top1'] - TARGETS[method]
            target += ' (met)' if short >= 0 else f' (short by {-short:.1f})'
        cells += [published, delta, target]
    if record is None:
        return cells + ['', '', '']
    at_once = f", {record['concurrency']} at once" if (record.get('concurrency') or 1) > 1 else ''
    wall = f"{record['train_seconds'] / 60:.1f} min ({record['images_per_s']:,.0f} img/s{at_once})"
    return cells + [wall, record['device'] or '?', str(record['epochs'])]


def render_table(records, readme_dir, results_dir):
    """The Markdown block between the README markers: one table per benchmark name, its figures,
    the command that makes its missing rows, and the sources of the published numbers."""
    groups = {}
    for record in records:
        groups.setdefault(record['name'], {})[record['method']] = record
    lines = [TABLE_START,
             '<!-- written by `python tools/benchmark.py --report` from the records in '
             f'{os.path.relpath(results_dir, readme_dir)}/; edit the records or benchmark.py, not this block -->', '']
    if not groups:
        lines += ['No benchmark record yet: every row is owed. The command that makes them (CIFAR-10 JPEG folders in '
                  '/tmp/cifar10):', '', '```bash', 'python tools/benchmark.py --data /tmp/cifar10', '```', '']
        groups = {'cifar10-200ep': {}}
    linear = any(r.get('linear_top1') is not None for r in records)
    for name, by_method in sorted(groups.items()):
        example = next(iter(by_method.values()), None)
        compare = example is None or all(comparable(r) for r in by_method.values())
        if example:
            b = example['benchmark']
            lines += [f"**{name}**: {b['epochs']} epochs on `{b['data']}`; kNN top-1 (%) on the test set, k={KNN_K}, "
                      f"T={KNN_T}, from each run's own monitor (every {b['knn_every']} epochs and after the last)."
                      + ('' if compare else ' Not CIFAR-10 at 200 epochs: not compared with the published numbers.')
                      + (' The data is an image folder: if JPEG (as the CIFAR-10 copy in ../shared/data), compression '
                         'may cost a little accuracy against the published runs on the original images.'
                         if compare and example['dataset'].get('kind') == 'folder' else ''),
                      '']
        header = ['method', 'ours: final / best (epoch)'] + (['linear'] if linear else []) + \
                 (['published', 'ours - published', 'target (final)'] if compare else []) + \
                 ['training wall-clock', 'device', 'epochs']
        lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        lines += ['| ' + ' | '.join(table_row(m, by_method.get(m), compare, linear)) + ' |' for m in METHODS]
        lines.append('')
        owed = [m for m in RUN_ORDER if m not in by_method]
        if owed and example:
            command = ['python', 'tools/benchmark.py', '--data', b['data'], '--epochs', str(b['epochs']), '--name', name] + \
                      (['--knn-every', str(b['knn_every'])] if b['knn_every'] != 10 else []) + ['--methods'] + owed + \
                      (['--'] + b['extra'] if b['extra'] else [])
            lines += [f'Owed rows: `{shlex.join(command)}`', '']
        if example:
            figures = [os.path.relpath(os.path.join(results_dir, name, f), readme_dir)
                       for f in ('knn-vs-epoch.png', 'knn-vs-wallclock.png')]
            lines += [f'![kNN top-1 against epoch]({figures[0]}) ![kNN top-1 against training wall-clock]({figures[1]})',
                      '']
    lines += ['Final: the last epoch; best: the best of the evaluated epochs (Lightly evaluates after every epoch, '
              'this benchmark every --knn-every epochs, so our best can only be lower than theirs would be). Ours minus '
              'published compares like with like: our best epoch with a best-epoch number, our final epoch with a '
              "final-epoch number. Training wall-clock: the epochs' loading + training time, kNN passes, checkpoints and "
              'start-up excluded; with several runs at once the machine was shared. Sources:', '']
    lines += [f'{i}. {text}: <{url}>' for i, (text, url) in enumerate(SOURCES.values(), 1)]
    lines += ['', TABLE_END]
    return '\n'.join(lines)


def plot_figures(records, results_dir):
    """results/NAME/knn-vs-epoch.png and knn-vs-wallclock.png: every method's kNN curve."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    written = []
    for name in sorted({r['name'] for r in records}):
        group = sorted((r for r in records if r['name'] == name), key=lambda r: METHODS.index(r['method']))
        for filename, x_of, xlabel in (('knn-vs-epoch.png', lambda p: p['epoch'], 'epoch'),
                                       ('knn-vs-wallclock.png', lambda p: p['train_seconds'] / 60,
                                        'training wall-clock (min; kNN passes excluded)')):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for r in group:
                points = [p for p in r['knn_curve'] if p.get('train_seconds') is not None]
                ax.plot([x_of(p) for p in points], [p['knn_top1'] for p in points], marker='o', markersize=3,
                        label=f"{r['label']} ({r['knn_top1']:.1f})")
            ax.set(xlabel=xlabel, ylabel=f'kNN top-1 (%), k={KNN_K}, T={KNN_T}', title=f'{name}: kNN top-1')
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            written.append(save_figure(fig, os.path.join(results_dir, name, filename)))
    return written


def save_figure(fig, path):
    """Write a matplotlib figure to `path` as PNG, whole or not at all (tmp + rename); returns the path."""
    import matplotlib.pyplot as plt
    tmp = path + '.tmp'
    fig.savefig(tmp, dpi=100, format='png')
    plt.close(fig)
    os.replace(tmp, path)
    return path


def replace_block(path, start_marker, end_marker, block, what):
    """Put `block` (which starts and ends with the markers) in place of the lines from start_marker to end_marker
    in `path`. The markers are whole lines (a page may name them in its prose). A missing file or missing markers
    leave the file as it is, with a note saying what to add."""
    if not os.path.isfile(path):
        print(f'note: {path} does not exist; {what} not written (create it with the lines {start_marker} and '
              f'{end_marker} where it goes)')
        return
    with open(path) as f:
        text = f.read()
    start = next((m.start() for m in re.finditer(f'^{re.escape(start_marker)}$', text, re.M)), -1)
    end = next((m.start() for m in re.finditer(f'^{re.escape(end_marker)}$', text, re.M) if m.start() > start), -1)
    if start < 0 or end < start:
        print(f'note: {path} has no {start_marker} ... {end_marker} lines; {what} not written (add these two '
              'lines where it goes)')
        return
    updated = text[:start] + block + text[end + len(end_marker):]
    if updated != text:
        tmp = path + '.tmp'
        with open(tmp, 'w') as f:
            f.write(updated)
        os.replace(tmp, path)
    print(f'{path}: {what}' + ('' if updated != text else ' (unchanged)'))


def report(args):
    """Render the GPU table and the CPU benchmark into the results page (--page) and the CPU benchmark's one-line
    summary into the README, each between its markers; the figures beside the records. A file without its
    markers is left as it is, with a note."""
    records = [r for r in load_records(args.results) if args.name in (None, r['name'])]
    gpu = [r for r in records if r.get('preset') != 'cpu']
    cpu = [r for r in records if r.get('preset') == 'cpu']
    page_dir = os.path.dirname(os.path.abspath(args.page))
    for path in plot_figures(gpu, args.results) + plot_cpu(cpu, args.results):
        print(f'wrote {path}')
    replace_block(args.page, TABLE_START, TABLE_END, render_table(gpu, page_dir, os.path.abspath(args.results)),
                  f'GPU benchmark table of {len(gpu)} record(s) from {args.results}/')
    replace_block(args.page, CPU_START, CPU_END, render_cpu(cpu, page_dir, os.path.abspath(args.results)),
                  f'CPU benchmark of {len(cpu)} record(s) from {args.results}/')
    readme_dir = os.path.dirname(os.path.abspath(args.readme))
    replace_block(args.readme, SUMMARY_START, SUMMARY_END,
                  '\n'.join([SUMMARY_START, cpu_summary(cpu, readme_dir, os.path.abspath(args.page)), SUMMARY_END]),
                  'CPU benchmark summary line')


# -----------------------------------------------------------------------------
# Report of the CPU benchmark: its table, settings, figure and summary line
# -----------------------------------------------------------------------------
DOC_WIDTH = 110  # the docs' line limit
CPU_TARGET_GAIN, CPU_TARGET_BEST = 10.0, 60.0  # issue 22: every method +10 over untrained; the best at 60%
# Where a measured row falls short of a target: what was tried and what it showed (rendered below the table; a
# test holds that every short row has its note and no row that meets the target keeps one). 'best': the 60% one.
CPU_SHORTFALLS = {
    'instdisc': "trained at its CPU recipe (the preset's exact softmax over the 50,000 memory-bank entries, T 0.1, "
                'bank momentum 0.5; lr 0.06 per 256, its steps moved to epochs 3 and 4) for 4 epochs, 9.3 minutes: kNN '
                '28.2 / 19.9 / 25.9 / 27.0 by epoch, below the untrained network. Its loss stayed above ln N = 10.8 '
                '(the uniform guess) in every epoch: the bank starts as random vectors (the authors\' initialisation) '
                "and takes each image's feature once per epoch, half-mixed with the old entry, so in the first "
                'epochs the positives the network is pulled to are still partly noise; the paper trains 200 epochs. '
                'Tried (the tries below): T 0.5 for 2 epochs, 31.8 / 30.3. It keeps the common 4 epochs (one view '
                'costs half of two, but only a method whose views cost more trains fewer)',
    'moco': "trained at its CPU recipe (the preset's symmetric loss, queue of 4096 keys, key momentum 0.99, T 0.1, "
            'lr 0.06 per 256) for 3 epochs, the most that fit 20 minutes at its speed: kNN 34.5 / 38.1 / 37.4 by '
            'epoch. Tried for one epoch each (the tries below): lr 0.5 per 256 (31.6) and T 0.5 (34.2), neither '
            "above this row's first epoch",
    'byol': "trained at its small-image preset (SGD, lr 0.12 per 256, tau from 0.99). The one other setting tried, "
            'lr 1.0 with tau from 0.9 (try byol-lr1.0-tau0.9-e1of4), ended its first epoch below the first epoch '
            "of the row, with the collapse indicator `output_std` dipping on the way: BYOL's lr, which lifted "
            "SimSiam's row above the target (SimSiam's tries), has not been found for BYOL between the two",
    'swav': 'trained at its CPU recipe, two 32-px crops for 4 epochs: kNN 36.0 / 37.8 / 39.2 / 39.3 by epoch, while '
            'the swapped-prediction loss fell from near ln K = 8.0 (3000 prototypes) to 7.35. Tried: the multi-crop '
            'recipe (2 x 32 + 6 x 16 px) for 2 epochs, the earlier row (commit 20c1e74): 32.9 / 33.5, in 13.7 minutes',
    'dino': 'trained at its CPU recipe (multi-crop, 2 epochs, BatchNorm in the head, last layer without weight '
            "normalisation). The teacher's entropy rose from 7.1 to 8.0 within the first 50 steps and to 8.22 in the "
            'second epoch (teacher temperature 0.07 after 0.04), near ln K = 8.32 (an output nearly uniform over the '
            '4096 dimensions), with the loss near ln K throughout: centering outweighed sharpening, and the features '
            'moved little past the first epoch. Tried (the tries below), one epoch of two 32-px crops: '
            "without the head's options the entropy reached ln K within 20 steps (28.0, below the untrained network); "
            'with them 33.7, below this row',
    'best': "the best row's kNN rose after every epoch (its curve): on this CPU the 20 minutes buy 4 epochs of two "
            '32-px views of the width-16 ResNet-18, and no method reached 60% within them. Tried for SimCLR (the '
            'tries below), each within the budget: half the width (8) for 8 epochs, 14.4 minutes of training: 48.0; '
            'batch 128 for 4 epochs, 13.9 minutes: 47.8; about one point above the row, twelve short of 60%',
}


def cpu_groups(records):
    """{name: {method or BASELINE: record}} of the CPU benchmark's records."""
    groups = {}
    for r in records:
        groups.setdefault(r['name'], {})[r['method']] = r
    return groups


def minutes(seconds):
    return f'{seconds / 60:.1f}'


def cpu_row(method, r, untrained):
    """One row of the CPU table."""
    label = 'untrained' if method == BASELINE else LABELS[method]
    if r is None:
        return [label, '', 'owed'] + [''] * 7
    gain = ''
    if method != BASELINE and untrained is not None:
        delta = r['knn_top1'] - untrained['knn_top1']
        gain = f'{signed(delta)} (' + ('met' if delta >= CPU_TARGET_GAIN else f'short by {CPU_TARGET_GAIN - delta:.1f}') + ')'
    linear = f"{r['linear_top1']:.2f}" if r.get('linear_top1') is not None else ''
    if method == BASELINE:
        return [label, '0', f"**{r['knn_top1']:.2f}**", '', linear, '', '', '', '', r['recorded_at'][:10]]
    cpu = r.get('train_cpu_seconds')
    busy = f"{minutes(cpu)} ({cpu / max(r['train_seconds'], 1e-9):.2f} of {r['threads']})" if cpu is not None else ''
    curve = ' / '.join(f"{p['knn_top1']:.1f}" for p in r['knn_curve'])
    return [label, str(r['epochs']), f"**{r['knn_top1']:.2f}**", gain, linear, curve, minutes(r['train_seconds']),
            busy, f"{r['images_per_s']:,.0f}", r['recorded_at'][:10]]


def variant_of(name):
    """(table name, 'seed S' or 'rerun') of a --seed / --rerun table's name (NAME-seedS, NAME-rerun); else None."""
    found = re.fullmatch(r'(.+)-(?:seed(\d+)|(rerun))', name)
    return None if not found else (found[1], f'seed {found[2]}' if found[2] else 'rerun')


def seeds_table(name, groups):
    """The rows trained with other seeds (--seed S: NAME-seedS) beside this table's: kNN and gain per seed."""
    seeds = {int(variant_of(n)[1].split()[1]): g for n, g in groups.items()
             if variant_of(n) and variant_of(n)[0] == name and variant_of(n)[1] != 'rerun'}
    if not seeds:
        return []
    seeds[int(flag_value(next(iter(groups[name].values()))['settings'], '--seed', '0'))
          if groups[name] else 0] = groups[name]
    order = sorted(seeds)
    methods = [m for m in METHODS if sum(m in seeds[s] for s in order) > 1]
    lines = wrap("Spread over seeds: the same settings with another seed (`python tools/benchmark.py --preset cpu "
                 "--data D --seed S --methods ...`), each beside the untrained network of its own seed; kNN top-1 "
                 "after the final epoch and its gain, and the range over the seeds:") + ['']
    lines += ['| method | ' + ' | '.join(f'seed {s}' for s in order) + ' | range |', '|---' * (len(order) + 2) + '|']
    for method in (BASELINE, *methods):
        cells, values = [], []
        for s in order:
            r, untrained = seeds[s].get(method), seeds[s].get(BASELINE)
            if r is None:
                cells.append('')
                continue
            values.append(r['knn_top1'])
            gain = f" ({signed(r['knn_top1'] - untrained['knn_top1'])})" if untrained and method != BASELINE else ''
            cells.append(f"{r['knn_top1']:.2f}{gain}")
        label = 'untrained' if method == BASELINE else LABELS[method]
        spread = f'{max(values) - min(values):.2f}' if len(values) > 1 else ''
        lines.append(f'| {label} | ' + ' | '.join(cells) + f' | {spread} |')
    return lines + ['']


def rerun_table(name, groups):
    """The rows trained again (--rerun: NAME-rerun) beside the first: the kNN after every epoch, equal or not."""
    again = groups.get(f'{name}-rerun')
    if not again:
        return []
    lines = wrap('Rerun (`--rerun`): the same command again, on the same machine and thread count; the kNN top-1 '
                 'after every epoch, first run and rerun:') + ['', '| method | first run | rerun | the same |',
                                                               '|---|---|---|---|']
    for method in METHODS:
        first, second = groups[name].get(method), again.get(method)
        if not first or not second:
            continue
        curves = [[p['knn_top1'] for p in r['knn_curve']] for r in (first, second)]
        differences = [abs(a - b) for a, b in zip(*curves)]
        same = ('yes, to the last digit' if curves[0] == curves[1] else
                f'no: {max(differences):.2f} apart at most' if len(curves[0]) == len(curves[1]) else
                'no: a different number of epochs')
        lines.append(f'| {LABELS[method]} | ' + ' / '.join(f'{v:.2f}' for v in curves[0]) + ' | '
                     + ' / '.join(f'{v:.2f}' for v in curves[1]) + f' | {same} |')
    return lines + ['']


def shortfalls(by_method, untrained, best):
    """The keys of CPU_SHORTFALLS the measured rows call for: each row short of the gain, 'best' if short of 60%."""
    short = [m for m in METHODS if m in by_method and untrained is not None
             and by_method[m]['knn_top1'] - untrained['knn_top1'] < CPU_TARGET_GAIN]
    return short + (['best'] if best is not None and best['knn_top1'] < CPU_TARGET_BEST else [])


def shortfall_notes(by_method, untrained, best):
    """Below the table: for each target a measured row misses, what was tried (CPU_SHORTFALLS)."""
    keys = shortfalls(by_method, untrained, best)
    if not keys:
        return []
    lines = ['Where a row falls short of a target:', '']
    for key in keys:
        label = f"{CPU_TARGET_BEST:.0f}% for the best row" if key == 'best' else LABELS[key]
        note = CPU_SHORTFALLS.get(key, 'not explained yet: add its note to CPU_SHORTFALLS in tools/benchmark.py')
        lines += wrap(f'- **{label}**: {note}.', indent='  ')
    return lines + ['']


def settings_table():
    """The CPU preset's settings, from CPU_SETTINGS and CPU_RECIPES (the docs state what the code runs)."""
    lines = wrap(f"Every method: `{shlex.join(settings_flags())}`, `OMP_NUM_THREADS={CPU_THREADS}`, kNN after every "
                 f'epoch (k={KNN_K}, T={KNN_T}); then, per method, its epochs, the flags that replace its small-image '
                 'preset (`SMALL_IMAGE_PRESET` in the method file) and why:') + ['']
    for method in METHODS:
        epochs, flags, why = CPU_RECIPES[method]
        shown = ' '.join(word for k, v in flags.items() for word in switch_or_pair(k, v))
        lines += wrap(f"- **{LABELS[method]}**, {epochs} epochs" + (f', `{shown}`' if shown else '') + f': {why}.',
                      indent='  ')
    return lines


def wrap(text, indent=''):
    """A paragraph as lines of at most DOC_WIDTH characters (the docs' limit), code spans kept whole."""
    return textwrap.wrap(text, DOC_WIDTH, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def wrap_command(command):
    """A shell command as lines of at most DOC_WIDTH characters, continued with a backslash."""
    lines, line = [], ''
    for word in shlex.split(command):
        word = shlex.quote(word)
        if line and len(line) + 1 + len(word) > DOC_WIDTH - 2:
            lines.append(line + ' \\')
            line = '    ' + word
        else:
            line = f'{line} {word}' if line else word
    return lines + [line]


def render_cpu(records, page_dir, results_dir):
    """The Markdown block between the CPU markers of the results page."""
    lines = [CPU_START, '<!-- written by `python tools/benchmark.py --report` from the records in '
             f'{os.path.relpath(results_dir, page_dir)}/', 'and CPU_SETTINGS / CPU_RECIPES in tools/benchmark.py; '
             'edit those, not this block -->', '']
    groups = cpu_groups(records) or {CPU_NAME: {}}
    for name, by_method in sorted(groups.items()):
        if variant_of(name) and variant_of(name)[0] in groups:
            continue  # another seed or a rerun: shown in its table's section
        untrained = by_method.get(BASELINE)
        trained = [r for m, r in by_method.items() if m != BASELINE]
        example = next(iter(by_method.values()), None)
        if example:
            machines = sorted({f"{r['cpu_model']}, {r['cores']} cores, {r['threads']} thread"
                               + ('s' if r['threads'] != 1 else '') for r in by_method.values()})
            dates = sorted(r['recorded_at'][:10] for r in by_method.values())
            lines += wrap(f"**{name}**: self-supervised training on `{example['benchmark']['data']}` "
                      f"({example['dataset']['num_train']:,} training and {example['dataset']['num_test']:,} test "
                      f'images) on {"; ".join(machines)}, recorded {dates[0]} to {dates[-1]}. kNN top-1 (%) on every '
                      f'test image after the final epoch (k={KNN_K}, T={KNN_T}), and the fast linear probe '
                      '(eval_linear.py: logistic regression on the frozen features). Untrained: the same network at its '
                      'random initialisation with the same seed, evaluated the same way. Columns: the gain over '
                      f'the untrained network (target {signed(CPU_TARGET_GAIN)}), the kNN after each epoch, the '
                      'training wall-clock and CPU time in minutes (with the cores that CPU time kept busy on '
                      'average), images/s over the training wall-clock.') + ['']
        header = ['method', 'epochs', 'kNN top-1', 'gain', 'linear', 'kNN by epoch', 'wall-clock', 'CPU time',
                  'images/s', 'recorded']
        lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        lines += ['| ' + ' | '.join(cpu_row(m, by_method.get(m), untrained)) + ' |' for m in (BASELINE,) + METHODS]
        lines.append('')
        if trained:
            best = max(trained, key=lambda r: r['knn_top1'])
            verdict = 'met' if best['knn_top1'] >= CPU_TARGET_BEST else \
                f"short by {CPU_TARGET_BEST - best['knn_top1']:.1f}"
            slowest = max(trained, key=lambda r: r['train_seconds'])
            loads = [r['load_average'] for r in trained if r.get('load_average') is not None]
            lines += wrap(f"Best: {best['label']}, {best['knn_top1']:.2f}% (target {CPU_TARGET_BEST:.0f}%: {verdict}). "
                          f"Longest training: {slowest['label']}, {minutes(slowest['train_seconds'])} min "
                          f'(budget {CPU_BUDGET_MINUTES} min).') + ['']
            lines += shortfall_notes(by_method, untrained, best)
            lines += seeds_table(name, groups) + rerun_table(name, groups)
            figure = os.path.relpath(os.path.join(results_dir, name, 'knn-vs-minutes.png'), page_dir)
            lines += [f'![kNN top-1 against training minutes]({figure})', '']
            lines += wrap("How the time is measured: training wall-clock is the sum of the epochs' loading and training "
                      'time (kNN passes, checkpoints and start-up excluded); CPU time is the user + sys time of the '
                      'training process and its workers over the same epochs. A run that had its threads to itself '
                      'keeps them busy (CPU time / wall-clock near the thread count); less means it waited for other '
                      'processes. '
                      + load_note(trained, loads)) + ['']
        owed = [m for m in (BASELINE,) + RUN_ORDER if m not in by_method]
        data = example['benchmark']['data'] if example else '/path/to/cifar10'
        lines += wrap('The whole table, on any CPU, resuming where it stopped (CIFAR-10 as JPEG class folders '
                      '`train/<class>/*.jpg`, `test/<class>/*.jpg`):') + ['', '```bash',
                  f'python tools/benchmark.py --preset cpu --data {data}',
                  f'python tools/benchmark.py --preset cpu --data {data} --methods simclr   # one row',
                  f'python tools/benchmark.py --preset cpu --data {data} --methods simclr --seed 1   # another seed',
                  f'python tools/benchmark.py --preset cpu --data {data} --methods simclr --rerun    # the row again',
                  'python tools/benchmark.py --report                                      # this page', '```', '']
        if owed:
            lines += [f"Owed rows: {', '.join(owed)}.", '']
        lines += settings_table() + ['']
        lines += speed_tables(os.path.join(results_dir, name, 'speed.jsonl'))
        lines += tries_table(os.path.join(results_dir, name, 'tries.jsonl'))
        if trained:
            lines += ["Each row's method-file command (from its record):", '', '```bash']
            for command in [by_method[m]['command'] for m in METHODS if m in by_method] + \
                    ([untrained['command'], untrained['linear_command']] if untrained else []):
                lines += wrap_command(command)
            lines += ['```', '']
    lines.append(CPU_END)
    return '\n'.join(lines)


def speed_tables(path):
    """The images/s of --speed (RESULTS/NAME/speed.jsonl): both input paths of every method, and SimCLR's options."""
    rows = [r for r in common.read_metrics(path) if r.get('images_per_s')]
    failed = [r for r in common.read_metrics(path) if not r.get('images_per_s')]
    if not rows and not failed:
        return []

    def cell(method, variant):
        rates = sorted(r['images_per_s'] for r in rows if (r['method'], r['variant']) == (method, variant))
        if not rates:
            return '', None
        median = rates[len(rates) // 2] if len(rates) % 2 else sum(rates[len(rates) // 2 - 1:len(rates) // 2 + 1]) / 2
        rounds = f"{len(rates)} round{'' if len(rates) == 1 else 's'}"
        return f'{median:,.0f} ({rates[0]:,.0f}-{rates[-1]:,.0f}, {rounds})', median

    example = (rows or failed)[0]
    loads = [r['load_average'] for r in rows + failed]
    lines = wrap(f"Speed of whole training steps (`--speed`), images/s: each run trains 2 epochs of {SPEED_IMAGES:,} "
             'training images with the settings above plus the variant\'s flags, and its second epoch is timed; every '
             'round runs every variant once, one after the other, so that the machine\'s load falls on all alike. '
             f"Median (range, rounds). {example['cpu_model']}, {example['cores']} cores; the machine's 1-minute load "
             f'average during these runs: {min(loads):.1f} to {max(loads):.1f}.') + ['',
             '| method | device path (`--augment device`) | cpu path (`--augment cpu`) | cpu / device |',
             '|---|---|---|---|']
    for method in METHODS:
        device, cpu = cell(method, 'device'), cell(method, 'cpu')
        if device[1] or cpu[1]:
            ratio = f'{cpu[1] / device[1]:.2f}' if device[1] and cpu[1] else ''
            lines.append(f'| {LABELS[method]} | {device[0]} | {cpu[0]} | {ratio} |')
    base = cell('simclr', 'device')
    options = [(v, cell('simclr', v)) for v in CPU_SPEED_OPTIONS]
    if base[1] and any(c[1] for _, c in options):
        lines += ['', '| SimCLR, the preset with | images/s | against the preset |', '|---|---|---|',
                  f'| nothing (the preset) | {base[0]} | 1.00 |']
        lines += [f"| {v} | {c[0]} | {c[1] / base[1]:.2f} |" for v, c in options if c[1]]
    peers = [(w, cell('simclr', peer_variant(w))) for w in PEER_WORKERS]
    peers = [(w, c) for w, c in peers if c[1]]
    ours = [(v, cell('simclr', v)) for v in ('device', 'cpu') if cell('simclr', v)[1]]
    if peers and ours:
        fastest_peer = max(c[1] for _, c in peers)
        fastest = max(c[1] for _, c in ours)
        lines += [''] + wrap("Against the peer, Lightly's SimCLR (tools/peer_lightly.py: its SimCLRTransform in "
                             'DataLoader workers, projection head and NT-Xent loss, this network, batch and lr), in the '
                             "same rounds; each against the peer's fastest:") + [
                  '', '| SimCLR | images/s | against the fastest peer |', '|---|---|---|']
        lines += [f'| simclr.py, {v} path | {c[0]} | {c[1] / fastest_peer:.2f} |' for v, c in ours]
        first = cell('simclr', 'channels-first')  # the peer's loop keeps PyTorch's default memory format
        if first[1]:
            lines.append(f'| simclr.py, device path, channels-first (as the peer) | {first[0]} | '
                         f'{first[1] / fastest_peer:.2f} |')
        lines += [f'| {peer_variant(w)} | {c[0]} | {c[1] / fastest_peer:.2f} |' for w, c in peers]
        lines += [''] + wrap(f"simclr.py's faster path against the peer's fastest: {fastest / fastest_peer:.2f} "
                             f"(target 1.00: {'met' if fastest >= fastest_peer else 'short'}).")
    for r in failed:
        label = LABELS[r['method']] if r['method'] in LABELS else r['method']
        lines += [''] + wrap(f"{label}, {r['variant']}, round {r['round']}: failed ({r['error']})")
    return lines + ['']


def load_note(trained, loads):
    """What the machine's load average says about the rows' wall-clock: a run's own threads load it by their
    number; more than half a thread beyond that, on some run, means other processes took CPU time from it."""
    if not loads:
        return ''
    threads = max(r.get('threads') or 1 for r in trained)
    where = f'{min(loads):.1f} to {max(loads):.1f} on {trained[0]["cores"]} cores'
    busy = [r['label'] for r in trained if (r.get('load_average') or 0) > (r.get('threads') or 1) + 0.5]
    if busy:
        return (f"{', '.join(busy)} shared the machine with other work (the 1-minute load average while the rows "
                f"trained: {where}), so {'their' if len(busy) > 1 else 'its'} wall-clock minutes are longer than "
                'on an idle machine.')
    return (f'The 1-minute load average while the rows trained was {where}: their own {threads} threads, nothing '
            'else of note.')


def tries_table(path):
    """The short runs that chose the settings (RESULTS/NAME/tries.jsonl: one line per run, with its command)."""
    tries = common.read_metrics(path)
    if not tries:
        return []
    lines = wrap('What was tried to choose the settings (short runs, each on the data its command names: a subset '
                 'of the training and test images, or all of them; `tries.jsonl`, written by tools/record_try.py, '
                 'the commands below the table): images/s of the last epoch, its wall-clock and CPU time, the kNN '
                 "after each epoch, and how busy the machine was: its load average, or the CPU seconds other processes "
                 'used during the try (0: otherwise idle).') + [
        '', '| try | images/s | epoch wall-clock / CPU time (s) | kNN top-1 | load / others\' CPU s | recorded |',
        '|---|---|---|---|---|---|']
    for t in tries:
        epoch = (t.get('epochs') or [{}])[-1]
        rate = f"{epoch['epoch_images_per_s']:,.1f}" if 'epoch_images_per_s' in epoch else f"exit {t['exit_code']}"
        times = f"{epoch['epoch_seconds']:.0f} / {epoch['epoch_cpu_seconds']:.0f}" if 'epoch_cpu_seconds' in epoch else ''
        load = (f"{t['load_average']:.1f}" if t.get('load_average') is not None else
                f"{t['others_cpu_seconds']:.0f} s" if t.get('others_cpu_seconds') is not None else '')
        top1 = ' / '.join(f"{k['knn_top1']:.2f}" for k in t.get('knn') or [] if 'knn_top1' in k)  # each epoch
        lines.append(f"| {t['tag']} | {rate} | {times} | {top1} | {load} | {t['recorded_at'][:16]} |")
    lines += ['', '```bash']
    for t in tries:
        lines += [f"# {t['tag']}"] + wrap_command(t['command'])
    return lines + ['```', '']


def cpu_summary(records, readme_dir, page):
    """The README's one line on the CPU benchmark."""
    link = os.path.relpath(page, readme_dir)
    by_method = cpu_groups(records).get(CPU_NAME) or next(iter(cpu_groups(records).values()), {})
    trained = [r for m, r in by_method.items() if m != BASELINE]
    if not trained:
        return f'CPU benchmark (all eight methods on CIFAR-10, 2-core CPU): not yet measured; see [results]({link}).'
    best = max(trained, key=lambda r: r['knn_top1'])
    untrained = by_method.get(BASELINE)
    return (f"CPU benchmark ({len(trained)} of 8 methods on CIFAR-10, ResNet-18 at width "
            f"{best['args'].get('width')}, at most {CPU_BUDGET_MINUTES} min of training each on a "
            f"{best['cores']}-core CPU): best {best['label']} {best['knn_top1']:.1f}% kNN top-1"
            + (f", untrained {untrained['knn_top1']:.1f}%" if untrained else '') + f'; see [results]({link}).')


def plot_cpu(records, results_dir):
    """results/NAME/knn-vs-minutes.png: kNN top-1 against training wall-clock, every method and the untrained
    network (a dashed line)."""
    if not records:
        return []
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    written = []
    groups = cpu_groups(records)
    for name, by_method in sorted(groups.items()):
        if variant_of(name) and variant_of(name)[0] in groups:
            continue  # drawn in its table's section, not as a figure of its own
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in METHODS:
            r = by_method.get(method)
            if r:
                points = [p for p in r['knn_curve'] if p.get('train_seconds') is not None]
                ax.plot([p['train_seconds'] / 60 for p in points], [p['knn_top1'] for p in points], marker='o',
                        markersize=3, label=f"{r['label']} ({r['knn_top1']:.1f})")
        if BASELINE in by_method:
            ax.axhline(by_method[BASELINE]['knn_top1'], color='gray', linestyle='--',
                       label=f"untrained ({by_method[BASELINE]['knn_top1']:.1f})")
        ax.set(xlabel='training wall-clock (min; kNN passes excluded)', ylabel=f'kNN top-1 (%), k={KNN_K}, T={KNN_T}',
               title=f'{name}: kNN top-1 against training minutes')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save_figure(fig, os.path.join(results_dir, name, 'knn-vs-minutes.png')))
    return written


def main():
    args, extra = parse_args()
    common.LAST_CHECKPOINT['note'] = 'The runs keep their last checkpoints; the same command goes on from them.'
    if args.report:
        return report(args)
    if args.dry_run:
        return dry_run(args, extra)
    if args.speed:
        return speed(args, extra)
    code = train(args, extra)
    if code:
        sys.exit(code)


if __name__ == '__main__':
    common.run(main)
