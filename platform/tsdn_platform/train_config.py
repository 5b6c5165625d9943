"""The ``tsdn train`` job's configuration and its result per product line.

:class:`TrainConfig` is the validated config (YAML preset + ``--set`` overrides, :mod:`tsdn_platform.config`);
its :meth:`TrainConfig.run_id` names the run folder by a hash of what changes what is learnt
(``_RUN_HASH_EXCLUDED`` lists the fields that do not), so the same command resumes an interrupted run.
:class:`ProductResult` is what training one product line produced, or why it failed; :func:`format_selections` the
lines under the train and pipeline summaries that say which family each line chose, and how sure that choice is.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tsdn.config import TSDNConfig
from tsdn.config_io import check, to_dict
from tsdn.patchcore import PatchCoreConfig
from tsdn_platform import store
from tsdn_platform.names import ALL, parse_products, validate_name
from tsdn_platform.registry import DEFAULT_PROMOTE_METRIC

__all__ = [
    "FAMILIES",
    "ProductResult",
    "TrainConfig",
    "format_reused",
    "format_selections",
    "ranked_families",
    "selection_line",
]

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
    "preserve_order",  # how the rows are delivered, like cache_data
    "families",
    "resources_per_worker",  # where the workers run, not what they learn
    "store_retry_s",
)
FAMILIES = ("tsdn", "patchcore")
# Each family's run name hashes only what that family learns from.
_FAMILY_EXCLUDED = {"tsdn": ("patchcore",), "patchcore": ("model", "epochs", "checkpoint_every", "keep_checkpoints")}
_STORE_RETRY_S = store.DEFAULT_RETRY_S  # the config's field ``store`` shadows the module in the class body


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
        validation: ``holdout`` (held-out train/good folds, with drawn defects: :func:`tsdn.defects.validation_set`)
            or ``test`` (the test split).
        holdout_folds: ingest ``fold`` values held out for validation and calibration (``holdout`` only).
        target_false_positive_rate: the share of unseen good images the calibrated threshold should flag on
            average (``holdout`` only). The threshold becomes the quantile of the held-out normal images' scores
            with that expected rate (:func:`tsdn.calibration.quantile_for_false_positive_rate`); n held-out images
            can promise no less than 1 / (n + 1), and a lower target is refused before training. None: the
            99 % quantile (:data:`tsdn.calibration.DEFAULT_QUANTILE`), whose expected rate depends on n.
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
            epoch (turn off for datasets larger than the object store). Off, the workers read while they train,
            and the reads need a CPU: the lines training at once and each line's workers leave them one
            (:func:`tsdn_platform.train.concurrent_products`, :func:`tsdn_platform.ray_session.worker_cpus`).
        shuffle_buffer_size: rows each worker shuffles per epoch before batching (Ray Data's local shuffle,
            seeded by ``seed``, epoch and rank); 0 keeps the shard order.
        preserve_order: rows reach training in the store's order (the manifest's files, each file's rows), and
            each block goes to the worker with the fewest rows so far, so a run depends on its seed alone. False:
            Ray Data's default, the order the reads finish in and blocks to workers on their own node (less data
            across nodes on a large cluster; a line whose files take several read tasks, more than 16 files, then
            trains on batches the scheduling decides).
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
    target_false_positive_rate: float | None = None
    eval_batch_size: int = 16
    promote: Literal["better", "always", "never"] = "better"
    promote_metric: str = DEFAULT_PROMOTE_METRIC
    seed: int = 0
    validation_seed: int = 0
    run_name: str | None = None
    max_concurrent_products: int = 0
    cache_data: bool = True
    shuffle_buffer_size: int = 256
    preserve_order: bool = True
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
            (
                self.validation == "holdout" or not self.model.needs_held_out,
                "validation",
                "'holdout' with model.feature_position_shrinkage or model.test_flips 'auto' "
                "(they choose on the held-out normals)",
            ),
            (
                self.target_false_positive_rate is None or 0 < self.target_false_positive_rate < 0.5,
                "target_false_positive_rate",
                "a share in (0, 0.5), or null for the 99 % quantile",
            ),
            (
                self.target_false_positive_rate is None or self.validation == "holdout",
                "target_false_positive_rate",
                "null with validation 'test' (its threshold is the F1-optimal one on the test labels)",
            ),
            (self.eval_batch_size >= 1, "eval_batch_size", ">= 1"),
            (self.max_concurrent_products >= 0, "max_concurrent_products", ">= 0"),
            (self.shuffle_buffer_size >= 0, "shuffle_buffer_size", ">= 0 (0 = no shuffle)"),
            (self.store_retry_s >= 0, "store_retry_s", ">= 0 (seconds)"),
        )
        for ok, name, expected in checks:
            check(self, ok, name, expected)
        if isinstance(self.families, str):
            self.families = [f.strip() for f in self.families.split(",") if f.strip()]
        distinct = len(set(self.families)) == len(self.families)
        ok = bool(self.families) and distinct and all(f in FAMILIES for f in self.families)
        check(self, ok, "families", f"distinct names of {', '.join(FAMILIES)}")
        self.products = parse_products(self.products) or ALL

    def run_id(self, manifest_hash: str, family: str = "tsdn") -> str:
        """Default run name: the dataset (and family, but for TSDN) plus a hash of what changes what is learnt."""
        if self.run_name:
            name = self.run_name if family == "tsdn" else f"{self.run_name}-{family}"
            return validate_name(name, "run")
        excluded = (*_RUN_HASH_EXCLUDED, *_FAMILY_EXCLUDED[family])
        relevant = {k: v for k, v in to_dict(self).items() if k not in excluded}
        if self.target_false_positive_rate is None:  # unset: runs keep the names they had before the field
            relevant.pop("target_false_positive_rate")
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
    promoted: bool = False  # the version is the line's best after the run (its promotion, or an earlier one)
    reused: bool = False  # an earlier run of the same config had finished and registered it: nothing was trained
    best_epoch: int | None = None
    resumed_from_epoch: int = 0
    val: dict[str, float | None] = field(default_factory=dict)
    test: dict[str, float | None] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    test_scores: dict[str, float] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)


def ranked_families(values: Mapping[str, float | None]) -> list[str]:
    """Families best first by their value of the selection metric; one without a finite value ranks last."""

    def key(family: str) -> float:
        value = values[family]
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else -math.inf

    return sorted(values, key=key, reverse=True)


def selection_line(product: str, selection: Mapping[str, Any]) -> str:
    """One line: which family won the line's comparison, by how much, and whether its validation can tell."""
    values = selection["values"]
    winner = selection["winner"]
    runner_up = next(family for family in ranked_families(values) if family != winner)
    shown = " over ".join(
        f"{f} {'n/a' if values[f] is None else format(values[f], '.3f')}" for f in (winner, runner_up)
    )
    line = f"  {product:<12} {shown}"
    if selection.get("margin") is None:
        return line
    line += f": {selection['margin']:+.3f}"
    resampled = selection.get("resampled")
    if resampled:
        line += f" ({resampled['low']:+.3f} to {resampled['high']:+.3f})"
        if resampled["low"] <= 0:
            ahead = f"{runner_up} ahead on {100 * resampled['runner_up_ahead']:.0f} % of resamples"
            line += f": too close to call on {resampled['images']} images ({ahead})"
    return line


def format_reused(results: Mapping[str, ProductResult]) -> list[str]:
    """The lines under a summary table for the product lines whose run had finished before: their version is
    reused (a blank line first; none when no line's was)."""
    lines = [
        f"{r.product}: run {r.run_name} had finished before; its version {r.version} is reused and nothing was "
        "trained (to train anew, change the config or its run_name)"
        for r in results.values()
        if r.ok and r.reused
    ]
    return ["", *lines] if lines else []


def format_selections(results: Mapping[str, ProductResult]) -> list[str]:
    """The lines under a summary table for the product lines that trained more than one family."""
    compared = {p: r.selection for p, r in results.items() if r.ok and len(r.selection.get("values", {})) > 1}
    if not compared:
        return []
    metrics = ", ".join(sorted({selection["metric"] for selection in compared.values()}))
    header = [f"the family chosen per line on {metrics}:"]
    if any("resampled" in selection for selection in compared.values()):
        header = [
            f"the family chosen per line on {metrics} (the held-out normals, clean and each with a synthetic defect),",
            "with where the lead falls on 95 % of resamples of those images:",
        ]
    return ["", *header, *(selection_line(product, selection) for product, selection in compared.items())]
