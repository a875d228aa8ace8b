#!/usr/bin/env bash
# Table 1 of the paper on our generated open-set benchmark, end to end:
# data (100 classes: 50 train / 50 held out) -> 3 independently trained models ->
# explain the held-out classes with the self and the mean proxy, all channels and top-50
# -> the Chen et al. (WACV 2020) baseline per model (weights from training-class triplets,
# transferred to the held-out images; top-50 channels) -> a centre baseline (a centred
# Gaussian map, no model: the reference point of MaxBoxAccV2) -> report (mean +- std over
# the models; Table 1 with MaxBoxAccV2 and PxAP).
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
      --model embcam:small-resnet+linear:128 --image-size 128 --epochs "$EPOCHS" --seed "$seed" --threads 1
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
# the centre baseline: every image's map is one centred isotropic Gaussian (8 x 8 cells, sigma 2
# cells), upsampled and measured like the heatmaps; a run folder with the explain job's columns
$BIN/python - "$WORK" <<'PY'
import json, os, shutil, sys
import numpy as np, pyarrow.parquet as pq
from embcam.boxes import row_box
from embcam.data.images import decode_image, decode_mask
from embcam.metrics import heatmap_metrics
from embcam.data.schemas import conform
work = sys.argv[1]
out = f"{work}/runs/centre"
shutil.rmtree(out, ignore_errors=True)
os.makedirs(f"{out}/results")
g = np.exp(-((np.arange(8) - 3.5) ** 2) / (2 * 2.0 ** 2))
heat = np.outer(g, g)
rows = []
for r in pq.read_table(f"{work}/data/eval.parquet").to_pylist():
    height, width = decode_image(open(f"{work}/data/{r['uri']}", "rb").read()).shape[:2]
    mask = decode_mask(open(f"{work}/data/{r['mask_uri']}", "rb").read()) if r["mask_uri"] else None
    m = heatmap_metrics(heat, width, height, row_box(r), mask)
    m["iou_sweep"] = None if m["iou_sweep"] is None else m["iou_sweep"].tolist()
    rows.append(dict(image_id=r["image_id"], label=r["label"], split=r["split"], status="ok", width=width,
                     height=height, proxy_kind="centre", heatmap=heat.ravel().tolist(), heatmap_height=8,
                     heatmap_width=8, **m))
pq.write_table(conform(rows, "results"), f"{out}/results/part-000000000000-{len(rows):012d}.parquet")
config = {"proxy": "centre", "model": None, "manifest": os.path.abspath(f"{work}/data/eval.parquet"),
          "image_root": os.path.abspath(f"{work}/data")}
with open(f"{out}/summary.json", "w") as f:
    json.dump({"config": config, "note": "centre baseline written by bench/reproduce_table1.sh"}, f)
PY
runs+=("$WORK/runs/centre")
$BIN/embcam report "${runs[@]}" --out "$WORK/report"
