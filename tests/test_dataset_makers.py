"""Tests for the CUB-200-2011 and folder-per-class manifest makers."""
import os
import pathlib

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embcam.datasets import cub_manifest, folder_manifest, manifest_uri

# (class_id, class name) on both sides of the train/eval boundary at 100.
CLASSES = [(1, "001.Black_footed_Albatross"), (100, "100.Brown_Pelican"),
           (101, "101.White_Pelican"), (200, "200.Common_Yellowthroat")]
# image_id -> (class_id, file name, (x, y, width, height)); listed out of id order.
IMAGES = {
    3: (100, "Brown_Pelican_0001_94.jpg", (0.0, 0.0, 24.0, 16.0)),
    1: (1, "Black_Footed_Albatross_0046_18.jpg", (10.5, 2.0, 8.25, 9.0)),
    2: (1, "Black_Footed_Albatross_0002_55.jpg", (3.0, 4.0, 5.0, 6.0)),
    4: (100, "Brown_Pelican_0002_12.jpg", (1.0, 1.0, 1.0, 1.0)),
    5: (101, "White_Pelican_0001_97.jpg", (2.0, 3.0, 20.0, 10.5)),
    6: (101, "White_Pelican_0002_98.jpg", (0.0, 0.0, 0.0, 0.0)),
    7: (200, "Common_Yellowthroat_0001_19.jpg", (4.0, 5.0, 6.0, 7.0)),
    8: (200, "Common_Yellowthroat_0002_20.jpg", (0.25, 0.5, 0.75, 1.0)),
}
CLASS_NAMES = dict(CLASSES)


def _relative(image_id):
    class_id, name, _ = IMAGES[image_id]
    return f"{CLASS_NAMES[class_id]}/{name}"


def _write_jpeg(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((16, 24, 3), value, np.uint8))


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


@pytest.fixture
def cub(tmp_path):
    """A tiny CUB tree: tmp/CUB_200_2011/... and tmp/segmentations/ (sibling, as the
    separate archive unpacks), with a segmentation for images 1 and 5 only."""
    root = tmp_path / "CUB_200_2011"
    root.mkdir()
    _write_lines(root / "images.txt", [f"{i} {_relative(i)}" for i in IMAGES])
    _write_lines(root / "image_class_labels.txt", [f"{i} {c}" for i, (c, _, _) in IMAGES.items()])
    _write_lines(root / "classes.txt", [f"{c} {name}" for c, name in CLASSES])
    # Boxes in a different line order than images.txt; the values are written as
    # CUB writes them (floats with one decimal, or more).
    _write_lines(root / "bounding_boxes.txt",
                 [f"{i} {x} {y} {w} {h}" for i, (_, _, (x, y, w, h)) in sorted(IMAGES.items())])
    _write_lines(root / "train_test_split.txt", [f"{i} {i % 2}" for i in IMAGES])
    for i in IMAGES:
        _write_jpeg(root / "images" / _relative(i), 10 * i)
    for i in (1, 5):
        mask = (tmp_path / "segmentations" / _relative(i)).with_suffix(".png")
        mask.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(mask), np.full((16, 24), 255, np.uint8))
    return root


def test_cub_manifest_rows(cub, tmp_path):
    out = cub_manifest(cub, tmp_path / "manifest.parquet")
    assert out == tmp_path / "manifest.parquet"
    schema = pq.read_schema(out)
    assert [(f.name, f.type) for f in schema] == [
        ("image_id", pa.string()), ("uri", pa.string()), ("label", pa.string()),
        ("bbox_x0", pa.float64()), ("bbox_y0", pa.float64()),
        ("bbox_x1", pa.float64()), ("bbox_y1", pa.float64()),
        ("mask_uri", pa.string()), ("split", pa.string())]
    rows = pq.read_table(out).to_pylist()
    assert [r["image_id"] for r in rows] == ["3", "1", "2", "4", "5", "6", "7", "8"]
    by_id = {r["image_id"]: r for r in rows}
    assert by_id["1"] == {
        "image_id": "1",
        "uri": "CUB_200_2011/images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg",
        "label": "001.Black_footed_Albatross",
        "bbox_x0": 10.5, "bbox_y0": 2.0, "bbox_x1": 18.75, "bbox_y1": 11.0,
        "mask_uri": "segmentations/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.png",
        "split": "train",
    }
    assert (by_id["8"]["bbox_x0"], by_id["8"]["bbox_y0"], by_id["8"]["bbox_x1"],
            by_id["8"]["bbox_y1"]) == (0.25, 0.5, 1.0, 1.5)
    assert (by_id["3"]["bbox_x1"], by_id["3"]["bbox_y1"]) == (24.0, 16.0)  # whole image
    assert {r["image_id"]: r["split"] for r in rows} == {
        "1": "train", "2": "train", "3": "train", "4": "train",
        "5": "eval", "6": "eval", "7": "eval", "8": "eval"}
    assert by_id["4"]["label"] == "100.Brown_Pelican" and by_id["5"]["label"] == "101.White_Pelican"
    assert by_id["5"]["mask_uri"] == "segmentations/101.White_Pelican/White_Pelican_0001_97.png"
    assert [i for i, r in by_id.items() if r["mask_uri"] is None] == ["3", "2", "4", "6", "7", "8"]
    for row in rows:  # every uri resolves against the manifest's directory
        image = cv2.imread(str(out.parent / row["uri"]))
        assert image is not None and image[0, 0, 0] == 10 * int(row["image_id"])


def test_cub_manifest_elsewhere_and_segmentation_roots(cub, tmp_path):
    # Written inside the CUB root: uris start with images/; masks from the sibling.
    inside = cub_manifest(cub, cub / "manifest.parquet")
    row = pq.read_table(inside).to_pylist()[1]
    assert row["uri"] == "images/" + _relative(1)
    assert row["mask_uri"] == os.path.abspath(
        (tmp_path / "segmentations" / _relative(1)).with_suffix(".png"))

    # Written in an unrelated folder: absolute paths that exist.
    other = cub_manifest(cub, tmp_path / "out" / "deep" / "m.parquet")
    row = pq.read_table(other).to_pylist()[1]
    assert pathlib.Path(row["uri"]).is_absolute() and pathlib.Path(row["uri"]).is_file()
    assert pathlib.Path(row["mask_uri"]).is_file()

    # <cub_root>/segmentations wins over the sibling; explicit roots are used as given.
    (tmp_path / "segmentations").rename(cub / "segmentations")
    rows = pq.read_table(cub_manifest(cub, cub / "m2.parquet")).to_pylist()
    assert rows[1]["mask_uri"] == "segmentations/" + _relative(1)[:-4] + ".png"
    explicit = tmp_path / "my_masks"
    mask = (explicit / _relative(7)).with_suffix(".png")
    mask.parent.mkdir(parents=True)
    assert cv2.imwrite(str(mask), np.zeros((16, 24), np.uint8))
    rows = pq.read_table(cub_manifest(cub, tmp_path / "m3.parquet",
                                      segmentations_root=explicit)).to_pylist()
    assert [r["image_id"] for r in rows if r["mask_uri"]] == ["7"]
    assert rows[6]["mask_uri"] == "my_masks/" + _relative(7)[:-4] + ".png"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cub_manifest(cub, tmp_path / "m4.parquet", segmentations_root=tmp_path / "nowhere")


def test_cub_without_segmentations(cub, tmp_path):
    import shutil
    shutil.rmtree(tmp_path / "segmentations")
    rows = pq.read_table(cub_manifest(cub, tmp_path / "m.parquet")).to_pylist()
    assert all(r["mask_uri"] is None for r in rows) and len(rows) == 8


@pytest.mark.parametrize(
    "file_name, line_number, bad_line, message",
    [
        ("bounding_boxes.txt", 3, "3 0.0 0.0 24.0", "4 fields instead of 5"),
        ("bounding_boxes.txt", 2, "2 3.0 4.0 five 6.0", "could not convert"),
        ("bounding_boxes.txt", 1, "1 3.0 4.0 -5.0 6.0", "negative"),
        ("bounding_boxes.txt", 1, "1 3.0 nan 5.0 6.0", "non-finite"),
        ("images.txt", 2, "x1 some/path.jpg", "not a positive integer"),
        ("images.txt", 4, "4", "too few fields"),
        ("images.txt", 4, "4 a.jpg b.jpg", "too many fields"),
        ("image_class_labels.txt", 5, "5 one", "not a positive integer"),
        ("classes.txt", 2, "100 Brown Pelican", "too many fields"),
    ],
)
def test_cub_malformed_line(cub, tmp_path, file_name, line_number, bad_line, message):
    path = cub / file_name
    lines = path.read_text().splitlines()
    lines[line_number - 1] = bad_line
    _write_lines(path, lines)
    with pytest.raises(ValueError, match=rf"{file_name}:{line_number}: malformed.*{message}"):
        cub_manifest(cub, tmp_path / "m.parquet")


def test_cub_inconsistent_files(cub, tmp_path):
    labels = cub / "image_class_labels.txt"
    original = labels.read_text()
    _write_lines(labels, original.splitlines() + ["3 100"])
    with pytest.raises(ValueError, match=r"image_class_labels.txt:9: duplicate id 3 \(first on line 1\)"):
        cub_manifest(cub, tmp_path / "m.parquet")
    _write_lines(labels, original.splitlines()[1:])  # image 3 loses its label
    with pytest.raises(ValueError, match=r"images.txt:1: image 3 has no line in image_class_labels"):
        cub_manifest(cub, tmp_path / "m.parquet")
    _write_lines(labels, original.splitlines()[:-1] + ["8 150"])
    with pytest.raises(ValueError, match=r"image_class_labels.txt:8: class 150 is not in classes.txt"):
        cub_manifest(cub, tmp_path / "m.parquet")
    labels.write_text(original)
    boxes = cub / "bounding_boxes.txt"
    _write_lines(boxes, boxes.read_text().splitlines()[:-1])
    with pytest.raises(ValueError, match=r"images.txt:8: image 8 has no line in bounding_boxes"):
        cub_manifest(cub, tmp_path / "m.parquet")
    boxes.unlink()
    with pytest.raises(FileNotFoundError, match="bounding_boxes.txt is missing"):
        cub_manifest(cub, tmp_path / "m.parquet")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        cub_manifest(tmp_path / "missing", tmp_path / "m.parquet")


def test_manifest_uri(tmp_path):
    assert manifest_uri(tmp_path / "a" / "b.jpg", tmp_path) == "a/b.jpg"
    assert manifest_uri(tmp_path / "a" / ".." / "b.jpg", tmp_path) == "b.jpg"
    assert manifest_uri(tmp_path / "b.jpg", tmp_path / "a") == (tmp_path / "b.jpg").as_posix()


def test_folder_manifest(tmp_path):
    root = tmp_path / "photos"
    for relative in ["dogs/b.jpg", "dogs/a.PNG", "cats/x/deep.webp", "cats/y.tiff",
                     "birds/z.jpeg"]:
        _write_jpeg(root / relative, 1)  # content does not matter, only names
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "dogs" / ".hidden.jpg").write_bytes(b"")
    (root / ".cache").mkdir()
    (root / ".cache" / "c.jpg").write_bytes(b"")
    (root / "loose.jpg").write_bytes(b"")  # not in a class folder
    out = folder_manifest(root, tmp_path / "manifest.parquet")
    table = pq.read_table(out)
    assert table.schema.names == ["image_id", "uri", "label"]
    assert table.to_pylist() == [
        {"image_id": "birds/z.jpeg", "uri": "photos/birds/z.jpeg", "label": "birds"},
        {"image_id": "cats/x/deep.webp", "uri": "photos/cats/x/deep.webp", "label": "cats"},
        {"image_id": "cats/y.tiff", "uri": "photos/cats/y.tiff", "label": "cats"},
        {"image_id": "dogs/a.PNG", "uri": "photos/dogs/a.PNG", "label": "dogs"},
        {"image_id": "dogs/b.jpg", "uri": "photos/dogs/b.jpg", "label": "dogs"},
    ]
    again = folder_manifest(root, tmp_path / "again.parquet")
    assert again.read_bytes() == out.read_bytes()

    only_jpg = pq.read_table(folder_manifest(root, root / "m.parquet", extensions=("jpg",)))
    assert only_jpg.to_pylist() == [{"image_id": "dogs/b.jpg", "uri": "dogs/b.jpg", "label": "dogs"}]

    with pytest.raises(ValueError, match="no images"):
        folder_manifest(root, tmp_path / "m.parquet", extensions=(".gif",))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        folder_manifest(tmp_path / "nope", tmp_path / "m.parquet")
