"""embcam.data.manifest and embcam.data.locations: finding files, validation errors, uri resolution, bytes,
safe names."""

import hashlib
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embcam.data.locations import default_image_root, resolve_uri, safe_name
from embcam.data.manifest import (
    ManifestError,
    read_manifest,
    resolve_source,
    scan_manifest,
    suggest_column,
    validate_manifest,
)
from embcam.data.schemas import arrow_schema


def write(path: Path, table: pa.Table | dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table if isinstance(table, pa.Table) else pa.table(table), path)
    return path


def minimal(ids, **extra):
    return {"image_id": list(ids), "uri": [f"{i}.jpg" for i in ids], **extra}


# --- resolve_source / read_manifest ---------------------------------------------------------


def test_read_single_file_casts_orders_and_fills(tmp_path):
    table = pa.table({
        "extra": [1, 2],
        "uri": ["a.jpg", "s3://bucket/b.jpg"],
        "image_id": ["a", "b"],
        "bbox_x0": pa.array([1, 2], pa.int32()), "bbox_y0": pa.array([3, 4], pa.int64()),
        "bbox_x1": pa.array([5.5, 6.5], pa.float32()), "bbox_y1": [7.25, None],
        "label": pd.Categorical(["cat", "dog"]),
    })
    out = read_manifest(str(write(tmp_path / "m.parquet", table)))
    assert out.schema.equals(arrow_schema("manifest"))
    assert out.column("bbox_x0").to_pylist() == [1.0, 2.0]
    assert out.column("bbox_x1").to_pylist() == [5.5, 6.5]
    assert out.column("bbox_y1").to_pylist() == [7.25, None]
    assert out.column("label").to_pylist() == ["cat", "dog"]
    assert out.column("split").to_pylist() == [None, None]


def test_directory_is_searched_recursively_skipping_hidden(tmp_path):
    write(tmp_path / "d" / "part-0.parquet", minimal("ab"))
    write(tmp_path / "d" / "sub" / "part-1.parquet", minimal("c"))
    write(tmp_path / "d" / "_tmp" / "part-2.parquet", minimal("x"))
    write(tmp_path / "d" / ".hidden.parquet", minimal("y"))
    (tmp_path / "d" / "_SUCCESS").write_text("")
    (tmp_path / "d" / "notes.txt").write_text("not parquet")
    fs, paths = resolve_source(str(tmp_path / "d"))
    assert paths == [str(tmp_path / "d" / "part-0.parquet"),
                     str(tmp_path / "d" / "sub" / "part-1.parquet")]
    assert read_manifest(str(tmp_path / "d")).column("image_id").to_pylist() == ["a", "b", "c"]


def test_globs_local_and_uri(tmp_path):
    write(tmp_path / "d" / "p0.parquet", minimal("a"))
    write(tmp_path / "d" / "p1.parquet", minimal("b"))
    write(tmp_path / "d" / "sub" / "p2.parquet", minimal("c"))
    _, top = resolve_source(str(tmp_path / "d" / "p*.parquet"))
    assert [Path(p).name for p in top] == ["p0.parquet", "p1.parquet"]
    _, deep = resolve_source(str(tmp_path / "d" / "**" / "*.parquet"))
    assert [Path(p).name for p in deep] == ["p0.parquet", "p1.parquet", "p2.parquet"]
    _, one = resolve_source(str(tmp_path / "d" / "p?.parquet"))
    assert len(one) == 2
    uri = "file://" + str(tmp_path / "d" / "*" / "*.parquet")
    assert read_manifest(uri).column("image_id").to_pylist() == ["c"]


def test_file_uri_single_file(tmp_path):
    path = write(tmp_path / "m.parquet", minimal("ab"))
    assert read_manifest(f"file://{path}").num_rows == 2


def test_nothing_matches(tmp_path):
    with pytest.raises(ManifestError, match="no such file or directory"):
        resolve_source(str(tmp_path / "missing.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no Parquet files found"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(ManifestError, match="no Parquet files found"):
        resolve_source(str(tmp_path / "*.parquet"))


def test_not_parquet_file_names_the_file(tmp_path):
    (tmp_path / "m.parquet").write_text("hello")
    with pytest.raises(ManifestError, match=r"cannot read manifest file .*m\.parquet"):
        read_manifest(str(tmp_path / "m.parquet"))


def test_mixed_schemas_across_files(tmp_path):
    write(tmp_path / "a.parquet", minimal("a", label=["x"]))
    write(tmp_path / "b.parquet", minimal("b"))
    with pytest.raises(ManifestError, match=r"mixed schemas.*differing: label"):
        read_manifest(str(tmp_path))


def test_compatible_types_across_files_and_extra_columns(tmp_path):
    box_int = {f"bbox_{k}": pa.array([1], pa.int32()) for k in ("x0", "y0", "x1", "y1")}
    box_float = {f"bbox_{k}": [2.5] for k in ("x0", "y0", "x1", "y1")}
    write(tmp_path / "a.parquet", minimal("a", other=[1], **box_int))
    write(tmp_path / "b.parquet", minimal("b", **box_float))
    out = read_manifest(str(tmp_path))
    assert out.column("bbox_x0").to_pylist() == [1.0, 2.5]


def test_type_error_in_one_file_names_it(tmp_path):
    write(tmp_path / "a.parquet", minimal("a"))
    write(tmp_path / "b.parquet", {"image_id": [7], "uri": ["b.jpg"]})
    with pytest.raises(ManifestError, match=r"b\.parquet: column 'image_id' has type int64"):
        read_manifest(str(tmp_path))


def test_duplicates_across_files_are_found(tmp_path):
    write(tmp_path / "a.parquet", minimal("ab"))
    write(tmp_path / "b.parquet", minimal("cb"))
    with pytest.raises(ManifestError, match=r"'b' at rows 1, 3"):
        read_manifest(str(tmp_path))


# --- validate_manifest ------------------------------------------------------------------------


def test_missing_required_column():
    with pytest.raises(ManifestError, match=r"missing required column\(s\) 'uri'.*found: image_id"):
        validate_manifest(pa.table({"image_id": ["a"]}))


def test_a_missing_column_lists_every_column_found_and_the_likely_one(tmp_path):
    """The user's uri column is called path: every column of the file is listed, and the
    one to rename named."""
    pq.write_table(pa.table({"image_id": ["a"], "path": ["a.jpg"], "label": ["x"], "score": [1.0]}),
                   tmp_path / "m.parquet")
    with pytest.raises(ManifestError) as info:
        scan_manifest(tmp_path / "m.parquet")
    assert str(info.value) == (f"manifest file {tmp_path / 'm.parquet'}: missing required column(s) 'uri' (columns "
                               "found: image_id, path, label, score); did you mean 'path'? rename it to 'uri'")


@pytest.mark.parametrize("found, missing, guess", [
    (["ID", "Filename"], "image_id", "ID"), (["ID", "Filename"], "uri", "Filename"),
    (["key", "url"], "uri", "url"), (["image_ids", "uri"], "image_id", "image_ids"),  # by spelling
    (["category"], "label", "category"), (["uri", "label"], "image_id", None), (["weight"], "uri", None),
])
def test_suggest_column(found, missing, guess):
    expected = None if guess is None else f"did you mean {guess!r}? rename it to {missing!r}"
    assert suggest_column(missing, found) == expected


def test_integer_image_id_is_a_type_error():
    with pytest.raises(ManifestError) as info:
        validate_manifest(pa.table({"image_id": [10, 11], "uri": ["a", "b"]}))
    message = str(info.value)
    assert "'image_id' has type int64, expected string" in message
    assert "row 0: 10, row 1: 11" in message


def test_string_bbox_is_a_type_error():
    box = {f"bbox_{k}": ["1"] for k in ("x0", "y0", "x1", "y1")}
    with pytest.raises(ManifestError, match=r"'bbox_x0' has type string, expected float64"):
        validate_manifest(pa.table(minimal("a", **box)))


def test_null_and_empty_ids_and_uris():
    with pytest.raises(ManifestError, match=r"'image_id': 2 null or empty.*row 1: None, row 2: ''"):
        validate_manifest(pa.table({"image_id": ["a", None, ""], "uri": ["x", "y", "z"]}))
    with pytest.raises(ManifestError, match=r"'uri': 1 null or empty.*row 0: None"):
        validate_manifest(pa.table({"image_id": ["a", "b"], "uri": [None, "y"]}))
    with pytest.raises(ManifestError, match="'image_id': 1 null"):
        validate_manifest(pa.table({"image_id": pa.nulls(1), "uri": ["y"]}))


def test_examples_are_capped_at_five():
    ids = [None] * 8 + ["a"]
    with pytest.raises(ManifestError) as info:
        validate_manifest(pa.table({"image_id": pa.array(ids, pa.string()), "uri": ["u"] * 9}))
    assert "8 null or empty" in str(info.value)
    assert re.findall(r"row (\d+)", str(info.value)) == ["0", "1", "2", "3", "4"]


def test_duplicate_ids_named_with_rows():
    table = pa.table(minimal(["a", "b", "a", "c", "b", "a"]))
    with pytest.raises(ManifestError) as info:
        validate_manifest(table)
    message = str(info.value)
    assert "2 duplicated value(s)" in message
    assert "'a' at rows 0, 2, 5" in message and "'b' at rows 1, 4" in message


def test_empty_manifest():
    with pytest.raises(ManifestError, match="manifest is empty"):
        validate_manifest(pa.table({"image_id": pa.array([], pa.string()),
                                    "uri": pa.array([], pa.string())}))


def test_partial_bbox():
    expected = r"partially: has bbox_x0, bbox_y1 but not bbox_y0, bbox_x1"
    with pytest.raises(ManifestError, match=expected):
        validate_manifest(pa.table(minimal("a", bbox_x0=[1.0], bbox_y1=[2.0])))


def test_bad_box_on_one_row_is_not_a_manifest_error():
    box = {"bbox_x0": [5.0, 0.0], "bbox_y0": [0.0, 0.0], "bbox_x1": [1.0, 3.0],
           "bbox_y1": [2.0, float("nan")]}
    out = validate_manifest(pa.table(minimal("ab", **box)))
    assert out.column("bbox_x0").to_pylist() == [5.0, 0.0]


def test_large_string_and_dictionary_columns_are_accepted():
    table = pa.table({"image_id": pa.array(["a", "b"], pa.large_string()),
                      "uri": pa.array(["x", "y"]).dictionary_encode(),
                      "split": pa.nulls(2)})
    out = validate_manifest(table)
    assert out.schema.field("image_id").type == pa.string()
    assert out.column("uri").to_pylist() == ["x", "y"]
    assert out.column("split").to_pylist() == [None, None]


# --- resolve_uri -----------------------------------------------------------------


def test_resolve_uri(tmp_path, monkeypatch):
    assert resolve_uri("s3://b/k.jpg", "/root") == "s3://b/k.jpg"
    assert resolve_uri("/abs/x.jpg", "/root") == "/abs/x.jpg"
    assert resolve_uri("/abs/x.jpg", None) == "/abs/x.jpg"
    assert resolve_uri("a/x.jpg", "/root/imgs/") == "/root/imgs/a/x.jpg"
    assert resolve_uri("./a/x.jpg", "/root") == "/root/a/x.jpg"
    monkeypatch.chdir(tmp_path)
    assert resolve_uri("x.jpg", "imgs") == str(tmp_path / "imgs" / "x.jpg")
    assert resolve_uri("a b/x#1.jpg", "gs://bucket/imgs/") == "gs://bucket/imgs/a%20b/x%231.jpg"
    with pytest.raises(ValueError, match="'x.jpg' needs an image root"):
        resolve_uri("x.jpg", None)
    with pytest.raises(ValueError, match="empty uri"):
        resolve_uri("", "/root")


# --- safe_name ----------------------------------------------------------------------------------

SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


def test_safe_name_keeps_safe_values():
    assert safe_name("Black_Footed_Albatross_0001-796111.jpg") == \
        "Black_Footed_Albatross_0001-796111.jpg"


@pytest.mark.parametrize("value", ["a/b", "../../etc/passwd", "..", ".", "", ".hidden",
                                   "é t\u00e9 \u732b", "a\\b:c*?", "x" * 300, "\x00"])
def test_safe_name_sanitises(value):
    name = safe_name(value)
    assert SAFE.match(name), name
    assert name not in ("", ".", "..") and not name.startswith(".")
    assert len(name) <= 100
    assert re.search(r"_[0-9a-f]{16}$", name)  # changed, so hashed


def test_safe_name_keeps_distinct_values_distinct():
    names = {safe_name(v) for v in ["a/b", "a:b", "a_b", "a b", "x" * 200 + "1", "x" * 200 + "2"]}
    assert len(names) == 6
    # the same name in every process: the value's sha256, not Python's salted hash()
    assert safe_name("a/b") == "a_b_" + hashlib.sha256(b"a/b").hexdigest()[:16]


def test_safe_name_length_bound():
    assert len(safe_name("y" * 500, max_length=40)) == 40
    assert safe_name("y" * 40, max_length=40) == "y" * 40
    with pytest.raises(ValueError, match="max_length"):
        safe_name("a", max_length=10)


def test_data_modules_import_neither_torch_nor_ray():
    # The package __init__ imports torch for EmbeddingCAM; the data layer itself must not.
    import ast

    import embcam.boxes
    import embcam.data.images
    import embcam.data.locations
    import embcam.data.manifest
    import embcam.data.schemas

    for module in (embcam.boxes, embcam.data.images, embcam.data.locations, embcam.data.manifest, embcam.data.schemas):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom)}
        assert not imported & {"torch", "ray"}, (module.__name__, imported)


def test_default_image_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_image_root("manifest.parquet") == str(tmp_path)  # a manifest in the working folder
    assert default_image_root("data/m.parquet") == str(tmp_path / "data")
    assert default_image_root("data/parts") == str(tmp_path / "data" / "parts")
    assert default_image_root("data/*.parquet") == str(tmp_path / "data")
    assert default_image_root("s3://bucket/cat/manifest.parquet") == "s3://bucket/cat"
    assert default_image_root("gs://bucket/cat/") == "gs://bucket/cat"


def test_unreachable_remote_manifest_fails_in_bounded_time(monkeypatch):
    # GCS retries for 15 minutes by default; the manifest reader bounds it. Nothing listens
    # on the endpoint, and no credentials can be found: both fail, and are retried until the limit.
    import time

    monkeypatch.setattr("embcam.data.manifest.REMOTE_TIMEOUT_S", 2.0)
    started = time.perf_counter()
    with pytest.raises(ManifestError, match="manifest source 'gs://bucket/m.parquet"):
        read_manifest("gs://bucket/m.parquet?endpoint_override=127.0.0.1:9&scheme=http")
    assert time.perf_counter() - started < 30
