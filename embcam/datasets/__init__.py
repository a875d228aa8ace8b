"""Manifest makers: turn an image collection into embcam's Parquet manifest.

Every maker writes one row per image with the columns of the manifest contract
(docs/design.md §6): ``image_id``, ``uri`` and ``label``, and where the source has them
``bbox_x0, bbox_y0, bbox_x1, bbox_y1`` (float64 pixels of the original image,
continuous coordinates: a box over the whole image is ``0, 0, W, H``), ``mask_uri``
and ``split``. Paths are written relative to the directory holding the manifest
when the file lies under it, else absolute.

- :func:`generate_dataset` — a CUB-like synthetic open-set dataset (images, masks
  and manifest) drawn deterministically from a seed.
- :func:`cub_manifest` — CUB-200-2011 as unpacked from the official archives.
- :func:`folder_manifest` — one sub-folder per class.
"""
from __future__ import annotations

import os
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

from ..boxes import BBOX_COLUMNS  # re-exported
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


# The makers import the helpers above from this package, so they come last.
from embcam.datasets.cub import cub_manifest  # noqa: E402
from embcam.datasets.folders import folder_manifest  # noqa: E402
from embcam.datasets.synthetic import class_names, generate_dataset, summary  # noqa: E402

__all__ = [
    "ANNOTATED_MANIFEST_SCHEMA",
    "BBOX_COLUMNS",
    "LABELLED_MANIFEST_SCHEMA",
    "class_names",
    "cub_manifest",
    "folder_manifest",
    "generate_dataset",
    "manifest_uri",
    "summary",
    "write_manifest",
]
