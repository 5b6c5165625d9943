"""Which encoder stages the whitened feature residual should compare, post hoc: the same weights, no retraining.

Loads a model saved by ``benchmarks/recipe.py --save-model`` (a ``feature_distance: mahalanobis`` run) and
rebuilds its map from the residual ``r = f_I - f_R`` at every encoder stage (strides 4, 8, 16, 32 of
EfficientNet-Lite0): per stage the Mahalanobis norm of ``r`` under the mean and covariance of the normal
training images (shrunk 1 %, as ``TSDN.set_normal_stats`` does), upsampled, averaged over a set of stages,
blurred (the model's ``score_sigma``) and standardised per position by the training images' maps
(``score_normalization: pixel``). Variants:

- ``st<a>_<b>...``: the stages averaged (``st8_16`` is what the model ships);
- ``st8_16+feat``: the mean of the standardised ``st8_16`` map and the standardised map of a Gaussian of the
  image's own features ``f_I`` at the same stages (what the frozen encoder alone finds);
- ``st8_16_sep``: each stage standardised on its own, then averaged;
- ``model_<strides>``: the shipped code path for ``st8_16`` and ``st8_16_32``: a model with
  ``feature_strides`` set, the saved weights loaded, ``fit_normal_stats`` on the training images, ``predict``.

For every variant: test image / pixel AUROC, the image AUROC of each defect type against the good test images,
the validation set's image AUROC (held-out normals with synthetic defects, as ``recipe.py`` draws them), and the
threshold the platform would calibrate (the 99 % quantile of the held-out normals' scores) applied to the test
split: the share of good test images it flags and of defective ones it catches.
Rows (JSON lines) are appended to the output file.

    python benchmarks/stage_variants.py .tsdn/models/transistor-demo10-s0.pt ../shared/data/mvtec transistor \\
        benchmarks/results/recipe/stage_variants.jsonl
    python benchmarks/stage_variants.py --summary benchmarks/results/recipe/stage_variants.jsonl  # the table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import _to_tensor, load_saved_run, refit
from whitening_variants import mahalanobis, moments, standardise

from tsdn.metrics import image_auroc, pixel_auroc
from tsdn.model import TSDN
from tsdn.scoring import image_score

MODEL_STRIDES = ((8, 16), (8, 16, 32))
STAGE_SETS = ((8, 16), (4, 8, 16), (8, 16, 32), (4, 8, 16, 32), (16, 32), (4,), (8,), (16,), (32,))


@torch.no_grad()
def all_stages(model: TSDN, images: torch.Tensor, batch_size: int = 16) -> tuple[dict, dict]:
    """Per encoder stride >= 4: the residuals ``f_I - f_R`` and the features ``f_I``, float64 (N, C, h, w)."""
    strides = model.encoder.feature_info.reduction()
    keep = [i for i, r in enumerate(strides) if r >= 4]
    res: dict[int, list[torch.Tensor]] = {strides[i]: [] for i in keep}
    feats: dict[int, list[torch.Tensor]] = {strides[i]: [] for i in keep}
    for start in range(0, len(images), batch_size):
        residual, features = model._feature_residuals(images[start : start + batch_size], keep)
        for i, r, f in zip(keep, residual, features, strict=True):
            res[strides[i]].append(r.double())
            feats[strides[i]].append(f.double())
    return {s: torch.cat(v) for s, v in res.items()}, {s: torch.cat(v) for s, v in feats.items()}


@torch.no_grad()
def predicted(model: TSDN, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.predict(batch).anomaly_map for batch in images.split(16)])


def per_type_auroc(labels: np.ndarray, scores: np.ndarray, defects: np.ndarray) -> dict[str, float]:
    """The image AUROC of each defect type against the good test images."""
    good = defects == "good"
    return {
        kind: round(float(image_auroc(labels[good | (defects == kind)], scores[good | (defects == kind)])), 4)
        for kind in sorted(set(defects.tolist()) - {"good"})
    }


def main(model_path: str, root: str, product: str, out_path: str) -> None:
    torch.set_num_threads(2)
    model, data, held, seed, val = load_saved_run(model_path, root, product)
    side, sigma = model.cfg.image_size, model.cfg.score_sigma

    def up(values: torch.Tensor) -> torch.Tensor:
        return F.interpolate(values, size=(side, side), mode="bilinear", align_corners=False)

    train_res, train_feat = all_stages(model, _to_tensor(data["train"][~held]))
    res_moments = {s: moments(v) for s, v in train_res.items()}
    feat_moments = {s: moments(v) for s, v in train_feat.items()}

    def per_stage(r: dict, f: dict) -> tuple[dict, dict]:
        res_maps = {s: up(mahalanobis(r[s], *res_moments[s], 0.01)) for s in r}
        feat_maps = {s: up(mahalanobis(f[s], *feat_moments[s], 0.01)) for s in (8, 16)}
        return res_maps, feat_maps

    train_stage, train_featmap = per_stage(train_res, train_feat)

    def variants(stage: dict, featmap: dict) -> dict[str, torch.Tensor]:
        out = {}
        for which in STAGE_SETS:
            raw = sum(stage[s] for s in which) / len(which)
            out["st" + "_".join(map(str, which))] = standardise(
                raw, sum(train_stage[s] for s in which) / len(which), sigma
            )
        feat = standardise((featmap[8] + featmap[16]) / 2, (train_featmap[8] + train_featmap[16]) / 2, sigma)
        out["st8_16+feat"] = (out["st8_16"] + feat) / 2
        out["st8_16_sep"] = sum(standardise(stage[s], train_stage[s], sigma) for s in (8, 16)) / 2
        return out

    labels, masks, defects = data["test_labels"], data["test_masks"], data["test_defects"]
    test = variants(*per_stage(*all_stages(model, _to_tensor(data["test"]))))
    validation = variants(*per_stage(*all_stages(model, _to_tensor(val.images))))
    for strides in MODEL_STRIDES:
        name = "model_" + "_".join(map(str, strides))
        other = refit(model, _to_tensor(data["train"][~held]), feature_strides=strides)
        test[name], validation[name] = (
            predicted(other, _to_tensor(data["test"])),
            predicted(other, _to_tensor(val.images)),
        )
    results: dict[str, dict] = {}
    for name, amap in test.items():
        scores = image_score(amap).numpy()
        per_type = per_type_auroc(labels, scores, defects)
        val_scores = image_score(validation[name]).numpy()
        threshold = float(np.quantile(val_scores[val.labels == 0], 0.99))  # the platform's calibration rule
        results[name] = {
            "image_auroc": round(float(image_auroc(labels, scores)), 4),
            "pixel_auroc": round(float(pixel_auroc(masks, amap[:, 0].numpy())), 4),
            "per_type": per_type,
            "val_image_auroc": round(float(image_auroc(val.labels, val_scores)), 4),
            # the threshold the held-out normals calibrate, applied to the test split: the share of good images
            # flagged and of defective images caught
            "test_fpr_at_threshold": round(float((scores[labels == 0] >= threshold).mean()), 4),
            "test_tpr_at_threshold": round(float((scores[labels == 1] >= threshold).mean()), 4),
        }
    report_variants(out_path, model_path, product, seed, results)


def report_variants(out_path: str, model_path: str, product: str, seed: int, results: dict[str, dict]) -> None:
    """Append one model's variants as a JSON row to ``out_path`` and print a line per variant."""
    with open(out_path, "a") as handle:
        handle.write(json.dumps({"model": model_path, "product": product, "seed": seed, "variants": results}) + "\n")
    for name, r in results.items():
        types = " ".join(f"{k}={v:.2f}" for k, v in r["per_type"].items())
        threshold = ""
        if "test_fpr_at_threshold" in r:
            threshold = f"| fpr {r['test_fpr_at_threshold']:.2f} tpr {r['test_tpr_at_threshold']:.2f} "
        print(
            f"{product} s{seed} {name:22s} test {r['image_auroc']:.3f} / {r['pixel_auroc']:.3f} "
            f"| val {r['val_image_auroc']:.3f} {threshold}| {types}"
        )


def summary(path: str) -> None:
    """``--summary FILE``: per variant and product, the mean ± std over the file's seeds (the BENCHMARKS table)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    products = list(dict.fromkeys(row["product"] for row in rows))
    seeds = {p: sum(1 for row in rows if row["product"] == p) for p in products}
    print("| variant | " + " | ".join(f"{p} ({seeds[p]} seeds)" for p in products) + " |")
    print("|---|" + "---|" * len(products))
    for name in rows[0]["variants"]:
        cells = []
        for product in products:
            runs = [row["variants"][name] for row in rows if row["product"] == product]
            image, pixel, val = (
                np.array([r[k] for r in runs]) for k in ("image_auroc", "pixel_auroc", "val_image_auroc")
            )
            cells.append(
                f"{image.mean():.3f} ± {image.std():.3f} / {pixel.mean():.3f} ± {pixel.std():.3f} ({val.mean():.2f})"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")


def run_cli(main_fn) -> None:
    """``SCRIPT MODEL ROOT PRODUCT OUT`` runs ``main_fn``; ``SCRIPT --summary FILE`` prints the file's table."""
    if sys.argv[1] == "--summary":
        summary(sys.argv[2])
    else:
        main_fn(*sys.argv[1:5])


if __name__ == "__main__":
    run_cli(main)
