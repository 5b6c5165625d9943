"""Safe image decoding and conversion of every common pixel layout to 8-bit RGB.

Inspection archives hold 8- and 16-bit grayscale, palette, RGBA and CMYK files in PNG, JPEG, BMP and TIFF.
Ingest, batch scoring and serving all turn bytes into pixels here, so a file is accepted or refused the
same way everywhere, and a refusal names the file.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

__all__ = ["FORMATS", "ImageDecodeError", "colorize", "decode_image", "encode_png", "to_rgb"]

FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
# Pillow reports multi-picture JPEGs (phone and camera files) as MPO; they decode as their first JPEG frame.
_ACCEPTED = frozenset((*FORMATS, "MPO"))
_BIT_DEPTH_16 = 65535
# Anchor colours of matplotlib's "inferno" (black -> purple -> orange -> pale yellow), interpolated linearly.
# The project's one colormap: the detect API's heatmap, the standalone inferencer and the HTML report.
_INFERNO = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    np.float64,
)


class ImageDecodeError(ValueError):
    """An input could not be decoded as an image; ``name`` identifies it, ``reason`` says why.

    Picklable (it crosses process boundaries in Ray workers): ``__reduce__`` rebuilds it from both fields.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[str, str]]:
        return (type(self), (self.name, self.reason))


def decode_image(data: bytes, name: str, max_pixels: int = 64_000_000, min_size: int | None = None) -> Image.Image:
    """Decode encoded bytes into a fully loaded PIL image, refusing oversized images before decoding.

    The header is parsed first (``Image.open`` reads only the header); an image with more than
    ``max_pixels`` pixels is refused before its pixel data is decompressed, so a small file claiming a
    huge size cannot exhaust memory. Only the pixels of the first frame are loaded.

    With ``min_size`` (what a model that resizes its input to ``min_size`` needs), a large image is made small
    as early as its format allows, keeping both sides at least ``min_size``: a JPEG is decoded at the smallest
    of its DCT scales (1/1, 1/2, 1/4, 1/8) that does (Pillow's ``Image.draft``), without decoding the rest;
    then any image still at least twice ``min_size`` on both sides is reduced on load by the largest integer
    factor that does (``Image.reduce``, a box filter), so what leaves this function has a short side below
    ``2 x min_size``. For a 352-pixel model, a 6000x4000 JPEG decodes as 750x500 (1/8) and a 6300x6300 PNG,
    decoded whole, is reduced 17-fold to 371x371. A reduced image comes back in 8-bit RGB (L and RGB reduce as
    they are; other modes go through :func:`to_rgb` first, the conversion the predictor applies anyway).

    Args:
        data: the file's bytes (PNG, JPEG, BMP or TIFF).
        name: what the bytes are (a path or URI); every error message starts with it.
        max_pixels: largest accepted ``width * height`` (of the file, before any draft scaling).
        min_size: smallest side the image may be scaled down to; None returns it at full size.

    Returns:
        A loaded ``PIL.Image.Image`` in its original mode (convert with :func:`to_rgb`).

    Raises:
        ImageDecodeError: not an image, unsupported format, too large, empty, corrupt or truncated.
    """
    if not data:
        raise ImageDecodeError(name, "empty input (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(name, f"refused before decoding: {exc}") from exc
    except Image.UnidentifiedImageError as exc:  # its text is "cannot identify image file <_io.BytesIO at 0x...>"
        raise ImageDecodeError(name, f"not a {'/'.join(FORMATS)} image (unrecognised header)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(name, f"not a {'/'.join(FORMATS)} image ({_without_reprs(exc)})") from exc
    if image.format not in _ACCEPTED:
        raise ImageDecodeError(name, f"unsupported format {image.format}; expected one of {', '.join(FORMATS)}")
    width, height = image.size
    if width * height > max_pixels:
        msg = f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}; refused before decoding"
        raise ImageDecodeError(name, msg)
    if width * height == 0:
        raise ImageDecodeError(name, f"empty image ({width}x{height})")
    try:
        if min_size is not None and image.format in ("JPEG", "MPO"):
            image.draft(None, (min_size, min_size))  # keeps both sides >= min_size
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(name, f"corrupt or truncated {image.format} ({_without_reprs(exc)})") from exc
    factor = min(image.size) // min_size if min_size else 1
    if factor < 2:
        return image
    if image.mode not in ("L", "RGB"):
        image = Image.fromarray(to_rgb(image)[0])
    return image.reduce(factor)


def _without_reprs(exc: BaseException) -> str:
    """An exception's text without object reprs (``<... at 0x7f...>``): the same input gives the same message."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<input>", str(exc))


def to_rgb(image: Image.Image | np.ndarray) -> tuple[np.ndarray, str]:
    """Convert any supported image to (H, W, 3) uint8 RGB.

    Conversions:
        - gray (``1``, ``L``): replicated to three channels; ``1`` maps to 0/255.
        - palette (``P``, ``PA``, with or without transparency), ``CMYK``, ``YCbCr``, ``HSV``, ``RGBX``:
          Pillow's conversion to RGB.
        - alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, palette transparency): the alpha channel is
          dropped and the stored colour kept (no compositing: a defect under a transparent pixel stays
          visible, and most inspection files with alpha are fully opaque anyway).
        - 16-bit (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, numpy ``uint16``): scaled by the 16-bit range,
          ``round(v * 255 / 65535)``, never clipped.
        - ``I`` (32-bit signed container): scaled by the smallest bit depth of 8, 16 or 32 that holds its
          maximum value (Pillow puts 8- and 16-bit data in this container too); negative values -> min-max.
        - ``F`` (float): values within [0, 1] are scaled by 255; any other range is min-max scaled to
          [0, 255] (a float image carries no bit depth).
        - numpy arrays (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha dropped) of ``uint8``, ``uint16``,
          ``bool`` or float in [0, 1].

    Returns:
        ``(rgb, mode)``: rgb (H, W, 3) uint8; mode is the PIL mode of the input, or for numpy arrays
        ``"array:<dtype>:<layout>"`` with layout one of ``HxW``, ``HxWx1``, ``HxWx3``, ``HxWx4``.
    """
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if not isinstance(image, Image.Image):
        msg = f"to_rgb: expected a PIL image or a numpy array, got {type(image).__name__}"
        raise TypeError(msg)
    mode = image.mode
    if mode.startswith("I;16"):
        gray = _scale(np.asarray(image).astype(np.float64), _BIT_DEPTH_16)
    elif mode == "I":
        gray = _int32_to_uint8(np.asarray(image))
    elif mode == "F":
        gray = _float_to_uint8(np.asarray(image, dtype=np.float64))
    elif "A" in image.getbands() or "a" in image.getbands() or (mode == "P" and "transparency" in image.info):
        return np.asarray(image.convert("RGBA"))[:, :, :3].copy(), mode
    else:
        try:
            return np.asarray(image.convert("RGB")).copy(), mode
        except ValueError as exc:
            msg = f"to_rgb: cannot convert mode {mode!r} to RGB ({exc})"
            raise ValueError(msg) from exc
    return np.repeat(gray[:, :, None], 3, axis=2), mode


def _array_to_rgb(array: np.ndarray) -> tuple[np.ndarray, str]:
    layout = "HxW" if array.ndim == 2 else f"HxWx{array.shape[2]}" if array.ndim == 3 else None
    mode = f"array:{array.dtype}:{layout}"
    if layout not in {"HxW", "HxWx1", "HxWx3", "HxWx4"}:
        msg = f"to_rgb: expected an array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}"
        raise ValueError(msg)
    if array.dtype == np.uint8:
        values = array
    elif array.dtype == np.uint16:
        values = _scale(array.astype(np.float64), _BIT_DEPTH_16)
    elif array.dtype == np.bool_:
        values = array.astype(np.uint8) * np.uint8(255)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min(initial=0.0) < 0 or array.max(initial=0.0) > 1:
            msg = f"to_rgb: float arrays must hold finite values in [0, 1], got [{array.min()}, {array.max()}]"
            raise ValueError(msg)
        values = _scale(array.astype(np.float64), 1.0)
    else:
        msg = f"to_rgb: unsupported array dtype {array.dtype}; expected uint8, uint16, bool or float in [0, 1]"
        raise ValueError(msg)
    if values.ndim == 2:
        values = values[:, :, None]
    channels = values.shape[2]
    rgb = np.repeat(values, 3, axis=2) if channels == 1 else values[:, :, :3]
    return np.ascontiguousarray(rgb), mode


def _scale(values: np.ndarray, max_value: float) -> np.ndarray:
    """Linear map of ``[0, max_value]`` onto ``[0, 255]``, rounded to uint8."""
    return np.rint(values * (255.0 / max_value)).astype(np.uint8)


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.zeros(values.shape, np.uint8)
    return _scale(values - low, high - low)


def _int32_to_uint8(values: np.ndarray) -> np.ndarray:
    if values.size == 0 or values.min() < 0:
        return _min_max(values.astype(np.float64))
    peak = int(values.max())
    bits = next(b for b in (8, 16, 32) if peak < 2**b)
    return _scale(values.astype(np.float64), 2**bits - 1)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all():
        msg = "to_rgb: float image holds NaN or infinite values"
        raise ValueError(msg)
    if values.size and values.min() >= 0 and values.max() <= 1:
        return _scale(values, 1.0)
    return _min_max(values)


def colorize(values: np.ndarray, vmax: float) -> np.ndarray:
    """(H, W) float scores -> (H, W, 3) uint8 inferno colours, ``[0, vmax]`` spanning the colormap.

    Values above ``vmax`` saturate, NaN draws as 0. A ``vmax`` that is not a finite number > 0 falls back to
    the map's own maximum (or 1 for an all-zero map).
    """
    if values.ndim != 2:
        msg = f"colorize: expected an (H, W) map, got shape {values.shape}"
        raise ValueError(msg)
    values = np.nan_to_num(np.asarray(values, np.float64))
    if not (np.isfinite(vmax) and vmax > 0):
        vmax = float(values.max(initial=0.0)) or 1.0
    scaled = np.clip(values / vmax, 0.0, 1.0)
    positions = np.linspace(0.0, 1.0, len(_INFERNO))
    channels = [np.interp(scaled, positions, _INFERNO[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W) uint8 (gray) or (H, W, 3) uint8 (RGB) -> PNG bytes."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        msg = f"encode_png: expected (H, W) or (H, W, 3) uint8, got {pixels.dtype} {pixels.shape}"
        raise ValueError(msg)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB").save(buffer, format="PNG")
    return buffer.getvalue()
