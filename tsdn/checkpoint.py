"""Checkpoint I/O without pickle: safetensors weights + ``model.json`` (everything needed to score).

``model.json`` holds the full :class:`TSDNConfig`, the backbone name, the input size, the input
normalisation, the calibration (threshold and score statistics), a format version and free-form
``extra`` (e.g. the data manifest hash). Servers load registry checkpoints, so nothing here ever
unpickles.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch

from tsdn.config import TSDNConfig
from tsdn.model import TSDN
from tsdn.scoring import Calibration

__all__ = ["FORMAT_VERSION", "MODEL_JSON", "MODEL_WEIGHTS", "checkpoint_files", "load_checkpoint"]

FORMAT_VERSION = 1
MODEL_WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"


def checkpoint_files(model: TSDN, calibration: Calibration, extra: dict[str, Any] | None = None) -> dict[str, bytes]:
    """``{"model.safetensors": weights, "model.json": metadata}`` for ``model`` and its ``calibration``."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "backbone": model.cfg.backbone,
        "input_size": [model.cfg.image_size, model.cfg.image_size],
        "normalization": {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()},
        "calibration": calibration.to_dict(),
        "extra": dict(extra or {}),
    }
    return {
        MODEL_WEIGHTS: safetensors.torch.save(state, metadata={"format": "pt"}),
        MODEL_JSON: json.dumps(meta, indent=2, sort_keys=True).encode(),
    }


def load_checkpoint(
    files: Mapping[str, bytes], device: torch.device | str | None = None
) -> tuple[TSDN, Calibration, dict[str, Any]]:
    """Rebuild the model (weights "none", then the saved state, strictly) in eval mode on ``device``.

    Returns ``(model, calibration, model_json)``; ``model.cfg`` is the saved config, weights spec included.
    """
    for name in (MODEL_WEIGHTS, MODEL_JSON):
        if name not in files:
            msg = f"checkpoint: {name} missing (got {', '.join(sorted(files)) or 'nothing'})"
            raise ValueError(msg)
    try:
        meta = json.loads(files[MODEL_JSON])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"checkpoint {MODEL_JSON}: not JSON ({exc})"
        raise ValueError(msg) from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        msg = f"checkpoint {MODEL_JSON}: format_version {version!r}, this code reads {FORMAT_VERSION}"
        raise ValueError(msg)
    cfg = TSDNConfig.from_dict(meta["config"])
    calibration = Calibration.from_dict(meta["calibration"])
    try:
        state = safetensors.torch.load(files[MODEL_WEIGHTS])
    except Exception as exc:  # safetensors raises its own error types on corrupt input
        msg = f"checkpoint {MODEL_WEIGHTS}: unreadable ({type(exc).__name__}: {exc})"
        raise ValueError(msg) from exc
    # The saved state replaces every tensor, so the encoder is built without fetching its weights.
    model = TSDN(dataclasses.replace(cfg, weights="none"))
    model.cfg = cfg  # the config the model was trained with, so a re-saved checkpoint keeps it
    # Checkpoints from before the fused score source carry no score scales; their sources never read them.
    state.setdefault("score_scales", model.score_scales.clone())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        msg = f"checkpoint {MODEL_WEIGHTS}: does not match the model in {MODEL_JSON} ({exc})"
        raise ValueError(msg) from exc
    model.to(device or "cpu").eval()
    return model, calibration, meta
