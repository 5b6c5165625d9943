"""The PatchCore family beside ``recipe.py``'s TSDN runs: the same cached arrays, the same training split.

Fits :class:`tsdn.patchcore.PatchCore` (the ``patchcore`` section of a preset, at ``--size``, S or HxW) on the
train images ``recipe.py`` trains on (every 8th held out), scores the test split with
``benchmarks/patchcore.py``'s ``run_patchcore`` and appends one JSON row to ``--out``; the baseline a TSDN row
of the same product and size is read against.

    python benchmarks/patchcore_recipe.py --root ../shared/data/kolektor --product kolektor --size 320x128 \\
        --out benchmarks/results/recipe/patchcore_recipe.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patchcore import run_patchcore
from recipe import HOLDOUT_EVERY, _to_tensor, load_product

from tsdn.patchcore import PatchCore
from tsdn_platform.cli import image_size_arg
from tsdn_platform.config import load_config
from tsdn_platform.train import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--product", required=True)
    parser.add_argument("--size", type=image_size_arg, required=True, help="S or HxW (e.g. 320x128)")
    parser.add_argument("--config", default="patchcore", help="preset whose patchcore section is used")
    parser.add_argument("--cache", default=".tsdn/cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config(TrainConfig, args.config, ["store=unused", "dataset=unused"])
    # the family's config is square; its model is fully convolutional, so an (H, W) batch is scored at (H, W)
    cfg = base.patchcore
    slic = (base.model.n_segments, base.model.slic_compactness)  # recipe.py's cache name: the TSDN runs' arrays
    data = load_product(Path(args.root), args.product, args.size, *slic, Path(args.cache))
    held = np.arange(len(data["train"])) % HOLDOUT_EVERY == 0
    torch.manual_seed(0)
    model = PatchCore(dataclasses.replace(cfg, image_size=min(data["train"].shape[1:3])))
    result = run_patchcore(
        model, _to_tensor(data["train"][~held]), _to_tensor(data["test"]), data["test_labels"], data["test_masks"]
    )
    row = {"product": args.product, "size": args.size, "config": args.config, **result}
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
