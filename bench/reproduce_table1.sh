#!/usr/bin/env bash
# Table 1 of the paper on our generated open-set benchmark, end to end:
# data (100 classes: 50 train / 50 held out) -> 3 independently trained models ->
# explain the held-out classes with the self and the mean proxy, all channels and top-50
# -> the Chen et al. (WACV 2020) baseline per model (weights from training-class triplets,
# transferred to the held-out images; top-50 channels) -> report (mean +- std over the models).
#
#   bash bench/reproduce_table1.sh [WORKDIR] [EPOCHS]
# Existing checkpoints in WORKDIR/models/seed{0,1,2}.pt are reused (delete them to retrain).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-table1}
EPOCHS=${2:-15}
BIN=.venv/bin
mkdir -p "$WORK/models"
[ -f "$WORK/data/manifest.parquet" ] || $BIN/embcam make-manifest synthetic "$WORK/data" --classes 100 --per-class 30 --seed 0
for seed in 0 1 2; do
  ckpt="$WORK/models/seed$seed.pt"
  [ -f "$ckpt" ] || $BIN/embcam train --manifest "$WORK/data/manifest.parquet" --out "$ckpt" \
      --model embcam:small-resnet+linear:128 --image-size 128 --epochs "$EPOCHS" --seed "$seed"
done
# the held-out half only: a manifest of the eval split
$BIN/python - "$WORK" <<'PY'
import sys, pyarrow.parquet as pq, pyarrow.compute as pc
work = sys.argv[1]
t = pq.read_table(f"{work}/data/manifest.parquet")
pq.write_table(t.filter(pc.equal(t["split"], "eval")), f"{work}/data/eval.parquet")
PY
runs=()
for seed in 0 1 2; do
  for proxy in self mean; do
    out="$WORK/runs/$proxy-seed$seed"
    $BIN/embcam explain --manifest "$WORK/data/eval.parquet" --image-root "$WORK/data" --out "$out" \
        --checkpoint "$WORK/models/seed$seed.pt" --proxy "$proxy" --top-k-channels 50 --overwrite --no-progress
    runs+=("$out")
  done
done
for seed in 0 1 2; do
  out="$WORK/runs/chen-seed$seed"
  $BIN/embcam chen-baseline --manifest "$WORK/data/manifest.parquet" --out "$out" \
      --checkpoint "$WORK/models/seed$seed.pt" --train-split train --eval-split eval \
      --top-k-channels 50 --triplets-per-image 32 --seed "$seed" --overwrite --no-progress
  runs+=("$out")
done
$BIN/embcam report "${runs[@]}" --out "$WORK/report"
