"""Source of solution.patch (python assignments/make_patches.py writes it). The students start from
byol.py as it is; the solution removes the target network and its EMA (and the flag, presets and
logging of its rate tau): the online network's own projection, behind the loss's stop-gradient, is
the target. Everything else (heads, views, optimiser, the loss's form) stays BYOL's."""
FILE = 'byol.py'

HANDOUT = []

SOLUTION = [
    ("""  Eq. (3), Eq. (1)   theta <- optimizer(theta, grad L_BYOL); xi <- tau xi + (1 - tau) theta -> main()
""", """  Eq. (3)            theta <- optimizer(theta, grad L_BYOL); no target, no Eq. (1): SimSiam -> main()
"""),
    ("""import copy
from collections import OrderedDict
""", """from collections import OrderedDict
"""),
    ("""method.add_argument('--tau-base', type=float, help='EMA rate of the target at step 0 (tau_base)')
""", ""),
    ("""                    lr=None, weight_decay=None,  # and tau_base: EPOCH_PRESETS' row for --epochs
""", """                    lr=None, weight_decay=None,  # EPOCH_PRESETS' row for --epochs
"""),
    ("""# ImageNet lr, weight decay, tau_base: the row of the shortest length >= --epochs (the authors' config)
EPOCH_PRESETS = {40:   dict(lr=0.45, weight_decay=1e-6,   tau_base=0.97),
                 100:  dict(lr=0.45, weight_decay=1e-6,   tau_base=0.99),
                 300:  dict(lr=0.3,  weight_decay=1e-6,   tau_base=0.99),
                 1000: dict(lr=0.2,  weight_decay=1.5e-6, tau_base=0.996)}
# Small images (CIFAR): SGD lr 0.12 per 256, wd 5e-4 (Lightly's CIFAR-10 benchmark), tau_base 0.99, no blur;
""", """# ImageNet lr, weight decay: the row of the shortest length >= --epochs (the authors' config)
EPOCH_PRESETS = {40:   dict(lr=0.45, weight_decay=1e-6),
                 100:  dict(lr=0.45, weight_decay=1e-6),
                 300:  dict(lr=0.3,  weight_decay=1e-6),
                 1000: dict(lr=0.2,  weight_decay=1.5e-6)}
# Small images (CIFAR): SGD lr 0.12 per 256, wd 5e-4 (Lightly's CIFAR-10 benchmark), no blur;
"""),
    ("""                          optimizer='sgd', lr=0.12, weight_decay=5e-4, tau_base=0.99, blur_probs=(0.0, 0.0))
""", """                          optimizer='sgd', lr=0.12, weight_decay=5e-4, blur_probs=(0.0, 0.0))
"""),
    ('''    """Online network theta: encoder f (backbone, evaluated), projector g, predictor q (Sec. 3.1). Target
    network xi: a copy of f and g, no gradient, moved only by the EMA of Eq. (1); it keeps its own BN."""
''', '''    """Online network theta: encoder f (backbone, evaluated), projector g, predictor q (Sec. 3.1). No
    target network (SimSiam): the online projection of the other view is the target, held by the loss's
    stop-gradient."""
'''),
    ("""        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim)  # q_theta
        self.target = copy.deepcopy(self.online).requires_grad_(False)  # f_xi, g_xi: no grad, no optimizer

    def forward(self, views):
        p, z = [], []
        for x in views:  # each view in its own call: BatchNorm statistics per view
            p.append(self.predictor(self.online(x)))   # (n, d) q_theta(z_theta), the online prediction
            with torch.no_grad():
                z.append(self.target(x))               # (n, d) z'_xi, the target projection
        return p[0], p[1], z[0], z[1]                  # (n, d) each: view 1, view 2
""", """        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim)  # q_theta

    def forward(self, views):
        p, z = [], []
        for x in views:  # each view in its own call: BatchNorm statistics per view
            z.append(self.online(x))                   # (n, d) z_theta, the online projection: also the target
            p.append(self.predictor(z[-1]))            # (n, d) q_theta(z_theta), the online prediction
        return p[0], p[1], z[0], z[1]                  # (n, d) each: view 1, view 2
"""),
    ("""    common.apply_epoch_preset(args, EPOCH_PRESETS)          # the paper's lr, wd, tau_base for --epochs
""", """    common.apply_epoch_preset(args, EPOCH_PRESETS)          # the paper's lr and wd for --epochs
"""),
    ("""    # ---- model: online (f, g, q) and target (f', g'); SyncBN and DDP when on several GPUs
""", """    # ---- model: online (f, g, q), no target; SyncBN and DDP when on several GPUs
"""),
    ("""    # ---- optimizer and schedules: LARS (biases and BN excluded), linear warm-up then cosine; tau cosine to 1
    lr = common.scale_lr(args.lr, args.batch_size)
    optimizer = common.build_optimizer(args, common.param_groups(raw_model, args.weight_decay), lr)
    lr_schedule = common.cosine_schedule(lr, args.min_lr, args.epochs, len(loader), args.warmup_epochs)
    tau_schedule = common.cosine_schedule(args.tau_base, 1.0, args.epochs, len(loader))  # Sec. 3.3
""", """    # ---- optimizer and schedules: LARS (biases and BN excluded), linear warm-up then cosine
    lr = common.scale_lr(args.lr, args.batch_size)
    optimizer = common.build_optimizer(args, common.param_groups(raw_model, args.weight_decay), lr)
    lr_schedule = common.cosine_schedule(lr, args.min_lr, args.epochs, len(loader), args.warmup_epochs)
"""),
    ("""            common.ema_update(raw_model.target, raw_model.online, tau_schedule[step])  # Eq. (1) after (3)
            # ======== end of BYOL ========

            logger.step(epoch, step, loss, lr=lr_schedule[step], tau=tau_schedule[step],
""", """            # no target network to update (no Eq. 1): SimSiam is BYOL without the momentum encoder
            # ======== end of BYOL ========

            logger.step(epoch, step, loss, lr=lr_schedule[step],
"""),
]
