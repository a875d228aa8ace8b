"""Browsing a run's results without Ray: open them, get one row's heatmap, draw it.

    from embcam.results import open_results, read_row, overlay, upsample
    df = open_results("runs/r1").to_table().to_pandas()     # every column but the vectors
    row = read_row("runs/r1", df.nsmallest(1, "cosine").image_id.iloc[0])
    picture = overlay(row)                                  # RGB uint8: image | heatmap, boxes

* :func:`open_results` is a ``pyarrow.dataset.Dataset`` over ``RUN/results``. By default
  it holds every column except :data:`HEAVY_COLUMNS` (the embedding and heatmap vectors),
  so a million-row run reads only what it is asked for; a ``filter`` is pushed down.
* :func:`read_row` / :func:`read_rows` fetch whole rows by ``image_id``, reading the heavy
  columns only of the row groups that hold them, and join the run's manifest: the row
  gains the manifest's ``uri`` resolved against the run's image root (rows carry the uri
  as the manifest gave it, and the box, since results contract version 2; older rows
  get both from the join). The run folder keeps a copy of the validated manifest
  (``_embcam/manifest/``); runs from before that copy existed are joined with the
  manifest their config names.
* :func:`read_frame` is the results as a pandas DataFrame with each heatmap as a 2-D
  array; :func:`iou_sweep_thresholds` says which IoU thresholds ``iou_sweep`` holds.
* :func:`heatmap`, :func:`upsample`, :func:`heat_spread` and :func:`overlay` take one row:
  a dict (as above), a pandas Series, or a one-row pyarrow table or struct.

Conventions: sizes are ``(width, height)`` as in OpenCV; upsampling is bilinear with
half-pixel centres (``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)``, OpenCV's INTER_LINEAR), on the raw map, as the metrics do
(docs/design.md §7). Images are decoded as the job decoded them: EXIF orientation
applied, so they match the row's ``width``, ``height`` and boxes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from embcam.boxes import BBOX_COLUMNS, is_null, row_box
from embcam.data.fetch import ReadLimits, read_bytes
from embcam.data.images import decode_image, write_image  # write_image: re-exported, part of this module's API
from embcam.data.locations import default_image_root, has_scheme, redact, resolve_uri, safe_name
from embcam.data.manifest import resolve_source
from embcam.data.runstate import IDENTITY, MANIFEST, RESULTS, STATE, SUMMARY, RunFolder
from embcam.data.schemas import ERROR, IOU_SWEEP_METADATA, OK
from embcam.metrics import LOC_IOU, THRESHOLDS

HEAVY_COLUMNS = ("embedding", "heatmap", "heatmap_topk")
PRED_BOX_COLUMNS = ("pred_bbox_x0", "pred_bbox_y0", "pred_bbox_x1", "pred_bbox_y1")
OVERLAY_MAX_SIDE = 512  # overlay images larger than this (long side) are downscaled
OVERLAY_ALPHA = 0.5
GT_COLOUR, PRED_COLOUR = (0, 200, 0), (255, 0, 0)  # RGB: ground truth green, predicted red
TILE_BACKGROUND = 230  # grey around a picture drawn on a square tile
SPREAD_MEASURE = ("normalised entropy of the raw heatmap: q = H / sum(H), "
                  "-sum(q ln q) / ln(h w); 0 = all heat in one cell, 1 = spread evenly")

__all__ = ["open_results", "read_frame", "iou_sweep_thresholds", "results_schema", "read_rows", "read_row",
           "run_config", "manifest_rows",
           "image_root_of", "join_manifest", "heatmap", "upsample", "heat_spread", "spreads",
           "overlay", "overlay_panel", "overlay_file_name", "write_image", "describe",
           "HEAVY_COLUMNS", "PRED_BOX_COLUMNS", "SPREAD_MEASURE"]


# --- opening -------------------------------------------------------------------------------


def open_results(path: str | os.PathLike, columns: Iterable[str] | None = None,
                 filter: pc.Expression | None = None) -> pads.Dataset:
    """A ``pyarrow.dataset.Dataset`` over a run's results (``path``: the run folder or its
    ``results/`` folder, local or a URI). Nothing is read until you ask
    (``.to_table()``, ``.to_batches()``, ``.head(n)``, ``.count_rows()``).

    ``columns``: the columns to hold (default: all but :data:`HEAVY_COLUMNS`). ``filter``:
    a ``pyarrow.compute`` expression, e.g. ``pc.field("label") == "shoe"``, pushed down to
    the Parquet files; the columns it reads are held too.
    """
    fs, folder = _results_folder(path)
    full = pads.dataset(folder, filesystem=fs, format="parquet")
    if columns is None:
        wanted = [n for n in full.schema.names if n not in HEAVY_COLUMNS]
    else:
        wanted = list(dict.fromkeys([columns] if isinstance(columns, str) else columns))
        unknown = [c for c in wanted if c not in full.schema.names]
        if unknown:
            raise ValueError(f"{path}: results have no column(s) {', '.join(unknown)} "
                             f"(they have: {', '.join(full.schema.names)})")
    if filter is not None:
        wanted += [c for c in _columns_read_by(filter, full.schema, path) if c not in wanted]
    schema = pa.schema([full.schema.field(c) for c in wanted])
    dataset = pads.dataset(folder, filesystem=fs, format="parquet", schema=schema)
    return dataset if filter is None else dataset.filter(filter)


def read_frame(path: str | os.PathLike, columns: Iterable[str] | None = None,
               filter: pc.Expression | None = None):
    """The results as a pandas DataFrame, each ``heatmap`` (and ``heatmap_topk``) a float32
    (heatmap_height, heatmap_width) array, None where the row has none. ``columns`` and
    ``filter`` as :func:`open_results`, but the default is every column, vectors included."""
    names = results_schema(path).names if columns is None else \
        list(dict.fromkeys([columns] if isinstance(columns, str) else columns))
    maps = [c for c in ("heatmap", "heatmap_topk") if c in names]
    shape = ["heatmap_height", "heatmap_width"]
    frame = open_results(path, names + [c for c in shape if maps and c not in names], filter).to_table().to_pandas()
    for column in maps:
        frame[column] = [None if values is None else np.asarray(values, np.float32).reshape(int(h), int(w))
                         for values, h, w in zip(frame[column], frame.heatmap_height, frame.heatmap_width)]
    return frame[names]


def iou_sweep_thresholds(path: str | os.PathLike) -> tuple[float, ...]:
    """The IoU thresholds of the ``iou_sweep`` column, in its order: from the results files'
    metadata, or the job's own for results written before they were stored there."""
    stored = (results_schema(path).metadata or {}).get(IOU_SWEEP_METADATA)
    return tuple(json.loads(stored)) if stored else tuple(THRESHOLDS)


def results_schema(path: str | os.PathLike) -> pa.Schema:
    """Every column of the run's results (read from one file's footer)."""
    fs, folder = _results_folder(path)
    return pads.dataset(folder, filesystem=fs, format="parquet").schema


def _results_folder(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem and folder holding the result files: RUN/results, or ``path`` itself."""
    run = RunFolder(os.fspath(path))
    for folder in (run.join(RESULTS), run.path):
        if run.fs.get_file_info(folder).type != pafs.FileType.Directory:
            continue
        found = pads.dataset(folder, filesystem=run.fs, format="parquet")
        if found.files and {"image_id", "status"} <= set(found.schema.names):
            return run.fs, folder
    raise FileNotFoundError(f"{os.fspath(path)}: no results here (expected RUN/results/*.parquet "
                            "as written by embcam explain --out RUN)")


def _columns_read_by(expression: pc.Expression, schema: pa.Schema, path) -> list[str]:
    """The columns of ``schema`` a filter reads (pyarrow names none: each is left out in turn)."""
    def binds(s: pa.Schema) -> bool:
        try:
            s.empty_table().filter(expression)
            return True
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return False

    if not isinstance(expression, pc.Expression):
        raise ValueError(f"filter must be a pyarrow.compute expression such as "
                         f"pc.field('label') == 'x', got {type(expression).__name__}")
    if not binds(schema):
        raise ValueError(f"filter {expression} does not apply to the results of {path}: "
                         "a column it names is missing or has another type")
    return [n for n in schema.names
            if not binds(pa.schema([f for f in schema if f.name != n]))]


# --- whole rows by image_id ---------------------------------------------------------------


def read_rows(path: str | os.PathLike, image_ids: Iterable[str], columns: Iterable[str] | None = None,
              image_root: str | None = None, manifest: bool = True) -> dict[str, dict]:
    """{image_id: row} for the ``image_ids`` found in the run at ``path`` (absent ids are
    left out). A row holds ``columns`` (default: all, heatmaps included) and, with
    ``manifest``, the run's manifest ``uri`` (resolved against ``image_root``, default the
    run's) and ``bbox_x0..bbox_y1`` (all None for an id the manifest lacks). Raises
    FileNotFoundError when the manifest cannot be found (``manifest=False`` skips it).

    Only the ``image_id`` column is read everywhere; the others only in the row groups that
    hold one of the ids.
    """
    wanted = pa.array(sorted({str(i) for i in image_ids}), pa.string())
    fs, folder = _results_folder(path)
    rows: dict[str, dict] = {}
    for file in pads.dataset(folder, filesystem=fs, format="parquet").files:
        parquet = pq.ParquetFile(fs.open_input_file(file))
        names = _known_columns(path, parquet.schema_arrow, columns)
        for group in range(parquet.num_row_groups):
            ids = parquet.read_row_group(group, columns=["image_id"]).column("image_id")
            hits = pc.is_in(ids, value_set=wanted)
            if pc.any(hits).as_py():
                table = parquet.read_row_group(group, columns=names)
                rows.update((r["image_id"], r) for r in table.filter(hits).to_pylist())
    if manifest and rows:
        join_manifest(rows, manifest_rows(path, rows), image_root or image_root_of(path))
    return rows


def _known_columns(path, schema: pa.Schema, columns: Iterable[str] | None) -> list[str]:
    """``image_id`` and ``columns`` (default: all of ``schema``), checked against it."""
    names = list(dict.fromkeys(["image_id", *(schema.names if columns is None else columns)]))
    unknown = [c for c in names if c not in schema.names]
    if unknown:
        raise ValueError(f"{os.fspath(path)}: results have no column(s) {', '.join(unknown)}")
    return names


def read_row(path: str | os.PathLike, image_id: str, image_root: str | None = None) -> dict:
    """The whole results row of ``image_id`` with the manifest's ``uri`` and box (see
    :func:`read_rows`); ValueError when the run has no such row."""
    rows = read_rows(path, [image_id], image_root=image_root)
    if image_id not in rows:
        raise ValueError(f"image_id {image_id!r} is not in the results of {os.fspath(path)}")
    return rows[image_id]


def summarise(run: RunFolder) -> tuple[dict, dict]:
    """(counts, mean metrics) of a run's committed results, as its ``summary.json`` gives them."""
    columns = ["status", "degenerate", "ratio_bbox", "ratio_mask", "uniform_bbox", "uniform_mask",
               "iou", "loc_correct", "iou_sweep", "ratio_bbox_topk", "ratio_mask_topk", "cosine"]
    t = pq.read_table(run.piece_paths(RESULTS), filesystem=run.fs, columns=[*columns, "label", "error"]).to_pandas()
    ok = t[t.status == OK]
    means: dict[str, object] = {c: _mean(ok[c]) for c in columns[2:] if c != "iou_sweep"}
    by_label = ok.dropna(subset=["label", "cosine"]).groupby("label").cosine.mean()
    means["lowest_label_cosine"] = ({"label": str(by_label.idxmin()), "cosine": float(by_label.min())}
                                    if len(by_label) else None)
    errors = t.error[t.status == ERROR].dropna()
    means["error_example"] = str(errors.iloc[0]) if len(errors) else None
    sweep = [v for v in ok["iou_sweep"] if v is not None]
    means["loc_accuracy_sweep"] = ({str(t_): float(np.mean([s[j] >= LOC_IOU for s in sweep]))
                                    for j, t_ in enumerate(THRESHOLDS)} if sweep else None)
    counts = {"results": int(len(t)), "ok": int(len(ok)), "error": int((t.status == ERROR).sum()),
              "degenerate": int(ok.degenerate.fillna(False).sum())}
    return counts, means


def _mean(series) -> float | None:
    values = series.dropna().astype(float)
    return float(values.mean()) if len(values) else None


def run_config(path: str | os.PathLike) -> dict:
    """The run's configuration: from ``summary.json`` (complete runs), else from its run
    state (``_embcam/run.json``); {} when neither exists."""
    run = RunFolder(os.fspath(path))
    for parts in ((SUMMARY,), (STATE, IDENTITY)):
        try:
            saved = run.read_json(*parts)
        except ValueError as e:  # json.JSONDecodeError
            raise ValueError(f"{run.join(*parts)} is not valid JSON ({e})") from None
        if isinstance(saved, dict) and isinstance(saved.get("config"), dict):
            return saved["config"]
    return {}


def manifest_rows(path: str | os.PathLike, image_ids: Iterable[str]) -> dict[str, dict]:
    """{image_id: {uri, bbox_x0..bbox_y1}} from the run's manifest copy, or for runs without
    one from the manifest its config names. Raises FileNotFoundError when neither is found."""
    ids = pa.array(sorted({str(i) for i in image_ids}), pa.string())
    fs, files = manifest_files(path)
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    if "image_id" not in dataset.schema.names or "uri" not in dataset.schema.names:
        raise ValueError(f"manifest of run {os.fspath(path)} lacks image_id or uri")
    names = ["image_id", "uri", *(c for c in BBOX_COLUMNS if c in dataset.schema.names)]
    table = dataset.to_table(columns=names, filter=pc.field("image_id").isin(ids))
    return {r["image_id"]: {"uri": r["uri"], **{c: r.get(c) for c in BBOX_COLUMNS}}
            for r in table.to_pylist()}


def manifest_files(path: str | os.PathLike) -> tuple[pafs.FileSystem, list[str]]:
    run = RunFolder(os.fspath(path))
    copy = pads.dataset(run.join(STATE, MANIFEST), filesystem=run.fs, format="parquet").files \
        if run.exists(STATE, MANIFEST) else []
    if copy:
        return run.fs, copy
    config = run_config(path)
    source = config.get("manifest")
    if not source:
        raise FileNotFoundError(f"run {os.fspath(path)} keeps no manifest copy and its config "
                                "names no manifest")
    candidates = [as_the_job_meant(path, config, str(source)), str(source)]
    if not has_scheme(str(source)) and not os.path.isabs(str(source)):
        candidates.append(os.path.join(os.fspath(path), str(source)))  # relative to the run
    for candidate in dict.fromkeys(candidates):
        try:
            return resolve_source(candidate)
        except (ValueError, OSError, pa.ArrowException):
            continue
    raise FileNotFoundError(f"manifest {source} not found")


def image_root_of(path: str | os.PathLike) -> str | None:
    """Where the run resolved relative uris: its ``--image-root``, else its manifest's folder."""
    config = run_config(path)
    if config.get("image_root"):
        return as_the_job_meant(path, config, str(config["image_root"]))
    if not config.get("manifest"):
        return None
    return default_image_root(as_the_job_meant(path, config, str(config["manifest"])))


def read_limits_of(config: dict, root: str | None) -> ReadLimits:
    """The read limits a run's config names (its defaults where it names none), images under
    ``root`` allowed when the run confined its uris to prefixes."""
    prefixes = config.get("allowed_prefixes")
    return ReadLimits(max_bytes=config.get("max_bytes") or ReadLimits.max_bytes,
                      max_pixels=config.get("max_pixels") or ReadLimits.max_pixels,
                      read_timeout=config.get("read_timeout") or ReadLimits.read_timeout,
                      allowed_prefixes=None if prefixes is None else tuple(p for p in (root, *prefixes) if p))


def as_the_job_meant(path, config: dict, location: str) -> str:
    """A relative local path of the run's config, relative to the folder the job ran in.
    That folder is known when the config's ``out`` is relative too (the run folder is
    <that folder>/<out>); otherwise the path is returned as it is (relative to here)."""
    out = config.get("out")
    if has_scheme(location) or os.path.isabs(location) or not out or has_scheme(str(out)) \
            or os.path.isabs(str(out)) or has_scheme(os.fspath(path)):
        return location
    run, out = os.path.abspath(os.fspath(path)), os.path.normpath(str(out))
    if not run.endswith(os.sep + out):
        return location
    return os.path.join(run[:len(run) - len(out)], location)


def join_manifest(rows: dict[str, dict], manifest: dict[str, dict], image_root: str | None) -> None:
    """Give each row its manifest ``uri`` (resolved against ``image_root``) and box, in place."""
    for image_id, row in rows.items():
        entry = manifest.get(image_id, {"uri": None, **dict.fromkeys(BBOX_COLUMNS)})
        uri = entry["uri"]
        row.update(entry, uri=None if uri is None else resolve_uri(uri, image_root))


# --- one row ----------------------------------------------------------------------------------


def _as_row(row) -> Mapping:
    """A dict, pandas Series, one-row pyarrow table / record batch, or struct scalar."""
    if isinstance(row, (pa.Table, pa.RecordBatch)):
        if row.num_rows != 1:
            raise ValueError(f"expected one row, got a table of {row.num_rows}")
        return row.to_pylist()[0]
    if isinstance(row, pa.StructScalar):
        return row.as_py()
    return row


def _value(row: Mapping, name: str, hint: str = ""):
    """``row[name]``, None for null / NaN; ValueError when the row has no such column."""
    if name not in row:
        raise ValueError(f"the row has no column {name!r}{hint}")
    return None if is_null(row[name]) else row[name]


def _image_id(row: Mapping) -> str:
    return str(row["image_id"]) if "image_id" in row else "?"


_HEAVY_HINT = (" (open_results leaves the vectors out unless asked: read the row with "
               "read_row(run, image_id), or pass columns=[..., 'heatmap', 'heatmap_height', "
               "'heatmap_width'])")


def heatmap(row) -> np.ndarray:
    """The row's raw heatmap as a float32 (heatmap_height, heatmap_width) array."""
    row = _as_row(row)
    values = _value(row, "heatmap", _HEAVY_HINT)
    if values is None:
        why = f" (status {row.get('status')}: {row.get('error')})" if row.get("status") == ERROR else ""
        raise ValueError(f"image_id {_image_id(row)!r} has no heatmap{why}")
    h, w = _value(row, "heatmap_height", _HEAVY_HINT), _value(row, "heatmap_width", _HEAVY_HINT)
    flat = np.asarray(values, np.float32)
    if h is None or w is None or flat.size != int(h) * int(w):
        raise ValueError(f"image_id {_image_id(row)!r}: heatmap has {flat.size} values, "
                         f"heatmap_height x heatmap_width = {h} x {w}")
    return flat.reshape(int(h), int(w))


def upsample(row, size: tuple[int, int] | None = None) -> np.ndarray:
    """The raw heatmap upsampled bilinearly (see the module's conventions) to ``size`` =
    (width, height), default the row's image ``width`` x ``height``: a float64 (height,
    width) array in the heatmap's units, not min-max scaled."""
    row = _as_row(row)
    if size is None:
        size = (_value(row, "width"), _value(row, "height"))
        if None in size:
            raise ValueError(f"image_id {_image_id(row)!r} has no width/height: pass size=(width, height)")
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise ValueError(f"size must be (width, height) >= 1, got {size}")
    return cv2.resize(heatmap(row).astype(np.float64), (width, height),
                      interpolation=cv2.INTER_LINEAR)


def heat_spread(row) -> float | None:
    """How spread out the heat is: :data:`SPREAD_MEASURE`. None for a map without heat (all
    zero or not finite) or of a single cell. ``row``: a row or a 2-D heatmap array."""
    values = np.asarray(row, np.float64) if isinstance(row, (np.ndarray, list)) else \
        heatmap(row).astype(np.float64)
    value = spreads(values.reshape(-1), np.array([values.size]))[0]
    return None if np.isnan(value) else float(value)


def spreads(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """:data:`SPREAD_MEASURE` of many maps given as their values end to end (float64) and
    their sizes (each >= 1); NaN where undefined (see :func:`heat_spread`)."""
    lengths = np.asarray(lengths, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    values = np.asarray(values, np.float64)
    total = np.add.reduceat(values, starts) if values.size else np.zeros(0)
    good = np.isfinite(total) & (total > 0) & (lengths > 1)
    q = values / np.repeat(np.where(good, total, 1.0), lengths)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
        entropy = -np.add.reduceat(terms, starts) if values.size else np.zeros(0)
        return np.where(good, entropy / np.log(np.maximum(lengths, 2)), np.nan)


# --- pictures --------------------------------------------------------------------------------


def overlay_panel(image: np.ndarray, heat: np.ndarray, gt_box=None, pred_box=None,
                  max_side: int = OVERLAY_MAX_SIDE, tile: int | None = None) -> np.ndarray:
    """[image | heatmap overlay] side by side: RGB uint8 (H, 2W, 3) from an RGB (or grey)
    uint8 ``image``.

    The raw ``heat`` (h, w) is upsampled bilinearly to the image, min-max normalised (a
    constant map shows as zero), coloured with OpenCV's JET and blended at alpha 0.5.
    Boxes (x0, y0, x1, y1) in image pixels: ground truth green, predicted red. Images with
    a side above ``max_side`` are downscaled first (INTER_AREA; boxes with them).

    ``tile``: each half drawn at ``tile`` x ``tile`` pixels instead (the report's display
    size): the image scaled to fit (up, bilinear, or down, INTER_AREA), centred on a grey
    square, so every picture is (tile, 2 tile, 3) and nothing scales it again.
    """
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    h, w = image.shape[:2]
    scale = tile / max(h, w) if tile else min(1.0, max_side / max(h, w))
    if scale != 1.0:
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    up = cv2.resize(np.asarray(heat, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    lo, hi = float(up.min()), float(up.max())
    norm = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    jet = cv2.applyColorMap(np.round(norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blend = cv2.addWeighted(image, 1 - OVERLAY_ALPHA, cv2.cvtColor(jet, cv2.COLOR_BGR2RGB),
                            OVERLAY_ALPHA, 0)
    thickness = max(1, round(max(w, h) / 200))
    for box, colour in ((gt_box, GT_COLOUR), (pred_box, PRED_COLOUR)):
        if box is not None:
            x0, y0, x1, y1 = (v * scale for v in box)  # continuous, exclusive right/bottom
            cv2.rectangle(blend, (int(round(x0)), int(round(y0))),
                          (int(round(x1)) - 1, int(round(y1)) - 1), colour, thickness)
    if tile:
        image, blend = (_centred(half, tile) for half in (image, blend))
    return np.hstack([image, blend])


def _centred(picture: np.ndarray, side: int) -> np.ndarray:
    square: np.ndarray = np.full((side, side, 3), TILE_BACKGROUND, np.uint8)
    top, left = (side - picture.shape[0]) // 2, (side - picture.shape[1]) // 2
    square[top:top + picture.shape[0], left:left + picture.shape[1]] = picture
    return square


def overlay(row, image_root: str | None = None, max_side: int = OVERLAY_MAX_SIDE,
            tile: int | None = None) -> np.ndarray:
    """[image | heatmap overlay] of a row as an RGB uint8 array (see :func:`overlay_panel`,
    also for ``tile``), with the manifest's box (``bbox_*``, when the row has one) and the
    predicted box.

    The image is read from the row's ``uri`` (as :func:`read_row` gives it; a relative uri
    resolves against ``image_root``) and decoded as the job did (EXIF orientation applied).
    """
    row = _as_row(row)
    heat = heatmap(row)
    uri = _value(row, "uri", " (read the row with read_row(run, image_id), which joins the "
                             "run's manifest, or join your manifest's uri)")
    if uri is None:
        raise ValueError(f"image_id {_image_id(row)!r}: its image is not known (the run's "
                         "manifest could not be found)")
    image = _read_image(resolve_uri(str(uri), image_root))
    size = tuple(None if v is None else int(v) for v in (_value(row, "width"), _value(row, "height")))
    if size != (image.shape[1], image.shape[0]):
        raise ValueError(f"image_id {_image_id(row)!r}: image {uri} is {image.shape[1]}x"
                         f"{image.shape[0]} but the results say {size[0]}x{size[1]} (another file?)")
    return overlay_panel(image, heat, row_box(row, BBOX_COLUMNS), row_box(row, PRED_BOX_COLUMNS), max_side, tile)


def _read_image(uri: str) -> np.ndarray:
    limits = ReadLimits()
    try:
        return decode_image(read_bytes(uri, limits), limits.max_pixels)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {uri} not found (images moved? pass image_root / "
                                "--image-root)") from None


def overlay_file_name(image_id: str) -> str:
    """``<image_id>.png`` made safe as a file name."""
    return safe_name(str(image_id)) + ".png"


_SHOWN = ("image_id", "label", "split", "status", "error", "proxy_kind", "proxy_label", "cosine",
          "score", "width", "height", "orientation", "heatmap_height", "heatmap_width",
          "degenerate", "ratio_bbox", "uniform_bbox", "ratio_mask", "uniform_mask", "iou",
          "loc_correct", "ratio_bbox_topk", "ratio_mask_topk", "uri")


def describe(row) -> str:
    """The row's key values, one ``name  value`` per line (boxes as x0, y0, x1, y1; the
    secrets of a uri redacted)."""
    row = _as_row(row)

    def text(v):
        if is_null(v):
            return "—"
        return f"{v:.4f}" if isinstance(v, (float, np.floating)) else redact(str(v))

    lines = [(name, text(row[name])) for name in _SHOWN if name in row]
    for name, columns in (("bbox", BBOX_COLUMNS), ("pred_bbox", PRED_BOX_COLUMNS)):
        if all(c in row for c in columns):
            values = [row[c] for c in columns]
            shown = "—" if any(is_null(v) for v in values) else ", ".join(f"{float(v):g}" for v in values)
            lines.append((name, shown))
    if "heatmap" in row and row.get("heatmap") is not None:
        lines.append(("heat_spread", text(heat_spread(row))))
    return "\n".join(f"{name:<16}{value}" for name, value in lines)
