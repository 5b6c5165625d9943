"""Anomaly-detection metrics of the MVTec AD protocol: image/pixel AUROC, AUPRO, F1-max.

All functions take numpy arrays and return Python floats. They sort once (``O(n log n)``) and never build
pairwise or per-threshold matrices, so a full MVTec category (~100 images x 352 x 352 = 12 M pixels) is
evaluated in seconds and a few hundred MB.

Ties are handled exactly: all samples sharing a score enter the curves together (one ROC/PRO point per
distinct score), which is what ``sklearn.metrics.roc_auc_score`` does.

Degenerate inputs: a metric that needs both classes and gets only one raises
:class:`UndefinedMetricError` (a ``ValueError``); :func:`evaluate` reports such a metric as NaN instead, so
a validation split without anomalies still yields a result dict. Malformed inputs (shape mismatch, NaN or
infinite scores, labels other than 0/1) always raise ``ValueError``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = [
    "UndefinedMetricError",
    "aupro",
    "evaluate",
    "f1_max",
    "image_auroc",
    "paired_auroc_gap",
    "pixel_auroc",
    "precision_recall_curve",
    "roc_curve",
]

# MVTec AD's reference implementation labels defect regions with 8-connectivity.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class UndefinedMetricError(ValueError):
    """The metric is undefined for this input (e.g. only one class present)."""


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores.

    Args:
        labels: (N,) 0 = normal, 1 = anomalous (bool or integer).
        scores: (N,) anomaly scores, higher = more anomalous.
    """
    positive = _as_labels("labels", labels)
    values = _as_scores("scores", scores, positive.shape)
    return _auroc(positive, values, "image_auroc")


def paired_auroc_gap(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, draws: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """How far apart the image AUROCs of two models scored on the same images are, given how few images there are.

    The normal and the anomalous images are each resampled with replacement ``draws`` times (the same draws for
    both models, so what the two share cancels), and the AUROC of ``scores_a`` minus that of ``scores_b`` is
    computed on every draw (exactly, ties counted half, with one sort per model).

    Args:
        labels: (N,) 0 = normal, 1 = anomalous.
        scores_a, scores_b: (N,) the two models' scores of the same images.

    Returns:
        ``(low, high, b_ahead)``: the 2.5 % and 97.5 % quantiles of the gap over the draws, and the share of draws
        on which ``scores_b`` has the higher AUROC.
    """
    positive = _as_labels("labels", labels)
    a = _as_scores("scores_a", scores_a, positive.shape)
    b = _as_scores("scores_b", scores_b, positive.shape)
    n_positive, n_negative = _class_counts(positive, "paired_auroc_gap")
    rng = np.random.default_rng(seed)
    normal_counts = rng.multinomial(n_negative, np.full(n_negative, 1.0 / n_negative), size=draws)
    anomalous_counts = rng.multinomial(n_positive, np.full(n_positive, 1.0 / n_positive), size=draws)
    gaps = _weighted_auroc(a, positive, normal_counts, anomalous_counts) - _weighted_auroc(
        b, positive, normal_counts, anomalous_counts
    )
    low, high = np.quantile(gaps, [0.025, 0.975])
    return float(low), float(high), float(np.mean(gaps < 0))


def _weighted_auroc(
    scores: np.ndarray, positive: np.ndarray, normal_counts: np.ndarray, anomalous_counts: np.ndarray
) -> np.ndarray:
    """AUROC (D,) of ``scores`` with each normal sample counted ``normal_counts`` (D, n_normal) times and each
    anomalous one ``anomalous_counts`` (D, n_anomalous) times: the share of (normal, anomalous) pairs ranked right,
    ties counted half."""
    order = np.argsort(scores[~positive])
    normal = scores[~positive][order]
    anomalous = scores[positive]
    below = np.searchsorted(normal, anomalous, side="left")
    up_to = np.searchsorted(normal, anomalous, side="right")
    weights = normal_counts[:, order]
    cumulative = np.concatenate([np.zeros((len(weights), 1)), np.cumsum(weights, axis=1)], axis=1)
    ranked_right = cumulative[:, below] + 0.5 * (cumulative[:, up_to] - cumulative[:, below])
    pairs = normal_counts.sum(axis=1) * anomalous_counts.sum(axis=1)
    return (ranked_right * anomalous_counts).sum(axis=1) / pairs


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Area under the ROC curve over all pixels of all images.

    Args:
        masks: (N, H, W) ground-truth defect masks (bool or 0/1).
        maps: (N, H, W) anomaly maps.
    """
    positive = _as_labels("masks", masks)
    values = _as_scores("maps", maps, positive.shape)
    return _auroc(positive.ravel(), values.ravel(), "pixel_auroc")


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD definition).

    Every 8-connected component of every ground-truth mask is one region. At a threshold ``t`` the PRO is
    the mean over all regions of the fraction of the region's pixels with ``map >= t`` (each region counts
    equally, whatever its size); the FPR is the fraction of all normal pixels with ``map >= t``. The PRO
    curve over FPR is integrated with the trapezoidal rule from 0 to ``fpr_limit`` (linearly interpolated
    at the limit) and divided by ``fpr_limit``, so a perfect map scores 1.

    Args:
        masks: (N, H, W) or (N, 1, H, W) ground-truth defect masks (bool or 0/1).
        maps: anomaly maps of the masks' shape.
        fpr_limit: upper FPR integration limit in (0, 1].
        num_thresholds: ``None`` uses every distinct score as a threshold (exact); an integer uses that many
            thresholds evenly spaced between the smallest and the largest score (as anomalib does).
    """
    if not 0 < fpr_limit <= 1:
        msg = f"aupro: fpr_limit must lie in (0, 1], got {fpr_limit}"
        raise ValueError(msg)
    if num_thresholds is not None and num_thresholds < 2:
        msg = f"aupro: num_thresholds must be >= 2 or None, got {num_thresholds}"
        raise ValueError(msg)
    positive = _as_labels("masks", masks)
    values = _as_scores("maps", maps, positive.shape)
    if positive.ndim == 4 and positive.shape[1] == 1:  # (N, 1, H, W) model-output layout
        positive, values = positive[:, 0], values[:, 0]
    if positive.ndim != 3:
        msg = f"aupro: masks must be (N, H, W) or (N, 1, H, W), got shape {positive.shape}"
        raise ValueError(msg)

    regions = np.zeros(positive.shape, dtype=np.int32)
    n_regions = 0
    for i, mask in enumerate(positive):
        labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        regions[i] = np.where(labelled > 0, labelled + n_regions, 0)
        n_regions += count
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1)
    n_normal = int(sizes[0])
    if n_regions == 0 or n_normal == 0:
        msg = f"aupro: needs defect and normal pixels, got {n_regions} regions and {n_normal} normal pixels"
        raise UndefinedMetricError(msg)

    # Per-pixel contributions: a normal pixel adds 1/n_normal to the FPR, a pixel of region r adds
    # 1/(n_regions * |r|) to the PRO, so the PRO at a threshold is the mean per-region overlap.
    pro_weight = np.concatenate(([0.0], 1.0 / (n_regions * sizes[1:].astype(np.float64))))
    region_ids = regions.ravel()
    thresholds, at_or_above, (n_defect, pro) = _descending_cumsums(
        values.ravel(), region_ids > 0, pro_weight[region_ids]
    )
    del regions, region_ids
    fpr = np.minimum((at_or_above - n_defect) / n_normal, 1.0)
    pro = np.minimum(pro, 1.0)
    if num_thresholds is not None:
        grid = np.linspace(thresholds[0], thresholds[-1], num_thresholds)
        # the last distinct score >= each grid threshold (thresholds are descending)
        index = np.searchsorted(-thresholds, -grid, side="right") - 1
        fpr, pro = fpr[index], pro[index]
    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], pro))

    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:inside], pro[:inside]
    if inside < fpr.size:
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        x = np.append(x, fpr_limit)
        y = np.append(y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return float(np.trapezoid(y, x) / fpr_limit)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds, predicting anomalous when ``score >= threshold``.

    Args:
        labels: (N,) 0 = normal, 1 = anomalous.
        scores: (N,) anomaly scores.

    Returns:
        ``(f1, threshold)``; among equally good thresholds the largest is returned.
    """
    positive = _as_labels("labels", labels)
    values = _as_scores("scores", scores, positive.shape)
    n_positive = int(positive.sum())
    if n_positive == 0:
        msg = "f1_max: no anomalous sample, F1 is undefined"
        raise UndefinedMetricError(msg)
    thresholds, at_or_above, (tp,) = _descending_cumsums(values, positive)
    f1 = 2 * tp / (at_or_above + n_positive)  # 2TP / (2TP + FP + FN) with TP + FP = at_or_above, FN = P - TP
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve of image scores, one point per distinct score (predicting anomalous when ``score >= t``).

    Args:
        labels: (N,) 0 = normal, 1 = anomalous; both classes present.
        scores: (N,) anomaly scores.

    Returns:
        ``(fpr, tpr, thresholds)``, each (K + 1,) for K distinct scores: the first point is ``(0, 0)`` at
        threshold ``inf``, then thresholds descend (``sklearn.metrics.roc_curve(drop_intermediate=False)``).
        The trapezoidal area under ``(fpr, tpr)`` is :func:`image_auroc`.
    """
    positive = _as_labels("labels", labels)
    values = _as_scores("scores", scores, positive.shape)
    n_positive, n_negative = _class_counts(positive, "roc_curve")
    thresholds, at_or_above, (tp,) = _descending_cumsums(values, positive)
    fpr = np.concatenate(([0.0], (at_or_above - tp) / n_negative))
    tpr = np.concatenate(([0.0], tp / n_positive))
    return fpr, tpr, np.concatenate(([np.inf], thresholds.astype(np.float64)))


def precision_recall_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The precision-recall curve of image scores, one point per distinct score, thresholds descending.

    Args:
        labels: (N,) 0 = normal, 1 = anomalous; at least one anomalous.
        scores: (N,) anomaly scores.

    Returns:
        ``(precision, recall, thresholds)``, each (K,) for K distinct scores, recall ascending. (sklearn's
        ``precision_recall_curve`` returns the same points in the opposite order, plus a final ``(1, 0)``.)
    """
    positive = _as_labels("labels", labels)
    values = _as_scores("scores", scores, positive.shape)
    n_positive = int(positive.sum())
    if n_positive == 0:
        msg = "precision_recall_curve: no anomalous sample, recall is undefined"
        raise UndefinedMetricError(msg)
    thresholds, at_or_above, (tp,) = _descending_cumsums(values, positive)
    return tp / at_or_above, tp / n_positive, thresholds.astype(np.float64)


def evaluate(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
    fpr_limit: float = 0.3,
    flagged: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics of one test set.

    Args:
        labels: (N,) image labels, 0 = normal, 1 = anomalous.
        scores: (N,) image anomaly scores.
        masks: optional (N, H, W) ground-truth masks; with ``maps`` adds ``pixel_auroc`` and ``aupro``.
        maps: (N, H, W) anomaly maps, required with ``masks``.
        fpr_limit: AUPRO integration limit.
        flagged: optional (N,) bool, the decisions the model shipped (``score >= threshold``); adds ``recall``
            (the share of anomalous images flagged) and ``false_positive_rate`` (the share of normal ones).

    Returns:
        ``{"image_auroc", "f1_max", "f1_threshold"}`` plus ``{"pixel_auroc", "aupro"}`` with masks and
        ``{"recall", "false_positive_rate"}`` with ``flagged``; a metric undefined for this input (one class
        only) is NaN.
    """
    if (masks is None) != (maps is None):
        msg = "evaluate: masks and maps must be given together"
        raise ValueError(msg)
    result = {"image_auroc": _or_nan(image_auroc, labels, scores)}
    if flagged is not None:
        truth = np.asarray(labels).astype(bool)
        decisions = np.asarray(flagged).astype(bool)
        if decisions.shape != truth.shape:
            msg = f"evaluate: flagged has shape {decisions.shape}, labels {truth.shape}"
            raise ValueError(msg)
        result["recall"] = float(decisions[truth].mean()) if truth.any() else math.nan
        result["false_positive_rate"] = float(decisions[~truth].mean()) if (~truth).any() else math.nan
    try:
        result["f1_max"], result["f1_threshold"] = f1_max(labels, scores)
    except UndefinedMetricError:
        result["f1_max"] = result["f1_threshold"] = math.nan
    if masks is not None:
        result["pixel_auroc"] = _or_nan(pixel_auroc, masks, maps)
        result["aupro"] = _or_nan(aupro, masks, maps, fpr_limit)
    return result


def _or_nan(metric, *args) -> float:
    try:
        return metric(*args)
    except UndefinedMetricError:
        return math.nan


def _class_counts(positive: np.ndarray, name: str) -> tuple[int, int]:
    """(anomalous, normal) counts of ``positive``; :class:`UndefinedMetricError` naming ``name`` when one is 0."""
    n_positive = int(positive.sum())
    n_negative = positive.size - n_positive
    if n_positive == 0 or n_negative == 0:
        msg = f"{name}: only one class present ({n_positive} anomalous, {n_negative} normal); it is undefined"
        raise UndefinedMetricError(msg)
    return n_positive, n_negative


def _auroc(positive: np.ndarray, scores: np.ndarray, name: str) -> float:
    n_positive, n_negative = _class_counts(positive, name)
    _, at_or_above, (tp,) = _descending_cumsums(scores, positive)
    fp = at_or_above - tp
    # Trapezoids of the ROC curve in integer units (exact): area * 2 * P * N = sum dFP * (TP_prev + TP).
    tp_prev = np.concatenate(([0], tp[:-1]))
    d_fp = np.diff(fp, prepend=0)
    doubled_area = int(np.dot(d_fp, tp_prev + tp))
    return doubled_area / (2 * n_positive * n_negative)


def _descending_cumsums(scores: np.ndarray, *weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Distinct scores in descending order and, for each, the count and cumulative weights of samples >= it.

    Args:
        scores: (n,) finite scores.
        weights: (n,) arrays (bool weights count, as int64); one cumulative sum is returned per array.

    Returns:
        ``(thresholds (k,), at_or_above (k,) int64, [cumsum (k,) per weight])``, ``k`` = number of distinct
        scores.
    """
    order = np.argsort(scores)[::-1]
    ordered = scores[order]
    last_of_tie = np.append(ordered[1:] != ordered[:-1], True)
    at_or_above = np.flatnonzero(last_of_tie) + 1
    return ordered[last_of_tie], at_or_above, [np.cumsum(w[order])[last_of_tie] for w in weights]


def _as_labels(name: str, labels: np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.size == 0:
        msg = f"{name}: empty"
        raise ValueError(msg)
    if array.dtype != np.bool_:
        if not np.isin(array, (0, 1)).all():
            msg = f"{name}: expected 0/1 labels, got values {np.unique(array)[:10].tolist()}"
            raise ValueError(msg)
        array = array.astype(bool)
    return array


def _as_scores(name: str, scores: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(scores)
    if array.shape != shape:
        msg = f"{name}: shape {array.shape} does not match the labels' shape {shape}"
        raise ValueError(msg)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        msg = f"{name}: expected real numbers, got dtype {array.dtype}"
        raise ValueError(msg)
    if not np.isfinite(array).all():
        msg = f"{name}: contains NaN or infinite values"
        raise ValueError(msg)
    return array
