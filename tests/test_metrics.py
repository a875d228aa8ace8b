"""Tests for embcam.metrics against hand-computed cases and independent references."""

import numpy as np
import pytest
from scipy import ndimage

from embcam.metrics import (
    DEFAULT_THRESHOLD,
    MAX_GRID_SIDE,
    THRESHOLDS,
    box_iou,
    grid_shape,
    heatmap_metrics,
    uniform_fractions,
)

KEYS = {"degenerate", "ratio_bbox", "ratio_mask", "uniform_bbox", "uniform_mask",
        "pred_bbox_x0", "pred_bbox_y0", "pred_bbox_x1", "pred_bbox_y1", "iou",
        "loc_correct", "iou_sweep"}
HEATMAP_KEYS = KEYS - {"degenerate", "uniform_bbox", "uniform_mask"}


def pred_box(m):
    return (m["pred_bbox_x0"], m["pred_bbox_y0"], m["pred_bbox_x1"], m["pred_bbox_y1"])


def bilinear_reference(a, out_h, out_w):
    """Independent float64 bilinear resize, align_corners=False (torch semantics)."""
    def taps(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0
    y0, y1, ly = taps(out_h, a.shape[0])
    x0, x1, lx = taps(out_w, a.shape[1])
    top = a[y0][:, x0] * (1 - lx) + a[y0][:, x1] * lx
    bottom = a[y1][:, x0] * (1 - lx) + a[y1][:, x1] * lx
    return top * (1 - ly)[:, None] + bottom * ly[:, None]


def test_constants():
    assert THRESHOLDS == (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
    assert DEFAULT_THRESHOLD == 0.2 and MAX_GRID_SIDE == 512
    assert grid_shape(1200, 600) == (512, 256)
    assert grid_shape(500, 375) == (500, 375)
    assert grid_shape(600, 1200, max_side=100) == (50, 100)


def test_all_mass_inside_box_gives_ratio_one():
    hm = np.zeros((8, 10))
    hm[2:5, 3:7] = np.arange(12).reshape(3, 4) + 1.0
    m = heatmap_metrics(hm, 10, 8, bbox=(3, 2, 7, 5))
    assert set(m) == KEYS
    assert m["degenerate"] is False
    assert m["ratio_bbox"] == 1.0
    assert m["uniform_bbox"] == 12 / 80
    assert m["ratio_mask"] is None and m["uniform_mask"] is None


def test_constant_map_is_degenerate_with_uniform_baselines():
    mask = np.zeros((8, 10))
    mask[:, :5] = 1.0
    m = heatmap_metrics(np.full((4, 5), 3.7), 10, 8, bbox=(0, 0, 5, 4), mask=mask)
    assert m["degenerate"] is True
    assert m["uniform_bbox"] == 20 / 80 and m["uniform_mask"] == 0.5
    assert all(m[k] is None for k in HEATMAP_KEYS)
    assert uniform_fractions(10, 8, (0, 0, 5, 4), mask) == (0.25, 0.5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_map_is_degenerate(bad):
    hm = np.random.default_rng(0).random((7, 7))
    hm[3, 3] = bad
    m = heatmap_metrics(hm, 20, 20, bbox=(0, 0, 10, 10))
    assert m["degenerate"] is True and m["uniform_bbox"] == 0.25
    assert all(m[k] is None for k in HEATMAP_KEYS)


def test_region_ratio_hand_computed():
    hm = np.zeros((10, 10))
    hm[0:4, 0:5] = 1.0  # 20 hot pixels
    m = heatmap_metrics(hm, 10, 10, bbox=(2, 2, 8, 8))
    assert m["ratio_bbox"] == pytest.approx(6 / 20, abs=1e-15)  # rows 2-3, cols 2-4
    assert m["uniform_bbox"] == 36 / 100


def test_min_max_normalisation_changes_ratio():
    # [[1,2],[3,4]] -> [[0,1/3],[2/3,1]], sum 2; right column holds 4/3 -> 2/3 (raw: 6/10)
    m = heatmap_metrics(np.array([[1.0, 2.0], [3.0, 4.0]]), 2, 2, bbox=(1, 0, 2, 2))
    assert m["ratio_bbox"] == pytest.approx(2 / 3, abs=1e-15)
    assert m["uniform_bbox"] == 0.5


def test_pixel_centre_rule_for_fractional_box():
    hm = np.zeros((1, 10))
    hm[0, :] = np.arange(10.0)  # normalised: j / 9, sum 5
    # centres 2.5, 3.5, 4.5 lie in [2.5, 5.2); centre 5.5 does not
    m = heatmap_metrics(hm, 10, 1, bbox=(2.5, 0, 5.2, 1))
    assert m["ratio_bbox"] == pytest.approx((2 + 3 + 4) / 9 / 5, abs=1e-15)
    assert m["uniform_bbox"] == 3 / 10
    # centre 2.5 < 2.6 drops out: columns 3 and 4 only
    m = heatmap_metrics(hm, 10, 1, bbox=(2.6, 0, 5.2, 1))
    assert m["ratio_bbox"] == pytest.approx((3 + 4) / 9 / 5, abs=1e-15)
    assert m["uniform_bbox"] == 2 / 10


def test_threshold_is_inclusive():
    m = heatmap_metrics(np.array([[0.0, 1.0, 5.0]]), 3, 1)  # normalised: 0, 0.2, 1
    assert pred_box(m) == (1.0, 0.0, 3.0, 1.0)


def test_box_touching_border_and_sub_pixel_clipping():
    hm = np.zeros((8, 10))
    hm[0:2, 8:10] = 1.0
    hm[7, 0] = 1.0
    m = heatmap_metrics(hm, 10, 8, bbox=(5, 0, 10, 4))  # touches top and right
    assert m["ratio_bbox"] == pytest.approx(4 / 5, abs=1e-15)
    assert m["uniform_bbox"] == 20 / 80
    whole = heatmap_metrics(hm, 10, 8, bbox=(-0.4, 0, 10.6, 8.3))  # clipped to the image
    assert whole["ratio_bbox"] == 1.0 and whole["uniform_bbox"] == 1.0


def test_larger_blob_wins_by_pixel_count_not_peak():
    hm = np.zeros((12, 20))
    hm[1:4, 1:4] = 1.0  # 9 px, the peak
    hm[6:10, 10:15] = 0.5  # 20 px
    m = heatmap_metrics(hm, 20, 12, bbox=(10, 6, 15, 10))
    assert pred_box(m) == (10.0, 6.0, 15.0, 10.0)
    assert m["iou"] == 1.0 and m["loc_correct"] is True


def test_eight_connectivity_and_tie_to_first_component():
    hm = np.zeros((10, 10))
    hm[np.arange(5), np.arange(5)] = 1.0  # diagonal: one 8-connected component of 5 px
    hm[7:9, 7:9] = 1.0  # 2x2 square, 4 px
    m = heatmap_metrics(hm, 10, 10)
    assert pred_box(m) == (0.0, 0.0, 5.0, 5.0)
    tie = np.zeros((10, 10))
    tie[6:8, 1:3] = 1.0  # same size, first in raster order
    tie[7:9, 6:8] = 1.0
    assert pred_box(heatmap_metrics(tie, 10, 10)) == (1.0, 6.0, 3.0, 8.0)


def test_ties_follow_opencv_two_row_block_order():
    # OpenCV labels 2 x 2 blocks: rows are read in pairs 0-1, 2-3, ..., each pair column by column
    hm = np.zeros((6, 8))
    hm[0, 5:7] = 1.0  # 2 px, first in plain raster order
    hm[1:3, 0] = 1.0  # 2 px, met first in block order (rows 0-1, column 0)
    assert pred_box(heatmap_metrics(hm, 8, 6)) == (0.0, 1.0, 1.0, 3.0)
    hm = np.zeros((6, 8))
    hm[1, 5:7] = 1.0  # rows 0-1: met first, though the pixels start at an odd row
    hm[2:4, 0] = 1.0  # rows 2-3 (first if the labelling started at row 1)
    assert pred_box(heatmap_metrics(hm, 8, 6)) == (5.0, 1.0, 7.0, 2.0)


def test_upsampled_ramp_hand_case_and_iou_sweep():
    # [[0, 1]] to width 8: columns 0, 0, .125, .375, .625, .875, 1, 1 (both rows)
    m = heatmap_metrics(np.array([[0.0, 1.0]]), 8, 2, bbox=(4, 0, 8, 2))
    assert pred_box(m) == (3.0, 0.0, 8.0, 2.0)  # t = 0.2 keeps columns 3..7
    assert m["ratio_bbox"] == pytest.approx(3.5 / 4.0, abs=1e-15)
    assert m["iou"] == pytest.approx(0.8) and m["loc_correct"] is True
    sweep = m["iou_sweep"]
    assert sweep.dtype == np.float32 and sweep.shape == (len(THRESHOLDS),)
    expected = [2 / 3, 2 / 3, 0.8, 0.8, 0.8, 0.8, 0.8, 1.0]
    np.testing.assert_allclose(sweep, expected, rtol=1e-6)
    assert np.all(np.diff(sweep) >= 0)  # box shrinks onto the GT box as t grows
    low = heatmap_metrics(np.array([[0.0, 1.0]]), 8, 2, bbox=(4, 0, 8, 2), threshold=0.05)
    assert low["iou"] == pytest.approx(2 / 3) and low["loc_correct"] is True
    # same map on a capped grid: 16x4 image, grid 8x2, box scaled back by 2
    capped = heatmap_metrics(np.array([[0.0, 1.0]]), 16, 4, bbox=(8, 0, 16, 4), max_side=8)
    assert pred_box(capped) == (6.0, 0.0, 16.0, 4.0)
    assert capped["ratio_bbox"] == pytest.approx(3.5 / 4.0, abs=1e-15)


def test_upsampled_map_matches_independent_reference():
    rng = np.random.default_rng(3)
    hm = np.maximum(rng.normal(size=(6, 5)), 0.0)
    width, height, bbox = 37, 43, (5.0, 9.0, 30.0, 40.0)
    up = bilinear_reference(hm, height, width)
    h = (up - up.min()) / (up.max() - up.min())
    for t in THRESHOLDS:
        m = heatmap_metrics(hm, width, height, bbox=bbox, threshold=t)
        labels, n = ndimage.label(h >= t, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel())[1:]
        ys, xs = np.nonzero(labels == 1 + np.argmax(sizes))
        assert pred_box(m) == (xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0)
        assert m["ratio_bbox"] == pytest.approx(h[9:40, 5:30].sum() / h.sum(), abs=1e-12)


def test_soft_masks():
    hm = np.zeros((2, 4))
    hm[0] = [1.0, 2.0, 3.0, 4.0]  # normalised: 0.25, 0.5, 0.75, 1.0; row 1 is 0; sum 2.5
    soft = np.array([[0.49, 0.5, 0.51, 0.0], [1.0, 1.0, 0.0, 0.0]])
    m = heatmap_metrics(hm, 4, 2, mask=soft)
    assert m["ratio_mask"] == pytest.approx((0.5 + 0.75) / 2.5, abs=1e-15)
    assert m["uniform_mask"] == 4 / 8
    assert m["ratio_bbox"] is None and m["iou_sweep"] is None
    u8 = np.array([[0, 255, 255, 0], [255, 255, 0, 0]], dtype=np.uint8)
    from_u8 = heatmap_metrics(hm, 4, 2, mask=u8 / 255)
    assert from_u8["ratio_mask"] == m["ratio_mask"]
    assert heatmap_metrics(hm, 4, 2, mask=u8 > 0)["ratio_mask"] == m["ratio_mask"]
    with pytest.raises(ValueError, match="divide"):
        heatmap_metrics(hm, 4, 2, mask=u8)


def test_mask_nearest_on_capped_grid():
    mask = np.zeros((4, 16))
    mask[:, 4:12] = 1.0  # grid 8x2 reads source columns 1, 3, ..., 15 -> grid cols 2..5
    m = heatmap_metrics(np.array([[1.0, 2.0]]), 16, 4, mask=mask, max_side=8)
    h = bilinear_reference(np.array([[1.0, 2.0]]), 2, 8)
    h = (h - h.min()) / (h.max() - h.min())
    assert m["uniform_mask"] == 0.5
    assert m["ratio_mask"] == pytest.approx(h[:, 2:6].sum() / h.sum(), abs=1e-15)


def test_box_iou_hand_cases():
    assert box_iou((0, 0, 4, 3), (0, 0, 4, 3)) == 1.0
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0  # touching edges
    assert box_iou((0, 0, 2, 1), (1, 0, 3, 1)) == pytest.approx(1 / 3, abs=1e-15)
    assert box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == 0.25


def test_capped_grid_matches_full_resolution():
    yy, xx = np.mgrid[0:7, 0:7]
    hm = np.exp(-((xx - 4.2) ** 2 + (yy - 2.5) ** 2) / 4.0)
    width, height = 1200, 600
    mask = np.zeros((height, width))
    mask[100:420, 500:1000] = 0.8
    up = bilinear_reference(hm, height, width)
    h = (up - up.min()) / (up.max() - up.min())
    aligned = (375, 75, 975, 450)  # multiples of 75 px = 32 grid px
    full = heatmap_metrics(hm, width, height, aligned, mask, max_side=width)
    assert full["ratio_bbox"] == pytest.approx(h[75:450, 375:975].sum() / h.sum(), abs=1e-12)
    assert full["ratio_mask"] == pytest.approx(h[100:420, 500:1000].sum() / h.sum(), abs=1e-12)
    capped = heatmap_metrics(hm, width, height, aligned, mask)
    assert capped["uniform_bbox"] == full["uniform_bbox"]
    assert capped["ratio_bbox"] == pytest.approx(full["ratio_bbox"], abs=1e-3)
    assert capped["ratio_mask"] == pytest.approx(full["ratio_mask"], abs=3e-3)
    assert capped["uniform_mask"] == pytest.approx(full["uniform_mask"], abs=3e-3)
    odd = (450.3, 80.7, 1030.2, 450.1)  # box edges fall between grid pixels
    a = heatmap_metrics(hm, width, height, odd, mask)
    b = heatmap_metrics(hm, width, height, odd, mask, max_side=width)
    assert a["ratio_bbox"] == pytest.approx(b["ratio_bbox"], abs=5e-3)
    assert a["iou"] == pytest.approx(b["iou"], abs=5e-3)
    np.testing.assert_allclose(pred_box(a), pred_box(b), atol=1200 / 512)


@pytest.mark.parametrize("bbox, match", [
    ((5, 2, 5, 6), "inverted"), ((6, 2, 4, 6), "inverted"), ((2, 6, 5, 2), "inverted"),
    ((20, 20, 30, 30), "outside"), ((-1.5, 0, 5, 5), "outside"), ((0, 0, 11, 8), "outside"),
    ((0, np.nan, 5, 5), "non-finite"),
])
def test_bad_bbox_raises(bbox, match):
    with pytest.raises(ValueError, match=match):
        heatmap_metrics(np.ones((2, 2)), 10, 8, bbox=bbox)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\(10, 8\).*\(8, 10\)"):
        heatmap_metrics(np.ones((2, 2)), 10, 8, mask=np.ones((10, 8)))
    with pytest.raises(ValueError, match="2-D"):
        heatmap_metrics(np.ones(4), 10, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        heatmap_metrics(np.ones((2, 2)), 10, 8, threshold=1.5)
    with pytest.raises(ValueError, match="positive integers"):
        heatmap_metrics(np.ones((2, 2)), 0, 8)
