import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from tsdn.config_io import ConfigError
from tsdn.scoring import Calibration, fit_calibration, gaussian_kernel_size, image_score, score_map


def test_identical_images_give_a_zero_map():
    image = torch.rand(2, 3, 32, 32)
    for sigma in (0.0, 2.0):
        anomaly_map = score_map(image, image.clone(), sigma)
        assert anomaly_map.shape == (2, 1, 32, 32)
        assert torch.count_nonzero(anomaly_map) == 0


def test_unblurred_map_is_the_channel_l2_distance():
    image = torch.zeros(1, 3, 4, 4)
    reconstruction = image.clone()
    reconstruction[0, :, 1, 2] = torch.tensor([0.3, 0.4, 0.0])  # distance 0.5
    anomaly_map = score_map(image, reconstruction, sigma=0)
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 1, 2] = 0.5
    torch.testing.assert_close(anomaly_map, expected)
    torch.testing.assert_close(image_score(anomaly_map), torch.tensor([0.5]))


def test_blur_keeps_shape_and_mass_and_lowers_the_peak():
    image = torch.zeros(2, 3, 48, 40)
    reconstruction = image.clone()
    reconstruction[:, :, 20:24, 18:22] = 1.0
    sharp = score_map(image, reconstruction, sigma=0)
    blurred = score_map(image, reconstruction, sigma=2.0)
    assert blurred.shape == (2, 1, 48, 40)
    assert (blurred >= 0).all()
    # a normalised kernel far from the border preserves the total and spreads the peak
    torch.testing.assert_close(blurred.sum(dim=(1, 2, 3)), sharp.sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-4)
    assert (image_score(blurred) < image_score(sharp)).all()
    assert blurred[0, 0].argmax() // 40 in range(20, 24)


def test_blur_on_images_smaller_than_the_kernel():
    assert gaussian_kernel_size(4.0) == 25
    image = torch.rand(1, 3, 8, 8)
    anomaly_map = score_map(image, torch.zeros_like(image), sigma=4.0)
    assert anomaly_map.shape == (1, 1, 8, 8) and torch.isfinite(anomaly_map).all()


def test_image_score_is_the_max_per_sample():
    maps = torch.rand(3, 1, 5, 6)
    torch.testing.assert_close(image_score(maps), maps.reshape(3, -1).max(dim=1).values)


def test_quantile_calibration():
    normal = np.arange(101, dtype=np.float64)  # 0 .. 100
    cal = fit_calibration(normal, quantile=0.9)
    assert cal.method == "normal-quantile"
    assert cal.threshold == pytest.approx(90.0)
    assert (cal.score_min, cal.score_max, cal.n_normal) == (0.0, 100.0, 101)
    assert cal.score_mean == pytest.approx(50.0) and cal.score_std == pytest.approx(normal.std())
    assert cal.score_quantiles == pytest.approx({"0.5": 50.0, "0.9": 90.0, "0.95": 95.0, "0.99": 99.0})
    # labels without anomalies keep the quantile rule
    assert fit_calibration(normal, normal, np.zeros(101), quantile=0.9).method == "normal-quantile"


@pytest.mark.parametrize(("n", "quantile"), [(10, 0.99), (12, 0.99), (30, 0.9), (100, 0.99)])
def test_the_false_positive_rate_of_a_quantile_threshold_matches_a_simulation(n: int, quantile: float):
    """Distribution-free, so uniform normal scores stand for any: the rate an unseen normal reaches the threshold
    is 1 - threshold. The expected rate is exact; the fractional bound lies within 0.01 of the simulated one."""
    from tsdn.calibration import quantile_false_positive_rate

    rng = np.random.default_rng(n)
    rates = 1.0 - np.quantile(rng.random((100_000, n)), quantile, axis=1)
    expected, bound = quantile_false_positive_rate(n, quantile)
    assert expected == pytest.approx(rates.mean(), abs=0.002)
    assert bound == pytest.approx(np.quantile(rates, 0.95), abs=0.01)


def test_the_false_positive_rate_at_the_maximum_is_exact_and_a_calibration_reports_its_own():
    from tsdn.calibration import quantile_false_positive_rate

    assert quantile_false_positive_rate(10, 1.0) == pytest.approx((1 / 11, 1 - 0.05 ** (1 / 10)))
    assert quantile_false_positive_rate(10, 1.0, confidence=0.5) == pytest.approx((1 / 11, 1 - 0.5 ** (1 / 10)))
    cal = fit_calibration(np.linspace(0.0, 1.0, 10))
    assert cal.false_positive_rate() == quantile_false_positive_rate(10, 0.99)
    assert cal.false_positive_rate()[0] == pytest.approx(0.0991, abs=1e-4)  # not the nominal 1 %
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    scores = rng.normal(labels * 2.0, 1.0)
    assert fit_calibration(scores[labels == 0], scores, labels).false_positive_rate() is None  # not a quantile
    with pytest.raises(ValueError, match="n_normal must be at least 1"):
        quantile_false_positive_rate(0, 0.99)
    with pytest.raises(ValueError, match="confidence"):
        quantile_false_positive_rate(10, 0.99, confidence=1.0)


@pytest.mark.parametrize(("n", "rate"), [(10, 1 / 11), (30, 0.05), (30, 0.1), (99, 0.01), (200, 0.02)])
def test_a_target_false_positive_rate_gives_the_quantile_whose_simulated_rate_it_is(n: int, rate: float):
    """The inverse of the expected rate: a threshold at the returned quantile of n uniform normal scores lets
    through ``rate`` of unseen normals on average (100 000 simulated draws of the n)."""
    from tsdn.calibration import quantile_false_positive_rate, quantile_for_false_positive_rate

    quantile = quantile_for_false_positive_rate(n, rate)
    assert 0.5 < quantile <= 1.0
    assert quantile_false_positive_rate(n, quantile)[0] == pytest.approx(rate)
    rng = np.random.default_rng(n)
    simulated = 1.0 - np.quantile(rng.random((100_000, n)), quantile, axis=1)
    assert simulated.mean() == pytest.approx(rate, abs=0.002)


def test_a_target_rate_below_what_the_normal_images_can_promise_names_the_images_it_needs():
    from tsdn.calibration import quantile_for_false_positive_rate

    assert quantile_for_false_positive_rate(10, 1 / 11) == 1.0  # the maximum: the lowest 10 images can promise
    with pytest.raises(ValueError, match=r"from 10 normal image\(s\) flags at least 9.1 %.* 5 % needs at least 19"):
        quantile_for_false_positive_rate(10, 0.05)
    with pytest.raises(ValueError, match=r"1 % needs at least 99 held-out"):
        quantile_for_false_positive_rate(30, 0.01)
    for rate in (0.0, 0.5, -0.1):
        with pytest.raises(ValueError, match=r"rate must lie in \(0, 0.5\)"):
            quantile_for_false_positive_rate(30, rate)


def test_f1_calibration():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    scores = rng.normal(labels * 2.0, 1.0)
    cal = fit_calibration(scores[labels == 0], scores, labels)
    assert cal.method == "f1-optimal"
    best = max(f1_score(labels, scores >= t) for t in scores)
    assert f1_score(labels, cal.is_anomalous(scores)) == pytest.approx(best)


def test_calibration_round_trips_through_json():
    cal = fit_calibration(np.linspace(0.1, 0.4, 20))
    clone = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert clone == cal
    with pytest.raises(ConfigError, match="unknown"):
        Calibration.from_dict({**cal.to_dict(), "extra": 1})
    with pytest.raises(ConfigError, match="method"):
        Calibration.from_dict({**cal.to_dict(), "method": "guess"})


def test_normalize_maps_min_to_zero_threshold_to_half_and_is_monotone():
    cal = fit_calibration(np.array([1.0, 2.0, 3.0]), quantile=1.0)  # min 1, threshold 3
    assert cal.normalize(1.0) == 0.0 and cal.normalize(3.0) == 0.5 and cal.normalize(5.0) == 1.0
    assert cal.normalize(-10.0) == 0.0 and cal.normalize(99.0) == 1.0
    grid = np.linspace(-5, 10, 301)
    normalized = cal.normalize(grid)
    assert normalized.shape == grid.shape
    assert (np.diff(normalized) >= 0).all() and normalized.min() == 0.0 and normalized.max() == 1.0
    tensor = cal.normalize(torch.tensor(grid))
    np.testing.assert_allclose(tensor.numpy(), normalized)
    assert ((cal.normalize(grid) >= 0.5) == cal.is_anomalous(grid)).all()


def test_normalize_follows_an_overridden_threshold():
    cal = fit_calibration(np.array([1.0, 2.0, 3.0]), quantile=1.0)  # min 1, threshold 3
    assert cal.normalize(2.0, threshold=2.0) == 0.5 and cal.normalize(3.0, threshold=2.0) == 1.0
    grid = np.linspace(-5, 10, 301)
    for limit in (0.5, 1.0, 2.0, 6.0):  # below, at and above score_min: >= 0.5 exactly at or above the override
        assert ((cal.normalize(grid, threshold=limit) >= 0.5) == (grid >= limit)).all()


def test_normalize_degenerate_calibration_is_a_step():
    cal = fit_calibration(np.full(5, 2.0))
    assert cal.threshold == cal.score_min == 2.0
    assert cal.normalize(1.99) == 0.0 and cal.normalize(2.0) == 0.5 and cal.normalize(2.01) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"normal_scores": np.array([])}, "empty"),
        ({"normal_scores": np.array([0.1, math.nan])}, "NaN"),
        ({"normal_scores": np.array([0.1]), "quantile": 1.5}, "quantile"),
        ({"normal_scores": np.array([0.1]), "scores": np.array([0.1])}, "together"),
        ({"normal_scores": np.array([0.1]), "scores": np.array([0.1, np.nan]), "labels": np.array([0, 1])}, "NaN"),
    ],
)
def test_fit_calibration_rejects_bad_input(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        fit_calibration(**kwargs)
