"""The mean-proxy reduce on the driver: pass 1's partial sums -> proxies.parquet's table.

    .venv/bin/python bench/reduce_partials.py --labels 100000 1000000 --json bench/reduce_partials.json

For each label count, in a fresh process: one partial-sums row per label (d = 128, as a
run with one image per class writes them), then what the driver does after pass 1
(`tasks.reduce_partials`, `MeanProxyAccumulator.finalize`, `proxy_table`), timed, with
the peak RSS it adds over the table it starts from.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
from embcam.job import tasks
from embcam.proxies import proxy_table
labels, dim = int(sys.argv[1]), int(sys.argv[2])
table = tasks.partials_table([f"c{i}" for i in range(labels)], np.random.default_rng(0).normal(size=(labels, dim)),
                             np.ones(labels, np.int64))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
acc = tasks.reduce_partials(table)
written = proxy_table(acc.finalize(), dict(acc.counts))
seconds = time.perf_counter() - start
added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"labels": labels, "dim": dim, "seconds": seconds, "peak_rss_added_bytes": added,
                  "rows_written": written.num_rows}))
"""


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    rows = []
    for labels in args.labels:
        done = subprocess.run([sys.executable, "-c", CHILD, str(labels), str(args.dim)], capture_output=True,
                              text=True, check=True)
        rows.append(json.loads(done.stdout))
        r = rows[-1]
        print(f"{labels:>9} labels x {args.dim}: {r['seconds']:6.1f} s, "
              f"peak RSS +{r['peak_rss_added_bytes'] / 2**30:.2f} GiB", flush=True)
    report = {"command": " ".join(["bench/reduce_partials.py", *(argv or sys.argv[1:])]), "runs": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
