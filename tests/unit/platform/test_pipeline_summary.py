"""The table ``make demo`` and ``tsdn pipeline`` print (tsdn_platform.pipeline.format_summary)."""

from __future__ import annotations

import numpy as np

from tsdn.calibration import fit_calibration
from tsdn_platform.pipeline import PipelineResult, format_summary
from tsdn_platform.score import _threshold_summary
from tsdn_platform.train_config import ProductResult


def _result(calibrations: dict, metrics: dict) -> PipelineResult:
    train = {p: ProductResult(product=p, ok=True, family="tsdn", version=f"{p}-v1") for p in calibrations}
    train["gravel"] = ProductResult(product="gravel", ok=False, error="gravel: out of memory\ntraceback")
    score = {
        "metrics": metrics,
        "products": {p: {"calibration": _threshold_summary(c)} for p, c in calibrations.items()},
        "timings": {"images_per_s": 7.04},
    }
    return PipelineResult(ingest={}, train=train, score=score, timings={})


def test_the_table_shows_the_decisions_and_what_each_quantile_threshold_promises():
    quantile = fit_calibration([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    metrics = {
        "brick": {
            "image_auroc": 0.9633,
            "pixel_auroc": 0.9877,
            "aupro": 0.9787,
            "f1_max": 0.8696,
            "recall": 1.0,
            "false_positive_rate": 1 / 3,
        },
        "grass": {
            "image_auroc": 0.97,
            "pixel_auroc": 0.977,
            "aupro": 0.904,
            "f1_max": 0.905,
            "recall": 0.8,
            "false_positive_rate": 0.0,
        },
    }
    labelled = fit_calibration([0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.9], [0, 0, 0, 1])  # f1-optimal: no promise
    lines = format_summary(_result({"brick": quantile, "grass": labelled}, metrics)).splitlines()

    assert lines[0].split() == [
        "product",
        "family",
        "image",
        "AUROC",
        "pixel",
        "AUROC",
        "AUPRO",
        "F1-max",
        "recall",
        "FPR",
        "images/s",
        "version",
    ]
    assert lines[2].split() == [
        "brick",
        "tsdn",
        "0.963",
        "0.988",
        "0.979",
        "0.870",
        "1.000",
        "0.333",
        "7.0",
        "brick-v1",
    ]
    assert lines[3].split()[6:8] == ["0.800", "0.000"]
    assert lines[4] == "gravel       training failed: gravel: out of memory"
    assert lines[6] == "recall, FPR: the shares of defective and of good test images flagged at the threshold"
    assert lines[7].startswith("how often an unseen good image reaches each threshold")
    # the 99 % quantile of 10 normal scores: 9.91, reached by 9.9 % of unseen good images on average
    promise = "threshold 9.910 = the 99 % quantile of 10 normal images' scores: 9.9 %, up to 27.3 %"
    assert lines[8] == f"  brick        {promise}"
    assert len(lines) == 9


def test_without_ground_truth_or_calibration_the_table_says_nothing_it_cannot_know():
    result = _result({"brick": None}, {})
    lines = format_summary(result).splitlines()
    assert lines[2].split()[2:8] == ["n/a"] * 6
    assert len(lines) == 4  # header, rule, brick, gravel's failure: no legend and no promise


def test_a_threshold_set_for_a_target_rate_names_its_quantile_to_three_figures():
    """``target_false_positive_rate: 0.05`` with 30 held-out normals: the 98.1 % quantile (98.10344...)."""
    from tsdn.calibration import quantile_for_false_positive_rate

    quantile = quantile_for_false_positive_rate(30, 0.05)
    target = fit_calibration(np.linspace(1.0, 30.0, 30), quantile=quantile)
    lines = format_summary(_result({"brick": target}, {})).splitlines()
    assert "threshold 29.450 = the 98.1 % quantile of 30 normal images' scores: 5.0 %, up to 12.6 %" in lines[-1]


def test_the_summary_says_which_family_each_line_chose_and_whether_its_validation_could_tell():
    """Before, a two-family line showed only the family it promoted: nothing said the other was trained, by how
    much it lost on the validation, or that a few dozen held-out images could have ranked the two either way."""
    metric = "val.val_image_auroc"

    def chosen(values: dict, winner: str, resampled: dict | None) -> ProductResult:
        margin = values[winner] - min(values.values())
        selection = {"metric": metric, "values": values, "winner": winner, "margin": margin}
        if resampled:
            selection["resampled"] = {"images": 24, "draws": 2000, **resampled}
        return ProductResult(product="x", ok=True, family=winner, version="v1", selection=selection)

    train = {
        "brick": chosen({"tsdn": 0.98, "patchcore": 0.5}, "tsdn", {"low": 0.3, "high": 0.62, "runner_up_ahead": 0.0}),
        "gravel": chosen(
            {"tsdn": 0.66, "patchcore": 0.6528}, "tsdn", {"low": -0.05, "high": 0.07, "runner_up_ahead": 0.41}
        ),
        "grass": ProductResult(
            product="grass", ok=True, family="tsdn", version="v1", selection={"values": {"tsdn": 1}}
        ),
    }
    lines = format_summary(PipelineResult(ingest={}, train=train, score={}, timings={})).splitlines()
    at = lines.index("") + 1
    assert lines[at].startswith("the family chosen per line on val.val_image_auroc (the held-out normals")
    assert lines[at + 2 :] == [
        "  brick        tsdn 0.980 over patchcore 0.500: +0.480 (+0.300 to +0.620)",
        "  gravel       tsdn 0.660 over patchcore 0.653: +0.007 (-0.050 to +0.070): too close to call on 24 images "
        "(patchcore ahead on 41 % of resamples)",
    ]  # grass trained one family: nothing to say
    # A metric the resampling does not cover (here the test split's, asked for explicitly): the values and the margin.
    test_metric = chosen({"tsdn": 0.9, "patchcore": 0.95}, "patchcore", None)
    test_metric.selection["metric"] = "test.image_auroc"
    lines = format_summary(PipelineResult(ingest={}, train={"tile": test_metric}, score={}, timings={})).splitlines()
    assert lines[-2:] == [
        "the family chosen per line on test.image_auroc:",
        "  tile         patchcore 0.950 over tsdn 0.900: +0.050",
    ]
