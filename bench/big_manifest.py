"""Validating big manifests: what the driver spends before any model work.

    .venv/bin/python bench/big_manifest.py --json bench/big_manifest.json

Writes manifests of 100,000 and 1,000,000 rows (one file each, with boxes and labels)
and one of 1,000 shards x 1,000 rows, then, each in a fresh process, times and takes the
peak RSS of: the streamed validation (`scan_manifest`, what `embcam explain` runs first),
the validation plus the copy into a run folder (a new run), and, for reference, the
in-memory `read_manifest`. Peak RSS includes the interpreter and imports (the baseline
row: a process that only imports embcam).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHILD = r"""
import json, resource, sys, time
from embcam.data.manifest import read_manifest, scan_manifest
from embcam.data.runstate import ManifestCopy, RunFolder
what, source, out = sys.argv[1:4]
start = time.perf_counter()
if what == "scan":
    rows = scan_manifest(source).rows
elif what == "scan+copy":
    copy = ManifestCopy(RunFolder(out), 256)
    rows = scan_manifest(source, copy.write).rows
    copy.close()
elif what == "read_manifest":
    rows = read_manifest(source).num_rows
else:
    rows = 0
seconds = time.perf_counter() - start
print(json.dumps({"rows": rows, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def table(n: int, offset: int = 0) -> pa.Table:
    ids = np.arange(offset, offset + n)
    return pa.table({"image_id": pa.array([f"img-{i:09d}" for i in ids]),
                     "uri": pa.array([f"images/{i % 1000:03d}/img-{i:09d}.jpg" for i in ids]),
                     "label": pa.array([f"class-{i % 5000}" for i in ids]),
                     "bbox_x0": np.full(n, 10.0), "bbox_y0": np.full(n, 12.0),
                     "bbox_x1": np.full(n, 90.0), "bbox_y1": np.full(n, 80.0)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/embcam-big-manifest")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sources = {"100k rows, 1 file": work / "m100k.parquet", "1M rows, 1 file": work / "m1m.parquet",
               "1M rows, 1,000 shards": work / "shards"}
    if not sources["100k rows, 1 file"].exists():
        pq.write_table(table(100_000), sources["100k rows, 1 file"])
        pq.write_table(table(1_000_000), sources["1M rows, 1 file"])
        sources["1M rows, 1,000 shards"].mkdir()
        for k in range(1000):
            pq.write_table(table(1000, k * 1000), sources["1M rows, 1,000 shards"] / f"part-{k:04d}.parquet")
    figures = {}
    for name, source in [("baseline (imports only)", work)] + list(sources.items()):
        whats = ["none"] if name.startswith("baseline") else ["scan", "scan+copy", "read_manifest"]
        for what in whats:
            out = subprocess.run([sys.executable, "-c", CHILD, what, str(source), str(work / "out")],
                                 capture_output=True, text=True, check=True).stdout
            figures[f"{name} / {what}"] = json.loads(out)
            print(f"{name:24s} {what:14s} {figures[f'{name} / {what}']}", flush=True)
            subprocess.run(["rm", "-rf", str(work / "out")], check=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
