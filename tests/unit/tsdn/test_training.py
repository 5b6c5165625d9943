"""The training recipe (tsdn.training), the score sources and the synthetic validation defects."""

from __future__ import annotations

import dataclasses

import kornia
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tsdn.checkpoint import checkpoint_files, load_checkpoint
from tsdn.config import FLIP_LIMIT, FLIP_MIN_IMAGES, POSITION_BLENDS, TSDNConfig
from tsdn.config_io import ConfigError
from tsdn.defects import VALIDATION_DEFECTS, cut_paste, draw_defect, validation_set
from tsdn.fne import _ssim_against_one
from tsdn.losses import TSDNLoss, mask_loss
from tsdn.model import TSDN
from tsdn.scoring import blur_map, fit_calibration, image_score, score_map
from tsdn.surf import fill_texture, surf_fill
from tsdn.training import build_optimizer, fne_gate, lr_factor, set_epoch_lr, train_step

TINY = TSDNConfig(
    image_size=64, backbone="test_efficientnet", weights="none", feature_channels=8, fne_hidden=16, fne_pool=2
)


def _labels(n: int = 2, size: int = 64) -> torch.Tensor:
    """(n, size, size) int32 labels 0..15: a 4 x 4 grid of square superpixels."""
    cells = torch.arange(16, dtype=torch.int32).view(4, 4)
    return cells.repeat_interleave(size // 4, 0).repeat_interleave(size // 4, 1).expand(n, -1, -1).contiguous()


def _model(**changes) -> TSDN:
    torch.manual_seed(0)
    return TSDN(dataclasses.replace(TINY, **changes))


# --- config --------------------------------------------------------------------------------------------


def test_recipe_defaults_are_the_papers():
    cfg = TSDNConfig()
    assert (cfg.score_source, cfg.score_topk, cfg.encoder_lr_scale, cfg.lr_schedule) == (
        "reconstruction",
        0.0,
        1.0,
        "constant",
    )
    assert (cfg.mask_loss, cfg.mask_warmup_epochs, cfg.surf_fill, cfg.surf_opacity_min) == ("l2", 0, "colour", 1.0)
    assert cfg.score_normalization == "none"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("score_source", "nosuch"),
        ("score_topk", 1.0),
        ("encoder_lr_scale", -0.1),
        ("lr_schedule", "step"),
        ("mask_loss", "dice"),
        ("mask_warmup_epochs", -1),
        ("surf_fill", "paint"),
        ("surf_opacity_min", 1.5),
        ("score_normalization", "image"),
    ],
)
def test_recipe_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_a_mask_source_needs_dcd_a():
    ae = {"dcd_a": False, "fne": False}
    with pytest.raises(ValueError, match="score_source"):
        dataclasses.replace(TINY, score_source="fused", **ae)
    assert dataclasses.replace(TINY, score_source="feature", **ae).score_source == "feature"


# --- score sources --------------------------------------------------------------------------------------


def test_every_score_source_gives_a_map_and_its_score():
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    maps = {}
    for source in ("reconstruction", "mask", "fused", "feature"):
        model = _model(score_source=source).eval()
        with torch.inference_mode():
            pred = model.predict(images)
        assert pred.anomaly_map.shape == (2, 1, 64, 64) and pred.reconstruction.shape == (2, 3, 64, 64)
        torch.testing.assert_close(pred.anomaly_score, pred.anomaly_map.flatten(1).amax(1))
        maps[source] = pred.anomaly_map
    model = _model().eval()
    with torch.inference_mode():
        out = model._run(images, with_targets=False, with_mask=True, fne_gate=True)
        components = model.component_maps(images)
    # reconstruction: the paper's Eq. 4; mask: DCD_A's M' blurred alike; fused: their mean at unit scales
    torch.testing.assert_close(maps["reconstruction"], score_map(images, out.reconstruction, TINY.score_sigma))
    torch.testing.assert_close(maps["mask"], blur_map(torch.sigmoid(out.mask_logits), TINY.score_sigma))
    torch.testing.assert_close(maps["fused"], 0.5 * (maps["reconstruction"] + maps["mask"]))
    assert set(components) == {"reconstruction", "mask", "fused", "feature"}
    assert float(maps["feature"].min()) >= 0 and float(maps["feature"].max()) <= 2


def test_fused_divides_each_map_by_its_scale_on_normal_images():
    model = _model(score_source="fused").eval()
    normal = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        components = model.component_maps(normal)
        # the maps of the batches the scales are fitted on: a convolution's float result can depend on the batch
        # size (oneDNN picks its algorithm by shape), so the expected maxima come from the same batches
        halves = [model.component_maps(batch) for batch in normal.split(2)]
        scales = model.fit_score_scales(list(normal.split(2)))
        fused = model.predict(normal).anomaly_map
    expected = torch.stack(
        [torch.cat([h[k] for h in halves]).flatten(1).amax(1).mean() for k in ("reconstruction", "mask")]
    )
    torch.testing.assert_close(scales, expected)
    torch.testing.assert_close(fused, 0.5 * (components["reconstruction"] / scales[0] + components["mask"] / scales[1]))
    # each part now averages 1 at its maximum on these normal images: neither swamps the other
    assert abs(float((components["mask"] / scales[1]).flatten(1).amax(1).mean()) - 1) < 1e-5


def test_score_scales_travel_with_the_checkpoint_and_old_checkpoints_load():
    model = _model(score_source="fused").eval()
    model.score_scales.copy_(torch.tensor([0.25, 0.5]))
    calibration = fit_calibration(np.array([0.1, 0.2, 0.3]))
    files = checkpoint_files(model, calibration)
    loaded, _, meta = load_checkpoint(files)
    torch.testing.assert_close(loaded.score_scales, torch.tensor([0.25, 0.5]))
    assert loaded.cfg.score_source == "fused" and meta["config"]["score_source"] == "fused"
    # a checkpoint written before score sources existed: no score_scales tensor, no score_source key
    import json

    import safetensors.torch

    state = {k: v for k, v in _model().state_dict().items() if k != "score_scales"}
    meta_old = json.loads(files["model.json"])
    for key in ("score_source", "score_topk", "encoder_lr_scale", "surf_fill"):
        meta_old["config"].pop(key)
    old = {"model.safetensors": safetensors.torch.save(state), "model.json": json.dumps(meta_old).encode()}
    legacy, _, _ = load_checkpoint(old)
    assert legacy.cfg.score_source == "reconstruction"
    torch.testing.assert_close(legacy.score_scales, torch.ones(2))


def test_pixel_normalization_standardises_each_position_by_the_normal_images():
    model = _model(score_source="feature", score_normalization="pixel").eval()
    normal = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="fit_normal_stats"):
            model.predict(probe)  # unfitted statistics would silently score the raw map
        assert model.fit_normal_stats(normal.split(4)) == 6
        raw_normal = model.component_maps(normal)["feature"]
        raw_probe = model.component_maps(probe)["feature"]
        pred = model.predict(probe)
    mean = raw_normal.mean(dim=0, keepdim=True)
    std = blur_map(raw_normal.var(dim=0, keepdim=True), TINY.score_sigma).sqrt()
    std = std.clamp_min(0.01 * float(std.mean()))
    torch.testing.assert_close(model.normal_mean, mean)
    torch.testing.assert_close(model.normal_std, std)
    torch.testing.assert_close(pred.anomaly_map, (raw_probe - mean) / std)
    torch.testing.assert_close(model.normalize_map(raw_probe), pred.anomaly_map)
    torch.testing.assert_close(pred.anomaly_score, pred.anomaly_map.flatten(1).amax(1))
    # the normal images' own maps are centred at every position
    torch.testing.assert_close(((raw_normal - mean) / std).mean(dim=0), torch.zeros(1, 64, 64), atol=1e-5, rtol=0)


def test_normal_stat_sums_add_over_workers_like_one_pass():
    model = _model(score_normalization="pixel").eval()
    normal = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        halves = model.normal_stat_sums([normal[:2]]) + model.normal_stat_sums([normal[2:4], normal[4:]])
        whole = model.normal_stat_sums([normal])
    torch.testing.assert_close(halves, whole)
    assert int(whole[0]) == 6
    with pytest.raises(ValueError, match="at least 2 normal images"):
        model.set_normal_stats(model.normal_stat_sums([normal[:1]]))
    with pytest.raises(RuntimeError, match="eval mode"):
        model.train().normal_stat_sums([normal])
    with pytest.raises(ValueError, match="not one this model fits"):
        _model().set_normal_stats(whole)
    with pytest.raises(ValueError, match="score_normalization"):
        dataclasses.replace(TINY, score_source="fused", score_normalization="pixel")


def test_normal_statistics_travel_with_the_checkpoint():
    model = _model(score_normalization="pixel").eval()
    with torch.inference_mode():
        model.fit_normal_stats([torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(6))])
    loaded, _, meta = load_checkpoint(checkpoint_files(model, fit_calibration(np.array([0.1, 0.2, 0.3]))))
    assert meta["config"]["score_normalization"] == "pixel" and int(loaded.normal_count) == 4
    torch.testing.assert_close(loaded.normal_std, model.normal_std)
    probe = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predict(probe).anomaly_map, model.predict(probe).anomaly_map)
    # a checkpoint saved before any fit is refused at prediction, not scored on the raw map
    unfitted, _, _ = load_checkpoint(checkpoint_files(_model(score_normalization="pixel"), fit_calibration(np.ones(3))))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="fit_normal_stats"):
        unfitted.predict(probe)


def _whitening_reference(residuals: list[torch.Tensor], shrink: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per stage: the residual's mean and the shrunk covariance's inverse, in float64 from the residuals."""
    out = []
    for residual in residuals:
        rows = residual.double().permute(0, 2, 3, 1).reshape(-1, residual.shape[1])
        cov = torch.cov(rows.T)
        cov = (1 - shrink) * cov + shrink * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
        out.append((rows.mean(dim=0), torch.linalg.inv(cov)))
    return out


@pytest.mark.parametrize("strides", [(8, 16), (8, 16, 32)])
def test_mahalanobis_feature_distance_whitens_the_residual_by_the_normal_images(strides):
    model = _model(
        score_source="feature", feature_distance="mahalanobis", feature_shrinkage=0.1, feature_strides=strides
    ).eval()
    assert [model.encoder.feature_info.reduction()[i] for i in model.feature_stages] == list(strides)
    normal = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    assert model.normal_fit_steps == ("whitening",)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="fit_normal_stats"):
            model.predict(probe)  # an unfitted whitening (the identity) would silently score another map
        assert model.fit_normal_stats(normal.split(4)) == 6 and int(model.feature_count) == 6
        reference = _whitening_reference(model._feature_residuals(normal)[0], shrink=0.1)
        probe_residuals = model._feature_residuals(probe)[0]
        pred = model.predict(probe)
    expected = 0
    for k, ((mean, precision), residual) in enumerate(zip(reference, probe_residuals, strict=True)):
        whitening = getattr(model, f"feature_whitening_{k}").double()
        torch.testing.assert_close(getattr(model, f"feature_mean_{k}").double(), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(whitening.T @ whitening, precision, rtol=1e-3, atol=1e-3)
        centred = residual.double() - mean.view(1, -1, 1, 1)
        squared = torch.einsum("bchw,cd,bdhw->bhw", centred, precision, centred) / len(mean)
        up = F.interpolate(squared.sqrt()[:, None], size=(64, 64), mode="bilinear", align_corners=False)
        expected = expected + up / len(reference)
    torch.testing.assert_close(pred.anomaly_map, blur_map(expected.float(), TINY.score_sigma), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="feature_distance"):
        dataclasses.replace(TINY, score_source="reconstruction", feature_distance="mahalanobis")


def test_position_whitening_whitens_each_position_by_its_own_normal_residuals():
    """``feature_whitening: position``: a mean and a covariance per grid position of every compared stage (each
    covariance blended with the positions' mean covariance, then shrunk toward a scaled identity), on a
    rectangular input so that the grid's rows and columns cannot be swapped unseen."""
    shape, blend, shrink = (96, 64), 0.3, 0.05
    model = _model(
        image_size=shape,
        score_source="feature",
        feature_distance="mahalanobis",
        feature_whitening="position",
        feature_position_shrinkage=blend,
        feature_shrinkage=shrink,
        feature_strides=(8, 16),
    ).eval()
    normal = torch.rand(7, 3, *shape, generator=torch.Generator().manual_seed(11))
    probe = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(12))
    with torch.inference_mode():
        # sums from two workers add up to one worker's
        halves = model.normal_stat_sums([normal[:3]], "whitening") + model.normal_stat_sums([normal[3:]], "whitening")
        torch.testing.assert_close(halves, model.normal_stat_sums([normal], "whitening"))
        assert model.fit_normal_stats(normal.split(4)) == 7
        train_residuals = model._feature_residuals(normal)[0]
        probe_residuals = model._feature_residuals(probe)[0]
        pred = model.predict(probe)
    expected = 0
    for k, (train, residual) in enumerate(zip(train_residuals, probe_residuals, strict=True)):
        c, h, w = train.shape[1:]
        stride = model.encoder.feature_info.reduction()[model.feature_stages[k]]
        assert (h, w) == (shape[0] // stride, shape[1] // stride)
        per_position = train.double().permute(2, 3, 0, 1)  # h, w, n, c
        mean = per_position.mean(dim=2)
        centred = per_position - mean[:, :, None]
        cov = centred.transpose(2, 3) @ centred / (len(normal) - 1)
        cov = (1 - blend) * cov + blend * cov.mean(dim=(0, 1))
        scale = cov.diagonal(dim1=2, dim2=3).mean()
        cov = (1 - shrink) * cov + shrink * scale * torch.eye(c, dtype=cov.dtype)
        precision = torch.linalg.inv(cov.reshape(-1, c, c)).view(h, w, c, c)
        whitening = getattr(model, f"feature_whitening_{k}").double()
        assert whitening.shape == (h, w, c, c)
        torch.testing.assert_close(
            getattr(model, f"feature_mean_{k}").double(), mean.permute(2, 0, 1), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(whitening.transpose(2, 3) @ whitening, precision, rtol=1e-3, atol=1e-3)
        x = residual.double().permute(2, 3, 0, 1) - mean[:, :, None]  # h, w, b, c
        squared = ((x @ precision) * x).sum(dim=-1).permute(2, 0, 1) / c
        up = F.interpolate(squared.sqrt()[:, None], size=shape, mode="bilinear", align_corners=False)
        expected = expected + up / len(train_residuals)
    torch.testing.assert_close(pred.anomaly_map, blur_map(expected.float(), TINY.score_sigma), rtol=1e-3, atol=1e-4)
    loaded, _, meta = load_checkpoint(checkpoint_files(model, fit_calibration(np.array([0.1, 0.2, 0.3]))))
    assert meta["config"]["feature_whitening"] == "position"
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predict(probe).anomaly_map, pred.anomaly_map)


def _held_out_nll(train: torch.Tensor, held: torch.Tensor, blend: float, shrink: float) -> float:
    """Reference for ``feature_position_shrinkage: auto``: the mean over positions of the held-out residuals'
    negative log-likelihood (the constant dropped) under the per-position Gaussians fitted on ``train``."""
    c = train.shape[1]
    fit = train.double().permute(2, 3, 0, 1).reshape(-1, len(train), c)  # P, n, c
    mean = fit.mean(dim=1)
    centred = fit - mean[:, None]
    cov = centred.transpose(1, 2) @ centred / (len(train) - 1)
    cov = (1 - blend) * cov + blend * cov.mean(dim=0)
    cov = (1 - shrink) * cov + shrink * cov.diagonal(dim1=1, dim2=2).mean() * torch.eye(c, dtype=cov.dtype)
    x = held.double().permute(2, 3, 0, 1).reshape(-1, len(held), c) - mean[:, None]
    squared = ((x @ torch.linalg.inv(cov)) * x).sum(dim=-1)  # P, m
    return float(0.5 * (squared.mean() + torch.logdet(cov).mean()))


def test_auto_position_blend_is_the_held_out_normals_likeliest_per_stage():
    """``feature_position_shrinkage: auto`` keeps, per stage, the blend of ``POSITION_BLENDS`` under whose
    per-position Gaussians the held-out normal images' residuals are likeliest, and whitens exactly as that fixed
    blend would."""
    shape, shrink = (96, 64), 0.05
    settings = dict(
        image_size=shape,
        score_source="feature",
        feature_distance="mahalanobis",
        feature_whitening="position",
        feature_shrinkage=shrink,
        feature_strides=(8, 16),
    )
    model = _model(**settings, feature_position_shrinkage="auto").eval()
    assert model.needs_held_out
    normal = torch.rand(9, 3, *shape, generator=torch.Generator().manual_seed(21))
    held = torch.rand(4, 3, *shape, generator=torch.Generator().manual_seed(22))
    probe = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(23))
    with torch.inference_mode():
        with pytest.raises(ValueError, match="held-out normal images"):
            model.fit_normal_stats(normal.split(4))
        # the held-out sums add over workers like the training sums
        sums = model.normal_stat_sums([normal], "whitening")
        held_sums = model.normal_stat_sums([held[:1]], "whitening") + model.normal_stat_sums([held[1:]], "whitening")
        assert model.set_normal_stats(sums, "whitening", held_out=held_sums) == 9
        train_residuals = model._feature_residuals(normal)[0]
        held_residuals = model._feature_residuals(held)[0]
        pred = model.predict(probe)
    expected = tuple(
        min(POSITION_BLENDS, key=lambda b, t=train, h=residual: _held_out_nll(t, h, b, shrink))
        for train, residual in zip(train_residuals, held_residuals, strict=True)
    )
    assert model.position_blends == expected
    for k, blend in enumerate(expected):  # each stage whitened as its fixed blend whitens it
        fixed = _model(**settings, feature_position_shrinkage=blend).eval()
        fixed.load_state_dict(model.state_dict())
        with torch.inference_mode():
            fixed.fit_normal_stats([normal])
        torch.testing.assert_close(getattr(model, f"feature_whitening_{k}"), getattr(fixed, f"feature_whitening_{k}"))
    loaded, _, meta = load_checkpoint(checkpoint_files(model, fit_calibration(np.array([0.1, 0.2, 0.3]))))
    assert meta["config"]["feature_position_shrinkage"] == "auto"
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predict(probe).anomaly_map, pred.anomaly_map)
    fixed = _model(**settings).eval()
    with torch.inference_mode(), pytest.raises(ValueError, match="held_out is only for"):
        fixed.fit_normal_stats([normal], held_out=[held])


def test_auto_position_blend_is_small_on_a_layout_and_near_one_on_a_texture():
    """What ``auto`` is for: stationary noise (a texture, whose positions differ by sampling noise only) takes a
    blend near 1 (one covariance); a fixed part whose noise sits at some places only takes a smaller one."""
    model = _model(
        score_source="feature",
        feature_distance="mahalanobis",
        feature_whitening="position",
        feature_position_shrinkage="auto",
    ).eval()
    draws = torch.Generator().manual_seed(1)

    def texture(n: int) -> torch.Tensor:
        return torch.rand(n, 3, 64, 64, generator=draws)

    def part(n: int) -> torch.Tensor:
        base = torch.zeros(3, 64, 64)
        base[:, 16:48, 16:48] = 0.8
        spread = torch.zeros(1, 64, 64)
        spread[:, 12:20, :] = 0.25  # one band of rows and one of columns vary, the rest never does
        spread[:, :, 44:52] = 0.25
        return (base + spread * torch.randn(n, 3, 64, 64, generator=draws)).clamp(0, 1)

    with torch.inference_mode():
        model.fit_normal_stats([texture(24)], held_out=[texture(8)])
        textured = model.position_blends
        model.fit_normal_stats([part(24)], held_out=[part(8)])
        aligned = model.position_blends
    assert min(textured) >= 0.9 and all(t > a for t, a in zip(textured, aligned, strict=True)), (textured, aligned)


def _mirror_normals(kind: str, n: int, draws: torch.Generator) -> torch.Tensor:
    """``texture``: stationary noise, whose mirror images are as normal as the images; ``part``: one pose, a bright
    block in the top-left corner and a dark band along the top, which a mirror image moves."""
    if kind == "texture":
        return torch.rand(n, 3, 64, 64, generator=draws)
    base = torch.full((3, 64, 64), 0.4)
    base[:, 4:28, 4:28] = 0.9
    base[:, 0:4, :] = 0.05
    return (base + 0.05 * torch.randn(n, 3, 64, 64, generator=draws)).clamp(0, 1)


def test_auto_test_flips_keep_the_mirrors_of_a_texture_and_drop_those_of_a_part_shot_in_one_pose():
    """``test_flips: auto``: on the held-out normals, a mirror is kept when at most FLIP_LIMIT of them score higher
    mirrored than as they are; a texture keeps all three (4 views), a part shot in one pose none (1)."""
    model = _model(
        score_source="feature",
        feature_distance="mahalanobis",
        feature_whitening="position",
        feature_position_shrinkage=0.1,
        test_flips="auto",
    ).eval()
    assert model.normal_fit_steps == ("whitening", "flips") and model.needs_held_out
    assert not model.chooses_position_blend
    draws = torch.Generator().manual_seed(5)
    chosen = {}
    for kind in ("texture", "part"):
        normal, held = _mirror_normals(kind, 24, draws), _mirror_normals(kind, 12, draws)
        with torch.inference_mode():
            model.fit_normal_stats([normal], held_out=held.split(5))
        chosen[kind] = (model.test_flips, model.flip_fractions)
    (texture, texture_fractions), (part, part_fractions) = chosen["texture"], chosen["part"]
    assert texture == 4 and max(texture_fractions) <= FLIP_LIMIT, chosen
    assert part == 1 and min(part_fractions) > FLIP_LIMIT, chosen


@pytest.mark.parametrize(
    ("count", "above", "expected"),
    [
        (12, (6, 6, 6), 4),
        (12, (9, 9, 9), 4),
        (12, (6, 12, 12), 2),
        (12, (10, 6, 6), 1),
        (12, (12, 12, 12), 1),
        (FLIP_MIN_IMAGES, (0, 0, 0), 4),
        (FLIP_MIN_IMAGES - 1, (0, 0, 0), 1),  # too few held-out normals to tell
        (1, (0, 1, 0), 1),  # one held-out image (the platform warns that it is few) is not an error
        (0, (0, 0, 0), 1),
    ],
)
def test_auto_test_flips_rule(count, above, expected):
    """4 when every mirror is kept, else 2 when the left-right one is, else 1; at FLIP_LIMIT (9 of 12) kept; never
    from fewer than FLIP_MIN_IMAGES held-out normals."""
    model = _model(test_flips="auto").eval()
    sums = torch.tensor([float(count), *above], dtype=torch.float64)
    assert model.set_normal_stats(sums, "flips") == count
    assert model.test_flips == expected and int(model.test_flip_count) == expected
    assert model.flip_fractions == tuple(round(a / max(count, 1), 4) for a in above)


def test_auto_test_flips_need_held_out_normals_sum_over_workers_and_are_saved():
    settings = dict(score_source="feature", feature_distance="mahalanobis", score_normalization="pixel")
    model = _model(**settings, test_flips="auto").eval()
    assert model.normal_fit_steps == ("whitening", "flips", "pixel")
    draws = torch.Generator().manual_seed(6)
    normal, held, probe = (torch.rand(n, 3, 64, 64, generator=draws) for n in (8, 6, 2))
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="test_flips is 'auto' but fit_normal_stats never chose"):
            model.component_maps(probe)
        with pytest.raises(ValueError, match="test_flips 'auto' chooses on held-out normal images"):
            model.fit_normal_stats([normal])
        whole = model.fit_normal_stats([normal], held_out=[held])
        fractions, flips = model.flip_fractions, model.test_flips
        halves = model.normal_stat_sums([held[:2]], "flips") + model.normal_stat_sums([held[2:]], "flips")
        assert torch.equal(halves, model.normal_stat_sums([held], "flips"))
        assert halves[0] == 6 and whole == 8
        pred = model.predict(probe)
    assert flips in (1, 2, 4) and len(fractions) == 3
    loaded, _, meta = load_checkpoint(checkpoint_files(model, fit_calibration(np.array([0.1, 0.2, 0.3]))))
    assert meta["config"]["test_flips"] == "auto" and loaded.test_flips == flips
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predict(probe).anomaly_map, pred.anomaly_map)
    fixed = _model(score_source="feature", feature_distance="mahalanobis").eval()
    with torch.inference_mode(), pytest.raises(ValueError, match="held_out is only for"):
        fixed.fit_normal_stats([normal], held_out=[held])


def test_position_whitening_is_a_mahalanobis_switch_and_old_configs_pool():
    with pytest.raises(ValueError, match="feature_whitening"):
        dataclasses.replace(TINY, score_source="feature", feature_whitening="position")  # cosine has no whitening
    with pytest.raises(ValueError, match="feature_whitening"):
        dataclasses.replace(TINY, score_source="feature", feature_distance="mahalanobis", feature_whitening="grid")
    for bad in (-0.1, 1.5, "grid", True):
        with pytest.raises(ValueError, match="feature_position_shrinkage"):
            dataclasses.replace(TINY, feature_position_shrinkage=bad)
    assert (
        TSDNConfig.from_dict({**TINY.to_dict(), "feature_position_shrinkage": "auto"}).feature_position_shrinkage
        == "auto"
    )
    cfg = dataclasses.replace(TINY, score_source="feature", feature_distance="mahalanobis")
    old = cfg.to_dict()
    old.pop("feature_whitening")  # a model.json written before the switch
    old.pop("feature_position_shrinkage")
    assert TSDNConfig.from_dict(old).feature_whitening == "pooled"


def test_feature_strides_name_stages_the_encoder_has():
    with pytest.raises(ValueError, match=r"feature_strides \[64\] are not strides"):
        _model(score_source="feature", feature_strides=(8, 64))
    for bad in ((), (8, 8), (0,)):
        with pytest.raises(ValueError, match="feature_strides"):
            dataclasses.replace(TINY, feature_strides=bad)
    cfg = dataclasses.replace(TINY, feature_strides=(8, 16, 32))
    assert TSDNConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    old.pop("feature_strides")  # a model.json written before the switch compares strides 8 and 16
    assert TSDNConfig.from_dict(old).feature_strides == (8, 16)


def test_whitening_sums_add_over_workers_and_come_before_the_pixel_statistics():
    model = _model(score_source="feature", feature_distance="mahalanobis", score_normalization="pixel").eval()
    assert model.normal_fit_steps == ("whitening", "pixel")
    normal = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    with torch.inference_mode():
        halves = model.normal_stat_sums([normal[:2]], "whitening") + model.normal_stat_sums([normal[2:]], "whitening")
        torch.testing.assert_close(halves, model.normal_stat_sums([normal], "whitening"))
        with pytest.raises(RuntimeError, match="fit_normal_stats"):
            model.normal_stat_sums([normal], "pixel")  # the pixel step reads the whitened map
        model.fit_normal_stats(iter(normal.split(3)))  # read once per step: an iterator is fine too
        whitened = model.component_maps(normal)["feature"]
    torch.testing.assert_close(model.normal_mean, whitened.mean(dim=0, keepdim=True))
    assert int(model.normal_count) == int(model.feature_count) == 6
    loaded, _, meta = load_checkpoint(checkpoint_files(model, fit_calibration(np.array([0.1, 0.2, 0.3]))))
    assert meta["config"]["feature_distance"] == "mahalanobis" and int(loaded.feature_count) == 6
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predict(normal).anomaly_map, model.predict(normal).anomaly_map)
    with pytest.raises(ValueError, match="not one this model fits"):
        _model(score_normalization="pixel").eval().normal_stat_sums([normal], "whitening")


def test_top_k_image_score():
    anomaly_map = torch.zeros(1, 1, 10, 10)
    anomaly_map[0, 0, 0, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    assert float(image_score(anomaly_map)) == 5.0
    assert float(image_score(anomaly_map, topk=0.03)) == pytest.approx(4.0)  # mean of the top 3 of 100
    assert float(image_score(anomaly_map, topk=0.001)) == 5.0  # at least one pixel


# --- SURF fills and the mask loss ------------------------------------------------------------------------


@pytest.mark.parametrize("fill", ["colour", "image", "noise"])
def test_surf_fills_change_only_the_masked_pixels(fill):
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    distorted, mask = surf_fill(images, _labels(3), 5, gen, contiguous=True, fill=fill)
    again, mask_again = surf_fill(images, _labels(3), 5, torch.Generator().manual_seed(4), contiguous=True, fill=fill)
    assert torch.equal(distorted, again) and torch.equal(mask, mask_again)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert (mask.flatten(1).sum(1) == 5 * 16 * 16).all()  # five whole superpixels per image
    keep = mask.expand_as(images) == 0
    assert torch.equal(distorted[keep], images[keep])
    assert float((distorted - images).abs()[~keep].mean()) > 0.05
    assert 0 <= float(distorted.min()) and float(distorted.max()) <= 1


def test_image_fill_takes_another_image_out_of_place():
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    texture = fill_texture(images, "image", torch.Generator().manual_seed(6))
    for b, other in ((0, 1), (1, 0)):
        assert not torch.equal(texture[b], images[other])  # shifted (and maybe flipped), not pasted in place
        assert torch.equal(texture[b].flatten().sort().values, images[other].flatten().sort().values)  # the same pixels


def test_partial_opacity_blends_the_fill():
    images = torch.full((2, 3, 64, 64), 0.5)
    distorted, mask = surf_fill(images, _labels(2), 16, torch.Generator().manual_seed(7), opacity_min=0.2)
    assert bool((mask == 1).all())
    change = (distorted - images).abs()
    opaque, _ = surf_fill(images, _labels(2), 16, torch.Generator().manual_seed(7))
    assert float(change.sum()) < float((opaque - images).abs().sum())


def test_mask_losses():
    logits = torch.tensor([[[[3.0, -3.0], [0.0, 2.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    torch.testing.assert_close(mask_loss(logits, mask, "l2"), torch.nn.functional.mse_loss(torch.sigmoid(logits), mask))
    bce = mask_loss(logits, mask, "bce")
    torch.testing.assert_close(bce, torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), mask))
    focal = mask_loss(logits, mask, "focal")
    assert 0 < float(focal) < float(bce)  # down-weights the pixels already right
    with pytest.raises(ValueError, match="kind"):
        mask_loss(logits, mask, "dice")


def test_ssim_against_one_target_equals_kornia():
    images = torch.rand(2, 5, 32, 32, generator=torch.Generator().manual_seed(8))
    target = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(9))
    expected = kornia.metrics.ssim(images, target.expand_as(images).contiguous(), 11)
    torch.testing.assert_close(_ssim_against_one(images, target, 11), expected, atol=1e-5, rtol=1e-4)


# --- the optimiser and the step ----------------------------------------------------------------------------


def test_optimizer_groups_follow_the_encoder_lr_scale():
    model = _model(encoder_lr_scale=0.1)
    optimizer = build_optimizer(model, model.cfg)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(TINY.lr), pytest.approx(TINY.lr * 0.1)]
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n_params == len(list(model.parameters()))
    frozen = _model(encoder_lr_scale=0)
    assert len(build_optimizer(frozen, frozen.cfg).param_groups) == 1
    assert not any(p.requires_grad for p in frozen.encoder.parameters())


def test_cosine_schedule_runs_from_lr_to_one_percent():
    cfg = dataclasses.replace(TINY, lr_schedule="cosine")
    assert lr_factor(cfg, 1, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 10, 10) == pytest.approx(0.01)
    factors = [lr_factor(cfg, e, 10) for e in range(1, 11)]
    assert factors == sorted(factors, reverse=True)
    assert lr_factor(TINY, 7, 10) == 1.0
    model = _model(lr_schedule="cosine")
    optimizer = build_optimizer(model, model.cfg)
    set_epoch_lr(optimizer, model.cfg, 10, 10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(TINY.lr * 0.01)


def test_warm_up_leaves_the_fne_out():
    cfg = dataclasses.replace(TINY, mask_warmup_epochs=2)
    assert (fne_gate(cfg, 1), fne_gate(cfg, 2), fne_gate(cfg, 3)) == (False, False, True)
    model = _model(mask_warmup_epochs=2).train()
    images = torch.rand(2, 3, 64, 64)
    out = model(images, fne_gate=False)
    assert out.weights_logits is None and out.weights_gt is None and out.mask_logits is not None
    _, terms = TSDNLoss(cfg)(out, images, torch.zeros(2, 1, 64, 64))
    assert float(terms["fne"]) == 0.0


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"encoder_lr_scale": 0.0, "surf_fill": "image", "mask_loss": "focal"},
        {"surf_fill": "noise", "mask_loss": "bce"},
    ],
)
def test_train_step_lowers_the_loss_on_a_repeated_batch(changes):
    model = _model(**changes).train()
    cfg = model.cfg
    optimizer = build_optimizer(model, dataclasses.replace(cfg, lr=3e-3))
    loss_fn = TSDNLoss(cfg)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    losses = []
    for _ in range(8):
        # the same SURF draws every step, so the loss is comparable
        total, terms = train_step(
            model, loss_fn, optimizer, images, _labels(4), cfg, torch.Generator().manual_seed(0), 1
        )
        losses.append(float(total))
        assert set(terms) == {"l2", "ssim", "gms", "mask", "fne"}
    assert losses[-1] < losses[0]
    frozen = cfg.encoder_lr_scale == 0
    unchanged = all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert unchanged == frozen  # a frozen encoder keeps its weights and BatchNorm statistics


# --- synthetic validation defects --------------------------------------------------------------------------


def _normal_images(n: int = 6, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, (1, size, size, 3))
    return np.clip(base + rng.integers(-10, 10, (n, size, size, 3)), 0, 255).astype(np.uint8)


def test_validation_set_is_leak_free_labelled_and_repeatable():
    normal = _normal_images()
    val = validation_set(normal, seed=3)
    assert val.images.shape == (12, 64, 64, 3) and val.images.dtype == np.uint8
    assert np.array_equal(val.images[:6], normal)
    assert val.labels.tolist() == [0] * 6 + [1] * 6
    assert val.masks[:6].sum() == 0 and all(m.sum() >= 4 for m in val.masks[6:])
    assert val.defects[6:].tolist() == list(VALIDATION_DEFECTS)  # every family in turn
    changed = np.abs(val.images[6:].astype(int) - normal.astype(int)).max(axis=-1) > 0
    assert (changed <= val.masks[6:].astype(bool)).all()  # nothing changes outside the mask
    again = validation_set(normal, seed=3)
    assert np.array_equal(again.images, val.images) and np.array_equal(again.masks, val.masks)
    assert not np.array_equal(validation_set(normal, seed=4).masks, val.masks)
    with pytest.raises(ValueError, match="expected"):
        validation_set(normal[:0])


def test_validation_set_on_a_rectangular_image_draws_inside_a_square_window():
    """(N, 96, 32, 3) images: every family leaves a mask inside one 32 x 32 window, nothing changes outside it,
    and a square set draws the same bytes as before the window existed (no random draw is spent on it)."""
    rng = np.random.default_rng(0)
    normal = np.clip(rng.integers(60, 200, (1, 96, 32, 3)) + rng.integers(-10, 10, (6, 96, 32, 3)), 0, 255)
    normal = normal.astype(np.uint8)
    val = validation_set(normal, seed=3)
    assert val.images.shape == (12, 96, 32, 3) and val.masks.shape == (12, 96, 32)
    changed = np.abs(val.images[6:].astype(int) - normal.astype(int)).max(axis=-1) > 0
    assert (changed <= val.masks[6:].astype(bool)).all()
    for mask in val.masks[6:]:
        rows = np.flatnonzero(mask.any(axis=1))
        assert mask.sum() >= 4 and rows.max() - rows.min() < 32
    # a square image: the drawers see the whole image and the same random stream as they always did
    square = _normal_images()
    stream = np.random.default_rng([3, 104_729])
    expected = []
    for i, clean in enumerate(square):
        kind = VALIDATION_DEFECTS[i % len(VALIDATION_DEFECTS)]
        base = clean.astype(np.float32) / 255.0
        donor = square[(i + 1) % len(square)].astype(np.float32) / 255.0
        image = cut_paste(base, donor, stream)[0] if kind == "cut_paste" else draw_defect(base, kind, stream)[0]
        expected.append(np.round(image * 255.0).astype(np.uint8))
    assert np.array_equal(validation_set(square, seed=3).images[6:], np.stack(expected))


def test_cut_paste_moves_a_patch_of_the_donor():
    rng = np.random.default_rng(1)
    image = np.zeros((64, 64, 3), np.float32)
    donor = np.ones((64, 64, 3), np.float32)
    out, mask = cut_paste(image, donor, rng)
    area = mask.mean()
    assert 0.005 <= area <= 0.06
    assert np.allclose(out[~mask], 0) and out[mask].max() == pytest.approx(1.0)


def test_map_strides_score_from_every_stage_and_map_from_the_finer_ones():
    """``map_strides``: the image score is the every-stage model's, the map the finer-stage model's (each stage
    whitened on its own, the map standardised by its own statistics); both travel in the checkpoint."""
    settings = dict(
        score_source="feature",
        feature_distance="mahalanobis",
        score_normalization="pixel",
        feature_strides=(8, 16, 32),
    )
    split = _model(**settings, map_strides=(8, 16)).eval()
    every = _model(**settings).eval()
    fine = _model(**{**settings, "feature_strides": (8, 16)}).eval()
    normal = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(31))
    probe = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(32))
    with torch.inference_mode():
        for model in (split, every, fine):
            assert model.fit_normal_stats(normal.split(4)) == 6
        pred, whole, finer = split.predict(probe), every.predict(probe), fine.predict(probe)
    torch.testing.assert_close(pred.anomaly_score, whole.anomaly_score)
    torch.testing.assert_close(pred.anomaly_map, finer.anomaly_map)
    assert not torch.allclose(pred.anomaly_map, whole.anomaly_map)
    torch.testing.assert_close(split.map_mean, fine.normal_mean)
    torch.testing.assert_close(split.map_std, fine.normal_std)
    loaded, _, meta = load_checkpoint(checkpoint_files(split, fit_calibration(np.array([0.1, 0.2, 0.3]))))
    assert meta["config"]["map_strides"] == [8, 16]
    with torch.inference_mode():
        again = loaded.predict(probe)
    torch.testing.assert_close(again.anomaly_map, pred.anomaly_map)
    torch.testing.assert_close(again.anomaly_score, pred.anomaly_score)
    with pytest.raises(ValueError, match="pixel sums of"):
        split.set_normal_stats(every.normal_stat_sums([normal]), "pixel")


def test_image_score_sigma_blurs_the_scored_map_alone():
    """``image_score_sigma``: the image score is the every-stage model's at that blur (its per-position statistics
    blurred alike), the map the finer-stage model's at ``score_sigma``; the setting travels in the checkpoint."""
    settings = dict(
        score_source="feature",
        feature_distance="mahalanobis",
        score_normalization="pixel",
        feature_strides=(8, 16, 32),
    )
    split = _model(**settings, map_strides=(8, 16), image_score_sigma=2.0).eval()
    every = _model(**settings, score_sigma=2.0).eval()
    fine = _model(**{**settings, "feature_strides": (8, 16)}).eval()
    normal = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(33))
    probe = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(34))
    with torch.inference_mode():
        for model in (split, every, fine):
            model.fit_normal_stats(normal.split(4))
        pred, whole, finer = split.predict(probe), every.predict(probe), fine.predict(probe)
        default = _model(**settings, map_strides=(8, 16)).eval()
        default.fit_normal_stats(normal.split(4))
        unchanged = default.predict(probe)
    torch.testing.assert_close(pred.anomaly_score, whole.anomaly_score)
    torch.testing.assert_close(split.normal_std, every.normal_std)
    torch.testing.assert_close(pred.anomaly_map, finer.anomaly_map)
    torch.testing.assert_close(pred.anomaly_map, unchanged.anomaly_map)
    assert not torch.allclose(pred.anomaly_score, unchanged.anomaly_score)
    loaded, _, meta = load_checkpoint(checkpoint_files(split, fit_calibration(np.array([0.1, 0.2, 0.3]))))
    assert meta["config"]["image_score_sigma"] == 2.0
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predict(probe).anomaly_score, pred.anomaly_score)


@pytest.mark.parametrize(
    "changes",
    [
        {"image_score_sigma": 2.0},  # no map_strides: the score reads the map itself
        {"image_score_sigma": -1.0, "map_strides": (8, 16)},
        {"image_score_sigma": True, "map_strides": (8, 16)},
    ],
)
def test_image_score_sigma_refuses_a_model_without_a_split_map(changes):
    base = {**TINY.to_dict(), "score_source": "feature", "feature_strides": [8, 16, 32]}
    with pytest.raises(ConfigError, match="image_score_sigma"):
        TSDNConfig.from_dict({**base, **changes})


@pytest.mark.parametrize(
    "changes",
    [
        {"map_strides": (8, 16, 32)},  # all of them: say None
        {"map_strides": (4,)},  # not compared
        {"map_strides": ()},
        {"map_strides": (8, 8)},
        {"map_strides": (8,), "score_source": "reconstruction"},
    ],
)
def test_map_strides_refuses_what_is_not_a_strict_subset_of_the_feature_strides(changes):
    base = {**TINY.to_dict(), "score_source": "feature", "feature_strides": [8, 16, 32]}
    with pytest.raises(ConfigError, match="map_strides"):
        TSDNConfig.from_dict({**base, **changes})
