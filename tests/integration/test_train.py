"""Ray Train on tiny data with SeaweedFS as the store: two product lines in one command, a worker killed
mid-training, an interrupted run resumed. Each fit costs ~30 s of start-up on two cores, so the assertions
are grouped into as few fits as possible."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch

from tsdn.config_io import ConfigError
from tsdn.metrics import image_auroc
from tsdn_platform import store
from tsdn_platform.cli import main as cli_main
from tsdn_platform.config import load_config
from tsdn_platform.registry import Registry
from tsdn_platform.train import (
    FAIL_AT_EPOCH_ENV,
    TrainConfig,
    check_manifest,
    injected_failure_epoch,
    preflight,
    run_training,
    validate_holdout,
    validate_test,
)
from tsdn_platform.train_checkpoints import load_state, state_files
from tsdn_platform.train_config import format_selections, selection_line

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


@pytest.fixture(scope="module")
def ingested_in_files(ray_local, s3, tmp_path_factory) -> str:
    """One line stored a row per file: Ray Data reads up to 16 files per task, its tasks side by side. The first
    task's images are 1536 px (the others 64), so it finishes last."""
    from PIL import Image

    from tsdn_platform.demo_data import make_demo_dataset
    from tsdn_platform.ingest import IngestConfig, run_ingest

    root = tmp_path_factory.mktemp("train-files") / "mvtec"
    make_demo_dataset(root, seed=1, image_size=64, n_train=40, n_test_good=6, n_defects_per_type=1, products=["brick"])
    for path in sorted((root / "brick" / "train" / "good").iterdir())[:16]:
        Image.open(path).resize((1536, 1536), Image.Resampling.BICUBIC).save(path)
    uri = s3.uri("train-files")
    cfg = IngestConfig(source=str(root), store=uri, dataset="files", image_size=64, n_segments=50, rows_per_file=1)
    run_ingest(cfg)
    return uri


def _config(uri: str, *overrides: str) -> TrainConfig:
    explicit = {"store": uri, "dataset": "demo", "products": PRODUCTS[0]}
    return load_config(TrainConfig, "tiny", [HOLDOUT, *overrides], explicit=explicit)


def _test_images(uri: str, product: str) -> tuple[list[str], torch.Tensor]:
    from tsdn_platform.shards import read_split

    rows = read_split(uri, "demo", product, "test", columns=["image_id", "image"], image_dtype="uint8").take_all()
    return [str(r["image_id"]) for r in rows], torch.stack([torch.from_numpy(np.array(r["image"])) for r in rows])


@pytest.mark.integration
@pytest.mark.slow
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
    # The same command again (the promotion policy is not part of the run): nothing is trained, and the summary says
    # so instead of reading "promoted yes" for a version an earlier run registered.
    versions = {product: registry.list_versions(product) for product in PRODUCTS}
    code = cli_main(
        ["train", *args, "--set", HOLDOUT, "--set", "epochs=3", "--set", "num_workers=1", "--promote", "never"]
    )
    again = capsys.readouterr().out
    assert code == 0, again
    assert {product: registry.list_versions(product) for product in PRODUCTS} == versions
    for product in PRODUCTS:
        (version,) = versions[product]
        assert (
            f"{product}: run {registry.metrics(product, version)['run_id']} had finished before; its version " in again
        )
        assert f"{version} is reused and nothing was trained" in again


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_checkpoint(ingested, monkeypatch):
    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "2")
    cfg = _config(ingested, "epochs=3", "seed=1", "max_failures=1")
    (result,) = run_training(cfg).values()
    assert result.ok, result.error
    assert result.resumed_from_epoch == 1  # the restarted workers loaded the epoch-1 checkpoint
    assert [epoch["epoch"] for epoch in result.history] == [1, 2, 3]
    assert result.version is not None
    assert all(math.isfinite(epoch["loss"]) for epoch in result.history)


@pytest.mark.integration
@pytest.mark.slow
def test_per_position_statistics_sum_both_ranks_shards(ingested):
    """``feature_distance: mahalanobis`` (whitened per position, the blend chosen on the held-out split, as the `cpu`
    preset), ``test_flips: auto`` (the mirrors chosen on the held-out split too), ``score_normalization: pixel``
    and ``encoder_norm: adapted`` (as the `demo` preset adapts it: the means of the layers up to stride 2) on two DDP
    workers: the three fits' statistics cover the whole train split. The run records its held-out count and says
    that it is small."""
    from tsdn.config import POSITION_BLENDS
    from tsdn.model import TSDN
    from tsdn.scoring import fit_calibration
    from tsdn_platform.shards import read_split
    from tsdn_platform.train import SMALL_HOLDOUT, small_holdout_warning

    cfg = _config(
        ingested,
        "epochs=1",
        "seed=3",
        "model.score_source=feature",
        "model.score_normalization=pixel",
        "model.feature_distance=mahalanobis",
        "model.feature_whitening=position",
        "model.feature_position_shrinkage=auto",
        "model.test_flips=auto",
        "model.map_strides=[8]",
        "model.encoder_lr_scale=0",
        "model.encoder_norm=adapted",
        "model.encoder_norm_max_stride=2",
        "model.encoder_norm_variance=pretrained",
    )
    assert cfg.num_workers == 2
    (result,) = run_training(cfg).values()
    assert result.ok, result.error
    folds = read_split(ingested, "demo", PRODUCTS[0], "train", columns=["fold"]).take_all()
    n_train = sum(1 for row in folds if int(row["fold"]) not in cfg.holdout_folds)
    n_holdout = len(folds) - n_train
    registry = Registry(ingested)
    predictor, _ = registry.load_predictor(PRODUCTS[0], result.version)
    assert predictor.model.cfg.score_normalization == "pixel"
    assert predictor.model.cfg.feature_distance == "mahalanobis"
    # Both ranks' shards, not rank 0's alone; Ray Train splits the train set equally, dropping the remainder
    expected = n_train - n_train % cfg.num_workers
    assert int(predictor.model.normal_count) == expected > n_train // cfg.num_workers
    assert int(predictor.model.feature_count) == expected
    grid = [size // 8 for size in predictor.model.cfg.input_shape]  # the first compared stage, stride 8
    assert predictor.model.feature_whitening_0.shape[:2] == tuple(grid)  # one whitening per position, saved
    assert predictor.model.feature_mean_0.shape[1:] == tuple(grid)
    # the blend per stage chosen on the held-out split (read by rank 0, all-reduced), recorded with the epoch's metrics
    (epoch,) = result.history
    assert all(epoch[f"whitening_blend_s{s}"] in POSITION_BLENDS for s in cfg.model.feature_strides), epoch
    # and the mirrors (test_flips auto) from the held-out split alone, saved with the weights
    assert epoch["test_flips"] == predictor.model.test_flips in (1, 2, 4), epoch
    assert int(predictor.model.encoder_norm_count) == expected  # before training, from both shards
    pretrained = TSDN(
        dataclasses.replace(
            cfg.model, encoder_norm="pretrained", encoder_norm_max_stride=None, encoder_norm_variance="adapted"
        )
    )
    norms = [
        [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for model in (predictor.model, pretrained)
    ]
    (first, *_, last), (first_before, *_, last_before) = norms
    assert not torch.equal(first.running_mean, first_before.running_mean)  # the stem's mean is the line's
    assert torch.equal(last.running_mean, last_before.running_mean)  # the stride-32 layer keeps ImageNet's
    for ours, theirs in zip(*norms, strict=True):
        assert torch.equal(ours.running_var, theirs.running_var)  # the means only
    record = store.read_json(store.join(registry.metrics(PRODUCTS[0], result.version)["run_uri"], "metrics.json"))
    ids, images = _test_images(ingested, PRODUCTS[0])
    scores = predictor.predict_tensor(images.float() / 255.0).anomaly_score.numpy()
    np.testing.assert_allclose(scores, [record["test_scores"][i] for i in ids], rtol=1e-5, atol=1e-6)
    assert record["holdout_images"] == n_holdout == predictor.calibration.n_normal
    # the score from strides 8 + 16, the map from 8: the calibration puts the map in the score's units, fitted on the
    # clean held-out images (the predictor's own scores and map maxima of them)
    rows = read_split(ingested, "demo", PRODUCTS[0], "train", columns=["fold", "image"], image_dtype="uint8").take_all()
    held_out = [torch.from_numpy(np.array(r["image"])) for r in rows if int(r["fold"]) in cfg.holdout_folds]
    held_images = torch.stack(held_out).float() / 255.0
    held_pred = predictor.predict_tensor(held_images)
    maxima = held_pred.anomaly_map.flatten(start_dim=1).amax(dim=1).numpy()
    refit = fit_calibration(held_pred.anomaly_score.numpy(), normal_map_maxima=maxima)
    assert predictor.calibration.map_offset == pytest.approx(refit.map_offset, rel=1e-4, abs=1e-5)
    assert predictor.calibration.map_offset != 0.0
    assert 0 < n_holdout < SMALL_HOLDOUT  # 12 train images, 4 of 10 folds held out
    # the Ray task that trained the line logged small_holdout_warning's line (unit-tested) in its worker
    assert small_holdout_warning(PRODUCTS[0], n_holdout, cfg.holdout_folds)


@pytest.mark.integration
@pytest.mark.slow
def test_rerunning_an_interrupted_run_resumes_it(ingested, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setenv(FAIL_AT_EPOCH_ENV, "2")
        interrupted = run_training(_config(ingested, "epochs=3", "seed=2", "max_failures=0"))
    (failed,) = interrupted.values()
    assert not failed.ok and failed.error
    (result,) = run_training(_config(ingested, "epochs=3", "seed=2")).values()
    assert result.ok, result.error
    assert result.resumed_from_epoch == 1
    assert [epoch["epoch"] for epoch in result.history] == [1, 2, 3]
    run_uri = store.join(ingested, "runs", PRODUCTS[0], result.run_name)
    assert store.read_json(store.join(run_uri, "metrics.json"))["run_id"] == result.run_name


# --- the pieces of the loop, without Ray ---------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_both_families_train_register_and_the_better_one_is_promoted(ingested):
    """``families: [tsdn, patchcore]``: one version per family, each recording the same comparison on the
    leak-free validation; the best pointer ends on the winner; each version's predictor reproduces its scores.
    PatchCore standardises its map per position (its fold banks built from the patches the Ray Data actors
    stream), and the saved version carries the statistics. Both families set their threshold at the quantile of
    the held-out scores that lets through ``target_false_positive_rate`` of unseen good images on average."""
    from tsdn.calibration import quantile_for_false_positive_rate

    uri = ingested
    target = "target_false_positive_rate=0.3"
    cfg = _config(uri, "families=tsdn,patchcore", "epochs=1", "num_workers=1", "run_name=fam", target)
    cfg = dataclasses.replace(cfg, patchcore=dataclasses.replace(cfg.patchcore, score_normalization="pixel"))
    assert cfg.families == ["tsdn", "patchcore"]
    result = run_training(cfg)["brick"]
    assert result.ok, result.error
    registry = Registry(uri)
    versions = {}
    for version in registry.list_versions("brick"):
        metrics = registry.metrics("brick", version)
        if metrics.get("run_id") in ("fam", "fam-patchcore"):
            versions[metrics["family"]] = (version, metrics)
    assert set(versions) == {"tsdn", "patchcore"}
    selection = versions["tsdn"][1]["selection"]
    assert selection == versions["patchcore"][1]["selection"]
    assert selection["metric"] == "val.val_image_auroc"  # never the test split by default
    for family, (_, metrics) in versions.items():
        assert selection["values"][family] == pytest.approx(metrics["val"]["val_image_auroc"])
        assert registry.model_json("brick", versions[family][0])[0]["family"] == family
    assert result.family == selection["winner"] and result.version == versions[selection["winner"]][0]
    # How sure the choice is: the lead resampled over the validation images both families scored (the TSDN
    # version's from the checkpoint training kept), an interval around the measured margin.
    resampled = selection["resampled"]
    n_validation = 2 * versions["tsdn"][1]["holdout_images"]  # each held-out normal, clean and with a defect
    assert resampled["images"] == n_validation and resampled["draws"] == 2000
    assert resampled["low"] <= selection["margin"] <= resampled["high"] and 0 <= resampled["runner_up_ahead"] <= 1
    line = selection_line("brick", selection)
    assert line.startswith(f"  brick        {selection['winner']} ") and f"{selection['margin']:+.3f}" in line
    assert ("too close to call" in line) == (resampled["low"] <= 0)
    assert format_selections({"brick": result})[-1] == line
    best = registry.metrics("brick", registry.best("brick")["version"])
    assert best["val"]["val_image_auroc"] >= max(selection["values"].values())
    fit = versions["patchcore"][1]["fit"]
    assert fit["bank_size"] >= 1 and fit["normal_images"] == fit["images"] >= 2
    ids, images = _test_images(uri, "brick")
    for version, metrics in versions.values():
        predictor, _ = registry.load_predictor("brick", version)
        scores = predictor.predict_tensor(images.float() / 255.0).anomaly_score.numpy()
        expected = np.array([metrics["test_scores"][i] for i in ids])
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
        calibration = predictor.calibration
        assert calibration.n_normal == metrics["holdout_images"] >= 3  # 1 / (n + 1) <= 0.3 needs 3 or more
        assert calibration.quantile == pytest.approx(quantile_for_false_positive_rate(calibration.n_normal, 0.3))
        assert calibration.quantile < 0.99 and calibration.false_positive_rate()[0] == pytest.approx(0.3)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("family", "cache_data"), [("patchcore", True), ("patchcore", False), ("tsdn", True), ("tsdn", False)]
)
def test_a_family_trains_when_a_worker_asks_for_every_cpu_of_the_cluster(ingested, family, cache_data):
    """The `cpu` preset's ``cpus_per_worker: 2`` on a 2-core machine, with ``families: [tsdn, patchcore]``, hung
    for ever: PatchCore's embedding actor took every CPU, and the Ray Data tasks that fed it (a column selection,
    and the reads when the data are not cached) waited for one. The actors now leave them a CPU, and cached rows
    reach the actors without a task. TSDN's Ray Train worker reading data that are not cached hung the same way
    (its reads wait for a CPU); it now leaves them one too."""
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    cfg = _config(
        ingested,
        f"families={family}",
        "epochs=1",
        f"cpus_per_worker={cpus}",
        "num_workers=1",
        f"cache_data={str(cache_data).lower()}",
        f"run_name=allcpus-{family}-{cache_data}",
        "promote=never",
    )
    result = run_training(cfg)[PRODUCTS[0]]
    assert result.ok, result.error
    assert result.family == family and result.test["image_auroc"] is not None


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_lines_that_read_as_they_train_leave_the_reads_a_cpu_between_them(ingested):
    """Two lines of ``cpus_per_worker: 2`` on the 4-CPU test cluster with ``cache_data: false``: both trainers
    started, held every CPU between them, and each waited for ever for the reads of its rows. Now one trains at a
    time (``concurrent_products``), and both finish."""
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    cfg = dataclasses.replace(
        _config(ingested, "epochs=1", f"cpus_per_worker={cpus // 2}", "cache_data=false", "run_name=two-uncached"),
        products=list(PRODUCTS),
        promote="never",
    )
    results = run_training(cfg)
    assert set(results) == set(PRODUCTS)
    for product, result in results.items():
        assert result.ok, f"{product}: {result.error}"
        assert result.test["image_auroc"] is not None


def _file_order(uri: str, split: str) -> list[str]:
    """The image ids of the line's ``split`` as the store holds them: the manifest's files, each file's rows."""
    import pyarrow.parquet as pq

    from tsdn_platform.shards import committed_files

    ids = []
    for file_uri in committed_files(uri, "files", "brick", split):
        fs, path = store.resolve(file_uri)
        ids += pq.read_table(path, filesystem=fs, columns=["image_id"]).column("image_id").to_pylist()
    return ids


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("cache_data", [True, False])
def test_a_line_in_several_files_reaches_training_in_the_store_order(ingested_in_files, cache_data):
    """The rows came in the order Ray Data's reads finished in, so a line stored in several files trained on
    batches the scheduling chose, not its seed alone. Now in the store's order, cached or streamed."""
    from tsdn_platform.shards import read_split
    from tsdn_platform.train import data_config, load_datasets

    cfg = dataclasses.replace(_config(ingested_in_files, f"cache_data={str(cache_data).lower()}"), dataset="files")
    assert cfg.preserve_order
    train_order, test_order = _file_order(ingested_in_files, "train"), _file_order(ingested_in_files, "test")
    assert len(train_order) == 40 and len(test_order) == 11
    datasets = load_datasets(cfg, "brick")
    test_ids = [str(i) for batch in datasets["test"].iter_batches(batch_format="numpy") for i in batch["image_id"]]
    assert test_ids == test_order
    # The train rows carry no id: their images against an ordered read of the same files, the held-out folds left out.
    columns = ["image_id", "image", "fold"]
    ordered = read_split(ingested_in_files, "files", "brick", "train", columns=columns, image_dtype="uint8")
    ordered.context.execution_options.preserve_order = True
    rows = ordered.take_all()
    assert [str(r["image_id"]) for r in rows] == train_order
    expected = np.stack([r["image"] for r in rows if r["fold"] not in cfg.holdout_folds])
    got = np.concatenate([b["image"] for b in datasets["train"].iter_batches(batch_format="numpy")])
    np.testing.assert_array_equal(got, expected)
    # What a Train worker receives: the trainer's own DataConfig, configured as Ray Train does for one worker.
    (shard,) = data_config(cfg).configure(datasets, world_size=1, worker_handles=None, worker_node_ids=None)
    got = np.concatenate([b["image"] for b in shard["train"].iter_batches(batch_format="numpy")])
    np.testing.assert_array_equal(got, expected)
    # Two workers (DDP, the `tiny` preset's): each one's rows in the store's order, the same rows on every run, and
    # between them every row once (an equal split may leave out fewer rows than there are workers).
    position = {image.tobytes(): i for i, image in enumerate(expected)}
    assert len(position) == len(expected)
    first, again = (_worker_positions(data_config(cfg), datasets, position, 2) for _ in range(2))
    assert first == again
    assert all(rows == sorted(rows) for rows in first), first
    assert len(first[0]) == len(first[1])
    seen = [i for rows in first for i in rows]
    assert len(set(seen)) == len(seen) and len(expected) - len(seen) < 2


def _worker_positions(config: Any, datasets: dict[str, Any], position: dict[bytes, int], n: int) -> list[list[int]]:
    """The positions (in ``position``, keyed by image bytes) of the train rows each of ``n`` Train workers receives
    through ``config``, read side by side as the workers do (a streaming split feeds them together)."""
    from concurrent.futures import ThreadPoolExecutor

    shards = config.configure(datasets, world_size=n, worker_handles=None, worker_node_ids=None)

    def read(shard: dict[str, Any]) -> list[int]:
        batches = shard["train"].iter_batches(batch_format="numpy")
        return [position[image.tobytes()] for batch in batches for image in batch["image"]]

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(read, shards))


def test_config_products_validation_and_run_name(monkeypatch):
    cfg = _config("/tmp/store")
    assert cfg.products == ["brick"]
    assert load_config(TrainConfig, "tiny", [], explicit={"store": "s", "dataset": "d"}).products == "all"
    same = dataclasses.replace(cfg, products=["grass"], max_failures=0, promote="always")
    assert same.run_id("sha256:x") == cfg.run_id("sha256:x")  # re-running the same command resumes
    assert dataclasses.replace(cfg, epochs=5).run_id("sha256:x") != cfg.run_id("sha256:x")
    assert cfg.run_id("sha256:y") != cfg.run_id("sha256:x")  # new data, new run
    assert dataclasses.replace(cfg, run_name="mine").run_id("sha256:x") == "mine"
    for override, field_name in (
        ("batch_size=1", "batch_size"),
        ("shuffle_buffer_size=-1", "shuffle_buffer_size"),
    ):
        with pytest.raises(ConfigError, match=field_name):
            _config("/tmp/store", override)
    # The failure injection is a test hook, not a config field: the old key is unknown like any other.
    with pytest.raises(ConfigError, match=r"unknown config key\(s\).*inject_failure_at_epoch"):
        _config("/tmp/store", "inject_failure_at_epoch=2")
    assert injected_failure_epoch(3) is None
    for value, ok in (("2", True), ("3", True), ("1", False), ("4", False), ("two", False), ("-2", False)):
        monkeypatch.setenv(FAIL_AT_EPOCH_ENV, value)
        if ok:
            assert injected_failure_epoch(3) == int(value)
        else:
            with pytest.raises(ConfigError, match=rf"{FAIL_AT_EPOCH_ENV}: expected an epoch 2\.\.epochs \(3\), got"):
                injected_failure_epoch(3)
    monkeypatch.delenv(FAIL_AT_EPOCH_ENV)
    with pytest.raises(ValueError, match="expected 1-64"):
        _config("/tmp/store", "products=[../x]")
    with pytest.raises(ConfigError, match=r"image_size=64 but .* ingested with 128"):
        check_manifest(cfg, "brick", {"image_size": 128, "slic": {"n_segments": 50, "compactness": 10.0}})
    check_manifest(cfg, "brick", {"image_size": 64, "slic": {"n_segments": 50, "compactness": 10.0}})


@pytest.mark.integration
def test_preflight_reports_every_problem_before_ray_starts(ingested):
    assert preflight(_config(ingested)) == [PRODUCTS[0]]
    everything = dataclasses.replace(_config(ingested), products="all")
    assert preflight(everything) == sorted(PRODUCTS)
    # Two products not ingested and, for the one that is, every mismatch of both families: one error, all named.
    cfg = _config(ingested, "model.image_size=128", "model.n_segments=60", "patchcore.image_size=96")
    cfg = dataclasses.replace(cfg, products=[PRODUCTS[0], "widget", "gadget"], families=["tsdn", "patchcore"])
    with pytest.raises(ConfigError) as caught:
        preflight(cfg)
    message = str(caught.value)
    for part in (
        "'widget' is not ingested",
        "'gadget' is not ingested",
        "model.image_size=128",
        "model.n_segments=60",
        "patchcore.image_size=96",
    ):
        assert part in message
    with pytest.raises(ConfigError, match="no ingested products"):
        preflight(dataclasses.replace(_config(ingested), dataset="nosuch", products="all"))


@pytest.fixture
def tiny_model():
    from tsdn.model import TSDN

    torch.manual_seed(0)
    return TSDN(_config("/tmp/store").model)


def _batch(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.repeat(rng.integers(0, 16, (n, 8, 8)), 8, axis=1), 8, axis=2)  # 16 blocky superpixels
    return {"image": rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8), "superpixels": labels.astype(np.int32)}


def _predictor(model):
    from tsdn.predict import Predictor

    return Predictor(model, calibration=None, device="cpu", batch_size=4)


def test_holdout_validation_is_repeatable_and_bounded(tiny_model):
    batches = [_batch(3, 0), _batch(2, 1)]
    held = validate_holdout(_predictor(tiny_model), batches, seed=0)
    again = validate_holdout(_predictor(tiny_model), batches, seed=0)
    first, clean = held.metrics, held.normal_scores
    assert first == again.metrics and np.array_equal(clean, again.normal_scores)  # the same defects every epoch
    assert set(first) == {"val_image_auroc", "val_pixel_auroc"}
    assert all(0 <= v <= 1 for v in first.values()) and clean.shape == (5,)
    np.testing.assert_allclose(held.normal_map_maxima, clean, rtol=1e-6)  # this model's score is its map's maximum
    # Every validation image's score, clean and with its defect: the metric is theirs, and families compare on them.
    assert held.labels.tolist() == [0] * 5 + [1] * 5 and np.array_equal(held.scores[held.labels == 0], clean)
    assert first["val_image_auroc"] == image_auroc(held.labels, held.scores)
    assert held.image_scores() == {"labels": held.labels.tolist(), "scores": held.scores.tolist()}
    other = validate_holdout(_predictor(tiny_model), batches, seed=1).metrics
    assert other != first  # another seed draws other defects
    with pytest.raises(ValueError, match="held-out split is empty"):
        validate_holdout(_predictor(tiny_model), [], seed=0)


def test_holdout_validation_scores_clean_images_like_the_predictor(tiny_model):
    """The clean scores that calibrate are the serving predictor's scores of the held-out images."""
    batches = [_batch(3, 0)]
    clean = validate_holdout(_predictor(tiny_model), batches, seed=0).normal_scores
    images = torch.from_numpy(batches[0]["image"]).float() / 255.0
    expected = _predictor(tiny_model).predict_tensor(images).anomaly_score.numpy()
    np.testing.assert_allclose(clean, expected, rtol=1e-5)


def test_test_split_validation_matches_the_model(tiny_model):
    batch = _batch(4, 2)
    masks = np.zeros((4, 1, 64, 64), np.float32)
    masks[2:, :, 8:24, 8:24] = 1.0
    batch.update(mask=masks, label=np.array([0, 0, 1, 1]), image_id=np.array(["a", "b", "c", "d"]))
    metrics, scores, labels, maxima = validate_test(_predictor(tiny_model), [batch])
    with torch.inference_mode():
        expected = tiny_model.predict(torch.from_numpy(batch["image"]).float() / 255.0).anomaly_score.numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    np.testing.assert_allclose(maxima, expected, rtol=1e-6)
    assert labels.tolist() == [0, 0, 1, 1] and 0 <= metrics["val_image_auroc"] <= 1


def test_checkpoint_round_trip_restores_weights_adam_and_state(tiny_model):
    from tsdn.losses import TSDNLoss
    from tsdn.scoring import fit_calibration

    cfg = _config("/tmp/store").model
    optimizer = torch.optim.Adam(tiny_model.parameters(), lr=cfg.lr)
    images = torch.rand(2, 3, 64, 64)
    total, _ = TSDNLoss(cfg)(tiny_model.train()(images), images, torch.zeros(2, 1, 64, 64))
    total.backward()
    optimizer.step()
    state = {"epoch": 3, "history": [{"epoch": 3, "loss": 0.5}]}
    files = state_files(tiny_model, optimizer, fit_calibration(np.array([0.1, 0.2, 0.3])), state)
    model, restored, optimizer_state = load_state(files, torch.device("cpu"))
    assert restored == state and model.training
    for (name, a), b in zip(tiny_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    again = torch.optim.Adam(model.parameters(), lr=1.0)
    again.load_state_dict(optimizer_state)
    assert again.param_groups[0]["lr"] == cfg.lr
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, again.state_dict()["state"][index][key]), (index, key)


@pytest.mark.integration
@pytest.mark.slow
def test_tsdn_train_prints_one_progress_line_per_epoch(ray_local, tmp_path):
    """The per-epoch line (losses, validation metrics, images/s) reaches the driver's output exactly once."""
    import os
    import re
    import subprocess
    import sys

    from tsdn_platform.demo_data import make_demo_dataset
    from tsdn_platform.ingest import IngestConfig, run_ingest

    root = tmp_path / "mvtec"
    make_demo_dataset(root, seed=1, image_size=64, n_train=8, n_test_good=2, n_defects_per_type=1, products=["brick"])
    uri = str(tmp_path / "store")
    run_ingest(IngestConfig(source=str(root), store=uri, dataset="demo", image_size=64, n_segments=50))
    command = [sys.executable, "-m", "tsdn_platform.cli", "train", "--store", uri, "--dataset", "demo"]
    command += ["--config", "tiny", "--set", "epochs=2", "--set", "num_workers=1"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    output = out.stdout + out.stderr
    lines = re.findall(r"\[brick\] epoch (\d)/2 loss=\S+ .*val_pixel_auroc=\S+ [\d.]+ images/s", output)
    assert lines == ["1", "2"], output
