"""Submissions the checker is tested on (tests/test_assignments.py): each is a few edits (old, new) of the
reference solution of swav.py; `old` is a short anchor that must occur once. WRONG ones must fail with a
message containing `message` (`tests`: the -k expression of the checks that catch it, to keep the run
short); CORRECT ones are other ways to write the solution that the README allows, and must pass."""
WRONG = {
    'flag-never-reaches-the-codes': dict(
        edits=[('use_sinkhorn=args.sinkhorn', 'use_sinkhorn=True')],
        message='with --no-sinkhorn the loss is still', tests='trivial'),
    'default-arm-without-sinkhorn': dict(
        edits=[("'--sinkhorn', action=argparse.BooleanOptionalAction, default=True",
                "'--sinkhorn', action=argparse.BooleanOptionalAction, default=False")],
        message="the default must stay the paper's method", tests='does_not'),
}

CORRECT = {
    'log-softmax-exponentiated': [  # the same codes, written another way
        ('F.softmax(crop_scores / epsilon, dim=1)[-n:]',
         '(crop_scores / epsilon).log_softmax(dim=-1).exp()[-n:]')],
}
