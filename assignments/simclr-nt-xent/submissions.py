"""Submissions the checker is tested on (tests/test_assignments.py): each is a few edits (old, new) of the
reference solution of simclr.py; `old` is a short anchor that must occur once. WRONG ones must fail with a
message containing `message` (`tests`: the -k expression of the checks that catch it, to keep the run
short); CORRECT ones are other ways to write the solution that the README allows, and must pass."""
WRONG = {
    'no-normalisation': dict(
        edits=[('z = F.normalize(torch.cat([z1, z2]).float(), dim=1)', 'z = torch.cat([z1, z2]).float()')],
        message='Eq. (1) gives', tests='equation_1 and not gradient'),
    'anchor-not-masked': dict(  # the denominator keeps k = i
        edits=[("logits = logits.masked_fill(F.one_hot(self_index, keys.shape[0]).bool(), float('-inf'))",
                'logits = logits')],
        message='Eq. (1) gives', tests='equation_1 and not gradient'),
    'gathered-without-gradient': dict(  # the loss value is right; the other process's views get no gradient
        edits=[('common.all_gather_with_grad(z)', 'common.all_gather_no_grad(z)')],
        message='gets another gradient than the global batch gives', tests='two_processes'),
    'positive-of-the-first-process': dict(  # every process looks for its positives in process 0's rows
        edits=[('positive_index = rank * 2 * n + (anchor + n) % (2 * n)',
                'positive_index = (anchor + n) % (2 * n)')],
        message='on 2 processes the mean loss is', tests='two_processes'),
    'fails-on-import': dict(  # one line, not the traceback of the import
        edits=[('import torch.nn.functional as F\n', 'import torch.nn.functional as F\nundefined_name\n')],
        message="importing simclr.py failed: NameError: name 'undefined_name' is not defined",
        tests='equation_1 and not gradient'),
    'a-matrix-returned': dict(
        edits=[('return F.cross_entropy(logits, positive_index)',
                "return F.cross_entropy(logits, positive_index, reduction='none')")],
        message='must return one number', tests='equation_1 and not gradient'),
}

CORRECT = {
    'log-softmax-and-a-gather': [  # the positive's log-probability picked by hand instead of cross_entropy
        ('return F.cross_entropy(logits, positive_index)',
         'return -logits.log_softmax(dim=1).gather(1, positive_index[:, None]).mean()')],
}
