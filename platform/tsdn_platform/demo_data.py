"""A small MVTec-style dataset made from real texture photographs shipped with scikit-image.

Each product line is one ``skimage.data`` texture (brick, grass, gravel), tinted to a product colour.
Images are patches cut at random offsets (random scale jitter and flips) and resized to ``image_size``;
test defects are drawn onto fresh patches with soft blending, and their masks are exact: a mask pixel
is 255 exactly where the defect changed the image, 0 everywhere else.

Layout (what ``tsdn ingest`` reads)::

    <out>/<product>/train/good/000.png
    <out>/<product>/test/good/000.png
    <out>/<product>/test/<defect>/000.png
    <out>/<product>/ground_truth/<defect>/000_mask.png
    <out>/demo_dataset.json                  the summary returned by make_demo_dataset

Defects (sizes scale with ``image_size``; contrasts are low on purpose so that colour alone does not give
them away): ``scratch`` (thin anti-aliased bright or dark polyline), ``stain`` (smooth low-contrast blob),
``hole`` (dark ellipse with a soft rim), ``crack`` (random-walk thin dark line), ``color_spot`` (small,
slightly tinted patch). Everything is a pure function of ``seed``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage import draw, transform

__all__ = ["DEFECT_TYPES", "PRODUCTS", "draw_defect", "main", "make_demo_dataset", "texture_patch"]

# product -> (skimage.data texture, RGB tint applied to the grey photograph)
PRODUCTS: dict[str, tuple[str, tuple[float, float, float]]] = {
    "brick": ("brick", (1.00, 0.72, 0.58)),
    "grass": ("grass", (0.72, 1.00, 0.55)),
    "gravel": ("gravel", (1.00, 0.95, 0.86)),
}
DEFECT_TYPES = ("scratch", "stain", "hole", "crack", "color_spot")
_CROP_FRACTION = 0.45  # of the 512 px texture, before a +-10 % jitter


def _texture(product: str) -> np.ndarray:
    """(512, 512, 3) float32 in [0, 1]: the grey texture photograph tinted to the product colour."""
    name, tint = PRODUCTS[product]
    grey = getattr(skdata, name)().astype(np.float32) / 255.0
    return np.clip(grey[..., None] * np.asarray(tint, dtype=np.float32)[None, None, :], 0.0, 1.0)


def texture_patch(texture: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``texture`` (H, W, 3) float, flipped at random, resized to (S, S, 3) float32 in [0, 1]."""
    height, width = texture.shape[:2]
    side = round(min(height, width) * _CROP_FRACTION * rng.uniform(0.9, 1.1))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    patch = texture[top : top + side, left : left + side]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1, :]
    patch = transform.resize(patch, (image_size, image_size), anti_aliasing=True, preserve_range=True)
    gain = rng.uniform(0.97, 1.03)  # lighting varies a little between shots
    return np.clip(patch * gain, 0.0, 1.0).astype(np.float32)


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


def _scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
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
    coverage = _polyline(size, points, width=max(1, size // 96))
    alpha = np.where(coverage >= 0.3, coverage, 0.0) * rng.uniform(0.55, 0.75)
    target = np.full(3, 0.95 if rng.random() < 0.5 else 0.08, dtype=np.float32)
    return alpha, np.broadcast_to(target, image.shape)


def _stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    radius = size * rng.uniform(0.07, 0.13)
    center = tuple(rng.uniform(size * 0.25, size * 0.75, size=2))
    footprint = _blob(size, center, (radius, radius * rng.uniform(0.6, 1.0)), rng.uniform(0, np.pi), rng)
    alpha = _soft_alpha(footprint, softness=radius * 0.4) * rng.uniform(0.55, 0.7)
    tint = np.asarray([0.55, 0.45, 0.30], dtype=np.float32) * rng.uniform(0.8, 1.2)
    return alpha, image * 0.45 + tint[None, None, :] * 0.2


def _hole(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    radius = size * rng.uniform(0.035, 0.07)
    center = rng.uniform(size * 0.2, size * 0.8, size=2)
    radii = (radius, radius * rng.uniform(0.7, 1.0))
    rr, cc = draw.ellipse(center[0], center[1], *radii, shape=(size, size), rotation=rng.uniform(0, np.pi))
    footprint = np.zeros((size, size), dtype=bool)
    footprint[rr, cc] = True
    alpha = _soft_alpha(footprint, softness=max(radius * 0.4, 1.0)) * 0.85
    shade = np.linspace(0.02, 0.12, size, dtype=np.float32)[:, None, None]  # light falls into the hole from one side
    return alpha, np.broadcast_to(shade, image.shape) + 0.1 * image


def _crack(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    steps = int(size * rng.uniform(0.25, 0.4) / 2)
    point = rng.uniform(size * 0.25, size * 0.75, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    points = [tuple(point)]
    for _ in range(steps):
        angle += rng.normal(0, 0.45)
        point = point + 2.0 * np.array([np.sin(angle), np.cos(angle)])
        points.append(tuple(point))
    coverage = _polyline(size, points, width=1)
    alpha = np.where(coverage >= 0.3, coverage, 0.0) * rng.uniform(0.5, 0.7)
    return alpha, image * 0.15


def _color_spot(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    radius = size * rng.uniform(0.03, 0.055)
    center = tuple(rng.uniform(size * 0.2, size * 0.8, size=2))
    footprint = _blob(size, center, (radius, radius), 0.0, rng)
    alpha = _soft_alpha(footprint, softness=radius * 0.3)
    gains = np.ones(3, dtype=np.float32)
    gains[int(rng.integers(0, 3))] += rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.55)
    return alpha, np.clip(image * gains[None, None, :], 0.0, 1.0)


_DRAWERS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "stain": _stain,
    "hole": _hole,
    "crack": _crack,
    "color_spot": _color_spot,
}


def draw_defect(image: np.ndarray, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blend one ``defect`` into ``image`` (S, S, 3) float32 in [0, 1].

    Returns ``(defective (S, S, 3) float32 in [0, 1], mask (S, S) bool)``; the mask is True exactly where the
    defect changed the image. Redraws (up to 20 times) when a defect would cover fewer than 4 pixels.
    """
    if defect not in _DRAWERS:
        msg = f"unknown defect type {defect!r}; expected one of {', '.join(DEFECT_TYPES)}"
        raise ValueError(msg)
    for _ in range(20):
        alpha, target = _DRAWERS[defect](image, rng)
        mask = alpha > 0
        if mask.sum() >= 4:
            out = image * (1.0 - alpha[..., None]) + target * alpha[..., None]
            return np.clip(out, 0.0, 1.0).astype(np.float32), mask
    msg = f"could not draw a visible {defect!r} on a {image.shape[0]} px image"
    raise ValueError(msg)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def make_demo_dataset(
    out: str | Path,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 40,
    n_test_good: int = 10,
    n_defects_per_type: int = 4,
    products: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write the demo dataset under ``out`` (a local folder) and return its summary.

    ``products`` defaults to every entry of :data:`PRODUCTS`. The same arguments always write the same bytes.
    Summary: ``{"root", "seed", "image_size", "source", "defect_types", "products": {p: {"train": n,
    "test": {"good": n, <defect>: n, ...}}}}``; it is also written to ``<out>/demo_dataset.json``.
    """
    products = list(products) if products is not None else list(PRODUCTS)
    unknown = sorted(set(products) - set(PRODUCTS))
    if unknown:
        msg = f"unknown demo product(s) {', '.join(unknown)}; available: {', '.join(PRODUCTS)}"
        raise ValueError(msg)
    if image_size < 32:
        msg = f"image_size={image_size}: must be at least 32 px for defects to be drawable"
        raise ValueError(msg)
    root = Path(out)
    textures = ", ".join(PRODUCTS[p][0] for p in products)
    summary: dict[str, Any] = {
        "root": str(root),
        "seed": seed,
        "image_size": image_size,
        "source": f"scikit-image texture photographs (skimage.data: {textures})",
        "defect_types": list(DEFECT_TYPES),
        "products": {},
    }
    for product in products:
        rng = np.random.default_rng([seed, zlib.crc32(product.encode())])
        texture = _texture(product)
        base = root / product
        for i in range(n_train):
            _save_png(_to_uint8(texture_patch(texture, image_size, rng)), base / "train" / "good" / f"{i:03d}.png")
        for i in range(n_test_good):
            _save_png(_to_uint8(texture_patch(texture, image_size, rng)), base / "test" / "good" / f"{i:03d}.png")
        for defect in DEFECT_TYPES:
            for i in range(n_defects_per_type):
                image, mask = draw_defect(texture_patch(texture, image_size, rng), defect, rng)
                _save_png(_to_uint8(image), base / "test" / defect / f"{i:03d}.png")
                _save_png(mask.astype(np.uint8) * 255, base / "ground_truth" / defect / f"{i:03d}_mask.png")
        test_counts = {"good": n_test_good, **dict.fromkeys(DEFECT_TYPES, n_defects_per_type)}
        summary["products"][product] = {"train": n_train, "test": test_counts}
    root.mkdir(parents=True, exist_ok=True)
    (root / "demo_dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(args: argparse.Namespace) -> int:
    """``tsdn demo-data OUT [--seed N] [--image-size N] ...``"""
    summary = make_demo_dataset(
        args.out,
        seed=args.seed,
        image_size=args.image_size,
        n_train=args.n_train,
        n_test_good=args.n_test_good,
        n_defects_per_type=args.n_defects_per_type,
        products=args.products.split(",") if args.products else None,
    )
    for product, counts in summary["products"].items():
        n_test = sum(counts["test"].values())
        print(f"{product}: {counts['train']} train, {n_test} test images -> {Path(args.out) / product}")
    return 0
