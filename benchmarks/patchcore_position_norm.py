"""PatchCore's map standardised per position (``score_normalization: pixel``) against the map as it was.

On the demo textures PatchCore's nearest-bank distance is high along the image border and in the corners of
every image, good or not (the encoder's zero padding makes border patches unlike any other, and 35 training
images give few of them), and the image score (the top 1 % of the map) reads the border first: the holes on
brick light up, and good images still score as high. TSDN's map has the same layout effect and standardises it
away. PatchCore cannot read its own training images' maps (their patches are in the bank, their distances near
0), so the shipped fit maps each fold of the training images against a bank of the other folds
(:class:`tsdn.patchcore.PatchCoreConfig`'s ``normalization_folds``).

Fits the preset's ``patchcore`` section at ``--size`` twice on ``recipe.py``'s training split (every 8th image
held out, unused here), ``score_normalization`` ``none`` and ``pixel``, and appends one JSON row each (test image
and pixel AUROC) to ``--out``.

    python benchmarks/patchcore_position_norm.py --root .tsdn/demo/data --product brick --size 128 --config demo \\
        --out benchmarks/results/patchcore_position_norm.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import HOLDOUT_EVERY, _to_tensor, load_product

from tsdn.metrics import evaluate
from tsdn.patchcore import PatchCore
from tsdn.scoring import image_score
from tsdn_platform.cli import image_size_arg
from tsdn_platform.config import load_config
from tsdn_platform.train import TrainConfig


def maps_of(model: PatchCore, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.predict(batch).anomaly_map for batch in images.split(16)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--product", required=True)
    parser.add_argument("--size", type=image_size_arg, required=True, help="S or HxW")
    parser.add_argument("--config", default="patchcore", help="preset whose patchcore section is used")
    parser.add_argument(
        "--seed", type=int, default=None, help="the fit's seed (pool, projection, coreset); default the preset's"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(TrainConfig, args.config, ["store=unused", "dataset=unused"]).patchcore
    cfg = dataclasses.replace(cfg, image_size=args.size, seed=cfg.seed if args.seed is None else args.seed)
    data = load_product(Path(args.root), args.product, args.size, 400, 10.0, Path(".tsdn/cache"))
    held = np.arange(len(data["train"])) % HOLDOUT_EVERY == 0
    train, test = _to_tensor(data["train"][~held]), _to_tensor(data["test"])

    for normalization in ("none", "pixel"):
        torch.manual_seed(cfg.seed)
        model = PatchCore(dataclasses.replace(cfg, score_normalization=normalization))
        started = time.perf_counter()
        fit = model.fit(train.split(16))
        fit_s = time.perf_counter() - started
        maps = maps_of(model, test)
        scores = image_score(maps, cfg.score_topk).numpy()
        result = evaluate(data["test_labels"], scores, data["test_masks"], maps[:, 0].numpy())
        row = {
            "product": args.product,
            "size": args.size,
            "config": args.config,
            "seed": model.cfg.seed,
            "score_normalization": normalization,
            "folds": model.cfg.normalization_folds,
            "fit_s": round(fit_s, 1),
            "normal_images": fit.get("normal_images", 0),
            "image_auroc": round(float(result["image_auroc"]), 4),
            "pixel_auroc": round(float(result["pixel_auroc"]), 4),
            "n_train": len(train),
            "n_test_good": int((data["test_labels"] == 0).sum()),
        }
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as out:
                out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
