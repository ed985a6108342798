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
import platform
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

_spec = importlib.util.spec_from_file_location('assignments_measure', os.path.join(HERE, 'measure.py'))
thresholds = importlib.util.module_from_spec(_spec)  # assignments/measure.py: the reference solution in a copy
_spec.loader.exec_module(thresholds)
RECORDS = os.path.join(REPO, 'results', 'assignments', 'payoff.jsonl')
START, END = '<!-- payoff:start -->', '<!-- payoff:end -->'

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


def commands(name, seed, folder):
    """The three commands of an assignment's payoff run: [(what, argv)], relative to the repository's root."""
    script, flags, _ = RUNS[name]
    checkpoint = f'{folder}/checkpoint.pth'
    return [('train', [script, *COMMON, *flags, '--seed', str(seed), '--output-dir', folder]),
            ('knn', ['eval_knn.py', checkpoint, '--k', '20', '--temperature', '0.1', '--compare-random-init']),
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


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(name, seed, threads):
    """Run the payoff commands on the reference solution; one record."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
    root = tempfile.mkdtemp(prefix='payoff-')
    try:
        thresholds.solution_copy(name, root)
        record = dict(assignment=name, seed=seed, threads=threads, cpu=f'{cpu_name()} ({os.cpu_count()} cores)',
                      torch=__import__('torch').__version__, commit=commit(), commands={}, seconds={},
                      cpu_seconds={})
        for what, argv in commands(name, seed, 'run'):
            json_path = os.path.join(root, f'{what}.json')
            extra = [] if what == 'train' else ['--json', json_path]
            started, cpu_started = time.time(), children_cpu()
            done = subprocess.run([sys.executable, *argv, *extra], cwd=root, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f'error: {" ".join(argv)} exited {done.returncode}: '
                                 f'{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""}')
            record['commands'][what] = argv
            record['seconds'][what] = round(time.time() - started, 1)
            record['cpu_seconds'][what] = round(children_cpu() - cpu_started, 1)
            if what == 'knn':
                knn = json.load(open(json_path))
                record.update(knn_trained=knn['results']['20']['top1'],
                              knn_untrained=knn['untrained_results']['20']['top1'])
            elif what == 'probe':
                curves = json.load(open(json_path))['label_efficiency']
                top1 = {network: next(p['top1'] for p in points if p['labels_per_class'] == 'all')
                        for network, points in curves.items()}
                record.update(probe_untrained=top1.pop('untrained (same seed)'), probe_trained=top1.popitem()[1])
        if seed == 0:
            shutil.copy(os.path.join(root, 'run', 'probe.png'), os.path.join(HERE, name, 'probe.png'))
        record['recorded_at'] = time.strftime('%Y-%m-%dT%H:%M:%S%z')
        return record
    finally:
        shutil.rmtree(root, ignore_errors=True)


def commit():
    done = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or None


def read_records(path=RECORDS):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def block(name, records):
    """The README's payoff block: the commands (seed 0) and the table of the records made with them."""
    _, _, folder = RUNS[name]
    mine = sorted((r for r in records if r['assignment'] == name
                   and all(r['commands'].get(w) == argv for w, argv in commands(name, r['seed'], 'run'))),
                  key=lambda r: (r['threads'], r['seed']))
    lines = ['```bash'] + [shell(argv) for _, argv in commands(name, 0, folder)] + ['```', '']
    if not mine:
        return '\n'.join(lines + ['Not measured yet: `python assignments/payoff.py ' + name + '`.'])
    lines += ['| seed | threads | kNN top-1 (k=20): trained | untrained | gain | linear probe top-1: trained | '
              'untrained | gain | training: wall-clock, CPU time |', '|---|---|---|---|---|---|---|---|---|']
    for r in mine:
        lines.append(f"| {r['seed']} | {r['threads']} | {r['knn_trained']:.1f} | {r['knn_untrained']:.1f} | "
                     f"**{r['knn_trained'] - r['knn_untrained']:+.1f}** | {r['probe_trained']:.1f} | "
                     f"{r['probe_untrained']:.1f} | **{r['probe_trained'] - r['probe_untrained']:+.1f}** | "
                     f"{r['seconds']['train']:.0f} s, {r['cpu_seconds']['train']:.0f} s |")
    evals = max(r['seconds']['knn'] + r['seconds']['probe'] for r in mine)
    lines += ['', f"Measured with the reference solution on {'; '.join(sorted({r['cpu'] for r in mine}))}, torch "
                  f"{', '.join(sorted({r['torch'] for r in mine}))} (`python assignments/payoff.py {name}`, records in "
                  f"`results/assignments/payoff.jsonl`); the two evaluations took {evals:.0f} s at most. Chance is "
                  '10%.']
    if os.path.exists(os.path.join(HERE, name, 'probe.png')):
        lines += ['', '![the fast linear probe of the trained and the untrained network, against labels per class]'
                      '(probe.png)', '', 'The probe of seed 0 fitted on 1, 10 and all labelled images per class (the picture '
                      'the last command draws).']
    return '\n'.join(lines)


def rendered(readme, name, records):
    """The README's text with its payoff block replaced (None if it has no markers)."""
    start = re.search(f'^{re.escape(START)}$', readme, re.M)
    end = re.search(f'^{re.escape(END)}$', readme, re.M)
    if not start or not end or end.start() < start.start():
        return None
    return (readme[:start.start()] + START + '\n<!-- written by `python assignments/payoff.py --report` from '
            'results/assignments/payoff.jsonl -->\n' + block(name, records) + '\n' + readme[end.start():])


def report(records):
    for name in RUNS:
        path = os.path.join(HERE, name, 'README.md')
        text = rendered(open(path).read(), name, records)
        if text is None:
            raise SystemExit(f'error: {path} has no {START} ... {END} block')
        with open(path + '.tmp', 'w') as f:
            f.write(text)
        os.replace(path + '.tmp', path)
        print(f'{path}: payoff block rendered')


def main():
    parser = common.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('names', nargs='*', metavar='ASSIGNMENT', help=f'any of {", ".join(RUNS)}')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--threads', type=int, nargs='+', default=[2])
    parser.add_argument('--report', action='store_true', help="render the READMEs' payoff blocks and exit")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in RUNS]
    if unknown or not (args.names or args.report):
        parser.error(f'name one or more of {", ".join(RUNS)} (not {" ".join(unknown)})' if unknown
                     else 'name an assignment to measure, or --report')
    if any(s < 0 for s in args.seeds) or any(t < 1 for t in args.threads):
        parser.error('--seeds must be >= 0 and --threads >= 1')
    if args.report:
        report(read_records())
        return
    os.makedirs(os.path.dirname(RECORDS), exist_ok=True)
    for name in args.names:
        for threads in args.threads:
            for seed in args.seeds:
                record = measure(name, seed, threads)
                with open(RECORDS, 'a') as f:
                    f.write(json.dumps(record) + '\n')
                print(f"{name} seed {seed}, {threads} thread(s): kNN {record['knn_trained']:.1f} vs "
                      f"{record['knn_untrained']:.1f} untrained, probe {record['probe_trained']:.1f} vs "
                      f"{record['probe_untrained']:.1f} ({record['seconds']['train']:.0f} s of training)", flush=True)


if __name__ == '__main__':
    main()
