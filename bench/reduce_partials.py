"""The mean-proxy reduce at many classes: pass 1's partial-sum pieces -> proxies.parquet,
on the driver alone against on Ray (the job's way), side by side.

    .venv/bin/python bench/reduce_partials.py --labels 100000 1000000 --json bench/reduce_partials.json

For each label count: a run folder whose `_embcam/partials/` holds one partial-sum row per
label (d = 128, as a catalog with one image per class writes them) in pieces of
--block-rows rows. Then, each in a fresh process, the reduce:
- `driver`: every piece read into this process, summed per class and normalised there
  (`tasks.proxies_of_bucket` on the whole table), then written: what a reduce on the
  driver costs at best;
- `ray`: `embcam.job.reduce.reduce_on_ray` on a local Ray of --cpus CPUs, the driver writing each
  bucket as it comes (`RunFolder.write_tables`), as the job does.
Reported: wall seconds and the driver's peak RSS above what it held before the reduce
(after its imports and, for `ray`, after ray.init). Both must write the same proxies.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
mode, out, block_rows, dim, cpus = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
import pyarrow.parquet as pq
from embcam.data.runstate import PARTIALS, PROXIES, STATE, RunFolder
from embcam.job import tasks
from embcam.proxies import PROXIES_SCHEMA
run = RunFolder(out)
if mode == "ray":
    import ray
    from embcam.job.reduce import reduce_on_ray
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if mode == "ray":
    rows = run.write_tables(PROXIES_SCHEMA, reduce_on_ray(run, block_rows, dim), PROXIES)
else:
    table = pq.read_table(run.piece_paths(STATE, PARTIALS), schema=tasks.PARTIALS_SCHEMA)
    proxies = tasks.proxies_of_bucket(table)
    del table
    rows = run.write_tables(PROXIES_SCHEMA, [proxies], PROXIES)
seconds = time.perf_counter() - start
added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"mode": mode, "seconds": seconds, "driver_peak_rss_added_bytes": added, "rows_written": rows}))
"""


def write_partials(out: Path, labels: int, dim: int, block_rows: int) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from embcam.data.runstate import PARTIALS, STATE, piece_name
    from embcam.job.tasks import partials_table

    folder = out / STATE / PARTIALS
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for start in range(0, labels, block_rows):
        stop = min(start + block_rows, labels)
        sums = rng.normal(size=(stop - start, dim))
        pq.write_table(partials_table([f"c{i}" for i in range(start, stop)], sums, np.ones(stop - start, np.int64)),
                       folder / piece_name(start, stop))


def same_proxies(a: Path, b: Path) -> bool:
    import numpy as np
    import pyarrow.parquet as pq

    ta, tb = (pq.read_table(p).sort_by("label") for p in (a, b))
    return ta.column("label").equals(tb.column("label")) and np.allclose(
        np.stack(ta.column("proxy").to_numpy(zero_copy_only=False)),
        np.stack(tb.column("proxy").to_numpy(zero_copy_only=False)), rtol=1e-6, atol=1e-7)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block-rows", type=int, default=1024)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    runs = []
    for labels in args.labels:
        work = Path(tempfile.mkdtemp(prefix="embcam-reduce-"))
        try:
            write_partials(work / "run", labels, args.dim, args.block_rows)
            written = {}
            for mode in ("driver", "ray"):
                done = subprocess.run([sys.executable, "-c", CHILD, mode, str(work / "run"), str(args.block_rows),
                                       str(args.dim), str(args.cpus)], capture_output=True, text=True, check=True)
                r = json.loads(done.stdout.strip().splitlines()[-1]) | {"labels": labels, "dim": args.dim}
                runs.append(r)
                written[mode] = work / f"proxies-{mode}.parquet"
                shutil.move(work / "run" / "proxies.parquet", written[mode])
                print(f"{labels:>9} labels x {args.dim}, {mode:>6}: {r['seconds']:6.1f} s, "
                      f"driver peak RSS +{r['driver_peak_rss_added_bytes'] / 2**30:.2f} GiB", flush=True)
            assert same_proxies(written["driver"], written["ray"]), "the two reduces wrote different proxies"
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report = {"command": " ".join(["bench/reduce_partials.py", *(argv or sys.argv[1:])]), "runs": runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
