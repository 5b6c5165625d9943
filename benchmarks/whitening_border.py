"""Where the whitened feature map lights up on normal images: its mean over the training images in a 12 px
border band against the interior, for the cosine and the whitened (Mahalanobis) distance, on saved models.

    python benchmarks/whitening_border.py    # brick seed 0 and kolektor seed 0 of benchmarks/score_variants.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import HOLDOUT_EVERY, _to_tensor, load_product

from tsdn.config import TSDNConfig
from tsdn.model import TSDN

MODELS = (
    (".tsdn/models/brick-noskip6-s0.pt", ".tsdn/demo/data", "brick"),
    (".tsdn/models/kolektor-noskip10-s0.pt", "../shared/data/kolektor", "kolektor"),
)
BAND = 12


def main() -> None:
    torch.set_num_threads(1)
    for path, root, product in MODELS:
        saved = torch.load(path, weights_only=False)
        for distance in ("cosine", "mahalanobis"):
            cfg = TSDNConfig(**saved["config"])
            cfg = dataclasses.replace(cfg, feature_distance=distance, score_normalization="none")
            model = TSDN(cfg)
            model.load_state_dict(saved["state_dict"], strict=False)  # the saved cosine model has no whitening
            model.eval()
            cache = Path(".tsdn/cache")
            data = load_product(Path(root), product, cfg.image_size, cfg.n_segments, cfg.slic_compactness, cache)
            held = np.arange(len(data["train"])) % HOLDOUT_EVERY == 0
            batches = _to_tensor(data["train"][~held]).split(16)
            with torch.no_grad():
                if distance == "mahalanobis":
                    model.fit_normal_stats(batches)
                mean_map = torch.cat([model.component_maps(b)["feature"] for b in batches]).mean(0)[0]
            band = torch.ones_like(mean_map, dtype=torch.bool)
            band[BAND:-BAND, BAND:-BAND] = False
            ratio = float(mean_map[band].mean() / mean_map[~band].mean())
            print(f"{product} {distance}: border / interior mean of the normal training maps {ratio:.3f}")


if __name__ == "__main__":
    main()
