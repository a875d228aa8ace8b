"""Test hooks, set in the environment of whoever starts the cluster or the job (never read
from data): faults injected at named points of the job, so that tests can kill workers,
hold them, or make a write fail exactly where they want, with the real job around them.
No imports from embcam: every module may call it.
"""
from __future__ import annotations

import errno
import os
import signal
import time

HOOKS = ("EMBCAM_FAULT", "EMBCAM_TEST_JOB")
"""``EMBCAM_FAULT``: the faults (``fault_point``); ``EMBCAM_TEST_JOB``: a test's mark on every
process of a job, by which it stops them all."""


def runtime_env() -> dict:
    """The hooks set in this process, for the workers of a Ray it joins (the workers of a Ray
    it starts inherit its environment anyway)."""
    hooks = {name: os.environ[name] for name in HOOKS if name in os.environ}
    return {"env_vars": hooks} if hooks else {}


def fault_point(stage: str, image_ids) -> None:
    """``EMBCAM_FAULT`` holds faults separated by ``;``, each one of

    - ``<stage>:<image_id>``: SIGKILL the worker that reaches that row in that stage;
    - ``<stage>:<image_id>:once:<marker file>``: the same, only the first time (the marker
      records it);
    - ``<stage>:<image_id>:hold:<marker file>``: write the worker's pid into the marker, then
      block that worker for ever, so the job cannot finish until a test kills it (a Ray
      cancel, which raises KeyboardInterrupt in the task, ends it too, as it ends any task).
      Only the first worker is held: once the marker exists, the row's retry goes on;
    - ``write:<file name>:enospc``: the write of that file in the run folder fails as on a
      full disk (the stage ``write`` names files, not rows; ``RunFolder.write_bytes``).
    """
    specs = os.environ.get("EMBCAM_FAULT")
    if not specs:
        return
    ids = {str(i) for i in image_ids}
    for spec in specs.split(";"):
        fault_stage, image_id, *rest = spec.split(":", 3)
        if fault_stage != stage or image_id not in ids:
            continue
        mode, marker = (rest + [None, None])[:2]
        if mode == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), image_id)
        if mode not in (None, "once", "hold") or (mode is not None and not marker):
            raise ValueError(f"EMBCAM_FAULT: {spec!r} is not <stage>:<image_id>[:once|hold:<marker file>]"
                             " or write:<file name>:enospc")
        try:  # "once" and "hold" act the first time only: the marker records it
            first = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY) if mode else None
        except FileExistsError:
            continue
        if mode == "hold":
            os.write(first, str(os.getpid()).encode())
            os.close(first)  # the test waits for this file: the worker is held from here on
            while True:
                time.sleep(1)
        if first is not None:
            os.close(first)
        os.kill(os.getpid(), signal.SIGKILL)
