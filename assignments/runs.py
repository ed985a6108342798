"""What you see: each assignment's suggested runs, measured and rendered into its README.

Every assignment asks for a few short trainings ("Do": "Train both ...") and shows in "What you see" the
picture they make and what they cost. RUNS below holds those runs (the shared flags, each run's folder, script
and extra flags, the pictures); this script runs them on the reference solution in a temporary copy of the
repository (nothing here changes), appends one record per run to results/assignments/runs.jsonl (the command,
wall-clock and CPU time, the CPU time all other processes used meanwhile, CPU model, threads, torch, and the logged measures'
first, smallest and last values), draws the pictures from them into assignments/<name>/, and renders two
blocks of each README from the records: the commands (between <!-- runs:start --> and <!-- runs:end -->, in
"Do") and what they measured (<!-- measured:start --> ... <!-- measured:end -->, in "What you see"):

  python assignments/runs.py simsiam-stop-gradient swav-sinkhorn    # measure: keep the machine otherwise idle
  python assignments/runs.py --report                                # render the READMEs' blocks
"""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # not this folder: its conftest.py would hide the test suite's from other imports
    sys.path.insert(0, REPO)
import common  # noqa: E402 (after the path): its one-line argparse errors


def _load(file):
    spec = importlib.util.spec_from_file_location('assignments_' + file[:-3], os.path.join(HERE, file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


payoff = _load('payoff.py')  # children_cpu(), commit(), read_records(), write_atomically(); solution copies
plot = _load('plot.py')
RECORDS = os.path.join(REPO, 'results', 'assignments', 'runs.jsonl')
BLOCKS = {'textures': {'commands': ('<!-- runs:start -->', '<!-- runs:end -->'),
                       'measured': ('<!-- measured:start -->', '<!-- measured:end -->')},
          'cifar10': {'commands': ('<!-- runs-cifar10:start -->', '<!-- runs-cifar10:end -->'),
                      'measured': ('<!-- measured-cifar10:start -->', '<!-- measured-cifar10:end -->')}}

# name: the README's `flags`, its runs (folder, script, the run's own flags), its pictures (measure, dashed line,
# picture file), the logged measures its table shows (a curve's first / smallest / mean of its last 5 values,
# or `knn_top1`: the kNN monitor after the last epoch), and a note on the runs.
RUNS = {
    'simsiam-stop-gradient': dict(
        flags='--data procedural:256 --arch resnet18 --width 8 --image-size 16 --workers 0 --batch-size 32 '
              '--epochs 100 --stop-after-epoch 8 --lr 2.0 --proj-hidden-dim 32 --proj-dim 32 --pred-hidden-dim 8 '
              '--log-every 4 --knn-every -1',
        runs=[('runs/sg', 'simsiam.py', ''), ('runs/no-sg', 'simsiam.py', '--no-stop-gradient')],
        plots=[('output_std', 0.177, 'fig2.png')], measures=['output_std', 'loss']),
    'byol-to-simsiam': dict(
        flags='--data procedural:256 --arch resnet18 --width 8 --image-size 16 --workers 0 --batch-size 32 '
              '--epochs 100 --stop-after-epoch 8 --optimizer sgd --lr 2.0 --proj-hidden-dim 32 --proj-dim 32 '
              '--pred-hidden-dim 32 --log-every 4 --knn-every -1',
        runs=[('runs/byol', 'byol_original.py', ''), ('runs/simsiam-from-byol', 'byol.py', ''),
              ('runs/no-detach', 'byol_no_detach.py', '')],
        plots=[('output_std', 0.177, 'output_std.png')], measures=['output_std']),
    'dino-centering-sharpening': dict(
        flags='--data procedural:256 --arch resnet18 --width 8 --image-size 16 --workers 0 --batch-size 32 '
              '--epochs 100 --stop-after-epoch 6 --out-dim 256 --hidden-dim 32 --bottleneck-dim 16 '
              '--num-local-crops 2 --local-crop-size 8 --log-every 4 --knn-every -1',
        runs=[('runs/dino', 'dino.py', ''), ('runs/no-centering', 'dino.py', '--no-centering'),
              ('runs/no-sharpening', 'dino.py', '--no-sharpening')],
        plots=[('teacher_entropy', 5.545, 'fig7.png')], measures=['teacher_entropy', 'loss']),
    'swav-sinkhorn': dict(
        flags='--data procedural:256 --arch resnet18 --width 8 --image-size 16 --workers 0 --batch-size 32 '
              '--epochs 100 --stop-after-epoch 6 --optimizer sgd --lr 2.0 --size-crops 16 8 --nmb-crops 2 2 '
              '--min-scale-crops 0.14 0.05 --max-scale-crops 1 0.14 --nmb-prototypes 50 --proj-hidden-dim 32 '
              '--queue-length 0 --freeze-prototypes-epochs 0 --log-every 4 --knn-every -1',
        runs=[('runs/sinkhorn', 'swav.py', ''), ('runs/softmax', 'swav.py', '--no-sinkhorn')],
        plots=[('loss', 3.912, 'loss.png')], measures=['loss']),
    'mocov3-patch-projection': dict(
        flags='--data procedural:128 --arch vit_tiny --image-size 16 --workers 0 --batch-size 32 --epochs 10 '
              '--optimizer adamw --lr 5e-3 --warmup-epochs 1 --log-every 2 --knn-every 0 --knn-k 20',
        runs=[('runs/frozen', 'mocov3.py', ''), ('runs/trained', 'mocov3.py', '--no-freeze-patch-embed')],
        plots=[('patch_grad_norm', None, 'fig4.png'), ('loss', None, 'loss.png')],
        measures=['patch_grad_norm', 'loss', 'knn_top1']),
    'simclr-nt-xent': dict(
        flags='--data procedural:256 --arch resnet18 --width 8 --image-size 16 --workers 0 --batch-size 32 '
              '--epochs 10 --optimizer sgd --lr 0.5 --proj-hidden-dim 32 --log-every 8',
        runs=[('runs/ntxent', 'simclr.py', ''), ('runs/ntxent-t0.1', 'simclr.py', '--temperature 0.1')],
        plots=[], measures=['loss', 'knn_top1']),
    'moco-queue': dict(
        flags='--data procedural:960 --arch resnet18 --width 8 --image-size 16 --workers 0 --batch-size 32 '
              '--epochs 10 --min-scale 0.3 --lr 0.5 --knn-every 0 --knn-k 20',
        runs=[('runs/k64', 'moco.py', '--queue-size 64'), ('runs/k4096', 'moco.py', '--queue-size 4096'),
              ('runs/m0', 'moco.py', '--key-momentum 0')],
        plots=[], measures=['loss', 'knn_top1']),
    'instdisc-memory-bank': dict(
        flags='--data procedural:960 --arch resnet18 --width 8 --image-size 16 --workers 0 --batch-size 32 '
              '--epochs 5 --min-scale 0.3 --lr 0.25 --temperature 0.5 --knn-every 0 --knn-k 20',
        runs=[('runs/instdisc', 'instdisc.py', ''), ('runs/bank-m0', 'instdisc.py', '--memory-momentum 0'),
              ('runs/bank-m0.99', 'instdisc.py', '--memory-momentum 0.99')],
        plots=[], measures=['loss', 'knn_top1']),
}


# On photographs (optional): the same arms, one epoch of CIFAR-10 each, with the CPU benchmark's settings of the
# method (tools/benchmark.py CPU_SETTINGS and CPU_RECIPES: ResNet-18 with the CIFAR stem at width 16, batch 256)
# and its kNN (k=200, T=0.1, all 10,000 test images) after the epoch; `--data cifar10` stands for the folder
# given with --cifar10. name: the method whose recipe it is, the flags added to it and why, runs, plots (their
# dashed line: 1/sqrt(d) of the output's width d, or ln K of K prototypes / output dimensions), measures.
CIFAR10 = {
    'simsiam-stop-gradient': dict(
        method='simsiam', flags='', why='',
        runs=[('runs/sg-cifar10', 'simsiam.py', ''), ('runs/no-sg-cifar10', 'simsiam.py', '--no-stop-gradient')],
        plots=[('output_std', round(2048 ** -0.5, 4), 'fig2-cifar10.png')],
        measures=['output_std', 'loss', 'knn_top1']),
    'byol-to-simsiam': dict(
        method='byol', flags='', why='',  # BYOL's recipe: at SimSiam's lr 0.5 the solution fell below untrained
        runs=[('runs/simsiam-from-byol-cifar10', 'byol.py', ''),
              ('runs/no-detach-cifar10', 'byol_no_detach.py', '')],
        plots=[('output_std', round(256 ** -0.5, 4), 'output_std-cifar10.png')],
        measures=['output_std', 'knn_top1']),
    'swav-sinkhorn': dict(
        method='swav', flags='', why='',  # the CPU recipe is two 32-px crops already
        runs=[('runs/sinkhorn-cifar10', 'swav.py', ''), ('runs/softmax-cifar10', 'swav.py', '--no-sinkhorn')],
        plots=[('loss', round(math.log(3000), 3), 'loss-cifar10.png')], measures=['loss', 'knn_top1']),
    'dino-centering-sharpening': dict(
        method='dino', flags='--num-local-crops 0',
        why='only the two 32-px crops (the six 16-px ones would make an epoch take about twice as long)',
        runs=[('runs/dino-cifar10', 'dino.py', ''), ('runs/no-centering-cifar10', 'dino.py', '--no-centering'),
              ('runs/no-sharpening-cifar10', 'dino.py', '--no-sharpening')],
        plots=[('teacher_entropy', round(math.log(4096), 3), 'fig7-cifar10.png')],
        measures=['teacher_entropy', 'loss', 'knn_top1']),
}
CIFAR10_MONITOR = '--epochs 1 --log-every 10 --knn-every 1 --knn-k 200 --knn-t 0.1'


def spec(name, track='textures'):
    """An assignment's runs on a track: RUNS[name], or CIFAR10[name] with its flags resolved."""
    if track == 'textures':
        return RUNS[name]
    found = dict(CIFAR10[name])
    recipe = ' '.join(payoff.benchmark.cpu_flags(found['method']))
    found['flags'] = ' '.join(part for part in ('--data cifar10', recipe, CIFAR10_MONITOR, found['flags']) if part)
    return found


def tracks_of(name):
    return ('textures', 'cifar10') if name in CIFAR10 else ('textures',)


def prepare(name, root):
    """Files a README has the student make beside the solution (byol-to-simsiam: the original and a variant)."""
    if name == 'byol-to-simsiam':
        shutil.copy(os.path.join(REPO, 'byol.py'), os.path.join(root, 'byol_original.py'))  # BYOL as handed out
        with open(os.path.join(root, 'byol.py')) as f:
            text = f.read()
        detached = 'z = F.normalize(z.detach().float(), dim=1)'
        if text.count(detached) != 1:
            raise SystemExit(f'error: byol.py no longer has one `{detached}`: update runs.py prepare()')
        with open(os.path.join(root, 'byol_no_detach.py'), 'w') as f:  # step 4: the solution without the .detach()
            f.write(text.replace(detached, 'z = F.normalize(z.float(), dim=1)'))


def argv(name, run, track='textures'):
    """A run's command line (without `python`), as the README shows it."""
    folder, script, extra = run
    return [script, *spec(name, track)['flags'].split(), *extra.split(), '--output-dir', folder]


def summary(folder, measures):
    """{measure: {first, smallest, last5} of a logged curve, or {final} of knn_top1} of a finished run."""
    found = {}
    for measure in measures:
        if measure == 'knn_top1':
            with open(os.path.join(folder, 'metrics.jsonl')) as f:
                values = [r['knn_top1'] for r in map(json.loads, f) if 'knn_top1' in r]
            found[measure] = dict(final=values[-1]) if values else None
            continue
        _, values = plot.read_curve(folder, measure)
        found[measure] = dict(first=values[0], smallest=min(values), last5=sum(values[-5:]) / len(values[-5:]),
                              logged=len(values)) if values else None
    return found


def measure(name, threads, track='textures', cifar10=None):
    """Run an assignment's suggested runs on the reference solution, draw its pictures; one record per run.
    cifar10: the CIFAR-10 folder that stands for `--data cifar10` (the record keeps both)."""
    runs = spec(name, track)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
    root = tempfile.mkdtemp(prefix='runs-')
    records = []
    try:
        payoff.thresholds.solution_copy(name, root)
        prepare(name, root)
        for run in runs['runs']:
            command = argv(name, run, track)
            argv_run = payoff.on_folder(command, cifar10) if track == 'cifar10' else command
            busy = common.busy_cpu_seconds()
            started, cpu_started = time.time(), payoff.children_cpu()
            done = subprocess.run([sys.executable, *argv_run], cwd=root, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f'error: {" ".join(command)} exited {done.returncode}: '
                                 f'{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""}')
            cpu_seconds = payoff.children_cpu() - cpu_started
            others = None if busy is None else max(0.0, common.busy_cpu_seconds() - busy - cpu_seconds)
            records.append(dict(
                assignment=name, track=track, run=run[0], command=command, threads=threads,
                cpu=f'{common.cpu_name()} ({os.cpu_count()} cores)', torch=__import__('torch').__version__,
                commit=payoff.commit(), seconds=round(time.time() - started, 1),
                cpu_seconds=round(cpu_seconds, 1), others_cpu_seconds=None if others is None else round(others, 1),
                measures=summary(os.path.join(root, run[0]), runs['measures']),
                curves={key: list(zip(*plot.read_curve(os.path.join(root, run[0]), key)))
                        for key, _, _ in runs['plots']},
                recorded_at=time.strftime('%Y-%m-%dT%H:%M:%S%z')))
            if track == 'cifar10':
                records[-1]['data'] = os.path.abspath(cifar10)
            print(f"{name} {run[0]}: {records[-1]['seconds']:.0f} s wall-clock, {cpu_seconds:.0f} s CPU "
                  f"(other processes: {others if others is None else round(others)} s CPU meanwhile)", flush=True)
        draw(name, track, records)
        return records
    finally:
        shutil.rmtree(root, ignore_errors=True)


def draw(name, track, records):
    """Draw a track's pictures from its runs' records (the curves they keep), as the README's plot.py command
    draws them from the run folders; False if a record keeps no curves (made before records kept them)."""
    runs = spec(name, track)
    if not all(r and 'curves' in r for r in records):
        return False
    for key, reference, picture in runs['plots']:
        found = {os.path.basename(r['run']): tuple(map(list, zip(*r['curves'][key]))) for r in records}
        plot.draw(found, key, os.path.join(HERE, name, picture), reference)
    return True


def current(name, records, track='textures'):
    """The newest record of each of an assignment's runs on a track made with the command the README shows, in
    the order of its runs."""
    found = {}
    for r in records:
        if r['assignment'] == name and r.get('track', 'textures') == track:
            found[(r['run'], tuple(r['command']))] = r
    return [found.get((run[0], tuple(argv(name, run, track)))) for run in spec(name, track)['runs']]


def commands_block(name, track='textures'):
    runs = spec(name, track)
    words, lines = runs['flags'].split(), ['flags="']
    for word in words:
        if len(lines[-1]) + len(word) > 104 and word.startswith('--'):
            lines[-1] += ' \\'
            lines.append('       ')
        lines[-1] += ('' if lines[-1].endswith(('"', ' ')) else ' ') + word
    lines[-1] += '"'
    for folder, script, extra in runs['runs']:
        lines.append(' '.join(['python', script, '$flags', *extra.split(), '--output-dir', folder]))
    folders = ' '.join(folder for folder, _, _ in runs['runs'])
    for key, reference, picture in runs['plots']:
        reference = f' --reference {reference:g}' if reference is not None else ''
        line = f'python assignments/plot.py {folders} --measure {key}{reference} --output runs/{picture}'
        lines += [line] if len(line) <= 110 else line.replace(' --measure', ' \\\n    --measure').split('\n')
    lines = ['```bash', *lines, '```']
    if track != 'textures' and runs['flags'].endswith(CIFAR10[name]['flags']) and CIFAR10[name]['flags']:
        lines += ['', *textwrap.wrap(f"`{CIFAR10[name]['flags']}` is added to the CPU benchmark's {payoff.benchmark.LABELS[runs['method']]} "
                                     f"recipe: {CIFAR10[name]['why']}.", width=115, break_on_hyphens=False)]
    return '\n'.join(lines)


def number(value):
    return '-' if value is None else f'{value:.3g}' if abs(value) < 100 else f'{value:.0f}'


def knn(value):
    """A kNN top-1 with one decimal, as the untrained row beside it is given."""
    return '-' if value is None else f'{value:.1f}'


def measured_block(name, records, track='textures'):
    runs = spec(name, track)
    mine = current(name, records, track)
    option = '' if track == 'textures' else f' --track {track} --cifar10 FOLDER'
    if not all(mine):
        return f'Not measured yet: `python assignments/runs.py {name}{option}`.'
    header, rule = ['run', 'wall-clock', 'CPU time'], ['---', '---:', '---:']
    for key in runs['measures']:
        parts = ['kNN top-1 at the end'] if key == 'knn_top1' else [f'`{key}`: first', 'smallest', 'mean of last 5']
        header += parts
        rule += ['---:'] * len(parts)
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(rule) + '|']
    for r in mine:
        cells = [f"`{r['run']}`", f"{r['seconds']:.0f} s", f"{r['cpu_seconds']:.0f} s"]
        for key in runs['measures']:
            value = r['measures'].get(key) or {}
            cells += ([knn(value.get('final'))] if key == 'knn_top1' else
                      [number(value.get('first')), number(value.get('smallest')), number(value.get('last5'))])
        lines.append('| ' + ' | '.join(cells) + ' |')
    others = [r['others_cpu_seconds'] for r in mine if r.get('others_cpu_seconds') is not None]
    quiet = ('' if not others else '; no other process used the CPU meanwhile (under 1 s of CPU time)'
             if max(others) < 1 else f"; all other processes together used {max(others):.0f} s of CPU time at most "
             'during a run')
    drawn = '; the pictures are drawn from these runs' if runs['plots'] else ''
    data = ('' if track == 'textures' else ', on the CIFAR-10 images stored as JPEG folders (`--data FOLDER` in '
            'place of `--data cifar10`)')
    lines += ['', *textwrap.wrap(f"The commands above with the reference solution (seed 0, the default){data} on "
                  f"{'; '.join(sorted({r['cpu'] for r in mine}))}, OMP_NUM_THREADS="
                  f"{', '.join(sorted({str(r['threads']) for r in mine}))}, torch "
                  f"{', '.join(sorted({r['torch'] for r in mine}))}, one run at a time{quiet}{drawn} "
                  f"(`python assignments/runs.py {name}{option}`, records in "
                  '`results/assignments/runs.jsonl`).' + untrained(track), width=115, break_on_hyphens=False)]
    return '\n'.join(lines)


def untrained(track):
    """The note on the kNN of the same network untrained: the CPU benchmark's row (CIFAR-10 track)."""
    path = os.path.join(REPO, 'results', payoff.benchmark.CPU_NAME, 'random-init.json')
    if track == 'textures' or not os.path.exists(path):
        return ''
    with open(path) as f:
        record = json.load(f)
    return (f" The same network untrained (seed {record['settings'][record['settings'].index('--seed') + 1]}) "
            f"scores {record['knn_top1']:.1f}% kNN top-1 (the CPU benchmark's untrained row, "
            f"`results/{payoff.benchmark.CPU_NAME}/random-init.json`); chance is 10%.")


def rendered(readme, name, records, track='textures'):
    """The README's text with a track's blocks replaced; None if a block's markers are missing."""
    for which, (start, end) in BLOCKS[track].items():
        i, j = readme.find('\n' + start + '\n'), readme.find('\n' + end + '\n')
        if i < 0 or j < i:
            return None
        body = commands_block(name, track) if which == 'commands' else measured_block(name, records, track)
        source = 'RUNS' if track == 'textures' else 'CIFAR10'
        note = (f'<!-- written by `python assignments/runs.py --report` from {source} in assignments/runs.py -->'
                if which == 'commands' else
                '<!-- written by `python assignments/runs.py --report` from results/assignments/runs.jsonl -->')
        readme = readme[:i + 1] + start + '\n' + note + '\n' + body + '\n' + readme[j + 1:]
    return readme


def report(records):
    for name in RUNS:
        path = os.path.join(HERE, name, 'README.md')
        text = open(path).read()
        for track in tracks_of(name):
            draw(name, track, current(name, records, track))
            text = rendered(text, name, records, track)
            if text is None:
                raise SystemExit(f'error: {path} lacks a {" or ".join(s for s, _ in BLOCKS[track].values())} block')
        payoff.write_atomically(path, text)
        print(f'{path}: runs and measured blocks rendered')


def main():
    parser = common.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('names', nargs='*', metavar='ASSIGNMENT', help=f'any of {", ".join(RUNS)}')
    parser.add_argument('--threads', type=int, default=2, help='OMP_NUM_THREADS of every run')
    parser.add_argument('--track', choices=list(BLOCKS), default='textures',
                        help='textures: the README\'s runs; cifar10: the same arms, one epoch of CIFAR-10 each')
    parser.add_argument('--cifar10', metavar='FOLDER', default=None,
                        help='with --track cifar10: the CIFAR-10 folder (train/ and test/) standing for `--data cifar10`')
    parser.add_argument('--report', action='store_true', help="render the READMEs' blocks and exit")
    args = parser.parse_args()
    payoff.check_names(parser, args, RUNS)
    if args.threads < 1:
        parser.error('--threads must be >= 1')
    if args.track == 'cifar10' and not args.report:
        payoff.check_cifar10(parser, args, CIFAR10)
    if args.report:
        report(payoff.read_records(RECORDS))
        return
    os.makedirs(os.path.dirname(RECORDS), exist_ok=True)
    for name in args.names:
        records = measure(name, args.threads, args.track, args.cifar10)
        with open(RECORDS, 'a') as f:  # only once every run of the assignment has finished
            f.writelines(json.dumps(r) + '\n' for r in records)


if __name__ == '__main__':
    main()
