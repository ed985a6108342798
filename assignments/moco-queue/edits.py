"""Source of handout.patch / solution.patch (python assignments/make_patches.py writes them).
The starting point: MoCo.enqueue keeps its signature and docstring; its body is a stub."""
FILE = 'moco.py'

HANDOUT = [(
    """        keys = common.all_gather_no_grad(keys.float())                  # (N, 128) DDP: the same queue on all
        positions = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)  # (N,)
        self.queue.index_copy_(0, positions, keys)
        self.queue_ptr.add_(len(keys)).remainder_(len(self.queue))
""",
    """        # Assignment (assignments/moco-queue/README.md): the queue of Sec. 3.2. Step 2: one process: the n
        # keys replace the n oldest of self.queue (self.queue_ptr may say where they are). Step 3: all GPUs.
        raise NotImplementedError('MoCo.enqueue is yours to write (assignments/moco-queue/README.md, step 2)')
""")]

SOLUTION = None  # the reference: undo the handout
