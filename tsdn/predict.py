"""The one prediction path: decoded images of any size and mode -> calibrated detections.

Batch scoring, serving and the standalone inferencer (``tsdn predict``) all call :meth:`Predictor.predict`; no
other copy of the pre- or post-processing exists. Only the model call is swapped by runtime: a
:class:`tsdn.runtime.ModelRunner` (eager torch, ONNX Runtime or OpenVINO). This module imports neither torch
nor timm, so a Predictor over an exported model runs in a process without them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from tsdn.calibration import Calibration
from tsdn.image import to_rgb
from tsdn.resize import resize_map, to_network_input
from tsdn.runtime import ModelRunner, TorchRunner, load_exported

if TYPE_CHECKING:
    import torch

    from tsdn.model import TSDN, TSDNPrediction
    from tsdn.patchcore import PatchCore, PatchCorePrediction

__all__ = ["Detection", "ImageInput", "Predictor"]

ImageInput = Image.Image | np.ndarray


@dataclass
class Detection:
    """Result for one image.

    Attributes:
        anomaly_score: raw image score: the maximum (or top-k mean) of the map the model scores at the network
            resolution (the anomaly map, unless the model has ``map_strides``).
        normalized_score: the score mapped to [0, 1] by the calibration, 0.5 at the applied threshold (so
            ``normalized_score >= 0.5`` exactly when ``is_anomalous``, overridden threshold or not).
        is_anomalous: ``anomaly_score >= threshold``.
        threshold: the raw-score threshold applied (the calibrated one unless overridden).
        anomaly_map: (H, W) float32 raw score map at the input image's resolution, plus the calibration's
            ``map_offset`` (0 unless the model's map comes from other stages than its score).
        scored_map: (H, W) float32, the map the score reduces, at the same resolution, on a flagged image of a model
            whose image score reads another map than ``anomaly_map`` (TSDN's ``map_strides``: every stage's map):
            the region a flagged image's mask falls back on when ``anomaly_map`` reaches the threshold nowhere
            (:func:`tsdn.response.detect_answer`). None otherwise.
    """

    anomaly_score: float
    normalized_score: float
    is_anomalous: bool
    threshold: float
    anomaly_map: np.ndarray
    scored_map: np.ndarray | None = None


class Predictor:
    """A model of either family (TSDN or PatchCore), eager or exported, with its calibration.

    Args:
        model: the trained (or fitted) torch model (moved to ``device`` and switched to eval mode), or a
            :class:`tsdn.runtime.ModelRunner` (an exported model on ONNX Runtime or OpenVINO).
        calibration: threshold and score statistics fitted on normal images; None for a model being validated
            (only :meth:`predict_tensor`, which produces the scores a calibration is fitted on, is available).
        device: where a torch model runs; None keeps the model's current device.
        batch_size: images per model call.

    Attributes:
        model: the torch module, or None for an exported model.
        runner: the model call :meth:`predict` makes.
        family: the model family that answers (``tsdn``, ``patchcore``).
    """

    def __init__(
        self,
        model: TSDN | PatchCore | ModelRunner,
        calibration: Calibration | None,
        device: torch.device | str | None = None,
        batch_size: int = 8,
    ) -> None:
        if batch_size < 1:
            msg = f"Predictor.batch_size: expected >= 1, got {batch_size}"
            raise ValueError(msg)
        if isinstance(model, ModelRunner):
            self.runner: ModelRunner = model
            self.model = None
            self.device = None
        else:
            runner = TorchRunner(model, device)
            self.runner, self.model, self.device = runner, runner.model, runner.device
        self.calibration = calibration
        self.batch_size = batch_size
        self.image_size = self.runner.image_size
        self.family = self.runner.family

    @classmethod
    def from_files(
        cls, files: Mapping[str, bytes], device: torch.device | str | None = None, batch_size: int = 8
    ) -> Predictor:
        """Predictor from checkpoint files (see :func:`tsdn.checkpoint.checkpoint_files`)."""
        from tsdn.checkpoint import load_checkpoint  # torch: only for the eager runtime

        model, calibration, _ = load_checkpoint(files, device)
        return cls(model, calibration, device, batch_size)

    @classmethod
    def from_export(
        cls, files: Mapping[str, bytes], runtime: str | None = None, batch_size: int = 8, threads: int | None = None
    ) -> Predictor:
        """Predictor from an export's files (see :func:`tsdn.runtime.load_exported`); torch is not imported."""
        exported = load_exported(files, runtime, threads)
        return cls(exported.runner, exported.calibration, batch_size=batch_size)

    def preprocess(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Images (PIL or numpy; gray, RGB, RGBA, palette, 16-bit; any size) -> (B, 3, H, W) float32 in [0, 1].

        Each image is converted to 8-bit RGB by :func:`tsdn.image.to_rgb` and resized to S x S (bilinear with
        antialiasing, :func:`tsdn.resize.to_network_input`) to the model's (H, W) input on the CPU.
        """
        return self._prepare(images)[0]

    def predict_tensor(self, batch: torch.Tensor) -> TSDNPrediction | PatchCorePrediction:
        """Model prediction for an already preprocessed (B, 3, S, S) batch; results on the CPU (eager torch only).

        The model's own typed result (every family's has ``anomaly_map`` (B, 1, S, S) and ``anomaly_score`` (B,)).
        """
        import torch

        if self.model is None:
            msg = "predict_tensor: needs the torch model; this predictor runs an export (use predict)"
            raise ValueError(msg)
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
                network's (S, S), so those maps are exactly the ones the model call returns.
        """
        if self.calibration is None:
            msg = "Predictor.predict: no calibration (this predictor was built for validation); use predict_tensor"
            raise ValueError(msg)
        limit = self.calibration.threshold if threshold is None else float(threshold)
        detections = []
        for start in range(0, len(images), self.batch_size):
            batch, sizes = self._prepare(images[start : start + self.batch_size])
            out = self.runner(batch)
            for i, (score, size) in enumerate(zip(out.anomaly_score.tolist(), sizes)):
                shape, flagged = map_size or size, score >= limit
                # the map the score reduces, resized only for a flagged image, whose mask may fall back on it
                scored_map = resize_map(out.scored_map[i, 0], shape) if flagged and out.scored_map is not None else None
                detections.append(
                    Detection(
                        anomaly_score=score,
                        normalized_score=float(self.calibration.normalize(score, limit)),
                        is_anomalous=flagged,
                        threshold=limit,
                        anomaly_map=resize_map(self.calibration.shift_map(out.anomaly_map[i, 0]), shape),
                        scored_map=scored_map,
                    )
                )
        return detections

    def _prepare(self, images: Sequence[ImageInput]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        arrays, sizes = [], []
        for image in images:
            rgb, _ = to_rgb(image)
            sizes.append(rgb.shape[:2])
            arrays.append(to_network_input(rgb, self.image_size))
        if not arrays:
            return np.empty((0, 3, *self.image_size), np.float32), sizes
        return np.stack(arrays), sizes
