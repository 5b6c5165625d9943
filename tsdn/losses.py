"""TSDN objective (paper Sec. 2.5, Eq. 3): weighted L2, SSIM, GMS, mask L2 and FNE cross-entropy."""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F
from torch import nn

from tsdn.config import TSDNConfig
from tsdn.model import TSDNOutput

__all__ = ["TSDNLoss", "gms_loss", "mask_loss", "ssim_loss"]


def ssim_loss(image: torch.Tensor, reconstruction: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """1 - mean SSIM of two (B, 3, H, W) images in [0, 1]; a scalar in [0, 2]."""
    return 1.0 - kornia.metrics.ssim(image, reconstruction, window_size).mean()


def gms_loss(image: torch.Tensor, reconstruction: torch.Tensor, c: float = 0.0026) -> torch.Tensor:
    """1 - mean gradient magnitude similarity (Xue et al. 2013) of two (B, 3, H, W) images in [0, 1].

    Per channel, ``g`` is the Sobel gradient magnitude and the GMS map is
    ``(2 g_I g_R + c) / (g_I^2 + g_R^2 + c)`` (1 where the gradients agree); returns a scalar in [0, 1].
    """
    g_image = kornia.filters.sobel(image)
    g_recon = kornia.filters.sobel(reconstruction)
    gms = (2 * g_image * g_recon + c) / (g_image.square() + g_recon.square() + c)
    return 1.0 - gms.mean()


def mask_loss(logits: torch.Tensor, mask: torch.Tensor, kind: str = "l2", gamma: float = 2.0) -> torch.Tensor:
    """DCD_A's loss between M' = sigmoid(logits) and the SURF mask M, both (B, 1, H, W); a scalar.

    ``"l2"``: the paper's mean squared error of the probabilities. ``"bce"``: binary cross-entropy.
    ``"focal"``: focal loss (Lin et al.) with ``gamma``, the cross-entropy down-weighted by ``(1 - p_t)^gamma``
    on pixels already right, as DRAEM trains its segmentation head.
    """
    if kind == "l2":
        return F.mse_loss(torch.sigmoid(logits), mask)
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    if kind == "bce":
        return bce.mean()
    if kind == "focal":
        p_t = torch.exp(-bce)  # the probability given to the true class
        return ((1.0 - p_t).pow(gamma) * bce).mean()
    msg = f"mask_loss: kind must be 'l2', 'bce' or 'focal', got {kind!r}"
    raise ValueError(msg)


class TSDNLoss(nn.Module):
    """``L = w_l2 L2(I, R) + w_ssim SSIM(I, R) + w_gms GMS(I, R) + w_mask L2(M, M') + w_fne BCE(W', W_gt)``.

    The mask term is the paper's L2 unless ``cfg.mask_loss`` names another (:func:`mask_loss`).

    Called as ``loss(output, image, mask)`` with ``output`` the model's :class:`TSDNOutput` on the
    (SURF-distorted) input, ``image`` the clean image I (B, 3, H, W) in [0, 1] and ``mask`` the SURF
    mask M (B, 1, H, W) in {0, 1} (ignored by a one-stream model). Returns ``(total, terms)``:
    the scalar total with gradient, and ``{"l2", "ssim", "gms", "mask", "fne"}`` unweighted and
    detached (0 for terms the model's ablation disables), left as tensors so logging does not
    force a device sync every step.
    """

    def __init__(self, cfg: TSDNConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(
        self, output: TSDNOutput, image: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The perceptual terms compare near-equal images: keep them in float32 under autocast.
        with torch.autocast(image.device.type, enabled=False):
            return self._terms(output, image.float(), mask.float())

    def _terms(
        self, output: TSDNOutput, image: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        recon = output.reconstruction.float()
        zero = recon.new_zeros(())
        terms = {
            "l2": F.mse_loss(recon, image),
            "ssim": ssim_loss(image, recon, cfg.ssim_window),
            "gms": gms_loss(image, recon, cfg.gms_c),
            "mask": zero,
            "fne": zero,
        }
        if output.mask_logits is not None:
            terms["mask"] = mask_loss(output.mask_logits.float(), mask, cfg.mask_loss)
        if output.weights_logits is not None and output.weights_gt is not None:
            # The logits form is the same cross-entropy as BCE(sigmoid(.), W_gt), stable for saturated logits.
            terms["fne"] = F.binary_cross_entropy_with_logits(output.weights_logits.float(), output.weights_gt)
        weights = {"l2": cfg.w_l2, "ssim": cfg.w_ssim, "gms": cfg.w_gms, "mask": cfg.w_mask, "fne": cfg.w_fne}
        total = sum(weights[name] * value for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}
