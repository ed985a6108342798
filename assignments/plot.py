"""Draw one logged measure of several runs on one plot: the assignments' pictures (e.g. SimSiam's Fig. 2,
output_std with and without the stop-gradient; DINO's Fig. 7, the teacher's entropy without centering and
without sharpening), redrawn from the student's own runs.

  python assignments/plot.py runs/sg runs/no-sg --measure output_std --output runs/fig2.png
  python assignments/plot.py runs/dino runs/no-centering runs/no-sharpening --measure teacher_entropy \\
      --reference 5.545 --output runs/fig7.png

Each folder is a run's --output-dir (its metrics.jsonl); the curve is labelled with the folder's name.
--reference draws a dashed horizontal line (ln K, 1/sqrt(d), ...) with its value in the legend.
"""
import argparse
import json
import os
import sys
import textwrap


def read_curve(folder, measure):
    """(steps, values) of `measure` in folder/metrics.jsonl, from the records that hold a step and it."""
    steps, values = [], []
    with open(os.path.join(folder, 'metrics.jsonl')) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed run
            if isinstance(record, dict) and 'step' in record and measure in record:
                steps.append(record['step'])
                values.append(record[measure])
    return steps, values


def curves(folders, measure):
    """{label: (steps, values)} of every run, in the order given; raises ValueError saying what is missing."""
    found = {}
    for folder in folders:
        if not os.path.isfile(os.path.join(folder, 'metrics.jsonl')):
            raise ValueError(f'{folder} holds no metrics.jsonl: give the --output-dir of a run')
        steps, values = read_curve(folder, measure)
        if not steps:
            raise ValueError(f'{folder}/metrics.jsonl logs no {measure}: is it the right run or measure?')
        found[os.path.basename(os.path.normpath(folder))] = (steps, values)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('runs', nargs='+', help='output folders of the runs to compare')
    parser.add_argument('--measure', required=True, help='a logged key: output_std, teacher_entropy, loss, ...')
    parser.add_argument('--output', required=True, help='the picture to write (.png)')
    parser.add_argument('--reference', type=float, default=None, help='a dashed horizontal line at this value')
    parser.add_argument('--title', default=None)
    args = parser.parse_args(argv)
    try:
        found = curves(args.runs, args.measure)
    except ValueError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    draw(found, args.measure, args.output, args.reference, args.title)
    print(f'wrote {args.output}')
    return 0


def draw(found, measure, output, reference=None, title=None):
    """The picture of {label: (steps, values)}: one curve per run, a dashed line at `reference`."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6, 3.6))
    for label, (steps, values) in found.items():
        axes.plot(steps, values, marker='.', label=label)
    if reference is not None:
        axes.axhline(reference, color='gray', linestyle='--', label=f'{reference:g}')
    axes.set_xlabel('step')
    axes.set_ylabel(measure)
    axes.set_title('\n'.join(textwrap.wrap(title or f'{measure}: ' + ' vs '.join(found), 60)))
    axes.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    figure.savefig(output + '.tmp.png', dpi=100)
    os.replace(output + '.tmp.png', output)  # no half-written picture
    plt.close(figure)


if __name__ == '__main__':
    sys.exit(main())
