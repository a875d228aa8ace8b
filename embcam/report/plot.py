"""The report's plots, drawn with OpenCV only: the threshold sweep (mean accuracy vs t per
method) and histograms."""

from __future__ import annotations

import cv2
import numpy as np

from embcam.metrics import LOC_IOU, THRESHOLDS

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


def draw_histogram(hist: dict, title: str, width: int = 520, height: int = 300) -> np.ndarray:
    """BGR bar chart of a histogram ``{"edges": [...], "counts": [...]}`` (OpenCV only)."""
    img = np.full((height, width, 3), 255, np.uint8)
    font, black, bar = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), _PALETTE[0]
    left, right, top, bottom = 55, width - 15, 35, height - 45
    edges, counts = hist["edges"], hist["counts"]
    peak = max(max(counts), 1)
    step = (right - left) / len(counts)
    for i, count in enumerate(counts):
        x0, x1 = int(round(left + i * step)), int(round(left + (i + 1) * step)) - 1
        y = int(round(bottom - count / peak * (bottom - top)))
        if count:
            cv2.rectangle(img, (x0, y), (max(x0, x1), bottom), bar, -1)
    cv2.rectangle(img, (left, top), (right, bottom), black, 1)
    for k in (0, len(counts) // 2, len(counts)):  # edges at the ends and the middle
        x = int(round(left + k * step))
        cv2.putText(img, f"{edges[k]:.3g}", (x - 14, bottom + 18), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.putText(img, str(peak), (5, top + 10), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.putText(img, "0", (left - 15, bottom), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.putText(img, title[:70], (left, 22), font, 0.45, black, 1, cv2.LINE_AA)
    return img
