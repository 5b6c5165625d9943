"""What the mask says under a top-k image score, with and without ``map_offset``.

The detect API's mask, ``anomalous_area_pct`` and heatmap compare the map with the calibrated image threshold. A
model whose image score is the mean of the top ``score_topk`` of its map (the PatchCore family in the `demo` and
`patchcore` presets) has every map maximum above its score, so ``map >= threshold`` can mark pixels of an image
whose score is below the threshold. ``Calibration.map_offset`` (fitted from the held-out normals' map maxima, as for
TSDN's ``map_strides``) would move the map so that a held-out normal image has a marked pixel about as often as
its score reaches the threshold. The third way, ``gated``, keeps the offset at 0 and marks pixels only on an image
whose score reaches the threshold: the mask then says where a flagged image is anomalous, and is empty on the
others.

For one line and a preset's ``patchcore`` section: PatchCore is fitted on ``recipe.py``'s training split (every 8th
image held out), the held-out normals give the threshold (their 0.99 quantile, the platform's rule) and the offset,
and the test split is read both ways:

- ``normal_flagged``: the share of good test images whose score reaches the threshold (the decision);
- ``normal_marked``: the share of good test images with at least one marked pixel (``map + offset >= threshold``);
- ``normal_area_pct``: the mean marked area of the good test images, in % of the image;
- ``defect_flagged`` / ``defect_marked``: the same for the defective test images;
- ``mask_iou`` / ``mask_f1``: the marked pixels against the ground truth, pooled over the defective images.

One JSON row per (line, offset) is appended to OUT.

    python benchmarks/mask_offset.py OUT ROOT:PRODUCT:SIZE:PRESET ...
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patchcore import predict_all
from recipe import HOLDOUT_EVERY, _to_tensor, load_product

from tsdn.calibration import fit_calibration
from tsdn.patchcore import PatchCore
from tsdn_platform.cli import image_size_arg
from tsdn_platform.config import load_config
from tsdn_platform.train import TrainConfig


def mask_rows(spec: str) -> list[dict]:
    root, product, size_text, preset = spec.split(":")
    size = image_size_arg(size_text)
    base = load_config(TrainConfig, preset, ["store=unused", "dataset=unused"])
    slic = (base.model.n_segments, base.model.slic_compactness)
    data = load_product(Path(root), product, size, *slic, Path(".tsdn/cache"))
    held = np.arange(len(data["train"])) % HOLDOUT_EVERY == 0
    torch.manual_seed(0)
    model = PatchCore(dataclasses.replace(base.patchcore, image_size=size))
    model.fit(_to_tensor(data["train"][~held]).split(16))
    normal_scores, normal_maps = predict_all(model, _to_tensor(data["train"][held]))
    scores, maps = predict_all(model, _to_tensor(data["test"]))
    labels, truth = np.asarray(data["test_labels"]), np.asarray(data["test_masks"]) > 0
    rows = []
    maxima = normal_maps.reshape(len(normal_maps), -1).max(1)
    for name, normal_maxima, gated in (
        ("offset 0", None, False),
        ("offset fitted", maxima, False),
        ("offset 0, gated", None, True),
    ):
        calibration = fit_calibration(normal_scores, normal_map_maxima=normal_maxima)
        flagged = scores >= calibration.threshold
        marked = calibration.shift_map(maps) >= calibration.threshold
        if gated:  # the mask only on an image whose score reaches the threshold
            marked &= flagged[:, None, None]
        good, bad = labels == 0, labels == 1
        hit = (marked[bad] & truth[bad]).sum()
        rows.append({
            "root": root, "product": product, "size": list(maps.shape[1:]), "preset": preset, "variant": name,
            "held_out_normals": int(held.sum()), "threshold": round(calibration.threshold, 4),
            "map_offset": round(calibration.map_offset, 4),
            "normal_flagged": round(float(flagged[good].mean()), 3),
            "normal_marked": round(float(marked[good].reshape(good.sum(), -1).any(1).mean()), 3),
            "normal_area_pct": round(float(marked[good].mean() * 100), 3),
            "defect_flagged": round(float(flagged[bad].mean()), 3),
            "defect_marked": round(float(marked[bad].reshape(bad.sum(), -1).any(1).mean()), 3),
            "mask_iou": round(float(hit / max((marked[bad] | truth[bad]).sum(), 1)), 3),
            "mask_f1": round(float(2 * hit / max(marked[bad].sum() + truth[bad].sum(), 1)), 3),
        })  # fmt: skip
    return rows


def main(out_path: str, specs: list[str]) -> None:
    torch.set_num_threads(2)
    for spec in specs:
        for row in mask_rows(spec):
            print(json.dumps(row))
            with open(out_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
