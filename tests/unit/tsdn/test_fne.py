"""Feature normality estimator: the W_gt target and the W' estimator."""

import torch
import torch.nn.functional as F

from tsdn.fne import FeatureNormalityEstimator, normality_target


def _blob_mask(size: int) -> torch.Tensor:
    mask = torch.zeros(2, 1, size, size)
    mask[0, :, 2:6, 3:7] = 1.0
    mask[1, :, 1:4, 4:8] = 1.0
    return mask


def test_channel_equal_to_the_mask_gets_the_lowest_weight():
    torch.manual_seed(0)
    mask = _blob_mask(8)
    features = torch.randn(2, 6, 8, 8)
    features[:, 4] = mask[:, 0] * 3.0 - 1.0  # same structure, other dynamic range
    weights = normality_target(features, mask)
    assert weights.shape == (2, 6)
    assert torch.all((weights >= 0) & (weights <= 1))
    assert weights.argmin(dim=1).tolist() == [4, 4]
    assert torch.allclose(weights[:, 4], torch.zeros(2))
    assert torch.allclose(weights.amax(dim=1), torch.ones(2))


def test_low_resolution_channel_matching_the_upsampled_mask():
    torch.manual_seed(1)
    coarse = (torch.rand(2, 1, 4, 4) > 0.6).float()
    coarse[:, :, 0, 0], coarse[:, :, 3, 3] = 1.0, 0.0  # both values present in each sample
    mask = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    features = torch.randn(2, 5, 4, 4)
    features[:, 2] = coarse[:, 0]
    weights = normality_target(features, mask, window_size=7)
    assert weights.argmin(dim=1).tolist() == [2, 2]
    assert weights.min() >= 0 and weights.max() <= 1


def test_indistinguishable_channels_are_all_kept():
    features = torch.ones(1, 4, 2, 2)
    weights = normality_target(features, _blob_mask(8)[:1])
    assert torch.equal(weights, torch.ones(1, 4))


def test_target_carries_no_gradient():
    features = torch.randn(2, 3, 4, 4, requires_grad=True)
    mask_logits = torch.randn(2, 1, 16, 16, requires_grad=True)
    weights = normality_target(features, torch.sigmoid(mask_logits))
    assert not weights.requires_grad


def test_estimator_flatten_length_is_fixed_by_the_pool():
    estimator = FeatureNormalityEstimator(channels=6, hidden=16, pool=2)
    for size in (2, 3, 5):
        logits = estimator(torch.randn(3, 6, size, size))
        assert logits.shape == (3, 6)
    estimator(torch.randn(3, 6, 5, 5)).sum().backward()
    assert all(p.grad is not None for p in estimator.parameters())
