"""Progress lines for long work, for any command (no Ray)."""
from __future__ import annotations

import contextlib
import time


class Progress:
    """Rows done / total and images/s of each step, as a plain line through ``log`` every
    ``interval`` seconds and at the end of the step; silent without ``log``. Lines start
    with ``prefix`` (the command)."""

    def __init__(self, log=None, interval: float = 5.0, prefix: str = "embcam explain"):
        self.log, self.interval, self.prefix = log, interval, prefix
        self.what, self.total, self.done, self.started, self.shown = "", 0, 0, 0.0, 0.0

    @contextlib.contextmanager
    def step(self, what: str, total: int):
        self.what, self.total, self.done = what, total, 0
        self.started = self.shown = time.monotonic()
        self._show(f"{total} rows to do")
        yield
        self._show(f"{self.done}/{self.total} rows in {time.monotonic() - self.started:.1f} s, "
                   f"{self._rate():.1f} images/s")

    def add(self, rows: int) -> None:
        self.done += rows
        if self.done < self.total and time.monotonic() - self.shown >= self.interval:  # the end has its own line
            self._show(f"{self.done}/{self.total} rows, {self._rate():.1f} images/s")

    def _rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def _show(self, text: str) -> None:
        self.shown = time.monotonic()
        if self.log is not None:
            self.log(f"{self.prefix}: {self.what}: {text}")
