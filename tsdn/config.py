"""TSDN model and training hyper-parameters: one validated dataclass whose defaults are the paper's.

Every ablation of the paper's Tables 3 and 4 is a set of switch overrides in :data:`ABLATIONS`
(see ``tsdn/README.md`` for the row -> switch mapping and why).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tsdn import config_io
from tsdn.config_io import check
from tsdn.resize import input_shape, parse_image_size

__all__ = [
    "ABLATIONS",
    "FLIP_LIMIT",
    "FLIP_MIN_IMAGES",
    "POSITION_BLENDS",
    "SCORE_SOURCES",
    "TEST_FLIPS",
    "TSDNConfig",
    "apply_ablation",
]

ScoreSource = Literal["reconstruction", "mask", "fused", "feature"]
SCORE_SOURCES: tuple[str, ...] = ("reconstruction", "mask", "fused", "feature")
# What ``feature_position_shrinkage: auto`` chooses from, per stage (BENCHMARKS.md, "The per-position blend chosen
# on held-out normals"): from nearly a covariance per position to one covariance for every position.
POSITION_BLENDS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# ``test_flips`` -> the views the maps are averaged over, each the dims of a (B, C, H, W) tensor to flip.
TEST_FLIPS: dict[int, tuple[tuple[int, ...], ...]] = {1: ((),), 2: ((), (3,)), 4: ((), (3,), (2,), (2, 3))}
# ``test_flips: auto`` keeps a mirror when at most this fraction of the held-out normal images score higher mirrored
# than as they are, and only from FLIP_MIN_IMAGES of them: with 12, a texture's mirror (each image above or below
# by a coin's toss) is dropped by chance 2 % of the time, with 5 it would be 19 % (BENCHMARKS.md, "Maps averaged
# over mirror images").
FLIP_LIMIT = 0.75
FLIP_MIN_IMAGES = 8


@dataclass(frozen=True)
class TSDNConfig:
    """Hyper-parameters of one TSDN model. Defaults reproduce Park et al. (Sec. 3.1).

    Attributes:
        image_size: side S of the square network input, images resized to S x S (paper: 352); or [H, W] for a
            product line shot at another aspect (KolektorSDD's 250 x 630 parts: [320, 128]), so that resizing
            does not squash a defect along one axis. Each side a multiple of 32.
        backbone: timm model name of the encoder (paper: EfficientNet-b5).
        weights: encoder weights spec for :func:`tsdn.backbone.resolve_weights` ("hub", "none",
            "package:efficientnet-lite0" (or -lite1, -lite2), a local .safetensors/.pth path, or a store URI).
        feature_channels: C, the channels of F(1/32) after the 1x1 reduction conv (paper: unstated).
        n_segments: N_s, SLIC superpixels per training image.
        n_filled: S_s, superpixels filled with a random colour by SURF.
        slic_compactness: SLIC colour/space trade-off (scikit-image's default; paper: unstated).
        lr: Adam learning rate.
        w_l2, w_ssim, w_gms, w_mask, w_fne: loss weights lambda_r, lambda_s, lambda_g, lambda_m, lambda_f.
        ssim_window: Gaussian window of the SSIM loss and of the FNE's channel-wise SSIM.
        gms_c: stabilising constant c of the gradient magnitude similarity.
        score_sigma: std (pixels at S x S) of the Gaussian blur of the score map, 0 = no blur (paper: unstated).
        fne_hidden: width of the FNE estimator's two hidden FC layers (paper: unstated).
        fne_pool: side P of the adaptive pooling before the FNE flatten; None = S // 32, i.e. the
            identity at the configured input size, so the flatten is exactly the paper's.
        dcd_a: two-stream model (DCD_A predicts the SURF mask); False = one-stream AE (DCD_N only).
        skip: encoder skip connections into the decoders.
        surf: train on SURF-distorted images (the training loop reads this switch).
        fne: feature normality estimator; False = F_nm1 = F(1/32) * M' (paper Table 4 E).

    Inference (what the paper leaves open or where measurement chose otherwise; ``tsdn/README.md``):
        score_source: which map scores an image. ``reconstruction`` = the paper's Eq. 4, blurred
            ||I - R||_2; ``mask`` = DCD_A's M', blurred alike; ``feature`` = 1 - cosine similarity of the
            encoder's features of I and of R at ``feature_strides``, upsampled and blurred; ``fused`` = the
            mean of the reconstruction and mask maps, each divided by its scale on held-out normal
            images (``TSDN.score_scales``, fitted with the calibration) so neither swamps the other.
        score_topk: image score = the mean of the top ``score_topk`` fraction of the map's pixels;
            0 = the map's maximum (the paper).
        test_flips: the score source's maps averaged over mirror images of the input, each map flipped back
            before the average: 1 = the image alone (the paper), 2 = and its left-right mirror, 4 = and its up-down
            mirror and both. For a product line whose mirror image is a normal image (a texture), not for a part
            shot in one pose (a transistor upside down is not a normal transistor). Costs that many forward passes
            per image; the per-position statistics are fitted on the averaged maps. ``auto``: chosen on normal
            images held out of the fit (:meth:`tsdn.model.TSDN.fit_normal_stats` takes them as ``held_out``): a
            mirror is kept when at most :data:`FLIP_LIMIT` of them score higher mirrored than as they are (about
            half do where a mirror image is as normal as the image); 4 when every mirror is kept, else 2 when the
            left-right one is, else 1. With fewer than :data:`FLIP_MIN_IMAGES` held-out normals, 1: too few to tell.
        score_normalization: ``none`` (the paper) or ``pixel``: every position of the map is standardised,
            ``(map - mean) / std``, by the mean and standard deviation of the map at that position over the
            normal training images (:meth:`tsdn.model.TSDN.fit_normal_stats`, after training; buffers saved
            with the weights), so that a position every normal image lights up (an edge the decoder never
            reconstructs sharply) no longer outscores a defect elsewhere. The std is blurred like the map.
            Not with ``fused`` (validation refits its scales after the statistics are taken).
        feature_distance: how the ``feature`` source compares the encoder features of I and of R per
            position: ``cosine`` (``1 - cos(f_I, f_R)``) or ``mahalanobis``: the residual ``f_I - f_R`` whitened
            by its mean and covariance over every position of the normal training images
            (:meth:`tsdn.model.TSDN.fit_normal_stats`; buffers saved with the weights), ``sqrt(r' P r / C)``, so
            that residual directions every normal image has (texture the decoder cannot reproduce) count
            little and unusual ones count much. Only with ``score_source: feature``.
        feature_shrinkage: with ``mahalanobis``, the covariance is shrunk toward a scaled identity,
            ``(1 - a) * cov + a * mean(diag(cov)) * I``, so that a few hundred images estimate it stably.
        feature_whitening: with ``mahalanobis``, whose statistics whiten the residual: ``pooled`` (one mean and
            covariance per stage over every position of the normal images) or ``position`` (a mean and covariance
            per position of each stage's grid, PaDiM-like: on an aligned object the residual at a lead's tip is
            not distributed like the residual on the case). Costs ``h * w * C * C`` floats per stage in the
            checkpoint (about 26 MB for Lite0 at 192 px, strides 8 + 16 + 32).
        feature_position_shrinkage: with ``position``, each position's covariance is shrunk toward the mean of
            the positions' covariances, ``(1 - b) * cov_p + b * mean_p(cov_p)``, then by ``feature_shrinkage``
            toward a scaled identity: a few hundred images per position estimate a C x C covariance poorly.
            ``auto``: per stage, the b of :data:`POSITION_BLENDS` under whose Gaussians normal images held out of
            the fit are likeliest (the platform's held-out split; :meth:`tsdn.model.TSDN.fit_normal_stats` takes
            them as ``held_out``): small on an aligned part, near 1 on a texture whose positions differ by noise.
        feature_strides: the encoder strides (output strides of its stages, e.g. 4, 8, 16, 32) whose features
            the ``feature`` source compares; each stage's distance map is upsampled to S x S and the stages
            are averaged. A stride the encoder lacks is refused when the model is built.
        map_strides: the strides (a subset of ``feature_strides``) whose stages make the anomaly map; None = all of
            them. The image score still comes from every stage of ``feature_strides``: a coarse stage carries
            image-level evidence but spreads a defect's score over its large cells. With ``score_normalization:
            pixel`` the map has its own per-position statistics; the calibration's ``map_offset`` puts it in the
            score's units (``tsdn.calibration``).
        image_score_sigma: with ``map_strides``, the std (pixels at S x S) of the blur of the map the image score
            reads (every stage of ``feature_strides``; its per-position std is blurred alike); None = ``score_sigma``,
            as the anomaly map's. A defect only a coarse stage sees is a peak of a few pixels there, which a narrower
            blur keeps higher above the normal images' maxima; the map a person reads keeps ``score_sigma``.

    Training recipe (read by :mod:`tsdn.training`; the defaults are the paper's):
        encoder_lr_scale: the encoder's learning rate is ``lr * encoder_lr_scale``; 0 freezes it
            (no gradient, BatchNorm statistics kept) - the paper trains it with everything else (1).
        encoder_norm: the frozen encoder's BatchNorm statistics: ``pretrained`` (ImageNet's, as the weights came)
            or ``adapted``: re-estimated on the product line's normal training images before the first step
            (:meth:`tsdn.model.TSDN.fit_encoder_norm`; AdaBN, Li et al. 2016; saved with the weights), so the
            encoder normalises this line's images instead of ImageNet's. Only with ``encoder_lr_scale: 0``: an
            encoder that trains adapts its statistics while it trains.
        encoder_norm_variance: with ``encoder_norm: adapted``, whether each adapted layer's variance is
            re-estimated with its mean (``adapted``) or ImageNet's is kept (``pretrained``: only the means move).
        encoder_norm_max_stride: with ``encoder_norm: adapted``, adapt only the BatchNorm layers whose activations
            are at most this stride (2 = the stem and the first block of EfficientNet); the deeper layers keep
            ImageNet's statistics. ``null`` = every layer.
        lr_schedule: ``constant`` (the paper) or ``cosine`` (to 1 % of ``lr`` over the run).
        mask_loss: DCD_A's loss against the SURF mask: ``l2`` (the paper), ``bce`` or ``focal`` (gamma 2).
        mask_warmup_epochs: epochs during which the FNE does not gate F(1/32) (and is not trained), so
            that DCD_A's M' is learnt before W_gt is computed from it; 0 = the paper.
        surf_fill: what fills SURF's chosen superpixels: ``colour`` (one flat random colour each, the
            paper), ``image`` (the pixels of another image of the batch, shifted by a random offset:
            real texture out of place) or ``noise`` (a smooth random-colour noise texture).
        surf_opacity_min: each sample's fill is blended over the image with an opacity drawn uniformly
            from ``[surf_opacity_min, 1]``; 1 = opaque (the paper).
    """

    image_size: int | tuple[int, int] = 352
    backbone: str = "efficientnet_b5"
    weights: str = "hub"
    feature_channels: int = 64
    n_segments: int = 400
    n_filled: int = 50
    slic_compactness: float = 10.0
    lr: float = 7e-5
    w_l2: float = 1.0
    w_ssim: float = 0.5
    w_gms: float = 1.0
    w_mask: float = 1.0
    w_fne: float = 5e-5
    ssim_window: int = 11
    gms_c: float = 0.0026
    score_sigma: float = 4.0
    fne_hidden: int = 512
    fne_pool: int | None = None
    dcd_a: bool = True
    skip: bool = True
    surf: bool = True
    fne: bool = True
    score_source: ScoreSource = "reconstruction"
    score_topk: float = 0.0
    test_flips: int | Literal["auto"] = 1
    score_normalization: Literal["none", "pixel"] = "none"
    feature_distance: Literal["cosine", "mahalanobis"] = "cosine"
    feature_shrinkage: float = 0.01
    feature_whitening: Literal["pooled", "position"] = "pooled"
    feature_position_shrinkage: float | Literal["auto"] = 0.1
    feature_strides: tuple[int, ...] = (8, 16)
    map_strides: tuple[int, ...] | None = None
    image_score_sigma: float | None = None
    encoder_lr_scale: float = 1.0
    encoder_norm: Literal["pretrained", "adapted"] = "pretrained"
    encoder_norm_variance: Literal["adapted", "pretrained"] = "adapted"
    encoder_norm_max_stride: int | None = None
    lr_schedule: Literal["constant", "cosine"] = "constant"
    mask_loss: Literal["l2", "bce", "focal"] = "l2"
    mask_warmup_epochs: int = 0
    surf_fill: Literal["colour", "image", "noise"] = "colour"
    surf_opacity_min: float = 1.0

    @property
    def scored_map_sigma(self) -> float:
        """The blur of the map the image score reads: ``image_score_sigma`` where set, else ``score_sigma``."""
        return self.score_sigma if self.image_score_sigma is None else float(self.image_score_sigma)

    @property
    def chooses_position_blend(self) -> bool:
        """The whitening's fit chooses its blend on held-out normal images (``feature_whitening: position`` with
        ``feature_position_shrinkage: auto``)."""
        position = self.feature_distance == "mahalanobis" and self.feature_whitening == "position"
        return position and self.feature_position_shrinkage == "auto"

    @property
    def needs_held_out(self) -> bool:
        """Fitting the statistics takes normal images held out of the fit: the whitening's blend
        (:attr:`chooses_position_blend`) or, with ``test_flips: auto``, the mirror images are chosen on them."""
        return self.chooses_position_blend or self.test_flips == "auto"

    def __post_init__(self) -> None:
        image_size, sides = parse_image_size(self.image_size)
        object.__setattr__(self, "image_size", image_size)
        size_ok = sides is not None and all(side >= 64 and side % 32 == 0 for side in sides)
        check(self, size_ok, "image_size", "S or [H, W], each a multiple of 32, >= 64")
        check(self, bool(self.backbone.strip()), "backbone", "a timm model name")
        check(self, bool(self.weights.strip()), "weights", "a weights spec")
        for name in ("feature_channels", "n_segments", "n_filled", "fne_hidden"):
            check(self, getattr(self, name) >= 1, name, ">= 1")
        check(self, self.n_filled <= self.n_segments, "n_filled", f"<= n_segments ({self.n_segments})")
        for name in ("slic_compactness", "lr", "gms_c"):
            check(self, getattr(self, name) > 0, name, "> 0")
        for name in ("w_l2", "w_ssim", "w_gms", "w_mask", "w_fne", "score_sigma"):
            check(self, getattr(self, name) >= 0, name, ">= 0")
        check(self, self.ssim_window >= 3 and self.ssim_window % 2 == 1, "ssim_window", "odd, >= 3")
        check(self, self.fne_pool is None or self.fne_pool >= 1, "fne_pool", "None or >= 1")
        # DCD_A learns the SURF mask, so it has no target without SURF; the FNE consumes DCD_A's M'.
        check(self, self.surf or not self.dcd_a, "dcd_a", "False when surf is False (no mask to learn)")
        check(self, self.dcd_a or not self.fne, "fne", "False when dcd_a is False (the FNE needs M')")
        check(self, self.score_source in SCORE_SOURCES, "score_source", " | ".join(SCORE_SOURCES))
        needs_mask = self.score_source in ("mask", "fused")
        check(self, self.dcd_a or not needs_mask, "score_source", "a source without M' when dcd_a is False")
        check(self, 0 <= self.score_topk < 1, "score_topk", "in [0, 1) (0 = the maximum)")
        flips = self.test_flips
        flips_ok = flips == "auto" or (isinstance(flips, int) and not isinstance(flips, bool) and flips in TEST_FLIPS)
        check(self, flips_ok, "test_flips", "1 (none), 2 (left-right), 4 (left-right, up-down and both) or 'auto'")
        check(self, self.score_normalization in ("none", "pixel"), "score_normalization", "none | pixel")
        # The fused map divides by score_scales, which validation refits after the statistics were taken.
        fused_pixel = self.score_normalization == "pixel" and self.score_source == "fused"
        check(self, not fused_pixel, "score_normalization", "'none' with score_source fused (its scales move)")
        distances = ("cosine", "mahalanobis")
        check(self, self.feature_distance in distances, "feature_distance", "cosine | mahalanobis")
        maha_ok = self.feature_distance == "cosine" or self.score_source == "feature"
        check(self, maha_ok, "feature_distance", "'cosine' unless score_source is feature (it whitens that map)")
        check(self, 0 < self.feature_shrinkage <= 1, "feature_shrinkage", "in (0, 1]")
        check(self, self.feature_whitening in ("pooled", "position"), "feature_whitening", "pooled | position")
        position_ok = self.feature_whitening == "pooled" or self.feature_distance == "mahalanobis"
        check(self, position_ok, "feature_whitening", "'pooled' unless feature_distance is mahalanobis")
        blend = self.feature_position_shrinkage
        number = isinstance(blend, (int, float)) and not isinstance(blend, bool)
        shrink_ok = blend == "auto" or (number and 0 <= blend <= 1)
        check(self, shrink_ok, "feature_position_shrinkage", "in [0, 1], or 'auto'")
        strides_ok = len(self.feature_strides) >= 1 and all(s >= 1 for s in self.feature_strides)
        strides_ok = strides_ok and len(set(self.feature_strides)) == len(self.feature_strides)
        check(self, strides_ok, "feature_strides", "a non-empty list of distinct encoder strides (e.g. [8, 16])")
        if self.map_strides is not None:
            map_ok = len(self.map_strides) >= 1 and len(set(self.map_strides)) == len(self.map_strides)
            map_ok = map_ok and set(self.map_strides) < set(self.feature_strides) and self.score_source == "feature"
            expected = "None, or fewer distinct strides out of feature_strides (with score_source feature)"
            check(self, map_ok, "map_strides", expected)
        sigma = self.image_score_sigma
        sigma_ok = sigma is None or (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma >= 0)
        check(self, sigma_ok, "image_score_sigma", "null (score_sigma) or >= 0")
        split_ok = sigma is None or self.map_strides is not None
        check(self, split_ok, "image_score_sigma", "null unless map_strides is set (else the score reads the map)")
        check(self, self.encoder_lr_scale >= 0, "encoder_lr_scale", ">= 0 (0 = frozen)")
        check(self, self.encoder_norm in ("pretrained", "adapted"), "encoder_norm", "pretrained | adapted")
        adapted_ok = self.encoder_norm == "pretrained" or self.encoder_lr_scale == 0
        check(self, adapted_ok, "encoder_norm", "'pretrained' unless encoder_lr_scale is 0 (a trained encoder adapts)")
        stride = self.encoder_norm_max_stride
        stride_ok = stride is None or (isinstance(stride, int) and not isinstance(stride, bool) and stride >= 1)
        check(self, stride_ok, "encoder_norm_max_stride", "null (every layer) or a stride >= 1 (e.g. 2)")
        adapting = self.encoder_norm == "adapted"
        check(self, adapting or stride is None, "encoder_norm_max_stride", "null unless encoder_norm is 'adapted'")
        variances = ("adapted", "pretrained")
        check(self, self.encoder_norm_variance in variances, "encoder_norm_variance", "adapted | pretrained")
        variance_ok = adapting or self.encoder_norm_variance == "adapted"
        check(self, variance_ok, "encoder_norm_variance", "'adapted' (the default) unless encoder_norm is 'adapted'")
        check(self, self.lr_schedule in ("constant", "cosine"), "lr_schedule", "constant | cosine")
        check(self, self.mask_loss in ("l2", "bce", "focal"), "mask_loss", "l2 | bce | focal")
        check(self, self.mask_warmup_epochs >= 0, "mask_warmup_epochs", ">= 0")
        check(self, self.surf_fill in ("colour", "image", "noise"), "surf_fill", "colour | image | noise")
        check(self, 0 <= self.surf_opacity_min <= 1, "surf_opacity_min", "in [0, 1]")

    @property
    def fne_pool_size(self) -> int:
        """P of the FNE's adaptive pooling (``fne_pool``, or the short side // 32 when unset)."""
        return self.fne_pool if self.fne_pool is not None else min(self.input_shape) // 32

    @property
    def input_shape(self) -> tuple[int, int]:
        """(H, W) of the network input: (S, S) for ``image_size: S``, (H, W) for ``image_size: [H, W]``."""
        return input_shape(self.image_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-safe dict of every field."""
        return config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TSDNConfig:
        """Strict inverse of :meth:`to_dict`: unknown keys and bad values raise ``ConfigError``."""
        return config_io.from_dict(cls, data)


_FULL = {"dcd_a": True, "skip": True, "surf": True, "fne": True}
_AE = {"dcd_a": False, "skip": False, "surf": False, "fne": False}

ABLATIONS: dict[str, dict[str, bool]] = {
    # Table 3: skip connections.
    "t3a": dict(_AE),  # one-stream basic AE
    "t3b": {**_AE, "skip": True},  # AE with skips
    "t3c": {**_FULL, "skip": False},  # TSDN without skips
    "t3d": dict(_FULL),  # TSDN
    # Table 4: modules (rows read as in the paper's text: D is the one-stream AE, E lacks only the FNE).
    "t4a": dict(_AE),  # DCD_N
    "t4b": {**_AE, "surf": True},  # DCD_N + SURF
    "t4c": {**_AE, "skip": True},  # DCD_N + skips
    "t4d": {**_AE, "skip": True, "surf": True},  # DCD_N + skips + SURF
    "t4e": {**_FULL, "fne": False},  # two-stream, FNE replaced by F(1/32) * M'
    "t4f": dict(_FULL),  # TSDN
}


def apply_ablation(cfg: TSDNConfig, name: str) -> TSDNConfig:
    """``cfg`` with the switches of ablation ``name`` (a key of :data:`ABLATIONS`)."""
    if name not in ABLATIONS:
        msg = f"ablation {name!r}: unknown; expected one of {', '.join(sorted(ABLATIONS))}"
        raise config_io.ConfigError(msg)
    return dataclasses.replace(cfg, **ABLATIONS[name])
