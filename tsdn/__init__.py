"""TSDN (Park et al.): two-stream decoder anomaly detection as a pure PyTorch library.

The public names below are imported lazily (PEP 562) so that ``import tsdn.config_io`` (the CLI
and every job config) does not pay for importing torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ABLATIONS": "tsdn.config",
    "TSDNConfig": "tsdn.config",
    "apply_ablation": "tsdn.config",
    "create_encoder": "tsdn.backbone",
    "resolve_weights": "tsdn.backbone",
    "TSDN": "tsdn.model",
    "TSDNOutput": "tsdn.model",
    "TSDNPrediction": "tsdn.model",
    "TSDNLoss": "tsdn.losses",
    "checkpoint_files": "tsdn.checkpoint",
    "load_checkpoint": "tsdn.checkpoint",
    "Detection": "tsdn.predict",
    "Predictor": "tsdn.predict",
    "SURF": "tsdn.surf",
    "slic_labels": "tsdn.surf",
    "surf_fill": "tsdn.surf",
    "ImageDecodeError": "tsdn.image",
    "decode_image": "tsdn.image",
    "to_rgb": "tsdn.image",
    "Calibration": "tsdn.scoring",
    "fit_calibration": "tsdn.scoring",
    "image_score": "tsdn.scoring",
    "score_map": "tsdn.scoring",
    "evaluate": "tsdn.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        msg = f"module 'tsdn' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
