"""Does the method the student wrote learn? Each "write the method" assignment's payoff run, measured.

Where an assignment has the student write a method's core (NT-Xent, the MoCo queue, InstDisc's memory bank),
its README ends with a run that shows what the code buys: the method file trained for 600 steps on the
procedural textures (about half a CPU minute), then its features scored twice, each beside the same network
untrained (the one the run started from: same architecture, same seed):

  kNN:                eval_knn.py CKPT --k 20 --temperature 0.1 --compare-random-init
  fast linear probe:  eval_linear.py CKPT --labels-per-class 1 10 all --compare-random-init --plot probe.png

This script runs those commands on the reference solution, in a temporary copy of the repository (nothing here
changes), appends one record per run (the commands, the numbers, wall-clock and CPU time, CPU model, threads,
torch) to results/assignments/payoff.jsonl (seed 0's probe picture to assignments/<name>/probe.png), and
renders each README's block (the commands, the measured table and the picture) from the records:

  python assignments/payoff.py simclr-nt-xent moco-queue --seeds 0 1 2     # measure
  python assignments/payoff.py --report                                     # render the READMEs' blocks
"""
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # not this folder: its conftest.py would hide the test suite's from other imports
    sys.path.insert(0, REPO)
import common  # noqa: E402 (after the path): its one-line argparse errors



def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


thresholds = _load('assignments_measure', os.path.join(HERE, 'measure.py'))  # the reference solution in a copy
benchmark = _load('tools_benchmark', os.path.join(REPO, 'tools', 'benchmark.py'))  # the CPU benchmark's recipes
RECORDS = os.path.join(REPO, 'results', 'assignments', 'payoff.jsonl')
MARKERS = {'textures': ('<!-- payoff:start -->', '<!-- payoff:end -->'),
           'cifar10': ('<!-- payoff-cifar10:start -->', '<!-- payoff-cifar10:end -->')}

# The learning tests' settings (tests/conftest.py LEARN and each test module's LEARNING): 600 steps of batch 32
# on 960 textures at 16 px, with the margins over the untrained network measured for 5 seeds at 1 and 2 threads
# (docs/results.md, "learning tests").
COMMON = ['--data', 'procedural:960', '--arch', 'resnet18', '--width', '8', '--image-size', '16', '--workers', '0',
          '--epochs', '20', '--batch-size', '32', '--augment', 'device', '--knn-every', '0', '--knn-k', '20',
          '--knn-t', '0.1']
RUNS = {  # assignment: (method file, its flags beyond COMMON, the run's folder in the README)
    'simclr-nt-xent': ('simclr.py', ['--optimizer', 'sgd', '--lr', '0.5', '--min-scale', '0.3', '--proj-hidden-dim',
                                     '128', '--warmup-epochs', '1'], 'runs/ntxent-600'),
    'moco-queue': ('moco.py', ['--min-scale', '0.3', '--lr', '0.5', '--queue-size', '256', '--key-momentum', '0.99',
                               '--temperature', '0.5', '--no-symmetric'], 'runs/queue-600'),
    'instdisc-memory-bank': ('instdisc.py', ['--min-scale', '0.3', '--lr', '0.25', '--temperature', '0.5'],
                             'runs/bank-600'),
}

# On photographs (optional): one epoch of CIFAR-10 with the CPU benchmark's settings for the method (tools/
# benchmark.py CPU_SETTINGS and CPU_RECIPES: ResNet-18 with the CIFAR stem at width 16, batch 256, no warm-up),
# scored as the benchmark scores (kNN k=200, T=0.1, all 10,000 test images) and by the fast probe.
CIFAR10 = {'simclr-nt-xent': 'runs/ntxent-cifar10', 'moco-queue': 'runs/queue-cifar10',
           'instdisc-memory-bank': 'runs/bank-cifar10'}
CIFAR10_EPOCHS = 1
CIFAR10_GAINS = {'simclr-nt-xent'}  # whose one epoch beats the untrained network (the others' READMEs say why not)
KNN = {'textures': '20', 'cifar10': '200'}  # k of each track's kNN


def train_flags(name, track, seed):
    """The training flags of an assignment's payoff run on a track (without the script and --output-dir)."""
    script, flags, _ = RUNS[name]
    if track == 'textures':
        return [*COMMON, *flags, '--seed', str(seed)]
    recipe = benchmark.cpu_flags(script.removesuffix('.py'))
    i = recipe.index('--seed')
    recipe[i + 1] = str(seed)
    return ['--data', 'cifar10', *recipe, '--epochs', str(CIFAR10_EPOCHS), '--knn-every', '-1']


def commands(name, seed, folder, track='textures'):
    """The three commands of an assignment's payoff run: [(what, argv)], relative to the repository's root."""
    script = RUNS[name][0]
    checkpoint = f'{folder}/checkpoint.pth'
    return [('train', [script, *train_flags(name, track, seed), '--output-dir', folder]),
            ('knn', ['eval_knn.py', checkpoint, '--k', KNN[track], '--temperature', '0.1', '--compare-random-init']),
            ('probe', ['eval_linear.py', checkpoint, '--labels-per-class', '1', '10', 'all', '--compare-random-init',
                       '--plot', f'{folder}/probe.png'])]


def shell(argv):
    """A command as the README shows it: `python ...`, long ones wrapped at the flags."""
    words, lines = ['python', *argv], ['']
    for word in words:
        if len(lines[-1]) + len(word) > 100 and word.startswith('--'):
            lines[-1] += ' \\'
            lines.append('    ')
        lines[-1] += ('' if lines[-1].strip() == '' else ' ') + word
    return '\n'.join(lines)


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(name, seed, threads, track='textures', cifar10=None):
    """Run the payoff commands on the reference solution; one record. cifar10: the CIFAR-10 folder that stands
    for `--data cifar10` (the record keeps both)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
    root = tempfile.mkdtemp(prefix='payoff-')
    try:
        thresholds.solution_copy(name, root)
        record = dict(assignment=name, track=track, seed=seed, threads=threads, cpu=f'{common.cpu_name()} ({os.cpu_count()} cores)',
                      torch=__import__('torch').__version__, commit=commit(), commands={}, seconds={},
                      cpu_seconds={})
        if track == 'cifar10':
            record['data'] = os.path.abspath(cifar10)
        for what, argv in commands(name, seed, 'run', track):
            json_path = os.path.join(root, f'{what}.json')
            extra = [] if what == 'train' else ['--json', json_path]
            argv_run = on_folder(argv, cifar10) if track == 'cifar10' and what == 'train' else argv
            started, cpu_started = time.time(), children_cpu()
            done = subprocess.run([sys.executable, *argv_run, *extra], cwd=root, env=env, capture_output=True,
                                  text=True)
            if done.returncode:
                raise SystemExit(f'error: {" ".join(argv)} exited {done.returncode}: '
                                 f'{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""}')
            record['commands'][what] = argv
            record['seconds'][what] = round(time.time() - started, 1)
            record['cpu_seconds'][what] = round(children_cpu() - cpu_started, 1)
            if what == 'knn':
                knn = json.load(open(json_path))
                record.update(knn_trained=knn['results'][KNN[track]]['top1'],
                              knn_untrained=knn['untrained_results'][KNN[track]]['top1'])
            elif what == 'probe':
                curves = json.load(open(json_path))['label_efficiency']
                top1 = {network: next(p['top1'] for p in points if p['labels_per_class'] == 'all')
                        for network, points in curves.items()}
                record.update(probe_untrained=top1.pop('untrained (same seed)'), probe_trained=top1.popitem()[1])
        if seed == 0:
            shutil.copy(os.path.join(root, 'run', 'probe.png'),
                        os.path.join(HERE, name, 'probe.png' if track == 'textures' else f'probe-{track}.png'))
        record['recorded_at'] = time.strftime('%Y-%m-%dT%H:%M:%S%z')
        return record
    finally:
        shutil.rmtree(root, ignore_errors=True)


def on_folder(argv, folder):
    """A command with `--data cifar10` pointing at the CIFAR-10 folder given with --cifar10 (runs.py too)."""
    return [folder if a == 'cifar10' and i and argv[i - 1] == '--data' else a for i, a in enumerate(argv)]


def commit():
    done = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or None


def read_records(path=RECORDS):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def block(name, records, track='textures'):
    """The README's payoff block of a track: the commands (seed 0) and the table of the records made with them."""
    folder = RUNS[name][2] if track == 'textures' else CIFAR10[name]
    mine = sorted((r for r in records if r['assignment'] == name and r.get('track', 'textures') == track
                   and all(r['commands'].get(w) == argv for w, argv in commands(name, r['seed'], 'run', track))),
                  key=lambda r: (r['threads'], r['seed']))
    lines = ['```bash'] + [shell(argv) for _, argv in commands(name, 0, folder, track)] + ['```', '']
    option = '' if track == 'textures' else f' --track {track} --cifar10 FOLDER'
    if not mine:
        return '\n'.join(lines + [f'Not measured yet: `python assignments/payoff.py {name}{option}`.'])
    lines += [f'| seed | threads | kNN top-1 (k={KNN[track]}): trained | untrained | gain | linear probe top-1: trained | '
              'untrained | gain | training: wall-clock, CPU time |', '|---|---|---|---|---|---|---|---|---|']
    for r in mine:
        lines.append(f"| {r['seed']} | {r['threads']} | {r['knn_trained']:.1f} | {r['knn_untrained']:.1f} | "
                     f"**{r['knn_trained'] - r['knn_untrained']:+.1f}** | {r['probe_trained']:.1f} | "
                     f"{r['probe_untrained']:.1f} | **{r['probe_trained'] - r['probe_untrained']:+.1f}** | "
                     f"{r['seconds']['train']:.0f} s, {r['cpu_seconds']['train']:.0f} s |")
    evals = max(r['seconds']['knn'] + r['seconds']['probe'] for r in mine)
    data = ('' if track == 'textures' else ', on the CIFAR-10 images stored as JPEG folders (`--data FOLDER` in '
            "place of `--data cifar10`: JPEG costs a little accuracy against torchvision's download)")
    lines += ['', f"Measured with the reference solution on {'; '.join(sorted({r['cpu'] for r in mine}))}, torch "
                  f"{', '.join(sorted({r['torch'] for r in mine}))}{data} (`python assignments/payoff.py {name}"
                  f"{option}`, records in `results/assignments/payoff.jsonl`); the two evaluations took {evals:.0f} s "
                  'at most. Chance is 10%.']
    picture = 'probe.png' if track == 'textures' else f'probe-{track}.png'
    if os.path.exists(os.path.join(HERE, name, picture)):
        lines += ['', '![the fast linear probe of the trained and the untrained network, against labels per class]'
                      f'({picture})', '', 'The probe of seed 0 fitted on 1, 10 and all labelled images per class (the '
                      'picture the last command draws).']
    return '\n'.join(lines)


def rendered(readme, name, records, tracks=('textures',)):
    """The README's text with the payoff blocks of `tracks` replaced (None if one has no markers)."""
    for track in tracks:
        start_marker, end_marker = MARKERS[track]
        start = re.search(f'^{re.escape(start_marker)}$', readme, re.M)
        end = re.search(f'^{re.escape(end_marker)}$', readme, re.M)
        if not start or not end or end.start() < start.start():
            return None
        readme = (readme[:start.start()] + start_marker + '\n<!-- written by `python assignments/payoff.py --report` '
                  'from results/assignments/payoff.jsonl -->\n' + block(name, records, track) + '\n' +
                  readme[end.start():])
    return readme


def tracks_of(name):
    return ('textures', 'cifar10') if name in CIFAR10 else ('textures',)


def report(records):
    for name in RUNS:
        path = os.path.join(HERE, name, 'README.md')
        text = rendered(open(path).read(), name, records, tracks_of(name))
        if text is None:
            raise SystemExit(f'error: {path} lacks a block of ' + ' or '.join(MARKERS[t][0] for t in tracks_of(name)))
        write_atomically(path, text)
        print(f'{path}: payoff blocks rendered')


def write_atomically(path, text):
    """A README rewritten whole or not at all (runs.py renders its blocks with it too)."""
    with open(path + '.tmp', 'w') as f:
        f.write(text)
    os.replace(path + '.tmp', path)


def check_names(parser, args, known):
    """Refuse, in one line, an assignment name not in `known`, or neither a name nor --report (runs.py too)."""
    unknown = [n for n in args.names if n not in known]
    if unknown or not (args.names or args.report):
        parser.error(f'name one or more of {", ".join(known)} (not {" ".join(unknown)})' if unknown
                     else 'name an assignment to measure, or --report')


def check_cifar10(parser, args, known):
    """Refuse, in one line, --track cifar10 without a CIFAR-10 folder, or for a name without that track."""
    if not args.cifar10 or not all(os.path.isdir(os.path.join(args.cifar10, s)) for s in ('train', 'test')):
        parser.error('--track cifar10 needs --cifar10 FOLDER, a folder with train/ and test/ (CIFAR-10 as images)')
    if any(n not in known for n in args.names):
        parser.error(f'--track cifar10 is for {", ".join(known)}')


def main():
    parser = common.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('names', nargs='*', metavar='ASSIGNMENT', help=f'any of {", ".join(RUNS)}')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--threads', type=int, nargs='+', default=[2])
    parser.add_argument('--track', choices=list(MARKERS), default='textures',
                        help='textures: 600 steps on the procedural textures; cifar10: one epoch of CIFAR-10')
    parser.add_argument('--cifar10', metavar='FOLDER', default=None,
                        help='with --track cifar10: the CIFAR-10 folder (train/ and test/) standing for `--data cifar10`')
    parser.add_argument('--report', action='store_true', help="render the READMEs' payoff blocks and exit")
    args = parser.parse_args()
    check_names(parser, args, RUNS)
    if any(s < 0 for s in args.seeds) or any(t < 1 for t in args.threads):
        parser.error('--seeds must be >= 0 and --threads >= 1')
    if args.track == 'cifar10' and not args.report:
        check_cifar10(parser, args, CIFAR10)
    if args.report:
        report(read_records())
        return
    os.makedirs(os.path.dirname(RECORDS), exist_ok=True)
    for name in args.names:
        for threads in args.threads:
            for seed in args.seeds:
                record = measure(name, seed, threads, args.track, args.cifar10)
                with open(RECORDS, 'a') as f:
                    f.write(json.dumps(record) + '\n')
                print(f"{name} seed {seed}, {threads} thread(s): kNN {record['knn_trained']:.1f} vs "
                      f"{record['knn_untrained']:.1f} untrained, probe {record['probe_trained']:.1f} vs "
                      f"{record['probe_untrained']:.1f} ({record['seconds']['train']:.0f} s of training)", flush=True)


if __name__ == '__main__':
    main()
