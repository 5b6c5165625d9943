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
