"""Ray Train on tiny data with SeaweedFS as the store: two product lines in one command, a worker killed
mid-training, an interrupted run resumed. Each fit costs ~30 s of start-up on two cores, so the assertions
are grouped into as few fits as possible."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tsdn_platform import store
from tsdn_platform.cli import main as cli_main
from tsdn_platform.config import load_config
from tsdn_platform.registry import Registry
from tsdn_platform.train import TrainConfig, run_training

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRODUCTS = ("brick", "grass")
# Folds 0-3 of the ingest's 10 hold out ~40 % of the 12 train images: >= 3 for validation, >= 4 to train.
HOLDOUT = "holdout_folds=[0,1,2,3]"


@pytest.fixture(scope="module")
def ingested(ray_local, s3, tmp_path_factory) -> str:
    from tsdn_platform.demo_data import make_demo_dataset
    from tsdn_platform.ingest import IngestConfig, run_ingest

    root = tmp_path_factory.mktemp("train-demo") / "mvtec"
    make_demo_dataset(root, seed=0, image_size=64, n_train=12, n_test_good=2, n_defects_per_type=1, products=PRODUCTS)
    uri = s3.uri("train")
    run_ingest(IngestConfig(source=str(root), store=uri, dataset="demo", image_size=64, n_segments=50))
    return uri


def _config(uri: str, *overrides: str) -> TrainConfig:
    explicit = {"store": uri, "dataset": "demo", "products": PRODUCTS[0]}
    return load_config(TrainConfig, "tiny", [HOLDOUT, *overrides], explicit=explicit)


def _test_images(uri: str, product: str) -> tuple[list[str], torch.Tensor]:
    from tsdn_platform.ingest import read_split

    rows = read_split(uri, "demo", product, "test", columns=["image_id", "image"], image_dtype="uint8").take_all()
    return [str(r["image_id"]) for r in rows], torch.stack([torch.from_numpy(r["image"]) for r in rows])


def test_two_products_train_checkpoint_register_and_reproduce(ingested, capsys):
    args = ["--store", ingested, "--dataset", "demo", "--products", ",".join(PRODUCTS), "--config", "tiny"]
    # One worker per product line here (two trainers at once on two cores); the tests below use two (DDP).
    code = cli_main(["train", *args, "--set", HOLDOUT, "--set", "epochs=3", "--set", "num_workers=1"])
    table = capsys.readouterr().out
    assert code == 0, table
    registry = Registry(ingested)
    assert registry.list_products() == sorted(PRODUCTS)
    for product in PRODUCTS:
        assert product in table
        (version,) = registry.list_versions(product)
        meta = registry.metrics(product, version)
        run_uri = meta["run_uri"]
        assert run_uri == store.join(ingested, "runs", product, meta["run_id"])
        record = store.read_json(store.join(run_uri, "metrics.json"))
        losses = [epoch["loss"] for epoch in record["history"]]
        assert [epoch["epoch"] for epoch in record["history"]] == [1, 2, 3]
        assert losses[-1] < losses[0], losses
        for epoch in record["history"]:
            assert {f"loss_{t}" for t in ("l2", "ssim", "gms", "mask", "fne")} <= set(epoch)
            assert epoch["images_per_s"] > 0 and 0 <= epoch["val_pixel_auroc"] <= 1
        # Checkpoints landed in S3; CheckpointConfig kept the best 2 of 3.
        weights = store.list_files(run_uri, suffixes=("/model.safetensors",))
        assert len(weights) == 2 and all(w.startswith("s3://") for w in weights)
        assert store.exists(store.join(run_uri, "config.yaml"))
        assert record["checkpoint"] + "/model.safetensors" in weights
        for name in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
            assert record["test"][name] is None or 0 <= record["test"][name] <= 1
        # The registry has the version and the best pointer names it.
        assert registry.best(product)["version"] == version
        assert meta["run_id"] == record["run_id"] and meta["dataset_manifest_hash"].startswith("sha256:")
        # The loaded predictor reproduces the end-of-training test scores.
        predictor, ref = registry.load_predictor(product)
        assert ref.version == version
        ids, images = _test_images(ingested, product)
        scores = predictor.predict_tensor(images.float() / 255.0).anomaly_score.numpy()
        expected = np.array([record["test_scores"][i] for i in ids])
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
        detections = predictor.predict([img.permute(1, 2, 0).numpy() for img in images])
        np.testing.assert_allclose([d.anomaly_score for d in detections], expected, rtol=1e-4, atol=1e-5)


def test_a_killed_worker_restarts_from_the_checkpoint(ingested):
    cfg = _config(ingested, "epochs=3", "seed=1", "inject_failure_at_epoch=2", "max_failures=1")
    (result,) = run_training(cfg).values()
    assert result.ok, result.error
    assert result.resumed_from_epoch == 1  # the restarted workers loaded the epoch-1 checkpoint
    assert [epoch["epoch"] for epoch in result.history] == [1, 2, 3]
    assert result.version is not None
    assert all(math.isfinite(epoch["loss"]) for epoch in result.history)


def test_rerunning_an_interrupted_run_resumes_it(ingested):
    interrupted = run_training(_config(ingested, "epochs=3", "seed=2", "inject_failure_at_epoch=2", "max_failures=0"))
    (failed,) = interrupted.values()
    assert not failed.ok and failed.error
    (result,) = run_training(_config(ingested, "epochs=3", "seed=2")).values()
    assert result.ok, result.error
    assert result.resumed_from_epoch == 1
    assert [epoch["epoch"] for epoch in result.history] == [1, 2, 3]
    run_uri = store.join(ingested, "runs", PRODUCTS[0], result.run_name)
    assert store.read_json(store.join(run_uri, "metrics.json"))["run_id"] == result.run_name
