"""Reading an explain run: ``RUN/summary.json`` and the table columns of ``RUN/results``.
A run is a local folder or a URI (``s3://bucket/run?endpoint_override=...``), read through
its pyarrow filesystem (``embcam.data.runstate.RunFolder``).

Every check on the input (missing columns, wrong types, duplicate or null image_ids,
unknown statuses, NaN ratios, ragged ``iou_sweep``) raises here with the run, file,
column and row it concerns.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from embcam.data.locations import has_scheme, redact
from embcam.data.runstate import RESULTS, SUMMARY, RunFolder, covered
from embcam.data.schemas import ERROR, OK, STATUSES
from embcam.metrics import THRESHOLDS

# Columns the table reads, with the type they are cast to; optional ones may be absent.
_F64, _BOOL, _STR = pa.float64(), pa.bool_(), pa.string()
REQUIRED_COLUMNS = {
    "image_id": _STR, "status": _STR, "degenerate": _BOOL,
    "ratio_bbox": _F64, "ratio_mask": _F64, "uniform_bbox": _F64, "uniform_mask": _F64,
    "loc_correct": _BOOL, "iou_sweep": pa.list_(_F64),
}
OPTIONAL_COLUMNS = {"split": _STR, "ratio_bbox_topk": _F64, "ratio_mask_topk": _F64}
# (region, table column) -> results column
RATIO_COLUMNS = {
    ("bbox", "uniform"): "uniform_bbox", ("bbox", "all"): "ratio_bbox",
    ("bbox", "topk"): "ratio_bbox_topk",
    ("mask", "uniform"): "uniform_mask", ("mask", "all"): "ratio_mask",
    ("mask", "topk"): "ratio_mask_topk",
}


def check_distinct(runs: list[str]) -> None:
    """ValueError when no run is given, or one run twice (under any spelling of its path)."""
    if not runs:
        raise ValueError("no runs given: pass at least one result directory")
    seen: dict[object, str] = {}
    for run in runs:
        key = urlsplit(run)._replace(path=urlsplit(run).path.rstrip("/")) if has_scheme(run) else Path(run).resolve()
        if key in seen:
            raise ValueError(f"run {redact(run)} is given twice (also as {redact(seen[key])})")
        seen[key] = run


def read_summary(run: str, allow_partial: bool = False) -> dict:
    """``RUN/summary.json``; for a run the job has not finished, an error, or with
    ``allow_partial`` a stand-in from its run state that says ``unfinished``."""
    folder = RunFolder(run)
    saved = folder.identity
    if saved is not None and not folder.is_complete():
        note = f"{covered(folder.pieces(RESULTS), saved['rows'])} of {saved['rows']} rows"
        if not allow_partial:
            raise ValueError(f"run {run} is unfinished ({note} done): finish it by re-running the same "
                             "embcam explain command, or pass --allow-partial to report on what is there")
        return {"config": saved.get("config", {}), "model": saved["identity"]["model"]["spec"],
                "unfinished": note}
    try:
        summary = folder.read_json(SUMMARY)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"run {run}: {SUMMARY} is not valid JSON ({e})") from None
    if summary is None:
        raise FileNotFoundError(f"run {run}: no {SUMMARY} (expected {folder.join(SUMMARY)})")
    if not isinstance(summary, dict) or not isinstance(summary.get("config", {}), dict):
        raise ValueError(f"run {run}: {SUMMARY} must hold an object with a 'config' object")
    return summary


def result_files(run: str) -> tuple[RunFolder, list[str]]:
    """The run folder and the paths (on its filesystem) of its ``results/**/*.parquet``."""
    folder = RunFolder(run)
    found = folder.fs.get_file_info(pafs.FileSelector(folder.join(RESULTS), allow_not_found=True,
                                                      recursive=True))
    files = sorted(f.path for f in found if f.type == pafs.FileType.File and f.base_name.endswith(".parquet")
                   and not f.base_name.startswith("."))
    if not files:
        raise FileNotFoundError(f"run {run}: no {RESULTS}/*.parquet under {folder.join(RESULTS)}")
    return folder, files


def read_results(run: str, split: str | None) -> dict:
    """The table columns of a run as numpy arrays: ``name`` (values) and ``name?`` (valid)."""
    tables = []
    folder, files = result_files(run)
    for path in files:
        schema = pq.read_schema(path, filesystem=folder.fs)
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        if missing:
            raise ValueError(f"results file {path} lacks column(s) {', '.join(missing)}")
        wanted = {**REQUIRED_COLUMNS,
                  **{c: t for c, t in OPTIONAL_COLUMNS.items() if c in schema.names}}
        table = pq.read_table(path, columns=list(wanted), filesystem=folder.fs)
        arrays = []
        for name, type_ in {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.items():
            if name not in wanted:
                arrays.append(pa.nulls(table.num_rows, type_))
                continue
            try:
                arrays.append(table.column(name).cast(type_))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ValueError(f"results file {path}: column {name} of type "
                                 f"{table.schema.field(name).type} cannot be read as "
                                 f"{type_} ({e})") from None
        tables.append(pa.table(arrays, names=[*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS]))
    table = pa.concat_tables(tables).combine_chunks()
    if split is not None:
        present = sorted(set(table.column("split").drop_null().to_pylist()))
        table = table.filter(pc.equal(table.column("split"), split).fill_null(False))
        if table.num_rows == 0:
            raise ValueError(f"run {run}: no result rows of split {split!r} "
                             f"(splits present: {present})")

    cols: dict[str, np.ndarray] = {}
    for name in [*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS]:
        column = table.column(name)
        cols[name + "?"] = column.is_valid().to_numpy(zero_copy_only=False)
        if name == "iou_sweep":
            cols[name] = _sweep_matrix(run, column, cols[name + "?"], table)
        elif column.type == _STR:
            cols[name] = column.to_numpy(zero_copy_only=False).astype(object)
        else:
            filler = False if column.type == _BOOL else 0.0
            cols[name] = column.fill_null(filler).to_numpy(zero_copy_only=False)

    ids = cols["image_id"]
    if not cols["image_id?"].all():
        raise ValueError(f"run {run}: results have a null image_id")
    unique, counts = np.unique(ids.astype(str), return_counts=True)
    if (counts > 1).any():
        dup = str(unique[counts > 1][0])
        raise ValueError(f"run {run}: image_id {dup!r} appears {counts[counts > 1][0]} times "
                         "in results (duplicate rows from a re-run?)")
    bad = ~np.isin(cols["status"], STATUSES)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"run {run}: row image_id {ids[i]!r} has status {cols['status'][i]!r} "
                         f"(expected {OK!r} or {ERROR!r})")
    no_flag = (cols["status"] == OK) & ~cols["degenerate?"]
    if no_flag.any():
        raise ValueError(f"run {run}: row image_id {ids[int(np.argmax(no_flag))]!r} has status "
                         "ok but degenerate is null")
    for name in RATIO_COLUMNS.values():
        nan = cols[name + "?"] & np.isnan(cols[name])
        if nan.any():
            raise ValueError(f"run {run}: column {name} is NaN in row image_id "
                             f"{ids[int(np.argmax(nan))]!r}")
    return cols


def _sweep_matrix(run: str, column: pa.Array, valid: np.ndarray, table: pa.Table) -> np.ndarray:
    """iou_sweep as an (n, len(THRESHOLDS)) float64 matrix, NaN on null rows."""
    n_t = len(THRESHOLDS)
    out = np.full((len(column), n_t), np.nan)
    if not valid.any():
        return out
    lengths = pc.list_value_length(column).fill_null(n_t).to_numpy(zero_copy_only=False)
    if (lengths != n_t).any():
        i = int(np.argmax(lengths != n_t))
        raise ValueError(f"run {run}: iou_sweep of row image_id "
                         f"{table.column('image_id')[i].as_py()!r} has {lengths[i]} values, "
                         f"expected {n_t} (one per threshold {THRESHOLDS})")
    values = pc.list_flatten(column.filter(pa.array(valid)))
    if values.null_count:
        raise ValueError(f"run {run}: iou_sweep holds a null value")
    out[valid] = values.to_numpy(zero_copy_only=False).reshape(-1, n_t)
    return out


def method_key(run: str, config: dict) -> str:
    """Method of a run: config ``proxy``, else the one ``proxy_kind`` of its results."""
    proxy = config.get("proxy")
    if proxy:
        return str(proxy)
    folder, files = result_files(run)
    dataset = pads.dataset(files, filesystem=folder.fs, format="parquet")
    kinds = set()
    if "proxy_kind" in dataset.schema.names:
        kinds = set(dataset.to_table(columns=["proxy_kind"]).column("proxy_kind")
                    .drop_null().to_pylist())
    if len(kinds) != 1:
        raise ValueError(f"run {run}: summary.json config has no 'proxy' and the results' "
                         f"proxy_kind does not name one mode (found {sorted(kinds)})")
    return kinds.pop()
