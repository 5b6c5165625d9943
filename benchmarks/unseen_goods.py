"""How often good images a model never saw reach its calibrated threshold, against what the calibration promises.

For a store made by ``make demo`` (or ``tsdn demo``) and the demo data it was made from, every registered version of
every line scores, through :class:`tsdn.predict.Predictor`:

- ``held_out``: the line's held-out normal images (the train images in the run's ``holdout_folds``), the ones the
  threshold is the 99 % quantile of; their flag rate reproduces the calibration;
- ``test_good``: the good test images ``make demo`` evaluates on (30 per line);
- ``fresh``: N new good images drawn the way the demo data draws them (:func:`tsdn_platform.demo_data.texture_patch`
  of the same photograph, a seed of their own), the closest thing to "every good part the line will make".

Each row holds the flag rate and score statistics of the three sets, and the calibration's promise
(:meth:`tsdn.calibration.Calibration.false_positive_rate`: expected, 95 % bound). One JSON row per version is
appended to OUT.

    python benchmarks/unseen_goods.py OUT STORE DATA_ROOT N_FRESH [FRESH_SEED]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_probe import write_row

from tsdn_platform import store as stores
from tsdn_platform.demo_data import _texture, _to_uint8, texture_patch
from tsdn_platform.registry import Registry
from tsdn_platform.shards import fold_of


def _rgb(paths: list[Path]) -> list[np.ndarray]:
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB")))
    return images


def _rates(predictor, images: list[np.ndarray]) -> dict:
    scores = np.array([d.anomaly_score for d in predictor.predict(images)])
    threshold = predictor.calibration.threshold
    return {
        "n": len(scores), "flagged": int((scores >= threshold).sum()),
        "flag_rate": round(float((scores >= threshold).mean()), 4), "mean": round(float(scores.mean()), 3),
        "max": round(float(scores.max()), 3), "q90": round(float(np.quantile(scores, 0.9)), 3),
    }  # fmt: skip


def version_row(registry: Registry, root: Path, product: str, version: str, fresh: list[np.ndarray]) -> dict:
    predictor, ref = registry.load_predictor(product, version)
    record = registry.metrics(product, version)
    config = yaml.safe_load(stores.read_bytes(stores.join(record["run_uri"], "config.yaml")))
    folds = set(config["holdout_folds"])
    train = sorted((root / product / "train" / "good").glob("*.png"))
    held_out = [p for p in train if fold_of(f"{product}/train/good/{p.name}") in folds]
    if len(held_out) != record["holdout_images"]:
        raise SystemExit(f"unseen_goods: {product} {version}: {len(held_out)} held-out images, the run had "
                         f"{record['holdout_images']}: is {root} the data this store was made from?")  # fmt: skip
    expected, bound = predictor.calibration.false_positive_rate()
    return {
        "product": product, "version": ref.version, "family": predictor.family,
        "promoted": registry.best(product)["version"] == ref.version,
        "threshold": round(predictor.calibration.threshold, 4), "n_normal": predictor.calibration.n_normal,
        "expected_fpr": round(expected, 4), "fpr_95": round(bound, 4),
        "held_out": _rates(predictor, _rgb(held_out)),
        "test_good": _rates(predictor, _rgb(sorted((root / product / "test" / "good").glob("*.png")))),
        "fresh": _rates(predictor, fresh),
    }  # fmt: skip


def main(out_path: str, store: str, root: str, n_fresh: str, fresh_seed: str = "12345") -> None:
    root_path = Path(root)
    summary = json.loads((root_path / "demo_dataset.json").read_text())
    registry = Registry(store)
    for product in sorted(summary["products"]):
        rng = np.random.default_rng([int(fresh_seed), len(product)])
        texture = _texture(product)
        fresh = [_to_uint8(texture_patch(texture, summary["image_size"], rng)) for _ in range(int(n_fresh))]
        for version in registry.list_versions(product):
            write_row(out_path, {"store": store, **version_row(registry, root_path, product, version, fresh)})


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        raise SystemExit("usage: unseen_goods.py OUT STORE DATA_ROOT N_FRESH [FRESH_SEED]")
    main(*sys.argv[1:])
