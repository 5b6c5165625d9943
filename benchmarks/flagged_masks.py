"""What the detect answer's mask says on the images a registered model flags, through the shipped path.

For each product line the registry's best version scores the line's test images (an MVTec-layout folder) with
:meth:`tsdn.predict.Predictor.predict` at each image's resolution, and :func:`tsdn.response.detect_answer` builds the
answer the HTTP route and the edge inferencer return. On the images the decision flags:

- ``flagged_defects`` / ``flagged_good``: how many defective and good test images are flagged;
- ``map_marks_nothing``: flagged images whose anomaly map reaches the threshold at no pixel (a model whose map is not
  the one it scores, TSDN's ``map_strides``, can flag an image that only a coarse stage sees). Before 2026-12-07
  their answer said ``anomalous_area_pct: 0``;
- ``empty_masks``: flagged images whose answer still has an empty mask (the map the score reduces is the fallback);
- ``fallback``: per image on the fallback, its score, the map's maximum, the marked area (%) and the mask's IoU with
  the ground truth;
- ``iou_map`` / ``iou_answer``: the masks of the flagged defective images pooled against the ground truth, the
  map's alone (the answer before) and the answer's.

One JSON row per line is appended to OUT.

    python benchmarks/flagged_masks.py OUT STORE DATA_ROOT PRODUCT [PRODUCT ...]
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_probe import write_row

from tsdn.response import detect_answer
from tsdn_platform.registry import Registry


def _truth(base: Path, defect: str, image_path: Path, shape: tuple[int, int]) -> np.ndarray:
    if defect == "good":
        return np.zeros(shape, dtype=bool)
    with Image.open(base / "ground_truth" / defect / f"{image_path.stem}_mask.png") as mask:
        return np.asarray(mask.convert("L")) > 0


def _iou(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    inter = sum(int((mask & truth).sum()) for mask, truth in pairs)
    union = sum(int((mask | truth).sum()) for mask, truth in pairs)
    return round(inter / union, 4) if union else float("nan")


def line_row(registry: Registry, root: Path, product: str) -> dict:
    predictor, ref = registry.load_predictor(product)
    base = root / product
    paths = sorted(base.glob("test/*/*.png"))
    if not paths:
        raise SystemExit(f"flagged_masks: no test images under {base}/test/<type>/*.png")
    row = {"product": product, "version": ref.version, "family": predictor.family, "images": len(paths)}
    counts = dict.fromkeys(("flagged_defects", "flagged_good", "map_marks_nothing", "empty_masks"), 0)
    fallback, before, after = [], [], []
    for path in paths:
        defect = path.parent.name
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        (detection,) = predictor.predict([rgb])
        if not detection.is_anomalous:
            continue
        answer = detect_answer(
            anomaly_score=detection.anomaly_score, normalized_score=detection.normalized_score,
            threshold=detection.threshold, anomaly_map=detection.anomaly_map, include=("mask",),
            scored_map=detection.scored_map,
        )  # fmt: skip
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]["data"])))) == 255
        by_map = detection.anomaly_map >= detection.threshold
        truth = _truth(base, defect, path, mask.shape)
        counts["flagged_good" if defect == "good" else "flagged_defects"] += 1
        counts["map_marks_nothing"] += int(not by_map.any())
        counts["empty_masks"] += int(not mask.any())
        if not by_map.any():
            fallback.append({
                "image": f"{defect}/{path.name}", "score": round(detection.anomaly_score, 3),
                "map_max": round(float(detection.anomaly_map.max()), 3), "area_pct": answer["anomalous_area_pct"],
                "iou": _iou([(mask, truth)]) if defect != "good" else None,
            })  # fmt: skip
        if defect != "good":
            before.append((by_map, truth))
            after.append((mask, truth))
    return {
        **row, **counts, "threshold": round(float(predictor.calibration.threshold), 4), "fallback": fallback,
        "iou_map": _iou(before), "iou_answer": _iou(after),
    }  # fmt: skip


def main(out_path: str, store: str, root: str, *products: str) -> None:
    if not products:
        raise SystemExit("usage: flagged_masks.py OUT STORE DATA_ROOT PRODUCT [PRODUCT ...]")
    registry = Registry(store)
    for product in products:
        write_row(out_path, line_row(registry, Path(root), product))


if __name__ == "__main__":
    main(*sys.argv[1:])
