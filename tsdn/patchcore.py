"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection"): the second model family.

Nothing is trained. Locally aware patch features of normal images form a memory bank; a test patch is as
anomalous as its distance to the nearest bank entry.

- Features: two middle stages of a frozen ``features_only`` timm encoder (by default strides 8 and 16), each
  averaged over a ``pool`` x ``pool`` neighbourhood, the coarser upsampled to the finer grid, concatenated.
- Fit (:meth:`PatchCore.fit`): the patches of the normal images, never more than ``max_patches`` at once
  (each batch's patches are subsampled so that the pool is a uniform sample of every patch seen), then a
  greedy k-center coreset (:func:`greedy_coreset`, on a random projection to ``projection_dim`` dimensions
  as in the paper) down to ``coreset_fraction`` of them, at most ``coreset_max``. The bank is a buffer saved
  with the weights (``bank_dtype`` float16 halves it).
- Score map: the nearest-bank distance per patch (:func:`nearest_distance`, in chunks: at most
  ``query_chunk x bank_chunk`` distances exist at once), bilinearly upsampled to the input size, blurred like
  TSDN's map; image score = its maximum (or a top-k mean).
- ``score_normalization: pixel`` standardises the map per position, as TSDN's switch of the same name does, by
  the maps of normal training images. A training image's patches are in the bank (its distances are near 0), so
  the fit splits the images into ``normalization_folds`` folds and maps each fold's images against a bank built
  from the other folds (the same pooling and coreset); the statistics come from at most ``normalization_images``
  of those maps. The border of every image scores high against a bank of a few dozen textured images (the
  encoder's padding), and this takes it out (``BENCHMARKS.md``, "PatchCore's map standardised per position").

The model answers the same interface as :class:`tsdn.model.TSDN` (``cfg.image_size``, ``predict``,
``fit_score_scales``, ``mean``/``std``), so :class:`tsdn.predict.Predictor`, calibration, batch scoring,
serving and the checkpoint format serve both families without branching.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tsdn import config_io
from tsdn.backbone import Opener, check_input, create_encoder, normalization
from tsdn.model import moments_from_sums
from tsdn.resize import input_shape, parse_image_size
from tsdn.scoring import blur_map, image_score, position_std, standardize_map

__all__ = [
    "PatchCore",
    "PatchCoreConfig",
    "PatchCorePrediction",
    "greedy_coreset",
    "nearest_distance",
    "row_distance",
]


@dataclass(frozen=True)
class PatchCoreConfig:
    """Settings of one PatchCore model.

    Attributes:
        image_size: side S of the square input, or [H, W] for a line shot at another aspect (each a multiple of
            32; the bank is a set of patches, so nothing else depends on the shape).
        backbone, weights: the frozen encoder (timm name, weights spec of :func:`tsdn.backbone.resolve_weights`).
        reductions: encoder strides whose features are concatenated (the paper: the two middle stages).
        pool: side of the local averaging ("locally aware" features), odd.
        coreset_fraction: fraction of the pooled patches the greedy coreset keeps (the paper: 1-10 %).
        coreset_max: upper bound on the bank's rows.
        projection_dim: dimensions of the random projection the coreset selection runs on (0 = none).
        max_patches: patches held at once while fitting (the fit's memory bound).
        bank_dtype: ``float16`` or ``float32`` storage of the bank (distances are computed in float32).
        score_sigma: blur of the map in pixels at S x S (as TSDN's ``score_sigma``).
        score_topk: image score = mean of the top fraction of the map; 0 = its maximum.
        score_normalization: ``none`` or ``pixel``: the map standardised per position by the mean and standard
            deviation (its variance blurred with ``score_sigma``) of normal training images' maps, each from a
            bank that did not see it (see the module's docstring).
        normalization_folds: the folds of the training images for ``pixel`` (>= 2): a fold's maps come from a
            bank of the others, so the fit selects ``normalization_folds + 1`` coresets.
        normalization_images: at most this many training images' maps give the ``pixel`` statistics (their
            patches are kept until the fold banks exist: the fit's memory grows with it).
        query_chunk, bank_chunk: block sizes of the nearest-neighbour search.
        seed: the patch subsampling, the projection and the coreset's first centre.
    """

    image_size: int | tuple[int, int] = 224
    backbone: str = "tf_efficientnet_lite0"
    weights: str = "package:efficientnet-lite0"
    reductions: tuple[int, ...] = (8, 16)
    pool: int = 3
    coreset_fraction: float = 0.1
    coreset_max: int = 20000
    projection_dim: int = 128
    max_patches: int = 100_000
    bank_dtype: Literal["float16", "float32"] = "float16"
    score_sigma: float = 4.0
    score_topk: float = 0.0
    score_normalization: Literal["none", "pixel"] = "none"
    normalization_folds: int = 3
    normalization_images: int = 120
    query_chunk: int = 4096
    bank_chunk: int = 8192
    seed: int = 0

    def __post_init__(self) -> None:
        image_size, sides = parse_image_size(self.image_size)
        object.__setattr__(self, "image_size", image_size)
        size_ok = sides is not None and all(side >= 32 and side % 32 == 0 for side in sides)
        checks = (
            (size_ok, "image_size", "S or [H, W], each a multiple of 32"),
            (bool(self.backbone.strip()), "backbone", "a timm model name"),
            (bool(self.weights.strip()), "weights", "a weights spec"),
            (len(self.reductions) >= 1, "reductions", "at least one encoder stride"),
            (self.pool >= 1 and self.pool % 2 == 1, "pool", "odd, >= 1"),
            (0 < self.coreset_fraction <= 1, "coreset_fraction", "in (0, 1]"),
            (self.coreset_max >= 1, "coreset_max", ">= 1"),
            (self.projection_dim >= 0, "projection_dim", ">= 0 (0 = no projection)"),
            (self.max_patches >= 1, "max_patches", ">= 1"),
            (self.bank_dtype in ("float16", "float32"), "bank_dtype", "float16 | float32"),
            (self.score_sigma >= 0, "score_sigma", ">= 0"),
            (0 <= self.score_topk < 1, "score_topk", "in [0, 1)"),
            (self.score_normalization in ("none", "pixel"), "score_normalization", "none | pixel"),
            (self.normalization_folds >= 2, "normalization_folds", ">= 2"),
            (self.normalization_images >= 2, "normalization_images", ">= 2"),
            (self.query_chunk >= 1 and self.bank_chunk >= 1, "query_chunk", "chunks >= 1"),
        )
        for ok, name, expected in checks:
            config_io.check(self, ok, name, expected)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-safe dict of every field."""
        return config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PatchCoreConfig:
        """Strict inverse of :meth:`to_dict`."""
        return config_io.from_dict(cls, data)

    @property
    def input_shape(self) -> tuple[int, int]:
        """(H, W) of the network input: (S, S) for ``image_size: S`` (as ``TSDNConfig.input_shape``)."""
        return input_shape(self.image_size)


class PatchCorePrediction(NamedTuple):
    """Inference result.

    Attributes:
        anomaly_map: (B, 1, H, W) blurred nearest-bank distance at the input size.
        anomaly_score: (B,) each map's maximum (or top-k mean).
    """

    anomaly_map: torch.Tensor
    anomaly_score: torch.Tensor


def nearest_distance(
    queries: torch.Tensor,
    bank: torch.Tensor,
    query_chunk: int = 4096,
    bank_chunk: int = 8192,
    backend: Literal["auto", "torch", "faiss"] = "auto",
) -> torch.Tensor:
    """Euclidean distance from every query to its nearest bank row, in blocks.

    Two implementations of one function: chunked ``torch.cdist`` (any device, traceable, exportable) and
    faiss-cpu's exact flat search (``faiss.knn``), 1.4-2.1x faster on one CPU thread for banks of 2k-40k rows
    (``benchmarks/nn_search.py``, BENCHMARKS.md). ``"auto"`` takes faiss for CPU tensors when the optional
    ``faiss-cpu`` package is installed and the call is not being traced or compiled (ONNX export, torch.compile),
    torch otherwise. Both search with ``|q|^2 - 2 q.b + |b|^2`` (cdist's matrix-product path, faiss's), which
    loses small distances to cancellation (an error of about ``sqrt(eps) |q|``, 1e-3 on Lite0 features); so
    each returns the distance to the row it found computed directly, ``||q - b||``, and the searches (and the
    exported graph, :mod:`tsdn.export`) then agree to float rounding of that one difference wherever they find
    the same row, and within the search's rounding where two rows tie.

    Args:
        queries: (N, D) float.
        bank: (M, D), M >= 1 (any float dtype; blocks are computed in the queries' dtype, faiss in float32).
        query_chunk, bank_chunk: block sizes; at most ``query_chunk x bank_chunk`` distances exist at once
            (faiss blocks its own search the same way over ``query_chunk`` queries at a time).
        backend: ``"auto"``, ``"torch"`` or ``"faiss"`` (an error when faiss is not installed).

    Returns:
        (N,) ``min_j ||queries[i] - bank[j]||``.
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
    if backend not in ("auto", "torch", "faiss"):
        msg = f"nearest_distance: backend {backend!r} is not 'auto', 'torch' or 'faiss'"
        raise ValueError(msg)
    faiss = _faiss() if backend != "torch" else None
    if backend == "faiss" and faiss is None:
        msg = "nearest_distance: backend 'faiss' needs the faiss-cpu package (pip install faiss-cpu)"
        raise ValueError(msg)
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    if faiss is not None and queries.device.type == "cpu" and bank.device.type == "cpu" and not tracing:
        return _faiss_nearest(faiss, queries, bank, query_chunk)
    out = torch.empty(queries.shape[0], dtype=queries.dtype, device=queries.device)
    for start in range(0, queries.shape[0], query_chunk):
        block = queries[start : start + query_chunk]
        best = torch.full((block.shape[0],), math.inf, dtype=queries.dtype, device=queries.device)
        index = torch.zeros(block.shape[0], dtype=torch.int64, device=queries.device)
        for bank_start in range(0, bank.shape[0], bank_chunk):
            rows = bank[bank_start : bank_start + bank_chunk].to(queries.dtype)
            value, found = torch.cdist(block, rows).min(dim=1)
            closer = value < best
            best = torch.where(closer, value, best)
            index = torch.where(closer, found + bank_start, index)
        out[start : start + block.shape[0]] = row_distance(block, bank, index)
    return out


def row_distance(queries: torch.Tensor, bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``||queries[..., i, :] - bank[index[..., i]]||`` computed directly: (..., D), (M, D), (...) -> (...)."""
    return (queries - bank[index].to(queries.dtype)).pow(2).sum(dim=-1).sqrt()


def _faiss() -> Any:
    """The faiss module, or None where the optional ``faiss-cpu`` package is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_nearest(faiss: Any, queries: torch.Tensor, bank: torch.Tensor, query_chunk: int) -> torch.Tensor:
    base = np.ascontiguousarray(bank.detach().numpy(), dtype=np.float32)
    parts = []
    for start in range(0, queries.shape[0], query_chunk):
        block = np.ascontiguousarray(queries[start : start + query_chunk].detach().numpy(), dtype=np.float32)
        _, index = faiss.knn(block, base, 1)
        parts.append(index[:, 0])
    index = torch.from_numpy(np.concatenate(parts).astype(np.int64))
    return row_distance(queries, bank, index)


def greedy_coreset(patches: torch.Tensor, n: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` rows of ``patches`` (N, D) chosen by greedy k-center selection (Sener & Savarese).

    Each step adds the row farthest from those chosen so far, so the chosen rows cover the set with the
    smallest worst-case distance a greedy pass finds. As in PatchCore, distances are computed on a Gaussian
    random projection to ``projection_dim`` dimensions (Johnson-Lindenstrauss; 0 = the raw features), and the
    first centre is a seeded random row.

    Returns:
        (min(n, N),) int64 indices in selection order.
    """
    total = patches.shape[0]
    n = min(int(n), total)
    if n <= 0:
        return torch.empty(0, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    points = patches.float()
    if 0 < projection_dim < points.shape[1]:
        projection = torch.randn(points.shape[1], projection_dim, generator=generator) / math.sqrt(projection_dim)
        points = points @ projection.to(points.device)
    chosen = torch.empty(n, dtype=torch.int64)
    current = int(torch.randint(total, (1,), generator=generator))
    distance = torch.full((total,), math.inf, device=points.device)
    norms = points.square().sum(dim=1)
    step = torch.empty_like(distance)
    for i in range(n):
        chosen[i] = current
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one matrix-vector product, no (N, D) temporary per step
        torch.mv(points, points[current], out=step)
        step.mul_(-2.0).add_(norms).add_(norms[current])
        torch.minimum(distance, step, out=distance)
        current = int(distance.argmax())
    return chosen


class PatchCore(nn.Module):
    """Nearest-neighbour patch-feature anomaly detector on a frozen ``features_only`` timm encoder.

    Args:
        cfg: the settings.
        opener: ``opener(uri) -> bytes`` for a weights spec that is a URI.

    Shape:
        - images: (B, 3, H, W) float in [0, 1] (normalised inside with the encoder's pretrained mean/std)
        - :meth:`embed`: (B, D, H / r0, W / r0), D = sum of the chosen stages' channels, r0 = min(reductions)
        - :meth:`predict`: anomaly_map (B, 1, H, W), anomaly_score (B,)
    """

    FAMILY = "patchcore"

    def __init__(self, cfg: PatchCoreConfig, opener: Opener | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        encoder = create_encoder(cfg.backbone, cfg.weights, opener)
        reductions = list(encoder.feature_info.reduction())
        missing = [r for r in cfg.reductions if r not in reductions]
        if missing:
            msg = f"PatchCore: encoder has no stage with stride {missing}; strides available: {reductions}"
            raise ValueError(msg)
        self.encoder = encoder.eval().requires_grad_(False)
        self.stages = [reductions.index(r) for r in cfg.reductions]
        self.finest = self.stages[int(np.argmin(cfg.reductions))]
        self.stride = max(reductions)
        mean, std = normalization(encoder)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("bank", torch.empty(0, sum(encoder.feature_info.channels()[i] for i in self.stages)))
        self._normal_stats_ready = False
        if cfg.score_normalization == "pixel":
            height, width = cfg.input_shape
            self.register_buffer("normal_mean", torch.zeros(1, 1, height, width))
            self.register_buffer("normal_std", torch.ones(1, 1, height, width))
            self.register_buffer("normal_count", torch.zeros((), dtype=torch.int64))
            self.register_load_state_dict_post_hook(_after_load)

    def train(self, mode: bool = True) -> PatchCore:
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm keeps the pretrained statistics
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The bank's size is set by the fit: take the saved one's shape and dtype before the strict copy.
        saved = state_dict.get(prefix + "bank")
        if saved is not None:
            self.bank = torch.empty_like(saved, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> locally aware patch features (B, D, H / r0, W / r0)."""
        self._check_input(images)
        features = self.encoder((images - self.mean) / self.std)
        grid = features[self.finest].shape[-2:]
        pad = self.cfg.pool // 2
        parts = []
        for i in self.stages:
            pooled = F.avg_pool2d(features[i], self.cfg.pool, stride=1, padding=pad, count_include_pad=False)
            parts.append(pooled if pooled.shape[-2:] == grid else F.interpolate(pooled, size=grid, mode="bilinear"))
        return torch.cat(parts, dim=1)

    @torch.inference_mode()
    def fit(self, batches: Iterable[torch.Tensor]) -> dict[str, int]:
        """Build the bank from normal images given as (B, 3, S, S) batches in [0, 1] (see :meth:`fit_patches`)."""

        def patches() -> Iterator[torch.Tensor]:
            for images in batches:
                emb = self.embed(images)
                yield emb.permute(0, 2, 3, 1).reshape(images.shape[0], -1, emb.shape[1])

        return self.fit_patches(patches())

    @torch.inference_mode()
    def fit_patches(self, batches: Iterable[torch.Tensor]) -> dict[str, int]:
        """Build the bank from per-image patch features, (B, P, D) batches (what :meth:`embed` gives, flattened).

        At most ``max_patches`` patches are held: once the pool is full, each batch contributes the share of
        its patches that keeps the pool a uniform sample of all patches seen (reservoir sampling by batch);
        then the greedy coreset keeps ``coreset_fraction`` of the pool, at most ``coreset_max`` rows.

        With ``score_normalization: pixel`` the images are dealt to ``normalization_folds`` folds in the order they
        come (image i to fold i mod k), each fold with its own pool of at most ``max_patches / k`` patches; the
        bank is the coreset of every pool, and each fold's first images (``normalization_images`` in all) are
        mapped against the coreset of the other folds' pools to give the per-position statistics.

        Returns:
            ``{"images", "patches_seen", "patches_pooled", "bank_size"}``, and ``"normal_images"`` with ``pixel``.
        """
        generator = torch.Generator().manual_seed(self.cfg.seed)
        folds = self.cfg.normalization_folds if self.cfg.score_normalization == "pixel" else 1
        capacity = math.ceil(self.cfg.max_patches / folds)
        kept_per_fold = math.ceil(self.cfg.normalization_images / folds) if folds > 1 else 0
        pools: list[torch.Tensor | None] = [None] * folds
        seen = [0] * folds
        kept: list[list[torch.Tensor]] = [[] for _ in range(folds)]
        n_images = 0
        for batch in batches:
            fold_of = (torch.arange(batch.shape[0]) + n_images) % folds
            n_images += batch.shape[0]
            for fold in range(folds):
                images = batch[fold_of == fold] if folds > 1 else batch
                if images.shape[0] == 0:
                    continue
                room = kept_per_fold - len(kept[fold])
                if room > 0:
                    kept[fold].extend(image.clone() for image in images[:room].cpu())
                flat = images.reshape(-1, images.shape[-1]).float().cpu()
                pools[fold], seen[fold] = _reservoir(pools[fold], flat, seen[fold], capacity, generator)
        filled = [pool for pool in pools if pool is not None]
        if not filled:
            msg = "PatchCore.fit: no training images"
            raise ValueError(msg)
        pool = torch.cat(filled)
        self.bank = self._coreset(pool).to(self.mean.device).contiguous()
        stats = {
            "images": n_images,
            "patches_seen": sum(seen),
            "patches_pooled": pool.shape[0],
            "bank_size": int(self.bank.shape[0]),
        }
        if folds > 1:
            stats["normal_images"] = self._fit_normal_stats(pools, kept)
        return stats

    def _coreset(self, pool: torch.Tensor) -> torch.Tensor:
        """The greedy coreset of ``pool`` (``coreset_fraction`` of it, at most ``coreset_max`` rows) as a bank."""
        keep = min(self.cfg.coreset_max, max(1, math.ceil(self.cfg.coreset_fraction * pool.shape[0])))
        if keep < pool.shape[0]:
            pool = pool[greedy_coreset(pool, keep, self.cfg.projection_dim, self.cfg.seed)]
        return pool.to(getattr(torch, self.cfg.bank_dtype))

    def _fit_normal_stats(self, pools: list[torch.Tensor | None], kept: list[list[torch.Tensor]]) -> int:
        """Per-position statistics of the kept images' maps, each fold's against a bank of the other folds."""
        height, width = self.cfg.input_shape
        grid = (height // min(self.cfg.reductions), width // min(self.cfg.reductions))
        count = 0
        total = torch.zeros(1, 1, height, width, dtype=torch.float64)
        squares = torch.zeros_like(total)
        for fold, images in enumerate(kept):
            others = [pool for other, pool in enumerate(pools) if other != fold and pool is not None]
            if not images or not others:
                continue
            bank = self._coreset(torch.cat(others)).to(self.mean.device)
            for patches in images:
                if patches.shape[0] != grid[0] * grid[1]:
                    msg = f"PatchCore.fit: {patches.shape[0]} patches per image, expected {grid[0]} x {grid[1]}"
                    msg += f" for input {height} x {width} (stride {min(self.cfg.reductions)})"
                    raise ValueError(msg)
                queries = patches.to(self.mean.device).float()
                dist = nearest_distance(queries, bank, self.cfg.query_chunk, self.cfg.bank_chunk)
                raw = self._raw_map(dist.view(1, 1, *grid), (height, width)).double().cpu()
                total += raw
                squares += raw.square()
                count += 1
        if count < 2:
            msg = f"PatchCore: score_normalization 'pixel' needs at least 2 training images, got {count}"
            raise ValueError(msg)
        mean, var = moments_from_sums(count, total, squares)
        self.normal_mean.copy_(mean.to(self.normal_mean))
        self.normal_std.copy_(position_std(var, self.cfg.score_sigma).to(self.normal_std))
        self.normal_count.fill_(count)
        self._normal_stats_ready = True
        return count

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> PatchCorePrediction:
        """(B, 3, H, W) in [0, 1] -> blurred nearest-bank distance map at the input size and its image score."""
        self.check_fitted()
        emb = self.embed(images)
        batch, dim, height, width = emb.shape
        queries = emb.permute(0, 2, 3, 1).reshape(-1, dim).float()
        dist = nearest_distance(queries, self.bank, self.cfg.query_chunk, self.cfg.bank_chunk)
        return self.distance_map(dist.reshape(batch, 1, height, width), tuple(images.shape[-2:]))

    def check_fitted(self) -> None:
        """Raise unless :meth:`fit` has set what :meth:`predict` reads (the bank; the statistics with ``pixel``)."""
        if self.bank.shape[0] == 0:
            msg = "PatchCore: the memory bank is empty (fit the model first)"
            raise RuntimeError(msg)
        if self.cfg.score_normalization == "pixel" and not self._normal_stats_ready:
            msg = "PatchCore: score_normalization is 'pixel' but its statistics were never fitted (fit the model first)"
            raise RuntimeError(msg)

    def _raw_map(self, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Patch distances (B, 1, h, w) -> the blurred distance map at ``size`` (H, W), not standardised."""
        return blur_map(F.interpolate(grid, size=size, mode="bilinear"), self.cfg.score_sigma)

    def distance_map(self, grid: torch.Tensor, size: tuple[int, int]) -> PatchCorePrediction:
        """Patch distances (B, 1, h, w) -> the blurred map at ``size`` (H, W), standardised per position with
        ``score_normalization: pixel``, and its image score.

        The step after the search, shared by :meth:`predict` and the exported graph (:mod:`tsdn.export`).
        """
        full = self._raw_map(grid, size)
        if self.cfg.score_normalization == "pixel":
            full = standardize_map(full, self.normal_mean, self.normal_std)
        return PatchCorePrediction(full, image_score(full, self.cfg.score_topk))

    def fit_score_scales(self, images: Any) -> None:
        """Nothing to fit: PatchCore has one score source (the interface validation calls on every family)."""

    def _check_input(self, image: torch.Tensor) -> None:
        check_input(image, self.stride, "PatchCore")


def _after_load(module: nn.Module, incompatible_keys: object) -> None:
    """A loaded state carries fitted statistics when its ``normal_count`` is above 0."""
    module._normal_stats_ready = int(module.normal_count) > 0


def _reservoir(
    pool: torch.Tensor | None, patches: torch.Tensor, seen: int, capacity: int, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Add ``patches`` to a uniform sample of at most ``capacity`` rows of everything seen; returns (pool, seen)."""
    total = seen + patches.shape[0]
    if pool is None or pool.shape[0] + patches.shape[0] <= capacity:
        merged = patches if pool is None else torch.cat([pool, patches])
        if merged.shape[0] <= capacity:
            return merged, total
        pool, patches, seen = merged[:0], merged, 0
    # Algorithm R, vectorised per batch: row t (0-based over all rows seen) replaces a random slot with
    # probability capacity / (t + 1); rows that fill an empty pool are taken as they come.
    room = capacity - pool.shape[0]
    if room > 0:
        pool = torch.cat([pool, patches[:room]])
        patches, seen = patches[room:], seen + room
    positions = torch.arange(seen, seen + patches.shape[0])
    slots = (torch.rand(patches.shape[0], generator=generator) * (positions + 1)).long()
    rows = (slots < capacity).nonzero().squeeze(1)
    # Two rows of one batch can draw the same slot; in the sequential algorithm the later one wins. An indexed
    # assignment with repeated indices leaves the winner to the threads (the bank differed between two fits of
    # the same images), so only each slot's last row is written.
    order = torch.argsort(slots[rows], stable=True)
    taken = slots[rows][order]
    last = torch.ones_like(taken, dtype=torch.bool)
    last[:-1] = taken[1:] != taken[:-1]
    pool = pool.clone()
    pool[taken[last]] = patches[rows[order][last]]
    return pool, total
