"""What training says about a small held-out split (tsdn_platform.train.small_holdout_warning)."""

from __future__ import annotations

import pytest

from tsdn_platform.config import ConfigError
from tsdn_platform.train import SMALL_HOLDOUT, check_holdout, small_holdout_warning


def test_a_small_held_out_split_is_named_with_its_size_and_folds():
    line = small_holdout_warning("grass", 4, [0])
    assert line == (
        "grass: only 4 held-out normal image(s) (holdout_folds [0]): the validation metrics and the family it "
        "promotes are rough estimates, and the calibrated threshold (the 99 % quantile of their scores) lets through "
        "20.6 % of good images on average, up to 53.5 % (95 % bound); hold out more folds or ingest more train images"
    )
    assert small_holdout_warning("grass", SMALL_HOLDOUT - 1, (0, 1)).startswith("grass: only 9 held-out")


def test_a_large_held_out_split_or_test_validation_says_nothing():
    assert small_holdout_warning("transistor", SMALL_HOLDOUT, [0]) is None
    assert small_holdout_warning("transistor", 27, [0]) is None
    assert small_holdout_warning("transistor", None, [0]) is None  # validation: test has no held-out split


def test_an_empty_held_out_split_is_refused_before_training():
    """Seen on 24 ingested images with holdout_folds [0]: the job trained, then failed at validation."""
    with pytest.raises(ConfigError, match=r"kolektor: no train image falls in holdout_folds \[0\]"):
        check_holdout("kolektor", 0, [0])
    check_holdout("kolektor", 1, [0])
    check_holdout("kolektor", None, [0])  # validation: test


def test_an_auto_position_blend_or_auto_flips_need_the_held_out_split():
    """``feature_position_shrinkage: auto`` (the `cpu` preset) and ``test_flips: auto`` (the `demo` preset) choose on
    the held-out normals; with ``validation: test`` there are none (and the test split must not choose), so the
    config is refused before any work."""
    from tsdn_platform.config import load_config
    from tsdn_platform.train import TrainConfig

    cfg = load_config(TrainConfig, "cpu", ["store=s", "dataset=d"])
    assert cfg.model.feature_position_shrinkage == "auto" and cfg.validation == "holdout"
    expected = r"validation.*'holdout' with model.feature_position_shrinkage or model.test_flips 'auto'"
    with pytest.raises(ConfigError, match=expected):
        load_config(
            TrainConfig, "cpu", ["store=s", "dataset=d", "model.feature_position_shrinkage=auto", "validation=test"]
        )
    demo = load_config(TrainConfig, "demo", ["store=s", "dataset=d"])
    assert demo.model.test_flips == "auto" and demo.validation == "holdout"
    with pytest.raises(ConfigError, match=expected):  # the mirrors are chosen on the held-out normals too
        load_config(TrainConfig, "demo", ["store=s", "dataset=d", "validation=test"])
    # without the per-position whitening the blend chooses nothing; with one view, test validation is the user's call
    pooled = ["store=s", "dataset=d", "model.feature_position_shrinkage=auto", "model.test_flips=1", "validation=test"]
    assert not load_config(TrainConfig, "demo", pooled).model.needs_held_out


def test_a_target_false_positive_rate_sets_the_quantile_and_is_refused_when_the_split_cannot_promise_it():
    """``target_false_positive_rate``: the threshold's quantile follows from the held-out split's size, and a
    target below 1 / (n + 1) fails before any training, naming the line, the target and the images it needs."""
    from tsdn_platform.train_eval import threshold_quantile

    assert threshold_quantile(10, None) == 0.99
    assert threshold_quantile(30, 0.05) == pytest.approx((30 - 0.05 * 31) / 29)
    check_holdout("transistor", 30, [0], 0.05)
    expected = (
        r"transistor: target_false_positive_rate 0.02: a threshold from 30 normal image\(s\) flags at least 3.2 % "
        r".* 2 % needs at least 49 held-out normal images \(holdout_folds \[0\] hold 30\); hold out more folds"
    )
    with pytest.raises(ConfigError, match=expected):
        check_holdout("transistor", 30, [0], 0.02)
    check_holdout("transistor", None, [0], None)
    line = small_holdout_warning("grass", 9, [0, 1, 2], 0.15)
    assert "(the 93.8 % quantile of their scores) lets through 15.0 % of good images on average" in line


def test_a_target_false_positive_rate_is_a_share_for_the_held_out_validation_and_names_its_own_run():
    from tsdn_platform.config import load_config
    from tsdn_platform.train import TrainConfig

    base = ["store=s", "dataset=d"]
    cfg = load_config(TrainConfig, "cpu", [*base, "target_false_positive_rate=0.05"])
    assert cfg.target_false_positive_rate == 0.05
    for bad in ("0", "0.5", "1.2"):
        with pytest.raises(ConfigError, match=r"target_false_positive_rate: expected a share in \(0, 0.5\)"):
            load_config(TrainConfig, "cpu", [*base, f"target_false_positive_rate={bad}"])
    with pytest.raises(ConfigError, match="target_false_positive_rate: expected null with validation 'test'"):
        load_config(TrainConfig, "paper", [*base, "target_false_positive_rate=0.05", "validation=test"])
    # the threshold is part of what a run publishes in its checkpoints: another target is another run, and a
    # config without one keeps the run name it had before the field existed
    unset = load_config(TrainConfig, "cpu", base)
    assert cfg.run_id("m") != unset.run_id("m")
    assert TrainConfig(store="s", dataset="d").run_id("m") == "d-b16776bdf470"  # its name at e9067d4, before the field


def test_a_failed_line_is_one_line_with_the_status_its_cause_calls_for():
    """Seen: ``tsdn train: gravel: ConfigError: gravel: no train image falls ...`` (the line named twice), then the
    product task's 9-line traceback although the mistake was the user's."""
    from tsdn_platform.store import StoreError
    from tsdn_platform.train import _failed

    mistake = _failed("gravel", ConfigError("gravel: no train image falls in holdout_folds [0], so ..."))
    assert (mistake.ok, mistake.status, mistake.error) == (
        False,
        2,
        "no train image falls in holdout_folds [0], so ...",
    )
    outage = _failed("gravel", StoreError("s3://b/k", "the store is unreachable: timeout", "unreachable"))
    assert (outage.status, outage.error) == (3, "s3://b/k: the store is unreachable: timeout")
    bug = _failed("gravel", RuntimeError("gravel: rank 0 returned nothing\nmore"))
    assert (bug.status, bug.error) == (1, "RuntimeError: gravel: rank 0 returned nothing")  # unexpected: its type
