"""embcam.data.images: decoding every common pixel layout to RGB uint8, masks, resizing."""

import functools
import io
import struct
import tracemalloc
import warnings
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from embcam.boxes import checked_bbox
from embcam.data.images import (
    ImageDecodeError,
    ImageHeader,
    decode_image,
    decode_image_oriented,
    decode_mask,
    decode_resized,
    exif_orientation,
    image_header,
    image_size_from_header,
    jpeg_reduction,
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
    try:
        for decode in (decode_image, decode_mask):
            with pytest.raises(ImageDecodeError,
                               match=r"image is 20000x20000 = 400 MP, over the limit of 100 MP "
                                     r"\(--max-pixels\)"):
                decode(pixel_bomb, max_pixels=100_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # decoding would take 400 MB (grey) and 1.2 GB (RGB)


def test_pixel_limit_is_inclusive():
    png = pil_bytes(Image.new("RGB", (10, 10)))
    assert decode_image(png, max_pixels=100).shape == (10, 10, 3)
    with pytest.raises(ImageDecodeError, match=r"10x10 = 0.0001 MP, over the limit of 9.9e-05 MP"):
        decode_image(png, max_pixels=99)


def bmp_header(width: int, height: int, core: bool = False) -> bytes:
    if core:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return b"BM" + bytes(12) + struct.pack("<IHHHH", 12, width, height, 1, 24)
    return b"BM" + bytes(12) + struct.pack("<IiiHH", 40, width, height, 1, 24) + bytes(24)  # 1 plane, 24 bits


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


def test_pillows_own_pixel_limit_never_decides(pixel_bomb):
    """400 MP is over twice PIL.Image.MAX_IMAGE_PIXELS: Image.open would warn, then raise."""
    assert 20000 * 20000 > 2 * Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_header(pixel_bomb) == ImageHeader("PNG", (20000, 20000), 1, 0)
        with pytest.raises(ImageDecodeError, match=r"image is 20000x20000 = 400 MP, over the limit of 300 MP"):
            decode_image(pixel_bomb, max_pixels=300_000_000)  # ours decides, above Pillow's 179 MP


def webp_claiming(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header claims width x height."""
    data = bytearray(pil_bytes(Image.new("RGB", (16, 16)), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L" and data[20] == 0x2F
    bits = int.from_bytes(data[21:25], "little") & ~(1 << 28) + 1  # keep alpha and version bits
    data[21:25] = (bits | (width - 1) | (height - 1) << 14).to_bytes(4, "little")
    return bytes(data)


def test_a_webp_canvas_pillow_refuses_to_open_is_refused_as_too_large():
    # Pillow's WebP reader itself refuses a canvas over 2 * MAX_IMAGE_PIXELS (179 MP): only that bound is known
    assert image_size_from_header(webp_claiming(300, 200)) == (300, 200)
    bomb = webp_claiming(16383, 16383)
    assert image_header(bomb) == ImageHeader("WebP", None, 1, 2 * Image.MAX_IMAGE_PIXELS)
    with pytest.raises(ImageDecodeError, match=rf"image is over 179 MP \(WebP, {len(bomb)} bytes\), "
                                               rf"over the limit of 100 MP \(--max-pixels\)"):
        decode_image(bomb, max_pixels=100_000_000)
    with pytest.raises(ImageDecodeError, match=r"image is over 179 MP .* cannot be checked against the pixel limit"):
        decode_image(bomb, max_pixels=300_000_000)


def test_multi_picture_jpeg_is_read_as_its_first_picture():
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 0, 0)).save(buffer, "MPO", save_all=True, exif=exif,
                                                  append_images=[Image.new("RGB", (20, 10))])
    assert Image.open(buffer).format == "MPO"
    data = buffer.getvalue()
    assert image_header(data) == ImageHeader("JPEG", (40, 30), 6, 0)
    rgb(decode_image(data, max_pixels=40 * 30), [200, 0, 0])
    assert decode_image(data).shape == (40, 30, 3)


def test_only_the_exif_orientation_counts():
    """As in browsers and OpenCV: an XMP tiff:Orientation (which Pillow's getexif falls back to) is not applied."""
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    data = pil_bytes(Image.new("RGB", (4, 2)), "JPEG", xmp=xmp)
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == 6
    assert exif_orientation(data) == 1 and decode_image(data).shape == (2, 4, 3)


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


# --- decode_resized: JPEGs decoded at 1/2, 1/4, 1/8 scale for the network -------------------

REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


@functools.lru_cache(maxsize=None)
def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image (read-only): smooth random layers at cell sizes 256..8 px with
    amplitude proportional to the cell (the 1/f spectrum of photographs), discs for sharp
    edges, and a little sensor noise."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 128, np.float32)
    for cell in (256, 128, 64, 32, 16, 8):
        layer = rng.normal(0, 0.35 * cell, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        image += cv2.resize(layer, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(10):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        radius = int(rng.integers(5, max(6, min(width, height) // 4)))
        cv2.circle(image, centre, radius, rng.uniform(0, 255, 3).tolist(), -1)
    image += rng.standard_normal(image.shape, np.float32) * 3
    image = np.clip(image, 0, 255).astype(np.uint8)
    image.flags.writeable = False
    return image


def jpeg(array: np.ndarray, **options) -> bytes:
    return pil_bytes(Image.fromarray(array), "JPEG", **{"quality": 90, **options})


def reduced_reference(data: bytes, factor: int, orientation: int, size: int) -> np.ndarray:
    """What the reduced path should give, built independently: OpenCV's reduced decode, the
    browser's reading of the orientation (DISPLAY), BGR -> RGB, the same resize."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), REDUCED[factor] | cv2.IMREAD_IGNORE_ORIENTATION)
    return resize_square(np.ascontiguousarray(DISPLAY[orientation](bgr)[..., ::-1]), size)


def old_path(data: bytes, size: int, max_pixels=None):
    image, orientation = decode_image_oriented(data, max_pixels)
    return resize_square(image, size), image.shape[1], image.shape[0], orientation


def assert_same(got, expected):
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[1:] == expected[1:]
    assert all(type(v) is int for v in got[1:]), got[1:]


@pytest.mark.parametrize("width, height, size, factor", [
    (448, 448, 224, 2),  # exactly twice
    (447, 600, 224, 2),  # ceil(447 / 2) = 224 still reaches the input size
    (446, 600, 224, 1),  # just under: 223 < 224
    (600, 446, 224, 1),
    (223, 223, 224, 1),  # smaller than the input: never reduced
    (1200, 900, 224, 4),  # ceil(900 / 4) = 225
    (900, 1200, 224, 4),  # portrait
    (1200, 900, 128, 4),  # ceil(900 / 8) = 113 < 128
    (1200, 900, 64, 8),
    (893, 2000, 224, 4),  # ceil(893 / 4) = 224
    (892, 2000, 224, 2),
    (4000, 300, 224, 1),  # very wide: the short side decides
    (4000, 500, 224, 2),
    (100_000, 100_000, 1, 8),  # 8 is libjpeg's largest reduction
])
def test_jpeg_reduction(width, height, size, factor):
    assert jpeg_reduction(width, height, size) == factor


@pytest.mark.parametrize("width, height", [(1201, 901), (448, 448), (447, 893), (37, 21)])
def test_reduced_jpeg_sizes_are_rounded_up(width, height):
    data = jpeg(np.zeros((height, width, 3), np.uint8))
    for factor, flag in REDUCED.items():
        out = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
        assert out.shape == (-(-height // factor), -(-width // factor), 3)
    # so the factor chosen keeps both decoded sides >= size, and the next one would not
    for size in (16, 64, 112, 224, 300):
        factor = jpeg_reduction(width, height, size)
        if factor > 1:
            out = cv2.imdecode(np.frombuffer(data, np.uint8), REDUCED[factor])
            assert min(out.shape[:2]) >= size
        if factor < 8 and min(width, height) >= size:
            out = cv2.imdecode(np.frombuffer(data, np.uint8), REDUCED[factor * 2])
            assert min(out.shape[:2]) < size


@pytest.mark.parametrize("width, height, options", [
    (1200, 900, {}),  # 4:2:0
    (1201, 901, {"subsampling": 0}),  # odd sizes, 4:4:4
    (900, 1200, {"progressive": True}),
])
@pytest.mark.parametrize("size", [400, 224, 64])
def test_reduced_decode_equals_the_reference(width, height, options, size):
    data = jpeg(photo(width, height), **options)
    factor = jpeg_reduction(width, height, size)
    assert factor > 1
    assert_same(decode_resized(data, size, max_pixels=width * height),
                (reduced_reference(data, factor, 1, size), width, height, 1))


@pytest.mark.parametrize("size, bound", [(400, 1.0), (224, 1.0), (128, 1.0), (64, 2.5)])
def test_reduced_decode_is_close_to_the_full_decode(size, bound):
    # libjpeg's scaled IDCT keeps the low frequencies of each 8x8 block (at 1/8, its mean):
    # a filter close to, not equal to, INTER_AREA's box. Measured on this image, mean
    # |reduced - full| at the network's size is 0.4-0.75 / 255 at 1/2 and 1/4 and about
    # 1.7 / 255 at 1/8 (64 px from 1200: the 8x8 block means then 2.3x INTER_AREA blur a bit
    # more). Each is below what the quality-90 encoding itself changed in the pixels
    # (about 2.3 / 255 at full size): the input moves less than the JPEG already moved it.
    source = photo(1200, 900, seed=1)
    data = jpeg(source, subsampling=0)
    full = old_path(data, size)[0].astype(np.int16)
    reduced = decode_resized(data, size)[0].astype(np.int16)
    assert jpeg_reduction(1200, 900, size) > 1
    difference = np.abs(reduced - full).mean()
    encoding_error = np.abs(decode_image(data).astype(np.int16) - source).mean()
    assert difference <= bound
    assert difference < encoding_error


@pytest.mark.parametrize("orientation", range(1, 9))
def test_reduced_decode_reports_the_full_display_size_and_orientation(orientation):
    data = with_orientation(photo(640, 480, seed=orientation), orientation, "JPEG", quality=90)
    size = 112
    factor = jpeg_reduction(640, 480, size)
    assert factor == 4
    got = decode_resized(data, size, max_pixels=640 * 480)
    full = old_path(data, size, max_pixels=640 * 480)
    assert got[1:] == full[1:]  # the header's size, swapped for 5..8, is the decoded one
    assert got[1:] == ((480, 640) if orientation >= 5 else (640, 480)) + (orientation,)
    np.testing.assert_array_equal(got[0], reduced_reference(data, factor, orientation, size))
    assert np.abs(got[0].astype(np.int16) - full[0]).mean() <= 1.5  # and oriented as the full decode


def test_grey_and_cmyk_jpegs_come_out_as_rgb():
    grey = pil_bytes(Image.fromarray(photo(900, 600)[..., 1]), "JPEG", quality=90)
    out, width, height, _ = decode_resized(grey, 128)
    assert out.shape == (128, 128, 3) and (width, height) == (900, 600)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.abs(out.astype(np.int16) - old_path(grey, 128)[0]).mean() <= 1.0
    cmyk = pil_bytes(Image.fromarray(photo(900, 600)).convert("CMYK"), "JPEG", quality=90)
    out = decode_resized(cmyk, 128)[0]
    full = old_path(cmyk, 128)[0]
    assert out.shape == (128, 128, 3)
    assert np.abs(out.astype(np.int16) - full).mean() <= 1.0
    assert np.abs(full.astype(np.int16) - resize_square(photo(900, 600), 128)).mean() <= 3  # RGB, not inverted


@pytest.mark.parametrize("name", ["small JPEG", "PNG", "WebP", "large JPEG, reduce=False"])
def test_everything_else_is_the_old_path_exactly(name):
    encode = {"small JPEG": lambda: jpeg(photo(300, 200)),
              "PNG": lambda: pil_bytes(Image.fromarray(photo(640, 480)), compress_level=1),
              "WebP": lambda: pil_bytes(Image.fromarray(photo(640, 480)), "WEBP"),
              "large JPEG, reduce=False": lambda: with_orientation(photo(1200, 900), 6, "JPEG", quality=90)}
    data = encode[name]()
    for size in (112, 224):  # the small JPEG is under twice either size: not reduced
        assert_same(decode_resized(data, size, reduce=name != "large JPEG, reduce=False"), old_path(data, size))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(jpeg(np.zeros((16, 16, 3), np.uint8)))
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_pixel_bombs_are_refused_before_decoding(pixel_bomb):
    """The message is the header check's: a decode of these files would fail otherwise."""
    bomb = jpeg_claiming(60000, 60000)
    assert image_size_from_header(bomb) == (60000, 60000) and jpeg_reduction(60000, 60000, 224) == 8
    with pytest.raises(ImageDecodeError, match=r"image is 60000x60000 = 3600 MP, over the limit of 100 MP"):
        decode_resized(bomb, 224, max_pixels=100_000_000)
    with pytest.raises(ImageDecodeError, match=r"image is 20000x20000 = 400 MP, over the limit of 100 MP"):
        decode_resized(pixel_bomb, 224, max_pixels=100_000_000)


def test_pixel_limit_on_the_reduced_path_is_on_the_full_size():
    data = jpeg(photo(1200, 900))
    assert decode_resized(data, 224, max_pixels=1200 * 900)[1:3] == (1200, 900)
    with pytest.raises(ImageDecodeError, match=r"1200x900 = 1.08 MP, over the limit"):
        decode_resized(data, 224, max_pixels=1200 * 900 - 1)


def test_broken_jpegs_raise_image_decode_error():
    data = jpeg(photo(1200, 900))
    with pytest.raises(ImageDecodeError, match="^empty file$"):
        decode_resized(b"", 224)
    for cut in (len(data) // 2, len(data) - 100):  # in the scan: the header is whole, so reduced
        with pytest.raises(ImageDecodeError, match=rf"cannot decode image: unknown format or corrupt data "
                                                   rf"\(JPEG, {cut + len(SECRET)} bytes\)") as error:
            decode_resized(data[:cut] + SECRET, 224)
        assert "TOPSECRET" not in str(error.value)
    with pytest.raises(ImageDecodeError, match="cannot decode image"):  # no frame header: the old path
        decode_resized(data[:30], 224)
    with pytest.raises(ImageDecodeError, match="cannot read the image size"):
        decode_resized(data[:30], 224, max_pixels=10**8)
