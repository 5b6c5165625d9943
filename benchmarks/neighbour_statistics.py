"""Per-position statistics fitted on each position's neighbourhood: do they tolerate parts that move?

The `cpu` preset's whitening fits a Gaussian of the residual ``f_I - f_R`` per grid position from the normal
training images at that position. A part that moves by a cell between images spreads its features over the
neighbouring positions, which those Gaussians never saw (BENCHMARKS.md, "A line whose parts are not shot in one
pose"). Here each position's Gaussian is fitted, post hoc on saved weights, on the residuals of the positions within
``k`` cells of it (the training residuals shifted by -k..k cells in y and x, the border repeated): k = 0 is the
shipped fit. For each k, the blend per stage is chosen on the held-out normals as the shipped ``auto`` chooses it,
the map is standardised per position by the training images' maps, and the image score is the map's maximum over
every compared stage (``whitening_selection.py``'s scoring). One JSON row per (model, k).

    python benchmarks/neighbour_statistics.py OUT MODEL.pt ROOT PRODUCT [K,K,...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_probe import write_row
from position_whitening import map_metrics
from whitening_selection import BLENDS, distances, gaussian, held_out_nll, split_residuals, stage_map
from whitening_variants import standardise

from tsdn.resize import input_shape


def neighbourhood(values: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, h, w) -> (N * (2k + 1)^2, C, h, w): every image shifted by -k..k cells in y and x, border repeated."""
    if k == 0:
        return values
    padded = F.pad(values, (k, k, k, k), mode="replicate")
    h, w = values.shape[2:]
    return torch.cat(
        [padded[:, :, k + dy : k + dy + h, k + dx : k + dx + w] for dy in range(-k, k + 1) for dx in range(-k, k + 1)]
    )


def main(out_path: str, model_path: str, root: str, product: str, ks: str = "0,1") -> None:
    torch.set_num_threads(2)
    model, data, _, seed, val, splits = split_residuals(model_path, root, product)
    cfg = model.cfg
    shape = input_shape(cfg.image_size)
    stages = model.feature_stages
    fit = splits["fit"]
    for k in (int(v) for v in ks.split(",")):
        chosen, maps = {}, {}
        for s in stages:
            pooled = neighbourhood(fit[s], k)
            best = None
            for blend in BLENDS:
                mean, cov = gaussian(pooled, blend, cfg.feature_shrinkage)
                nll = held_out_nll(*distances(splits["held"][s], mean, cov))
                if best is None or nll < best[0]:
                    best = (nll, blend, mean, cov)
            _, chosen[s], mean, cov = best
            maps[s] = {
                split: stage_map(distances(res[s], mean, cov)[0], res[s].shape[1], shape)
                for split, res in splits.items()
            }
        averaged = {split: sum(maps[s][split] for s in stages) / len(stages) for split in splits}
        test = standardise(averaged["test"], averaged["fit"], cfg.score_sigma)
        held_out = standardise(averaged["val"], averaged["fit"], cfg.score_sigma)
        row = {
            "model": model_path,
            "product": product,
            "seed": seed,
            "k": k,
            "blends": {str(s): chosen[s] for s in stages},
        }
        write_row(out_path, {**row, **map_metrics(data, val, test, held_out)})
        print(row, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:6])
