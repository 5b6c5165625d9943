"""The shard contract: what ``tsdn ingest`` writes and every reader reads, in one place.

Layout (``<dataset> = <store>/datasets/<name>``)::

    <dataset>/<product>/train/part-00000.parquet ...   zstd; rows sorted by image_id
    <dataset>/<product>/test/part-00000.parquet ...
    <dataset>/<product>/manifest.json                  written last: counts, files, settings, content_hash
    <dataset>/<product>/ingest_report.json             every skipped or converted file, with its reason
    <dataset>/manifest.json                            the index: one entry per product (content hashes, counts)
    <dataset>/ingest_config.yaml                       the resolved IngestConfig

Rows (:data:`SCHEMA`): ``image_id`` (the source path relative to the root, ``<product>/<split>/<defect>/<file>``),
``product``, ``split``, ``label`` (int8: 0 normal, 1 anomalous), ``defect_type``, ``image`` (the original
encoded bytes), ``mask`` (binary 0/255 PNG, null for good images), ``height``, ``width`` (original),
``sha256`` (of ``image``), ``source_mode`` (the original PIL mode), ``superpixels``
(:func:`tsdn.surf.encode_labels` of the (S, S) SLIC map, train split; null on test), ``fold`` (uint8 0..9
from the image_id hash, for a stable validation hold-out) and ``notes`` (conversions; empty when none).

The product manifest is the contract for which files hold a product's rows: its ``files`` section lists every
committed shard with its row count (:func:`committed_files`). No reader lists a directory to find shards, so a
file left by an interrupted run is never read. A product without a manifest is "not ingested"
(:class:`IngestError`), never half a product.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tsdn_platform import store
from tsdn_platform.layout import dataset_uri

__all__ = [
    "FORMAT",
    "MANIFEST",
    "SCHEMA",
    "SPLITS",
    "IngestError",
    "committed_files",
    "committed_rows",
    "files_under",
    "fold_of",
    "ingested_products",
    "read_index",
    "read_manifest",
    "read_split",
    "resize_image",
]

FORMAT = "tsdn-shards/1"
SPLITS = ("train", "test")
MANIFEST = "manifest.json"
SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("product", pa.string()),
        ("split", pa.string()),
        ("label", pa.int8()),
        ("defect_type", pa.string()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("sha256", pa.string()),
        ("source_mode", pa.string()),
        ("superpixels", pa.binary()),
        ("fold", pa.uint8()),
        ("notes", pa.string()),
    ]
)


class IngestError(ValueError):
    """A source or dataset that cannot be ingested or read; the message names the input. Picklable."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason

    def __reduce__(self) -> tuple[type[IngestError], tuple[str, str]]:
        return (type(self), (self.where, self.reason))


# --- where things are ----------------------------------------------------------------------------------


def fold_of(image_id: str) -> int:
    """The row's ``fold`` (0..9): a stable hash of its image_id, the same on every run and machine."""
    return int(hashlib.sha1(image_id.encode()).hexdigest()[:8], 16) % 10


# --- manifests --------------------------------------------------------------------------------------


def read_manifest(store_uri: str, dataset: str, product: str) -> dict[str, Any]:
    """The product's ``manifest.json``; :class:`IngestError` ("not ingested") when it has none."""
    missing = f"product {product!r} is not ingested in dataset {dataset!r}"
    return _read_json(dataset_uri(store_uri, dataset, product), missing)


def read_index(store_uri: str, dataset: str) -> dict[str, Any]:
    """The dataset's index ``<dataset>/manifest.json``; :class:`IngestError` when the dataset has none."""
    return _read_json(dataset_uri(store_uri, dataset), f"dataset {dataset!r} is not ingested")


def _read_json(folder: str, missing: str) -> dict[str, Any]:
    uri = store.join(folder, MANIFEST)
    data = store.read_json_or_none(uri)
    if data is None:
        raise IngestError(uri, f"{missing} (or is being re-ingested); run `tsdn ingest`")
    return data


def ingested_products(store_uri: str, dataset: str) -> list[str]:
    """The products the dataset's index lists that have a product manifest now (sorted); ``[]`` without an index.

    A product whose re-ingest was interrupted mid-swap is in the index but has no manifest: it is left out.
    """
    try:
        listed = read_index(store_uri, dataset)["products"]
    except IngestError:
        return []
    return [p for p in sorted(listed) if store.exists(store.join(dataset_uri(store_uri, dataset, p), MANIFEST))]


def committed_files(store_uri: str, dataset: str, product: str, split: str, manifest: dict | None = None) -> list[str]:
    """The URIs of the product's committed shard files of ``split``, as its manifest lists them."""
    if split not in SPLITS:
        msg = f"split {split!r}: expected one of {', '.join(SPLITS)}"
        raise ValueError(msg)
    manifest = manifest if manifest is not None else read_manifest(store_uri, dataset, product)
    product_uri = dataset_uri(store_uri, dataset, product)
    return [store.join(product_uri, entry["path"]) for entry in manifest["files"][split]]


def files_under(uri: str, split: str | None = None) -> list[str] | None:
    """The committed shard files below ``uri`` when a manifest governs it, else None.

    ``uri`` may be a dataset (its index lists the products), a product (its manifest) or a product's split
    folder (``<product>/train``); ``split`` keeps one split's files. Every file comes from a manifest: a shard an
    interrupted run left beside the committed ones is never returned.
    """
    root = uri.rstrip("/")
    parent, _, leaf = root.rpartition("/")
    manifest = store.read_json_or_none(store.join(parent, MANIFEST)) if leaf in SPLITS else None
    if manifest is not None:  # a product's split folder
        if split is not None and split != leaf:
            return []
        root, split = parent, leaf
    else:
        manifest = store.read_json_or_none(store.join(root, MANIFEST))
        if manifest is None:
            return None
    if "products" in manifest:  # a dataset's index: each product that has a manifest now (none mid-swap)
        pairs = [
            (store.join(root, p), store.read_json_or_none(store.join(root, p, MANIFEST)))
            for p in sorted(manifest["products"])
        ]
        governed = [(folder, product_manifest) for folder, product_manifest in pairs if product_manifest is not None]
    else:
        governed = [(root, manifest)]
    splits = [split] if split is not None else list(SPLITS)
    return [
        store.join(folder, entry["path"])
        for folder, product_manifest in governed
        for name in splits
        for entry in product_manifest["files"].get(name, [])
    ]


def committed_rows(uri: str) -> int:
    """Rows of one written shard file (its Parquet footer)."""
    fs, path = store.resolve(uri)
    return store.retrying(uri, lambda: pq.read_metadata(path, filesystem=fs).num_rows)


# --- the training reader ---------------------------------------------------------------------------


def resize_image(rgb: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, h, w) float32 in [0, 1] at ``size`` (S or [h, w]), by
    :func:`tsdn.resize.to_network_input` (what serving does)."""
    from tsdn.resize import to_network_input

    return to_network_input(np.ascontiguousarray(rgb, dtype=np.uint8), size)


def _read_shard(batch: dict[str, np.ndarray], columns: list[str]) -> pa.Table:
    """Ray Data UDF (``batch_size=1``): one shard file URI -> its rows (``columns`` only)."""
    uri = str(batch["uri"][0])
    fs, path = store.resolve(uri)
    return store.retrying(uri, lambda: pq.read_table(path, filesystem=fs, columns=columns))


def _decode_rows(batch: dict[str, np.ndarray], image_size: int | Sequence[int], image_dtype: str, superpixels: bool):
    """Ray Data UDF: shard rows -> decoded, resized arrays (see :func:`read_split`)."""
    from tsdn.image import decode_image, to_rgb
    from tsdn.resize import input_shape, resize_mask
    from tsdn.surf import decode_labels

    n = len(batch["image_id"])
    shape = input_shape(image_size)
    images = np.empty((n, 3, *shape), dtype=np.float32)
    masks = np.zeros((n, 1, *shape), dtype=np.float32)
    for i in range(n):
        name = str(batch["image_id"][i])
        images[i] = resize_image(to_rgb(decode_image(batch["image"][i], name))[0], image_size)
        if batch["mask"][i] is not None:
            mask = np.asarray(decode_image(batch["mask"][i], f"{name} (mask)").convert("L"))
            masks[i, 0] = resize_mask(mask, shape)
    out = {
        "image": np.round(images * 255.0).astype(np.uint8) if image_dtype == "uint8" else images,
        "mask": masks,
        "label": batch["label"].astype(np.int64),
        "fold": batch["fold"].astype(np.int64),
        "image_id": batch["image_id"],
        "defect_type": batch["defect_type"],
    }
    if superpixels:
        out["superpixels"] = np.stack([decode_labels(data, shape).astype(np.int32) for data in batch["superpixels"]])
    return out


def read_split(
    store_uri: str,
    dataset: str,
    product: str,
    split: str,
    columns: list[str] | None = None,
    image_dtype: str = "float32",
):
    """A Ray Dataset of one ingested split, decoded and resized to the manifest's ``image_size`` (S or [H, W]).

    Rows (numpy per batch; ``iter_torch_batches`` turns the numeric ones into tensors):
        image:       (3, S, S) float32 in [0, 1] (``image_dtype="float32"``) or uint8 (``"uint8"``)
        mask:        (1, S, S) float32 in {0, 1}; zeros for good images
        superpixels: (S, S) int32 SLIC labels 0..K-1 (train split only)
        label:       int64, 0 normal / 1 anomalous
        fold:        int64 0..9, stable per image (validation hold-out)
        image_id, defect_type: str (drop them with ``columns=`` before ``iter_torch_batches``)

    ``columns`` keeps only those output columns. Decoding runs in ``map_batches`` on CPU workers.
    """
    import ray

    if image_dtype not in ("float32", "uint8"):
        msg = f"image_dtype {image_dtype!r}: expected 'float32' or 'uint8'"
        raise ValueError(msg)
    manifest = read_manifest(store_uri, dataset, product)
    files = committed_files(store_uri, dataset, product, split, manifest)
    if not files:
        raise IngestError(dataset_uri(store_uri, dataset, product), f"no {split} rows in this dataset")
    superpixels = split == "train"
    needed = ["image_id", "label", "defect_type", "image", "mask", "fold"] + (["superpixels"] if superpixels else [])
    # One read task per shard file listed in the manifest (never a directory listing, so never a file of another
    # ingest run); ``ray.data.read_parquet`` would add a metadata pass that costs more than these small reads.
    ds = ray.data.from_items([{"uri": uri} for uri in files], override_num_blocks=len(files))
    ds = ds.map_batches(_read_shard, fn_kwargs={"columns": needed}, batch_size=1, batch_format="numpy")
    kwargs = {"image_size": manifest["image_size"], "image_dtype": image_dtype, "superpixels": superpixels}
    ds = ds.map_batches(_decode_rows, fn_kwargs=kwargs, batch_size=16, batch_format="numpy")
    if columns is not None:
        ds = ds.select_columns(list(columns))
    return ds
