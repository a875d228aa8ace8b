"""The run folder: pieces, pending ranges, the manifest copy, whole-file commits."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embcam.data.manifest import ManifestError, scan_manifest
from embcam.data.runstate import (
    ManifestCopy,
    RunFolder,
    RunWriteError,
    covered,
    identity_differences,
    pending_blocks,
    piece_name,
)


def test_pending_blocks_are_the_uncovered_rows_cut_at_block_boundaries():
    assert pending_blocks([], 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert pending_blocks([(0, 4), (8, 10)], 10, 4) == [(4, 8)]
    # a piece that ends inside a block: the rest of that block, then whole blocks
    assert pending_blocks([(0, 3), (5, 6)], 10, 4) == [(3, 4), (4, 5), (6, 8), (8, 10)]
    assert pending_blocks([(0, 10)], 10, 4) == []


def test_covered_counts_rows_and_refuses_overlaps():
    assert covered([(0, 3), (3, 5), (7, 9)], 10) == 7
    with pytest.raises(RuntimeError, match="overlap"):
        covered([(0, 4), (3, 5)], 10)
    with pytest.raises(RuntimeError, match="outside"):
        covered([(8, 12)], 10)


def test_pieces_are_committed_whole_and_listed_by_rows(tmp_path):
    run = RunFolder(str(tmp_path))
    run.write_table(pa.table({"x": [1, 2]}), "results", piece_name(5, 7))
    run.write_table(pa.table({"x": [0]}), "results", piece_name(0, 1))
    (tmp_path / "results" / ".part-000000000001-000000000002.parquet.abc.tmp").write_bytes(b"half")
    assert run.pieces("results") == [(0, 1), (5, 7)]
    assert pq.read_table(tmp_path / "results").num_rows == 3  # hidden temporaries are not read
    run.drop_temporaries("results")
    assert sorted(os.listdir(tmp_path / "results")) == [piece_name(0, 1), piece_name(5, 7)]


def test_streamed_tables_appear_as_one_file_or_not_at_all(tmp_path, monkeypatch):
    """write_tables: every table in order in one file; a failure while the tables come (an
    exception from the source, a full disk at the commit) leaves neither the file nor a
    temporary, and a full disk is a RunWriteError naming the file."""
    schema = pa.schema([("x", pa.int64())])
    run = RunFolder(str(tmp_path))
    assert run.write_tables(schema, (pa.table({"x": [i, i + 1]}, schema=schema) for i in (0, 2, 4)), "t.parquet") == 6
    assert pq.read_table(tmp_path / "t.parquet").column("x").to_pylist() == [0, 1, 2, 3, 4, 5]

    def failing():
        yield pa.table({"x": [7]}, schema=schema)
        raise ValueError("no more")

    with pytest.raises(ValueError, match="no more"):
        run.write_tables(schema, failing(), "u.parquet")
    monkeypatch.setenv("EMBCAM_FAULT", "write:v.parquet:enospc")
    with pytest.raises(RunWriteError, match="v.parquet"):
        run.write_tables(schema, [pa.table({"x": [1]}, schema=schema)], "v.parquet")
    assert sorted(os.listdir(tmp_path)) == ["t.parquet"]


def test_clear_removes_only_what_embcam_wrote(tmp_path):
    run = RunFolder(str(tmp_path))
    for name in ("results/part-000000000000-000000000001.parquet", "_embcam/run.json", "summary.json",
                 "proxies.parquet", "_SUCCESS", "notes.txt", "mine/keep.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    run.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]


def test_identity_differences_name_each_changed_entry():
    old = {"model": {"spec": "a", "sha": "1"}, "proxy": "self"}
    new = {"model": {"spec": "b", "sha": "1"}, "proxy": "mean"}
    assert identity_differences(old, new) == ["model.spec: 'a' -> 'b'", "proxy: 'self' -> 'mean'"]
    assert identity_differences(old, old) == []


def _manifest(n, start=0):
    return pa.table({"image_id": [f"i{k}" for k in range(start, start + n)],
                     "uri": [f"{k}.png" for k in range(start, start + n)],
                     "bbox_x0": np.arange(n, dtype=float), "bbox_y0": np.zeros(n),
                     "bbox_x1": np.ones(n), "bbox_y1": np.ones(n)})


def test_manifest_copy_reads_any_row_range(tmp_path, monkeypatch):
    monkeypatch.setattr("embcam.data.runstate.FILE_BLOCKS", 3)  # several files of three blocks
    monkeypatch.setattr("embcam.data.manifest.SCAN_BATCH_ROWS", 7)  # batches that do not align with blocks
    folder = tmp_path / "m"
    folder.mkdir()
    pq.write_table(_manifest(30), folder / "a.parquet")
    pq.write_table(_manifest(25, start=30), folder / "b.parquet")
    copy = ManifestCopy(RunFolder(str(tmp_path / "out")), block_rows=4)
    scan = scan_manifest(str(folder), copy.write)
    copy.close()
    assert scan.rows == 55
    assert len(os.listdir(tmp_path / "out" / "_embcam" / "manifest")) == 5  # 12 rows per file
    reader = ManifestCopy(RunFolder(str(tmp_path / "out")), block_rows=4)
    for start, stop in [(0, 4), (3, 17), (11, 12), (50, 55), (0, 55)]:
        rows = reader.read(start, stop)
        assert rows.column("image_id").to_pylist() == [f"i{k}" for k in range(start, stop)]
        assert rows.column("row").to_pylist() == list(range(start, stop))
    assert reader.read(40, 42).column("bbox_x0").to_pylist() == [10.0, 11.0]


def test_scan_finds_duplicates_across_files_with_their_rows(tmp_path, monkeypatch):
    monkeypatch.setattr("embcam.data.manifest.SCAN_BATCH_ROWS", 4)
    pq.write_table(_manifest(10), tmp_path / "a.parquet")
    pq.write_table(_manifest(3, start=8), tmp_path / "b.parquet")  # i8, i9 again
    with pytest.raises(ManifestError, match=r"2 duplicated value\(s\).*'i8' at rows 8, 10"):
        scan_manifest(str(tmp_path))


def test_scan_digest_changes_with_the_ids(tmp_path):
    pq.write_table(_manifest(5), tmp_path / "a.parquet")
    first = scan_manifest(str(tmp_path / "a.parquet"))
    pq.write_table(_manifest(5, start=1), tmp_path / "a.parquet")
    assert scan_manifest(str(tmp_path / "a.parquet")).ids_sha256 != first.ids_sha256


def test_scan_names_null_ids_by_global_row(tmp_path, monkeypatch):
    monkeypatch.setattr("embcam.data.manifest.SCAN_BATCH_ROWS", 4)
    table = _manifest(10)
    ids = table.column("image_id").to_pylist()
    ids[9] = None
    pq.write_table(table.set_column(0, "image_id", pa.array(ids)), tmp_path / "a.parquet")
    with pytest.raises(ManifestError, match="'image_id'.*row 9: None"):
        scan_manifest(str(tmp_path / "a.parquet"))
