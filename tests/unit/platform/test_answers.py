"""The serving route's and the edge inferencer's answers carry a flagged image's fallback mask (``scored_map``)."""

import numpy as np
import pytest

from tsdn.predict import Detection
from tsdn_platform import edge, serve_model


def _detection(score: float, scored_map: np.ndarray | None) -> Detection:
    # the map (the finer stages) stays under the threshold; only the map the score reduces reaches it
    return Detection(
        anomaly_score=score,
        normalized_score=0.8 if score >= 2.0 else 0.3,
        is_anomalous=score >= 2.0,
        threshold=2.0,
        anomaly_map=np.ones((4, 8), np.float32),
        scored_map=scored_map,
    )


def test_both_routes_mark_where_the_scored_map_reaches_the_threshold():
    scored_map = np.zeros((4, 8), np.float32)
    scored_map[1:3, 2:4] = 3.0  # 4 of 32 pixels
    flagged = _detection(3.0, scored_map)
    (served,) = serve_model._answers([flagged], [frozenset()])
    edged = edge.answer(flagged, {"product": "p", "version": "v"}, "tsdn", "a.png", 1.0, 1)
    assert served["anomalous_area_pct"] == edged["anomalous_area_pct"] == pytest.approx(12.5)
    (normal,) = serve_model._answers([_detection(1.0, None)], [frozenset()])
    assert (normal["is_anomalous"], normal["anomalous_area_pct"]) == (False, 0.0)
