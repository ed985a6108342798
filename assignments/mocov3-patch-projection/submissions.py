"""Submissions the checker is tested on (tests/test_assignments.py): each is a few edits (old, new) of the
reference solution of mocov3.py; `old` is a short anchor that must occur once. WRONG ones must fail with a
message containing `message` (`tests`: the -k expression of the checks that catch it, to keep the run
short); CORRECT ones are other ways to write the solution that the README allows, and must pass."""
WRONG = {
    'norm-of-the-weights-not-of-their-gradient': dict(
        edits=[('p.grad.float().norm() for p in backbone.patch_embed.parameters()',
                'p.float().norm() for p in backbone.patch_embed.parameters()')],
        message='but the gradient AdamW applied to the patch projection has norm',
        tests='trainable'),
}

CORRECT = {
    'all-gradients-as-one-vector': [  # weight and bias flattened into one vector: the same L2 norm
        ('grads = [p.grad.float().norm() for p in backbone.patch_embed.parameters() if p.grad is not None]',
         'grads = [p.grad.float().flatten() for p in backbone.patch_embed.parameters() if p.grad is not None]'),
        ('torch.stack(grads).norm() if grads', 'torch.cat(grads).norm() if grads')],
}
