"""Ray's own count of object-store use over one `--proxy mean --strategy streaming` job.

    .venv/bin/pip install grpcio        # `ray memory` needs it; embcam does not
    .venv/bin/python bench/plasma_probe.py /tmp/embcam-scale/data/manifest-100000.parquet

Runs the job in this process (local Ray, the demo model at 64 px) and prints, every 3 s:
seconds since the start, MiB in use on /dev/shm above the level before the job, and
plasma's (MiB in use, objects) from `ray memory --stats-only`.
"""
import os
import re
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import ray  # noqa: E402

from embcam.job.pipeline import ExplainConfig, run_explain  # noqa: E402

DEMO_MODEL = Path(__file__).resolve().parents[1] / "embcam" / "assets" / "demo_model.pt"


def shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def main(manifest: str, out: str = "/tmp/embcam-plasma-probe") -> int:
    from ray._private.internal_api import memory_summary

    ray.init(include_dashboard=False, log_to_driver=False)
    base, start, stop = shm_used(), time.time(), threading.Event()

    def sample():
        while not stop.wait(3):
            found = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", memory_summary(stats_only=True))
            print(round(time.time() - start), (shm_used() - base) >> 20, found.groups() if found else None,
                  flush=True)

    threading.Thread(target=sample, daemon=True).start()
    run_explain(ExplainConfig(manifest=manifest, out=out, checkpoint=str(DEMO_MODEL), proxy="mean",
                              strategy="streaming", image_size=64, overwrite=True), progress=False)
    stop.set()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
