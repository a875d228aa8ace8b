"""The catalog report of one run, annotated or not: per label counts and cosines, the
images to look at, and histograms.

* Per label: images, errors, and the mean ``cosine`` to the label's proxy over the ok rows
  (the cosine of the image's normalised embedding with the proxy it was explained
  against; 1 for every image under the self proxy).
* Gallery: the images whose cosine stands out, more than ``STANDOUT_GAP`` below the run's
  median cosine: of the labels whose lowest cosine is lowest, each label's lowest-cosine
  ones: candidates for mislabelling or off-brand products. None stands out: no gallery.
* With boxes: the images whose heat mass falls mostly outside the box (``ratio_bbox``
  below one half), lowest first.
* Warnings first: a run whose checkpoint did not fit its model (``--allow-partial-checkpoint``).
* Histograms of the cosine and of the heat spread (``embcam.results.SPREAD_MEASURE``,
  computed from the stored heatmaps).

Scale: the run is read through ``embcam.results.open_results`` with only the columns
below; the heatmap column alone is streamed once, in batches, for the spread histogram
(``spread=False`` skips it); whole rows are read only for the gallery images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from embcam.boxes import is_null
from embcam.checkpoints import CheckpointLoad
from embcam.data.schemas import ERROR, OK, STATUSES
from embcam.results import SPREAD_MEASURE, open_results, results_schema, spreads

COLUMNS = ("image_id", "label", "split", "status", "error", "cosine", "degenerate",
           "ratio_bbox", "uniform_bbox", "uniform_mask")
BINS = 20
MOSTLY_OUTSIDE = 0.5  # ratio_bbox below this: most of the heat mass lies outside the box
STANDOUT_GAP = 0.05  # a cosine this far below the run's median stands out (a mislabelling candidate)
ERROR_EXAMPLES = 20
SPREAD_BATCH_ROWS = 65536


def catalog(run: str, summary: dict, *, split: str | None = None, per_label: int = 4,
            labels: int = 12, outside: int = 12, spread: bool = True) -> dict:
    """The catalog numbers of one run and the image_ids its galleries show (JSON-ready).

    ``per_label``: gallery images per label; ``labels``: labels in the gallery; ``outside``:
    images in the outside-the-box gallery; ``spread``: stream the heatmaps for the spread
    histogram.
    """
    for name, value in (("per_label", per_label), ("labels", labels), ("outside", outside)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    schema = results_schema(run)  # one footer read, shared by the two scans
    frame = read_frame(run, split, schema)
    ok = frame["status"] == OK
    cosine = frame["cosine"].where(ok)
    ranked = (frame.assign(_cosine=cosine).dropna(subset=["_cosine"])
              .sort_values(["_cosine", "image_id"], kind="stable"))
    config = summary.get("config", {})
    return {
        "run": run,
        "proxy": config.get("proxy"),
        "model": config.get("model") or summary.get("model"),
        "unfinished": summary.get("unfinished"),
        "warnings": run_warnings(summary),
        "split": split,
        "counts": _counts(frame, ok),
        "labels": _label_table(frame, ok, cosine, ranked),
        "errors": _errors(frame[~ok]),
        "gallery": _gallery(ranked, per_label, labels, cosine.median()),
        "outside_box": _outside_box(frame, ok, outside),
        "histograms": {"cosine": _histogram(cosine.dropna().to_numpy(), None),
                       "spread": _spread_histogram(run, split, schema) if spread else
                       {"measure": SPREAD_MEASURE, "skipped": "not requested (--no-spread)"}},
    }


def run_warnings(summary: dict) -> list[str]:
    """What the report must say before the run's numbers: a checkpoint that did not fit the
    model (a run with --allow-partial-checkpoint)."""
    fit = summary.get("checkpoint")
    return [CheckpointLoad.from_json(fit).warning()] if isinstance(fit, dict) and fit.get("partial") else []


def read_frame(run: str, split: str | None, schema: pa.Schema | None = None) -> pd.DataFrame:
    """The catalog columns of a run (absent ones as nulls), checked, as a DataFrame.
    ``schema``: the run's ``results_schema`` when the caller has it."""
    schema = results_schema(run) if schema is None else schema
    present = [c for c in COLUMNS if c in schema.names]
    for required in ("image_id", "status"):
        if required not in present:
            raise ValueError(f"run {run}: results lack column {required}")
    table = open_results(run, columns=present, filter=_split_filter(run, schema, split)).to_table()
    if split is not None and table.num_rows == 0:
        raise ValueError(f"run {run}: no result rows of split {split!r}")
    frame = table.to_pandas()
    for name in COLUMNS:
        if name not in frame:
            frame[name] = None
    frame["cosine"] = frame["cosine"].astype(np.float64)
    frame["ratio_bbox"] = frame["ratio_bbox"].astype(np.float64)
    if frame["image_id"].isna().any():
        raise ValueError(f"run {run}: results have a null image_id")
    duplicated = frame["image_id"][frame["image_id"].duplicated()]
    if len(duplicated):
        raise ValueError(f"run {run}: image_id {duplicated.iloc[0]!r} appears more than once in "
                         "results (duplicate rows from a re-run?)")
    unknown = ~frame["status"].isin(STATUSES)
    if unknown.any():
        i = int(np.argmax(unknown.to_numpy()))
        raise ValueError(f"run {run}: row image_id {frame['image_id'].iloc[i]!r} has status "
                         f"{frame['status'].iloc[i]!r} (expected {OK!r} or {ERROR!r})")
    return frame


def _split_filter(run: str, schema: pa.Schema, split: str | None):
    if split is None:
        return None
    if "split" not in schema.names:
        raise ValueError(f"run {run}: results have no split column (asked for split {split!r})")
    return pc.field("split") == split


def _counts(frame: pd.DataFrame, ok: pd.Series) -> dict:
    degenerate = ok & (frame["degenerate"] == True)  # noqa: E712 - a column of True/False/None
    return {"images": int(len(frame)), "ok": int(ok.sum()), "error": int((~ok).sum()),
            "degenerate": int(degenerate.sum()),
            "with_box": int((ok & frame["uniform_bbox"].notna()).sum()),
            "with_mask": int((ok & frame["uniform_mask"].notna()).sum())}


def _label(value):
    return None if is_null(value) else str(value)


def _label_table(frame: pd.DataFrame, ok: pd.Series, cosine: pd.Series,
                 ranked: pd.DataFrame) -> list[dict]:
    """One entry per label (None: rows without a label), lowest mean cosine first."""
    groups = frame.assign(_ok=ok, _error=~ok, _cosine=cosine).groupby("label", dropna=False, sort=False)
    stats = groups.agg(images=("image_id", "size"), ok=("_ok", "sum"), errors=("_error", "sum"),
                       mean_cosine=("_cosine", "mean"))
    lowest = ranked.groupby("label", dropna=False, sort=False).head(1).set_index("label")
    out = []
    for label, s in stats.iterrows():
        low = lowest.loc[label] if label in lowest.index else None
        out.append({"label": _label(label), "images": int(s["images"]), "ok": int(s["ok"]),
                    "errors": int(s["errors"]),
                    "mean_cosine": None if np.isnan(s["mean_cosine"]) else float(s["mean_cosine"]),
                    "lowest_cosine": None if low is None else float(low["_cosine"]),
                    "lowest_image_id": None if low is None else str(low["image_id"])})
    out.sort(key=lambda e: (e["mean_cosine"] is None, e["mean_cosine"] or 0.0, e["label"] is None,
                            e["label"] or ""))
    return out


def _errors(failed: pd.DataFrame) -> dict:
    """How many rows failed, by step (the text before the first colon), and the first few."""
    reasons = failed["error"].fillna("(no reason)").astype(str)
    steps = reasons.str.split(":", n=1).str[0].value_counts()
    first = failed.assign(error=reasons).sort_values("image_id").head(ERROR_EXAMPLES)
    return {"count": int(len(failed)),
            "by_step": {str(k): int(v) for k, v in sorted(steps.items())},
            "examples": [{"image_id": str(r.image_id), "label": _label(r.label), "error": r.error}
                         for r in first.itertuples()]}


def _gallery(ranked: pd.DataFrame, per_label: int, labels: int, median: float) -> dict:
    """Of the ok images whose cosine stands out (more than ``STANDOUT_GAP`` below ``median``),
    the ``per_label`` lowest-cosine ones of the ``labels`` labels whose lowest cosine is
    lowest (ties by image_id)."""
    choice = (f"the {per_label} lowest-cosine images of each of up to {labels} labels, those "
              "whose lowest cosine is lowest")
    if ranked.empty:
        return {"choice": choice, "images": [], "standing_out": 0, "skipped": "no ok row has a cosine"}
    rule = (f"a cosine stands out when it is more than {STANDOUT_GAP:g} below the run's median cosine "
            f"({median:.3f})")
    ranked = ranked[ranked["_cosine"] < median - STANDOUT_GAP]
    entry = {"choice": f"{choice}, among those whose cosine stands out", "rule": rule, "images": [],
             "standing_out": int(len(ranked)), "skipped": None}
    if ranked.empty:
        return dict(entry, skipped=f"no cosine stands out ({rule})")
    if not per_label or not labels:
        return dict(entry, skipped="not requested (--gallery 0)")
    chosen = list(ranked.groupby("label", dropna=False, sort=False).head(1)["label"])[:labels]
    images = []
    for label in chosen:
        rows = ranked[ranked["label"].isna()] if _label(label) is None else ranked[ranked["label"] == label]
        images += [_pick(r, "cosine") for r in rows.head(per_label).itertuples()]
    return dict(entry, images=images)


def _outside_box(frame: pd.DataFrame, ok: pd.Series, count: int) -> dict | None:
    """Up to ``count`` of the ok rows with most heat outside their box (ratio_bbox below
    ``MOSTLY_OUTSIDE``), lowest ratio_bbox first; None when no row has a ratio_bbox."""
    scored = frame[ok & frame["ratio_bbox"].notna()]
    if scored.empty:
        return None
    outside = scored[scored["ratio_bbox"] < MOSTLY_OUTSIDE]
    lowest = outside.sort_values(["ratio_bbox", "image_id"], kind="stable").head(count)
    return {"choice": f"up to {count} of them, lowest ratio_bbox first",
            "scored": int(len(scored)),
            "mostly_outside": int(len(outside)),
            "threshold": MOSTLY_OUTSIDE,
            "images": [_pick(r, "ratio_bbox") for r in lowest.itertuples()],
            "skipped": None if count else "not requested (--outside 0)"}


def _pick(row, by: str) -> dict:
    return {"image_id": str(row.image_id), "label": _label(row.label),
            "cosine": None if np.isnan(row.cosine) else float(row.cosine),
            "ratio_bbox": None if np.isnan(row.ratio_bbox) else float(row.ratio_bbox), "by": by}


def _histogram(values: np.ndarray, value_range: tuple[float, float] | None) -> dict | None:
    """``BINS`` equal bins over ``value_range`` (default: the values' own range)."""
    if values.size == 0:
        return None
    counts, edges = np.histogram(values, bins=BINS, range=value_range)
    return {"n": int(values.size), "edges": [float(e) for e in edges],
            "counts": [int(c) for c in counts]}


def _spread_histogram(run: str, split: str | None, schema: pa.Schema) -> dict:
    """The spread of every ok, non-degenerate heatmap, read in batches of the heatmap column."""
    entry = {"measure": SPREAD_MEASURE, "skipped": None}
    missing = [c for c in ("heatmap", "degenerate") if c not in schema.names]
    if missing:
        return dict(entry, skipped=f"results have no {', '.join(missing)} column")
    where = (pc.field("status") == OK) & (pc.field("degenerate") == False)  # noqa: E712
    if split is not None:
        where &= _split_filter(run, schema, split)
    values, undefined = [], 0
    for batch in open_results(run, columns=["heatmap"], filter=where).to_batches(
            columns=["heatmap"], batch_size=SPREAD_BATCH_ROWS):
        maps = batch.column("heatmap").drop_null()
        lengths = pc.list_value_length(maps).to_numpy(zero_copy_only=False)
        keep = lengths > 0
        if not keep.all():
            maps, lengths = maps.filter(pa.array(keep)), lengths[keep]
        flat = pc.list_flatten(maps).to_numpy(zero_copy_only=False).astype(np.float64)
        s = spreads(flat, lengths)
        undefined += int(np.isnan(s).sum())
        values.append(s[~np.isnan(s)])
    hist = _histogram(np.concatenate(values) if values else np.zeros(0), (0.0, 1.0))
    return dict(entry, **(hist or {"n": 0}), undefined=undefined)
