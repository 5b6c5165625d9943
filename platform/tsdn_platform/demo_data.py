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

Defects (sizes scale with ``image_size``; colour alone does not give them away): ``scratch`` (thin anti-aliased
bright or dark polyline), ``stain`` (smooth darkened blob), ``hole`` (dark ellipse with a soft rim), ``crack``
(random-walk thin dark line), ``color_spot`` (small, slightly tinted patch), drawn in the ``clear`` style by
default (:data:`tsdn.defects.DEFECT_STYLES`: lines 2 px wide at 128 px, marks more opaque, stains and holes larger:
defects a person can find on grass and gravel too) or in the ``subtle`` style of the leak-free validation,
whose cracks and stains on grass and gravel have the contrast of the texture's own gaps (``BENCHMARKS.md``, "Demo
defects a person can see"). Everything is a pure function of ``seed``.
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from skimage import data as skdata
from skimage import transform

from tsdn.defects import DEFECT_STYLES, DEFECT_TYPES, draw_defect

__all__ = [
    "DEFAULT_DEFECT_STYLE",
    "DEFECT_TYPES",
    "PRODUCTS",
    "draw_defect",
    "main",
    "make_demo_dataset",
    "reused_data_note",
    "texture_patch",
]

DEFAULT_DEFECT_STYLE = "clear"

# product -> (skimage.data texture, RGB tint applied to the grey photograph)
PRODUCTS: dict[str, tuple[str, tuple[float, float, float]]] = {
    "brick": ("brick", (1.00, 0.72, 0.58)),
    "grass": ("grass", (0.72, 1.00, 0.55)),
    "gravel": ("gravel", (1.00, 0.95, 0.86)),
}
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
    n_test_good: int = 30,
    n_defects_per_type: int = 4,
    products: Sequence[str] | None = None,
    defect_style: str = DEFAULT_DEFECT_STYLE,
) -> dict[str, Any]:
    """Write the demo dataset under ``out`` (a local folder) and return its summary.

    ``products`` defaults to every entry of :data:`PRODUCTS`. The same arguments always write the same bytes.
    30 good test images per line (10 until session 17): on the same training images and model, 10 good test
    images put gravel's image AUROC at 0.855 and 30 at 0.623, and three draws of 30 spread by up to 0.13
    (``BENCHMARKS.md``, "How far the demo's figures can be trusted"). The training images do not depend on the
    test split's size: they are drawn first.
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
    if defect_style not in DEFECT_STYLES:
        msg = f"unknown defect style {defect_style!r}; available: {', '.join(DEFECT_STYLES)}"
        raise ValueError(msg)
    for name, count, least in (("n_train", n_train, 1), ("n_test_good", n_test_good, 0)):
        if count < least:
            msg = f"{name}={count}: expected at least {least}"
            raise ValueError(msg)
    if n_defects_per_type < 0:
        msg = f"n_defects_per_type={n_defects_per_type}: expected at least 0"
        raise ValueError(msg)
    style = DEFECT_STYLES[defect_style]
    root = Path(out)
    for product in products:
        # A second draw written over a first would leave the first's extra images beside it (fewer or smaller).
        if (root / product).is_dir() and any(p.is_file() for p in (root / product).rglob("*")):
            msg = (
                f"{root / product}: already holds files; the demo dataset is written into an empty folder, so that "
                "no earlier draw is mixed in (delete it first, or run tsdn demo --fresh)"
            )
            raise ValueError(msg)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"{root}: cannot create the folder ({exc.strerror or exc})"
        raise ValueError(msg) from exc
    textures = ", ".join(PRODUCTS[p][0] for p in products)
    summary: dict[str, Any] = {
        "root": str(root),
        "seed": seed,
        "image_size": image_size,
        "source": f"scikit-image texture photographs (skimage.data: {textures})",
        "defect_types": list(DEFECT_TYPES),
        "defect_style": defect_style,
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
                image, mask = draw_defect(texture_patch(texture, image_size, rng), defect, rng, style)
                _save_png(_to_uint8(image), base / "test" / defect / f"{i:03d}.png")
                _save_png(mask.astype(np.uint8) * 255, base / "ground_truth" / defect / f"{i:03d}_mask.png")
        test_counts = {"good": n_test_good, **dict.fromkeys(DEFECT_TYPES, n_defects_per_type)}
        summary["products"][product] = {"train": n_train, "test": test_counts}
    root.mkdir(parents=True, exist_ok=True)
    (root / "demo_dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def reused_data_note(root: str | Path) -> str | None:
    """A line for ``tsdn demo`` when the dataset it reuses under ``root`` was drawn in another defect style than
    the default (a dataset written before the styles existed has the ``subtle`` defects); None otherwise."""
    summary = json.loads((Path(root) / "demo_dataset.json").read_text())
    style = summary.get("defect_style", "subtle")
    if style == DEFAULT_DEFECT_STYLE:
        return None
    return (
        f"reusing the demo dataset in {root}: its test defects are drawn in the {style!r} style, not the default "
        f"{DEFAULT_DEFECT_STYLE!r}, so its figures are not the README's (tsdn demo --fresh rebuilds it)"
    )


def main(args: argparse.Namespace) -> int:
    """``tsdn demo-data OUT [--seed N] [--image-size N] ...``"""
    summary = make_demo_dataset(
        args.out,
        seed=args.seed,
        image_size=args.image_size,
        n_train=args.n_train,
        n_test_good=args.n_test_good,
        n_defects_per_type=args.n_defects_per_type,
        products=[p.strip() for p in args.products.split(",") if p.strip()] if args.products else None,
        defect_style=args.defect_style,
    )
    for product, counts in summary["products"].items():
        n_test = sum(counts["test"].values())
        print(f"{product}: {counts['train']} train, {n_test} test images -> {Path(args.out) / product}")
    return 0
