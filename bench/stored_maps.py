"""Stored E maps: what they cost on disk, and how far heatmaps re-explained from them are
from a model run with the same proxy bank.

On the generated benchmark's unseen classes with the bundled demo model (d = 128, an
8 x 8 grid at 128 px): a mean-proxy run gives the bank; then, side by side in one
process, ``explain --keep-maps`` (float16 and float32), ``explain --proxies BANK`` (the
model run) and ``embcam reexplain --proxies BANK`` from each set of maps. Prints bytes per
image on disk, the heatmap differences against the model run (max and mean, as a share
of that image's peak, and against the float16 bound sum_k |p_k||E_k| 2^-11), metric
differences, and re-explain vs model-run wall time.

    .venv/bin/python bench/stored_maps.py --images 600 --json bench/stored_maps.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from embcam.data.maps import MapStore  # noqa: E402
from embcam.data.runstate import RunFolder  # noqa: E402
from embcam.datasets import generate_dataset  # noqa: E402
from embcam.job.pipeline import ExplainConfig, run_explain  # noqa: E402
from embcam.job.reexplain import reexplain  # noqa: E402
from embcam.proxies import load_proxy_bank  # noqa: E402

DEMO_MODEL = Path(__file__).resolve().parents[1] / "embcam" / "assets" / "demo_model.pt"
FP16_EPS = 2.0 ** -11


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.parquet"))


def heatmaps(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "results").set_index("image_id").sort_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600, help="rows of the unseen classes explained")
    parser.add_argument("--work", help="folder for data and runs (default: a temporary one)")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="embcam-maps-"))
    data = work / "data"
    if not (data / "manifest.parquet").exists():
        generate_dataset(data, num_classes=100, images_per_class=30, seed=0)
    table = pq.read_table(data / "manifest.parquet")
    table = table.filter(pc.equal(table["split"], "eval")).slice(0, args.images)
    manifest = work / "eval.parquet"
    pq.write_table(table, manifest)

    def explain(name: str, **kw) -> float:
        start = time.perf_counter()
        run_explain(ExplainConfig(manifest=str(manifest), out=str(work / name), image_root=str(data),
                                  checkpoint=str(DEMO_MODEL), overwrite=True, **kw), progress=False)
        return time.perf_counter() - start

    explain("mean", proxy="mean")                       # the bank: the run's own class proxies
    bank_file = str(work / "mean" / "proxies.parquet")
    seconds = {"plain": explain("plain"),
               "maps16": explain("maps16", keep_maps=True),
               "maps32": explain("maps32", keep_maps=True, maps_dtype="float32"),
               "model": explain("model", proxies=bank_file)}
    for dtype in ("16", "32"):
        start = time.perf_counter()
        reexplain(str(work / f"maps{dtype}"), str(work / f"re{dtype}"), proxies=bank_file, overwrite=True,
                  log=lambda line: None)
        seconds[f"reexplain{dtype}"] = time.perf_counter() - start

    model = heatmaps(work / "model")
    ok = model.status == "ok"
    n = int(ok.sum())
    bank = load_proxy_bank(bank_file)
    peak = np.array([max(float(np.max(h)), 1e-30) for h in model.heatmap[ok]])
    figures = {"images": len(model), "ok": n, "seconds": {k: round(v, 2) for k, v in seconds.items()},
               "model_run_over_reexplain": {d: round(seconds["model"] / seconds[f"reexplain{d}"], 1)
                                            for d in ("16", "32")},
               "bytes_per_image": {
                   "results": round(folder_bytes(work / "model" / "results") / len(model)),
                   "maps_float16": round(folder_bytes(work / "maps16" / "maps") / len(model)),
                   "maps_float32": round(folder_bytes(work / "maps32" / "maps") / len(model))},
               "machine": f"{os.cpu_count()} vCPU, {platform.processor() or platform.machine()}, no GPU"}
    for dtype in ("16", "32"):
        got = heatmaps(work / f"re{dtype}")
        diff = np.stack([np.abs(a - b) for a, b in zip(got.heatmap[ok], model.heatmap[ok])])
        store = MapStore(RunFolder(str(work / f"maps{dtype}")))
        maps = store.rows(list(model.index[ok]))["maps"]
        p = np.stack([bank[str(label)] for label in model.label[ok]])
        bound = (np.einsum("bdhw,bd->bhw", np.abs(maps), np.abs(p)) * FP16_EPS).reshape(n, -1)
        share = diff / peak[:, None]
        figures[f"float{dtype}"] = {
            "max_abs_diff_over_image_peak": float(share.max()),
            "mean_abs_diff_over_image_peak": float(share.mean()),
            "within_float16_bound": bool((diff <= bound * (1 + FP16_EPS) + 1e-6 * peak[:, None]).all()),
            "ratio_bbox_max_abs_diff": float(np.abs(got.ratio_bbox[ok] - model.ratio_bbox[ok]).max()),
            "loc_correct_changed": int((got.loc_correct[ok] != model.loc_correct[ok]).sum()),
        }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
