"""Checker of the BYOL -> SimSiam assignment: byol.py trains with no target network (every parameter of its
model is trained by the optimizer; nothing is an untrained moving-average copy) and still does not collapse
(the stop-gradient stayed). It checks what the file does, not its text. Two tiny runs (1 and 64 steps).
  pytest assignments/byol-to-simsiam [--submission path/to/byol.py]"""
import math

import pytest
import torch

from grading import TINY, expect

METHOD_FILE = 'byol.py'

PROJ_DIM = 32
# 64 SGD steps at a constant lr 2.0 per 256 (--epochs 100, stopped after 8) on 256 textures; heads of width 32.
RUN = ['--data', 'procedural:256', *TINY, '--batch-size', '32', '--epochs', '100', '--stop-after-epoch', '8',
       '--optimizer', 'sgd', '--lr', '2.0', '--proj-hidden-dim', '32', '--proj-dim', str(PROJ_DIM),
       '--pred-hidden-dim', '32', '--log-every', '4', '--knn-every', '-1']
BN_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


def untrained_weights(submission, output_dir):
    """One step of the submission (32 images, batch 32); (weights the optimizer did not update, all weights,
    the model's top-level parts) from its checkpoint: the optimizer keeps one momentum buffer (SGD, LARS) or
    first moment (AdamW) per parameter it updates, whatever the parameters are named."""
    submission.run(METHOD_FILE, *RUN, '--data', 'procedural:32', '--epochs', '1', '--stop-after-epoch', '1',
                   '--output-dir', output_dir)
    checkpoint = torch.load(output_dir / 'checkpoint.pth', weights_only=True)
    parameters = {name: t.numel() for name, t in checkpoint['model'].items() if not name.endswith(BN_BUFFERS)}
    trained = sum(t.numel() for state in checkpoint['optimizer']['state'].values()
                  for key, t in state.items() if key in ('momentum_buffer', 'exp_avg'))
    return sum(parameters.values()) - trained, sum(parameters.values()), sorted({n.split('.')[0] for n in parameters})


@pytest.fixture(scope='module')
def one_step(submission, tmp_path_factory):
    return untrained_weights(submission, tmp_path_factory.mktemp('one-step'))


def require_no_target(one_step):
    untrained, total, parts = one_step
    expect(untrained == 0,
           f'{METHOD_FILE} still holds {untrained} of {total} weights that the optimizer never updates (the model has '
           f'the parts {", ".join(parts)}): a target network that follows by a moving average is still there. '
           'Remove it (assignments/byol-to-simsiam/README.md, step 1)')


def measure(submission, output_dir, *flags):
    """Train 64 steps with `flags`; the smallest of the last 4 logged output_std (steps 52-64)."""
    submission.run(METHOD_FILE, *RUN, *flags, '--output-dir', output_dir)
    steps = submission.metrics(output_dir)
    expect(steps and 'output_std' in steps[-1], f'{METHOD_FILE} no longer logs output_std, the collapse indicator '
                                                '(keep logger.step(..., output_std=...); README.md, step 3)')
    return min(r['output_std'] for r in steps[-4:])


def test_every_parameter_is_trained_no_target_network(one_step):
    require_no_target(one_step)


def test_the_online_network_does_not_collapse(one_step, submission, tmp_path):
    require_no_target(one_step)  # first things first: on BYOL itself this would pass
    std = measure(submission, tmp_path)
    # Measured, reference solution, seeds 0-4: 0.058-0.108 (1 thread), 0.069-0.090 (2 threads); without the
    # .detach() too (one run per lr, 1 thread): 0.002 (lr 2.0), 0.004 (lr 1.0). Threshold 0.035.
    expect(std > 0.2 / math.sqrt(PROJ_DIM),
           f'output_std fell to {std:.4f} (healthy: about {1 / math.sqrt(PROJ_DIM):.3f} = 1/sqrt(d); collapsed: 0): '
           'every image gets the same projection. The online network may be its own target only behind a '
           'stop-gradient (README.md, step 2)')


ARMS = {'no target network': []}  # for assignments/measure.py
