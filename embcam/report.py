"""Evaluation report over explain runs: the paper's Table 1, a threshold sweep, overlays.

A run is a directory written by the explain job: ``RUN/results/*.parquet`` (one row per
image, schema ``results``) and ``RUN/summary.json`` (its ``config`` names the proxy mode,
the model, ``top_k_channels``, the ``manifest`` and the ``image_root``). Runs are grouped
into *methods* by their proxy mode (config ``proxy``; the results' ``proxy_kind`` when
the config has none); the runs of one method are independently trained models.

Protocol (DESIGN §5, paper Table 1)
-----------------------------------
* Per run, a metric is the mean over the images with status ``ok`` and a non-degenerate
  heatmap whose value is not null (no box / no mask / no top-k map: skipped and counted).
  Error rows and degenerate rows are excluded from every metric, the uniform baselines
  and the accuracies included, and counted.
* Per method, each number is the mean ± std ACROSS RUNS of the per-run values, std being
  the population std (ddof = 0); a single run has std 0. A run without a value for a
  metric (no annotated image) does not enter that metric, and each cell says how many
  runs it averages.
* Localisation accuracy is the fraction of images with IoU >= 0.5 at t = 0.2
  (``loc_correct``). The sweep gives the accuracy at every t of ``metrics.THRESHOLDS``
  (from ``iou_sweep``); "best over t" (MaxBoxAcc style) is each run's maximum over t
  (ties to the smallest t), then mean ± std across runs. Both are for the all-channels map.

``table1`` returns a JSON-ready dict (every number with its n); ``render_markdown``
prints it; ``write_report`` also writes ``report.json``, ``report.html``, ``sweep.png``
(accuracy vs t, drawn with OpenCV) and ``overlays/<method>/<image>.png`` (image | heatmap
overlay with the ground-truth box in green and the predicted box in red).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import html
import json
import re
import urllib.parse
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from embcam.metrics import DEFAULT_THRESHOLD, LOC_IOU, THRESHOLDS

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
REGIONS = {"bbox": "BBox", "mask": "Mask"}
METHOD_NAMES = {
    "self": "EmbeddingCAM (self proxy)", "mean": "EmbeddingCAM (mean proxy)",
    "onehot": "Grad-CAM (onehot proxy)", "bank": "EmbeddingCAM (bank proxy)",
}
OVERLAY_MAX_SIDE = 512  # overlay panels larger than this (long side) are downscaled
OVERLAY_ALPHA = 0.5
GT_COLOUR, PRED_COLOUR = (0, 200, 0), (0, 0, 255)  # BGR: green, red
STD_NOTE = ("mean ± std across the runs of a method (independently trained models); std is "
            "the population std (ddof = 0) of the per-run means, 0 for a single run")


# --------------------------------------------------------------------------- table

def table1(runs: list[str], *, split: str | None = None) -> dict:
    """Table 1 of the paper over result directories ``runs`` (see the module docstring).

    ``split``: keep only result rows whose ``split`` equals it. Returns a JSON-ready dict:
    ``protocol``, ``split``, ``top_k`` (the k shared by every method, or None),
    ``methods`` (one per proxy mode, in order of first appearance, each with ``rows``
    {bbox, mask} x {uniform, all, topk}, ``accuracy`` and ``sweep``, every value a stat
    {mean, std, n_runs, per_run, n_images}) and ``runs`` (per-run counts and values).
    """
    return _evaluate(runs, split)[0]


def _evaluate(runs: list[str], split: str | None) -> tuple[dict, dict]:
    """(table dict, {run: ok image ids}) for ``table1`` and ``write_report``."""
    if not runs:
        raise ValueError("no runs given: pass at least one result directory")
    seen: dict[Path, str] = {}
    for run in runs:
        key = Path(run).resolve()
        if key in seen:
            raise ValueError(f"run {run} is given twice (also as {seen[key]})")
        seen[key] = run
    per_run, ok_ids = [], {}
    for run in runs:
        summary = _read_summary(run)
        cols = _read_results(run, split)
        per_run.append(_run_entry(run, summary, cols))
        ok_ids[run] = cols["image_id"][cols["status"] == "ok"]

    methods: dict[str, dict] = {}
    for entry in per_run:
        methods.setdefault(entry["method"], {"key": entry["method"], "runs": []})
        methods[entry["method"]]["runs"].append(entry)
    out_methods = [_method_entry(m["key"], m["runs"]) for m in methods.values()]
    ks = {m["top_k"] for m in out_methods if m["rows"]["bbox"]["topk"]["n_runs"]
          or m["rows"]["mask"]["topk"]["n_runs"]}
    table = {
        "protocol": {
            "images": "status ok and non-degenerate heatmap; rows where the metric is null "
                      "(no box, no mask, no top-k map) are skipped and counted",
            "std": STD_NOTE, "ddof": 0, "loc_iou": LOC_IOU,
            "threshold": DEFAULT_THRESHOLD, "thresholds": list(THRESHOLDS),
            "best_over_t": "per run the maximum accuracy over the thresholds (ties to the "
                           "smallest t), then mean ± std across runs",
        },
        "split": split,
        "top_k": ks.pop() if len(ks) == 1 else None,
        "methods": out_methods,
        "runs": per_run,
    }
    return table, ok_ids


def _read_summary(run: str) -> dict:
    path = Path(run) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"run {run}: no summary.json (expected {path})")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"run {run}: {path} is not valid JSON ({e})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("config", {}), dict):
        raise ValueError(f"run {run}: {path} must hold an object with a 'config' object")
    return summary


def _result_files(run: str) -> list[Path]:
    folder = Path(run) / "results"
    files = sorted(folder.rglob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"run {run}: no results/*.parquet under {folder}")
    return files


def _read_results(run: str, split: str | None) -> dict:
    """The table columns of a run as numpy arrays: ``name`` (values) and ``name?`` (valid)."""
    tables = []
    for path in _result_files(run):
        schema = pq.read_schema(path)
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        if missing:
            raise ValueError(f"results file {path} lacks column(s) {', '.join(missing)}")
        wanted = {**REQUIRED_COLUMNS,
                  **{c: t for c, t in OPTIONAL_COLUMNS.items() if c in schema.names}}
        table = pq.read_table(path, columns=list(wanted))
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
    bad = ~np.isin(cols["status"], ["ok", "error"])
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"run {run}: row image_id {ids[i]!r} has status {cols['status'][i]!r} "
                         "(expected 'ok' or 'error')")
    no_flag = (cols["status"] == "ok") & ~cols["degenerate?"]
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


def _run_entry(run: str, summary: dict, cols: dict) -> dict:
    """Counts and per-run values of one run."""
    config = summary.get("config", {})
    ok = cols["status"] == "ok"
    degenerate = ok & cols["degenerate"]
    evaluated = ok & ~degenerate

    def mean_of(values: np.ndarray, valid: np.ndarray) -> dict:
        sel = evaluated & valid
        n = int(sel.sum())
        return {"value": float(np.mean(values[sel])) if n else None, "n": n,
                "skipped_null": int((evaluated & ~valid).sum())}

    values = {name: mean_of(cols[name], cols[name + "?"]) for name in RATIO_COLUMNS.values()}
    values["accuracy"] = mean_of(cols["loc_correct"], cols["loc_correct?"])
    sweep_valid = cols["iou_sweep?"]
    sweep = [mean_of(cols["iou_sweep"][:, i] >= LOC_IOU, sweep_valid)
             for i in range(len(THRESHOLDS))]
    accs = [s["value"] for s in sweep]
    best = None
    if accs[0] is not None:
        i = int(np.argmax(accs))  # first maximum: the smallest t
        best = {"value": accs[i], "threshold": THRESHOLDS[i], "n": sweep[i]["n"]}
    return {
        "run": run,
        "method": _method_key(run, config),
        "model": config.get("model") or summary.get("model"),
        "checkpoint": config.get("checkpoint"),
        "top_k": config.get("top_k_channels"),
        "counts": {"images": int(len(ok)), "ok": int(ok.sum()),
                   "error": int((~ok).sum()), "degenerate": int(degenerate.sum()),
                   "evaluated": int(evaluated.sum())},
        "values": values,
        "sweep": sweep,
        "sweep_best": best,
    }


def _method_key(run: str, config: dict) -> str:
    """Method of a run: config ``proxy``, else the one ``proxy_kind`` of its results."""
    proxy = config.get("proxy")
    if proxy:
        return str(proxy)
    dataset = pads.dataset([str(p) for p in _result_files(run)], format="parquet")
    kinds = set()
    if "proxy_kind" in dataset.schema.names:
        kinds = set(dataset.to_table(columns=["proxy_kind"]).column("proxy_kind")
                    .drop_null().to_pylist())
    if len(kinds) != 1:
        raise ValueError(f"run {run}: summary.json config has no 'proxy' and the results' "
                         f"proxy_kind does not name one mode (found {sorted(kinds)})")
    return kinds.pop()


def _across(per_run: list[dict]) -> dict:
    """mean ± population std over the runs that have a value."""
    used = [r for r in per_run if r["value"] is not None]
    vals = np.array([r["value"] for r in used], dtype=np.float64)
    return {"mean": float(vals.mean()) if len(vals) else None,
            "std": float(vals.std(ddof=0)) if len(vals) else None,
            "n_runs": len(vals), "per_run": [float(v) for v in vals],
            "n_images": [r["n"] for r in used]}


def _method_entry(key: str, runs: list[dict]) -> dict:
    ks = sorted({r["top_k"] for r in runs if r["top_k"] is not None})
    if len(ks) > 1:
        raise ValueError(f"method {key!r}: runs use different top_k_channels {ks} "
                         f"({', '.join(r['run'] for r in runs)}); report them separately")
    rows = {region: {col: _across([r["values"][name] for r in runs])
                     for (reg, col), name in RATIO_COLUMNS.items() if reg == region}
            for region in REGIONS}
    sweep = [_across([r["sweep"][i] for r in runs]) for i in range(len(THRESHOLDS))]
    return {
        "key": key,
        "name": METHOD_NAMES.get(key, f"EmbeddingCAM (proxy {key})"),
        "runs": [r["run"] for r in runs],
        "n_runs": len(runs),
        "top_k": ks[0] if ks else None,
        "rows": rows,
        "accuracy": _across([r["values"]["accuracy"] for r in runs]),
        "sweep": {"thresholds": list(THRESHOLDS), "accuracy": sweep,
                  "best": _across([r["sweep_best"] or {"value": None, "n": 0} for r in runs]),
                  "best_threshold": [r["sweep_best"]["threshold"] for r in runs
                                     if r["sweep_best"]]},
    }


# --------------------------------------------------------------------------- rendering

def _fmt(stat: dict, n_runs: int, suffix: str = "") -> str:
    if stat["mean"] is None:
        return "—"
    cell = f"{stat['mean']:.3f} ± {stat['std']:.3f}"
    if stat["n_runs"] != n_runs:
        cell += f" (n={stat['n_runs']})"
    return cell + suffix


def _table1_rows(table: dict) -> tuple[list[str], list[list[str]]]:
    k = table["top_k"]
    header = ["Method", "Region", "Uniform", "All channels",
              f"Top-{k} channels" if k is not None else "Top-k channels",
              f"Accuracy (IoU ≥ {LOC_IOU:g}, t = {DEFAULT_THRESHOLD:g})", "Runs"]
    rows = []
    for m in table["methods"]:
        n = m["n_runs"]
        k_note = f" (k={m['top_k']})" if k is None and m["top_k"] is not None else ""
        for i, (region, label) in enumerate(REGIONS.items()):
            cells = m["rows"][region]
            rows.append([m["name"] if i == 0 else "", label, _fmt(cells["uniform"], n),
                         _fmt(cells["all"], n),
                         _fmt(cells["topk"], n, k_note if cells["topk"]["mean"] is not None
                              else ""),
                         _fmt(m["accuracy"], n) if region == "bbox" else "",
                         str(n) if i == 0 else ""])
    return header, rows


def _sweep_rows(table: dict) -> tuple[list[str], list[list[str]]]:
    header = ["Method", *(f"t={t:g}" for t in THRESHOLDS), "Best over t (MaxBoxAcc)"]
    rows = [[m["name"], *(_fmt(s, m["n_runs"]) for s in m["sweep"]["accuracy"]),
             _fmt(m["sweep"]["best"], m["n_runs"])] for m in table["methods"]]
    return header, rows


def _runs_rows(table: dict) -> tuple[list[str], list[list[str]]]:
    header = ["Run", "Method", "Model", "k", "Images", "OK", "Error",
              "Degenerate (excluded)", "Evaluated", "No box (skipped)", "No mask (skipped)",
              "Best t"]
    rows = []
    for r in table["runs"]:
        c, v = r["counts"], r["values"]
        rows.append([r["run"], r["method"], str(r["model"] or "—"),
                     "—" if r["top_k"] is None else str(r["top_k"]),
                     str(c["images"]), str(c["ok"]), str(c["error"]), str(c["degenerate"]),
                     str(c["evaluated"]), str(v["ratio_bbox"]["skipped_null"]),
                     str(v["ratio_mask"]["skipped_null"]),
                     "—" if r["sweep_best"] is None else f"{r['sweep_best']['threshold']:g}"])
    return header, rows


def _notes(table: dict) -> list[str]:
    notes = [f"Each value: per run, the mean over images with status ok, a non-degenerate "
             f"heatmap and the annotation (box or mask); then {STD_NOTE}. "
             f"(n=…) in a cell: averaged over fewer runs than the method has; —: no value."]
    if table["split"] is not None:
        notes.append(f"Only rows of split {table['split']!r}.")
    return notes


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def render_markdown(table: dict) -> str:
    """Markdown of a ``table1`` dict: Table 1, the threshold sweep, per-run counts."""
    parts = ["# embcam evaluation report", "",
             "## Table 1: mean heatmap ratio and localisation accuracy", "",
             _md_table(*_table1_rows(table)), "", *_notes(table), "",
             "## Localisation accuracy over thresholds t (all channels)", "",
             _md_table(*_sweep_rows(table)), "",
             f"Accuracy = fraction of images with IoU ≥ {LOC_IOU:g}. "
             f"Best over t: {table['protocol']['best_over_t']}.", "",
             "## Runs", "", _md_table(*_runs_rows(table)), ""]
    overlays = table.get("overlays")
    if overlays is not None:
        parts += ["## Overlays", "", _overlay_note(overlays), ""]
    return "\n".join(parts)


def _overlay_note(overlays: dict) -> str:
    if overlays["skipped"]:
        return f"Overlays skipped: {overlays['skipped']}"
    note = f"{overlays['written']} overlay image(s) in overlays/ (shown in report.html)."
    if overlays["failed"]:
        note += f" {len(overlays['failed'])} could not be drawn (see report.json)."
    return note


def render_html(table: dict) -> str:
    """Self-contained HTML page of a report dict (images are the PNGs next to it)."""
    esc = html.escape

    def html_table(header, rows):
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                       for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             "<title>embcam evaluation report</title><style>",
             "body{font-family:sans-serif;margin:2em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}"
             "th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}"
             ".grid{display:grid;gap:12px;"
             "grid-template-columns:repeat(auto-fill,minmax(300px,1fr))}"
             "figure{margin:0}figure img{width:100%;image-rendering:pixelated}"
             "figcaption{font-size:12px}",
             "</style></head><body><h1>embcam evaluation report</h1>",
             "<h2>Table 1: mean heatmap ratio and localisation accuracy</h2>",
             html_table(*_table1_rows(table)),
             *(f"<p>{esc(n)}</p>" for n in _notes(table)),
             "<h2>Localisation accuracy over thresholds t (all channels)</h2>",
             "<img src='sweep.png' alt='accuracy versus threshold'>",
             html_table(*_sweep_rows(table)),
             f"<p>Best over t: {esc(table['protocol']['best_over_t'])}.</p>",
             "<h2>Runs</h2>", html_table(*_runs_rows(table)),
             "<h2>Overlays</h2>"]
    overlays = table.get("overlays") or {"skipped": "not requested", "images": [],
                                         "failed": [], "written": 0}
    parts.append(f"<p>{esc(_overlay_note(overlays))} Left: image; right: heatmap (min-max, "
                 "JET) with the ground-truth box (green) and the predicted box at "
                 f"t = {DEFAULT_THRESHOLD:g} (red).</p>")
    if overlays["images"]:
        parts.append("<div class='grid'>")
        for item in overlays["images"]:
            parts.append(f"<figure><img src='{esc(item['file'])}' alt='{esc(item['image_id'])}'>"
                         f"<figcaption>{esc(item['caption'])}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- sweep plot

_PALETTE = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
            (75, 86, 140)]  # BGR


def draw_sweep(table: dict, width: int = 760, height: int = 440) -> np.ndarray:
    """BGR plot of mean accuracy vs threshold t, one line per method (OpenCV only)."""
    img = np.full((height, width, 3), 255, np.uint8)
    font, black, grey = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), (220, 220, 220)
    left, right, top, bottom = 60, width - 220, 40, height - 50
    t_lo, t_hi = 0.0, max(THRESHOLDS) + 0.05

    def px(t, acc):
        return (int(round(left + (t - t_lo) / (t_hi - t_lo) * (right - left))),
                int(round(bottom - acc * (bottom - top))))

    for k in range(6):  # accuracy grid and ticks 0, 0.2, ..., 1
        acc = k / 5
        cv2.line(img, px(t_lo, acc), px(t_hi, acc), grey, 1)
        cv2.putText(img, f"{acc:.1f}", (left - 35, px(0, acc)[1] + 4), font, 0.4, black, 1,
                    cv2.LINE_AA)
    for t in THRESHOLDS:
        x = px(t, 0)[0]
        cv2.line(img, (x, bottom), (x, bottom + 4), black, 1)
        cv2.putText(img, f"{t:g}", (x - 12, bottom + 18), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (right, bottom), black, 1)
    cv2.putText(img, f"localisation accuracy (IoU >= {LOC_IOU:g}) vs threshold t", (left, 25),
                font, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(img, "threshold t", ((left + right) // 2 - 40, height - 12), font, 0.45, black,
                1, cv2.LINE_AA)
    for i, m in enumerate(table["methods"]):
        colour = _PALETTE[i % len(_PALETTE)]
        points = [px(t, s["mean"]) for t, s in zip(THRESHOLDS, m["sweep"]["accuracy"])
                  if s["mean"] is not None]
        for a, b in zip(points, points[1:]):
            cv2.line(img, a, b, colour, 2, cv2.LINE_AA)
        for p in points:
            cv2.circle(img, p, 3, colour, -1, cv2.LINE_AA)
        y = top + 10 + 20 * i
        cv2.line(img, (right + 12, y), (right + 32, y), colour, 2, cv2.LINE_AA)
        cv2.putText(img, m["name"][:26], (right + 38, y + 4), font, 0.4, black, 1, cv2.LINE_AA)
    return img


# --------------------------------------------------------------------------- overlays

class _Skip(Exception):
    """Overlays cannot be drawn (the reason is the message)."""


def overlay_panel(image: np.ndarray, heatmap: np.ndarray, gt_box=None, pred_box=None,
                  max_side: int = OVERLAY_MAX_SIDE) -> np.ndarray:
    """[image | heatmap overlay] side by side, BGR uint8, (H, 2W, 3).

    The raw ``heatmap`` (h, w) is upsampled bilinearly to the image, min-max normalised
    (a constant map shows as zero), coloured with JET and blended at alpha 0.5. Boxes
    (x0, y0, x1, y1) in image pixels: ground truth green, predicted red. Images with a
    side above ``max_side`` are downscaled first (boxes with them).
    """
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    up = cv2.resize(np.asarray(heatmap, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    lo, hi = float(up.min()), float(up.max())
    norm = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    colour = cv2.applyColorMap(np.round(norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blend = cv2.addWeighted(image, 1 - OVERLAY_ALPHA, colour, OVERLAY_ALPHA, 0)
    thickness = max(1, round(max(w, h) / 200))
    for box, c in ((gt_box, GT_COLOUR), (pred_box, PRED_COLOUR)):
        if box is not None:
            x0, y0, x1, y1 = (v * scale for v in box)  # continuous, exclusive right/bottom
            cv2.rectangle(blend, (int(round(x0)), int(round(y0))),
                          (int(round(x1)) - 1, int(round(y1)) - 1), c, thickness)
    return np.hstack([image, blend])


def _safe_name(text: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60].strip("._") or "x"
    return f"{stem}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _manifest_rows(config: dict, run: str, ids: list[str]) -> tuple[dict, str]:
    """({image_id: manifest row}, image root) for ``ids``; raises _Skip when unreachable."""
    source = config.get("manifest")
    if not source:
        raise _Skip(f"run {run}: summary.json config names no manifest")
    source = str(source)
    if "://" not in source:
        candidates = [source]
        if not Path(source).is_absolute():
            candidates.append(str(Path(run) / source))  # relative to the run directory
        for cand in candidates:
            matches = sorted(glob.glob(cand)) if glob.has_magic(cand) else (
                [cand] if Path(cand).exists() else [])
            if matches:
                source = matches if len(matches) > 1 else matches[0]
                break
        else:
            raise _Skip(f"manifest {source} not found")
    try:
        dataset = pads.dataset(source, format="parquet")
        names = [c for c in ("image_id", "uri", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")
                 if c in dataset.schema.names]
        if "image_id" not in names or "uri" not in names:
            raise _Skip(f"manifest {source} lacks image_id or uri")
        rows = dataset.to_table(columns=names,
                                filter=pc.field("image_id").isin(ids)).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise _Skip(f"manifest {source} could not be read ({e})") from None
    return {r["image_id"]: r for r in rows}, str(config.get("image_root")
                                                 or _manifest_dir(source))


def _manifest_dir(source) -> str:
    """Default image root: the manifest's folder (where embcam.datasets makes uris relative)."""
    first = source if isinstance(source, str) else source[0]
    if "://" in first:
        return first.rsplit("/", 1)[0]
    return str(Path(first) if Path(first).is_dir() else Path(first).parent)


def _read_image(uri: str, root: str) -> np.ndarray:
    """Decode the image at ``uri`` (absolute, relative to ``root``, or a URI); raises OSError."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # the stored pixel grid
    if uri.startswith("file://"):
        uri = urllib.parse.unquote(urllib.parse.urlparse(uri).path)
    if "://" in uri or ("://" in root and not Path(uri).is_absolute()):
        full = uri if "://" in uri else root.rstrip("/") + "/" + uri
        try:
            fs, path = pafs.FileSystem.from_uri(full)
            with fs.open_input_stream(path) as f:
                data = np.frombuffer(f.read(), np.uint8)
        except (pa.ArrowException, OSError) as e:
            raise OSError(f"cannot read {full} ({e})") from None
        image = cv2.imdecode(data, flags)
    else:
        path = Path(uri) if Path(uri).is_absolute() else Path(root) / uri
        if not path.is_file():
            raise OSError(f"image file {path} not found")
        image = cv2.imread(str(path), flags)
        full = str(path)
    if image is None:
        raise OSError(f"cannot decode image {full}")
    return image


def _overlay_ids(ok_ids: dict, reps: list[dict], count: int) -> list[str]:
    union = set()
    for m in reps:
        union.update(str(i) for i in ok_ids[m["runs"][0]])
    return sorted(union)[:count]


def _results_rows(run: str, ids: list[str]) -> dict:
    """{image_id: results row with the overlay columns} for ``ids`` (heatmaps read only
    from the files that hold one of them)."""
    columns = ["image_id", "status", "width", "height", "heatmap", "heatmap_height",
               "heatmap_width", "degenerate", "ratio_bbox", "ratio_mask", "iou",
               "pred_bbox_x0", "pred_bbox_y0", "pred_bbox_x1", "pred_bbox_y1"]
    wanted, rows = pa.array(ids, pa.string()), {}
    for path in _result_files(run):
        missing = [c for c in columns if c not in pq.read_schema(path).names]
        if missing:
            raise _Skip(f"results file {path} lacks column(s) {', '.join(missing)} "
                        "needed for overlays")
        hits = pc.is_in(pq.read_table(path, columns=["image_id"]).column("image_id"),
                        value_set=wanted)
        if pc.any(hits).as_py():
            table = pq.read_table(path, columns=columns)
            rows.update((r["image_id"], r) for r in table.filter(hits).to_pylist())
    return rows


def _caption(image_id: str, method: str, row: dict) -> str:
    def num(v):
        return "—" if v is None else f"{v:.3f}"
    text = (f"{image_id} · {method} · ratio bbox {num(row['ratio_bbox'])} · "
            f"mask {num(row['ratio_mask'])} · IoU {num(row['iou'])}")
    return text + (" · degenerate" if row["degenerate"] else "")


def _write_overlays(table: dict, ok_ids: dict, out_dir: Path, count: int) -> dict:
    """Draw overlays for the first ``count`` sorted ok image_ids, first run of each method."""
    info = {"written": 0, "skipped": None, "failed": [], "images": [],
            "choice": f"first {count} image_ids (sorted) with status ok; first run of each "
                      "method"}
    if count <= 0:
        info["skipped"] = "not requested (--overlays 0)"
        return info
    summaries = {r["run"]: _read_summary(r["run"]) for r in table["runs"]}
    ids = _overlay_ids(ok_ids, table["methods"], count)
    jobs = []
    try:
        for m in table["methods"]:
            run = m["runs"][0]
            manifest, root = _manifest_rows(summaries[run].get("config", {}), run, ids)
            jobs.append((m, run, manifest, root, _results_rows(run, ids)))
    except _Skip as e:
        info["skipped"] = str(e)
        return info
    for image_id in ids:
        for m, run, manifest, root, results in jobs:
            row = results.get(image_id)
            if row is None or row["status"] != "ok":
                continue  # absent or failed in this run
            try:
                panel = _panel_for(row, manifest.get(image_id), root)
            except (OSError, ValueError) as e:
                info["failed"].append({"image_id": image_id, "run": run, "reason": str(e)})
                continue
            rel = f"overlays/{_safe_name(m['key'])}/{_safe_name(image_id)}.png"
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(out_dir / rel), panel):
                raise OSError(f"could not write {out_dir / rel}")
            info["images"].append({"image_id": image_id, "method": m["key"], "run": run,
                                   "file": rel, "caption": _caption(image_id, m["name"], row),
                                   "ratio_bbox": row["ratio_bbox"],
                                   "ratio_mask": row["ratio_mask"], "iou": row["iou"]})
            info["written"] += 1
    if ids and not info["written"] and info["failed"]:
        info["skipped"] = f"no image could be drawn (first failure: {info['failed'][0]['reason']})"
    return info


def _panel_for(row: dict, mrow: dict | None, root: str) -> np.ndarray:
    image_id = row["image_id"]
    if mrow is None:
        raise ValueError(f"image_id {image_id!r} is not in the manifest")
    if row["heatmap"] is None:
        raise ValueError(f"image_id {image_id!r} has no heatmap")
    hh, hw = row["heatmap_height"], row["heatmap_width"]
    heat = np.asarray(row["heatmap"], np.float32)
    if hh is None or hw is None or heat.size != hh * hw:
        raise ValueError(f"image_id {image_id!r}: heatmap has {heat.size} values, "
                         f"heatmap_height x heatmap_width = {hh} x {hw}")
    image = _read_image(mrow["uri"], root)
    if (row["width"], row["height"]) != (image.shape[1], image.shape[0]):
        raise ValueError(f"image_id {image_id!r}: image is {image.shape[1]}x{image.shape[0]} "
                         f"but results say {row['width']}x{row['height']}")
    gt = tuple(mrow.get(f"bbox_{c}") for c in ("x0", "y0", "x1", "y1"))
    pred = tuple(row[f"pred_bbox_{c}"] for c in ("x0", "y0", "x1", "y1"))
    return overlay_panel(image, heat.reshape(hh, hw),
                         None if None in gt else gt, None if None in pred else pred)


# --------------------------------------------------------------------------- entry points

def write_report(runs: list[str], out_dir: str, *, overlays: int = 24,
                 split: str | None = None) -> dict:
    """Write report.md, report.json, report.html, sweep.png and overlays/ into ``out_dir``.

    Returns the ``table1`` dict with an ``overlays`` entry: ``written``, ``skipped``
    (reason, or None), ``failed`` (per image), ``images`` (file, caption, values).
    When the manifest or the images cannot be reached the table is still written and
    the report says why the overlays were skipped.
    """
    if overlays < 0:
        raise ValueError(f"overlays must be >= 0, got {overlays}")
    table, ok_ids = _evaluate(runs, split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table["overlays"] = _write_overlays(table, ok_ids, out, overlays)
    if not cv2.imwrite(str(out / "sweep.png"), draw_sweep(table)):
        raise OSError(f"could not write {out / 'sweep.png'}")
    (out / "report.md").write_text(render_markdown(table), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(table, indent=2, allow_nan=False) + "\n",
                                     encoding="utf-8")
    (out / "report.html").write_text(render_html(table), encoding="utf-8")
    return table


def main(argv: list[str] | None = None) -> int:
    """``embcam report DIR [DIR ...] --out OUT [--overlays N] [--split S]``."""
    parser = argparse.ArgumentParser(
        prog="embcam report",
        description="Evaluation report (paper Table 1, threshold sweep, overlays) over "
                    "result directories of embcam explain runs.")
    parser.add_argument("runs", nargs="+", metavar="DIR", help="run directory (results/ + "
                        "summary.json); runs with the same proxy mode are averaged")
    parser.add_argument("--out", required=True, help="folder for report.md/json/html")
    parser.add_argument("--overlays", type=int, default=24, metavar="N",
                        help="overlay images per method (first N image_ids, sorted); 0: none")
    parser.add_argument("--split", help="only rows of this split (results column split)")
    args = parser.parse_args(argv)
    try:
        table = write_report(args.runs, args.out, overlays=args.overlays, split=args.split)
    except (ValueError, OSError) as e:
        parser.exit(2, f"embcam report: error: {e}\n")
    print(render_markdown(table))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
