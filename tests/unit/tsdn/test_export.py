"""tsdn.export + tsdn.runtime: exported graphs reproduce eager torch for every score source and both families.

Parity is stated as in the issue: max |exported - torch| of maps and scores <= 1e-4 of the map's scale
(``max(map range, max |map|)``), fp32, through the whole :class:`Predictor` path (maps at the input resolution).
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tsdn import patchcore as pc
from tsdn.checkpoint import checkpoint_files
from tsdn.config import TSDNConfig
from tsdn.export import PARITY_TOLERANCE, ExportError, export_checkpoint, export_model
from tsdn.model import TSDN
from tsdn.predict import Predictor
from tsdn.runtime import EXPORT_JSON, load_exported, read_export_dir
from tsdn.scoring import fit_calibration

TINY = TSDNConfig(
    image_size=64, backbone="test_efficientnet", weights="none", feature_channels=8, fne_hidden=16, fne_pool=2
)
TINY_PATCHCORE = pc.PatchCoreConfig(
    image_size=64, backbone="test_efficientnet", weights="none", score_sigma=1.0, bank_chunk=7, score_topk=0.01
)
CALIBRATION = fit_calibration([0.1, 0.2, 0.3])
RUNTIME_OF = {"onnx": "onnxruntime", "openvino": "openvino"}
TRANSISTOR = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "mvtec" / "transistor"


def _images(n: int = 4) -> list[np.ndarray]:
    """RGB images of several sizes (smaller and larger than the input), textured so maps vary."""
    rng = np.random.default_rng(0)
    shapes = [(64, 64), (37, 53), (129, 90), (200, 150), (80, 80)]
    out = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = 128 + 70 * np.sin(xx / (3 + i))[..., None] * np.cos(yy / 5)[..., None]
        out.append(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


def _tsdn(source: str, **changes) -> TSDN:
    torch.manual_seed(0)
    model = TSDN(dataclasses.replace(TINY, score_source=source, **changes)).eval()
    if source == "fused":
        model.fit_score_scales(torch.rand(2, 3, TINY.image_size, TINY.image_size))
    return model


def _patchcore(cfg: pc.PatchCoreConfig = TINY_PATCHCORE) -> pc.PatchCore:
    torch.manual_seed(0)
    model = pc.PatchCore(cfg)
    model.fit([torch.rand(3, 3, *cfg.input_shape)])
    return model


def _assert_parity(model, files, runtime, images, calibration=CALIBRATION):
    """The exported Predictor's detections equal the torch Predictor's within the stated tolerance; with every image
    flagged (a threshold below the lowest score), so do the maps their scores reduce (a model with ``map_strides``)."""
    eager_predictor = Predictor(model, calibration, batch_size=3)
    exported_predictor = Predictor.from_export(files, runtime, batch_size=3)
    eager, exported = eager_predictor.predict(images), exported_predictor.predict(images)
    scale = max(max(float(d.anomaly_map.max() - d.anomaly_map.min()), float(d.anomaly_map.max())) for d in eager)
    assert scale > 0
    for a, b in zip(eager, exported):
        assert a.anomaly_map.shape == b.anomaly_map.shape
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= PARITY_TOLERANCE * scale
        assert abs(a.anomaly_score - b.anomaly_score) <= PARITY_TOLERANCE * scale
        assert a.threshold == b.threshold
        assert abs(a.normalized_score - b.normalized_score) <= 1e-3
    lowest = min(d.anomaly_score for d in eager) - 1.0
    flagged = zip(eager_predictor.predict(images, threshold=lowest), exported_predictor.predict(images, lowest))
    for a, b in flagged:
        assert (a.scored_map is None) == (b.scored_map is None) == (not getattr(model, "scores_another_map", False))
        if a.scored_map is not None:
            assert np.abs(a.scored_map - b.scored_map).max() <= PARITY_TOLERANCE * scale


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("source", ["reconstruction", "mask", "fused", "feature"])
def test_tsdn_export_reproduces_torch_for_every_score_source(source, fmt):
    model = _tsdn(source, score_topk=0.01 if source == "feature" else 0.0)
    files = export_model(model, CALIBRATION, fmt)
    meta = json.loads(files[EXPORT_JSON])
    assert meta["format"] == fmt and meta["family"] == "tsdn" and meta["score_source"] == source
    assert meta["parity"]["max_abs_map"] <= PARITY_TOLERANCE * meta["parity"]["map_scale"]
    _assert_parity(model, files, RUNTIME_OF[fmt], _images(5))


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("source", ["reconstruction", "feature"])
def test_tsdn_export_carries_the_per_position_normalization(source, fmt):
    model = _tsdn(source, score_normalization="pixel")
    side = TINY.image_size
    model.fit_normal_stats([torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(1))])
    files = export_model(model, CALIBRATION, fmt)
    assert json.loads(files[EXPORT_JSON])["score_normalization"] == "pixel"
    _assert_parity(model, files, RUNTIME_OF[fmt], _images(5))


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("flips", [2, 4, "auto"])
def test_tsdn_export_averages_the_mirror_images(flips, fmt):
    """``test_flips``: the graph runs the model on each mirror image and flips each map back before the average
    (with ``auto``, over the mirrors the fit chose)."""
    model = _tsdn("feature", feature_distance="mahalanobis", score_normalization="pixel", test_flips=flips)
    side = TINY.image_size
    draws = torch.Generator().manual_seed(1)
    held = [torch.rand(8, 3, side, side, generator=draws)] if flips == "auto" else None
    model.fit_normal_stats([torch.rand(4, 3, side, side, generator=draws)], held_out=held)
    files = export_model(model, CALIBRATION, fmt)
    assert json.loads(files[EXPORT_JSON])["test_flips"] == model.test_flips == (4 if flips == "auto" else flips)
    _assert_parity(model, files, RUNTIME_OF[fmt], _images(5))


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_tsdn_export_averages_the_views_of_a_split_map(fmt):
    """The `demo` preset's map: the views chosen on held-out normals, the image score from strides 8 + 16 + 32 at its
    own blur and the map from 8 + 16 (averaged over the same views, standardised by its own statistics, moved by its
    offset)."""
    model = _tsdn(
        "feature",
        feature_distance="mahalanobis",
        score_normalization="pixel",
        feature_strides=(8, 16, 32),
        map_strides=(8, 16),
        image_score_sigma=2.0,
        test_flips="auto",
    )
    side = TINY.image_size
    draws = torch.Generator().manual_seed(4)
    train, held = (torch.rand(n, 3, side, side, generator=draws) for n in (6, 8))
    model.fit_normal_stats([train], held_out=[held])
    calibration = dataclasses.replace(CALIBRATION, map_offset=1.5)
    files = export_model(model, calibration, fmt)
    meta = json.loads(files[EXPORT_JSON])
    assert meta["test_flips"] == model.test_flips == 4 and meta["map_strides"] == [8, 16]
    assert meta["image_score_sigma"] == 2.0 and "scored_map" in meta["outputs"]
    assert meta["parity"]["max_abs_scored_map"] <= PARITY_TOLERANCE * meta["parity"]["map_scale"]
    _assert_parity(model, files, RUNTIME_OF[fmt], _images(5), calibration)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize(
    ("normalization", "strides", "whitening", "map_strides"),
    [
        ("none", (8, 16), "pooled", None),
        ("pixel", (8, 16, 32), "pooled", None),
        ("pixel", (8, 16, 32), "position", None),
        ("pixel", (8, 16, 32), "position", (8, 16)),  # the score from every stage, the map from the finer ones
    ],
)
def test_tsdn_export_carries_the_feature_whitening(normalization, strides, whitening, map_strides, fmt):
    model = _tsdn(
        "feature",
        feature_distance="mahalanobis",
        score_normalization=normalization,
        feature_strides=strides,
        feature_whitening=whitening,
        map_strides=map_strides,
    )
    assert len(model.feature_stages) == len(strides)
    side = TINY.image_size
    model.fit_normal_stats([torch.rand(6, 3, side, side, generator=torch.Generator().manual_seed(2))])
    # a map of its own travels with the calibration's offset, which the exported predictor adds as the eager one does
    calibration = dataclasses.replace(CALIBRATION, map_offset=2.5) if map_strides else CALIBRATION
    files = export_model(model, calibration, fmt)
    meta = json.loads(files[EXPORT_JSON])
    assert meta["feature_distance"] == "mahalanobis" and meta["score_normalization"] == normalization
    assert meta["feature_whitening"] == whitening
    assert meta["map_strides"] == (list(map_strides) if map_strides else None)
    assert meta["calibration"]["map_offset"] == calibration.map_offset
    _assert_parity(model, files, RUNTIME_OF[fmt], _images(5), calibration)


def test_the_adapted_encoder_statistics_travel_in_the_graph():
    model = _tsdn("feature", encoder_lr_scale=0.0, encoder_norm="adapted")
    model.fit_encoder_norm([torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(5))])
    _assert_parity(model, export_model(model, CALIBRATION, "onnx"), "onnxruntime", _images(5))


def _rectangular(family: str):
    """A fitted model of ``family`` at a non-square input, with everything fitted that travels in the graph."""
    if family == "patchcore":
        model = pc.PatchCore(dataclasses.replace(TINY_PATCHCORE, image_size=(96, 64)))
        model.fit([torch.rand(3, 3, 96, 64, generator=torch.Generator().manual_seed(3))])
        return model
    model = _tsdn(
        "feature",
        image_size=(128, 64),
        feature_distance="mahalanobis",
        feature_whitening="position",
        score_normalization="pixel",
        feature_strides=(8, 16, 32),
    )
    model.fit_normal_stats([torch.rand(6, 3, 128, 64, generator=torch.Generator().manual_seed(3))])
    return model


@pytest.mark.parametrize("family", ["tsdn", "patchcore"])
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_a_rectangular_input_exports_with_its_shape(fmt, family):
    """image_size [H, W]: the graph takes (B, 3, H, W), its maps come back at each image's own size, and what was
    fitted (TSDN's per-position statistics and whitening, PatchCore's bank) travels with it."""
    model = _rectangular(family)
    height, width = model.cfg.input_shape
    files = export_model(model, CALIBRATION, fmt)
    meta = json.loads(files[EXPORT_JSON])
    assert meta["input_size"] == [height, width] and meta["input"]["shape"] == ["batch", 3, height, width]
    assert load_exported(files).runner.image_size == (height, width)
    _assert_parity(model, files, RUNTIME_OF[fmt], _images(5))


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_patchcore_export_searches_the_whole_bank(fmt):
    model = _patchcore()
    assert model.bank.shape[0] > 2 * TINY_PATCHCORE.bank_chunk  # the graph's search runs over several blocks
    files = export_model(model, CALIBRATION, fmt)
    assert json.loads(files[EXPORT_JSON])["score_source"] == "patch_distance"
    _assert_parity(model, files, RUNTIME_OF[fmt], _images(5))


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_patchcore_export_carries_the_per_position_normalization(fmt):
    model = _patchcore(dataclasses.replace(TINY_PATCHCORE, score_normalization="pixel"))
    assert int(model.normal_count) == 3
    files = export_model(model, CALIBRATION, fmt)
    _assert_parity(model, files, RUNTIME_OF[fmt], _images(5))
    with pytest.raises(ExportError, match="statistics were never fitted"):
        unfitted = pc.PatchCore(model.cfg)
        unfitted.bank = model.bank.clone()
        export_model(unfitted, CALIBRATION, fmt)


def test_the_batch_axis_is_dynamic():
    model = _patchcore()
    runner = load_exported(export_model(model, CALIBRATION, "onnx")).runner
    batch = torch.rand(7, 3, 64, 64)
    with torch.inference_mode():
        expected = model.predict(batch)
    for size in (1, 7):  # the graph was traced with 2
        got = runner(batch[:size].numpy())
        assert got.anomaly_map.shape == (size, 1, 64, 64) and got.anomaly_score.shape == (size,)
        np.testing.assert_allclose(got.anomaly_map, expected.anomaly_map[:size].numpy(), atol=1e-5)


def test_export_json_records_what_scoring_needs():
    files = checkpoint_files(_tsdn("reconstruction"), CALIBRATION)
    exported = export_checkpoint(files, "onnx", {"product": "bottle", "version": "v1"})
    meta = json.loads(exported[EXPORT_JSON])
    assert meta["input_size"] == [64, 64] and meta["input"]["shape"] == ["batch", 3, 64, 64]
    assert meta["normalization"]["in_graph"] is True and len(meta["normalization"]["mean"]) == 3
    assert meta["calibration"] == CALIBRATION.to_dict()
    assert meta["source"]["product"] == "bottle" and meta["source"]["version"] == "v1"
    import hashlib

    assert meta["source"]["weights_sha256"] == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert meta["files"]["model.onnx"]["sha256"] == hashlib.sha256(exported["model.onnx"]).hexdigest()


def test_refusals_name_the_problem():
    with pytest.raises(ExportError, match="format 'tflite'"):
        export_model(_tsdn("reconstruction"), CALIBRATION, "tflite")
    with pytest.raises(ExportError, match="memory bank is empty"):
        export_model(pc.PatchCore(TINY_PATCHCORE), CALIBRATION, "onnx")
    files = export_model(_tsdn("reconstruction"), CALIBRATION, "onnx")
    tampered = {**files, "model.onnx": files["model.onnx"] + b"\0"}
    with pytest.raises(ValueError, match="sha256 does not match"):
        load_exported(tampered)
    with pytest.raises(ValueError, match=r"export\.json missing"):
        load_exported({"model.onnx": files["model.onnx"]})
    ir = export_model(_tsdn("reconstruction"), CALIBRATION, "openvino")
    with pytest.raises(ValueError, match="runs onnx exports"):
        load_exported(ir, "onnxruntime")
    with pytest.raises(ValueError, match="predict_tensor: needs the torch model"):
        Predictor.from_export(files).predict_tensor(torch.rand(1, 3, 64, 64))


def test_openvino_runs_an_onnx_export_too():
    model = _tsdn("feature")
    _assert_parity(model, export_model(model, CALIBRATION, "onnx"), "openvino", _images(3))


def _write(files: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_the_standalone_inferencer_imports_neither_torch_timm_nor_ray(tmp_path):
    model = _tsdn("reconstruction")
    folder = _write(export_model(model, CALIBRATION, "onnx", {"product": "tile", "version": "v7"}), tmp_path / "m")
    images = _images(2)
    paths = []
    for i, rgb in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rgb).save(paths[-1])
    code = (
        "import sys, json\n"
        "from tsdn_platform.cli import main\n"
        f"status = main(['predict', '--model', {str(folder)!r}, {str(paths[0])!r}, {str(paths[1])!r}])\n"
        "loaded = sorted(m for m in ('torch', 'timm', 'ray', 'kornia', 'pyarrow') if m in sys.modules)\n"
        "print(json.dumps({'status': status, 'loaded': loaded}), file=sys.stderr)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report == {"status": 0, "loaded": []}
    lines = [json.loads(line) for line in done.stdout.strip().splitlines()]
    expected = Predictor(model, CALIBRATION).predict(images)
    assert [line["image"] for line in lines] == [str(p) for p in paths]
    for line, det in zip(lines, expected):
        assert line["model_version"] == "v7" and line["product"] == "tile"
        assert abs(line["anomaly_score"] - det.anomaly_score) <= 1e-5
        assert line["is_anomalous"] == det.is_anomalous and line["threshold"] == det.threshold


def test_the_standalone_inferencer_says_on_stderr_what_failed_and_refuses_bad_settings(tmp_path, capsys):
    """Before, ``--out`` with an undecodable image exited 1 with nothing on stderr, ``--threshold nan`` exited 0
    with NaN in its JSON, and ``--out`` into a missing folder exited 1 with a bare FileNotFoundError."""
    from tsdn_platform.cli import main

    folder = _write(export_model(_tsdn("reconstruction"), CALIBRATION, "onnx"), tmp_path / "m")
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(_images(1)[0]).save(good)
    bad.write_text("not an image")
    out = tmp_path / "lines.jsonl"
    assert main(["predict", "--model", str(folder), "--out", str(out), str(good), str(bad)]) == 1
    assert (
        capsys.readouterr().err == f"tsdn predict: 1 of 2 image(s) could not be scored (their lines in {out} say why)\n"
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert "anomaly_score" in lines[0] and lines[1]["error"].startswith(f"{bad}: not a PNG/JPEG/BMP/TIFF image")
    for value in ("nan", "0", "-1"):
        assert main(["predict", "--model", str(folder), "--threshold", value, str(good)]) == 2
        assert capsys.readouterr().err.startswith("tsdn predict: --threshold: must be a finite number > 0")
    assert main(["predict", "--model", str(folder), "--out", str(tmp_path / "no" / "x.jsonl"), str(good)]) == 2
    assert "its folder does not exist" in capsys.readouterr().err


def test_read_export_dir_round_trip_and_errors(tmp_path):
    files = export_model(_tsdn("mask"), CALIBRATION, "openvino")
    folder = _write(files, tmp_path / "ir")
    assert read_export_dir(folder) == files
    (folder / "model.bin").unlink()
    with pytest.raises(ValueError, match=r"model\.bin missing"):
        read_export_dir(folder)
    with pytest.raises(ValueError, match="not an export folder"):
        read_export_dir(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tsdn", "patchcore"])
def test_lite0_exports_at_128_px_reproduce_torch(family):
    if family == "tsdn":
        torch.manual_seed(0)
        cfg = TSDNConfig(
            image_size=128,
            backbone="tf_efficientnet_lite0",
            weights="package:efficientnet-lite0",
            score_source="feature",
            encoder_lr_scale=0.0,
        )
        model = TSDN(cfg).eval()
    else:
        cfg = pc.PatchCoreConfig(image_size=128, coreset_max=500)
        model = _patchcore(cfg)
    for fmt in ("onnx", "openvino"):
        _assert_parity(model, export_model(model, CALIBRATION, fmt), RUNTIME_OF[fmt], _images(3))


def _transistor(split: str, limit: int) -> list[np.ndarray]:
    paths = sorted((TRANSISTOR / split).rglob("*.png"))
    step = max(1, len(paths) // limit)
    return [np.asarray(Image.open(p).convert("RGB").resize((256, 256), Image.BILINEAR)) for p in paths[::step][:limit]]


@pytest.mark.slow
def test_decisions_are_identical_on_a_real_set():
    if not TRANSISTOR.is_dir():
        pytest.skip(f"{TRANSISTOR} absent: the MVTec AD transistor set is not on this machine")
    cfg = pc.PatchCoreConfig(image_size=128, coreset_max=1000)
    model = pc.PatchCore(cfg)
    train = _transistor("train/good", 24)
    eager_for_fit = Predictor(model, None)
    model.fit([torch.from_numpy(eager_for_fit.preprocess(train[i : i + 8])) for i in range(0, 24, 8)])
    fitted = Predictor(model, None)
    normals = fitted.predict_tensor(
        torch.from_numpy(fitted.preprocess(_transistor("train/good", 60)[24:]))
    ).anomaly_score
    calibration = fit_calibration(normals.numpy(), quantile=0.9)
    test = _transistor("test", 40)
    eager = Predictor(model, calibration).predict(test)
    for fmt in ("onnx", "openvino"):
        exported = Predictor.from_export(export_model(model, calibration, fmt)).predict(test)
        assert [d.is_anomalous for d in exported] == [d.is_anomalous for d in eager]
        assert sum(d.is_anomalous for d in eager) not in (0, len(test))  # the decision is not trivial
        np.testing.assert_allclose([d.anomaly_score for d in exported], [d.anomaly_score for d in eager], rtol=1e-4)


def test_score_and_serve_refuse_a_runtime_that_cannot_work():
    from tsdn_platform.score import ScoreConfig
    from tsdn_platform.serve import ServeConfig

    with pytest.raises(ValueError, match="expected one of torch, onnxruntime, openvino"):
        ServeConfig(store="s", runtime="tensorrt")
    with pytest.raises(ValueError, match="num_gpus_per_replica"):
        ServeConfig(store="s", runtime="onnxruntime", num_gpus_per_replica=1)
    with pytest.raises(ValueError, match="num_gpus_per_actor"):
        ScoreConfig(store="s", input="i", output="o", runtime="openvino", num_gpus_per_actor=1)
    assert ScoreConfig(store="s", input="i", output="o", runtime="onnxruntime").runtime == "onnxruntime"
