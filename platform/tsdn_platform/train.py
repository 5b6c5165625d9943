"""Distributed TSDN training on Ray Train: one ``TorchTrainer`` per product line, then the registry.

``tsdn train --store S --dataset D [--products a,b|all] [--config FILE] [--set key=value ...]``

Per product line (each launched from its own zero-CPU Ray task, so the cluster's resources decide how many
train at once: a trainer whose workers do not fit waits, and Ray Train retries its start until they do):

1. The ingested shards (``tsdn_platform.shards.read_split``) are split: ``validation: holdout`` trains on the
   train rows whose ``fold`` is not in ``holdout_folds`` and validates on the rest; ``validation: test``
   trains on every train row and validates on the labelled test split (the paper's protocol).
2. Every worker streams its shard with ``iter_torch_batches``, SURF-fills the batch on its own device from
   the precomputed superpixels, and steps Adam on the DDP-wrapped model (``prepare_model``); bf16 autocast
   and channels_last on GPU. Each epoch reports every loss term (mean over all workers) and images/s.
3. Every ``checkpoint_every`` epochs rank 0 validates, fits the calibration on held-out normal images, and
   reports a checkpoint (weights + ``model.json`` via :mod:`tsdn.checkpoint`, Adam state, history) to
   ``<store>/runs/<product>/<run>`` (uploaded through the store, so an outage is waited out for
   ``store_retry_s``); ``CheckpointConfig`` keeps the best ``keep_checkpoints`` by
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
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from tsdn.checkpoint import MODEL_JSON, MODEL_WEIGHTS
from tsdn.config import TSDNConfig
from tsdn.config_io import ConfigError, from_dict, to_dict
from tsdn.patchcore import PatchCoreConfig
from tsdn_platform import layout, shards, store
from tsdn_platform.cli import exit_status
from tsdn_platform.config import config_to_yaml, load_config
from tsdn_platform.registry import DEFAULT_PROMOTE_METRIC, Registry, validate_name

__all__ = [
    "FAIL_AT_EPOCH_ENV",
    "ProductResult",
    "TrainConfig",
    "build_trainer",
    "injected_failure_epoch",
    "load_datasets",
    "main",
    "run_product",
    "run_training",
    "train_loop_per_worker",
]

logger = logging.getLogger(__name__)

LOSS_TERMS = ("l2", "ssim", "gms", "mask", "fne")
CHECKPOINT_STATE = "training_state.json"
CHECKPOINT_OPTIMIZER = "optimizer.safetensors"
TRAIN_COLUMNS = ("image", "superpixels")
TEST_COLUMNS = ("image", "mask", "label", "image_id")
# Fields that change how a run is executed or published, not what it learns: left out of the run hash so
# that re-running with a different products list, failure budget or promotion policy resumes the same run.
_RUN_HASH_EXCLUDED = (
    "products",
    "run_name",
    "max_failures",
    "max_start_failures",
    "max_concurrent_products",
    "promote",
    "promote_metric",
    "cache_data",
    "families",
    "resources_per_worker",  # where the workers run, not what they learn
    "store_retry_s",
)
FAMILIES = ("tsdn", "patchcore")
# Each family's run name hashes only what that family learns from.
_FAMILY_EXCLUDED = {"tsdn": ("patchcore",), "patchcore": ("model", "epochs", "checkpoint_every", "keep_checkpoints")}
_FLOAT_METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
_STORE_RETRY_S = store.DEFAULT_RETRY_S  # the config's field ``store`` shadows the module in the class body
# Test-only hook, never a config field: in an attempt that started from scratch, the last rank's process exits
# abruptly at the start of this (1-based, >= 2) epoch, after the previous checkpoint is safe. Set in the driver's
# environment; the driver hands it to each product line's task, whose Train controller and workers inherit it.
FAIL_AT_EPOCH_ENV = "TSDN_TEST_FAIL_AT_EPOCH"


@dataclass
class TrainConfig:
    """One ``tsdn train`` job. ``model`` is the full :class:`TSDNConfig` (its ``lr`` drives Adam); ``patchcore``
    the :class:`tsdn.patchcore.PatchCoreConfig` of the second family.

    Attributes:
        store: store URI (``s3://bucket/prefix`` or a folder) with ``datasets/``; runs and registry go there.
        dataset: ingested dataset name.
        products: product lines to train, or ``"all"`` (every product of the dataset).
        families: model families to train per product line (``tsdn``, ``patchcore``); with several, each is
            trained, validated on the same hold-out set, and registered, and ``promote`` picks the best by
            ``promote_metric`` (every version records the comparison under ``selection``).
        epochs: passes over the training rows.
        batch_size: images per worker per step.
        num_workers: Ray Train workers (DDP ranks) per product line.
        use_gpu: one accelerator per worker (``gpus_per_worker``), bf16 autocast, channels_last.
        cpus_per_worker, gpus_per_worker: Ray resources of each worker.
        resources_per_worker: custom Ray resources each worker also needs (e.g. ``{"trainer": 1}`` to place the
            DDP workers only on nodes that advertise ``trainer``, one per node when each has one).
        checkpoint_every: validate + checkpoint every N epochs (and always after the last).
        keep_checkpoints: K, the best K checkpoints by ``checkpoint_metric`` are kept.
        checkpoint_metric: ``val_pixel_auroc`` or ``val_image_auroc`` (higher is better).
        max_failures: worker-group restarts (from the latest checkpoint) before a product line fails.
        max_start_failures: worker-group starts that may fail or time out before a product line fails; each start
            waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` for the workers' resources (60 s; an hour in a quiet
            job, see :func:`tsdn_platform.ray_session.quiet_env`). -1 (Ray Train's default) waits for ever: right
            when product lines queue for a shared cluster or an autoscaler adds nodes; on a fixed cluster, a lost
            node that nothing replaces then stalls the run instead of failing it. Ray Train's
            ``FailureConfig.controller_failure_limit``.
        validation: ``holdout`` (held-out train/good folds, SURF-distorted) or ``test`` (the test split).
        holdout_folds: ingest ``fold`` values held out for validation and calibration (``holdout`` only).
        eval_batch_size: images per forward pass in validation and the final test evaluation.
        promote: ``better`` (beat the current best on ``promote_metric``), ``always`` or ``never``.
        promote_metric: dotted key into the version's metrics; the default is the leak-free hold-out validation
            (``val.val_image_auroc``); ``test.image_auroc`` reads the test split's labels and must be asked for.
        seed: model initialisation and SURF draws.
        validation_seed: the synthetic defects of hold-out validation (:func:`tsdn.defects.validation_set`); kept
            apart from ``seed`` so that versions trained with different seeds are validated on the same set.
        run_name: run folder name; default ``<dataset>-<hash of config and dataset manifest>``, so the same
            command resumes an interrupted run instead of starting over.
        max_concurrent_products: cap on product lines training at once; 0 = as many as the cluster fits.
        cache_data: materialise the decoded shards in the object store once instead of re-reading every
            epoch (turn off for datasets larger than the object store).
        shuffle_buffer_size: rows each worker shuffles per epoch before batching (Ray Data's local shuffle,
            seeded by ``seed``, epoch and rank); 0 keeps the shard order.
        store_retry_s: how long a store that is unreachable, throttling or failing with 5xx is waited for (on the
            driver, in each product line's task and in every Train worker, checkpoint uploads included) before that
            product line fails; then no new version is registered and the best pointer is left as it was. Each
            worker-group restart (``max_failures``) waits again.
    """

    store: str = ""
    dataset: str = ""
    products: list[str] | str = "all"
    families: list[str] | str = field(default_factory=lambda: ["tsdn"])
    model: TSDNConfig = field(default_factory=TSDNConfig)
    patchcore: PatchCoreConfig = field(default_factory=PatchCoreConfig)
    epochs: int = 20
    batch_size: int = 8
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    checkpoint_metric: Literal["val_pixel_auroc", "val_image_auroc"] = "val_pixel_auroc"
    max_failures: int = 2
    max_start_failures: int = -1
    validation: Literal["holdout", "test"] = "holdout"
    holdout_folds: list[int] = field(default_factory=lambda: [0])
    eval_batch_size: int = 16
    promote: Literal["better", "always", "never"] = "better"
    promote_metric: str = DEFAULT_PROMOTE_METRIC
    seed: int = 0
    validation_seed: int = 0
    run_name: str | None = None
    max_concurrent_products: int = 0
    cache_data: bool = True
    shuffle_buffer_size: int = 256
    store_retry_s: float = _STORE_RETRY_S

    def __post_init__(self) -> None:
        checks = (
            (bool(self.store.strip()), "store", "a store URI (--store)"),
            (bool(self.dataset.strip()), "dataset", "a dataset name (--dataset)"),
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.batch_size >= 2, "batch_size", ">= 2 (BatchNorm needs two samples)"),
            (self.num_workers >= 1, "num_workers", ">= 1"),
            (self.cpus_per_worker > 0, "cpus_per_worker", "> 0"),
            (
                all(k not in ("CPU", "GPU") and v > 0 for k, v in self.resources_per_worker.items()),
                "resources_per_worker",
                "custom resource names (not CPU or GPU) with amounts > 0",
            ),
            (not self.use_gpu or self.gpus_per_worker > 0, "gpus_per_worker", "> 0 with use_gpu"),
            (self.checkpoint_every >= 1, "checkpoint_every", ">= 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1"),
            (self.max_failures >= -1, "max_failures", ">= -1 (-1 = unlimited)"),
            (self.max_start_failures >= -1, "max_start_failures", ">= -1 (-1 = unlimited)"),
            (self.validation == "test" or len(self.holdout_folds) >= 1, "holdout_folds", "non-empty"),
            (self.eval_batch_size >= 1, "eval_batch_size", ">= 1"),
            (self.max_concurrent_products >= 0, "max_concurrent_products", ">= 0"),
            (self.shuffle_buffer_size >= 0, "shuffle_buffer_size", ">= 0 (0 = no shuffle)"),
            (self.store_retry_s >= 0, "store_retry_s", ">= 0 (seconds)"),
        )
        for ok, name, expected in checks:
            if not ok:
                msg = f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}"
                raise ConfigError(msg)
        if isinstance(self.families, str):
            self.families = [f.strip() for f in self.families.split(",") if f.strip()]
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families or len(set(self.families)) != len(self.families):
            msg = f"TrainConfig.families: expected distinct names of {', '.join(FAMILIES)}, got {self.families!r}"
            raise ConfigError(msg)
        if isinstance(self.products, str):
            names = [p.strip() for p in self.products.split(",") if p.strip()]
            self.products = "all" if names in ([], ["all"]) else names
        for product in self.products if isinstance(self.products, list) else ():
            validate_name(product)

    def run_id(self, manifest_hash: str, family: str = "tsdn") -> str:
        """Default run name: the dataset (and family, but for TSDN) plus a hash of what changes what is learnt."""
        if self.run_name:
            name = self.run_name if family == "tsdn" else f"{self.run_name}-{family}"
            return validate_name(name, "run")
        excluded = (*_RUN_HASH_EXCLUDED, *_FAMILY_EXCLUDED[family])
        relevant = {k: v for k, v in to_dict(self).items() if k not in excluded}
        digest = hashlib.sha256(json.dumps([relevant, manifest_hash], sort_keys=True).encode()).hexdigest()
        prefix = self.dataset if family == "tsdn" else f"{self.dataset}-{family}"
        return validate_name(f"{prefix}-{digest[:12]}", "run")


@dataclass
class ProductResult:
    """What training one product line produced (or why it failed: ``error``, one line, and ``status``, the
    ``tsdn`` exit status that failure calls for, e.g. 3 for a store outage that outlasted ``store_retry_s``)."""

    product: str
    ok: bool
    status: int = 0
    family: str = "tsdn"
    run_name: str = ""
    run_uri: str = ""
    error: str | None = None
    version: str | None = None
    promoted: bool = False
    best_epoch: int | None = None
    resumed_from_epoch: int = 0
    val: dict[str, float | None] = field(default_factory=dict)
    test: dict[str, float | None] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    test_scores: dict[str, float] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)


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


def _as_images(images: Any) -> torch.Tensor:
    """Shard images -> (B, 3, S, S) float32 in [0, 1] (uint8 shards are scaled)."""
    tensor = torch.as_tensor(images)
    if tensor.dtype == torch.uint8:
        return tensor.float().div_(255.0)
    return tensor.float()


def _batches(shard: Any, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches of a (non-split) validation/test shard; every row is kept."""
    yield from shard.iter_batches(batch_size=batch_size, batch_format="numpy")


# --- evaluation (rank 0) -----------------------------------------------------------------------------


def _predict(predictor: Any, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``predictor.predict_tensor`` -> scores (B,) and maps (B, S, S) as numpy float32."""
    pred = predictor.predict_tensor(images)
    return pred.anomaly_score.numpy(), pred.anomaly_map[:, 0].numpy()


def validate_holdout(
    predictor: Any, batches: Iterable[Mapping[str, np.ndarray]], seed: int
) -> tuple[dict[str, float], np.ndarray]:
    """Leak-free validation: held-out normal images, clean and with one synthetic defect each.

    The defects are :func:`tsdn.defects.validation_set`'s (drawn scratches, stains, holes, cracks, colour spots
    and cut-paste patches), not SURF's training distortion, so the metric measures whether the model finds
    defects it never trained on; no test image is involved. Before scoring, the model's ``score_scales`` are
    fitted on the clean copies (the ``fused`` source reads them).

    Args:
        predictor: a :class:`tsdn.predict.Predictor` around the model being validated.
        batches: numpy batches of the held-out shard (``image`` (B, 3, S, S) uint8 or float).
        seed: the validation draws (the same set at every validation and for every version).

    Returns:
        ``({"val_image_auroc", "val_pixel_auroc"}, clean image scores (N,))``; the clean scores calibrate.
    """
    from tsdn.defects import validation_set
    from tsdn.metrics import image_auroc, pixel_auroc

    clean = [_as_uint8_hwc(batch["image"]) for batch in batches]
    if not clean:
        msg = "validation: the held-out split is empty; ingest more train images or change holdout_folds"
        raise ValueError(msg)
    normal = np.concatenate(clean)
    val = validation_set(normal, seed=seed)
    images = torch.from_numpy(val.images).permute(0, 3, 1, 2).float().div_(255.0)
    predictor.model.fit_score_scales(list(images[: len(normal)].split(predictor.batch_size)))
    pred = predictor.predict_tensor(images)
    scores, maps = pred.anomaly_score.numpy(), pred.anomaly_map[:, 0].numpy()
    metrics = {
        "val_image_auroc": image_auroc(val.labels, scores),
        "val_pixel_auroc": pixel_auroc(val.masks, maps),
    }
    return metrics, scores[val.labels == 0]


def _as_uint8_hwc(images: Any) -> np.ndarray:
    """Shard images (B, 3, S, S) uint8 or float in [0, 1] -> (B, S, S, 3) uint8."""
    array = np.asarray(images)
    if array.dtype != np.uint8:
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1))


def _collect_test(
    predict: Any, batches: Iterable[Mapping[str, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Run ``predict(images) -> (scores, maps)`` over the test split; returns labels, scores, masks, maps, ids."""
    labels, scores, masks, maps, ids = [], [], [], [], []
    for batch in batches:
        batch_scores, batch_maps = predict(_as_images(batch["image"]))
        scores.append(batch_scores)
        maps.append(batch_maps)
        labels.append(np.asarray(batch["label"]).astype(np.int64))
        masks.append((np.asarray(batch["mask"]).reshape(batch_maps.shape) > 0).astype(np.uint8))
        ids.extend(str(i) for i in batch["image_id"])
    if not scores:
        msg = "test split is empty"
        raise ValueError(msg)
    return np.concatenate(labels), np.concatenate(scores), np.concatenate(masks), np.concatenate(maps), ids


def validate_test(
    predictor: Any, batches: Iterable[Mapping[str, np.ndarray]]
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """The paper's protocol: validate on the labelled test split. Returns metrics, scores (N,), labels (N,).

    The model's ``score_scales`` are fitted on the test split's normal images first (this protocol reads the
    test labels anyway).
    """
    from tsdn.metrics import image_auroc, pixel_auroc

    rows = list(batches)
    normal = [_as_images(b["image"])[np.asarray(b["label"]) == 0] for b in rows]
    normal = [n for n in normal if len(n)]
    if normal:
        predictor.model.fit_score_scales(normal)
    labels, scores, masks, maps, _ = _collect_test(lambda x: _predict(predictor, x), rows)
    metrics = {"val_image_auroc": image_auroc(labels, scores), "val_pixel_auroc": pixel_auroc(masks, maps)}
    return metrics, scores, labels


def _clean_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- checkpoints -------------------------------------------------------------------------------------


def _checkpoint_files(
    model: Any, optimizer: torch.optim.Optimizer, calibration: Any, state: dict[str, Any]
) -> dict[str, bytes]:
    """Weights + model.json (tsdn.checkpoint), Adam state (safetensors) and the JSON training state, by file name."""
    import safetensors.torch

    from tsdn.checkpoint import checkpoint_files

    files = checkpoint_files(model, calibration, extra={"training": state})
    optim_state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, entry in optim_state["state"].items()
        for name, value in entry.items()
        if torch.is_tensor(value)
    }
    files[CHECKPOINT_OPTIMIZER] = safetensors.torch.save(tensors)
    files[CHECKPOINT_STATE] = json.dumps({**state, "param_groups": optim_state["param_groups"]}).encode()
    return files


def _upload_checkpoint(run_uri: str, dir_name: str, files: Mapping[str, bytes]) -> Any:
    """Write a checkpoint's files into the run folder through the store; returns the ``ray.train.Checkpoint``.

    The platform uploads instead of Ray Train so that a store outage is waited out for ``store_retry_s`` (Ray's
    own upload retries three times, on top of the AWS SDK's attempts, whatever the budget) and surfaces as a
    :class:`store.StoreError`. Ray registers the checkpoint only after this returns, so an upload the outage cut
    short is a folder no kept checkpoint names (a resumed run overwrites it).
    """
    import ray.train

    uri = store.join(run_uri, dir_name)
    for name, data in files.items():
        store.write_bytes(store.join(uri, name), data)
    fs, path = store.resolve(uri)
    return ray.train.Checkpoint(path=path, filesystem=fs)


def _load_checkpoint(files: Mapping[str, bytes], device: torch.device) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Checkpoint files -> (TSDN in train mode on ``device``, training state, Adam state for ``load_state_dict``)."""
    import safetensors.torch

    from tsdn.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint({name: files[name] for name in (MODEL_WEIGHTS, MODEL_JSON)}, device)
    state = json.loads(files[CHECKPOINT_STATE])
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in safetensors.torch.load(files[CHECKPOINT_OPTIMIZER]).items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer_state = {"state": per_param, "param_groups": state.pop("param_groups")}
    return model.train(), state, optimizer_state


def _read_checkpoint(run_uri: str, checkpoint: Any, names: Sequence[str]) -> dict[str, bytes]:
    """The named files of a reported ``ray.train.Checkpoint`` of the run at ``run_uri``, read through the store.

    Not through ``Checkpoint.as_directory()``: the workers of one node share its download folder, and a worker
    that arrives after another's download finished downloads again into it while the first is still reading
    (seen as a truncated optimizer file on restart after a worker failure).
    """
    uri = store.join(run_uri, os.path.basename(checkpoint.path.rstrip("/")))
    return {name: store.read_bytes(store.join(uri, name)) for name in names}


def _checkpoint_dir_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch:04d}"


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
    from tsdn.scoring import fit_calibration
    from tsdn.training import build_optimizer, set_epoch_lr, train_step

    run_uri = layout.run_uri(cfg.store, product, run_name)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed)

    checkpoint = ray.train.get_checkpoint()
    optimizer_state = None
    if checkpoint is not None:
        names = (MODEL_WEIGHTS, MODEL_JSON, CHECKPOINT_STATE, CHECKPOINT_OPTIMIZER)
        model, state, optimizer_state = _load_checkpoint(_read_checkpoint(run_uri, checkpoint, names), device)
        model.cfg = cfg.model  # loading reset the weights spec to "none"; later checkpoints record the run's own
        start_epoch, history = state["epoch"], state["history"]
    else:
        model = TSDN(cfg.model, opener=store.read_bytes).to(device)
        start_epoch, history = 0, []
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.model)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    # During a DCD_A warm-up the FNE takes no part in the loss: DDP must not wait for its gradients.
    ddp_kwargs = {"find_unused_parameters": True} if cfg.model.mask_warmup_epochs > 0 else None
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
    loss_fn = TSDNLoss(cfg.model)
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
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
            images = _as_images(batch["image"])
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
        if checkpoint_now and rank == 0:
            predictor = Predictor(model, calibration=None, device=device, batch_size=cfg.eval_batch_size)
            if cfg.validation == "holdout":
                val, normal_scores = validate_holdout(
                    predictor, _batches(val_shard, cfg.eval_batch_size), cfg.validation_seed
                )
                calibration = fit_calibration(normal_scores)
            else:
                val, scores, labels = validate_test(predictor, _batches(val_shard, cfg.eval_batch_size))
                calibration = fit_calibration(scores[labels == 0], scores, labels)
            metrics.update(val)
        if rank == 0:
            history.append(metrics)
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith(("loss", "val_")))
            # A logger, not print: Ray Train patches print in its workers to log *and* echo to Ray's redirected
            # stdout, so every printed line reached the driver twice.
            logger.info("[%s] epoch %d/%d %s %.1f images/s", product, epoch, cfg.epochs, shown, metrics["images_per_s"])
        if checkpoint_now and rank == 0:
            state = {"epoch": epoch, "history": history, "product": product, "run": run_name}
            dir_name = _checkpoint_dir_name(epoch)
            files = _checkpoint_files(model, optimizer, calibration, state)
            ray.train.report(
                metrics,
                checkpoint=_upload_checkpoint(run_uri, dir_name, files),
                checkpoint_dir_name=dir_name,
                checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
            )
        else:
            ray.train.report(metrics)

    if rank != 0:
        return None
    return _final_evaluation(cfg, product, run_uri, start_epoch, history, Predictor)


def _final_evaluation(
    cfg: TrainConfig, product: str, run_uri: str, start_epoch: int, history: list[dict[str, Any]], predictor_cls: Any
) -> dict[str, Any]:
    """Rank 0, after training: the best kept checkpoint, evaluated on the test split with the serving predictor."""
    import ray.train
    import ray.train.torch

    from tsdn.metrics import evaluate

    reported = ray.train.get_all_reported_checkpoints()
    if not reported:
        msg = f"{product}: no checkpoint was reported"
        raise RuntimeError(msg)
    best = max(reported, key=lambda r: (_metric_or_low(r.metrics, cfg.checkpoint_metric), r.metrics["epoch"]))
    files = _read_checkpoint(run_uri, best.checkpoint, (MODEL_WEIGHTS, MODEL_JSON))
    predictor = predictor_cls.from_files(files, device=ray.train.torch.get_device(), batch_size=cfg.eval_batch_size)

    test_shard = ray.train.get_dataset_shard("test")
    labels, scores, masks, maps, ids = _collect_test(
        lambda x: _predict(predictor, x), _batches(test_shard, cfg.eval_batch_size)
    )
    # Maps at the score job's precision (its Parquet stores float16): one metric, one value in both jobs.
    test = evaluate(labels, scores, masks, maps.astype(np.float16).astype(np.float32))
    return {
        "checkpoint_dir": os.path.basename(best.checkpoint.path.rstrip("/")),
        "best_epoch": int(best.metrics["epoch"]),
        "val": {k: _clean_number(v) for k, v in best.metrics.items() if k.startswith("val_")},
        "test": {k: _clean_number(float(v)) for k, v in test.items()},
        "history": history,
        "resumed_from_epoch": start_epoch,
        "test_scores": dict(zip(ids, scores.tolist())),
    }


def _metric_or_low(metrics: Mapping[str, Any], name: str) -> float:
    value = metrics.get(name)
    if value is None or not isinstance(value, int | float) or not math.isfinite(float(value)):
        return -math.inf
    return float(value)


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
        if ingested is not None and float(ingested) != float(configured)
    ]


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

    from tsdn_platform.ray_session import verbose

    fs, runs_path = store.resolve(runs_uri)
    resources = {
        "CPU": cfg.cpus_per_worker,
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
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
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
            "best_epoch": summary["best_epoch"],
            "val": summary["val"],
            "test": summary["test"],
            "history": summary["history"],
            "test_scores": summary["test_scores"],
            **({"fit": summary["fit"]} if "fit" in summary else {}),
        }
        fitted.append((family, record, summary))
    selection = _selection(cfg.promote_metric, [record for _, record, _ in fitted])
    results = []
    for family, record, summary in sorted(fitted, key=lambda f: _metric_or_low(selection["values"], f[0])):
        record["selection"] = selection
        store.replace_json(store.join(record["run_uri"], "metrics.json"), record)
        version, promoted = _register(cfg, product, record["checkpoint"], record)
        results.append(
            ProductResult(
                product=product,
                ok=True,
                family=family,
                run_name=record["run_id"],
                run_uri=record["run_uri"],
                version=version,
                promoted=promoted,
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
        logger.info(
            "%s: %s won on %s (%s), by %s",
            product,
            selection["winner"],
            selection["metric"],
            selection["values"],
            selection["margin"],
        )
    return next(r for r in results if r.family == selection["winner"])


def _selection(metric: str, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Which family's version is best on ``metric`` (a dotted key of the version records), and by how much."""
    from tsdn_platform.registry import metric_value

    values = {r["family"]: metric_value(r, metric) for r in records}
    ranked = sorted(values, key=lambda f: _metric_or_low(values, f), reverse=True)
    winner = ranked[0]
    margin = None
    if len(ranked) > 1 and values[winner] is not None and values[ranked[1]] is not None:
        margin = float(values[winner]) - float(values[ranked[1]])
    return {"metric": metric, "values": values, "winner": winner, "margin": margin}


def _register(cfg: TrainConfig, product: str, checkpoint_uri: str, record: dict[str, Any]) -> tuple[str, bool]:
    """Register the best checkpoint once: a re-run of a finished run finds its version and reuses it."""

    registry = Registry(cfg.store)
    for version in reversed(registry.list_versions(product)):
        existing = registry.metrics(product, version)
        if existing.get("run_id") == record["run_id"] and existing.get("checkpoint") == record["checkpoint"]:
            logger.info("%s: run %s is already registered as version %s", product, record["run_id"], version)
            # The policy again: the run that registered it may have failed before its pointer update.
            return version, registry.apply_policy(product, version, cfg.promote, cfg.promote_metric)
    files = {name: store.read_bytes(store.join(checkpoint_uri, name)) for name in (MODEL_WEIGHTS, MODEL_JSON)}
    version = registry.register(product, files, record, promote=cfg.promote, metric=cfg.promote_metric)
    best = registry.best(product)
    return version, bool(best and best["version"] == version)


# --- all product lines -------------------------------------------------------------------------------


def _product_task(cfg_dict: dict[str, Any], product: str) -> ProductResult:
    cfg = from_dict(TrainConfig, cfg_dict)
    try:
        with store.retry_budget(cfg.store_retry_s):
            return run_product(cfg, product)
    except Exception as exc:
        logger.exception("%s: training failed", product)
        return _failed(product, exc)


def _failed(product: str, exc: BaseException) -> ProductResult:
    """A product line's failure as one line and the exit status it calls for, told by its cause's type."""
    cause = failure_cause(exc)
    text = str(cause).strip().splitlines()
    line = text[0] if text else type(cause).__name__
    error = line if isinstance(cause, store.StoreError) else f"{type(cause).__name__}: {line}"
    return ProductResult(product=product, ok=False, status=exit_status(cause), error=error)


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

    from tsdn_platform.ray_session import init_ray

    products = preflight(cfg)
    fail_at_epoch = injected_failure_epoch(cfg.epochs)  # a bad test hook is refused before Ray starts
    init_ray()
    task = ray.remote(num_cpus=0, max_retries=0)(_product_task)
    # A cluster started earlier in this process does not see the test hook: the task's runtime_env carries it, and
    # Ray merges a parent's env_vars into the Train controller's and workers' own.
    hook = {} if fail_at_epoch is None else {"runtime_env": {"env_vars": {FAIL_AT_EPOCH_ENV: str(fail_at_epoch)}}}
    limit = cfg.max_concurrent_products or len(products)
    pending: dict[Any, str] = {}
    queue = list(products)
    results: dict[str, ProductResult] = {}
    cfg_dict = to_dict(cfg)
    while queue or pending:
        while queue and len(pending) < limit:
            product = queue.pop(0)
            pending[task.options(name=f"train-{product}", **hook).remote(cfg_dict, product)] = product
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            product = pending.pop(ref)
            try:
                results[product] = ray.get(ref)
            except Exception as exc:  # the task itself died (e.g. its node was lost)
                results[product] = _failed(product, exc)
    return {product: results[product] for product in products}


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
    print(format_table(results))
    failed = [r for r in results.values() if not r.ok]
    for result in failed:
        print(f"tsdn train: {result.product}: {result.error}", file=sys.stderr)
    # A failure that needs a person (1: unexpected, 2: a mistake to fix) outranks one that a later rerun cures (3).
    return min((r.status for r in failed), default=0)
