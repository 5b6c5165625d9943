"""A copy of a real product line whose parts are not shot in one pose: each image turned and moved at random.

The `cpu` preset compares every position of a part with the same position of the normal training images (the
per-position whitening and standardisation), which assumes a fixture that puts every part in one pose. This writes
a copy of an MVTec-layout line (``ROOT/PRODUCT``) to ``OUT/PRODUCT`` in which every image (training and test) is
rotated by an angle drawn uniformly from ``[-DEG, DEG]`` about its centre and moved by up to ``SHIFT`` of its side
in x and y (uniform), the border repeated outward; each defect mask gets the same transform (nearest neighbour).
The draw is seeded by the file's path inside the line, so the copy is the same bytes on every run. The copy stays
outside the repository (the images' licence); train on it with ``benchmarks/families.py --data OUT:PRODUCT``.

    python benchmarks/misaligned.py ROOT PRODUCT OUT DEG SHIFT
    python benchmarks/misaligned.py ../shared/data/mvtec transistor /tmp/misaligned-8 8 0.06
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage


def pose(relative: str, degrees: float, shift: float) -> tuple[float, float, float]:
    """The (angle in degrees, dx, dy as fractions of the side) drawn for the image at ``relative``."""
    rng = np.random.default_rng(zlib.crc32(relative.encode()))
    angle, dx, dy = rng.uniform(-1.0, 1.0, size=3)
    return float(angle * degrees), float(dx * shift), float(dy * shift)


def transform(array: np.ndarray, angle: float, dx: float, dy: float, *, order: int, mode: str) -> np.ndarray:
    """``array`` (H, W) or (H, W, C) rotated by ``angle`` degrees about its centre, then moved by (dx, dy) of its
    height and width (output pixel p reads input pixel R^-1 (p - c - t) + c)."""
    h, w = array.shape[:2]
    theta = np.deg2rad(angle)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])  # (row, col) axes
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    move = np.array([dy * h, dx * w])
    inverse = rotation.T
    offset = centre - inverse @ (centre + move)
    channels = [array] if array.ndim == 2 else [array[..., c] for c in range(array.shape[2])]
    out = [ndimage.affine_transform(c, inverse, offset=offset, order=order, mode=mode) for c in channels]
    return out[0] if array.ndim == 2 else np.stack(out, axis=-1)


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    root, product, out, degrees, shift = Path(argv[0]), argv[1], Path(argv[2]), float(argv[3]), float(argv[4])
    line = root / product
    if not (line / "train" / "good").is_dir():
        print(f"{line}: no train/good folder (an MVTec-layout product line)", file=sys.stderr)
        return 2
    written = 0
    for path in sorted(line.rglob("*.png")):
        relative = path.relative_to(line).as_posix()
        is_mask = relative.startswith("ground_truth/")
        # a mask takes the pose of its image: ground_truth/<defect>/<name>_mask.png <- test/<defect>/<name>.png
        key = "test/" + relative.removeprefix("ground_truth/").replace("_mask.png", ".png") if is_mask else relative
        angle, dx, dy = pose(key, degrees, shift)
        with Image.open(path) as image:
            mode = image.mode
            array = np.asarray(image)
        if is_mask:
            moved = transform(array, angle, dx, dy, order=0, mode="constant")
        else:
            moved = np.clip(transform(array.astype(np.float32), angle, dx, dy, order=1, mode="nearest"), 0, 255)
            moved = np.rint(moved).astype(np.uint8)
        target = out / product / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(moved.astype(array.dtype), mode=mode).save(target)
        written += 1
    print(f"{written} images of {line} -> {out / product} (rotation up to {degrees:g} degrees, shift up to {shift:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
