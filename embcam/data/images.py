"""Decoding images and masks from bytes with OpenCV, resizing for the network, and writing
image files.

Decoders return pixels in display orientation: the EXIF orientation tag (JPEG APP1, PNG
eXIf, WebP EXIF, TIFF) is applied as browsers show the image, so widths, heights, boxes and
masks are all in display coordinates. A mask file's own EXIF orientation is applied too.

A small file can claim a huge image (a 1 MB PNG of 20000 x 20000 pixels decodes to 1.2 GB).
With ``max_pixels`` the size is read from the header (by Pillow, see :func:`image_header`)
and checked before any pixel is decoded; the header is read for JPEG, PNG, GIF, BMP, WebP
and TIFF, and other formats are then refused since their size cannot be checked. Error messages give formats and sizes,
never bytes of the file.

For the network, :func:`decode_resized` decodes a large JPEG at 1/2, 1/4 or 1/8 scale
(libjpeg's scaled IDCT, which skips most of the decode work) when the reduced image still
has both sides at least the network's input size; everything else is decoded in full.

OpenCV runs its own thread pool; callers that run one decode per CPU (Ray tasks) may want
``cv2.setNumThreads(1)``. This module leaves thread settings alone.
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import cv2
import numpy as np
from PIL import BmpImagePlugin, GifImagePlugin, Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

_WIDTH_TAG, _HEIGHT_TAG, _ORIENTATION_TAG = 256, 257, 0x0112  # TIFF / EXIF tags
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)  # "BM" alone is too common a start
# Pillow's reader of each format but TIFF. JpegImageFile, not the factory Image.open uses, so
# a multi-picture JPEG (MPO) is read as the JPEG its first picture is.
_READERS = {"JPEG": JpegImagePlugin.JpegImageFile, "PNG": PngImagePlugin.PngImageFile,
            "GIF": GifImagePlugin.GifImageFile, "BMP": BmpImagePlugin.BmpImageFile,
            "WebP": WebPImagePlugin.WebPImageFile}
# EXIF orientation -> (row step, column step) taking stored pixels to display pixels.
# 5..8 are 1..4 applied after swapping rows and columns (6: 90 deg clockwise, 8: anticlockwise).
_FLIPS = {1: (1, 1), 2: (1, -1), 3: (-1, -1), 4: (-1, 1)}


class ImageDecodeError(ValueError):
    """The bytes are not an image OpenCV can decode, are too large, or of an unsupported type."""


# --- headers ----------------------------------------------------------------------------------


class ImageHeader(NamedTuple):
    """What the header of an encoded image says, read without decoding any pixel."""

    format: str | None  # JPEG, PNG, GIF, BMP, WebP or TIFF by the magic bytes; None for others
    size: tuple[int, int] | None  # (width, height) as stored; None when it cannot be read
    orientation: int  # EXIF orientation 1..8; 1 when absent or invalid
    over_pixels: int  # > 0: Pillow refused to read a header claiming more pixels than this


def _format(data: bytes) -> str | None:
    """The image format named by the file's magic bytes, for the formats whose header is read."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:4] in _TIFF_MAGIC:
        return "TIFF"
    return None


def _exif_tags(block: bytes, wanted: tuple[int, ...]) -> dict[int, int]:
    """The integer (SHORT or LONG) values of the ``wanted`` tags in the first IFD of an EXIF
    block, a TIFF structure ("Exif\\0\\0" prefix allowed); none from a missing or broken block."""
    exif = Image.Exif()
    try:
        exif.load(block)
        values = {tag: exif.get(tag) for tag in wanted}
    except Exception:  # whatever a broken block raises, it has no tags to give
        return {}
    return {tag: value for tag, value in values.items() if isinstance(value, int)}


def image_header(data: bytes) -> ImageHeader:
    """Format, stored size and EXIF orientation of encoded image bytes, read with Pillow.

    Each format's Pillow reader is called directly, not through ``PIL.Image.open``, whose
    pixel limit (``MAX_IMAGE_PIXELS``: a warning, then an error) would decide before ours.
    Only two readers still check a size themselves: WebP's (the canvas) and GIF's (a frame
    reaching outside the screen); their refusal is kept in ``over_pixels``. TIFF is read as
    the EXIF block it is (its first IFD), so no TIFF pixel layout Pillow lacks can hide its size.
    """
    fmt = _format(data)
    size, tags, over_pixels = None, {}, 0
    if fmt == "TIFF":
        tags = _exif_tags(data, (_WIDTH_TAG, _HEIGHT_TAG, _ORIENTATION_TAG))
        size = (tags.get(_WIDTH_TAG, 0), tags.get(_HEIGHT_TAG, 0))
    elif fmt is not None:
        try:
            with _READERS[fmt](io.BytesIO(data)) as image:
                size, block = image.size, image.info.get("exif", b"")
        except Image.DecompressionBombError:
            over_pixels = 2 * Image.MAX_IMAGE_PIXELS
        except Exception:  # a header cut short or malformed, in any of many ways
            pass
        else:
            tags = _exif_tags(block, (_ORIENTATION_TAG,)) if block else {}
    if size is not None and not (size[0] > 0 and size[1] > 0):
        size = None
    orientation = tags.get(_ORIENTATION_TAG, 1)
    return ImageHeader(fmt, size, orientation if 1 <= orientation <= 8 else 1, over_pixels)


def image_size_from_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the stored image, read from the header without decoding.

    Known for JPEG, PNG, GIF, BMP, WebP and TIFF (first image); None for other formats and
    for headers that are cut short, malformed or give a zero size. The size is the stored
    one: EXIF orientation 5..8 swaps it for display.
    """
    return image_header(data).size


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of encoded image bytes; 1 when absent or invalid."""
    return image_header(data).orientation


# --- decoding ---------------------------------------------------------------------------------


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(f"image is {width}x{height} = {width * height / 1e6:.4g} MP, "
                               f"over the limit of {max_pixels / 1e6:.4g} MP (--max-pixels)")


def _to_display(array: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels (H, W[, C]) turned as EXIF ``orientation`` says, as a contiguous array."""
    if orientation >= 5:
        array, orientation = array.swapaxes(0, 1), orientation - 4
    rows, columns = _FLIPS[orientation]
    return np.ascontiguousarray(array[::rows, ::columns])


def _cv_decode(data: bytes, flags: int, fmt: str | None) -> np.ndarray:
    """``cv2.imdecode`` with its failures as :class:`ImageDecodeError`."""
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as exc:  # e.g. larger than OpenCV's own pixel limit
        raise ImageDecodeError(f"cannot decode image: {exc}") from None
    if array is None:
        raise ImageDecodeError(f"cannot decode image: unknown format or corrupt data "
                               f"({fmt or 'unknown format'}, {len(data)} bytes)")
    return array


def _imdecode(data: bytes, max_pixels: int | None,
              header: ImageHeader | None = None) -> tuple[np.ndarray, int]:
    """The decoded array in display orientation (channels in OpenCV's BGR(A) order, dtype as
    stored) and the EXIF orientation that was applied. ``header``: ``image_header(data)``,
    when the caller has read it already."""
    if not data:
        raise ImageDecodeError("empty file")
    header = header or image_header(data)
    fmt = header.format
    if max_pixels is not None:
        if header.size is None and header.over_pixels:  # Pillow refused: only a lower bound is known
            over = f"image is over {header.over_pixels / 1e6:.4g} MP ({fmt}, {len(data)} bytes)"
            if header.over_pixels >= max_pixels:
                raise ImageDecodeError(f"{over}, over the limit of {max_pixels / 1e6:.4g} MP (--max-pixels)")
            raise ImageDecodeError(f"{over}, more than Pillow reads the header of (PIL.Image.MAX_IMAGE_PIXELS), "
                                   f"so it cannot be checked against the pixel limit (--max-pixels)")
        if header.size is None:
            raise ImageDecodeError(
                f"cannot read the image size from the header ({fmt or 'unknown format'}, "
                f"{len(data)} bytes), so it cannot be checked against the pixel limit "
                f"(--max-pixels); the size is read from JPEG, PNG, GIF, BMP, WebP and TIFF files")
        _check_pixels(*header.size, max_pixels)
    # IMREAD_UNCHANGED: OpenCV applies no EXIF orientation (except to TIFF, see below)
    array = _cv_decode(data, cv2.IMREAD_UNCHANGED, fmt)
    if fmt == "TIFF":  # OpenCV's TIFF decoder applies the Orientation tag itself
        return array, header.orientation
    return _to_display(array, header.orientation), header.orientation


def _to_unit_float(array: np.ndarray) -> np.ndarray:
    """Pixel values as float32 in [0, 1]: 8-bit / 255, 16-bit / 65535, floats clipped."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255)
    if array.dtype == np.uint16:
        return array.astype(np.float32) / np.float32(65535)
    if array.dtype in (np.float32, np.float64):  # float TIFF and the like: assumed [0, 1]
        return np.clip(np.nan_to_num(array.astype(np.float32)), 0, 1)
    raise ImageDecodeError(f"unsupported pixel type {array.dtype}")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Pixel values as uint8, rounded to nearest (16-bit: 65535 -> 255, 32768 -> 128)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:  # round(x / 257) in integers; x / 257 is never a tie
        return ((array.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)
    return np.rint(_to_unit_float(array) * 255).astype(np.uint8)


def decode_image_oriented(data: bytes, max_pixels: int | None = None) -> tuple[np.ndarray, int]:
    """Encoded image bytes as (display-oriented (H, W, 3) uint8 RGB array, EXIF orientation).

    The orientation (1..8, 1 when the file has none) has already been applied to the array;
    it is returned to be reported. With ``max_pixels``, an image whose header gives more
    pixels, or whose size cannot be read from its header, is refused before decoding.

    Converts rather than rejects: grey becomes three equal channels; an alpha channel
    (RGBA, grey + alpha, palette with transparency) is composited over white, as a catalog
    page shows it; 16-bit and float images are scaled to 8 bits with rounding; palette and
    CMYK images come out as RGB (OpenCV's decoders expand them). Raises
    :class:`ImageDecodeError` for empty, truncated, too large or non-image bytes.
    """
    array, orientation = _imdecode(data, max_pixels)
    return _to_rgb(array), orientation


def _to_rgb(array: np.ndarray) -> np.ndarray:
    """A decoded array (OpenCV's channel order, any depth) as (H, W, 3) uint8 RGB, as
    :func:`decode_image_oriented` describes."""
    if array.ndim == 2:
        array = array[:, :, None]
    channels = array.shape[2]
    if channels in (2, 4):  # colour + alpha: composite over white, at full precision
        values = _to_unit_float(array)
        colour, alpha = values[:, :, :-1], values[:, :, -1:]
        array = _to_uint8(colour * alpha + (1 - alpha))
    else:
        array = _to_uint8(array)
    if array.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=2))
    if array.shape[2] == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    raise ImageDecodeError(f"unsupported number of channels: {channels}")


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """The display-oriented RGB array of :func:`decode_image_oriented`."""
    return decode_image_oriented(data, max_pixels)[0]


def decode_mask(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Encoded mask bytes as an (H, W) float32 array in [0, 1], in display orientation.

    The mask is given in the display coordinates of its image; its own EXIF orientation,
    if any, is applied. ``max_pixels`` as for :func:`decode_image_oriented`.
    Grey levels are scaled (8-bit / 255, 16-bit / 65535). A colour mask gives its
    brightest channel, which is the grey value for grey stored as RGB and keeps a pure
    red, green or blue mask as foreground. With an alpha channel: when the colour is the
    same everywhere the alpha is the mask (shape drawn only in transparency); otherwise
    the colour value times alpha (composited over black).
    """
    array, _ = _imdecode(data, max_pixels)
    if array.ndim == 2:  # grey, the common case: no channel axis to reduce (which cost 4 ms at 800 px)
        return _to_unit_float(array)
    values = _to_unit_float(array)
    channels = values.shape[2]
    if channels in (1, 3):
        return np.ascontiguousarray(values.max(axis=2))
    if channels in (2, 4):
        colour, alpha = values[:, :, :-1].max(axis=2), values[:, :, -1]
        if colour.size and np.all(colour == colour.flat[0]):
            return np.ascontiguousarray(alpha)
        return colour * alpha
    raise ImageDecodeError(f"unsupported number of channels in mask: {channels}")


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` (H, W, 3) uint8 resized to (size, size, 3), stretched, never cropped.

    The aspect ratio is not kept, so the heatmap covers the whole image. Axes that shrink
    use INTER_AREA (averaging, no aliasing), axes that grow INTER_LINEAR; when one axis
    shrinks and the other grows, the two are resized one after the other. An image that
    is already (size, size, 3) is returned as is, not copied.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    height, width = image.shape[:2]
    if height > size or width > size:
        image = cv2.resize(image, (min(width, size), min(height, size)),
                           interpolation=cv2.INTER_AREA)
    if image.shape[0] < size or image.shape[1] < size:
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(image)


_REDUCED_COLOR = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def jpeg_reduction(width: int, height: int, size: int) -> int:
    """The libjpeg scale denominator (1, 2, 4 or 8) to decode a width x height JPEG with
    before resizing it to ``size``: the largest f whose reduced image, ceil(w / f) x
    ceil(h / f) pixels, still has both sides >= ``size``; 1 when even 2 is too much. So
    the final resize always shrinks (INTER_AREA) and never enlarges a reduced image."""
    for factor in (8, 4, 2):
        if -(-width // factor) >= size and -(-height // factor) >= size:
            return factor
    return 1


def decode_resized(data: bytes, size: int, max_pixels: int | None = None,
                   reduce: bool = True) -> tuple[np.ndarray, int, int, int]:
    """Encoded image bytes as (the (size, size, 3) uint8 RGB input of the network, width,
    height, EXIF orientation), width and height being those of the full displayed image,
    as :func:`decode_image_oriented` gives them.

    A JPEG about twice ``size`` or more on both sides is decoded at 1/2, 1/4 or 1/8 scale
    (:func:`jpeg_reduction`) and then resized: 2-3x cheaper than a full decode, and close
    to it, not equal (the scaled IDCT filters a little differently from INTER_AREA's box).
    Anything else, and every image with ``reduce=False``, gives exactly
    ``resize_square(decode_image_oriented(data, max_pixels)[0], size)``. ``max_pixels``
    and errors as for :func:`decode_image_oriented`.
    """
    header = image_header(data)
    stored = header.size if reduce and header.format == "JPEG" else None
    factor = jpeg_reduction(*stored, size) if stored else 1  # both sides count: orientation can't matter
    if factor == 1:
        array, orientation = _imdecode(data, max_pixels, header)
        image = _to_rgb(array)
        return resize_square(image, size), image.shape[1], image.shape[0], orientation
    if max_pixels is not None:
        _check_pixels(*stored, max_pixels)
    # OpenCV's colour decode makes grey and CMYK JPEGs BGR; orientation is applied here, as
    # for a full decode, so the flag keeps OpenCV from applying it too.
    bgr = _cv_decode(data, _REDUCED_COLOR[factor] | cv2.IMREAD_IGNORE_ORIENTATION, "JPEG")
    orientation = header.orientation
    image = cv2.cvtColor(_to_display(bgr, orientation), cv2.COLOR_BGR2RGB)
    width, height = stored if orientation < 5 else stored[::-1]
    return resize_square(image, size), width, height, orientation


def write_image(path: str | os.PathLike, rgb: np.ndarray, params: tuple | list = ()) -> None:
    """Write an RGB (or grey) uint8 array as an image file, the format from the name (.png,
    .jpg); ``params`` as for ``cv2.imwrite``, e.g. ``[cv2.IMWRITE_JPEG_QUALITY, 90]``.
    Raises OSError when the file cannot be written."""
    pixels = rgb[..., ::-1] if rgb.ndim == 3 else rgb  # OpenCV writes BGR
    try:
        written = cv2.imwrite(os.fspath(path), np.ascontiguousarray(pixels), list(params))
    except cv2.error:
        written = False
    if not written:
        raise OSError(f"could not write {os.fspath(path)} (a .png or .jpg name in a folder that exists?)")
