"""TSDN's feature residual whitened per position instead of pooled over positions, post hoc on saved weights.

The shipped ``feature_distance: mahalanobis`` whitens ``f_I - f_R`` with one mean and covariance per encoder stage,
pooled over every position of the normal training images. On an aligned object the residual at one place (a
lead's tip) is not distributed like the residual at another (the case), and one Gaussian for all of them scores
an unusual residual at a place where the normal ones are small as no more surprising than anywhere else.
``texture_probe.py`` found the same Gaussian per position of the frozen encoder's own features taking transistor
from 0.958 / 0.942 to 0.998 / 0.985, and losing on the textures (35 training images give each position too few).

Variants, each standardised per position by the training maps afterwards (``score_normalization: pixel``), the
image score the maximum:

- ``pooled``: the shipped whitening (shrink 1 % towards the mean variance, as the preset);
- ``position a=λ``: per position a mean and covariance of the training residuals, the covariance shrunk by λ
  towards the pooled within-position covariance, plus 1 % of its mean variance;
- ``position a=λ, mean shrunk``: and each position's mean shrunk towards the pooled mean by the James-Stein-like
  factor ``min(1, (C / n) tr(Σ_within) / ||m_p - m||^2)`` averaged over positions (near 1 on a texture, whose
  positions differ by sampling noise only; near 0 on an aligned object), the covariance likewise;
- ``features a=0.1``: the encoder's own features, not the residual (``texture_probe.py``'s, for comparison);
- ``shipped position``: the shipped code (``feature_whitening: position`` with the preset's
  ``feature_position_shrinkage``): a model of that config takes the saved weights, fits its statistics with
  :meth:`tsdn.model.TSDN.fit_normal_stats` and scores with ``predict``, as the platform does after training.

Reports the test image / pixel AUROC and the held-out validation's image AUROC (``recipe.py``'s split and set),
and appends one JSON row per (model, variant) to OUT.

    python benchmarks/position_whitening.py OUT MODEL.pt ROOT PRODUCT
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_probe import write_row
from recipe import _to_tensor, load_saved_run
from whitening_variants import mahalanobis, moments, residuals, standardise

from tsdn.defects import ValidationSet
from tsdn.metrics import image_auroc, pixel_auroc
from tsdn.model import TSDN
from tsdn.resize import input_shape
from tsdn.scoring import image_score


def position_gaussian(train: torch.Tensor, shrink: float, shrink_mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, h, w) training values -> per position the mean (h, w, C) and precision (h, w, C, C)."""
    n, c = train.shape[:2]
    per_position = train.permute(2, 3, 0, 1)  # h, w, n, c
    mean = per_position.mean(2)
    centred = per_position - mean[:, :, None]
    cov = centred.transpose(2, 3) @ centred / (n - 1)
    within = cov.mean((0, 1))
    pooled_mean = mean.mean((0, 1))
    if shrink_mean:
        spread = (mean - pooled_mean).pow(2).sum(-1).mean()
        factor = float(torch.clamp(within.diagonal().sum() / n / spread.clamp_min(1e-12), max=1.0))
        mean = (1 - factor) * mean + factor * pooled_mean
        shrink = max(shrink, factor)
    floor = torch.eye(c, dtype=cov.dtype) * within.diagonal().mean()
    shrunk = ((1 - shrink) * cov + shrink * within + 0.01 * floor).reshape(-1, c, c)
    # cholesky on a 3-D batch: torch.linalg.inv on the 4-D batch stalls in MKL's LU here (DLASWP errors)
    precision = torch.cholesky_inverse(torch.linalg.cholesky(shrunk)).view(cov.shape)
    return mean, precision


def position_distance(values: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    c = values.shape[1]
    x = values.permute(2, 3, 0, 1) - mean[:, :, None]  # h, w, n, c
    squared = ((x @ precision) * x).sum(-1).clamp_min(0)
    return (squared.permute(2, 0, 1).sqrt() / c**0.5)[:, None].float()


@torch.no_grad()
def shipped(
    model: TSDN, train: torch.Tensor, *splits: np.ndarray, held_out: torch.Tensor | None = None, **changes: object
) -> list[torch.Tensor]:
    """``model``'s weights in a ``feature_whitening: position`` model (and ``changes`` to its config) fitted by the
    shipped code on ``train`` (and ``held_out``) images: its maps of ``splits`` (uint8 image arrays)."""
    cfg = dataclasses.replace(model.cfg, feature_whitening="position", **changes)
    refitted = TSDN(cfg).eval()
    fitted_later = ("feature_mean_", "feature_whitening_", "feature_count", "normal_")
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith(fitted_later)}
    missing = refitted.load_state_dict(weights, strict=False).missing_keys
    assert all(k.startswith(fitted_later) for k in missing), missing
    refitted.fit_normal_stats(train.split(16), None if held_out is None else held_out.split(16))
    if refitted.position_blends:
        print(f"shipped: blends per stage {refitted.position_blends}", flush=True)
    return [torch.cat([refitted.predict(b).anomaly_map for b in _to_tensor(s).split(16)]) for s in splits]


def main(out_path: str, model_path: str, root: str, product: str) -> None:
    torch.set_num_threads(2)
    model, data, held, seed, val = load_saved_run(model_path, root, product)
    cfg = model.cfg
    shape = input_shape(cfg.image_size)
    stages = model.feature_stages
    train_res, train_feat = residuals(model, _to_tensor(data["train"][~held]))
    splits = {
        "train": (train_res, train_feat),
        "test": residuals(model, _to_tensor(data["test"])),
        "val": residuals(model, _to_tensor(val.images)),
    }

    def averaged(per_stage) -> dict[str, torch.Tensor]:
        out = {}
        for split, (res, feat) in splits.items():
            maps = [per_stage(s, res[s], feat[s]) for s in stages]
            up = [F.interpolate(m, size=shape, mode="bilinear", align_corners=False) for m in maps]
            out[split] = sum(up) / len(up)
        return out

    pooled = {s: moments(train_res[s]) for s in stages}
    variants = {"pooled": lambda s, r, f: mahalanobis(r, *pooled[s], cfg.feature_shrinkage)}
    for shrink in (0.1, 0.5):
        for shrink_mean in (False, True):
            fitted = {s: position_gaussian(train_res[s], shrink, shrink_mean) for s in stages}
            name = f"position a={shrink}" + (", mean shrunk" if shrink_mean else "")
            variants[name] = lambda s, r, f, g=fitted: position_distance(r, *g[s])
    features = {s: position_gaussian(train_feat[s], 0.1, False) for s in stages}
    variants["features a=0.1"] = lambda s, r, f: position_distance(f, *features[s])

    scored = {}
    for name, per_stage in variants.items():
        maps = averaged(per_stage)
        scored[name] = (
            standardise(maps["test"], maps["train"], cfg.score_sigma),
            standardise(maps["val"], maps["train"], cfg.score_sigma),
        )
    scored["shipped position"] = shipped(model, _to_tensor(data["train"][~held]), data["test"], val.images)
    for name, (test, held_out) in scored.items():
        row = {"model": model_path, "product": product, "seed": seed, "variant": name}
        write_row(out_path, {**row, **map_metrics(data, val, test, held_out)})


def map_metrics(data: dict, val: ValidationSet, test: torch.Tensor, held_out: torch.Tensor) -> dict[str, float]:
    """The test split's image / pixel AUROC of ``test`` (N, 1, H, W) maps and the validation's image AUROC of the
    ``held_out`` maps (the image score the maximum, as the presets score)."""
    return {
        "image_auroc": round(float(image_auroc(data["test_labels"], image_score(test).numpy())), 4),
        "pixel_auroc": round(float(pixel_auroc(data["test_masks"], test[:, 0].numpy())), 4),
        "val_image_auroc": round(float(image_auroc(val.labels, image_score(held_out).numpy())), 4),
    }


if __name__ == "__main__":
    main(*sys.argv[1:5])
