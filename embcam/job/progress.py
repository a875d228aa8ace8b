"""Progress lines for long work, for any command (no Ray)."""
from __future__ import annotations

import contextlib
import time


class Progress:
    """Rows done / total and images/s of each step, as a plain line through ``log`` every
    ``interval`` seconds and at the end of the step; silent without ``log``. Lines start
    with ``prefix`` (the command).

    ``timings[what]`` keeps each finished step's rows and seconds, and its steady rate: the
    rows after the first report over the time from the first report to the last, which
    leaves out the start-up of the step's workers (a catalog's rate, not a small run's)."""

    def __init__(self, log=None, interval: float = 5.0, prefix: str = "embcam explain"):
        self.log, self.interval, self.prefix = log, interval, prefix
        self.what, self.total, self.done, self.started, self.shown = "", 0, 0, 0.0, 0.0
        self.first: tuple[float, int] | None = None  # (when, rows) of the step's first report
        self.last = 0.0
        self.timings: dict[str, dict] = {}

    @contextlib.contextmanager
    def step(self, what: str, total: int):
        self.what, self.total, self.done, self.first = what, total, 0, None
        self.started = self.shown = time.monotonic()
        self._show(f"{total} rows to do")
        yield
        seconds = time.monotonic() - self.started
        self._show(f"{self.done}/{self.total} rows in {seconds:.1f} s, {self._rate():.1f} images/s")
        steady = None
        if self.first is not None and self.last > self.first[0]:
            steady = round((self.done - self.first[1]) / (self.last - self.first[0]), 3)
        self.timings[what] = {"rows": self.done, "seconds": round(seconds, 3), "steady_images_per_second": steady}

    def add(self, rows: int) -> None:
        self.done += rows
        self.last = time.monotonic()
        if self.first is None:
            self.first = (self.last, self.done)
        if self.done < self.total and time.monotonic() - self.shown >= self.interval:  # the end has its own line
            self._show(f"{self.done}/{self.total} rows, {self._rate():.1f} images/s")

    def _rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def _show(self, text: str) -> None:
        self.shown = time.monotonic()
        if self.log is not None:
            self.log(f"{self.prefix}: {self.what}: {text}")
