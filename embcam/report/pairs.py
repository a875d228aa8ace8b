"""The report's pairs section, for a run made with ``embcam explain --pairs``
(``RUN/pairs/part-<start>-<stop>.parquet``, contract ``pairs``).

* Counts: pairs, ok, error; the cosine's range and median over the ok pairs.
* Shown: the ``shown`` ok pairs with the lowest cosine (the weakest matches first: where
  two images the pairs file calls alike look least alike to the model), ties by query_id,
  match_id, then the pairs file's order. Each pair is drawn as two [image | heatmap] panels:
  the query with ``query_heatmap`` (where it looks when compared with the match) and the
  match with ``match_heatmap``, with the ground-truth box where the manifest has one (no
  predicted box: the results' box belongs to the results' heatmap, not to the pair's).
* Error pairs: counted, and the first :data:`ERROR_ROWS` listed with their reason.

Only the light columns are read for every pair; the heatmaps only of the row groups that
hold a shown pair. Images are found and decoded as ``embcam.results`` does (the run's
manifest copy, EXIF orientation applied); a pair that cannot be drawn is listed with the
reason and the report is written either way. The pairs are not filtered by ``--split``.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from embcam.data.runstate import RunFolder
from embcam.data.schemas import ERROR, OK, STATUSES
from embcam.report.markup import html_table, md_table, num
from embcam.results import PRED_BOX_COLUMNS, overlay, overlay_file_name, read_rows, write_image

FOLDER = "pairs"  # RUN/pairs: what explain --pairs writes
COLUMNS = ("query_id", "match_id", "status", "error", "cosine")
HEAT_COLUMNS = ("query_heatmap", "match_heatmap", "heatmap_height", "heatmap_width")
IMAGE_COLUMNS = ["image_id", "label", "status", "error", "width", "height"]
ERROR_ROWS = 50
SIDES = ("query", "match")


def has_pairs(run: str) -> bool:
    """True when the run folder holds committed pair explanations (``RUN/pairs/*.parquet``;
    an unfinished run may have the folder and none yet)."""
    folder = RunFolder(run)
    return folder.exists(FOLDER) and bool(pads.dataset(folder.join(FOLDER), filesystem=folder.fs,
                                                         format="parquet").files)


def pairs_section(run: str, out_dir: Path, folder: str, *, shown: int = 24, split: str | None = None) -> dict:
    """The pairs entry of one run (JSON-ready), its pictures drawn under ``out_dir/folder``.

    ``shown``: ok pairs drawn, lowest cosine first. Returns ``run``, ``counts`` {pairs,
    ok, error}, ``cosine`` {min, median, max} (None without ok pairs), ``choice``,
    ``pairs`` (the shown ones: ids, labels, cosine, ``files`` {query, match} and
    ``failed`` reasons), ``not_shown``, ``errors`` {count, rows, not_listed},
    ``skipped`` (why no picture could be drawn, or None) and ``split_note``.
    """
    if shown < 0:
        raise ValueError(f"pairs shown must be >= 0, got {shown}")
    frame, files = read_pairs(run)
    order = ["query_id", "match_id", "in_file", "at_row"]
    ok = frame[frame["status"] == OK].sort_values(["cosine", *order], kind="stable")
    failed = frame[frame["status"] == ERROR].sort_values(order, kind="stable")
    chosen = ok.head(shown)
    cos = ok["cosine"].to_numpy(np.float64)
    entry = {
        "run": run,
        "counts": {"pairs": int(len(frame)), "ok": int(len(ok)), "error": int(len(failed))},
        "cosine": None if not len(cos) else {"min": float(cos.min()), "median": float(np.median(cos)),
                                             "max": float(cos.max())},
        "choice": f"the {shown} ok pairs with the lowest cosine (weakest matches first)",
        "pairs": [{"query_id": r.query_id, "match_id": r.match_id, "cosine": float(r.cosine),
                   "query_label": None, "match_label": None, "files": {}, "failed": []}
                  for r in chosen.itertuples()],
        "not_shown": int(len(ok) - len(chosen)),
        "errors": {"count": int(len(failed)), "not_listed": max(0, int(len(failed)) - ERROR_ROWS),
                   "rows": [{"query_id": r.query_id, "match_id": r.match_id,
                             "error": "(no reason)" if r.error is None else str(r.error)}
                            for r in failed.head(ERROR_ROWS).itertuples()]},
        "skipped": None,
        "split_note": None if split is None else f"the pairs are not filtered by split ({split!r} asked for)",
    }
    if entry["pairs"]:
        entry["skipped"] = _draw(run, chosen, files, entry["pairs"], out_dir, folder)
    return entry


def read_pairs(run: str) -> tuple[pd.DataFrame, list[str]]:
    """The light columns of every pair, with ``in_file`` (index into the files, also
    returned) and ``at_row`` (row in that file), checked."""
    files = _pair_files(run)
    fs = RunFolder(run).fs
    frames = []
    for k, path in enumerate(files):
        parquet = pq.ParquetFile(fs.open_input_file(path))
        missing = [c for c in COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"pairs file {path} lacks column(s) {', '.join(missing)}")
        table = parquet.read(columns=list(COLUMNS))
        frame = table.to_pandas()
        frame["in_file"], frame["at_row"] = k, np.arange(table.num_rows)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    for name in ("query_id", "match_id", "status"):
        if frame[name].isna().any():
            raise ValueError(f"run {run}: pairs have a null {name} ({_where(frame, frame[name].isna(), files)})")
    unknown = ~frame["status"].isin(STATUSES)
    if unknown.any():
        raise ValueError(f"run {run}: a pair has status {frame['status'][unknown].iloc[0]!r}, expected {OK!r} "
                         f"or {ERROR!r} ({_where(frame, unknown, files)})")
    frame["cosine"] = frame["cosine"].astype(np.float64)
    bad = (frame["status"] == OK) & ~np.isfinite(frame["cosine"])
    if bad.any():
        raise ValueError(f"run {run}: an ok pair has no finite cosine ({_where(frame, bad, files)})")
    return frame, files


def _pair_files(run: str) -> list[str]:
    folder = RunFolder(run)
    files = sorted(pads.dataset(folder.join(FOLDER), filesystem=folder.fs, format="parquet").files)
    if not files:
        raise FileNotFoundError(f"run {run}: no pairs/*.parquet under {folder.join(FOLDER)}")
    return files


def _where(frame: pd.DataFrame, mask: pd.Series, files: list[str]) -> str:
    i = int(np.argmax(mask.to_numpy()))
    return f"file {files[frame['in_file'].iloc[i]]}, row {frame['at_row'].iloc[i]}"


def _heatmaps(run: str, chosen: pd.DataFrame, files: list[str]) -> list[dict]:
    """The heatmap columns of the chosen pairs, in their order: only the row groups holding them."""
    fs = RunFolder(run).fs
    found: dict[tuple[int, int], dict] = {}
    for k, rows in chosen.groupby("in_file")["at_row"]:
        parquet = pq.ParquetFile(fs.open_input_file(files[k]))
        missing = [c for c in HEAT_COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"pairs file {files[k]} lacks column(s) {', '.join(missing)}")
        starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
        wanted = np.sort(rows.to_numpy())
        for g in np.unique(np.searchsorted(starts, wanted, side="right") - 1):
            inside = wanted[(wanted >= starts[g]) & (wanted < starts[g + 1])]
            table = parquet.read_row_group(int(g), columns=list(HEAT_COLUMNS))
            for row, values in zip(inside, table.take(pa.array(inside - starts[g])).to_pylist()):
                found[(k, int(row))] = values
    return [found[(r.in_file, r.at_row)] for r in chosen.itertuples()]


def _draw(run: str, chosen: pd.DataFrame, files: list[str], pairs: list[dict], out_dir: Path,
          folder: str) -> str | None:
    """Draw each chosen pair's two panels; fills ``files``, ``failed`` and the labels in
    ``pairs``. Returns why nothing could be drawn, or None."""
    ids = sorted({i for p in pairs for i in (p["query_id"], p["match_id"])})
    try:
        heat = _heatmaps(run, chosen, files)
        images = read_rows(run, ids, columns=IMAGE_COLUMNS)
    except (OSError, ValueError, pa.ArrowException) as e:
        return str(e)
    for pos, (pair, maps) in enumerate(zip(pairs, heat), start=1):
        for side in SIDES:
            image_id = pair[f"{side}_id"]
            row = images.get(image_id)
            pair[f"{side}_label"] = None if row is None else row.get("label")
            try:
                picture = overlay(_pair_row(image_id, row, maps, side))
            except (OSError, ValueError) as e:
                pair["failed"].append({"side": side, "image_id": image_id, "reason": str(e)})
                continue
            rel = f"{folder}/{pos:03d}-{side}-{overlay_file_name(image_id)}"
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            write_image(out_dir / rel, picture)
            pair["files"][side] = rel
    if all(not p["files"] for p in pairs):
        return f"no pair could be drawn (first failure: {pairs[0]['failed'][0]['reason']})"
    return None


def _pair_row(image_id: str, row: dict | None, maps: dict, side: str) -> dict:
    """The image's results row (uri, size, box) carrying the pair's heatmap of that side."""
    if row is None:
        raise ValueError(f"image_id {image_id!r} is not in the results of the run")
    if row["uri"] is None:
        raise ValueError(f"image_id {image_id!r} is not in the run's manifest")
    return {**row, "heatmap": maps[f"{side}_heatmap"], "heatmap_height": maps["heatmap_height"],
            "heatmap_width": maps["heatmap_width"], **dict.fromkeys(PRED_BOX_COLUMNS)}


# --- rendering -----------------------------------------------------------------------------------


def _id_text(image_id: str, label) -> str:
    return image_id if label is None else f"{image_id} ({label})"


def _counts_text(entry: dict) -> str:
    c, cos = entry["counts"], entry["cosine"]
    text = f"{c['pairs']} pairs: {c['ok']} ok, {c['error']} error."
    if cos is not None:
        text += f" Cosine over the ok pairs: min {cos['min']:.3f}, median {cos['median']:.3f}, max {cos['max']:.3f}."
    return text + (f" Note: {entry['split_note']}." if entry["split_note"] else "")


def _shown_note(entry: dict) -> str:
    note = f"Shown: {entry['choice']}"
    note += f"; {entry['not_shown']} more not shown." if entry["not_shown"] else "."
    if entry["skipped"]:
        note += f" Pictures skipped: {entry['skipped']}."
    failed = [f for p in entry["pairs"] for f in p["failed"]]
    if failed and not entry["skipped"]:
        note += f" {len(failed)} image(s) could not be drawn (first: {failed[0]['reason']})."
    return note


def _errors_note(entry: dict) -> str:
    errors = entry["errors"]
    note = f"{errors['count']} pair(s) failed; by query_id, match_id:"
    return note + (f" (the first {len(errors['rows'])}; {errors['not_listed']} more not listed)"
                   if errors["not_listed"] else "")


def _shown_rows(entry: dict) -> tuple[list[str], list[list[str]]]:
    header = ["Query", "Match", "Cosine", "Status", "Overlays"]
    rows = [[_id_text(p["query_id"], p["query_label"]), _id_text(p["match_id"], p["match_label"]),
             num(p["cosine"]), OK, ", ".join(p["files"].values()) or "—"] for p in entry["pairs"]]
    return header, rows


def _error_rows(entry: dict) -> tuple[list[str], list[list[str]]]:
    return (["Query", "Match", "Status", "Reason"],
            [[e["query_id"], e["match_id"], "error", e["error"]] for e in entry["errors"]["rows"]])


def pairs_markdown(entry: dict) -> list[str]:
    """The Markdown lines of one run's pairs entry."""
    parts = [f"## Pairs: {entry['run']}", "", _counts_text(entry), "", "### Lowest-cosine pairs", "",
             _shown_note(entry), ""]
    if entry["pairs"]:
        parts += [md_table(*_shown_rows(entry)), ""]
    if entry["errors"]["count"]:
        parts += ["### Error pairs", "", _errors_note(entry), "", md_table(*_error_rows(entry)), ""]
    return parts


def _pair_figure(rank: int, pair: dict) -> str:
    esc = html.escape
    panels = []
    for side in SIDES:
        image_id = pair[f"{side}_id"]
        if pair["files"].get(side):
            panels.append(f"<img src='{esc(pair['files'][side])}' alt='{side} {esc(image_id)}' "
                          "style='width:50%;min-width:0'>")
        else:
            reason = next((f["reason"] for f in pair["failed"] if f["side"] == side), "not drawn")
            panels.append(f"<p style='width:50%'>{side} {esc(image_id)} not drawn: {esc(reason)}</p>")
    caption = (f"#{rank} · cosine {pair['cosine']:.3f} · query {_id_text(pair['query_id'], pair['query_label'])}"
               f" · match {_id_text(pair['match_id'], pair['match_label'])}")
    return (f"<figure><div style='display:flex;gap:6px'>{''.join(panels)}</div>"
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def pairs_html(entry: dict) -> list[str]:
    """The HTML parts of one run's pairs entry (every value escaped)."""
    esc = html.escape
    parts = [f"<h2>{esc('Pairs: ' + entry['run'])}</h2>", f"<p>{esc(_counts_text(entry))}</p>",
             "<h3>Lowest-cosine pairs</h3>",
             f"<p>{esc(_shown_note(entry))} Each pair: the query, then the match; each as image | heatmap "
             "(min-max, JET) of where it looks when compared with the other, ground-truth box in green.</p>"]
    figures = [_pair_figure(k, p) for k, p in enumerate(entry["pairs"], start=1) if not entry["skipped"]]
    if figures:
        parts.append("<div style='display:grid;gap:12px;grid-template-columns:repeat(auto-fill,"
                     "minmax(560px,1fr))'>" + "".join(figures) + "</div>")
    if entry["pairs"]:
        parts.append(html_table(*_shown_rows(entry)))
    if entry["errors"]["count"]:
        parts += ["<h3>Error pairs</h3>", f"<p>{esc(_errors_note(entry))}</p>", html_table(*_error_rows(entry))]
    return parts
