"""Checker of the InstDisc memory-bank assignment: the non-parametric softmax loss against Eqs. (2)-(3) written
as a loop (value and gradient), the memory update of Sec. 3.2 (the batch's rows, and only those), the same
bank on 2 processes, and instdisc.py training with both. Runs in seconds, plus one tiny run of instdisc.py.
  pytest assignments/instdisc-memory-bank [--submission path/to/instdisc.py]"""
import math

import pytest
import torch
import torch.nn.functional as F

from grading import TINY, expect, load_module, run_distributed

METHOD_FILE = 'instdisc.py'


@pytest.fixture(scope='module')
def instdisc(submission):
    return submission.module()


def try_call(function, *args):
    """function(*args), or the marker NotImplemented while it is still the stub."""
    try:
        return function(*args)
    except NotImplementedError:
        return NotImplemented


def shown(value):
    """A returned value on one line: the number of a 0-d tensor, else its type and shape (never a dump)."""
    if torch.is_tensor(value):
        return f'{float(value.detach()):.6f}' if value.dim() == 0 else f'a tensor of shape {tuple(value.shape)}'
    return type(value).__name__


def reference_loss(f, indices, bank, temperature):
    """Eq. (2) and Eq. (3) literally, in float64: P(i|f_i) = e^(v_i.f_i/T) / sum_j e^(v_j.f_i/T), J = -mean log P."""
    f, bank = f.double(), bank.double()
    terms = []
    for row, i in zip(f, indices.tolist()):
        scores = [torch.exp(v @ row / temperature) for v in bank]
        terms.append(-torch.log(scores[i] / sum(scores)))
    return sum(terms) / len(terms)


def tiny_backbone():
    """A stand-in backbone: the bank and the loss do not care what makes the features."""
    backbone = torch.nn.Linear(4, 4)
    backbone.embed_dim = 4
    return backbone


def make_bank(num_images, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_images, dim, generator=g), dim=1)


def features(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=1)


@pytest.mark.parametrize('n, num_images, temperature', [(1, 5, 0.1), (4, 10, 0.07), (6, 6, 0.5)])
def test_loss_matches_equations_2_and_3(instdisc, n, num_images, temperature):
    bank, f = make_bank(num_images, 8, seed=n), features(n, 8, seed=n + 10)
    indices = torch.randperm(num_images, generator=torch.Generator().manual_seed(n))[:n]
    loss = try_call(instdisc.non_parametric_softmax_loss, f, indices, bank, temperature)
    expect(loss is not NotImplemented, 'non_parametric_softmax_loss is still the stub '
                                       '(assignments/instdisc-memory-bank/README.md, step 2)')
    expected = float(reference_loss(f, indices, bank, temperature))
    expect(torch.is_tensor(loss) and loss.dim() == 0 and math.isclose(float(loss), expected, rel_tol=1e-4),
           f'non_parametric_softmax_loss = {shown(loss)}, Eqs. (2)-(3) give {expected:.6f} for {n} images among {num_images} at '
           f'T = {temperature}: one number, the mean over the batch of -log P(i | f_i) (README.md, step 2)')


def test_loss_gradient_reaches_the_features_not_the_bank(instdisc):
    bank, f = make_bank(10, 8, seed=0), features(4, 8, seed=1)
    indices = torch.tensor([3, 0, 7, 9])
    a, bank_copy = f.clone().requires_grad_(), bank.clone().requires_grad_()
    loss = try_call(instdisc.non_parametric_softmax_loss, a, indices, bank_copy, 0.1)
    expect(loss is not NotImplemented, 'non_parametric_softmax_loss is still the stub (README.md, step 2)')
    loss.backward()
    b = f.double().requires_grad_()
    reference_loss(b, indices, bank, 0.1).backward()
    expect(a.grad is not None and torch.allclose(a.grad.double(), b.grad, rtol=1e-4, atol=1e-7),
           'the gradient of the loss with respect to the features differs from that of Eqs. (2)-(3) (README.md, step 2)')


def test_update_writes_the_batch_rows_and_only_those(instdisc):
    backbone = tiny_backbone()
    for momentum in (0.5, 0.0):
        model = instdisc.InstDisc(backbone, 8, num_images=10)
        before = model.memory_bank.clone()
        f, indices = features(3, 8, seed=2), torch.tensor([7, 2, 5])
        done = try_call(model.update_memory, f, indices, momentum)
        expect(done is not NotImplemented, 'update_memory is still the stub '
                                           '(assignments/instdisc-memory-bank/README.md, step 3)')
        expected = before.clone()
        for row, i in zip(f, indices.tolist()):  # Sec. 3.2: v_i <- normalise(m v_i + (1 - m) f_i)
            mixed = momentum * before[i] + (1 - momentum) * row
            expected[i] = mixed / mixed.norm()
        expect(torch.allclose(model.memory_bank, expected, atol=1e-6),
               f'with memory momentum {momentum}, rows 7, 2 and 5 must become normalise(m v_i + (1 - m) f_i) and '
               'every other row stay as it was (README.md, step 3)')
        expect(not model.memory_bank.requires_grad, 'the memory bank must not keep a gradient (README.md, step 3)')


def _update_on_rank(rank, world_size, path, n):
    instdisc = load_module(path)
    backbone = tiny_backbone()
    torch.manual_seed(0)  # the same starting bank on both ranks
    model = instdisc.InstDisc(backbone, 8, num_images=4 * n)
    f_all = features(world_size * n, 8, seed=3)
    indices_all = torch.randperm(4 * n, generator=torch.Generator().manual_seed(3))[:world_size * n]
    rows = slice(rank * n, (rank + 1) * n)
    model.update_memory(f_all[rows], indices_all[rows], 0.5)  # each rank its own images
    return model.memory_bank


def test_two_processes_write_the_rows_of_both(instdisc, submission, tmp_path):
    n = 3
    backbone = tiny_backbone()
    expect(try_call(instdisc.InstDisc(backbone, 8, 4).update_memory, features(1, 8, 0), torch.tensor([1]), 0.5)
           is not NotImplemented, 'update_memory is still the stub (README.md, step 3)')
    banks = run_distributed(_update_on_rank, submission.path, n, tmp_path=tmp_path)
    torch.manual_seed(0)
    one_process = instdisc.InstDisc(backbone, 8, num_images=4 * n)  # the same start; both ranks' rows at once
    f_all = features(2 * n, 8, seed=3)
    indices_all = torch.randperm(4 * n, generator=torch.Generator().manual_seed(3))[:2 * n]
    one_process.update_memory(f_all, indices_all, 0.5)
    expect(torch.allclose(banks[0], banks[1]) and torch.allclose(banks[0], one_process.memory_bank, atol=1e-6),
           'on 2 processes every rank must write the rows of ALL ranks\' images, so that the banks stay identical '
           '(common.all_gather_no_grad for the features and the indices; README.md, step 4)')


def test_instdisc_py_trains_and_fills_the_bank(instdisc, submission, tmp_path):
    backbone = tiny_backbone()
    expect(try_call(instdisc.InstDisc(backbone, 8, 4).update_memory, features(1, 8, 0), torch.tensor([1]), 0.5)
           is not NotImplemented, 'update_memory is still the stub (README.md, step 3)')
    # one epoch over 64 images (4 steps of 16) with the exact softmax (--nce-k 0, the small-image preset)
    run = ['--data', 'procedural:64', *TINY, '--epochs', '1', '--batch-size', '16', '--knn-every', '-1',
           '--log-every', '1', '--output-dir', tmp_path]
    submission.run(METHOD_FILE, *run)
    bank = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['model']['memory_bank']
    # the bank starts uniform in +-sqrt(3/128), not normalised; after one epoch every row is written, so unit length
    norms = bank.norm(dim=1)
    expect(torch.allclose(norms, torch.ones(64), atol=1e-5),
           f'after one epoch over the 64 images every bank row must be written (unit length); {int((norms - 1).abs().gt(1e-5).sum())} '
           'are not (README.md, step 3)')
    loss = [r['loss'] for r in submission.metrics(tmp_path)]
    expect(len(loss) == 4 and all(0 < x < 100 for x in loss), f'the 4 steps logged these losses: {loss}')
