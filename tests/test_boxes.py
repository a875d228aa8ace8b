"""embcam.boxes: nulls, a row's box, and writing images (embcam.data.images.write_image)."""
import cv2
import numpy as np
import pandas as pd
import pytest

from embcam.boxes import BBOX_COLUMNS, is_null, row_box
from embcam.data.images import write_image


def test_is_null_knows_none_and_every_nan():
    assert is_null(None) and is_null(float("nan")) and is_null(np.float32("nan")) and is_null(np.nan)
    assert not any(is_null(v) for v in (0.0, np.float32(0), 0, "", "nan", False))


def test_row_box_reads_all_or_nothing():
    box = dict(zip(BBOX_COLUMNS, (1, 2.5, np.float32(3), np.float64(4))))
    assert row_box(box) == (1.0, 2.5, 3.0, 4.0) and all(type(v) is float for v in row_box(box))
    assert row_box(pd.Series(box)) == (1.0, 2.5, 3.0, 4.0)  # a pandas row reads the same
    assert row_box(dict.fromkeys(BBOX_COLUMNS)) is None  # all null: no box
    assert row_box(dict.fromkeys(BBOX_COLUMNS, np.nan)) is None  # how Arrow nulls arrive in numpy
    assert row_box({"bbox_x0": 1.0}) is None  # columns absent: no box
    with pytest.raises(ValueError, match=r"^box given only partially \(bbox_y0, bbox_y1 missing\)$"):
        row_box(dict(box, bbox_y0=None, bbox_y1=float("nan")))
    pred = ("p0", "p1", "p2", "p3")
    assert row_box(dict(zip(pred, (0, 0, 2, 2))), pred) == (0.0, 0.0, 2.0, 2.0)


def test_write_image_writes_rgb_grey_and_jpeg_quality(tmp_path):
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[..., 0] = 200  # red
    write_image(tmp_path / "red.png", rgb)
    bgr = cv2.imread(str(tmp_path / "red.png"))
    assert (bgr[..., 2] == 200).all() and (bgr[..., :2] == 0).all()
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    write_image(tmp_path / "grey.png", grey)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "grey.png"), cv2.IMREAD_UNCHANGED), grey)
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    write_image(tmp_path / "q10.jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 10])
    write_image(tmp_path / "q95.jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert (tmp_path / "q10.jpg").stat().st_size < (tmp_path / "q95.jpg").stat().st_size
    with pytest.raises(OSError, match="could not write .*nowhere/x.png"):
        write_image(tmp_path / "nowhere" / "x.png", rgb)
    with pytest.raises(OSError, match="could not write"):
        write_image(tmp_path / "x.unknown", rgb)
