"""Deconvolution decoders DCD_A (mask) and DCD_N (reconstruction), U-Net style (paper Sec. 2.3).

Widths and upsampling factors come from the encoder's ``feature_info``: the stage that produces
stride ``r_i`` has ``C_i`` channels and, when skips are on, concatenates the encoder feature of
stride ``r_i``. Nothing is hard-coded to EfficientNet.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Decoder", "UpBlock"]


class UpBlock(nn.Module):
    """Deconvolution block: transposed conv (x ``scale``), optional skip concat, two 3x3 conv-BN-ReLU.

    Shape:
        x: (B, in_channels, h, w); skip: (B, skip_channels, h * scale, w * scale) or None
        -> (B, out_channels, h * scale, w * scale)
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, scale: int) -> None:
        super().__init__()
        self.skip_channels = skip_channels
        self.up = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size=scale, stride=scale, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.conv = nn.Sequential(
            nn.Conv2d(out_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if self.skip_channels:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class Decoder(nn.Module):
    """Decode the stride-``r_last`` bottleneck back to the input resolution.

    Args:
        in_channels: channels of the bottleneck (C of F(1/32) or F_nm1).
        channels: encoder ``feature_info.channels()``, shallow to deep.
        reductions: encoder ``feature_info.reduction()``, shallow to deep (each divides the next).
        out_channels: 1 for DCD_A's mask logits, 3 for DCD_N's reconstruction logits.
        use_skips: concatenate the encoder features of each stride (paper default) or not (ablation).

    Shape:
        bottleneck: (B, in_channels, H / r_last, W / r_last); skips: the encoder features of the
        shallower strides, shallow to deep (ignored without skips) -> (B, out_channels, H, W) logits.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        reductions: Sequence[int],
        out_channels: int,
        use_skips: bool,
    ) -> None:
        super().__init__()
        if len(channels) != len(reductions) or len(channels) < 2:
            msg = f"decoder: need >= 2 encoder stages with channels and reductions, got {channels} / {reductions}"
            raise ValueError(msg)
        if any(deep % shallow for shallow, deep in itertools.pairwise(reductions)):
            msg = f"decoder: encoder reductions {list(reductions)} are not successive integer multiples"
            raise ValueError(msg)
        factors = [deep // shallow for shallow, deep in itertools.pairwise(reductions)]
        self.use_skips = use_skips
        blocks = []
        width = in_channels
        # Deepest-but-one stage first: upsample from stride r_{i+1} to r_i, then merge the skip of stride r_i.
        for index in reversed(range(len(channels) - 1)):
            skip = channels[index] if use_skips else 0
            blocks.append(UpBlock(width, skip, channels[index], factors[index]))
            width = channels[index]
        blocks.append(UpBlock(width, 0, channels[0], reductions[0]))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def forward(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = bottleneck
        deep_first = list(reversed(skips))
        for index, block in enumerate(self.blocks):
            skip = deep_first[index] if self.use_skips and index < len(deep_first) else None
            x = block(x, skip)
        return self.head(x)
