"""TSDN: encoder -> F(1/32) -> DCD_A (mask M') -> FNE (W') -> F_nm1 -> DCD_N (reconstruction R).

Paper Sec. 2.3 and Fig. 2. The ablation switches of :class:`tsdn.config.TSDNConfig` select the
variants of Tables 3 and 4 inside this one module.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tsdn.backbone import Opener, create_encoder, normalization
from tsdn.config import TSDNConfig
from tsdn.decoder import Decoder
from tsdn.fne import FeatureNormalityEstimator, normality_target
from tsdn.scoring import image_score, score_map

__all__ = ["TSDN", "TSDNOutput", "TSDNPrediction"]


class TSDNOutput(NamedTuple):
    """Raw tensors for :class:`tsdn.losses.TSDNLoss`. Fields a disabled module would produce are None.

    Attributes:
        reconstruction: R, (B, 3, H, W) in [0, 1].
        mask_logits: logits of M', (B, 1, H, W); None without DCD_A.
        weights_logits: logits of W', (B, C); None without the FNE.
        weights_gt: W_gt, (B, C) in [0, 1], no gradient; None without the FNE.
        features: F(1/32), (B, C, H / 32, W / 32).
    """

    reconstruction: torch.Tensor
    mask_logits: torch.Tensor | None
    weights_logits: torch.Tensor | None
    weights_gt: torch.Tensor | None
    features: torch.Tensor

    @property
    def mask_pred(self) -> torch.Tensor | None:
        """M' = sigmoid(mask_logits), (B, 1, H, W) in [0, 1]."""
        return None if self.mask_logits is None else torch.sigmoid(self.mask_logits)

    @property
    def weights_pred(self) -> torch.Tensor | None:
        """W' = sigmoid(weights_logits), (B, C) in [0, 1]."""
        return None if self.weights_logits is None else torch.sigmoid(self.weights_logits)


class TSDNPrediction(NamedTuple):
    """Inference result.

    Attributes:
        anomaly_map: (B, 1, H, W) Gaussian-blurred per-pixel L2 distance between image and R.
        anomaly_score: (B,) maximum of each map.
        reconstruction: R, (B, 3, H, W) in [0, 1].
    """

    anomaly_map: torch.Tensor
    anomaly_score: torch.Tensor
    reconstruction: torch.Tensor


class TSDN(nn.Module):
    """Two-stream decoder network with the feature normality estimator.

    Args:
        cfg: the model config (architecture switches, backbone, weights spec).
        opener: ``opener(uri) -> bytes`` for a weights spec that is a URI.

    Input images are ``(B, 3, H, W)`` float in [0, 1] with H and W multiples of the encoder's
    deepest reduction (32); the model normalises them with the backbone's pretrained mean/std
    (buffers, saved with the weights).
    """

    def __init__(self, cfg: TSDNConfig, opener: Opener | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = create_encoder(cfg.backbone, cfg.weights, opener)
        channels = list(self.encoder.feature_info.channels())
        reductions = list(self.encoder.feature_info.reduction())
        self.stride = reductions[-1]
        mean, std = normalization(self.encoder)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        c = cfg.feature_channels
        self.reduce = nn.Conv2d(channels[-1], c, kernel_size=1)
        self.dcd_a = Decoder(c, channels, reductions, out_channels=1, use_skips=cfg.skip) if cfg.dcd_a else None
        self.fne = FeatureNormalityEstimator(c, cfg.fne_hidden, cfg.fne_pool_size) if cfg.fne else None
        self.dcd_n = Decoder(c, channels, reductions, out_channels=3, use_skips=cfg.skip)

    def forward(self, image: torch.Tensor) -> TSDNOutput:
        """Both streams on ``image`` (B, 3, H, W) in [0, 1] (SURF-distorted while training)."""
        return self._run(image, with_targets=True)

    def predict(self, image: torch.Tensor) -> TSDNPrediction:
        """Anomaly map and score of ``image`` (B, 3, H, W) in [0, 1]; call in eval mode without grad."""
        reconstruction = self._run(image, with_targets=False).reconstruction
        anomaly_map = score_map(image, reconstruction, self.cfg.score_sigma)
        return TSDNPrediction(anomaly_map, image_score(anomaly_map), reconstruction)

    def _run(self, image: torch.Tensor, with_targets: bool) -> TSDNOutput:
        self._check_input(image)
        *skips, deepest = self.encoder((image - self.mean) / self.std)
        features = self.reduce(deepest)
        mask_logits = weights_logits = weights_gt = None
        bottleneck = features
        if self.fne is not None:
            weights_logits = self.fne(features)
            bottleneck = features * torch.sigmoid(weights_logits)[:, :, None, None]
            # With the FNE, M' is only a training signal (its loss and W_gt): inference skips DCD_A.
            if with_targets:
                mask_logits = self.dcd_a(features, skips)
                weights_gt = normality_target(features, torch.sigmoid(mask_logits), self.cfg.ssim_window)
        elif self.dcd_a is not None:
            # Paper Table 4 E: the FNE replaced by multiplying M' (pooled to the size of F(1/32)) into F(1/32).
            mask_logits = self.dcd_a(features, skips)
            bottleneck = features * F.adaptive_avg_pool2d(torch.sigmoid(mask_logits), features.shape[-2:])
        reconstruction = torch.sigmoid(self.dcd_n(bottleneck, skips))
        return TSDNOutput(reconstruction, mask_logits, weights_logits, weights_gt, features)

    def _check_input(self, image: torch.Tensor) -> None:
        if image.ndim != 4 or image.shape[1] != 3:
            msg = f"TSDN input: expected (B, 3, H, W), got {tuple(image.shape)}"
            raise ValueError(msg)
        if image.shape[-2] % self.stride or image.shape[-1] % self.stride:
            msg = f"TSDN input: H and W must be multiples of {self.stride}, got {tuple(image.shape[-2:])}"
            raise ValueError(msg)
