"""Throughput of a method file on this machine: images/s of its input pipeline alone and of whole training
steps, for each --augment path, in one command that anyone can repeat.

  python tools/throughput.py simclr.py --data /tmp/cifar10 --augment cpu device
  python tools/throughput.py dino.py --data /tmp/inet --arch vit_small --batch-size 64 --augment cpu device --json dino.json

Every flag this script does not know (--data, --arch, --batch-size, ...) goes to the method file. For each path:
  input pipeline   the method file runs up to common.build_train_loader (its own views, data and flags); then
                   its loader is iterated for --warmup steps, and for --steps more (or to the end of the
                   epoch) timed, waiting for the device at the end: batch size x steps / seconds.
  training         the method file itself trains 2 epochs (--epochs 2 --knn-every -1) in a temporary output
                   folder; the second epoch's epoch_images_per_s from its metrics.jsonl (the first also holds
                   the start-up, the workers' first batches, cudnn's autotuning, --compile).
One process (no torchrun). Prints a table; --json FILE also writes it.
"""
import argparse
import contextlib
import io
import os
import runpy
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's root
import common  # noqa: E402 (after the path)


class Measured(Exception):
    """Carries the pipeline measurement out of the method file's main() (not an error)."""

    def __init__(self, record):
        super().__init__('measured')
        self.record = record


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure_pipeline(script, method_args, augment, steps, warmup, output_dir):
    """Run `script` up to build_train_loader with --augment `augment`, then time its loader alone."""
    build = common.build_train_loader

    def timed_loader(args, views, device):
        loader = build(args, views, device)
        skip = min(warmup, len(loader) - 1)
        timed = min(steps, len(loader) - skip)
        batches = loader.epoch(0)
        for _ in range(skip):  # the workers' first batches, cudnn, the first gathers
            next(batches)
        synchronize(device)
        start = time.time()
        for _ in range(timed):
            views_out, _, _ = next(batches)
        synchronize(device)  # every view of the last batch is made
        seconds = time.time() - start
        raise Measured(dict(pipeline_images_per_s=timed * args.batch_size / seconds, pipeline_steps=timed,
                            pipeline_seconds=seconds, views=len(views_out), loader=type(loader).__name__,
                            device=str(device) + (f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else '')))

    common.build_train_loader = timed_loader
    saved_argv, printed = sys.argv, io.StringIO()
    sys.argv = [script, *method_args, '--augment', augment, '--knn-every', '-1', '--output-dir', output_dir]
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            runpy.run_path(script, run_name='__main__')
    except Measured as measured:
        notes = [line.strip() for line in printed.getvalue().splitlines()
                 if any(word in line for word in ('held on', 'decoded on', 'note:', 'process(es) on'))]
        return dict(measured.record, notes=notes)
    except SystemExit:
        pass
    finally:
        common.build_train_loader, sys.argv = build, saved_argv
        common.HELD.clear()  # the device-held images of this path go before the next one is measured
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return dict(error=(printed.getvalue().strip().splitlines() or ['no output'])[-1])


def measure_training(script, method_args, augment, output_dir):
    """Train `script` 2 epochs in `output_dir`; the second epoch's images/s and seconds."""
    command = [sys.executable, script, *method_args, '--augment', augment, '--epochs', '2', '--knn-every', '-1',
               '--output-dir', output_dir]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return dict(error=(result.stderr.strip().splitlines() or ['exit code %d' % result.returncode])[-1])
    second = [r for r in common.read_metrics(os.path.join(output_dir, 'metrics.jsonl'))
              if r.get('epoch') == 2 and 'epoch_images_per_s' in r]
    if not second:
        return dict(error='no epoch-2 record in metrics.jsonl')
    return dict(training_images_per_s=second[0]['epoch_images_per_s'], epoch_seconds=second[0]['epoch_seconds'])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False,
                                     epilog='every other flag is passed to the method file')
    parser.add_argument('script', help='a method file, e.g. simclr.py')
    parser.add_argument('--augment', nargs='+', default=['cpu', 'device'], choices=('cpu', 'device'),
                        help='the input paths to measure, in this order')
    parser.add_argument('--steps', type=int, default=100, help='input pipeline: timed steps (at most one epoch)')
    parser.add_argument('--warmup', type=int, default=5, help='input pipeline: steps before the timing starts')
    parser.add_argument('--skip-training', action='store_true', help='measure the input pipeline only')
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    args, method_args = parser.parse_known_args()
    if not os.path.isfile(args.script):
        raise common.UsageError(f'{args.script} is not a file; give a method file such as simclr.py')
    if args.steps < 1 or args.warmup < 0:
        raise common.UsageError('--steps must be >= 1 and --warmup >= 0')
    if args.json:
        common.check_writable_file(args.json, '--json')
    rows = []
    for augment in args.augment:
        with tempfile.TemporaryDirectory(prefix='throughput-') as folder:
            row = dict(augment=augment, **measure_pipeline(args.script, method_args, augment, args.steps, args.warmup,
                                                           os.path.join(folder, 'pipeline')))
            if not args.skip_training and 'error' not in row:
                row.update(measure_training(args.script, method_args, augment, os.path.join(folder, 'training')))
        rows.append(row)
        for note in row.get('notes', []):
            print(f'  {augment}: {note}')
    print(f"\n{args.script} {' '.join(method_args)}: one process\n")
    print(f"{'augment':<8} {'pipeline img/s':>15} {'training img/s':>15} {'epoch 2 (s)':>12}  device")
    for row in rows:
        if 'error' in row and 'pipeline_images_per_s' not in row:
            print(f"{row['augment']:<8} error: {row['error']}")
            continue
        training = row.get('training_images_per_s')
        print(f"{row['augment']:<8} {row['pipeline_images_per_s']:>15,.0f} "
              f"{'-' if training is None else format(training, ',.0f'):>15} "
              f"{'-' if training is None else format(row['epoch_seconds'], '.2f'):>12}  {row['device']}"
              + (f"  (training: {row['error']})" if 'error' in row else ''))
    measured = {row['augment']: row for row in rows if 'pipeline_images_per_s' in row}
    if {'cpu', 'device'} <= set(measured):
        cpu, device = measured['cpu'], measured['device']
        ratios = [f"pipeline {device['pipeline_images_per_s'] / cpu['pipeline_images_per_s']:.1f}x"]
        if 'training_images_per_s' in cpu and 'training_images_per_s' in device:
            ratios.append(f"training {device['training_images_per_s'] / cpu['training_images_per_s']:.1f}x")
        print('device / cpu: ' + ', '.join(ratios))
    if args.json:
        common.write_json(args.json, dict(script=args.script, method_args=method_args, rows=rows))


if __name__ == '__main__':
    common.run(main)
