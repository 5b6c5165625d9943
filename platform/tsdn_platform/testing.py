"""Tiny registered models for tests and benchmarks: the one way to put a real checkpoint in a registry fast.

A model from :func:`tiny_model` is untrained (timm's ``test_efficientnet``, no weights, 64 px by default) but
real in every other way: a checkpoint of :mod:`tsdn.checkpoint`, a calibration, a registry version that
scoring, serving, exports and ``tsdn models`` read like any trained one. Nothing is downloaded.

    registry = Registry(store_uri)
    model = tiny_model("tsdn", seed=1)
    version = register(registry, "bottle", model, calibrate(model, seed=1))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["calibrate", "register", "tiny_model"]


def tiny_model(family: str = "tsdn", seed: int = 0, image_size: int = 64, backbone: str = "test_efficientnet", **cfg):
    """An untrained TSDN (or a PatchCore fitted on a few random images) in eval mode, seeded.

    ``cfg``: further fields of :class:`tsdn.config.TSDNConfig` or :class:`tsdn.patchcore.PatchCoreConfig`.
    """
    import torch

    torch.manual_seed(seed)
    if family == "patchcore":
        from tsdn.patchcore import PatchCore, PatchCoreConfig

        model = PatchCore(PatchCoreConfig(backbone=backbone, weights="none", image_size=image_size, **cfg))
        model.fit([torch.rand(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))])
        return model
    if family != "tsdn":
        msg = f"family {family!r}: expected 'tsdn' or 'patchcore'"
        raise ValueError(msg)
    from tsdn.config import TSDNConfig
    from tsdn.model import TSDN

    return TSDN(TSDNConfig(backbone=backbone, weights="none", image_size=image_size, **cfg)).eval()


def calibrate(model, seed: int = 0, n: int = 6):
    """A calibration fitted on the model's scores of ``n`` seeded random images (its "normal" images)."""
    import torch

    from tsdn.scoring import fit_calibration

    images = torch.rand(n, 3, *model.cfg.input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        scores = model.predict(images).anomaly_score.numpy()
    return fit_calibration(np.asarray(scores, np.float64))


def register(
    registry,
    product: str,
    model,
    calibration,
    metrics: Mapping[str, Any] | None = None,
    promote: str = "always",
    version: str | None = None,
) -> str:
    """Register ``model`` with ``calibration`` as a version of ``product``; returns the version id.

    ``metrics`` default: a test image AUROC of 0.5 and the model's family (what ``tsdn models`` shows).
    """
    from tsdn.checkpoint import checkpoint_files

    metrics = dict(metrics) if metrics is not None else {"test": {"image_auroc": 0.5}}
    metrics.setdefault("family", model.FAMILY)
    return registry.register(product, checkpoint_files(model, calibration), metrics, promote=promote, version=version)
