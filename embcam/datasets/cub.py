"""Manifest for CUB-200-2011 as unpacked from the official archives.

Layout (all ids start at 1, fields separated by spaces)::

    CUB_200_2011/images.txt              <image_id> <class dir>/<file>.jpg
    CUB_200_2011/image_class_labels.txt  <image_id> <class_id>
    CUB_200_2011/classes.txt             <class_id> <NNN.Class_Name>
    CUB_200_2011/bounding_boxes.txt      <image_id> <x> <y> <width> <height>
    CUB_200_2011/images/<class dir>/<file>.jpg
    segmentations/<class dir>/<file>.png  (separate archive, optional)

The split is the deep-metric-learning one: classes 1–100 train, 101–200 eval
(``train_test_split.txt``, the classification split, is not used).
"""
from __future__ import annotations

import math
import os
import pathlib

from embcam.datasets.manifest_writer import ANNOTATED_MANIFEST_SCHEMA, manifest_uri, write_manifest

# Classes 1..TRAIN_CLASSES are "train", the rest "eval".
TRAIN_CLASSES = 100


def cub_manifest(
    cub_root: os.PathLike | str,
    out_path: os.PathLike | str,
    *,
    segmentations_root: os.PathLike | str | None = None,
) -> pathlib.Path:
    """Write the CUB-200-2011 manifest to ``out_path`` and return ``out_path``.

    One row per line of ``images.txt``, in that order: ``image_id`` = the CUB image
    id (string), ``label`` = the class name from ``classes.txt`` (e.g.
    ``001.Black_footed_Albatross``), box ``x0 = x, y0 = y, x1 = x + width,
    y1 = y + height`` from ``bounding_boxes.txt``, ``split`` = ``"train"`` for class
    ids 1–100 else ``"eval"``. ``uri`` points at ``images/<path>`` and ``mask_uri``
    at ``<segmentations>/<class dir>/<basename>.png`` when that file exists (else
    null); both are relative to ``out_path``'s directory when the file lies under
    it, else absolute. ``segmentations_root`` defaults to the first existing of
    ``<cub_root>/segmentations`` and ``<cub_root>/../segmentations``.

    Raises ``FileNotFoundError`` for a missing annotation file and ``ValueError``
    (naming file and line) for a malformed line, a duplicate id, an unknown class
    or an image without a label or box.
    """
    cub_root = pathlib.Path(cub_root)
    out_path = pathlib.Path(out_path)
    if not cub_root.is_dir():
        raise FileNotFoundError(f"CUB root {cub_root} is not a directory")
    images = _read_table(cub_root / "images.txt", ("image_id", "path"), _parse_path)
    labels = _read_table(cub_root / "image_class_labels.txt", ("image_id", "class_id"), _parse_int)
    classes = _read_table(cub_root / "classes.txt", ("class_id", "class_name"), _parse_path)
    boxes = _read_table(cub_root / "bounding_boxes.txt",
                        ("image_id", "x", "y", "width", "height"), _parse_box)
    seg_root = _segmentations_root(cub_root, segmentations_root)

    out_dir = out_path.parent
    columns = {name: [] for name in ANNOTATED_MANIFEST_SCHEMA.names}
    for image_id, (relative, line) in images.items():
        where = f"{cub_root / 'images.txt'}:{line}"
        if image_id not in labels:
            raise ValueError(f"{where}: image {image_id} has no line in image_class_labels.txt")
        if image_id not in boxes:
            raise ValueError(f"{where}: image {image_id} has no line in bounding_boxes.txt")
        class_id, label_line = labels[image_id]
        if class_id not in classes:
            raise ValueError(
                f"{cub_root / 'image_class_labels.txt'}:{label_line}: class {class_id} "
                "is not in classes.txt"
            )
        x, y, width, height = boxes[image_id][0]
        mask_uri = None
        if seg_root is not None:
            mask = (seg_root / relative).with_suffix(".png")
            if mask.is_file():
                mask_uri = manifest_uri(mask, out_dir)
        columns["image_id"].append(str(image_id))
        columns["uri"].append(manifest_uri(cub_root / "images" / relative, out_dir))
        columns["label"].append(classes[class_id][0])
        columns["bbox_x0"].append(x)
        columns["bbox_y0"].append(y)
        columns["bbox_x1"].append(x + width)
        columns["bbox_y1"].append(y + height)
        columns["mask_uri"].append(mask_uri)
        columns["split"].append("train" if class_id <= TRAIN_CLASSES else "eval")
    if not columns["image_id"]:
        raise ValueError(f"{cub_root / 'images.txt'} lists no images")
    return write_manifest(columns, out_path, ANNOTATED_MANIFEST_SCHEMA)


def _segmentations_root(cub_root: pathlib.Path, given) -> pathlib.Path | None:
    if given is not None:
        given = pathlib.Path(given)
        if not given.is_dir():
            raise FileNotFoundError(f"segmentations root {given} is not a directory")
        return given
    for candidate in (cub_root / "segmentations", cub_root.parent / "segmentations"):
        if candidate.is_dir():
            return candidate
    return None


def _read_table(path: pathlib.Path, fields: tuple[str, ...], parse_value) -> dict:
    """Read a CUB ``.txt`` file into ``{id: (value, line_number)}``.

    The id is the first field, a positive integer; ``parse_value`` turns the remaining text into the
    value and raises ``ValueError`` with a short reason when it is malformed.
    """
    if not path.is_file():
        raise FileNotFoundError(f"CUB annotation file {path} is missing")
    expected = " ".join(f"<{f}>" for f in fields)
    table = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            parts = text.split(maxsplit=1)
            try:
                if len(parts) != 2:
                    raise ValueError("too few fields")
                key = _parse_int(parts[0])
                value = parse_value(parts[1], len(fields) - 1)
            except ValueError as error:
                raise ValueError(
                    f"{path}:{number}: malformed line {text!r} ({error}); expected '{expected}'"
                ) from None
            if key in table:
                raise ValueError(
                    f"{path}:{number}: duplicate id {key} (first on line {table[key][1]})"
                )
            table[key] = (value, number)
    return table


def _parse_int(text: str, count: int = 1) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{text!r} is not a positive integer id")
    return int(text)


def _parse_path(text: str, count: int) -> str:
    # Paths and class names contain no spaces in CUB; anything after a space is an error.
    if len(text.split()) != 1:
        raise ValueError("too many fields")
    return text


def _parse_box(text: str, count: int) -> tuple[float, float, float, float]:
    parts = text.split()
    if len(parts) != count:
        raise ValueError(f"{len(parts) + 1} fields instead of {count + 1}")
    x, y, width, height = (float(p) for p in parts)
    if not all(math.isfinite(v) for v in (x, y, width, height)):
        raise ValueError("non-finite value")
    if width < 0 or height < 0:
        raise ValueError("negative width or height")
    return x, y, width, height
