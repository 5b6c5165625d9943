"""Maps averaged over mirror images (``test_flips``), post hoc on saved TSDN weights, and how to tell from held-out
normals alone whether a product line's mirror images are normal images.

For every ``test_flips`` setting (1, 2, 4) a model of that config takes the saved weights, fits its statistics with
:meth:`tsdn.model.TSDN.fit_normal_stats` on the training images and scores with ``predict``, as the platform does
after training. Reports the test image / pixel AUROC and the held-out validation's image AUROC (``recipe.py``'s
split and set).

Then, on the held-out normal images only (no defect, no test label), two candidate statistics per mirror view
(left-right, up-down, both), each the fraction of held-out normals whose mirror image scores above the image itself:

- ``raw``: the score source's map before the per-position standardisation (what a fit step can read before the
  per-position statistics exist);
- ``standardised``: the map ``predict`` scores with ``test_flips: 1`` (standardised per position by the training
  images' maps): on a part shot in one pose a mirror image puts its structure where the statistics expect other.

About 0.5 where a mirror image is as normal as the image, near 1 where it is not. For the raw map also the
geometric mean of the mirrored score over the image's own (``ratio``). One JSON row per (model, setting) and one per
model with the statistics are appended to OUT.

    python benchmarks/flip_views.py OUT MODEL.pt ROOT PRODUCT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_probe import write_row
from position_whitening import map_metrics
from recipe import _to_tensor, load_saved_run, refit

from tsdn.config import TEST_FLIPS
from tsdn.model import TSDN
from tsdn.scoring import image_score

VIEWS = {"left-right": (3,), "up-down": (2,), "both": (2, 3)}


@torch.no_grad()
def scores(model: TSDN, images: torch.Tensor, standardised: bool) -> torch.Tensor:
    out = []
    for batch in images.split(16):
        raw = model.component_maps(batch)[model.cfg.score_source]
        out.append(image_score(model.normalize_map(raw) if standardised else raw, model.cfg.score_topk))
    return torch.cat(out)


def main(out_path: str, model_path: str, root: str, product: str) -> None:
    torch.set_num_threads(2)
    model, data, held, seed, val = load_saved_run(model_path, root, product)
    train = _to_tensor(data["train"][~held])
    normals = _to_tensor(data["train"][held])
    row = {"model": model_path, "product": product, "seed": seed}
    for flips in TEST_FLIPS:
        fitted = refit(model, train, normals, test_flips=flips)
        with torch.no_grad():
            test = torch.cat([fitted.predict(b).anomaly_map for b in _to_tensor(data["test"]).split(16)])
            held_out = torch.cat([fitted.predict(b).anomaly_map for b in _to_tensor(val.images).split(16)])
        write_row(out_path, {**row, "test_flips": flips, **map_metrics(data, val, test, held_out)})
    single = refit(model, train, normals, test_flips=1)
    statistics: dict[str, float] = {}
    for kind, standardised in (("raw", False), ("standardised", True)):
        own = scores(single, normals, standardised)
        for view, dims in VIEWS.items():
            mirrored = scores(single, normals.flip(dims), standardised)
            statistics[f"{kind} {view}"] = round(float((mirrored > own).float().mean()), 3)
            if not standardised:  # a standardised score can be negative: no ratio
                statistics[f"{kind} {view} ratio"] = round(float((mirrored.log() - own.log()).mean().exp()), 3)
    write_row(out_path, {**row, "held_out_normals": len(normals), "above_own": statistics})


if __name__ == "__main__":
    main(*sys.argv[1:5])
