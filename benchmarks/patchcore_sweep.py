"""PatchCore settings in one process on a real MVTec-style line (held-out split as benchmarks/recipe.py): image
score (max vs top-k mean), blur, pooling, strides, coreset size. Each line prints test image / pixel AUROC.

    python benchmarks/patchcore_sweep.py ROOT PRODUCT SIZE [base [SEED]]

``base`` runs only the preset settings (the input-size comparison); each line also prints the top-5 % mean.
``SEED`` (default 0) seeds the coreset's random projection and the patch pool's sampling.
"""

import dataclasses
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

torch.set_num_threads(2)
root, product, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = load_product(Path(root), product, size, 400, 10.0, Path(".tsdn/cache"))
held = np.arange(len(data["train"])) % HOLDOUT_EVERY == 0
train = _to_tensor(data["train"][~held])
test = _to_tensor(data["test"])
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
base = PatchCoreConfig(image_size=size, max_patches=40000, coreset_fraction=0.1, seed=seed)
only_base = sys.argv[4:5] == ["base"]
for changes in (
    ({},)
    if only_base
    else (
        {},
        {"score_sigma": 2.0},
        {"score_sigma": 8.0},
        {"pool": 5},
        {"reductions": (4, 8)},
        {"coreset_fraction": 0.25},
    )
):
    cfg = dataclasses.replace(base, **changes)
    torch.manual_seed(seed)
    m = PatchCore(cfg)
    t = time.perf_counter()
    m.fit(train.split(16))
    fit = time.perf_counter() - t
    maps = torch.cat([m.predict(b).anomaly_map for b in test.split(16)])
    for topk in (0.0, 0.001, 0.01, 0.05):
        scores = image_score(maps, topk).numpy()
        r = evaluate(data["test_labels"], scores, data["test_masks"], maps[:, 0].numpy())
        print(
            product,
            size,
            changes,
            f"seed {seed}",
            "topk",
            topk,
            f"img {r['image_auroc']:.3f} pix {r['pixel_auroc']:.3f} fit {fit:.1f}s",
            flush=True,
        )
