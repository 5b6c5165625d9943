"""TSDN objective: each term, the weighting and the ablation zeros."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tsdn.config import TSDNConfig
from tsdn.losses import TSDNLoss, gms_loss, ssim_loss
from tsdn.model import TSDNOutput

CFG = TSDNConfig(image_size=64, backbone="test_efficientnet", weights="none")


def _image(seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(2, 3, 8, 8, generator=gen)
    return F.interpolate(base, size=(64, 64), mode="bilinear", align_corners=False)


def _perfect_output(image, mask, weights_gt):
    # Logits of +-30 saturate the sigmoid: M' == M and W' == W_gt to float precision.
    return TSDNOutput(
        reconstruction=image.clone(),
        mask_logits=(mask * 2 - 1) * 30.0,
        weights_logits=(weights_gt * 2 - 1) * 30.0,
        weights_gt=weights_gt,
        features=torch.zeros(2, 4, 2, 2),
    )


def test_terms_vanish_for_a_perfect_output():
    image = _image()
    mask = (torch.rand(2, 1, 64, 64) > 0.5).float()
    weights_gt = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    total, terms = TSDNLoss(CFG)(_perfect_output(image, mask, weights_gt), image, mask)
    assert set(terms) == {"l2", "ssim", "gms", "mask", "fne"}
    for name, value in terms.items():
        assert float(value) == pytest.approx(0.0, abs=1e-6), name
        assert not value.requires_grad
    assert float(total) == pytest.approx(0.0, abs=1e-6)


def test_total_is_the_weighted_sum_of_the_terms():
    image, other = _image(0), _image(1)
    mask = (torch.rand(2, 1, 64, 64) > 0.5).float()
    out = TSDNOutput(other, torch.randn(2, 1, 64, 64), torch.randn(2, 4), torch.rand(2, 4), torch.zeros(2, 4, 2, 2))
    cfg = dataclasses.replace(CFG, w_l2=2.0, w_ssim=0.25, w_gms=3.0, w_mask=0.5, w_fne=7.0)
    total, terms = TSDNLoss(cfg)(out, image, mask)
    expected = 2.0 * terms["l2"] + 0.25 * terms["ssim"] + 3.0 * terms["gms"] + 0.5 * terms["mask"] + 7.0 * terms["fne"]
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    assert float(terms["l2"]) == pytest.approx(float(F.mse_loss(other, image)))
    assert float(terms["mask"]) == pytest.approx(float(F.mse_loss(torch.sigmoid(out.mask_logits), mask)))
    bce = F.binary_cross_entropy(torch.sigmoid(out.weights_logits), out.weights_gt)
    assert float(terms["fne"]) == pytest.approx(float(bce), rel=1e-5)
    assert all(float(v) > 0 for v in terms.values())


def test_disabled_modules_report_zero():
    image, other = _image(0), _image(1)
    out = TSDNOutput(other, None, None, None, torch.zeros(2, 4, 2, 2))
    total, terms = TSDNLoss(CFG)(out, image, torch.ones(2, 1, 64, 64))
    assert float(terms["mask"]) == 0.0 and float(terms["fne"]) == 0.0
    expected = terms["l2"] + 0.5 * terms["ssim"] + terms["gms"]
    assert float(total) == pytest.approx(float(expected), rel=1e-6)


def test_ssim_and_gms_grow_with_the_distortion():
    image = _image()
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(3))
    ssim = [float(ssim_loss(image, (image + s * noise).clamp(0, 1))) for s in (0.0, 0.05, 0.3)]
    gms = [float(gms_loss(image, (image + s * noise).clamp(0, 1))) for s in (0.0, 0.05, 0.3)]
    assert ssim[0] == pytest.approx(0.0, abs=1e-6) and ssim[0] < ssim[1] < ssim[2]
    assert gms[0] == pytest.approx(0.0, abs=1e-6) and gms[0] < gms[1] < gms[2]


def test_gms_ignores_brightness_of_flat_regions_but_not_edges():
    flat_a, flat_b = torch.full((1, 3, 32, 32), 0.2), torch.full((1, 3, 32, 32), 0.7)
    assert float(gms_loss(flat_a, flat_b)) == pytest.approx(0.0, abs=1e-6)
    edge = flat_a.clone()
    edge[..., 16:] = 0.9
    # Only the two columns beside the step have a gradient: GMS ~ 0 there, 1 elsewhere.
    assert float(gms_loss(edge, flat_a)) == pytest.approx(2 / 32, abs=0.01)
