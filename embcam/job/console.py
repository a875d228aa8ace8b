"""What an explain run shows on the console: Ray Data's bars only on a terminal, and Ray's
known-false or moot lines kept off the console (Ray's log files keep them)."""
from __future__ import annotations

import contextlib
import logging
import sys


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

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.MESSAGES)


RAY_DATA_LOGGER = "ray.data"
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def quiet_ray(quiet: bool):
    """While the block runs: Ray Data's console handlers show warnings and errors only, and
    none of ``RayNoise``. Ray Data's log file (in the Ray session folder) keeps every line."""
    if not quiet:
        yield
        return
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
