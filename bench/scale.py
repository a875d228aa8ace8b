"""Scale: `embcam explain --proxy mean` on N and 10 N generated images, then a kill and a resume.

    .venv/bin/python bench/scale.py --images 10000 100000 --queue bounded ray-default --strategy streaming \
        --json bench/scale.json

For each N and each --queue (the job as shipped, its streaming passes within their object
store budget; or that budget lifted, Ray Data's own bound of half the store the only one),
it runs the real CLI as its own process with its own local Ray (the bundled demo model at
64 px input, 64 px images, 100 classes, the default batch size) and samples, every 0.5 s:
- memory: the summed PSS of every process of the job (driver, raylet, GCS, workers;
  PSS counts shared pages once, so the object store's shared memory is not counted
  once per process that maps it);
- object store: the bytes in use on /dev/shm (where Ray's object store lives), above
  the level before the job started;
- spill: the bytes under the job's Ray temp folder's spill directories.
Throughput is the job's own images/s (summary.json: rows computed / wall time).

Then the largest N runs again and is SIGKILLed once half of its result rows are
committed; the rows then in flight (batches marked in the decode and model stages) are
counted; the same command resumes it, and the result is checked: one row per manifest
row, counts.resumed, and the rows computed again.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "embcam" / "assets" / "demo_model.pt"
CLASSES = 100


def _generate(args) -> str:
    from embcam.datasets import generate_dataset

    folder, classes, per_class = args
    return str(generate_dataset(folder, num_classes=CLASSES, images_per_class=per_class, classes=classes,
                                min_side=64, max_side=64, seed=0))


def dataset(work: Path, sizes: list[int]) -> dict[int, Path]:
    """One generated dataset of max(sizes) images (two processes); a manifest per size,
    taking every k-th row so each holds every class."""
    largest = max(sizes)
    folder = work / "data"
    if not (folder / f"manifest-{largest}.parquet").exists():
        halves = [(str(folder / f"g{i}"), range(i, CLASSES, 2), largest // CLASSES) for i in range(2)]
        with ProcessPoolExecutor(2) as pool:
            manifests = list(pool.map(_generate, halves))
        tables = []
        for manifest in manifests:  # uris relative to each half's folder -> relative to `folder`
            t = pq.read_table(manifest)
            prefix = Path(manifest).parent.name + "/"
            for column in ("uri", "mask_uri"):
                t = t.set_column(t.schema.get_field_index(column), column,
                                 pa.array([prefix + u for u in t.column(column).to_pylist()]))
            tables.append(t)
        pq.write_table(pa.concat_tables(tables), folder / f"manifest-{largest}.parquet")
    full = pq.read_table(folder / f"manifest-{largest}.parquet")
    out = {}
    for n in sizes:
        path = folder / f"manifest-{n}.parquet"
        if not path.exists():
            pq.write_table(full.take(list(range(0, full.num_rows, largest // n))[:n]), path)
        out[n] = path
    return out


# the job as shipped, and the job with its streaming passes' object store budget lifted (so
# that Ray Data's own bound, half the store, is the only one: what the job did before)
JOB = "import sys; from embcam.cli import main; sys.exit(main(sys.argv[1:]))"
UNBOUNDED = ("import sys; from embcam.job import plans; plans.QUEUE_BLOCKS_PER_CPU = 2**40; "
             "from embcam.cli import main; sys.exit(main(sys.argv[1:]))")


class Job:
    """`embcam explain` in its own process group, its processes found by an environment marker."""

    def __init__(self, manifest: Path, out: Path, extra: list[str], queue: str = "bounded"):
        self.marker = uuid.uuid4().hex
        self.tmp = Path(f"/tmp/esc-{self.marker[:8]}")  # short: Ray's socket paths must fit
        env = dict(os.environ, EMBCAM_BENCH_JOB=self.marker, RAY_TMPDIR=str(self.tmp),
                   RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-c", UNBOUNDED if queue == "ray-default" else JOB, "explain",
               "--manifest", str(manifest), "--out", str(out),
               "--checkpoint", str(DEMO_MODEL), "--proxy", "mean", "--no-progress", *extra]
        self.shm_base = _shm_used()
        self.peak = {"pss": 0, "shm": 0, "spill": 0}
        self.process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)
        self._thread.start()

    def pids(self) -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if self.marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                    found.append(int(pid))
            except OSError:
                continue
        return found

    def _sample_loop(self) -> None:
        while not self._stop.wait(0.5):
            pss = 0
            for pid in self.pids():
                try:
                    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                        if line.startswith("Pss:"):
                            pss += int(line.split()[1]) * 1024
                except OSError:
                    continue
            spill = sum(f.stat().st_size for f in self.tmp.rglob("*") if "spill" in str(f) and f.is_file()) \
                if self.tmp.exists() else 0
            for key, value in (("pss", pss), ("shm", _shm_used() - self.shm_base), ("spill", spill)):
                self.peak[key] = max(self.peak[key], value)

    def wait(self) -> tuple[int, str, str]:
        out, err = self.process.communicate()
        self.close()
        return self.process.returncode, out, err

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for pid in self.pids():  # a killed driver leaves its raylet and workers behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def _shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def committed_rows(out: Path) -> int:
    from embcam.data.runstate import RESULTS, RunFolder

    return sum(stop - start for start, stop in RunFolder(str(out)).pieces(RESULTS))


def in_flight_rows(out: Path) -> int:
    """Rows of the batches marked as started, not finished, in the decode and model stages."""
    rows = 0
    for marker in (out / "_embcam" / "attempts").glob("*"):
        parts = marker.name.split("-")
        if len(parts) == 4 and parts[3].isdigit():
            rows += int(parts[3])
    return rows


def run(manifest: Path, out: Path, extra: list[str], queue: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    job = Job(manifest, out, extra, queue)
    code, stdout, stderr = job.wait()
    if code != 0:
        raise SystemExit(f"job failed ({code}):\n{stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"queue": queue, "rows": summary["counts"]["results"], "ok": summary["counts"]["ok"],
            "plan": summary["plan"], "plan_reason": summary["plan_reason"], "wall_s": summary["wall_seconds"],
            "images_per_s": summary["images_per_second"], "peak_pss_bytes": job.peak["pss"],
            "peak_object_store_bytes": job.peak["shm"], "peak_spill_bytes": job.peak["spill"],
            "results_bytes": sum(p.stat().st_size for p in (out / "results").glob("*.parquet"))}


def kill_and_resume(manifest: Path, out: Path, rows: int, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    job = Job(manifest, out, extra)
    while committed_rows(out) < rows // 2:
        if job.process.poll() is not None:
            raise SystemExit("the job ended before half-way: nothing to kill")
        time.sleep(0.2)
    in_flight = in_flight_rows(out)
    job.kill()
    at_kill = committed_rows(out)
    resumed = Job(manifest, out, extra)
    code, stdout, stderr = resumed.wait()
    if code != 0:
        raise SystemExit(f"resume failed ({code}):\n{stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    ids = pq.read_table(out / "results", columns=["image_id"]).column("image_id")
    return {"committed_at_kill": at_kill, "in_flight_rows_at_kill": in_flight,
            "resumed": summary["counts"]["resumed"], "computed_after_resume": rows - summary["counts"]["resumed"],
            "results_rows": len(ids), "unique_ids": len(set(ids.to_pylist())), "manifest_rows": rows,
            "resume_wall_s": summary["wall_seconds"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--work", default="/tmp/embcam-scale", help="generated data and runs (about 1 GB at 100,000)")
    parser.add_argument("--no-kill", action="store_true", help="skip the kill-and-resume run")
    parser.add_argument("--strategy", default="auto", help="passed to embcam explain --strategy")
    parser.add_argument("--image-size", default="64", help="model input size (the demo model's is 128)")
    parser.add_argument("--queue", nargs="+", choices=("bounded", "ray-default"), default=["bounded"],
                        help="the streaming passes' object store budget: the job's (bounded), or lifted to Ray "
                             "Data's own bound, half the store (ray-default); both: side by side, alternating")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    work = Path(args.work)
    extra = ["--strategy", args.strategy, "--image-size", args.image_size]
    manifests = dataset(work, args.images)
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    figures = {"machine": f"{os.cpu_count()} CPUs, {memory_gib:.0f} GiB", "runs": {}}
    for n in sorted(args.images):
        for queue in args.queue:
            figures["runs"][f"{n} {queue}"] = run(manifests[n], work / f"run-{n}", extra, queue)
            print(n, json.dumps(figures["runs"][f"{n} {queue}"]), flush=True)
    small, large = min(args.images), max(args.images)
    figures["ratios"] = {}
    for queue in args.queue:
        a, b = figures["runs"][f"{small} {queue}"], figures["runs"][f"{large} {queue}"]
        figures["ratios"][queue] = {"peak_pss": b["peak_pss_bytes"] / a["peak_pss_bytes"],
                                    "peak_object_store": b["peak_object_store_bytes"] / a["peak_object_store_bytes"],
                                    "throughput": b["images_per_s"] / a["images_per_s"]}
    print("ratios (largest / smallest):", json.dumps(figures["ratios"]), flush=True)
    if not args.no_kill:
        n = max(args.images)
        figures["kill_and_resume"] = kill_and_resume(manifests[n], work / f"kill-{n}", n, extra)
        print("kill and resume:", json.dumps(figures["kill_and_resume"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
