"""embcam.images: decoding every common pixel layout to RGB uint8, masks, resizing."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from embcam.images import ImageDecodeError, decode_image, decode_mask, resize_square


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
