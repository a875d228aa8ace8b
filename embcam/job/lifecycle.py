"""One run's life in its run folder, the same for every command that writes one (explain,
reexplain, chen-baseline): take the lease on ``--out``, decide fresh / resume / complete /
refuse, prepare the folder, record ``run.json``, and finish (``summary.json``, then
``_SUCCESS``). No Ray here.

The lease (``_embcam/lease.json``) says which driver is writing the run: its host, pid,
start and attempt id, renewed every ``HEARTBEAT_SECONDS`` by a thread of the driver. A
second driver is refused while the holder lives. The holder is gone when its lease was not
renewed for ``LEASE_TIMEOUT`` seconds, or at once when it ran on this host and its pid is
no longer alive (a killed driver is taken over without waiting). What is left: two drivers
that start within the same moment can both see no lease; each writes its own and reads it
back, and the one that reads the other's gives up, but on an object store without
conditional writes both can read their own if their writes and reads interleave exactly.
Clocks of different hosts must agree to well within ``LEASE_TIMEOUT``.

The attempt id names the model stage's worker-death markers (``embcam.job.attempts``), so
markers an interrupted attempt left on a node's disk are never read by a later one.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import threading
import time
import uuid

from .. import __version__
from ..data.locations import redact
from ..data.runstate import (
    ATTEMPTS,
    DONE,
    IDENTITY,
    MAPS,
    PAIRS,
    PARTIALS,
    RESULTS,
    STATE,
    SUMMARY,
    RunFolder,
    RunMismatch,
    RunWriteError,
    covered,
    identity_differences,
)
from ..results import summarise

LEASE = "lease.json"
HEARTBEAT_SECONDS = 10.0
LEASE_TIMEOUT = 60.0


class RunBusy(OSError):
    """Another driver holds the lease on ``--out`` (an OSError, as a busy file would be)."""


class Lease:
    """This driver's claim on a run folder, renewed in the background while held."""

    def __init__(self, run: RunFolder, heartbeat: float = HEARTBEAT_SECONDS, timeout: float = LEASE_TIMEOUT):
        self.run, self.heartbeat, self.timeout = run, heartbeat, timeout
        self.attempt = uuid.uuid4().hex[:16]
        self.holder = {"attempt": self.attempt, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created: list[tuple[str, ...]] = []

    def acquire(self) -> None:
        """Take the lease, or raise RunBusy naming its living holder."""
        self._created = [parts for parts in ((), (STATE,)) if not self.run.exists(*parts)]  # release removes them
        held = self._read()
        if held is not None and held.get("attempt") != self.attempt and self._alive(held):
            raise RunBusy(_busy(self.run.out, held))
        self._write()
        held = self._read()  # two drivers that both saw no lease: the last write wins
        if held is None or held.get("attempt") != self.attempt:
            raise RunBusy(_busy(self.run.out, held or {}))
        self._thread = threading.Thread(target=self._renew, name="embcam-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        held = self._read()
        if held is not None and held.get("attempt") == self.attempt:
            self.run.delete(STATE, LEASE)
        for parts in reversed(self._created):  # a run refused at its start leaves --out as it found it
            if self.run.exists(*parts) and not self.run.listing(*parts):
                self.run.delete(*parts)

    def _alive(self, held: dict) -> bool:
        if time.time() - float(held.get("renewed", 0)) > self.timeout:
            return False
        if held.get("host") == self.holder["host"]:
            try:
                os.kill(int(held["pid"]), 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # another user's process: alive
                return True
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.heartbeat):
            held = self._read()
            if held is not None and held.get("attempt") != self.attempt:
                return  # taken over (this driver was presumed gone): the new holder's now
            self._write()

    def _read(self) -> dict | None:
        try:
            return self.run.read_json(STATE, LEASE)
        except (json.JSONDecodeError, OSError):
            return None

    def _write(self) -> None:
        self.run.write_json(dict(self.holder, renewed=time.time()), STATE, LEASE)


def _busy(out: str, held: dict) -> str:
    return (f"{out} is being written by another embcam run (host {held.get('host', '?')}, pid "
            f"{held.get('pid', '?')}, started {held.get('started', '?')}): wait for it to finish or stop it; "
            f"if it is gone, its lease expires {LEASE_TIMEOUT:.0f} s after its last heartbeat")


class RunLifecycle:
    """``with RunLifecycle(out, identity, overwrite) as life:`` holds the lease for the block
    and has decided ``life.state``: "fresh", "resume" or "complete" (another configuration's
    run was refused with RunMismatch). Nothing in ``--out`` changes until ``prepare``."""

    def __init__(self, out: str, identity: dict, overwrite: bool = False):
        self.run, self.identity, self.overwrite = RunFolder(out), identity, overwrite
        self.lease = Lease(self.run)
        self.state, self.note = "", None

    @property
    def attempt(self) -> str:
        return self.lease.attempt

    def __enter__(self) -> RunLifecycle:
        self.lease.acquire()
        try:
            self.state, self.note = self._decide()
        except BaseException:
            self.lease.release()
            raise
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        self.lease.release()
        failed = write_error(exc)
        if failed is not None:  # one line naming --out, not a worker's traceback
            raise OSError(f"--out {redact(self.run.out)}: writing {failed.file} failed: {failed.reason}; "
                          f"what was committed is kept: fix it and {resume_advice(self.overwrite)}") from None

    def _decide(self) -> tuple[str, str | None]:
        run, out = self.run, self.run.out
        saved = run.identity
        if self.overwrite:
            return "fresh", None
        if saved is None:
            if run.listing(RESULTS):
                raise FileExistsError(f"{out} holds results that embcam cannot resume (no {STATE}/{IDENTITY}): "
                                      "choose a new --out or pass --overwrite")
            return "fresh", None  # at most the leftovers of a start that never got as far as run.json
        differences = identity_differences(saved["identity"], self.identity)
        if differences:
            if not run.holds_work() and not run.is_complete():
                return "fresh", f"{out} held an unfinished run with nothing committed: starting afresh"
            state = "a complete" if run.is_complete() else "an unfinished"
            raise RunMismatch(f"{out} holds {state} run with another configuration ("
                              + "; ".join(differences) + "): use the same options to resume it, "
                              "a new --out, or --overwrite to start afresh")
        if run.is_complete() and run.exists(SUMMARY):
            return "complete", None
        return "resume", None

    def prepare(self) -> None:
        """From here on ``--out`` changes: a fresh run starts from a folder without anything
        embcam wrote (sanity checks of an earlier run included); a resumed one drops what
        only its last attempt needed."""
        run = self.run
        if self.state == "fresh":
            run.clear(keep=LEASE)
            return
        run.delete(DONE)
        run.delete(SUMMARY)
        run.delete(STATE, ATTEMPTS)  # markers of batches in flight when the last attempt stopped: not deaths
        for folder in ((RESULTS,), (MAPS,), (PAIRS,), (STATE, PARTIALS), ()):
            run.drop_temporaries(*folder)

    def record(self, facts: dict) -> dict:
        """A fresh run's ``run.json``: its identity and ``facts`` (plan, rows, ...), written
        last of the start (the run exists from here on), with a run id that resumes keep.
        Returns what ``run.json`` holds, also for a resumed run."""
        if self.state == "fresh":
            self.run.write_json({"identity": self.identity, "run_id": uuid.uuid4().hex[:16], **facts,
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, STATE, IDENTITY)
        return self.run.identity

    def finish(self, summary: dict) -> dict:
        """``summary.json``, then ``_SUCCESS`` (the completion marker, last); the markers of
        this attempt go."""
        self.run.write_json(summary, SUMMARY)
        self.run.write_bytes(b"", DONE)
        self.run.delete(STATE, ATTEMPTS)
        return summary


def resume_advice(overwrite: bool) -> str:
    """How to resume a run that stopped: its own command, less --overwrite (which would
    delete what was committed)."""
    return f"re-run the same command{' without --overwrite' if overwrite else ''} to resume"


def build_summary(run: RunFolder, rows: int, wall: float, resumed: int = 0, more_counts: dict | None = None,
                  **fields) -> dict:
    """The summary every run kind writes: ``fields`` (config, model, plan, ...), then the
    counts (``more_counts`` added) and mean metrics read back from the committed results,
    which must cover the ``rows`` rows exactly, the wall time, and the versions."""
    found = covered(run.pieces(RESULTS), rows)
    if found != rows:
        raise RuntimeError(f"results cover {found} of {rows} rows")
    counts, means = summarise(run)
    return {**fields, "counts": {"manifest": rows, **counts, "resumed": resumed, **(more_counts or {})},
            "metrics": means, "wall_seconds": round(wall, 3),
            "images_per_second": round((rows - resumed) / wall, 3) if wall > 0 else None,
            "versions": {"embcam": __version__, **{name: _version(name) for name in ("torch", "ray", "pyarrow")},
                         "python": platform.python_version()}}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_error(exc: BaseException | None) -> RunWriteError | None:
    """The failed write into a run folder behind ``exc``, wherever it was raised: here, or
    in a Ray worker (a RayTaskError carries it as ``cause``, Ray Data chains it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        for candidate in (cause, exc):
            if isinstance(candidate, RunWriteError) and candidate.file is not None:
                return candidate
        exc = exc.__cause__ or exc.__context__ or (cause if isinstance(cause, BaseException) else None)
    return None
