"""Source of handout.patch / solution.patch (python assignments/make_patches.py writes them).
The starting point: nt_xent_loss keeps its signature and docstring; its body is a stub."""
FILE = 'simclr.py'

HANDOUT = [(
    """    n, rank = z1.shape[0], common.get_rank()
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)            # (2n, d) anchors; unit norm: dot = cosine
    # DDP: every GPU's 2n views, rank-major; gradients flow back to the GPU that made them
    keys = common.all_gather_with_grad(z)                           # (2N, d)
    logits = z @ keys.T / temperature                               # (2n, 2N) sim(z_i, z_k) / T
    anchor = torch.arange(2 * n, device=z.device)                   # (2n,) anchor i, local position
    self_index = rank * 2 * n + anchor                              # (2n,) where anchor i sits among the keys
    positive_index = rank * 2 * n + (anchor + n) % (2 * n)          # (2n,) its other view, j
    logits = logits.masked_fill(F.one_hot(self_index, keys.shape[0]).bool(), float('-inf'))  # k != i
    return F.cross_entropy(logits, positive_index)                  # mean over anchors of l(i, j)
""",
    """    # Assignment (assignments/simclr-nt-xent/README.md): write Eq. (1) here. Step 2: one process, the
    # 2n views of this batch. Step 3: the keys of all GPUs (common.get_rank(), common.all_gather_with_grad).
    raise NotImplementedError('nt_xent_loss is yours to write (assignments/simclr-nt-xent/README.md, step 2)')
""")]

SOLUTION = None  # the reference: undo the handout
