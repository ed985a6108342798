"""Checker of the SimCLR assignment: nt_xent_loss against Eq. (1) written as a loop, its gradient, and its
gradient on 2 processes (the gather) against one process on the whole batch. Runs in seconds.
  pytest assignments/simclr-nt-xent [--submission path/to/simclr.py]"""
import math

import pytest
import torch

from grading import call, expect, load_module, run_distributed

METHOD_FILE = 'simclr.py'


def reference_loss(z1, z2, temperature):
    """Eq. (1) and Alg. 1 line by line, in float64: views 2k-1 and 2k of the paper are z1[k] and z2[k];
    L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)], l(i, j) = -log e^(s_ij/T) / sum_{k != i} e^(s_ik/T)."""
    views = [v for pair in zip(z1.double(), z2.double()) for v in pair]  # interleaved, as in the paper
    def sim(a, b):
        return (a @ b) / (a.norm() * b.norm())
    def l(i, j):  # noqa: E743 (the paper's name)
        denominator = sum(torch.exp(sim(views[i], views[k]) / temperature) for k in range(len(views)) if k != i)
        return -torch.log(torch.exp(sim(views[i], views[j]) / temperature) / denominator)
    return sum(l(2 * k, 2 * k + 1) + l(2 * k + 1, 2 * k) for k in range(len(z1))) / len(views)


def student_loss(module, z1, z2, temperature):
    """The submission's nt_xent_loss, with a failure that says what is missing when it is still the stub."""
    loss = call(module.nt_xent_loss, z1, z2, temperature)
    expect(loss is not NotImplemented and loss is not None,
           'nt_xent_loss is still the stub: write Eq. (1) (assignments/simclr-nt-xent/README.md, step 2)')
    expect(torch.is_tensor(loss) and loss.dim() == 0,
           f'nt_xent_loss must return one number (a 0-d tensor: the mean over the anchors), '
           f'not {type(loss).__name__} {tuple(getattr(loss, "shape", ()))} (README.md, step 2)')
    return loss


@pytest.fixture(scope='module')
def simclr(submission):
    return submission.module()


def inputs(n, d, seed):
    """Random (unnormalised, so a missing normalisation shows) projections of n images, 2 views."""
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, d, generator=g), 3 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize('n, d, temperature', [(1, 4, 0.5), (4, 8, 0.1), (7, 5, 0.5), (16, 32, 0.2)])
def test_loss_matches_equation_1(simclr, n, d, temperature):
    z1, z2 = inputs(n, d, seed=n)
    loss = float(student_loss(simclr, z1, z2, temperature).detach())
    expected = float(reference_loss(z1, z2, temperature))
    expect(math.isclose(loss, expected, rel_tol=1e-4),
        f'nt_xent_loss = {loss:.6f}, Eq. (1) gives {expected:.6f} for {n} images of dimension {d} at T = {temperature} '
        '(README.md, step 2: positives, the k != i of the denominator, the cosine, the mean over 2n anchors)')


def test_gradient_matches_equation_1(simclr):
    z1, z2 = inputs(6, 8, seed=1)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    student_loss(simclr, a1, a2, 0.2).backward()
    b1, b2 = z1.double().requires_grad_(), z2.double().requires_grad_()
    reference_loss(b1, b2, 0.2).backward()
    expect(a1.grad is not None and a2.grad is not None, 'no gradient reaches z1 and z2 (README.md, step 2)')
    for got, expected in ((a1.grad, b1.grad), (a2.grad, b2.grad)):
        expect(torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-6),
            'the gradient of nt_xent_loss differs from that of Eq. (1) (a detach, or an operation without gradient?)')


def _loss_on_rank(rank, world_size, path, n, d, temperature):
    """One process's share: its n images of the global batch (rank-major), loss and gradient on them."""
    simclr = load_module(path)
    z1_all, z2_all = inputs(world_size * n, d, seed=3)
    z1 = z1_all[rank * n:(rank + 1) * n].clone().requires_grad_()
    z2 = z2_all[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = simclr.nt_xent_loss(z1, z2, temperature)
    loss.backward()
    return dict(loss=float(loss.detach()), grad1=z1.grad, grad2=z2.grad)


def test_two_processes_see_the_negatives_of_both_and_send_their_gradients_back(simclr, submission, tmp_path):
    world_size, n, d, temperature = 2, 3, 8, 0.2
    student_loss(simclr, *inputs(n, d, seed=0), temperature)  # the stub fails here, not in 2 processes
    results = run_distributed(_loss_on_rank, submission.path, n, d, temperature, tmp_path=tmp_path)
    z1, z2 = (z.double().requires_grad_() for z in inputs(world_size * n, d, seed=3))
    expected = reference_loss(z1, z2, temperature)
    expected.backward()
    expected = float(expected.detach())
    # DDP averages the processes' gradients, so the mean of their losses must be the loss of the global batch ...
    mean = sum(r['loss'] for r in results) / world_size
    expect(math.isclose(mean, expected, rel_tol=1e-4),
        f'on 2 processes the mean loss is {mean:.6f}, the global batch gives {expected:.6f}: each anchor must be '
        'compared with the 2N views of ALL processes and find its positive among them (README.md, step 3)')
    # ... and each process's gradient (before that averaging) world_size times the global gradient of its rows
    for rank, r in enumerate(results):
        rows = slice(rank * n, (rank + 1) * n)
        for got, reference in ((r['grad1'], z1.grad[rows]), (r['grad2'], z2.grad[rows])):
            expect(got is not None and torch.allclose(got.double() / world_size, reference, rtol=1e-4, atol=1e-7),
                f'process {rank} gets another gradient than the global batch gives: the gradient must flow back '
                'through the gather to the process that made each view (common.all_gather_with_grad, '
                'README.md, step 3)')
