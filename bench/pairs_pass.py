"""The pairs pass at catalog scale, without the model: random pairs over stored maps.

Writes N images' E maps (float16, d x h x w, pieces of 256 rows, as ``explain --keep-maps``
does) from random values, then times ``embcam.pairs.explain.write_pairs`` for P pairs drawn at
random (the worst case for locality: every block of pairs touches most pieces), and reports
pairs/s, the maps read (bytes) against the maps stored, and the peak RSS.

    .venv/bin/python bench/pairs_pass.py --images 20000 --pairs 200000 --json bench/pairs_pass.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from embcam.data.maps import MapStore, write_maps
from embcam.data.runstate import RunFolder, piece_name
from embcam.pairs.explain import write_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--pairs", type=int, default=200000)
    parser.add_argument("--grid", type=int, nargs=3, default=(128, 7, 7), metavar=("D", "H", "W"))
    parser.add_argument("--json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    run = RunFolder(tempfile.mkdtemp(prefix="embcam-pairs-"))
    d, h, w = args.grid
    ids = np.array([f"img{i:08d}" for i in range(args.images)], object)
    start = time.perf_counter()
    for a in range(0, args.images, 256):
        b = min(a + 256, args.images)
        write_maps(run, {"image_id": ids[a:b], "status": np.array(["ok"] * (b - a), object),
                         "error": np.array([None] * (b - a), object),
                         "maps": rng.normal(size=(b - a, d, h, w)).astype(np.float32),
                         "embedding": rng.normal(size=(b - a, d)).astype(np.float32)}, "float16", piece_name(a, b))
    written = time.perf_counter() - start
    stored = sum(p.stat().st_size for p in Path(run.path, "maps").glob("*.parquet"))
    pairs = pa.table({"query_id": ids[rng.integers(0, args.images, args.pairs)].tolist(),
                      "match_id": ids[rng.integers(0, args.images, args.pairs)].tolist()})
    start = time.perf_counter()
    store = MapStore(run)
    opened = time.perf_counter() - start
    reads = [0]
    piece_maps = store.piece_maps

    def counted(k):
        reads[0] += os.path.getsize(store.paths[k])
        return piece_maps(k)

    store.piece_maps = counted
    start = time.perf_counter()
    write_pairs(run, pairs, store)
    seconds = time.perf_counter() - start
    figures = {"images": args.images, "pairs": args.pairs, "grid": [d, h, w],
               "maps_stored_bytes": stored, "maps_read_bytes": reads[0],
               "maps_read_over_stored": round(reads[0] / stored, 2),
               "store_open_seconds": round(opened, 2), "pairs_seconds": round(seconds, 2),
               "pairs_per_second": round(args.pairs / seconds), "maps_write_seconds": round(written, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "cpus": os.cpu_count()}
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
