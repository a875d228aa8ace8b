"""Boxes ``(x0, y0, x1, y1)`` in continuous display pixels (docs/design.md §6-7): the
manifest's box columns, reading a row's box, and checking a box against its image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

BBOX_COLUMNS = ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")

Box = tuple[float, float, float, float]


def is_null(value) -> bool:
    """None, or NaN (how a null number arrives in a numpy batch or a pandas row)."""
    return value is None or (isinstance(value, (float, np.floating)) and bool(np.isnan(value)))


def row_box(row: Mapping, columns: tuple[str, ...] = BBOX_COLUMNS) -> Box | None:
    """The box a row holds in ``columns``, as floats.

    None when the row has no box: every coordinate null, or a column absent. A box given
    only partly raises ValueError naming the missing columns.
    """
    if not all(c in row for c in columns):
        return None
    values = [row[c] for c in columns]
    missing = [is_null(v) for v in values]
    if all(missing):
        return None
    if any(missing):
        absent = ", ".join(c for c, m in zip(columns, missing) if m)
        raise ValueError(f"box given only partially ({absent} missing)")
    return tuple(float(v) for v in values)


def checked_bbox(bbox, width: int, height: int) -> Box:
    """Validate a ground-truth box (x0, y0, x1, y1); clip overshoots of less than one pixel.

    A missing (None or NaN) coordinate is an error like an infinite one, never "no box".
    """
    values = tuple(bbox)
    box = f"({', '.join(map(str, values))})"  # str, not repr: nan, not np.float64(nan)
    if len(values) != 4:
        raise ValueError(f"bbox {box} must have 4 coordinates (x0, y0, x1, y1)")
    missing = [name for name, v in zip(("x0", "y0", "x1", "y1"), values)
               if v is None or math.isnan(float(v))]
    if missing:
        raise ValueError(f"bbox {box} has a non-finite coordinate: {', '.join(missing)} "
                         f"missing (None or NaN)")
    x0, y0, x1, y1 = (float(v) for v in values)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"bbox {box} has a non-finite coordinate")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"bbox {box} is empty or inverted (need x0 < x1, y0 < y1)")
    overshoot = max(-x0, -y0, x1 - width, y1 - height)
    if overshoot >= 1.0:
        raise ValueError(f"bbox {box} lies (partly) outside the {width}x{height} "
                         f"image by {overshoot:g} px (at most <1 px is clipped)")
    return max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
