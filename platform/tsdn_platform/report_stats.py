"""What the report says about one product line's score rows: decisions, ground truth, curves, per-defect AUROC.

Everything is computed per product, in that product's own units: each product line has its own model and
calibrated threshold, so raw scores of two products are never compared. Ground truth comes from the score
rows' ``label`` and ``defect_type`` (an ingested split); rows without a label count as unlabelled, and a
product whose scored rows are not all labelled gets no confusion matrix nor curves. Image-level metrics come
from :mod:`tsdn.metrics` (the same functions, ties and all, as the score job's manifest).

Pure numpy (no Ray, no pyarrow): :mod:`tsdn_platform.report` renders what this module computes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tsdn.metrics import f1_max, image_auroc, precision_recall_curve, roc_curve

__all__ = ["OUTCOMES", "UNLABELLED", "Confusion", "DefectStats", "ProductStats", "outcome", "product_stats"]

OUTCOMES = ("TP", "FP", "FN", "TN")
UNLABELLED = "unlabelled"
GOOD = "good"


def outcome(label: int | None, is_anomalous: bool | None) -> str:
    """``"TP"``, ``"FP"``, ``"FN"``, ``"TN"`` of one decision against its label; ``"unlabelled"`` without a label.

    Positive = anomalous: a TP is a defect that was flagged, an FP a good part that was flagged.
    """
    if label is None or is_anomalous is None:
        return UNLABELLED
    if is_anomalous:
        return "TP" if label else "FP"
    return "FN" if label else "TN"


@dataclass(frozen=True)
class Confusion:
    """Counts of the four outcomes at one threshold."""

    tp: int
    fp: int
    fn: int
    tn: int

    @classmethod
    def of(cls, labels: np.ndarray, decisions: np.ndarray) -> Confusion:
        """``labels``: (N,) 0/1; ``decisions``: (N,) bool (flagged anomalous)."""
        labels = np.asarray(labels).astype(bool)
        decisions = np.asarray(decisions).astype(bool)
        return cls(
            tp=int(np.sum(labels & decisions)),
            fp=int(np.sum(~labels & decisions)),
            fn=int(np.sum(labels & ~decisions)),
            tn=int(np.sum(~labels & ~decisions)),
        )

    @property
    def precision(self) -> float:
        """TP / (TP + FP); NaN when nothing was flagged."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        """TP / (TP + FN), the share of defects caught; NaN without defects."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def false_positive_rate(self) -> float:
        """FP / (FP + TN), the share of good parts flagged; NaN without good parts."""
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else math.nan


@dataclass(frozen=True)
class DefectStats:
    """One defect type of one product: how many images, how many were flagged, AUROC against the good ones."""

    defect_type: str
    images: int
    flagged: int
    auroc: float  # good images vs this defect type's images; NaN without good images


@dataclass
class ProductStats:
    """One product line's rows, summarised at its own calibrated threshold.

    ``threshold``: the calibrated threshold of its rows (the most common one when rows of several versions are
    mixed; ``thresholds`` lists them all). The ground-truth fields are None unless every scored row has a label.
    ``roc``: ``(fpr, tpr)``; ``pr``: ``(recall, precision)``, arrays of points (None with one class only).
    """

    product: str
    rows: int
    errors: int
    scored: int
    flagged: int
    threshold: float | None
    thresholds: list[float]
    versions: list[str]
    labelled: bool
    confusion: Confusion | None = None
    auroc: float | None = None
    f1: float | None = None
    f1_threshold: float | None = None
    f1_confusion: Confusion | None = None
    calibrated_f1: float | None = None
    roc: tuple[np.ndarray, np.ndarray] | None = None
    pr: tuple[np.ndarray, np.ndarray] | None = None
    defects: list[DefectStats] = field(default_factory=list)


def product_stats(product: str, rows: Sequence[Mapping[str, Any]]) -> ProductStats:
    """Summarise the score rows (dicts of the score-row contract) of one product line."""
    scored = [r for r in rows if r.get("anomaly_score") is not None]
    thresholds = Counter(float(r["threshold"]) for r in scored if r.get("threshold") is not None)
    stats = ProductStats(
        product=product,
        rows=len(rows),
        errors=len(rows) - len(scored),
        scored=len(scored),
        flagged=sum(bool(r.get("is_anomalous")) for r in scored),
        threshold=thresholds.most_common(1)[0][0] if thresholds else None,
        thresholds=sorted(thresholds),
        versions=sorted({str(r["model_version"]) for r in rows if r.get("model_version")}),
        labelled=bool(scored) and all(r.get("label") is not None for r in scored),
    )
    if not stats.labelled:
        return stats
    labels = np.array([int(r["label"]) for r in scored], np.int64)
    scores = np.array([float(r["anomaly_score"]) for r in scored], np.float64)
    decisions = np.array([bool(r["is_anomalous"]) for r in scored])
    stats.confusion = Confusion.of(labels, decisions)
    stats.calibrated_f1 = _f1(stats.confusion)
    if labels.any() and not labels.all():
        stats.auroc = image_auroc(labels, scores)
        fpr, tpr, _ = roc_curve(labels, scores)
        stats.roc = (fpr, tpr)
        precision, recall, _ = precision_recall_curve(labels, scores)
        stats.pr = (recall, precision)
    if labels.any():
        stats.f1, stats.f1_threshold = f1_max(labels, scores)
        stats.f1_confusion = Confusion.of(labels, scores >= stats.f1_threshold)
    defect_types = np.array([str(r.get("defect_type") or ("defect" if r["label"] else GOOD)) for r in scored])
    good = labels == 0
    for defect in sorted(set(defect_types[labels == 1].tolist())):
        mine = (defect_types == defect) & (labels == 1)
        subset = good | mine
        auroc = image_auroc(labels[subset], scores[subset]) if good.any() else math.nan
        stats.defects.append(DefectStats(defect, int(mine.sum()), int(decisions[mine].sum()), auroc))
    return stats


def _f1(confusion: Confusion) -> float:
    """2TP / (2TP + FP + FN); NaN when there is neither a defect nor a flag."""
    denominator = 2 * confusion.tp + confusion.fp + confusion.fn
    return 2 * confusion.tp / denominator if denominator else math.nan
