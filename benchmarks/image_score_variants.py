"""The image score and the blur of the shipped map, post hoc: the same weights, no retraining.

Loads a model saved by ``benchmarks/recipe.py --save-model`` and, through the shipped code path only (a model
with the changed settings, the saved weights loaded, ``fit_normal_stats`` on the training images, ``predict``),
scores the test split and the validation set for:

- ``score_sigma`` 4 (the presets) and 8, at ``feature_strides`` 8 + 16 (the presets) and 8 + 16 + 32;
- per map, the image score as the map's maximum (``score_topk: 0``, the TSDN presets) and as the mean of its top
  0.1 %, 1 % and 5 % (``score_topk`` 0.001, 0.01, 0.05; the PatchCore presets use 0.05 on the real lines).

For every variant: test image AUROC (pixel AUROC depends on the map only, so it is given per map), the image
AUROC per defect type, the validation image AUROC, and the held-out 99 % threshold applied to the test split
(the share of good images flagged and of defective ones caught). Rows (JSON lines) are appended to the output
file.

    python benchmarks/image_score_variants.py .tsdn/models/transistor-demo10-s0.pt ../shared/data/mvtec \\
        transistor benchmarks/results/recipe/image_score_variants.jsonl
    python benchmarks/image_score_variants.py --summary benchmarks/results/recipe/image_score_variants.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import _to_tensor, load_saved_run, refit
from stage_variants import per_type_auroc, predicted, report_variants, run_cli

from tsdn.metrics import image_auroc, pixel_auroc
from tsdn.scoring import image_score

MAPS = {  # name -> the settings changed on the saved model
    "st8_16": {"feature_strides": (8, 16)},
    "st8_16_sigma8": {"feature_strides": (8, 16), "score_sigma": 8.0},
    "st8_16_32": {"feature_strides": (8, 16, 32)},
    "st8_16_32_sigma8": {"feature_strides": (8, 16, 32), "score_sigma": 8.0},
}
TOPK = {"max": 0.0, "top0.1": 0.001, "top1": 0.01, "top5": 0.05}


def main(model_path: str, root: str, product: str, out_path: str) -> None:
    torch.set_num_threads(2)
    model, data, held, seed, val = load_saved_run(model_path, root, product)
    train, test, val_images = (_to_tensor(x) for x in (data["train"][~held], data["test"], val.images))
    labels, masks, defects = data["test_labels"], data["test_masks"], data["test_defects"]
    results: dict[str, dict] = {}
    for map_name, settings in MAPS.items():
        other = refit(model, train, **settings)
        test_map, val_map = predicted(other, test), predicted(other, val_images)
        pixel = round(float(pixel_auroc(masks, test_map[:, 0].numpy())), 4)
        for score_name, topk in TOPK.items():
            scores, val_scores = image_score(test_map, topk).numpy(), image_score(val_map, topk).numpy()
            threshold = float(np.quantile(val_scores[val.labels == 0], 0.99))  # the platform's calibration rule
            results[f"{map_name}/{score_name}"] = {
                "image_auroc": round(float(image_auroc(labels, scores)), 4),
                "pixel_auroc": pixel,
                "per_type": per_type_auroc(labels, scores, defects),
                "val_image_auroc": round(float(image_auroc(val.labels, val_scores)), 4),
                "test_fpr_at_threshold": round(float((scores[labels == 0] >= threshold).mean()), 4),
                "test_tpr_at_threshold": round(float((scores[labels == 1] >= threshold).mean()), 4),
            }
    report_variants(out_path, model_path, product, seed, results)


if __name__ == "__main__":
    run_cli(main)
