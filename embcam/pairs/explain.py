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

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..cam import heatmaps_from_maps, normalise
from ..data.manifest import MAX_EXAMPLES, resolve_source
from ..data.maps import MapStore
from ..data.runstate import PAIRS, RunFolder, pending_blocks, piece_name
from ..data.schemas import ERROR, OK, arrow_schema, conform, list_column
from ..faults import fault_point

ID_COLUMNS = ("query_id", "match_id")
PAIR_BLOCK_ROWS = 4096
CHUNK_BYTES = 512 << 20  # pair heatmaps held at once: pairs explained per sweep over the maps


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


def pairs_sha256(pairs: pa.Table) -> str:
    """A digest of the pairs, in order (ids only: extra columns do not change the work)."""
    digest = hashlib.sha256()
    for name in ID_COLUMNS:
        for value in pairs.column(name).to_pylist():
            digest.update(value.encode() + b"\0")
    return digest.hexdigest()


def pair_counts(run: RunFolder) -> dict:
    """{rows, ok, error} of the committed pair explanations of ``run``."""
    status = pq.read_table(run.piece_paths(PAIRS), filesystem=run.fs, columns=["status"]).column("status")
    ok = int(pc.sum(pc.equal(status, OK)).as_py() or 0)
    return {"rows": len(status), "ok": ok, "error": len(status) - ok}


def explain_pairs(pairs: pa.Table, store: MapStore) -> pa.Table:
    """Rows of the ``pairs`` contract (then the pairs' other columns) for ``pairs``.

    The embeddings are in memory; the maps are swept piece by piece, each piece read once:
    every pair whose query is in it gets its query heatmap, every pair whose match is in
    it its match heatmap. Memory: the heatmaps of these pairs, plus one piece's maps."""
    n = pairs.num_rows
    q = store.where(pairs.column("query_id").to_pylist())
    m = store.where(pairs.column("match_id").to_pylist())
    status = np.full(n, OK, dtype=object)
    error = np.full(n, None, dtype=object)
    for side, at in (("query", q), ("match", m)):
        failed = np.flatnonzero(~store.ok[at] & (status == OK))
        for i, reason in zip(failed, store.error(at[failed])):
            status[i], error[i] = ERROR, f"{side} image failed: {reason}"
    ok = np.flatnonzero(status == OK)
    valid = status == OK
    _, h, w = store.grid or (0, 0, 0)
    cosine = np.full(n, np.nan, np.float32)
    heat = {"query_heatmap": np.zeros((n, h * w), np.float32), "match_heatmap": np.zeros((n, h * w), np.float32)}
    if len(ok):
        # the unit embeddings of these pairs' images only: the store may hold millions
        used, inverse = np.unique(np.concatenate([q[ok], m[ok]]), return_inverse=True)
        unit = normalise(torch.from_numpy(store.embedding[used]))
        uq, um = inverse[:len(ok)], inverse[len(ok):]
        cosine[ok] = (unit[uq] * unit[um]).sum(-1).numpy()
        sides = (("query_heatmap", q[ok], um), ("match_heatmap", m[ok], uq))
        for k in np.unique(np.concatenate([store.piece[q[ok]], store.piece[m[ok]]])):
            maps = torch.from_numpy(store.piece_maps(int(k)))
            for name, explained, other in sides:
                mine = np.flatnonzero(store.piece[explained] == k)
                if len(mine):
                    rows = torch.from_numpy(store.row[explained[mine]])
                    heat[name][ok[mine]] = heatmaps_from_maps(maps[rows], unit[other[mine]]).flatten(1).numpy()
    columns = {"query_id": pairs.column("query_id"), "match_id": pairs.column("match_id"),
               "status": pa.array(status.tolist(), pa.string()), "error": pa.array(error.tolist(), pa.string()),
               "cosine": pa.array(cosine, pa.float32(), mask=~valid),
               "heatmap_height": pa.array(np.full(n, h, np.int32), mask=~valid),
               "heatmap_width": pa.array(np.full(n, w, np.int32), mask=~valid)}
    for name, values in heat.items():
        columns[name] = list_column(values, valid)
    table = conform(columns, PAIRS)
    for name in pairs.column_names:
        if name not in ID_COLUMNS:
            table = table.append_column(pairs.schema.field(name), pairs.column(name))
    return table


def pair_chunks(todo: list[tuple[int, int]], chunk_rows: int) -> list[list[tuple[int, int]]]:
    """The pending pair blocks ``todo`` in chunks of consecutive blocks of at most
    ``chunk_rows`` rows (a block larger than that is a chunk of its own)."""
    chunks: list[list[tuple[int, int]]] = []
    for block in todo:
        if chunks and sum(b - a for a, b in chunks[-1]) + block[1] - block[0] <= chunk_rows:
            chunks[-1].append(block)
        else:
            chunks.append([block])
    return chunks


def chunk_rows_for(store_grid: tuple[int, int, int] | None, chunk_bytes: int, block_rows: int) -> int:
    """Pairs per chunk such that their heatmaps (two per pair) take at most ``chunk_bytes``,
    and a block at least."""
    _, h, w = store_grid or (0, 0, 0)
    return max(block_rows, chunk_bytes // max(2 * h * w * 4, 1))


def chunk_table(pairs: pa.Table, chunk: list[tuple[int, int]]) -> pa.Table:
    """The rows of ``pairs`` a chunk's blocks hold, in order."""
    return pa.concat_tables([pairs.slice(a, b - a) for a, b in chunk])


def write_pair_chunk(run: RunFolder, rows: pa.Table, chunk: list[tuple[int, int]], store: MapStore,
                     progress=None) -> int:
    """Explain one chunk (``rows``: its pairs, ``chunk_table``) in one sweep over the maps,
    then commit each of its blocks as a ``RUN/pairs`` piece; returns the rows committed.
    ``progress(rows)`` is called after each block."""
    fault_point("pairs", rows.column("query_id"))
    table = explain_pairs(rows, store)
    at = 0
    for start, stop in chunk:
        run.write_table(table.slice(at, stop - start), PAIRS, piece_name(start, stop))
        at += stop - start
        if progress is not None:
            progress(stop - start)
    return at


def write_pairs(run: RunFolder, pairs: pa.Table, store: MapStore, block_rows: int = PAIR_BLOCK_ROWS,
                progress=None, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Explain, in this process, every pair block no ``RUN/pairs`` piece covers yet; returns
    the rows computed. Blocks are explained together in chunks whose heatmaps take at most
    ``chunk_bytes`` (each chunk sweeps the maps once); ``progress(rows)`` is called after
    each block. (The explain job spreads the chunks over Ray: ``embcam.job.pairs_pass``.)"""
    todo = pending_blocks(run.pieces(PAIRS), pairs.num_rows, block_rows)
    for chunk in pair_chunks(todo, chunk_rows_for(store.grid, chunk_bytes, block_rows)):
        write_pair_chunk(run, chunk_table(pairs, chunk), chunk, store, progress)
    return sum(stop - start for start, stop in todo)
