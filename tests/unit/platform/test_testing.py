"""tsdn_platform.testing: the tiny registered models every scoring, serving and export test starts from."""

from __future__ import annotations

import numpy as np
import pytest

from tsdn_platform.registry import Registry
from tsdn_platform.testing import calibrate, register, tiny_model


@pytest.mark.parametrize("family", ["tsdn", "patchcore"])
def test_a_tiny_model_registers_and_loads_back_as_a_predictor(family, tmp_path):
    registry = Registry(str(tmp_path))
    model = tiny_model(family, seed=3)
    version = register(registry, "bottle", model, calibrate(model, seed=3))
    assert registry.best("bottle")["version"] == version
    assert registry.metrics("bottle", version)["family"] == family
    predictor, ref = registry.load_predictor("bottle")
    assert ref.version == version
    rgb = np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    (detection,) = predictor.predict([rgb])
    assert detection.anomaly_map.shape == (80, 96) and np.isfinite(detection.anomaly_score)


def test_same_seed_same_weights_and_unknown_families_are_refused():
    a, b = tiny_model("tsdn", seed=1), tiny_model("tsdn", seed=1)
    assert all((x == y).all() for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="family 'vae'"):
        tiny_model("vae")
