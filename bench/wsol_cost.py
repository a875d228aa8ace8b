"""What MaxBoxAccV2 and PxAP (embcam.wsol) add to `embcam report`, per image and at scale.

    .venv/bin/python bench/wsol_cost.py --rows 5000 50000 --json bench/wsol_cost.json
    .venv/bin/python bench/wsol_cost.py --rows --memory-rows --commit --counter-rows 50000 1000000 \\
        --json bench/wsol_counters.json

1. Per-image cost of the accumulators (`WsolAccumulator.add`: upsample, levels, 100
   findContours, PxAP counts) and of reading one mask (`read_bytes` + `decode_mask`), on
   real heatmaps: the bundled demo model's EmbeddingCAM maps (self proxy, 8 x 8) of 200
   generated images, evaluated at their own size (96-160 px) and with the image, box and
   mask scaled x3 (about CUB's 500 x 375) and x6 (the metrics grid's cap, 512 px a side).
   Medians over images of the best of `--repeats` rounds; one thread.
2. At scale: run folders of N rows (the 200 images tiled, results in files of 256 rows as
   the job writes them, boxes and masks in the manifest), each measured in a fresh process:
   wall time and peak RSS above the process's RSS after its imports, of Table 1 as before
   (`table1(wsol=False)`) and of `evaluate_run` (`--rows`); for `--memory-rows` (1,000,000)
   of Table 1 and of the part of `evaluate_run` that grows with N, its manifest index
   (`ManifestAnnotations`).
3. With the job's counters (`--counter-rows`): the same run folders, each results file
   carrying its counters in its metadata as the job writes them (`wsol.counters_metadata`),
   so `evaluate_run` sums them: its time and peak memory, beside Table 1's.
4. What the counters add to the job's commit stage (`--commit`): per annotated image, the
   time of `wsol.image_counts` (the work `stages.compute_metrics` adds to each row with a
   box or a mask) and of `counters_metadata` (what `to_results` adds per file), beside the
   whole commit (`compute_metrics` + `to_results`) of a batch of the 200 images, at x1 and x3.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SCALES = (1, 3, 6)
BBOX = ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")


def base_images(folder: Path) -> list[dict]:
    """200 generated images with their demo-model heatmap, box and mask."""
    import torch

    from embcam.cam import EmbeddingCAM
    from embcam.data.images import decode_image, decode_mask, resize_square
    from embcam.datasets.synthetic import generate_dataset
    from embcam.models import load_model

    manifest = generate_dataset(folder, num_classes=100, images_per_class=20, classes=range(50, 60), seed=0)
    rows = pq.read_table(manifest).to_pylist()
    model, preprocess, _ = load_model(checkpoint=ROOT / "embcam" / "assets" / "demo_model.pt")
    images = [decode_image((folder / r["uri"]).read_bytes()) for r in rows]
    x = preprocess(torch.from_numpy(np.stack([resize_square(i, preprocess.size) for i in images])))
    heat = EmbeddingCAM(model, None, "embedding-map")(x, "self").heatmaps.numpy()
    return [{"image_id": r["image_id"], "heat": heat[i], "width": images[i].shape[1], "height": images[i].shape[0],
             "box": (r["bbox_x0"], r["bbox_y0"], r["bbox_x1"], r["bbox_y1"]), "mask_uri": r["mask_uri"],
             "mask": decode_mask((folder / r["mask_uri"]).read_bytes())} for i, r in enumerate(rows)]


def per_image_costs(images: list[dict], repeats: int) -> dict:
    from embcam.data.fetch import read_bytes
    from embcam.data.images import decode_mask
    from embcam.wsol import WsolAccumulator

    out = {}
    for s in SCALES:
        scaled = []
        for im in images:
            w, h = im["width"] * s, im["height"] * s
            mask = cv2.resize(im["mask"], (w, h), interpolation=cv2.INTER_NEAREST)
            scaled.append((im["heat"], w, h, tuple(v * s for v in im["box"]), mask))
        path = Path(tempfile.gettempdir()) / f"wsol_cost_mask_{s}.png"
        cv2.imwrite(str(path), (scaled[0][4] * 255).astype(np.uint8))
        box_ms, both_ms, decode_ms = [], [], []
        for heat, w, h, box, mask in scaled:
            best_box = best_both = np.inf
            for _ in range(repeats):
                acc = WsolAccumulator()
                t = time.perf_counter()
                acc.add(heat, w, h, box)
                best_box = min(best_box, time.perf_counter() - t)
                t = time.perf_counter()
                acc.add(heat, w, h, box, mask)
                best_both = min(best_both, time.perf_counter() - t)
            box_ms.append(best_box * 1e3)
            both_ms.append(best_both * 1e3)
        for _ in range(repeats * 20):
            t = time.perf_counter()
            decode_mask(read_bytes(str(path)))
            decode_ms.append((time.perf_counter() - t) * 1e3)
        sizes = [(w, h) for _, w, h, _, _ in scaled]
        out[f"x{s}"] = {"image_sides": [min(min(z) for z in sizes), max(max(z) for z in sizes)],
                        "box_ms": round(statistics.median(box_ms), 3),
                        "box_and_mask_ms": round(statistics.median(both_ms), 3),
                        "mask_read_decode_ms": round(statistics.median(decode_ms), 3),
                        "mask_side": list(scaled[0][4].shape[::-1])}
    return out


def write_run(folder: Path, images: list[dict], data: Path, rows: int, counters: bool = False) -> str:
    """A run folder of ``rows`` results rows (the images tiled), Table 1's columns computed;
    ``counters``: each file with its WSOL counters in its metadata, as the job writes them."""
    from embcam.data.schemas import IOU_SWEEP_METADATA, WSOL_COUNTERS_METADATA, conform
    from embcam.metrics import THRESHOLDS, heatmap_metrics
    from embcam.wsol import counters_metadata, image_counts

    counts = [image_counts(np.asarray(im["heat"], np.float32), im["width"], im["height"], im["box"], im["mask"])
              for im in images] if counters else None

    (folder / "results").mkdir(parents=True)
    base = []
    for im in images:
        m = heatmap_metrics(im["heat"], im["width"], im["height"], im["box"], im["mask"])
        base.append(dict(image_id="", label="a", split="eval", status="ok", width=im["width"], height=im["height"],
                         proxy_kind="self", heatmap=im["heat"].ravel().tolist(), heatmap_height=8, heatmap_width=8,
                         **{k: v for k, v in m.items() if k != "iou_sweep"},
                         iou_sweep=m["iou_sweep"].tolist()))
    base = conform(base, "results")
    ids = pa.array([f"r{i:08d}" for i in range(rows)])
    tile = pa.array(np.arange(rows) % len(images))
    for start in range(0, rows, 256):  # files of 256 rows, as the job writes them
        stop = min(rows, start + 256)
        part = base.take(tile[start:stop]).set_column(0, "image_id", ids[start:stop])
        if counters:
            summed = counters_metadata(["eval"] * (stop - start), [counts[i] for i in tile[start:stop].to_numpy()])
            part = part.replace_schema_metadata({IOU_SWEEP_METADATA: json.dumps(THRESHOLDS),
                                                 WSOL_COUNTERS_METADATA: summed})
        pq.write_table(part, folder / "results" / f"part-{start:012d}-{stop:012d}.parquet")
    column = {"uri": [im["mask_uri"] for im in images], "mask_uri": [im["mask_uri"] for im in images],
              **{c: [im["box"][j] for im in images] for j, c in enumerate(BBOX)}}
    manifest = pa.table({"image_id": ids, "label": pa.array(["a"] * rows), "split": pa.array(["eval"] * rows),
                         **{c: pa.array(v).take(tile) for c, v in column.items()}})
    pq.write_table(manifest, folder / "manifest.parquet")
    config = {"proxy": "self", "manifest": str(folder / "manifest.parquet"), "image_root": str(data)}
    (folder / "summary.json").write_text(json.dumps({"config": config}))
    return str(folder)


def commit_costs(images: list[dict], repeats: int) -> dict:
    """Per annotated image: what the counters add to the commit stage, and the whole commit."""
    from embcam.data.schemas import OK
    from embcam.job.stages import compute_metrics, to_results
    from embcam.wsol import counters_metadata, image_counts

    out = {}
    for s in (1, 3):
        n = len(images)
        sizes = [(im["width"] * s, im["height"] * s) for im in images]
        masks = [cv2.resize(im["mask"], size, interpolation=cv2.INTER_NEAREST) for im, size in zip(images, sizes)]
        boxes = [tuple(v * s for v in im["box"]) for im in images]
        batch = {"image_id": np.array([im["image_id"] for im in images], object),
                 "label": np.array(["a"] * n, object), "split": np.array(["eval"] * n, object),
                 "status": np.array([OK] * n, object), "error": np.array([None] * n, object),
                 "proxy_kind": np.array(["self"] * n, object),
                 "width": np.array([w for w, _ in sizes], np.int32),
                 "height": np.array([h for _, h in sizes], np.int32),
                 "heatmap": np.stack([im["heat"] for im in images]).astype(np.float32),
                 "mask_png": np.array([cv2.imencode(".png", (m * 255).astype(np.uint8))[1].tobytes() for m in masks],
                                      object),
                 **{c: np.array([b[j] for b in boxes], np.float64) for j, c in enumerate(BBOX)}}
        commit, counts_s, meta_s = [], [], []
        for _ in range(repeats):
            t = time.perf_counter()
            to_results(compute_metrics(batch))
            commit.append(time.perf_counter() - t)
            t = time.perf_counter()
            counts = [image_counts(batch["heatmap"][i], int(batch["width"][i]), int(batch["height"][i]), boxes[i],
                                   masks[i]) for i in range(n)]
            counts_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            counters_metadata(["eval"] * n, counts)
            meta_s.append(time.perf_counter() - t)
        out[f"x{s}"] = {"images": n, "commit_ms_per_image": round(min(commit) / n * 1e3, 3),
                        "image_counts_ms_per_image": round(min(counts_s) / n * 1e3, 3),
                        "counters_metadata_ms_per_image": round(min(meta_s) / n * 1e3, 4)}
    return out


# Peak memory of the call alone: the kernel's high-water mark (VmHWM) is reset after the imports
# (writing 5 to /proc/self/clear_refs), so the import of torch does not hide it.
MEASURE = """
import json, sys, time
from embcam.report.table import table1
from embcam.wsol_run import ManifestAnnotations, evaluate_run
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
what, run = sys.argv[1], sys.argv[2]
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
t = time.perf_counter()
if what == "table1":
    table1([run], wsol=False)
elif what == "wsol":
    evaluate_run(run)
elif what == "index":
    ManifestAnnotations(run)
print(json.dumps({"seconds": time.perf_counter() - t, "rss_before_mb": before,
                  "peak_rss_mb": status("VmHWM:"), "peak_above_before_mb": status("VmHWM:") - before}))
"""


def measure(what: str, run: str) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, what, run], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[5000, 50000], help="run sizes for the scale test")
    parser.add_argument("--memory-rows", type=int, nargs="*", default=[1000000],
                        help="run sizes where only memory and Table 1's time are measured: Table 1 as before and "
                             "the manifest index MaxBoxAccV2 and PxAP build (their full pass takes ms a row)")
    parser.add_argument("--counter-rows", type=int, nargs="*", default=[],
                        help="run sizes whose results files carry the job's WSOL counters: evaluate_run sums them")
    parser.add_argument("--commit", action="store_true", help="what the counters add to the commit stage")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="wsol_cost_"))
    images = base_images(work / "data")
    result = {"per_image": per_image_costs(images, args.repeats) if args.rows else None, "scale": {}}
    print(json.dumps(result["per_image"], indent=2), flush=True)
    if args.commit:
        result["commit"] = commit_costs(images, args.repeats)
        print("commit", json.dumps(result["commit"]), flush=True)
    for rows in args.counter_rows:
        run = write_run(work / f"counters-{rows}", images, work / "data", rows, counters=True)
        entry = {"table1": measure("table1", run), "wsol": measure("wsol", run)}
        entry["wsol_ms_per_row"] = round(entry["wsol"]["seconds"] / rows * 1e3, 5)
        result.setdefault("counters", {})[str(rows)] = entry
        print("counters", rows, json.dumps(entry), flush=True)
    for rows in args.rows:
        run = write_run(work / f"run-{rows}", images, work / "data", rows)
        entry = {"table1": measure("table1", run), "wsol": measure("wsol", run)}
        entry["wsol_ms_per_row"] = round(entry["wsol"]["seconds"] / rows * 1e3, 3)
        entry["table1_ms_per_row"] = round(entry["table1"]["seconds"] / rows * 1e3, 3)
        result["scale"][str(rows)] = entry
        print(rows, json.dumps(entry), flush=True)
    for rows in args.memory_rows:
        run = write_run(work / f"run-{rows}", images, work / "data", rows)
        entry = {"table1": measure("table1", run), "index": measure("index", run)}
        entry["table1_ms_per_row"] = round(entry["table1"]["seconds"] / rows * 1e3, 3)
        result["scale"][str(rows)] = entry
        print(rows, json.dumps(entry), flush=True)
    result["machine"] = {"cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
                         "opencv": cv2.__version__}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
