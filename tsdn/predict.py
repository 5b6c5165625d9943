"""The one prediction path: decoded images of any size and mode -> calibrated detections.

Batch scoring and serving both call :meth:`Predictor.predict`; no other copy of the pre- or
post-processing exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tsdn.checkpoint import load_checkpoint
from tsdn.image import to_rgb
from tsdn.model import TSDN, TSDNPrediction
from tsdn.patchcore import PatchCore, PatchCorePrediction
from tsdn.scoring import Calibration

__all__ = ["Detection", "ImageInput", "Predictor", "resize_rgb"]

ImageInput = Image.Image | np.ndarray


@dataclass
class Detection:
    """Result for one image.

    Attributes:
        anomaly_score: raw image score, the maximum of the anomaly map at the network resolution.
        normalized_score: the score mapped to [0, 1] by the calibration, 0.5 at the applied threshold (so
            ``normalized_score >= 0.5`` exactly when ``is_anomalous``, overridden threshold or not).
        is_anomalous: ``anomaly_score >= threshold``.
        threshold: the raw-score threshold applied (the calibrated one unless overridden).
        anomaly_map: (H, W) float32 raw score map at the input image's resolution.
    """

    anomaly_score: float
    normalized_score: float
    is_anomalous: bool
    threshold: float
    anomaly_map: np.ndarray


class Predictor:
    """A model of either family (TSDN or PatchCore) in eval mode with its calibration.

    Args:
        model: the trained (or fitted) model (moved to ``device`` and switched to eval mode).
        calibration: threshold and score statistics fitted on normal images; None for a model being validated
            (only :meth:`predict_tensor`, which produces the scores a calibration is fitted on, is available).
        device: where to run; None keeps the model's current device.
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        model: TSDN | PatchCore,
        calibration: Calibration | None,
        device: torch.device | str | None = None,
        batch_size: int = 8,
    ) -> None:
        if batch_size < 1:
            msg = f"Predictor.batch_size: expected >= 1, got {batch_size}"
            raise ValueError(msg)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.calibration = calibration
        self.batch_size = batch_size
        self.image_size = model.cfg.image_size

    @classmethod
    def from_files(
        cls, files: Mapping[str, bytes], device: torch.device | str | None = None, batch_size: int = 8
    ) -> Predictor:
        """Predictor from checkpoint files (see :func:`tsdn.checkpoint.checkpoint_files`)."""
        model, calibration, _ = load_checkpoint(files, device)
        return cls(model, calibration, device, batch_size)

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images (PIL or numpy; gray, RGB, RGBA, palette, 16-bit; any size) -> (B, 3, S, S) float in [0, 1].

        Each image is converted to 8-bit RGB by :func:`tsdn.image.to_rgb` and resized to S x S
        (bilinear with antialiasing) on the CPU.
        """
        return self._prepare(images)[0]

    def predict_tensor(self, batch: torch.Tensor) -> TSDNPrediction | PatchCorePrediction:
        """Model prediction for an already preprocessed (B, 3, S, S) batch; results on the CPU.

        The model's own typed result (every family's has ``anomaly_map`` (B, 1, S, S) and ``anomaly_score`` (B,)).
        """
        if batch.ndim != 4 or len(batch) == 0:
            msg = f"predict_tensor: expected a non-empty (B, 3, S, S) batch, got {tuple(batch.shape)}"
            raise ValueError(msg)
        parts = []
        with torch.inference_mode():
            for chunk in batch.split(self.batch_size):
                pred = self.model.predict(chunk.to(self.device, torch.float32))
                parts.append(type(pred)(*(t.float().cpu() for t in pred)))
        return type(parts[0])(*(torch.cat(ts) for ts in zip(*parts)))

    def predict(
        self,
        images: Sequence[ImageInput],
        threshold: float | None = None,
        map_size: tuple[int, int] | None = None,
    ) -> list[Detection]:
        """Detections for ``images``.

        Args:
            images: decoded images of any size and mode.
            threshold: overrides the calibrated raw-score threshold.
            map_size: (h, w) of the returned anomaly maps. None: each input's own (H, W). The model's map is
                resized once (bilinear, antialiased when shrinking) and not at all when ``map_size`` is the
                network's (S, S), so those maps are exactly the ones :meth:`predict_tensor` returns.
        """
        if self.calibration is None:
            msg = "Predictor.predict: no calibration (this predictor was built for validation); use predict_tensor"
            raise ValueError(msg)
        limit = self.calibration.threshold if threshold is None else float(threshold)
        detections = []
        for start in range(0, len(images), self.batch_size):
            batch, sizes = self._prepare(images[start : start + self.batch_size])
            pred = self.predict_tensor(batch)
            for anomaly_map, score, size in zip(pred.anomaly_map, pred.anomaly_score.tolist(), sizes):
                full = _resize_map(anomaly_map[None], map_size or size)
                detections.append(
                    Detection(
                        anomaly_score=score,
                        normalized_score=float(self.calibration.normalize(score, limit)),
                        is_anomalous=score >= limit,
                        threshold=limit,
                        anomaly_map=full[0, 0].numpy().astype(np.float32, copy=False),
                    )
                )
        return detections

    def _prepare(self, images: Sequence[ImageInput]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        tensors, sizes = [], []
        for image in images:
            rgb, _ = to_rgb(image)
            sizes.append(rgb.shape[:2])
            tensors.append(resize_rgb(rgb, self.image_size))
        if not tensors:
            return torch.empty(0, 3, self.image_size, self.image_size), sizes
        return torch.stack(tensors), sizes


def _resize_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, S, S) -> (1, 1, h, w): bilinear, antialiased when shrinking; the same tensor when the size matches."""
    if tuple(anomaly_map.shape[-2:]) == tuple(size):
        return anomaly_map
    shrinking = size[0] < anomaly_map.shape[-2] or size[1] < anomaly_map.shape[-1]
    return F.interpolate(anomaly_map, size=size, mode="bilinear", antialias=shrinking, align_corners=False)


def resize_rgb(rgb: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, S, S) float32 in [0, 1]: bilinear with antialiasing.

    The project's one resize to the network input: the ingested training shards, batch scoring and serving
    all go through it, so a model sees in production the pixels it was trained on.
    """
    pixels = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.uint8)).permute(2, 0, 1)[None].float().div_(255.0)
    resized = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].clamp_(0.0, 1.0)
