"""A CUB-like synthetic open-set dataset, drawn deterministically from a seed.

Each class is a distinct "species": a body shape, a texture, a two-colour palette
and a part layout (a head at a class-specific angle, optionally a tail or a wing,
a class-specific pattern direction and frequency). Every image shows one object of
its class at a random pose (rotation, mirror), scale, aspect and colour jitter on a
cluttered background shared by all classes, with one to three smaller distractor
objects of random (not class-informative) appearance behind it and, in some images,
a clutter bar occluding part of it.

Annotations per image:

- ``bbox_*``: the tight box of the object's *full* silhouette (amodal: occluded parts
  count), in continuous pixel coordinates, so a silhouette spanning pixel columns
  ``i..j`` gives ``bbox_x0 = i`` and ``bbox_x1 = j + 1``.
- mask PNG (0/255, same size as the image): the *visible* silhouette, i.e. the full
  silhouette minus the occluder. Its tight box therefore lies inside the bbox.

Class *c* is split ``"train"`` when ``c < num_classes / 2`` and ``"eval"`` otherwise,
like the deep-metric-learning split of CUB. Every image is seeded from
``(seed, class, index)`` alone, so generating a subset of classes gives exactly the
images of the full run.
"""
from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass
from typing import Iterable

import cv2
import numpy as np
import pyarrow.parquet as pq

from embcam.boxes import BBOX_COLUMNS
from embcam.data.fetch import read_bytes
from embcam.data.images import decode_image, decode_mask, write_image
from embcam.data.locations import resolve_uri
from embcam.datasets.manifest_writer import ANNOTATED_MANIFEST_SCHEMA, write_manifest

SHAPES = ("ellipse", "rectangle", "rounded", "triangle", "star", "diamond", "hexagon")
TEXTURES = ("solid", "stripes", "dots", "checker", "gradient")
# Saturated object colours (BGR, as OpenCV draws).
COLOURS = {
    "red": (40, 40, 220),
    "orange": (30, 140, 255),
    "yellow": (40, 220, 240),
    "green": (60, 170, 40),
    "teal": (150, 150, 20),
    "sky": (235, 190, 90),
    "blue": (200, 70, 30),
    "purple": (150, 50, 120),
    "magenta": (200, 60, 230),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "brown": (30, 75, 130),
}
# Muted colours for background, clutter and occluders, shared by every class.
BACKGROUND_COLOURS = (
    (120, 130, 125), (95, 110, 105), (140, 150, 150), (110, 120, 140), (130, 125, 110),
    (100, 115, 120), (150, 140, 135), (85, 95, 90), (125, 140, 130), (115, 105, 100),
)
_COLOUR_NAMES = tuple(COLOURS)
_PALETTES = tuple(
    (a, b) for i, a in enumerate(_COLOUR_NAMES) for b in _COLOUR_NAMES[i + 1:]
)  # 66 unordered pairs
# Class c takes shape c mod 7, texture c mod 5 and palette c mod 66 (each through a
# seeded permutation). 7, 5 and 66 are pairwise coprime, so by the Chinese remainder
# theorem the triple is unique for every c below their product.
MAX_CLASSES = len(SHAPES) * len(TEXTURES) * len(_PALETTES)

# Stream tags keep the class-level and image-level random streams apart.
_ORDER_STREAM, _CLASS_STREAM, _IMAGE_STREAM = 0, 1, 2
_POLYGON_POINTS = 120
_SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point precision (1/16 pixel)
_OCCLUSION_PROBABILITY = 0.35
_BOX_FRACTION_RANGE = (0.12, 0.55)  # target box area / image area of the object
_DISTRACTOR_FRACTION_RANGE = (0.015, 0.05)


@dataclass(frozen=True)
class ClassSpec:
    """The appearance that defines one synthetic class."""

    index: int
    name: str
    shape: str
    texture: str
    colour_a: str  # body colour
    colour_b: str  # head and pattern colour
    head_angle: float  # degrees, in the object's frame
    head_size: float  # head radius, body radius = 1
    part: str  # "none", "tail" or "wing"
    part_angle: float  # degrees
    pattern_angle: float  # degrees: stripe / gradient direction
    pattern_frequency: float  # cycles per body radius


@dataclass(frozen=True)
class Sample:
    """One rendered image with its annotations."""

    image: np.ndarray  # (H, W, 3) uint8, BGR
    silhouette: np.ndarray  # (H, W) bool: the full object before occlusion
    mask: np.ndarray  # (H, W) bool: the visible object
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 of the silhouette


def class_spec(index: int, seed: int = 0) -> ClassSpec:
    """Return the appearance of class ``index`` (independent of how many classes a
    dataset has, so subsets and supersets agree)."""
    if not 0 <= index < MAX_CLASSES:
        raise ValueError(f"class index {index} outside [0, {MAX_CLASSES})")
    order = np.random.default_rng([seed, _ORDER_STREAM])
    shapes = order.permutation(len(SHAPES))
    textures = order.permutation(len(TEXTURES))
    palettes = order.permutation(len(_PALETTES))
    rng = np.random.default_rng([seed, _CLASS_STREAM, index])
    colour_a, colour_b = _PALETTES[palettes[index % len(_PALETTES)]]
    if rng.random() < 0.5:
        colour_a, colour_b = colour_b, colour_a
    shape = SHAPES[shapes[index % len(SHAPES)]]
    texture = TEXTURES[textures[index % len(TEXTURES)]]
    head_angle = float(rng.integers(8) * 45 + rng.uniform(-12, 12))
    return ClassSpec(
        index=index,
        name=f"c{index:03d}_{shape}_{texture}_{colour_a}-{colour_b}",
        shape=shape,
        texture=texture,
        colour_a=colour_a,
        colour_b=colour_b,
        head_angle=head_angle,
        head_size=float(rng.uniform(0.25, 0.42)),
        part=("none", "tail", "wing")[int(rng.integers(3))],
        part_angle=float(head_angle + 180 + rng.uniform(-50, 50)),
        pattern_angle=float(rng.uniform(0, 180)),
        pattern_frequency=float(rng.uniform(1.2, 2.2)),
    )


def class_names(num_classes: int = 100, seed: int = 0) -> list[str]:
    """Return the readable class names ``c007_star_dots_red-blue`` for classes
    ``0 .. num_classes-1``."""
    _check_num_classes(num_classes)
    return [class_spec(c, seed).name for c in range(num_classes)]


def render_sample(
    class_index: int,
    image_index: int,
    *,
    seed: int = 0,
    min_side: int = 96,
    max_side: int = 160,
) -> Sample:
    """Render image ``image_index`` of class ``class_index`` (pure function of its
    arguments)."""
    if not 32 <= min_side <= max_side:
        raise ValueError(f"need 32 <= min_side <= max_side, got {min_side}, {max_side}")
    spec = class_spec(class_index, seed)
    rng = np.random.default_rng([seed, _IMAGE_STREAM, class_index, image_index])
    width = int(rng.integers(min_side, max_side + 1))
    height = int(rng.integers(min_side, max_side + 1))
    image = _background(rng, height, width)
    for _ in range(int(rng.integers(1, 4))):
        _draw_distractor(rng, image)
    silhouette = _draw_object(rng, image, spec)
    mask = silhouette.copy()
    if rng.random() < _OCCLUSION_PROBABILITY:
        mask &= ~_draw_occluder(rng, image, silhouette)
    return Sample(image=image, silhouette=silhouette, mask=mask, bbox=tight_box(silhouette))


def tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box ``(x0, y0, x1, y1)`` of the true pixels of ``mask`` in continuous
    coordinates (pixel ``i`` spans ``[i, i+1)``)."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        raise ValueError("tight_box of an empty mask")
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def generate_dataset(
    out_dir: os.PathLike | str,
    *,
    num_classes: int = 100,
    images_per_class: int = 30,
    classes: Iterable[int] | None = None,
    min_side: int = 96,
    max_side: int = 160,
    seed: int = 0,
) -> pathlib.Path:
    """Write the dataset under ``out_dir`` and return ``out_dir/manifest.parquet``.

    Images go to ``images/<class name>/<image_id>.jpg`` (JPEG quality 90), masks to
    ``masks/<class name>/<image_id>.png`` (0/255). ``classes`` (indices below
    ``num_classes``) restricts generation to those classes; their rows and pixels
    equal those of the full run. ``image_id`` is ``c<class:03d>_<index:04d>``.
    """
    _check_num_classes(num_classes)
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    if not 32 <= min_side <= max_side:
        raise ValueError(f"need 32 <= min_side <= max_side, got {min_side}, {max_side}")
    selected = range(num_classes) if classes is None else sorted({int(c) for c in classes})
    if not selected:
        raise ValueError("classes selects no class")
    for c in selected:
        if not 0 <= c < num_classes:
            raise ValueError(f"class index {c} outside [0, {num_classes})")

    out_dir = pathlib.Path(out_dir)
    columns = {name: [] for name in ANNOTATED_MANIFEST_SCHEMA.names}
    for c in selected:
        spec = class_spec(c, seed)
        split = "train" if c < num_classes / 2 else "eval"
        (out_dir / "images" / spec.name).mkdir(parents=True, exist_ok=True)
        (out_dir / "masks" / spec.name).mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            sample = render_sample(c, i, seed=seed, min_side=min_side, max_side=max_side)
            image_id = f"c{c:03d}_{i:04d}"
            uri = f"images/{spec.name}/{image_id}.jpg"
            mask_uri = f"masks/{spec.name}/{image_id}.png"
            write_image(out_dir / uri, sample.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])  # BGR -> RGB
            write_image(out_dir / mask_uri, sample.mask.astype(np.uint8) * 255)
            columns["image_id"].append(image_id)
            columns["uri"].append(uri)
            columns["label"].append(spec.name)
            for name, value in zip(BBOX_COLUMNS, sample.bbox):
                columns[name].append(value)
            columns["mask_uri"].append(mask_uri)
            columns["split"].append(split)
    return write_manifest(columns, out_dir / "manifest.parquet", ANNOTATED_MANIFEST_SCHEMA)


def summary(manifest_path: os.PathLike | str) -> dict:
    """Counts and uniform baselines of a manifest (any maker's, not only synthetic).

    Returns ``{"images", "classes", "splits": {split: {"images", "classes"}},
    "images_with_box", "images_with_mask", "mean_box_fraction",
    "mean_mask_fraction"}``; rows without a split count under ``"unsplit"``. The fractions
    are the uniform baselines of docs/design.md §7 (box area / image area, mask area /
    image area, masks binarised at 0.5), or
    ``None`` when no row has the annotation. Image sizes come from the mask when
    there is one, else from the image.
    """
    manifest_path = pathlib.Path(manifest_path)
    table = pq.read_table(manifest_path).to_pylist()
    root = manifest_path.parent
    splits: dict[str, dict] = {}
    for row in table:
        split = row.get("split") or "unsplit"
        entry = splits.setdefault(split, {"images": 0, "classes": set()})
        entry["images"] += 1
        entry["classes"].add(row.get("label"))
    box_fractions, mask_fractions = [], []
    for row in table:
        has_box = all(row.get(name) is not None for name in BBOX_COLUMNS)
        mask_uri = row.get("mask_uri")
        if not has_box and mask_uri is None:
            continue
        if mask_uri is not None:
            mask = decode_mask(read_bytes(resolve_uri(mask_uri, str(root))))
            height, width = mask.shape
            mask_fractions.append(float(np.mean(mask >= 0.5)))
        else:
            height, width = decode_image(read_bytes(resolve_uri(row["uri"], str(root)))).shape[:2]
        if has_box:
            box_area = (row["bbox_x1"] - row["bbox_x0"]) * (row["bbox_y1"] - row["bbox_y0"])
            box_fractions.append(box_area / (width * height))
    return {
        "images": len(table),
        "classes": len({row.get("label") for row in table}),
        "splits": {
            name: {"images": entry["images"], "classes": len(entry["classes"])}
            for name, entry in sorted(splits.items())
        },
        "images_with_box": len(box_fractions),
        "images_with_mask": len(mask_fractions),
        "mean_box_fraction": float(np.mean(box_fractions)) if box_fractions else None,
        "mean_mask_fraction": float(np.mean(mask_fractions)) if mask_fractions else None,
    }


# ---------------------------------------------------------------- drawing helpers


def _check_num_classes(num_classes: int) -> None:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [1, {MAX_CLASSES}], got {num_classes}")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Muted noise texture plus random lines and blobs, independent of the class."""
    base = np.asarray(BACKGROUND_COLOURS[rng.integers(len(BACKGROUND_COLOURS))], np.float32)
    grid = (int(rng.integers(3, 8)), int(rng.integers(3, 8)))
    # Mostly brightness, a little hue: blotchy but muted.
    coarse = rng.normal(0.0, 20.0, (*grid, 1)) + rng.normal(0.0, 8.0, (*grid, 3))
    low = cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    fine = rng.normal(0.0, 6.0, (height, width, 3)).astype(np.float32)
    image = np.clip(base + low + fine, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(4, 11))):
        colour = _muted(rng)
        if rng.random() < 0.5:
            p1 = (int(rng.integers(width)), int(rng.integers(height)))
            p2 = (int(rng.integers(width)), int(rng.integers(height)))
            cv2.line(image, p1, p2, colour, int(rng.integers(1, 5)), cv2.LINE_AA)
        else:
            centre = (int(rng.integers(width)), int(rng.integers(height)))
            axes = (int(rng.integers(3, width // 6)), int(rng.integers(3, height // 6)))
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(image, centre, axes, angle, 0, 360, colour, -1, cv2.LINE_AA)
    return image


def _muted(rng: np.random.Generator) -> tuple[int, ...]:
    colour = np.asarray(BACKGROUND_COLOURS[rng.integers(len(BACKGROUND_COLOURS))])
    return tuple(int(v) for v in np.clip(colour + rng.integers(-25, 26, 3), 0, 255))


def _body_polygon(shape: str) -> np.ndarray:
    """Closed body outline in the object frame (radius about 1, y down), resampled to
    evenly spaced points so a radial lookup by angle is accurate."""
    if shape == "ellipse":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        points = np.stack([np.cos(t), 0.62 * np.sin(t)], axis=1)
    elif shape == "rectangle":
        points = np.array([[-1, -0.6], [1, -0.6], [1, 0.6], [-1, 0.6]], float)
    elif shape == "rounded":  # superellipse |x|^4 + |y/0.62|^4 = 1
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        c, s = np.cos(t), np.sin(t)
        x, y = np.sign(c) * np.abs(c) ** 0.5, 0.62 * np.sign(s) * np.abs(s) ** 0.5
        points = np.stack([x, y], axis=1)
    elif shape == "triangle":
        t = np.deg2rad([-90, 30, 150])
        points = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif shape == "star":
        t = np.deg2rad(np.arange(10) * 36 - 90)
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        points = np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    elif shape == "diamond":
        points = np.array([[1, 0], [0, 0.7], [-1, 0], [0, -0.7]], float)
    elif shape == "hexagon":
        t = np.deg2rad(np.arange(6) * 60)
        points = np.stack([np.cos(t), 0.8 * np.sin(t)], axis=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return _resample(points, _POLYGON_POINTS)


def _resample(points: np.ndarray, count: int) -> np.ndarray:
    closed = np.vstack([points, points[:1]])
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
    at = np.linspace(0, arc[-1], count, endpoint=False)
    return np.stack([np.interp(at, arc, closed[:, 0]), np.interp(at, arc, closed[:, 1])], axis=1)


def _radius_at(body: np.ndarray, angle_deg: float) -> float:
    """Distance from the centre to the body outline in direction ``angle_deg``."""
    angles = np.arctan2(body[:, 1], body[:, 0])
    target = math.radians(angle_deg)
    diff = np.abs(np.angle(np.exp(1j * (angles - target))))
    return float(np.linalg.norm(body[np.argmin(diff)]))


def _circle(centre: np.ndarray, radius: float, count: int = 32) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, count, endpoint=False)
    return centre + radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _direction(angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([math.cos(a), math.sin(a)])


@dataclass
class _Pose:
    """Object frame → image: ``p = centre + scale * R(rotation) @ (aspect * flip * q)``."""

    linear: np.ndarray  # 2x2, includes scale, rotation, aspect and mirror
    centre: np.ndarray

    def apply(self, points: np.ndarray) -> np.ndarray:
        return points @ self.linear.T + self.centre

    def object_coords(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inverse = np.linalg.inv(self.linear)
        dx, dy = xs - self.centre[0], ys - self.centre[1]
        return inverse[0, 0] * dx + inverse[0, 1] * dy, inverse[1, 0] * dx + inverse[1, 1] * dy


def _place(
    rng: np.random.Generator,
    polygons: list[np.ndarray],
    height: int,
    width: int,
    fraction_range: tuple[float, float],
    inside: bool,
) -> _Pose:
    """Random pose whose box covers about a random fraction of the image; with
    ``inside`` the whole object stays in the image."""
    rotation = math.radians(rng.uniform(-50, 50))
    aspect = math.exp(rng.uniform(-0.2, 0.2))
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    c, s = math.cos(rotation), math.sin(rotation)
    unit = np.array([[c, -s], [s, c]]) @ np.diag([aspect * mirror, 1.0 / aspect])
    points = np.vstack(polygons) @ unit.T
    low, high = points.min(axis=0), points.max(axis=0)
    extent = high - low
    fraction = rng.uniform(*fraction_range)
    scale = math.sqrt(fraction * width * height / (extent[0] * extent[1]))
    scale = min(scale, 0.96 * (width - 2) / extent[0], 0.96 * (height - 2) / extent[1])
    if inside:
        x_range = (1 - low[0] * scale, width - 1 - high[0] * scale)
        y_range = (1 - low[1] * scale, height - 1 - high[1] * scale)
    else:
        x_range, y_range = (0, width), (0, height)
    centre = np.array([rng.uniform(*x_range), rng.uniform(*y_range)])
    return _Pose(linear=scale * unit, centre=centre)


def _fill(canvas_shape: tuple[int, int], polygon_image: np.ndarray) -> np.ndarray:
    """Rasterise a polygon given in continuous image coordinates to a bool mask."""
    mask = np.zeros(canvas_shape, np.uint8)
    # OpenCV puts integer coordinates at pixel centres; ours put them at corners.
    fixed = np.round((polygon_image - 0.5) * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(mask, [fixed], 1, cv2.LINE_8, _SUBPIXEL_BITS)
    return mask.astype(bool)


def _jitter(rng: np.random.Generator, colour_name: str, brightness: float) -> np.ndarray:
    colour = np.asarray(COLOURS[colour_name], np.float32) * brightness + rng.normal(0, 8, 3)
    return np.clip(colour, 0, 255).astype(np.float32)


def _paint_texture(
    image: np.ndarray,
    region: np.ndarray,
    pose: _Pose,
    texture: str,
    colour_a: np.ndarray,
    colour_b: np.ndarray,
    angle_deg: float,
    frequency: float,
) -> None:
    """Fill ``region`` with a texture defined in the object frame (it turns with the
    object), mixing ``colour_a`` (t=0) and ``colour_b`` (t=1)."""
    x, y, w, h = cv2.boundingRect(region.astype(np.uint8))
    if w == 0 or h == 0:
        return
    ys, xs = np.mgrid[y:y + h, x:x + w].astype(np.float64) + 0.5  # pixel centres
    u, v = pose.object_coords(xs, ys)
    direction = _direction(angle_deg)
    along = u * direction[0] + v * direction[1]
    if texture == "solid":
        t = np.zeros_like(u)
    elif texture == "stripes":
        t = (np.sin(2 * np.pi * frequency * along) > 0).astype(float)
    elif texture == "dots":
        a, b = u * frequency * 1.5, v * frequency * 1.5
        t = (np.hypot(a - np.round(a), b - np.round(b)) < 0.3).astype(float)
    elif texture == "checker":
        t = ((np.floor(u * frequency * 1.2) + np.floor(v * frequency * 1.2)) % 2).astype(float)
    elif texture == "gradient":
        t = np.clip(0.5 + 0.5 * along, 0.0, 1.0)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    colours = colour_a * (1 - t[..., None]) + colour_b * t[..., None]
    window = region[y:y + h, x:x + w]
    image[y:y + h, x:x + w][window] = np.clip(colours[window], 0, 255).astype(np.uint8)


def _draw_object(rng: np.random.Generator, image: np.ndarray, spec: ClassSpec) -> np.ndarray:
    """Draw the class object and return its full silhouette (bool mask)."""
    height, width = image.shape[:2]
    body = _body_polygon(spec.shape)
    head_dir = _direction(spec.head_angle)
    head_radius = spec.head_size * rng.uniform(0.85, 1.15)
    head_centre = head_dir * _radius_at(body, spec.head_angle) * 0.95
    head = _circle(head_centre, head_radius)
    polygons = [body, head]
    part = None
    if spec.part == "tail":
        part_dir = _direction(spec.part_angle)
        normal = np.array([-part_dir[1], part_dir[0]])
        root = part_dir * _radius_at(body, spec.part_angle) * 0.8
        half = 0.22 * rng.uniform(0.85, 1.15)
        tip = part_dir * (_radius_at(body, spec.part_angle) + 0.5 * rng.uniform(0.85, 1.15))
        part = np.stack([root + half * normal, tip, root - half * normal])
        polygons.append(part)
    elif spec.part == "wing":
        part_dir = _direction(spec.part_angle)
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        length = 0.45 * rng.uniform(0.85, 1.15)
        local = np.stack([length * np.cos(t), 0.2 * np.sin(t)], axis=1)
        rotate = np.array([[part_dir[0], -part_dir[1]], [part_dir[1], part_dir[0]]])
        part = local @ rotate.T + part_dir * 0.25
        polygons.append(part)
    pose = _place(rng, polygons, height, width, _BOX_FRACTION_RANGE, inside=True)

    brightness = rng.uniform(0.85, 1.15)
    colour_a = _jitter(rng, spec.colour_a, brightness)
    colour_b = _jitter(rng, spec.colour_b, brightness)
    shape = (height, width)
    body_mask = _fill(shape, pose.apply(body))
    head_mask = _fill(shape, pose.apply(head))
    silhouette = body_mask | head_mask
    if spec.part == "tail":
        tail_mask = _fill(shape, pose.apply(part))
        image[tail_mask] = (colour_a * 0.7).astype(np.uint8)
        silhouette |= tail_mask
    _paint_texture(image, body_mask, pose, spec.texture, colour_a, colour_b,
                   spec.pattern_angle, spec.pattern_frequency)
    if spec.part == "wing":
        wing_mask = _fill(shape, pose.apply(part))
        image[wing_mask] = (0.5 * colour_a + 0.5 * colour_b * 0.6).astype(np.uint8)
        silhouette |= wing_mask
    image[head_mask] = colour_b.astype(np.uint8)
    # The eye lies inside the head disc, so it leaves the silhouette unchanged.
    eye = _circle(head_centre + head_dir * 0.4 * head_radius, 0.25 * head_radius, 16)
    eye_colour = (235, 235, 235) if spec.colour_b == "black" else (20, 20, 20)
    image[_fill(shape, pose.apply(eye)) & head_mask] = eye_colour
    return silhouette


def _draw_distractor(rng: np.random.Generator, image: np.ndarray) -> None:
    """A small object of random shape, texture and palette: not class-informative."""
    height, width = image.shape[:2]
    body = _body_polygon(SHAPES[rng.integers(len(SHAPES))])
    pose = _place(rng, [body], height, width, _DISTRACTOR_FRACTION_RANGE, inside=False)
    names = rng.choice(len(_COLOUR_NAMES), size=2, replace=False)
    brightness = rng.uniform(0.85, 1.15)
    _paint_texture(
        image,
        _fill((height, width), pose.apply(body)),
        pose,
        TEXTURES[rng.integers(len(TEXTURES))],
        _jitter(rng, _COLOUR_NAMES[names[0]], brightness),
        _jitter(rng, _COLOUR_NAMES[names[1]], brightness),
        float(rng.uniform(0, 180)),
        float(rng.uniform(1.2, 2.2)),
    )


def _draw_occluder(
    rng: np.random.Generator, image: np.ndarray, silhouette: np.ndarray
) -> np.ndarray:
    """Draw a clutter bar across the object; return the pixels it covers.

    Bars that would hide more than half the object are thinned, then dropped.
    """
    height, width = image.shape[:2]
    x0, y0, x1, y1 = tight_box(silhouette)
    through = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)])
    direction = _direction(rng.uniform(0, 180)) * (width + height)
    thickness = max(2, int(rng.uniform(0.12, 0.3) * min(x1 - x0, y1 - y0)))
    area = silhouette.sum()
    colour = _muted(rng)
    for _ in range(3):
        bar = np.zeros((height, width), np.uint8)
        p1 = tuple(int(v) for v in np.round(through - direction))
        p2 = tuple(int(v) for v in np.round(through + direction))
        cv2.line(bar, p1, p2, 1, thickness, cv2.LINE_8)
        covered = bar.astype(bool)
        if (covered & silhouette).sum() <= 0.5 * area:
            noise = rng.normal(0.0, 6.0, (int(covered.sum()), 3))
            image[covered] = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
            return covered
        thickness = max(1, thickness // 2)
    return np.zeros((height, width), bool)
