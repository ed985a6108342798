"""Checker of the MoCo queue assignment: MoCo.enqueue keeps exactly the K most recent keys (first in, first out),
the same queue on every process, filled with the keys of all of them; moco.py then trains with it, and every
query is scored against 1 + K keys. Runs in seconds, plus one tiny run of moco.py.
  pytest assignments/moco-queue [--submission path/to/moco.py]"""
import pytest
import torch
import torch.nn.functional as F

from grading import TINY, expect, load_module, one_line, run_distributed

METHOD_FILE = 'moco.py'


def make_model(moco, queue_size, dim):
    """A MoCo with a tiny linear 'backbone' (the queue does not care what makes the keys)."""
    backbone = torch.nn.Linear(4, 8)
    backbone.embed_dim = 8
    return moco.MoCo(backbone, dim, mlp=False, queue_size=queue_size, symmetric=False, bn_splits=1)


def call_enqueue(model, keys):
    try:
        model.enqueue(keys)
    except NotImplementedError:
        return False
    return True


def rows(queue):
    """The queue's keys as a sorted list of tuples: a multiset, whatever the order they are kept in."""
    return sorted(tuple(round(float(x), 5) for x in row) for row in queue)


def batches(count, n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, dim, generator=g), dim=1) for _ in range(count)]


@pytest.fixture(scope='module')
def moco(submission):
    return submission.module()


def test_the_queue_keeps_the_last_k_keys(moco):
    queue_size, n, dim = 12, 4, 6
    model = make_model(moco, queue_size, dim)
    keys = batches(7, n, dim, seed=0)  # 28 keys through a queue of 12
    expect(call_enqueue(model, keys[0]), 'MoCo.enqueue is still the stub (assignments/moco-queue/README.md, step 2)')
    for step, batch in enumerate(keys[1:], 2):
        model.enqueue(batch)
        expect(model.queue.shape == (queue_size, dim), f'the queue must keep its shape ({queue_size}, {dim}), not '
                                                       f'{tuple(model.queue.shape)} (README.md, step 2)')
        enqueued = rows(torch.cat(keys[:step]))
        if step * n < queue_size:  # not full yet: every key so far is in (beside what is left of the random start)
            expect(set(enqueued) <= set(rows(model.queue)),
                   f'after {step} batches of {n} keys the queue of {queue_size} must hold all {step * n} (README.md, step 2)')
        else:
            expect(rows(model.queue) == rows(torch.cat(keys[:step])[-queue_size:]),
                   f'after {step} batches of {n} keys, a queue of {queue_size} must hold exactly the {queue_size} most '
                   'recent keys: each batch replaces the oldest ones (README.md, step 2)')


def test_enqueue_stores_keys_not_a_graph(moco):
    model = make_model(moco, 8, 6)
    keys = batches(1, 4, 6, seed=1)[0].requires_grad_()
    try:
        expect(call_enqueue(model, keys.bfloat16()), 'MoCo.enqueue is still the stub (README.md, step 2)')
    except Exception as error:  # noqa: BLE001  (e.g. a copy of bfloat16 keys into the float32 queue)
        expect(False, f'MoCo.enqueue failed on bfloat16 keys ({one_line(error)}): keys arrive in bfloat16 under '
                      'autocast; convert them to float32 (README.md, step 2)')
    expect(not model.queue.requires_grad and model.queue.dtype == torch.float32,
           'the queue must stay a float32 buffer without gradient: enqueue keys under no_grad, as float32 '
           '(under bf16 autocast the keys arrive in bf16; README.md, step 2)')


def _enqueue_on_rank(rank, world_size, path, queue_size, n, dim):
    moco = load_module(path)
    torch.manual_seed(0)  # the same random start on every rank, as MoCo's identical initialisation
    model = make_model(moco, queue_size, dim)
    for batch in batches(3, world_size * n, dim, seed=2):  # the global batch of each step, rank-major
        model.enqueue(batch[rank * n:(rank + 1) * n])      # this rank's own keys
    return model.queue


def test_two_processes_hold_the_same_queue_of_the_keys_of_both(moco, submission, tmp_path):
    queue_size, n, dim = 12, 3, 6  # 6 keys a step (3 per process); K a multiple of them, as moco.py requires
    expect(call_enqueue(make_model(moco, queue_size, dim), batches(1, n, dim, seed=0)[0]),
           'MoCo.enqueue is still the stub (README.md, step 2)')
    queues = run_distributed(_enqueue_on_rank, submission.path, queue_size, n, dim, tmp_path=tmp_path)
    expect(torch.equal(queues[0], queues[1]), 'on 2 processes the two queues differ: each must enqueue the keys of '
                                              'ALL processes (common.all_gather_no_grad; README.md, step 3)')
    enqueued = torch.cat(batches(3, 2 * n, dim, seed=2))  # 18 keys of 2 processes, a queue of 12
    expect(rows(queues[0]) == rows(enqueued[-queue_size:]),
           f'on 2 processes the queue must hold the {queue_size} most recent keys of both (README.md, step 3)')


def queue_after_epoch(submission, output_dir, epoch):
    """Train moco.py (resuming from output_dir) until the end of `epoch`; the checkpoint's queue as rows."""
    # one step an epoch: 16 images, batch 16, symmetric loss (the small-image preset): 32 keys a step, K = 64
    run = ['--data', 'procedural:16', *TINY, '--epochs', '3', '--batch-size', '16', '--queue-size', '64',
           '--bn-splits', '2', '--knn-every', '-1', '--log-every', '1', '--output-dir', output_dir]
    submission.run(METHOD_FILE, *run, *(['--stop-after-epoch', epoch] if epoch < 3 else []))
    checkpoint = torch.load(output_dir / 'checkpoint.pth', weights_only=True)
    expect('queue' in checkpoint['model'], 'the checkpoint has no queue: keep it a buffer of MoCo (README.md, step 2)')
    return set(rows(checkpoint['model']['queue']))


def test_moco_py_keeps_the_newest_keys_across_a_resume(submission, moco, tmp_path):
    expect(call_enqueue(make_model(moco, 8, 6), batches(1, 4, 6, seed=0)[0]),
           'MoCo.enqueue is still the stub (README.md, step 2)')
    # 3 epochs of one step, each run resumed from the last: the queue of 64 holds 2 steps of 32 keys
    queues = [queue_after_epoch(submission, tmp_path, epoch) for epoch in (1, 2, 3)]
    new = [queues[1] - queues[0], queues[2] - queues[1]]  # the keys epochs 2 and 3 enqueued
    expect(len(new[0]) == 32 and len(new[1]) == 32,
           f'each step enqueues 32 keys (2 views x 16 images); epochs 2 and 3 (one step each, each run resumed) '
           f'put {len(new[0])} and {len(new[1])} new keys in the queue (README.md, step 2)')
    expect(queues[2] == new[0] | new[1],
           'after epoch 3 (resumed from a checkpoint) the queue of 64 must hold the keys of epochs 2 and 3, the 64 '
           f'most recent; it kept only {len(queues[2] & new[0])} of the 32 keys of epoch 2: a resumed run must go on '
           'replacing the oldest keys, so where they are must be saved in the checkpoint (a buffer such as '
           'self.queue_ptr; README.md, step 2)')
    loss = [r['loss'] for r in submission.metrics(tmp_path)]
    expect(len(loss) == 3 and all(0 < x < 100 for x in loss), f'the 3 steps logged these losses: {loss}')
