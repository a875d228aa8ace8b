#!/usr/bin/env bash
# The paper's Table 1 on CUB-200-2011, for a user who has the dataset, in one command:
# manifest (classes 1-100 train, 101-200 held out, as the paper) -> a ResNet-50 with a
# 128-d head trained with Proxy-Anchor on the train classes -> explain the held-out
# classes with the self and the mean proxy (all channels and top-50) -> the Chen et al.
# (WACV 2020) baseline -> report (Table 1 with MaxBoxAccV2 and PxAP).
#
#   bash bench/reproduce_cub.sh CUB_200_2011/ [WORKDIR] [IMAGENET_WEIGHTS.pth]
#
# CUB_200_2011/ is the folder of the official archive (images.txt, image_class_labels.txt,
# classes.txt, bounding_boxes.txt, train_test_split.txt, images/); the segmentations
# (a separate archive) are found at CUB_200_2011/segmentations or next to it.
#
# ImageNet weights: nothing is ever downloaded. Give torchvision's ResNet-50 state dict
# (resnet50-0676ba61.pth or resnet50-11ad3fa6.pth) as the third argument or in
# EMBCAM_CUB_IMAGENET; the backbone then starts from it (its fc layer is dropped). Without
# it the backbone starts from random weights and the figures will NOT be the paper's.
#
# Everything else can be changed through the environment (the defaults are the recipe):
#   EMBCAM_CUB_MODEL          torchvision:resnet50+linear:128
#   EMBCAM_CUB_IMAGE_SIZE     224
#   EMBCAM_CUB_EPOCHS         60      (Proxy-Anchor's official code: 60 epochs)
#   EMBCAM_CUB_BATCH_CLASSES  30      } batch 120, the official ResNet-50 batch for CUB
#   EMBCAM_CUB_PER_CLASS      4       }
#   EMBCAM_CUB_LR             1e-4    (AdamW; proxies 100x; alpha 32, margin 0.1)
#   EMBCAM_CUB_SEED           0
#   EMBCAM_CUB_TOP_K          50      (top-k channels, as the paper's Table 1)
#   EMBCAM_CUB_TRIPLETS       32      (Chen et al.: triplets per training image)
#   EMBCAM_CUB_BATCH_SIZE     32      (explain and Chen: images per model call)
#   EMBCAM_CUB_DEVICE         auto    (training: auto, cpu or cuda)
# The checkpoint WORKDIR/models/cub.pt is reused when present (delete it to retrain).
# Expected time on one GPU node: about half an hour, three quarters of it training
# (BENCHMARKS.md §1, "CUB-200-2011 in one command", from measured per-image costs).
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 3 ]; then
  echo "usage: bash bench/reproduce_cub.sh CUB_200_2011/ [WORKDIR] [IMAGENET_WEIGHTS.pth]" >&2
  exit 2
fi
CUB=$1
WORK=${2:-cub}
IMAGENET=${3:-${EMBCAM_CUB_IMAGENET:-}}
[ -f "$CUB/images.txt" ] || { echo "reproduce_cub.sh: $CUB has no images.txt: not a CUB_200_2011 folder" >&2; exit 2; }
if [ -n "$IMAGENET" ] && [ ! -f "$IMAGENET" ]; then
  echo "reproduce_cub.sh: ImageNet weights $IMAGENET not found" >&2
  exit 2
fi
mkdir -p "$WORK"
# absolute paths: the commands run from the repository root
CUB=$(cd "$CUB" && pwd)
WORK=$(cd "$WORK" && pwd)
[ -z "$IMAGENET" ] || IMAGENET=$(cd "$(dirname "$IMAGENET")" && pwd)/$(basename "$IMAGENET")
cd "$(dirname "$0")/.."
MODEL=${EMBCAM_CUB_MODEL:-torchvision:resnet50+linear:128}
SIZE=${EMBCAM_CUB_IMAGE_SIZE:-224}
EPOCHS=${EMBCAM_CUB_EPOCHS:-60}
BATCH_CLASSES=${EMBCAM_CUB_BATCH_CLASSES:-30}
PER_CLASS=${EMBCAM_CUB_PER_CLASS:-4}
LR=${EMBCAM_CUB_LR:-1e-4}
SEED=${EMBCAM_CUB_SEED:-0}
TOP_K=${EMBCAM_CUB_TOP_K:-50}
TRIPLETS=${EMBCAM_CUB_TRIPLETS:-32}
BATCH=${EMBCAM_CUB_BATCH_SIZE:-32}
DEVICE=${EMBCAM_CUB_DEVICE:-auto}
BIN=.venv/bin
if [ -n "$IMAGENET" ]; then
  NOTE="backbone initialised from $IMAGENET"
else
  NOTE="WARNING: no ImageNet weights given (third argument or EMBCAM_CUB_IMAGENET): the backbone starts from \
random weights, and the figures will not be the paper's"
fi
echo "reproduce_cub.sh: $NOTE" >&2
mkdir -p "$WORK/data" "$WORK/models" "$WORK/runs"

[ -f "$WORK/data/manifest.parquet" ] || $BIN/embcam make-manifest cub "$CUB" --out "$WORK/data/manifest.parquet"
$BIN/python - "$WORK" <<'PY'
import sys, pyarrow.parquet as pq, pyarrow.compute as pc
work = sys.argv[1]
t = pq.read_table(f"{work}/data/manifest.parquet")
pq.write_table(t.filter(pc.equal(t["split"], "eval")), f"{work}/data/eval.parquet")
PY

CKPT="$WORK/models/cub.pt"
if [ ! -f "$CKPT" ]; then
  TRAIN_MODEL=$MODEL
  if [ -n "$IMAGENET" ]; then
    # embcam train builds its model from a spec: this factory (user code named on the command
    # line, README "Your own model") builds $MODEL with the ImageNet backbone loaded into it
    mkdir -p "$WORK/init"
    cat > "$WORK/init/embcam_cub_init.py" <<'PY'
"""Written by bench/reproduce_cub.sh: the model to train, its backbone from ImageNet weights."""
import os

from embcam.models import load_model


def imagenet_backbone():
    # the backbone from the ImageNet file; the embedding head is new (random), as the recipe has it
    model, _, _ = load_model(os.environ["EMBCAM_CUB_MODEL"], os.environ["EMBCAM_CUB_IMAGENET"],
                             int(os.environ["EMBCAM_CUB_IMAGE_SIZE"]), allow_partial=True)
    return model.train()
PY
    TRAIN_MODEL=embcam_cub_init:imagenet_backbone
  fi
  PYTHONPATH="$WORK/init${PYTHONPATH:+:$PYTHONPATH}" EMBCAM_CUB_MODEL=$MODEL EMBCAM_CUB_IMAGENET=$IMAGENET \
  EMBCAM_CUB_IMAGE_SIZE=$SIZE $BIN/embcam train --manifest "$WORK/data/manifest.parquet" --out "$CKPT" \
      --model "$TRAIN_MODEL" --image-size "$SIZE" --epochs "$EPOCHS" --batch-classes "$BATCH_CLASSES" \
      --per-class "$PER_CLASS" --lr "$LR" --seed "$SEED" --device "$DEVICE"
fi

runs=()
for proxy in self mean; do
  out="$WORK/runs/$proxy"
  $BIN/embcam explain --manifest "$WORK/data/eval.parquet" --out "$out" --model "$MODEL" --checkpoint "$CKPT" \
      --proxy "$proxy" --top-k-channels "$TOP_K" --batch-size "$BATCH" --overwrite --no-progress
  runs+=("$out")
done
$BIN/embcam chen-baseline --manifest "$WORK/data/manifest.parquet" --out "$WORK/runs/chen" --model "$MODEL" \
    --checkpoint "$CKPT" --train-split train --eval-split eval --top-k-channels "$TOP_K" \
    --triplets-per-image "$TRIPLETS" --batch-size "$BATCH" --seed "$SEED" --overwrite --no-progress
runs+=("$WORK/runs/chen")
$BIN/embcam report "${runs[@]}" --out "$WORK/report" > /dev/null
echo "reproduce_cub.sh: report in $WORK/report/report.md ($NOTE)"
