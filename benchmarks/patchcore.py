"""The PatchCore-style baseline of the accuracy benchmark: :class:`tsdn.patchcore.PatchCore`, fitted and timed.

The model itself is the platform's second model family (``tsdn/patchcore.py``); this module only times its fit
and scoring on in-memory arrays, so the accuracy benchmark can put it beside TSDN on the same images. With
``coreset_fraction=1`` the bank is every training patch (the baseline the accuracy issue measured).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from tsdn.metrics import evaluate
from tsdn.patchcore import PatchCore

__all__ = ["predict_all", "run_patchcore"]


def _batches(images: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size]


def predict_all(model: PatchCore, images: torch.Tensor, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(scores (N,), maps (N, H, W))`` of a fitted ``model`` on ``images`` (N, 3, H, W) in [0, 1]."""
    preds = [model.predict(b) for b in _batches(images, batch_size)]
    maps = torch.cat([p.anomaly_map for p in preds])[:, 0].numpy()
    return torch.cat([p.anomaly_score for p in preds]).numpy(), maps


def run_patchcore(
    model: PatchCore,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    labels: Sequence[int],
    masks: np.ndarray,
    batch_size: int = 16,
) -> dict[str, float]:
    """Fit on ``train_images``, score ``test_images``, evaluate; with wall times and throughput.

    Args:
        model: an unfitted :class:`PatchCore`.
        train_images: (N, 3, H, W) float in [0, 1], normal images only.
        test_images: (T, 3, H, W) float in [0, 1].
        labels: T image labels (0 normal, 1 anomalous).
        masks: (T, H, W) ground-truth masks in {0, 1}.
        batch_size: images per forward pass.

    Returns:
        The metrics of :func:`tsdn.metrics.evaluate` plus ``fit_s``, ``score_s``, ``score_images_per_s``, ``bank_size``.
    """
    start = time.perf_counter()
    model.fit(_batches(train_images, batch_size))
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores, maps = predict_all(model, test_images, batch_size)
    score_s = time.perf_counter() - start
    metrics = dict(evaluate(np.asarray(labels), scores, masks, maps))
    metrics.update(
        fit_s=fit_s,
        score_s=score_s,
        score_images_per_s=test_images.shape[0] / score_s,
        bank_size=int(model.bank.shape[0]),
    )
    return metrics
