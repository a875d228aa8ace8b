"""Markdown and HTML renderings: of a ``table1`` dict (plus its ``overlays`` entry), and of a
whole report (the catalog of each run, then Table 1 where annotations exist).

Every value that comes from the data (image ids, labels, error messages, run paths) is
escaped in the HTML (``html.escape``, quotes included) and has ``|`` escaped and line
breaks removed in Markdown tables."""

from __future__ import annotations

import html

from embcam.metrics import DEFAULT_THRESHOLD, LOC_IOU, THRESHOLDS
from embcam.report.catalog import MOSTLY_OUTSIDE
from embcam.report.markup import html_table, md_cell, md_table, num
from embcam.report.overlays import OVERLAY_TILE
from embcam.report.pairs import pairs_html, pairs_markdown
from embcam.report.table import REGIONS, STD_NOTE
from embcam.results import SPREAD_MEASURE

MAX_LABEL_ROWS = 100  # label rows shown in Markdown/HTML (all are in report.json)


def _fmt(stat: dict, n_runs: int, suffix: str = "") -> str:
    if stat["mean"] is None:
        return "—"
    cell = f"{stat['mean']:.3f} ± {stat['std']:.3f}"
    if stat["n_runs"] != n_runs:
        cell += f" (n={stat['n_runs']})"
    return cell + suffix


def _has_wsol(table: dict) -> bool:
    return table["protocol"].get("wsol") is not None


def _table1_rows(table: dict) -> tuple[list[str], list[list[str]]]:
    k = table["top_k"]
    wsol = _has_wsol(table)
    header = ["Method", "Region", "Uniform", "All channels",
              f"Top-{k} channels" if k is not None else "Top-k channels",
              f"Accuracy (IoU ≥ {LOC_IOU:g}, t = {DEFAULT_THRESHOLD:g})",
              *(["MaxBoxAccV2 (BBox) / PxAP (Mask)"] if wsol else []), "Runs"]
    rows = []
    for m in table["methods"]:
        n = m["n_runs"]
        k_note = f" (k={m['top_k']})" if k is None and m["top_k"] is not None else ""
        for i, (region, label) in enumerate(REGIONS.items()):
            cells = m["rows"][region]
            extra = []
            if wsol:
                w = m.get("wsol")
                extra = ["—" if w is None else _fmt(w["maxboxacc_v2" if region == "bbox" else "pxap"], n)]
            rows.append([m["name"] if i == 0 else "", label, _fmt(cells["uniform"], n),
                         _fmt(cells["all"], n),
                         _fmt(cells["topk"], n, k_note if cells["topk"]["mean"] is not None
                              else ""),
                         _fmt(m["accuracy"], n) if region == "bbox" else "", *extra,
                         str(n) if i == 0 else ""])
    return header, rows


def _wsol_rows(table: dict) -> tuple[list[str], list[list[str]]]:
    deltas = table["protocol"]["wsol_iou_thresholds"]
    header = ["Method", *(f"BoxAcc (IoU ≥ {d:g}, best τ)" for d in deltas), "MaxBoxAccV2", "PxAP",
              "Best τ per run (" + " / ".join(f"{d:g}" for d in deltas) + ")"]
    rows = []
    for m in table["methods"]:
        w, n = m.get("wsol"), m["n_runs"]
        if w is None:
            rows.append([m["name"], *["—"] * (len(deltas) + 3)])
            continue
        best = zip(*(p["best_threshold"] for p in w["per_iou"]))
        rows.append([m["name"], *(_fmt(p["accuracy"], n) for p in w["per_iou"]),
                     _fmt(w["maxboxacc_v2"], n), _fmt(w["pxap"], n),
                     "; ".join(" / ".join(f"{t:g}" for t in run) for run in best) or "—"])
    return header, rows


def _wsol_notes(table: dict) -> list[str]:
    notes = [f"Protocol: {table['protocol']['wsol']}",
             "Fractions (the paper prints percentages). Not the paper's CUB figures: see BENCHMARKS.md §1 for "
             "what compares."]
    degenerate = sum(sum(m["wsol"]["degenerate"]) for m in table["methods"] if m.get("wsol"))
    if degenerate:
        notes.append(f"{degenerate} degenerate map(s) counted as incorrect (boxes) and as H = 0 (PxAP).")
    for r in table["runs"]:
        if r.get("wsol_skipped") and r["wsol_skipped"] != "not requested":
            notes.append(f"Run {r['run']}: no MaxBoxAccV2 or PxAP ({r['wsol_skipped']}).")
    for r in table["runs"]:
        files = (r.get("wsol") or {}).get("files")
        if files and files["measured"]:
            notes.append(f"Run {r['run']}: {files['measured']} of its {files['results']} results file(s) "
                         "carry no WSOL counters (written before results contract version 3): their MaxBoxAccV2 "
                         "and PxAP were computed now from the stored heatmaps, a few ms per image.")
    unreadable = [r for r in table["runs"] if r.get("wsol") and r["wsol"]["pxap"]["masks_unreadable"]]
    for r in unreadable:
        p = r["wsol"]["pxap"]
        notes.append(f"Run {r['run']}: {p['masks_unreadable']} mask(s) could not be read now and are left out "
                     f"of its PxAP (first: {p['mask_error']}).")
    return notes


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
    for m in table["methods"]:
        if m.get("top_k_only"):
            notes.append(f"{m['name']}: its only heatmap is the top-{m['top_k']} map (channel weights "
                         "transferred from the nearest training image), so All channels is — and its "
                         "accuracy and threshold sweep are of that top-k map.")
    unfinished = [r["run"] for r in table["runs"] if r.get("unfinished")]
    if unfinished:
        notes.append(f"UNFINISHED run(s) {', '.join(unfinished)}: their numbers cover only the rows "
                     "done so far, not the whole manifest.")
    if table["split"] is not None:
        notes.append(f"Only rows of split {table['split']!r}.")
    return notes


def _figures(images: list[dict]) -> str:
    """A grid of the images that were drawn (``file``), with their captions, each shown at the
    size it was drawn (``OVERLAY_TILE``): nothing rescales them, and every cell is the same."""
    esc = html.escape
    figures = [f"<figure><img src='{esc(i['file'])}' alt='{esc(i['image_id'])}' "
               f"width='{2 * OVERLAY_TILE}' height='{OVERLAY_TILE}'>"
               f"<figcaption>{esc(i['caption'])}</figcaption></figure>" for i in images if i.get("file")]
    return "<div class='grid'>" + "".join(figures) + "</div>" if figures else ""


# --- Table 1 ---------------------------------------------------------------------------------


def _sweep_title(table: dict) -> str:
    which = "all channels"
    if any(m.get("top_k_only") for m in table["methods"]):
        which += "; a top-k-only method: its top-k map"
    return f"Localisation accuracy over thresholds t ({which})"


WSOL_TITLE = "MaxBoxAccV2 and PxAP (Choe et al. 2020)"


def _table1_markdown(table: dict) -> list[str]:
    parts = ["## Table 1: mean heatmap ratio and localisation accuracy", "",
             md_table(*_table1_rows(table)), "", *_notes(table), "",
             f"## {_sweep_title(table)}", "",
             md_table(*_sweep_rows(table)), "",
             f"Accuracy = fraction of images with IoU ≥ {LOC_IOU:g}. "
             f"Best over t: {table['protocol']['best_over_t']}.", ""]
    if _has_wsol(table):
        parts += [f"## {WSOL_TITLE}", "", md_table(*_wsol_rows(table)), "",
                  *(p for n in _wsol_notes(table) for p in (md_cell(n), ""))]
    parts += ["## Runs", "", md_table(*_runs_rows(table)), ""]
    overlays = table.get("overlays")
    if overlays is not None:
        parts += ["## Overlays", "", _overlay_note(overlays), ""]
    return parts


def render_markdown(table: dict) -> str:
    """Markdown of a ``table1`` dict: Table 1, the threshold sweep, per-run counts."""
    return "\n".join(["# embcam evaluation report", "", *_table1_markdown(table)])


def _overlay_note(overlays: dict) -> str:
    if overlays["skipped"]:
        return f"Overlays skipped: {overlays['skipped']}"
    note = f"{overlays['written']} overlay image(s) in overlays/ (shown in report.html)."
    if overlays["failed"]:
        note += f" {len(overlays['failed'])} could not be drawn (see report.json)."
    return note


_STYLE = ("<style>body{font-family:sans-serif;margin:2em;color:#222}"
          "table{border-collapse:collapse;margin:1em 0}"
          "th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}"
          "td:first-child,th:first-child{text-align:left}"
          f".grid{{display:grid;gap:12px;grid-template-columns:repeat(auto-fill,{2 * OVERLAY_TILE}px)}}"
          "figure{margin:0}figure img{display:block}"
          "figcaption{font-size:12px;overflow-wrap:anywhere}</style>")


def _page(title: str, body: list[str]) -> str:
    esc = html.escape
    return "\n".join([f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
                      _STYLE, f"</head><body><h1>{esc(title)}</h1>", *body, "</body></html>"])


def _table1_html(table: dict) -> list[str]:
    esc = html.escape
    overlays = table.get("overlays") or {"skipped": "not requested", "images": [],
                                         "failed": [], "written": 0}
    return ["<h2>Table 1: mean heatmap ratio and localisation accuracy</h2>",
            html_table(*_table1_rows(table)),
            *(f"<p>{esc(n)}</p>" for n in _notes(table)),
            f"<h2>{html.escape(_sweep_title(table))}</h2>",
            "<img src='sweep.png' alt='accuracy versus threshold'>",
            html_table(*_sweep_rows(table)),
            f"<p>Best over t: {esc(table['protocol']['best_over_t'])}.</p>",
            *([f"<h2>{esc(WSOL_TITLE)}</h2>", html_table(*_wsol_rows(table)),
               *(f"<p>{esc(n)}</p>" for n in _wsol_notes(table))] if _has_wsol(table) else []),
            "<h2>Runs</h2>", html_table(*_runs_rows(table)),
            "<h2>Overlays</h2>",
            f"<p>{esc(_overlay_note(overlays))} Left: image; right: heatmap (min-max, "
            "JET) with the ground-truth box (green) and the predicted box at "
            f"t = {DEFAULT_THRESHOLD:g} (red).</p>",
            _figures(overlays["images"])]


def render_html(table: dict) -> str:
    """Self-contained HTML page of a ``table1`` dict (images are the PNGs next to it)."""
    return _page("embcam evaluation report", _table1_html(table))


# --- the catalog of one run ---------------------------------------------------------------


def _label_text(label) -> str:
    return "(no label)" if label is None else label


def _run_title(entry: dict) -> str:
    title = f"Run {entry['run']} (proxy {entry['proxy'] or '?'}, model {entry['model'] or '?'})"
    return title + (f" UNFINISHED: {entry['unfinished']}" if entry.get("unfinished") else "")


def _counts_text(entry: dict) -> str:
    c = entry["counts"]
    text = (f"{c['images']} images: {c['ok']} ok, {c['error']} error, {c['degenerate']} "
            f"degenerate; {c['with_box']} with a box, {c['with_mask']} with a mask.")
    return text + (f" Only rows of split {entry['split']!r}." if entry["split"] is not None else "")


def _label_rows(entry: dict) -> tuple[list[str], list[list[str]]]:
    header = ["Label", "Images", "Errors", "Mean cosine", "Lowest cosine", "Lowest image"]
    rows = [[_label_text(e["label"]), str(e["images"]), str(e["errors"]), num(e["mean_cosine"]),
             num(e["lowest_cosine"]), e["lowest_image_id"] or "—"]
            for e in entry["labels"][:MAX_LABEL_ROWS]]
    return header, rows


def _labels_note(entry: dict) -> str:
    note = ("Cosine: of the image's normalised embedding with the proxy it was explained "
            "against (its label's, for mean and bank proxies; 1 under the self proxy); "
            "the mean is over the ok rows. Lowest mean cosine first.")
    more = len(entry["labels"]) - MAX_LABEL_ROWS
    return note + (f" {more} more label(s) in report.json." if more > 0 else "")


def _pick_rows(images: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["Image", "Label", "Cosine", "Ratio bbox", "Overlay"]
    rows = [[i["image_id"], _label_text(i["label"]), num(i["cosine"]), num(i["ratio_bbox"]),
             i.get("file") or "—"] for i in images]
    return header, rows


def _has_candidates(gallery: dict) -> bool:
    """The candidates section is shown only when some cosine stands out (``catalog.STANDOUT_GAP``)."""
    return bool(gallery.get("standing_out"))


def _candidates_absent(gallery: dict) -> list[str]:
    """In place of the candidates section: one line saying why there is none."""
    return [] if _has_candidates(gallery) else [f"No mislabelling candidates: {gallery['skipped']}.", ""]


def _gallery_note(gallery: dict) -> str:
    if gallery.get("skipped"):
        return f"Gallery: {gallery['skipped']}."
    note = f"Shown: {gallery['choice']}."
    if gallery.get("rule"):
        note += f" {gallery['rule'][0].upper()}{gallery['rule'][1:]}; {gallery['standing_out']} do."
    if gallery.get("failed"):
        note += (f" {len(gallery['failed'])} could not be drawn (first: "
                 f"{gallery['failed'][0]['reason']}).")
    return note


def _outside_note(outside: dict | None) -> str:
    if outside is None:
        return "No row has a box: nothing to measure against."
    return (f"{outside['mostly_outside']} of {outside['scored']} scored images with a box have "
            f"less than {MOSTLY_OUTSIDE:g} of their heat mass inside it (ratio_bbox). "
            + _gallery_note(outside))


def _histogram_line(name: str, hist: dict | None) -> str:
    if hist is None:
        return f"{name}: no values."
    if hist.get("skipped"):
        return f"{name}: skipped ({hist['skipped']})."
    if not hist.get("n"):
        return f"{name}: no values."
    return (f"{name} (n = {hist['n']}, {len(hist['counts'])} bins from {hist['edges'][0]:.4g} "
            f"to {hist['edges'][-1]:.4g}): " + " ".join(map(str, hist["counts"])))


def _error_rows(entry: dict) -> tuple[list[str], list[list[str]]]:
    return (["Image", "Label", "Error"],
            [[e["image_id"], _label_text(e["label"]), e["error"]] for e in entry["errors"]["examples"]])


def _errors_note(entry: dict) -> str:
    errors = entry["errors"]
    steps = ", ".join(f"{k}: {v}" for k, v in errors["by_step"].items())
    return f"{errors['count']} error row(s) ({steps or 'none'}); the first by image_id:"


def _catalog_markdown(entry: dict) -> list[str]:
    hists = entry["histograms"]
    parts = [f"## {_run_title(entry)}", "", *[f"**{md_cell(w)}**\n" for w in entry.get("warnings", [])],
             _counts_text(entry), "",
             "### Labels", "", md_table(*_label_rows(entry)), "", _labels_note(entry), "",
             *_candidates_absent(entry["gallery"])]
    if _has_candidates(entry["gallery"]):
        parts += ["### Lowest cosine per label (mislabelling candidates)", "", _gallery_note(entry["gallery"]), ""]
        if entry["gallery"]["images"]:
            parts += [md_table(*_pick_rows(entry["gallery"]["images"])), ""]
    parts += ["### Heat mostly outside the box", "", _outside_note(entry["outside_box"]), ""]
    if entry["outside_box"] and entry["outside_box"]["images"]:
        parts += [md_table(*_pick_rows(entry["outside_box"]["images"])), ""]
    parts += ["### Histograms", "", _histogram_line("Cosine", hists["cosine"]), "",
              _histogram_line("Heat spread", hists["spread"]), "", f"Heat spread: {SPREAD_MEASURE}.", ""]
    if entry["errors"]["count"]:
        parts += ["### Errors", "", _errors_note(entry), "", md_table(*_error_rows(entry)), ""]
    return parts


def _histogram_html(name: str, hist: dict | None) -> str:
    esc = html.escape
    image = (f"<img src='{esc(hist['file'])}' alt='{esc(name)} histogram'>"
             if hist and hist.get("file") else "")
    return f"{image}<p>{esc(_histogram_line(name, hist))}</p>"


def _catalog_html(entry: dict) -> list[str]:
    esc = html.escape
    hists, outside = entry["histograms"], entry["outside_box"]
    parts = [f"<h2>{esc(_run_title(entry))}</h2>",
             *[f'<p class="warning"><strong>{esc(w)}</strong></p>' for w in entry.get("warnings", [])],
             f"<p>{esc(_counts_text(entry))}</p>",
             "<h3>Labels</h3>", html_table(*_label_rows(entry)), f"<p>{esc(_labels_note(entry))}</p>",
             *[f"<p>{esc(line)}</p>" for line in _candidates_absent(entry["gallery"]) if line]]
    if _has_candidates(entry["gallery"]):
        parts += ["<h3>Lowest cosine per label (mislabelling candidates)</h3>",
                  f"<p>{esc(_gallery_note(entry['gallery']))} Left: image; right: heatmap (min-max, "
                  "JET) with the predicted box (red) and the ground-truth box (green) when there is one.</p>",
                  _figures(entry["gallery"]["images"])]
    parts += ["<h3>Heat mostly outside the box</h3>", f"<p>{esc(_outside_note(outside))}</p>",
              _figures(outside["images"]) if outside else "",
              "<h3>Histograms</h3>", _histogram_html("Cosine", hists["cosine"]),
              _histogram_html("Heat spread", hists["spread"]), f"<p>Heat spread: {esc(SPREAD_MEASURE)}.</p>"]
    if entry["errors"]["count"]:
        parts += ["<h3>Errors</h3>", f"<p>{esc(_errors_note(entry))}</p>", html_table(*_error_rows(entry))]
    return parts


# --- sanity and faithfulness (embcam sanity) ----------------------------------------------------


def _value(value, digits: int = 3) -> str:
    """A number from a file as text ("—" for anything that is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    return f"{value:.{digits}f}"


def _share(value) -> str:
    return "—" if _value(value) == "—" else f"{value:.0%}"


def _mean_std(stat) -> str:
    stat = stat if isinstance(stat, dict) else {}
    if _value(stat.get("mean")) == "—":
        return "—"
    return f"{_value(stat.get('mean'))} ± {_value(stat.get('std'))}"


def _sanity_texts(entry: dict) -> dict:
    r, d = entry["randomisation"], entry["deletion"]
    ins = entry.get("insertion") if isinstance(entry.get("insertion"), dict) else {}  # older files have none
    steps = [s for s in r.get("steps") or [] if isinstance(s, dict)]
    methods = [m for m in (d.get("methods") or {}).values() if isinstance(m, dict)]
    verdict = str(r.get("verdict", "?")).upper()
    return {
        "title": f"Sanity and faithfulness: {entry['run']}",
        "intro": (f"{entry.get('images', '?')} images (proxy {entry.get('proxy', '?')}, model "
                  f"{entry.get('model', '?')}), written by embcam sanity."),
        "verdict": (f"Model randomisation (Adebayo et al. 2018): {verdict}, mean rho "
                    f"{_value(r.get('verdict_value'))} after randomising {r.get('verdict_step', '?')}; "
                    f"criterion: {r.get('criterion', '?')}. Explained against "
                    f"{r.get('explained_against', '?')}."),
        "cascade": (["Step", "Blocks randomised (cumulative)", "Spearman rho (mean ± std)", "Images",
                     "Constant maps (rho 0)"],
                    [[str(k), "… + " + str(s.get("randomised")) if k > 1 else str(s.get("randomised")),
                      _mean_std(s), str(s.get("n", "—")), str(s.get("constant_maps", "—"))]
                     for k, s in enumerate(steps, 1)]),
        "deletion_note": (f"Deletion (Petsiuk et al. 2018): the hottest pixels replaced by the {d.get('fill', '?')} "
                          f"fill in {d.get('steps', '?')} steps, the cosine of the new embedding to the proxy "
                          "tracked; area under that curve over the fraction removed (lower = more faithful). "
                          f"EmbeddingCAM below random on {_share(d.get('heatmap_below_random'))} and below "
                          f"uniform on {_share(d.get('heatmap_below_uniform'))} of the images."),
        "deletion": _auc_rows(methods),
        "insertion_note": None if not isinstance(entry.get("insertion"), dict) else (
            f"Insertion (Petsiuk et al. 2018): from the {ins.get('fill', '?')} fill, the hottest pixels revealed "
            f"first in {ins.get('steps', '?')} steps, the same orders and uniform map as deletion; area under the "
            f"cosine over the fraction revealed (higher = more faithful). EmbeddingCAM above random on "
            f"{_share(ins.get('heatmap_above_random'))} and above uniform on "
            f"{_share(ins.get('heatmap_above_uniform'))} of the images."),
        "insertion": _auc_rows([m for m in (ins.get("methods") or {}).values() if isinstance(m, dict)]),
    }


def _auc_rows(methods: list[dict]) -> tuple[list[str], list[list[str]]]:
    return (["Method", "AUC (mean ± std)", "Images"],
            [[str(m.get("name", "?")), _mean_std(m.get("auc")),
              str((m.get("auc") or {}).get("n", "—")) if isinstance(m.get("auc"), dict) else "—"]
             for m in methods])


def _sanity_markdown(entry: dict) -> list[str]:
    t, files = _sanity_texts(entry), entry.get("files") or {}
    parts = [f"## {md_cell(t['title'])}", "", md_cell(t["intro"]), "", md_cell(t["verdict"]), "",
             md_table(*t["cascade"]), ""]
    parts += [f"![cascade]({files['cascade']})", ""] if files.get("cascade") else []
    parts += [md_cell(t["deletion_note"]), "", md_table(*t["deletion"]), ""]
    parts += [f"![deletion]({files['deletion']})", ""] if files.get("deletion") else []
    if t["insertion_note"]:
        parts += [md_cell(t["insertion_note"]), "", md_table(*t["insertion"]), ""]
        parts += [f"![insertion]({files['insertion']})", ""] if files.get("insertion") else []
    return parts


def _sanity_html(entry: dict) -> list[str]:
    esc = html.escape
    t, files = _sanity_texts(entry), entry.get("files") or {}
    parts = [f"<h2>{esc(t['title'])}</h2>", f"<p>{esc(t['intro'])}</p>", f"<p>{esc(t['verdict'])}</p>",
             html_table(*t["cascade"])]
    parts += [f"<img src='{esc(files['cascade'])}' alt='cascade'>"] if files.get("cascade") else []
    parts += [f"<p>{esc(t['deletion_note'])}</p>", html_table(*t["deletion"])]
    parts += [f"<img src='{esc(files['deletion'])}' alt='deletion curves'>"] if files.get("deletion") else []
    if t["insertion_note"]:
        parts += [f"<p>{esc(t['insertion_note'])}</p>", html_table(*t["insertion"])]
        parts += [f"<img src='{esc(files['insertion'])}' alt='insertion curves'>"] if files.get("insertion") else []
    return parts


# --- a whole report -----------------------------------------------------------------------------


def render_report_markdown(report: dict) -> str:
    """Markdown of a ``write_report`` dict: each run's catalog, then Table 1 if annotated."""
    parts = ["# embcam report", ""]
    for entry in report["catalog"]:
        parts += _catalog_markdown(entry)
    for entry in report.get("pairs") or []:
        parts += pairs_markdown(entry)
    if report["table1"] is not None:
        parts += _table1_markdown(report["table1"])
    else:
        parts += [f"Table 1 (annotated metrics): {report['table1_note']}", ""]
    for entry in report.get("sanity") or []:
        parts += _sanity_markdown(entry)
    return "\n".join(parts)


def render_report_html(report: dict) -> str:
    """Self-contained HTML page of a ``write_report`` dict (images are the files next to it)."""
    body = []
    for entry in report["catalog"]:
        body += _catalog_html(entry)
    for entry in report.get("pairs") or []:
        body += pairs_html(entry)
    if report["table1"] is not None:
        body += _table1_html(report["table1"])
    else:
        body.append(f"<p>Table 1 (annotated metrics): {html.escape(report['table1_note'])}</p>")
    for entry in report.get("sanity") or []:
        body += _sanity_html(entry)
    return _page("embcam report", body)
