"""MaxBoxAccV2 and PxAP (embcam.wsol) against hand-computed cases, scipy's labelling,
sklearn's average precision, torch's bilinear upsampling and a brute-force search over
every threshold; and the stream over a run folder against the accumulators fed by hand."""
import json

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.ndimage
import torch
from sklearn.metrics import average_precision_score

from embcam import wsol, wsol_run
from embcam.data.schemas import WSOL_COUNTERS_METADATA, conform
from embcam.metrics import heatmap_metrics, uniform_fractions

EIGHT = np.ones((3, 3), int)  # 8-connectivity for scipy.ndimage.label


def boxes_of(levels, k):
    """Sorted contour boxes of the foreground at tau_k, as tuples."""
    return sorted(map(tuple, wsol.contour_boxes(levels > k).tolist()))


# --- the map and its levels -------------------------------------------------------------------


def test_levels_are_the_number_of_thresholds_at_or_below_each_value():
    edges = np.array(wsol.PXAP_THRESHOLDS)
    rng = np.random.default_rng(0)
    # every threshold exactly, one ulp either side, and random values
    h = np.concatenate([edges, np.nextafter(edges, -1), np.nextafter(edges, 2), rng.uniform(size=5000)])
    h = np.clip(h, 0.0, 1.0)
    np.testing.assert_array_equal(wsol.levels_of(h), np.searchsorted(edges, h, side="right"))
    assert wsol.levels_of(np.array([0.0, 0.29, 0.5, 1.0])).tolist() == [1, 30, 51, 101]


def test_grid_levels_upsample_as_torch_and_flag_degenerate_maps():
    rng = np.random.default_rng(1)
    raw = rng.uniform(size=(5, 7))
    levels = wsol.grid_levels(raw, 37, 23)  # not a multiple of the map: half-pixel centres matter
    up = torch.nn.functional.interpolate(torch.from_numpy(raw)[None, None], size=(23, 37), mode="bilinear",
                                         align_corners=False)[0, 0].numpy()
    h = (up - up.min()) / (up.max() - up.min())
    want = np.searchsorted(np.array(wsol.PXAP_THRESHOLDS), h, side="right")
    near = np.abs(h * 100 - np.round(h * 100)) < 1e-9  # float rounding may move a value sitting on a threshold
    np.testing.assert_array_equal(levels[~near], want[~near])
    assert levels.max() == 101 and levels.min() == 1
    assert wsol.grid_levels(raw, 1200, 600).shape == (256, 512)  # the metrics grid: at most 512 a side
    assert wsol.grid_levels(np.full((3, 3), 2.0), 9, 9) is None
    assert wsol.grid_levels(np.array([[1.0, np.nan]]), 9, 9) is None


def test_grid_mask_is_the_metrics_grid_mask():
    rng = np.random.default_rng(2)
    mask = rng.uniform(size=(300, 1000))
    grid = wsol.grid_mask(mask, 1000, 300)
    assert grid.shape == (154, 512)
    assert grid.mean() == pytest.approx(uniform_fractions(1000, 300, mask=mask)[1], abs=1e-15)
    np.testing.assert_array_equal(wsol.grid_mask(mask[:20, :30], 30, 20), mask[:20, :30] >= 0.5)


# --- contour boxes -------------------------------------------------------------------------------------


def reference_boxes(binary):
    """Outer boxes: the 8-connected foreground components (scipy); hole boxes: each
    4-connected background component that does not touch the border, grown by one pixel
    (its border is traced on the foreground pixels around it)."""
    out = []
    labels, _ = scipy.ndimage.label(binary, EIGHT)
    for sl in scipy.ndimage.find_objects(labels):
        out.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    holes, _ = scipy.ndimage.label(~binary)
    for sl in scipy.ndimage.find_objects(holes):
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if y0 > 0 and x0 > 0 and y1 < binary.shape[0] and x1 < binary.shape[1]:
            out.append((x0 - 1, y0 - 1, x1 + 1, y1 + 1))
    return sorted(out)


def test_contour_boxes_are_every_component_and_every_hole():
    rng = np.random.default_rng(3)
    for _ in range(200):
        binary = rng.uniform(size=tuple(rng.integers(1, 30, 2))) < rng.uniform(0.2, 0.9)
        assert sorted(map(tuple, wsol.contour_boxes(binary).tolist())) == reference_boxes(binary)


def test_threshold_boxes_equal_contours_of_each_threshold():
    rng = np.random.default_rng(4)
    for _ in range(10):
        levels = wsol.grid_levels(rng.uniform(size=(4, 4)), int(rng.integers(5, 60)), int(rng.integers(5, 60)))
        boxes, owner = wsol.threshold_boxes(levels)
        for k in range(100):
            assert sorted(map(tuple, boxes[owner == k].tolist())) == boxes_of(levels, k)


# --- MaxBoxAccV2 on hand-computed images ------------------------------------------------------------


def two_blobs():
    """10 x 10: a 5 x 5 blob of 1.0 at the top left, a 3 x 3 blob of 0.6 in the bottom-right
    corner (touching the border) where the object is."""
    heat = np.zeros((10, 10))
    heat[:5, :5] = 1.0
    heat[7:, 7:] = 0.6
    return heat, (7.0, 7.0, 10.0, 10.0)


def test_best_box_is_not_the_largest_component_and_reaches_the_border():
    heat, gt = two_blobs()
    best = wsol.best_ious(wsol.grid_levels(heat, 10, 10), 10, 10, [gt])
    # tau = 0: the whole image (IoU 9/100); 0 < tau <= 0.6: the small blob's box is the object's,
    # edge to edge (IoU 1); tau > 0.6: only the large blob (IoU 0)
    np.testing.assert_allclose(best, [0.09] + [1.0] * 60 + [0.0] * 39)
    acc = wsol.MaxBoxAccV2()
    acc.add_ious(best)
    result = acc.result()
    assert result["value"] == 1.0
    assert [(p["iou"], p["accuracy"], p["threshold"]) for p in result["per_iou"]] == [
        (0.3, 1.0, 0.01), (0.5, 1.0, 0.01), (0.7, 1.0, 0.01)]
    # the paper's protocol (largest component at t = 0.2) picks the large blob
    assert heatmap_metrics(heat, 10, 10, gt)["loc_correct"] is False


def test_a_hole_border_is_a_box_too():
    """A ring two pixels thick around the object: its hole's border is the object's box."""
    heat = np.zeros((12, 12))
    heat[1:11, 1:11] = 1.0
    heat[3:9, 3:9] = 0.0
    gt = (2.0, 2.0, 10.0, 10.0)
    levels = wsol.grid_levels(heat, 12, 12)
    assert boxes_of(levels, 50) == [(1, 1, 11, 11), (2, 2, 10, 10)]
    best = wsol.best_ious(levels, 12, 12, [gt])
    np.testing.assert_allclose(best, [64 / 144] + [1.0] * 99)


def test_boxes_scale_from_the_grid_to_the_image():
    """A 1024 x 512 image has a 512 x 256 grid: a grid box (a, b, c, d) is (2a, 2b, 2c, 2d)."""
    heat = np.zeros((8, 8))
    heat[2:4, 4:8] = 1.0  # nearest cells; bilinear spreads them on the grid
    levels = wsol.grid_levels(heat, 1024, 512)
    assert levels.shape == (256, 512)
    (x0, y0, x1, y1), = wsol.contour_boxes(levels > 99)
    best = wsol.best_ious(levels, 1024, 512, [(2 * x0, 2 * y0, 2 * x1, 2 * y1)])
    assert best[99] == 1.0


def test_degenerate_map_is_counted_incorrect_at_every_threshold():
    acc = wsol.WsolAccumulator()
    acc.add(np.full((4, 4), 3.0), 8, 8, (0.0, 0.0, 8.0, 8.0))  # constant: no box, not even the image's
    heat, gt = two_blobs()
    acc.add(heat, 10, 10, gt)
    result = acc.result()["maxboxacc_v2"]
    assert (result["images"], result["degenerate"]) == (2, 1)
    assert [p["accuracy"] for p in result["per_iou"]] == [0.5, 0.5, 0.5]
    assert np.asarray(result["accuracy"])[:, 0].tolist() == [0.0, 0.0, 0.0]  # tau = 0: IoU 0.09 < 0.3


def test_best_ious_equal_a_brute_force_search_of_every_threshold():
    rng = np.random.default_rng(5)
    for _ in range(12):
        width, height = (int(v) for v in rng.integers(8, 90, 2))
        raw = rng.uniform(size=tuple(rng.integers(2, 8, 2))) ** 3
        x0, y0 = rng.uniform(0, 0.5, 2) * (width, height)
        x1, y1 = rng.uniform(0.5, 1, 2) * (width, height)
        gts = [(x0, y0, x1, y1)]
        up = cv2.resize(raw, (width, height), interpolation=cv2.INTER_LINEAR)
        h = (up - up.min()) / (up.max() - up.min())
        brute = []
        for k in range(100):
            binary = (h >= k / 100).astype(np.uint8)
            rects = [cv2.boundingRect(c) for c in cv2.findContours(binary, cv2.RETR_TREE,
                                                                   cv2.CHAIN_APPROX_SIMPLE)[0]]
            brute.append(max(wsol.box_ious([(x, y, x + w, y + hh) for x, y, w, hh in rects], gts).max(1)))
        levels = wsol.grid_levels(raw, width, height)
        np.testing.assert_allclose(wsol.best_ious(levels, width, height, gts), brute, rtol=0, atol=1e-12)
        # with a floor, values below it may be 0 (the boxes too small to reach it are not searched)
        fast = wsol.best_ious(levels, width, height, gts, floor=0.3)
        brute = np.array(brute)
        np.testing.assert_array_equal(fast[brute >= 0.3], brute[brute >= 0.3])
        assert np.all((fast[brute < 0.3] == 0) | (fast[brute < 0.3] == brute[brute < 0.3]))


def test_box_ious_by_hand():
    got = wsol.box_ious([(0, 0, 2, 2), (5, 5, 6, 6)], [(1, 1, 3, 3), (0, 0, 2, 2)])
    np.testing.assert_allclose(got, [[1 / 7, 1.0], [0.0, 0.0]])


# --- PxAP ------------------------------------------------------------------------------------------------


def test_pxap_by_hand():
    """1 x 4 image, H = (0, 0.5, 1, 0.25), mask on the 0.5 and 0.25 pixels. From tau = 1 down:
    {1}: P 0, R 0; {1, 0.5}: P 1/2, R 1/2; {1, 0.5, 0.25}: P 2/3, R 1; all: P 1/2, R 1.
    PxAP = 0 * 0 + 1/2 * 1/2 + 2/3 * 1/2 + 1/2 * 0 = 7/12."""
    acc = wsol.PxAP()
    acc.add_levels(wsol.grid_levels(np.array([[0.0, 0.5, 1.0, 0.25]]), 4, 1), np.array([[0, 1, 0, 1]], bool))
    result = acc.result()
    assert result["value"] == pytest.approx(7 / 12, abs=1e-15)
    assert (result["images"], result["mask_pixels"], result["pixels"]) == (1, 2, 4)
    curve = acc.curve()
    assert curve["tp"][[0, 25, 26, 50, 51, 100]].tolist() == [2, 2, 1, 1, 0, 0]
    assert curve["fp"][[0, 1, 100]].tolist() == [2, 1, 1]


def test_pxap_pools_pixels_over_images_as_sklearn_average_precision():
    """Pixel counts summed over images, then one curve: sklearn's AP of the pooled pixels
    scored by their level (a degenerate map scores 0, i.e. level 1)."""
    rng = np.random.default_rng(6)
    acc, truth, scores = wsol.PxAP(), [], []
    for i in range(6):
        width, height = (int(v) for v in rng.integers(5, 40, 2))
        raw = np.full((3, 3), 0.5) if i == 2 else rng.uniform(size=(3, 4))
        mask = rng.uniform(size=(height, width))
        levels = wsol.grid_levels(raw, width, height)
        grid = wsol.grid_mask(mask, width, height)
        acc.add_levels(levels, grid)
        truth.append(grid.ravel())
        scores.append(np.full(grid.size, wsol.DEGENERATE_LEVEL) if levels is None else levels.ravel())
    want = average_precision_score(np.concatenate(truth), np.concatenate(scores))
    assert acc.result()["value"] == pytest.approx(want, abs=1e-12)
    assert acc.result()["degenerate"] == 1


def test_pxap_without_mask_pixels_has_no_value():
    acc = wsol.PxAP()
    acc.add_levels(wsol.grid_levels(np.eye(3), 3, 3), np.zeros((3, 3), bool))
    assert acc.result()["value"] is None


def test_accumulators_merge_to_the_whole():
    rng = np.random.default_rng(7)
    images = [(rng.uniform(size=(4, 4)), (2.0, 3.0, 20.0, 18.0), rng.uniform(size=(24, 30)))
              for _ in range(6)]
    whole, a, b = wsol.WsolAccumulator(), wsol.WsolAccumulator(), wsol.WsolAccumulator()
    for i, (heat, box, mask) in enumerate(images):
        whole.add(heat, 30, 24, box, mask)
        (a if i % 2 else b).add(heat, 30, 24, box, mask)
    assert a.merge(b).result() == whole.result()


# --- a run folder, in a stream ---------------------------------------------------------------------


def write_annotated_run(root):
    """A run folder of 9 rows in 3 results files: boxes and masks in the manifest (mask PNGs),
    an error row, rows without a box or a mask, a train row, a degenerate map, a missing mask.
    Returns (run, the images to evaluate by hand: (heat, width, height, box, mask) per id)."""
    rng = np.random.default_rng(8)
    (root / "masks").mkdir(parents=True)
    manifest, results, truth = [], [], {}
    for i in range(9):
        image_id = f"im{i}"
        width, height = 20 + 3 * i, 16 + 2 * i
        heat = np.full((4, 4), 0.25) if i == 5 else rng.uniform(size=(4, 4))
        box = None if i == 3 else (1.0 + i, 2.0, width - 2.0, height - 1.0 - i)
        mask = (rng.uniform(size=(height, width)) < 0.4).astype(np.uint8) * 255
        mask_uri = None if i == 4 else f"masks/{image_id}.png"
        if i != 7:  # im7's mask file is missing
            cv2.imwrite(str(root / "masks" / f"{image_id}.png"), mask)
        split = "train" if i == 6 else "eval"
        manifest.append(dict(image_id=image_id, uri=f"images/{image_id}.png", label="a", split=split,
                             mask_uri=mask_uri, **dict(zip(("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"),
                                                           box or (None,) * 4))))
        if i == 8:
            results.append(dict(image_id=image_id, split=split, status="error", error="decode: boom",
                                proxy_kind="mean"))
            continue
        results.append(dict(image_id=image_id, label="a", split=split, status="ok", width=width, height=height,
                            proxy_kind="mean", heatmap=heat.ravel().tolist(), heatmap_height=4,
                            heatmap_width=4, degenerate=i == 5))
        if split == "eval":
            truth[image_id] = (heat, width, height, box,
                               None if mask_uri is None or i == 7 else mask / 255.0)
    pq.write_table(pa.Table.from_pylist(manifest), root / "manifest.parquet")
    (root / "run" / "results").mkdir(parents=True)
    for k in range(3):
        pq.write_table(conform(results[k::3], "results"), root / "run" / "results" / f"part-{k}.parquet")
    config = {"proxy": "mean", "manifest": str(root / "manifest.parquet"), "image_root": str(root)}
    (root / "run" / "summary.json").write_text(json.dumps({"config": config}))
    return str(root / "run"), truth


def test_evaluate_run_equals_the_accumulators_fed_by_hand(tmp_path):
    run, truth = write_annotated_run(tmp_path)
    want = wsol.WsolAccumulator()
    for heat, width, height, box, mask in truth.values():
        want.add(heat.astype(np.float32), width, height, box, mask)
    expected = want.result()
    for batch_rows in (1, 1000):
        got = wsol_run.evaluate_run(run, "eval", batch_rows=batch_rows)
        assert got["rows"] == 7  # ok rows of split eval: im0-im5, im7
        assert got["maxboxacc_v2"] == expected["maxboxacc_v2"]
        pxap = dict(got["pxap"])
        assert pxap.pop("masks_unreadable") == 1 and "im7" in pxap.pop("mask_error")
        assert pxap == expected["pxap"]
    assert expected["maxboxacc_v2"]["images"] == 6 and expected["maxboxacc_v2"]["degenerate"] == 1
    assert expected["pxap"]["images"] == 5  # im4 has no mask, im7's cannot be read
    everything = wsol_run.evaluate_run(run)  # no split: the train row im6 too
    assert everything["rows"] == 8 and everything["maxboxacc_v2"]["images"] == 7
    assert everything["files"] == {"results": 3, "measured": 3}  # written without counters: measured

    # one file with the job's counters (part-0: im0, im3 and the train row im6), two without
    part = tmp_path / "run" / "results" / "part-0.parquet"
    table = pq.read_table(part)
    train = (np.random.default_rng(8).uniform(size=(4, 4)).astype(np.float32), 38, 28, (7.0, 2.0, 36.0, 21.0))
    counts = [wsol.image_counts(truth[i][0].astype(np.float32), *truth[i][1:]) if i in truth
              else wsol.image_counts(*train) for i in ("im0", "im3", "im6")]
    metadata = wsol.counters_metadata(table.column("split").to_pylist(), counts)
    pq.write_table(table.replace_schema_metadata({WSOL_COUNTERS_METADATA: metadata}), part)
    got = wsol_run.evaluate_run(run, "eval")
    assert got["files"] == {"results": 3, "measured": 2} and got["rows"] == 7
    assert got["maxboxacc_v2"] == expected["maxboxacc_v2"]
    assert {k: v for k, v in got["pxap"].items() if k not in ("masks_unreadable", "mask_error")} == expected["pxap"]
    assert wsol_run.evaluate_run(run)["maxboxacc_v2"]["images"] == 7


def test_evaluate_run_without_a_manifest_says_so(tmp_path):
    run, _ = write_annotated_run(tmp_path)
    (tmp_path / "manifest.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        wsol_run.evaluate_run(run)


def test_counters_of_pieces_sum_by_hand(tmp_path):
    """Two results files whose stored counters hold hand-made images; no manifest is needed.
    Boxes, split eval: A (file 1) IoU 0.8 for tau < 0.1 and 0.4 above; B (file 2) degenerate;
    C (file 2) 0 for tau < 0.5 and 0.75 above. delta = 0.3: {A} below 0.5, {A, C} from 0.5:
    2/3 at tau = 0.5; delta = 0.5 and 0.7: 1/3 at tau = 0 (A), as at 0.5 (C). MaxBoxAccV2 =
    (2/3 + 1/3 + 1/3) / 3 = 4/9. Masks, split eval: D (file 1) 2 mask pixels at level 101
    (H = 1) and 2 others at level 1 (H < 0.01); E (file 2) 1 mask pixel and 1 other at level 51.
    Summed: tau = 0: TP = 3, FP = 3 (P = 1/2, R = 1); 0 < tau <= 0.5: TP = 3, FP = 1 (P = 3/4,
    R = 1); tau > 0.5: TP = 2, FP = 0 (P = 1, R = 2/3), so PxAP = 1/2 (1 - 1) + 3/4 (1 - 2/3)
    + 1 (2/3 - 0) = 11/12. A train row in file 2 with a box correct everywhere counts only
    without a split."""
    def box(ious):
        return wsol.ImageCounts(np.array(ious, np.float64), None, None, False)

    def mask(inside, outside):
        inside_counts, total = np.zeros(wsol.LEVELS, np.int64), np.zeros(wsol.LEVELS, np.int64)
        for level, n in inside.items():
            inside_counts[level] += n
            total[level] += n
        for level, n in outside.items():
            total[level] += n
        return wsol.ImageCounts(None, inside_counts, total, False)

    degenerate = wsol.ImageCounts(np.zeros(100), None, None, True)
    files = [[("eval", box([0.8] * 10 + [0.4] * 90)), ("eval", mask({101: 2}, {1: 2})), ("eval", None)],
             [("eval", degenerate), ("eval", box([0.0] * 50 + [0.75] * 50)), ("eval", mask({51: 1}, {51: 1})),
              ("train", box([1.0] * 100))]]
    (tmp_path / "results").mkdir()
    for k, rows in enumerate(files):
        table = conform([dict(image_id=f"f{k}r{i}", split=split, status="ok", proxy_kind="mean")
                         for i, (split, _) in enumerate(rows)], "results")
        value = wsol.counters_metadata([split for split, _ in rows], [c for _, c in rows])
        pq.write_table(table.replace_schema_metadata({WSOL_COUNTERS_METADATA: value}),
                       tmp_path / "results" / f"part-{k}.parquet")
    got = wsol_run.evaluate_run(str(tmp_path), "eval")
    assert got["files"] == {"results": 2, "measured": 0} and got["rows"] == 6
    boxes = got["maxboxacc_v2"]
    assert (boxes["images"], boxes["degenerate"]) == (3, 1)
    assert [(p["accuracy"], p["threshold"]) for p in boxes["per_iou"]] == [(2 / 3, 0.5), (1 / 3, 0.0), (1 / 3, 0.0)]
    assert boxes["value"] == pytest.approx(4 / 9, abs=1e-15)
    assert got["pxap"]["value"] == pytest.approx(11 / 12, abs=1e-15)
    assert (got["pxap"]["images"], got["pxap"]["mask_pixels"], got["pxap"]["pixels"]) == (2, 3, 6)
    everything = wsol_run.evaluate_run(str(tmp_path))
    assert everything["rows"] == 7 and everything["maxboxacc_v2"]["images"] == 4
    assert [p["accuracy"] for p in everything["maxboxacc_v2"]["per_iou"]] == [3 / 4, 1 / 2, 1 / 2]
