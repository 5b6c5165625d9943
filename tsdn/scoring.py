"""Anomaly scores from reconstructions (paper Sec. 3, "Pixel-level" / "Image-level") and their calibration.

The score map is the Gaussian-blurred per-pixel L2 distance between an image and its reconstruction; the
image score is the map's maximum. A :class:`Calibration`, fitted on held-out normal images (or on labelled
validation scores), turns raw scores into decisions (``score >= threshold``) and normalised [0, 1] scores.
It travels with the weights in the checkpoint, so batch scoring and serving decide identically.
"""

from __future__ import annotations

import math

import kornia
import torch
import torch.nn.functional as F

# The calibration lives in its own module (numpy only, for processes without torch); re-exported here.
from tsdn.calibration import QUANTILES, Calibration, fit_calibration

__all__ = [
    "QUANTILES",
    "Calibration",
    "blur_map",
    "feature_stage_maps",
    "fit_calibration",
    "gaussian_kernel_size",
    "image_score",
    "mean_stage_map",
    "position_std",
    "score_map",
    "standardize_map",
    "whitened_stage_maps",
]


def gaussian_kernel_size(sigma: float) -> int:
    """Odd kernel size covering +-3 sigma: ``2 * ceil(3 * sigma) + 1``."""
    return 2 * math.ceil(3 * sigma) + 1


def score_map(image: torch.Tensor, reconstruction: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-pixel anomaly map ``G_sigma(||I - R||_2)`` (paper Eq. 4, before its [0, 1] normalisation).

    Args:
        image: (B, 3, H, W) float in [0, 1].
        reconstruction: (B, 3, H, W) float, same shape.
        sigma: std of the Gaussian blur in pixels; ``<= 0`` disables the blur. The kernel is
            :func:`gaussian_kernel_size` wide, capped at ``2 * min(H, W) - 1`` so that the reflect border
            stays valid on tiny images; borders are reflected.

    Returns:
        (B, 1, H, W) non-negative map: the L2 norm over channels of ``image - reconstruction``, blurred.
    """
    if image.shape != reconstruction.shape or image.ndim != 4:
        shapes = f"image {tuple(image.shape)}, reconstruction {tuple(reconstruction.shape)}"
        msg = f"score_map: expected two (B, C, H, W) tensors of one shape, got {shapes}"
        raise ValueError(msg)
    distance = (image - reconstruction).pow(2).sum(dim=1, keepdim=True).sqrt()
    return blur_map(distance, sigma)


def blur_map(anomaly_map: torch.Tensor, sigma: float) -> torch.Tensor:
    """The score maps' Gaussian blur: (B, 1, H, W) -> same shape; ``sigma <= 0`` returns the map unchanged.

    The kernel is :func:`gaussian_kernel_size` wide, capped at ``2 * min(H, W) - 1`` so that the reflect
    border stays valid on tiny maps.
    """
    if sigma <= 0:
        return anomaly_map
    size = min(gaussian_kernel_size(sigma), 2 * min(anomaly_map.shape[-2:]) - 1)
    return kornia.filters.gaussian_blur2d(anomaly_map, (size, size), (sigma, sigma), border_type="reflect")


def feature_stage_maps(
    image_features: list[torch.Tensor], recon_features: list[torch.Tensor], size: tuple[int, int]
) -> list[torch.Tensor]:
    """Per stage, ``1 - cos(f_I, f_R)`` per position of the encoder features of I and of R ((B, C_s, h_s, w_s)
    each), upsampled (bilinear) to ``size``: (B, 1, H, W) in [0, 2] each."""
    maps = []
    for f_image, f_recon in zip(image_features, recon_features, strict=True):
        distance = 1.0 - torch.nn.functional.cosine_similarity(f_image.float(), f_recon.float(), dim=1, eps=1e-6)
        maps.append(torch.nn.functional.interpolate(distance[:, None], size=size, mode="bilinear", align_corners=False))
    return maps


def whitened_stage_maps(
    residuals: list[torch.Tensor], means: list[torch.Tensor], whitenings: list[torch.Tensor], size: tuple[int, int]
) -> list[torch.Tensor]:
    """Per stage, the Mahalanobis norm ``sqrt(|W (r - m)|^2 / C)`` per position, upsampled (bilinear) to ``size``.

    Args:
        residuals: per stage, (B, C_s, h_s, w_s) ``f_I - f_R``.
        means: per stage, the residual's mean over normal images: (C_s,) pooled over positions, or
            (C_s, h_s, w_s) per position.
        whitenings: per stage, ``W`` with ``W' W`` = the inverse of the residual's covariance: (C_s, C_s), or
            (h_s, w_s, C_s, C_s) per position.
        size: (H, W) of the output maps.

    Returns:
        Per stage, (B, 1, H, W) >= 0; about 1 where a normal image's residual is typical.
    """
    maps = []
    for residual, mean, whitening in zip(residuals, means, whitenings, strict=True):
        if whitening.ndim == 4:  # per position: W_p (r_p - m_p) as a matrix product batched over the grid
            centred = residual.float() - mean[None]
            white = (whitening @ centred.permute(0, 2, 3, 1)[..., None])[..., 0]  # (B, h, w, C)
            distance = white.pow(2).mean(dim=-1)[:, None].sqrt()
        else:
            centred = residual.float() - mean.view(1, -1, 1, 1)
            white = torch.nn.functional.conv2d(centred, whitening[:, :, None, None])  # W (r - m) at every position
            distance = white.pow(2).mean(dim=1, keepdim=True).sqrt()
        maps.append(torch.nn.functional.interpolate(distance, size=size, mode="bilinear", align_corners=False))
    return maps


def mean_stage_map(stage_maps: list[torch.Tensor], sigma: float) -> torch.Tensor:
    """The mean of per-stage (B, 1, H, W) maps, blurred with ``sigma`` (pixels at the maps' size): the ``feature``
    source's map from the stages it compares, and (``map_strides``) the anomaly map from fewer of them."""
    if not stage_maps:
        msg = "mean_stage_map: no feature stage given"
        raise ValueError(msg)
    total = stage_maps[0]
    for stage_map in stage_maps[1:]:
        total = total + stage_map
    return blur_map(total / len(stage_maps), sigma)


def position_std(variance: torch.Tensor, sigma: float) -> torch.Tensor:
    """The per-position deviation that standardises a map, from the (1, 1, H, W) variance of normal maps: the
    variance blurred with the map's ``sigma`` (a few hundred images estimate it noisily; the map is blurred alike),
    its square root floored at 1 % of its mean so that a position where every normal map is the same does not
    divide by zero. Shared by TSDN's and PatchCore's ``score_normalization: pixel``."""
    std = blur_map(variance.float(), sigma).sqrt()
    return std.clamp_min(0.01 * float(std.mean()) + 1e-12)


def standardize_map(anomaly_map: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(anomaly_map - mean) / std`` per position; (1, 1, H, W) statistics are resized (bilinear) to a map of
    another size."""
    if mean.shape[-2:] != anomaly_map.shape[-2:]:
        size = tuple(anomaly_map.shape[-2:])
        mean = F.interpolate(mean, size=size, mode="bilinear", align_corners=False)
        std = F.interpolate(std, size=size, mode="bilinear", align_corners=False)
    return (anomaly_map - mean) / std


def image_score(anomaly_map: torch.Tensor, topk: float = 0.0) -> torch.Tensor:
    """Image anomaly score: the maximum of the map (the paper), or the mean of its top ``topk`` fraction.

    Args:
        anomaly_map: (B, 1, H, W).
        topk: fraction of the pixels in (0, 1) averaged (at least one pixel); 0 = the maximum.

    Returns:
        (B,) scores.
    """
    flat = anomaly_map.flatten(start_dim=1)
    if topk <= 0:
        return flat.amax(dim=1)
    # int(): under ONNX tracing a size is a tensor; H and W are fixed in an export, so k is a constant there too
    k = max(1, round(topk * int(flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)
