"""Overlay images for the report: [image | heatmap overlay] with the ground-truth box (green)
and the predicted box (red), drawn by ``embcam.results.overlay``.

Rows and images are found as ``embcam.results.read_rows`` finds them (the run's manifest
copy, else the manifest its config names; the run's image root). When the manifest cannot
be found the overlays are skipped with the reason; an image that cannot be drawn is listed
with its reason; the report is written either way.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import pyarrow as pa

from embcam.data.locations import safe_name
from embcam.results import PRED_BOX_COLUMNS, overlay, overlay_file_name, read_rows, write_image

OVERLAY_TILE = 240  # pixels of each half of a report overlay, drawn at the size it is shown

# what a drawing and its caption need (read only for the rows drawn)
OVERLAY_COLUMNS = ["image_id", "label", "status", "error", "width", "height", "cosine",
                   "heatmap", "heatmap_height", "heatmap_width", "degenerate", "ratio_bbox",
                   "ratio_mask", "iou", *PRED_BOX_COLUMNS]


def draw_rows(run: str, image_ids: list[str], out_dir: Path, folder: str) -> dict:
    """Draw the overlays of ``image_ids`` of ``run`` as ``out_dir/folder/<image_id>.png``,
    each ``OVERLAY_TILE`` pixels high and twice that wide (the page shows them at that size).

    Returns ``rows`` {image_id: results row}, ``files`` {image_id: path relative to
    ``out_dir``}, ``failed`` [{image_id, run, reason}] and ``skipped`` (why nothing could
    be drawn, or None).
    """
    drawn = {"rows": {}, "files": {}, "failed": [], "skipped": None}
    if not image_ids:
        return drawn
    try:
        drawn["rows"] = read_rows(run, image_ids, columns=OVERLAY_COLUMNS)
    except (OSError, ValueError, pa.ArrowException) as e:
        drawn["skipped"] = str(e)
        return drawn
    for image_id in image_ids:
        row = drawn["rows"].get(image_id)
        try:
            if row is None:
                raise ValueError(f"image_id {image_id!r} is not in the results of {run}")
            if row["uri"] is None:
                raise ValueError(f"image_id {image_id!r} is not in the run's manifest")
            picture = overlay(row, tile=OVERLAY_TILE)
        except (OSError, ValueError) as e:
            drawn["failed"].append({"image_id": image_id, "run": run, "reason": str(e)})
            continue
        rel = f"{folder}/{overlay_file_name(image_id)}"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        write_image(out_dir / rel, picture)
        drawn["files"][image_id] = rel
    return drawn


def _caption(image_id: str, method: str, row: dict) -> str:
    def num(v):
        return "—" if v is None else f"{v:.3f}"
    text = (f"{image_id} · {method} · ratio bbox {num(row['ratio_bbox'])} · "
            f"mask {num(row['ratio_mask'])} · IoU {num(row['iou'])}")
    return text + (" · degenerate" if row["degenerate"] else "")


def _overlay_ids(ok_ids: dict, methods: list[dict], count: int) -> list[str]:
    union = set()
    for m in methods:
        union.update(map(str, ok_ids[m["runs"][0]]))
    return heapq.nsmallest(count, union)


def write_overlays(table: dict, ok_ids: dict, out_dir: Path, count: int) -> dict:
    """Table 1's overlays: the first ``count`` sorted ok image_ids, in the first run of
    each method, under ``overlays/<method>/``."""
    info = {"written": 0, "skipped": None, "failed": [], "images": [],
            "choice": f"first {count} image_ids (sorted) with status ok; first run of each "
                      "method"}
    if count <= 0:
        info["skipped"] = "not requested (--overlays 0)"
        return info
    ids = _overlay_ids(ok_ids, table["methods"], count)
    for m in table["methods"]:
        run = m["runs"][0]
        ok = set(map(str, ok_ids[run]))  # absent or failed in this run: not drawn
        drawn = draw_rows(run, [i for i in ids if i in ok], out_dir, f"overlays/{safe_name(m['key'])}")
        if drawn["skipped"]:
            info["skipped"] = info["skipped"] or drawn["skipped"]
        info["failed"] += drawn["failed"]
        for image_id, rel in drawn["files"].items():
            row = drawn["rows"][image_id]
            info["images"].append({"image_id": image_id, "method": m["key"], "run": run,
                                   "file": rel, "caption": _caption(image_id, m["name"], row),
                                   "ratio_bbox": row["ratio_bbox"],
                                   "ratio_mask": row["ratio_mask"], "iou": row["iou"]})
    info["images"].sort(key=lambda item: ids.index(item["image_id"]))  # image by image
    info["written"] = len(info["images"])
    if ids and not info["written"] and info["failed"]:
        info["skipped"] = f"no image could be drawn (first failure: {info['failed'][0]['reason']})"
    return info


def _catalog_caption(item: dict) -> str:
    text = f"{item['image_id']} · {item['label'] if item['label'] is not None else '(no label)'}"
    if item["cosine"] is not None:
        text += f" · cosine {item['cosine']:.3f}"
    if item["ratio_bbox"] is not None:
        text += f" · ratio bbox {item['ratio_bbox']:.3f}"
    return text


def write_catalog_images(entry: dict, out_dir: Path, folder: str) -> None:
    """Draw a catalog entry's gallery and outside-the-box images (each image once) under
    ``out_dir/folder``. In place: each image gains ``file`` (None when not drawn) and
    ``caption``; each gallery gains ``failed`` and, when nothing could be drawn, ``skipped``."""
    galleries = [g for g in (entry["gallery"], entry["outside_box"]) if g is not None]
    ids = list(dict.fromkeys(item["image_id"] for g in galleries for item in g["images"]))
    drawn = draw_rows(entry["run"], ids, out_dir, folder)
    reasons = {f["image_id"]: f for f in drawn["failed"]}
    for gallery in galleries:
        gallery["failed"] = [reasons[i["image_id"]] for i in gallery["images"] if i["image_id"] in reasons]
        if gallery["images"] and drawn["skipped"]:
            gallery["skipped"] = f"overlays skipped: {drawn['skipped']}"
        for item in gallery["images"]:
            item["file"] = drawn["files"].get(item["image_id"])
            item["caption"] = _catalog_caption(item)
