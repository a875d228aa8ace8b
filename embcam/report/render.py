"""Markdown and HTML renderings of a ``table1`` dict (plus its ``overlays`` entry)."""

from __future__ import annotations

import html

from embcam.metrics import DEFAULT_THRESHOLD, LOC_IOU, THRESHOLDS
from embcam.report.table import REGIONS, STD_NOTE


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
        run = r["run"] + (f" (UNFINISHED: {r['unfinished']})" if r.get("unfinished") else "")
        rows.append([run, r["method"], str(r["model"] or "—"),
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
    unfinished = [r["run"] for r in table["runs"] if r.get("unfinished")]
    if unfinished:
        notes.append(f"UNFINISHED run(s) {', '.join(unfinished)}: their numbers cover only the rows "
                     "done so far, not the whole manifest.")
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
