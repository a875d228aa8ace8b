"""MaxBoxAccV2 and PxAP (Choe et al., CVPR 2020, "Evaluating Weakly Supervised Object
Localization Methods Right"; code: clovaai/wsolevaluation), accumulated in a stream.

Per image only counters are kept: for MaxBoxAccV2 one correct-count per (IoU threshold
delta, map threshold tau), for PxAP one pixel count per score bin inside and outside the
mask, so any number of images costs O(#thresholds) memory. The explain job computes each
annotated image's counters where its heatmap, box and mask are in hand
(:func:`image_counts`, ``embcam.stages.compute_metrics``) and stores their sums per split
in each results file's Parquet metadata (:func:`counters_metadata`, key
``schemas.WSOL_COUNTERS_METADATA``); ``embcam.wsol_run.evaluate_run`` sums them, and computes them from
the heatmaps, a row batch at a time, only for files written without them (docs/design.md
§7, "WSOL metrics").

The map of an image is the one embcam's metrics use (``embcam.metrics``): the raw heatmap
upsampled bilinearly (cv2.INTER_LINEAR, torch's align_corners=False) to the metrics grid
(the image's size, downscaled to at most 512 px a side: :func:`embcam.metrics.grid_shape`),
then min-max normalised to H in [0, 1]. A map that is not finite or constant is
*degenerate*; it is treated as wsolevaluation treats it (its ``normalize_scoremap`` returns
zeros): H = 0 everywhere.

Thresholds: tau_k = k / 100 for k = 0..99 (boxes) and k = 0..100 (PxAP, whose curve also
has the point tau = 1.0, as wsolevaluation's histogram does); a pixel is foreground at tau
when H >= tau. Each pixel's *level* is the number of PxAP thresholds <= H (1..101), so it
is foreground at tau_k exactly when level > k.

MaxBoxAccV2. At each tau_k: every contour of the foreground (cv2.findContours, RETR_TREE,
CHAIN_APPROX_SIMPLE: outer borders and hole borders) gives a box (cv2.boundingRect, pixel
(i, j) covering [j, j+1) x [i, i+1)), scaled from the grid back to image pixels. The image
is correct at (tau, delta) when any of its boxes has IoU >= delta with any ground-truth box
(continuous area IoU, as ``embcam.metrics.box_iou``). Per delta in (0.3, 0.5, 0.7) the
accuracy is the best over tau (ties to the smallest tau); MaxBoxAccV2 is their mean.
A degenerate map gives no box: incorrect at every tau, but counted in the denominator.

PxAP. Over all pixels of all images with a mask (binarised at 0.5, resized to the grid by
nearest neighbour on pixel centres, as ``embcam.metrics``): TP_k, FP_k = mask / non-mask
pixels with H >= tau_k, precision P_k = TP_k / (TP_k + FP_k), recall R_k = TP_k / #mask
pixels. PxAP = sum_k P_k (R_k - R_{k+1}) for k = 0..100 with R_101 = 0 (nothing predicted
above 1), skipping thresholds with no predicted pixel: wsolevaluation's
``MaskEvaluator.compute`` (precision[1:] * diff(recall) over its descending thresholds).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np

from embcam.boxes import Box, checked_bbox
from embcam.metrics import MAX_GRID_SIDE, grid_shape

BOX_THRESHOLDS: tuple[float, ...] = tuple(k / 100 for k in range(100))  # 0, 0.01, ..., 0.99
PXAP_THRESHOLDS: tuple[float, ...] = BOX_THRESHOLDS + (1.0,)
IOU_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.7)
_EDGES = np.array(PXAP_THRESHOLDS)
_EDGES_PADDED = np.append(_EDGES, np.inf)  # index 101: above every threshold
LEVELS = len(PXAP_THRESHOLDS) + 1  # level values 0..101 (0 only for a negative H, never after min-max)
DEGENERATE_LEVEL = 1  # H = 0: foreground at tau = 0 only


# --- one image ----------------------------------------------------------------------------------


def grid_levels(heatmap, width: int, height: int, max_side: int = MAX_GRID_SIDE) -> np.ndarray | None:
    """(gh, gw) uint8 levels of the normalised map on the metrics grid (see the module
    docstring); None when the map is degenerate."""
    raw = np.asarray(heatmap, dtype=np.float64)
    if raw.ndim != 2 or raw.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {raw.shape}")
    gw, gh = grid_shape(width, height, max_side)
    if not np.isfinite(raw).all():
        return None
    up = cv2.resize(np.ascontiguousarray(raw), (gw, gh), interpolation=cv2.INTER_LINEAR)
    lo, hi = float(up.min()), float(up.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):  # embcam.metrics' degeneracy test
        return None
    up -= lo
    up /= hi - lo  # the maximum becomes exactly 1.0 (x / x)
    return levels_of(up)


def levels_of(h: np.ndarray) -> np.ndarray:
    """uint8 number of PXAP_THRESHOLDS <= h for h in [0, 1]: ``searchsorted(thresholds, h,
    "right")``, computed as floor(100 h) + 1 and corrected where 100 h rounded across a
    threshold (k / 100 is not exact in binary)."""
    c = (h * 100).astype(np.uint8)  # floor, 0..100
    level = c + np.uint8(1)
    level += (h >= _EDGES_PADDED[c + 1]).view(np.uint8)
    level -= (h < _EDGES_PADDED[c]).view(np.uint8)
    return level


def grid_mask(mask, width: int, height: int, max_side: int = MAX_GRID_SIDE) -> np.ndarray:
    """The (height, width) mask in [0, 1] binarised at 0.5 on the metrics grid, nearest
    neighbour on pixel centres (grid row i reads source row floor((i + 0.5) * height / gh))."""
    m = np.asarray(mask)
    if m.shape != (height, width):
        raise ValueError(f"mask shape {m.shape} does not match the image (height, width) = {(height, width)}")
    gw, gh = grid_shape(width, height, max_side)
    if (gh, gw) != (height, width):
        rows = np.minimum(((np.arange(gh) + 0.5) * (height / gh)).astype(np.intp), height - 1)
        cols = np.minimum(((np.arange(gw) + 0.5) * (width / gw)).astype(np.intp), width - 1)
        m = m[rows][:, cols]
    return m >= 0.5


def contour_boxes(binary: np.ndarray) -> np.ndarray:
    """(n, 4) int64 boxes (x0, y0, x1, y1) of every contour of a binary image (RETR_TREE:
    outer and hole borders)."""
    contours = cv2.findContours(np.ascontiguousarray(binary, dtype=np.uint8), cv2.RETR_TREE,
                                cv2.CHAIN_APPROX_SIMPLE)[0]
    boxes = np.array([cv2.boundingRect(c) for c in contours], dtype=np.int64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return boxes


TILES = 8  # thresholds searched by one findContours call (see threshold_boxes)


def threshold_boxes(levels: np.ndarray, count: int = len(BOX_THRESHOLDS),
                    min_area: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The contour boxes of the foreground at tau_0 .. tau_{count-1}, on the grid.

    Returns (boxes (n, 4) int64 (x0, y0, x1, y1), owner (n,) int64: the threshold index of
    each box). The same boxes as one findContours per threshold on the whole grid, faster:

    * a threshold that no pixel's level separates from the one before has its boxes;
    * foregrounds are nested (tau rising), so each is searched only inside the bounding
      rectangle of an earlier one (the union of its outer boxes; hole borders lie inside);
    * ``TILES`` thresholds are searched by one findContours call, their foregrounds
      stacked one above the other with a background row between them (no contour can
      cross it, and it joins the outside as the image border does).

    ``min_area``: stop (no boxes for the remaining thresholds) once that rectangle, which
    holds every later box, is smaller than this many grid pixels.
    """
    gh, gw = levels.shape
    hist = np.bincount(levels.ravel(), minlength=LEVELS)
    changes = [k for k in range(count) if k == 0 or hist[k]]  # pixels at level k leave between tau_{k-1} and tau_k
    x0, y0, x1, y1 = 0, 0, gw, gh
    searched: list[int] = []  # the thresholds searched, ascending
    parts: list[np.ndarray] = []  # their boxes, (x0, y0, x1, y1, index into searched)
    for start in range(0, len(changes), TILES):
        if (x1 - x0) * (y1 - y0) < min_area:
            break
        ks = changes[start:start + TILES]
        crop = levels[y0:y1, x0:x1]
        ch, cw = crop.shape
        mosaic = np.zeros((len(ks), ch + 1, cw), np.uint8)
        np.greater(crop[None], np.array(ks, np.uint8)[:, None, None], out=mosaic[:, :ch].view(bool))
        rects = np.array([cv2.boundingRect(c) for c in cv2.findContours(
            mosaic.reshape(-1, cw), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]], np.int64).reshape(-1, 4)
        tile = rects[:, 1] // (ch + 1)
        box = np.stack([rects[:, 0] + x0, rects[:, 1] - tile * (ch + 1) + y0,
                        rects[:, 0] + rects[:, 2] + x0, rects[:, 1] - tile * (ch + 1) + rects[:, 3] + y0,
                        tile + len(searched)], 1)
        parts.append(box)
        searched += ks
        top = box[tile == len(ks) - 1]  # the highest threshold searched: its rectangle holds the next ones
        if len(top):
            x0, y0, x1, y1 = int(top[:, 0].min()), int(top[:, 1].min()), int(top[:, 2].max()), int(top[:, 3].max())
        else:
            x0 = y0 = x1 = y1 = 0
    table = np.concatenate(parts) if parts else np.zeros((0, 5), np.int64)
    # every threshold takes the boxes of the last one searched at or below it (none after a stop)
    stop = count if len(searched) == len(changes) else changes[len(searched)]
    index = np.searchsorted(searched, np.arange(stop), side="right") - 1
    order = np.argsort(table[:, 4], kind="stable")
    table = table[order]
    first = np.searchsorted(table[:, 4], np.arange(len(searched) + 1))
    sizes = first[index + 1] - first[index]
    owner = np.repeat(np.arange(stop), sizes)
    # row of each box: its threshold's first row plus its rank within the threshold
    rows = np.repeat(first[index], sizes) + np.arange(len(owner)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return table[rows, :4], owner


def box_ious(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(n, m) continuous area IoU of (n, 4) and (m, 4) boxes (x0, y0, x1, y1); 0 for an empty union."""
    boxes, gt = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(gt, np.float64).reshape(-1, 4)
    iw = np.minimum(boxes[:, None, 2], gt[None, :, 2]) - np.maximum(boxes[:, None, 0], gt[None, :, 0])
    ih = np.minimum(boxes[:, None, 3], gt[None, :, 3]) - np.maximum(boxes[:, None, 1], gt[None, :, 1])
    inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    union = area(boxes)[:, None] + area(gt)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def best_ious(levels: np.ndarray, width: int, height: int, gt_boxes,
              count: int = len(BOX_THRESHOLDS), floor: float = 0.0) -> np.ndarray:
    """(count,) the best IoU of any contour box at tau_k with any ground-truth box (image
    pixels). ``floor`` > 0: a best IoU below it may come back as 0 (the thresholds whose
    boxes are all too small to reach it are not searched: IoU(B, G) <= area(B) / area(G))."""
    gh, gw = levels.shape
    gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    sx, sy = width / gw, height / gh
    smallest = float(((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).min())
    # (1 - 1e-9): rounding never stops the search at a box whose IoU could equal the floor
    boxes, owner = threshold_boxes(levels, count, min_area=floor * smallest / (sx * sy) * (1 - 1e-9))
    best = np.zeros(count)
    if len(boxes):
        np.maximum.at(best, owner, box_ious(boxes * np.array([sx, sy, sx, sy]), gt).max(1))
    return best


# --- accumulators -------------------------------------------------------------------------------


class MaxBoxAccV2:
    """Correct counts per (delta, tau) over the images added; ``result()`` gives MaxBoxAccV2."""

    def __init__(self, iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                 thresholds: Sequence[float] = BOX_THRESHOLDS):
        if tuple(thresholds) != BOX_THRESHOLDS[:len(thresholds)]:
            raise ValueError("thresholds must be the first n of BOX_THRESHOLDS (k / 100)")
        self.iou_thresholds = tuple(float(d) for d in iou_thresholds)
        self.thresholds = tuple(thresholds)
        self.correct = np.zeros((len(self.iou_thresholds), len(self.thresholds)), np.int64)
        self.images = 0
        self.degenerate = 0

    def add_ious(self, best: np.ndarray) -> None:
        """One image, given its best IoU at each tau (:func:`best_ious`)."""
        best = np.asarray(best, np.float64)
        self.correct += best[None, :] >= np.array(self.iou_thresholds)[:, None]
        self.images += 1

    def add_degenerate(self) -> None:
        """One image with a degenerate map: incorrect at every tau."""
        self.images += 1
        self.degenerate += 1

    def merge(self, other: MaxBoxAccV2) -> MaxBoxAccV2:
        if (other.iou_thresholds, other.thresholds) != (self.iou_thresholds, self.thresholds):
            raise ValueError("cannot merge MaxBoxAccV2 accumulators with different thresholds")
        self.correct += other.correct
        self.images += other.images
        self.degenerate += other.degenerate
        return self

    def result(self) -> dict:
        """{"value": mean over delta of the best accuracy over tau (None without images),
        "per_iou": [{"iou", "accuracy", "threshold"}], "images", "degenerate",
        "thresholds", "accuracy": per delta the accuracy at every tau}."""
        out = {"value": None, "per_iou": [], "images": self.images, "degenerate": self.degenerate,
               "thresholds": list(self.thresholds), "accuracy": []}
        if not self.images:
            return out
        accuracy = self.correct / self.images
        for d, row in zip(self.iou_thresholds, accuracy):
            k = int(np.argmax(row))  # first maximum: the smallest tau
            out["per_iou"].append({"iou": d, "accuracy": float(row[k]), "threshold": self.thresholds[k]})
        out["accuracy"] = accuracy.tolist()
        out["value"] = float(np.mean([p["accuracy"] for p in out["per_iou"]]))
        return out


class PxAP:
    """Pixel counts per level inside and outside the masks; ``result()`` gives PxAP."""

    def __init__(self):
        self.inside = np.zeros(LEVELS, np.int64)
        self.outside = np.zeros(LEVELS, np.int64)
        self.images = 0
        self.degenerate = 0

    def add_levels(self, levels: np.ndarray | None, mask: np.ndarray) -> None:
        """One image: its levels (None: degenerate, H = 0) and its grid mask (bool, same shape)."""
        self.add_histograms(*self.histograms(levels, mask), levels is None)

    @staticmethod
    def histograms(levels: np.ndarray | None, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inside, total): one image's pixel counts per level inside its mask and in all."""
        mask = np.asarray(mask, bool)
        if levels is None:
            inside = np.zeros(LEVELS, np.int64)
            inside[DEGENERATE_LEVEL] = mask.sum()
            total = np.zeros(LEVELS, np.int64)
            total[DEGENERATE_LEVEL] = mask.size
            return inside, total
        if levels.shape != mask.shape:
            raise ValueError(f"levels {levels.shape} and mask {mask.shape} differ in shape")
        return np.bincount(levels[mask], minlength=LEVELS), np.bincount(levels.ravel(), minlength=LEVELS)

    def add_histograms(self, inside: np.ndarray, total: np.ndarray, degenerate: bool = False) -> None:
        """One image, given its :meth:`histograms`."""
        self.inside += inside
        self.outside += total - inside
        self.images += 1
        self.degenerate += bool(degenerate)

    def merge(self, other: PxAP) -> PxAP:
        self.inside += other.inside
        self.outside += other.outside
        self.images += other.images
        self.degenerate += other.degenerate
        return self

    def curve(self) -> dict:
        """TP, FP, precision (NaN where nothing is predicted) and recall at each tau of PXAP_THRESHOLDS."""
        # foreground at tau_k: level > k, i.e. levels k+1 .. LEVELS-1
        tp = np.cumsum(self.inside[::-1])[::-1][1:]
        fp = np.cumsum(self.outside[::-1])[::-1][1:]
        positives = int(self.inside.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / (tp + fp)
        recall = tp / positives if positives else np.full(len(tp), np.nan)
        return {"thresholds": list(PXAP_THRESHOLDS), "tp": tp, "fp": fp, "precision": precision,
                "recall": recall, "positives": positives}

    def result(self) -> dict:
        """{"value": PxAP (None without images or mask pixels), "images", "degenerate",
        "mask_pixels", "pixels"}."""
        c = self.curve()
        out = {"value": None, "images": self.images, "degenerate": self.degenerate,
               "mask_pixels": c["positives"], "pixels": int(self.inside.sum() + self.outside.sum())}
        if c["positives"]:
            next_recall = np.append(c["recall"][1:], 0.0)
            predicted = (c["tp"] + c["fp"]) > 0
            out["value"] = float(np.sum((c["precision"] * (c["recall"] - next_recall))[predicted]))
        return out


class WsolAccumulator:
    """MaxBoxAccV2 over the images with a box, PxAP over those with a mask."""

    def __init__(self, max_side: int = MAX_GRID_SIDE):
        self.max_side = max_side
        self.boxes = MaxBoxAccV2()
        self.pixels = PxAP()

    def add(self, heatmap, width: int, height: int, bbox: Box | Sequence[Box] | None = None,
            mask: np.ndarray | None = None) -> None:
        """One image: its raw heatmap, its size, its ground-truth box(es) in image pixels
        (one (x0, y0, x1, y1) or several) and its mask ((height, width) values in [0, 1])."""
        counts = image_counts(heatmap, width, height, bbox, mask, self.max_side)
        if counts is not None:
            self.add_counts(counts)

    def add_counts(self, counts: ImageCounts) -> None:
        """One image, given what :func:`image_counts` found."""
        if counts.best_iou is not None:
            self.boxes.add_degenerate() if counts.degenerate else self.boxes.add_ious(counts.best_iou)
        if counts.inside is not None:
            self.pixels.add_histograms(counts.inside, counts.total, counts.degenerate)

    def merge(self, other: WsolAccumulator) -> WsolAccumulator:
        self.boxes.merge(other.boxes)
        self.pixels.merge(other.pixels)
        return self

    def result(self) -> dict:
        return {"maxboxacc_v2": self.boxes.result(), "pxap": self.pixels.result()}

    def to_json(self) -> dict:
        """The counters as JSON values: {"boxes": {"images", "degenerate", "correct"
        (per delta, per tau; left out when all zero)}, "pixels": {"images", "degenerate",
        "inside", "outside" (per level; left out when all zero)}}."""
        boxes = {"images": self.boxes.images, "degenerate": self.boxes.degenerate}
        if self.boxes.correct.any():
            boxes["correct"] = self.boxes.correct.tolist()
        pixels = {"images": self.pixels.images, "degenerate": self.pixels.degenerate}
        if self.pixels.inside.any() or self.pixels.outside.any():
            pixels.update(inside=self.pixels.inside.tolist(), outside=self.pixels.outside.tolist())
        return {"boxes": boxes, "pixels": pixels}

    @classmethod
    def from_json(cls, value: dict, max_side: int = MAX_GRID_SIDE) -> WsolAccumulator:
        """The accumulator :meth:`to_json` described (the default thresholds)."""
        acc = cls(max_side)
        boxes, pixels = value["boxes"], value["pixels"]
        acc.boxes.images, acc.boxes.degenerate = int(boxes["images"]), int(boxes["degenerate"])
        if "correct" in boxes:
            acc.boxes.correct += np.array(boxes["correct"], np.int64).reshape(acc.boxes.correct.shape)
        acc.pixels.images, acc.pixels.degenerate = int(pixels["images"]), int(pixels["degenerate"])
        if "inside" in pixels:
            acc.pixels.inside += np.array(pixels["inside"], np.int64).reshape(LEVELS)
            acc.pixels.outside += np.array(pixels["outside"], np.int64).reshape(LEVELS)
        return acc


class ImageCounts(NamedTuple):
    """What one image adds to the counters: its best IoU at each tau (None: no box; zeros
    for a degenerate map), its pixel counts per level inside the mask and in all (None: no
    mask), and whether its map is degenerate."""

    best_iou: np.ndarray | None
    inside: np.ndarray | None
    total: np.ndarray | None
    degenerate: bool


def image_counts(heatmap, width: int, height: int, bbox: Box | Sequence[Box] | None = None,
                 mask: np.ndarray | None = None, max_side: int = MAX_GRID_SIDE) -> ImageCounts | None:
    """One image's counters (see :class:`WsolAccumulator.add` for the arguments); None
    without a box and a mask, which costs nothing."""
    if bbox is None and mask is None:
        return None
    levels = grid_levels(heatmap, width, height, max_side)
    best = inside = total = None
    if bbox is not None:
        gt = np.asarray(bbox, np.float64).reshape(-1, 4)
        gt = np.array([checked_bbox(b, width, height) for b in gt])
        best = (np.zeros(len(BOX_THRESHOLDS)) if levels is None
                else best_ious(levels, width, height, gt, floor=min(IOU_THRESHOLDS)))
    if mask is not None:
        inside, total = PxAP.histograms(levels, grid_mask(mask, width, height, max_side))
    return ImageCounts(best, inside, total, levels is None)


# --- counters stored with the results ------------------------------------------------------------

COUNTERS_VERSION = 1


def counters_metadata(splits: Sequence[str | None], counts: Sequence[ImageCounts | None],
                      max_side: int = MAX_GRID_SIDE) -> bytes:
    """A results file's WSOL counters (the value of ``schemas.WSOL_COUNTERS_METADATA``):
    per split, its ok rows and the sum of their :func:`image_counts`. ``splits`` and
    ``counts``: one entry per ok row of the file (None: not annotated).

    JSON: {"version", "max_side", "iou_thresholds", "box_thresholds", "pxap_thresholds",
    "splits": [{"split" (null for none), "rows", **WsolAccumulator.to_json()}]}."""
    groups: dict[str | None, list] = {}
    for split, c in zip(splits, counts):
        group = groups.setdefault(split, [0, WsolAccumulator(max_side)])
        group[0] += 1
        if c is not None:
            group[1].add_counts(c)
    return json.dumps({
        "version": COUNTERS_VERSION, "max_side": max_side, "iou_thresholds": list(IOU_THRESHOLDS),
        "box_thresholds": len(BOX_THRESHOLDS), "pxap_thresholds": len(PXAP_THRESHOLDS),
        "splits": [{"split": split, "rows": rows, **acc.to_json()} for split, (rows, acc) in groups.items()],
    }, separators=(",", ":")).encode()


def stored_counters(value: bytes | None, split: str | None,
                    max_side: int = MAX_GRID_SIDE) -> tuple[int, WsolAccumulator] | None:
    """(ok rows, counters) of one results file's :func:`counters_metadata` (of ``split``
    only, when given); None when the file has none, or counters of another layout (thresholds,
    grid cap, version): its images are then measured on their heatmaps."""
    if not value:
        return None
    stored = json.loads(value)
    if (stored.get("version"), stored.get("max_side"), stored.get("iou_thresholds"), stored.get("box_thresholds"),
            stored.get("pxap_thresholds")) != (COUNTERS_VERSION, max_side, list(IOU_THRESHOLDS),
                                               len(BOX_THRESHOLDS), len(PXAP_THRESHOLDS)):
        return None
    rows, acc = 0, WsolAccumulator(max_side)
    for group in stored["splits"]:
        if split is None or group["split"] == split:
            rows += group["rows"]
            acc.merge(WsolAccumulator.from_json(group, max_side))
    return rows, acc
