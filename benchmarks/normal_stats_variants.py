"""How the per-position statistics are estimated, post hoc: the same weights, no retraining.

``score_normalization: pixel`` standardises every position of the map by the mean and standard deviation of the
normal training images' maps at that position. A demo product line has 30-35 training images, so 16 384
positions' statistics each come from 30-35 values. This scores, on a model saved by ``benchmarks/recipe.py
--save-model``, other estimates of the same statistics (the whitening is the shipped one, fitted on the
training images):

- ``shipped``: the model's own (variance blurred with ``score_sigma``, the mean not);
- ``blur<s>``: mean and variance both blurred with a Gaussian of ``s`` px (a normalised blur, so that the border
  keeps its own level): a texture has no fixed layout, so neighbouring positions estimate the same thing;
- ``flips``: the training images and their horizontal, vertical and double flips (4x the samples; a layout that
  is not symmetric is averaged with its mirror images);
- ``flips+blur<s>``: both.

For every variant: test image / pixel AUROC, image AUROC per defect type and the validation image AUROC. Rows
(JSON lines) are appended to the output file.

    python benchmarks/normal_stats_variants.py .tsdn/models/grass-demo6-s0.pt .tsdn/demo/data grass \\
        benchmarks/results/recipe/normal_stats_variants.jsonl
    python benchmarks/normal_stats_variants.py --summary benchmarks/results/recipe/normal_stats_variants.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import _to_tensor, load_saved_run
from stage_variants import per_type_auroc, predicted, report_variants, run_cli

from tsdn.metrics import image_auroc, pixel_auroc
from tsdn.model import TSDN, moments_from_sums
from tsdn.scoring import image_score

BLURS = (8.0, 16.0, 32.0)


def normalized_blur(plane: torch.Tensor, sigma: float) -> torch.Tensor:
    """A (1, 1, H, W) plane blurred with a Gaussian of ``sigma`` px, each output divided by the kernel weight that
    fell inside the image (no zero padding pulling the border toward 0, no mirrored values)."""
    radius = int(3 * sigma)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(plane.dtype)
    ones = torch.ones_like(plane)

    def separable(x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, kernel.view(1, 1, -1, 1), padding=(radius, 0))
        return F.conv2d(x, kernel.view(1, 1, 1, -1), padding=(0, radius))

    return separable(plane) / separable(ones)


def flipped(images: torch.Tensor) -> torch.Tensor:
    return torch.cat([images, images.flip(-1), images.flip(-2), images.flip(-1, -2)])


@torch.no_grad()
def set_stats(model: TSDN, train: torch.Tensor, blur: float | None) -> None:
    """The per-position mean and std of ``model``'s raw map over ``train``, both blurred with ``blur`` px (or the
    shipped estimate when ``blur`` is None)."""
    sums = model.normal_stat_sums(train.split(16), "pixel")
    if blur is None:
        model.set_normal_stats(sums, "pixel")
        return
    height, width = model.cfg.input_shape
    n = height * width
    mean, var = (v.view(1, 1, height, width) for v in moments_from_sums(float(sums[0]), sums[1 : 1 + n], sums[1 + n :]))
    mean, var = normalized_blur(mean, blur), normalized_blur(var, blur)
    std = var.sqrt()
    model.normal_mean.copy_(mean.to(model.normal_mean))
    model.normal_std.copy_(std.clamp_min(0.01 * float(std.mean()) + 1e-12).to(model.normal_std))


def main(model_path: str, root: str, product: str, out_path: str) -> None:
    torch.set_num_threads(2)
    model, data, held, seed, val = load_saved_run(model_path, root, product)
    train, test, val_images = (_to_tensor(x) for x in (data["train"][~held], data["test"], val.images))
    labels, masks, defects = data["test_labels"], data["test_masks"], data["test_defects"]
    variants = {"shipped": (train, None)}
    variants.update({f"blur{int(s)}": (train, s) for s in BLURS})
    variants["flips"] = (flipped(train), None)
    variants.update({f"flips+blur{int(s)}": (flipped(train), s) for s in BLURS})
    results: dict[str, dict] = {}
    for name, (images, blur) in variants.items():
        set_stats(model, images, blur)
        test_map, val_map = predicted(model, test), predicted(model, val_images)
        scores, val_scores = image_score(test_map, 0.0).numpy(), image_score(val_map, 0.0).numpy()
        results[name] = {
            "image_auroc": round(float(image_auroc(labels, scores)), 4),
            "pixel_auroc": round(float(pixel_auroc(masks, test_map[:, 0].numpy())), 4),
            "per_type": per_type_auroc(labels, scores, defects),
            "val_image_auroc": round(float(image_auroc(val.labels, val_scores)), 4),
        }
    report_variants(out_path, model_path, product, seed, results)


if __name__ == "__main__":
    run_cli(main)
