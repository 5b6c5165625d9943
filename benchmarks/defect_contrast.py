"""How far the demo's drawn defects stand out from their texture: a measure of the data, no model.

For each demo product line and defect type, draws defects exactly as ``tsdn demo-data`` does (``texture_patch``
then ``tsdn.defects.draw_defect`` in ``--style``, at 128 px) and compares the change the defect makes with the
variation the texture has anyway:

- ``change``: the mean absolute change of the defect's pixels (``|defective - clean|`` inside the mask, averaged
  over RGB, in grey levels 0-255);
- ``texture``: the mean absolute difference between the clean patch and itself shifted by ``--shift`` pixels
  (1 = neighbouring pixels) over the whole patch: how much the texture varies over such a distance on its own;
- ``pixels``: the mean number of pixels the defect changed (its mask's area);
- ``ratio`` = change / texture. A defect whose ratio is near or below 1 changes its pixels by no more than the
  texture changes from one pixel to the next: it has the contrast of the texture's own edges, and a detector has
  to tell it by its shape alone.

    python benchmarks/defect_contrast.py --draws 200 --style subtle --out benchmarks/results/defect_contrast.json
    python benchmarks/defect_contrast.py --draws 200 --style clear --out benchmarks/results/defect_contrast_clear.json
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib

import numpy as np

from tsdn.defects import DEFECT_STYLES, DEFECT_TYPES, DefectStyle, draw_defect
from tsdn_platform.demo_data import PRODUCTS, _texture, texture_patch


def texture_variation(patch: np.ndarray, shift: int) -> float:
    """Mean absolute difference (grey levels) between ``patch`` (S, S, 3) in [0, 1] and itself shifted by
    ``shift`` pixels, down and right averaged."""
    down = np.abs(patch[shift:] - patch[:-shift]).mean()
    right = np.abs(patch[:, shift:] - patch[:, :-shift]).mean()
    return float((down + right) / 2 * 255.0)


def measure(product: str, defect: str, draws: int, size: int, shift: int, seed: int, style: DefectStyle) -> dict:
    rng = np.random.default_rng([seed, zlib.crc32(f"{product}/{defect}".encode())])
    texture = _texture(product)
    change, variation, pixels = [], [], []
    for _ in range(draws):
        clean = texture_patch(texture, size, rng)
        image, mask = draw_defect(clean.copy(), defect, rng, style)
        change.append(float(np.abs(image - clean)[mask.astype(bool)].mean() * 255.0))
        variation.append(texture_variation(clean, shift))
        pixels.append(int(mask.sum()))
    change_mean, texture_mean = float(np.mean(change)), float(np.mean(variation))
    return {
        "product": product,
        "defect": defect,
        "draws": draws,
        "size": size,
        "shift": shift,
        "change": round(change_mean, 2),
        "texture": round(texture_mean, 2),
        "ratio": round(change_mean / texture_mean, 2),
        "pixels": round(float(np.mean(pixels)), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=200, help="defects drawn per product and type")
    parser.add_argument("--size", type=int, default=128, help="the demo's image size")
    parser.add_argument("--shift", type=int, default=1, help="pixels between the compared texture pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", choices=sorted(DEFECT_STYLES), default="subtle", help="the drawers' style")
    parser.add_argument("--out", default=None, help="JSON file the rows are written to")
    args = parser.parse_args()
    rows = [
        measure(product, defect, args.draws, args.size, args.shift, args.seed, DEFECT_STYLES[args.style])
        for product in PRODUCTS
        for defect in DEFECT_TYPES
    ]
    print(f"{'product':8} " + " ".join(f"{d:>24}" for d in DEFECT_TYPES) + "   (change / texture = ratio, pixels)")
    for product in PRODUCTS:
        cells = [r for r in rows if r["product"] == product]
        print(
            f"{product:8} "
            + " ".join(f"{r['change']:5.1f}/{r['texture']:4.1f}={r['ratio']:4.2f},{r['pixels']:5.0f}" for r in cells)
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "style": args.style, "rows": rows}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
