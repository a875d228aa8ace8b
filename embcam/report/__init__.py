"""The report over explain runs: a catalog report for any run, and the paper's Table 1
where annotations exist.

A run is a directory written by the explain job: ``RUN/results/*.parquet`` (one row per
image, schema ``results``) and ``RUN/summary.json`` (its ``config`` names the proxy mode,
the model, ``top_k_channels``, the ``manifest`` and the ``image_root``); a local folder or a
URI read through pyarrow.fs (``s3://bucket/run?endpoint_override=...``). The report shows
every uri with its secrets redacted (``embcam.data.locations.redact``).

Catalog (every run; ``catalog`` module)
---------------------------------------
Per label: images, errors, mean cosine to the proxy; when some cosine stands out (more than
``catalog.STANDOUT_GAP`` below the run's median), a gallery of those of the labels whose
lowest cosine is lowest (mislabelling candidates); with boxes, the images whose heat mass
falls mostly outside the box (only those); histograms of the cosine and of
the heat spread. It reads only the columns it needs, streams the heatmap column once for
the spread histogram, and draws only the gallery images.

Table 1 (only when some run has a box or a mask; docs/design.md §7, paper Table 1)
------------------------------------------------------------------------------------
Runs are grouped into *methods* by their proxy mode (config ``proxy``; the results'
``proxy_kind`` when the config has none); the runs of one method are independently
trained models.

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
* MaxBoxAccV2 and PxAP (Choe et al., CVPR 2020; ``embcam.wsol``, docs/design.md §7): per run
  the sum of the counters the job stored in each results file's metadata (a file without
  them: measured from its stored heatmaps, boxes and masks, read again in a stream);
  degenerate maps count (as incorrect / as H = 0); then mean ± std across runs.
  ``--no-wsol`` leaves them out.

``table1`` returns a JSON-ready dict (every number with its n); ``render_markdown``
prints it. ``write_report`` writes ``report.md``, ``report.json`` and ``report.html``,
``gallery/<k>-<run>/<image>.png`` and ``histograms/<k>-{cosine,spread}.png`` per run (and for
a run made with ``explain --pairs`` its pairs section, ``pairs`` module:
``pairs/<k>-<run>/<n>-{query,match}-<image>.png``), and
with annotations ``sweep.png`` (accuracy vs t) and ``overlays/<method>/<image>.png``. A run
checked by ``embcam sanity`` (``RUN/sanity/sanity.json``) gets a "Sanity and faithfulness"
section after Table 1, its plots copied to ``sanity/<k>-<run>/``.
Overlays show [image | heatmap] with the ground-truth box in green and the predicted box
in red (``embcam.results.overlay``).

Package layout: ``runs`` reads and checks a run for Table 1, ``table`` computes its
numbers, ``catalog`` the catalog's, ``render`` writes Markdown/HTML, ``plot`` draws the
sweep and the histograms, ``overlays`` the overlay images; this module writes the report
files and is the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

from embcam.arguments import OneLineParser, error_line
from embcam.data.locations import location_name, redact, safe_name
from embcam.data.runstate import SANITY, RunFolder
from embcam.report.catalog import catalog
from embcam.report.overlays import write_catalog_images, write_overlays
from embcam.report.pairs import has_pairs, pairs_section
from embcam.report.plot import draw_histogram, draw_sweep, write_plot
from embcam.report.render import render_html, render_markdown, render_report_html, render_report_markdown
from embcam.report.runs import OPTIONAL_COLUMNS, RATIO_COLUMNS, REQUIRED_COLUMNS, check_distinct, read_summary
from embcam.report.table import METHOD_NAMES, REGIONS, STD_NOTE, evaluate, table1
from embcam.results import overlay_panel

__all__ = ["table1", "catalog", "render_markdown", "render_html", "render_report_markdown",
           "render_report_html", "draw_sweep", "overlay_panel", "write_report", "main",
           "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "RATIO_COLUMNS", "REGIONS", "METHOD_NAMES",
           "STD_NOTE"]

HISTOGRAM_TITLES = {"cosine": "cosine to the proxy", "spread": "heat spread (normalised entropy)"}
NO_ANNOTATIONS = "not shown: no run has a box or a mask (it measures heat against them)"


def write_report(runs: list[str], out_dir: str, *, overlays: int = 24, split: str | None = None,
                 allow_partial: bool = False, per_label: int = 4, labels: int = 12,
                 outside: int = 12, spread: bool = True, pairs_shown: int = 24, wsol: bool = True) -> dict:
    """Write report.md, report.json, report.html and their images into ``out_dir``.

    Returns the report: ``catalog`` (one ``catalog.catalog`` entry per run, its images
    with their ``file``), ``table1`` (the ``table1`` dict with an ``overlays`` entry, or
    None without annotations) and ``table1_note``. When the manifest or the images cannot
    be reached the numbers are still written and the report says why images are missing.
    ``wsol=False``: Table 1 without MaxBoxAccV2 and PxAP (``embcam.wsol``: the counters the
    job stored, summed; results files without them have every heatmap and mask read again,
    3-18 ms per image on one core; BENCHMARKS.md §1).
    """
    if overlays < 0:
        raise ValueError(f"overlays must be >= 0, got {overlays}")
    if pairs_shown < 0:
        raise ValueError(f"pairs shown must be >= 0, got {pairs_shown}")
    check_distinct(runs)
    out = Path(out_dir)
    entries = [catalog(run, read_summary(run, allow_partial), split=split, per_label=per_label,
                       labels=labels, outside=outside, spread=spread) for run in runs]
    out.mkdir(parents=True, exist_ok=True)
    for k, entry in enumerate(entries):
        folder = f"{k}-{_folder_name(entry['run'])}"
        write_catalog_images(entry, out, f"gallery/{folder}")
        for name, hist in entry["histograms"].items():
            if hist and hist.get("counts"):
                hist["file"] = f"histograms/{folder}-{name}.png"
                title = f"{HISTOGRAM_TITLES[name]}: {redact(entry['run'])}"
                write_plot(out / hist["file"], draw_histogram(hist, title))
    annotated = any(e["counts"]["with_box"] or e["counts"]["with_mask"] for e in entries)
    report = {"split": split, "catalog": entries, "table1": None,
              "table1_note": None if annotated else NO_ANNOTATIONS,
              "pairs": [pairs_section(run, out, f"pairs/{k}-{_folder_name(run)}",
                                      shown=pairs_shown, split=split)
                        for k, run in enumerate(runs) if has_pairs(run)]}
    report["sanity"] = [entry for k, run in enumerate(runs) if (entry := sanity_section(
        run, out, f"sanity/{k}-{_folder_name(run)}")) is not None]
    if annotated:
        table, ok_ids = evaluate(runs, split, allow_partial, wsol=wsol)
        table["overlays"] = write_overlays(table, ok_ids, out, overlays)
        write_plot(out / "sweep.png", draw_sweep(table))
        report["table1"] = table
    report = _redacted(report)
    (out / "report.md").write_text(render_report_markdown(report), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n",
                                     encoding="utf-8")
    (out / "report.html").write_text(render_report_html(report), encoding="utf-8")
    return report


def _folder_name(run: str) -> str:
    """A file-name-safe name for a run's images: the last name of its path (no query)."""
    return safe_name(location_name(run) or "run")


def _redacted(value):
    """``value`` (the JSON-ready report) with the secrets of every uri in its strings redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def sanity_section(run: str, out: Path, folder: str) -> dict | None:
    """The run's sanity check (``embcam sanity``: RUN/sanity/sanity.json) without its per-image
    values, its plots copied to ``out/folder``; None when the run has none."""
    source = RunFolder(run)
    path = source.join(SANITY, "sanity.json")
    try:
        saved = source.read_json(SANITY, "sanity.json")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"run {run}: {path} is not valid JSON ({e})") from None
    if saved is None:
        return None
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict) for k in ("randomisation", "deletion")):
        raise ValueError(f"run {run}: {path} must hold an object with 'randomisation' and 'deletion' objects")
    if saved.get("run_id") != (source.identity or {}).get("run_id"):
        return None  # the check of an earlier run that --out held (--overwrite removes it; --out DIR kept it)
    entry = {k: v for k, v in saved.items() if k not in ("per_image", "files")}
    entry["run"], entry["files"] = run, {}
    for name in ("cascade", "deletion", "insertion"):  # fixed names: nothing read from the file picks a path
        if source.exists(SANITY, f"{name}.png"):
            (out / folder).mkdir(parents=True, exist_ok=True)
            with source.fs.open_input_stream(source.join(SANITY, f"{name}.png")) as plot:
                (out / folder / f"{name}.png").write_bytes(plot.read())
            entry["files"][name] = f"{folder}/{name}.png"
    return entry


def main(argv: list[str] | None = None) -> int:
    """``embcam report DIR [DIR ...] --out OUT [options]``."""
    parser = OneLineParser(
        prog="embcam report",
        description="Report over result directories of embcam explain runs: per run, a catalog "
                    "report (per label counts and cosines, the lowest-cosine images per label, "
                    "heat outside the box, histograms); where boxes or masks exist, the paper's "
                    "Table 1, a threshold sweep and overlays.")
    parser.add_argument("runs", nargs="+", metavar="DIR", help="run directory (results/ + "
                        "summary.json); runs with the same proxy mode are averaged in Table 1")
    parser.add_argument("--out", required=True, help="folder for report.md/json/html and images")
    parser.add_argument("--gallery", type=int, default=4, metavar="N",
                        help="lowest-cosine images drawn per label, of those whose cosine stands out: more "
                             "than 0.05 below the run's median (default 4)")
    parser.add_argument("--gallery-labels", type=int, default=12, metavar="L",
                        help="labels in the gallery: those whose lowest cosine is lowest (default 12)")
    parser.add_argument("--outside", type=int, default=12, metavar="N",
                        help="images with most heat outside their box (ratio_bbox < 0.5) drawn, lowest "
                             "first (runs with boxes; default 12)")
    parser.add_argument("--no-spread", action="store_true",
                        help="skip the heat-spread histogram: then no heatmap is read except "
                             "the drawn images' (very large runs)")
    parser.add_argument("--overlays", type=int, default=24, metavar="N",
                        help="Table 1 overlay images per method (first N image_ids, sorted); 0: none")
    parser.add_argument("--split", help="only rows of this split (results column split)")
    parser.add_argument("--pairs-shown", type=int, default=24, metavar="N",
                        help="runs made with explain --pairs: the N pairs with the lowest cosine drawn, "
                             "query and match side by side with their heatmaps (default 24)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="report on unfinished runs too (labelled UNFINISHED) instead of refusing them")
    parser.add_argument("--print", "--markdown", dest="markdown", action="store_true",
                        help="print the report's Markdown on stdout (default: a line saying where report.html is)")
    parser.add_argument("--no-wsol", action="store_true",
                        help="Table 1 without MaxBoxAccV2 and PxAP (Choe et al. 2020): for results written "
                             "before the job stored their counters they read every heatmap and mask again "
                             "(milliseconds per image: minutes to hours for millions of rows)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.runs, args.out, overlays=args.overlays, split=args.split,
                              allow_partial=args.allow_partial, per_label=args.gallery,
                              labels=args.gallery_labels, outside=args.outside,
                              spread=not args.no_spread, pairs_shown=args.pairs_shown, wsol=not args.no_wsol)
    except (ValueError, OSError) as e:
        parser.exit(2, f"embcam report: error: {error_line(e)}\n")
    if args.markdown:
        print(render_report_markdown(report))
    else:
        print(where(args.out, len(args.runs)))
    return 0


def where(out: str, runs: int) -> str:
    """The line that says where a written report is."""
    page = Path(out).resolve() / "report.html"
    return (f"embcam report: {runs} run{'s' if runs != 1 else ''} -> {page} (open it in a browser; "
            "report.md and report.json beside it)")
