#!/bin/bash
# The gallery's pictures (docs/gallery.md): each command below, timed, appended to records.jsonl with the
# machine it ran on. CHECKPOINT: a SimCLR run on a 5,000-image CIFAR-10 subset (see docs/gallery.md);
# METRICS: a folder for BYOL's 10-epoch CIFAR-10 metrics (results/h100-2026-11-22), redrawn at the end.
set -e
cd "$(dirname "$0")/../.."
OUT=results/gallery
DATA=${DATA:-/tmp/pictures/cifar10-5k}
CHECKPOINT=${CHECKPOINT:-/tmp/pictures/simclr-run/checkpoint.pth}
METRICS=${METRICS:-/tmp/pictures/byol-h100}
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
record() {  # record PICTURES... -- COMMAND...: run it, log it, one line per picture in records.jsonl
  local pictures=() ; while [ "$1" != "--" ]; do pictures+=("$1"); shift; done; shift
  local start=$(date +%s.%N) when=$(date -u +%FT%TZ)
  "$@" > "$OUT/$(basename "${pictures[0]}" .png).log" 2>&1
  local seconds=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
  for picture in "${pictures[@]}"; do
    python3 - "$picture" "$seconds" "$when" "$@" >> $OUT/records.jsonl <<'PY'
import json, os, platform, subprocess, sys
picture, seconds, when, command = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4:]
cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')),
           platform.processor())
commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                        text=True).stdout.strip()
print(json.dumps(dict(picture=picture, command=' '.join(command), seconds=seconds, started=when,
                      commit=commit,
                      hardware=f'{cpu}, {os.cpu_count()} cores, no GPU (shared with other jobs)',
                      kb=round(os.path.getsize(picture) / 1024))))
PY
  done
}
: > $OUT/records.jsonl
record $OUT/views-simclr.png -- python3 simclr.py --data $DATA --arch resnet18 --width 8 --batch-size 128 \
  --augment device --workers 0 --show-views $OUT/views-simclr.png
record $OUT/views-dino.png -- python3 dino.py --data $DATA --arch resnet18 --width 8 --batch-size 128 \
  --augment cpu --workers 0 --show-views $OUT/views-dino.png
record $OUT/neighbours.png $OUT/feature-map.png -- python3 eval_knn.py $CHECKPOINT --workers 0 --k 200 \
  --temperature 0.1 --neighbours $OUT/neighbours.png --queries 5 --neighbours-k 6 \
  --feature-map $OUT/feature-map.png --compare-random-init
record $OUT/label-efficiency.png -- python3 eval_linear.py $CHECKPOINT --workers 0 \
  --weight-decays 1e-4 1e-3 1e-2 1e-1 --max-iter 300 --labels-per-class 1 10 100 all \
  --plot $OUT/label-efficiency.png --compare-random-init --json $OUT/label-efficiency.json
# d = 256: byol.py's --proj-dim (its CIFAR preset keeps it); no checkpoint of that run is kept
mkdir -p $METRICS
cp results/h100-2026-11-22/cifar10-10ep-concurrent-byol.metrics.jsonl $METRICS/metrics.jsonl
record $OUT/metrics-byol.png -- python3 -c "import common, shutil; \
common.plot_metrics('$METRICS', run_args=dict(proj_dim=256)); \
shutil.copy('$METRICS/metrics.png', '$OUT/metrics-byol.png')"
