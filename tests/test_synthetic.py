"""Tests for the synthetic CUB-like dataset generator."""
import re

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embcam.datasets import generate_dataset, summary
from embcam.datasets.synthetic import (
    MAX_CLASSES,
    class_names,
    class_spec,
    render_sample,
    tight_box,
)

NUM_CLASSES = 10
PER_CLASS = 6
MIN_SIDE, MAX_SIDE = 80, 130


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    path = generate_dataset(out, num_classes=NUM_CLASSES, images_per_class=PER_CLASS,
                            min_side=MIN_SIDE, max_side=MAX_SIDE, seed=3)
    return path, pq.read_table(path).to_pylist()


def _read(root, uri, flags=cv2.IMREAD_UNCHANGED):
    array = cv2.imread(str(root / uri), flags)
    assert array is not None, uri
    return array


def test_manifest_schema_and_rows(dataset):
    path, rows = dataset
    assert path.name == "manifest.parquet"
    schema = pq.read_schema(path)
    expected = [("image_id", pa.string()), ("uri", pa.string()), ("label", pa.string()),
                ("bbox_x0", pa.float64()), ("bbox_y0", pa.float64()),
                ("bbox_x1", pa.float64()), ("bbox_y1", pa.float64()),
                ("mask_uri", pa.string()), ("split", pa.string())]
    assert [(f.name, f.type) for f in schema] == expected
    assert len(rows) == NUM_CLASSES * PER_CLASS
    names = class_names(NUM_CLASSES, seed=3)
    expected_ids = [f"c{c:03d}_{i:04d}" for c in range(NUM_CLASSES) for i in range(PER_CLASS)]
    assert [r["image_id"] for r in rows] == expected_ids
    for row in rows:
        c = int(row["image_id"][1:4])
        assert row["label"] == names[c]
        assert row["uri"] == f"images/{names[c]}/{row['image_id']}.jpg"
        assert row["mask_uri"] == f"masks/{names[c]}/{row['image_id']}.png"
        assert row["split"] == ("train" if c < NUM_CLASSES / 2 else "eval")


def test_images_masks_and_boxes(dataset):
    path, rows = dataset
    root = path.parent
    occluded = 0
    for row in rows:
        image = _read(root, row["uri"], cv2.IMREAD_COLOR)
        mask = _read(root, row["mask_uri"])
        height, width = image.shape[:2]
        assert MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE
        assert mask.shape == (height, width) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        ys, xs = np.nonzero(mask)
        # Visible mask inside the box (continuous coords: pixel i spans [i, i+1)).
        assert row["bbox_x0"] <= xs.min() and xs.max() + 1 <= row["bbox_x1"]
        assert row["bbox_y0"] <= ys.min() and ys.max() + 1 <= row["bbox_y1"]
        assert 0 <= row["bbox_x0"] < row["bbox_x1"] <= width
        assert 0 <= row["bbox_y0"] < row["bbox_y1"] <= height

        # The box is tight around the full (pre-occlusion) silhouette.
        c, i = int(row["image_id"][1:4]), int(row["image_id"][5:])
        sample = render_sample(c, i, seed=3, min_side=MIN_SIDE, max_side=MAX_SIDE)
        sy, sx = np.nonzero(sample.silhouette)
        assert (row["bbox_x0"], row["bbox_y0"], row["bbox_x1"], row["bbox_y1"]) == (
            sx.min(), sy.min(), sx.max() + 1, sy.max() + 1)
        np.testing.assert_array_equal(mask > 0, sample.mask)
        assert not (sample.mask & ~sample.silhouette).any()
        assert sample.mask.sum() >= 0.5 * sample.silhouette.sum()
        occluded += int(sample.mask.sum() < sample.silhouette.sum())
    assert 0 < occluded < len(rows)


def test_box_fraction_and_summary(dataset):
    path, rows = dataset
    root = path.parent
    box_fractions, mask_fractions = [], []
    for row in rows:
        mask = _read(root, row["mask_uri"])
        area = mask.shape[0] * mask.shape[1]
        box = (row["bbox_x1"] - row["bbox_x0"]) * (row["bbox_y1"] - row["bbox_y0"])
        box_fractions.append(box / area)
        mask_fractions.append((mask == 255).sum() / area)
    assert 0.1 < np.mean(box_fractions) < 0.6
    assert min(box_fractions) > 0.03 and max(box_fractions) < 0.95
    assert np.mean(mask_fractions) < np.mean(box_fractions)

    stats = summary(path)
    assert stats["images"] == NUM_CLASSES * PER_CLASS
    assert stats["classes"] == NUM_CLASSES
    half = NUM_CLASSES // 2
    assert stats["splits"] == {"eval": {"images": half * PER_CLASS, "classes": half},
                               "train": {"images": half * PER_CLASS, "classes": half}}
    assert stats["images_with_box"] == stats["images_with_mask"] == len(rows)
    assert stats["mean_box_fraction"] == pytest.approx(np.mean(box_fractions), rel=1e-12)
    assert stats["mean_mask_fraction"] == pytest.approx(np.mean(mask_fractions), rel=1e-12)


def test_classes_are_distinct(dataset):
    """Nearest class mean on a colour histogram of the object separates classes."""
    path, rows = dataset
    root = path.parent
    features, labels = [], []
    for row in rows:
        image = _read(root, row["uri"], cv2.IMREAD_COLOR)
        mask = _read(root, row["mask_uri"])
        hist = cv2.calcHist([image], [0, 1, 2], mask, [4, 4, 4], [0, 256] * 3).ravel()
        features.append(hist / hist.sum())
        labels.append(row["label"])
    features, labels = np.array(features), np.array(labels)
    classes = sorted(set(labels))
    correct = 0
    for k in range(len(labels)):  # leave-one-out nearest centroid
        keep = np.arange(len(labels)) != k
        centroids = np.array([features[keep & (labels == c)].mean(axis=0) for c in classes])
        guess = classes[int(np.argmin(np.linalg.norm(centroids - features[k], axis=1)))]
        correct += guess == labels[k]
    assert correct / len(labels) >= 0.8  # chance is 0.1


def test_deterministic_and_subset(tmp_path, dataset):
    path, rows = dataset
    again = generate_dataset(tmp_path / "again", num_classes=NUM_CLASSES,
                             images_per_class=PER_CLASS, min_side=MIN_SIDE,
                             max_side=MAX_SIDE, seed=3)
    assert again.read_bytes() == path.read_bytes()
    for row in rows[::7]:
        for uri in (row["uri"], row["mask_uri"]):
            assert (again.parent / uri).read_bytes() == (path.parent / uri).read_bytes()

    subset = generate_dataset(tmp_path / "subset", num_classes=NUM_CLASSES,
                              images_per_class=PER_CLASS, classes=[7, 2],
                              min_side=MIN_SIDE, max_side=MAX_SIDE, seed=3)
    subset_rows = pq.read_table(subset).to_pylist()
    expected = [r for r in rows if r["image_id"][:4] in ("c002", "c007")]
    assert subset_rows == expected
    for row in subset_rows:
        np.testing.assert_array_equal(_read(subset.parent, row["uri"]), _read(path.parent, row["uri"]))
    assert not (subset.parent / "images" / class_names(NUM_CLASSES, seed=3)[0]).exists()

    other_seed = render_sample(2, 0, seed=4, min_side=MIN_SIDE, max_side=MAX_SIDE)
    same_seed = render_sample(2, 0, seed=3, min_side=MIN_SIDE, max_side=MAX_SIDE)
    assert other_seed.image.shape != same_seed.image.shape or not np.array_equal(
        other_seed.image, same_seed.image)


def test_class_names_and_specs():
    names = class_names()
    assert len(names) == 100 and len(set(names)) == 100
    for name in names:
        assert re.fullmatch(r"c\d{3}_[a-z]+_[a-z]+_[a-z]+-[a-z]+", name), name
    assert class_names(5) == names[:5]  # a class does not depend on the class count
    specs = [class_spec(c) for c in range(MAX_CLASSES)]
    signatures = {(s.shape, s.texture, frozenset((s.colour_a, s.colour_b))) for s in specs}
    assert len(signatures) == MAX_CLASSES
    assert all(s.colour_a != s.colour_b for s in specs)
    # The first 66 classes all have different palettes.
    assert len({frozenset((s.colour_a, s.colour_b)) for s in specs[:66]}) == 66
    with pytest.raises(ValueError, match="num_classes"):
        class_names(MAX_CLASSES + 1)


def test_tight_box_convention():
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:5] = True
    assert tight_box(mask) == (2.0, 1.0, 5.0, 4.0)
    assert tight_box(np.ones((6, 8), bool)) == (0.0, 0.0, 8.0, 6.0)
    with pytest.raises(ValueError, match="empty"):
        tight_box(np.zeros((3, 3), bool))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="class index 10"):
        generate_dataset(tmp_path, num_classes=10, classes=[10])
    with pytest.raises(ValueError, match="no class"):
        generate_dataset(tmp_path, num_classes=10, classes=[])
    with pytest.raises(ValueError, match="images_per_class"):
        generate_dataset(tmp_path, num_classes=10, images_per_class=0)
    with pytest.raises(ValueError, match="min_side"):
        generate_dataset(tmp_path, num_classes=10, min_side=200, max_side=100)
