"""One TSDN training step: SURF fill -> forward -> :class:`TSDNLoss` -> optimiser step.

Every trainer runs this code: the Ray Train worker loop (``tsdn_platform.train``), the training and GPU
benchmarks and the accuracy experiments, so a benchmark measures what ships. The recipe levers of
:class:`tsdn.config.TSDNConfig` (encoder learning-rate scale, schedule, DCD_A warm-up, SURF fill) are read
here; their defaults are the paper's.

    optimizer = build_optimizer(model, cfg)
    for epoch in range(1, epochs + 1):
        set_epoch_lr(optimizer, cfg, epoch, epochs)
        for images, labels in batches:  # (B, 3, S, S) in [0, 1]; (B, S, S) int SLIC labels
            total, terms = train_step(model, loss_fn, optimizer, images, labels, cfg, generator, epoch)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tsdn.config import TSDNConfig
from tsdn.losses import TSDNLoss
from tsdn.surf import surf_fill

__all__ = ["build_optimizer", "fne_gate", "lr_factor", "set_epoch_lr", "synthesize", "train_step"]

# The cosine schedule ends at this fraction of the base learning rate.
_COSINE_FLOOR = 0.01


def build_optimizer(model: nn.Module, cfg: TSDNConfig) -> torch.optim.Adam:
    """Adam at ``cfg.lr`` with the encoder in its own group at ``lr * encoder_lr_scale`` (left out when frozen).

    Group 0 is everything but the encoder; group 1 (absent when ``encoder_lr_scale == 0``) the encoder. Each
    group's ``initial_lr`` is kept for :func:`set_epoch_lr`.
    """
    module = getattr(model, "module", model)  # a DDP-wrapped model's parameters are the module's
    encoder_ids = {id(p) for p in module.encoder.parameters()}
    rest = [p for p in module.parameters() if id(p) not in encoder_ids and p.requires_grad]
    groups = [{"params": rest, "lr": cfg.lr, "initial_lr": cfg.lr}]
    if cfg.encoder_lr_scale > 0:
        lr = cfg.lr * cfg.encoder_lr_scale
        groups.append({"params": list(module.encoder.parameters()), "lr": lr, "initial_lr": lr})
    return torch.optim.Adam(groups)


def lr_factor(cfg: TSDNConfig, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier of 1-based ``epoch`` of ``epochs``: 1 (``constant``), or a cosine from 1 to 1 %."""
    if cfg.lr_schedule == "constant" or epochs <= 1:
        return 1.0
    progress = (epoch - 1) / (epochs - 1)
    return _COSINE_FLOOR + (1.0 - _COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_epoch_lr(optimizer: torch.optim.Optimizer, cfg: TSDNConfig, epoch: int, epochs: int) -> float:
    """Apply :func:`lr_factor` to every group's ``initial_lr``; returns the factor."""
    factor = lr_factor(cfg, epoch, epochs)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return factor


def fne_gate(cfg: TSDNConfig, epoch: int) -> bool:
    """Whether the FNE gates F(1/32) in 1-based ``epoch`` (False during the DCD_A warm-up)."""
    return epoch > cfg.mask_warmup_epochs


def synthesize(
    images: torch.Tensor, labels: torch.Tensor, cfg: TSDNConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training input and its target mask: SURF per ``cfg`` (fill, opacity), or the clean images.

    Args:
        images: (B, 3, S, S) float in [0, 1].
        labels: (B, S, S) int SLIC labels ``0 .. K-1`` per sample (as ingest stores them).
        cfg: the model config (``surf``, ``n_filled``, ``surf_fill``, ``surf_opacity_min``).
        generator: random source of the draws.

    Returns:
        ``(inputs (B, 3, S, S), mask (B, 1, S, S) in {0, 1})``; without SURF the images and an empty mask.
    """
    if not cfg.surf:
        return images, torch.zeros_like(images[:, :1])
    return surf_fill(
        images,
        labels,
        cfg.n_filled,
        generator,
        contiguous=True,
        fill=cfg.surf_fill,
        opacity_min=cfg.surf_opacity_min,
    )


def train_step(
    model: nn.Module,
    loss_fn: TSDNLoss,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TSDNConfig,
    generator: torch.Generator | None,
    epoch: int,
    *,
    autocast: bool = False,
    channels_last: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step on one batch.

    Args:
        model: a :class:`tsdn.model.TSDN`, possibly DDP-wrapped, in train mode.
        loss_fn: ``TSDNLoss(cfg)``.
        optimizer: from :func:`build_optimizer`.
        images: (B, 3, S, S) float in [0, 1], the clean images I.
        labels: (B, S, S) int SLIC labels.
        cfg: the model config.
        generator: random source of the SURF draws.
        epoch: the 1-based epoch (for the DCD_A warm-up).
        autocast: bf16 autocast on the images' device (GPU training).
        channels_last: feed the network a channels-last input (GPU training).

    Returns:
        ``(total, terms)`` as :class:`TSDNLoss` returns them, ``total`` detached.
    """
    inputs, mask = synthesize(images, labels, cfg, generator)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
        output = model(inputs, fne_gate=fne_gate(cfg, epoch))
    total, terms = loss_fn(output, images, mask)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return total.detach(), terms
