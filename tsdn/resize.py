"""The project's resizes, in numpy and Pillow: images to the network input, anomaly maps back to the image,
ground-truth masks to a map's grid.

Every path that feeds a model or reads a map resizes here (ingest's training shards, :class:`tsdn.predict.Predictor`
under every runtime, the score job's stored maps), so a model sees in production the pixels it was trained on
and no process needs torch to prepare an input.

They equal torch's ``F.interpolate(..., mode="bilinear", align_corners=False)`` (with ``antialias=True`` for
:func:`resize_antialiased`): Pillow's float ("F") bilinear resample is the same triangle filter whose support
widens with the downscale factor (torch's antialiased kernel was ported from it), and :func:`resize_bilinear`
is the two-tap interpolation with half-pixel centres. ``tests/unit/test_resize.py`` measures both against
torch: network inputs at most 5e-7 apart in [0, 1] (a few float32 ulps; 2.4e-7 measured), maps 2e-6 (bilinear)
and 5e-6 (antialiased) for maps in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "input_shape",
    "matching_input_shape",
    "parse_image_size",
    "resize_antialiased",
    "resize_bilinear",
    "resize_map",
    "resize_mask",
    "to_network_input",
]


def resize_antialiased(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float -> (h, w) float32, bilinear with antialiasing (torch's ``antialias=True``)."""
    if plane.ndim != 2:
        msg = f"resize_antialiased: expected an (H, W) array, got shape {plane.shape}"
        raise ValueError(msg)
    height, width = size
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32)


def input_shape(size: int | Sequence[int]) -> tuple[int, int]:
    """A model's ``image_size`` -> the network input's (height, width): S -> (S, S); [H, W] -> (H, W)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return int(size), int(size)
    if isinstance(size, Sequence) and len(size) == 2 and all(isinstance(v, (int, np.integer)) for v in size):
        return int(size[0]), int(size[1])
    msg = f"image_size {size!r}: expected S (a square input) or [H, W]"
    raise ValueError(msg)


def parse_image_size(size: object) -> tuple[object, tuple[int, int] | None]:
    """A config's ``image_size`` as given -> ``(S, or [H, W] as a tuple, its (H, W))``; (H, W) is None when the
    value is neither spelling (the config names the field in its own error)."""
    if isinstance(size, list):  # a YAML or JSON list given to the constructor directly
        size = tuple(size)
    try:
        return size, input_shape(size)
    except ValueError:
        return size, None


def matching_input_shape(image_shape: Sequence[int], size: int | Sequence[int], multiple: int = 32) -> tuple[int, int]:
    """The network input (H, W) with about the pixels of ``size`` at the aspect of images ``image_shape`` (H, W).

    Each side is a multiple of ``multiple`` (the encoder's largest stride), at least one ``multiple``. Kolektor's
    parts, about 630 x 250 px, at the pixels of 192 x 192 give (320, 128).
    """
    height, width = (float(v) for v in image_shape[:2])
    if height <= 0 or width <= 0:
        msg = f"image shape {tuple(image_shape)}: both sides must be positive"
        raise ValueError(msg)
    area = float(np.prod(input_shape(size)))
    aspect = height / width
    sides = (np.sqrt(area * aspect), np.sqrt(area / aspect))
    return tuple(max(multiple, round(side / multiple) * multiple) for side in sides)


def to_network_input(rgb: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, h, w) float32 in [0, 1]: bilinear with antialiasing, per channel.

    ``size``: S for a square S x S input, or [h, w] (a product line shot at another aspect keeps it).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        msg = f"to_network_input: expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}"
        raise ValueError(msg)
    pixels = rgb.astype(np.float32) / np.float32(255.0)
    shape = input_shape(size)
    planes = [resize_antialiased(pixels[:, :, c], shape) for c in range(3)]
    return np.clip(np.stack(planes), 0.0, 1.0)


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (low, high) and the high tap's weight of each output position, torch's convention."""
    # float32 arithmetic, as torch computes the scale and the source positions of float maps
    scale = np.float32(n_in) / np.float32(n_out)
    source = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    low = np.minimum(source.astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, (source - low).astype(np.float32)


def resize_bilinear(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float -> (h, w) float32, two-tap bilinear with half-pixel centres (no antialiasing).

    The map of a detection is brought back to its image's resolution this way (torch's ``bilinear``).
    """
    if plane.ndim != 2:
        msg = f"resize_bilinear: expected an (H, W) array, got shape {plane.shape}"
        raise ValueError(msg)
    values = np.asarray(plane, dtype=np.float32)
    if values.shape == tuple(size):
        return values.copy()
    y0, y1, wy = _taps(values.shape[0], size[0])
    x0, x1, wx = _taps(values.shape[1], size[1])
    rows = values[y0] * (1.0 - wy)[:, None] + values[y1] * wy[:, None]
    return rows[:, x0] * (1.0 - wx)[None, :] + rows[:, x1] * wx[None, :]


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(S, S) -> (h, w) float32: bilinear, antialiased when shrinking; the same values when the size matches."""
    if tuple(anomaly_map.shape) == tuple(size):
        return np.asarray(anomaly_map, dtype=np.float32)
    if size[0] < anomaly_map.shape[0] or size[1] < anomaly_map.shape[1]:
        return resize_antialiased(anomaly_map, size)
    return resize_bilinear(anomaly_map, size)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) ground-truth mask (any dtype; nonzero = defect) -> (h, w) uint8 in {0, 1}, nearest neighbour.

    The project's one mask resampling: the training job's test metrics (masks of the ingested shards) and the
    score job's metrics both go through it. Source pixel of output pixel ``i`` is ``floor(i * H / h)``, the
    rule of ``torch.nn.functional.interpolate(mode="nearest")``, computed here in numpy so an edge box needs
    no torch.
    """
    if mask.ndim != 2 or mask.size == 0:
        msg = f"resize_mask: expected a non-empty (H, W) mask, got shape {mask.shape}"
        raise ValueError(msg)
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    height, width = shape
    if (height, width) == binary.shape:
        return binary
    rows = np.minimum(np.floor(np.arange(height) * np.float32(binary.shape[0] / height)), binary.shape[0] - 1)
    cols = np.minimum(np.floor(np.arange(width) * np.float32(binary.shape[1] / width)), binary.shape[1] - 1)
    return binary[rows.astype(np.int64)[:, None], cols.astype(np.int64)[None, :]]
