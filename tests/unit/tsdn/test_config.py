"""TSDNConfig: paper defaults, validation, dict round trip, the ablation table."""

import dataclasses
import subprocess
import sys

import pytest

from tsdn.config import ABLATIONS, TSDNConfig, apply_ablation
from tsdn.config_io import ConfigError

SWITCHES = ("dcd_a", "skip", "surf", "fne")


def test_defaults_are_the_papers():
    cfg = TSDNConfig()
    assert (cfg.image_size, cfg.backbone, cfg.weights) == (352, "efficientnet_b5", "hub")
    assert (cfg.n_segments, cfg.n_filled, cfg.lr) == (400, 50, 7e-5)
    assert (cfg.w_l2, cfg.w_ssim, cfg.w_gms, cfg.w_mask, cfg.w_fne) == (1.0, 0.5, 1.0, 1.0, 5e-5)
    assert all(getattr(cfg, s) for s in SWITCHES)
    assert cfg.fne_pool_size == 352 // 32
    assert cfg.test_flips == 1  # the image alone


def test_dict_round_trip_and_yaml_style_numbers():
    cfg = TSDNConfig(image_size=64, backbone="test_efficientnet", weights="none", fne_pool=3, skip=False, fne=False)
    data = cfg.to_dict()
    assert data["fne_pool"] == 3 and data["skip"] is False
    assert TSDNConfig.from_dict(data) == cfg
    assert TSDNConfig.from_dict({"lr": "1e-4"}).lr == 1e-4
    assert TSDNConfig.from_dict(None) == TSDNConfig()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"image_size": 100}, "image_size"),
        ({"image_size": 32}, "image_size"),
        ({"feature_channels": 0}, "feature_channels"),
        ({"n_filled": 500}, "n_filled"),
        ({"lr": 0.0}, "lr"),
        ({"w_fne": -1.0}, "w_fne"),
        ({"ssim_window": 8}, "ssim_window"),
        ({"fne_pool": 0}, "fne_pool"),
        ({"backbone": " "}, "backbone"),
        ({"surf": False}, "dcd_a"),
        ({"dcd_a": False}, "fne"),
        ({"test_flips": 3}, "test_flips"),
        ({"test_flips": 0}, "test_flips"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"TSDNConfig\.{field}:"):
        TSDNConfig(**overrides)
    with pytest.raises(ConfigError, match=field):
        TSDNConfig.from_dict(overrides)


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match="bogus"):
        TSDNConfig.from_dict({"bogus": 1})


def test_ablation_table_matches_the_paper():
    assert sorted(ABLATIONS) == [f"t3{r}" for r in "abcd"] + [f"t4{r}" for r in "abcdef"]
    for name, overrides in ABLATIONS.items():
        cfg = apply_ablation(TSDNConfig(), name)
        assert set(overrides) == set(SWITCHES), name
        assert {s: getattr(cfg, s) for s in SWITCHES} == overrides
    # Rows the paper reports twice carry the same numbers in both tables.
    assert ABLATIONS["t3a"] == ABLATIONS["t4a"]
    assert ABLATIONS["t3b"] == ABLATIONS["t4c"]
    assert ABLATIONS["t3d"] == ABLATIONS["t4f"] == {s: True for s in SWITCHES}
    assert ABLATIONS["t3c"] == {"dcd_a": True, "skip": False, "surf": True, "fne": True}
    assert ABLATIONS["t4e"] == {"dcd_a": True, "skip": True, "surf": True, "fne": False}
    assert not ABLATIONS["t4d"]["dcd_a"] and ABLATIONS["t4d"]["surf"] and ABLATIONS["t4d"]["skip"]


def test_apply_ablation_keeps_other_fields_and_rejects_unknown_rows():
    base = TSDNConfig(image_size=64, lr=1e-3)
    cfg = apply_ablation(base, "t3a")
    assert dataclasses.replace(cfg, **{s: True for s in SWITCHES}) == base
    with pytest.raises(ValueError, match="t9z"):
        apply_ablation(base, "t9z")


def test_package_exports_resolve_lazily():
    code = (
        "import sys, tsdn\n"
        "assert 'torch' not in sys.modules, 'import tsdn must not import torch'\n"
        "assert all(getattr(tsdn, name) is not None for name in tsdn.__all__)\n"
        "assert tsdn.TSDNConfig is __import__('tsdn.config').config.TSDNConfig\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_rectangular_image_size_round_trips_and_is_checked():
    cfg = TSDNConfig(image_size=[320, 128], backbone="test_efficientnet", weights="none")
    assert cfg.image_size == (320, 128) and cfg.input_shape == (320, 128)
    assert cfg.fne_pool_size == 128 // 32  # the short side
    data = cfg.to_dict()
    assert data["image_size"] == [320, 128]
    assert TSDNConfig.from_dict(data) == cfg
    assert TSDNConfig(image_size=192).input_shape == (192, 192)
    assert TSDNConfig.from_dict({**data, "image_size": 192}).image_size == 192
    for bad in ([320], [320, 100], [320, 128, 64], (32, 64)):
        with pytest.raises(ConfigError, match="image_size"):
            TSDNConfig(image_size=bad)
    with pytest.raises(ConfigError, match="image_size"):
        TSDNConfig.from_dict({**data, "image_size": "320x128"})
