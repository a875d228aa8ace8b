"""The data contracts in ``embcam/contracts/*.json``, as dicts and as Arrow schemas.

Each JSON file documents one table column by column::

    {"name": ..., "description": ..., "columns": [
        {"name": ..., "type": ..., "nullable": ..., "description": ...}, ...]}

The files are package data, read through ``importlib.resources``, so an installed wheel
carries them; the repository's top-level ``schemas/`` is a link to the same folder. Set
``EMBCAM_SCHEMAS_DIR`` to read them from another folder instead.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# The values of the status column of the results, maps and pairs tables: a row that failed is
# "error", with its reason in the error column.
OK, ERROR = "ok", "error"
STATUSES = (OK, ERROR)

ARROW_TYPES = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "list<float32>": pa.list_(pa.float32()),
    "list<float16>": pa.list_(pa.float16()),
}


IOU_SWEEP_METADATA = b"embcam.iou_sweep_thresholds"
"""The key, in the metadata of every results file, of the JSON list of ``iou_sweep``'s IoU thresholds."""

WSOL_COUNTERS_METADATA = b"embcam.wsol_counters"
"""The key, in the metadata of every results file since results contract version 3, of the
file's MaxBoxAccV2 and PxAP counters per split (JSON: ``embcam.wsol.counters_metadata``)."""


class SchemaError(ValueError):
    """Data does not fit a schema (missing column, impossible cast, null where not allowed)."""


def schemas_dir() -> Traversable:
    """Folder holding the schema files: ``$EMBCAM_SCHEMAS_DIR``, else the package's
    ``embcam/contracts`` (a ``Traversable``: a plain ``Path`` unless installed zipped)."""
    return _folder(os.environ.get("EMBCAM_SCHEMAS_DIR"))


def _folder(override: str | None) -> Traversable:
    return Path(override) if override else resources.files("embcam").joinpath("contracts")


def load_schema(name: str) -> dict:
    """The parsed ``<name>.json`` contract (``manifest``, ``results`` or ``proxies``)."""
    return json.loads(_read_schema_text(os.environ.get("EMBCAM_SCHEMAS_DIR"), name))


@lru_cache(maxsize=None)
def _read_schema_text(override: str | None, name: str) -> str:
    path = _folder(override).joinpath(f"{name}.json")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        where = ("unset EMBCAM_SCHEMAS_DIR to use the packaged ones, or point it at a folder holding it"
                 if override else "reinstall embcam, or set EMBCAM_SCHEMAS_DIR to a folder holding it")
        raise FileNotFoundError(f"schema file {path} not found ({where})") from None


def arrow_schema(name: str) -> pa.Schema:
    """The Arrow schema of table ``name``, with the nullable flags of the JSON file."""
    fields = []
    for column in load_schema(name)["columns"]:
        if column["type"] not in ARROW_TYPES:
            raise SchemaError(f"schema {name!r}: column {column['name']!r} has unknown type "
                              f"{column['type']!r} (known: {', '.join(ARROW_TYPES)})")
        fields.append(pa.field(column["name"], ARROW_TYPES[column["type"]],
                               nullable=column["nullable"]))
    return pa.schema(fields)


def empty_table(name: str) -> pa.Table:
    """A table with the schema of ``name`` and no rows."""
    return arrow_schema(name).empty_table()


def conform(data: Any, name: str) -> pa.Table:
    """``data`` as a table of schema ``name``: its columns selected, cast and put in schema order.

    ``data`` is a ``pa.Table``/``RecordBatch``, a list of row dicts, a dict of columns
    (2-D numpy arrays become list columns) or a pandas DataFrame. Columns not in the
    schema are dropped; absent nullable columns are filled with nulls. Raises
    :class:`SchemaError` when a non-nullable column is absent or holds nulls, or when a
    column cannot be cast.
    """
    schema = arrow_schema(name)
    table = _to_table(data, schema)
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise SchemaError(f"{name}: required column {field.name!r} is missing "
                                  f"(columns given: {', '.join(table.column_names) or 'none'})")
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            raise SchemaError(f"{name}: column {field.name!r} must not be null, "
                              f"but has {column.null_count} null value(s)")
        columns.append(_cast(column, field, name))
    return pa.Table.from_arrays(columns, schema=schema)


def _cast(column: pa.ChunkedArray, field: pa.Field, name: str) -> pa.ChunkedArray:
    if column.type == field.type:
        return column
    try:
        return column.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise SchemaError(f"{name}: column {field.name!r} has type {column.type}, "
                          f"which cannot be cast to {field.type}: {exc}") from None


def typed_nulls(table: pa.Table) -> pa.Table:
    """``table`` with each untyped (all-null) column typed as text. Between two Ray Data
    stages an untyped column reaches the next one as float NaN (a label NaN, or an error
    column of floats that no longer concatenates with another block's strings); in a job's
    blocks every column that can be all null is text (a missing mask's bytes are b"")."""
    for i, field in enumerate(table.schema):
        if pa.types.is_null(field.type):
            table = table.set_column(i, field.name, pa.nulls(len(table), pa.string()))
    return table


def list_column(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """One list per row of ``values`` (n, width), in its dtype; null where not ``valid``."""
    n, width = values.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values).reshape(-1)),
                                    mask=pa.array(~np.asarray(valid)))


def _to_table(data: Any, schema: pa.Schema) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, list):
        # Build only the schema columns the rows have, typed on the way in (python floats
        # straight to float32 lists, no float64 detour).
        keys = {key for row in data for key in row}
        present = pa.schema([field.with_nullable(True) for field in schema if field.name in keys])
        if not present:  # rows, but no schema column: keep the row count
            return pa.table({"_": pa.nulls(len(data))}).drop(["_"])
        return pa.Table.from_pylist(data, schema=present)
    if isinstance(data, dict):
        return pa.table({key: _column_array(value) for key, value in data.items()})
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas DataFrame
        return pa.Table.from_pandas(data, preserve_index=False)
    raise TypeError(f"cannot make a table from {type(data).__name__}")


def _column_array(value: Any) -> pa.Array | pa.ChunkedArray:
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        return value
    array = np.asarray(value) if isinstance(value, np.ndarray) else None
    if array is not None and array.ndim == 2:  # one vector per row
        flat = pa.array(np.ascontiguousarray(array).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, array.shape[1])
    return pa.array(value)
