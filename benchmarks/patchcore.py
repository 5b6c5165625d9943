"""A PatchCore-style feature-matching baseline (Roth et al., "Towards Total Recall in Industrial Anomaly Detection").

The idea, reduced to what the accuracy benchmark needs for a fixed-budget comparison with TSDN on the same
backbone: pretrained patch features of the normal training images form a memory bank; a test patch is as
anomalous as its distance to the nearest bank entry. Nothing is trained.

- Features: two middle stages of the encoder (by default the stride-8 and stride-16 stages of Lite0),
  each locally averaged over a ``pool`` x ``pool`` neighbourhood (the "locally aware patch features"),
  the coarser stage upsampled to the finer stage's grid, concatenated along channels.
- Memory bank: every training patch, optionally a seeded random subset of a fraction of them. The paper's
  greedy coreset is replaced by uniform random sampling: simpler and cheaper, and at the sizes used here
  (a few thousand patches per product) the whole bank fits anyway.
- Score map: for each test patch the minimum L2 distance to the bank, computed in chunks so that at most
  ``query_chunk x bank_chunk`` distances exist at once; bilinearly upsampled to the input size and
  Gaussian-blurred. Image score: the maximum of the map.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tsdn.backbone import normalization
from tsdn.metrics import evaluate
from tsdn.scoring import gaussian_kernel_size

__all__ = [
    "PatchCore",
    "PatchCoreConfig",
    "PatchCorePrediction",
    "nearest_distance",
    "random_coreset",
    "run_patchcore",
]


@dataclass(frozen=True)
class PatchCoreConfig:
    """Settings of the baseline; the defaults are the ones the accuracy benchmark compares with TSDN."""

    backbone: str = "tf_efficientnet_lite0"
    weights: str = "package:efficientnet-lite0"
    reductions: tuple[int, ...] = (8, 16)
    pool: int = 3
    coreset_fraction: float = 1.0
    sigma: float = 4.0
    query_chunk: int = 2048
    bank_chunk: int = 16384
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.coreset_fraction <= 1.0:
            msg = f"PatchCoreConfig.coreset_fraction: must lie in (0, 1], got {self.coreset_fraction}"
            raise ValueError(msg)
        if self.pool < 1 or self.pool % 2 == 0:
            msg = f"PatchCoreConfig.pool: must be an odd number >= 1, got {self.pool}"
            raise ValueError(msg)
        if not self.reductions:
            msg = "PatchCoreConfig.reductions: name at least one encoder stride"
            raise ValueError(msg)


class PatchCorePrediction(NamedTuple):
    """anomaly_map: (B, 1, H, W) float, blurred nearest-neighbour distance; anomaly_score: (B,) its maximum."""

    anomaly_map: torch.Tensor
    anomaly_score: torch.Tensor


def nearest_distance(
    queries: torch.Tensor, bank: torch.Tensor, query_chunk: int = 2048, bank_chunk: int = 16384
) -> torch.Tensor:
    """Euclidean distance from every query to its nearest bank row, in blocks.

    Args:
        queries: (N, D) float.
        bank: (M, D) float, M >= 1.
        query_chunk, bank_chunk: block sizes; at most ``query_chunk x bank_chunk`` distances exist at once.

    Returns:
        (N,) float, ``min_j ||queries[i] - bank[j]||``.
    """
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        msg = f"nearest_distance: expected (N, D) and (M, D), got {tuple(queries.shape)} and {tuple(bank.shape)}"
        raise ValueError(msg)
    if bank.shape[0] == 0:
        msg = "nearest_distance: the memory bank is empty (fit on at least one image first)"
        raise ValueError(msg)
    if query_chunk < 1 or bank_chunk < 1:
        msg = f"nearest_distance: chunk sizes must be >= 1, got {query_chunk} and {bank_chunk}"
        raise ValueError(msg)
    out = torch.empty(queries.shape[0], dtype=queries.dtype, device=queries.device)
    for start in range(0, queries.shape[0], query_chunk):
        block = queries[start : start + query_chunk]
        best = torch.full((block.shape[0],), math.inf, dtype=queries.dtype, device=queries.device)
        for bank_start in range(0, bank.shape[0], bank_chunk):
            dist = torch.cdist(block, bank[bank_start : bank_start + bank_chunk])
            best = torch.minimum(best, dist.amin(dim=1))
        out[start : start + block.shape[0]] = best
    return out


def random_coreset(patches: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A seeded uniform random subset of ``ceil(fraction * N)`` rows of ``patches`` (N, D), in their original order."""
    if not 0.0 < fraction <= 1.0:
        msg = f"random_coreset: fraction must lie in (0, 1], got {fraction}"
        raise ValueError(msg)
    n = patches.shape[0]
    keep = max(1, math.ceil(fraction * n)) if n else 0
    if keep == n:
        return patches
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=generator)[:keep].sort().values
    return patches[idx.to(patches.device)]


class PatchCore(nn.Module):
    """Nearest-neighbour patch-feature anomaly detector on a frozen ``features_only`` timm encoder.

    Shape:
        - images: (B, 3, H, W) float in [0, 1] (normalised inside with the encoder's pretrained mean/std)
        - :meth:`embed`: (B, D, H / r0, W / r0), D = sum of the chosen stages' channels, r0 = min(reductions)
        - :meth:`predict`: anomaly_map (B, 1, H, W), anomaly_score (B,)
    """

    def __init__(self, encoder: nn.Module, cfg: PatchCoreConfig) -> None:
        super().__init__()
        reductions = list(encoder.feature_info.reduction())
        missing = [r for r in cfg.reductions if r not in reductions]
        if missing:
            msg = f"PatchCore: encoder has no stage with stride {missing}; strides available: {reductions}"
            raise ValueError(msg)
        self.encoder = encoder.eval().requires_grad_(False)
        self.cfg = cfg
        self.stages = [reductions.index(r) for r in cfg.reductions]
        mean, std = normalization(encoder)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("bank", torch.empty(0, 0), persistent=False)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> locally aware patch features (B, D, H / r0, W / r0)."""
        features = self.encoder((images - self.mean) / self.std)
        chosen = [features[i] for i in self.stages]
        grid = chosen[int(np.argmin(self.cfg.reductions))].shape[-2:]
        pad = self.cfg.pool // 2
        pooled = [F.avg_pool2d(f, self.cfg.pool, stride=1, padding=pad, count_include_pad=False) for f in chosen]
        aligned = [p if p.shape[-2:] == grid else F.interpolate(p, size=grid, mode="bilinear") for p in pooled]
        return torch.cat(aligned, dim=1)

    @torch.inference_mode()
    def fit(self, batches: Iterable[torch.Tensor]) -> PatchCore:
        """Build the memory bank from normal images, given as (B, 3, H, W) batches in [0, 1]."""
        patches = []
        for images in batches:
            emb = self.embed(images)
            patches.append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))
        if not patches:
            msg = "PatchCore.fit: no training images"
            raise ValueError(msg)
        self.bank = random_coreset(torch.cat(patches), self.cfg.coreset_fraction, self.cfg.seed)
        return self

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> PatchCorePrediction:
        """(B, 3, H, W) in [0, 1] -> blurred nearest-neighbour distance map at the input size and its maximum."""
        emb = self.embed(images)
        batch, dim, height, width = emb.shape
        queries = emb.permute(0, 2, 3, 1).reshape(-1, dim)
        dist = nearest_distance(queries, self.bank, self.cfg.query_chunk, self.cfg.bank_chunk)
        grid = dist.reshape(batch, 1, height, width)
        full = F.interpolate(grid, size=images.shape[-2:], mode="bilinear")
        if self.cfg.sigma > 0:
            # The same blur as TSDN's score map (tsdn.scoring.score_map), so the two maps are smoothed alike.
            size = min(gaussian_kernel_size(self.cfg.sigma), 2 * min(full.shape[-2:]) - 1)
            full = kornia.filters.gaussian_blur2d(
                full, (size, size), (self.cfg.sigma, self.cfg.sigma), border_type="reflect"
            )
        return PatchCorePrediction(anomaly_map=full, anomaly_score=full.amax(dim=(1, 2, 3)))


def _batches(images: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size]


def run_patchcore(
    model: PatchCore,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    labels: Sequence[int],
    masks: np.ndarray,
) -> dict[str, float]:
    """Fit on ``train_images``, score ``test_images``, evaluate; with wall times and throughput.

    Args:
        model: an unfitted :class:`PatchCore`.
        train_images: (N, 3, H, W) float in [0, 1], normal images only.
        test_images: (T, 3, H, W) float in [0, 1].
        labels: T image labels (0 normal, 1 anomalous).
        masks: (T, H, W) ground-truth masks in {0, 1}.

    Returns:
        The metrics of :func:`tsdn.metrics.evaluate` plus ``fit_s``, ``score_s``, ``score_images_per_s``, ``bank_size``.
    """
    batch_size = model.cfg.batch_size
    start = time.perf_counter()
    model.fit(_batches(train_images, batch_size))
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    preds = [model.predict(b) for b in _batches(test_images, batch_size)]
    score_s = time.perf_counter() - start
    maps = torch.cat([p.anomaly_map for p in preds])[:, 0].numpy()
    scores = torch.cat([p.anomaly_score for p in preds]).numpy()
    metrics = dict(evaluate(np.asarray(labels), scores, masks, maps))
    metrics.update(
        fit_s=fit_s,
        score_s=score_s,
        score_images_per_s=test_images.shape[0] / score_s,
        bank_size=int(model.bank.shape[0]),
    )
    return metrics
