"""ingest -> train -> score as one job, on SeaweedFS, with the tiny preset."""

import pyarrow.parquet as pq
import pytest

from tsdn.calibration import Calibration
from tsdn_platform import store
from tsdn_platform.pipeline import PipelineConfig, format_summary, run_pipeline, stage_configs
from tsdn_platform.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_stage_configs_agree_on_resolution_and_superpixels(tmp_path):
    cfg = PipelineConfig(
        source=str(tmp_path), store=str(tmp_path / "store"), dataset="d", train_config="tiny", train={"epochs": 3}
    )
    ingest_cfg, train_cfg = stage_configs(cfg)
    assert train_cfg.epochs == 3
    assert (train_cfg.store, train_cfg.dataset) == (cfg.store, "d")
    assert ingest_cfg.image_size == train_cfg.model.image_size == 64
    assert ingest_cfg.n_segments == train_cfg.model.n_segments
    assert ingest_cfg.slic_compactness == train_cfg.model.slic_compactness


def test_pipeline_trains_registers_and_scores_the_test_split(ray_local, s3, demo_root, tmp_path):
    store_uri = s3.uri("pipeline")
    cfg = PipelineConfig(
        source=str(demo_root),
        store=store_uri,
        dataset="demo",
        products=["brick"],
        train_config="tiny",
        report_dir=str(tmp_path / "report"),
    )
    result = run_pipeline(cfg)

    assert list(result.ingest["products"]) == ["brick"]
    trained = result.train["brick"]
    assert trained.ok, trained.error
    best = Registry(store_uri).best("brick")
    assert best is not None and best["version"] == trained.version

    manifest = result.score
    n_test = sum(1 for p in (demo_root / "brick" / "test").rglob("*.png"))
    assert manifest["rows_written"] == n_test and manifest["errors"] == 0
    assert manifest["model_versions"] == {"brick": trained.version}
    metrics = manifest["metrics"]["brick"]
    assert metrics["images"] == n_test
    for name in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= metrics[name] <= 1.0
    # One metric, one value: the score job (the demo table, the report) and the registry (models list, /v1/products)
    # evaluate the same maps at the same size with the same mask resampling.
    registered = Registry(store_uri).metrics("brick", trained.version)["test"]
    assert metrics["map_size"] == [64, 64]
    for name in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "recall", "false_positive_rate"):
        assert metrics[name] == pytest.approx(registered[name], abs=1e-4), name
    # the threshold the rows were decided at, and what it promises on unseen good images
    meta, _ = Registry(store_uri).model_json("brick", trained.version)
    calibration = Calibration.from_dict(meta["calibration"])
    shown = manifest["products"]["brick"]["calibration"]
    assert shown["threshold"] == calibration.threshold and shown["n_normal"] == calibration.n_normal
    rates = calibration.false_positive_rate()
    assert (shown["expected_false_positive_rate"], shown["false_positive_rate_95"]) == pytest.approx(rates)

    committed = store.read_json(store.join(cfg.score_output(), "_manifest.json"))
    assert committed["job_id"] == manifest["job_id"]
    fs, path = store.resolve(store.join(cfg.score_output(), "brick"))
    table = pq.read_table(path, filesystem=fs)
    assert table.num_rows == n_test
    assert set(table["model_version"].to_pylist()) == {trained.version}

    report = (tmp_path / "report" / "index.html").read_text()
    assert "brick" in report and trained.version in report
    summary = format_summary(result)
    assert "brick" in summary and trained.version in summary
    assert f"  brick        threshold {calibration.threshold:.3f} = the 99 % quantile of" in summary
