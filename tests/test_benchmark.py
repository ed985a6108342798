"""benchmark.py: records with every field, the report rendered from them, resuming instead of retraining,
a killed benchmark resumed to the same numbers as an uninterrupted one, the dry run's commands and estimates."""
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

from tools import benchmark
import common
from conftest import ROOT, TINY

# Three epochs of 8 steps (256 procedural images, batch 32) on the tiny backbone, kNN after each epoch.
SETTINGS = ['--data', 'procedural:256', '--epochs', '3', '--knn-every', '1', '--name', 'smoke']
TINY_RUN = ['--', *TINY, '--batch-size', '32']
RECORD_FIELDS = {  # what a record must hold (issue 12)
    'method', 'command', 'git_commit', 'git_dirty', 'torch', 'torchvision', 'device', 'world_size', 'concurrency',
    'epochs', 'knn_top1', 'knn_top1_k20', 'knn_k', 'knn_t', 'best_knn_top1', 'best_epoch', 'train_seconds',
    'train_seconds_note', 'images_per_s', 'knn_curve', 'linear_top1', 'dataset', 'args', 'segments'}


def folders(tmp_path):
    return ['--runs', str(tmp_path / 'runs'), '--results', str(tmp_path / 'results')]


def bench_command(*args):
    return [sys.executable, os.path.join(ROOT, 'tools', 'benchmark.py'), *map(str, args)]


# One thread per training process in every test here: a run compared number for number with another
# must see the same thread count (set in the environment, so benchmark.py passes it on unchanged).
ENV = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')


def bench(*args, check=True):
    result = subprocess.run(bench_command(*args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f'benchmark.py exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
    return result


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """SimCLR and InstDisc, 3 epochs, both at once, never interrupted: the reference of the tests below."""
    tmp_path = tmp_path_factory.mktemp('straight')
    out = bench(*SETTINGS, '--methods', 'simclr', 'instdisc', '--concurrent', '2', *folders(tmp_path), *TINY_RUN)
    return tmp_path, out


def record(tmp_path, method, name='smoke'):
    with open(tmp_path / 'results' / name / f'{method}.json') as f:
        return json.load(f)


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_two_methods_in_one_command_write_records_with_every_field(straight):
    tmp_path, out = straight
    assert out.stdout.count(': finished: kNN top-1') == 2
    for method in ('simclr', 'instdisc'):
        r = record(tmp_path, method)
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        run_metrics = metrics(tmp_path / 'runs' / 'smoke' / method / 'metrics.jsonl')
        with open(tmp_path / 'results' / 'smoke' / f'{method}.metrics.jsonl') as copy, \
                open(tmp_path / 'runs' / 'smoke' / method / 'metrics.jsonl') as original:
            assert copy.read() == original.read()
        knn = [m for m in run_metrics if 'knn_top1' in m]
        epochs = [m for m in run_metrics if 'epoch_seconds' in m]
        assert r['method'] == method and r['epochs'] == 3 and (r['knn_k'], r['knn_t']) == (200, 0.1)
        assert [p['epoch'] for p in r['knn_curve']] == [1, 2, 3]
        assert r['knn_top1'] == knn[-1]['knn_top1'] and r['knn_top1_k20'] == knn[-1]['knn_top1_k20']
        best = max(knn, key=lambda m: m['knn_top1'])['knn_top1']
        assert r['best_knn_top1'] == best and any(m['knn_top1'] == best and m['epoch'] == r['best_epoch'] for m in knn)
        assert r['train_seconds'] == pytest.approx(sum(m['epoch_seconds'] for m in epochs))
        assert r['images_per_s'] == pytest.approx(3 * (256 // 32) * 32 / r['train_seconds'], rel=1e-6)
        assert f'python {method}.py --data procedural:256 --epochs 3 ' in r['command'] and '--knn-k 200' in r['command']
        assert r['torch'] == torch.__version__ and r['world_size'] == 1 and r['concurrency'] == 2
        assert r['device'] == benchmark.cpu_model() and r['dataset']['num_train'] == 256
        head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True)
        if head.returncode == 0:  # a copy of the tree without .git records None
            assert r['git_commit'] == head.stdout.strip() and isinstance(r['git_dirty'], bool)
        if os.path.exists(os.path.join(ROOT, 'eval_linear.py')):
            assert isinstance(r['linear_top1'], float)
        else:
            assert r['linear_top1'] is None and 'eval_linear.py is not in this repository' in r['linear_note']


def test_second_invocation_trains_nothing_and_keeps_the_records(straight):
    tmp_path, _ = straight
    paths = [tmp_path / 'results' / 'smoke' / f'{m}{ext}' for m in ('simclr', 'instdisc') for ext in ('.json', '.log')]
    before = [p.read_bytes() for p in paths]
    out = bench(*SETTINGS, '--methods', 'simclr', 'instdisc', '--concurrent', '2', *folders(tmp_path), *TINY_RUN)
    assert out.stdout.count('nothing left to train') == 2 and 'starting' not in out.stdout
    assert [p.read_bytes() for p in paths] == before


def report(results, page, readme=None):
    benchmark.report(benchmark.parse_args(['--report', '--results', str(results), '--page', str(page),
                                           '--readme', str(readme or page)])[0])


def test_report_renders_the_table_between_the_markers_and_both_figures(straight, tmp_path, capsys):
    results = straight[0] / 'results'
    readme = tmp_path / 'README.md'
    prose = f'The table goes between `{benchmark.TABLE_START}` and `{benchmark.TABLE_END}`.\n\n'  # named, not marking
    readme.write_text('# Title\n\n' + prose + benchmark.TABLE_START + '\nold table\n' + benchmark.TABLE_END + '\n\nafter\n')
    report(results, readme)
    text = readme.read_text()
    assert text.startswith('# Title\n\n' + prose) and text.endswith('\n\nafter\n') and 'old table' not in text
    for method, label in (('simclr', 'SimCLR'), ('instdisc', 'InstDisc')):
        r = record(straight[0], method)
        row = next(line for line in text.splitlines() if line.startswith(f'| {label} |'))
        assert f"**{r['knn_top1']:.2f}** / {r['best_knn_top1']:.2f} ({r['best_epoch']})" in row
        assert f"{r['train_seconds'] / 60:.1f} min" in row and r['device'] in row
    assert '| BYOL | owed |' in text and 'Owed rows: `python tools/benchmark.py --data procedural:256 --epochs 3' in text
    assert 'not compared with the published numbers' in text  # procedural data, 3 epochs
    for figure in ('knn-vs-epoch.png', 'knn-vs-wallclock.png'):
        assert (results / 'smoke' / figure).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        assert os.path.relpath(results / 'smoke' / figure, tmp_path) in text
    report(results, readme)
    assert readme.read_text() == text  # rendering is a function of the records

    plain = tmp_path / 'PLAIN.md'
    plain.write_text('no markers here\n')
    capsys.readouterr()
    report(results, plain)  # a page without the markers is left as it is, with a note
    assert f'note: {plain} has no {benchmark.TABLE_START} ... {benchmark.TABLE_END} lines' in capsys.readouterr().out
    assert plain.read_text() == 'no markers here\n'
    report(results, tmp_path / 'missing.md')
    assert f'note: {tmp_path / "missing.md"} does not exist' in capsys.readouterr().out
    assert not (tmp_path / 'missing.md').exists()


def test_report_writes_into_docs_results_md_by_default():
    args, _ = benchmark.parse_args(['--report'])
    assert (args.page, args.readme) == (os.path.join('docs', 'results.md'), 'README.md')


def cifar_record(method, final, best, best_epoch):
    return dict(schema=benchmark.SCHEMA, method=method, label=benchmark.LABELS[method], name='cifar10-200ep',
                knn_top1=final, best_knn_top1=best, best_epoch=best_epoch, epochs=200, train_seconds=1200.0,
                images_per_s=8333.0, concurrency=1, device='NVIDIA H200', linear_top1=None,
                dataset=dict(kind='folder', num_train=50000, num_test=10000, num_classes=10, image_size=32),
                benchmark=dict(data='/tmp/cifar10', epochs=200, knn_every=10, extra=[]))  # a name, never read


def test_comparison_with_published_numbers_is_like_with_like():
    table = benchmark.render_table([cifar_record('simclr', 86.5, 87.0, 190), cifar_record('moco', 85.0, 85.5, 180)],
                                   '/repo', '/repo/results')
    rows = {line.split(' | ')[0][2:]: line.split(' | ') for line in table.splitlines() if line.startswith('| ')}
    simclr, moco = rows['SimCLR'], rows['MoCo v2']
    assert simclr[1] == '**86.50** / 87.00 (190)'
    assert simclr[3] == '+2.2 (best)'            # Lightly's best epoch, 84.8, against our best, 87.0
    assert simclr[4] == '86.0 (met)'             # the target is for the final epoch
    assert moco[3].split('<br>') == ['-0.3 (final)', '+2.4 (final)', '+0.8 (best)']  # 85.3 / 82.6 final, 84.7 best
    assert moco[4] == '86.0 (short by 1.0)'
    assert rows['MoCo v3'][2] == 'none published for this setting' and rows['BYOL'][1] == 'owed'
    assert 'Owed rows: `python tools/benchmark.py --data /tmp/cifar10 --epochs 200 --name cifar10-200ep --methods byol ' \
           'simsiam swav mocov3 dino instdisc`' in table
    assert '![kNN top-1 against epoch](results/cifar10-200ep/knn-vs-epoch.png)' in table


def checkpoint_epoch(path):
    try:
        return torch.load(path, map_location='cpu', weights_only=True)['epoch']
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


def start_and_interrupt(tmp_path, after_epoch, how):
    """Start the benchmark of SimCLR alone; once its checkpoint holds `after_epoch` epochs, interrupt it:
    'term' sends SIGTERM to the benchmark alone (it must stop its run), 'kill' SIGKILLs the whole process
    group (a job's time limit). Returns the epochs the checkpoint holds afterwards."""
    checkpoint = tmp_path / 'runs' / 'smoke' / 'simclr' / 'checkpoint.pth'
    process = subprocess.Popen(bench_command(*SETTINGS, '--methods', 'simclr', *folders(tmp_path), *TINY_RUN),
                               cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        while checkpoint_epoch(checkpoint) < after_epoch and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()
        if how == 'term':
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    if how == 'term':
        assert process.returncode == 143 and 'error: stopped by SIGTERM' in err, err
        assert 'simclr: stopped after' in out
    return checkpoint_epoch(checkpoint)


def test_killed_benchmark_resumed_by_the_same_command_gives_the_same_records(straight, tmp_path):
    done = start_and_interrupt(tmp_path, 1, 'term')
    assert 1 <= done < 3
    lock = benchmark.lock_run(tmp_path / 'runs' / 'smoke' / 'simclr')
    assert lock is not None, 'the training process outlived the benchmark that was stopped'
    os.close(lock)
    assert not (tmp_path / 'results' / 'smoke' / 'simclr.json').exists()
    if done == 1:
        done = start_and_interrupt(tmp_path, 2, 'kill')
        assert done == 2
    out = bench(*SETTINGS, '--methods', 'simclr', *folders(tmp_path), *TINY_RUN)
    assert f'starting with {done} of 3 epochs done' in out.stdout
    resumed, reference = record(tmp_path, 'simclr'), record(straight[0], 'simclr')
    assert [s['epochs_before'] for s in resumed['segments']][-1] == done and len(resumed['segments']) >= 2
    for key in ('epochs', 'best_epoch', 'images_seen'):
        assert resumed[key] == reference[key], key
    for key in ('knn_top1', 'knn_top1_k20', 'best_knn_top1'):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-6), key
    for ours, theirs in zip(resumed['knn_curve'], reference['knn_curve'], strict=True):
        assert ours['epoch'] == theirs['epoch'] and ours['knn_top1'] == pytest.approx(theirs['knn_top1'], abs=1e-6)
    losses = [[m['epoch_loss'] for m in metrics(folder / 'results' / 'smoke' / 'simclr.metrics.jsonl')
               if 'epoch_loss' in m] for folder in (tmp_path, straight[0])]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_a_failing_method_is_reported_and_the_others_go_on(straight, tmp_path):
    # SimCLR's folder holds a checkpoint of 3 epochs (InstDisc's, from the run above): more than --epochs 1, so
    # its run fails once the benchmark reaches it; InstDisc trains
    os.makedirs(tmp_path / 'runs' / 'fail' / 'simclr')
    shutil.copyfile(straight[0] / 'runs' / 'smoke' / 'instdisc' / 'checkpoint.pth',
                    tmp_path / 'runs' / 'fail' / 'simclr' / 'checkpoint.pth')
    out = bench('--data', 'procedural:256', '--epochs', '1', '--knn-every', '0', '--name', 'fail',
                '--methods', 'simclr', 'instdisc', *folders(tmp_path), '--', *TINY, '--batch-size', '32', check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"simclr: FAILED: {tmp_path / 'runs' / 'fail' / 'simclr'} holds 3 epochs, more than --epochs 1" in out.stdout
    assert 'instdisc: finished' in out.stdout and 'failed: simclr' in out.stdout
    assert record(tmp_path, 'instdisc', 'fail')['epochs'] == 1
    assert not (tmp_path / 'results' / 'fail' / 'simclr.json').exists()


def test_dry_run_prints_the_commands_and_estimates_from_measured_images_per_second(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    results = tmp_path / 'results'
    os.makedirs(results / 'earlier')
    gpu_record = dict(schema=benchmark.SCHEMA, method='simclr', name='earlier', device='NVIDIA H200', device_type='cuda',
                      images_per_s=5000.0, concurrency=2, knn_seconds=30.0, knn_curve=[{}, {}, {}],
                      recorded_at='2026-12-01T00:00:00+00:00')
    (results / 'earlier' / 'simclr.json').write_text(json.dumps(gpu_record))
    args, extra = benchmark.parse_args(['--data', 'cifar10', '--methods', 'simclr', 'dino', '--budget-minutes', '25',
                                        '--runs', str(tmp_path / 'runs'), '--results', str(results)])
    benchmark.dry_run(args, extra)
    out = capsys.readouterr().out
    for method in ('simclr', 'dino'):
        assert (f'python {method}.py --data cifar10 --epochs 200 --output-dir {tmp_path}/runs/cifar10-200ep/{method} '
                f'--knn-every 10 --knn-k 200 --knn-t 0.1\n') in out
    # SimCLR from the record: 5,000 img/s with 2 at once -> 10,000 img/s alone, 200 x 50,000 images: 1,000 s;
    # its 3 kNN passes took 30 s: 20 more passes (every 10 epochs) at 10 s each
    assert '200 epochs x 50,000 images / 10,000 img/s = 16.7 min + 20 kNN passes x 10 s = 20.0 min' in out
    # DINO: no record; the H100 progress lines of 8 runs at once (upper median), x 8, and its log's kNN seconds
    early = os.path.join(ROOT, 'results', 'h100-2026-11-22', 'cifar10-10ep-concurrent-dino')
    rate = 8 * statistics.median_high(m['images_per_s'] for m in metrics(early + '.metrics.jsonl') if 'images_per_s' in m)
    with open(early + '.log') as f:
        knn = [int(line.rsplit('(', 1)[1].split()[0]) for line in f if 'kNN (' in line and line.rstrip().endswith(' s)')]
    dino_seconds = 200 * 50000 / rate + 20 * sum(knn) / len(knn)
    assert f'= {dino_seconds / 60:.1f} min (from' in out and f'total: {(1200 + dino_seconds) / 60:.1f} min' in out
    assert 'within 25 min: simclr; not: dino' in out
    assert not (tmp_path / 'runs').exists()  # a dry run writes nothing


def test_bad_input_is_refused_in_one_line_before_anything_is_written(tmp_path):
    cases = [(['--data', 'procedural', '--methods', 'simclr', 'nope'], 'unknown --methods nope'),
             (['--data', 'procedural', '--methods', 'byol', 'byol'], 'names a method twice'),
             (['--data', 'procedural', '--epochs', '0'], '--epochs and --concurrent must be at least 1'),
             (['--data', 'procedural', '--knn-every', '-1'], 'every record needs the final kNN'),
             (['--data', 'procedural', '--', '--epochs', '5'], "--epochs after `--` is the benchmark's own setting"),
             (['--data', 'procedural', '--', '--knn-k=20'], "--knn-k after `--` is the benchmark's own setting"),
             (['--data', 'procedural', '--name', 'a/b'], "--name 'a/b' must be letters"),
             (['--data', str(tmp_path / 'missing')], 'is neither a dataset name'),
             (['--epochs', '10'], '--data is required'),
             (['--data', 'procedural', '--threads', '0'], '--threads must be at least 1'),
             (['--data', 'procedural', '--preset', 'cpu', '--concurrent', '2'], '--preset cpu trains one run at a time'),
             (['--data', 'procedural', '--seed', '1'], '--seed is for the CPU benchmark'),
             (['--data', 'procedural', '--rerun'], '--rerun is for the CPU benchmark'),
             (['--data', 'procedural', '--preset', 'cpu', '--seed', '-1'], '--seed must be >= 0'),
             (['--data', 'procedural', '--preset', 'cpu', '--seed', '1', '--rerun'], 'not with --rerun'),
             (['--data', 'procedural', '--preset', 'cpu', '--seed', '1', '--', '--seed', '2'], 'given once'),
             # the flags after `--`, read by each method file's own parser before any run starts
             (['--data', 'procedural', '--methods', 'simclr', 'instdisc', '--', '--proj-hidden-dim', '32'],
              'instdisc.py refuses the flags after `--`: unrecognized arguments: --proj-hidden-dim 32; see python '
              'instdisc.py --help'),
             (['--data', 'procedural', '--methods', 'byol', '--', '--lr', '-1'],
              'byol.py refuses the flags after `--`: --lr -1.0 is outside'),
             (['--data', 'procedural', '--methods', 'dino', '--', '--out-dim', 'many'],
              "dino.py refuses the flags after `--`: argument --out-dim: invalid int value: 'many'")]
    for argv, message in cases:
        with pytest.raises(common.UsageError, match=re.escape(message)):  # common.run: `error: ...`, exit code 2
            benchmark.parse_args(argv + folders(tmp_path) if '--' not in argv else folders(tmp_path) + argv)
    assert not (tmp_path / 'runs').exists() and not (tmp_path / 'results').exists()


def test_a_run_locked_by_another_process_is_not_taken(tmp_path):
    first = benchmark.lock_run(tmp_path)
    assert first is not None and benchmark.lock_run(tmp_path) is None
    os.close(first)
    second = benchmark.lock_run(tmp_path)
    assert second is not None
    os.close(second)


def test_linear_probe_reads_eval_linear_json_and_reports_a_failure(tmp_path):
    log = tmp_path / 'train.log'
    good = tmp_path / 'eval_linear.py'
    good.write_text('import json, sys\njson.dump({"results": {"top1": 91.25}}, open(sys.argv[sys.argv.index("--json") + 1], "w"))\n')
    result = benchmark.linear_probe(str(tmp_path / 'checkpoint.pth'), str(log), str(good))
    assert result['linear_top1'] == 91.25 and '--json' in result['linear_command']
    bad = tmp_path / 'broken.py'
    bad.write_text('import sys\nprint("error: no test split")\nsys.exit(2)\n')
    result = benchmark.linear_probe(str(tmp_path / 'checkpoint.pth'), str(log), str(bad))
    assert result['linear_top1'] is None and 'exited 2: error: no test split' in result['linear_note']



# -----------------------------------------------------------------------------
# The CPU benchmark (--preset cpu), end to end on tiny settings: two methods (one with multi-crop) and the
# untrained network, one epoch of 256 procedural images at width 4, one thread.
# -----------------------------------------------------------------------------
CPU_SETTINGS = ['--preset', 'cpu', '--data', 'procedural:256', '--epochs', '1', '--threads', '1',
                '--methods', 'simclr', 'swav']
# width 4: the preset's --channels-last is switched off (PyTorch's CPU convolutions crash in it below 8 channels)
CPU_TINY = ['--', '--width', '4', '--no-channels-last', '--batch-size', '32', '--log-every', '10']
CPU_FIELDS = RECORD_FIELDS | {'preset', 'settings', 'threads', 'cores', 'cpu_model', 'train_cpu_seconds',
                              'epoch_times', 'load_average'}


@pytest.fixture(scope='module')
def cpu_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp('cpu')
    return tmp_path, bench(*CPU_SETTINGS, *folders(tmp_path), *CPU_TINY)


def test_cpu_preset_writes_records_with_every_field_and_the_untrained_row(cpu_run):
    tmp_path, out = cpu_run
    results = tmp_path / 'results' / benchmark.CPU_NAME
    for method in ('simclr', 'swav'):
        r = record(tmp_path, method, benchmark.CPU_NAME)
        assert CPU_FIELDS <= set(r), CPU_FIELDS - set(r)
        assert r['preset'] == 'cpu' and r['threads'] == 1 and r['cores'] == os.cpu_count()
        assert r['cpu_model'] in benchmark.cpu_model() and r['epochs'] == 1
        # the preset's flags, then those after `--` (the last of a flag wins in argparse)
        assert r['settings'] == benchmark.cpu_flags(method)
        assert shlex_join(benchmark.cpu_flags(method) + CPU_TINY[1:]) in r['command']
        assert r['args']['width'] == 4 and r['args']['augment'] == 'device' and r['args']['seed'] == 0
        run_metrics = metrics(results / f'{method}.metrics.jsonl')
        epochs = [m for m in run_metrics if 'epoch_seconds' in m]
        assert [e['cpu_seconds'] for e in r['epoch_times']] == [m['epoch_cpu_seconds'] for m in epochs]
        assert r['train_cpu_seconds'] == pytest.approx(sum(m['epoch_cpu_seconds'] for m in epochs))
        assert 0 < r['train_cpu_seconds'] and r['knn_curve'][-1]['train_cpu_seconds'] == r['train_cpu_seconds']
        assert r['knn_curve'][-1]['train_seconds'] == r['train_seconds'] and isinstance(r['linear_top1'], float)
        assert r['load_average'] is not None
    untrained = record(tmp_path, benchmark.BASELINE, benchmark.CPU_NAME)
    with open(tmp_path / 'runs' / benchmark.CPU_NAME / benchmark.BASELINE / 'knn.json') as f:
        knn = json.load(f)['results']['200']
    assert untrained['knn_top1'] == knn['top1'] and isinstance(untrained['linear_top1'], float)
    assert untrained['preset'] == 'cpu' and untrained['epochs'] == 0 and untrained['threads'] == 1
    # the same network as the trained rows: architecture, width and seed of the runs' own arguments
    simclr = record(tmp_path, 'simclr', benchmark.CPU_NAME)
    for flag, key in (('--arch', 'arch'), ('--width', 'width'), ('--seed', 'seed')):
        command = untrained['command'].split()
        assert command[len(command) - 1 - command[::-1].index(flag) + 1] == str(simclr['args'][key]), flag
    assert '--random-init' in untrained['command'] and '--k 200 --temperature 0.1' in untrained['command']
    assert '--random-init' in untrained['linear_command']


def shlex_join(argv):
    return ' '.join(argv)


def test_cpu_preset_resumes_and_keeps_every_record(cpu_run):
    tmp_path, _ = cpu_run
    paths = sorted((tmp_path / 'results' / benchmark.CPU_NAME).glob('*.json'))
    before = [p.read_bytes() for p in paths]
    out = bench(*CPU_SETTINGS, *folders(tmp_path), *CPU_TINY)
    assert out.stdout.count('nothing left to train') == 2 and f'{benchmark.BASELINE}: record' in out.stdout
    assert 'starting' not in out.stdout and [p.read_bytes() for p in paths] == before


def test_cpu_report_renders_the_table_the_settings_the_figure_and_the_summary(cpu_run, tmp_path, capsys):
    results = cpu_run[0] / 'results'
    page, readme = tmp_path / 'docs' / 'results.md', tmp_path / 'README.md'
    page.parent.mkdir()
    page.write_text(f'# Results\n\n{benchmark.CPU_START}\nold\n{benchmark.CPU_END}\n\nafter\n')
    readme.write_text(f'# Readme\n\n{benchmark.SUMMARY_START}\nold\n{benchmark.SUMMARY_END}\n')
    report(results, page, readme)
    text = page.read_text()
    assert text.startswith('# Results\n\n' + benchmark.CPU_START) and text.endswith(benchmark.CPU_END + '\n\nafter\n')
    rows = {line.split(' | ')[0][2:]: line.split(' | ') for line in text.splitlines() if line.startswith('| ')}
    untrained = record(cpu_run[0], benchmark.BASELINE, benchmark.CPU_NAME)
    assert rows['untrained'][2] == f"**{untrained['knn_top1']:.2f}**"
    for method, label in (('simclr', 'SimCLR'), ('swav', 'SwAV')):
        r = record(cpu_run[0], method, benchmark.CPU_NAME)
        row = rows[label]
        assert row[2] == f"**{r['knn_top1']:.2f}**" and row[4] == f"{r['linear_top1']:.2f}"
        assert row[3].startswith(f"{r['knn_top1'] - untrained['knn_top1']:+.1f} (")
        assert row[6] == f"{r['train_seconds'] / 60:.1f}" and row[8] == f"{r['images_per_s']:,.0f}"
        assert '\n'.join(benchmark.wrap_command(r['command'])) in text
    assert rows['BYOL'][2] == 'owed' and 'Owed rows: byol, simsiam, moco, mocov3, dino, instdisc.' in text
    figure = results / benchmark.CPU_NAME / 'knn-vs-minutes.png'
    assert figure.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and os.path.relpath(figure, page.parent) in text
    assert all(len(line) <= 110 for line in text.splitlines() if not line.startswith('| '))
    best = max((record(cpu_run[0], m, benchmark.CPU_NAME) for m in ('simclr', 'swav')), key=lambda r: r['knn_top1'])
    summary = readme.read_text().splitlines()[3]
    assert f"best {best['label']} {best['knn_top1']:.1f}% kNN top-1" in summary and '(docs/results.md)' in summary
    report(results, page, readme)
    assert page.read_text() == text  # a function of the records and the code
    bare = tmp_path / 'BARE.md'
    bare.write_text('# Readme without markers\n')
    capsys.readouterr()
    report(results, page, bare)
    assert f'note: {bare} has no {benchmark.SUMMARY_START} ... {benchmark.SUMMARY_END} lines' in capsys.readouterr().out
    assert bare.read_text() == '# Readme without markers\n'


def test_the_docs_state_the_settings_the_preset_runs():
    """The settings table is rendered from CPU_SETTINGS / CPU_RECIPES, and the runs get exactly those flags."""
    block = benchmark.render_cpu([], '/repo/docs', '/repo/results')
    assert f'`{" ".join(benchmark.settings_flags())}`' in ' '.join(block.splitlines())
    assert f'OMP_NUM_THREADS={benchmark.CPU_THREADS}' in block
    args, extra = benchmark.parse_args(['--preset', 'cpu', '--data', 'procedural'])
    assert (args.name, args.knn_every, args.threads) == (benchmark.CPU_NAME, 1, benchmark.CPU_THREADS)
    flat = ' '.join(line.strip() for line in block.splitlines())  # the page's lines are wrapped at 110
    assert all(len(line) <= 110 for line in block.splitlines())
    for method in benchmark.METHODS:
        epochs, flags, why = benchmark.CPU_RECIPES[method]
        shown = ' '.join(word for k, v in flags.items() for word in benchmark.switch_or_pair(k, v))
        assert f'- **{benchmark.LABELS[method]}**, {epochs} epochs' + (f', `{shown}`' if shown else '') + \
            f': {why}.' in flat
        command = benchmark.method_command(args, extra, method)
        assert command[command.index('--epochs') + 1] == str(epochs)
        assert command[-len(benchmark.cpu_flags(method)):] == benchmark.cpu_flags(method)
    # --epochs typed: every method trains that many
    args, extra = benchmark.parse_args(['--preset', 'cpu', '--data', 'procedural', '--epochs', '2'])
    assert {benchmark.epochs_of(args, m) for m in benchmark.METHODS} == {2}


def test_every_short_row_says_what_was_tried_and_no_row_that_meets_keeps_a_note():
    """CPU_SHORTFALLS: the measured rows (results/cpu-cifar10) that miss a target each have their note, rendered
    below the table, and a note whose row now meets its target is gone."""
    by_method = benchmark.cpu_groups(benchmark.load_records(os.path.join(ROOT, 'results'))).get(benchmark.CPU_NAME, {})
    untrained = by_method.get(benchmark.BASELINE)
    trained = [r for m, r in by_method.items() if m != benchmark.BASELINE]
    best = max(trained, key=lambda r: r['knn_top1']) if trained else None
    assert sorted(benchmark.shortfalls(by_method, untrained, best)) == sorted(benchmark.CPU_SHORTFALLS)
    page = ' '.join(line.strip() for line in open(os.path.join(ROOT, 'docs', 'results.md')))
    for key, note in benchmark.CPU_SHORTFALLS.items():
        assert note in page, f'{key}: python tools/benchmark.py --report'


def test_another_seed_and_a_rerun_have_their_own_records_and_tables_beside_the_first(tmp_path):
    """--seed S trains every row and the untrained one with seed S into NAME-seedS; --rerun trains the rows
    again into NAME-rerun (no untrained row). The report shows both as tables in the first one's section."""
    args, extra = benchmark.parse_args(['--preset', 'cpu', '--data', 'procedural', '--seed', '1'] + folders(tmp_path))
    assert args.name == f'{benchmark.CPU_NAME}-seed1' and extra[-2:] == ['--seed', '1']
    command = benchmark.method_command(args, extra, 'simsiam')
    assert [command[i + 1] for i, word in enumerate(command) if word == '--seed'][-1] == '1'  # the last one wins
    assert benchmark.backbone_flags(list(benchmark.settings_flags()) + extra)[-2:] == ['--seed', '1']
    args, extra = benchmark.parse_args(['--preset', 'cpu', '--data', 'procedural', '--rerun'] + folders(tmp_path))
    assert args.name == f'{benchmark.CPU_NAME}-rerun' and '--seed' not in extra
    records = []
    for name, seed, knn in ((benchmark.CPU_NAME, 0, [30.0, 40.0]), (f'{benchmark.CPU_NAME}-seed1', 1, [31.0, 39.5]),
                            (f'{benchmark.CPU_NAME}-rerun', 0, [30.0, 40.0])):
        settings = ['--arch', 'resnet18', '--seed', str(seed)]
        common_fields = dict(preset='cpu', name=name, settings=settings, cpu_model='CPU', cores=2, threads=2,
                             recorded_at='2026-12-05T00:00:00', benchmark=dict(data='/d'), args=dict(width=16),
                             dataset=dict(num_train=50000, num_test=10000), linear_top1=None)
        records.append(dict(common_fields, method='simsiam', label='SimSiam', knn_top1=knn[-1], epochs=2,
                            knn_curve=[dict(epoch=i + 1, knn_top1=v, train_seconds=60.0 * (i + 1))
                                       for i, v in enumerate(knn)],
                            train_seconds=120.0, train_cpu_seconds=240.0, images_per_s=200.0, command='python x'))
        if not name.endswith('rerun'):
            records.append(dict(common_fields, method=benchmark.BASELINE, label='untrained', knn_top1=32.0 - seed,
                                knn_curve=[dict(epoch=0, knn_top1=32.0 - seed)], command='python e',
                                linear_command='python l'))
    block = benchmark.render_cpu(records, str(tmp_path), str(tmp_path))
    assert block.count('self-supervised training on') == 1  # one section; the seed and the rerun are tables in it
    assert '| method | seed 0 | seed 1 | range |' in block
    assert '| untrained | 32.00 | 31.00 | 1.00 |' in block and '| SimSiam | 40.00 (+8.0) | 39.50 (+8.5) | 0.50 |' in block
    assert '| SimSiam | 30.00 / 40.00 | 30.00 / 40.00 | yes, to the last digit |' in block
    records[-1]['knn_curve'][-1]['knn_top1'] = 40.25
    assert 'no: 0.25 apart at most' in benchmark.render_cpu(records, str(tmp_path), str(tmp_path))


def test_backbone_flags_take_the_last_value_of_each_flag():
    argv = ['--arch', 'resnet18', '--cifar-stem', '--width', '16', '--lr', '0.5', '--width=4', '--seed', '3',
            '--no-cifar-stem', '--image-size', '16', '--workers', '0']
    assert benchmark.backbone_flags(argv) == ['--arch', 'resnet18', '--width=4', '--seed', '3', '--no-cifar-stem',
                                              '--image-size', '16', '--workers', '0']


def test_process_cpu_seconds_counts_a_live_worker():
    """A DataLoader worker is alive until the run ends: its CPU time is read from /proc, not from getrusage."""
    child = subprocess.Popen([sys.executable, '-c', 'import time, sys\nsys.stdin.readline()\nt = time.process_time()\n'
                              'while time.process_time() - t < 0.6: pass\nprint("busy", flush=True)\ntime.sleep(60)'],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        before = common.process_cpu_seconds()
        child.stdin.write('go\n')
        child.stdin.flush()
        assert child.stdout.readline() == 'busy\n'
        assert common.process_cpu_seconds() - before >= 0.55
    finally:
        child.kill()
        child.wait()


def test_speed_runs_both_input_paths_side_by_side_and_goes_on_where_it_stopped(tmp_path):
    argv = ['--preset', 'cpu', '--speed', '--speed-rounds', '1', '--data', 'procedural:256', '--threads', '1',
            '--methods', 'instdisc', *folders(tmp_path), *CPU_TINY]
    out = bench(*argv)
    lines = metrics(tmp_path / 'results' / benchmark.CPU_NAME / 'speed.jsonl')
    assert [(r['method'], r['variant'], r['round']) for r in lines] == [('instdisc', 'device', 1), ('instdisc', 'cpu', 1)]
    for r in lines:
        assert r['exit_code'] == 0 and r['images_per_s'] > 0 and r['threads'] == 1 and r['epoch_cpu_seconds'] > 0
        assert shlex_join(benchmark.cpu_flags('instdisc') + CPU_TINY[1:]) in r['command']
        assert '--epochs 2' in r['command'] and '--data procedural:256' in r['command']
    assert '--augment cpu --workers' in lines[1]['command'] and 'speed round 1: instdisc cpu:' in out.stdout
    again = bench(*argv)
    assert 'speed round' not in again.stdout and len(metrics(tmp_path / 'results' / benchmark.CPU_NAME / 'speed.jsonl')) == 2


def test_speed_tables_give_the_median_of_the_rounds_and_the_ratios(tmp_path):
    path = tmp_path / 'speed.jsonl'
    rates = {('simclr', 'device'): [100, 300, 200], ('simclr', 'cpu'): [50, 60, 70], ('simclr', 'bf16 autocast'): [20],
             ('byol', 'device'): [80, 90], ('simclr', 'Lightly, 0 workers'): [150, 160, 170],
             ('simclr', 'Lightly, 2 workers'): [240, 250, 260], ('simclr', 'channels-first'): [125]}
    with open(path, 'w') as f:
        for (method, variant), values in rates.items():
            for i, v in enumerate(values, 1):
                f.write(json.dumps(dict(method=method, variant=variant, round=i, images_per_s=float(v), load_average=2.0,
                                        cpu_model='CPU', cores=2, error=None)) + '\n')
        f.write(json.dumps(dict(method='simclr', variant='torch.compile', round=1, images_per_s=None, load_average=3.0,
                                cpu_model='CPU', cores=2, error='error: no compiler')) + '\n')
    text = '\n'.join(benchmark.speed_tables(str(path)))
    assert '| SimCLR | 200 (100-300, 3 rounds) | 60 (50-70, 3 rounds) | 0.30 |' in text
    assert '| BYOL | 85 (80-90, 2 rounds) |  |  |' in text
    assert '| bf16 autocast | 20 (20-20, 1 round) | 0.10 |' in text
    assert 'SimCLR, torch.compile, round 1: failed (error: no compiler)' in text and '2.0 to 3.0' in text
    # the peer (--peer): each against its fastest, and the verdict on the target
    assert '| simclr.py, device path | 200 (100-300, 3 rounds) | 0.80 |' in text
    assert '| simclr.py, device path, channels-first (as the peer) | 125 (125-125, 1 round) | 0.50 |' in text
    assert '| Lightly, 0 workers | 160 (150-170, 3 rounds) | 0.64 |' in text
    assert '| Lightly, 2 workers | 250 (240-260, 3 rounds) | 1.00 |' in text
    assert "simclr.py's faster path against the peer's fastest: 0.80 (target 1.00: short)." in text


def test_the_peer_is_refused_in_one_line_without_lightly_or_without_speed(tmp_path):
    """--peer needs --speed and a Python that can run; tools/peer_lightly.py without lightly stops in one line."""
    for argv, message in (([], '--peer times the peer beside --speed: add --speed'),
                          (['--speed'], 'give --speed and the path of a Python that has lightly')):
        with pytest.raises(common.UsageError, match=re.escape(message)):
            benchmark.parse_args(['--preset', 'cpu', '--data', 'procedural', '--peer', str(tmp_path / 'none')] + argv
                                 + folders(tmp_path))
    (tmp_path / 'data' / 'train' / 'a').mkdir(parents=True)
    try:
        import lightly  # noqa: F401
        pytest.skip('lightly is installed here: this test is of its absence')
    except ImportError:
        pass
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'peer_lightly.py'), '--data',
                           str(tmp_path / 'data'), '--output-dir', str(tmp_path / 'out')], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith('error: lightly is not importable')
    assert len(done.stderr.splitlines()) == 1 and not (tmp_path / 'out').exists()


def test_record_try_keeps_what_a_try_measured_and_the_report_shows_it(tmp_path):
    """tools/record_try.py: one fresh run of a method file, its epochs and kNN, its time and the CPU other
    processes used meanwhile, appended to a tries file that tries_table renders with the command; a second
    try with the same tag, a run folder in use, or no command is refused in one line before anything runs."""
    tries, out = tmp_path / 'tries.jsonl', tmp_path / 'run'
    tool = [sys.executable, os.path.join(ROOT, 'tools', 'record_try.py')]
    command = [sys.executable, 'simclr.py', '--data', 'procedural:64', *TINY, '--batch-size', '32', '--epochs', '1',
               '--knn-every', '1', '--knn-k', '20', '--output-dir', str(out)]
    done = subprocess.run([*tool, 'tiny-1ep', '--tries', str(tries), '--', *command], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    [t] = [json.loads(line) for line in tries.read_text().splitlines()]
    assert t['tag'] == 'tiny-1ep' and t['exit_code'] == 0 and t['command'] == ' '.join(command)
    assert t['epochs'][0]['epoch'] == 1 and t['epochs'][0]['epoch_images_per_s'] > 0 and t['first_loss'] > 0
    assert 0 <= t['knn'][-1]['knn_top1'] <= 100 and t['process_wall_seconds'] > 0 and t['others_cpu_seconds'] >= 0
    assert t['threads'] == '1' and t['cores'] == os.cpu_count() and t['cpu']
    table = '\n'.join(benchmark.tries_table(str(tries)))
    assert f"| tiny-1ep | {t['epochs'][0]['epoch_images_per_s']:,.1f} |" in table and '# tiny-1ep' in table
    assert f"{t['knn'][-1]['knn_top1']:.2f} | {t['others_cpu_seconds']:.0f} s |" in table
    for argv, message in ((['tiny-1ep', '--tries', str(tries), '--', *command[:-1], str(tmp_path / 'other')],
                           "already has a try tagged 'tiny-1ep'"),
                          (['again', '--tries', str(tries), '--', *command], 'already holds a run'),
                          (['again', '--tries', str(tries)], 'give the command to run after `--`'),
                          (['again', '--tries', str(tries), '--', 'ls'], 'must be `python METHOD.py ...`')):
        refused = subprocess.run([*tool, *argv], capture_output=True, text=True, env=ENV, timeout=60)
        assert refused.returncode == 2 and message in refused.stderr and len(refused.stderr.splitlines()) == 1, \
            refused.stderr
    assert len(tries.read_text().splitlines()) == 1 and not (tmp_path / 'other').exists()


def test_the_load_note_tells_a_runs_own_threads_from_other_work():
    """A 2-thread row loads a 2-core machine by about 2 on its own: only a load beyond its threads is other work."""
    quiet = dict(label='BYOL', threads=2, cores=2, load_average=2.05)
    busy = dict(label='SimCLR', threads=2, cores=2, load_average=3.9)
    assert 'their own 2 threads' in benchmark.load_note([quiet], [2.05])
    note = benchmark.load_note([quiet, busy], [2.05, 3.9])
    assert note.startswith('SimCLR shared the machine with other work') and 'BYOL' not in note
    assert benchmark.load_note([quiet], []) == ''
