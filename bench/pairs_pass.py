"""The pairs pass at catalog scale, without the model: random pairs over stored maps, on the
driver alone against on Ray (the job's way), side by side.

    .venv/bin/python bench/pairs_pass.py --images 20000 --pairs 2000000 --json bench/pairs_pass.json

Writes N images' E maps (float16, d x h x w, pieces of 256 rows, as ``explain --keep-maps``
does) from random values and P pairs drawn at random (the worst case for locality: every
chunk of pairs touches most pieces). Then, each in a fresh process:
- `driver`: ``embcam.pairs.explain.write_pairs``, the map store and every chunk in this
  process (as the job did before the pass moved to Ray, and as ``embcam reexplain`` does);
- `ray`: ``embcam.job.pairs_pass.pairs_on_ray`` on a local Ray of --cpus CPUs, as the job does.
Reported: pairs/s, the chunks (each one sweep over the maps pieces its pairs touch) and the
driver's peak RSS above what it held before the pass. Both must write the same pairs.
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
mode, run_dir, pairs_path, cpus = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from embcam.data.runstate import RunFolder
from embcam.pairs.explain import PAIR_BLOCK_ROWS, read_pairs
run = RunFolder(run_dir)
pairs = read_pairs(pairs_path)
chunks = [0]
def progress(rows):
    chunks[0] += 1
if mode == "ray":
    import ray
    from embcam.job.pairs_pass import pairs_on_ray
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
else:
    from embcam.data.maps import MapStore
    from embcam.pairs import explain
    sweep = explain.explain_pairs
    def counted(*args):
        chunks[0] += 1
        return sweep(*args)
    explain.explain_pairs = counted
    progress = None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if mode == "ray":
    rows = pairs_on_ray(run, pairs, PAIR_BLOCK_ROWS, progress)
else:
    rows = explain.write_pairs(run, pairs, MapStore(run), PAIR_BLOCK_ROWS)
seconds = time.perf_counter() - start
added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"mode": mode, "seconds": seconds, "pairs_per_second": rows / seconds, "chunks": chunks[0],
                  "driver_peak_rss_added_bytes": added}))
"""


def write_maps_and_pairs(work: Path, images: int, pairs: int, grid: tuple[int, int, int]) -> int:
    """The maps of ``images`` random images in ``work/run``, and ``pairs`` random pairs in
    ``work/pairs.parquet``; returns the bytes of maps stored."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embcam.data.maps import write_maps
    from embcam.data.runstate import RunFolder, piece_name

    rng = np.random.default_rng(0)
    run = RunFolder(str(work / "run"))
    d, h, w = grid
    ids = np.array([f"img{i:08d}" for i in range(images)], object)
    for a in range(0, images, 256):
        b = min(a + 256, images)
        write_maps(run, {"image_id": ids[a:b], "status": np.array(["ok"] * (b - a), object),
                         "error": np.array([None] * (b - a), object),
                         "maps": rng.normal(size=(b - a, d, h, w)).astype(np.float32),
                         "embedding": rng.normal(size=(b - a, d)).astype(np.float32)}, "float16", piece_name(a, b))
    pq.write_table(pa.table({"query_id": ids[rng.integers(0, images, pairs)].tolist(),
                             "match_id": ids[rng.integers(0, images, pairs)].tolist()}), work / "pairs.parquet")
    return sum(p.stat().st_size for p in (work / "run" / "maps").glob("*.parquet"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--pairs", type=int, default=2_000_000)
    p.add_argument("--grid", type=int, nargs=3, default=(128, 7, 7), metavar=("D", "H", "W"))
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    import pandas as pd

    work = Path(tempfile.mkdtemp(prefix="embcam-pairs-"))
    runs = []
    try:
        stored = write_maps_and_pairs(work, args.images, args.pairs, tuple(args.grid))
        written = {}
        for mode in ("driver", "ray"):
            done = subprocess.run([sys.executable, "-c", CHILD, mode, str(work / "run"), str(work / "pairs.parquet"),
                                   str(args.cpus)], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{mode}: exit {done.returncode}\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1]) | {"images": args.images, "pairs": args.pairs,
                                                                    "maps_stored_bytes": stored}
            runs.append(r)
            written[mode] = work / f"pairs-{mode}"
            shutil.move(work / "run" / "pairs", written[mode])
            print(f"{args.pairs:>9} pairs over {args.images} images, {mode:>6}: {r['seconds']:6.1f} s = "
                  f"{r['pairs_per_second']:8.0f} pairs/s, {r['chunks']} chunks, "
                  f"driver peak RSS +{r['driver_peak_rss_added_bytes'] / 2**30:.2f} GiB", flush=True)
        a, b = (pd.read_parquet(written[mode]) for mode in ("driver", "ray"))
        pd.testing.assert_frame_equal(a, b)  # the two passes wrote the same pairs
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = runs[0]["seconds"] / runs[1]["seconds"]
    print(f"ray / driver pairs/s: {ratio:.2f}x")
    report = {"command": " ".join(["bench/pairs_pass.py", *(argv or sys.argv[1:])]), "runs": runs,
              "ray_over_driver_pairs_per_second": ratio}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
