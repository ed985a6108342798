"""Every numeric flag of every entry point has one declared range (common.RANGES), and a value outside it is
one line `error: ...` with exit code 2, before anything is written. Run in this process: the scripts' start-up
is all a subprocess would add, and these errors come before any work."""
import importlib
import math

import pytest

import common
from conftest import run_in_process

ENTRY_POINTS = ('instdisc', 'simclr', 'moco', 'byol', 'simsiam', 'swav', 'mocov3', 'dino', 'eval_knn',
                'eval_linear')
PROTOCOL_ONLY = ('epochs', 'lr', 'batch_size', 'stop_after_epoch')  # eval_linear: flags of --augment


def numeric_flags(parser):
    return [a for a in parser._actions if a.option_strings and a.type in (int, float)]


def outside(interval, type_):
    """Values just outside `interval`, as typed on a command line (and nan, inf for a float)."""
    low, high = (float(bound) for bound in interval[1:-1].split(','))
    step = 1 if type_ is int else 1e-3 * max(1.0, abs(low), abs(high) if math.isfinite(high) else 1.0)
    values = [low - step if interval[0] == '[' else low, high + (1 if type_ is int else max(step, high))
              if interval[-1] == ']' else high]
    values = [int(v) if type_ is int else v for v in values]
    return values + (['nan', 'inf', '-inf'] if type_ is float else [])


def inside(interval, type_):
    low, high = (float(bound) for bound in interval[1:-1].split(','))
    value = low if interval[0] == '[' else (low + min(high, low + 1)) / 2
    return int(math.ceil(value)) if type_ is int else value


@pytest.mark.parametrize('script', ENTRY_POINTS)
def test_every_numeric_flag_has_a_declared_range(script):
    parser = importlib.import_module(script).parser
    undeclared = [a.option_strings[0] for a in numeric_flags(parser) if a.dest not in common.RANGES]
    assert not undeclared, f'{script}: declare the range of {undeclared} in common.RANGES'


@pytest.mark.parametrize('script', ENTRY_POINTS)
def test_a_value_outside_its_range_is_one_line_and_nothing_is_written(script, tmp_path):
    parser = importlib.import_module(script).parser
    out = tmp_path / 'out'
    base = (['--data', 'procedural', '--output-dir', out] if not script.startswith('eval') else
            ['--random-init', '--data', 'procedural'] + (['--output-dir', out] if script == 'eval_linear' else
                                                          []))
    tried = 0
    for action in numeric_flags(parser):
        interval = common.RANGES[action.dest]
        intervals = interval if isinstance(interval, tuple) else None
        count = action.nargs if isinstance(action.nargs, int) else 1
        for position in range(count):
            position_interval = intervals[position] if intervals else interval
            for bad in outside(position_interval, action.type):
                values = [inside(intervals[n] if intervals else interval, action.type) for n in range(count)]
                values[position] = bad
                extra = ['--augment'] if script == 'eval_linear' and action.dest in PROTOCOL_ONLY else []
                typed = ([f'{action.option_strings[0]}={bad}'] if count == 1 and action.nargs is None else
                         [action.option_strings[0], *values])  # '=': argparse reads a lone -inf as a flag
                if bad == '-inf' and action.nargs is not None:
                    continue
                code, _, err = run_in_process(script, base + extra + typed)
                assert code == 2 and err.count('\n') == 1 and err.startswith('error: '), (values, err)
                assert action.option_strings[0] in err and f'is outside {position_interval}' in err, err
                tried += 1
    assert tried > 10 and not out.exists()


@pytest.mark.parametrize('script', ['simclr', 'eval_knn'])
def test_argparse_errors_are_one_line(script):
    for argv in (['--no-such-flag'], ['--seed', 'seven'], ['--precision', 'fp8']):
        code, _, err = run_in_process(script, argv)
        assert code == 2 and err.count('\n') == 1 and err.startswith('error: ') and 'see ' in err, err
        assert '--help' in err and 'usage:' not in err
