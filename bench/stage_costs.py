"""Per-image cost of each stage of the explain job, in one process (the cost model's inputs).

    .venv/bin/python bench/stage_costs.py --manifest /tmp/embcam-scale/data/manifest-10000.parquet \
        --images 2000 --json bench/stage_costs.json

Times, over the same images and in one run, with the threads the job gives each stage:
- decode: fetch + decode + resize (`stages.load_images`, one thread, as a CPU task);
- model: `ExplainModel` (embedding-map, self proxy, all cores, as the CPU actor), at each
  `--model` and `--image-size` given;
- metrics: `compute_metrics` + `to_results` (one thread, as the commit task);
and the bytes of one results row as Parquet. Medians of `--repeats` rounds.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from embcam.data.locations import default_image_root
from embcam.data.manifest import read_manifest
from embcam.job.model_stage import ExplainModel, ModelConfig
from embcam.job.stages import compute_metrics, load_images, to_results

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "embcam" / "assets" / "demo_model.pt"


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def explain_all(stage: ExplainModel, images: dict, n: int, batch_size: int) -> dict:
    """The model stage over ``n`` loaded rows, ``batch_size`` at a time, concatenated."""
    outs = []
    for i in range(0, n, batch_size):
        outs.append(stage({k: v[i:i + batch_size] for k, v in images.items()}))
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def metrics_rows(explained: dict):
    return to_results(compute_metrics(explained))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=[f"checkpoint:{DEMO_MODEL}@64"],
                        help="checkpoint:<file>@<size> or <spec>@<size>, e.g. torchvision:resnet50+linear:128@224")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    table = read_manifest(args.manifest).slice(0, args.images)
    root = default_image_root(args.manifest)
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    n = table.num_rows
    figures = {"images": n, "threads": os.cpu_count(), "models": {}}

    torch.set_num_threads(1)
    import cv2
    cv2.setNumThreads(1)
    decode_s, loaded = timed(lambda: load_images(batch, root, 64), args.repeats)
    figures["decode_ms_per_image"] = 1000 * decode_s / n

    for entry in args.models:
        spec, size = entry.rsplit("@", 1)
        checkpoint = spec.split(":", 1)[1] if spec.startswith("checkpoint:") else None
        model_cfg = ModelConfig(spec=None if checkpoint else spec, checkpoint=checkpoint, image_size=int(size))
        stage = ExplainModel(model_cfg, "self", num_threads=os.cpu_count())
        images = load_images(batch, root, int(size)) if int(size) != 64 else loaded
        images["row"] = np.arange(n)

        model_s, explained = timed(functools.partial(explain_all, stage, images, n, args.batch_size), args.repeats)
        torch.set_num_threads(1)
        metrics_s, rows = timed(functools.partial(metrics_rows, explained), args.repeats)
        sink = io.BytesIO()
        pq.write_table(rows, sink)
        figures["models"][entry] = {"model_ms_per_image": 1000 * model_s / n,
                                    "metrics_ms_per_image": 1000 * metrics_s / n,
                                    "results_bytes_per_row": sink.tell() / n,
                                    "heatmap": list(stage.map_shape), "embedding": stage.num_outputs}
        print(entry, json.dumps(figures["models"][entry]), flush=True)
    print("decode ms/image:", round(figures["decode_ms_per_image"], 3))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
