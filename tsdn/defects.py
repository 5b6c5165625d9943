"""Synthetic defects drawn onto normal images: the demo dataset's test defects and leak-free validation.

Two families, neither of them SURF's training distortion (flat or textured superpixels):

- drawn defects (:func:`draw_defect`): ``scratch`` (thin anti-aliased bright or dark polyline), ``stain``
  (smooth low-contrast blob), ``hole`` (dark ellipse with a soft rim), ``crack`` (random-walk thin dark line),
  ``color_spot`` (small, slightly tinted patch); soft-blended, masks exact (True where the image changed); in a
  :class:`DefectStyle`: ``subtle`` (the default, and the validation's) or ``clear`` (the demo dataset's test
  defects);
- ``cut_paste`` (:func:`cut_paste`): a patch of another normal image, rotated, pasted at a different place
  (Li et al.'s CutPaste), the kind of structural anomaly drawn strokes do not cover.

:func:`validation_set` turns held-out normal images into a labelled validation set of clean and defective
copies (every family in turn), the signal that checkpoint selection, calibration and promotion read instead
of the test split.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from skimage import draw

__all__ = [
    "DEFECT_STYLES",
    "DEFECT_TYPES",
    "VALIDATION_DEFECTS",
    "DefectStyle",
    "ValidationSet",
    "cut_paste",
    "draw_defect",
    "validation_set",
]

DEFECT_TYPES = ("scratch", "stain", "hole", "crack", "color_spot")
VALIDATION_DEFECTS = (*DEFECT_TYPES, "cut_paste")


class DefectStyle(NamedTuple):
    """How strongly the drawers mark a defect.

    Attributes:
        line_width: the width of a scratch or a crack as a fraction of the image side (at least 1 px); None = the
            ``subtle`` widths (a scratch ``size // 96`` px, a crack 1 px).
        opacity: multiplies every drawer's blend weight (capped at 1): how far a defect pixel moves toward the
            defect's colour.
        size: multiplies the radius of a stain and of a hole.
    """

    line_width: float | None = None
    opacity: float = 1.0
    size: float = 1.0


# ``subtle``: the drawers as they were designed, faint on purpose (the leak-free validation always uses it, so
# checkpoint selection and calibration never depend on the demo's choice). ``clear``: lines 2 px wide at 128 px,
# marks 30 % more opaque, stains and holes 30 % larger: defects that a person can find on a busy texture, most at
# a glance (some cracks on gravel still read as a gap between stones; BENCHMARKS.md, "Demo defects a person can see").
DEFECT_STYLES: dict[str, DefectStyle] = {
    "subtle": DefectStyle(),
    "clear": DefectStyle(line_width=1 / 64, opacity=1.3, size=1.3),
}


def _soft_alpha(footprint: np.ndarray, softness: float) -> np.ndarray:
    """Alpha (H, W) in [0, 1] that is > 0 exactly on ``footprint`` and ramps up from its rim over ``softness`` px."""
    inside = ndimage.distance_transform_edt(footprint)
    return np.clip(inside / max(softness, 1.0), 0.0, 1.0).astype(np.float32) * footprint


def _blob(size: int, center: tuple[float, float], radii: tuple[float, float], angle: float, rng) -> np.ndarray:
    """An irregular filled ellipse (H, W) bool: the ellipse boundary is perturbed by smooth noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - center[0], xx - center[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = (dx * cos + dy * sin) / radii[1], (-dx * sin + dy * cos) / radii[0]
    noise = ndimage.gaussian_filter(rng.normal(size=(size, size)).astype(np.float32), sigma=max(size / 24, 1.0))
    noise /= np.abs(noise).max() + 1e-6
    return (u * u + v * v) < (1.0 + 0.35 * noise)


def _polyline(size: int, points: Sequence[tuple[float, float]], width: int) -> np.ndarray:
    """Anti-aliased coverage (H, W) float32 in [0, 1] of a polyline ``width`` px wide."""
    coverage = np.zeros((size, size), dtype=np.float32)
    offsets = [(dy, dx) for dy in range(width) for dx in range(width)]
    for (r0, c0), (r1, c1) in itertools.pairwise(points):
        for dy, dx in offsets:
            rr, cc, val = draw.line_aa(int(r0) + dy, int(c0) + dx, int(r1) + dy, int(c1) + dx)
            keep = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
            np.maximum.at(coverage, (rr[keep], cc[keep]), val[keep].astype(np.float32))
    return coverage


def _line_width(size: int, style: DefectStyle, subtle: int) -> int:
    return subtle if style.line_width is None else max(1, round(size * style.line_width))


def _opaque(alpha: np.ndarray, style: DefectStyle) -> np.ndarray:
    return np.minimum(alpha * style.opacity, 1.0)


def _scratch(image: np.ndarray, rng: np.random.Generator, style: DefectStyle) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    length = size * rng.uniform(0.25, 0.45)
    start = rng.uniform(size * 0.2, size * 0.8, size=2)
    angle = rng.uniform(0, np.pi)
    points = [tuple(start)]
    for _ in range(int(rng.integers(2, 4))):
        angle += rng.normal(0, 0.25)
        step = length / 3
        last = points[-1]
        points.append((last[0] + step * np.sin(angle), last[1] + step * np.cos(angle)))
    coverage = _polyline(size, points, width=_line_width(size, style, max(1, size // 96)))
    alpha = _opaque(np.where(coverage >= 0.3, coverage, 0.0) * rng.uniform(0.55, 0.75), style)
    target = np.full(3, 0.95 if rng.random() < 0.5 else 0.08, dtype=np.float32)
    return alpha, np.broadcast_to(target, image.shape)


def _stain(image: np.ndarray, rng: np.random.Generator, style: DefectStyle) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    radius = size * rng.uniform(0.07, 0.13) * style.size
    center = tuple(rng.uniform(size * 0.25, size * 0.75, size=2))
    footprint = _blob(size, center, (radius, radius * rng.uniform(0.6, 1.0)), rng.uniform(0, np.pi), rng)
    alpha = _opaque(_soft_alpha(footprint, softness=radius * 0.4) * rng.uniform(0.55, 0.7), style)
    tint = np.asarray([0.55, 0.45, 0.30], dtype=np.float32) * rng.uniform(0.8, 1.2)
    return alpha, image * 0.45 + tint[None, None, :] * 0.2


def _hole(image: np.ndarray, rng: np.random.Generator, style: DefectStyle) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    radius = size * rng.uniform(0.035, 0.07) * style.size
    center = rng.uniform(size * 0.2, size * 0.8, size=2)
    radii = (radius, radius * rng.uniform(0.7, 1.0))
    rr, cc = draw.ellipse(center[0], center[1], *radii, shape=(size, size), rotation=rng.uniform(0, np.pi))
    footprint = np.zeros((size, size), dtype=bool)
    footprint[rr, cc] = True
    alpha = _opaque(_soft_alpha(footprint, softness=max(radius * 0.4, 1.0)) * 0.85, style)
    shade = np.linspace(0.02, 0.12, size, dtype=np.float32)[:, None, None]  # light falls into the hole from one side
    return alpha, np.broadcast_to(shade, image.shape) + 0.1 * image


def _crack(image: np.ndarray, rng: np.random.Generator, style: DefectStyle) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    steps = int(size * rng.uniform(0.25, 0.4) / 2)
    point = rng.uniform(size * 0.25, size * 0.75, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    points = [tuple(point)]
    for _ in range(steps):
        angle += rng.normal(0, 0.45)
        point = point + 2.0 * np.array([np.sin(angle), np.cos(angle)])
        points.append(tuple(point))
    coverage = _polyline(size, points, width=_line_width(size, style, 1))
    alpha = _opaque(np.where(coverage >= 0.3, coverage, 0.0) * rng.uniform(0.5, 0.7), style)
    return alpha, image * 0.15


def _color_spot(image: np.ndarray, rng: np.random.Generator, style: DefectStyle) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    radius = size * rng.uniform(0.03, 0.055)
    center = tuple(rng.uniform(size * 0.2, size * 0.8, size=2))
    footprint = _blob(size, center, (radius, radius), 0.0, rng)
    alpha = _opaque(_soft_alpha(footprint, softness=radius * 0.3), style)
    gains = np.ones(3, dtype=np.float32)
    gains[int(rng.integers(0, 3))] += rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.55)
    return alpha, np.clip(image * gains[None, None, :], 0.0, 1.0)


_DRAWERS: dict[str, Callable[[np.ndarray, np.random.Generator, DefectStyle], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "stain": _stain,
    "hole": _hole,
    "crack": _crack,
    "color_spot": _color_spot,
}


def draw_defect(
    image: np.ndarray, defect: str, rng: np.random.Generator, style: DefectStyle = DEFECT_STYLES["subtle"]
) -> tuple[np.ndarray, np.ndarray]:
    """Blend one ``defect`` into ``image`` (S, S, 3) float32 in [0, 1], drawn in ``style``.

    Returns ``(defective (S, S, 3) float32 in [0, 1], mask (S, S) bool)``; the mask is True exactly where the
    defect changed the image. Redraws (up to 20 times) when a defect would cover fewer than 4 pixels.
    """
    if defect not in _DRAWERS:
        msg = f"unknown defect type {defect!r}; expected one of {', '.join(DEFECT_TYPES)}"
        raise ValueError(msg)
    for _ in range(20):
        alpha, target = _DRAWERS[defect](image, rng, style)
        mask = alpha > 0
        if mask.sum() >= 4:
            out = image * (1.0 - alpha[..., None]) + target * alpha[..., None]
            return np.clip(out, 0.0, 1.0).astype(np.float32), mask
    msg = f"could not draw a visible {defect!r} on a {image.shape[0]} px image"
    raise ValueError(msg)


def cut_paste(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste a rotated rectangular patch of ``donor`` into ``image`` at another place (both (S, S, 3) float [0, 1]).

    The patch covers 1-4 % of the image (aspect 0.4-2.5), is taken at one random place of the donor, rotated
    by a multiple of 90 degrees and pasted at a random place at least a patch-size away, with a one-pixel
    feathered edge. Returns ``(image with the patch (S, S, 3) float32, mask (S, S) bool)``.
    """
    size = image.shape[0]
    area = size * size * rng.uniform(0.01, 0.04)
    aspect = float(np.exp(rng.uniform(np.log(0.4), np.log(2.5))))
    height = int(np.clip(round(np.sqrt(area * aspect)), 3, size // 2))
    width = int(np.clip(round(np.sqrt(area / aspect)), 3, size // 2))
    top, left = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
    patch = np.rot90(donor[top : top + height, left : left + width], k=int(rng.integers(1, 4)))
    ph, pw = patch.shape[:2]
    for _ in range(20):
        y, x = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
        if abs(y - top) + abs(x - left) >= max(ph, pw):
            break
    out = image.astype(np.float32, copy=True)
    alpha = np.zeros((size, size), dtype=np.float32)
    alpha[y : y + ph, x : x + pw] = 1.0
    alpha = np.minimum(alpha, ndimage.uniform_filter(alpha, 3)) if min(ph, pw) > 3 else alpha
    canvas = np.zeros_like(out)
    canvas[y : y + ph, x : x + pw] = patch
    out = out * (1.0 - alpha[..., None]) + canvas * alpha[..., None]
    return np.clip(out, 0.0, 1.0).astype(np.float32), alpha > 0


class ValidationSet(NamedTuple):
    """Held-out normal images and defective copies of them.

    Attributes:
        images: (2N, H, W, 3) uint8: the N clean images, then their N defective copies.
        masks: (2N, H, W) uint8 in {0, 1}.
        labels: (2N,) int64, 0 for the clean half, 1 for the defective half.
        defects: (2N,) the defect family of each image ("good" for the clean half).
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    defects: np.ndarray


def validation_set(
    normal: np.ndarray, donors: np.ndarray | None = None, seed: int = 0, defects: Sequence[str] = VALIDATION_DEFECTS
) -> ValidationSet:
    """A leak-free validation set from held-out normal images: each clean and with one synthetic defect.

    Args:
        normal: (N, H, W, 3) uint8 held-out normal images, N >= 1. When H != W each defect is drawn in a square
            window of side min(H, W) at a random place (the drawers scale with the short side).
        donors: (M, H, W, 3) uint8 images that ``cut_paste`` takes its patches from (other normal images);
            None = the held-out images themselves (each takes from the next one).
        seed: the draws; the same arguments always give the same set.
        defects: families used in turn (image i gets ``defects[i % len(defects)]``).

    Returns:
        The :class:`ValidationSet`.
    """
    if normal.ndim != 4 or normal.shape[-1] != 3 or len(normal) == 0:
        msg = f"validation_set: expected (N >= 1, H, W, 3) images, got shape {normal.shape}"
        raise ValueError(msg)
    unknown = sorted(set(defects) - set(VALIDATION_DEFECTS))
    if unknown or not defects:
        msg = f"validation_set: unknown defect families {unknown}; expected some of {', '.join(VALIDATION_DEFECTS)}"
        raise ValueError(msg)
    donors = normal if donors is None or len(donors) == 0 else donors
    rng = np.random.default_rng([seed, 104_729])
    images, masks, kinds = [], [], []
    height, width = normal.shape[1:3]
    side = min(height, width)
    for i, clean in enumerate(normal):
        kind = defects[i % len(defects)]
        image = clean.astype(np.float32) / 255.0
        mask = np.zeros((height, width), dtype=bool)
        # The drawers work on a square; an image of another aspect gets its defect in a square window of its
        # short side at a random place along the long one (a square image: the whole image, no draw spent).
        top = int(rng.integers(0, height - side + 1)) if height > side else 0
        left = int(rng.integers(0, width - side + 1)) if width > side else 0
        window = (slice(top, top + side), slice(left, left + side))
        if kind == "cut_paste":
            donor = donors[(i + 1) % len(donors)].astype(np.float32) / 255.0
            image[window], mask[window] = cut_paste(image[window], donor[window], rng)
        else:
            image[window], mask[window] = draw_defect(image[window], kind, rng)
        images.append(np.round(image * 255.0).astype(np.uint8))
        masks.append(mask.astype(np.uint8))
        kinds.append(kind)
    n = len(normal)
    return ValidationSet(
        images=np.concatenate([normal.astype(np.uint8), np.stack(images)]),
        masks=np.concatenate([np.zeros((n, *normal.shape[1:3]), dtype=np.uint8), np.stack(masks)]),
        labels=np.r_[np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)],
        defects=np.asarray(["good"] * n + kinds),
    )
