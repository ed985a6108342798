"""Checker of the DINO centering / sharpening assignment: dino.py has --no-centering and --no-sharpening; trained
48 steps, the logged teacher_entropy falls to 0 without centering (one dimension wins) and rises to ln K without
sharpening (uniform). Two tiny runs.
  pytest assignments/dino-centering-sharpening [--submission path/to/dino.py]"""
import math

import pytest

from grading import TINY, expect

METHOD_FILE = 'dino.py'

K = 256
# 48 steps of the small-image preset (LARS) on 256 textures, ResNet-18 of width 8, 2 global crops of 16 px and 2
# local ones of 8 px, K = 256, a small head; --epochs 100 stopped after 6, so tau_t stays at its 0.04 start.
RUN = ['--data', 'procedural:256', *TINY, '--batch-size', '32', '--epochs', '100', '--stop-after-epoch', '6',
       '--out-dim', str(K), '--hidden-dim', '32', '--bottleneck-dim', '16', '--num-local-crops', '2',
       '--local-crop-size', '8', '--log-every', '4', '--knn-every', '-1']
LN_K = math.log(K)  # 5.55
# Measured, mean of the last 5 logged teacher_entropy (steps 32-48) / ln K, seeds 0-4, OMP_NUM_THREADS=1 / 2:
#   --no-centering: 0.0003-0.0024     --no-sharpening: 0.947-0.971     both (not asserted): 0.44-0.71
#   (the same with 1 and 2 threads)


def require_flags(submission):
    parser = submission.module().parser
    for flag in ('--no-centering', '--no-sharpening'):
        _, unknown = parser.parse_known_args(['--data', 'procedural', flag])
        step = 2 if flag == '--no-centering' else 3
        expect(not unknown, f'{METHOD_FILE} has no {flag} flag yet '
                            f'(assignments/dino-centering-sharpening/README.md, step {step})')


def measure(submission, output_dir, *flags):
    """Train 48 steps with `flags`; the mean of the last 5 logged teacher_entropy, as a fraction of ln K."""
    submission.run(METHOD_FILE, *RUN, *flags, '--output-dir', output_dir)
    steps = submission.metrics(output_dir)
    expect(steps and 'teacher_entropy' in steps[-1], f'{METHOD_FILE} no longer logs teacher_entropy: keep it on every '
                                                     'progress line, the entropy of the P_t the loss uses (README.md, step 2)')
    return sum(r['teacher_entropy'] for r in steps[-5:]) / 5 / LN_K


def test_without_centering_the_teacher_collapses_to_one_dimension(submission, tmp_path):
    require_flags(submission)
    entropy = measure(submission, tmp_path, '--no-centering')
    expect(entropy < 0.05, f'with --no-centering, teacher_entropy is still {entropy:.2f} ln K after 48 steps (one-hot '
                           'teacher: 0). Is C left out of P_t, in the loss AND in the logged entropy? (README.md, step 2)')


def test_without_sharpening_the_teacher_collapses_to_uniform(submission, tmp_path):
    require_flags(submission)
    entropy = measure(submission, tmp_path, '--no-sharpening')
    expect(entropy > 0.9, f'with --no-sharpening, teacher_entropy is only {entropy:.2f} ln K after 48 steps (uniform '
                          'teacher: 1). Is tau_t = tau_s, in the loss AND in the logged entropy? (README.md, step 3)')


# The default arm, step by step: 2 epochs of one step, tau_t warmed up from --warmup-teacher-temp (epoch 1) to
# --teacher-temp (epoch 2). Runs that differ only in a setting the step does not use must log the same numbers
# (the same seed, the same computation); runs that differ in one it uses must not.
DEFAULT = ['--data', 'procedural:32', *TINY, '--batch-size', '32', '--epochs', '4', '--stop-after-epoch', '2',
           '--warmup-teacher-temp-epochs', '2', '--out-dim', str(K), '--hidden-dim', '32', '--bottleneck-dim', '16',
           '--num-local-crops', '2', '--local-crop-size', '8', '--log-every', '1', '--knn-every', '-1']


@pytest.fixture(scope='module')
def steps_of(submission, tmp_path_factory):
    """steps_of(*flags): [(loss, teacher_entropy) of step 1, of step 2] of a DEFAULT run with flags (cached)."""
    require_flags(submission)
    done = {}

    def steps(*flags):
        if flags not in done:
            folder = tmp_path_factory.mktemp('default-arm')
            submission.run(METHOD_FILE, *DEFAULT, *flags, '--output-dir', folder)
            records = submission.metrics(folder)
            expect(len(records) == 2 and all('teacher_entropy' in r for r in records),
                   f'{METHOD_FILE} must log loss and teacher_entropy on every progress line (README.md, step 2)')
            done[flags] = [(r['loss'], r['teacher_entropy']) for r in records]
        return done[flags]
    return steps


def same(a, b):
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b))


def test_the_default_arm_warms_the_teacher_temperature_up(steps_of):
    default = steps_of()
    expect(same(steps_of('--teacher-temp', '0.2')[0], default[0]),
           'the default arm must be the paper\'s method: in the first epoch tau_t is --warmup-teacher-temp (the '
           'warm-up of teacher_temperature_schedule), so --teacher-temp must not change step 1; it does '
           '(README.md, step 3)')
    expect(not same(steps_of('--warmup-teacher-temp', '0.02')[0], default[0]),
           'in the default arm, --warmup-teacher-temp does not change step 1: the teacher must be sharpened with '
           'the scheduled tau_t (README.md, step 3)')
    expect(not same(steps_of('--teacher-temp', '0.2')[1], default[1]),
           'in the default arm, --teacher-temp does not change step 2, which is past the warm-up here: tau_t must '
           'follow teacher_temperature_schedule epoch by epoch (README.md, step 3)')


def test_the_default_arm_centers_and_sharpens(steps_of):
    default = steps_of()
    centered = steps_of('--no-centering')
    expect(same(centered[0], default[0]) and not same(centered[1], default[1]),
           'the default arm must center: --no-centering must change nothing in step 1 (C starts at 0) and change '
           'step 2 (C was updated after step 1) (README.md, step 2)')
    expect(not same(steps_of('--no-sharpening')[0], default[0]),
           'the default arm must sharpen: --no-sharpening (tau_t = tau_s) must change step 1 (README.md, step 3)')


ARMS = {'no centering': ['--no-centering'], 'no sharpening': ['--no-sharpening'], 'both': []}  # assignments/measure.py
