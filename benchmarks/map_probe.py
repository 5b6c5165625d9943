"""What shapes the region-level quality (AUPRO) of the `cpu` preset's map, post hoc on saved weights.

On transistor the `cpu` preset's TSDN ranks images and pixels as well as the PatchCore baseline or better, but
its AUPRO (the mean overlap per defect region at a low false-positive rate) is lower: 0.839 against 0.901 for
the full-bank baseline. The map averages three stages (strides 8, 16 and 32: on a 192 px input the last is a 6 x 6
grid), blurs with ``score_sigma`` 4 and standardises each position by the training maps. Each of those is varied
here on the same residuals, whitened per position with the blend ``feature_position_shrinkage: auto`` chooses
(``whitening_selection.py``'s functions):

- ``stages``: which stages the map averages (the image score is the map's maximum, as shipped);
- ``sigma``: the blur (px at the input size), before the standardisation, as shipped;
- ``standardised``: with or without the per-position standardisation (``score_normalization``).

Test image / pixel AUROC and AUPRO, and the held-out validation's image / pixel AUROC (``recipe.py``'s drawn
defects on the held-out normals); one JSON row per (model, variant).

    python benchmarks/map_probe.py OUT MODEL.pt ROOT PRODUCT
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_probe import write_row
from position_whitening import map_metrics
from recipe import _to_tensor, load_saved_run
from whitening_selection import distances, gaussian
from whitening_variants import residuals, standardise

from tsdn.config import POSITION_BLENDS
from tsdn.metrics import aupro, pixel_auroc
from tsdn.resize import input_shape
from tsdn.scoring import blur_map, image_score


def stage_maps(model_path: str, root: str, product: str) -> tuple:
    """Per compared stage, the whitened distance maps (upsampled to the input, not blurred) of the fit, test and
    drawn-validation images: ``(data, val, seed, strides, stages, maps)`` with ``maps[stage][split]``."""
    model, data, held, seed, val = load_saved_run(model_path, root, product)
    cfg = model.cfg
    shape = input_shape(cfg.image_size)
    strides = model.encoder.feature_info.reduction()
    stages = model.feature_stages
    fit = residuals(model, _to_tensor(data["train"][~held]))[0]
    held_out = residuals(model, _to_tensor(data["train"][held]))[0]
    test = residuals(model, _to_tensor(data["test"]))[0]
    drawn = residuals(model, _to_tensor(val.images))[0]
    maps: dict[int, dict[str, torch.Tensor]] = {}
    for s in stages:

        def nll(blend: float, s: int = s) -> float:
            squared, logdet = distances(held_out[s], *gaussian(fit[s], blend, cfg.feature_shrinkage))
            return float(squared.mean() + logdet.mean())

        mean, cov = gaussian(fit[s], min(POSITION_BLENDS, key=nll), cfg.feature_shrinkage)
        c = fit[s].shape[1]
        for split, res in (("fit", fit[s]), ("test", test[s]), ("val", drawn[s])):
            squared, _ = distances(res, mean, cov)
            up = F.interpolate((squared / c).sqrt()[:, None].float(), size=shape, mode="bilinear")
            maps.setdefault(s, {})[split] = up
    return data, val, seed, strides, stages, maps


def _averaged(maps: dict, subset: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fit, test and validation maps averaged over the stages of ``subset``."""
    fit_map, test_map, val_map = (sum(maps[s][split] for s in subset) / len(subset) for split in ("fit", "test", "val"))
    return fit_map, test_map, val_map


def _standardised(maps: dict, subset: tuple[int, ...], sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The test and validation maps averaged over ``subset`` and standardised by the fit maps' statistics."""
    fit_map, test_map, val_map = _averaged(maps, subset)
    return standardise(test_map, fit_map, sigma), standardise(val_map, fit_map, sigma)


def main(out_path: str, model_path: str, root: str, product: str) -> None:
    torch.set_num_threads(2)
    data, val, seed, strides, stages, maps = stage_maps(model_path, root, product)
    subsets = [c for k in range(1, len(stages) + 1) for c in itertools.combinations(stages, k)]
    for subset, sigma, standardised in itertools.product(subsets, (2.0, 4.0, 8.0), (True, False)):
        fit_map, test_map, val_map = _averaged(maps, subset)
        scored, held_scored = (
            standardise(m, fit_map, sigma) if standardised else blur_map(m, sigma) for m in (test_map, val_map)
        )
        row = {
            "model": model_path, "product": product, "seed": seed,
            "stages": [strides[s] for s in subset], "sigma": sigma, "standardised": standardised,
            **map_metrics(data, val, scored, held_scored),
            "aupro": round(float(aupro(data["test_masks"], scored[:, 0].numpy())), 4),
            "val_pixel_auroc": round(float(pixel_auroc(val.masks, held_scored[:, 0].numpy())), 4),
        }  # fmt: skip
        write_row(out_path, row)


def split(out_path: str, model_path: str, root: str, product: str) -> None:
    """The image score from every stage's map, the map from a subset of the finer stages (sigma 4, standardised).

    ``map``: ``raw`` = the subset's map as it is; ``shifted`` = the subset's map shifted per image so that its
    maximum is the every-stage map's maximum, which keeps ``map >= threshold`` marking pixels exactly when the
    image score (the maximum) is at or above the threshold.
    """
    torch.set_num_threads(2)
    data, val, seed, strides, stages, maps = stage_maps(model_path, root, product)
    every, every_val = _standardised(maps, tuple(stages), 4.0)
    for k in range(1, len(stages)):
        for subset in itertools.combinations(stages[:-1], k):
            fine, fine_val = _standardised(maps, subset, 4.0)
            for how in ("raw", "shifted"):
                test_map, val_map = fine, fine_val
                if how == "shifted":
                    test_map, val_map = (_peak_to(m, e) for m, e in ((fine, every), (fine_val, every_val)))
                row = {
                    "model": model_path, "product": product, "seed": seed,
                    "score_stages": [strides[s] for s in stages], "map_stages": [strides[s] for s in subset],
                    "map": how, **map_metrics(data, val, every, every_val),
                    "pixel_auroc": round(float(pixel_auroc(data["test_masks"], test_map[:, 0].numpy())), 4),
                    "aupro": round(float(aupro(data["test_masks"], test_map[:, 0].numpy())), 4),
                    "val_pixel_auroc": round(float(pixel_auroc(val.masks, val_map[:, 0].numpy())), 4),
                }  # fmt: skip
                write_row(out_path, row)


def _peak_to(anomaly_map: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``anomaly_map`` shifted per image so that its maximum equals ``reference``'s maximum."""
    return anomaly_map + (image_score(reference) - image_score(anomaly_map)).view(-1, 1, 1, 1)


if __name__ == "__main__":
    if sys.argv[1] == "split":
        split(*sys.argv[2:6])
    else:
        main(*sys.argv[1:5])
