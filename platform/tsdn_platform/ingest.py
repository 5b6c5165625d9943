"""Ingest an MVTec-style tree into the shard contract (:mod:`tsdn_platform.shards`).

Source layout (a local folder or an ``s3://`` prefix)::

    <source>/<product>/train/good/*.png
    <source>/<product>/test/<defect or good>/*.png
    <source>/<product>/ground_truth/<defect>/<stem>_mask.png     (or <stem>.png)

Products are the folders with a ``train/good`` folder. A Ray Data pipeline decodes and validates every
image (:mod:`tsdn.image`), pairs and normalises its mask, and precomputes the SLIC label map of every
train image at the training resolution (:mod:`tsdn.surf`), so SURF costs nothing per training step.

Output: the shard contract of :mod:`tsdn_platform.shards` (layout, row schema, manifests).

A re-run over the same source writes the same rows and the same ``content_hash``. A product's shards are
replaced so that a reader never sees a mix: new shards are staged under ``<dataset>/_staging-<time>-<id>/``, the old
manifest is removed, the old shards deleted, the staged ones moved in, and the new manifest written last.
Readers go through the manifest (:func:`tsdn_platform.shards.read_split`), so they see either a complete
product or a clear "not ingested" error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import logging
import os
import posixpath
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from tsdn.config_io import check
from tsdn.resize import input_shape, matching_input_shape
from tsdn_platform import store
from tsdn_platform.config import ConfigError, check_required, config_to_yaml, load_config
from tsdn_platform.layout import dataset_uri
from tsdn_platform.names import NAME_PATTERN, parse_products, validate_name
from tsdn_platform.shards import (
    FORMAT,
    MANIFEST,
    SCHEMA,
    SPLITS,
    IngestError,
    committed_rows,
    fold_of,
    resize_image,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "IngestConfig",
    "IngestError",
    "discover",
    "main",
    "run_ingest",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_TARGET_FILE_BYTES = 128 * 1024 * 1024
_ROWS_PER_FILE_RANGE = (16, 4096)
# What the driver pulls back after processing (no pixel bytes): counts, hashes, the report, timings.
_META_COLUMNS = [
    *("image_id", "split", "label", "defect_type", "sha256", "mask_sha256", "notes"),
    *("product", "error", "source_uri", "decode_s", "slic_s", "height", "width"),
]
# The input's aspect may differ from the images' by this factor before ingest warns that the resize distorts
# them (kolektor's 630 x 250 px parts squashed to a square: 2.5x; image / pixel AUROC 0.87 / 0.87 against
# 0.93 / 0.96 at 320 x 128, BENCHMARKS.md "The input's aspect, and batches of 4").
ASPECT_TOLERANCE = 1.25


# The config's ``store`` field shadows the module inside the class body.
_STORE_RETRY_S = store.DEFAULT_RETRY_S
# A staging folder older than this is a dead run's (no ingest of one dataset runs this long on a sane cluster).
STALE_STAGING_S = 24 * 3600
_STAMP = "%Y%m%dT%H%M%SZ"


@dataclass
class IngestConfig:
    """``tsdn ingest``: what to read, where to write, and the training resolution of the superpixel maps.

    ``image_size``, ``n_segments`` and ``slic_compactness`` must match the training config (``TSDNConfig``:
    ``image_size``, ``n_segments``, ``slic_compactness``); the training job checks the manifest against it.
    ``rows_per_file`` defaults to about 128 MiB of images per file (16..4096 rows). ``store_retry_s``: how long
    a store that is unreachable, throttling or failing with 5xx is waited for (on the driver and in every task)
    before the job fails; it then commits nothing, and what an earlier run committed stays as it was.
    """

    source: str = ""
    store: str = ""
    dataset: str = ""
    products: list[str] | str | None = None
    image_size: int | tuple[int, int] = 352
    n_segments: int = 400
    slic_compactness: float = 10.0
    mask_threshold: int = 128
    rows_per_file: int | None = None
    max_pixels: int = 64_000_000
    store_retry_s: float = _STORE_RETRY_S
    address: str | None = None
    ray_remote_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_required(self, ("source", "store", "dataset"))
        self.products = parse_products(self.products)
        try:
            validate_name(self.dataset, "dataset")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            sides = input_shape(self.image_size)
        except ValueError:
            sides = (0,)
        check(self, min(sides) >= 16, "image_size", "S or [H, W], each >= 16")
        check(self, self.n_segments >= 1, "n_segments", ">= 1")
        check(self, self.slic_compactness > 0, "slic_compactness", "> 0")
        check(self, 0 < self.mask_threshold < 256, "mask_threshold", "1..255")
        check(self, self.rows_per_file is None or self.rows_per_file >= 1, "rows_per_file", "None or >= 1")
        check(self, self.store_retry_s >= 0, "store_retry_s", ">= 0")

    def item_settings(self) -> dict[str, Any]:
        """What the per-image work (decode, masks, SLIC) needs, as plain values for Ray tasks."""
        return {
            "image_size": self.image_size,
            "n_segments": self.n_segments,
            "compactness": self.slic_compactness,
            "mask_threshold": self.mask_threshold,
            "max_pixels": self.max_pixels,
            "store_retry_s": self.store_retry_s,
        }

    def slic_settings(self) -> dict[str, Any]:
        return {
            "n_segments": self.n_segments,
            "compactness": self.slic_compactness,
            "resize": "bilinear+antialias",
            "image_size": self.image_size,
        }


# --- pixels: one resize for ingest (SLIC input) and the training reader ------------------------------


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 0/255 -> (1, S, S) float32 in {0, 1}, by :func:`tsdn.resize.resize_mask` (what scoring does)."""
    from tsdn.resize import resize_mask

    return resize_mask(mask, (size, size))[None].astype(np.float32)


# --- discovery (driver) ---------------------------------------------------------------------------


def discover(source: str, products: list[str] | None = None) -> dict[str, list[str]]:
    """Product -> every file under ``<source>/<product>/`` (full URIs, sorted). Products have ``train/good``."""
    files = store.list_files(source)
    by_product: dict[str, list[str]] = {}
    for uri in files:
        parts = store.relative(uri, source).split("/")
        if len(parts) >= 2:
            by_product.setdefault(parts[0], []).append(uri)
    found = {
        product: uris
        for product, uris in sorted(by_product.items())
        if any(store.relative(u, source).split("/")[1:3] == ["train", "good"] for u in uris)
    }
    if not found:
        reason = (
            "no product folders found: expected an MVTec-style tree <source>/<product>/train/good/*.png "
            f"({len(files)} files under the source)"
        )
        raise IngestError(source, reason)
    if not products:
        # A discovered folder becomes a store path segment and a product id: the same rule as everywhere else.
        bad = [p for p in found if not NAME_PATTERN.match(p) or ".." in p]
        if bad:
            reason = (
                f"product folder(s) {', '.join(repr(b) for b in bad)} are not valid product ids (1-64 characters "
                "[A-Za-z0-9_.-], starting alphanumeric, no '..'); rename them or choose others with --products"
            )
            raise IngestError(source, reason)
    if products:
        missing = sorted(set(products) - set(found))
        if missing:
            reason = f"product(s) {', '.join(missing)} not found; products with train/good: {', '.join(found)}"
            raise IngestError(source, reason)
        found = {p: found[p] for p in products}
    return found


def _plan_product(source: str, product: str, uris: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Files of one product -> (items to process, files skipped at planning time with their reason)."""
    masks: dict[tuple[str, str], str] = {}
    for uri in uris:
        parts = store.relative(uri, source).split("/")
        if len(parts) == 4 and parts[1] == "ground_truth" and parts[3].lower().endswith(IMAGE_EXTENSIONS):
            stem = posixpath.splitext(parts[3])[0]
            key = (parts[2], stem.removesuffix("_mask"))
            if stem.endswith("_mask") or key not in masks:
                masks[key] = uri
    items: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    used_masks = set()
    for uri in uris:
        rel = store.relative(uri, source)
        parts = rel.split("/")
        if parts[1] == "ground_truth":
            continue
        if parts[1] not in SPLITS:
            skipped.append({"file": uri, "reason": f"not under {product}/train or {product}/test"})
            continue
        if len(parts) != 4:
            skipped.append({"file": uri, "reason": f"expected {product}/{parts[1]}/<defect type>/<file>"})
            continue
        _, split, defect, filename = parts
        if not filename.lower().endswith(IMAGE_EXTENSIONS):
            skipped.append({"file": uri, "reason": f"not an image file (expected {', '.join(IMAGE_EXTENSIONS)})"})
            continue
        if split == "train" and defect != "good":
            skipped.append({"file": uri, "reason": "train images must be normal (train/good)"})
            continue
        mask_uri = masks.get((defect, posixpath.splitext(filename)[0])) if defect != "good" else None
        if mask_uri:
            used_masks.add(mask_uri)
        items.append(
            {
                "image_id": rel,
                "product": product,
                "split": split,
                "label": 0 if defect == "good" else 1,
                "defect_type": defect,
                "source_uri": uri,
                "mask_uri": mask_uri or "",
            }
        )
    mask_uris = set(masks.values())
    for uri in sorted(mask_uris - used_masks):
        skipped.append({"file": uri, "reason": "mask without a matching test image"})
    for uri in uris:
        parts = store.relative(uri, source).split("/")
        if parts[1] == "ground_truth" and uri not in mask_uris:
            skipped.append({"file": uri, "reason": "not a mask file (expected ground_truth/<defect>/<stem>_mask.png)"})
    items.sort(key=lambda item: item["image_id"])
    return items, skipped


# --- per-image work (Ray Data workers) -----------------------------------------------------------------


def _decode_mask(
    data: bytes, uri: str, size: tuple[int, int], threshold: int, max_pixels: int
) -> tuple[np.ndarray, list[str]]:
    """Mask bytes -> ((H, W) uint8 in {0, 255}, notes). Raises ValueError naming ``uri`` when unusable."""
    from tsdn.image import decode_image, to_rgb

    gray = to_rgb(decode_image(data, uri, max_pixels))[0].max(axis=2)
    if gray.shape != size:
        msg = f"{uri}: mask is {gray.shape[1]}x{gray.shape[0]}, image is {size[1]}x{size[0]}"
        raise ValueError(msg)
    notes = []
    values = np.unique(gray)
    if set(values.tolist()) <= {0, 255}:
        binary = gray
    elif set(values.tolist()) <= {0, 1}:
        binary = gray * np.uint8(255)
        notes.append("mask scaled from 0/1 to 0/255")
    else:
        binary = np.where(gray >= threshold, 255, 0).astype(np.uint8)
        notes.append(f"mask thresholded at {threshold} ({len(values)} distinct values)")
    if not binary.any():
        notes.append("mask is empty")
    return binary, notes


def _encode_png(gray: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _read_input(uri: str) -> bytes:
    """The bytes of one listed input. Raises ValueError when it vanished since the listing (a fact about this
    file), and :class:`store.StoreError` when the store failed (a fact about the job, which must then fail)."""
    try:
        return store.read_bytes(uri)
    except store.StoreError as exc:
        if exc.kind != store.NOT_FOUND:
            raise
        msg = f"{uri}: no longer exists (listed, then gone before it was read)"
        raise ValueError(msg) from exc


def _process_item(item: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """One source file -> one shard row (with ``error`` set, and nothing else, when it cannot be used).

    Only input errors become ``error``; a failing store raises :class:`store.StoreError` and fails the job.
    """
    from tsdn.image import decode_image, to_rgb
    from tsdn.surf import encode_labels, slic_labels

    uri = item["source_uri"]
    row: dict[str, Any] = {key: item[key] for key in ("image_id", "product", "split", "label", "defect_type")}
    row.update(
        source_uri=uri,
        image=None,
        mask=None,
        mask_sha256=None,
        height=0,
        width=0,
        sha256="",
        source_mode="",
        superpixels=None,
        fold=fold_of(item["image_id"]),
        notes="",
        error=None,
        decode_s=0.0,
        slic_s=0.0,
    )
    start = time.perf_counter()
    try:
        data = _read_input(uri)
        rgb, mode = to_rgb(decode_image(data, uri, settings["max_pixels"]))
        notes = [] if mode == "RGB" else [f"converted {mode} to RGB"]
        if item["mask_uri"]:
            try:
                mask_data = _read_input(item["mask_uri"])
                mask, mask_notes = _decode_mask(
                    mask_data, item["mask_uri"], rgb.shape[:2], settings["mask_threshold"], settings["max_pixels"]
                )
            except ValueError as exc:
                row["error"] = f"unusable mask: {exc}"
                return row
            row["mask"] = _encode_png(mask)
            row["mask_sha256"] = hashlib.sha256(row["mask"]).hexdigest()
            notes.extend(mask_notes)
        elif item["label"]:
            notes.append("no mask found")
    except ValueError as exc:
        row["error"] = str(exc)
        return row
    row.update(
        image=data,
        height=int(rgb.shape[0]),
        width=int(rgb.shape[1]),
        sha256=hashlib.sha256(data).hexdigest(),
        source_mode=mode,
        notes="; ".join(notes),
        decode_s=time.perf_counter() - start,
    )
    if item["split"] == "train":
        start = time.perf_counter()
        resized = np.round(resize_image(rgb, settings["image_size"]).transpose(1, 2, 0) * 255.0).astype(np.uint8)
        labels = slic_labels(resized, settings["n_segments"], settings["compactness"])
        row["superpixels"] = encode_labels(labels)
        row["slic_s"] = time.perf_counter() - start
    return row


# --- planning and writing (driver + Ray Data) ---------------------------------------------------------


def _file_sizes(uris: list[str]) -> dict[str, int]:
    """Sizes in bytes of source files (one listing call per filesystem)."""
    sizes: dict[str, int] = {}
    groups: dict[int, tuple[Any, list[tuple[str, str]]]] = {}
    for uri in uris:
        fs, path = store.resolve(uri)
        groups.setdefault(id(fs), (fs, []))[1].append((uri, path))
    for fs, pairs in groups.values():
        infos = store.retrying(pairs[0][0], lambda fs=fs, pairs=pairs: fs.get_file_info([p for _, p in pairs]))
        sizes.update({uri: info.size or 0 for (uri, _), info in zip(pairs, infos)})
    return sizes


def _rows_per_file(cfg: IngestConfig, split_items: list[dict[str, Any]], sizes: dict[str, int]) -> int:
    if cfg.rows_per_file:
        return cfg.rows_per_file
    mean_bytes = max(1, sum(sizes[item["source_uri"]] for item in split_items) // max(1, len(split_items)))
    low, high = _ROWS_PER_FILE_RANGE
    return int(min(high, max(low, _TARGET_FILE_BYTES // mean_bytes)))


def _plan(cfg: IngestConfig, products: dict[str, list[str]]) -> tuple[list[dict[str, Any]], dict[str, list]]:
    """Every item to process, each assigned to the shard file (``chunk``) it lands in; plus planning skips.

    Chunks are consecutive runs of the sorted image_ids of one split, so shard files and their rows are the
    same on every run, whatever the cluster size.
    """
    items: list[dict[str, Any]] = []
    skipped: dict[str, list[dict[str, str]]] = {}
    for product, uris in products.items():
        product_items, skipped[product] = _plan_product(cfg.source, product, uris)
        if not any(item["split"] == "train" for item in product_items):
            raise IngestError(store.join(cfg.source, product), "no train/good images")
        sizes = _file_sizes([item["source_uri"] for item in product_items])
        for split in SPLITS:
            split_items = [item for item in product_items if item["split"] == split]
            per_file = _rows_per_file(cfg, split_items, sizes) if split_items else 1
            for index, item in enumerate(split_items):
                item["chunk"] = f"{product}/{split}/part-{index // per_file:05d}.parquet"
        items.extend(product_items)
    return items, skipped


def _process_chunk(batch: dict[str, np.ndarray], settings: dict[str, Any], staging: str) -> pa.Table:
    """Ray Data ``map_batches`` UDF (``batch_size=1``): one chunk of planned items -> one staged Parquet file.

    Reads, decodes, validates and SLIC-labels each item (:func:`_process_item`), writes the valid rows sorted by
    image_id (zstd) to ``<staging>/<chunk>``, and returns every item's metadata (``_META_COLUMNS``, no pixels).
    """
    chunk = str(batch["chunk"][0])
    with store.retry_budget(settings["store_retry_s"]):
        rows = [_process_item(item, settings) for item in json.loads(str(batch["items"][0]))]
        valid = sorted((row for row in rows if row["error"] is None), key=lambda row: row["image_id"])
        if valid:
            shard = pa.Table.from_pylist(valid, schema=SCHEMA)
            uri = store.join(staging, chunk)
            fs, path = store.resolve(uri)
            if isinstance(fs, pafs.LocalFileSystem):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            store.retrying(uri, lambda: pq.write_table(shard, path, filesystem=fs, compression="zstd"))
    return pa.Table.from_pylist([{key: row[key] for key in _META_COLUMNS} for row in rows], schema=_meta_schema())


def _meta_schema() -> pa.Schema:
    extra = {
        "mask_sha256": pa.string(),
        "error": pa.string(),
        "source_uri": pa.string(),
        "decode_s": pa.float64(),
        "slic_s": pa.float64(),
    }
    shard = SCHEMA
    return pa.schema([(name, shard.field(name).type if name in shard.names else extra[name]) for name in _META_COLUMNS])


def _commit(product_uri: str, staged_uri: str) -> dict[str, list[dict[str, Any]]]:
    """Swap a product's staged shards in; return the manifest's ``files`` section. The manifest goes first."""
    store.delete(store.join(product_uri, MANIFEST))
    files: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        store.delete(store.join(product_uri, split), recursive=True)
        files[split] = []
        for index, uri in enumerate(store.list_files(store.join(staged_uri, split), suffixes=(".parquet",))):
            rows = committed_rows(uri)
            relative = f"{split}/part-{index:05d}.parquet"
            store.move(uri, store.join(product_uri, relative))
            files[split].append({"path": relative, "rows": rows})
    return files


def _content_hash(cfg: IngestConfig, rows: list[dict[str, Any]], skipped: list[dict[str, str]]) -> str:
    """Hash of the settings, every row's identity and content digests, and the skipped files' relative paths."""
    digest = hashlib.sha256()
    header = {"format": FORMAT, "slic": cfg.slic_settings(), "mask_threshold": cfg.mask_threshold}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for row in sorted(rows, key=lambda r: r["image_id"]):
        fields = (row["image_id"], row["label"], row["defect_type"], row["sha256"], row["mask_sha256"], row["notes"])
        digest.update(json.dumps(fields).encode())
    for entry in sorted(store.relative(s["file"], cfg.source) for s in skipped):
        digest.update(entry.encode())
    return f"sha256:{digest.hexdigest()}"


def _source_shape(rows: list[dict[str, Any]]) -> list[int]:
    """The median (height, width) of a product's usable train images: the shape its input should keep."""
    train = [row for row in rows if row["split"] == "train"]
    return [int(np.median([row["height"] for row in train])), int(np.median([row["width"] for row in train]))]


def _warn_if_distorted(product: str, source_shape: list[int], image_size: int | tuple[int, int]) -> None:
    """Warn when resizing the images to ``image_size`` changes their aspect by more than :data:`ASPECT_TOLERANCE`."""
    height, width = input_shape(image_size)
    squash = (source_shape[0] / source_shape[1]) / (height / width)
    factor = max(squash, 1.0 / squash)
    if factor <= ASPECT_TOLERANCE:
        return
    suggested = matching_input_shape(source_shape, image_size)
    logger.warning(
        "%s: the train images are %d x %d px (median, height x width); an input of %d x %d changes their aspect "
        "%.1fx and distorts every part and defect. For about the same pixels at their aspect: --image-size %dx%d "
        "(and model.image_size=[%d, %d] in training)",
        *(product, *source_shape, height, width, factor),
        *(*suggested, *suggested),
    )


def _finish_product(
    cfg: IngestConfig, product: str, meta: list[dict[str, Any]], skipped: list[dict[str, str]], staging: str
) -> dict[str, Any]:
    """Commit one product's staged shards, then write its report and (last) its manifest."""
    good = [row for row in meta if row["error"] is None]
    skipped = sorted(
        skipped + [{"file": row["source_uri"], "reason": row["error"]} for row in meta if row["error"] is not None],
        key=lambda entry: entry["file"],
    )
    product_uri = dataset_uri(cfg.store, cfg.dataset, product)
    files = _commit(product_uri, store.join(staging, product))
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    for (split, defect), n in sorted(Counter((row["split"], row["defect_type"]) for row in good).items()):
        counts[split][defect] = n
    source_shape = _source_shape(good)
    _warn_if_distorted(product, source_shape, cfg.image_size)
    manifest = {
        "format": FORMAT,
        "dataset": cfg.dataset,
        "product": product,
        "source": store.join(cfg.source, product),
        "image_size": cfg.image_size,
        "source_shape": source_shape,
        "slic": cfg.slic_settings(),
        "counts": counts,
        "n_rows": {split: sum(f["rows"] for f in files[split]) for split in SPLITS},
        "files": files,
        "n_skipped": len(skipped),
        "content_hash": _content_hash(cfg, good, skipped),
    }
    report = {
        "product": product,
        "source": manifest["source"],
        "skipped": skipped,
        "converted": [{"file": row["source_uri"], "notes": row["notes"]} for row in good if row["notes"]],
        "timing": {
            "images": len(good),
            "decode_s": round(sum(row["decode_s"] for row in good), 3),
            "slic_s": round(sum(row["slic_s"] for row in good), 3),
        },
    }
    store.replace_json(store.join(product_uri, "ingest_report.json"), report)
    store.replace_json(store.join(product_uri, MANIFEST), manifest)
    rows = manifest["n_rows"]
    logger.info(
        "%s: %d train, %d test rows, %d skipped -> %s", product, rows["train"], rows["test"], len(skipped), product_uri
    )
    return manifest


def run_ingest(cfg: IngestConfig) -> dict[str, Any]:
    """Ingest every product of ``cfg.source``; return the dataset index (also written to the store).

    One Ray Data pipeline for all products: ``from_items`` (one row per planned shard file) -> ``map_batches``
    (read, decode, validate, pair masks, SLIC, write one staged Parquet file). Only metadata comes back to the
    driver, which then swaps each product's shards in and writes its manifest.

    A store failure that outlasts ``cfg.store_retry_s`` raises :class:`store.StoreError` before any product is
    committed when it happens while listing or processing; during the commit itself, the product being swapped
    is left without a manifest ("not ingested", never a mix) until the next run.
    """
    with store.retry_budget(cfg.store_retry_s):
        return _run_ingest(cfg)


def _staging_name(now: dt.datetime | None = None) -> str:
    """``_staging-<UTC time>-<random>``: the time lets a later run tell a crashed run's leftovers by their age."""
    stamp = (now or dt.datetime.now(dt.timezone.utc)).strftime(_STAMP)
    return f"_staging-{stamp}-{uuid.uuid4().hex[:12]}"


def sweep_stale_staging(root: str, now: dt.datetime | None = None) -> list[str]:
    """Remove the ``_staging-<time>-*`` folders under a dataset that are older than :data:`STALE_STAGING_S`.

    They are what a run left when it crashed, or failed during an outage that its own cleanup could not bridge
    (:func:`store.discard`). A younger one may belong to an ingest running now, so it is left alone; a name
    without a time (from before this format) is left alone too. Returns the names removed.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    removed = []
    for name in store.list_dirs(root):
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "_staging":
            continue
        try:
            started = dt.datetime.strptime(parts[1], _STAMP).replace(tzinfo=dt.timezone.utc)
        except ValueError:
            continue
        if (now - started).total_seconds() > STALE_STAGING_S:
            store.discard(store.join(root, name))
            removed.append(name)
    if removed:
        logger.info("removed %d stale staging folder(s) of earlier runs: %s", len(removed), ", ".join(removed))
    return removed


def _run_ingest(cfg: IngestConfig) -> dict[str, Any]:
    from tsdn_platform.ray_session import init_ray

    products = discover(cfg.source, cfg.products)
    root = dataset_uri(cfg.store, cfg.dataset)
    store.require_folder_or_absent(root)  # a --store that is a file: before Ray, not a traceback from its tasks
    store.list_files(root, recursive=False)  # fail fast (a clear StoreError) if the store is unusable
    items, planned_skips = _plan(cfg, products)
    init_ray(cfg.address)
    settings = cfg.item_settings()
    sweep_stale_staging(root)
    staging = store.join(root, _staging_name())
    chunks: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        chunks.setdefault(item.pop("chunk"), []).append(item)
    planned = [{"chunk": name, "items": json.dumps(chunk)} for name, chunk in sorted(chunks.items())]
    ds = ray.data.from_items(planned, override_num_blocks=len(planned)).map_batches(
        _process_chunk, fn_kwargs={"settings": settings, "staging": staging}, batch_size=1, **cfg.ray_remote_args
    )
    # A task's StoreError then reaches the driver as itself (a RayTaskError that is a StoreError, kind intact)
    # instead of a UserCodeException that keeps only its text.
    ds.context.raise_original_map_exception = True
    try:
        meta = ds.take_all()
        by_product: dict[str, list[dict[str, Any]]] = {product: [] for product in products}
        for row in meta:
            by_product[row["product"]].append(row)
        for product, rows in by_product.items():
            if not any(row["split"] == "train" and row["error"] is None for row in rows):
                train_errors = {row["error"] for row in rows if row["error"] and row["split"] == "train"}
                reasons = "; ".join(sorted(train_errors)[:3])
                raise IngestError(store.join(cfg.source, product), f"every train image was rejected ({reasons})")
        manifests = {p: _finish_product(cfg, p, by_product[p], planned_skips[p], staging) for p in products}
    except BaseException:
        store.discard(staging)
        raise
    store.delete(staging, recursive=True)

    index_uri = store.join(root, MANIFEST)
    entries = (store.read_json_or_none(index_uri) or {}).get("products", {})
    for product, manifest in manifests.items():
        entries[product] = {key: manifest[key] for key in ("content_hash", "counts", "n_rows", "source")}
    combined = hashlib.sha256(json.dumps({p: e["content_hash"] for p, e in sorted(entries.items())}).encode())
    index = {
        "format": FORMAT,
        "dataset": cfg.dataset,
        "image_size": cfg.image_size,
        "slic": cfg.slic_settings(),
        "products": dict(sorted(entries.items())),
        "content_hash": f"sha256:{combined.hexdigest()}",
    }
    store.replace_bytes(store.join(root, "ingest_config.yaml"), config_to_yaml(cfg).encode())
    store.replace_json(index_uri, index)
    return index


# --- CLI ------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """``tsdn ingest SOURCE --store STORE --dataset NAME [--products a,b] [--image-size N]``"""
    explicit = {
        "source": args.source,
        "store": args.store,
        "dataset": args.dataset,
        "products": args.products,
        "image_size": args.image_size,
        "address": args.address,
    }
    cfg = load_config(IngestConfig, args.config, args.overrides, explicit=explicit)
    index = run_ingest(cfg)
    root = dataset_uri(cfg.store, cfg.dataset)
    for product, entry in index["products"].items():
        print(
            f"{product}: {entry['n_rows']['train']} train, {entry['n_rows']['test']} test rows, {entry['content_hash']}"
        )
    print(f"dataset {cfg.dataset}: {root} ({index['content_hash']})")
    return 0
