import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.metrics import precision_recall_curve as sk_precision_recall_curve
from sklearn.metrics import roc_curve as sk_roc_curve

from tsdn.metrics import (
    UndefinedMetricError,
    _weighted_auroc,
    aupro,
    evaluate,
    f1_max,
    image_auroc,
    paired_auroc_gap,
    pixel_auroc,
    precision_recall_curve,
    roc_curve,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_matches_sklearn_with_ties(seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounding creates many ties across classes
    assert len(np.unique(scores)) < 100
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)


def test_auroc_extremes_and_all_tied():
    labels = np.array([0, 0, 1, 1])
    assert image_auroc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert image_auroc(labels, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert image_auroc(labels, np.full(4, 0.5)) == 0.5


def test_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(3)
    masks = rng.random((4, 16, 16)) < 0.1
    maps = np.round(rng.random((4, 16, 16)) + masks * 0.3, 2).astype(np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_aupro_counts_regions_equally_not_pixels():
    # region A = pixels 0-2 (3 px), region B = pixel 4; normal pixels 3 and 5.
    masks = np.array([[[1, 1, 1, 0, 1, 0]]], bool)
    maps = np.array([[[0.9, 0.9, 0.1, 0.5, 0.8, 0.0]]])
    # At FPR 0 (threshold 0.8): A overlaps 2/3, B 1 -> PRO 5/6, flat until FPR 1/2 (threshold 0.5).
    # Area up to 0.3 = 0.3 * 5/6; normalised: 5/6. A pixel-weighted overlap would give 3/4.
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(5 / 6)


def test_aupro_hand_computed_with_interpolation():
    # two 1-pixel regions (not 8-connected), six normal pixels
    masks = np.array([[[1, 0, 0, 1], [0, 0, 0, 0]]], bool)
    maps = np.array([[[0.9, 0.8, 0.4, 0.5], [0.3, 0.2, 0.1, 0.0]]])
    # curve: (0,0) (0,.5)@0.9 (1/6,.5)@0.8 (1/6,1)@0.5 (2/6,1)@0.4 ...
    expected = (0.5 * (1 / 6) + 1.0 * (0.3 - 1 / 6)) / 0.3
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(expected)
    # at fpr_limit = 0.25 the curve is cut inside the flat PRO = 1 segment
    assert aupro(masks, maps, fpr_limit=0.25) == pytest.approx((0.5 / 6 + (0.25 - 1 / 6)) / 0.25)


def test_aupro_regions_are_8_connected_and_span_images():
    # diagonal pixels form ONE region; a second image adds a second region
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True
    masks[1, 3, 3] = True
    maps = np.zeros((2, 4, 4))
    maps[0, 0, 0] = 1.0  # half of region 1 detected at FPR 0
    maps[1, 3, 3] = 1.0  # all of region 2 detected at FPR 0
    # PRO at FPR 0 = (1/2 + 1) / 2 = 0.75 until every remaining pixel (all score 0) enters at FPR 1.
    expected_pro_at_limit = 0.75 + (1 - 0.75) * 0.3
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx((0.75 + expected_pro_at_limit) / 2)


def test_aupro_perfect_and_sampled_thresholds():
    rng = np.random.default_rng(4)
    masks = np.zeros((3, 32, 32), bool)
    masks[0, 4:10, 4:12] = masks[1, 20:30, 2:5] = True
    maps = rng.random(masks.shape) * 0.5 + masks * 0.6
    assert aupro(masks, maps) == pytest.approx(1.0)
    noisy = rng.random(masks.shape) + masks * 0.3
    exact = aupro(masks, noisy)
    assert 0 < exact < 1
    assert aupro(masks, noisy, num_thresholds=2000) == pytest.approx(exact, abs=0.01)
    assert aupro(masks[:, None], noisy[:, None]) == exact


def test_aupro_undefined_without_defects():
    with pytest.raises(UndefinedMetricError, match="regions"):
        aupro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4)))


@pytest.mark.parametrize("seed", [0, 5])
def test_f1_max_matches_brute_force(seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(labels, 1.0), 1)
    f1, threshold = f1_max(labels, scores)
    brute = max((f1_score(labels, scores >= t), t) for t in np.unique(scores))
    assert f1 == pytest.approx(brute[0], abs=1e-12)
    assert f1_score(labels, scores >= threshold) == pytest.approx(f1, abs=1e-12)


def test_f1_max_separable():
    f1, threshold = f1_max(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.7, 0.9]))
    assert (f1, threshold) == (1.0, 0.7)


def test_evaluate_full_and_degenerate():
    rng = np.random.default_rng(6)
    masks = np.zeros((4, 8, 8), bool)
    masks[2, 1:4, 1:4] = masks[3, 5:7, 5:7] = True
    labels = masks.reshape(4, -1).any(axis=1).astype(int)
    maps = rng.random(masks.shape) + masks
    scores = maps.reshape(4, -1).max(axis=1)
    result = evaluate(labels, scores, masks, maps)
    assert set(result) == {"image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_threshold"}
    assert result["image_auroc"] == image_auroc(labels, scores)
    assert result["pixel_auroc"] == pixel_auroc(masks, maps)
    assert result["aupro"] == aupro(masks, maps)
    assert evaluate(labels, scores).keys() == {"image_auroc", "f1_max", "f1_threshold"}
    only_normal = evaluate(np.zeros(3), np.array([0.1, 0.2, 0.3]))
    assert all(math.isnan(v) for v in only_normal.values())


def test_evaluate_counts_the_shipped_decisions():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.4, 0.8, 0.95])
    flagged = scores >= 0.5  # one good image of 4 and two defects of 3
    result = evaluate(labels, scores, flagged=flagged)
    assert result["recall"] == pytest.approx(2 / 3) and result["false_positive_rate"] == 0.25
    only_normal = evaluate(np.zeros(2), np.array([0.1, 0.9]), flagged=np.array([False, True]))
    assert math.isnan(only_normal["recall"]) and only_normal["false_positive_rate"] == 0.5
    with pytest.raises(ValueError, match="flagged has shape"):
        evaluate(labels, scores, flagged=flagged[:3])


def test_invalid_inputs_raise():
    with pytest.raises(UndefinedMetricError, match="only one class"):
        image_auroc(np.ones(3), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="NaN"):
        image_auroc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="0/1"):
        image_auroc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="together"):
        evaluate(np.array([0, 1]), np.array([0.1, 0.2]), masks=np.zeros((2, 2, 2), bool))


@pytest.mark.parametrize("seed", [0, 1])
def test_curves_match_sklearn_with_ties(seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.random(60) + 0.4 * labels, 1)  # many ties
    fpr, tpr, thresholds = roc_curve(labels, scores)
    want = sk_roc_curve(labels, scores, drop_intermediate=False)
    for got, expected in zip((fpr, tpr, thresholds), want):
        np.testing.assert_allclose(got, expected)
    assert np.trapezoid(tpr, fpr) == pytest.approx(image_auroc(labels, scores))
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    sk_precision, sk_recall, sk_thresholds = sk_precision_recall_curve(labels, scores)
    np.testing.assert_allclose(precision, sk_precision[:-1][::-1])
    np.testing.assert_allclose(recall, sk_recall[:-1][::-1])
    np.testing.assert_allclose(thresholds, sk_thresholds[::-1])


def test_curves_need_their_classes():
    with pytest.raises(UndefinedMetricError, match="only one class"):
        roc_curve(np.zeros(3), np.arange(3.0))
    with pytest.raises(UndefinedMetricError, match="no anomalous sample"):
        precision_recall_curve(np.zeros(3), np.arange(3.0))


def test_paired_auroc_gap_resamples_both_models_on_the_same_draws():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30), np.ones(20)].astype(int)
    scores = rng.normal(size=50) + 0.8 * labels
    scores[3] = scores[40]  # a tie between a normal and an anomalous image counts half
    positive = labels.astype(bool)
    one_each = _weighted_auroc(scores, positive, np.ones((1, 30)), np.ones((1, 20)))
    assert one_each[0] == pytest.approx(image_auroc(labels, scores)) == pytest.approx(roc_auc_score(labels, scores))
    twice = np.ones((1, 30))
    twice[0, 0] = 2
    weighted = np.r_[scores[:30], scores[:1], scores[30:]], np.r_[labels[:30], 0, labels[30:]]
    assert _weighted_auroc(scores, positive, twice, np.ones((1, 20)))[0] == pytest.approx(image_auroc(*weighted[::-1]))
    assert paired_auroc_gap(labels, scores, scores) == (0.0, 0.0, 0.0)  # the same model: no gap on any draw
    better = scores + 5 * labels  # separates every pair
    low, high, worse_ahead = paired_auroc_gap(labels, better, scores, seed=1)
    assert 0 < low < 1 - image_auroc(labels, scores) < high and worse_ahead == 0.0
    rival = scores + np.random.default_rng(5).normal(scale=0.3, size=50)  # nearly the same model: a close call
    low, high, ahead = paired_auroc_gap(labels, scores, rival)
    assert low < 0 < high and 0 < ahead < 1
    assert paired_auroc_gap(labels, scores, better, seed=7) == paired_auroc_gap(labels, scores, better, seed=7)
    with pytest.raises(UndefinedMetricError):
        paired_auroc_gap(np.zeros(4, int), np.arange(4.0), np.arange(4.0))
