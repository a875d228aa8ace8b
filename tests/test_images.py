"""embcam.images: decoding every common pixel layout to RGB uint8, masks, resizing."""

import io
import struct
import time
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from embcam.boxes import checked_bbox
from embcam.images import (
    ImageDecodeError,
    decode_image,
    decode_image_oriented,
    decode_mask,
    exif_orientation,
    image_size_from_header,
    resize_square,
)


def pil_bytes(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def cv_png(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array)
    assert ok
    return encoded.tobytes()


def rgb(image: np.ndarray, value) -> None:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert (image == np.array(value, np.uint8)).all(), image.reshape(-1, 3)[:3]


# --- decode_image ---------------------------------------------------------------------------


def test_rgb_png_is_exact_and_in_rgb_order():
    source = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = decode_image(pil_bytes(Image.fromarray(source)))
    assert out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, source)
    rgb(decode_image(pil_bytes(Image.new("RGB", (3, 2), (255, 0, 0)))), [255, 0, 0])


def test_jpeg_colour_within_tolerance():
    out = decode_image(pil_bytes(Image.new("RGB", (16, 16), (200, 30, 90)), "JPEG", quality=95))
    assert np.abs(out.astype(int) - [200, 30, 90]).max() <= 3


def test_grayscale_becomes_three_equal_channels():
    rgb(decode_image(pil_bytes(Image.new("L", (4, 3), 77))), [77, 77, 77])
    rgb(decode_image(pil_bytes(Image.new("1", (4, 3), 1))), [255, 255, 255])


def test_rgba_is_composited_over_white():
    rgb(decode_image(pil_bytes(Image.new("RGBA", (2, 2), (255, 0, 0, 255)))), [255, 0, 0])
    rgb(decode_image(pil_bytes(Image.new("RGBA", (2, 2), (255, 0, 0, 0)))), [255, 255, 255])
    # 0 * a + 255 * (1 - a) with a = 128/255 -> 127
    rgb(decode_image(pil_bytes(Image.new("RGBA", (2, 2), (255, 0, 0, 128)))), [255, 127, 127])


def test_grayscale_alpha_is_composited_over_white():
    rgb(decode_image(pil_bytes(Image.new("LA", (2, 2), (77, 255)))), [77, 77, 77])
    rgb(decode_image(pil_bytes(Image.new("LA", (2, 2), (0, 128)))), [127, 127, 127])


def test_sixteen_bit_grey_is_scaled_with_rounding():
    values = np.array([[65535, 32768, 0, 25700, 128, 129]], np.uint16)  # 25700 = 100 * 257
    out = decode_image(cv_png(values))
    assert out[0, :, 0].tolist() == [255, 128, 0, 100, 0, 1]  # 128/257 = 0.498, 129/257 = 0.502
    assert (out[..., 0] == out[..., 2]).all()


def test_sixteen_bit_colour_keeps_channel_order():
    bgr = np.zeros((2, 3, 3), np.uint16)
    bgr[..., 2] = 65535  # red in OpenCV's BGR order
    bgr[..., 1] = 32768
    rgb(decode_image(cv_png(bgr)), [255, 128, 0])


def test_sixteen_bit_with_alpha():
    bgra = np.zeros((2, 2, 4), np.uint16)
    bgra[..., 0] = 65535  # blue
    bgra[..., 3] = 65535  # opaque
    rgb(decode_image(cv_png(bgra)), [0, 0, 255])
    bgra[..., 3] = 0
    rgb(decode_image(cv_png(bgra)), [255, 255, 255])


def test_palette_png_with_and_without_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    palette.putpixel((1, 0), 1)
    out = decode_image(pil_bytes(palette))
    assert out[0].tolist() == [[255, 0, 0], [0, 255, 0]]
    out = decode_image(pil_bytes(palette, transparency=0))
    assert out[0].tolist() == [[255, 255, 255], [0, 255, 0]]


def test_cmyk_jpeg_becomes_rgb():
    cyan = decode_image(pil_bytes(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", quality=95))
    assert cyan.shape == (8, 8, 3)
    assert np.abs(cyan.astype(int) - [0, 255, 255]).max() <= 4
    magenta = decode_image(pil_bytes(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "JPEG"))
    assert np.abs(magenta.astype(int) - [255, 0, 255]).max() <= 4


def test_float_tiff_is_scaled_from_unit_range():
    grey = np.array([[0.0, 0.5, 1.0, 2.0]], np.float32)
    out = decode_image(pil_bytes(Image.fromarray(grey), "TIFF"))
    assert out[0, :, 1].tolist() == [0, 128, 255, 255]


def test_bad_bytes_raise_image_decode_error():
    with pytest.raises(ImageDecodeError, match="^empty file$"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_image(b"this is not an image at all" * 10)
    png = pil_bytes(Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)))
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_image(png[: len(png) // 2])
    jpeg = pil_bytes(Image.new("RGB", (64, 64), (255, 0, 0)), "JPEG")
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_image(jpeg[: len(jpeg) // 2])
    assert issubclass(ImageDecodeError, ValueError)


# --- decode_mask ----------------------------------------------------------------------------


def test_mask_eight_and_sixteen_bit_grey():
    out = decode_mask(pil_bytes(Image.fromarray(np.array([[0, 128, 255]], np.uint8))))
    assert out.dtype == np.float32 and out.shape == (1, 3)
    np.testing.assert_array_equal(out, np.array([[0, 128, 255]], np.float32) / np.float32(255))
    out = decode_mask(cv_png(np.array([[0, 32768, 65535]], np.uint16)))
    np.testing.assert_allclose(out, [[0, 32768 / 65535, 1]], rtol=0, atol=1e-7)


def test_mask_colour_uses_brightest_channel():
    red = np.zeros((2, 2, 3), np.uint8)
    red[0, 0] = (255, 0, 0)
    out = decode_mask(pil_bytes(Image.fromarray(red)))
    assert out.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    grey = decode_mask(pil_bytes(Image.new("RGB", (2, 2), (100, 100, 100))))
    np.testing.assert_array_equal(grey, np.full((2, 2), 100 / 255, np.float32))


def test_mask_in_alpha_with_constant_colour():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = [[255, 0], [0, 51]]
    out = decode_mask(pil_bytes(Image.fromarray(rgba)))
    np.testing.assert_allclose(out, [[1, 0], [0, 0.2]], atol=1e-7)
    la = decode_mask(pil_bytes(Image.fromarray(np.dstack([np.full((1, 2), 9, np.uint8),
                                                          np.array([[0, 255]], np.uint8)]),
                                               "LA")))
    np.testing.assert_array_equal(la, [[0, 1]])


def test_mask_colour_with_alpha_is_colour_times_alpha():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, :3] = [[255, 255, 255], [0, 0, 0], [255, 255, 255]]
    rgba[0, :, 3] = [255, 255, 0]
    np.testing.assert_array_equal(decode_mask(pil_bytes(Image.fromarray(rgba))), [[1, 0, 0]])


def test_mask_bad_bytes():
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode_mask(b"")
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_mask(b"\x89PNG garbage")


# --- hostile and odd images: sizes from headers, pixel limits, error messages -----------------


def png_by_hand(width: int, height: int) -> bytes:
    """A valid all-black 8-bit grey PNG, built row by row: a pixel bomb without the pixels."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    compressor = zlib.compressobj(1)
    row = bytes(width + 1)  # filter byte 0, then the pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def pixel_bomb() -> bytes:
    return png_by_hand(20000, 20000)  # 400 MP: 1.2 GB as RGB, from about 2 MB


def test_hand_made_png_is_a_real_image():
    rgb(decode_image(png_by_hand(300, 200)), [0, 0, 0])
    assert decode_image(png_by_hand(300, 200)).shape == (200, 300, 3)


def test_pixel_bomb_is_refused_from_its_header(pixel_bomb):
    assert len(pixel_bomb) < 4 << 20
    assert image_size_from_header(pixel_bomb) == (20000, 20000)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        for decode in (decode_image, decode_mask):
            with pytest.raises(ImageDecodeError,
                               match=r"image is 20000x20000 = 400 MP, over the limit of 100 MP "
                                     r"\(--max-pixels\)"):
                decode(pixel_bomb, max_pixels=100_000_000)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 16 << 20  # decoding would take 400 MB (grey) and 1.2 GB (RGB)


def test_pixel_limit_is_inclusive():
    png = pil_bytes(Image.new("RGB", (10, 10)))
    assert decode_image(png, max_pixels=100).shape == (10, 10, 3)
    with pytest.raises(ImageDecodeError, match=r"10x10 = 0.0001 MP, over the limit of 9.9e-05 MP"):
        decode_image(png, max_pixels=99)


def bmp_header(width: int, height: int, core: bool = False) -> bytes:
    if core:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return b"BM" + bytes(12) + struct.pack("<IHHHH", 12, width, height, 1, 24)
    return b"BM" + bytes(12) + struct.pack("<Iii", 40, width, height) + bytes(28)


@pytest.mark.parametrize("fmt, options", [
    ("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("GIF", {}), ("BMP", {}),
    ("WEBP", {"quality": 80}), ("WEBP", {"lossless": True}), ("WEBP", {"exif": b"Exif\0\0"}),
    ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}),
])
def test_image_size_from_header(fmt, options):
    data = pil_bytes(Image.new("RGB", (37, 21), (9, 99, 199)), fmt, **options)
    assert image_size_from_header(data) == (37, 21)
    assert decode_image(data, max_pixels=37 * 21).shape == (21, 37, 3)


def test_image_size_from_odd_headers():
    assert image_size_from_header(bmp_header(7, -5)) == (7, 5)  # rows stored top-down
    assert image_size_from_header(bmp_header(7, 5, core=True)) == (7, 5)
    webp = pil_bytes(Image.new("RGB", (16, 16)), "WEBP", lossless=True)
    assert webp[12:16] == b"VP8L"
    assert pil_bytes(Image.new("RGB", (16, 16)), "WEBP")[12:16] == b"VP8 "
    png = pil_bytes(Image.new("RGB", (16, 16)))
    for cut in (0, 10, 20):
        assert image_size_from_header(png[:cut]) is None
    jpeg = pil_bytes(Image.new("RGB", (16, 16)), "JPEG")
    assert image_size_from_header(jpeg[:30]) is None  # cut before the frame header
    assert image_size_from_header(b"P6 16 16 255\n" + bytes(768)) is None  # PPM: not read
    assert image_size_from_header(b"not an image") is None
    assert image_size_from_header(b"BMW " + SECRET) is None  # not a BMP: no sizes from text
    assert image_size_from_header(bmp_header(0, 5)) is None  # zero size


def test_unreadable_size_is_refused_only_under_a_pixel_limit():
    ok, ppm = cv2.imencode(".ppm", np.full((3, 4, 3), 50, np.uint8))
    assert ok
    rgb(decode_image(ppm.tobytes()), [50, 50, 50])
    with pytest.raises(ImageDecodeError, match=r"cannot read the image size from the header "
                                               r"\(unknown format, \d+ bytes\)"):
        decode_image(ppm.tobytes(), max_pixels=100)


SECRET = b"secret-user:x:0:0:TOPSECRET-d41d8cd9:/home/secret-user:/bin/sh\n"


@pytest.mark.parametrize("data", [
    SECRET * 20,
    b"\x89PNG\r\n\x1a\n" + SECRET * 20,  # looks like a PNG, is not
    pil_bytes(Image.new("RGB", (8, 8)))[:40] + SECRET,  # a truncated PNG
])
def test_error_messages_never_quote_the_file(data):
    for decode in (decode_image, decode_mask):
        for max_pixels in (None, 100):
            with pytest.raises(ImageDecodeError) as error:
                decode(data, max_pixels=max_pixels)
            message = str(error.value)
            assert "TOPSECRET" not in message and "secret-user" not in message, message
            assert repr(data[:8])[2:-1] not in message, message
            assert "bytes" in message or "MP" in message, message


# --- EXIF orientation: display coordinates ----------------------------------------------------

# What a browser shows for each EXIF orientation, from the stored pixels (EXIF 2.3, 0x0112).
DISPLAY = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
           5: lambda a: np.rot90(np.fliplr(a), 1), 6: lambda a: np.rot90(a, -1),
           7: lambda a: np.rot90(np.fliplr(a), -1), 8: lambda a: np.rot90(a, 1)}


def with_orientation(array: np.ndarray, orientation: int, fmt: str, **options) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return pil_bytes(Image.fromarray(array), fmt, exif=exif, **options)


@pytest.mark.parametrize("fmt, options, tolerance", [
    ("PNG", {}, 0), ("WEBP", {"lossless": True}, 0), ("TIFF", {}, 0),
    ("JPEG", {"quality": 95, "subsampling": 0}, 8),  # 4:4:4, so the blocks keep their colour
])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(fmt, options, tolerance, orientation):
    stored = np.zeros((24, 40, 3), np.uint8)  # blocks, so JPEG keeps them apart
    stored[:8, :8] = (255, 0, 0)  # top-left: red
    stored[:8, -8:] = (0, 255, 0)  # top-right: green
    stored[-8:, :8] = (0, 0, 255)  # bottom-left: blue
    data = with_orientation(stored, orientation, fmt, **options)
    assert exif_orientation(data) == orientation
    assert image_size_from_header(data) == (40, 24)  # as stored
    out, reported = decode_image_oriented(data, max_pixels=40 * 24)
    expected = DISPLAY[orientation](stored)
    assert reported == orientation
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected).max() <= tolerance
    # the same as Pillow's own reading of the tag
    pillow = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB")))
    assert np.abs(out.astype(int) - pillow).max() <= tolerance
    np.testing.assert_array_equal(decode_image(data), out)


@pytest.mark.parametrize("orientation", [6, 8])
def test_mask_own_orientation_is_applied(orientation):
    stored = np.zeros((2, 3), np.uint8)
    stored[0, 0] = 255
    out = decode_mask(with_orientation(stored, orientation, "PNG"))
    np.testing.assert_array_equal(out, DISPLAY[orientation](stored) / 255)


def test_missing_or_invalid_orientation_is_one():
    plain = pil_bytes(Image.new("RGB", (4, 2)))
    assert exif_orientation(plain) == 1
    assert decode_image_oriented(plain)[1] == 1
    for value in (0, 9, 300):
        data = with_orientation(np.zeros((2, 4, 3), np.uint8), value, "JPEG")
        assert exif_orientation(data) == 1
        assert decode_image(data).shape == (2, 4, 3)
    jpeg = with_orientation(np.zeros((2, 4, 3), np.uint8), 6, "JPEG")
    at = jpeg.index(b"Exif\0\0")
    assert exif_orientation(jpeg[:at + 12]) == 1  # EXIF block cut short
    assert exif_orientation(b"") == 1 and exif_orientation(SECRET) == 1


def test_nan_or_missing_box_coordinate_is_an_error():
    # Boxes are checked in display coordinates; a NaN is never read as "no box".
    assert checked_bbox((0, 0, 4, 2), 4, 2) == (0.0, 0.0, 4.0, 2.0)
    with pytest.raises(ValueError, match=r"bbox \(1.0, nan, 3.0, 2.0\) has a non-finite "
                                         r"coordinate: y0 missing"):
        checked_bbox((1.0, np.float64("nan"), 3.0, 2.0), 4, 2)
    with pytest.raises(ValueError, match=r"x0, x1 missing \(None or NaN\)"):
        checked_bbox((None, 0, float("nan"), 2), 4, 2)
    with pytest.raises(ValueError, match="non-finite"):
        checked_bbox((0, 0, float("inf"), 2), 4, 2)
    with pytest.raises(ValueError, match="4 coordinates"):
        checked_bbox((0, 0, 4), 4, 2)


# --- resize_square --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(30, 50), (5, 7), (40, 8), (16, 16)])
def test_resize_shape_and_constant_stays_constant(shape):
    image = np.full((*shape, 3), (13, 200, 77), np.uint8)
    out = resize_square(image, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    rgb(out, [13, 200, 77])


def test_resize_shrinking_averages_areas():
    image = np.zeros((8, 8, 3), np.uint8)
    image[0, 0] = 160  # one bright pixel in the top-left 4x4 block
    out = resize_square(image, 2)
    assert out[..., 0].tolist() == [[10, 0], [0, 0]]  # 160 / 16 (bilinear would drop it)


def test_resize_enlarging_is_bilinear():
    image = np.zeros((1, 2, 3), np.uint8)
    image[0, 1] = 100
    out = resize_square(image, 4)
    # half-pixel centres: source x = -0.25, 0.25, 0.75, 1.25 -> 0, 25, 75, 100
    assert out[..., 0].tolist() == [[0, 25, 75, 100]] * 4


def test_resize_mixed_axes():
    image = np.zeros((8, 1, 3), np.uint8)
    image[3] = 100  # rows 0..3 average to 25 with INTER_AREA (bilinear samples rows 1, 2)
    out = resize_square(image, 2)
    assert out[..., 0].tolist() == [[25, 25], [0, 0]]


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        resize_square(np.zeros((4, 4), np.uint8), 2)
    with pytest.raises(ValueError, match="positive integer"):
        resize_square(np.zeros((4, 4, 3), np.uint8), 0)
