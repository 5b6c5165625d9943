"""Feature normality estimator (paper Sec. 2.4): which channels of F(1/32) carry the anomaly.

Two halves: :func:`normality_target` computes the ground truth W_gt from F(1/32) and DCD_A's mask
M' (a training target, no gradient), and :class:`FeatureNormalityEstimator` learns to predict it
from F(1/32) alone, giving W' that scales the channels of F(1/32) into F_nm1.
"""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureNormalityEstimator", "normality_target"]

_EPS = 1e-6


def normality_target(features: torch.Tensor, mask: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """W_gt: per-channel normality of F(1/32) w.r.t. the predicted anomaly mask M'.

    Each channel of ``features`` is upsampled (bilinear) to the mask's size and min-max scaled to
    [0, 1] per sample (SSIM's constants assume a known dynamic range, and M' lives in [0, 1]);
    the mean SSIM against M' is then min-max normalised over the channels of each sample and
    inverted, so the channel most similar to M' gets 0 and the least similar gets 1. When all
    channels are equally similar, every weight is 1 (nothing is singled out).

    Computed without gradient (a target for the estimator, not a path into DCD_A) and in float32
    even under autocast (SSIM of near-equal values is precision-sensitive).

    Args:
        features: F(1/32), (B, C, h, w).
        mask: M' as probabilities, (B, 1, H, W) in [0, 1].
        window_size: odd Gaussian window of the SSIM.

    Returns:
        (B, C) float32 in [0, 1].
    """
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        feats = F.interpolate(features.detach().float(), size=mask.shape[-2:], mode="bilinear", align_corners=False)
        low = feats.amin(dim=(2, 3), keepdim=True)
        span = feats.amax(dim=(2, 3), keepdim=True) - low
        feats = torch.where(span > _EPS, (feats - low) / span.clamp_min(_EPS), torch.zeros_like(feats))
        similarity = _ssim_against_one(feats, mask.detach().float(), window_size).mean(dim=(2, 3))
        low = similarity.amin(dim=1, keepdim=True)
        span = similarity.amax(dim=1, keepdim=True) - low
        scaled = torch.where(span > _EPS, (similarity - low) / span.clamp_min(_EPS), torch.zeros_like(similarity))
        return 1.0 - scaled


def _ssim_against_one(images: torch.Tensor, target: torch.Tensor, window_size: int) -> torch.Tensor:
    """``kornia.metrics.ssim(images, target.expand_as(images), window_size)`` for a one-channel target.

    The same Gaussian window (sigma 1.5), reflect borders and constants (max value 1); the target's moments
    are filtered once instead of once per channel, and the channels run channels-last (oneDNN's fast layout
    for depthwise convolutions on CPU): about 3x faster than kornia on an expanded target at C = 64.

    Args:
        images: (B, C, H, W) float32 in [0, 1].
        target: (B, 1, H, W) float32 in [0, 1].
        window_size: odd window side.

    Returns:
        (B, C, H, W) SSIM map.
    """
    kernel = kornia.filters.get_gaussian_kernel1d(window_size, 1.5, device=images.device, dtype=images.dtype)
    radius = window_size // 2
    c1, c2 = 0.01**2, 0.03**2

    def blur(x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        weight_x = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
        weight_y = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
        out = F.conv2d(F.pad(x, [radius, radius, 0, 0], mode="reflect"), weight_x, groups=channels)
        return F.conv2d(F.pad(out, [0, 0, radius, radius], mode="reflect"), weight_y, groups=channels)

    if images.device.type == "cpu":
        images = images.contiguous(memory_format=torch.channels_last)
    mu_t = blur(target)
    sigma_t = blur(target * target) - mu_t * mu_t
    mu_i = blur(images)
    sigma_i = blur(images * images) - mu_i * mu_i
    sigma_it = blur(images * target) - mu_i * mu_t
    num = (2.0 * mu_i * mu_t + c1) * (2.0 * sigma_it + c2)
    den = (mu_i * mu_i + mu_t * mu_t + c1) * (sigma_i + sigma_t + c2)
    return (num / (den + 1e-12)).contiguous()


class FeatureNormalityEstimator(nn.Module):
    """Estimator of W' from F(1/32): conv-ReLU, adaptive pool to P x P, flatten, FC-ReLU, FC-ReLU, FC.

    The adaptive average pool fixes the flatten length at ``C * P * P`` for any input size; with
    P = S / 32 (the default) it is the identity at the configured input size.

    Shape:
        features: (B, C, h, w) -> logits (B, C); W' = sigmoid(logits).
    """

    def __init__(self, channels: int, hidden: int, pool: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.pool_size = pool
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * pool * pool, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(features)
        # Skipped where it is the identity (the default): the same values, and an exported graph then needs no
        # adaptive pool, which ONNX can only write for input sizes it knows (timm's "same"-padded encoders hide them).
        if tuple(hidden.shape[-2:]) != (self.pool_size, self.pool_size):
            hidden = self.pool(hidden)
        return self.mlp(hidden)
