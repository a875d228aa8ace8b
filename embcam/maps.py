"""Stored embedding maps: ``RUN/maps/part-<start>-<stop>.parquet`` (contract ``maps``).

An image's embedding map E (d, h, w) holds everything a heatmap against any proxy needs:
ReLU(E . p). ``explain --keep-maps`` writes each results piece's maps beside it, under
the same name, before the results piece (a committed results piece means its maps are
there). ``MapStore`` reads them back by image_id, for ``reexplain`` and pair
explanations. No Ray here.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .runstate import MAPS, RunFolder
from .schemas import conform

MAPS_DTYPES = ("float16", "float32")
OK = "ok"


def maps_table(batch: dict, dtype: str = "float16") -> pa.Table:
    """A batch's ``maps`` (n, d, h, w), ``embedding``, ``status`` and ``error`` as rows of
    the ``maps`` contract, E stored as ``dtype``; error rows have nulls."""
    if dtype not in MAPS_DTYPES:
        raise ValueError(f"maps dtype must be one of {MAPS_DTYPES}, got {dtype!r}")
    maps = np.asarray(batch["maps"])
    n, d, h, w = maps.shape
    ok = np.asarray(batch["status"] == OK)
    table = conform({
        "image_id": pa.array([str(v) for v in batch["image_id"]], pa.string()),
        "status": pa.array([str(v) for v in batch["status"]], pa.string()),
        "error": pa.array([None if v is None else str(v) for v in batch["error"]], pa.string()),
        "embedding": _lists(np.asarray(batch["embedding"], np.float32).reshape(n, -1), ok),
        "maps_channels": pa.array(np.full(n, d, np.int32), mask=~ok),
        "heatmap_height": pa.array(np.full(n, h, np.int32), mask=~ok),
        "heatmap_width": pa.array(np.full(n, w, np.int32), mask=~ok),
    }, MAPS)
    column = _lists(maps.reshape(n, -1).astype(dtype), ok)
    return table.set_column(table.schema.get_field_index(MAPS), pa.field(MAPS, column.type), column)


# E maps are dense floats: a dictionary never pays (it made them 20% larger); the byte
# stream split encoding groups each value's exponent bytes, which zstd then packs.
WRITE_OPTIONS = {"use_dictionary": ["image_id", "status", "error"], "compression": "zstd",
                 "column_encoding": {"maps.list.element": "BYTE_STREAM_SPLIT"}}


def write_maps(run: RunFolder, batch: dict, dtype: str, name: str) -> None:
    """Commit a batch's maps as ``RUN/maps/<name>``."""
    run.write_table(maps_table(batch, dtype), MAPS, name, **WRITE_OPTIONS)


def _lists(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    n, width = values.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)), mask=pa.array(~valid))


class MapStore:
    """A run's stored maps, read by image_id. The index (image_id -> piece, row) is built
    from the image_id columns alone; pieces are read whole when first needed and the last
    ``cache`` of them kept (pair blocks and re-explained pieces touch few pieces each)."""

    def __init__(self, run: RunFolder, folder: str = MAPS, cache: int = 16):
        self.run, self.folder, self.cache = run, folder, cache
        self.paths = run.piece_paths(folder)
        self.index: dict[str, tuple[int, int]] = {}
        for k, path in enumerate(self.paths):
            ids = pq.read_table(path, columns=["image_id"], filesystem=run.fs).column("image_id").to_pylist()
            self.index.update((image_id, (k, row)) for row, image_id in enumerate(ids))
        self._pieces: OrderedDict[int, dict] = OrderedDict()

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.index

    def rows(self, image_ids: list[str]) -> dict:
        """``status`` and ``error`` (object arrays), ``embedding`` (n, d) and ``maps``
        (n, d, h, w), float32, zero for images that failed; every id must be stored."""
        where = [self.index[i] for i in image_ids]
        out: dict = {"status": np.empty(len(where), object), "error": np.empty(len(where), object)}
        for j, (k, row) in enumerate(where):
            piece = self._piece(k)
            out["status"][j], out["error"][j] = piece["status"][row], piece["error"][row]
            if "maps" not in out and piece["maps"] is not None:
                out["embedding"] = np.zeros((len(where),) + piece["embedding"].shape[1:], np.float32)
                out["maps"] = np.zeros((len(where),) + piece["maps"].shape[1:], np.float32)
            if piece["maps"] is not None and piece["status"][row] == OK:
                out["embedding"][j], out["maps"][j] = piece["embedding"][row], piece["maps"][row]
        return out

    def _piece(self, k: int) -> dict:
        if k in self._pieces:
            self._pieces.move_to_end(k)
            return self._pieces[k]
        self._pieces[k] = read_maps_piece(self.paths[k], self.run.fs)
        if len(self._pieces) > self.cache:
            self._pieces.popitem(last=False)
        return self._pieces[k]


def read_maps_piece(path: str, filesystem=None) -> dict:
    """One stored piece: ``status``, ``error`` (object arrays), ``embedding`` (n, d) and
    ``maps`` (n, d, h, w) as float32, zero where the image failed (None when all did)."""
    table = pq.read_table(path, filesystem=filesystem)
    status = np.array(table.column("status").to_pylist(), dtype=object)
    piece = {"image_id": np.array(table.column("image_id").to_pylist(), dtype=object), "status": status,
             "error": np.array(table.column("error").to_pylist(), dtype=object), "embedding": None, "maps": None}
    ok = np.flatnonzero(status == OK)
    if len(ok):
        first = int(ok[0])
        shape = tuple(int(table.column(c)[first].as_py()) for c in ("maps_channels", "heatmap_height", "heatmap_width"))
        piece["embedding"] = _dense(table.column("embedding"), ok, (shape[0],))
        piece["maps"] = _dense(table.column(MAPS), ok, shape)
    return piece


def _dense(column: pa.ChunkedArray, ok: np.ndarray, shape: tuple) -> np.ndarray:
    """A list column as a float32 array (rows, *shape); rows not in ``ok`` are zero."""
    values = pc.list_flatten(column.filter(pa.array(np.isin(np.arange(len(column)), ok))))
    out = np.zeros((len(column),) + shape, np.float32)
    out[ok] = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape((len(ok),) + shape)
    return out
