"""The detect answer: one image's decision, scores and (on request) maps, as a JSON-safe dict.

The HTTP detect route and the standalone inferencer build their answers here, so both say the same thing
in the same fields. Only numpy and Pillow are imported: an edge box runs this without torch.

Fields (always):

- ``is_anomalous``: ``anomaly_score >= threshold``.
- ``anomaly_score``: the raw image score of the model (its score source's map, reduced by the model's
  image score: the maximum or a top-k mean), in the model's own units. A TSDN model with ``map_strides`` scores
  the map of every compared encoder stage and returns the map of the finer ones, in the score's units (its
  calibration's ``map_offset`` added).
- ``normalized_score``: the raw score mapped to [0, 1] by the model's calibration, linear from the lowest
  held-out normal score (0) through the threshold (0.5); ``normalized_score >= 0.5`` exactly when
  ``is_anomalous``.
- ``confidence``: how sure the decision is, in [0.5, 1]: ``normalized_score`` for an anomalous image,
  ``1 - normalized_score`` for a normal one.
- ``threshold``: the raw-score threshold applied (the calibrated one unless the request overrode it).
- ``anomalous_area_pct``: percentage of the image's pixels in the binary mask, at the image's own resolution.
  The mask is where the map is ``>= threshold`` on an image the decision flags, and empty on one it does not:
  it says where a flagged image is anomalous, so a normal decision never comes with an anomalous area. (Before
  2026-12-07 the mask was ``map >= threshold`` on every image. A model whose image score is a top-k mean, as
  the PatchCore presets', has map maxima above its scores, and that marked pixels on 67 % of transistor's and
  16 % of kolektor's good test images while their scores flagged 5 % and 6 %: ``BENCHMARKS.md``, "The mask
  and the decision".) A model whose map is not the one it scores (TSDN's ``map_strides``: the score from every
  encoder stage, the map from the finer ones) can flag an image that only a coarse stage sees, with no pixel of
  the map at the threshold: its mask is then where the map the score reduces (``scored_map``) is ``>= threshold``,
  so a flagged image says where. (Earlier, such an image came back with an area of 0; ``BENCHMARKS.md``, "The
  image score's own blur, and the mask of a flagged image".)
  At the network's resolution the map a score reduces always has a pixel at a flagged image's threshold (the
  score is its maximum or the mean of its top pixels); the mask at the image's resolution can still be empty where
  resizing lowers a peak that barely reaches it.

On request (``include``):

- ``mask``: the binary mask (as ``anomalous_area_pct`` counts it) as a grayscale PNG (0 / 255) at the image's
  resolution.
- ``anomaly_map``: the raw float map (the calibration's ``map_offset`` added), little-endian float16, row-major,
  base64, with its ``height`` and ``width``:
  ``np.frombuffer(base64.b64decode(m["data"]), "<f2").reshape(m["height"], m["width"])``.
- ``heatmap``: the map coloured with the inferno colormap (PNG), ``vmax`` = 2 x threshold, so the
  threshold sits mid-scale and heatmaps of one model compare by colour. Like ``anomaly_map``, it shows the map
  of every image, flagged or not.

Migrating clients:

============================  ==================================  ===========================
this API                      Amazon Lookout for Vision           anomalib
============================  ==================================  ===========================
``is_anomalous``              ``IsAnomalous``                     ``pred_label``
``anomaly_score``             (not exposed)                       ``pred_score`` (raw)
``normalized_score``          (not exposed)                       ``pred_score`` (normalised)
``confidence``                ``Confidence``                      (none)
``mask``                      ``AnomalyMask`` (colour per class)  ``pred_mask``
``anomalous_area_pct``        ``TotalPercentageArea``             (none)
``anomaly_map``               (none)                              ``anomaly_map``
``heatmap``                   (none)                              its visualiser's heat map
============================  ==================================  ===========================

Lookout for Vision's ``AnomalyMask`` colours each defect class; this model does not classify defects, so
the mask has one class. Lookout's ``Confidence`` is also the decision's confidence, so it maps one to one.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Collection
from typing import Any

import numpy as np

from tsdn.image import colorize, encode_png

__all__ = ["INCLUDES", "decode_float_map", "detect_answer", "threshold_problem"]

INCLUDES = ("mask", "anomaly_map", "heatmap")


def threshold_problem(threshold: float | None) -> str | None:
    """Why a requested threshold override cannot be applied, or None. Every family's raw scores are distances or
    probabilities (>= 0): a threshold <= 0 would flag every image, a NaN none (and is not JSON), and either would
    empty the heatmap's scale (2 x threshold)."""
    if threshold is None or (math.isfinite(threshold) and threshold > 0):
        return None
    return f"threshold: must be a finite number > 0, got {threshold}"


def detect_answer(
    *,
    anomaly_score: float,
    normalized_score: float,
    threshold: float,
    anomaly_map: np.ndarray,
    include: Collection[str] = (),
    scored_map: np.ndarray | None = None,
) -> dict[str, Any]:
    """The fields every detect answer carries, plus the maps named in ``include``.

    Args:
        anomaly_score: the raw image score.
        normalized_score: the calibrated score in [0, 1].
        threshold: the raw-score threshold the decision used.
        anomaly_map: (H, W) float raw map at the image's resolution, as :class:`tsdn.predict.Detection` has it.
        include: a subset of :data:`INCLUDES`.
        scored_map: (H, W) the map the score reduces, where it is not ``anomaly_map`` (``Detection.scored_map``): a
            flagged image's mask where ``anomaly_map`` reaches the threshold nowhere.

    Returns:
        A JSON-safe dict (the caller adds who answered: product, model version, timings).
    """
    unknown = set(include) - set(INCLUDES)
    if unknown:
        msg = f"include: unknown value(s) {', '.join(sorted(unknown))}; expected any of {', '.join(INCLUDES)}"
        raise ValueError(msg)
    if anomaly_map.ndim != 2 or anomaly_map.size == 0:
        msg = f"detect_answer: expected a non-empty (H, W) map, got shape {anomaly_map.shape}"
        raise ValueError(msg)
    if scored_map is not None and scored_map.shape != anomaly_map.shape:
        msg = f"detect_answer: scored_map {scored_map.shape} and anomaly_map {anomaly_map.shape} differ in shape"
        raise ValueError(msg)
    is_anomalous = bool(anomaly_score >= threshold)
    mask = (anomaly_map >= threshold) if is_anomalous else np.zeros(anomaly_map.shape, dtype=bool)
    if is_anomalous and scored_map is not None and not mask.any():
        mask = scored_map >= threshold  # only a stage the map leaves out saw it: say where the score did
    answer: dict[str, Any] = {
        "is_anomalous": is_anomalous,
        "anomaly_score": float(anomaly_score),
        "normalized_score": float(normalized_score),
        "confidence": float(normalized_score if is_anomalous else 1.0 - normalized_score),
        "threshold": float(threshold),
        "anomalous_area_pct": round(100.0 * float(mask.mean()), 4),
    }
    height, width = anomaly_map.shape
    if "mask" in include:
        answer["mask"] = _png_field(encode_png(mask.astype(np.uint8) * np.uint8(255)), height, width)
    if "heatmap" in include:
        vmax = 2.0 * threshold
        answer["heatmap"] = {**_png_field(encode_png(colorize(anomaly_map, vmax)), height, width), "vmax": vmax}
    if "anomaly_map" in include:
        raw = np.ascontiguousarray(anomaly_map, dtype="<f2").tobytes()
        answer["anomaly_map"] = {
            "format": "float16",
            "encoding": "base64",
            "byte_order": "little",
            "height": height,
            "width": width,
            "data": base64.b64encode(raw).decode("ascii"),
        }
    return answer


def decode_float_map(field: dict[str, Any]) -> np.ndarray:
    """The ``anomaly_map`` field of an answer -> (H, W) float32 array."""
    raw = base64.b64decode(field["data"])
    return np.frombuffer(raw, "<f2").reshape(field["height"], field["width"]).astype(np.float32)


def _png_field(png: bytes, height: int, width: int) -> dict[str, Any]:
    return {
        "format": "png",
        "encoding": "base64",
        "height": height,
        "width": width,
        "data": base64.b64encode(png).decode("ascii"),
    }
