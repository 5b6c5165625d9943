"""TSDN: encoder -> F(1/32) -> DCD_A (mask M') -> FNE (W') -> F_nm1 -> DCD_N (reconstruction R).

Paper Sec. 2.3 and Fig. 2. The ablation switches of :class:`tsdn.config.TSDNConfig` select the
variants of Tables 3 and 4 inside this one module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tsdn.backbone import Opener, check_input, create_encoder, normalization
from tsdn.config import FLIP_LIMIT, FLIP_MIN_IMAGES, POSITION_BLENDS, TEST_FLIPS, TSDNConfig
from tsdn.decoder import Decoder
from tsdn.fne import FeatureNormalityEstimator, normality_target
from tsdn.scoring import (
    blur_map,
    feature_stage_maps,
    image_score,
    mean_stage_map,
    position_std,
    score_map,
    standardize_map,
    whitened_stage_maps,
)

__all__ = ["MAP_KEY", "TSDN", "TSDNOutput", "TSDNPrediction"]

#: The key of the ``map_strides`` stages' map among :meth:`TSDN.component_maps`, and ``normalize_map``'s ``which``.
MAP_KEY = "feature_map"


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
        anomaly_map: (B, 1, H, W) the map of the configured ``score_source`` (the paper's: the
            Gaussian-blurred per-pixel L2 distance between image and R); with ``map_strides``, the ``feature``
            map of those stages only.
        anomaly_score: (B,) the maximum (or the top-k mean, ``score_topk``) of the score source's map: of
            ``anomaly_map``, or with ``map_strides`` of the map of every stage of ``feature_strides``.
        reconstruction: R, (B, 3, H, W) in [0, 1].
        scored_map: (B, 1, H, W) the map ``anomaly_score`` reduces: ``anomaly_map`` itself, or with ``map_strides`` the
            map of every stage of ``feature_strides`` (blurred with ``image_score_sigma``), in the score's units.
    """

    anomaly_map: torch.Tensor
    anomaly_score: torch.Tensor
    reconstruction: torch.Tensor
    scored_map: torch.Tensor


class TSDN(nn.Module):
    """Two-stream decoder network with the feature normality estimator.

    Args:
        cfg: the model config (architecture switches, backbone, weights spec).
        opener: ``opener(uri) -> bytes`` for a weights spec that is a URI.

    Input images are ``(B, 3, H, W)`` float in [0, 1] with H and W multiples of the encoder's
    deepest reduction (32); the model normalises them with the backbone's pretrained mean/std
    (buffers, saved with the weights).

    ``score_scales`` (buffer, saved with the weights): the typical image score of the reconstruction and
    of the mask map on held-out normal images (:meth:`fit_score_scales`), which the ``fused`` source
    divides each map by; ones until fitted.

    With ``score_normalization: pixel``, ``normal_mean`` and ``normal_std`` ((1, 1, H, W) buffers, H x W the config's
    ``input_shape``) and ``normal_count`` (the number of images they came from) standardise the score source's map
    per position; :meth:`fit_normal_stats` sets them from normal training images, and :meth:`predict` refuses to run
    before. With ``map_strides`` too, ``map_mean`` and ``map_std`` do the same for the anomaly map of those stages,
    which :meth:`predict` returns while it scores the map of every compared stage.

    With ``feature_distance: mahalanobis``, ``feature_mean_<k>`` (C_k,) and ``feature_whitening_<k>`` (C_k, C_k)
    per compared encoder stage k and ``feature_count`` (the number of images) whiten the feature residual
    ``f_I - f_R``; :meth:`fit_normal_stats` fits them first (the per-position statistics are of the whitened map).
    With ``feature_whitening: position`` they are per position of the stage's h_k x w_k grid: (C_k, h_k, w_k) and
    (h_k, w_k, C_k, C_k).

    With ``encoder_norm: adapted``, the frozen encoder's BatchNorm running statistics (the means, and the variances
    unless ``encoder_norm_variance`` is ``pretrained``, of the layers up to ``encoder_norm_max_stride``) are the
    product line's (:meth:`fit_encoder_norm`, before training; ``encoder_norm_count`` the number of images) and
    :meth:`predict` refuses to run before they are fitted.
    """

    FAMILY = "tsdn"

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
        missing = sorted(set(cfg.feature_strides) - set(reductions))
        if missing and cfg.score_source == "feature":
            msg = f"TSDN: feature_strides {missing} are not strides of {cfg.backbone}'s stages {reductions}"
            raise ValueError(msg)
        #: The encoder stages the ``feature`` source compares, in stride order.
        self.feature_stages = [i for i, r in enumerate(reductions) if r in cfg.feature_strides] or [len(reductions) - 1]
        #: Which of :attr:`feature_stages` (positions in that list) make the anomaly map; None = all of them.
        self.map_positions: list[int] | None = None
        if cfg.map_strides is not None and cfg.score_source == "feature":
            self.map_positions = [k for k, i in enumerate(self.feature_stages) if reductions[i] in cfg.map_strides]
        self.register_buffer("score_scales", torch.ones(2))
        self._normal_stats_ready = cfg.score_normalization == "none"
        self._whitening_ready = cfg.feature_distance == "cosine"
        if cfg.score_normalization == "pixel":
            height, width = cfg.input_shape
            self.register_buffer("normal_mean", torch.zeros(1, 1, height, width))
            self.register_buffer("normal_std", torch.ones(1, 1, height, width))
            self.register_buffer("normal_count", torch.zeros((), dtype=torch.int64))
            if self.map_positions is not None:
                self.register_buffer("map_mean", torch.zeros(1, 1, height, width))
                self.register_buffer("map_std", torch.ones(1, 1, height, width))
        if cfg.feature_distance == "mahalanobis":
            height, width = cfg.input_shape
            for k, stage in enumerate(self.feature_stages):
                c = channels[stage]
                if cfg.feature_whitening == "position":
                    grid = (height // reductions[stage], width // reductions[stage])
                    self.register_buffer(f"feature_mean_{k}", torch.zeros(c, *grid))
                    self.register_buffer(f"feature_whitening_{k}", torch.eye(c).expand(*grid, c, c).clone())
                else:
                    self.register_buffer(f"feature_mean_{k}", torch.zeros(c))
                    self.register_buffer(f"feature_whitening_{k}", torch.eye(c))
            self.register_buffer("feature_count", torch.zeros((), dtype=torch.int64))
        self.position_blends: tuple[float, ...] = ()  # per stage, what the last whitening fit used
        #: The ``test_flips`` views in use: the config's number, or with ``auto`` the fitted one (None before).
        self.test_flips: int | None = None if cfg.test_flips == "auto" else cfg.test_flips
        #: With ``auto``, per mirror (left-right, up-down, both) the fraction of the held-out normal images that
        #: scored higher mirrored than as they are, at the last fit.
        self.flip_fractions: tuple[float, ...] = ()
        if cfg.test_flips == "auto":
            self.register_buffer("test_flip_count", torch.zeros((), dtype=torch.int64))
        self._encoder_norm_ready = cfg.encoder_norm == "pretrained"
        self._norm_layout: tuple[list[tuple[nn.modules.batchnorm._BatchNorm, int]], int] | None = None
        if cfg.encoder_norm == "adapted":
            self.register_buffer("encoder_norm_count", torch.zeros((), dtype=torch.int64))
        if self.normal_fit_steps or cfg.encoder_norm == "adapted":
            self.register_load_state_dict_post_hook(_after_load)
        if self.frozen_encoder:
            self.encoder.requires_grad_(False)

    @property
    def normal_fit_steps(self) -> tuple[str, ...]:
        """What :meth:`fit_normal_stats` fits from normal images, in order: ``whitening`` (with ``feature_distance:
        mahalanobis``), ``flips`` (with ``test_flips: auto``: from the held-out normal images alone), then ``pixel``
        (with ``score_normalization: pixel``); () for none of them."""
        steps = ("whitening",) if self.cfg.feature_distance == "mahalanobis" else ()
        steps += ("flips",) if self.cfg.test_flips == "auto" else ()
        return steps + (("pixel",) if self.cfg.score_normalization == "pixel" else ())

    @property
    def frozen_encoder(self) -> bool:
        """The encoder keeps its pretrained weights and BatchNorm statistics (``encoder_lr_scale == 0``)."""
        return self.cfg.encoder_lr_scale == 0

    def train(self, mode: bool = True) -> TSDN:
        super().train(mode)
        if self.frozen_encoder:
            self.encoder.eval()  # BatchNorm keeps the pretrained running statistics
        return self

    def forward(self, image: torch.Tensor, fne_gate: bool = True) -> TSDNOutput:
        """Both streams on ``image`` (B, 3, H, W) in [0, 1] (SURF-distorted while training).

        ``fne_gate=False`` (DCD_A warm-up, ``mask_warmup_epochs``): DCD_N decodes the ungated F(1/32) and the
        FNE outputs (W', W_gt) are None, so its loss term is 0.
        """
        return self._run(image, with_targets=True, with_mask=True, fne_gate=fne_gate)

    def predict(self, image: torch.Tensor) -> TSDNPrediction:
        """Anomaly map of the configured ``score_source`` (of the ``map_strides`` stages, with them) and image score;
        call in eval mode without grad.

        Args:
            image: (B, 3, H, W) float in [0, 1].
        """
        if not self._encoder_norm_ready:
            msg = "TSDN: encoder_norm is 'adapted' but fit_encoder_norm was never called on normal images"
            raise RuntimeError(msg)
        maps, reconstruction = self._source_maps(image, self.cfg.score_source)
        scored = self.normalize_map(maps[self.cfg.score_source])
        anomaly_map = scored if self.map_positions is None else self.normalize_map(maps[MAP_KEY], MAP_KEY)
        return TSDNPrediction(anomaly_map, image_score(scored, self.cfg.score_topk), reconstruction, scored)

    @property
    def scores_another_map(self) -> bool:
        """The image score reduces a map other than the anomaly map (``map_strides``): ``predict``'s ``scored_map``."""
        return self.map_positions is not None

    def component_maps(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every available source's (B, 1, H, W) map of ``image``: reconstruction, feature, and (with DCD_A)
        mask and fused; with ``map_strides``, also ``feature_map`` (the stages of the anomaly map). Raw, before
        ``score_normalization``. Call in eval mode without grad."""
        return self._source_maps(image, "all")[0]

    @torch.no_grad()
    def fit_score_scales(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Set ``score_scales`` from normal images: per source, the mean over images of the map's maximum.

        Args:
            images: (B, 3, H, W) batches in [0, 1] of held-out normal images.

        Returns:
            The new ``score_scales`` (2,): [reconstruction, mask] (mask 1 without DCD_A).
        """
        batches = [images] if isinstance(images, torch.Tensor) else list(images)
        maxima: dict[str, list[torch.Tensor]] = {"reconstruction": [], "mask": []}
        for batch in batches:
            maps, _ = self._source_maps(batch, "scales")
            for name, values in maps.items():
                maxima[name].append(values.flatten(start_dim=1).amax(dim=1))
        if not maxima["reconstruction"]:
            msg = "fit_score_scales: no images"
            raise ValueError(msg)
        scales = [torch.cat(maxima[name]).float().mean() if maxima[name] else torch.ones(()) for name in maxima]
        self.score_scales.copy_(torch.stack(scales).clamp_min(1e-6).to(self.score_scales))
        return self.score_scales.clone()

    @torch.no_grad()
    def normal_stat_sums(self, images: Iterable[torch.Tensor], step: str = "pixel") -> torch.Tensor:
        """Sums for :meth:`set_normal_stats` over normal images, a float64 vector whose first entry is the image
        count. ``pixel``: then the per-position sum and sum of squares of the score source's raw map at the config's
        ``input_shape`` H x W (``1 + 2 * H * W``). ``whitening``: then per compared stage the number of positions, the
        sum of the residuals ``f_I - f_R`` over every position (C_k) and of their outer products (C_k * C_k).
        ``flips`` (of held-out normal images): then per mirror (left-right, up-down, both) the number of images whose
        score source's raw map (one view, before ``score_normalization``) scores higher mirrored than as they are.

        Sums, so that data-parallel workers can add theirs (an all-reduce) before one :meth:`set_normal_stats`.
        Steps are fitted in :attr:`normal_fit_steps` order: ``pixel``'s map reads the fitted whitening.

        Args:
            images: (B, 3, H, W) batches in [0, 1] of normal images at ``input_shape`` (eval mode, on the model's
                device).
            step: one of :attr:`normal_fit_steps`.
        """
        self._check_step(step, "normal_stat_sums")
        if self.training:
            msg = "normal_stat_sums: call in eval mode (model.eval()), as for scoring"
            raise RuntimeError(msg)
        if step == "whitening":
            return self._whitening_sums(images)
        if step == "flips":
            return self._flip_sums(images)
        shape = self.cfg.input_shape
        n = shape[0] * shape[1]
        keys = [self.cfg.score_source] + ([MAP_KEY] if self.map_positions is not None else [])
        sums = torch.zeros(1 + 2 * n * len(keys), dtype=torch.float64, device=self.score_scales.device)
        for batch in images:
            maps = self._source_maps(batch, self.cfg.score_source)[0]
            if tuple(maps[keys[0]].shape[-2:]) != shape:
                size = "x".join(map(str, shape))
                msg = f"normal_stat_sums: images must be {size} (image_size), got {tuple(batch.shape[-2:])}"
                raise ValueError(msg)
            sums[0] += len(batch)
            for j, key in enumerate(keys):
                flat = maps[key].double().flatten(start_dim=1)
                offset = 1 + 2 * n * j
                sums[offset : offset + n] += flat.sum(dim=0)
                sums[offset + n : offset + 2 * n] += flat.pow(2).sum(dim=0)
        return sums

    @torch.no_grad()
    def set_normal_stats(self, sums: torch.Tensor, step: str = "pixel", held_out: torch.Tensor | None = None) -> int:
        """Set one step's buffers from :meth:`normal_stat_sums` (added over workers); returns the image count.

        ``pixel``: the per-position variance is blurred with ``score_sigma`` (``image_score_sigma`` for the scored
        map of a model with ``map_strides``): a few hundred images estimate it noisily, and the map is blurred alike.
        Its square root is floored at 1 % of its mean, so that a position where every normal map is the same does
        not divide by zero. ``whitening``: the covariance is shrunk by ``feature_shrinkage`` toward a scaled
        identity and ``W = diag(1 / sqrt(eigenvalues)) V'``.

        ``held_out``: the ``whitening`` sums of normal images kept out of ``sums``, which
        ``feature_position_shrinkage: auto`` needs (:attr:`chooses_position_blend`) and nothing else takes: per
        stage, the blend of :data:`POSITION_BLENDS` under whose Gaussian they are likeliest is kept
        (:attr:`position_blends` says which).

        ``flips``: ``sums`` are of the held-out normal images themselves; each mirror is kept when at most
        :data:`~tsdn.config.FLIP_LIMIT` of them scored higher mirrored (:attr:`flip_fractions`) and they are at least
        :data:`~tsdn.config.FLIP_MIN_IMAGES`, and :attr:`test_flips` becomes 4 when every mirror is kept, else 2 when
        the left-right one is, else 1.
        """
        self._check_step(step, "set_normal_stats")
        count = int(sums[0].item())
        if step == "flips":  # too few held-out images (even 0 or 1) choose the image alone: nothing to refuse
            self._set_flips(sums[1:], count)
            return count
        if count < 2:
            msg = f"set_normal_stats: {step} statistics need at least 2 normal images, got {count}"
            raise ValueError(msg)
        wants_held = step == "whitening" and self.chooses_position_blend
        if wants_held and (held_out is None or held_out[0].item() < 1):
            msg = "set_normal_stats: feature_position_shrinkage 'auto' chooses on held-out normal images; got none"
            raise ValueError(msg)
        if held_out is not None and not wants_held:
            msg = f"set_normal_stats: held_out is only for the whitening of feature_position_shrinkage 'auto' ({step})"
            raise ValueError(msg)
        if step == "whitening":
            self._set_whitening(sums[1:], count, None if held_out is None else held_out[1:])
            return count
        height, width = self.cfg.input_shape
        n = height * width
        targets = [(self.normal_mean, self.normal_std)]
        if self.map_positions is not None:
            targets.append((self.map_mean, self.map_std))
        if len(sums) != 1 + 2 * n * len(targets):
            msg = f"set_normal_stats: pixel sums of {len(sums)} values; this model's are {1 + 2 * n * len(targets)}"
            raise ValueError(msg)
        sigmas = [self.cfg.scored_map_sigma, self.cfg.score_sigma]  # each map's variance blurred as the map is
        for j, (mean_buffer, std_buffer) in enumerate(targets):
            offset = 1 + 2 * n * j
            mean, var = moments_from_sums(count, sums[offset : offset + n], sums[offset + n : offset + 2 * n])
            std = position_std(var.view(1, 1, height, width), sigmas[j])
            mean_buffer.copy_(mean.view(1, 1, height, width).to(mean_buffer))
            std_buffer.copy_(std.to(std_buffer))
        self.normal_count.fill_(count)
        self._normal_stats_ready = True
        return count

    def fit_normal_stats(self, images: Iterable[torch.Tensor], held_out: Iterable[torch.Tensor] | None = None) -> int:
        """Every step of :attr:`normal_fit_steps` (:meth:`normal_stat_sums` then :meth:`set_normal_stats`) in one
        process; ``images`` is read once per step, ``held_out`` (normal images kept out of ``images``: only with
        :attr:`needs_held_out`) once per step that reads it. Returns the number of ``images``."""
        if not self.normal_fit_steps:
            msg = "fit_normal_stats: the model has nothing to fit (feature_distance cosine, score_normalization none)"
            raise ValueError(msg)
        batches = list(images)
        held_batches = None if held_out is None else list(held_out)
        if held_batches is not None and not self.needs_held_out:
            msg = "fit_normal_stats: held_out is only for feature_position_shrinkage or test_flips 'auto'"
            raise ValueError(msg)
        count = 0
        for step in self.normal_fit_steps:
            if step == "flips":
                if not held_batches:
                    msg = "fit_normal_stats: test_flips 'auto' chooses on held-out normal images; got none"
                    raise ValueError(msg)
                self.set_normal_stats(self.normal_stat_sums(held_batches, step), step)
                continue
            held = None
            if held_batches is not None and step == "whitening" and self.chooses_position_blend:
                held = self.normal_stat_sums(held_batches, step)
            count = self.set_normal_stats(self.normal_stat_sums(batches, step), step, held)
        return count

    @property
    def needs_held_out(self) -> bool:
        """The fit chooses on held-out normal images: the whitening's blend (:attr:`chooses_position_blend`) or the
        ``flips`` step's mirrors (``test_flips: auto``)."""
        return self.cfg.needs_held_out

    @property
    def chooses_position_blend(self) -> bool:
        """The whitening's fit chooses its blend on held-out normal images (the config's
        :attr:`~tsdn.config.TSDNConfig.chooses_position_blend`): :meth:`set_normal_stats` takes their ``whitening``
        sums."""
        return self.cfg.chooses_position_blend

    def _encoder_norm_layout(self) -> tuple[list[tuple[nn.modules.batchnorm._BatchNorm, int]], int]:
        """The encoder's BatchNorm layers that ``encoder_norm`` adapts (those whose activations are at most
        ``encoder_norm_max_stride``, every one without it), each with the offset of its block in
        :meth:`encoder_norm_sums` (count, C sums, C sums of squares), and the sums' length (the image count first).
        Worked out on the first call (a forward pass of one blank image with a stride limit) and kept."""
        if self._norm_layout is not None:
            return self._norm_layout
        norms = [m for m in self.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        limit = self.cfg.encoder_norm_max_stride
        if limit is not None:
            strides = self._norm_strides(norms)
            norms = [norm for norm in norms if strides[norm] <= limit]
            if not norms:
                found = sorted(set(strides.values()))
                msg = f"TSDN: encoder_norm_max_stride {limit} selects none of the encoder's BatchNorm layers"
                msg += f" (at strides {found})"
                raise ValueError(msg)
        layout, offset = [], 1
        for norm in norms:
            layout.append((norm, offset))
            offset += 1 + 2 * norm.num_features
        self._norm_layout = (layout, offset)
        return self._norm_layout

    @torch.no_grad()
    def _norm_strides(self, norms: list[nn.Module]) -> dict[nn.Module, int]:
        """Each of ``norms`` (BatchNorm layers of the encoder) -> the stride of its activations."""
        height, width = self.cfg.input_shape
        strides: dict[nn.Module, int] = {}

        def record(module: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            strides[module] = width // out.shape[-1]

        handles = [norm.register_forward_hook(record) for norm in norms]
        was_training = self.encoder.training
        try:
            self.encoder.eval()
            self.encoder(torch.zeros(1, 3, height, width, device=self.mean.device))
        finally:
            for handle in handles:
                handle.remove()
            self.encoder.train(was_training)
        return strides

    @torch.no_grad()
    def encoder_norm_sums(self, images: Iterable[torch.Tensor]) -> torch.Tensor:
        """Sums for :meth:`set_encoder_norm` over normal images, a float64 vector: the image count, then per
        adapted BatchNorm layer of the encoder (:meth:`_encoder_norm_layout`) the number of values per channel and
        the per-channel sum and sum of squares of its input. Each adapted layer normalises by its batch's own mean
        and variance on the way (as BatchNorm does while training; with ``encoder_norm_variance: pretrained`` by
        its mean and ImageNet's variance, as it will once set), the other layers by ImageNet's; no running
        statistic changes. Sums, so that data-parallel workers can add theirs.

        Args:
            images: (B, 3, H, W) batches in [0, 1] of normal images at ``input_shape``.
        """
        if self.cfg.encoder_norm != "adapted":
            msg = "encoder_norm_sums: the model's encoder_norm is 'pretrained' (nothing to fit)"
            raise ValueError(msg)
        layout, length = self._encoder_norm_layout()
        adapt_variance = self.cfg.encoder_norm_variance == "adapted"
        sums = torch.zeros(length, dtype=torch.float64, device=self.mean.device)
        saved = [(norm.running_mean.clone(), norm.running_var.clone()) for norm, _ in layout]

        def collect(start: int, c: int) -> Callable:
            def hook(module: nn.modules.batchnorm._BatchNorm, inputs: tuple[torch.Tensor, ...]) -> None:
                x = inputs[0].double()
                total, squares = x.sum(dim=(0, 2, 3)), x.pow(2).sum(dim=(0, 2, 3))
                n = x.numel() // c
                sums[start] += n
                sums[start + 1 : start + 1 + c] += total
                sums[start + 1 + c : start + 1 + 2 * c] += squares
                # this batch's statistics, used by the layer in eval mode right after
                mean, var = moments_from_sums(n, total, squares, unbiased=False)
                module.running_mean.copy_(mean.to(module.running_mean))
                if adapt_variance:
                    module.running_var.copy_(var.to(module.running_var))

            return hook

        handles = [norm.register_forward_pre_hook(collect(start, norm.num_features)) for norm, start in layout]
        was_training = self.encoder.training
        try:
            self.encoder.eval()
            for batch in images:
                self._check_input(batch)
                sums[0] += batch.shape[0]
                self.encoder((batch - self.mean) / self.std)
        finally:
            for handle in handles:
                handle.remove()
            for (norm, _), (mean, var) in zip(layout, saved, strict=True):
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(var)
            self.encoder.train(was_training)
        return sums

    @torch.no_grad()
    def set_encoder_norm(self, sums: torch.Tensor) -> int:
        """Set the adapted encoder BatchNorm layers' running mean and (unbiased) variance (only the mean with
        ``encoder_norm_variance: pretrained``) from :meth:`encoder_norm_sums` (added over workers); returns the
        image count."""
        count = int(sums[0].item())
        if count < 2:
            msg = f"set_encoder_norm: the encoder's statistics need at least 2 normal images, got {count}"
            raise ValueError(msg)
        layout, length = self._encoder_norm_layout()
        if sums.numel() != length:
            msg = f"set_encoder_norm: expected {length} sums for this encoder's adapted layers, got {sums.numel()}"
            raise ValueError(msg)
        for norm, offset in layout:
            c = norm.num_features
            total, squares = sums[offset + 1 : offset + 1 + c], sums[offset + 1 + c : offset + 1 + 2 * c]
            mean, var = moments_from_sums(float(sums[offset]), total, squares)
            norm.running_mean.copy_(mean.to(norm.running_mean))
            if self.cfg.encoder_norm_variance == "adapted":
                norm.running_var.copy_(var.to(norm.running_var))
        self.encoder_norm_count.fill_(count)
        self._encoder_norm_ready = True
        return count

    def fit_encoder_norm(self, images: Iterable[torch.Tensor]) -> int:
        """:meth:`encoder_norm_sums` then :meth:`set_encoder_norm` in one process; returns the image count."""
        return self.set_encoder_norm(self.encoder_norm_sums(images))

    def _check_step(self, step: str, caller: str) -> None:
        if step not in self.normal_fit_steps:
            steps = " | ".join(self.normal_fit_steps) or "none (feature_distance cosine, score_normalization none)"
            msg = f"{caller}: step {step!r} is not one this model fits: {steps}"
            raise ValueError(msg)

    def _whitening_layout(self) -> list[tuple[int, int]]:
        """Per compared stage, (C_k, the number of grid positions with separate statistics: 1 when pooled)."""
        layout = []
        for k in range(len(self.feature_stages)):
            mean = getattr(self, f"feature_mean_{k}")
            layout.append((mean.shape[0], mean[0].numel()))
        return layout

    def _whitening_sums(self, images: Iterable[torch.Tensor]) -> torch.Tensor:
        layout = self._whitening_layout()
        device = self.score_scales.device
        sums = torch.zeros(1 + sum(1 + p * (c + c * c) for c, p in layout), dtype=torch.float64, device=device)
        for batch in images:
            residuals = self._feature_residuals(batch)[0]
            sums[0] += batch.shape[0]
            offset = 1
            for residual, (c, p) in zip(residuals, layout, strict=True):
                # rows per position: (P, N, C), P = 1 (every position of every image pooled) or h * w
                rows = residual.double().permute(2, 3, 0, 1).reshape(-1, residual.shape[0], c)
                rows = rows.reshape(1, -1, c) if p == 1 else rows
                sums[offset] += rows.shape[1]
                sums[offset + 1 : offset + 1 + p * c] += rows.sum(dim=1).flatten()
                sums[offset + 1 + p * c : offset + 1 + p * (c + c * c)] += (rows.transpose(1, 2) @ rows).flatten()
                offset += 1 + p * (c + c * c)
        return sums

    def _flip_sums(self, images: Iterable[torch.Tensor]) -> torch.Tensor:
        mirrors = TEST_FLIPS[4][1:]
        sums = torch.zeros(1 + len(mirrors), dtype=torch.float64, device=self.score_scales.device)
        source, topk = self.cfg.score_source, self.cfg.score_topk
        for batch in images:
            own = image_score(self._view_maps(batch, source)[0][source], topk)
            sums[0] += batch.shape[0]
            for j, dims in enumerate(mirrors):
                mirrored = image_score(self._view_maps(batch.flip(dims), source)[0][source], topk)
                sums[1 + j] += (mirrored > own).sum()
        return sums

    def _set_flips(self, sums: torch.Tensor, count: int) -> None:
        fractions = (sums / max(count, 1)).tolist()
        if len(fractions) != len(TEST_FLIPS[4]) - 1:
            msg = f"set_normal_stats: flips sums of {len(sums) + 1} values; this model's are {len(TEST_FLIPS[4])}"
            raise ValueError(msg)
        kept = [fraction <= FLIP_LIMIT and count >= FLIP_MIN_IMAGES for fraction in fractions]
        self.test_flips = 4 if all(kept) else 2 if kept[0] else 1
        self.flip_fractions = tuple(round(fraction, 4) for fraction in fractions)
        self.test_flip_count.fill_(self.test_flips)

    def _set_whitening(self, sums: torch.Tensor, count: int, held: torch.Tensor | None) -> None:
        offset = 0
        blends = []
        for k, (c, p) in enumerate(self._whitening_layout()):
            mean, cov = _stage_moments(sums, offset, c, p)
            setting = self.cfg.feature_position_shrinkage
            if p == 1:
                whitening = _whitening_matrices(self._regularised(cov, None).cpu())[0]
            elif setting != "auto":
                whitening = _whitening_matrices(self._regularised(cov, float(setting)).cpu())[0]
                blends.append(float(setting))
            else:
                blend, whitening = self._likeliest_blend(mean, cov, _stage_scatter(held, offset, c, p, mean))
                blends.append(blend)
            mean_buffer = getattr(self, f"feature_mean_{k}")
            if p == 1:
                mean_buffer.copy_(mean[0].to(mean_buffer))
            else:
                mean_buffer.copy_(mean.T.reshape(mean_buffer.shape).to(mean_buffer))
            target = getattr(self, f"feature_whitening_{k}")
            target.copy_(whitening.reshape(target.shape).to(mean_buffer))
            offset += 1 + p * (c + c * c)
        self.position_blends = tuple(blends)
        self.feature_count.fill_(count)
        self._whitening_ready = True

    def _regularised(self, cov: torch.Tensor, blend: float | None) -> torch.Tensor:
        """(P, C, C) covariances -> each blended by ``blend`` toward the positions' mean covariance (None: pooled,
        P = 1), then shrunk by ``feature_shrinkage`` toward one scaled identity for every position."""
        if blend is not None:
            cov = (1 - blend) * cov + blend * cov.mean(dim=0, keepdim=True)
        shrink = self.cfg.feature_shrinkage
        scale = cov.diagonal(dim1=1, dim2=2).mean().clamp_min(1e-12)
        return (1 - shrink) * cov + shrink * scale * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)

    def _likeliest_blend(
        self, mean: torch.Tensor, cov: torch.Tensor, scatter: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        """The blend of :data:`POSITION_BLENDS` whose per-position Gaussians ``(mean, regularised cov)`` give the
        held-out residuals (their ``scatter`` about ``mean``, (P, C, C)) the least negative log-likelihood, averaged
        over positions, ``(tr(S^-1 scatter) + log det S) / 2``; and its whitening matrices."""
        best_nll, best = math.inf, (POSITION_BLENDS[0], scatter)
        for blend in POSITION_BLENDS:
            whitening, logdet = _whitening_matrices(self._regularised(cov, blend).cpu())
            scatter = scatter.to(whitening)
            quadratic = (whitening @ scatter @ whitening.transpose(1, 2)).diagonal(dim1=1, dim2=2).sum(-1)
            nll = 0.5 * float((quadratic + logdet).mean())
            if nll < best_nll:
                best_nll, best = nll, (blend, whitening)
        return best

    def normalize_map(self, anomaly_map: torch.Tensor, which: str = "score") -> torch.Tensor:
        """A raw (B, 1, H, W) map (as :meth:`component_maps` gives it) -> the map :meth:`predict` scores (``which``
        ``score``: the score source's) or returns (``feature_map``, with ``map_strides``): unchanged with
        ``score_normalization: none``, standardised per position by that map's own statistics with ``pixel``."""
        if self.cfg.score_normalization == "none":
            return anomaly_map
        if not self._normal_stats_ready:
            msg = "TSDN: score_normalization is 'pixel' but fit_normal_stats was never called on normal images"
            raise RuntimeError(msg)
        if which == MAP_KEY:
            return standardize_map(anomaly_map, self.map_mean, self.map_std)
        return standardize_map(anomaly_map, self.normal_mean, self.normal_std)

    def _source_maps(self, image: torch.Tensor, source: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Maps for ``source`` (a score source, "scales" = reconstruction + mask, or "all"), averaged over the
        ``test_flips`` views (each flipped back), and the reconstruction of the image itself."""
        if self.test_flips is None:
            msg = "TSDN: test_flips is 'auto' but fit_normal_stats never chose the mirrors on held-out normal images"
            raise RuntimeError(msg)
        views = TEST_FLIPS[self.test_flips]
        maps, reconstruction = self._view_maps(image, source)
        if len(views) == 1:
            return maps, reconstruction
        stacked = {name: [values] for name, values in maps.items()}
        for dims in views[1:]:
            for name, values in self._view_maps(image.flip(dims), source)[0].items():
                stacked[name].append(values.flip(dims))
        # the mean of a stack along the channels, not a running sum: OpenVINO's CPU plugin fuses a plain sum of
        # blurred maps into the blur and drops a term (as for the fused source, below)
        averaged = {name: torch.cat(parts, dim=1).mean(dim=1, keepdim=True) for name, parts in stacked.items()}
        return averaged, reconstruction

    def _view_maps(self, image: torch.Tensor, source: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`_source_maps` of one view."""
        sigma = self.cfg.score_sigma
        has_mask = self.dcd_a is not None
        want = {
            "reconstruction": source in ("reconstruction", "fused", "scales", "all"),
            "mask": has_mask and source in ("mask", "fused", "scales", "all"),
            "feature": source in ("feature", "all"),
        }
        encoded = self.encoder((image - self.mean) / self.std)
        out = self._run(image, with_targets=False, with_mask=want["mask"], fne_gate=True, encoded=encoded)
        maps: dict[str, torch.Tensor] = {}
        if want["reconstruction"]:
            maps["reconstruction"] = score_map(image, out.reconstruction, sigma)
        if want["mask"]:
            maps["mask"] = blur_map(torch.sigmoid(out.mask_logits.float()), sigma)
        if want["feature"]:
            stages = self.feature_stages
            of_recon = self.encoder((out.reconstruction - self.mean) / self.std)  # I's features: `encoded`
            size = tuple(image.shape[-2:])
            if self.cfg.feature_distance == "cosine":
                per_stage = feature_stage_maps([encoded[i] for i in stages], [of_recon[i] for i in stages], size)
            else:
                if not self._whitening_ready:
                    msg = "TSDN: feature_distance is 'mahalanobis' but fit_normal_stats was never called"
                    raise RuntimeError(msg)
                per_stage = whitened_stage_maps(
                    [encoded[i] - of_recon[i] for i in stages],
                    [getattr(self, f"feature_mean_{k}") for k in range(len(stages))],
                    [getattr(self, f"feature_whitening_{k}") for k in range(len(stages))],
                    size,
                )
            maps["feature"] = mean_stage_map(per_stage, self.cfg.scored_map_sigma)
            if self.map_positions is not None:
                maps[MAP_KEY] = mean_stage_map([per_stage[k] for k in self.map_positions], sigma)
        if source in ("fused", "all") and has_mask:
            scales = self.score_scales.float().view(1, 2, 1, 1)
            # 0.5 * (rec / s_rec + mask / s_mask), written as a sum over a stacked pair (the same float operations):
            # OpenVINO 2026.4's CPU plugin miscomputes the plain sum of the two blurred maps (it fuses the Add into
            # a blur convolution and drops a term; measured, tests/unit/test_export.py).
            stacked = torch.cat([maps["reconstruction"], maps["mask"]], dim=1) / scales
            maps["fused"] = 0.5 * stacked.sum(dim=1, keepdim=True)
        return maps, out.reconstruction

    def _feature_residuals(
        self, image: torch.Tensor, stages: list[int] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per encoder stage (``stages``, indices; None = the compared ones), ``f_I - f_R`` and ``f_I``
        (B, C_k, h_k, w_k) of ``image``."""
        stages = self.feature_stages if stages is None else stages
        encoded = self.encoder((image - self.mean) / self.std)
        out = self._run(image, with_targets=False, with_mask=False, fne_gate=True, encoded=encoded)
        of_recon = self.encoder((out.reconstruction - self.mean) / self.std)
        return [encoded[i] - of_recon[i] for i in stages], [encoded[i] for i in stages]

    def _run(
        self,
        image: torch.Tensor,
        with_targets: bool,
        with_mask: bool,
        fne_gate: bool,
        encoded: list[torch.Tensor] | None = None,
    ) -> TSDNOutput:
        """Both streams; ``encoded`` = the encoder's features of ``image`` when the caller already has them."""
        self._check_input(image)
        *skips, deepest = encoded if encoded is not None else self.encoder((image - self.mean) / self.std)
        features = self.reduce(deepest)
        mask_logits = weights_logits = weights_gt = None
        bottleneck = features
        if self.fne is not None:
            if fne_gate:
                weights_logits = self.fne(features)
                bottleneck = features * torch.sigmoid(weights_logits)[:, :, None, None]
            # With the FNE, M' is only a training signal (its loss and W_gt) unless a score source reads it.
            if with_mask:
                mask_logits = self.dcd_a(features, skips)
            if with_targets and fne_gate:
                weights_gt = normality_target(features, torch.sigmoid(mask_logits), self.cfg.ssim_window)
        elif self.dcd_a is not None:
            # Paper Table 4 E: the FNE replaced by multiplying M' (pooled to the size of F(1/32)) into F(1/32).
            mask_logits = self.dcd_a(features, skips)
            bottleneck = features * F.adaptive_avg_pool2d(torch.sigmoid(mask_logits), features.shape[-2:])
        reconstruction = torch.sigmoid(self.dcd_n(bottleneck, skips))
        return TSDNOutput(reconstruction, mask_logits, weights_logits, weights_gt, features)

    def _check_input(self, image: torch.Tensor) -> None:
        check_input(image, self.stride, "TSDN")


def _whitening_matrices(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, C, C) covariances -> (P, C, C) ``W`` with ``W' W`` = the inverse of each, ``diag(1 / sqrt(l)) V'``, and
    (P,) the log-determinant of each.

    The eigendecomposition rather than an inverse: eigenvalues are clamped, so a covariance that rounding left a
    little indefinite still whitens."""
    eigenvalues, vectors = torch.linalg.eigh(cov)
    eigenvalues = eigenvalues.clamp_min(1e-12)
    return (vectors * eigenvalues.rsqrt()[:, None, :]).transpose(1, 2), eigenvalues.log().sum(-1)


def _stage_block(sums: torch.Tensor, offset: int, c: int, p: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One stage's block of :meth:`TSDN.normal_stat_sums` (``whitening``, the count dropped) at ``offset`` -> the
    number of residuals per position, their mean (P, C) and mean outer product (P, C, C); P = 1 when pooled."""
    rows = float(sums[offset])
    mean = (sums[offset + 1 : offset + 1 + p * c] / rows).view(p, c)
    second = (sums[offset + 1 + p * c : offset + 1 + p * (c + c * c)] / rows).view(p, c, c)
    return rows, mean, second


def _stage_moments(sums: torch.Tensor, offset: int, c: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One stage's block -> the mean (P, C) and unbiased covariance (P, C, C) per position."""
    rows, mean, second = _stage_block(sums, offset, c, p)
    return mean, (second - mean[:, :, None] * mean[:, None, :]) * (rows / (rows - 1))


def _stage_scatter(sums: torch.Tensor, offset: int, c: int, p: int, centre: torch.Tensor) -> torch.Tensor:
    """The same block of other images' sums -> their mean outer product about ``centre`` (P, C) per position,
    ``E[(x - centre)(x - centre)']``."""
    _, mean, second = _stage_block(sums, offset, c, p)
    cross = mean[:, :, None] * centre[:, None, :]
    return second - cross - cross.transpose(1, 2) + centre[:, :, None] * centre[:, None, :]


def moments_from_sums(
    count: float, total: torch.Tensor, squares: torch.Tensor, unbiased: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and variance (unbiased unless told: BatchNorm normalises a batch by the biased one) of ``count``
    values from their sum and sum of squares (elementwise)."""
    mean = total / count
    var = (squares / count - mean.pow(2)).clamp_min(0.0)
    return mean, var * (count / (count - 1)) if unbiased else var


def _after_load(module: nn.Module, incompatible_keys: object) -> None:
    """A loaded state carries fitted statistics when its ``normal_count`` / ``feature_count`` /
    ``encoder_norm_count`` / ``test_flip_count`` is above 0."""
    if hasattr(module, "normal_count"):
        module._normal_stats_ready = int(module.normal_count) > 0
    if hasattr(module, "feature_count"):
        module._whitening_ready = int(module.feature_count) > 0
    if hasattr(module, "encoder_norm_count"):
        module._encoder_norm_ready = int(module.encoder_norm_count) > 0
    if hasattr(module, "test_flip_count"):
        module.test_flips = int(module.test_flip_count) or None
