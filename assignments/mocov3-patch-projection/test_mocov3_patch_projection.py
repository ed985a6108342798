"""Checker of the MoCo v3 patch-projection assignment: mocov3.py logs patch_grad_norm, the gradient norm of the
ViT's first layer, measured after the backward pass (checked against the gradient AdamW saw); it is 0 and the
patch projection never moves when frozen (the default for ViTs), and > 0 and moving with --no-freeze-patch-embed.
Four runs of one or two steps of a tiny ViT.
  pytest assignments/mocov3-patch-projection [--submission path/to/mocov3.py]"""
import math

import pytest
import torch

from grading import TINY, expect

METHOD_FILE = 'mocov3.py'

# A ViT-Tiny on 16-px crops (patches of 4), AdamW from the first step (no warm-up), small heads, 32 images a step.
RUN = [*TINY, '--arch', 'vit_tiny', '--batch-size', '32', '--epochs', '2', '--optimizer', 'adamw', '--lr', '1e-3',
       '--warmup-epochs', '0', '--mlp-hidden-dim', '64', '--proj-dim', '32', '--log-every', '1', '--knn-every', '-1']
PATCH = 'base_encoder.backbone.patch_embed.'
BETA1 = 0.9  # AdamW's first-moment rate (common.build_optimizer): after one step its exp_avg is (1 - beta1) * grad


def two_epochs(submission, output_dir, images, *flags):
    """Epoch 1 (stopped), then epoch 2 (resumed): (checkpoint after 1, checkpoint after 2, logged patch_grad_norm)."""
    run = [*RUN, '--data', f'procedural:{images}', *flags, '--output-dir', output_dir]
    submission.run(METHOD_FILE, *run, '--stop-after-epoch', '1')
    expect(all('patch_grad_norm' in r for r in submission.metrics(output_dir)),
           f'{METHOD_FILE} does not log patch_grad_norm on every progress line yet '
           '(assignments/mocov3-patch-projection/README.md, step 2)')
    first = torch.load(output_dir / 'checkpoint.pth', weights_only=True)
    submission.run(METHOD_FILE, *run)
    second = torch.load(output_dir / 'checkpoint.pth', weights_only=True)
    return first, second, [r['patch_grad_norm'] for r in submission.metrics(output_dir)]


def patch_weights(checkpoint):
    return {k: v for k, v in checkpoint['model'].items() if k.startswith(PATCH)}


@pytest.fixture(scope='module')
def frozen(submission, tmp_path_factory):
    return two_epochs(submission, tmp_path_factory.mktemp('frozen'), 64)  # 2 steps an epoch


@pytest.fixture(scope='module')
def trained(submission, tmp_path_factory):
    return two_epochs(submission, tmp_path_factory.mktemp('trained'), 32, '--no-freeze-patch-embed')  # 1 step


def test_frozen_patch_projection_has_no_gradient_and_never_moves(frozen):
    first, second, norms = frozen
    expect(all(x == 0 for x in norms), f'the patch projection is frozen (the default for ViTs), yet patch_grad_norm '
                                       f'logged {norms}: a frozen layer has no gradient, so 0 (README.md, step 2)')
    for name, value in patch_weights(first).items():
        expect(torch.equal(value, second['model'][name]), f'{name} changed in epoch 2 although frozen (README.md, step 1)')
    moved = [k for k, v in first['model'].items() if k.startswith('base_encoder.') and not torch.equal(v, second['model'][k])]
    expect(moved, 'nothing of the base encoder changed in epoch 2: did training run? (README.md, step 1)')


def test_trainable_patch_projection_logs_the_gradient_adamw_used(trained):
    first, second, norms = trained
    state = first['optimizer']['state']
    weight_shape = first['model'][PATCH + 'weight'].shape
    [index] = [i for i, s in state.items() if s['exp_avg'].shape == weight_shape]  # the only 4-d (D, 3, p, p) tensor
    grad_weight = state[index]['exp_avg'].norm().item() / (1 - BETA1)
    bias = state.get(index + 1, {}).get('exp_avg')  # the bias follows the weight among the parameters
    grad_both = math.hypot(grad_weight, bias.norm().item() / (1 - BETA1)) if bias is not None else grad_weight
    expect(norms[0] > 0, f'with --no-freeze-patch-embed, the first step logged patch_grad_norm {norms[0]} (README.md, step 2)')
    expect(any(math.isclose(norms[0], g, rel_tol=1e-3) for g in (grad_both, grad_weight)),
           f'step 1 logged patch_grad_norm {norms[0]:.6g}, but the gradient AdamW applied to the patch projection has norm '
           f'{grad_both:.6g} (weight and bias; weight alone {grad_weight:.6g}): measure it after loss.backward() and '
           'before optimizer.step() / the next zero_grad (README.md, step 2)')
    for name, value in patch_weights(first).items():
        expect(not torch.equal(value, second['model'][name]),
               f'{name} did not change in epoch 2 although --no-freeze-patch-embed (README.md, step 1)')
