"""Decoding images and masks from bytes with OpenCV, and resizing for the network.

Every decoder works on the stored pixels: EXIF orientation is not applied (as with PIL and
torchvision by default), so boxes and masks must be given on the stored pixel grid.
OpenCV runs its own thread pool; callers that run one decode per CPU (Ray tasks) may want
``cv2.setNumThreads(1)``. This module leaves thread settings alone.
"""

from __future__ import annotations

import cv2
import numpy as np


class ImageDecodeError(ValueError):
    """The bytes are not an image OpenCV can decode, or its pixel type is unsupported."""


def _imdecode(data: bytes) -> np.ndarray:
    """The raw decoded array (channels in OpenCV's BGR(A) order, dtype as stored)."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # e.g. larger than OpenCV's pixel limit
        raise ImageDecodeError(f"cannot decode image: {exc}") from None
    if array is None:
        raise ImageDecodeError(f"cannot decode image: unknown format or corrupt data "
                               f"({len(data)} bytes, starting {data[:8]!r})")
    return array


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


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes as an (H, W, 3) uint8 RGB array.

    Converts rather than rejects: grey becomes three equal channels; an alpha channel
    (RGBA, grey + alpha, palette with transparency) is composited over white, as a catalog
    page shows it; 16-bit and float images are scaled to 8 bits with rounding; palette and
    CMYK images come out as RGB (OpenCV's decoders expand them). Raises
    :class:`ImageDecodeError` for empty, truncated or non-image bytes.
    """
    array = _imdecode(data)
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


def decode_mask(data: bytes) -> np.ndarray:
    """Encoded mask bytes as an (H, W) float32 array in [0, 1].

    Grey levels are scaled (8-bit / 255, 16-bit / 65535). A colour mask gives its
    brightest channel, which is the grey value for grey stored as RGB and keeps a pure
    red, green or blue mask as foreground. With an alpha channel: when the colour is the
    same everywhere the alpha is the mask (shape drawn only in transparency); otherwise
    the colour value times alpha (composited over black).
    """
    array = _imdecode(data)
    values = _to_unit_float(array if array.ndim == 3 else array[:, :, None])
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
