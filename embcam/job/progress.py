"""Progress lines for long work, for any command (no Ray)."""
from __future__ import annotations

import contextlib
import threading
import time


class Progress:
    """Rows done / total and images/s of each step, as a plain line through ``log`` every
    ``interval`` seconds and at the end of the step; silent without ``log``. Lines start
    with ``prefix`` (the command).

    While a step runs, a thread says where it stands at least every ``interval`` seconds, even
    while no batch ends (a slow model's one batch): rows done so far and their rate since the
    step started (``tick``). ``clock`` is the time source (seconds); ``heartbeat`` False: no
    thread, ``tick`` is called by hand (a test on a clock of its own).

    ``timings[what]`` keeps each finished step's rows and seconds, and its steady rate: the
    rows after the first report over the time from the first report to the last, which
    leaves out the start-up of the step's workers (a catalog's rate, not a small run's)."""

    def __init__(self, log=None, interval: float = 5.0, prefix: str = "embcam explain", clock=None,
                 heartbeat: bool = True):
        self.log, self.interval, self.prefix, self.heartbeat = log, interval, prefix, heartbeat
        self.clock = clock or time.monotonic
        self.what, self.total, self.done, self.started, self.shown = "", 0, 0, 0.0, 0.0
        self.first: tuple[float, int] | None = None  # (when, rows) of the step's first report
        self.last = 0.0
        self.timings: dict[str, dict] = {}
        self._lock = threading.RLock()  # the step's thread and the caller both show lines

    @contextlib.contextmanager
    def step(self, what: str, total: int):
        self.what, self.total, self.done, self.first = what, total, 0, None
        self.started = self.shown = self.clock()
        self._show(f"{total} rows to do")
        ended = threading.Event()
        ticker = None
        # interval 0: a line at every batch, none between
        if self.log is not None and self.heartbeat and self.interval > 0:
            ticker = threading.Thread(target=self._tick_until, args=(ended,), name="embcam-progress", daemon=True)
            ticker.start()
        try:
            yield
        finally:
            ended.set()
            if ticker is not None:
                ticker.join()
        seconds = self.clock() - self.started
        self._show(f"{self.done}/{self.total} rows in {seconds:.1f} s, {self._rate():.1f} images/s")
        steady = None
        if self.first is not None and self.last > self.first[0]:
            steady = round((self.done - self.first[1]) / (self.last - self.first[0]), 3)
        self.timings[what] = {"rows": self.done, "seconds": round(seconds, 3), "steady_images_per_second": steady}

    def add(self, rows: int) -> None:
        with self._lock:
            self.done += rows
            self.last = self.clock()
            if self.first is None:
                self.first = (self.last, self.done)
            if self.done < self.total and self.last - self.shown >= self.interval:  # the end has its own line
                self._show(f"{self.done}/{self.total} rows, {self._rate():.1f} images/s")

    def tick(self) -> None:
        """A line when none was shown for ``interval`` seconds (the step's thread calls it)."""
        with self._lock:  # one line per moment, whoever calls
            now = self.clock()
            if now - self.shown >= self.interval:
                self._show(f"{self.done}/{self.total} rows after {now - self.started:.0f} s, "
                           f"{self._rate():.1f} images/s so far")

    def _tick_until(self, ended: threading.Event) -> None:
        while not ended.wait(self.interval / 4):  # a line at most a quarter interval late
            self.tick()

    def _rate(self) -> float:
        return self.done / max(self.clock() - self.started, 1e-9)

    def _show(self, text: str) -> None:
        with self._lock:
            self.shown = self.clock()
            if self.log is not None:
                self.log(f"{self.prefix}: {self.what}: {text}")
