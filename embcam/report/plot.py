"""The report's plots, drawn with OpenCV only: the threshold sweep (mean accuracy vs t per
method), histograms, and the sanity check's cascade and deletion curves."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from embcam.data.images import write_image
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
        _tick_label(img, f"{edges[k]:.4g}", int(round(left + k * step)), bottom + 18)
    cv2.putText(img, str(peak), (5, top + 10), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.putText(img, "0", (left - 15, bottom), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.putText(img, title[:70], (left, 22), font, 0.45, black, 1, cv2.LINE_AA)
    return img


def _tick_label(img: np.ndarray, text: str, x: int, baseline: int, scale: float = 0.4) -> None:
    """``text`` centred under ``x``, moved in as far as it takes to lie whole inside the image."""
    (w, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    left = min(max(x - w // 2, 1), img.shape[1] - w - 2)
    cv2.putText(img, text, (left, baseline), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)


def draw_cascade(labels: list[str], means: list, stds: list, threshold: float | None = None,
                 title: str = "model randomisation: Spearman rho with the trained model's map",
                 width: int = 760, height: int = 440) -> np.ndarray:
    """BGR plot of mean ± std rank correlation per cascade step (step 0: the trained model,
    rho = 1), with the verdict's threshold dashed (OpenCV only)."""
    img = np.full((height, width, 3), 255, np.uint8)
    font, black, grey, red = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), (220, 220, 220), (40, 39, 214)
    left, right, top, bottom = 60, width - 50, 40, height - 70
    steps = len(labels)

    def px(step, rho):
        x = left + (step / max(steps, 1)) * (right - left)
        return int(round(x)), int(round(bottom - (rho + 1) / 2 * (bottom - top)))  # rho from -1 to 1

    for k in range(-2, 3):  # rho grid -1, -0.5, ..., 1
        rho = k / 2
        cv2.line(img, px(0, rho), px(steps, rho), grey, 1)
        cv2.putText(img, f"{rho:.1f}", (left - 40, px(0, rho)[1] + 4), font, 0.4, black, 1, cv2.LINE_AA)
    if threshold is not None:
        for x in range(left, right, 12):
            cv2.line(img, (x, px(0, threshold)[1]), (min(x + 6, right), px(0, threshold)[1]), red, 1)
    names = ["trained", *labels]
    for step, name in enumerate(names):  # tick labels alternate between two rows, so they do not collide
        x = px(step, -1)[0]
        cv2.line(img, (x, bottom), (x, bottom + 4), black, 1)
        parts = name.split(" ")[0].split(".")
        short = ".".join(parts[-2:] if parts[-1].isdigit() else parts[-1:])[:12]  # layer4, layer4.2
        cv2.putText(img, short, (x - 20, bottom + 16 + 14 * (step % 2)), font, 0.35, black, 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (right, bottom), black, 1)
    cv2.putText(img, title[:90], (left, 25), font, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(img, "blocks randomised, cumulatively from the output", ((left + right) // 2 - 170, height - 12),
                font, 0.45, black, 1, cv2.LINE_AA)
    colour = _PALETTE[0]
    points = [(px(0, 1.0), 0.0)] + [(px(i + 1, m), s) for i, (m, s) in enumerate(zip(means, stds)) if m is not None]
    for (a, _), (b, _) in zip(points, points[1:]):
        cv2.line(img, a, b, colour, 2, cv2.LINE_AA)
    scale = (bottom - top) / 2
    for (x, y), s in points:
        cv2.circle(img, (x, y), 3, colour, -1, cv2.LINE_AA)
        if s:
            cv2.line(img, (x, int(round(y - s * scale))), (x, int(round(y + s * scale))), colour, 1, cv2.LINE_AA)
    return img


def draw_curves(curves: list[dict], title: str, xlabel: str, width: int = 760, height: int = 440) -> np.ndarray:
    """BGR line plot of curves ``{"name", "x", "y"}`` with x and y in [0, 1] (OpenCV only)."""
    img = np.full((height, width, 3), 255, np.uint8)
    font, black, grey = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), (220, 220, 220)
    left, right, top, bottom = 60, width - 220, 40, height - 50
    values = [v for c in curves for v in c["y"]]
    lo, hi = (min(0.0, *values), max(1.0, *values)) if values else (0.0, 1.0)

    def px(x, y):
        return (int(round(left + x * (right - left))), int(round(bottom - (y - lo) / (hi - lo) * (bottom - top))))

    for k in range(6):
        x, y = k / 5, lo + k / 5 * (hi - lo)
        cv2.line(img, px(0, y), px(1, y), grey, 1)
        cv2.putText(img, f"{y:.2f}", (left - 45, px(0, y)[1] + 4), font, 0.4, black, 1, cv2.LINE_AA)
        cv2.line(img, (px(x, lo)[0], bottom), (px(x, lo)[0], bottom + 4), black, 1)
        cv2.putText(img, f"{x:.1f}", (px(x, lo)[0] - 10, bottom + 18), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (right, bottom), black, 1)
    cv2.putText(img, title[:90], (left, 25), font, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(img, xlabel[:60], ((left + right) // 2 - 4 * len(xlabel[:60]), height - 12), font, 0.45, black,
                1, cv2.LINE_AA)
    for i, c in enumerate(curves):
        colour = _PALETTE[i % len(_PALETTE)]
        points = [px(x, y) for x, y in zip(c["x"], c["y"])]
        for a, b in zip(points, points[1:]):
            cv2.line(img, a, b, colour, 2, cv2.LINE_AA)
        y = top + 10 + 20 * i
        cv2.line(img, (right + 12, y), (right + 32, y), colour, 2, cv2.LINE_AA)
        cv2.putText(img, c["name"][:26], (right + 38, y + 4), font, 0.4, black, 1, cv2.LINE_AA)
    return img


def plot_png(bgr: np.ndarray) -> bytes:
    """A plot (BGR, as OpenCV draws it) encoded as PNG bytes, for a folder that may be remote."""
    encoded, data = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not encoded:
        raise ValueError(f"a plot of shape {bgr.shape} could not be encoded as PNG")
    return data.tobytes()


def write_plot(path, bgr: np.ndarray) -> None:
    """A plot (BGR, as OpenCV draws it) as a PNG, its folder made first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, bgr[..., ::-1])  # a view: write_image flips it back to BGR
