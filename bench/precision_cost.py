"""What the forward's precision costs in accuracy: heatmaps of the job's model stage at
fp32, bf16 and fp16 (autocast, CPU) against the whole computation in float64.

    .venv/bin/python bench/precision_cost.py --images-per-class 6 --json bench/precision_cost.json

Generated images with boxes (10 classes); the bundled demo model (64 px) and an untrained
ResNet-50 with a linear:128 head (224 px; nothing is downloaded). Per precision: the
lowest and mean Pearson r between each heatmap and its float64 reference, the mean and
largest |delta ratio_bbox|, and how many loc_correct flip. No timings.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from embcam import EmbeddingCAM, load_model
from embcam.datasets import generate_dataset
from embcam.job.model_stage import ExplainModel, ModelConfig
from embcam.job.stages import load_images, manifest_batch
from embcam.metrics import heatmap_metrics

DEMO_MODEL = str(Path(__file__).resolve().parents[1] / "embcam" / "assets" / "demo_model.pt")
MODELS = [("demo model", None, DEMO_MODEL, None), ("resnet50+linear:128", "torchvision:resnet50+linear:128", None, 224)]
BOX = ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")


def compare(got: np.ndarray, reference: np.ndarray, rows: dict, batch: dict) -> dict:
    r, delta, flips = [], [], 0
    for i in range(len(got)):
        r.append(np.corrcoef(got[i].ravel(), reference[i].ravel())[0, 1])
        box = [float(rows[c][i]) for c in BOX]
        size = int(batch["width"][i]), int(batch["height"][i])
        a, b = heatmap_metrics(got[i], *size, box), heatmap_metrics(reference[i], *size, box)
        delta.append(abs(a["ratio_bbox"] - b["ratio_bbox"]))
        flips += a["loc_correct"] != b["loc_correct"]
    return {"min_r": float(min(r)), "mean_r": float(np.mean(r)), "mean_abs_d_ratio_bbox": float(np.mean(delta)),
            "max_abs_d_ratio_bbox": float(max(delta)), "loc_correct_flips": int(flips), "images": len(got)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-per-class", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="embcam-precision-")
    manifest = generate_dataset(root, num_classes=10, images_per_class=args.images_per_class, min_side=64,
                                max_side=128, seed=7)
    rows = manifest_batch(pq.read_table(manifest))
    figures = {}
    for name, spec, checkpoint, size in MODELS:
        model, prep, _ = load_model(spec, checkpoint, size)
        batch = load_images(rows, root, prep.size)
        with torch.no_grad():
            x = prep(torch.from_numpy(batch["image"])).double()
        reference = EmbeddingCAM(model.double(), strategy="autograd")(x, "self").heatmaps.numpy()
        for precision in ("fp32", "bf16", "fp16"):
            stage = ExplainModel(ModelConfig(spec, checkpoint, image_size=size, precision=precision), "self")
            got = np.concatenate([stage({k: v[i:i + 8] for k, v in batch.items()})["heatmap"]
                                  for i in range(0, len(rows["image_id"]), 8)])
            figures[f"{name} {precision}"] = found = compare(got, reference, rows, batch)
            print(f"{name:22s} {precision}: " + ", ".join(f"{k} {v:.5g}" for k, v in found.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
