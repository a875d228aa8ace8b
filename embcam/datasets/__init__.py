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

from ..boxes import BBOX_COLUMNS
from .cub import cub_manifest
from .folders import folder_manifest
from .manifest_writer import ANNOTATED_MANIFEST_SCHEMA, LABELLED_MANIFEST_SCHEMA, manifest_uri, write_manifest
from .synthetic import class_names, generate_dataset, summary

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
