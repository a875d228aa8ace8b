"""The explain job on Ray vs an in-process loop doing the same work, side by side.

Same generated images, same model, same stages (decode + core + metrics + Parquet);
the loop calls ``embcam.job.stages`` directly, one batch after another, without Ray.
Runs alternate (loop, job, loop, job, ...) so machine noise hits both alike; the
figure is the ratio of medians. Also records the peak memory of every process of the
job (driver + all Ray processes, summed RSS sampled from /proc) at N and 10 x N images.

    .venv/bin/python bench/job_vs_loop.py --images 300 --repeats 2 --json bench/job_vs_loop.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from embcam.data.locations import default_image_root  # noqa: E402
from embcam.data.manifest import read_manifest  # noqa: E402
from embcam.datasets import generate_dataset  # noqa: E402
from embcam.job.model_stage import ExplainModel, ModelConfig
from embcam.job.pipeline import ExplainConfig, run_explain  # noqa: E402
from embcam.job.stages import INTERNAL_COLUMNS, compute_metrics, load_images, to_results  # noqa: E402

DEMO_MODEL = Path(__file__).resolve().parents[1] / "embcam" / "assets" / "demo_model.pt"


def in_process_loop(manifest: str, out: str, checkpoint: str, batch_size: int) -> float:
    """Decode, explain (self proxy), metrics and Parquet, one batch at a time; seconds."""
    start = time.perf_counter()
    table = read_manifest(manifest)
    root = default_image_root(manifest)
    model = ExplainModel(ModelConfig(checkpoint=checkpoint), "self", num_threads=os.cpu_count())
    size = model.preprocess.size
    os.makedirs(out, exist_ok=True)
    for k, offset in enumerate(range(0, table.num_rows, batch_size)):
        batch = {c: table.column(c).slice(offset, batch_size).to_numpy(zero_copy_only=False)
                 for c in table.column_names}
        batch = compute_metrics(model(load_images(batch, root, size)))
        rows = to_results({c: v for c, v in batch.items() if c not in INTERNAL_COLUMNS})
        pq.write_table(rows, f"{out}/part-{k:05d}.parquet")
    return time.perf_counter() - start


class PeakMemory:
    """Peak of the summed RSS of this process and every Ray process, sampled every 0.2 s."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def _sample(self) -> int:
        total = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if int(pid) == os.getpid() or b"ray" in cmd:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
            except (OSError, ValueError):
                continue
        return total

    def __enter__(self):
        def loop():
            while not self._stop.wait(0.2):
                self.peak = max(self.peak, self._sample())
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def job(manifest: str, out: str, checkpoint: str, batch_size: int) -> float:
    start = time.perf_counter()
    run_explain(ExplainConfig(manifest=manifest, out=out, checkpoint=checkpoint, batch_size=batch_size,
                              overwrite=True), progress=False)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="N (10 classes x N/10 images)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--memory-scale", type=int, default=10, help="also measure peak memory at this x N (0: skip)")
    parser.add_argument("--checkpoint", default=str(DEMO_MODEL))
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    import ray

    work = Path(tempfile.mkdtemp(prefix="embcam-bench-"))
    per_class = max(1, args.images // 10)
    manifest = str(generate_dataset(work / "data", classes=range(50, 60), images_per_class=per_class, seed=1))
    n = 10 * per_class
    ray.init(include_dashboard=False, log_to_driver=False)
    job(manifest, str(work / "warm"), args.checkpoint, args.batch_size)  # warm-up: worker start, imports
    loop_s, job_s = [], []
    for r in range(args.repeats):
        loop_s.append(in_process_loop(manifest, str(work / f"loop{r}"), args.checkpoint, args.batch_size))
        job_s.append(job(manifest, str(work / f"job{r}"), args.checkpoint, args.batch_size))
        print(f"repeat {r}: loop {loop_s[-1]:.1f} s, job {job_s[-1]:.1f} s", flush=True)
    result = {
        "images": n, "batch_size": args.batch_size, "cpus": os.cpu_count(),
        "loop_seconds": loop_s, "job_seconds": job_s,
        "loop_images_per_s": n / statistics.median(loop_s), "job_images_per_s": n / statistics.median(job_s),
    }
    result["job_over_loop"] = result["job_images_per_s"] / result["loop_images_per_s"]
    if args.memory_scale:
        big = str(generate_dataset(work / "big", classes=range(50, 60),
                                   images_per_class=per_class * args.memory_scale, seed=2))
        for label, m in (("n", manifest), (f"{args.memory_scale}n", big)):
            with PeakMemory() as mem:
                job(m, str(work / f"mem-{label}"), args.checkpoint, args.batch_size)
            result[f"peak_rss_bytes_{label}"] = mem.peak
        result["peak_memory_ratio"] = result[f"peak_rss_bytes_{args.memory_scale}n"] / result["peak_rss_bytes_n"]
    ray.shutdown()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
