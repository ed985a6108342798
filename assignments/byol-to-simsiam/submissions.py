"""Submissions the checker is tested on (tests/test_assignments.py): each is a few edits (old, new) of the
reference solution of byol.py; `old` is a short anchor that must occur once. WRONG ones must fail with a
message containing `message` (`tests`: the -k expression of the checks that catch it, to keep the run
short); CORRECT ones are other ways to write the solution that the README allows, and must pass."""
WRONG = {
    'stop-gradient-removed-with-the-target': dict(  # no target and no sg(z): the collapse of SimSiam's Fig. 2
        edits=[('z = F.normalize(z.detach().float(), dim=1)', 'z = F.normalize(z.float(), dim=1)')],
        message='output_std fell to', tests='collapse'),
}

CORRECT = {
    'target-detached-in-the-forward-pass': [  # sg(z) where z is made, as SimSiam's authors' code does
        ('z.append(self.online(x))', 'z.append(self.online(x))\n            p.append(self.predictor(z[-1]))\n'
                                     '            z[-1] = z[-1].detach()'),
        ('            p.append(self.predictor(z[-1]))            # (n, d) q_theta(z_theta), the online prediction\n',
         ''),
        ('z = F.normalize(z.detach().float(), dim=1)', 'z = F.normalize(z.float(), dim=1)')],
}
