"""Checker of the SimSiam stop-gradient assignment: simsiam.py has --no-stop-gradient; trained 64 steps with it,
the collapse indicator falls to its floor; with the stop-gradient (the default) it stays near 1/sqrt(d).
Two tiny runs.
  pytest assignments/simsiam-stop-gradient [--submission path/to/simsiam.py]"""
import math

from grading import TINY, expect

METHOD_FILE = 'simsiam.py'

BATCH, PROJ_DIM = 32, 32
# 64 SGD steps at a constant lr 2.0 per 256 (--epochs 100, stopped after 8) on 256 textures; heads of width 32.
RUN = ['--data', 'procedural:256', *TINY, '--batch-size', str(BATCH), '--epochs', '100', '--stop-after-epoch', '8',
       '--lr', '2.0', '--proj-hidden-dim', '32', '--proj-dim', str(PROJ_DIM), '--pred-hidden-dim', '8',
       '--log-every', '4', '--knn-every', '-1']
HEALTHY = 1 / math.sqrt(PROJ_DIM)                # 0.177: outputs spread over the unit sphere
FLOOR = 2 / math.sqrt(BATCH * PROJ_DIM)          # 0.0625: all images but one alike (see README.md, "What you see")
THRESHOLD = 0.7 / math.sqrt(PROJ_DIM)            # 0.124, between the two
# Measured, mean of the last 5 logged output_std (steps 48-64), seeds 0-4, OMP_NUM_THREADS=1 / 2:
#   --no-stop-gradient: 0.078-0.097 / 0.063-0.096          stop-gradient: 0.166-0.176 / 0.166-0.171


def require_flag(submission):
    parser = submission.module().parser
    _, unknown = parser.parse_known_args(['--data', 'procedural', '--no-stop-gradient'])
    expect(not unknown, f'{METHOD_FILE} has no --no-stop-gradient flag yet '
                        '(assignments/simsiam-stop-gradient/README.md, step 2)')


def measure(submission, output_dir, *flags):
    """Train 64 steps with `flags`; the mean of the last 5 logged output_std (the paper's Fig. 2 indicator)."""
    submission.run(METHOD_FILE, *RUN, *flags, '--output-dir', output_dir)
    steps = submission.metrics(output_dir)
    expect(steps and 'output_std' in steps[-1], f'{METHOD_FILE} no longer logs output_std (README.md, step 3)')
    return sum(r['output_std'] for r in steps[-5:]) / 5


def test_without_stop_gradient_it_collapses(submission, tmp_path):
    require_flag(submission)
    std = measure(submission, tmp_path, '--no-stop-gradient')
    expect(std < THRESHOLD, f'with --no-stop-gradient, output_std is still {std:.3f} after 64 steps (healthy: '
                            f'{HEALTHY:.3f}, collapsed: {FLOOR:.4f}): does the flag let the gradient through z? '
                            '(README.md, step 2)')


def test_with_stop_gradient_it_does_not(submission, tmp_path):
    require_flag(submission)
    std = measure(submission, tmp_path)
    expect(std > THRESHOLD, f'with the stop-gradient (the default), output_std fell to {std:.3f} after 64 steps '
                            f'(healthy: {HEALTHY:.3f}): the default must stay the paper\'s method (README.md, step 2)')


ARMS = {'no stop-gradient': ['--no-stop-gradient'], 'stop-gradient': []}  # for assignments/measure.py
