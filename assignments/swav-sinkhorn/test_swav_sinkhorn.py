"""Checker of the SwAV Sinkhorn assignment: swav.py has --no-sinkhorn; trained 48 steps with it, SwAV finds the
trivial solution (the swapped-prediction loss falls to 0, every image goes to one prototype); with Sinkhorn-Knopp
(the default) the loss stays near ln K. Two tiny runs.
  pytest assignments/swav-sinkhorn [--submission path/to/swav.py]"""
import argparse
import math
import os

import torch

from grading import TINY, common, expect

METHOD_FILE = 'swav.py'

PROTOTYPES = 50
# 48 SGD steps at a constant lr 2.0 per 256 (--epochs 100, stopped after 6) on 256 textures, 2 global crops of 16 px
# and 2 local ones of 8 px, K = 50 prototypes, no queue, prototypes trained from the first step.
RUN = ['--data', 'procedural:256', *TINY, '--batch-size', '32', '--epochs', '100', '--stop-after-epoch', '6',
       '--optimizer', 'sgd', '--lr', '2.0', '--size-crops', '16', '8', '--nmb-crops', '2', '2',
       '--min-scale-crops', '0.14', '0.05', '--max-scale-crops', '1', '0.14', '--nmb-prototypes', str(PROTOTYPES),
       '--proj-hidden-dim', '32', '--queue-length', '0', '--freeze-prototypes-epochs', '0', '--log-every', '4',
       '--knn-every', '-1']
LN_K = math.log(PROTOTYPES)  # 3.91: the loss of uniform predictions
# Measured, mean of the last 5 logged losses (steps 32-48) / ln K, seeds 0-4, OMP_NUM_THREADS=1 / 2:
#   --no-sinkhorn: 0.00018-0.00020 (both)        Sinkhorn: 0.989-1.001 / 0.988-1.001


def require_flag(submission):
    _, unknown = submission.module().parser.parse_known_args(['--data', 'procedural', '--no-sinkhorn'])
    expect(not unknown, f'{METHOD_FILE} has no --no-sinkhorn flag yet (assignments/swav-sinkhorn/README.md, step 2)')


def measure(submission, output_dir, *flags):
    """Train 48 steps with `flags`; the mean of the last 5 logged losses, as a fraction of ln K."""
    submission.run(METHOD_FILE, *RUN, *flags, '--output-dir', output_dir)
    return sum(r['loss'] for r in submission.metrics(output_dir)[-5:]) / 5 / LN_K


def largest_prototype_share(submission, checkpoint_path):
    """The share of 200 test images whose best prototype (argmax_k z.c_k) is the most common one, evaluated
    with the trained backbone, head and prototypes of the checkpoint (BatchNorm in eval mode)."""
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    args = argparse.Namespace(**dict(checkpoint['args'], knn_every=0))
    swav = submission.module()
    model = swav.SwAV(common.build_backbone(args), args.proj_hidden_dim, args.proj_dim, args.nmb_prototypes,
                      args.queue_length)
    model.load_state_dict(checkpoint['model'])
    model.eval()
    _, test = common.build_eval_loaders(args, torch.device('cpu'))
    views, _, _ = next(iter(test.epoch(0)))                       # the first batch of test images
    with torch.no_grad():
        _, scores = model([views[0][:200]])                        # (200, K)
    counts = torch.bincount(scores.argmax(dim=1), minlength=args.nmb_prototypes)
    return float(counts.max()) / len(scores)


def test_without_sinkhorn_swav_finds_the_trivial_solution(submission, tmp_path):
    require_flag(submission)
    loss = measure(submission, tmp_path, '--no-sinkhorn')
    expect(loss < 0.1, f'with --no-sinkhorn the loss is still {loss:.2f} ln K after 48 steps (the trivial solution '
                       'drives it to 0): are the codes softmax(scores / eps) of each sample? (README.md, step 2)')
    share = largest_prototype_share(submission, os.path.join(tmp_path, 'checkpoint.pth'))
    # Measured (seeds 0-4, 1 and 2 threads): 1.0 in every run. With Sinkhorn: 0.25-0.995, so this is no test of
    # the default: in eval mode the raw scores may favour one prototype; Sinkhorn spreads the codes, in training
    expect(share > 0.9, f'with --no-sinkhorn, only {share:.0%} of the test images go to the most common prototype '
                        '(the trivial solution: all of them; README.md, step 3)')


def test_with_sinkhorn_it_does_not(submission, tmp_path):
    require_flag(submission)
    loss = measure(submission, tmp_path)
    expect(loss > 0.5, f'with Sinkhorn-Knopp (the default) the loss fell to {loss:.2f} ln K in 48 steps: the default must '
                       'stay the paper\'s method (README.md, step 2)')


def measure_share(submission, output_dir, *flags):
    """Train 48 steps with `flags`; the largest share of 200 test images on one prototype."""
    submission.run(METHOD_FILE, *RUN, *flags, '--output-dir', output_dir)
    return largest_prototype_share(submission, os.path.join(output_dir, 'checkpoint.pth'))


ARMS = {'no sinkhorn': ['--no-sinkhorn'], 'sinkhorn': [],  # for assignments/measure.py
        'no sinkhorn: share': (measure_share, ['--no-sinkhorn']), 'sinkhorn: share': (measure_share, [])}
