"""Overlay images: [image | heatmap overlay] panels with ground-truth and predicted boxes.

Images are found through the run's manifest (config ``manifest``, ``image_root``); when
they cannot be reached the overlays are skipped with a reason instead of failing the report.
"""

from __future__ import annotations

import glob
import hashlib
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

from embcam.report.runs import read_summary, result_files

OVERLAY_MAX_SIDE = 512  # overlay panels larger than this (long side) are downscaled
OVERLAY_ALPHA = 0.5
GT_COLOUR, PRED_COLOUR = (0, 200, 0), (0, 0, 255)  # BGR: green, red


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
    for path in result_files(run):
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


def write_overlays(table: dict, ok_ids: dict, out_dir: Path, count: int) -> dict:
    """Draw overlays for the first ``count`` sorted ok image_ids, first run of each method."""
    info = {"written": 0, "skipped": None, "failed": [], "images": [],
            "choice": f"first {count} image_ids (sorted) with status ok; first run of each "
                      "method"}
    if count <= 0:
        info["skipped"] = "not requested (--overlays 0)"
        return info
    summaries = {r["run"]: read_summary(r["run"], allow_partial=True) for r in table["runs"]}
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
