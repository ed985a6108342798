"""Source of solution.patch (python assignments/make_patches.py writes it). The students start from swav.py
as it is; the solution adds --no-sinkhorn: each sample's code is its own softmax(scores / eps), without the
equipartition over the batch that Sinkhorn-Knopp imposes (the paper's Sec. 3.1: the trivial solution)."""
FILE = 'swav.py'

HANDOUT = []

SOLUTION = [
    ("""import torch
import torch.nn as nn
""", """import argparse

import torch
import torch.nn as nn
"""),
    ("""method.add_argument('--sinkhorn-iterations', type=int, default=3, help='Sinkhorn-Knopp iterations')
""", """method.add_argument('--sinkhorn-iterations', type=int, default=3, help='Sinkhorn-Knopp iterations')
method.add_argument('--sinkhorn', action=argparse.BooleanOptionalAction, default=True,
                    help='codes by Sinkhorn-Knopp; --no-sinkhorn: softmax(scores / eps) of each sample alone')
"""),
    ("""    def compute_codes(self, z, scores, n, epsilon, iterations, fill_queue):
""", """    def compute_codes(self, z, scores, n, epsilon, iterations, fill_queue, use_sinkhorn=True):
"""),
    ("""            codes.append(sinkhorn(crop_scores, epsilon, iterations)[-n:])        # (n, K) the batch's codes
""", """            if use_sinkhorn:
                codes.append(sinkhorn(crop_scores, epsilon, iterations)[-n:])          # (n, K) the batch's codes
            else:                                                                      # each sample alone: no
                codes.append(F.softmax(crop_scores / epsilon, dim=1)[-n:])             #   equipartition
"""),
    ("""                                            fill_queue=epoch >= args.epoch_queue_starts)  # 2 x (n, K) no grad
""", """                                            fill_queue=epoch >= args.epoch_queue_starts,  # 2 x (n, K), no grad
                                            use_sinkhorn=args.sinkhorn)
"""),
]
