"""Reduced (DCT-domain) JPEG decode for the network: what it saves, and what it changes in the results.

    .venv/bin/python bench/decode_cost.py --images 300 --json bench/decode_cost.json

(a) cost: decode + resize (`images.decode_resized`) of the same JPEGs, in full (`reduce=False`, exactly the old
    `decode_image_oriented` + `resize_square`) and reduced (libjpeg decodes at 1/2, 1/4 or 1/8 scale), one thread,
    interleaved rounds, medians of `--repeats`: generated photo-like 1200x900 JPEGs (quality 90) at `--size`, and
    the benchmark dataset's 700-900 px JPEGs at each model's input size. Wall time and this thread's CPU time (the
    latter is less disturbed by other processes on a shared machine); ratios are full / reduced in the same run.
(b) effect: the synthetic benchmark dataset (`generate_dataset`, 700-900 px, quality 90); every image decoded both
    ways, explained by the bundled demo model (and `--resnet`: torchvision:resnet50+linear:128 at 224 px, seeded
    weights, nothing downloaded) with `EmbeddingCAM(strategy="embedding-map")` and the self proxy, then
    `heatmap_metrics` against the box and mask as `stages.compute_metrics` calls it. Reported: the input pixels'
    mean |difference| (/255), the embeddings' cosine, mean/max |delta| of ratio_bbox, ratio_mask and iou, and the
    number of loc_correct flips.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from embcam.boxes import BBOX_COLUMNS, row_box
from embcam.cam import EmbeddingCAM
from embcam.data.images import decode_mask, decode_resized, image_size_from_header, jpeg_reduction
from embcam.data.manifest import read_manifest
from embcam.datasets import generate_dataset
from embcam.metrics import heatmap_metrics
from embcam.models import load_model

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "embcam" / "assets" / "demo_model.pt"
RESNET = "torchvision:resnet50+linear:128"


def photo_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth random layers at cell sizes 256..8 px with amplitude proportional to the cell
    (the 1/f spectrum of photographs), discs for sharp edges, a little sensor noise."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 128, np.float32)
    for cell in (256, 128, 64, 32, 16, 8):
        layer = rng.normal(0, 0.35 * cell, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        image += cv2.resize(layer, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(10):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(image, centre, int(rng.integers(5, min(width, height) // 4)), rng.uniform(0, 255, 3).tolist(), -1)
    image += rng.standard_normal(image.shape, np.float32) * 3
    ok, encoded = cv2.imencode(".jpg", np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return encoded.tobytes()


def decode_times(files: list[bytes], size: int, repeats: int) -> dict:
    """Per-image ms of decode + resize, full and reduced, interleaved so load hits both alike."""
    seconds = {False: [], True: []}
    cpu = {False: [], True: []}
    for _ in range(repeats):
        for reduce in (False, True):
            start, start_cpu = time.perf_counter(), time.thread_time()
            for data in files:
                decode_resized(data, size, reduce=reduce)
            seconds[reduce].append((time.perf_counter() - start) / len(files))
            cpu[reduce].append((time.thread_time() - start_cpu) / len(files))
    factors = sorted({jpeg_reduction(*image_size_from_header(data), size) for data in files})
    full, reduced = statistics.median(seconds[False]), statistics.median(seconds[True])
    full_cpu, reduced_cpu = statistics.median(cpu[False]), statistics.median(cpu[True])
    return {"size": size, "images": len(files), "reductions": factors,
            "full_ms": 1000 * full, "reduced_ms": 1000 * reduced, "ratio": full / reduced,
            "full_cpu_ms": 1000 * full_cpu, "reduced_cpu_ms": 1000 * reduced_cpu, "cpu_ratio": full_cpu / reduced_cpu,
            "best_ratio": min(seconds[False]) / min(seconds[True]),
            "seconds_full": seconds[False], "seconds_reduced": seconds[True]}


def explain(cam: EmbeddingCAM, preprocess, pixels: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, heatmaps) of (N, size, size, 3) uint8 images, self proxy."""
    embeddings, heatmaps = [], []
    for i in range(0, len(pixels), batch_size):
        result = cam(preprocess(torch.from_numpy(pixels[i:i + batch_size])), "self")
        embeddings.append(result.embeddings.float().numpy())
        heatmaps.append(result.heatmaps.float().numpy())
    return np.concatenate(embeddings), np.concatenate(heatmaps)


def effect(rows: list[dict], root: Path, model_name: str, model, preprocess, batch_size: int) -> dict:
    """How the reduced decode changes the network's input, embeddings, heatmaps' metrics."""
    size = preprocess.size
    cam = EmbeddingCAM(model, strategy="embedding-map")
    inputs, sizes = {False: [], True: []}, []
    for row in rows:
        data = (root / row["uri"]).read_bytes()
        for reduce in (False, True):
            pixels, width, height, _ = decode_resized(data, size, reduce=reduce)
            inputs[reduce].append(pixels)
        sizes.append((width, height))
    inputs = {k: np.stack(v) for k, v in inputs.items()}
    with torch.inference_mode():
        (y_full, h_full), (y_reduced, h_reduced) = (explain(cam, preprocess, inputs[k], batch_size)
                                                    for k in (False, True))
    deltas = {"ratio_bbox": [], "ratio_mask": [], "iou": []}
    flips = correct = 0
    for i, row in enumerate(rows):
        width, height = sizes[i]
        mask = decode_mask((root / row["mask_uri"]).read_bytes()) if row.get("mask_uri") else None
        box = row_box({c: row[c] for c in BBOX_COLUMNS if c in row})
        full = heatmap_metrics(h_full[i], width, height, box, mask)
        reduced = heatmap_metrics(h_reduced[i], width, height, box, mask)
        for key in deltas:
            if full[key] is not None and reduced[key] is not None:
                deltas[key].append(abs(full[key] - reduced[key]))
        flips += full["loc_correct"] != reduced["loc_correct"]
        correct += bool(full["loc_correct"])
    pixel_delta = np.abs(inputs[False].astype(np.int16) - inputs[True]).reshape(len(rows), -1).mean(1)
    cosine = (y_full * y_reduced).sum(1) / (np.linalg.norm(y_full, axis=1) * np.linalg.norm(y_reduced, axis=1))
    out = {"model": model_name, "size": size, "images": len(rows),
           "reductions": sorted({jpeg_reduction(w, h, size) for w, h in sizes}),
           "pixel_mean_abs_delta_255": float(pixel_delta.mean()), "pixel_max_image_mean_abs_delta_255":
           float(pixel_delta.max()), "embedding_cosine_mean": float(cosine.mean()),
           "embedding_cosine_min": float(cosine.min()), "loc_correct_flips": int(flips),
           "loc_correct_full": int(correct)}
    for key, values in deltas.items():
        out[f"{key}_mean_abs_delta"] = float(np.mean(values))
        out[f"{key}_max_abs_delta"] = float(np.max(values))
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="images of the benchmark dataset for (b)")
    parser.add_argument("--data", help="where to generate the dataset (kept); default: a temporary folder")
    parser.add_argument("--size", type=int, default=224, help="input size for the 1200x900 timing")
    parser.add_argument("--speed-images", type=int, default=20, help="generated 1200x900 JPEGs for (a)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the models in (b)")
    parser.add_argument("--no-resnet", action="store_true", help=f"skip {RESNET} at 224 px in (b)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    cv2.setNumThreads(1)
    torch.set_num_threads(args.threads)
    report = {"config": {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "cpu_count": os.cpu_count(),
                         "machine": platform.processor() or platform.machine(), "opencv": cv2.__version__,
                         "torch": torch.__version__, "repeats": args.repeats, "seed": args.seed}}

    photos = [photo_jpeg(1200, 900, args.seed + i) for i in range(args.speed_images)]
    report["speed_1200x900"] = decode_times(photos, args.size, args.repeats)

    with tempfile.TemporaryDirectory() as scratch:
        data = Path(args.data or scratch)
        classes = max(1, -(-args.images // 30))
        manifest = data / "manifest.parquet"
        if not manifest.exists():
            start = time.perf_counter()
            generate_dataset(data, num_classes=classes, images_per_class=-(-args.images // classes),
                             min_side=700, max_side=900, seed=args.seed)
            print(f"generated {classes} classes in {time.perf_counter() - start:.0f} s", flush=True)
        rows = read_manifest(str(manifest)).to_pylist()[:args.images]
        files = [(data / row["uri"]).read_bytes() for row in rows]

        models = [("demo", *load_model(None, DEMO_MODEL)[:2])]
        if not args.no_resnet:
            models.append((RESNET, *load_model(RESNET)[:2]))
        speed_files = files[:args.speed_images * 2]
        report["speed_dataset"] = [decode_times(speed_files, size, args.repeats)
                                   for size in sorted({args.size} | {p.size for _, _, p in models})]
        report["effect"] = [effect(rows, data, name, model.eval(), preprocess, args.batch_size)
                            for name, model, preprocess in models]

    for entry in [report["speed_1200x900"], *report["speed_dataset"]]:
        print(f"decode+resize to {entry['size']} of {entry['images']} JPEGs (reductions {entry['reductions']}): "
              f"full {entry['full_ms']:.2f} ms, reduced {entry['reduced_ms']:.2f} ms, x{entry['ratio']:.2f} "
              f"(CPU time x{entry['cpu_ratio']:.2f}, best x{entry['best_ratio']:.2f})")
    for entry in report["effect"]:
        print(f"{entry['model']} @ {entry['size']}: |d ratio_bbox| mean {entry['ratio_bbox_mean_abs_delta']:.4f} "
              f"max {entry['ratio_bbox_max_abs_delta']:.4f}, loc_correct flips {entry['loc_correct_flips']}"
              f"/{entry['images']}, pixels mean |d| {entry['pixel_mean_abs_delta_255']:.2f}/255")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
