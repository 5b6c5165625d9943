"""Predictor: any image mode and size in, calibrated detections with maps at the input resolution out."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tsdn.checkpoint import checkpoint_files
from tsdn.config import TSDNConfig
from tsdn.model import TSDN
from tsdn.predict import Detection, Predictor
from tsdn.scoring import fit_calibration

CFG = TSDNConfig(
    image_size=64, backbone="test_efficientnet", weights="none", feature_channels=8, fne_hidden=16, fne_pool=2
)


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return Predictor(TSDN(CFG), fit_calibration([0.2, 0.3, 0.4]), batch_size=2)


def _rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _inputs():
    rgb = _rgb(37, 53)
    gray16 = (np.random.default_rng(1).random((70, 45)) * 65535).astype(np.uint16)
    return [
        rgb,
        Image.fromarray(rgb).convert("L"),
        Image.fromarray(np.dstack([rgb, np.full((37, 53), 255, np.uint8)]), "RGBA"),
        Image.fromarray(gray16),  # mode I;16
        gray16,
        Image.fromarray(_rgb(64, 64, 2)).convert("P"),
        _rgb(129, 31, 3),
    ]


def test_any_mode_and_size_gives_maps_at_the_input_resolution(predictor):
    images = _inputs()
    detections = predictor.predict(images)
    assert len(detections) == len(images)
    for image, det in zip(images, detections):
        height, width = np.asarray(image).shape[:2]
        assert isinstance(det, Detection)
        assert det.anomaly_map.shape == (height, width) and det.anomaly_map.dtype == np.float32
        assert np.isfinite(det.anomaly_map).all() and det.anomaly_map.min() >= 0
        assert 0.0 <= det.normalized_score <= 1.0
        assert det.is_anomalous == (det.anomaly_score >= det.threshold)
        assert det.threshold == predictor.calibration.threshold
        # Bilinear resizing cannot exceed the network-resolution maximum, which is the raw score.
        assert det.anomaly_map.max() <= det.anomaly_score + 1e-6


def test_opaque_alpha_and_16_bit_inputs_match_their_plain_versions(predictor):
    images = _inputs()
    detections = predictor.predict(images)
    # Equal up to float reassociation: the pairs sit in different batches.
    assert detections[2].anomaly_score == pytest.approx(detections[0].anomaly_score, rel=1e-5)  # opaque RGBA == RGB
    assert detections[3].anomaly_score == pytest.approx(detections[4].anomaly_score, rel=1e-5)  # I;16 == uint16
    np.testing.assert_allclose(detections[2].anomaly_map, detections[0].anomaly_map, rtol=1e-5, atol=1e-7)


def test_predict_agrees_with_predict_tensor_and_batching(predictor):
    images = _inputs()
    batch = predictor.preprocess(images)
    assert batch.shape == (len(images), 3, 64, 64) and batch.dtype == np.float32
    assert 0 <= batch.min() and batch.max() <= 1
    pred = predictor.predict_tensor(torch.from_numpy(batch))
    scores = [d.anomaly_score for d in predictor.predict(images)]
    one_by_one = Predictor(predictor.model, predictor.calibration, batch_size=1).predict(images)
    np.testing.assert_allclose(scores, pred.anomaly_score.numpy(), rtol=1e-5)
    np.testing.assert_allclose(scores, [d.anomaly_score for d in one_by_one], rtol=1e-5)


def test_threshold_override(predictor):
    images = _inputs()[:3]
    scores = [d.anomaly_score for d in predictor.predict(images)]
    middle = float(np.median(scores))
    detections = predictor.predict(images, threshold=middle)
    assert [d.is_anomalous for d in detections] == [s >= middle for s in scores]
    assert all(d.threshold == middle for d in detections)
    assert [d.normalized_score >= 0.5 for d in detections] == [d.is_anomalous for d in detections]
    assert not any(d.is_anomalous for d in predictor.predict(images, threshold=float("inf")))


def test_map_size_returns_the_network_maps_unresized_or_one_resize_of_them(predictor):
    images = _inputs()
    pred = predictor.predict_tensor(torch.from_numpy(predictor.preprocess(images)))
    at_network = predictor.predict(images, map_size=(64, 64))
    for det, want in zip(at_network, pred.anomaly_map[:, 0].numpy()):
        np.testing.assert_allclose(det.anomaly_map, want, rtol=1e-5, atol=1e-7)  # no resize at all
    small = predictor.predict(images, map_size=(16, 24))
    for det, want in zip(small, pred.anomaly_map):
        assert det.anomaly_map.shape == (16, 24)
        direct = torch.nn.functional.interpolate(want[None], size=(16, 24), mode="bilinear", antialias=True)
        np.testing.assert_allclose(det.anomaly_map, direct[0, 0].numpy(), rtol=1e-4, atol=1e-6)


def test_from_files_predicts_identically(predictor):
    files = checkpoint_files(predictor.model, predictor.calibration)
    loaded = Predictor.from_files(files, batch_size=3)
    images = _inputs()
    for a, b in zip(predictor.predict(images), loaded.predict(images)):
        assert a.anomaly_score == b.anomaly_score
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_empty_and_invalid_inputs(predictor):
    assert predictor.predict([]) == []
    with pytest.raises(ValueError, match="non-empty"):
        predictor.predict_tensor(torch.empty(0, 3, 64, 64))
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(predictor.model, predictor.calibration, batch_size=0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_image_decoded_small_scores_like_the_full_decode(predictor, fmt):
    """Serving decodes a large image small (tsdn.image.decode_image(min_size=4 x S): a JPEG at a DCT scale, any
    image reduced on load) and leaves the last 4x of downscaling to the predictor's antialiased resize: the
    score and the map at S x S stay within a few per cent of the full decode's."""
    import io

    from tsdn.image import decode_image

    small = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((2048, 2048), Image.BICUBIC).save(buffer, format=fmt, quality=95)
    full = decode_image(buffer.getvalue(), "large")
    reduced = decode_image(buffer.getvalue(), "large", min_size=4 * CFG.image_size)
    assert reduced.size == (256, 256)  # 1/8 each way: 1/64 of the pixels reach the predictor
    reference, decoded_small = predictor.predict([full, reduced], map_size=(CFG.image_size, CFG.image_size))
    assert decoded_small.anomaly_score == pytest.approx(reference.anomaly_score, rel=0.03)
    np.testing.assert_allclose(
        decoded_small.anomaly_map, reference.anomaly_map, atol=0.03 * reference.anomaly_map.max()
    )


def test_a_rectangular_model_predicts_at_its_shape_and_round_trips_its_checkpoint():
    """image_size [H, W]: the network sees (H, W), each map comes back at its image's size, and the checkpoint
    (model.json's config and input_size) rebuilds the same model."""
    torch.manual_seed(0)
    model = TSDN(TSDNConfig(**{**CFG.to_dict(), "image_size": [128, 64]}))
    rect = Predictor(model, fit_calibration([0.2, 0.3, 0.4]), batch_size=2)
    assert rect.image_size == (128, 64)
    assert rect.preprocess([_rgb(250, 90)]).shape == (1, 3, 128, 64)
    images = [_rgb(250, 90), _rgb(40, 41, 1)]
    detections = rect.predict(images)
    assert [d.anomaly_map.shape for d in detections] == [(250, 90), (40, 41)]
    assert rect.predict(images, map_size=(128, 64))[0].anomaly_map.shape == (128, 64)
    files = checkpoint_files(model, rect.calibration)
    assert json.loads(files["model.json"])["input_size"] == [128, 64]
    loaded = Predictor.from_files(files, batch_size=2)
    assert loaded.model.cfg.image_size == (128, 64)
    for a, b in zip(detections, loaded.predict(images)):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_a_model_whose_map_is_not_its_score_gets_its_map_in_the_score_units():
    """``map_strides``: the calibration's ``map_offset`` (the normal scores' quantile minus the normal maps' maxima's)
    is added to every map the predictor returns, so ``map >= threshold`` marks a normal image's pixels about as often
    as its score reaches the threshold; a calibration written before the field reads 0."""
    import dataclasses

    torch.manual_seed(0)
    cfg = dataclasses.replace(
        CFG,
        score_source="feature",
        feature_distance="mahalanobis",
        score_normalization="pixel",
        feature_strides=(8, 16, 32),
        map_strides=(8, 16),
    )
    model = TSDN(cfg).eval()
    normal = torch.rand(12, 3, 64, 64, generator=torch.Generator().manual_seed(41))
    with torch.inference_mode():
        model.fit_normal_stats([normal[:8]])
        held = model.predict(normal[8:])
    scores, maxima = held.anomaly_score.numpy(), held.anomaly_map.flatten(start_dim=1).amax(dim=1).numpy()
    calibration = fit_calibration(scores, normal_map_maxima=maxima, quantile=0.9)
    expected_offset = np.quantile(scores.astype(np.float64), 0.9) - np.quantile(maxima.astype(np.float64), 0.9)
    assert calibration.map_offset == pytest.approx(expected_offset) and calibration.map_offset != 0
    assert fit_calibration(scores).map_offset == 0.0
    with pytest.raises(ValueError, match="one per normal score"):
        fit_calibration(scores, normal_map_maxima=maxima[:2])

    predictor = Predictor(model, calibration, batch_size=2)
    images = [_rgb(64, 64, seed) for seed in range(3)]
    raw = predictor.predict_tensor(torch.from_numpy(predictor.preprocess(images)))
    for det, want in zip(predictor.predict(images, map_size=(64, 64)), raw.anomaly_map[:, 0].numpy()):
        np.testing.assert_allclose(det.anomaly_map, want + calibration.map_offset, rtol=1e-5, atol=1e-6)
    loaded = Predictor.from_files(checkpoint_files(model, calibration))
    assert loaded.calibration.map_offset == calibration.map_offset
    old = {k: v for k, v in calibration.to_dict().items() if k != "map_offset"}
    assert type(calibration).from_dict(old).map_offset == 0.0

    # the map the score reduces travels with a flagged image only, at the map's size, in the score's units
    threshold = float(np.median(raw.anomaly_score.numpy()))
    detections = predictor.predict(images, threshold=threshold, map_size=(64, 64))
    assert any(d.is_anomalous for d in detections) and not all(d.is_anomalous for d in detections)
    for det, want, score in zip(detections, raw.scored_map[:, 0].numpy(), raw.anomaly_score.numpy()):
        if det.is_anomalous:
            np.testing.assert_allclose(det.scored_map, want, rtol=1e-5, atol=1e-6)
            assert det.scored_map.max() == pytest.approx(float(score), rel=1e-5)
        else:
            assert det.scored_map is None
    assert all(d.scored_map is None for d in Predictor(TSDN(CFG).eval(), calibration).predict(images, threshold=-1.0))
