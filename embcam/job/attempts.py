"""Rows that kill their worker (an OOM kill, a decoder segfault) become error rows.

Such a death cannot be caught inside the process, and Ray restarts the worker and runs
the same batch again, for ever. So before a stage runs a batch it counts the batch's
earlier attempts in a marker in the run folder (``_embcam/attempts/``). After
``ISOLATE_AFTER`` deaths the batch goes row by row, writing a marker before each row and
removing it after: a marker left by a dead attempt names the row that killed it, and
the next attempt makes that row an error row and goes on. Each row can kill at most one
worker once isolated, and a batch that keeps dying anyway fails whole after a bound, so
a job never loops. No Ray here.
"""
from __future__ import annotations

import numpy as np

from ..data.runstate import ATTEMPTS, STATE, RunFolder
from ..data.schemas import ERROR

ISOLATE_AFTER = 2  # deaths of a whole batch before it goes row by row


class Attempts:
    """Counts a stage's attempts at each batch (keyed by its manifest rows), in
    ``_embcam/attempts/`` under ``run``: the run folder itself, which every node sees, or
    a node-local folder where a marker per batch would cost round trips to an object
    store (the model stage, whose restarted actor usually comes back on the same node)."""

    def __init__(self, run: RunFolder, stage: str):
        self.run, self.stage = run, stage

    def __call__(self, batch: dict, fn) -> dict:
        """``fn(batch)``, or row by row with the killer rows failed after repeated deaths."""
        rows = np.asarray(batch["row"])
        if not len(rows):
            return fn(batch)
        key = f"{self.stage}-{rows.min()}-{rows.max()}-{len(rows)}"
        deaths = int(self._read(key) or 0)
        self._write(key, str(deaths + 1))
        if deaths < ISOLATE_AFTER:
            out = fn(batch)
        elif deaths > ISOLATE_AFTER + len(rows):  # dies outside any one row: give up on the batch
            out = fn(_failed(batch, range(len(rows)), f"worker died {deaths} times on this batch"))
        else:
            out = self._row_by_row(batch, fn, key, deaths)
        self.run.delete(STATE, ATTEMPTS, key)
        return out

    def _row_by_row(self, batch: dict, fn, key: str, deaths: int) -> dict:
        """Each row alone; a row whose marker an earlier attempt left is a killer. Its
        marker stays until the batch is done, so a later death cannot clear it."""
        outs, killers = [], []
        for i, row in enumerate(np.asarray(batch["row"])):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            marker = f"{key}.row-{row}"
            if self._read(marker) is not None:
                reason = (f"worker died while processing this row ({self.stage} stage; "
                          f"{deaths} worker deaths on its batch)")
                outs.append(fn(_failed(one, [0], reason)))
                killers.append(marker)
                continue
            self._write(marker, "started")
            outs.append(fn(one))
            self.run.delete(STATE, ATTEMPTS, marker)
        for marker in killers:
            self.run.delete(STATE, ATTEMPTS, marker)
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def _read(self, name: str) -> str | None:
        try:  # one call on the hot path, not a check and then a read
            with self.run.fs.open_input_stream(self.run.join(STATE, ATTEMPTS, name)) as f:
                return f.read().decode()
        except FileNotFoundError:
            return None

    def _write(self, name: str, text: str) -> None:
        self.run.write_bytes(text.encode(), STATE, ATTEMPTS, name, durable=False)


def _failed(batch: dict, rows, reason: str) -> dict:
    out = dict(batch)
    out["status"] = np.array(batch["status"], dtype=object)
    out["error"] = np.array(batch["error"], dtype=object)
    for i in rows:
        out["status"][i], out["error"][i] = ERROR, reason
    return out
