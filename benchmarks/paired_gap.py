"""TSDN against the PatchCore preset on the same test images: the gap, and how much of it the test set can resolve.

The issue's stretch goal ("at least as good as the PatchCore-style baseline") is judged on figures 0.002 apart.
This script puts an interval on such a gap. Saved TSDN weights (``recipe.py --save-model``, one per training seed)
are scored with their shipped statistics refitted (:func:`recipe.refit`, no changes); the ``patchcore`` preset's
PatchCore is fitted on the same training split (``recipe.py``'s: every 8th training image held out) with as many fit
seeds, each at its own input size. Then, on B bootstrap resamples of the test images (drawn with replacement
within the good and within the defective images, the same draw for every model), the image AUROC and the pixel
AUROC (every pixel of the drawn images, each at its model's own resolution) of the seed-mean TSDN minus the
seed-mean PatchCore. The pixel AUROC of a resample is computed exactly from one global sort per model, with each
pixel weighted by how often its image was drawn.

One JSON row (the point gaps, each model's figures, the 2.5 / 50 / 97.5 % bootstrap percentiles of the gaps and
the share of resamples where TSDN is behind) is appended to OUT.

    python benchmarks/paired_gap.py OUT ROOT PRODUCT TSDN.pt[,TSDN.pt...] PATCHCORE_SIZE [B]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_probe import write_row
from map_settings import maps_and_scores
from recipe import HOLDOUT_EVERY, _to_tensor, load_product, load_saved_run, refit

from tsdn.metrics import image_auroc, pixel_auroc
from tsdn.patchcore import PatchCore
from tsdn.scoring import image_score
from tsdn_platform.cli import image_size_arg
from tsdn_platform.config import load_config
from tsdn_platform.train import TrainConfig


class WeightedAuroc:
    """The AUROC of (labels, values) grouped by image, for any per-image weights, from one sort (ties broken by
    order: the maps are continuous)."""

    def __init__(self, labels: np.ndarray, values: np.ndarray, image_of: np.ndarray) -> None:
        order = np.argsort(values.ravel(), kind="stable")
        self.positive = labels.ravel()[order].astype(bool)
        self.image = image_of.ravel()[order]

    def __call__(self, weights: np.ndarray) -> float:
        w = weights[self.image].astype(np.float64)
        negative_below = np.cumsum(np.where(self.positive, 0.0, w))  # negatives at or below each position
        positive_w = np.where(self.positive, w, 0.0)
        total_pos, total_neg = positive_w.sum(), negative_below[-1]
        return float((positive_w * negative_below).sum() / (total_pos * total_neg))


def _pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> WeightedAuroc:
    image_of = np.broadcast_to(np.arange(len(masks))[:, None, None], masks.shape)
    return WeightedAuroc(masks, maps, image_of)


def _tsdn(path: str, root: str, product: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    model, data, held, _seed, _val = load_saved_run(path, root, product)
    fitted = refit(model, _to_tensor(data["train"][~held]), _to_tensor(data["train"][held]))
    maps, scores = maps_and_scores(fitted, _to_tensor(data["test"]))
    return scores, maps[:, 0].numpy(), data["test_masks"], data


def _patchcore(root: str, product: str, size, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cfg = load_config(TrainConfig, "patchcore", ["store=unused", "dataset=unused"]).patchcore
    cfg = dataclasses.replace(cfg, image_size=size, seed=seed)
    data = load_product(Path(root), product, size, 400, 10.0, Path(".tsdn/cache"))
    held = np.arange(len(data["train"])) % HOLDOUT_EVERY == 0
    torch.manual_seed(seed)
    model = PatchCore(cfg)
    model.fit(_to_tensor(data["train"][~held]).split(16))
    maps = torch.cat([model.predict(batch).anomaly_map for batch in _to_tensor(data["test"]).split(16)])
    return image_score(maps, cfg.score_topk).numpy(), maps[:, 0].numpy(), data["test_masks"]


def main(out_path: str, root: str, product: str, tsdn_paths: str, patchcore_size: str, resamples: str = "400") -> None:
    torch.set_num_threads(2)
    runs = {"tsdn": [], "patchcore": []}
    labels = None
    for i, path in enumerate(tsdn_paths.split(",")):
        scores, maps, masks, data = _tsdn(path, root, product)
        labels = data["test_labels"] if labels is None else labels
        if not np.array_equal(labels, data["test_labels"]):
            raise SystemExit("paired_gap: the saved models were not scored on the same test images")
        runs["tsdn"].append((scores, maps, masks))
        pc = _patchcore(root, product, image_size_arg(patchcore_size), seed=i)
        runs["patchcore"].append(pc)
    labels = np.asarray(labels)
    figures = {
        family: [(round(image_auroc(labels, s), 4), round(pixel_auroc(k, m), 4)) for s, m, k in models]
        for family, models in runs.items()
    }  # fmt: skip
    image_of = np.arange(len(labels))
    image_fns = {f: [WeightedAuroc(labels, s, image_of) for s, _, _ in ms] for f, ms in runs.items()}
    pixel_fns = {f: [_pixel_auroc(k, m) for _, m, k in ms] for f, ms in runs.items()}

    def gaps(weights: np.ndarray) -> tuple[float, float]:
        image = {f: np.mean([fn(weights) for fn in fns]) for f, fns in image_fns.items()}
        pixel = {f: np.mean([fn(weights) for fn in fns]) for f, fns in pixel_fns.items()}
        return image["tsdn"] - image["patchcore"], pixel["tsdn"] - pixel["patchcore"]

    point = gaps(np.ones(len(labels)))
    rng = np.random.default_rng(0)
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    drawn = []
    for _ in range(int(resamples)):
        weights = np.bincount(np.concatenate([rng.choice(good, len(good)), rng.choice(bad, len(bad))]),
                              minlength=len(labels))  # fmt: skip
        drawn.append(gaps(weights))
    drawn = np.asarray(drawn)
    row = {
        "product": product,
        "tsdn": tsdn_paths.split(","),
        "patchcore_size": patchcore_size,
        "test_good": len(good),
        "test_defective": len(bad),
        "resamples": int(resamples),
        "figures": figures,
    }
    for j, name in enumerate(("image", "pixel")):
        row[f"{name}_gap"] = round(float(point[j]), 4)
        row[f"{name}_gap_percentiles"] = [round(float(x), 4) for x in np.percentile(drawn[:, j], [2.5, 50, 97.5])]
        row[f"{name}_tsdn_behind_share"] = round(float((drawn[:, j] < 0).mean()), 3)
    write_row(out_path, row)


if __name__ == "__main__":
    if len(sys.argv) not in (6, 7):
        raise SystemExit("usage: paired_gap.py OUT ROOT PRODUCT TSDN.pt[,TSDN.pt...] PATCHCORE_SIZE [B]")
    main(*sys.argv[1:])
