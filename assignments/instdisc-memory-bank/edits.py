"""Source of handout.patch / solution.patch (python assignments/make_patches.py writes them).
The starting point: the exact non-parametric softmax loss (Eqs. 2-3) and the memory-bank update (Sec. 3.2)
keep their signatures and docstrings; their bodies are stubs."""
FILE = 'instdisc.py'

HANDOUT = [
    ("""        f = common.all_gather_no_grad(f.float())                        # (B, 128) DDP: the global batch's f
        indices = common.all_gather_no_grad(indices)                    # (B,)     DDP: and their indices
        mixed = momentum * self.memory_bank[indices] + (1 - momentum) * f  # (B, 128)
        self.memory_bank.index_copy_(0, indices, F.normalize(mixed, dim=1))
""",
     """        # Assignment (assignments/instdisc-memory-bank/README.md): step 3 (one process), step 4 (all GPUs).
        raise NotImplementedError('update_memory is yours to write (assignments/instdisc-memory-bank/README.md, step 3)')
"""),
    ("""    logits = f.float() @ memory_bank.T / temperature                 # (n, N)  v_j.f_i / T for every image j
    return F.cross_entropy(logits, indices)                          # image i is the class of f_i
""",
     """    # Assignment (assignments/instdisc-memory-bank/README.md, step 2).
    raise NotImplementedError('non_parametric_softmax_loss is yours to write '
                              '(assignments/instdisc-memory-bank/README.md, step 2)')
"""),
]

SOLUTION = None  # the reference: undo the handout
