"""Pair explanations: why does the model call two images similar?

For a pair (q, m), ``query_heatmap`` is q explained against the proxy normalise(y_m) and
``match_heatmap`` m against normalise(y_q) (Stylianou et al., WACV 2019, for a pooled
embedding; the same for any model through its embedding maps). Each image's E map is
computed once (by the explain job, or stored by ``--keep-maps``) and serves every pair it
is in: a pair costs two d-vector products per heatmap cell, no model.

``RUN/pairs/part-<start>-<stop>.parquet`` holds rows [start, stop) of the pairs file, in
its order (contract ``pairs``), committed whole like the results: a re-run computes only
the blocks no piece covers. No Ray here.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .cam import heatmaps_from_maps, normalise
from .manifest import MAX_EXAMPLES, resolve_source
from .maps import OK, MapStore
from .runstate import PAIRS, RunFolder, pending_blocks, piece_name
from .schemas import arrow_schema, conform

ID_COLUMNS = ("query_id", "match_id")
PAIR_BLOCK_ROWS = 4096


class PairsError(ValueError):
    """The pairs file cannot be used (missing column, null or unknown ids)."""


def read_pairs(source: str) -> pa.Table:
    """The pairs file (a Parquet file, a folder of them or a glob): ``query_id`` and
    ``match_id`` non-null strings, other columns carried through unchanged."""
    fs, paths = resolve_source(source)
    try:
        table = pa.concat_tables([pq.read_table(path, filesystem=fs) for path in paths])
    except (pa.ArrowInvalid, OSError) as exc:
        raise PairsError(f"pairs file {source}: cannot read it as Parquet ({type(exc).__name__})") from None
    names = table.column_names
    for name in ID_COLUMNS:
        if name not in names:
            raise PairsError(f"pairs file {source}: required column {name!r} is missing "
                             f"(columns: {', '.join(names) or 'none'})")
        if not pa.types.is_string(table.column(name).type) and not pa.types.is_large_string(table.column(name).type):
            raise PairsError(f"pairs file {source}: column {name!r} has type {table.column(name).type}, "
                             "expected string (image_ids of the manifest)")
        nulls = pc.indices_nonzero(table.column(name).is_null()).to_pylist()
        if nulls:
            raise PairsError(f"pairs file {source}: column {name!r} is null at {len(nulls)} row(s), "
                             f"e.g. rows {', '.join(map(str, nulls[:MAX_EXAMPLES]))}")
    clash = [n for n in names if n in arrow_schema(PAIRS).names and n not in ID_COLUMNS]
    if clash:
        raise PairsError(f"pairs file {source}: column(s) {', '.join(clash)} would be overwritten by the "
                         "explanation: rename them")
    if table.num_rows == 0:
        raise PairsError(f"pairs file {source} has no rows")
    return table.cast(pa.schema([pa.field(f.name, pa.string() if f.name in ID_COLUMNS else f.type)
                                 for f in table.schema]))


def pair_image_ids(pairs: pa.Table) -> pa.Array:
    """The distinct image_ids the pairs name."""
    return pc.unique(pa.chunked_array(pairs.column("query_id").chunks + pairs.column("match_id").chunks))


def check_known(pairs: pa.Table, known: pa.Array, what: str = "the manifest") -> None:
    """Fail, naming rows, when a pair names an image_id outside ``known``."""
    bad = []
    for name in ID_COLUMNS:
        column = pairs.column(name)
        rows = pc.indices_nonzero(pc.invert(pc.is_in(column, value_set=known))).to_pylist()
        bad += [(row, name, column[row].as_py()) for row in rows]
    if bad:
        bad.sort()
        shown = ", ".join(f"row {row} {name} {value[:80]!r}" for row, name, value in bad[:MAX_EXAMPLES])
        raise PairsError(f"pairs file: {len(bad)} id(s) not in {what}, e.g. {shown}")


def explain_pairs(pairs: pa.Table, store: MapStore) -> pa.Table:
    """Rows of the ``pairs`` contract (then the pairs' other columns) for a block of pairs."""
    ids = pairs.column("query_id").to_pylist() + pairs.column("match_id").to_pylist()
    distinct = list(dict.fromkeys(ids))
    found = store.rows(distinct)
    at = {image_id: j for j, image_id in enumerate(distinct)}
    n = pairs.num_rows
    q = np.array([at[i] for i in ids[:n]], np.int64)
    m = np.array([at[i] for i in ids[n:]], np.int64)
    status = np.full(n, OK, dtype=object)
    error = np.full(n, None, dtype=object)
    for side, rows in (("query", q), ("match", m)):
        for i in np.flatnonzero(found["status"][rows] != OK):
            if status[i] == OK:
                status[i] = "error"
                error[i] = f"{side} image failed: {found['error'][rows[i]]}"
    ok = np.flatnonzero(status == OK)
    cosine = np.full(n, np.nan, np.float32)
    heat = {}
    if len(ok):
        y = torch.from_numpy(found["embedding"])
        maps = torch.from_numpy(found["maps"])
        unit = normalise(y)
        qo, mo = torch.from_numpy(q[ok]), torch.from_numpy(m[ok])
        cosine[ok] = (unit[qo] * unit[mo]).sum(-1).numpy()
        heat["query_heatmap"] = heatmaps_from_maps(maps[qo], unit[mo]).numpy()
        heat["match_heatmap"] = heatmaps_from_maps(maps[mo], unit[qo]).numpy()
    shape = next(iter(heat.values())).shape[1:] if heat else (0, 0)
    valid = status == OK
    columns = {"query_id": pairs.column("query_id"), "match_id": pairs.column("match_id"),
               "status": pa.array(status.tolist(), pa.string()), "error": pa.array(error.tolist(), pa.string()),
               "cosine": pa.array(cosine, pa.float32(), mask=~valid),
               "heatmap_height": pa.array(np.full(n, shape[0], np.int32), mask=~valid),
               "heatmap_width": pa.array(np.full(n, shape[1], np.int32), mask=~valid)}
    for name in ("query_heatmap", "match_heatmap"):
        values = np.zeros((n, shape[0] * shape[1]), np.float32)
        if name in heat:
            values[ok] = heat[name].reshape(len(ok), -1)
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * values.shape[1])
        columns[name] = pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)), mask=pa.array(~valid))
    table = conform(columns, PAIRS)
    for name in pairs.column_names:
        if name not in ID_COLUMNS:
            table = table.append_column(pairs.schema.field(name), pairs.column(name))
    return table


def write_pairs(run: RunFolder, pairs: pa.Table, store: MapStore, block_rows: int = PAIR_BLOCK_ROWS,
                progress=None) -> int:
    """Explain every pair block no ``RUN/pairs`` piece covers yet; returns the rows computed.
    ``progress(rows)`` is called after each block."""
    todo = pending_blocks(run.pieces(PAIRS), pairs.num_rows, block_rows)
    for start, stop in todo:
        run.write_table(explain_pairs(pairs.slice(start, stop - start), store), PAIRS, piece_name(start, stop))
        if progress is not None:
            progress(stop - start)
    return sum(stop - start for start, stop in todo)
