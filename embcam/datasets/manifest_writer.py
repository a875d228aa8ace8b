"""What every manifest maker shares: the manifest contract as the makers write it, a file's
``uri`` relative to the manifest, and writing the Parquet file. A leaf of
``embcam.datasets``: the makers import it, it imports none of them."""
from __future__ import annotations

import os
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

from ..data.schemas import arrow_schema

# The manifest contract (schemas/manifest.json), every field nullable (Parquet
# "optional") so the tables unify with readers' schemas.
ANNOTATED_MANIFEST_SCHEMA = pa.schema([f.with_nullable(True) for f in arrow_schema("manifest")])

# Schema of a folder-per-class manifest: no boxes, masks or split.
LABELLED_MANIFEST_SCHEMA = pa.schema([ANNOTATED_MANIFEST_SCHEMA.field(n) for n in ("image_id", "uri", "label")])


def manifest_uri(path: os.PathLike | str, manifest_dir: os.PathLike | str) -> str:
    """Return ``path`` as a manifest ``uri``: posix and relative to ``manifest_dir``
    when the file lies under that directory, else absolute (never ``../``, so a
    manifest stays valid when copied alone)."""
    path = os.path.normpath(os.path.abspath(path))
    manifest_dir = os.path.normpath(os.path.abspath(manifest_dir))
    try:
        relative = os.path.relpath(path, manifest_dir)
    except ValueError:  # different drives on Windows
        return pathlib.Path(path).as_posix()
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return pathlib.Path(path).as_posix()
    return pathlib.PurePath(relative).as_posix()


def write_manifest(columns: dict, out_path: os.PathLike | str, schema: pa.Schema) -> pathlib.Path:
    """Write ``columns`` (name → list of values) as a Parquet manifest with ``schema``.

    Raises ``ValueError`` on duplicate ``image_id`` values. Creates the parent
    directory; returns the manifest path.
    """
    ids = columns["image_id"]
    if len(set(ids)) != len(ids):
        seen, duplicate = set(), None
        for image_id in ids:
            if image_id in seen:
                duplicate = image_id
                break
            seen.add(image_id)
        raise ValueError(f"duplicate image_id {duplicate!r} in manifest {out_path}")
    table = pa.Table.from_pydict({name: columns[name] for name in schema.names}, schema=schema)
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_path)
    return out_path

