"""Can the held-out normals choose between the pooled and the per-position whitening, without test labels?

``feature_whitening: position`` (the ``cpu`` preset) wins on aligned parts and loses on the demo textures
(``position_whitening.py``); which a new product line is cannot be read from its name. Both Gaussians are
density models of the same residual ``f_I - f_R``, so the normal images held out of the fit can score them: the
mean negative log-likelihood per position of the held-out residuals, ``(d^2 + log det S) / 2`` per stage (the
constant dropped), summed over the stages. A per-position Gaussian that only fits the training images' noise
(35 textured images, a C x C covariance per position) pays for it on images it did not see; one that captures a
real layout (a transistor) gains.

Variants, fitted on the training images as the shipped code fits them (``TSDN._set_whitening``: a blend toward
the positions' mean covariance, then ``feature_shrinkage`` toward a scaled identity):

- ``pooled``: one mean and covariance per stage;
- ``position a=λ``: per position, λ in 0.1 (shipped), 0.5, 0.9 and 1.0 (per-position means, one covariance).

and ``auto, one blend`` / ``auto, per stage``: the blend of least held-out NLL over all stages, or per stage;
``shipped auto``: the shipped code (``feature_position_shrinkage: auto``: ``TSDN.fit_normal_stats`` with the
held-out images) on the same weights, which should equal ``auto, per stage``.

For each, the held-out NLL, the test image / pixel AUROC (standardised per position by the training maps, image
score the maximum: the presets' scoring) and the validation image AUROC. One JSON row per (model, variant).

    python benchmarks/whitening_selection.py OUT MODEL.pt ROOT PRODUCT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_probe import write_row
from position_whitening import map_metrics, shipped
from recipe import _to_tensor, load_saved_run
from whitening_variants import residuals, standardise

from tsdn.resize import input_shape

BLENDS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def gaussian(train: torch.Tensor, blend: float | None, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, h, w) residuals -> the mean (P, C) and covariance (P, C, C), P = 1 when ``blend`` is None (pooled)
    or h * w, regularised as ``TSDN._set_whitening`` does."""
    n, c = train.shape[:2]
    rows = train.double().permute(2, 3, 0, 1).reshape(-1, n, c)  # P, N, C
    if blend is None:
        rows = rows.reshape(1, -1, c)
    mean = rows.mean(1)
    centred = rows - mean[:, None]
    cov = centred.transpose(1, 2) @ centred / (rows.shape[1] - 1)
    if blend is not None:
        cov = (1 - blend) * cov + blend * cov.mean(0, keepdim=True)
    scale = cov.diagonal(dim1=1, dim2=2).mean()
    return mean, (1 - shrink) * cov + shrink * scale * torch.eye(c, dtype=cov.dtype)


def distances(values: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, h, w) values -> the squared Mahalanobis distance (N, h, w) and log det of each position's covariance
    (h * w or 1)."""
    n, c, h, w = values.shape
    chol = torch.linalg.cholesky(cov)  # P, C, C (a 3-D batch: see _whitening_matrices on MKL)
    x = values.double().permute(2, 3, 1, 0).reshape(-1, c, n) if len(mean) > 1 else values.double()
    if len(mean) > 1:
        z = torch.linalg.solve_triangular(chol, x - mean[:, :, None], upper=False)  # P, C, N
        squared = z.pow(2).sum(1).T.reshape(n, h, w)
    else:
        flat = x.permute(0, 2, 3, 1).reshape(-1, c) - mean
        z = torch.linalg.solve_triangular(chol[0], flat.T, upper=False)
        squared = z.pow(2).sum(0).reshape(n, h, w)
    logdet = 2 * chol.diagonal(dim1=1, dim2=2).log().sum(-1)
    return squared, logdet


def held_out_nll(squared: torch.Tensor, logdet: torch.Tensor) -> float:
    """The mean negative log-likelihood per position, ``(d^2 + log det S) / 2`` (the constant dropped), of
    :func:`distances`' output for the held-out normals."""
    return float(0.5 * (squared.mean() + logdet.mean()))


def stage_map(squared: torch.Tensor, channels: int, shape: tuple[int, int]) -> torch.Tensor:
    """:func:`distances`' squared distances (N, h, w) of a stage with ``channels`` -> its map (N, 1, H, W), as the
    shipped code scales and upsamples it."""
    return F.interpolate((squared / channels).sqrt()[:, None].float(), size=shape, mode="bilinear")


def split_residuals(model_path: str, root: str, product: str) -> tuple:
    """A saved run (:func:`recipe.load_saved_run`) and its residuals per split and stage: ``fit`` (the training
    images the statistics are fitted on), ``held`` (the held-out normals), ``test`` and ``val``."""
    model, data, held, seed, val = load_saved_run(model_path, root, product)
    splits = {
        "fit": residuals(model, _to_tensor(data["train"][~held]))[0],
        "held": residuals(model, _to_tensor(data["train"][held]))[0],
        "test": residuals(model, _to_tensor(data["test"]))[0],
        "val": residuals(model, _to_tensor(val.images))[0],
    }
    return model, data, held, seed, val, splits


def main(out_path: str, model_path: str, root: str, product: str) -> None:
    torch.set_num_threads(2)
    model, data, held, seed, val, splits = split_residuals(model_path, root, product)
    cfg = model.cfg
    shape = input_shape(cfg.image_size)
    stages = model.feature_stages
    fit = splits["fit"]
    candidates = [("pooled", None)] + [(f"position a={b}", b) for b in BLENDS]
    nll: dict[str, dict[int, float]] = {}  # variant -> stage -> held-out NLL
    maps: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # variant -> stage -> split -> upsampled map
    for name, blend in candidates:
        for s in stages:
            mean, cov = gaussian(fit[s], blend, cfg.feature_shrinkage)
            for split, res in splits.items():
                squared, logdet = distances(res[s], mean, cov)
                if split == "held":
                    nll.setdefault(name, {})[s] = held_out_nll(squared, logdet)
                maps.setdefault(name, {}).setdefault(s, {})[split] = stage_map(squared, res[s].shape[1], shape)
    positions = [name for name, blend in candidates if blend is not None]
    chosen = {name: {s: name for s in stages} for name, _ in candidates}
    one = min(positions, key=lambda name: sum(nll[name].values()))
    chosen["auto, one blend"] = {s: one for s in stages}
    chosen["auto, per stage"] = {s: min(positions, key=lambda name: nll[name][s]) for s in stages}
    scored = {}
    for variant, per_stage in chosen.items():
        averaged = {split: sum(maps[per_stage[s]][s][split] for s in stages) / len(stages) for split in splits}
        scored[variant] = (
            standardise(averaged["test"], averaged["fit"], cfg.score_sigma),
            standardise(averaged["val"], averaged["fit"], cfg.score_sigma),
        )
    held_images = _to_tensor(data["train"][held])
    fit_images = _to_tensor(data["train"][~held])
    scored["shipped auto"] = shipped(
        model, fit_images, data["test"], val.images, held_out=held_images, feature_position_shrinkage="auto"
    )
    chosen["shipped auto"] = chosen["auto, per stage"]
    for variant, (test, held_out) in scored.items():
        per_stage = chosen[variant]
        row = {
            "model": model_path, "product": product, "seed": seed, "variant": variant,
            "held_nll": round(sum(nll[per_stage[s]][s] for s in stages), 2), "held_images": int(held.sum()),
            "chosen": {str(s): per_stage[s] for s in stages},
        }  # fmt: skip
        write_row(out_path, {**row, **map_metrics(data, val, test, held_out)})


if __name__ == "__main__":
    main(*sys.argv[1:5])
