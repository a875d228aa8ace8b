"""Stored embedding maps: ``RUN/maps/part-<start>-<stop>.parquet`` (contract ``maps``).

An image's embedding map E (d, h, w) holds everything a heatmap against any proxy needs:
ReLU(E . p). ``explain --keep-maps`` writes each results piece's maps beside it, under
the same name, before the results piece (a committed results piece means its maps are
there). ``MapStore`` reads them back by image_id, for ``reexplain`` and pair
explanations. No Ray here.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .runstate import MAPS, RunFolder, piece_name
from .schemas import ERROR, OK, conform, list_column

MAPS_DTYPES = ("float16", "float32")


def maps_table(batch: dict, dtype: str = "float16") -> pa.Table:
    """A batch's ``maps`` (n, d, h, w), ``embedding``, ``status``, ``error`` and, where the
    batch has them, the image's ``width``, ``height`` and ``orientation``, as rows of the
    ``maps`` contract, E stored as ``dtype``; error rows have nulls."""
    if dtype not in MAPS_DTYPES:
        raise ValueError(f"maps dtype must be one of {MAPS_DTYPES}, got {dtype!r}")
    maps = np.asarray(batch["maps"])
    n, d, h, w = maps.shape
    ok = np.asarray(batch["status"] == OK)
    decoded = ok | (np.asarray(batch["width"]) > 0) if "width" in batch else np.zeros(n, bool)
    size = {k: pa.array(np.asarray(batch[k], np.int32), mask=~decoded)
            for k in ("width", "height", "orientation") if k in batch}
    table = conform({
        **size,
        "image_id": pa.array([str(v) for v in batch["image_id"]], pa.string()),
        "status": pa.array([str(v) for v in batch["status"]], pa.string()),
        # Ray Data may hand a column of None back as NaN
        "error": pa.array([None if v is None or v != v else str(v) for v in batch["error"]], pa.string()),
        "embedding": list_column(np.asarray(batch["embedding"], np.float32).reshape(n, -1), ok),
        "maps_channels": pa.array(np.full(n, d, np.int32), mask=~ok),
        "heatmap_height": pa.array(np.full(n, h, np.int32), mask=~ok),
        "heatmap_width": pa.array(np.full(n, w, np.int32), mask=~ok),
    }, MAPS)
    column = list_column(maps.reshape(n, -1).astype(dtype), ok)
    return table.set_column(table.schema.get_field_index(MAPS), pa.field(MAPS, column.type), column)


# E maps are dense floats: a dictionary never pays (it made them 20% larger); the byte
# stream split encoding groups each value's exponent bytes, which zstd then packs.
WRITE_OPTIONS = {"use_dictionary": ["image_id", "status", "error"], "compression": "zstd",
                 "column_encoding": {"maps.list.element": "BYTE_STREAM_SPLIT"}}


def write_maps(run: RunFolder, batch: dict, dtype: str, name: str) -> None:
    """Commit a batch's maps as ``RUN/maps/<name>``."""
    run.write_table(maps_table(batch, dtype), MAPS, name, **WRITE_OPTIONS)


class MapStore:
    """A run's stored maps, by image_id. Opening it reads everything but the maps (ids,
    status, error and the d-value embeddings); the maps are read a piece at a time
    (``piece_maps``), so that a sweep over the pieces reads each once whatever the order
    of the ids asked for. It holds arrays only (numpy and Arrow), so that Ray hands one
    store to many tasks through its object store without copying it."""

    def __init__(self, run: RunFolder, folder: str = MAPS):
        self.run, self.paths = run, run.piece_paths(folder)
        ids, pieces, rows, ok, errors, embeddings = [], [], [], [], [], []
        self.grid: tuple[int, int, int] | None = None  # (d, h, w) of the maps
        for k, path in enumerate(self.paths):
            table = pq.read_table(path, columns=["image_id", "status", "error", "embedding", "maps_channels",
                                                 "heatmap_height", "heatmap_width"], filesystem=run.fs)
            piece_ok = pc.equal(table.column("status"), OK).to_numpy(zero_copy_only=False)
            good = np.flatnonzero(piece_ok)
            if len(good) and self.grid is None:
                self.grid = tuple(int(table.column(c)[int(good[0])].as_py())
                                  for c in ("maps_channels", "heatmap_height", "heatmap_width"))
            embeddings.append(_dense(table.column("embedding"), good, (self.grid[0],)) if len(good) else None)
            ids.append(table.column("image_id"))
            pieces.append(np.full(table.num_rows, k, np.int64))
            rows.append(np.arange(table.num_rows))
            ok.append(piece_ok)
            errors.append(table.column("error"))
        d = self.grid[0] if self.grid else 0
        self.ids = pa.chunked_array(ids, pa.string()).combine_chunks()
        self.piece = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
        self.row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.ok = np.concatenate(ok) if ok else np.zeros(0, bool)
        self.errors = pa.chunked_array(errors, pa.string()).combine_chunks()
        self.embedding = np.concatenate([e if e is not None else np.zeros((len(p), d), np.float32)
                                         for e, p in zip(embeddings, pieces)]) if pieces else np.zeros((0, d))

    def __contains__(self, image_id: str) -> bool:
        return pc.index_in(pa.array([image_id], pa.string()), value_set=self.ids)[0].is_valid

    def where(self, image_ids) -> np.ndarray:
        """Positions of ``image_ids`` in the store (every id must be stored)."""
        at = pc.index_in(pa.array(image_ids, pa.string()), value_set=self.ids)
        if at.null_count:
            missing = pc.filter(pa.array(image_ids, pa.string()), at.is_null())[0].as_py()
            raise KeyError(f"image_id {missing[:80]!r} has no stored maps")
        return at.to_numpy().astype(np.int64)

    def error(self, positions: np.ndarray) -> np.ndarray:
        """The error of each stored image at ``positions`` (None where it is ok)."""
        return np.array(self.errors.take(pa.array(positions, pa.int64())).to_pylist(), dtype=object)

    def piece_maps(self, k: int) -> np.ndarray | None:
        """The maps (rows, d, h, w) of piece ``k``, float32 (zero where an image failed)."""
        return read_maps_piece(self.paths[k], self.run.fs)["maps"]

    def rows(self, image_ids: list[str]) -> dict:
        """``status``, ``error``, ``embedding`` (n, d) and ``maps`` (n, d, h, w) of the ids,
        float32, zero for images that failed; each piece read once."""
        at = self.where(image_ids)
        out = {"status": np.where(self.ok[at], OK, ERROR).astype(object), "error": self.error(at),
               "embedding": self.embedding[at], "maps": np.zeros((len(at),) + (self.grid or (0, 0, 0)), np.float32)}
        for k in np.unique(self.piece[at]):
            mine = np.flatnonzero(self.piece[at] == k)
            maps = self.piece_maps(int(k))
            if maps is not None:
                out["maps"][mine] = maps[self.row[at[mine]]]
        return out


def read_maps_piece(path: str, filesystem=None) -> dict:
    """One stored piece: ``status``, ``error`` (object arrays), ``embedding`` (n, d) and
    ``maps`` (n, d, h, w) as float32, zero where the image failed (None when all did), and
    the image's ``width``, ``height`` and ``orientation`` where stored."""
    table = pq.read_table(path, filesystem=filesystem)
    status = np.array(table.column("status").to_pylist(), dtype=object)
    piece = {"image_id": np.array(table.column("image_id").to_pylist(), dtype=object), "status": status,
             "error": np.array(table.column("error").to_pylist(), dtype=object), "embedding": None, "maps": None}
    for k in ("width", "height", "orientation"):  # absent from maps stored before embcam 0.2
        if k in table.column_names:
            piece[k] = table.column(k).fill_null(0).to_numpy().astype(np.int32)
    ok = np.flatnonzero(status == OK)
    if len(ok):
        first = int(ok[0])
        shape = tuple(int(table.column(c)[first].as_py()) for c in ("maps_channels", "heatmap_height", "heatmap_width"))
        piece["embedding"] = _dense(table.column("embedding"), ok, (shape[0],))
        piece["maps"] = _dense(table.column(MAPS), ok, shape)
    return piece


def read_stored_rows(run: RunFolder, pieces: list[tuple[int, int]], start: int, stop: int,
                     grid: tuple[int, int, int]) -> dict:
    """Manifest rows [start, stop) from the stored maps ``pieces`` (their row ranges, which
    must cover it): ``status``, ``error``, ``embedding`` (n, d), ``maps`` (n, d, h, w) for
    ``grid`` = (d, h, w), float32, zero where the image failed, and the image's ``width``,
    ``height`` and ``orientation`` (0 where null)."""
    parts = []
    for a, b in pieces:
        if a < stop and b > start:
            piece = read_maps_piece(run.join(MAPS, piece_name(a, b)), run.fs)
            lo, hi = max(start, a) - a, min(stop, b) - a
            n = len(piece["status"])
            if piece["maps"] is None:  # every image of the piece failed
                piece["embedding"], piece["maps"] = np.zeros((n, grid[0]), np.float32), np.zeros((n, *grid), np.float32)
            parts.append({k: v[lo:hi] for k, v in piece.items()})
    rows = sum(len(part["status"]) for part in parts)
    if rows != stop - start:
        raise RuntimeError(f"stored maps hold {rows} of manifest rows {start}-{stop}: pass 1 is incomplete")
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _dense(column: pa.ChunkedArray, ok: np.ndarray, shape: tuple) -> np.ndarray:
    """A list column as a float32 array (rows, *shape); rows not in ``ok`` are zero."""
    values = pc.list_flatten(column.filter(pa.array(np.isin(np.arange(len(column)), ok))))
    out = np.zeros((len(column),) + shape, np.float32)
    out[ok] = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape((len(ok),) + shape)
    return out
