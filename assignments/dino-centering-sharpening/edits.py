"""Source of solution.patch (python assignments/make_patches.py writes it). The students start from dino.py
as it is; the solution adds --no-centering (C = 0 in P_t) and --no-sharpening (tau_t = tau_s), the two
ablations of the paper's Sec. 5.3, and logs teacher_entropy of the P_t the loss really uses."""
FILE = 'dino.py'

HANDOUT = []

SOLUTION = [
    ("""method.add_argument('--center-momentum', type=float, default=0.9, help='m of the center EMA')
""", """method.add_argument('--center-momentum', type=float, default=0.9, help='m of the center EMA')
method.add_argument('--centering', action=argparse.BooleanOptionalAction, default=True,
                    help='subtract the center C from the teacher logits; --no-centering: C = 0 (Sec. 5.3)')
method.add_argument('--sharpening', action=argparse.BooleanOptionalAction, default=True,
                    help='a teacher temperature below the student\\'s; --no-sharpening: tau_t = tau_s (Sec. 5.3)')
"""),
    ("""            loss = dino_loss(student_out, teacher_out, raw_model.center, args.student_temp,
                             teacher_temp_schedule[epoch])             # lines 8, 16, float32, with the old C
            entropy = teacher_entropy(teacher_out, raw_model.center, teacher_temp_schedule[epoch])  # logged
""", """            center = raw_model.center if args.centering else torch.zeros_like(raw_model.center)  # Sec. 5.3 ablations:
            teacher_temp = teacher_temp_schedule[epoch] if args.sharpening else args.student_temp  # C = 0, tau_t = tau_s
            loss = dino_loss(student_out, teacher_out, center, args.student_temp,
                             teacher_temp)                             # lines 8, 16, float32, with the old C
            entropy = teacher_entropy(teacher_out, center, teacher_temp)  # logged below
"""),
]
