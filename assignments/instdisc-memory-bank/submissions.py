"""Submissions the checker is tested on (tests/test_assignments.py): each is a few edits (old, new) of the
reference solution of instdisc.py; `old` is a short anchor that must occur once. WRONG ones must fail with a
message containing `message` (`tests`: the -k expression of the checks that catch it, to keep the run
short); CORRECT ones are other ways to write the solution that the README allows, and must pass."""
WRONG = {
    'bank-rows-not-renormalised': dict(
        edits=[('F.normalize(mixed, dim=1))', 'mixed)')],
        message='must become normalise(m v_i + (1 - m) f_i)', tests='only_those'),
    'momentum-on-the-wrong-side': dict(  # the same at m = 0.5; m = 0 shows it
        edits=[('momentum * self.memory_bank[indices] + (1 - momentum) * f',
                '(1 - momentum) * self.memory_bank[indices] + momentum * f')],
        message='with memory momentum 0.0', tests='only_those'),
    'rows-of-this-process-only': dict(
        edits=[('common.all_gather_no_grad(f.float())', 'f.float()'),
               ('common.all_gather_no_grad(indices)', 'indices')],
        message="every rank must write the rows of ALL ranks' images", tests='two_processes'),
    'softmax-over-the-batch-only': dict(  # the batch's own entries as the only classes
        edits=[('f.float() @ memory_bank.T / temperature', 'f.float() @ memory_bank[indices].T / temperature'),
               ('F.cross_entropy(logits, indices)', 'F.cross_entropy(logits, torch.arange(len(f)))')],
        message='Eqs. (2)-(3) give', tests='equations_2_and_3'),
    'loss-per-image': dict(
        edits=[('F.cross_entropy(logits, indices)',
                "F.cross_entropy(logits, indices, reduction='none')")],
        message='one number, the mean over the batch', tests='equations_2_and_3'),
}

CORRECT = {
    'a-loop-and-a-log-softmax': [  # rows written one by one; the positive's log-probability picked by hand
        ('self.memory_bank.index_copy_(0, indices, F.normalize(mixed, dim=1))',
         'for row, i in zip(F.normalize(mixed, dim=1), indices.tolist()):\n'
         '            self.memory_bank[i] = row'),
        ('return F.cross_entropy(logits, indices)',
         'return -logits.log_softmax(dim=1)[torch.arange(len(f)), indices].mean()')],
}
