"""Which encoder strides PatchCore should match on: (8, 16), (4, 8) or (4, 8, 16), over seeds and image scores.

One process, no Ray, the held-out split of benchmarks/recipe.py (every 8th train image left out), the shipped
``tsdn.patchcore``. Each fit is scored with the map's maximum and the top-1 % and top-5 % means; every line is
appended to OUT as JSON.

    python benchmarks/patchcore_layers.py ROOT PRODUCT SIZE OUT SEEDS [CORESET]

``SEEDS`` is a comma list (``0,1,2``); ``CORESET`` the coreset fraction (default 0.1, the preset's).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, "benchmarks")
from recipe import HOLDOUT_EVERY, _to_tensor, load_product

from tsdn.metrics import evaluate
from tsdn.patchcore import PatchCore, PatchCoreConfig
from tsdn.scoring import image_score

STRIDES = ((8, 16), (4, 8), (4, 8, 16))
TOPKS = (0.0, 0.01, 0.05)


def main() -> None:
    torch.set_num_threads(2)
    root, product, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    seeds = [int(s) for s in sys.argv[5].split(",")]
    coreset = float(sys.argv[6]) if len(sys.argv) > 6 else 0.1
    data = load_product(Path(root), product, size, 400, 10.0, Path(".tsdn/cache"))
    held = np.arange(len(data["train"])) % HOLDOUT_EVERY == 0
    train, test = _to_tensor(data["train"][~held]), _to_tensor(data["test"])
    for reductions in STRIDES:
        for seed in seeds:
            cfg = PatchCoreConfig(
                image_size=size, max_patches=40000, coreset_fraction=coreset, seed=seed, reductions=reductions
            )
            torch.manual_seed(seed)
            model = PatchCore(cfg)
            started = time.perf_counter()
            model.fit(train.split(16))
            fit_s = time.perf_counter() - started
            started = time.perf_counter()
            maps = torch.cat([model.predict(batch).anomaly_map for batch in test.split(16)])
            score_s = time.perf_counter() - started
            for topk in TOPKS:
                scores = image_score(maps, topk).numpy()
                r = evaluate(data["test_labels"], scores, data["test_masks"], maps[:, 0].numpy())
                row = {
                    "product": product,
                    "size": size,
                    "reductions": reductions,
                    "seed": seed,
                    "topk": topk,
                    "coreset": coreset,
                    "img": round(r["image_auroc"], 4),
                    "pix": round(r["pixel_auroc"], 4),
                    "aupro": round(r["aupro"], 4),
                    "fit_s": round(fit_s, 1),
                    "score_s": round(score_s, 1),
                }
                print(json.dumps(row), flush=True)
                with open(out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
