"""Checker of the SimSiam stop-gradient assignment: simsiam.py has --no-stop-gradient; trained 64 steps with it,
the collapse indicator falls to its floor; with the stop-gradient (the default) it stays near 1/sqrt(d).
Two tiny runs.
  pytest assignments/simsiam-stop-gradient [--submission path/to/simsiam.py]"""
import math

import pytest
import torch

from grading import TINY, call, expect

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
    args, unknown = parser.parse_known_args(['--data', 'procedural', '--no-stop-gradient'])
    expect(not unknown, f'{METHOD_FILE} has no --no-stop-gradient flag yet '
                        '(assignments/simsiam-stop-gradient/README.md, step 2)')
    expect(getattr(parser.parse_known_args(['--data', 'procedural'])[0], 'stop_gradient', None) is True,
           '--stop-gradient must be on by default (args.stop_gradient True without a flag): the default is the '
           "paper's method (README.md, step 2)")


def reference_loss(p1, p2, z1, z2, stop_gradient):
    """Eq. (4) written out, in float64: D(p1, sg(z2))/2 + D(p2, sg(z1))/2, D(p, z) = -mean of the cosines;
    without the stop-gradient, Eq. (1) alone: z is not detached."""
    def D(p, z):
        z = z.detach() if stop_gradient else z
        return -((p * z).sum(dim=1) / (p.norm(dim=1) * z.norm(dim=1))).mean()
    return D(p1, z2) / 2 + D(p2, z1) / 2


@pytest.mark.parametrize('stop_gradient', [True, False])
def test_loss_and_its_gradient_in_both_terms(submission, stop_gradient):
    require_flag(submission)
    g = torch.Generator().manual_seed(0)
    inputs = [3 * torch.randn(6, 5, generator=g) for _ in range(4)]  # p1, p2, z1, z2: 6 images, d = 5
    mine = [x.clone().requires_grad_() for x in inputs]
    theirs = [x.double().requires_grad_() for x in inputs]
    loss = call(submission.module().simsiam_loss, *mine, stop_gradient=stop_gradient)
    expect(torch.is_tensor(loss) and loss.dim() == 0,
           f'simsiam_loss(p1, p2, z1, z2, stop_gradient={stop_gradient}) must return one number (a 0-d tensor), '
           f'not {type(loss).__name__}: give simsiam_loss the argument stop_gradient (README.md, step 2)')
    expected = reference_loss(*theirs, stop_gradient)
    expect(math.isclose(float(loss.detach()), float(expected.detach()), rel_tol=1e-5, abs_tol=1e-6),
           f'simsiam_loss(..., stop_gradient={stop_gradient}) = {float(loss.detach()):.6f}, Eq. (4) gives '
           f'{float(expected.detach()):.6f} (README.md, step 2)')
    loss.backward()
    expected.backward()
    arm = 'with the stop-gradient (the default)' if stop_gradient else 'with --no-stop-gradient'
    for name, got, reference in zip(('p1', 'p2', 'z1', 'z2'), mine, theirs):
        got = torch.zeros_like(reference) if got.grad is None else got.grad.double()  # none: 0
        reference = torch.zeros_like(reference) if reference.grad is None else reference.grad
        if not torch.allclose(got, reference, rtol=1e-4, atol=1e-7):
            should = 'none' if reference.abs().max() == 0 else 'the gradient of Eq. (4)'
            gets = 'none' if got.abs().max() == 0 else 'another one'
            expect(False, f'{arm}, the gradient of simsiam_loss with respect to {name} must be {should}; it gets '
                          f'{gets}. The stop-gradient is on z, in BOTH terms of Eq. (4); p always keeps its '
                          'gradient (README.md, step 2)')


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
