"""Batch scoring with Ray Data: every input image scored by its product line's model, written to Parquet.

Pipeline (one Ray Data job)::

    list inputs (driver)  ->  read bytes + decode (CPU tasks)  ->  Scorer actors (ActorPoolStrategy,
    Predictor loaded once in __init__)  ->  ScoreDatasink (Parquet, zstd, one folder per product)

Input is a folder / S3 prefix of raw images (any nesting; the product comes from ``product`` or from a
path pattern such as ``{product}/**``), or ingested dataset shards (``part-*.parquet``, e.g.
``<store>/datasets/<dataset>/<product>/test``); with shards, ground truth (``label``, ``mask``) gives
image/pixel AUROC and AUPRO per product in the manifest.

Output layout (a job "never half-exists"; the row contract and layout are :mod:`tsdn_platform.score_rows`)::

    <output>/<product>/part-<job>-<attempt>-<task>.parquet
    <output>/@unrouted/part-...parquet  rows whose path matched no ``product_from_path`` pattern (product null)
    <output>/_manifest.json          written last: inputs seen, rows, errors, model versions, config, timings
    <output>/_staging/<job_id>/...   where the parts are written before they are moved into place

Commit protocol: the parts are staged, moved next to the previous output's parts under names unique to this
attempt, then ``_manifest.json`` is replaced atomically (the commit point), then every part file the new
manifest does not list is deleted. A crash before the commit leaves the previous manifest and all of its
parts intact (plus uncommitted parts, which the next run deletes); the manifest's ``files`` are always exactly
the committed output. Readers that list the folders instead may see a crashed attempt's extra parts until the
job runs again.

Score rows (:data:`tsdn_platform.score_rows.SCHEMA`): ``image_id``, ``source_uri``, ``product``,
``model_version``, ``anomaly_score``, ``normalized_score``, ``is_anomalous``, ``threshold``, ``error`` (null,
or why the input could not be scored; its score columns are then null), the ground truth of an ingested split
(``label``, ``defect_type``, ``has_mask``; null for raw images) and the map: ``score_map`` (float16 values,
row-major) with its ``score_map_height`` and ``score_map_width`` (``output_map_size``, or the model's input
size when that is null). One schema for every product, so pyarrow, pandas and duckdb read the whole output
with their defaults::

    import pyarrow.parquet as pq
    from tsdn_platform.score_rows import decode_maps

    table = pq.read_table("<output>")          # or "<output>/bottle", or one part file
    maps = decode_maps(table)                  # one (H, W) float16 array per row, None for error rows
    # without this package: table["score_map"][i].values.to_numpy().reshape(height[i], width[i])

(``pandas.read_parquet("<output>")``, ``duckdb.sql("SELECT * FROM '<output>/*/*.parquet'")``: see
:mod:`tsdn_platform.score_rows`.)

Why a custom datasink instead of ``write_parquet(partition_cols=["product"])``: Arrow's partitioned
writer drops the partition column from the files (a single file would no longer say its product) and names
the folders ``product=<p>``, which Hive-style readers turn into a second ``product`` column (see
:mod:`tsdn_platform.score_rows`); the sink also needs to know each file's rows and errors for the manifest.

Ray Data fuses the decode stage into the scorer actors when both ask for the same resources (CPU-only
actors): the decoded pixels then never cross the object store. With GPU actors the stages differ in
resources and stay apart, so CPU tasks decode while the GPUs score. Resizing to the network input happens
inside :meth:`tsdn.predict.Predictor.predict`, the one preprocessing path, so batch scores equal serving
scores for the same bytes.

The stages live in :mod:`tsdn_platform.score_stages`, which imports torch only where it scores: the write tasks
deserialize :class:`~tsdn_platform.score_stages.ScoreDatasink` from it, and a fresh worker then starts in about
half the time (torch is 1.6 s of its 3.1 s import here).

Why every scorer actor holds the models of all products in the job: one pool stays busy whatever the
product mix of the input, and a TSDN is small (Lite0 ~4 M parameters, b5 ~30 M), so tens of product
lines fit in one actor. Versions are resolved once on the driver, so every actor scores with the
same version even if ``best.json`` moves during the job.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import ray.data

from tsdn.calibration import Calibration
from tsdn.config_io import check, to_dict
from tsdn.image import decode_image
from tsdn.resize import resize_mask
from tsdn.runtime import runtime_format, runtime_problem
from tsdn_platform import shards, store
from tsdn_platform.config import ConfigError, check_required, load_config
from tsdn_platform.names import validate_name
from tsdn_platform.score_rows import MANIFEST, MAP_COLUMNS, STAGING, decode_maps, row_fingerprint
from tsdn_platform.score_stages import MAX_ERROR_SAMPLES, ScoreDatasink, Scorer, decode_inputs, select_shard_rows

logger = logging.getLogger(__name__)

__all__ = [
    "ScoreConfig",
    "ScoreFailed",
    "main",
    "run_scoring",
]

_SHARD_PATTERN = re.compile(r"(^|/)part-[^/]*\.parquet$")
# A committed score part, relative to the output: <product or @unrouted>/part-*.parquet (never _staging/...).
_PART_FILE = re.compile(r"[A-Za-z0-9@][^/]*/part-[^/]*\.parquet")
# Columns of an ingested shard that scoring reads; ground truth is read separately for the metrics.
_SHARD_COLUMNS = ["image_id", "product", "image"]
# Ground truth of the shard contract that the score rows carry along (as label, defect_type, has_mask).
_TRUTH_COLUMNS = ["label", "defect_type", "mask"]
# The config's ``store`` field shadows the module inside the class body.
_STORE_RETRY_S = store.DEFAULT_RETRY_S


class ScoreFailed(RuntimeError):
    """The job ran, but what it produced is not worth committing (too many error rows); nothing was committed."""

    def __init__(self, output: str, reason: str) -> None:
        super().__init__(f"{output}: {reason}")
        self.output = output
        self.reason = reason

    def __reduce__(self) -> tuple[type[ScoreFailed], tuple[str, str]]:
        return (type(self), (self.output, self.reason))


@dataclass
class ScoreConfig:
    """A batch-scoring job (see the module docstring for ``input``, ``output`` and the row contract).

    ``product`` / ``product_from_path`` (e.g. ``"{product}/**"``, matched against paths relative to ``input``)
    choose the model of raw images; ingested shards carry a ``product`` column (``product`` then filters).
    ``version`` pins one version for every product, ``versions`` per product; otherwise the registry's best.
    ``split`` keeps only shard rows of that split. ``num_actors`` is the (min, max) scorer pool size.
    ``output_map_size``: side of the stored score maps and of the ground-truth metrics (null, the default: the
    model's input size, where the training job measured the registry's test metrics, so both say the same
    numbers; a smaller size makes smaller files, and the manifest's ``map_size`` names it). ``job_id`` defaults to
    a hash of the inputs, model versions and result-shaping settings. ``address``: Ray cluster (default
    ``$RAY_ADDRESS``, else a local one on 127.0.0.1). ``report_dir``: also write the HTML report there
    (:mod:`tsdn_platform.report`); ``report_max_images``: the most image cards it shows.

    ``max_error_fraction``: the job fails, committing nothing, when more than this fraction of rows are errors
    (inputs that cannot be decoded, products without a model); it always fails when no row could be scored.
    The default 1.0 fails only then; 0 fails on any error row. ``store_retry_s``: how long an unreachable,
    throttling or failing (5xx) store is waited for, on the driver and in every task, before the job fails;
    a failed job commits nothing and leaves the previous output as it was.

    ``runtime``: what the scorer actors run each model on: ``torch`` (the module), ``onnxruntime`` or ``openvino``
    (the version's registered export; the driver exports and registers any that is missing before the actors
    start, so the actors import neither torch nor timm). Pre- and post-processing are the Predictor's either way.
    """

    store: str = ""
    input: str = ""
    output: str = ""
    product: str | None = None
    product_from_path: str | None = None
    version: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    split: str | None = None
    batch_size: int = 16
    num_actors: tuple[int, int] = (1, 1)
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    output_map_size: int | None = None
    max_image_pixels: int = 64_000_000
    min_rows_per_file: int = 1024
    report_dir: str | None = None
    report_max_images: int = 400
    job_id: str | None = None
    max_error_fraction: float = 1.0
    store_retry_s: float = _STORE_RETRY_S
    address: str | None = None
    runtime: str = "torch"

    def __post_init__(self) -> None:
        check_required(self, ("store", "input", "output"), "a URI")
        alone = not (self.product and self.product_from_path)
        check(self, alone, "product_from_path", f"None when product={self.product!r} is set (they exclude each other)")
        if self.product_from_path is not None:
            try:
                _path_regex(self.product_from_path)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        for name in ("batch_size", "min_rows_per_file", "report_max_images", "max_image_pixels"):
            check(self, getattr(self, name) >= 1, name, ">= 1")
        low, high = self.num_actors
        check(self, 1 <= low <= high, "num_actors", "[min, max] with 1 <= min <= max")
        for name in ("num_cpus_per_actor", "num_gpus_per_actor", "store_retry_s"):
            check(self, getattr(self, name) >= 0, name, ">= 0")
        map_size_ok = self.output_map_size is None or self.output_map_size >= 1
        check(self, map_size_ok, "output_map_size", "a positive size or null (model size)")
        if self.job_id is not None:
            try:
                validate_name(self.job_id, "job")
            except ValueError as exc:
                raise ConfigError(f"job_id: {exc}") from exc
        if not 0.0 <= self.max_error_fraction <= 1.0:
            # Not through check(): tests/unit/platform/test_cli.py pins this wording ("max_error_fraction=2 ...").
            msg = f"max_error_fraction={self.max_error_fraction}: expected a fraction in [0, 1]"
            raise ConfigError(msg)
        problem = runtime_problem(self.runtime, self.num_gpus_per_actor, "num_gpus_per_actor")
        if problem is not None:
            raise ConfigError(problem)


@dataclass
class _Inputs:
    """What the driver found under ``cfg.input``: one item per image, and the shard files if ingested."""

    kind: str  # "images" or "ingested"
    items: list[dict[str, Any]]  # image_id, source_uri, product (None when unknown)
    shard_files: list[str]
    has_ground_truth: bool
    truth_columns: list[str] = field(default_factory=list)  # which of _TRUTH_COLUMNS the shards have


# --- input listing --------------------------------------------------------------------------------


def _path_regex(pattern: str) -> re.Pattern[str]:
    """``"{product}/**"`` -> a regex with a ``product`` group over paths relative to the input."""
    if pattern.count("{product}") != 1:
        msg = f"product_from_path={pattern!r}: expected exactly one '{{product}}'"
        raise ValueError(msg)
    out = []
    for token in re.split(r"(\{product\}|\*\*/?|\*|\?)", pattern):
        if token == "{product}":
            out.append(r"(?P<product>[^/]+)")
        elif token in ("**", "**/"):
            out.append(r"(?:.*/)?" if token == "**/" else r".*")
        elif token == "*":
            out.append(r"[^/]*")
        elif token == "?":
            out.append(r"[^/]")
        else:
            out.append(re.escape(token))
    return re.compile("".join(out) + r"\Z")


def _is_hidden(relative_path: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative_path.split("/"))


def _list_inputs(cfg: ScoreConfig) -> _Inputs:
    root = cfg.input.rstrip("/")
    hint = "the input is a folder or S3 prefix of images or of ingested shards; one image: tsdn predict"
    store.require_folder_or_absent(root, hint=hint)
    committed = shards.files_under(root, cfg.split)
    if committed:  # an ingested dataset, product or split: the manifests list its shards
        return _list_shards(cfg, committed)
    files = sorted(f for f in store.list_files(root, recursive=True) if not _is_hidden(store.relative(f, root)))
    if not files:
        msg = f"{cfg.input}: no input files"
        raise ValueError(msg)
    parquet = [f for f in files if _SHARD_PATTERN.search(store.relative(f, root))]
    if parquet:
        # Shards without a manifest (written by hand): skip other splits' files unread (the row filter on
        # ``split`` still decides).
        in_split = [f for f in parquet if cfg.split is not None and f"/{cfg.split}/" in f"/{store.relative(f, root)}"]
        return _list_shards(cfg, in_split or parquet)
    if cfg.product is None and cfg.product_from_path is None:
        msg = f"{cfg.input}: raw images need product or product_from_path to choose a model"
        raise ValueError(msg)
    regex = _path_regex(cfg.product_from_path) if cfg.product_from_path else None
    items = []
    for uri in files:
        rel = store.relative(uri, root)
        product = cfg.product
        if regex is not None:
            match = regex.match(rel)
            product = match.group("product") if match else None
        items.append({"image_id": rel, "source_uri": uri, "product": product})
    return _Inputs("images", items, [], has_ground_truth=False)


def _open_shards(shards: list[str]) -> pads.Dataset:
    fs, _ = store.resolve(shards[0])
    return pads.dataset([store.resolve(s)[1] for s in shards], format="parquet", filesystem=fs)


def _split_filter(cfg: ScoreConfig, dataset: pads.Dataset) -> pc.Expression | None:
    if cfg.split is None:
        return None
    if "split" not in dataset.schema.names:
        msg = f"{cfg.input}: split={cfg.split!r} given but the shards have no 'split' column"
        raise ValueError(msg)
    return pc.field("split") == cfg.split


def _list_shards(cfg: ScoreConfig, shards: list[str]) -> _Inputs:
    dataset = _open_shards(shards)
    missing = sorted(set(_SHARD_COLUMNS) - set(dataset.schema.names))
    if missing:
        msg = f"{cfg.input}: shards lack column(s) {', '.join(missing)}"
        raise ValueError(msg)
    table = dataset.to_table(columns=["image_id", "product"], filter=_split_filter(cfg, dataset))
    if cfg.product is not None:
        table = table.filter(pc.field("product") == cfg.product)
    items = [{"image_id": row["image_id"], "source_uri": None, "product": row["product"]} for row in table.to_pylist()]
    if not items:
        msg = f"{cfg.input}: no shard rows match split={cfg.split!r} product={cfg.product!r}"
        raise ValueError(msg)
    truth = [c for c in _TRUTH_COLUMNS if c in dataset.schema.names]
    return _Inputs("ingested", items, shards, has_ground_truth="label" in truth, truth_columns=truth)


# --- models ---------------------------------------------------------------------------------------


@dataclass
class _Models:
    """Per product: the pinned version, map shape and calibration, or why the product cannot be scored (no shape
    then)."""

    versions: dict[str, str]
    shapes: dict[str, tuple[int, int]]
    unavailable: dict[str, str]
    calibrations: dict[str, Calibration] = field(default_factory=dict)


def _resolve_models(cfg: ScoreConfig, products: Iterable[str]) -> _Models:
    from tsdn_platform.registry import Registry, RegistryError, UnknownProductError

    registry = Registry(cfg.store)
    models = _Models({}, {}, {})
    for product in sorted(set(products)):
        try:
            validate_name(product)  # a folder name from product_from_path may not be a product id
        except ValueError as exc:
            models.unavailable[product] = str(exc)
            continue
        # A pinned version that does not exist fails the job (UnknownVersionError): the user asked for it.
        # Only model.json is read here; the actors load and check the weights.
        try:
            meta, ref = registry.model_json(product, cfg.versions.get(product, cfg.version))
        except UnknownProductError as exc:
            models.unavailable[product] = str(exc)
            continue
        height, width = (cfg.output_map_size,) * 2 if cfg.output_map_size else meta["input_size"]
        models.versions[product] = ref.version
        models.shapes[product] = (int(height), int(width))
        if meta.get("calibration"):
            try:
                models.calibrations[product] = Calibration.from_dict(meta["calibration"])
            except (ConfigError, ValueError) as exc:
                msg = f"{store.join(ref.uri, 'model.json')}: calibration: {exc}"
                raise RegistryError(msg) from exc
    return models


def _threshold_summary(calibration: Calibration | None) -> dict[str, Any] | None:
    """What a product's score manifest says about the threshold its rows were decided at: the calibration's
    threshold, method and normal images, and for a quantile threshold how often an unseen normal image reaches it
    (:meth:`tsdn.calibration.Calibration.false_positive_rate`: expected, and the one-sided 95 % bound)."""
    if calibration is None:
        return None
    return {
        "threshold": calibration.threshold,
        "method": calibration.method,
        "quantile": calibration.quantile,
        "n_normal": calibration.n_normal,
        **calibration.false_positive_rates(),
    }


def _ensure_exports(cfg: ScoreConfig, models: _Models) -> None:
    """Export and register (on the driver, once) every pinned version whose export for ``cfg.runtime`` is missing."""
    from tsdn_platform.registry import Registry

    registry = Registry(cfg.store)
    fmt = runtime_format(cfg.runtime)
    for product, version in sorted(models.versions.items()):
        registry.ensure_export(product, version, fmt)


def _job_id(cfg: ScoreConfig, inputs: _Inputs, models: _Models) -> str:
    """Same inputs, models and result-shaping config -> same id, so a rerun replaces its own output."""
    digest = hashlib.sha256()
    key = {
        "input": cfg.input.rstrip("/"),
        "items": [(i["image_id"], i["product"]) for i in inputs.items],
        "versions": models.versions,
        "product": cfg.product,
        "product_from_path": cfg.product_from_path,
        "split": cfg.split,
        "output_map_size": cfg.output_map_size,
        "max_image_pixels": cfg.max_image_pixels,
        "runtime": cfg.runtime,
    }
    digest.update(json.dumps(key, sort_keys=True).encode())
    return digest.hexdigest()[:16]


# --- the Ray Data job -----------------------------------------------------------------------------


def _build_dataset(cfg: ScoreConfig, inputs: _Inputs, models: _Models) -> ray.data.Dataset:
    if inputs.kind == "ingested":
        fs, _ = store.resolve(inputs.shard_files[0])
        paths = {store.resolve(uri)[1]: uri for uri in inputs.shard_files}
        columns = _SHARD_COLUMNS + inputs.truth_columns + (["split"] if cfg.split is not None else [])
        ds = (
            ray.data.read_parquet(list(paths), filesystem=fs, include_paths=True, partitioning=None)
            .select_columns([*columns, "path"])
            .map_batches(
                select_shard_rows,
                fn_kwargs={"uris": paths, "split": cfg.split, "product": cfg.product},
                batch_format="pyarrow",
                batch_size=cfg.batch_size,
            )
        )
    else:
        blocks = max(1, min(len(inputs.items) // cfg.batch_size, 1000))
        ds = ray.data.from_items(inputs.items, override_num_blocks=blocks)
    low, high = cfg.num_actors
    return ds.map_batches(
        decode_inputs,
        fn_kwargs={
            "unavailable": models.unavailable,
            "max_pixels": cfg.max_image_pixels,
            "store_retry_s": cfg.store_retry_s,
        },
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        # CPU-only pools: the same CPU request as the actors makes Ray fuse decoding into them. Unfused, decode
        # tasks would wait for CPUs that a pool sized to the node holds for the whole job.
        num_cpus=cfg.num_cpus_per_actor if cfg.num_gpus_per_actor == 0 else 1,
    ).map_batches(
        Scorer,
        fn_constructor_kwargs={
            "store_uri": cfg.store,
            "versions": models.versions,
            "shapes": models.shapes,
            "batch_size": cfg.batch_size,
            "device": "cuda" if cfg.num_gpus_per_actor > 0 else None,
            "store_retry_s": cfg.store_retry_s,
            "runtime": cfg.runtime,
        },
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
        num_cpus=cfg.num_cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor,
    )


# --- metrics, commit, entry points ----------------------------------------------------------------


def _read_mask(data: bytes | None, name: str, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask PNG (or None: a normal image) -> (H, W) {0, 1} uint8 at the score-map size."""
    if data is None:
        return np.zeros(shape, np.uint8)
    return resize_mask(np.asarray(decode_image(data, name).convert("L")), shape)


def _ground_truth_metrics(
    cfg: ScoreConfig, inputs: _Inputs, results: list[dict[str, Any]], models: _Models
) -> dict[str, dict[str, Any]]:
    """Image/pixel AUROC, AUPRO (at the score-map resolution) and the recall and false-positive rate of the rows'
    decisions, per product, over rows without errors."""
    from tsdn.metrics import evaluate

    dataset = _open_shards(inputs.shard_files)
    columns = ["image_id", "product", "label"] + (["mask"] if "mask" in dataset.schema.names else [])
    truth = {
        (row["product"], row["image_id"]): row
        for row in dataset.to_table(columns=columns, filter=_split_filter(cfg, dataset)).to_pylist()
    }
    metrics: dict[str, dict[str, Any]] = {}
    for product, shape in sorted(models.shapes.items()):
        files = [r["file"] for r in results if r["product"] == product and r["rows"] > r["errors"]]
        if product not in models.versions or not files:
            continue
        columns = ["image_id", "anomaly_score", "is_anomalous", *MAP_COLUMNS]
        table = pa.concat_tables(_read_table(uri, columns) for uri in files)
        table = table.filter(pc.is_valid(table["score_map"]))
        rows = [truth[(product, image_id)] for image_id in table["image_id"].to_pylist()]
        labels = np.array([row["label"] for row in rows], np.int64)
        if len(set(labels.tolist())) < 2:
            metrics[product] = {"images": len(rows), "note": "needs both normal and anomalous images"}
            continue
        maps = np.stack(decode_maps(table)).astype(np.float32)
        masks = np.stack([_read_mask(row.get("mask"), f"{product}/{row['image_id']}:mask", shape) for row in rows])
        scores = table["anomaly_score"].to_numpy()
        flagged = table["is_anomalous"].to_numpy(zero_copy_only=False)
        result = evaluate(labels, scores, masks=masks, maps=maps, flagged=flagged)
        metrics[product] = {"images": len(rows), "map_size": list(shape), **{k: float(v) for k, v in result.items()}}
    return metrics


def _read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = store.resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def _remove_uncommitted(output: str, committed: Iterable[str]) -> None:
    """Delete every ``<folder>/part-*.parquet`` under ``output`` that is not in ``committed`` (relative paths)."""
    keep = set(committed)
    root = output.rstrip("/")
    for uri in store.list_files(root, recursive=True):
        relative = store.relative(uri, root)
        if _PART_FILE.fullmatch(relative) and relative not in keep:
            store.delete(uri)


def _inputs_fingerprint(inputs: _Inputs) -> int:
    """What :func:`~tsdn_platform.score_rows.row_fingerprint` of the written rows must be: one row per input."""
    return row_fingerprint([i["product"] for i in inputs.items], [i["image_id"] for i in inputs.items])


def _move_into_place(output: str, staging: str, results: list[dict[str, Any]]) -> list[str]:
    """Move the staged parts under ``output``; returns their paths relative to ``output``."""
    moved = []
    for entry in results:
        relative = store.relative(entry["file"], staging.rstrip("/"))
        store.move(entry["file"], store.join(output, relative))
        moved.append(relative)
    return moved


def _check_errors(cfg: ScoreConfig, results: list[dict[str, Any]]) -> None:
    """Raise :class:`ScoreFailed` when the error rows exceed ``cfg.max_error_fraction`` (or are all the rows)."""
    rows = sum(r["rows"] for r in results)
    errors = sum(r["errors"] for r in results)
    if errors < rows and errors <= cfg.max_error_fraction * rows:
        return
    samples = [e for r in results for e in r["error_samples"]]
    allowed = "no row could be scored" if errors == rows else f"more than max_error_fraction={cfg.max_error_fraction}"
    reason = f"{errors} of {rows} rows are errors ({allowed}); nothing committed; first error: {samples[0]}"
    raise ScoreFailed(cfg.output, reason)


def run_scoring(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every input of ``cfg`` and commit ``<output>/<product>/part-*.parquet`` + ``_manifest.json``.

    Returns the manifest (with ``report`` added when ``cfg.report_dir`` is set). Raises :class:`ScoreFailed`
    (too many error rows), :class:`store.StoreError` (the store failed for longer than ``cfg.store_retry_s``)
    or ValueError (no inputs, a bad setting) without committing anything: the previous output stays as it was.
    """
    with store.retry_budget(cfg.store_retry_s):
        return _run_scoring(cfg)


def _run_scoring(cfg: ScoreConfig) -> dict[str, Any]:
    from tsdn_platform.ray_session import init_ray

    started = time.perf_counter()
    # Before Ray starts: a wrong store, input or output fails in a second, not after 15 (or after the scoring).
    store.require(cfg.store)
    store.require_folder_or_absent(cfg.output)
    if cfg.report_dir:
        store.require_folder_or_absent(cfg.report_dir, hint="the report is a folder")
    inputs = _list_inputs(cfg)
    models = _resolve_models(cfg, {i["product"] for i in inputs.items if i["product"] is not None})
    if not models.versions:
        wanted = ", ".join(sorted(models.unavailable)) or "none (no input path matched the product pattern)"
        msg = f"{cfg.store}: no registered model for any input product (products: {wanted})"
        raise ValueError(msg)
    if cfg.runtime != "torch":
        _ensure_exports(cfg, models)
    job_id = cfg.job_id or _job_id(cfg, inputs, models)
    staging = store.join(cfg.output, STAGING, job_id)
    store.delete(staging, recursive=True)  # what a crashed attempt of this same job left
    init_ray(cfg.address)
    listed = time.perf_counter()
    logger.info("scoring %d %s inputs, job %s, models %s", len(inputs.items), inputs.kind, job_id, models.versions)

    attempt = uuid.uuid4().hex[:8]  # part names unique to this attempt: they never overwrite committed parts
    sink = ScoreDatasink(staging, f"{job_id}-{attempt}", cfg.min_rows_per_file, cfg.store_retry_s)
    ds = _build_dataset(cfg, inputs, models)
    # A task's StoreError then reaches the driver as itself (a RayTaskError that is a StoreError, kind intact)
    # instead of a UserCodeException that keeps only its text.
    ds.context.raise_original_map_exception = True
    try:
        # Writes reserve no CPU: they are short (encode + upload), and a scorer pool that holds every CPU would
        # otherwise hold them back until the last batch, buffering all output in the object store.
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0})
        results = sorted(sink.results, key=lambda r: r["file"])
        rows = sum(r["rows"] for r in results)
        if rows != len(inputs.items):
            msg = f"{cfg.input}: {len(inputs.items)} inputs but {rows} rows written to {staging}; not committing"
            raise RuntimeError(msg)
        # The same count can hide a row written twice and another never written (a retried task whose first
        # attempt's output survived): the rows' keys must be the inputs' keys.
        if sum(r["fingerprint"] for r in results) % 2**64 != _inputs_fingerprint(inputs):
            msg = (
                f"{cfg.input}: the {rows} rows written to {staging} are not the {len(inputs.items)} inputs "
                "(some written twice, others missing); not committing"
            )
            raise RuntimeError(msg)
        _check_errors(cfg, results)
    except BaseException:
        store.discard(staging)
        raise
    scored = time.perf_counter()
    metrics = _ground_truth_metrics(cfg, inputs, results, models) if inputs.has_ground_truth else None
    measured = time.perf_counter()

    files = _move_into_place(cfg.output, staging, results)  # beside the previous output, which stays valid
    products: dict[str, dict[str, Any]] = {}
    for product in sorted({r["product"] for r in results}):
        mine = [(r, f) for r, f in zip(results, files) if r["product"] == product]
        products[product] = {
            "rows": sum(r["rows"] for r, _ in mine),
            "errors": sum(r["errors"] for r, _ in mine),
            "model_version": models.versions.get(product),
            "map_shape": list(models.shapes[product]) if product in models.shapes else None,
            "calibration": _threshold_summary(models.calibrations.get(product)),
            "files": [f for _, f in mine],
        }
    manifest: dict[str, Any] = {
        "job_id": job_id,
        "attempt": attempt,
        "status": "committed",
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": {"uri": cfg.input, "kind": inputs.kind, "inputs_seen": len(inputs.items)},
        "rows_written": rows,
        "errors": sum(r["errors"] for r in results),
        "error_samples": [e for r in results for e in r["error_samples"]][:MAX_ERROR_SAMPLES],
        "products": products,
        "model_versions": models.versions,
        "unavailable_products": models.unavailable,
        "score_map": {"values": "float16, row-major", "shape": ["score_map_height", "score_map_width"]},
        "config": to_dict(dataclasses.replace(cfg, job_id=job_id)),
        "timings": {
            "list_s": round(listed - started, 3),
            "score_s": round(scored - listed, 3),
            "metrics_s": round(measured - scored, 3),
            "total_s": round(time.perf_counter() - started, 3),
            "images_per_s": round(len(inputs.items) / max(scored - listed, 1e-9), 3),
        },
    }
    if metrics is not None:
        manifest["metrics"] = metrics
    store.replace_json(store.join(cfg.output, MANIFEST), manifest)  # atomic: this commits the job
    try:
        _remove_uncommitted(cfg.output, files)  # the previous output's parts, and any a crashed attempt left
        store.delete(staging, recursive=True)
        staging_root = store.join(cfg.output, STAGING)
        if not store.list_files(staging_root):  # a local folder outlives its last file; S3 prefixes do not
            store.delete(staging_root, recursive=True)
    except store.StoreError as exc:
        # The job is committed and its manifest lists exactly its files; what is left is unlisted garbage
        # that the next run of a job on this output deletes.
        logger.warning("committed, but could not remove superseded files (%s)", exc)
    logger.info("committed %d rows (%d errors) to %s", rows, manifest["errors"], cfg.output)
    if cfg.report_dir:
        from tsdn_platform.report import write_report

        title = f"TSDN scores: {cfg.input}"
        report = write_report(cfg.output, cfg.report_dir, max_images=cfg.report_max_images, title=title)
        manifest["report"] = str(report)
    return manifest


def main(args: argparse.Namespace) -> int:
    """``tsdn score``: resolve the config, run the job, print the manifest summary."""
    cfg = load_config(
        ScoreConfig,
        args.config,
        args.overrides,
        explicit={
            "store": args.store,
            "input": args.input,
            "output": args.output,
            "product": args.product,
            "product_from_path": args.product_from_path,
            "version": args.version,
            "report_dir": args.report,
            "report_max_images": args.report_max_images,
            "address": args.address,
        },
    )
    manifest = run_scoring(cfg)
    summary = {k: manifest[k] for k in ("job_id", "rows_written", "errors", "model_versions", "timings")}
    summary.update({k: manifest[k] for k in ("metrics", "report") if k in manifest})
    print(json.dumps(summary, indent=2))
    return 0
