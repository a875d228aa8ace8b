"""Manifest for a folder-per-class image tree: ``root/<label>/**/<image>``."""
from __future__ import annotations

import os
import pathlib

from embcam.datasets.manifest_writer import LABELLED_MANIFEST_SCHEMA, manifest_uri, write_manifest

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def folder_manifest(
    root: os.PathLike | str,
    out_path: os.PathLike | str,
    *,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
) -> pathlib.Path:
    """Write a manifest of every image under the class folders of ``root``.

    Each top-level sub-folder of ``root`` is a class: ``label`` is its name and
    every file below it (at any depth) whose suffix is in ``extensions``
    (case-insensitive) is one row. ``image_id`` is the path relative to ``root``
    (posix), ``uri`` the path relative to ``out_path``'s directory (absolute when
    the image is not under it). Files directly in ``root`` and hidden files or
    folders (name starting with ``.``) are ignored. No box, mask or split columns.
    Rows are sorted by ``image_id``. Returns ``out_path``.

    Raises ``FileNotFoundError`` when ``root`` is not a directory and ``ValueError``
    when no image is found.
    """
    root = pathlib.Path(root)
    out_path = pathlib.Path(out_path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} is not a directory")
    suffixes = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    found = []
    for class_dir in root.iterdir():
        if not class_dir.is_dir() or class_dir.name.startswith("."):
            continue
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for filename in filenames:
                suffix = os.path.splitext(filename)[1].lower()
                if filename.startswith(".") or suffix not in suffixes:
                    continue
                path = pathlib.Path(dirpath, filename)
                found.append((path.relative_to(root).as_posix(), class_dir.name, path))
    if not found:
        raise ValueError(
            f"no images with extensions {sorted(suffixes)} in the class folders of {root}"
        )
    found.sort()
    out_dir = out_path.parent
    columns = {
        "image_id": [image_id for image_id, _, _ in found],
        "uri": [manifest_uri(path, out_dir) for _, _, path in found],
        "label": [label for _, label, _ in found],
    }
    return write_manifest(columns, out_path, LABELLED_MANIFEST_SCHEMA)
