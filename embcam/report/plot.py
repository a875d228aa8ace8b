"""The threshold-sweep plot (mean accuracy vs t per method), drawn with OpenCV only."""

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
