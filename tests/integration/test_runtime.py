"""runtime: onnxruntime in a Ray Data score job and in a Serve replica, against the same models on torch.

Two tiny registered products on SeaweedFS, one per family (TSDN with the feature score source, PatchCore). The
score job with ``runtime: onnxruntime`` exports both versions on first use (the driver registers them), the
Serve application loads those exports; scores equal eager torch's within 1e-4 of the map scale and the
decisions are the same.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _ports import free_ports
from PIL import Image

from tsdn.calibration import fit_calibration
from tsdn.checkpoint import checkpoint_files
from tsdn.patchcore import PatchCore, PatchCoreConfig
from tsdn.predict import Predictor
from tsdn.runtime import EXPORT_JSON
from tsdn_platform import store
from tsdn_platform.export import export_version
from tsdn_platform.registry import Registry
from tsdn_platform.score import ScoreConfig, run_scoring
from tsdn_platform.testing import register, tiny_model

SIZE = 64
PRODUCTS = ("alpha", "beta")  # alpha: TSDN (feature source); beta: PatchCore
TOLERANCE = 1e-4  # of the map scale, as tests/unit/test_export.py states it


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _texture(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 128 + 60 * np.sin(xx / 5.0 + seed)[..., None] * np.cos(yy / 7.0)[..., None]
    return np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


def _register(registry: Registry, product: str, seed: int, rgbs: list[np.ndarray]) -> tuple[str, float]:
    """Register a tiny model whose threshold splits the scores of ``rgbs`` (halfway between two of them, so that
    neither side sits on it); returns (version, map scale)."""
    if product == "beta":
        model = tiny_model("patchcore", seed, image_size=SIZE)
    else:
        model = tiny_model("tsdn", seed, image_size=SIZE, score_source="feature")
    predictor = Predictor(model, None)
    pred = predictor.predict_tensor(torch.from_numpy(predictor.preprocess(rgbs)))
    scores = np.sort(pred.anomaly_score.numpy())
    calibration = dataclasses.replace(fit_calibration(scores), threshold=float(scores[0] + scores[1]) / 2)
    metrics = {"test": {"image_auroc": 0.5}, "run_id": f"{product}-{seed}"}
    version = register(registry, product, model, calibration, metrics)
    return version, float(pred.anomaly_map.max())


@pytest.fixture(scope="module")
def world(s3, ray_local):
    root = s3.uri("runtime")
    registry = Registry(store.join(root, "store"))
    rgbs = {f"{PRODUCTS[i % 2]}/img{i}.png": _texture(i, 64 + 8 * i, 72) for i in range(6)}
    versions, scales = {}, {}
    for seed, product in enumerate(PRODUCTS):
        mine = [rgb for name, rgb in rgbs.items() if name.startswith(f"{product}/")]
        versions[product], scales[product] = _register(registry, product, seed, mine)
    images = {name: _png(rgb) for name, rgb in rgbs.items()}
    for name, data in images.items():
        store.write_bytes(store.join(root, "images", name), data)
    return {"root": root, "registry": registry, "versions": versions, "scales": scales, "images": images}


def _rows(output: str) -> dict[str, dict]:
    tables = []
    for uri in store.list_files(output, suffixes=(".parquet",)):
        fs, path = store.resolve(uri)
        tables.append(pq.read_table(path, filesystem=fs).drop_columns(["score_map"]))
    return {row["image_id"]: row for row in pa.concat_tables(tables).to_pylist()}


@pytest.mark.integration
@pytest.mark.slow
def test_score_job_on_onnxruntime_equals_torch_and_registers_the_exports(world):
    registry = world["registry"]
    for product, version in world["versions"].items():
        assert registry.load_export(product, version, "onnx")[0] is None
    common = {
        "store": store.join(world["root"], "store"),
        "input": store.join(world["root"], "images"),
        "product_from_path": "{product}/**",
        "batch_size": 4,
        "min_rows_per_file": 1,
    }
    eager = run_scoring(ScoreConfig(output=store.join(world["root"], "scores-torch"), **common))
    exported = run_scoring(ScoreConfig(output=store.join(world["root"], "scores-ort"), runtime="onnxruntime", **common))
    assert exported["config"]["runtime"] == "onnxruntime" and exported["errors"] == 0
    assert exported["job_id"] != eager["job_id"]  # the runtime is part of what the job computed
    for product, version in world["versions"].items():
        files, _ = registry.load_export(product, version, "onnx")
        assert files is not None  # the driver exported on first use and registered it
        meta = json.loads(files[EXPORT_JSON])
        assert meta["source"] == {
            "product": product,
            "version": version,
            "weights_sha256": registry.metrics(product, version)["files"]["model.safetensors"]["sha256"],
        }
    torch_rows, ort_rows = _rows(eager["config"]["output"]), _rows(exported["config"]["output"])
    assert sorted(torch_rows) == sorted(ort_rows) == sorted(world["images"])
    decisions = set()
    for image_id, row in ort_rows.items():
        product = image_id.split("/")[0]
        assert row["model_version"] == world["versions"][product]
        assert abs(row["anomaly_score"] - torch_rows[image_id]["anomaly_score"]) <= TOLERANCE * world["scales"][product]
        assert row["is_anomalous"] == torch_rows[image_id]["is_anomalous"]
        decisions.add(row["is_anomalous"])
    assert decisions == {True, False}  # the comparison covers both decisions


@pytest.mark.integration
@pytest.mark.slow
def test_serve_on_onnxruntime_answers_like_torch(world, tmp_path):
    import httpx
    from ray import serve

    from tsdn_platform.serve import ServeConfig, start_server

    registry = world["registry"]
    # Registered ahead (`tsdn export --register`), so the replica loads it without importing torch.
    summary = export_version(registry.store_uri, "beta", None, "onnx", out=str(tmp_path / "beta"), register=True)
    assert summary["version"] == world["versions"]["beta"] and (tmp_path / "beta" / "model.onnx").is_file()
    cfg = ServeConfig(
        store=registry.store_uri,
        port=free_ports(1)[0],
        app_name="tsdn-runtime",
        runtime="onnxruntime",
        auth_tokens_env="TSDN_RUNTIME_TEST_UNSET",
        batch_wait_timeout_s=0.0,
    )
    url = start_server(cfg)
    try:
        for name, data in world["images"].items():
            product = name.split("/")[0]
            expected = registry.load_predictor(product)[0].predict([np.asarray(Image.open(io.BytesIO(data)))])[0]
            answer = httpx.post(
                f"{url}/v1/products/{product}/detect", content=data, headers={"Content-Type": "image/png"}, timeout=120
            ).json()
            assert answer["model_version"] == world["versions"][product]
            assert answer["family"] == ("patchcore" if product == "beta" else "tsdn")
            assert abs(answer["anomaly_score"] - expected.anomaly_score) <= TOLERANCE * world["scales"][product]
            assert answer["is_anomalous"] == expected.is_anomalous
    finally:
        serve.shutdown()


def test_tsdn_export_writes_a_folder_and_refuses_in_one_line(tmp_path, capsys):
    from tsdn_platform.cli import main as cli_main

    registry = Registry(str(tmp_path / "store"))
    version, _ = _register(registry, "beta", 0, [_texture(i, 64, 64) for i in range(3)])
    empty = PatchCore(PatchCoreConfig(backbone="test_efficientnet", weights="none", image_size=SIZE))
    registry.register("gamma", checkpoint_files(empty, fit_calibration([0.1, 0.2])), {"run_id": "g"}, promote="always")
    store_uri = registry.store_uri
    out = tmp_path / "beta-onnx"
    assert cli_main(["export", "beta", "--store", store_uri, "--format", "onnx", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] == version and summary["reused"] is False
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx"]
    assert registry.load_export("beta", version, "onnx")[0] is None  # --out only: nothing registered
    assert cli_main(["export", "beta", "--store", store_uri, "--format", "openvino", "--register"]) == 0
    assert json.loads(capsys.readouterr().out)["registered"].endswith(f"{version}/export/openvino")
    for argv, reason in (
        (["export", "gamma", "--format", "onnx", "--out", str(tmp_path / "g")], "memory bank is empty"),
        (["export", "delta", "--format", "onnx", "--out", str(tmp_path / "d")], "delta"),
        (["export", "beta", "--format", "onnx"], "give --out DIR, --register, or both"),
    ):
        assert cli_main([*argv, "--store", store_uri]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tsdn export: ") and reason in err[0]
