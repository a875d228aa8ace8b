"""The explain job's per-batch CPU stages, without Ray and without torch.

Each stage maps a batch (a dict of numpy columns, one entry per manifest row) to a
batch: manifest rows, decoded images (``load_images``), per-class partial sums, metrics
and results rows. The model stage between them is ``embcam.job.model_stage``; the Ray
pipeline (``embcam.job.pipeline``) runs them as Ray Data operators. A row that fails gets
``status="error"`` and a reason, keeps flowing, and is skipped by later stages: one bad
image never stops the job or loses the other rows. No torch here: the job's decode and
commit tasks never load it.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..boxes import BBOX_COLUMNS, checked_bbox, is_null, row_box
from ..data.fetch import ReadLimits, read_bytes
from ..data.images import decode_mask, decode_resized
from ..data.locations import redact, resolve_manifest_uri
from ..data.schemas import ERROR, IOU_SWEEP_METADATA, OK, WSOL_COUNTERS_METADATA, conform, list_column
from ..faults import fault_point
from ..metrics import THRESHOLDS, heatmap_metrics
from ..proxies import MeanProxyAccumulator, ProxyFile
from ..wsol import counters_metadata, image_counts

METRIC_COLUMNS = ("ratio_bbox", "ratio_mask", "uniform_bbox", "uniform_mask", "pred_bbox_x0",
                  "pred_bbox_y0", "pred_bbox_x1", "pred_bbox_y1", "iou", "loc_correct", "degenerate")
INTERNAL_COLUMNS = ("image", "maps", "mask_png")


def with_writable_status(batch: dict) -> dict:
    """A shallow copy whose status/error columns may be written (Ray hands read-only views)."""
    out = dict(batch)
    out["status"] = np.array(batch["status"], dtype=object)
    out["error"] = np.array(batch["error"], dtype=object)
    return out


def fail_rows(batch: dict, rows, reason: str) -> None:
    """Fail the OK ones of ``rows`` (a boolean mask or row indices)."""
    rows = np.asarray(rows)
    for i in np.flatnonzero(rows) if rows.dtype == bool else rows:
        if batch["status"][i] == OK:
            batch["status"][i], batch["error"][i] = ERROR, reason


def _box(batch: dict, i: int):
    """The row's box, or None when it has none (all four null). Nulls arrive as NaN here;
    a NaN the manifest really held was failed when the rows were read (``flag_nan_boxes``)."""
    return row_box({c: batch[c][i] for c in BBOX_COLUMNS if c in batch})


def flag_nan_boxes(rows: pa.Table) -> np.ndarray:
    """Rows whose box holds a NaN (not a null): the schema makes them error rows."""
    bad = np.zeros(rows.num_rows, bool)
    for c in BBOX_COLUMNS:
        if c in rows.column_names:
            column = rows.column(c)
            bad |= pc.fill_null(pc.and_(pc.is_valid(column), pc.is_nan(column)), False).to_numpy(zero_copy_only=False)
    return bad


def manifest_batch(rows: pa.Table) -> dict:
    """Manifest rows as a batch of numpy columns, each row OK but for a NaN box (an error row)."""
    data = {name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names}
    nan_box = flag_nan_boxes(rows)
    data["status"] = np.where(nan_box, ERROR, OK).astype(object)
    data["error"] = np.where(nan_box, "bbox: a box coordinate is NaN (a row without a box has nulls)",
                             None).astype(object)
    return data


def _present(batch: dict, column: str, i: int):
    value = batch[column][i] if column in batch else None
    return None if is_null(value) else value


def load_images(batch: dict, image_root: str | None, image_size: int, limits: ReadLimits = ReadLimits(),
                reduce: bool = True) -> dict:
    """Fetch, decode (EXIF orientation applied) and resize every OK row's image; check its
    box and mask, which are given on the displayed image (CPU). ``reduce``: large JPEGs
    are decoded at a reduced scale in the DCT domain (``images.decode_resized``); width,
    height, boxes and masks stay those of the full image."""
    n = len(batch["image_id"])
    if "status" not in batch:  # straight from a manifest: every row starts OK
        batch = dict(batch, status=np.array([OK] * n, dtype=object), error=np.array([None] * n, dtype=object))
    out = with_writable_status(batch)
    out["width"] = np.zeros(n, np.int32)
    out["height"] = np.zeros(n, np.int32)
    out["orientation"] = np.zeros(n, np.int32)
    out["image"] = np.zeros((n, image_size, image_size, 3), np.uint8)
    out["mask_png"] = np.array([b""] * n, dtype=object)
    for i in np.flatnonzero(out["status"] == OK):
        fault_point("decode", [batch["image_id"][i]])
        step = "image"
        try:
            data = read_bytes(resolve_manifest_uri(str(batch["uri"][i]), image_root), limits)
            pixels, width, height, orientation = decode_resized(data, image_size, limits.max_pixels, reduce)
            out["width"][i], out["height"][i], out["orientation"][i] = width, height, orientation
            box = _box(batch, i)
            if box is not None:
                step = "bbox"
                checked_bbox(box, width, height)
            mask_uri = _present(batch, "mask_uri", i)
            if mask_uri is not None:
                step = "mask"
                data = read_bytes(resolve_manifest_uri(str(mask_uri), image_root), limits)
                mask = decode_mask(data, limits.max_pixels)
                if mask.shape != (height, width):
                    raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height} "
                                     "(as displayed, EXIF orientation applied)")
                out["mask_png"][i] = data
            out["image"][i] = pixels
        except Exception as exc:  # noqa: BLE001 - any failure becomes this row's reason
            out["status"][i], out["error"][i] = ERROR, reason(step, exc)
    return out


def load_masks(batch: dict, image_root: str | None, limits: ReadLimits = ReadLimits()) -> np.ndarray:
    """The mask file bytes of every OK row that has one (b"" for the others), for the
    metrics; a mask that cannot be read fails its row. Its size was checked with the image."""
    masks = np.array([b""] * len(batch["status"]), dtype=object)
    for i in np.flatnonzero(batch["status"] == OK):
        mask_uri = _present(batch, "mask_uri", i)
        if mask_uri is not None:
            try:
                masks[i] = read_bytes(resolve_manifest_uri(str(mask_uri), image_root), limits)
            except Exception as exc:  # noqa: BLE001
                fail_rows(batch, [i], reason("mask", exc))
    return masks


def reason(step: str, exc: Exception) -> str:
    """An error row's message: the step, the exception type and its first line (bounded),
    any uri in it redacted."""
    text = redact(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
    return f"{step}: {type(exc).__name__}: {text[:300]}"


def row_runs(rows: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
    """(positions, start, stop) of each run of consecutive manifest row numbers in a batch."""
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    cuts = np.flatnonzero(np.diff(ordered) != 1) + 1
    return [(p, int(r[0]), int(r[-1]) + 1) for p, r in zip(np.split(order, cuts), np.split(ordered, cuts))]


def partial_sums(batch: dict, embeddings: np.ndarray, split: str | None = None) -> dict:
    """Per-class sums of the normalised embeddings of a batch's OK, labelled rows (of
    ``split`` only, when given): one row per class, what the mean-proxy reduce combines.
    An embedding without a direction (zero, not finite) is left out."""
    norms = np.linalg.norm(np.asarray(embeddings, np.float64), axis=1)
    rows = [i for i in np.flatnonzero(batch["status"] == OK) if _present(batch, "label", i) is not None
            and (split is None or _present(batch, "split", i) == split) and np.isfinite(norms[i]) and norms[i] > 0]
    acc = MeanProxyAccumulator()
    if rows:
        acc.add(np.asarray(embeddings)[rows], [str(batch["label"][i]) for i in rows])
    parts = acc.partials()
    return {"label": np.array([p["label"] for p in parts], dtype=object),
            "sum": np.array([p["sum"] for p in parts], np.float64).reshape(len(parts), embeddings.shape[1]),
            "count": np.array([p["count"] for p in parts], np.int64)}


def assign_proxies(batch: dict, out: dict, ok, lookup, proxy_mode: str) -> tuple[list, list]:
    """(rows, vectors): the proxy of each OK row's label from ``lookup(label)``; a row
    without one fails with the reason, and ``proxy_label`` is filled for the others."""
    rows, vectors = [], []
    for i in ok:
        label = _present(batch, "label", i)
        vector = lookup(label) if label is not None else None
        if vector is None:
            fail_rows(out, [i], f"proxy: no {proxy_mode} proxy for label {label!r}")
            continue
        rows.append(i)
        vectors.append(vector)
        out["proxy_label"][i] = str(label)
    return rows, vectors


def heatmaps_from_kept_maps(batch: dict, proxy_mode: str, proxies: dict | ProxyFile,
                            keep_maps: bool = False) -> dict:
    """Heatmaps ReLU(E . p) from kept embedding maps and per-class proxies (no model);
    with ``keep_maps`` the maps stay in the batch, for the commit to store."""
    out = with_writable_status(batch if keep_maps else {k: v for k, v in batch.items() if k != "maps"})
    n = len(out["status"])
    out["heatmap"] = np.zeros((n,) + batch["maps"].shape[2:], np.float32)
    out["score"] = np.zeros(n, np.float32)
    out["cosine"] = np.zeros(n, np.float32)
    out["proxy_kind"] = np.array([proxy_mode] * n, dtype=object)
    out["proxy_label"] = np.array([None] * n, dtype=object)
    ok = np.flatnonzero(out["status"] == OK)
    rows, vectors = assign_proxies(batch, out, ok, lambda label: proxies.get(str(label)), proxy_mode)
    if rows:
        maps = np.asarray(batch["maps"][rows], np.float32)
        p = np.stack(vectors).astype(np.float32)
        y = np.asarray(batch["embedding"][rows], np.float32)
        # ReLU(E . p) per image, as one batched matrix product: (n, 1, d) @ (n, d, h*w)
        heat = np.matmul(p[:, None, :], maps.reshape(len(rows), maps.shape[1], -1))[:, 0]
        out["heatmap"][rows] = np.maximum(heat, 0).reshape((len(rows),) + maps.shape[2:])
        out["score"][rows] = (y * p).sum(-1)
        out["cosine"][rows] = (_normalise(y) * _normalise(p)).sum(-1)
    return out


def _normalise(v: np.ndarray) -> np.ndarray:
    """v / |v| along the last axis, a zero vector staying zero (as ``cam.normalise``)."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), np.float32(1e-12))


def compute_metrics(batch: dict) -> dict:
    """Per-image metrics (docs/design.md §7) for every OK row; NaN where a metric is null.
    ``wsol``: each OK row's MaxBoxAccV2 and PxAP counters (``wsol.image_counts`` of the
    heatmap as stored, float32), None without a box and a mask; ``to_results`` sums them."""
    out = with_writable_status(batch)
    n = len(out["status"])
    for column in METRIC_COLUMNS + ("ratio_bbox_topk", "ratio_mask_topk"):
        out[column] = np.full(n, np.nan, np.float32)
    out["iou_sweep"] = np.full((n, len(THRESHOLDS)), np.nan, np.float32)
    out["wsol"] = np.full(n, None, object)
    for i in np.flatnonzero(out["status"] == OK):
        try:
            width, height = int(out["width"][i]), int(out["height"][i])
            mask = decode_mask(out["mask_png"][i]) if len(out["mask_png"][i]) else None
            box = _box(out, i)
            m = heatmap_metrics(out["heatmap"][i], width, height, box, mask)
            for column in METRIC_COLUMNS:
                out[column][i] = np.nan if m[column] is None else float(m[column])
            if m["iou_sweep"] is not None:
                out["iou_sweep"][i] = m["iou_sweep"]
            out["wsol"][i] = image_counts(np.asarray(out["heatmap"][i], np.float32), width, height, box, mask)
            if "heatmap_topk" in out:
                top = heatmap_metrics(out["heatmap_topk"][i], width, height, box, mask, thresholds=())
                for column in ("ratio_bbox", "ratio_mask"):
                    out[column + "_topk"][i] = np.nan if top[column] is None else top[column]
        except Exception as exc:  # noqa: BLE001
            fail_rows(out, [i], reason("metrics", exc))
    return out


def to_results(batch: dict) -> pa.Table:
    """The batch as rows of the results schema: list columns for vectors and heatmaps,
    nulls for the computed columns of error rows and for NaN (absent) metrics. In the
    file's metadata: ``iou_sweep``'s thresholds and, after ``compute_metrics``, the sum of
    its OK rows' WSOL counters per split (``wsol.counters_metadata``)."""
    n = len(batch["status"])
    ok = np.asarray(batch["status"] == OK)
    cols: dict = {k: batch[k] for k in ("image_id", "label", "split", "status", "error", "proxy_kind",
                                        "proxy_label") if k in batch}
    for k in ("label", "split", "proxy_label", "error"):
        if k in cols:
            cols[k] = pa.array([None if v is None or v != v else str(v) for v in cols[k]], pa.string())
    for k in ("image_id", "status", "proxy_kind"):
        cols[k] = pa.array([str(v) for v in batch[k]], pa.string())
    if "uri" in batch:  # as the manifest gave it, never with its credentials
        cols["uri"] = pa.array([None if is_null(v) else redact(str(v)) for v in batch["uri"]], pa.string())
    for k in BBOX_COLUMNS:
        if k in batch:
            cols[k] = pa.array([None if is_null(v) else float(v) for v in batch[k]], pa.float64())
    decoded = ok | (np.asarray(batch["width"]) > 0)
    cols["width"] = pa.array(batch["width"], pa.int32(), mask=~decoded)
    cols["height"] = pa.array(batch["height"], pa.int32(), mask=~decoded)
    if "orientation" in batch:
        cols["orientation"] = pa.array(batch["orientation"], pa.int32(), mask=~decoded)
    for k in ("embedding", "heatmap", "heatmap_topk", "iou_sweep"):
        if k in batch:
            values = np.asarray(batch[k], np.float32).reshape(n, -1)
            valid = ok & ~np.isnan(values).all(1) if k == "iou_sweep" else ok
            cols[k] = list_column(values, valid)
    if "heatmap" in batch:
        h, w = np.asarray(batch["heatmap"]).shape[1:3]
        cols["heatmap_height"] = pa.array(np.full(n, h, np.int32), mask=~ok)
        cols["heatmap_width"] = pa.array(np.full(n, w, np.int32), mask=~ok)
    for k in ("score", "cosine") + METRIC_COLUMNS + ("ratio_bbox_topk", "ratio_mask_topk"):
        if k in batch:
            values = np.asarray(batch[k], np.float32)
            null = ~ok | np.isnan(values)
            if k in ("loc_correct", "degenerate"):
                cols[k] = pa.array(values == 1, pa.bool_(), mask=null)
            else:
                cols[k] = pa.array(values, pa.float32(), mask=null)
    table = conform(pa.table(cols), "results")
    metadata = {IOU_SWEEP_METADATA: json.dumps(THRESHOLDS)}
    if "wsol" in batch:
        splits = table.column("split").to_pylist()
        ok_rows = np.flatnonzero(ok)
        metadata[WSOL_COUNTERS_METADATA] = counters_metadata([splits[i] for i in ok_rows], batch["wsol"][ok_rows])
    return table.replace_schema_metadata(metadata)

