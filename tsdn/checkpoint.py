"""Checkpoint I/O without pickle: safetensors weights + ``model.json`` (everything needed to score).

``model.json`` holds the model family (``tsdn`` or ``patchcore``; absent in checkpoints from before the
second family, which are TSDN), its full config, the backbone name, the input size, the input
normalisation, the calibration (threshold and score statistics), a format version and free-form
``extra`` (e.g. the data manifest hash). Servers load registry checkpoints, so nothing here ever
unpickles. :data:`FAMILIES` is the one place that maps a family name to its config and module.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch

from tsdn.config import TSDNConfig
from tsdn.config_io import json_member
from tsdn.model import TSDN
from tsdn.patchcore import PatchCore, PatchCoreConfig
from tsdn.scoring import Calibration

__all__ = ["FAMILIES", "FORMAT_VERSION", "MODEL_JSON", "MODEL_WEIGHTS", "checkpoint_files", "load_checkpoint"]

#: family name -> (config class, module class); both take ``(cfg, opener=None)`` / ``from_dict``.
FAMILIES: dict[str, tuple[type, type]] = {"tsdn": (TSDNConfig, TSDN), "patchcore": (PatchCoreConfig, PatchCore)}

FORMAT_VERSION = 1
MODEL_WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"


def checkpoint_files(
    model: TSDN | PatchCore, calibration: Calibration, extra: dict[str, Any] | None = None
) -> dict[str, bytes]:
    """``{"model.safetensors": weights, "model.json": metadata}`` for ``model`` and its ``calibration``."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "family": model.FAMILY,
        "config": model.cfg.to_dict(),
        "backbone": model.cfg.backbone,
        "input_size": list(model.cfg.input_shape),
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
) -> tuple[TSDN | PatchCore, Calibration, dict[str, Any]]:
    """Rebuild the model of the saved family (weights "none", then the saved state, strictly) in eval mode.

    Returns ``(model, calibration, model_json)``; ``model.cfg`` is the saved config, weights spec included.
    """
    if MODEL_WEIGHTS not in files:
        msg = f"checkpoint: {MODEL_WEIGHTS} missing (got {', '.join(sorted(files)) or 'nothing'})"
        raise ValueError(msg)
    meta = json_member(files, MODEL_JSON, "checkpoint")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        msg = f"checkpoint {MODEL_JSON}: format_version {version!r}, this code reads {FORMAT_VERSION}"
        raise ValueError(msg)
    family = meta.get("family", "tsdn")
    if family not in FAMILIES:
        msg = f"checkpoint {MODEL_JSON}: unknown model family {family!r}; this code reads {', '.join(FAMILIES)}"
        raise ValueError(msg)
    config_cls, model_cls = FAMILIES[family]
    cfg = config_cls.from_dict(meta["config"])
    calibration = Calibration.from_dict(meta["calibration"])
    try:
        state = safetensors.torch.load(files[MODEL_WEIGHTS])
    except Exception as exc:  # safetensors raises its own error types on corrupt input
        msg = f"checkpoint {MODEL_WEIGHTS}: unreadable ({type(exc).__name__}: {exc})"
        raise ValueError(msg) from exc
    # The saved state replaces every tensor, so the encoder is built without fetching its weights.
    model = model_cls(dataclasses.replace(cfg, weights="none"))
    model.cfg = cfg  # the config the model was trained with, so a re-saved checkpoint keeps it
    if family == "tsdn":
        # Checkpoints from before the fused score source carry no score scales; their sources never read them.
        state.setdefault("score_scales", model.score_scales.clone())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        msg = f"checkpoint {MODEL_WEIGHTS}: does not match the model in {MODEL_JSON} ({exc})"
        raise ValueError(msg) from exc
    model.to(device or "cpu").eval()
    return model, calibration, meta
