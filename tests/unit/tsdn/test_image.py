import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tsdn.image import ImageDecodeError, colorize, decode_image, encode_png, to_rgb

RNG = np.random.default_rng(0)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit gray pixels but whose data holds one row."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
def test_decode_supported_formats(fmt: str):
    rgb = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    image = decode_image(_encode(Image.fromarray(rgb), fmt), f"x.{fmt.lower()}")
    assert image.size == (32, 24)
    out, mode = to_rgb(image)
    assert mode == "RGB" and out.shape == (24, 32, 3) and out.dtype == np.uint8
    if fmt != "JPEG":
        np.testing.assert_array_equal(out, rgb)


def test_bomb_is_refused_from_the_header_before_decoding():
    # 9000 x 9000 = 81 M pixels: below Pillow's own bomb limit, above our default; the pixel data is
    # truncated, so reaching the decoder would report "truncated" instead.
    data = _png_claiming(9000, 9000)
    assert len(data) < 1000
    with pytest.raises(ImageDecodeError, match="max_pixels") as info:
        decode_image(data, "s3://bucket/bomb.png")
    assert info.value.name == "s3://bucket/bomb.png"
    assert "refused before decoding" in str(info.value)


def test_max_pixels_is_configurable():
    data = _encode(Image.new("L", (20, 10)), "PNG")
    assert decode_image(data, "ok.png", max_pixels=200).size == (20, 10)
    with pytest.raises(ImageDecodeError, match="max_pixels=199"):
        decode_image(data, "small.png", max_pixels=199)


def test_truncated_png_names_the_input():
    data = _encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    with pytest.raises(ImageDecodeError, match=r"^parts/img_007\.png: corrupt or truncated PNG"):
        decode_image(data[: len(data) // 2], "parts/img_007.png")


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty input"), (b"hello, not an image", "not a PNG/JPEG/BMP/TIFF image")],
)
def test_not_an_image(data: bytes, reason: str):
    with pytest.raises(ImageDecodeError, match=reason) as info:
        decode_image(data, "thing.bin")
    assert str(info.value).startswith("thing.bin: ")


def test_other_formats_are_refused():
    with pytest.raises(ImageDecodeError, match="not a PNG/JPEG/BMP/TIFF"):
        decode_image(_encode(Image.new("RGB", (4, 4)), "GIF"), "a.gif")


def test_decode_error_pickles():
    error = ImageDecodeError("s3://b/k.png", "corrupt or truncated PNG (image file is truncated)")
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is ImageDecodeError
    assert (clone.name, clone.reason, str(clone)) == (error.name, error.reason, str(error))
    assert isinstance(clone, ValueError)


def test_gray_and_bilevel():
    gray = np.array([[0, 17], [128, 255]], np.uint8)
    out, mode = to_rgb(Image.fromarray(gray))
    assert mode == "L"
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))
    out, mode = to_rgb(Image.fromarray(gray).convert("1"))
    assert mode == "1"
    np.testing.assert_array_equal(out[:, :, 0], [[0, 0], [255, 255]])


def test_palette_with_and_without_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    out, mode = to_rgb(image)
    assert mode == "P"
    np.testing.assert_array_equal(out[0], [[10, 20, 30], [200, 100, 50]])
    image.info["transparency"] = 0
    reloaded = decode_image(_encode(image, "PNG"), "p.png")
    assert reloaded.mode == "P" and "transparency" in reloaded.info
    out, _ = to_rgb(reloaded)
    np.testing.assert_array_equal(out[0], [[10, 20, 30], [200, 100, 50]])


def test_alpha_is_dropped_not_composited():
    rgba = np.array([[[200, 100, 50, 0], [1, 2, 3, 255]]], np.uint8)
    out, mode = to_rgb(Image.fromarray(rgba, "RGBA"))
    assert mode == "RGBA"
    np.testing.assert_array_equal(out, rgba[:, :, :3])
    la = Image.fromarray(np.array([[[90, 0], [30, 255]]], np.uint8), "LA")
    out, mode = to_rgb(la)
    assert mode == "LA"
    np.testing.assert_array_equal(out[0], [[90, 90, 90], [30, 30, 30]])


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_is_scaled_by_bit_depth(mode: str):
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    dtype = ">u2" if mode == "I;16B" else "<u2"
    image = Image.frombytes(mode, (4, 1), values.astype(dtype).tobytes())
    out, got_mode = to_rgb(image)
    assert got_mode == mode
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()


def test_16_bit_png_round_trip():
    values = np.array([[0, 4112, 65535]], np.uint16)
    out, mode = to_rgb(decode_image(_encode(Image.fromarray(values), "PNG"), "deep.png"))
    assert mode.startswith("I;16")
    np.testing.assert_array_equal(out[0, :, 1], [0, 16, 255])


def test_int32_container_uses_smallest_bit_depth():
    out, mode = to_rgb(Image.fromarray(np.array([[0, 100, 255]], np.int32)))
    assert mode == "I"
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255])
    out, _ = to_rgb(Image.fromarray(np.array([[0, 257, 65535]], np.int32)))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 255])


def test_float_image():
    out, mode = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)))
    assert mode == "F"
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])
    out, _ = to_rgb(Image.fromarray(np.array([[-2.0, 0.0, 2.0]], np.float32)))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])


def test_cmyk():
    cmyk = Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8), "CMYK")
    out, mode = to_rgb(cmyk)
    assert mode == "CMYK"
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [0, 255, 255], [0, 0, 0]])


@pytest.mark.parametrize(
    ("array", "mode", "expected"),
    [
        (np.array([[7, 9]], np.uint8), "array:uint8:HxW", [[7, 7, 7], [9, 9, 9]]),
        (np.array([[[0], [65535]]], np.uint16), "array:uint16:HxWx1", [[0, 0, 0], [255, 255, 255]]),
        (np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8), "array:uint8:HxWx3", [[1, 2, 3], [4, 5, 6]]),
        (np.array([[[1, 2, 3, 0], [4, 5, 6, 9]]], np.uint8), "array:uint8:HxWx4", [[1, 2, 3], [4, 5, 6]]),
        (np.array([[0.0, 1.0]], np.float32), "array:float32:HxW", [[0, 0, 0], [255, 255, 255]]),
        (np.array([[True, False]]), "array:bool:HxW", [[255, 255, 255], [0, 0, 0]]),
    ],
)
def test_numpy_arrays(array: np.ndarray, mode: str, expected: list):
    out, got_mode = to_rgb(array)
    assert got_mode == mode
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
    np.testing.assert_array_equal(out[0], expected)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 2, 2), np.uint8), "shape"),
        (np.zeros((2, 2), np.int64), "dtype"),
        (np.full((2, 2), 1.5), r"\[0, 1\]"),
    ],
)
def test_numpy_arrays_rejected(array: np.ndarray, message: str):
    with pytest.raises(ValueError, match=message):
        to_rgb(array)


# --- the one colormap and PNG encoding ----------------------------------------------------------------


def test_colormap_is_monotonic_in_brightness_and_clipped():
    values = np.linspace(-1.0, 2.0, 301).reshape(1, -1)
    colours = colorize(values, vmax=1.0).astype(np.float64)[0]
    brightness = colours @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(brightness) >= -1e-9)
    np.testing.assert_array_equal(colours[0], colours[100])  # below 0 clips to the first colour
    np.testing.assert_array_equal(colours[200], colours[-1])  # above vmax clips to the last
    assert tuple(colours[0]) == (0, 0, 4) and tuple(colours[-1]) == (252, 255, 164)


def test_colormap_without_a_usable_vmax_scales_by_the_map():
    ramp = np.tile(np.linspace(0.0, 3.0, 7), (2, 1))
    for vmax in (0.0, -1.0, float("nan"), float("inf")):
        np.testing.assert_array_equal(colorize(ramp, vmax), colorize(ramp, 3.0))
    assert (colorize(np.zeros((2, 2)), 0.0) == (0, 0, 4)).all()
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        colorize(np.zeros((2, 2, 1)), 1.0)


def test_encode_png_round_trips_gray_and_rgb():
    gray = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    rgb = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for pixels, mode in ((gray, "L"), (rgb, "RGB")):
        image = Image.open(io.BytesIO(encode_png(pixels)))
        assert (image.format, image.mode) == ("PNG", mode)
        np.testing.assert_array_equal(np.asarray(image), pixels)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(gray.astype(np.float32))


def test_decode_errors_carry_no_object_reprs():
    # The same bad input gives the same message (an ingest report is identical between reruns).
    messages = set()
    for _ in range(2):
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(b"definitely not an image", "x.png")
        messages.add(str(caught.value))
    (message,) = messages
    assert " at 0x" not in message and message.startswith("x.png: not a PNG/JPEG/BMP/TIFF image")


def _jpeg(width: int, height: int) -> bytes:
    """A smooth (upsampled noise) JPEG: what a downscaled decode should keep."""
    small = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.BICUBIC).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_a_large_jpeg_decodes_at_the_smallest_dct_scale_that_keeps_min_size():
    data = _jpeg(4000, 3000)
    full = decode_image(data, "big.jpg")
    assert full.size == (4000, 3000)
    small = decode_image(data, "big.jpg", min_size=352)
    assert small.size == (500, 375)  # 1/8 each way: both sides >= 352, 1/64 of the decoded bytes
    assert len(small.tobytes()) * 64 == len(full.tobytes())
    assert decode_image(data, "big.jpg", min_size=1000).size == (2000, 1500)  # 1/4 would leave 750 < 1000
    assert decode_image(data, "big.jpg", min_size=4000).size == (4000, 3000)  # never below min_size


def test_any_other_large_image_is_reduced_on_load_to_rgb():
    rgb = np.asarray(Image.open(io.BytesIO(_jpeg(4000, 3000))).convert("RGB"))
    png = _encode(Image.fromarray(rgb), "PNG")
    reduced = decode_image(png, "big.png", min_size=352)
    assert reduced.size == (500, 375) and reduced.mode == "RGB"  # 3000 // 352 = 8-fold: short side in [352, 704)
    np.testing.assert_array_equal(np.asarray(reduced), np.asarray(Image.fromarray(rgb).reduce(8)))
    assert decode_image(png, "big.png", min_size=1600).size == (4000, 3000)  # a factor below 2: left whole
    gray16 = (np.linspace(0, 65535, 800 * 600).reshape(600, 800)).astype(np.uint16)
    reduced16 = decode_image(_encode(Image.fromarray(gray16), "PNG"), "gray16.png", min_size=100)
    expected = Image.fromarray(to_rgb(gray16)[0]).reduce(6)  # 16-bit: scaled to 8 bits first, as to_rgb does
    assert reduced16.mode == "RGB" and np.array_equal(np.asarray(reduced16), np.asarray(expected))
