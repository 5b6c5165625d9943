"""What the frozen encoder alone can tell on the demo textures, per input size and encoder stages: no training.

The map is a Gaussian of the image's own encoder features (``f_I`` whitened by the training images' pooled
covariance, shrunk 1 %; averaged over the chosen stages; blurred with sigma 4 px per 128 px; standardised per
position by the training images' maps). On the demo textures this map is within 0.03 image AUROC of the `demo`
preset's TSDN map (BENCHMARKS.md, "The feature residual whitened": ``featmaha``), whose encoder is frozen at the
same ImageNet weights, so it bounds what a larger input or other stages could give TSDN there, in seconds
instead of a training run per setting. The split is ``recipe.py``'s (every 8th training image held out);
the arrays come from its cache. One JSON row per (product, size, stages) is appended to OUT.

    python benchmarks/encoder_probe.py OUT brick,grass,gravel 128,192,256,320 [ROOT]

ROOT defaults to ``.tsdn/demo/data`` (``make demo``'s data).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import HOLDOUT_EVERY, _to_tensor, load_product
from stage_variants import per_type_auroc
from whitening_variants import mahalanobis, moments, standardise

from tsdn.backbone import create_encoder, normalization
from tsdn.metrics import image_auroc, pixel_auroc
from tsdn.resize import input_shape
from tsdn.scoring import image_score

STAGE_SETS = ([8, 16], [4, 8], [4, 8, 16], [8], [16])


@torch.no_grad()
def stage_features(encoder: torch.nn.Module, images: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per encoder stride, the features (N, C, h, w) float64 of ``images`` (N, 3, S, S) in [0, 1]."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization(encoder))
    strides = list(encoder.feature_info.reduction())
    out: dict[int, list[torch.Tensor]] = {s: [] for s in strides}
    for batch in images.split(16):
        for s, f in zip(strides, encoder((batch - mean) / std), strict=True):
            out[s].append(f.double())
    return {s: torch.cat(v) for s, v in out.items()}


def gaussian_map(
    features: dict[int, torch.Tensor], fitted: dict, stages: list[int], size: int | tuple[int, int]
) -> torch.Tensor:
    """The whitened distance of every position's features, averaged over ``stages`` at ``size`` (S or (H, W))."""
    maps = [mahalanobis(features[s], *fitted[s], 0.01) for s in stages]
    shape = input_shape(size)
    return sum(F.interpolate(m, size=shape, mode="bilinear", align_corners=False) for m in maps) / len(stages)


def probe_metrics(
    data: dict, train: dict, test: dict, fitted: dict, stages: list[int], size: int | tuple[int, int]
) -> dict:
    """Test image / pixel AUROC and the image AUROC per defect type of the map at ``stages`` (features of the
    training and test images per stride, ``fitted`` their moments) for ``data`` (``load_product``'s arrays)."""
    shape = input_shape(size)
    sigma = 4.0 * shape[1] / 128
    amap = standardise(gaussian_map(test, fitted, stages, shape), gaussian_map(train, fitted, stages, shape), sigma)
    scores = image_score(amap, 0.0).numpy()
    return {
        "image_auroc": round(float(image_auroc(data["test_labels"], scores)), 4),
        "pixel_auroc": round(float(pixel_auroc(data["test_masks"], amap[:, 0].numpy())), 4),
        "per_type": per_type_auroc(data["test_labels"], scores, data["test_defects"]),
    }


def write_row(out_path: str, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(out_path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def main(out_path: str, products: str, sizes: str, root: Path) -> None:
    torch.set_num_threads(2)
    encoder = create_encoder("tf_efficientnet_lite0", "package:efficientnet-lite0").eval()
    for product in products.split(","):
        for size in (int(x) for x in sizes.split(",")):
            data = load_product(root, product, size, 400, 10.0, Path(".tsdn/cache"))
            held = np.arange(len(data["train"])) % HOLDOUT_EVERY == 0
            train = stage_features(encoder, _to_tensor(data["train"][~held]))
            test = stage_features(encoder, _to_tensor(data["test"]))
            fitted = {s: moments(v) for s, v in train.items()}
            for stages in STAGE_SETS:
                row = {"product": product, "size": size, "stages": stages}
                write_row(out_path, {**row, **probe_metrics(data, train, test, fitted, stages, size)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]) if len(sys.argv) > 4 else Path(".tsdn/demo/data"))
