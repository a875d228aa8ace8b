"""Reading and validating the input manifest (``schemas/manifest.json``). Its uris are
resolved by ``embcam.data.locations``.

Whole-manifest problems (missing or mistyped columns, null or duplicate ``image_id``,
null ``uri``, a partial box, an empty manifest, files with different columns) raise
:class:`ManifestError` before any work starts. Problems of one row (an impossible box,
a missing file) are not checked here: the job turns them into error rows.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import os
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from embcam.boxes import BBOX_COLUMNS
from embcam.data.fetch import with_timeouts
from embcam.data.locations import has_scheme
from embcam.data.schemas import arrow_schema, conform, load_schema

MAX_EXAMPLES = 5
REMOTE_TIMEOUT_S = 60.0  # a remote manifest that does not answer fails after about this long
# what users often call the manifest's columns (compared lower-cased): the did-you-mean of a missing one
COLUMN_SYNONYMS = {
    "uri": ("path", "file", "filename", "file_name", "filepath", "file_path", "image", "image_path", "img",
            "img_path", "image_uri", "image_url", "url", "location"),
    "image_id": ("id", "name", "key", "image_name", "imageid", "img_id"),
    "label": ("class", "class_name", "category", "target", "y", "labels"),
}


class ManifestError(ValueError):
    """The manifest as a whole cannot be used; the message names the column and example rows."""


# --- finding and reading the Parquet files ------------------------------------------------


def resolve_source(source: str | os.PathLike) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and sorted file paths of a manifest ``source``.

    ``source`` is one Parquet file, a directory (searched recursively for ``*.parquet``,
    skipping names that start with ``.`` or ``_``), or a glob (``*``, ``[...]``, ``**`` for
    any depth; ``?`` too in local paths, where it is not a URI query), local or a URI.
    """
    source = os.fspath(source)
    if has_scheme(source):
        parts = urlsplit(source)
        base, pattern = _split_glob(parts.path, "*[")
        base_uri = urlunsplit((parts.scheme, parts.netloc, base or "/", parts.query, ""))
        try:
            fs, root = pafs.FileSystem.from_uri(base_uri)
            fs = with_timeouts(fs, REMOTE_TIMEOUT_S)  # GCS would otherwise retry for 15 minutes
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"manifest source {source!r}: {exc}") from None
        pattern = unquote(pattern)
    else:
        base, pattern = _split_glob(source, "*?[")
        fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(base or "."))

    try:
        paths = _find_files(fs, root.rstrip("/") or "/", pattern)
    except (pa.ArrowException, OSError) as exc:  # listing a remote store can fail
        raise ManifestError(f"manifest source {source!r}: {exc}") from None
    if paths is None:
        raise ManifestError(f"manifest source {source!r}: no such file or directory")
    if not paths:
        raise ManifestError(f"manifest source {source!r}: no Parquet files found")
    return fs, sorted(paths)


def _find_files(fs: pafs.FileSystem, root: str, pattern: str) -> list[str] | None:
    """Files under ``root`` matching ``pattern`` (or ``root`` itself); None if it is absent."""
    info = fs.get_file_info(root)
    if pattern:
        if info.type != pafs.FileType.Directory:
            return []
        recursive = "/" in pattern or "**" in pattern
        return [path for path in _list_files(fs, root, recursive)
                if _glob_match(_relative(path, root).split("/"), pattern.split("/"))]
    if info.type == pafs.FileType.File:
        return [root]
    if info.type == pafs.FileType.Directory:
        return [path for path in _list_files(fs, root, recursive=True)
                if path.lower().endswith(".parquet")]
    return None


def _split_glob(path: str, glob_chars: str) -> tuple[str, str]:
    """``path`` split at its first component holding a glob character: (base, pattern)."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if any(char in part for char in glob_chars):
            return "/".join(parts[:i]) or ("/" if path.startswith("/") else ""), "/".join(parts[i:])
    return path, ""


def _list_files(fs: pafs.FileSystem, root: str, recursive: bool) -> list[str]:
    """Files under ``root``, skipping hidden and ``_``-prefixed names (_SUCCESS, .crc, ...)."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive))
    return [info.path for info in infos if info.type == pafs.FileType.File
            and not any(part[:1] in "._" for part in _relative(info.path, root).split("/"))]


def _relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/")


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Component-wise glob match: ``*`` stays within a directory, ``**`` spans any depth."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return (bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0])
            and _glob_match(parts[1:], pattern[1:]))


def read_manifest(source: str | os.PathLike) -> pa.Table:
    """Read and validate the manifest at ``source`` (see :func:`resolve_source`).

    Only the manifest's columns are read. Every file must have the same manifest columns;
    row indices in error messages count across the files in sorted path order.
    """
    fs, paths = resolve_source(source)
    tables = []
    for where, table in _stream(fs, paths):
        _check_structure(table, where=where)
        tables.append(_cast_known(table))
    return validate_manifest(pa.concat_tables(tables))


@dataclass(frozen=True)
class ManifestScan:
    """What a streamed validation learnt: the row count and a digest of the image_ids in order."""

    rows: int
    ids_sha256: str
    columns: tuple[str, ...] = ()  # every column of the first file, manifest columns or not


SCAN_BATCH_ROWS = 65536


def scan_manifest(source: str | os.PathLike, sink=None) -> ManifestScan:
    """Validate the manifest at ``source`` in a stream, as :func:`read_manifest` does,
    without holding it: one batch of rows at a time (plus 8 bytes per row, an id hash,
    to find duplicates across files). ``sink(table)``, when given, receives every
    validated batch in order, cast to the manifest schema."""
    fs, paths = resolve_source(source)
    rows, digest, hashes, columns = 0, hashlib.sha256(), [], []
    for where, table in _stream(fs, paths, columns):
        _check_structure(table, where=where)
        table = _cast_known(table)
        for name in ("image_id", "uri"):
            _check_filled(table.column(name), name, rows)
        ids = id_hashes(table.column("image_id"))
        digest.update(ids.tobytes())
        hashes.append(ids)
        if sink is not None and table.num_rows:
            sink(conform(table, "manifest"))
        rows += table.num_rows
    if rows == 0:
        raise ManifestError("manifest is empty (0 rows)")
    ordered = np.sort(np.concatenate(hashes))
    suspects = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(suspects):
        _check_unique_in(fs, paths, set(suspects.tolist()))
    return ManifestScan(rows, digest.hexdigest(), tuple(columns))


def _stream(fs: pafs.FileSystem, paths: list[str], found: list[str] | None = None):
    """(where, table) for each batch of each file: the manifest columns only, the same in
    every file; read errors become ManifestError. ``found`` gets every column of the first file."""
    known = [column["name"] for column in load_schema("manifest")["columns"]]
    first_columns = None
    for path in paths:
        try:
            handle = fs.open_input_file(path)
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"cannot read manifest file {path}: {exc}") from None
        with handle:
            _check_required(parquet.schema_arrow.names, f"manifest file {path}")
            if found is not None and not found:
                found.extend(parquet.schema_arrow.names)
            columns = [name for name in known if name in parquet.schema_arrow.names]
            if first_columns is None:
                first_columns = columns
            elif columns != first_columns:
                differ = sorted(set(columns) ^ set(first_columns))
                raise ManifestError(
                    f"mixed schemas across manifest files: {paths[0]} has columns {first_columns} "
                    f"but {path} has {columns} (differing: {', '.join(differ)})")
            where = f"manifest file {path}"
            batches, empty = parquet.iter_batches(batch_size=SCAN_BATCH_ROWS, columns=columns), True
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except (pa.ArrowException, OSError) as exc:
                    raise ManifestError(f"cannot read manifest file {path}: {exc}") from None
                empty = False
                yield where, pa.Table.from_batches([batch])
            if empty:  # the column checks still apply to a file without rows
                yield where, pa.schema([parquet.schema_arrow.field(name) for name in columns]).empty_table()


def _check_filled(column: pa.ChunkedArray, name: str, offset: int) -> None:
    bad = pc.fill_null(pc.equal(column, ""), True)
    rows = pc.indices_nonzero(bad).to_pylist()
    if rows:
        values = column.take(rows[:MAX_EXAMPLES]).to_pylist()
        examples = ", ".join(f"row {offset + row}: {value!r}" for row, value in zip(rows, values))
        raise ManifestError(f"manifest column {name!r}: {len(rows)} null or empty value(s) "
                            f"in rows from {offset}; e.g. {examples}")


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each image_id (pandas' vectorised string hash: 8 bytes per id, for
    finding duplicates and matching ids without holding the strings)."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(ids.cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object))


def _check_unique_in(fs: pafs.FileSystem, paths: list[str], suspects: set) -> None:
    """Second pass over the image_ids whose hashes collide: report true duplicates."""
    at: dict[str, list[int]] = {}
    offset = 0
    for _, table in _stream(fs, paths):
        ids = table.column("image_id").cast(pa.string())
        hit = np.flatnonzero(np.isin(id_hashes(ids), list(suspects))) if len(ids) else []
        for row, value in zip(hit, ids.take(pa.array(hit, pa.int64())).to_pylist()):
            at.setdefault(value, []).append(offset + int(row))
        offset += table.num_rows
    duplicated = {value: rows for value, rows in at.items() if len(rows) > 1}
    if duplicated:
        examples = "; ".join(f"{value!r} at rows {', '.join(map(str, rows[:MAX_EXAMPLES]))}"
                             for value, rows in list(duplicated.items())[:MAX_EXAMPLES])
        raise ManifestError(f"manifest column 'image_id': {len(duplicated)} duplicated value(s), "
                            f"e.g. {examples}")


# --- validation -------------------------------------------------------------------------


def validate_manifest(table: pa.Table) -> pa.Table:
    """Check a manifest table; return it with the schema's columns in order and types.

    Floats (and integer boxes) come back as float64, string-like columns as string;
    absent optional columns are added as nulls and other columns dropped.
    """
    _check_structure(table, where="manifest")
    if table.num_rows == 0:
        raise ManifestError("manifest is empty (0 rows)")
    for name in ("image_id", "uri"):
        column = table.column(name)
        bad = pc.fill_null(pc.equal(column.cast(pa.string()), ""), True)
        rows = pc.indices_nonzero(bad).to_pylist()
        if rows:
            raise ManifestError(f"manifest column {name!r}: {len(rows)} null or empty value(s); "
                                f"{_examples(column, rows)}")
    _check_unique(table.column("image_id").cast(pa.string()))
    return conform(_cast_known(table), "manifest")


def _check_structure(table: pa.Table, where: str) -> None:
    """Required columns present, boxes all-or-nothing, every known column of a usable type."""
    spec = {column["name"]: column for column in load_schema("manifest")["columns"]}
    _check_required(table.column_names, where)
    bbox = [name for name in BBOX_COLUMNS if name in table.column_names]
    if bbox and len(bbox) < len(BBOX_COLUMNS):
        absent = [name for name in BBOX_COLUMNS if name not in bbox]
        raise ManifestError(f"{where}: bounding box given only partially: has {', '.join(bbox)} "
                            f"but not {', '.join(absent)} (give all four columns or none)")
    for name in table.column_names:
        if name in spec and not _type_ok(table.schema.field(name).type, spec[name]["type"]):
            column, expected = table.column(name), spec[name]["type"]
            hint = " (cast the column to strings first)" if expected == "string" else ""
            raise ManifestError(
                f"{where}: column {name!r} has type {column.type}, expected {expected}{hint}; "
                f"{_examples(column, range(min(MAX_EXAMPLES, len(column))))}")


def _check_required(found: list[str], where: str) -> None:
    """Every required column among the ``found`` ones (all the file's columns); a missing
    one names what was found and the likely column to rename."""
    spec = load_schema("manifest")["columns"]
    missing = [column["name"] for column in spec if column.get("required") and column["name"] not in found]
    if missing:
        hints = [hint for name in missing if (hint := suggest_column(name, found))]
        raise ManifestError(f"{where}: missing required column(s) {', '.join(map(repr, missing))} "
                            f"(columns found: {', '.join(found) or 'none'})" + "".join(f"; {h}" for h in hints))


def suggest_column(name: str, found: list[str]) -> str | None:
    """'did you mean 'path'? rename it to 'uri'' when one of the ``found`` columns (none a
    manifest column) is a usual name for manifest column ``name``, or close to it in spelling."""
    known = {column["name"] for column in load_schema("manifest")["columns"]}
    others = [column for column in found if column not in known]
    synonyms = [column for column in others if column.lower() in COLUMN_SYNONYMS.get(name, ())]
    close = difflib.get_close_matches(name, others, n=1, cutoff=0.6)
    guess = (synonyms or close or [None])[0]
    return None if guess is None else f"did you mean {guess!r}? rename it to {name!r}"


def _type_ok(found: pa.DataType, expected: str) -> bool:
    if pa.types.is_null(found):  # an all-null column: its nulls are judged later
        return True
    if pa.types.is_dictionary(found):
        found = found.value_type
    if expected == "string":
        return (pa.types.is_string(found) or pa.types.is_large_string(found)
                or pa.types.is_string_view(found))
    if expected in ("float32", "float64"):
        return pa.types.is_floating(found) or pa.types.is_integer(found)
    raise ManifestError(f"manifest schema: unsupported column type {expected!r}")


def _cast_known(table: pa.Table) -> pa.Table:
    """The manifest columns of ``table`` cast to their schema types (others dropped)."""
    types = {field.name: field.type for field in arrow_schema("manifest")}
    names = [name for name in table.column_names if name in types]
    return pa.table({name: table.column(name).cast(types[name]) for name in names})


def _check_unique(ids: pa.ChunkedArray) -> None:
    counts = pc.value_counts(ids)
    duplicated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if len(duplicated) == 0:
        return
    shown = duplicated[:MAX_EXAMPLES]
    rows = pc.indices_nonzero(pc.is_in(ids, value_set=shown)).to_pylist()
    at: dict[str, list[int]] = {}
    for row, value in zip(rows, ids.take(rows).to_pylist()):
        at.setdefault(value, []).append(row)
    examples = "; ".join(f"{value!r} at rows {', '.join(map(str, r[:MAX_EXAMPLES]))}"
                         for value, r in at.items())
    raise ManifestError(f"manifest column 'image_id': {len(duplicated)} duplicated value(s), "
                        f"e.g. {examples}")


def _examples(column: pa.ChunkedArray, rows) -> str:
    rows = list(rows)[:MAX_EXAMPLES]
    values = column.take(pa.array(rows, pa.int64())).to_pylist()
    return "e.g. " + ", ".join(f"row {row}: {value!r}" for row, value in zip(rows, values))
