"""What reading an image header costs: the size and EXIF orientation that the pixel limit and the
orientation need before a decode.

    .venv/bin/python bench/header_cost.py --before 7bfa71a

Times `images.image_header` (Pillow's format readers, the header only) on generated 1200x900 images: a JPEG
(quality 90) with a camera-like EXIF block (orientation 6, make, model, date, resolution), a PNG with an eXIf
chunk, a lossy WebP with EXIF, and an uncompressed TIFF. With `--before REV` it also times, interleaved in the
same run, what the decode path did at that revision of embcam/data/images.py (7bfa71a: the struct parser):
`_format`, `image_size_from_header` and `exif_orientation`. Median of `--rounds` rounds of `--repeats` calls,
in µs per header, wall (perf_counter) and this thread's CPU time (less disturbed on a shared machine); one full
`decode_image` of each file (wall, OpenCV's threads) is timed for scale.
"""
from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import time
import types
from pathlib import Path

import numpy as np
from PIL import Image

from embcam.data import images

ROOT = Path(__file__).resolve().parents[1]


def sample_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    # smooth colour fields with noise: photo-like enough for the encoders' sizes
    y, x = np.mgrid[0:900, 0:1200]
    pixels = np.stack([x * 255 // 1200, y * 255 // 900, (x + y) * 255 // 2100], axis=2)
    pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
    photo = Image.fromarray(pixels)
    exif = Image.Exif()
    exif.update({0x0112: 6, 0x010F: "Camera Maker", 0x0110: "Model X", 0x0132: "2024:05:01 12:00:00",
                 0x011A: 72.0, 0x011B: 72.0, 0x0128: 2})

    def encode(fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        photo.save(buffer, fmt, **options)
        return buffer.getvalue()

    return {"JPEG 1200x900 + EXIF": encode("JPEG", quality=90, exif=exif),
            "PNG 1200x900 + eXIf": encode("PNG", exif=exif),
            "WebP 1200x900 + EXIF": encode("WEBP", quality=80, exif=exif),
            "TIFF 1200x900": encode("TIFF")}


def old_images(revision: str) -> types.ModuleType:
    """embcam/data/images.py as it was at ``revision``, as a module of its own."""
    source = subprocess.run(["git", "show", f"{revision}:embcam/data/images.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("images_before")
    exec(compile(source, f"{revision}:embcam/data/images.py", "exec"), module.__dict__)
    return module


def per_call_us(check, data: bytes, repeats: int) -> tuple[float, float]:
    """(wall, this thread's CPU) µs per call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(repeats):
        check(data)
    return (time.perf_counter() - wall) / repeats * 1e6, (time.thread_time() - cpu) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="a revision whose embcam/data/images.py to time alongside")
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    checks = {"now": images.image_header}
    if args.before:
        old = old_images(args.before)
        checks[args.before] = lambda data: (old._format(data), old.image_size_from_header(data),
                                            old.exif_orientation(data))
    files = sample_files()
    for name, data in files.items():  # both give the same answer before anything is timed
        header = images.image_header(data)
        assert header.size == (1200, 900) and header.orientation == (1 if name.startswith("TIFF") else 6), name
        if args.before:
            assert checks[args.before](data)[1:] == (header.size, header.orientation), name

    times = {(name, label): [] for name in files for label in checks}
    for _ in range(args.rounds):  # interleaved: machine noise hits every check alike
        for name, data in files.items():
            for label, check in checks.items():
                times[name, label].append(per_call_us(check, data, args.repeats))
    columns = [(label, kind) for label in checks for kind in ("wall", "cpu")]
    print(f"{'file':<22} {'bytes':>8}" + "".join(f" {f'{label} {kind} µs':>17}" for label, kind in columns)
          + f" {'decode_image ms':>16}")
    for name, data in files.items():
        start = time.perf_counter()
        images.decode_image(data)
        decode_ms = (time.perf_counter() - start) * 1e3
        medians = [statistics.median(t[kind == "cpu"] for t in times[name, label]) for label, kind in columns]
        print(f"{name:<22} {len(data):>8}" + "".join(f" {m:>17.1f}" for m in medians) + f" {decode_ms:>16.1f}")

if __name__ == "__main__":
    main()
