"""Source of solution.patch (python assignments/make_patches.py writes it). The students start from
simsiam.py as it is; the solution adds --stop-gradient / --no-stop-gradient and passes it to the loss."""
FILE = 'simsiam.py'

HANDOUT = []

SOLUTION = [
    ("""method.add_argument('--fix-pred-lr', action=argparse.BooleanOptionalAction, default=True,
                    help='predictor lr fixed')
""",
     """method.add_argument('--fix-pred-lr', action=argparse.BooleanOptionalAction, default=True,
                    help='predictor lr fixed')
method.add_argument('--stop-gradient', action=argparse.BooleanOptionalAction, default=True,
                    help='sg(z) in the loss, Eq. (4); --no-stop-gradient lets the gradient through z as well (Fig. 2)')
"""),
    ('''def negative_cosine(p, z):
    """Eq. (1) with Eq. (3): D(p, sg(z)) = - p/|p| . z/|z|, averaged over the batch; z is a constant (sg)."""
    p = F.normalize(p.float(), dim=1)                  # (n, d) unit prediction
    z = F.normalize(z.detach().float(), dim=1)         # (n, d) unit target, stop-gradient
''',
     '''def negative_cosine(p, z, stop_gradient=True):
    """Eq. (1) with Eq. (3): D(p, sg(z)) = - p/|p| . z/|z|, averaged over the batch; z is a constant (sg),
    unless stop_gradient is False (Eq. 1 alone: the gradient reaches the encoder through z as well)."""
    p = F.normalize(p.float(), dim=1)                  # (n, d) unit prediction
    z = F.normalize((z.detach() if stop_gradient else z).float(), dim=1)  # (n, d) unit target, stop-gradient
'''),
    ('''def simsiam_loss(p1, p2, z1, z2):
    """Eq. (4): L = D(p1, sg(z2))/2 + D(p2, sg(z1))/2: each prediction matches the other view's z."""
    return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2
''',
     '''def simsiam_loss(p1, p2, z1, z2, stop_gradient=True):
    """Eq. (4): L = D(p1, sg(z2))/2 + D(p2, sg(z1))/2: each prediction matches the other view's z."""
    return negative_cosine(p1, z2, stop_gradient) / 2 + negative_cosine(p2, z1, stop_gradient) / 2
'''),
    ('''            loss = simsiam_loss(p1, p2, z1, z2)                       # Eq. (4), symmetrised, float32
''',
     '''            loss = simsiam_loss(p1, p2, z1, z2, args.stop_gradient)   # Eq. (4), symmetrised, float32
'''),
]
