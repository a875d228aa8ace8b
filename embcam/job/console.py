"""What an explain run shows on the console: Ray Data's bars only on a terminal, and Ray's
known-false or moot lines kept off the console (Ray's log files keep them)."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import sys
import termios
import threading
import tty


def on_terminal() -> bool:
    """Ray Data draws its bars on stderr, and only where stdout is a terminal."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class RayNoise(logging.Filter):
    """Ray's console lines that are false or moot for an embcam run (the log files keep them)."""

    MESSAGES = (
        # Ray Data checks one snapshot of ray.available_resources() as Dataset.materialize()
        # starts. Right after an earlier dataset finishes, the CPUs of its actors and tasks
        # still count as taken while Ray releases them, so the warning fires and the dataset
        # then runs (seen in this project's runs 0.1-0.5 s after a pass ended). The requests
        # themselves fit the cluster: see _actor_options.
        "The Dataset job will hang unless more CPUs are freed up",
        # embcam turned the bars off itself (no terminal, or --no-progress) and shows its own line
        "Progress bars disabled",
        # Ray >= 2.59 says so on every local start: token authentication is its default
        "Token authentication is enabled for this Ray cluster",
        # a worker's exception, logged with its traceback before the driver raises it: embcam
        # reports it (one line for an expected error, a full traceback for any other)
        "An exception was raised from a task of operator",
        "Exception occurred in user code",
        "Exception occurred in Ray Data or Ray Core internal code",  # how it logs a worker's own exception
        "Full stack trace:",                                          # when raised as itself (as embcam asks)
    )

    PATTERNS = (
        # Ray Data's issue detector on the model stage: a fixed pool of model actors (one per GPU,
        # or one on a CPU-only machine) holds one model each, so its memory per worker is the
        # model's and no more workers start; Ray's advice (request memory=) is for pools that grow
        re.compile(r"Operator '[^']*MapBatches\(ExplainModel\)' (uses|used up to) \S+ of memory per worker"),
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.MESSAGES) and \
            not any(pattern.search(message) for pattern in self.PATTERNS)


RAY_DATA_LOGGER = "ray.data"
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def quiet_ray(quiet: bool, log=None):
    """While the block runs: Ray Data's console handlers show warnings and errors only, and
    none of ``RayNoise``; the lines Ray's C++ core writes to this process's stderr stay off
    the console (``NativeLines``), and ``log`` gets one line at the end when any of them was
    not one of ``NativeLines.MOOT``. Ray's log files (in the Ray session folder) keep every line."""
    if not quiet:
        yield
        return
    with NativeLines() as native, _quiet_ray_loggers():
        try:
            yield
        finally:
            native.stop()
            if native.dropped and log is not None:
                log(f"embcam explain: Ray's core wrote {native.dropped} line(s) of its own to the console; they are "
                    "in its driver log (python-core-driver-*.log in the Ray session's logs folder), and --verbose "
                    "shows them")


@contextlib.contextmanager
def _quiet_ray_loggers():
    import ray.data  # noqa: F401  (configures the ray.data logger and its handlers)

    noise = RayNoise()
    consoles = [h for h in logging.getLogger(RAY_DATA_LOGGER).handlers if isinstance(h, logging.StreamHandler)]
    levels = [h.level for h in consoles]
    auth = logging.getLogger(RAY_AUTH_LOGGER)
    for handler in consoles:
        handler.setLevel(max(handler.level, logging.WARNING))
        handler.addFilter(noise)
    auth.addFilter(noise)
    try:
        yield
    finally:
        auth.removeFilter(noise)
        for handler, level in zip(consoles, levels):
            handler.removeFilter(noise)
            handler.setLevel(level)


# A line of Ray's C++ logging (glog's layout): "[2026-01-31 12:00:00,123 E 1931 1931] core_worker.cc:2465: ..."
NATIVE_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] ")


class NativeLines:
    """Keeps the lines of Ray's C++ logging off the console while it is entered: this
    process's stderr file descriptor (2) becomes a pipe (a pseudo-terminal where it was a
    terminal, so Ray Data's bars and anything that asks still see one), and a thread copies
    every byte to the real stderr but those lines. Ray's C++ core also writes them to its
    driver log file, which keeps them. ``dropped``: how many were dropped that ``MOOT`` does not
    explain."""

    MOOT = (
        # Ray Data passes each map actor its context and transformer as object refs, and keeps
        # them for the operator's life: the restart the notice warns about cannot lose them
        # (ray-project/ray#53727, #57733)
        b"has constructor arguments in the object store and max_restarts > 0",
    )

    def __init__(self, fd: int = 2):
        self.fd, self.dropped = fd, 0
        self.thread: threading.Thread | None = None

    def __enter__(self) -> NativeLines:
        sys.stderr.flush()
        self.console = os.dup(self.fd)
        if os.isatty(self.fd):
            read, write = os.openpty()
            tty.setraw(write)  # bytes as written ("\n" stays "\n"), the terminal's own size
            fcntl.ioctl(write, termios.TIOCSWINSZ, fcntl.ioctl(self.console, termios.TIOCGWINSZ, b"\0" * 8))
        else:
            read, write = os.pipe()
        os.dup2(write, self.fd)
        os.close(write)
        self.thread = threading.Thread(target=self._copy, args=(read,), name="embcam-stderr", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """The real stderr back; every byte written before is on it when this returns."""
        if self.thread is None:
            return
        sys.stderr.flush()
        os.dup2(self.console, self.fd)  # the pipe's last writer here: the copy reaches its end
        # a process started inside (none of embcam's: Ray's own write to their log files) may hold
        # the pipe: the copy then goes on for it, on the real stderr
        self.thread.join(timeout=5.0)
        if not self.thread.is_alive():
            os.close(self.console)
        self.thread = None

    def __exit__(self, *exc) -> None:
        self.stop()

    def _copy(self, read: int) -> None:
        pending = b""  # the start of a line that may be Ray's: held until its end
        try:
            while True:
                try:
                    chunk = os.read(read, 65536)
                except OSError:  # a pseudo-terminal's end reads as EIO
                    chunk = b""
                if not chunk:
                    break
                pending = self._pass(pending + chunk)
            if pending and not NATIVE_LINE.match(pending):
                os.write(self.console, pending)
        finally:
            os.close(read)

    def _pass(self, data: bytes) -> bytes:
        """Writes the lines of ``data`` that are not Ray's; returns what to hold (a line's start)."""
        out = []
        lines = data.split(b"\n")
        for line in lines[:-1]:
            if NATIVE_LINE.match(line):
                self.dropped += not any(text in line for text in self.MOOT)
            else:
                out.append(line + b"\n")
        rest = lines[-1]
        # a partial line is held only while it may still be Ray's: a bar redrawn with "\r" passes at once
        if rest and not (rest.startswith(b"[") and len(rest) < 64 and b"\r" not in rest) and \
                not NATIVE_LINE.match(rest):
            out.append(rest)
            rest = b""
        if out:
            os.write(self.console, b"".join(out))
        return rest
