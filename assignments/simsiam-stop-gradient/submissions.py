"""Submissions the checker is tested on (tests/test_assignments.py): each is a few edits (old, new) of the
reference solution of simsiam.py; `old` is a short anchor that must occur once. WRONG ones must fail with a
message containing `message` (`tests`: the -k expression of the checks that catch it, to keep the run
short); CORRECT ones are other ways to write the solution that the README allows, and must pass."""
WRONG = {
    'stop-gradient-removed-in-one-term-only': dict(
        edits=[('negative_cosine(p2, z1, stop_gradient)', 'negative_cosine(p2, z1)')],
        message='with respect to z1 must be the gradient of Eq. (4)', tests='both_terms'),
    'no-stop-gradient-detaches-p-instead-of-z': dict(  # still collapses, for the wrong reason
        edits=[('p = F.normalize(p.float(), dim=1)',
                'p = F.normalize((p if stop_gradient else p.detach()).float(), dim=1)')],
        message='with respect to p1 must be the gradient of Eq. (4)', tests='both_terms'),
    'default-off': dict(
        edits=[("'--stop-gradient', action=argparse.BooleanOptionalAction, default=True",
                "'--stop-gradient', action=argparse.BooleanOptionalAction, default=False")],
        message='--stop-gradient must be on by default', tests='both_terms'),
    'flag-never-reaches-the-loss': dict(
        edits=[('simsiam_loss(p1, p2, z1, z2, args.stop_gradient)', 'simsiam_loss(p1, p2, z1, z2)')],
        message='with --no-stop-gradient, output_std is still', tests='collapses'),
}

CORRECT = {
    'stop-gradient-as-a-product': [  # sg by arithmetic: with it, z gets a zero gradient rather than none
        ('(z.detach() if stop_gradient else z)', '(z.detach() * stop_gradient + z * (not stop_gradient))')],
}
