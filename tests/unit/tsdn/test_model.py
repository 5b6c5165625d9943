"""TSDN module: shapes, gradients, inference path, every ablation."""

import dataclasses

import pytest
import torch

from tsdn.config import ABLATIONS, TSDNConfig, apply_ablation
from tsdn.losses import TSDNLoss
from tsdn.model import TSDN, TSDNOutput

TINY = TSDNConfig(
    image_size=64, backbone="test_efficientnet", weights="none", feature_channels=8, fne_hidden=16, fne_pool=2
)


def _batch(size=64, n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, size, size, generator=gen)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 8:24, 16:40] = 1.0
    distorted = torch.where(mask.bool(), torch.rand(n, 3, 1, 1, generator=gen), image)
    return image, distorted, mask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TSDN(TINY)


def test_train_forward_shapes_and_ranges(model):
    model.train()
    _, distorted, _ = _batch()
    out = model(distorted)
    assert isinstance(out, TSDNOutput)
    assert out.reconstruction.shape == (2, 3, 64, 64)
    assert out.mask_logits.shape == (2, 1, 64, 64)
    assert out.weights_logits.shape == out.weights_gt.shape == (2, 8)
    assert out.features.shape == (2, 8, 2, 2)
    assert 0 <= out.reconstruction.min() and out.reconstruction.max() <= 1
    assert 0 <= out.weights_gt.min() and out.weights_gt.max() <= 1
    assert torch.allclose(out.weights_pred, torch.sigmoid(out.weights_logits))
    assert torch.allclose(out.mask_pred, torch.sigmoid(out.mask_logits))


def test_eval_predict_shapes_and_consistency(model):
    model.eval()
    image, _, _ = _batch(size=96, n=3)
    with torch.no_grad():
        pred = model.predict(image)
        forward = model(image)
    assert pred.anomaly_map.shape == (3, 1, 96, 96)
    assert pred.anomaly_score.shape == (3,)
    assert torch.allclose(pred.anomaly_score, pred.anomaly_map.amax(dim=(1, 2, 3)))
    assert pred.anomaly_map.min() >= 0
    # The inference path skips DCD_A and W_gt but reconstructs exactly like the training forward.
    assert torch.equal(pred.reconstruction, forward.reconstruction)


def test_channels_last_gives_the_same_prediction(model):
    model.eval()
    image, _, _ = _batch()
    with torch.no_grad():
        reference = model.predict(image).anomaly_map
        last = TSDN(TINY)
        last.load_state_dict(model.state_dict())
        last = last.eval().to(memory_format=torch.channels_last)
        result = last.predict(image.contiguous(memory_format=torch.channels_last)).anomaly_map
    assert torch.allclose(reference, result, atol=1e-5)


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = TSDN(TINY).train()
    image, distorted, mask = _batch()
    total, terms = TSDNLoss(TINY)(model(distorted), image, mask)
    total.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    for name in ("encoder", "reduce", "dcd_a", "fne", "dcd_n"):
        norm = sum(float(p.grad.abs().sum()) for p in getattr(model, name).parameters())
        assert norm > 0, name
    assert all(float(v) > 0 for v in terms.values())


def test_input_must_match_the_encoder_stride(model):
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 64, 70))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 64, 64))


def test_normalization_buffers_follow_the_backbone(model):
    cfg = model.encoder.pretrained_cfg
    assert model.mean.flatten().tolist() == pytest.approx(list(cfg["mean"]))
    assert model.std.flatten().tolist() == pytest.approx(list(cfg["std"]))
    assert {"mean", "std"} <= set(model.state_dict())


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_builds_trains_and_predicts(name):
    torch.manual_seed(0)
    cfg = apply_ablation(TINY, name)
    model = TSDN(cfg).train()
    assert (model.dcd_a is not None) == cfg.dcd_a and (model.fne is not None) == cfg.fne
    image, distorted, mask = _batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    out = model(distorted if cfg.surf else image)
    assert (out.mask_logits is not None) == cfg.dcd_a
    assert (out.weights_logits is not None) == (out.weights_gt is not None) == cfg.fne
    total, terms = TSDNLoss(cfg)(out, image, mask)
    assert torch.isfinite(total)
    assert (float(terms["mask"]) > 0) == cfg.dcd_a and (float(terms["fne"]) > 0) == cfg.fne
    optimizer.zero_grad()
    total.backward()
    before = [p.detach().clone() for p in model.dcd_n.parameters()]
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.dcd_n.parameters()))
    model.eval()
    with torch.no_grad():
        pred = model.predict(image)
    assert pred.anomaly_map.shape == (2, 1, 64, 64) and torch.isfinite(pred.anomaly_score).all()


def test_skip_switch_changes_the_decoder_inputs():
    with_skips = TSDN(TINY)
    without = TSDN(dataclasses.replace(TINY, skip=False))
    width = with_skips.encoder.feature_info.channels()[-2]
    assert with_skips.dcd_n.blocks[0].conv[0].in_channels == 2 * width
    assert without.dcd_n.blocks[0].conv[0].in_channels == width


def test_mixed_precision_training_step_keeps_targets_and_loss_in_float32():
    torch.manual_seed(0)
    model = TSDN(TINY).train()
    image, distorted, mask = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(distorted)
        total, _ = TSDNLoss(TINY)(out, image, mask)
    assert out.weights_gt.dtype == torch.float32 and total.dtype == torch.float32
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_training_reduces_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, lr=3e-3)
    model = TSDN(cfg).train()
    image, distorted, mask = _batch(n=4)
    loss_fn = TSDNLoss(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history = []
    for _ in range(15):
        total, terms = loss_fn(model(distorted), image, mask)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append((float(total.detach()), float(terms["mask"])))
    assert history[-1][0] < 0.75 * history[0][0]
    assert history[-1][1] < 0.5 * history[0][1]  # DCD_A learns the SURF mask


def test_a_rectangular_input_is_fitted_and_scored_at_its_shape():
    """image_size [H, W]: the whitening and the per-position statistics are fitted at (H, W), and predict
    returns (B, 1, H, W); an image of another shape is refused by the statistics step, naming both."""
    cfg = TSDNConfig(
        image_size=(128, 64),
        backbone="test_efficientnet",
        weights="none",
        feature_channels=8,
        fne_hidden=16,
        skip=False,
        score_source="feature",
        feature_distance="mahalanobis",
        score_normalization="pixel",
    )
    torch.manual_seed(0)
    model = TSDN(cfg).eval()
    assert model.normal_mean.shape == (1, 1, 128, 64)
    normal = torch.rand(6, 3, 128, 64, generator=torch.Generator().manual_seed(1))
    assert model.fit_normal_stats(normal.split(3)) == 6
    with torch.no_grad():
        out = model.predict(normal)
        train_out = model(normal[:2])
    assert out.anomaly_map.shape == (6, 1, 128, 64) and out.anomaly_score.shape == (6,)
    assert train_out.reconstruction.shape == (2, 3, 128, 64) and train_out.mask_logits.shape == (2, 1, 128, 64)
    # standardised by the images it was fitted on: each position's mean over them is ~0
    assert out.anomaly_map.mean(dim=0).abs().max() < 1e-3
    with pytest.raises(ValueError, match=r"128x64 \(image_size\), got \(64, 128\)"):
        model.normal_stat_sums([torch.rand(2, 3, 64, 128)], "pixel")


@pytest.mark.parametrize(("flips", "views"), [(2, [(3,)]), (4, [(3,), (2,), (2, 3)])])
def test_test_flips_average_the_maps_of_the_mirror_images(flips, views):
    """test_flips: the map is the mean of the maps of the image and its mirror images, each flipped back, so the
    map of a mirrored image is the mirrored map; the reconstruction stays the image's own."""
    base = dataclasses.replace(TINY, score_source="feature", skip=False)
    torch.manual_seed(0)
    plain = TSDN(base).eval()
    mirrored = TSDN(dataclasses.replace(base, test_flips=flips)).eval()
    mirrored.load_state_dict(plain.state_dict())
    image = _batch()[0]
    with torch.no_grad():
        single = plain.predict(image)
        out = mirrored.predict(image)
        maps = [single.anomaly_map] + [plain.predict(image.flip(dims)).anomaly_map.flip(dims) for dims in views]
        assert torch.allclose(out.anomaly_map, torch.stack(maps).mean(dim=0), atol=1e-6)
        assert not torch.allclose(out.anomaly_map, single.anomaly_map, atol=1e-4)
        assert torch.equal(out.reconstruction, single.reconstruction)
        assert torch.equal(out.anomaly_score, out.anomaly_map.amax(dim=(1, 2, 3)))
        for dims in views:
            assert torch.allclose(mirrored.predict(image.flip(dims)).anomaly_map, out.anomaly_map.flip(dims), atol=1e-5)


def test_test_flips_fit_the_per_position_statistics_on_the_averaged_maps():
    cfg = dataclasses.replace(
        TINY, skip=False, score_source="feature", feature_distance="mahalanobis", score_normalization="pixel"
    )
    torch.manual_seed(0)
    plain = TSDN(cfg).eval()
    mirrored = TSDN(dataclasses.replace(cfg, test_flips=4)).eval()
    mirrored.load_state_dict(plain.state_dict())
    normal = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    plain.fit_normal_stats(normal.split(3))
    mirrored.fit_normal_stats(normal.split(3))
    with torch.no_grad():
        raw = mirrored.component_maps(normal)["feature"]
        out = mirrored.predict(normal)
    # the same whitening (fitted on the images themselves), other per-position statistics: the averaged maps'
    assert torch.equal(mirrored.feature_whitening_0, plain.feature_whitening_0)
    assert torch.allclose(mirrored.normal_mean, raw.mean(dim=0, keepdim=True), atol=1e-5)
    assert not torch.allclose(mirrored.normal_mean, plain.normal_mean, atol=1e-3)
    assert out.anomaly_map.mean(dim=0).abs().max() < 1e-3


def _adapted(**changes) -> TSDN:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, encoder_lr_scale=0.0, encoder_norm="adapted", **changes)
    return TSDN(cfg).eval()


def _norms(model: TSDN) -> list:
    return [m for m in model.encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_encoder_norm_adapted_needs_a_frozen_encoder():
    with pytest.raises(ValueError, match="encoder_norm"):
        dataclasses.replace(TINY, encoder_lr_scale=0.1, encoder_norm="adapted")
    with pytest.raises(ValueError, match="encoder_norm"):
        dataclasses.replace(TINY, encoder_lr_scale=0.0, encoder_norm="imagenet")
    with pytest.raises(ValueError, match="nothing to fit"):
        TSDN(TINY).encoder_norm_sums([torch.rand(2, 3, 64, 64)])


def test_adapted_encoder_norm_is_the_statistics_of_the_normal_images():
    """One batch: every layer's running mean and variance equal BatchNorm's own estimate (a training-mode pass
    with momentum None); summing leaves the running statistics alone, and predict refuses before the fit."""
    model = _adapted()
    assert _norms(model), "the test encoder has BatchNorm layers"
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="fit_encoder_norm"):
        model.predict(images[:1])
    pretrained = [norm.running_mean.clone() for norm in _norms(model)]
    sums = model.encoder_norm_sums([images])
    assert all(torch.equal(norm.running_mean, mean) for norm, mean in zip(_norms(model), pretrained, strict=True))
    assert not model.encoder.training
    assert model.set_encoder_norm(sums) == 6 and int(model.encoder_norm_count) == 6

    reference = _adapted()
    for norm in _norms(reference):
        norm.reset_running_stats()
        norm.momentum = None
    reference.encoder.train()
    with torch.no_grad():
        reference.encoder((images - reference.mean) / reference.std)
    for ours, theirs in zip(_norms(model), _norms(reference), strict=True):
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-4, atol=1e-5)
    assert model.predict(images[:2]).anomaly_map.shape == (2, 1, 64, 64)


def _norm_strides(model: TSDN, size: int) -> dict:
    strides = {}
    hooks = [
        norm.register_forward_hook(lambda m, _i, out: strides.__setitem__(m, size // out.shape[-1]))
        for norm in _norms(model)
    ]
    with torch.no_grad():
        model.encoder(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return strides


def test_encoder_norm_partial_settings_are_checked():
    with pytest.raises(ValueError, match="encoder_norm_max_stride"):
        dataclasses.replace(TINY, encoder_norm_max_stride=2)
    with pytest.raises(ValueError, match="encoder_norm_variance"):
        dataclasses.replace(TINY, encoder_norm_variance="pretrained")
    with pytest.raises(ValueError, match="encoder_norm_variance"):
        dataclasses.replace(TINY, encoder_lr_scale=0.0, encoder_norm="adapted", encoder_norm_variance="imagenet")
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="encoder_norm_max_stride"):
            dataclasses.replace(TINY, encoder_lr_scale=0.0, encoder_norm="adapted", encoder_norm_max_stride=bad)
    with pytest.raises(ValueError, match=r"encoder_norm_max_stride 1 selects none .* \(at strides \[2, "):
        _adapted(encoder_norm_max_stride=1).fit_encoder_norm([torch.rand(2, 3, 64, 64)])
    model = _adapted(encoder_norm_max_stride=2)
    with pytest.raises(ValueError, match=r"expected \d+ sums"):
        model.set_encoder_norm(_adapted().encoder_norm_sums([torch.rand(2, 3, 64, 64)]))


def test_encoder_norm_max_stride_adapts_only_the_early_layers():
    """The layers whose activations are at most the stride equal BatchNorm's own estimate on one batch (those in
    training mode, the rest in eval mode); the deeper layers keep ImageNet's statistics."""
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    model = _adapted(encoder_norm_max_stride=2)
    pretrained = [(norm.running_mean.clone(), norm.running_var.clone()) for norm in _norms(model)]
    model.fit_encoder_norm([images])

    reference = _adapted()
    strides = _norm_strides(reference, 64)
    early = [strides[norm] <= 2 for norm in _norms(reference)]
    assert any(early) and not all(early), "the test encoder has layers on both sides of stride 2"
    for norm, adapt in zip(_norms(reference), early, strict=True):
        if adapt:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
    with torch.no_grad():
        reference.encoder((images - reference.mean) / reference.std)
    layers = zip(_norms(model), _norms(reference), early, pretrained, strict=True)
    for ours, theirs, adapt, (mean, var) in layers:
        if adapt:
            torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(ours.running_mean, mean) and torch.equal(ours.running_var, var)


def test_encoder_norm_variance_pretrained_moves_only_the_means():
    """ImageNet's variances are kept, and every layer's new mean is the mean of its input with the layers
    before it set (on one batch: what the encoder then computes in eval mode)."""
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    model = _adapted(encoder_norm_variance="pretrained")
    pretrained = [(norm.running_mean.clone(), norm.running_var.clone()) for norm in _norms(model)]
    model.fit_encoder_norm([images])
    inputs = {}
    hooks = [
        norm.register_forward_pre_hook(lambda m, i: inputs.__setitem__(m, i[0].mean(dim=(0, 2, 3))))
        for norm in _norms(model)
    ]
    with torch.no_grad():
        model.encoder((images - model.mean) / model.std)
    for hook in hooks:
        hook.remove()
    for norm, (mean, var) in zip(_norms(model), pretrained, strict=True):
        assert torch.equal(norm.running_var, var)
        assert not torch.equal(norm.running_mean, mean)
        torch.testing.assert_close(norm.running_mean, inputs[norm], rtol=1e-4, atol=1e-4)


def test_adapted_encoder_norm_sums_add_over_workers_and_stay_through_training_and_loading():
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    one, two = _adapted(), _adapted()
    one.fit_encoder_norm([images[:4], images[4:]])
    two.set_encoder_norm(two.encoder_norm_sums([images[:4]]) + two.encoder_norm_sums([images[4:]]))
    assert all(torch.equal(a.running_var, b.running_var) for a, b in zip(_norms(one), _norms(two), strict=True))
    adapted = [norm.running_mean.clone() for norm in _norms(one)]
    one.train()  # a frozen encoder stays in eval mode: training steps do not move its statistics
    _, distorted, _ = _batch()
    one(distorted)
    assert all(torch.equal(norm.running_mean, mean) for norm, mean in zip(_norms(one), adapted, strict=True))
    loaded = TSDN(one.cfg)
    loaded.load_state_dict(one.state_dict())
    loaded.eval()
    assert int(loaded.encoder_norm_count) == 8 and loaded._encoder_norm_ready
    torch.testing.assert_close(loaded.predict(images[:2]).anomaly_map, one.eval().predict(images[:2]).anomaly_map)
