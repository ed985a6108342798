"""Submissions the checker is tested on (tests/test_assignments.py): each is a few edits (old, new) of the
reference solution of moco.py; `old` is a short anchor that must occur once. WRONG ones must fail with a
message containing `message` (`tests`: the -k expression of the checks that catch it, to keep the run
short); CORRECT ones are other ways to write the solution that the README allows, and must pass."""
WRONG = {
    'pointer-in-a-python-attribute': dict(  # restarts at 0 after a resume: overwrites the newest keys
        edits=[('(self.queue_ptr + torch.arange', "(getattr(self, 'next_row', 0) + torch.arange"),
               ('self.queue_ptr.add_(len(keys)).remainder_(len(self.queue))',
                'self.next_row = (getattr(self, "next_row", 0) + len(keys)) % len(self.queue)')],
        message='a resumed run must go on replacing the oldest keys', tests='resume'),
    'pointer-never-moves': dict(
        edits=[('self.queue_ptr.add_(len(keys)).remainder_(len(self.queue))', 'pass')],
        message='the queue of 12 must hold all 8', tests='last_k'),
    'keys-of-this-process-only': dict(
        edits=[('common.all_gather_no_grad(keys.float())', 'keys.float()')],
        message='the two queues differ', tests='two_processes'),
    'bfloat16-keys-copied-as-they-are': dict(
        edits=[('common.all_gather_no_grad(keys.float())', 'common.all_gather_no_grad(keys)')],
        message='failed on bfloat16 keys', tests='graph'),
    'always-the-first-rows': dict(  # the newest keys are the ones overwritten
        edits=[('self.queue.index_copy_(0, positions, keys)',
                'self.queue.copy_(torch.cat([keys, self.queue[len(keys):]]))')],
        message='the queue of 12 must hold all 8', tests='last_k'),
}

CORRECT = {
    'authors-slice-assignment': [  # the MoCo authors' _dequeue_and_enqueue (asserts K % batch == 0)
        ('self.queue.index_copy_(0, positions, keys)',
         'pointer = int(self.queue_ptr)\n        assert len(self.queue) % len(keys) == 0\n'
         '        self.queue[pointer:pointer + len(keys)] = keys'),
        ('self.queue_ptr.add_(len(keys)).remainder_(len(self.queue))',
         'self.queue_ptr[0] = (pointer + len(keys)) % len(self.queue)')],
    'concatenation': [  # no pointer at all: the oldest keys are always the first rows
        ('self.queue.index_copy_(0, positions, keys)',
         'self.queue.copy_(torch.cat([self.queue[len(keys):], keys]))'),
        ('self.queue_ptr.add_(len(keys)).remainder_(len(self.queue))', 'pass')],
}
