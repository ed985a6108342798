"""Measure the learning tests' gains over seeds and CPU rounding variants, and render their table.

Each learning test (`tests/test_<method>.py`) trains its method for 300 steps with `conftest.LEARN` plus the
module's `LEARNING` flags and asserts that the kNN top-1 gain over the same network untrained exceeds the
module's `LEARNING_MARGIN`. A margin is only a test of the method if no seed and no CPU crosses it, so before
changing a setting or a margin, measure:

  python tools/measure_learning.py --methods byol swav --seeds 0 1 2 3 4 --variants 2t 1t 2t-avx2 --jobs 2
  python tools/measure_learning.py --report          # the table in docs/results.md, between its markers

Variants: `1t` / `2t` are OMP_NUM_THREADS=1 / 2 (the suite's two shards run with 1 thread each, one process
with 2); `-avx2` also limits ATen, oneDNN and MKL to AVX2 kernels, which round as an older or an AMD CPU's do.
Every run appends one record
(command, variant, seed, trained and untrained kNN, the gain, seconds, CPU, torch, commit) to
results/cpu-learning/records.jsonl; a (method, variant, seed) already recorded with the same flags is skipped.
"""
import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, 'tests')]  # conftest: the learning tests' settings
import benchmark  # noqa: E402 (after the path)

RECORDS = os.path.join(ROOT, 'results', 'cpu-learning', 'records.jsonl')
START, END = '<!-- learning-table:start -->', '<!-- learning-table:end -->'

# name: (test module, method file); its flags are conftest.LEARN + the module's LEARNING (LEARNING_CPU for simclr-cpu)
METHODS = {
    'simclr': ('test_simclr', 'simclr.py'),
    'instdisc': ('test_instdisc', 'instdisc.py'),
    'moco': ('test_moco', 'moco.py'),
    'mocov3': ('test_mocov3', 'mocov3.py'),
    'simsiam': ('test_simsiam', 'simsiam.py'),
    'byol': ('test_byol', 'byol.py'),
    'swav': ('test_swav', 'swav.py'),
    'dino': ('test_dino', 'dino.py'),
    'simclr-cpu': ('test_augment', 'simclr.py'),
}
TITLES = {'simclr': 'SimCLR', 'instdisc': 'InstDisc', 'moco': 'MoCo v2', 'mocov3': 'MoCo v3 (ResNet)',
          'simsiam': 'SimSiam', 'byol': 'BYOL', 'swav': 'SwAV', 'dino': 'DINO (ResNet)',
          'simclr-cpu': 'SimCLR, cpu path, 300 steps'}
AVX2 = dict(ATEN_CPU_CAPABILITY='avx2', ONEDNN_MAX_CPU_ISA='AVX2', MKL_ENABLE_INSTRUCTIONS='AVX2')
VARIANTS = {'1t': dict(OMP_NUM_THREADS='1'), '2t': dict(OMP_NUM_THREADS='2'),
            '1t-avx2': dict(OMP_NUM_THREADS='1', **AVX2), '2t-avx2': dict(OMP_NUM_THREADS='2', **AVX2)}


def setting(name):
    """(method file, its flags: conftest.LEARN + the module's, asserted margin) of a learning test."""
    import importlib
    from conftest import LEARN
    module = importlib.import_module(METHODS[name][0])
    flags = module.LEARNING_CPU if name.endswith('-cpu') else module.LEARNING
    margin = module.LEARNING_CPU_MARGIN if name.endswith('-cpu') else module.LEARNING_MARGIN
    return METHODS[name][1], [str(f) for f in [*LEARN, *flags]], margin


def read_records(path=RECORDS):
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def commit():
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def run_command(command, env):
    """Run a method file or eval_knn.py in the repository; a failure raises with its last error lines."""
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f'{" ".join(command)} exited {result.returncode}: {result.stderr.strip()[-500:]}')


def measure(name, variant, seed, jobs=1):
    from conftest import TINY_BACKBONE
    script, flags, margin = setting(name)
    env = dict(os.environ, PYTHONUNBUFFERED='1', **VARIANTS[variant])
    if jobs > 1:  # runs share the cores: threads that spin while they wait would slow each other down many times
        env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # (it changes how threads wait, not what they compute)
    with tempfile.TemporaryDirectory() as folder:
        start = time.time()
        run_command([script, *flags, '--seed', str(seed), '--output-dir', os.path.join(folder, 'run')], env)
        seconds = time.time() - start
        records = [json.loads(line) for line in open(os.path.join(folder, 'run', 'metrics.jsonl'))]
        run_command(['eval_knn.py', '--random-init', '--data', 'procedural:960', *TINY_BACKBONE, '--k', '20',
                  '--temperature', '0.1', '--seed', str(seed), '--json', os.path.join(folder, 'random.json')], env)
        untrained = json.load(open(os.path.join(folder, 'random.json')))['results']['20']['top1']
    trained = [r['knn_top1'] for r in records if 'knn_top1' in r][-1]
    steps = [r for r in records if 'step' in r]
    record = dict(method=name, script=script, flags=flags, variant=variant, env=VARIANTS[variant], seed=seed,
                  trained=trained, untrained=untrained, gain=round(trained - untrained, 2), seconds=round(seconds, 1),
                  cpu=benchmark.cpu_model(), torch=__import__('torch').__version__, commit=commit())
    for key in ('output_std', 'teacher_entropy'):  # the collapse indicators the tests also assert on
        if key in steps[-1]:
            record['min_' + key], record['final_' + key] = min(s[key] for s in steps), steps[-1][key]
    return record


def run(args):
    done = {(r['method'], r['variant'], r['seed'], tuple(r['flags'])) for r in read_records(args.records)}
    jobs = [(m, v, s) for m in args.methods for v in args.variants for s in args.seeds
            if (m, v, s, tuple(setting(m)[1])) not in done]
    os.makedirs(os.path.dirname(os.path.abspath(args.records)), exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for record in pool.map(lambda job: measure(*job, jobs=args.jobs), jobs):
            with open(args.records, 'a') as f:
                f.write(json.dumps(record) + '\n')
            print(f"{record['method']:14s} {record['variant']:8s} seed {record['seed']}: {record['trained']:.1f} vs "
                  f"{record['untrained']:.1f} untrained, gain {record['gain']:+.1f} ({record['seconds']:.0f} s)", flush=True)


def table(records):
    """The results table: per learning test, the records made with its current flags."""
    from conftest import LEARN
    lines = ['| method | asserted gain | smallest gain (variant, seed) | gains, 2 threads, seeds 0-4 | other variants (runs): '
             'range | flags beyond the common ones |', '|---|---|---|---|---|---|']
    for name in METHODS:
        script, flags, margin = setting(name)
        own = flags[len(LEARN):]
        mine = [r for r in records if r['method'] == name and r['flags'] == flags]
        if not mine:
            lines.append(f'| {TITLES[name]} | > {margin} | not measured | | | `{" ".join(own)}` |')
            continue
        low = min(mine, key=lambda r: r['gain'])
        main = sorted((r for r in mine if r['variant'] == '2t'), key=lambda r: r['seed'])
        other = [r for r in mine if r['variant'] != '2t']
        variants = sorted({r['variant'] for r in other})
        other_text = (f'{", ".join(variants)} ({len(other)}): {min(r["gain"] for r in other):+.1f} to '
                      f'{max(r["gain"] for r in other):+.1f}') if other else ''
        lines.append(f'| {TITLES[name]} | > {margin} | **{low["gain"]:+.1f}** ({low["variant"]}, seed {low["seed"]}) | '
                     f'{" / ".join(format(r["gain"], "+.1f") for r in main)} | {other_text} | `{" ".join(own)}` |')
    cpus = sorted({r['cpu'] for r in records})
    lines += ['', f'Measured on: {"; ".join(cpus)}; torch {", ".join(sorted({r["torch"] for r in records}))}. '
              f'{len(records)} runs in `results/cpu-learning/records.jsonl`.']
    return '\n'.join(lines)


def rendered(readme, records):
    """The document's text with the table between the learning-table markers (None without the markers)."""
    start = re.search(f'^{re.escape(START)}$', readme, re.M)  # the markers are whole lines
    end = re.search(f'^{re.escape(END)}$', readme, re.M)
    if not start or not end or end.start() < start.start():
        return None
    return (readme[:start.start()] + START + '\n<!-- written by `python tools/measure_learning.py --report` from '
            'results/cpu-learning/records.jsonl -->\n' + table(records) + '\n' + readme[end.start():])


def report(args):
    text = rendered(open(args.readme).read(), read_records(args.records))
    if text is None:
        print(table(read_records(args.records)))
        return
    tmp = args.readme + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, args.readme)
    print(f'{args.readme}: learning table rendered')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    parser.add_argument('--variants', nargs='+', default=['2t'], choices=list(VARIANTS))
    parser.add_argument('--jobs', type=int, default=1, help='runs at once (each with its variant\'s threads)')
    parser.add_argument('--report', action='store_true', help='render the table into --readme and exit')
    parser.add_argument('--readme', default=os.path.join(ROOT, 'docs', 'results.md'),
                        help='the Markdown file whose learning-table block is replaced')
    parser.add_argument('--records', default=RECORDS, help='the records file (appended to, and read by --report)')
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f'--jobs must be >= 1, not {args.jobs}')
    report(args) if args.report else run(args)


if __name__ == '__main__':
    main()
