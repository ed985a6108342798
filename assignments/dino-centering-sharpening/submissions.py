"""Submissions the checker is tested on (tests/test_assignments.py): each is a few edits (old, new) of the
reference solution of dino.py; `old` is a short anchor that must occur once. WRONG ones must fail with a
message containing `message` (`tests`: the -k expression of the checks that catch it, to keep the run
short); CORRECT ones are other ways to write the solution that the README allows, and must pass."""
WRONG = {
    'default-arm-drops-the-temperature-warm-up': dict(
        edits=[('teacher_temp_schedule[epoch] if args.sharpening', 'args.teacher_temp if args.sharpening')],
        message='so --teacher-temp must not change step 1', tests='warms'),
    'default-arm-never-centers': dict(
        edits=[('raw_model.center if args.centering else torch.zeros_like(raw_model.center)',
                'torch.zeros_like(raw_model.center)')],
        message='the default arm must center', tests='centers'),
    'no-sharpening-takes-the-final-teacher-temperature': dict(
        edits=[('else args.student_temp', 'else args.teacher_temp')],
        message='with --no-sharpening, teacher_entropy is only', tests='uniform'),
}

CORRECT = {
    'center-times-the-flag': [  # C * 1 in the default arm, C * 0 = 0 with --no-centering
        ('raw_model.center if args.centering else torch.zeros_like(raw_model.center)',
         'raw_model.center * float(args.centering)')],
}
