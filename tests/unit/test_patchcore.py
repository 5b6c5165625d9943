"""The PatchCore-style baseline of the accuracy benchmark (benchmarks/patchcore.py) on tiny cases."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from skimage import data as skdata

ROOT = Path(__file__).resolve().parents[2]


def _load_patchcore():
    spec = importlib.util.spec_from_file_location("bench_patchcore", ROOT / "benchmarks" / "patchcore.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


pc = _load_patchcore()


def _encoder():
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", pretrained=False, features_only=True)


def _brick_crops(n: int, size: int = 64) -> torch.Tensor:
    """n crops of a real texture: (n, 3, size, size) float in [0, 1]."""
    brick = torch.from_numpy(skdata.brick()).float().div(255)  # (512, 512) gray
    crops = [brick[i * 40 : i * 40 + size, i * 24 : i * 24 + size] for i in range(n)]
    return torch.stack(crops).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


@pytest.mark.parametrize(("query_chunk", "bank_chunk"), [(1, 1), (7, 5), (1000, 1000)])
def test_nearest_distance_equals_brute_force(query_chunk, bank_chunk):
    gen = torch.Generator().manual_seed(1)
    queries = torch.randn(53, 12, generator=gen)
    bank = torch.randn(31, 12, generator=gen)
    expected = torch.cdist(queries, bank).amin(dim=1)
    got = pc.nearest_distance(queries, bank, query_chunk, bank_chunk)
    torch.testing.assert_close(got, expected)


def test_nearest_distance_is_zero_for_bank_rows_and_rejects_empty_bank():
    bank = torch.randn(20, 8, generator=torch.Generator().manual_seed(2))
    assert pc.nearest_distance(bank, bank, 6, 7).abs().max() < 1e-3
    with pytest.raises(ValueError, match="empty"):
        pc.nearest_distance(bank, bank[:0])


def test_random_coreset_is_a_seeded_subset_of_the_requested_size():
    patches = torch.arange(200, dtype=torch.float32).reshape(100, 2)
    sub = pc.random_coreset(patches, 0.25, seed=3)
    assert sub.shape == (25, 2)
    assert set(sub[:, 0].tolist()) <= set(patches[:, 0].tolist())
    assert len(set(sub[:, 0].tolist())) == 25
    torch.testing.assert_close(sub, pc.random_coreset(patches, 0.25, seed=3))
    assert not torch.equal(sub, pc.random_coreset(patches, 0.25, seed=4))
    assert pc.random_coreset(patches, 1.0, seed=0) is patches
    with pytest.raises(ValueError, match="fraction"):
        pc.random_coreset(patches, 0.0, seed=0)


def test_embed_concatenates_the_chosen_stages_on_the_finest_grid():
    encoder = _encoder()
    model = pc.PatchCore(encoder, pc.PatchCoreConfig(reductions=(8, 16)))
    channels = dict(zip(encoder.feature_info.reduction(), encoder.feature_info.channels()))
    emb = model.embed(_brick_crops(2))
    assert emb.shape == (2, channels[8] + channels[16], 8, 8)
    with pytest.raises(ValueError, match="stride"):
        pc.PatchCore(_encoder(), pc.PatchCoreConfig(reductions=(3,)))


def test_training_images_score_zero_and_a_pasted_defect_is_found():
    model = pc.PatchCore(_encoder(), pc.PatchCoreConfig(sigma=1.0))
    train = _brick_crops(6)
    model.fit([train[:4], train[4:]])
    assert model.bank.shape[0] == 6 * 8 * 8

    normal = model.predict(train[:2])
    assert normal.anomaly_map.shape == (2, 1, 64, 64)
    assert normal.anomaly_score.max() < 1e-2  # every patch of a training image is in the bank

    defect = train[:1].clone()
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[24:40, 24:40] = True
    defect[:, 0, mask] = 1.0  # a saturated red square on grey brick
    defect[:, 1:, mask] = 0.0
    pred = model.predict(defect)
    amap = pred.anomaly_map[0, 0]
    assert pred.anomaly_score[0] > 10 * normal.anomaly_score.max() + 1e-3
    assert amap[mask].mean() > 2 * amap[~mask].mean()
    peak = np.unravel_index(int(amap.argmax()), amap.shape)
    assert mask[peak]


def test_coreset_fraction_shrinks_the_bank():
    model = pc.PatchCore(_encoder(), pc.PatchCoreConfig(coreset_fraction=0.1, seed=5))
    model.fit([_brick_crops(4)])
    assert model.bank.shape[0] == int(np.ceil(0.1 * 4 * 8 * 8))
