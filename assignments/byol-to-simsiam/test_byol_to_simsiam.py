"""Checker of the BYOL -> SimSiam assignment: byol.py trains with no target network (every parameter of its
model is trained by the optimizer; nothing is an untrained moving-average copy) and still does not collapse
(the stop-gradient stayed). It checks what the file does, not its text. One tiny run (64 steps).
  pytest assignments/byol-to-simsiam [--submission path/to/byol.py]"""
import math

import pytest
import torch

from conftest import TINY, expect

METHOD_FILE = 'byol.py'

PROJ_DIM = 32
# 64 SGD steps at a constant lr 2.0 per 256 (--epochs 100, stopped after 8) on 256 textures; heads of width 32.
RUN = ['--data', 'procedural:256', *TINY, '--batch-size', '32', '--epochs', '100', '--stop-after-epoch', '8',
       '--optimizer', 'sgd', '--lr', '2.0', '--proj-hidden-dim', '32', '--proj-dim', str(PROJ_DIM),
       '--pred-hidden-dim', '32', '--log-every', '4', '--knn-every', '-1']
BN_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


@pytest.fixture(scope='module')
def run(submission, tmp_path_factory):
    """The submission trained 64 steps: (its checkpoint, its step records)."""
    output_dir = tmp_path_factory.mktemp('byol')
    submission.run(METHOD_FILE, *RUN, '--output-dir', output_dir)
    return torch.load(output_dir / 'checkpoint.pth', weights_only=True), submission.metrics(output_dir)


def measure(submission, output_dir, *flags):
    """Train 64 steps with `flags`; the smallest of the last 4 logged output_std (what the test asserts on)."""
    submission.run(METHOD_FILE, *RUN, *flags, '--output-dir', output_dir)
    return min(r['output_std'] for r in submission.metrics(output_dir)[-4:])


def test_every_parameter_is_trained_no_target_network(run):
    checkpoint, _ = run
    parameters = {name: t.numel() for name, t in checkpoint['model'].items() if not name.endswith(BN_BUFFERS)}
    # the optimizer keeps one momentum buffer (SGD, LARS) or first moment (AdamW) per parameter it updates
    trained = sum(t.numel() for state in checkpoint['optimizer']['state'].values()
                  for key, t in state.items() if key in ('momentum_buffer', 'exp_avg'))
    untrained = sum(parameters.values()) - trained
    groups = sorted({name.split('.')[0] for name in parameters})
    expect(untrained == 0,
           f'{METHOD_FILE} still holds {untrained} of {sum(parameters.values())} weights that the optimizer never '
           f'updates (the model has the parts {", ".join(groups)}): a target network that follows by a moving '
           'average is still there. Remove it (assignments/byol-to-simsiam/README.md, step 1)')


def test_the_online_network_does_not_collapse(run):
    _, steps = run
    expect(steps and 'output_std' in steps[-1], f'{METHOD_FILE} no longer logs output_std, the collapse indicator '
                                                '(keep logger.step(..., output_std=...); README.md, step 3)')
    last = [r['output_std'] for r in steps[-4:]]  # the last 4 logged values, steps 52-64
    # Measured (seeds 0-4, 1 and 2 threads): with the stop-gradient TO BE FILLED IN
    expect(min(last) > 0.2 / math.sqrt(PROJ_DIM),
           f'output_std fell to {min(last):.4f} (healthy: about {1 / math.sqrt(PROJ_DIM):.3f} = 1/sqrt(d); collapsed: 0): '
           'every image gets the same projection. The online network may be its own target only behind a '
           'stop-gradient (README.md, step 2)')


ARMS = {'no target network': []}  # for assignments/measure.py
