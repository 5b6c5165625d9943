"""The training job's check of an ingested dataset against the model config (input size, SLIC settings)."""

from __future__ import annotations

import pytest

from tsdn_platform.config import ConfigError, load_config
from tsdn_platform.ingest import IngestConfig
from tsdn_platform.train import TrainConfig, manifest_problems


def _train(size: str) -> TrainConfig:
    return load_config(TrainConfig, "tiny", ["store=/tmp/s", "dataset=d", f"model.image_size={size}"])


CFG = _train("64")
SLIC = {"n_segments": CFG.model.n_segments, "compactness": CFG.model.slic_compactness}


def test_a_rectangular_size_matches_its_json_list_and_nothing_else():
    cfg = _train("[320, 128]")
    assert cfg.model.image_size == (320, 128)
    assert manifest_problems(cfg, "kolektor", {"image_size": [320, 128], "slic": SLIC}) == []
    for other in ([128, 320], 320, [320, 96]):
        problems = manifest_problems(cfg, "kolektor", {"image_size": other, "slic": SLIC})
        assert len(problems) == 1 and "model.image_size=(320, 128)" in problems[0], problems
    square = _train("192")
    assert manifest_problems(square, "p", {"image_size": 192, "slic": SLIC}) == []
    assert "re-ingest" in manifest_problems(square, "p", {"image_size": [192, 128], "slic": SLIC})[0]


def test_ingest_takes_either_spelling_of_the_size():
    base = ["source=/data", "store=/tmp/s", "dataset=d"]
    assert load_config(IngestConfig, None, [*base, "image_size=[320, 128]"]).image_size == (320, 128)
    assert load_config(IngestConfig, None, [*base, "image_size=192"]).image_size == 192
    with pytest.raises(ConfigError, match="image_size"):
        load_config(IngestConfig, None, [*base, "image_size=[320, 8]"])


def test_both_families_train_on_a_rectangular_dataset():
    sets = ["store=/tmp/s", "dataset=d", "families=[tsdn, patchcore]"]
    cfg = load_config(TrainConfig, "demo", [*sets, "model.image_size=[320, 128]", "patchcore.image_size=[320, 128]"])
    assert cfg.patchcore.input_shape == (320, 128)
    slic = {"n_segments": cfg.model.n_segments, "compactness": cfg.model.slic_compactness}
    manifest = {"image_size": [320, 128], "slic": slic}
    assert manifest_problems(cfg, "kolektor", manifest, "patchcore") == []
    square = load_config(TrainConfig, "demo", [*sets, "model.image_size=[320, 128]"])
    problems = manifest_problems(square, "kolektor", manifest, "patchcore")
    assert len(problems) == 1 and "patchcore.image_size=128" in problems[0], problems
