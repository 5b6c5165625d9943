"""The HTTP API's typed contract: response models, the detect request body, and what a product exposes.

``serve.py`` answers with these models, so ``/openapi.json`` documents every field a client reads. The
field meanings of a detect answer are :mod:`tsdn.response`'s (with the Lookout for Vision and anomalib
names beside them); this module only types them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from tsdn.calibration import Calibration
from tsdn.config_io import ConfigError

__all__ = [
    "DETECT_REQUEST_BODY",
    "DetectResponse",
    "ErrorResponse",
    "FloatMap",
    "PngImage",
    "ProductDetails",
    "ProductList",
    "ProductSummary",
    "product_details",
    "product_summary",
]

# The detect body is read raw (so the size limit is enforced while reading), so FastAPI cannot infer it:
# this is what the route declares in the OpenAPI document, and what Swagger-like clients upload.
DETECT_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": "the image: a PNG, JPEG, BMP or TIFF file as the body, or a multipart upload with one file",
    "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "image/bmp": {"schema": {"type": "string", "format": "binary"}},
        "image/tiff": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}

# metrics.json keys a client may see in the details route; local paths (checkpoint, run_uri) never leave.
_PRIVATE_KEYS = frozenset({"checkpoint", "run_uri"})


class ErrorResponse(BaseModel):
    status: int = Field(description="the HTTP status code")
    reason: str = Field(description="what was wrong, in one line")


class PngImage(BaseModel):
    format: str = Field("png", description="always png")
    encoding: str = Field("base64", description="always base64")
    height: int
    width: int
    data: str = Field(description="the PNG file, base64")
    vmax: float | None = Field(None, description="heatmap only: the map value drawn at the top of the colormap")


class FloatMap(BaseModel):
    format: str = Field("float16", description="always float16")
    encoding: str = Field("base64", description="always base64")
    byte_order: str = Field("little", description="always little")
    height: int
    width: int
    data: str = Field(description='row-major values: np.frombuffer(b64decode(data), "<f2").reshape(height, width)')


class DetectResponse(BaseModel):
    """One image's answer (the fields are documented in :mod:`tsdn.response`)."""

    product: str
    model_version: str
    family: str = Field(description="the model family that answered: tsdn or patchcore")
    is_anomalous: bool = Field(description="anomaly_score >= threshold (Lookout for Vision IsAnomalous)")
    anomaly_score: float = Field(description="the raw image score, in the model's units")
    normalized_score: float = Field(description="the score calibrated to [0, 1]; >= 0.5 exactly when anomalous")
    confidence: float = Field(description="confidence in the decision, in [0.5, 1] (Lookout for Vision Confidence)")
    threshold: float = Field(description="the raw-score threshold applied")
    anomalous_area_pct: float = Field(
        description="% of pixels in the mask (map >= threshold on a flagged image, or where the map reaches it "
        "nowhere, the map the score reduces >= threshold; none on a normal one): TotalPercentageArea"
    )
    inference_ms: float = Field(description="the predict call of the batch this image was in")
    batch_size: int = Field(description="images in that call")
    mask: PngImage | None = Field(
        None, description="include=mask: binary mask PNG (0/255) at the image's size, empty unless flagged"
    )
    anomaly_map: FloatMap | None = Field(None, description="include=anomaly_map: the raw float16 map")
    heatmap: PngImage | None = Field(None, description="include=heatmap: inferno PNG, vmax = 2 x threshold")


class ProductSummary(BaseModel):
    product: str
    model_version: str
    family: str
    promoted_at: str | None = None
    image_size: int | list[int] | None = Field(
        None, description="the network's input size in pixels: S (square) or [H, W]"
    )
    score_source: str | None = Field(None, description="TSDN only: which map the image score comes from")
    threshold: float | None = Field(None, description="the calibrated raw-score threshold")
    expected_false_positive_rate: float | None = Field(
        None,
        description="a threshold at a quantile of held-out normal scores: how often an unseen good image reaches it "
        "on average (order statistics of their number; null for other thresholds)",
    )
    false_positive_rate_95: float | None = Field(
        None, description="the same rate's one-sided 95 % upper bound (the held-out normals may be a lucky draw)"
    )
    metrics: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="numbers by split: val (synthetic defects on held-out normals), test"
    )


class ProductList(BaseModel):
    products: list[ProductSummary]


class ProductDetails(ProductSummary):
    calibration: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(
        default_factory=dict, description="the model's config (model.json), less `weights` (it may be a local path)"
    )
    record: dict[str, Any] = Field(default_factory=dict, description="the version's metrics.json, less local paths")


def product_summary(
    product: str, pointer: Mapping[str, Any], metrics: Mapping[str, Any], model_json: Mapping[str, Any]
) -> ProductSummary:
    """The short entry of ``GET /v1/products`` for one product's promoted version."""
    config = model_json.get("config") or {}
    calibration = model_json.get("calibration") or {}
    numbers = {
        split: {key: float(value) for key, value in values.items() if _is_number(value)}
        for split, values in metrics.items()
        if split in ("val", "test") and isinstance(values, Mapping)
    }
    return ProductSummary(
        product=product,
        model_version=str(pointer["version"]),
        family=str(model_json.get("family") or metrics.get("family") or "tsdn"),
        promoted_at=pointer.get("updated_at"),
        image_size=config.get("image_size"),
        score_source=config.get("score_source"),
        threshold=calibration.get("threshold"),
        **_false_positive_rates(calibration),
        metrics=numbers,
    )


def _false_positive_rates(calibration: Mapping[str, Any]) -> dict[str, float]:
    """``expected_false_positive_rate`` and ``false_positive_rate_95`` of a quantile calibration; {} otherwise."""
    try:
        return Calibration.from_dict(dict(calibration)).false_positive_rates() if calibration else {}
    except (ConfigError, ValueError):  # an unreadable calibration: the detect route says so when it loads the model
        return {}


def product_details(
    product: str, pointer: Mapping[str, Any], metrics: Mapping[str, Any], model_json: Mapping[str, Any]
) -> ProductDetails:
    """``GET /v1/products/{product}``: the summary plus calibration, config and the version's record."""
    summary = product_summary(product, pointer, metrics, model_json)
    return ProductDetails(
        **summary.model_dump(),
        calibration=dict(model_json.get("calibration") or {}),
        config={key: value for key, value in (model_json.get("config") or {}).items() if key != "weights"},
        record={key: value for key, value in metrics.items() if key not in _PRIVATE_KEYS},
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
