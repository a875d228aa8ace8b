"""The schema files and embcam.data.schemas: parsing, Arrow types, conform."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embcam.data.schemas import ARROW_TYPES, SchemaError, arrow_schema, conform, empty_table, load_schema, schemas_dir

NAMES = ["manifest", "results", "proxies", "pairs", "maps"]

EXPECTED_COLUMNS = {
    "manifest": ["image_id", "uri", "label", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
                 "mask_uri", "split"],
    "results": ["image_id", "label", "split", "uri", "status", "error", "width", "height", "orientation",
                "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "embedding",
                "proxy_kind", "proxy_label", "score", "cosine", "heatmap", "heatmap_height",
                "heatmap_width", "degenerate", "ratio_bbox", "ratio_mask", "uniform_bbox",
                "uniform_mask", "pred_bbox_x0", "pred_bbox_y0", "pred_bbox_x1", "pred_bbox_y1",
                "iou", "loc_correct", "iou_sweep", "heatmap_topk", "ratio_bbox_topk",
                "ratio_mask_topk"],
    "proxies": ["label", "proxy", "count"],
    "pairs": ["query_id", "match_id", "status", "error", "cosine", "query_heatmap", "match_heatmap",
              "heatmap_height", "heatmap_width"],
    "maps": ["image_id", "status", "error", "embedding", "maps", "maps_channels", "heatmap_height", "heatmap_width",
             "width", "height", "orientation"],
}


@pytest.mark.parametrize("name", NAMES)
def test_schema_file_is_documented_column_by_column(name):
    raw = json.loads((schemas_dir() / f"{name}.json").read_text())
    assert raw["name"] == name
    assert len(raw["description"]) > 40
    assert [c["name"] for c in raw["columns"]] == EXPECTED_COLUMNS[name]
    for column in raw["columns"]:
        assert column["type"] in ARROW_TYPES, column
        assert isinstance(column["nullable"], bool), column
        assert len(column["description"]) > 20, column
        if name == "manifest":
            assert isinstance(column["required"], bool), column
    assert load_schema(name) == raw


def test_manifest_required_and_nullable_flags():
    columns = {c["name"]: c for c in load_schema("manifest")["columns"]}
    assert [n for n, c in columns.items() if c["required"]] == ["image_id", "uri"]
    assert [n for n, c in columns.items() if not c["nullable"]] == ["image_id", "uri"]
    assert all(columns[f"bbox_{k}"]["type"] == "float64" for k in ("x0", "y0", "x1", "y1"))


def test_results_non_nullable_columns():
    schema = arrow_schema("results")
    assert [f.name for f in schema if not f.nullable] == ["image_id", "status", "proxy_kind"]


@pytest.mark.parametrize("name", NAMES)
def test_arrow_schema_matches_json(name):
    schema = arrow_schema(name)
    columns = load_schema(name)["columns"]
    assert schema.names == [c["name"] for c in columns]
    for field, column in zip(schema, columns):
        assert field.type == ARROW_TYPES[column["type"]]
        assert field.nullable == column["nullable"]


def test_arrow_types_spot_checks():
    results = arrow_schema("results")
    assert results.field("embedding").type == pa.list_(pa.float32())
    assert results.field("heatmap").type == pa.list_(pa.float32())
    assert results.field("iou_sweep").type == pa.list_(pa.float32())
    assert results.field("width").type == pa.int32()
    assert results.field("score").type == pa.float32()
    assert results.field("loc_correct").type == pa.bool_()
    proxies = arrow_schema("proxies")
    assert proxies.field("count").type == pa.int64()
    assert not proxies.field("proxy").nullable


def test_empty_table():
    table = empty_table("proxies")
    assert table.num_rows == 0
    assert table.schema.equals(arrow_schema("proxies"))


def test_conform_rows_orders_casts_and_fills():
    rows = [
        {"status": "ok", "image_id": "a", "proxy_kind": "self", "width": 7,
         "embedding": [0.5, -1.25], "extra": "dropped"},
        {"status": "error", "image_id": "b", "proxy_kind": "self", "error": "boom"},
    ]
    table = conform(rows, "results")
    assert table.schema.equals(arrow_schema("results"))
    assert table.column("width").to_pylist() == [7, None]
    assert table.column("embedding").to_pylist() == [[0.5, -1.25], None]
    assert table.column("error").to_pylist() == [None, "boom"]
    assert table.column("iou").null_count == 2
    assert "extra" not in table.column_names


def test_conform_table_casts_types():
    table = pa.table({"count": pa.array([3, 4], pa.int32()), "label": ["x", "y"],
                      "proxy": pa.array([[1.0, 2.0], [0.5, 0.25]], pa.list_(pa.float64()))})
    out = conform(table, "proxies")
    assert out.column_names == ["label", "proxy", "count"]
    assert out.schema.field("count").type == pa.int64()
    assert out.column("proxy").to_pylist() == [[1.0, 2.0], [0.5, 0.25]]


def test_conform_dict_of_columns_with_2d_array():
    proxies = np.array([[0.5, 1.5, -2.0], [0.0, 1.0, 0.125]], dtype=np.float64)
    out = conform({"label": ["a", "b"], "proxy": proxies, "count": np.array([2, 5])}, "proxies")
    assert out.schema.equals(arrow_schema("proxies"))
    assert out.column("proxy").to_pylist() == proxies.tolist()
    assert out.column("count").to_pylist() == [2, 5]


def test_conform_pandas_and_parquet_round_trip(tmp_path):
    frame = pd.DataFrame({"image_id": ["a"], "status": ["ok"], "proxy_kind": ["mean"],
                          "heatmap": [np.array([0.0, 1.5, 2.0, 0.25], np.float32)],
                          "heatmap_height": [2], "heatmap_width": [2]})
    table = conform(frame, "results")
    pq.write_table(table, tmp_path / "r.parquet")
    back = pd.read_parquet(tmp_path / "r.parquet")
    assert list(back.columns) == EXPECTED_COLUMNS["results"]
    assert back.loc[0, "heatmap"].tolist() == [0.0, 1.5, 2.0, 0.25]
    assert back.loc[0, "heatmap_height"] == 2


def test_conform_rows_without_schema_columns(tmp_path, monkeypatch):
    with pytest.raises(SchemaError, match="'image_id' is missing"):
        conform([{"other": 1}, {"other": 2}], "results")
    optional = {"name": "opt", "description": "d",
                "columns": [{"name": "v", "type": "float32", "nullable": True,
                             "description": "x"}]}
    (tmp_path / "opt.json").write_text(json.dumps(optional))
    monkeypatch.setenv("EMBCAM_SCHEMAS_DIR", str(tmp_path))
    out = conform([{"other": 1}, {"other": 2}], "opt")
    assert out.column("v").to_pylist() == [None, None]


def test_conform_missing_required_column_fails_clearly():
    with pytest.raises(SchemaError, match=r"proxies: required column 'count' is missing"):
        conform([{"label": "a", "proxy": [1.0]}], "proxies")


def test_conform_null_in_non_nullable_column_fails():
    with pytest.raises(SchemaError, match=r"'label' must not be null.*1 null"):
        conform([{"label": None, "proxy": [1.0], "count": 1}], "proxies")


def test_conform_impossible_cast_fails_naming_column():
    table = pa.table({"label": ["a"], "proxy": [["x"]], "count": [1]})
    with pytest.raises(SchemaError, match=r"column 'proxy' has type list<item: string>"):
        conform(table, "proxies")
    with pytest.raises(SchemaError, match="'width'"):
        conform(pa.table({"image_id": ["a"], "status": ["ok"], "proxy_kind": ["self"],
                          "width": [3.5]}), "results")


def test_conform_rejects_unknown_input_type():
    with pytest.raises(TypeError, match="cannot make a table from str"):
        conform("not a table", "proxies")


def test_schemas_dir_override(tmp_path, monkeypatch):
    custom = {"name": "tiny", "description": "a test table",
              "columns": [{"name": "v", "type": "int32", "nullable": False,
                           "description": "a value"}]}
    (tmp_path / "tiny.json").write_text(json.dumps(custom))
    monkeypatch.setenv("EMBCAM_SCHEMAS_DIR", str(tmp_path))
    assert load_schema("tiny") == custom
    assert arrow_schema("tiny") == pa.schema([pa.field("v", pa.int32(), nullable=False)])
    with pytest.raises(FileNotFoundError, match="EMBCAM_SCHEMAS_DIR"):
        load_schema("manifest")


def test_unknown_type_in_schema_fails(tmp_path, monkeypatch):
    bad = {"name": "bad", "description": "d",
           "columns": [{"name": "v", "type": "int8", "nullable": True, "description": "x"}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    monkeypatch.setenv("EMBCAM_SCHEMAS_DIR", str(tmp_path))
    with pytest.raises(SchemaError, match="column 'v' has unknown type 'int8'"):
        arrow_schema("bad")
