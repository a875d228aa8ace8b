"""The per-batch functions the explain job's Ray tasks and actors run, at module level so
that Ray pickles them by reference: read and load a range of manifest rows, commit a
batch's results, commit pass 1's partial sums (and maps), and pass 2 of the stored-maps
plan. No Ray here; ``embcam.job.pipeline`` wires them.
"""
from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data.fetch import ReadLimits
from ..data.maps import read_stored_rows, write_maps
from ..data.runstate import PARTIALS, RESULTS, STATE, ManifestCopy, RunFolder, piece_name
from ..data.schemas import list_column
from ..faults import fault_point
from ..proxies import ProxyFile, proxy_rows
from .attempts import Attempts
from .stages import (
    compute_metrics,
    heatmaps_from_kept_maps,
    load_images,
    load_masks,
    manifest_batch,
    partial_sums,
    row_runs,
    to_results,
)


def read_and_load(start: int, stop: int, copy: ManifestCopy, run: RunFolder, image_root: str, size: int,
                  limits: ReadLimits, reduce: bool) -> dict:
    """Manifest rows [start, stop) with their images loaded (or the reason they are not)."""
    data = manifest_batch(copy.read(start, stop))
    return Attempts(run, "decode")(data, lambda b: load_images(b, image_root, size, limits, reduce))


def partials_from_embeddings(batch: dict, split: str | None) -> dict:
    return partial_sums(batch, np.asarray(batch["embedding"]), split)


def commit_results(batch: dict, run: RunFolder, maps_dtype: str | None = None) -> dict:
    """Metrics, then each run of rows as a results piece; its E maps first when stored."""
    fault_point("commit", batch["image_id"])
    batch = compute_metrics(batch)
    rows = np.asarray(batch["row"])
    for positions, start, stop in row_runs(rows):
        piece = {k: v[positions] for k, v in batch.items()}
        if maps_dtype is not None:
            write_maps(run, piece, maps_dtype, piece_name(start, stop))
        run.write_table(to_results(piece), RESULTS, piece_name(start, stop))
    return {"rows": np.array([len(rows)])}


def commit_pass1(batch: dict, run: RunFolder, split: str | None, maps_dtype: str | None) -> dict:
    """Pass 1's pieces, one per run of consecutive manifest rows in the batch (so no two
    pieces ever overlap): the E maps first when stored, then the run's per-class partial
    sums, whose piece marks the rows as done. A run without a labelled row still gets a
    partials piece (one null-label row)."""
    fault_point("pass1", batch["image_id"])
    rows = np.asarray(batch["row"])
    for positions, start, stop in row_runs(rows):
        piece = {k: v[positions] for k, v in batch.items()}
        if maps_dtype is not None:
            write_maps(run, piece, maps_dtype, piece_name(start, stop))
        part = partial_sums(piece, piece["embedding"], split)
        if not len(part["count"]):
            part = {"label": [None], "sum": np.zeros((1, 0)), "count": [0]}
        run.write_table(partials_table(part["label"], part["sum"], part["count"]), STATE, PARTIALS,
                        piece_name(start, stop))
    return {"rows": np.array([len(rows)])}


def heatmaps_from_stored_maps(batch: dict, copy: ManifestCopy, ranges: np.ndarray, run: RunFolder,
                               pieces: list, grid: tuple, image_root: str, limits: ReadLimits,
                               proxies: ProxyFile) -> dict:
    """One range of pass 2 of the stored-maps plan: manifest rows + what pass 1 stored
    (decode outcome, size, embedding, E) -> heatmaps, metrics, a results piece."""
    start, stop = (int(v) for v in ranges[int(batch["id"][0])])
    rows = manifest_batch(copy.read(start, stop))
    fault_point("commit", rows["image_id"])
    stored = read_stored_rows(run, pieces, start, stop, grid)
    rows.update({k: stored[k] for k in ("status", "error", "embedding", "maps", "width", "height", "orientation")})
    rows["mask_png"] = load_masks(rows, image_root, limits)
    explained = compute_metrics(heatmaps_from_kept_maps(rows, "mean", proxies))
    run.write_table(to_results(explained), RESULTS, piece_name(start, stop))
    return {"rows": np.array([stop - start])}


def partials_table(labels, sums, counts) -> pa.Table:
    """Per-class partial sums (``sums``: one row per label) as ``PARTIALS_SCHEMA`` rows."""
    sums = np.asarray(sums, np.float64)
    sums = sums.reshape(len(counts), sums.shape[-1] if sums.size else 0)  # (n, d); (0, 0) without rows
    return pa.table({"label": pa.array([None if v is None else str(v) for v in labels], pa.string()),
                     "sum": list_column(sums, np.ones(len(sums), bool)),
                     "count": pa.array(np.asarray(counts, np.int64), pa.int64())}, schema=PARTIALS_SCHEMA)


def sum_partials(table: pa.Table) -> pa.Table:
    """Partial sums (``PARTIALS_SCHEMA`` rows) summed per class in numpy, holding no Python
    object per value (a Python float list of a million 128-d sums is gigabytes): one row
    per label, labels sorted. A null label marks a piece without labelled rows."""
    table = table.filter(pc.is_valid(table.column("label")))
    if not table.num_rows:
        return PARTIALS_SCHEMA.empty_table()
    lengths = pc.list_value_length(table.column("sum"))
    if pc.min(lengths).as_py() != pc.max(lengths).as_py():
        raise ValueError("partial sums of different embedding dimensions: the pieces are not one run's")
    values = pc.list_flatten(table.column("sum")).to_numpy()
    labels, index = np.unique(table.column("label").to_numpy(zero_copy_only=False).astype(str), return_inverse=True)
    order = np.argsort(index, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(index[order]) != 0])  # each class's first row, in order
    sums = np.add.reduceat(values.reshape(table.num_rows, -1)[order], starts, axis=0)
    counts = np.add.reduceat(table.column("count").to_numpy()[order], starts)
    return partials_table(labels.tolist(), sums, counts)


def partials_by_bucket(paths: list[str], filesystem, buckets: int) -> tuple[pa.Table, ...] | pa.Table:
    """The reduce's first step, for a group of pass 1's pieces: their partial sums summed per
    class, then split into ``buckets`` tables by a hash of the label that every process
    computes alike (CRC-32), so that each class's sums meet in one bucket. One bucket: the
    table itself (a Ray task with one return value hands it over as it is)."""
    summed = sum_partials(pq.read_table(paths, filesystem=filesystem, schema=PARTIALS_SCHEMA))
    if buckets == 1:
        return summed
    bucket = np.fromiter((zlib.crc32(label.encode()) % buckets for label in summed.column("label").to_pylist()),
                         np.int64, summed.num_rows)
    return tuple(summed.filter(pa.array(bucket == b)) for b in range(buckets))


def proxies_of_bucket(*tables: pa.Table) -> pa.Table:
    """The reduce's second step, for one bucket: its classes' sums, summed, as rows of
    ``proxies.parquet`` (label, proxy = normalise(mean of the normalised embeddings) in
    float32, count), labels sorted."""
    summed = sum_partials(pa.concat_tables([PARTIALS_SCHEMA.empty_table(), *tables]))
    if not summed.num_rows:  # a bucket no class hashed to
        return proxy_rows([], np.zeros((0, 0), np.float32), [])
    labels = summed.column("label").to_pylist()
    counts = summed.column("count").to_numpy()
    mean = pc.list_flatten(summed.column("sum")).to_numpy().reshape(len(labels), -1) / counts[:, None]
    norms = np.linalg.norm(mean, axis=1)
    if np.any(norms == 0):
        label = labels[int(np.flatnonzero(norms == 0)[0])]
        raise ValueError(f"class {label!r}: normalised embeddings cancel out, the mean proxy is undefined")
    return proxy_rows(labels, (mean / norms[:, None]).astype(np.float32), counts)


PARTIALS_SCHEMA = pa.schema([("label", pa.string()), ("sum", pa.list_(pa.float64())), ("count", pa.int64())])
