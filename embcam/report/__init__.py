"""Evaluation report over explain runs: the paper's Table 1, a threshold sweep, overlays.

A run is a directory written by the explain job: ``RUN/results/*.parquet`` (one row per
image, schema ``results``) and ``RUN/summary.json`` (its ``config`` names the proxy mode,
the model, ``top_k_channels``, the ``manifest`` and the ``image_root``). Runs are grouped
into *methods* by their proxy mode (config ``proxy``; the results' ``proxy_kind`` when
the config has none); the runs of one method are independently trained models.

Protocol (docs/design.md §7, paper Table 1)
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

Package layout: ``runs`` reads and checks a run, ``table`` computes the Table 1
numbers, ``render`` writes Markdown/HTML, ``plot`` draws the sweep, ``overlays`` draws
the overlay images; this module writes the report files and is the CLI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2

from embcam.report.overlays import overlay_panel, write_overlays
from embcam.report.plot import draw_sweep
from embcam.report.render import render_html, render_markdown
from embcam.report.runs import OPTIONAL_COLUMNS, RATIO_COLUMNS, REQUIRED_COLUMNS
from embcam.report.table import METHOD_NAMES, REGIONS, STD_NOTE, evaluate, table1

__all__ = ["table1", "render_markdown", "render_html", "draw_sweep", "overlay_panel",
           "write_report", "main", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "RATIO_COLUMNS",
           "REGIONS", "METHOD_NAMES", "STD_NOTE"]


def write_report(runs: list[str], out_dir: str, *, overlays: int = 24,
                 split: str | None = None, allow_partial: bool = False) -> dict:
    """Write report.md, report.json, report.html, sweep.png and overlays/ into ``out_dir``.

    Returns the ``table1`` dict with an ``overlays`` entry: ``written``, ``skipped``
    (reason, or None), ``failed`` (per image), ``images`` (file, caption, values).
    When the manifest or the images cannot be reached the table is still written and
    the report says why the overlays were skipped.
    """
    if overlays < 0:
        raise ValueError(f"overlays must be >= 0, got {overlays}")
    table, ok_ids = evaluate(runs, split, allow_partial)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table["overlays"] = write_overlays(table, ok_ids, out, overlays)
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
    parser.add_argument("--allow-partial", action="store_true",
                        help="report on unfinished runs too (labelled UNFINISHED) instead of refusing them")
    args = parser.parse_args(argv)
    try:
        table = write_report(args.runs, args.out, overlays=args.overlays, split=args.split,
                             allow_partial=args.allow_partial)
    except (ValueError, OSError) as e:
        parser.exit(2, f"embcam report: error: {e}\n")
    print(render_markdown(table))
    return 0

