"""The job's read blocks (embcam.job.image_source): a range where a column has no value at all
(no label, no error, no mask uri) still carries the column's type, so the model stage gets None,
not Ray Data's float NaN for an untyped column: a NaN label would be a class of its own, and
an error column of floats no longer concatenates with another block's strings."""
import cv2
import numpy as np
import pyarrow as pa
from ray.data.block import BlockAccessor

from embcam.data.fetch import ReadLimits
from embcam.data.runstate import ManifestCopy, RunFolder
from embcam.data.schemas import conform, typed_nulls
from embcam.job import image_source


def test_a_range_without_labels_errors_or_masks_keeps_their_types(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(4):
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), np.full((20, 30, 3), 40 * i, np.uint8))
        rows.append(dict(image_id=f"img{i}", uri=f"images/{i}.png", label="a" if i >= 2 else None))
    run = RunFolder(str(tmp_path / "run"))
    copy = ManifestCopy(run, block_rows=2)
    copy.write(conform(pa.Table.from_pylist(rows), "manifest"))
    copy.close()

    (block,) = image_source._read(0, 2, (copy, run, str(tmp_path), 16, ReadLimits(), True))  # rows 0-1: no label
    types = {field.name: field.type for field in block.schema}
    assert types["label"] == types["error"] == types["mask_uri"] == pa.string()
    batch = BlockAccessor.for_block(block).to_batch_format("numpy")
    for column in ("label", "error", "mask_uri"):
        assert batch[column].tolist() == [None, None], column
    assert batch["mask_png"].tolist() == [b"", b""]  # no mask
    assert batch["status"].tolist() == ["ok", "ok"] and batch["image"].shape == (2, 16, 16, 3)
    (labelled,) = image_source._read(2, 4, (copy, run, str(tmp_path), 16, ReadLimits(), True))
    assert BlockAccessor.for_block(labelled).to_batch_format("numpy")["label"].tolist() == ["a", "a"]


def test_typed_nulls_types_only_untyped_columns():
    table = pa.table({"error": pa.nulls(3), "label": pa.array(["a", None, "b"]), "x": pa.array([1.0, None, 2.0])})
    typed = typed_nulls(table)
    assert typed.schema == pa.schema([("error", pa.string()), ("label", pa.string()), ("x", pa.float64())])
    assert typed.column("error").null_count == 3 and typed.column("label").equals(table.column("label"))
