#!/bin/bash
# The linear-probe numbers of the README: SimCLR's learning-test run (seed 0) and its untrained network.
set -e
cd "$(dirname "$0")/../.."
OUT=results/cpu-linear
mkdir -p $OUT
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
R=/tmp/linear-run
rm -rf $R /tmp/linear-aug-t /tmp/linear-aug-u
t() { local name=$1; shift; local s=$(date +%s.%N); "$@" > $OUT/$name.log 2>&1; local e=$(date +%s.%N); echo "$name $(python3 -c "print(round($e-$s,1))")" | tee -a $OUT/wallclock.txt; }
: > $OUT/wallclock.txt
t train python3 simclr.py --data procedural:960 --arch resnet18 --width 8 --image-size 16 --workers 0 --epochs 20 \
  --batch-size 32 --augment device --knn-every 0 --knn-k 20 --knn-t 0.1 --optimizer sgd --lr 0.5 \
  --min-scale 0.3 --proj-hidden-dim 128 --warmup-epochs 1 --seed 0 --output-dir $R
B="--random-init --data procedural:960 --arch resnet18 --width 8 --image-size 16 --seed 0"
t knn-trained python3 eval_knn.py $R/checkpoint.pth --workers 0 --k 20 --temperature 0.1 --json $OUT/knn-trained.json
t knn-untrained python3 eval_knn.py $B --workers 0 --k 20 --temperature 0.1 --json $OUT/knn-untrained.json
t fast-trained python3 eval_linear.py $R/checkpoint.pth --workers 0 --json $OUT/fast-trained.json
t fast-untrained python3 eval_linear.py $B --workers 0 --json $OUT/fast-untrained.json
t augment-trained python3 eval_linear.py $R/checkpoint.pth --workers 0 --augment --recipe moco --epochs 10 --batch-size 32 --output-dir /tmp/linear-aug-t --json $OUT/augment-trained.json
t augment-untrained python3 eval_linear.py $B --workers 0 --augment --recipe moco --epochs 10 --batch-size 32 --output-dir /tmp/linear-aug-u --json $OUT/augment-untrained.json
cp $R/metrics.jsonl $OUT/train-metrics.jsonl
