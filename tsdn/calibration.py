"""The calibration of a model's raw scores: decision threshold and normal-score statistics.

A :class:`Calibration`, fitted on held-out normal images (or on labelled validation scores), turns raw scores
into decisions (``score >= threshold``) and normalised [0, 1] scores. It travels with the weights in the
checkpoint (and with every exported model), so batch scoring, serving and the standalone inferencer decide
identically. numpy only: a process running an exported model applies it without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from tsdn.config_io import from_dict, to_dict

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_QUANTILE",
    "QUANTILES",
    "Calibration",
    "fit_calibration",
    "quantile_false_positive_rate",
    "quantile_for_false_positive_rate",
]

# The quantile of the held-out normal scores a threshold is set at, unless a caller asks for another.
DEFAULT_QUANTILE = 0.99
# Quantiles of the normal scores stored in every calibration (keys are their decimal strings).
QUANTILES = (0.5, 0.9, 0.95, 0.99)

ScoreT = TypeVar("ScoreT", float, np.ndarray, "torch.Tensor")


@dataclass
class Calibration:
    """Decision threshold and normal-score statistics of one trained model (raw score units).

    Attributes:
        threshold: an image (or pixel) is anomalous when ``score >= threshold``.
        score_min, score_max, score_mean, score_std: statistics of the held-out normal image scores
            (``score_std`` is the population standard deviation).
        score_quantiles: ``{"0.5": q50, "0.9": ..., "0.95": ..., "0.99": ...}`` of the normal scores.
        n_normal: number of normal scores the statistics come from.
        method: ``"normal-quantile"`` (threshold = the ``quantile`` of normal scores) or ``"f1-optimal"``
            (threshold maximising F1 on labelled validation scores).
        quantile: the quantile used (or that would have been used, for ``"f1-optimal"``).
        map_offset: added to the model's anomaly map before anything reads it (the mask, ``map >= threshold``,
            the heatmap, the returned map), so that the map is in the score's units. 0 for a model whose score is
            its map's maximum (or top-k mean). A model whose map comes from other stages than its score
            (``map_strides``) gets the normal images' score ``quantile`` minus their maps' maxima's: a held-out normal
            image's map then reaches the threshold about as often as its score does.
    """

    threshold: float
    score_min: float
    score_max: float
    score_mean: float
    score_std: float
    score_quantiles: dict[str, float] = field(default_factory=dict)
    n_normal: int = 0
    method: Literal["normal-quantile", "f1-optimal"] = "normal-quantile"
    quantile: float = DEFAULT_QUANTILE
    map_offset: float = 0.0

    def __post_init__(self) -> None:
        numbers = {
            "threshold": self.threshold,
            "score_min": self.score_min,
            "score_max": self.score_max,
            "score_mean": self.score_mean,
            "score_std": self.score_std,
            "map_offset": self.map_offset,
            **{f"score_quantiles.{k}": v for k, v in self.score_quantiles.items()},
        }
        bad = [name for name, value in numbers.items() if not math.isfinite(value)]
        if bad:
            msg = f"Calibration: non-finite {', '.join(bad)}"
            raise ValueError(msg)
        if self.score_min > self.score_max:
            msg = f"Calibration: score_min {self.score_min} > score_max {self.score_max}"
            raise ValueError(msg)
        if self.method not in ("normal-quantile", "f1-optimal"):
            msg = f"Calibration.method: {self.method!r} is not 'normal-quantile' or 'f1-optimal'"
            raise ValueError(msg)
        if not 0 < self.quantile <= 1:
            msg = f"Calibration.quantile: must lie in (0, 1], got {self.quantile}"
            raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (the ``calibration`` entry of ``model.json``)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`; unknown keys or wrong types raise ``tsdn.config_io.ConfigError``."""
        return from_dict(cls, data)

    def shift_map(self, anomaly_map: np.ndarray) -> np.ndarray:
        """A model's raw float32 map(s), any shape -> in the score's units: ``map_offset`` added (float32)."""
        return anomaly_map + np.float32(self.map_offset)

    def is_anomalous(self, score: ScoreT) -> bool | np.ndarray | torch.Tensor:
        """``score >= threshold`` for a float, array or tensor of raw scores (or score maps)."""
        return score >= self.threshold

    def false_positive_rate(self, confidence: float = 0.95) -> tuple[float, float] | None:
        """How often an unseen normal image reaches a ``"normal-quantile"`` threshold: the expected rate and its
        one-sided upper bound at ``confidence`` (:func:`quantile_false_positive_rate` of ``n_normal`` and
        ``quantile``). None for an ``"f1-optimal"`` threshold, which is not a quantile of the normal scores.
        """
        if self.method != "normal-quantile" or self.n_normal < 1:
            return None
        return quantile_false_positive_rate(self.n_normal, self.quantile, confidence)

    def false_positive_rates(self) -> dict[str, float]:
        """:meth:`false_positive_rate` at 95 % as the platform publishes it (the score manifest,
        ``GET /v1/products``): ``{"expected_false_positive_rate", "false_positive_rate_95"}``, or ``{}`` for a
        threshold that is not a quantile of the normal scores."""
        rates = self.false_positive_rate(0.95)
        if rates is None:
            return {}
        return {"expected_false_positive_rate": rates[0], "false_positive_rate_95": rates[1]}

    def normalize(self, score: ScoreT, threshold: float | None = None) -> ScoreT:
        """Map raw scores (or score maps) to [0, 1] so that ``score_min`` -> 0 and the threshold -> 0.5.

        ``clip(0.5 + 0.5 * (score - t) / (t - score_min), 0, 1)`` with ``t`` the threshold, i.e. linear from
        ``score_min`` (0) through ``t`` (0.5) to ``2 * t - score_min`` (1): non-decreasing, and
        ``normalize(s) >= 0.5`` exactly when ``s >= t``. If ``t`` does not exceed ``score_min`` (a degenerate
        calibration, or an override below every normal score) the span is a tiny positive number: a step at ``t``.

        Args:
            score: a float, a numpy array or a torch tensor of raw scores, any shape.
            threshold: the threshold the decision applies; None = the calibrated one. A caller that overrides
                the threshold passes it here, so the normalised score and the decision agree.

        Returns:
            The same type and shape, values in [0, 1].
        """
        limit = self.threshold if threshold is None else float(threshold)
        span = max(limit - self.score_min, 1e-12 * max(1.0, abs(limit)))
        scaled = (score - limit) * (0.5 / span) + 0.5
        if isinstance(scaled, (int, float, np.generic)):
            return min(max(float(scaled), 0.0), 1.0)
        return scaled.clip(0.0, 1.0)  # numpy arrays and torch tensors


def fit_calibration(
    normal_scores: np.ndarray,
    scores: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    quantile: float = DEFAULT_QUANTILE,
    normal_map_maxima: np.ndarray | None = None,
) -> Calibration:
    """Fit the threshold and score statistics.

    Args:
        normal_scores: (N,) image scores of held-out normal images (statistics, and the threshold by default).
        scores: optional (M,) labelled validation scores; with ``labels``.
        labels: optional (M,) 0 = normal, 1 = anomalous. When they contain at least one anomaly the
            threshold is the F1-optimal one (:func:`tsdn.metrics.f1_max`); otherwise the quantile rule holds.
        quantile: the quantile of ``normal_scores`` used as threshold (linear interpolation), in (0, 1].
        normal_map_maxima: optional (N,) maxima of the same normal images' anomaly maps, for a model whose map is
            not the one it scores (``map_strides``): ``map_offset`` = the ``quantile`` of ``normal_scores`` minus
            the ``quantile`` of these. None: 0.

    Returns:
        The :class:`Calibration`.
    """
    normal = np.asarray(normal_scores, dtype=np.float64).ravel()
    if normal.size == 0:
        msg = "fit_calibration: normal_scores is empty"
        raise ValueError(msg)
    if not np.isfinite(normal).all():
        msg = f"fit_calibration: normal_scores holds {int((~np.isfinite(normal)).sum())} NaN/infinite values"
        raise ValueError(msg)
    if not 0 < quantile <= 1:
        msg = f"fit_calibration: quantile must lie in (0, 1], got {quantile}"
        raise ValueError(msg)
    if (scores is None) != (labels is None):
        msg = "fit_calibration: scores and labels must be given together"
        raise ValueError(msg)

    from tsdn.metrics import f1_max  # here: scipy stays out of processes that only apply a calibration

    normal_quantile = float(np.quantile(normal, quantile))
    map_offset = 0.0
    if normal_map_maxima is not None:
        maxima = np.asarray(normal_map_maxima, dtype=np.float64).ravel()
        if maxima.shape != normal.shape or not np.isfinite(maxima).all():
            msg = f"fit_calibration: normal_map_maxima must be {normal.size} finite values, one per normal score"
            raise ValueError(msg)
        map_offset = float(normal_quantile - np.quantile(maxima, quantile))
    method = "normal-quantile"
    threshold = normal_quantile
    if labels is not None and np.any(np.asarray(labels) == 1):
        _, threshold = f1_max(np.asarray(labels), np.asarray(scores))
        method = "f1-optimal"
    return Calibration(
        threshold=threshold,
        score_min=float(normal.min()),
        score_max=float(normal.max()),
        score_mean=float(normal.mean()),
        score_std=float(normal.std()),
        score_quantiles={str(q): float(np.quantile(normal, q)) for q in QUANTILES},
        n_normal=int(normal.size),
        method=method,
        quantile=quantile,
        map_offset=map_offset,
    )


def quantile_false_positive_rate(n_normal: int, quantile: float, confidence: float = 0.95) -> tuple[float, float]:
    """The share of unseen normal images whose score reaches the ``quantile`` of ``n_normal`` normal scores.

    Distribution-free, for exchangeable continuous scores: an unseen normal score exceeds the k-th smallest of n
    with probability ``(n + 1 - k) / (n + 1)`` on average, and over draws of the n images that probability follows
    Beta(n + 1 - k, k). The threshold (``np.quantile``, linear) sits at the fractional position
    ``h = quantile * (n - 1)`` (0-based), so k = h + 1 is read fractionally on both counts (Hutson's fractional
    order statistics): the expected rate is ``(n - h) / (n + 1)`` and the bound is the ``confidence`` quantile of
    Beta(n - h, h + 1). At the maximum (``quantile`` 1) both are exact: ``1 / (n + 1)`` and
    ``1 - (1 - confidence) ** (1 / n)``.

    So a "99 % quantile" of 10 held-out normal images is their near-maximum, which an unseen good image reaches
    about 10 % of the time on average and, for one unlucky draw of the 10, up to about 27 % (95 % bound); the
    nominal 1 % needs a few hundred normal images.

    Returns:
        ``(expected, upper)``: the expected rate and its one-sided upper bound, both in (0, 1).
    """
    if n_normal < 1:
        msg = f"quantile_false_positive_rate: n_normal must be at least 1, got {n_normal}"
        raise ValueError(msg)
    if not 0 < quantile <= 1 or not 0 < confidence < 1:
        msg = f"quantile_false_positive_rate: quantile in (0, 1] and confidence in (0, 1), got {quantile}, {confidence}"
        raise ValueError(msg)
    from scipy.special import betaincinv  # here: scipy stays out of processes that only apply a calibration

    position = quantile * (n_normal - 1)
    above, below = n_normal - position, position + 1
    return above / (n_normal + 1), float(betaincinv(above, below, confidence))


def quantile_for_false_positive_rate(n_normal: int, rate: float) -> float:
    """The quantile of ``n_normal`` normal scores at which an unseen normal image reaches the threshold with the
    expected ``rate``: the inverse of :func:`quantile_false_positive_rate`'s expected rate,
    ``(n - rate * (n + 1)) / (n - 1)``.

    The lowest rate n images can promise is ``1 / (n + 1)``, at their maximum (10 normal images: 9.1 %, 30:
    3.2 %, 99: 1 %); a lower one raises ``ValueError`` saying how many images it needs.

    Args:
        n_normal: the number of held-out normal scores the threshold is a quantile of.
        rate: the expected share of unseen normal images flagged, in (0, 0.5).

    Returns:
        The quantile, in (0.5, 1].
    """
    if not 0 < rate < 0.5:
        msg = f"quantile_for_false_positive_rate: rate must lie in (0, 0.5), got {rate}"
        raise ValueError(msg)
    lowest = 1 / (n_normal + 1) if n_normal >= 1 else 1.0
    if rate < lowest * (1 - 1e-9):
        needed = math.ceil(1 / rate - 1 - 1e-9)
        msg = (
            f"a threshold from {n_normal} normal image(s) flags at least {100 * lowest:.2g} % of unseen good images "
            f"on average (at their maximum score); {100 * rate:g} % needs at least {needed} held-out normal images"
        )
        raise ValueError(msg)
    if n_normal == 1:
        return 1.0
    return min(1.0, (n_normal - rate * (n_normal + 1)) / (n_normal - 1))
