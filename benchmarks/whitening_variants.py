"""The feature residual whitened by the normal training images, post hoc: the same weights, no retraining.

Loads a model saved by ``benchmarks/recipe.py --save-model`` and scores the test split and the synthetic-defect
validation set with per-position maps built from the encoder residual ``r = f_I - f_R`` at strides 8 and 16:

- ``cos``: ``1 - cos(f_I, f_R)`` (the shipped ``feature_distance: cosine``);
- ``maha``: ``sqrt(r' P r / C)`` with ``P`` the inverse of the residual's covariance over every position of the
  normal training images, shrunk 1 % toward a scaled identity (``feature_distance: mahalanobis``); ``maha_a<x>``
  the same shrunk by ``x``; ``maha_st3`` stride 16 alone;
- ``diag``: the same with the covariance's diagonal only;
- ``featmaha``: a Gaussian of the image's own features (not the residual): what the frozen encoder alone gives.

Each map then goes through the blur (sigma 4 and 8) and, with ``post``, the per-position standardisation of
``score_normalization: pixel`` (the statistics of the training images' blurred maps, the variance blurred again,
the std floored at 1 % of its mean: what ``TSDN.set_normal_stats`` does); ``none`` leaves it out. Image score:
the maximum, and the top-1 % mean. The training images are every train image except every 8th, which is held
out for the validation set, as in ``recipe.py``. Rows (JSON lines) are appended to the output file.

    python benchmarks/whitening_variants.py .tsdn/models/transistor-noskip10-s0.pt ../shared/data/mvtec transistor \\
        benchmarks/results/recipe/whitening_variants.jsonl
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import _to_tensor, load_saved_run

from tsdn.metrics import image_auroc, pixel_auroc
from tsdn.model import TSDN
from tsdn.scoring import blur_map, image_score

Stages = dict[int, torch.Tensor]


@torch.no_grad()
def residuals(model: TSDN, images: torch.Tensor, batch_size: int = 16) -> tuple[Stages, Stages]:
    """Per compared stage: the residuals ``f_I - f_R`` and the features ``f_I``, float64 (N, C, h, w)."""
    res: dict[int, list[torch.Tensor]] = {s: [] for s in model.feature_stages}
    feats: dict[int, list[torch.Tensor]] = {s: [] for s in model.feature_stages}
    for start in range(0, len(images), batch_size):
        residual, features = model._feature_residuals(images[start : start + batch_size])
        for s, r, f in zip(model.feature_stages, residual, features, strict=True):
            res[s].append(r.double())
            feats[s].append(f.double())
    return {s: torch.cat(v) for s, v in res.items()}, {s: torch.cat(v) for s, v in feats.items()}


def moments(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, h, w) -> the mean (C,) and covariance (C, C) over every position of every image."""
    rows = values.permute(0, 2, 3, 1).reshape(-1, values.shape[1])
    mean = rows.mean(0)
    centred = rows - mean
    return mean, centred.T @ centred / (len(rows) - 1)


def mahalanobis(values: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, shrink: float) -> torch.Tensor:
    c = cov.shape[0]
    precision = torch.linalg.inv((1 - shrink) * cov + shrink * torch.eye(c, dtype=cov.dtype) * cov.diagonal().mean())
    x = values.permute(0, 2, 3, 1) - mean
    return (torch.einsum("nhwc,cd,nhwd->nhw", x, precision, x).clamp_min(0).sqrt() / c**0.5)[:, None].float()


def diagonal(values: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    x = values.permute(0, 2, 3, 1) - mean
    return (x.pow(2) / cov.diagonal()).mean(-1).sqrt()[:, None].float()


def standardise(raw: torch.Tensor, train: torch.Tensor, sigma: float) -> torch.Tensor:
    """``score_normalization: pixel`` on the blurred map, with the statistics of the training images' maps."""
    blurred = blur_map(train, sigma)
    std = blur_map(blurred.var(0, keepdim=True), sigma).sqrt()
    std = std.clamp_min(0.01 * float(std.mean()))
    return (blur_map(raw, sigma) - blurred.mean(0, keepdim=True)) / std


def main(model_path: str, root: str, product: str, out_path: str) -> None:
    torch.set_num_threads(2)
    model, data, held, seed, val = load_saved_run(model_path, root, product)
    cfg = model.cfg
    stages = model.feature_stages
    side = cfg.image_size

    def up(values: torch.Tensor) -> torch.Tensor:
        return F.interpolate(values, size=(side, side), mode="bilinear", align_corners=False)

    train_res, train_feat = residuals(model, _to_tensor(data["train"][~held]))
    res_moments = {s: moments(train_res[s]) for s in stages}
    feat_moments = {s: moments(train_feat[s]) for s in stages}

    def averaged(per_stage: Callable[[int], torch.Tensor], which: list[int]) -> torch.Tensor:
        return sum(up(per_stage(s)) for s in which) / len(which)

    def kinds(r: Stages, f: Stages) -> dict[str, torch.Tensor]:
        cos = {s: (1 - F.cosine_similarity(f[s], f[s] - r[s], dim=1, eps=1e-6))[:, None].float() for s in stages}
        out = {
            "cos": averaged(lambda s: cos[s], stages),
            "maha": averaged(lambda s: mahalanobis(r[s], *res_moments[s], 0.01), stages),
            "maha_st3": averaged(lambda s: mahalanobis(r[s], *res_moments[s], 0.01), stages[-1:]),
            "diag": averaged(lambda s: diagonal(r[s], *res_moments[s]), stages),
            "featmaha": averaged(lambda s: mahalanobis(f[s], *feat_moments[s], 0.01), stages),
        }
        for shrink in (0.1, 0.5):
            out[f"maha_a{shrink}"] = averaged(lambda s, a=shrink: mahalanobis(r[s], *res_moments[s], a), stages)
        return out

    train_maps = kinds(train_res, train_feat)
    splits = (
        ("test", data["test"], data["test_labels"], data["test_masks"]),
        ("val", val.images, val.labels, val.masks),
    )
    results: dict[str, dict] = {}
    for split, images, labels, masks in splits:
        for kind, raw in kinds(*residuals(model, _to_tensor(images))).items():
            for sigma in (4, 8):
                for norm, amap in (
                    ("none", blur_map(raw, sigma)),
                    ("post", standardise(raw, train_maps[kind], sigma)),
                ):
                    for topk in (0, 0.01):
                        entry = {"image_auroc": round(float(image_auroc(labels, image_score(amap, topk).numpy())), 4)}
                        if split == "test":
                            entry["pixel_auroc"] = round(float(pixel_auroc(masks, amap[:, 0].numpy())), 4)
                        results.setdefault(f"{kind}_{norm}_s{sigma}_top{topk}", {})[split] = entry
    with open(out_path, "a") as handle:
        handle.write(json.dumps({"model": model_path, "product": product, "seed": seed, "variants": results}) + "\n")
    for name, r in results.items():
        t, v = r["test"], r["val"]
        test = f"test {t['image_auroc']:.3f} / {t['pixel_auroc']:.3f}"
        print(f"{product} s{seed} {name:26s} {test} | val {v['image_auroc']:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
