"""Source of solution.patch (python assignments/make_patches.py writes it). The students start from mocov3.py
as it is (the random patch projection is already a flag, --freeze-patch-embed, on for ViTs); the solution logs
patch_grad_norm, the gradient norm of the first layer (the paper's Fig. 4 diagnostic), after backward."""
FILE = 'mocov3.py'

HANDOUT = []

SOLUTION = [
    ("""    return F.cross_entropy(logits, labels) * (2 * temperature)


# -----------------------------------------------------------------------------
# Training
""", '''    return F.cross_entropy(logits, labels) * (2 * temperature)


@torch.no_grad()
def patch_grad_norm(backbone):
    """The L2 norm of the gradient of the first layer (Sec. 4.2, Fig. 4: its spikes come first, then the
    training instability): the ViT's patch projection, weight and bias together; 0 when it has no gradient
    (frozen: the random patch projection, Sec. 4.2). A tensor, read only on logging steps."""
    grads = [p.grad.float().norm() for p in backbone.patch_embed.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


# -----------------------------------------------------------------------------
# Training
'''),
    ("""            loss.backward()
            optimizer.step()                                          # line 12
            logger.step(epoch, step, loss, lr=lr_schedule[step], m=momentum_schedule[step])
""", """            loss.backward()
            first_layer = patch_grad_norm(raw_model.base_encoder.backbone) if args.arch.startswith('vit') else 0.0
            optimizer.step()                                          # line 12
            logger.step(epoch, step, loss, lr=lr_schedule[step], m=momentum_schedule[step], patch_grad_norm=first_layer)
"""),
]
