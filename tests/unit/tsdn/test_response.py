"""tsdn.response: the detect answer's fields, maps on request, and its numpy-only imports."""

import base64
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tsdn.response import INCLUDES, decode_float_map, detect_answer

RNG = np.random.default_rng(3)


def _answer(score: float, normalized: float, threshold: float, anomaly_map: np.ndarray, include=()):
    return detect_answer(
        anomaly_score=score, normalized_score=normalized, threshold=threshold, anomaly_map=anomaly_map, include=include
    )


def test_decision_confidence_and_area():
    anomaly_map = np.zeros((10, 20), np.float32)
    anomaly_map[:2, :5] = 3.0  # 10 of 200 pixels at or above the threshold
    anomalous = _answer(3.0, 0.8, 2.0, anomaly_map)
    assert anomalous == {
        "is_anomalous": True,
        "anomaly_score": 3.0,
        "normalized_score": 0.8,
        "confidence": 0.8,
        "threshold": 2.0,
        "anomalous_area_pct": 5.0,
    }
    normal = _answer(1.0, 0.3, 2.0, np.full((4, 4), 1.0, np.float32))
    assert (normal["is_anomalous"], normal["confidence"], normal["anomalous_area_pct"]) == (False, 0.7, 0.0)
    at_threshold = _answer(2.0, 0.5, 2.0, np.full((4, 4), 2.0, np.float32))
    assert at_threshold["is_anomalous"] and at_threshold["anomalous_area_pct"] == 100.0


def test_a_normal_decision_has_an_empty_mask_even_where_its_map_reaches_the_threshold():
    """A top-k image score (PatchCore's presets) sits below the map's maximum: the pixels above the threshold of
    an image the score does not flag are not reported as an anomalous area; the raw map still shows them."""
    anomaly_map = np.zeros((8, 8), np.float32)
    anomaly_map[0, 0] = 5.0  # one hot pixel; the top-k score stays below the threshold
    normal = _answer(1.5, 0.4, 2.0, anomaly_map, include=INCLUDES)
    assert (normal["is_anomalous"], normal["anomalous_area_pct"]) == (False, 0.0)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(normal["mask"]["data"]))))
    assert mask.shape == (8, 8) and not mask.any()
    assert decode_float_map(normal["anomaly_map"])[0, 0] == 5.0
    flagged = _answer(2.5, 0.7, 2.0, anomaly_map, include=("mask",))
    assert flagged["anomalous_area_pct"] == pytest.approx(100 / 64, abs=1e-4)
    empty = _answer(2.5, 0.7, 2.0, np.ones((8, 8), np.float32))  # flagged, no pixel at the threshold: said so
    assert (empty["is_anomalous"], empty["anomalous_area_pct"]) == (True, 0.0)


def test_a_flagged_image_whose_map_misses_the_threshold_gets_the_mask_of_the_map_its_score_reduces():
    """``map_strides``: the score reads every stage, the map the finer ones. Where the map reaches the threshold the
    mask is the map's; where it reaches it nowhere, the score map's region; a normal image's stays empty."""
    anomaly_map = np.ones((8, 8), np.float32)
    scored_map = np.zeros((8, 8), np.float32)
    scored_map[2:4, 5:8] = 3.0  # 6 pixels: what only the coarse stage saw
    fallback = detect_answer(
        anomaly_score=3.0, normalized_score=0.8, threshold=2.0, anomaly_map=anomaly_map, include=("mask",),
        scored_map=scored_map,
    )  # fmt: skip
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(fallback["mask"]["data"]))))
    np.testing.assert_array_equal(mask == 255, scored_map >= 2.0)
    assert fallback["anomalous_area_pct"] == pytest.approx(100 * 6 / 64, abs=1e-4)
    anomaly_map[0, 0] = 2.5  # the map marks a pixel: its mask, not the score map's
    own = detect_answer(
        anomaly_score=3.0, normalized_score=0.8, threshold=2.0, anomaly_map=anomaly_map, scored_map=scored_map
    )
    assert own["anomalous_area_pct"] == pytest.approx(100 / 64, abs=1e-4)
    normal = detect_answer(
        anomaly_score=1.5, normalized_score=0.4, threshold=2.0, anomaly_map=anomaly_map, scored_map=scored_map
    )
    assert normal["anomalous_area_pct"] == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        detect_answer(
            anomaly_score=3.0, normalized_score=0.8, threshold=2.0, anomaly_map=anomaly_map, scored_map=scored_map[:4]
        )


def test_maps_on_request_decode_to_what_was_computed():
    anomaly_map = RNG.uniform(0.0, 4.0, (30, 50)).astype(np.float32)
    answer = _answer(3.9, 0.9, 2.0, anomaly_map, include=INCLUDES)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]["data"]))))
    assert (answer["mask"]["height"], answer["mask"]["width"], mask.dtype) == (30, 50, np.uint8)
    np.testing.assert_array_equal(mask == 255, anomaly_map >= 2.0)
    assert set(np.unique(mask)) == {0, 255}
    assert answer["anomalous_area_pct"] == pytest.approx(100 * (anomaly_map >= 2.0).mean(), abs=1e-4)
    raw = decode_float_map(answer["anomaly_map"])
    assert raw.shape == (30, 50)
    np.testing.assert_allclose(raw, anomaly_map, rtol=1e-3)  # float16: 11 significant bits
    heat = Image.open(io.BytesIO(base64.b64decode(answer["heatmap"]["data"])))
    assert (heat.mode, heat.size, answer["heatmap"]["vmax"]) == ("RGB", (50, 30), 4.0)


def test_bad_include_and_bad_maps_are_refused():
    with pytest.raises(ValueError, match=r"include: unknown value.*reconstruction"):
        _answer(1.0, 0.5, 1.0, np.zeros((2, 2)), include=("reconstruction",))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        _answer(1.0, 0.5, 1.0, np.zeros((1, 2, 2)))


def test_the_module_needs_neither_torch_nor_ray():
    code = "import sys, tsdn.response; print(sorted(m for m in ('torch', 'ray', 'timm') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
