"""The score map's settings, post hoc on saved TSDN weights: the same weights, no retraining.

For each variant (``variants``) a model of the saved config with those settings takes the saved weights, fits its
statistics on the training images (and the held-out normals, where the config chooses on them) with
:func:`recipe.refit`, as the platform does after training, and scores with ``predict``:

- ``preset``: the saved settings;
- ``sigma2``: the map's blur halved (``score_sigma`` 2 at 128 px, scaled with the model's width as the presets' 4 is);
- ``image+32``: the image score from the stride-32 stage too (``feature_strides`` 8 + 16 + 32), the map from the
  saved stages (``map_strides`` 8 + 16): the `cpu` preset's split;
- ``image+32, sigma2``: both;
- ``image+32, score sigma2`` (``score sigma2`` on a model that has the split): the split, the blur halved for the
  image score's map alone (``image_score_sigma``), the map's kept.

The views are the ones the saved model chose (``test_flips: auto`` is fixed to its saved choice), or VIEWS where given:
``recipe.py`` holds out 5 of a demo texture's 40 training images, fewer than ``FLIP_MIN_IMAGES``, so there the saved
choice is 1 view where the platform's 10-12 held-out normals choose 4.

One JSON row per (model, variant): the test image / pixel AUROC, the image AUROC per defect type and the held-out
validation's image AUROC (``recipe.py``'s split and set), appended to OUT.

    python benchmarks/map_settings.py OUT MODEL.pt ROOT PRODUCT [VIEWS|saved ["VARIANT;VARIANT..."]]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_probe import write_row
from recipe import _to_tensor, load_saved_run, refit
from stage_variants import per_type_auroc

from tsdn.metrics import image_auroc, pixel_auroc
from tsdn.model import TSDN


def variants(model: TSDN) -> dict[str, dict]:
    """name -> the settings changed on the saved model."""
    cfg = model.cfg
    sigma2 = {"score_sigma": cfg.score_sigma / 2}
    score_sigma2 = {"image_score_sigma": cfg.score_sigma / 2}
    if cfg.map_strides is not None:
        return {"preset": {}, "sigma2": sigma2, "score sigma2": score_sigma2}
    image32 = {"feature_strides": (*cfg.feature_strides, 32), "map_strides": cfg.feature_strides}
    if 32 in cfg.feature_strides:
        return {"preset": {}, "sigma2": sigma2}
    return {
        "preset": {}, "sigma2": sigma2, "image+32": image32, "image+32, sigma2": {**image32, **sigma2},
        "image+32, score sigma2": {**image32, **score_sigma2},
    }  # fmt: skip


@torch.no_grad()
def maps_and_scores(model: TSDN, images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """The maps ``predict`` returns and the image scores it gives (with ``map_strides`` not the map's maximum)."""
    outputs = [model.predict(batch) for batch in images.split(16)]
    return torch.cat([o.anomaly_map for o in outputs]), torch.cat([o.anomaly_score for o in outputs]).numpy()


def main(
    out_path: str, model_path: str, root: str, product: str, views: str | None = None, only: str | None = None
) -> None:
    torch.set_num_threads(2)
    model, data, held, seed, val = load_saved_run(model_path, root, product)
    train, normals = _to_tensor(data["train"][~held]), _to_tensor(data["train"][held])
    saved = int(model.test_flip_count) if model.cfg.test_flips == "auto" else model.cfg.test_flips
    views = int(views) if views and views != "saved" else saved
    test_images, val_images = _to_tensor(data["test"]), _to_tensor(val.images)
    row = {"model": model_path, "product": product, "seed": seed, "test_flips": views}
    chosen = variants(model)
    names = only.split(";") if only else list(chosen)
    unknown = set(names) - set(chosen)
    if unknown:
        raise SystemExit(f"map_settings: unknown variant(s) {sorted(unknown)} for this model; it has {list(chosen)}")
    for name in names:
        changes = chosen[name]
        fitted = refit(model, train, normals, test_flips=views, **changes)
        test_map, test_scores = maps_and_scores(fitted, test_images)
        _, val_scores = maps_and_scores(fitted, val_images)
        write_row(out_path, {
            **row, "variant": name,
            "image_auroc": round(float(image_auroc(data["test_labels"], test_scores)), 4),
            "pixel_auroc": round(float(pixel_auroc(data["test_masks"], test_map[:, 0].numpy())), 4),
            "val_image_auroc": round(float(image_auroc(val.labels, val_scores)), 4),
            "per_type": per_type_auroc(data["test_labels"], test_scores, data["test_defects"]),
        })  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:7])
