#!/usr/bin/env bash
# BENCHMARKS.md "Sanity and faithfulness on the generated benchmark", end to end:
# data (100 classes, generated if missing) -> the eval split (classes 50-99, unseen by the
# bundled demo model) -> embcam explain with the demo model (--proxy mean, and --proxy self
# for contrast) -> embcam sanity on each run (blur fill; the mean run with the mean fill too)
# -> embcam report over both runs (its "Sanity and faithfulness" sections).
#
#   bash bench/sanity_figures.sh [WORKDIR] [IMAGES]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-sanity_bench}
IMAGES=${2:-64}
BIN=.venv/bin
MODEL=embcam/assets/demo_model.pt
[ -f "$WORK/data/manifest.parquet" ] || $BIN/embcam make-manifest synthetic "$WORK/data" --classes 100 --per-class 30 --seed 0
$BIN/python - "$WORK" <<'PY'
import sys, pyarrow.parquet as pq, pyarrow.compute as pc
work = sys.argv[1]
t = pq.read_table(f"{work}/data/manifest.parquet")
pq.write_table(t.filter(pc.equal(t["split"], "eval")), f"{work}/data/eval.parquet")
PY
for proxy in mean self; do
  $BIN/embcam explain --manifest "$WORK/data/eval.parquet" --image-root "$WORK/data" --out "$WORK/runs/$proxy" \
      --checkpoint "$MODEL" --proxy "$proxy" --overwrite --no-progress
  $BIN/embcam sanity "$WORK/runs/$proxy" --images "$IMAGES" --seed 0
done
$BIN/embcam sanity "$WORK/runs/mean" --images "$IMAGES" --seed 0 --fill mean --out "$WORK/runs/mean/sanity-mean-fill"
$BIN/embcam report "$WORK/runs/mean" "$WORK/runs/self" --out "$WORK/report" > /dev/null
echo "report: $WORK/report/report.md"
