"""Distributed TSDN training on Ray Train: one ``TorchTrainer`` per product line, then the registry.

``tsdn train --store S --dataset D [--products a,b|all] [--config FILE] [--set key=value ...]``

Per product line (each launched from its own zero-CPU Ray task, so the cluster's resources decide how many
train at once: a trainer whose workers do not fit waits, and Ray Train retries its start until they do; a local
cluster gets no more lines than its CPUs hold, and with ``cache_data: false`` the lines running at once leave the
reads that feed them a CPU, :func:`concurrent_products`):

1. The ingested shards (``tsdn_platform.shards.read_split``) are split: ``validation: holdout`` trains on the
   train rows whose ``fold`` is not in ``holdout_folds`` and validates on the rest; ``validation: test``
   trains on every train row and validates on the labelled test split (the paper's protocol).
2. With ``encoder_norm: adapted`` a new run first re-estimates the frozen encoder's BatchNorm statistics on the
   train split (every rank sums its shard, the sums are all-reduced). Every worker streams its shard with
   ``iter_torch_batches``, SURF-fills the batch on its own device from
   the precomputed superpixels, and steps Adam on the DDP-wrapped model (``prepare_model``); bf16 autocast
   and channels_last on GPU. Each epoch reports every loss term (mean over all workers) and images/s.
3. Every ``checkpoint_every`` epochs (with ``feature_distance: mahalanobis`` or ``score_normalization: pixel``,
   after every rank has added its train shard's sums to the model's normal statistics) rank 0 validates, fits
   the calibration on held-out normal images, and reports a checkpoint (weights + ``model.json`` via
   :mod:`tsdn.checkpoint`, Adam state, history) to ``<store>/runs/<product>/<run>`` (uploaded through the store,
   so an outage is waited out for ``store_retry_s``); ``CheckpointConfig`` keeps the best ``keep_checkpoints`` by
   ``checkpoint_metric``. ``FailureConfig(max_failures)`` restarts dead workers from the latest checkpoint.
   The run name is a hash of the config and the dataset manifest, so the same command resumes.
4. After the last epoch rank 0 evaluates the best checkpoint on the test split (image/pixel AUROC, AUPRO,
   F1-max) with the serving predictor, ``metrics.json`` lands next to the run, and the version is
   registered (:class:`tsdn_platform.registry.Registry`) and promoted per ``promote``.

Holdout validation never touches the test split: held-out ``train/good`` images get one synthetic defect each
(:func:`tsdn.defects.validation_set`: drawn scratches, stains, holes, cracks, colour spots and cut-paste patches,
not SURF's own distortion) with a fixed seed (the same set every epoch and for every version, so they compare);
pixel AUROC is measured on the defective and clean copies together and image AUROC between them. Checkpoint
selection, the calibrated threshold and the default promotion metric all come from it.

This module is the worker loop, the trainer and the driver; the config and per-product result are in
:mod:`tsdn_platform.train_config`, the checkpoint files in :mod:`tsdn_platform.train_checkpoints`, validation and
the test evaluation in :mod:`tsdn_platform.train_eval` (their public names are re-exported here).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tsdn.calibration import quantile_false_positive_rate
from tsdn.checkpoint import MODEL_JSON, MODEL_WEIGHTS
from tsdn.config_io import ConfigError, from_dict, to_dict
from tsdn.resize import input_shape
from tsdn_platform import layout, shards, store, train_checkpoints, train_eval
from tsdn_platform.cli import exit_status
from tsdn_platform.config import config_to_yaml, load_config
from tsdn_platform.names import validate_name
from tsdn_platform.registry import Registry
from tsdn_platform.train_config import (
    FAMILIES,
    ProductResult,
    TrainConfig,
    format_reused,
    format_selections,
    ranked_families,
    selection_line,
)
from tsdn_platform.train_eval import validate_holdout, validate_test

__all__ = [
    "FAIL_AT_EPOCH_ENV",
    "FAMILIES",
    "ProductResult",
    "TrainConfig",
    "build_trainer",
    "injected_failure_epoch",
    "load_datasets",
    "main",
    "run_product",
    "run_training",
    "train_loop_per_worker",
    "validate_holdout",
    "validate_test",
]

logger = logging.getLogger(__name__)

LOSS_TERMS = ("l2", "ssim", "gms", "mask", "fne")
TRAIN_COLUMNS = ("image", "superpixels")
TEST_COLUMNS = ("image", "mask", "label", "image_id")
_FLOAT_METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
# Test-only hook, never a config field: in an attempt that started from scratch, the last rank's process exits
# abruptly at the start of this (1-based, >= 2) epoch, after the previous checkpoint is safe. Set in the driver's
# environment; the driver hands it to each product line's task, whose Train controller and workers inherit it.
FAIL_AT_EPOCH_ENV = "TSDN_TEST_FAIL_AT_EPOCH"
#: Below this many held-out normal images the validation's ranking and the calibrated threshold (a high quantile
#: of their scores) are rough, and training says so. The demo lines hold out 10-12 of 40: their thresholds let
#: about 10 % of unseen good images through (``tsdn.calibration.quantile_false_positive_rate``; BENCHMARKS.md).
SMALL_HOLDOUT = 10
#: Seconds between two looks at the cluster while product lines train or wait for :func:`concurrent_products`.
CLUSTER_POLL_S = 30.0
# Resamples of the held-out validation images behind a family choice's interval (tsdn.metrics.paired_auroc_gap).
SELECTION_DRAWS = 2000


def injected_failure_epoch(epochs: int) -> int | None:
    """The epoch :data:`FAIL_AT_EPOCH_ENV` asks a worker to die at, or None; ``ConfigError`` unless 2..epochs."""
    raw = os.environ.get(FAIL_AT_EPOCH_ENV, "").strip()
    if not raw:
        return None
    epoch = int(raw) if raw.isdigit() else 0
    if not 2 <= epoch <= epochs:
        msg = f"{FAIL_AT_EPOCH_ENV}: expected an epoch 2..epochs ({epochs}), got {raw!r}"
        raise ConfigError(msg)
    return epoch


# --- data --------------------------------------------------------------------------------------------


def discover_products(cfg: TrainConfig) -> list[str]:
    """``cfg.products`` as a list; ``"all"`` = every product the dataset's index lists that has a manifest."""
    if isinstance(cfg.products, list):
        return list(cfg.products)
    products = shards.ingested_products(cfg.store, cfg.dataset)
    if not products:
        root = layout.dataset_uri(cfg.store, cfg.dataset)
        msg = f"{root}: no ingested products (no <product>/manifest.json); run `tsdn ingest` first"
        raise ConfigError(msg)
    return products


def _manifest(cfg: TrainConfig, product: str) -> tuple[dict[str, Any], str]:
    """The product's manifest and its content hash (what the run name and the registry record)."""
    manifest = shards.read_manifest(cfg.store, cfg.dataset, product)
    digest = manifest.get("content_hash") or hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return manifest, str(digest)


# --- the worker loop ---------------------------------------------------------------------------------


def _reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all workers (identity with one worker)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train worker function. Rank 0 returns the final summary; other ranks return None.

    Every store access of the worker (checkpoint reads and uploads) waits out an outage for ``store_retry_s``.
    """
    cfg = from_dict(TrainConfig, loop_config["cfg"])
    with store.retry_budget(cfg.store_retry_s):
        return _train_loop(cfg, loop_config["product"], loop_config["run_name"])


def _train_loop(cfg: TrainConfig, product: str, run_name: str) -> dict[str, Any] | None:
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    from tsdn.losses import TSDNLoss
    from tsdn.model import TSDN
    from tsdn.predict import Predictor
    from tsdn.training import build_optimizer, set_epoch_lr, train_step

    run_uri = layout.run_uri(cfg.store, product, run_name)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed)

    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    checkpoint = ray.train.get_checkpoint()
    optimizer_state = None
    if checkpoint is not None:
        files = train_checkpoints.read_reported(run_uri, checkpoint, train_checkpoints.RESUME_FILES)
        model, state, optimizer_state = train_checkpoints.load_state(files, device)
        model.cfg = cfg.model  # loading reset the weights spec to "none"; later checkpoints record the run's own
        start_epoch, history = state["epoch"], state["history"]
    else:
        model = TSDN(cfg.model, opener=store.read_bytes).to(device)
        start_epoch, history = 0, []
        if cfg.model.encoder_norm == "adapted":
            # The frozen encoder's BatchNorm statistics from this line's training images, before the first step
            # (a resumed run loads them with the weights): every rank reads its shard once, the sums are added.
            train_images = train_eval.shard_images(shard, cfg.eval_batch_size, device)
            model.set_encoder_norm(_reduce_sum(model.encoder_norm_sums(train_images)))
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.model)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    # During a DCD_A warm-up the FNE takes no part in the loss: DDP must not wait for its gradients.
    ddp_kwargs = {"find_unused_parameters": True} if cfg.model.mask_warmup_epochs > 0 else None
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
    loss_fn = TSDNLoss(cfg.model)
    calibration = None
    fail_at_epoch = injected_failure_epoch(cfg.epochs)

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        if fail_at_epoch == epoch and start_epoch == 0 and rank == world - 1:
            ray.train.get_all_reported_checkpoints()  # the previous checkpoint is registered before we die
            print(f"[{product}] injected failure: rank {rank} exits at the start of epoch {epoch}", flush=True)
            os._exit(1)
        ddp_model.train()
        set_epoch_lr(optimizer, cfg.model, epoch, cfg.epochs)
        epoch_seed = cfg.seed * 1_000_003 + epoch * 1_009 + rank  # SURF draws and the shuffle, per epoch and rank
        generator = torch.Generator(device=device).manual_seed(epoch_seed)
        sums = torch.zeros(1 + len(LOSS_TERMS) + 1, device=device)  # images, each term, total (sums over images)
        started = time.perf_counter()
        batches = shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            device=device,
            drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer_size or None,
            local_shuffle_seed=epoch_seed if cfg.shuffle_buffer_size else None,
        )
        for batch in batches:
            images = train_eval.as_images(batch["image"])
            labels = batch["superpixels"]  # int32 SLIC labels 0..K-1 at the training resolution, from ingest
            total, terms = train_step(
                ddp_model,
                loss_fn,
                optimizer,
                images,
                labels,
                cfg.model,
                generator,
                epoch,
                autocast=on_gpu,
                channels_last=on_gpu,
            )
            n = images.shape[0]
            sums += torch.stack([sums.new_tensor(float(n)), *(terms[t] * n for t in LOSS_TERMS), total * n])
        sums = _reduce_sum(sums).cpu()
        elapsed = time.perf_counter() - started
        n_images = float(sums[0])
        if n_images == 0:
            msg = f"{product}: epoch {epoch} had no full batch of {cfg.batch_size} on rank {rank}"
            raise RuntimeError(msg)
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "loss": float(sums[-1]) / n_images,
            **{f"loss_{t}": float(sums[1 + i]) / n_images for i, t in enumerate(LOSS_TERMS)},
            "images_per_s": n_images / elapsed,
            "epoch_s": elapsed,
        }
        checkpoint_now = epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs
        if checkpoint_now and model.normal_fit_steps:
            # Every rank reads its own train shard once per step (a streaming split: all of them iterate
            # together); the sums are added over the ranks, so every rank's statistics cover the whole train
            # split. The whitening comes first: the per-position statistics are of the whitened map.
            model.eval()
            for step in model.normal_fit_steps:
                # The held-out split is whole on every rank (only train is split): rank 0 reads it, the others add
                # zeros, so it is read once and every rank chooses the same blend (and mirrors) from the same sums.
                held_images = train_eval.shard_images(val_shard, cfg.eval_batch_size, device) if rank == 0 else ()
                if step == "flips":  # test_flips auto: chosen on the held-out normals alone
                    model.set_normal_stats(_reduce_sum(model.normal_stat_sums(held_images, step)), step)
                    continue
                train_images = train_eval.shard_images(shard, cfg.eval_batch_size, device)
                held = None
                if step == "whitening" and model.chooses_position_blend:
                    held = _reduce_sum(model.normal_stat_sums(held_images, step))
                model.set_normal_stats(_reduce_sum(model.normal_stat_sums(train_images, step)), step, held)
            if model.position_blends:
                strides = model.encoder.feature_info.reduction()
                for stage, blend in zip(model.feature_stages, model.position_blends, strict=True):
                    metrics[f"whitening_blend_s{strides[stage]}"] = blend
            if model.flip_fractions:
                metrics["test_flips"] = model.test_flips
        if checkpoint_now and rank == 0:
            predictor = Predictor(model, calibration=None, device=device, batch_size=cfg.eval_batch_size)
            val, calibration, val_image_scores = train_eval.validate_and_calibrate(
                predictor,
                train_eval.shard_batches(val_shard, cfg.eval_batch_size),
                cfg.validation,
                cfg.validation_seed,
                cfg.target_false_positive_rate,
            )
            metrics.update(val)
        if rank == 0:
            history.append(metrics)
            shown_keys = ("loss", "val_", "whitening_", "test_flips")
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith(shown_keys))
            # A logger, not print: Ray Train patches print in its workers to log *and* echo to Ray's redirected
            # stdout, so every printed line reached the driver twice.
            logger.info("[%s] epoch %d/%d %s %.1f images/s", product, epoch, cfg.epochs, shown, metrics["images_per_s"])
        if checkpoint_now and rank == 0:
            # The validation's per-image scores travel with the checkpoint: the one kept is compared with the other
            # families' versions on the same images (run_product's selection).
            state = {
                "epoch": epoch,
                "history": history,
                "product": product,
                "run": run_name,
                "val_image_scores": val_image_scores,
            }
            dir_name = train_checkpoints.dir_name(epoch)
            files = train_checkpoints.state_files(model, optimizer, calibration, state)
            ray.train.report(
                metrics,
                checkpoint=train_checkpoints.upload(run_uri, dir_name, files),
                checkpoint_dir_name=dir_name,
                checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
            )
        else:
            ray.train.report(metrics)

    if rank != 0:
        return None
    return train_eval.final_evaluation(cfg, product, run_uri, start_epoch, history, Predictor)


# --- one product line (driver side, inside a Ray task) -----------------------------------------------


def manifest_problems(cfg: TrainConfig, product: str, manifest: Mapping[str, Any], family: str = "tsdn") -> list[str]:
    """Why the shards were not made for this model: input size (and, for TSDN, the SLIC settings) differ."""
    slic = manifest.get("slic", {})
    size = cfg.model.image_size if family == "tsdn" else cfg.patchcore.image_size
    section = "model" if family == "tsdn" else "patchcore"
    pairs = [("image_size", manifest.get("image_size"), size)]
    if family == "tsdn":
        pairs += [
            ("n_segments", slic.get("n_segments"), cfg.model.n_segments),
            ("slic_compactness", slic.get("compactness"), cfg.model.slic_compactness),
        ]
    return [
        f"{product}: {section}.{name}={configured} but dataset {cfg.dataset!r} was ingested with {ingested}; "
        f"train with --set {section}.{name}={ingested} or re-ingest"
        for name, ingested, configured in pairs
        if ingested is not None and not _same_setting(ingested, configured)
    ]


def _same_setting(ingested: Any, configured: Any) -> bool:
    """A manifest's value (from JSON: a list for an [H, W] size) against the config's (a tuple; an int for S)."""
    if isinstance(ingested, list) or isinstance(configured, tuple):
        try:
            return input_shape(ingested) == input_shape(configured)
        except ValueError:
            return False
    return float(ingested) == float(configured)


def check_manifest(cfg: TrainConfig, product: str, manifest: Mapping[str, Any], family: str = "tsdn") -> None:
    """The shards were made for this model; raises ``ConfigError`` naming every mismatch."""
    problems = manifest_problems(cfg, product, manifest, family)
    if problems:
        raise ConfigError("; ".join(problems))


def preflight(cfg: TrainConfig) -> list[str]:
    """The product lines to train, checked before Ray starts: every one ingested and matching the config.

    Every problem of every product and family is reported at once (one ``ConfigError``), so a user fixes a
    submission in one round instead of one mismatch per run.
    """
    products = discover_products(cfg)
    problems = []
    for product in products:
        try:
            validate_name(product)
            manifest, _ = _manifest(cfg, product)
        except ValueError as exc:  # ConfigError is a ValueError
            problems.append(str(exc))
            continue
        for family in cfg.families:
            problems.extend(manifest_problems(cfg, product, manifest, family))
    if problems:
        raise ConfigError("; ".join(dict.fromkeys(problems)))
    return products


def load_datasets(cfg: TrainConfig, product: str) -> dict[str, Any]:
    """``{"train", "val", "test"}`` Ray Datasets of one product line (see the module docstring)."""
    from ray.data.expressions import col

    train_all = shards.read_split(
        cfg.store, cfg.dataset, product, "train", columns=[*TRAIN_COLUMNS, "fold"], image_dtype="uint8"
    )
    # The test split stays float32: these are exactly the pixels the Predictor feeds the model when the score job
    # scores the same images (uint8 would round them), so the two jobs report the same test metrics.
    test = shards.read_split(cfg.store, cfg.dataset, product, "test", columns=list(TEST_COLUMNS), image_dtype="float32")
    if cfg.validation == "holdout":
        held_out = col("fold").is_in(list(cfg.holdout_folds))
        train = train_all.filter(expr=~held_out).select_columns(list(TRAIN_COLUMNS))
        val = train_all.filter(expr=held_out).select_columns(list(TRAIN_COLUMNS))
    else:
        train, val = train_all.select_columns(list(TRAIN_COLUMNS)), test
    datasets = {"train": train, "val": val, "test": test}
    for ds in datasets.values():
        # With preserve_order the rows come in the store's order, not in the order the reads finish in: the
        # batches, SURF's fills and PatchCore's patch sample then follow the seed, not the scheduling.
        ds.context.execution_options.preserve_order = cfg.preserve_order
    if cfg.cache_data:
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    return datasets


def build_trainer(cfg: TrainConfig, product: str, run_name: str, runs_uri: str, datasets: Mapping[str, Any]) -> Any:
    """The product line's ``TorchTrainer``: scaling, storage, checkpoint and failure policy from ``cfg``.

    The run lives at ``<runs_uri>/<run_name>`` on the store's filesystem (S3 with any endpoint works, since
    the filesystem comes from :func:`tsdn_platform.store.resolve`).
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tsdn_platform.ray_session import verbose, worker_cpus

    fs, runs_path = store.resolve(runs_uri)
    cpus = cfg.cpus_per_worker
    if not cfg.cache_data:  # the workers' rows are read while they train: those reads need a CPU of their own
        cpus = worker_cpus(cpus, cfg.num_workers, ray.cluster_resources().get("CPU", 0.0))
    resources = {
        "CPU": cpus,
        **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {}),
        **cfg.resources_per_worker,
    }
    resolved = dataclasses.replace(cfg, products=[product], run_name=run_name)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(resolved), "product": product, "run_name": run_name},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=runs_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(
                max_failures=cfg.max_failures, controller_failure_limit=cfg.max_start_failures
            ),
            # Ray Train's own INFO lines (every report, every checkpoint) only under --verbose; the loop's
            # per-epoch line is the platform's and always shows.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute=cfg.checkpoint_metric,
                checkpoint_score_order="max",
            ),
        ),
        datasets=dict(datasets),
        dataset_config=data_config(cfg),
    )


def data_config(cfg: TrainConfig) -> Any:
    """The trainer's ``DataConfig``: ``train`` split among the workers, ``val`` and ``test`` whole on each, with Ray
    Train's default ingest options (it reads them from the current ``DataContext``, not from the datasets) and
    ``cfg.preserve_order``. With it the workers get the rows in the order :func:`load_datasets` gives them, each
    block going to the worker with the fewest rows so far (Ray then ignores the locality hints), so every worker
    sees the same batches on every run of the same seed."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = cfg.preserve_order
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options=options)


def check_holdout(
    product: str, n_holdout: int | None, folds: Sequence[int], target_false_positive_rate: float | None = None
) -> None:
    """Refuse, before any training, a ``validation: holdout`` run whose held-out split is empty (``n_holdout`` 0)
    or too small for ``target_false_positive_rate``: its validation, calibration and promotion would fail only
    after every epoch had been paid for."""
    if n_holdout == 0:
        msg = (
            f"{product}: no train image falls in holdout_folds {list(folds)}, so there is nothing to validate or "
            "calibrate on; hold out more folds (e.g. --set holdout_folds=[0,1,2]) or ingest more train images"
        )
        raise ConfigError(msg)
    if n_holdout is not None and target_false_positive_rate is not None:
        try:
            train_eval.threshold_quantile(n_holdout, target_false_positive_rate)
        except ValueError as exc:
            msg = (
                f"{product}: target_false_positive_rate {target_false_positive_rate:g}: {exc} (holdout_folds "
                f"{list(folds)} hold {n_holdout}); hold out more folds, ingest more train images or raise the target"
            )
            raise ConfigError(msg) from None


def small_holdout_warning(
    product: str, n_holdout: int | None, folds: Sequence[int], target_false_positive_rate: float | None = None
) -> str | None:
    """What training says when the held-out split (``n_holdout`` images; None = ``validation: test``) is below
    :data:`SMALL_HOLDOUT`; None when it is not."""
    if n_holdout is None or n_holdout >= SMALL_HOLDOUT:
        return None
    quantile = train_eval.threshold_quantile(n_holdout, target_false_positive_rate)
    expected, bound = quantile_false_positive_rate(n_holdout, quantile)
    return (
        f"{product}: only {n_holdout} held-out normal image(s) (holdout_folds {list(folds)}): the validation "
        "metrics and the family it promotes are rough estimates, and the calibrated threshold (the "
        f"{100 * quantile:.3g} % quantile of their scores) lets through {100 * expected:.1f} % of good images "
        f"on average, up to {100 * bound:.1f} % (95 % bound); hold out more folds or ingest more train images"
    )


def run_product(cfg: TrainConfig, product: str) -> ProductResult:
    """Train, evaluate and register one product line in every configured family; raises on failure.

    Each family is trained (TSDN: a Ray Train run; PatchCore: :func:`tsdn_platform.fit_patchcore.fit_patchcore`)
    and validated on the same hold-out set; then the versions are registered in increasing order of
    ``promote_metric``, each recording the comparison (``selection``), so that ``promote: better`` leaves the
    best pointer on the winning family when it beats the current best. Returns the winner's result.
    """
    validate_name(product)
    manifest, manifest_hash = _manifest(cfg, product)
    for family in cfg.families:
        check_manifest(cfg, product, manifest, family)
    datasets = load_datasets(cfg, product)
    n_train = datasets["train"].count()
    if n_train // cfg.num_workers < cfg.batch_size and "tsdn" in cfg.families:
        msg = (
            f"{product}: {n_train} training images cannot give each of {cfg.num_workers} workers "
            f"a batch of {cfg.batch_size}; lower batch_size or num_workers"
        )
        raise ConfigError(msg)
    n_holdout = datasets["val"].count() if cfg.validation == "holdout" else None
    check_holdout(product, n_holdout, cfg.holdout_folds, cfg.target_false_positive_rate)
    warning = small_holdout_warning(product, n_holdout, cfg.holdout_folds, cfg.target_false_positive_rate)
    if warning:
        logger.warning("%s", warning)
    runs_uri = layout.run_uri(cfg.store, product)
    fitted = []
    for family in cfg.families:
        run_name = cfg.run_id(manifest_hash, family)
        run_uri = store.join(runs_uri, run_name)
        resolved = dataclasses.replace(cfg, products=[product], families=[family], run_name=run_name)
        store.replace_bytes(store.join(run_uri, "config.yaml"), config_to_yaml(resolved).encode())
        logger.info("%s: %s run %s (%d images) -> %s", product, family, run_name, n_train, run_uri)
        if family == "tsdn":
            summary = build_trainer(cfg, product, run_name, runs_uri, datasets).fit().return_value
        else:
            from tsdn_platform.fit_patchcore import fit_patchcore

            summary = fit_patchcore(cfg, product, run_name, datasets)
        if summary is None:
            msg = f"{product}: {family} training finished without a result from rank 0"
            raise RuntimeError(msg)
        record = {
            "family": family,
            "run_id": run_name,
            "run_uri": run_uri,
            "checkpoint": store.join(run_uri, summary["checkpoint_dir"]),
            "dataset": cfg.dataset,
            "dataset_manifest_hash": manifest_hash,
            "validation_protocol": cfg.validation,
            "holdout_images": n_holdout,  # held-out normal images (validation: holdout), each also with a defect
            "best_epoch": summary["best_epoch"],
            "val": summary["val"],
            "test": summary["test"],
            "history": summary["history"],
            "test_scores": summary["test_scores"],
            **({"fit": summary["fit"]} if "fit" in summary else {}),
        }
        fitted.append((family, record, summary))
    image_scores = {family: summary.get("val_image_scores") for family, _, summary in fitted}
    selection = _selection(cfg.promote_metric, [record for _, record, _ in fitted], image_scores, cfg.validation_seed)
    results = []
    for family, record, summary in sorted(fitted, key=lambda f: train_eval.metric_or_low(selection["values"], f[0])):
        record["selection"] = selection
        store.replace_json(store.join(record["run_uri"], "metrics.json"), record)
        version, promoted, reused = _register(cfg, product, record["checkpoint"], record)
        results.append(
            ProductResult(
                product=product,
                ok=True,
                family=family,
                run_name=record["run_id"],
                run_uri=record["run_uri"],
                version=version,
                promoted=promoted,
                reused=reused,
                best_epoch=summary["best_epoch"],
                resumed_from_epoch=summary["resumed_from_epoch"],
                val=summary["val"],
                test=summary["test"],
                history=summary["history"],
                test_scores=summary["test_scores"],
                selection=selection,
            )
        )
    if len(fitted) > 1:
        logger.info("%s", selection_line(product, selection))
    return next(r for r in results if r.family == selection["winner"])


def _selection(
    metric: str,
    records: Sequence[Mapping[str, Any]],
    image_scores: Mapping[str, Mapping[str, list] | None] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Which family's version is best on ``metric`` (a dotted key of the version records), and by how much.

    On the hold-out validation's image AUROC (the default ``promote_metric``), with each family's per-image scores
    (``image_scores``, on the same images), also how sure the lead is (``resampled``): its 2.5 % and 97.5 %
    quantiles over :data:`SELECTION_DRAWS` resamples of the validation images, and the share on which the
    runner-up is ahead. A few dozen held-out images can rank two good families either way (BENCHMARKS.md, "A line
    whose parts are not shot in one pose": the choice went to the family 0.03 worse on the test).
    """
    from tsdn.metrics import paired_auroc_gap
    from tsdn_platform.registry import DEFAULT_PROMOTE_METRIC, metric_value

    values = {r["family"]: metric_value(r, metric) for r in records}
    ranked = ranked_families(values)
    winner = ranked[0]
    margin = None
    if len(ranked) > 1 and values[winner] is not None and values[ranked[1]] is not None:
        margin = float(values[winner]) - float(values[ranked[1]])
    selection: dict[str, Any] = {"metric": metric, "values": values, "winner": winner, "margin": margin}
    if margin is None or metric != DEFAULT_PROMOTE_METRIC:
        return selection
    ours, theirs = ((image_scores or {}).get(family) for family in ranked[:2])
    if ours and theirs and ours["labels"] == theirs["labels"]:  # None: validated on the test split, or an old run
        labels, a, b = (np.asarray(v) for v in (ours["labels"], ours["scores"], theirs["scores"]))
        low, high, ahead = paired_auroc_gap(labels, a, b, draws=SELECTION_DRAWS, seed=seed)
        selection["resampled"] = {
            "images": len(labels),
            "draws": SELECTION_DRAWS,
            "low": low,
            "high": high,
            "runner_up_ahead": ahead,
        }
    return selection


def _register(cfg: TrainConfig, product: str, checkpoint_uri: str, record: dict[str, Any]) -> tuple[str, bool, bool]:
    """Register the best checkpoint once: a re-run of a finished run finds its version and reuses it. Returns the
    version, whether it is the line's best afterwards, and whether an earlier run had registered it."""

    registry = Registry(cfg.store)
    for version in reversed(registry.list_versions(product)):
        existing = registry.metrics(product, version)
        if existing.get("run_id") == record["run_id"] and existing.get("checkpoint") == record["checkpoint"]:
            logger.info("%s: run %s is already registered as version %s", product, record["run_id"], version)
            # The policy again: the run that registered it may have failed before its pointer update.
            return version, registry.apply_policy(product, version, cfg.promote, cfg.promote_metric), True
    files = {name: store.read_bytes(store.join(checkpoint_uri, name)) for name in (MODEL_WEIGHTS, MODEL_JSON)}
    version = registry.register(product, files, record, promote=cfg.promote, metric=cfg.promote_metric)
    best = registry.best(product)
    return version, bool(best and best["version"] == version), False


# --- all product lines -------------------------------------------------------------------------------


def _product_task(cfg_dict: dict[str, Any], product: str) -> ProductResult:
    cfg = from_dict(TrainConfig, cfg_dict)
    try:
        with store.retry_budget(cfg.store_retry_s):
            return run_product(cfg, product)
    except Exception as exc:
        failed = _failed(product, exc)
        # The traceback of an unexpected error is for the console; a mistake to fix or a store fault is the one line
        # the driver prints (its traceback only in the task's DEBUG log).
        log = logger.exception if failed.status == 1 else functools.partial(logger.debug, exc_info=True)
        log("%s: training failed", product)
        return failed


def _failed(product: str, exc: BaseException) -> ProductResult:
    """A product line's failure as one line and the exit status it calls for, told by its cause's type.

    An unexpected error keeps its type's name (``RuntimeError: ...``); a mistake to fix or a store fault is its
    message alone, without the product line's name the driver puts in front of it anyway."""
    cause = failure_cause(exc)
    status = exit_status(cause)
    text = str(cause).strip().splitlines()
    line = text[0] if text else type(cause).__name__
    if status == 1:
        return ProductResult(product=product, ok=False, status=status, error=f"{type(cause).__name__}: {line}")
    return ProductResult(product=product, ok=False, status=status, error=line.removeprefix(f"{product}: "))


def failure_cause(exc: BaseException) -> BaseException:
    """The store failure behind ``exc`` when there is one, else the first exception Ray wrapped in it.

    Ray Train wraps what failed: a worker's exception sits in ``WorkerGroupError.worker_failures``, the
    controller's in ``ControllerError.controller_failure``, a task's in ``RayTaskError.cause``. A transient
    ``OSError`` from pyarrow (Ray Train's own writes to the run folder) counts as a store failure too.
    """
    pending, seen = [exc], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, store.StoreError):
            return current
        if isinstance(current, OSError) and store.as_store_error("the run folder", current).transient:
            return store.as_store_error("the run folder", current)
        pending.extend(_wrapped(current))
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    while _wrapped(exc):
        exc = _wrapped(exc)[0]
    return exc


def _wrapped(exc: BaseException) -> list[BaseException]:
    """The exceptions a Ray error carries (a Train worker group's, its controller's, a task's)."""
    inner = [*getattr(exc, "worker_failures", {}).values()]
    inner += [getattr(exc, name, None) for name in ("controller_failure", "cause")]
    return [e for e in inner if isinstance(e, BaseException)]


def run_training(cfg: TrainConfig) -> dict[str, ProductResult]:
    """Train every product line of ``cfg``; each in its own zero-CPU Ray task so trainers queue on resources.

    One product's failure is recorded in its :class:`ProductResult` and does not stop the others. A store failure
    on the driver (listing and checking the dataset) outlasting ``cfg.store_retry_s`` raises ``StoreError``.
    """
    with store.retry_budget(cfg.store_retry_s):
        return _run_training(cfg)


def _run_training(cfg: TrainConfig) -> dict[str, ProductResult]:
    import ray

    from tsdn_platform.ray_session import init_ray, on_local_cluster

    products = preflight(cfg)
    fail_at_epoch = injected_failure_epoch(cfg.epochs)  # a bad test hook is refused before Ray starts
    init_ray()
    task = ray.remote(num_cpus=0, max_retries=0)(_product_task)
    # A cluster started earlier in this process does not see the test hook: the task's runtime_env carries it, and
    # Ray merges a parent's env_vars into the Train controller's and workers' own.
    hook = {} if fail_at_epoch is None else {"runtime_env": {"env_vars": {FAIL_AT_EPOCH_ENV: str(fail_at_epoch)}}}
    pending: dict[Any, str] = {}
    queue = list(products)
    results: dict[str, ProductResult] = {}
    cfg_dict = to_dict(cfg)
    while queue or pending:
        limit = concurrent_products(cfg, len(products), ray.cluster_resources().get("CPU", 0.0), on_local_cluster())
        while queue and len(pending) < limit:
            product = queue.pop(0)
            pending[task.options(name=f"train-{product}", **hook).remote(cfg_dict, product)] = product
        # Awake now and then: lines still queued see the CPUs an autoscaler added, and a signal (Ctrl-C, a test's
        # timeout) reaches Python, which a wait without a timeout blocks until a line finishes.
        done, _ = ray.wait(list(pending), num_returns=1, timeout=CLUSTER_POLL_S)
        for ref in done:
            product = pending.pop(ref)
            try:
                results[product] = ray.get(ref)
            except Exception as exc:  # the task itself died (e.g. its node was lost)
                results[product] = _failed(product, exc)
    return {product: results[product] for product in products}


def concurrent_products(cfg: TrainConfig, n_products: int, cluster_cpus: float, fixed: bool = False) -> int:
    """How many of ``n_products`` lines train at once on a cluster of ``cluster_cpus``; ``fixed``: a cluster that
    cannot grow (a local one). ``max_concurrent_products`` (0 = all of them), and:

    - with ``cache_data: false``, no more than leave the cluster a CPU for the reads that feed them: each line's
      workers read their rows while they train, and lines holding every CPU between them waited for ever (two
      lines of 2 CPUs per worker on 4 CPUs);
    - on a fixed cluster, no more than its CPUs hold: a line beyond them could only wait, its data loading stalled
      for CPUs and its cached rows held in the object store meanwhile. A cluster that may grow gets every line at
      once, so that their demand brings up nodes.

    One line always trains (:func:`build_trainer` leaves a lone line's reads a CPU)."""
    limit = cfg.max_concurrent_products or n_products
    footprint = cfg.num_workers * cfg.cpus_per_worker
    if footprint <= 0:
        return limit
    if not cfg.cache_data:
        return max(1, min(limit, int((cluster_cpus - 1) // footprint)))
    if fixed:
        return max(1, min(limit, int(cluster_cpus // footprint)))
    return limit


def format_table(results: Mapping[str, ProductResult]) -> str:
    """The per-product summary printed at the end of ``tsdn train``."""
    header = f"{'product':<16} {'status':<7} {'family':<9} {'best ep':>7} {'val pAUROC':>10} " + " ".join(
        f"{name:>11}" for name in _FLOAT_METRICS
    )
    lines = [header + f"  {'version':<26} promoted", "-" * (len(header) + 36)]
    for product, result in results.items():
        if not result.ok:
            lines.append(f"{product:<16} {'FAILED':<7} {result.error}")
            continue
        val = result.val.get("val_pixel_auroc")
        cells = " ".join(f"{_fmt(result.test.get(name)):>11}" for name in _FLOAT_METRICS)
        lines.append(
            f"{product:<16} {'ok':<7} {result.family:<9} {result.best_epoch!s:>7} {_fmt(val):>10} {cells}  "
            f"{result.version!s:<26} {'yes' if result.promoted else 'no'}"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main(args: argparse.Namespace) -> int:
    explicit = {
        "store": args.store,
        "dataset": args.dataset,
        "products": args.products,
        "families": args.families,
        "promote": args.promote,
    }
    cfg = load_config(TrainConfig, args.config, args.overrides, explicit=explicit)
    if args.address:
        from tsdn_platform.ray_session import init_ray

        init_ray(address=args.address)
    results = run_training(cfg)
    print("\n".join([format_table(results), *format_reused(results), *format_selections(results)]))
    failed = [r for r in results.values() if not r.ok]
    for result in failed:
        print(f"tsdn train: {result.product}: {result.error}", file=sys.stderr)
    # A failure that needs a person (1: unexpected, 2: a mistake to fix) outranks one that a later rerun cures (3).
    return min((r.status for r in failed), default=0)
