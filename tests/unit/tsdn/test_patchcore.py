"""The PatchCore model family (tsdn.patchcore): search, coreset, fit memory bound, checkpoint and Predictor."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from skimage import data as skdata

from tsdn import patchcore as pc
from tsdn.checkpoint import checkpoint_files, load_checkpoint
from tsdn.predict import Predictor
from tsdn.scoring import blur_map, fit_calibration

TINY = pc.PatchCoreConfig(image_size=64, backbone="test_efficientnet", weights="none", score_sigma=1.0)


def _model(**changes) -> pc.PatchCore:
    torch.manual_seed(0)
    return pc.PatchCore(dataclasses.replace(TINY, **changes))


def _brick_crops(n: int, size: int = 64) -> torch.Tensor:
    """n crops of a real texture: (n, 3, size, size) float in [0, 1]."""
    brick = torch.from_numpy(skdata.brick()).float().div(255)  # (512, 512) gray
    crops = [brick[i * 40 : i * 40 + size, i * 24 : i * 24 + size] for i in range(n)]
    return torch.stack(crops).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


@pytest.mark.parametrize("backend", ["torch", "faiss", "auto"])
@pytest.mark.parametrize(("query_chunk", "bank_chunk"), [(1, 1), (7, 5), (1000, 1000)])
def test_nearest_distance_equals_brute_force(query_chunk, bank_chunk, backend):
    gen = torch.Generator().manual_seed(1)
    queries = torch.randn(53, 12, generator=gen)
    bank = torch.randn(31, 12, generator=gen)
    expected = torch.cdist(queries, bank).amin(dim=1)
    got = pc.nearest_distance(queries, bank, query_chunk, bank_chunk, backend=backend)
    assert got.dtype == queries.dtype and got.shape == (53,)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # faiss: |q|^2 + |b|^2 - 2 q.b rounding


def test_nearest_distance_auto_uses_faiss_on_cpu_but_torch_under_tracing(monkeypatch):
    calls = []
    monkeypatch.setattr(pc, "_faiss_nearest", lambda *args: calls.append(args) or torch.zeros(len(args[1])))
    queries, bank = torch.randn(4, 3), torch.randn(5, 3)
    pc.nearest_distance(queries, bank)
    assert len(calls) == 1  # faiss-cpu is installed by the test extra
    traced = torch.jit.trace(lambda q: pc.nearest_distance(q, bank), queries, check_trace=False)
    assert len(calls) == 1  # tracing took the torch path: an exported graph holds the search itself
    torch.testing.assert_close(traced(queries), torch.cdist(queries, bank).amin(dim=1))
    with pytest.raises(ValueError, match="backend"):
        pc.nearest_distance(queries, bank, backend="annoy")


def test_nearest_distance_is_zero_for_bank_rows_and_rejects_empty_bank():
    bank = torch.randn(20, 8, generator=torch.Generator().manual_seed(2))
    assert pc.nearest_distance(bank, bank, 6, 7).abs().max() < 1e-3
    with pytest.raises(ValueError, match="empty"):
        pc.nearest_distance(bank, bank[:0])


def test_greedy_coreset_covers_the_set_better_than_random_rows():
    gen = torch.Generator().manual_seed(3)
    # two dense clusters and a few far outliers: a k-center pass must pick the outliers
    patches = torch.cat(
        [torch.randn(300, 16, generator=gen), torch.randn(300, 16, generator=gen) + 20, torch.full((3, 16), 100.0)]
    )
    chosen = pc.greedy_coreset(patches, 10, projection_dim=8, seed=0)
    assert chosen.shape == (10,) and len(set(chosen.tolist())) == 10
    assert {600, 601, 602} & set(chosen.tolist())  # an outlier is always a centre
    cover = torch.cdist(patches, patches[chosen]).amin(1).max()
    random_rows = torch.randperm(603, generator=gen)[:10]
    assert cover < torch.cdist(patches, patches[random_rows]).amin(1).max()
    assert torch.equal(chosen, pc.greedy_coreset(patches, 10, projection_dim=8, seed=0))
    assert pc.greedy_coreset(patches, 1000).shape == (603,)


def test_fit_never_holds_more_than_max_patches_and_samples_every_batch():
    model = _model(max_patches=100, coreset_fraction=1.0)
    batches = [_brick_crops(2) for _ in range(3)]  # 3 x 2 x 8 x 8 = 384 patches
    stats = model.fit(batches)
    assert stats == {"images": 6, "patches_seen": 384, "patches_pooled": 100, "bank_size": 100}
    assert model.bank.dtype == torch.float16


def test_embed_concatenates_the_chosen_stages_on_the_finest_grid():
    model = _model(reductions=(8, 16))
    encoder = model.encoder
    channels = dict(zip(encoder.feature_info.reduction(), encoder.feature_info.channels()))
    emb = model.embed(_brick_crops(2))
    assert emb.shape == (2, channels[8] + channels[16], 8, 8)
    with pytest.raises(ValueError, match="stride"):
        _model(reductions=(3,))


def test_training_images_score_zero_and_a_pasted_defect_is_found():
    model = _model(coreset_fraction=1.0, bank_dtype="float32")
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
    model = _model(coreset_fraction=0.1, seed=5)
    model.fit([_brick_crops(4)])
    assert model.bank.shape[0] == int(np.ceil(0.1 * 4 * 8 * 8))
    assert _model(coreset_fraction=0.5, coreset_max=7).fit([_brick_crops(4)])["bank_size"] == 7


def test_checkpoint_round_trip_and_the_predictor_serve_patchcore_like_tsdn():
    model = _model()
    train = _brick_crops(6)
    model.fit([train])
    normal_scores = model.predict(train).anomaly_score.numpy()
    files = checkpoint_files(model, fit_calibration(normal_scores), extra={"note": "x"})
    loaded, calibration, meta = load_checkpoint(files)
    assert meta["family"] == "patchcore" and isinstance(loaded, pc.PatchCore)
    assert torch.equal(loaded.bank, model.bank)
    images = _brick_crops(3)
    torch.testing.assert_close(loaded.predict(images).anomaly_map, model.predict(images).anomaly_map)
    detections = Predictor(loaded, calibration, device="cpu").predict([np.asarray(skdata.brick())[:80, :96]])
    assert detections[0].anomaly_map.shape == (80, 96)
    assert 0.0 <= detections[0].normalized_score <= 1.0
    with pytest.raises(ValueError, match="family"):
        meta["family"] = "nosuch"
        load_checkpoint({**files, "model.json": json.dumps(meta).encode()})


def test_a_rectangular_input_fits_predicts_and_round_trips():
    """image_size [H, W] (a line shot at another aspect): the bank holds H/8 x W/8 patches per image, the maps come
    back at (H, W) and at each image's own size through the Predictor, and the checkpoint keeps the shape."""
    assert pc.PatchCoreConfig.from_dict({**TINY.to_dict(), "image_size": [96, 32]}).input_shape == (96, 32)
    for bad in ([96, 40], [16, 64], [64]):
        with pytest.raises(ValueError, match="image_size"):
            dataclasses.replace(TINY, image_size=bad)
    model = _model(image_size=(96, 32), coreset_fraction=1.0)
    brick = torch.from_numpy(skdata.brick()).float().div(255)
    tall = torch.stack([brick[i * 50 : i * 50 + 96, i * 30 : i * 30 + 32] for i in range(4)])
    tall = tall.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    assert model.fit([tall])["bank_size"] == 4 * (96 // 8) * (32 // 8)
    prediction = model.predict(tall)
    assert prediction.anomaly_map.shape == (4, 1, 96, 32)
    files = checkpoint_files(model, fit_calibration(prediction.anomaly_score.numpy()))
    loaded, calibration, meta = load_checkpoint(files)
    assert meta["input_size"] == [96, 32] and loaded.cfg.input_shape == (96, 32)
    part = np.asarray(skdata.brick())[:300, :100]
    detection = Predictor(loaded, calibration, device="cpu").predict([part])[0]
    assert detection.anomaly_map.shape == (300, 100)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_nearest_distance_keeps_small_distances_exact(backend):
    """Near-duplicates of bank rows: the search's expansion cancels to noise, the returned distance must not."""
    if backend == "faiss" and pc._faiss() is None:
        pytest.skip("faiss-cpu is not installed")
    gen = torch.Generator().manual_seed(4)
    bank = torch.randn(300, 384, generator=gen) * 3  # Lite0-like feature magnitudes
    offsets = torch.randn(50, 384, generator=gen) * 1e-4
    queries = bank[:50] + offsets
    got = pc.nearest_distance(queries, bank, 16, 64, backend=backend)
    torch.testing.assert_close(got, offsets.norm(dim=1), rtol=1e-3, atol=1e-6)


def test_pixel_statistics_come_from_maps_against_banks_without_the_image():
    """score_normalization pixel: image i goes to fold i mod k, and each kept image's map comes from the coreset
    of the other folds' patches; the statistics are those maps' per-position mean and (blurred) deviation."""
    train = _brick_crops(6)
    model = _model(score_normalization="pixel", normalization_folds=3, coreset_fraction=1.0, bank_dtype="float32")
    stats = model.fit([train[:4], train[4:]])  # images 0..5 -> folds 0 1 2 0 1 2, across the two batches
    assert stats["normal_images"] == 6 and stats["bank_size"] == 6 * 8 * 8 == model.bank.shape[0]
    assert int(model.normal_count) == 6

    maps = []
    for fold in range(3):
        reference = _model(coreset_fraction=1.0, bank_dtype="float32")
        reference.fit([train[[i for i in range(6) if i % 3 != fold]]])
        maps.append(reference.predict(train[[i for i in range(6) if i % 3 == fold]]).anomaly_map)
    maps = torch.cat(maps).double()
    assert maps.amin() > 1e-2  # no image was in the bank that mapped it
    torch.testing.assert_close(model.normal_mean, maps.mean(0, keepdim=True).float(), rtol=1e-4, atol=1e-5)
    std = blur_map(maps.var(0, keepdim=True).float(), TINY.score_sigma).sqrt()
    torch.testing.assert_close(model.normal_std, std.clamp_min(0.01 * float(std.mean()) + 1e-12), rtol=1e-3, atol=1e-5)

    # the map the model returns is the full bank's, standardised at every position
    plain = _model(coreset_fraction=1.0, bank_dtype="float32")
    plain.fit([train[:4], train[4:]])
    assert sorted(map(tuple, plain.bank.tolist())) == sorted(map(tuple, model.bank.tolist()))  # the folds' order
    images = _brick_crops(8)[6:]
    expected = (plain.predict(images).anomaly_map - model.normal_mean) / model.normal_std
    got = model.predict(images)
    torch.testing.assert_close(got.anomaly_map, expected)
    torch.testing.assert_close(got.anomaly_score, got.anomaly_map.flatten(1).amax(1))


def test_pixel_keeps_at_most_normalization_images_and_refuses_too_few():
    model = _model(score_normalization="pixel", normalization_folds=2, normalization_images=4)
    assert model.fit([_brick_crops(6)])["normal_images"] == 4  # 2 per fold: images 0, 2 and 1, 3
    with pytest.raises(ValueError, match="at least 2 training images"):
        _model(score_normalization="pixel").fit([_brick_crops(1)])
    for name, bad in (("score_normalization", "image"), ("normalization_folds", 1), ("normalization_images", 1)):
        with pytest.raises(ValueError, match=name):
            dataclasses.replace(TINY, **{name: bad})


def test_pixel_statistics_round_trip_and_an_unfitted_model_refuses_to_predict():
    model = _model(score_normalization="pixel")
    with pytest.raises(RuntimeError, match="memory bank is empty"):
        model.predict(_brick_crops(1))
    train = _brick_crops(6)
    model.fit([train])
    files = checkpoint_files(model, fit_calibration(model.predict(train).anomaly_score.numpy()))
    loaded, _, meta = load_checkpoint(files)
    assert meta["config"]["score_normalization"] == "pixel"
    assert torch.equal(loaded.normal_std, model.normal_std) and int(loaded.normal_count) == 6
    images = _brick_crops(8)[6:]
    torch.testing.assert_close(loaded.predict(images).anomaly_map, model.predict(images).anomaly_map)

    unfitted = _model(score_normalization="pixel")
    unfitted.bank = model.bank.clone()  # a bank without the statistics (never fitted through fit)
    with pytest.raises(RuntimeError, match="statistics were never fitted"):
        unfitted.predict(images)


def test_a_checkpoint_without_score_normalization_loads_as_none():
    """Checkpoints written before the switch have no normal_* tensors and no config key: they keep the raw map."""
    model = _model()
    model.fit([_brick_crops(4)])
    train = _brick_crops(4)
    files = checkpoint_files(model, fit_calibration(model.predict(train).anomaly_score.numpy()))
    meta = json.loads(files["model.json"])
    for key in ("score_normalization", "normalization_folds", "normalization_images"):
        meta["config"].pop(key)
    loaded, _, _ = load_checkpoint({**files, "model.json": json.dumps(meta).encode()})
    assert loaded.cfg.score_normalization == "none" and not hasattr(loaded, "normal_mean")


def test_pixel_statistics_on_a_rectangular_input():
    """image_size [H, W]: the fold maps and the statistics are (H, W), and a training image standardises near 0."""
    model = _model(image_size=(96, 32), score_normalization="pixel")
    brick = torch.from_numpy(skdata.brick()).float().div(255)
    tall = torch.stack([brick[i * 50 : i * 50 + 96, i * 30 : i * 30 + 32] for i in range(6)])
    tall = tall.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    assert model.fit([tall])["normal_images"] == 6
    assert model.normal_mean.shape == model.normal_std.shape == (1, 1, 96, 32)
    prediction = model.predict(tall)
    assert prediction.anomaly_map.shape == (6, 1, 96, 32)
    assert prediction.anomaly_map.mean() < 0  # in the bank now: below the mean of maps from banks without them


def test_the_reservoir_is_algorithm_r_row_by_row_even_when_rows_share_a_slot():
    """Rows of one batch that draw the same slot: the later one wins, as in the sequential algorithm, whatever the
    threads do (an indexed assignment with repeated indices left it to them, and two fits of one line differed)."""
    capacity, gen = 50, torch.Generator().manual_seed(7)
    first = torch.arange(capacity, dtype=torch.float32)[:, None]
    batch = torch.arange(capacity, capacity + 5000, dtype=torch.float32)[:, None]
    pool, seen = pc._reservoir(first, batch, capacity, capacity, gen)
    assert seen == capacity + 5000

    replay = torch.Generator().manual_seed(7)
    positions = torch.arange(capacity, capacity + 5000)
    slots = (torch.rand(5000, generator=replay) * (positions + 1)).long()
    assert len(set(slots[slots < capacity].tolist())) < int((slots < capacity).sum())  # shared slots happen
    expected = first.clone()
    for row, slot in zip(batch, slots.tolist(), strict=True):
        if slot < capacity:
            expected[slot] = row
    assert torch.equal(pool, expected)


def test_two_fits_of_the_same_images_give_the_same_bank():
    train = [_brick_crops(8)[:4], _brick_crops(8)[4:]]
    models = [_model(max_patches=100, score_normalization="pixel") for _ in range(2)]
    for model in models:
        model.fit(train)
    assert torch.equal(models[0].bank, models[1].bank)
    assert torch.equal(models[0].normal_mean, models[1].normal_mean)
