"""Record one try of a setting for the CPU benchmark: run a method file's command, keep what it measured.

  python tools/record_try.py moco-lr0.5-1ep -- python moco.py --data /tmp/cifar10 --epochs 1 --knn-every 1 \\
      --knn-k 200 --knn-t 0.1 ... --output-dir /tmp/tries/moco-lr0.5

runs the command (after `--`) as it is and appends one line to results/cpu-cifar10/tries.jsonl (--tries): the
tag, the command, its exit code, the CPU model, cores and OMP_NUM_THREADS, the process's wall-clock and CPU
seconds, the CPU seconds every other process on the machine used meanwhile (0: the machine was otherwise idle),
each epoch's loss, wall-clock, images/s and CPU seconds and each kNN pass from the run's metrics.jsonl, and the
first logged loss. `python tools/benchmark.py --report` renders the file below the CPU benchmark's table
(docs/results.md). Keep the machine otherwise idle while a try runs: its times are part of what it measured.
"""
import json
import os
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
sys.path.insert(0, REPO)
import common  # noqa: E402 (after the path)

DEFAULT_TRIES = os.path.join(REPO, 'results', 'cpu-cifar10', 'tries.jsonl')


def children_cpu_seconds():
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parse(argv):
    parser = common.ArgumentParser(description=__doc__.split('\n')[0],
                                   usage='python tools/record_try.py TAG [--tries FILE] -- python METHOD.py ... '
                                         '--output-dir DIR')
    parser.add_argument('tag', help='a short name of what this try changes, e.g. moco-lr0.5-1ep')
    parser.add_argument('--tries', default=DEFAULT_TRIES, help='the records file to append to')
    if '--' not in argv:
        parser.error('give the command to run after `--`, e.g. -- python moco.py --data /tmp/cifar10 ... '
                     '--output-dir /tmp/tries/moco')
    args = parser.parse_args(argv[:argv.index('--')])
    args.command = argv[argv.index('--') + 1:]
    if len(args.command) < 2 or not args.command[1].endswith('.py'):
        parser.error(f"the command after `--` must be `python METHOD.py ...`, not {' '.join(args.command) or 'nothing'}")
    if '--output-dir' not in args.command[:-1]:
        parser.error('the command needs --output-dir DIR (its metrics.jsonl is what the try measured)')
    args.output_dir = args.command[args.command.index('--output-dir') + 1]
    if os.path.exists(os.path.join(args.output_dir, 'metrics.jsonl')):
        parser.error(f'{args.output_dir} already holds a run; give a new --output-dir (a try measures one fresh run)')
    if any(r.get('tag') == args.tag for r in common.read_metrics(args.tries)):
        parser.error(f"{args.tries} already has a try tagged '{args.tag}'; choose another tag")
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else list(argv))
    busy, started, cpu_started = common.busy_cpu_seconds(), time.time(), children_cpu_seconds()
    exit_code = subprocess.run(args.command, cwd=REPO).returncode
    wall, cpu = time.time() - started, children_cpu_seconds() - cpu_started
    others = None if busy is None else max(0.0, common.busy_cpu_seconds() - busy - cpu)
    metrics = common.read_metrics(os.path.join(args.output_dir, 'metrics.jsonl'))
    steps = [m for m in metrics if 'step' in m and 'loss' in m]
    record = dict(
        tag=args.tag, command=' '.join(args.command), exit_code=exit_code,
        recorded_at=time.strftime('%Y-%m-%dT%H:%M:%S%z'), cpu=common.cpu_name(), cores=os.cpu_count(),
        threads=os.environ.get('OMP_NUM_THREADS'), process_wall_seconds=round(wall, 1),
        process_cpu_seconds=round(cpu, 1), others_cpu_seconds=None if others is None else round(others, 1),
        epochs=[m for m in metrics if 'epoch_seconds' in m], knn=[m for m in metrics if 'knn_top1' in m],
        first_loss=steps[0]['loss'] if steps else None)
    os.makedirs(os.path.dirname(os.path.abspath(args.tries)), exist_ok=True)
    with open(args.tries, 'a') as f:
        f.write(json.dumps(record) + '\n')
    knn = record['knn'][-1]['knn_top1'] if record['knn'] else None
    print(f"{args.tag}: exit {exit_code}, {wall:.0f} s, kNN top-1 {knn if knn is None else round(knn, 2)} -> {args.tries}")
    return exit_code


if __name__ == '__main__':
    sys.exit(main())
