"""The score job's driver reads each pinned version's model.json before any worker starts (no Ray here)."""

from __future__ import annotations

import json

import pytest

from tsdn.checkpoint import checkpoint_files
from tsdn_platform.registry import Registry, RegistryError
from tsdn_platform.score import ScoreConfig, _resolve_models, _threshold_summary
from tsdn_platform.testing import calibrate, tiny_model


def _register(tmp_path, calibration_edit=None) -> tuple[ScoreConfig, str]:
    store = str(tmp_path / "store")
    model = tiny_model("tsdn", seed=0)
    files = checkpoint_files(model, calibrate(model))
    if calibration_edit:
        meta = json.loads(files["model.json"])
        meta["calibration"].update(calibration_edit)
        files["model.json"] = json.dumps(meta).encode()
    version = Registry(store).register("alpha", files, {"family": "tsdn", "test": {}}, promote="always")
    cfg = ScoreConfig(store=store, input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    return cfg, version


def test_the_driver_keeps_each_products_calibration_for_the_manifest(tmp_path):
    cfg, version = _register(tmp_path)
    models = _resolve_models(cfg, ["alpha"])
    assert models.versions == {"alpha": version}
    summary = _threshold_summary(models.calibrations["alpha"])
    assert (summary["method"], summary["quantile"], summary["n_normal"]) == ("normal-quantile", 0.99, 6)
    assert summary["expected_false_positive_rate"] == pytest.approx((6 - 0.99 * 5) / 7)


def test_an_unreadable_calibration_fails_the_job_naming_the_file(tmp_path):
    cfg, version = _register(tmp_path, {"method": "guess"})
    with pytest.raises(RegistryError, match=rf"alpha/versions/{version}/model\.json: calibration: .*method"):
        _resolve_models(cfg, ["alpha"])
