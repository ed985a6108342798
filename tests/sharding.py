"""The suite in several processes: on a machine with at least 2 cores, `pytest` splits the selected tests into
shards of about equal time (from tests/durations.json, measured), runs the first in this process and starts
`pytest --shard I/N` for each other, then prints their reports after its own and fails if any failed. Tests that
share a module-scoped fixture of their own stay in one shard (it is computed once).

Every shard runs with one thread (SSL_TEST_THREADS=1, OMP_NUM_THREADS=1): the suite's networks are so small that
two threads make a step barely faster than one, so two one-thread shards take about half the time of one
two-thread process, where two two-thread shards on 2 cores oversubscribe them (OpenMP barriers: 6-15x slower
learning runs, measured). One process keeps 2 threads, as before. The learning tests' margins are measured at
both thread counts (results/cpu-learning/records.jsonl, tests/test_suite.py checks it).

  pytest                      2 shards of 1 thread (1 process of 2 threads on a 1-core machine)
  pytest --shards 1           one process, 2 threads (SSL_TEST_SHARDS=N or --shards N: N one-thread shards)
  pytest --record-durations   rewrite tests/durations.json from this run (on a quiet machine)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import pytest

DURATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'durations.json')
UNKNOWN_SLOW, UNKNOWN = 30.0, 2.0  # seconds assumed for a test not in durations.json (marked slow or not)
MIN_SECONDS = 60.0  # a selection expected to take less runs in one process (a child costs a collection)


def add_options(parser):
    group = parser.getgroup('shards', 'running the selected tests in several processes (tests/sharding.py)')
    group.addoption('--shards', type=int, default=None,
                    help='one-thread processes the selected tests are split over; default: $SSL_TEST_SHARDS, else 2 on a '
                         'machine of 2 or more cores (1: this process runs them all, with 2 threads)')
    group.addoption('--shard', default=None, help=argparse.SUPPRESS)  # 'I/N': the child running shard I of N
    group.addoption('--record-durations', action='store_true',
                    help='write every test\'s duration (setup + call + teardown) into tests/durations.json')


def cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def shard_count(config):
    count = (config.getoption('--shards') or int(os.environ.get('SSL_TEST_SHARDS', '0') or 0)
             or (2 if cores() >= 2 else 1))
    if count < 1:
        raise pytest.UsageError(f'--shards must be at least 1, not {count}')
    return count


def read_durations():
    try:
        with open(DURATIONS) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def groups(items, durations):
    """[(seconds, [items])]: the items that must share a process (a module whose tests use a module- or
    class-scoped fixture defined in this repository: it is computed once per process), the others alone."""
    by_key = {}
    for item in items:
        fixtures = getattr(item, '_fixtureinfo', None)
        shared = fixtures and any(defs and defs[-1].scope != 'function' and defs[-1].baseid
                                  for defs in fixtures.name2fixturedefs.values())
        key = item.nodeid.split('::')[0] if shared else item.nodeid
        by_key.setdefault(key, []).append(item)
    def seconds(item):
        slow = item.get_closest_marker('slow') or item.get_closest_marker('assignments')
        return durations.get(item.nodeid, UNKNOWN_SLOW if slow else UNKNOWN)
    return [(sum(seconds(i) for i in members), members) for members in by_key.values()]


def assign(items, count, durations):
    """The items of each shard: the longest group first, each to the shard with the least time so far.
    The same items give the same shards in every process (nothing here depends on the process)."""
    loads = [[0.0, []] for _ in range(count)]
    for seconds, members in sorted(groups(items, durations), key=lambda g: (-g[0], g[1][0].nodeid)):
        shard = min(loads, key=lambda load: load[0])
        shard[0] += seconds
        shard[1].extend(members)
    order = {item.nodeid: i for i, item in enumerate(items)}
    return [(seconds, sorted(members, key=lambda i: order[i.nodeid])) for seconds, members in loads]


class Shards:
    """The plugin (registered by tests/conftest.py)."""

    def __init__(self, config):
        self.config = config
        self.children = []  # (process, its output file, the file its durations go to or None)
        self.times = {}

    @pytest.hookimpl(trylast=True)  # after -m / -k have deselected and conftest has marked and reordered
    def pytest_collection_modifyitems(self, config, items):
        given = config.getoption('--shard')
        if given:  # a child (started with one thread): its share only
            index, count = (int(x) for x in given.split('/'))
            items[:] = assign(items, count, read_durations())[index - 1][1]
            return
        count = shard_count(config)
        if count == 1 or config.option.collectonly or not items:
            return
        shards = assign(items, count, read_durations())
        if sum(seconds for seconds, _ in shards) < MIN_SECONDS or sum(1 for _, m in shards if m) < 2:
            return
        items[:] = shards[0][1]
        os.environ.update(SSL_TEST_THREADS='1', OMP_NUM_THREADS='1')  # this process's tests and the children
        record = config.getoption('--record-durations')
        argv = [a for a in config.invocation_params.args if a != '--record-durations']
        for index in range(2, count + 1):
            env = dict(os.environ, PYTHONUNBUFFERED='1')
            times = tempfile.NamedTemporaryFile(suffix='.json', delete=False).name if record else None
            if times:
                env['SSL_TEST_DURATIONS_OUT'] = times
            output = tempfile.TemporaryFile(mode='w+')
            process = subprocess.Popen([sys.executable, '-m', 'pytest', *argv, '--shard', f'{index}/{count}'],
                                       cwd=config.invocation_params.dir, env=env, stdout=output,
                                       stderr=subprocess.STDOUT)
            self.children.append((process, output, times))
        reporter = config.pluginmanager.get_plugin('terminalreporter')
        if reporter:
            reporter.write_line(f'shards: this process runs {len(shards[0][1])} tests (~{shards[0][0] / 60:.1f} min '
                                'as measured alone), ' + ', '.join(f'shard {i + 2} of {count} {len(m)} '
                                                                   f'(~{s / 60:.1f} min)'
                                                                   for i, (s, m) in enumerate(shards[1:])))

    def pytest_runtest_logreport(self, report):
        self.times[report.nodeid] = self.times.get(report.nodeid, 0.0) + report.duration

    @pytest.hookimpl(tryfirst=True)  # before the terminal reporter prints the summary and the exit status
    def pytest_sessionfinish(self, session):
        out = os.environ.get('SSL_TEST_DURATIONS_OUT')
        if self.config.getoption('--shard') and out:
            with open(out, 'w') as f:
                json.dump(self.times, f)
        others = {}
        reporter = self.config.pluginmanager.get_plugin('terminalreporter')
        for index, (process, output, times) in enumerate(self.children, start=2):
            code = process.wait()
            output.seek(0)
            text = output.read()
            if reporter:
                reporter.ensure_newline()
                reporter.write_sep('=', f'shard {index} of {len(self.children) + 1} (pytest --shard '
                                        f'{index}/{len(self.children) + 1}): exit code {code}')
                reporter.write(text if text.endswith('\n') else text + '\n')
            if code not in (0, 5) and session.exitstatus in (0, 5):
                session.exitstatus = code
            if times:
                with open(times) as f:
                    others.update(json.load(f))
                os.unlink(times)
        if self.children and reporter:
            reporter.write_sep('=', f'shard 1 of {len(self.children) + 1} (this process)')
        self.children = []
        if self.config.getoption('--record-durations') and not self.config.getoption('--shard'):
            self.write_durations(others)

    def write_durations(self, others):
        measured = {**read_durations(), **self.times, **others}
        with open(DURATIONS + '.tmp', 'w') as f:
            json.dump({k: round(v, 1) for k, v in sorted(measured.items())}, f, indent=0)
            f.write('\n')
        os.replace(DURATIONS + '.tmp', DURATIONS)

    def pytest_unconfigure(self):
        for process, _, _ in self.children:  # Ctrl-C or an internal error: no orphan
            process.kill()
