"""The score-row contract: the columns of a score job's Parquet rows, where they lie, the one map codec, the
``<shard>#<image_id>`` source URIs, and which files a committed job consists of.

The score job (:mod:`tsdn_platform.score`) writes these rows and the report (:mod:`tsdn_platform.report`)
reads them; both go through this module, and so should any other reader in the project.

Layout::

    <output>/<product>/part-<job>-<attempt>-<task>.parquet   one folder per product line, named after it
    <output>/@unrouted/part-*.parquet                        rows whose product is unknown (product null)
    <output>/_manifest.json                                  the commit record (see tsdn_platform.score);
                                                             its ``products.<p>.files`` are the job's parts
    <output>/_staging/<job>/...                              parts not yet committed (never read)

The folders are plain names, not Hive ``key=value`` partitions, and every file carries ``product`` as a plain
string column: no reader infers a second ``product`` column from the path, whose type would differ by reader
and by name (a Hive reader types a product ``4711`` as an integer, a dictionary elsewhere), and which clashes
with the file's own column. ``@unrouted`` is no valid product name (those start alphanumeric) and, unlike a
name starting with ``_`` or ``.``, is not skipped by dataset readers. Readers that start with ``_`` skip
``_manifest.json`` and ``_staging/``.

Columns (:data:`SCHEMA`; one schema for every product, so the whole output reads as one table):

==================  ===================  =====================================================================
column              type                 meaning
==================  ===================  =====================================================================
image_id            string               the input's id (path relative to the input, or the shard's image_id)
source_uri          string               the image's URI; ``<shard.parquet>#<image_id>`` for ingested shards
product             string               product line (null when the path matched no product pattern)
model_version       string               the registry version that scored it (null without a model)
anomaly_score       float64              raw image score, in the model's own units
normalized_score    float64              the score by the model's calibration: 0.5 at the threshold
is_anomalous        bool                 ``anomaly_score >= threshold``
threshold           float64              the model's calibrated raw-score threshold
error               string               null, or why this input could not be scored (its score columns null)
label               int8                 ground truth of an ingested split: 0 normal, 1 anomalous; else null
defect_type         string               ``"good"`` or the defect folder of an ingested split; else null
has_mask            bool                 whether the shard row has a defect mask; null for raw images
score_map_height    int32                H of ``score_map`` (null where no map)
score_map_width     int32                W of ``score_map``
score_map           large_list<float16>  the anomaly map, H*W values in row-major order (null where no map)
==================  ===================  =====================================================================

Reading with default readers (a local folder; for S3 pass ``filesystem=`` or an ``s3://`` URI)::

    import pyarrow.parquet as pq, pandas as pd, duckdb, numpy as np
    table = pq.read_table("<output>")                      # every product; or "<output>/<product>"
    maps = decode_maps(table)                              # this module: (H, W) float16 arrays / None
    df = pd.read_parquet("<output>")
    m = df.score_map[0].reshape(int(df.score_map_height[0]), int(df.score_map_width[0]))
    rel = duckdb.sql("SELECT * FROM read_parquet('<output>/*/*.parquet')")  # maps are FLOAT[] lists
    # the value at (y, x) in SQL: score_map[y * score_map_width + x + 1]

pandas reads the nullable integer columns as float64 when a column holds nulls (error rows), hence ``int()``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tsdn_platform import store
from tsdn_platform.names import NAME_PATTERN

__all__ = [
    "MANIFEST",
    "MAP_COLUMNS",
    "SCHEMA",
    "STAGING",
    "TRUTH_COLUMNS",
    "UNROUTED",
    "committed_files",
    "decode_maps",
    "encode_maps",
    "parse_source",
    "product_folder",
    "read_manifest",
    "row_fingerprint",
    "shard_source",
]

MANIFEST = "_manifest.json"
STAGING = "_staging"

UNROUTED = "@unrouted"
MAP_COLUMNS = ("score_map_height", "score_map_width", "score_map")
TRUTH_COLUMNS = ("label", "defect_type", "has_mask")

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("product", pa.string()),
        ("model_version", pa.string()),
        ("anomaly_score", pa.float64()),
        ("normalized_score", pa.float64()),
        ("is_anomalous", pa.bool_()),
        ("threshold", pa.float64()),
        ("error", pa.string()),
        ("label", pa.int8()),
        ("defect_type", pa.string()),
        ("has_mask", pa.bool_()),
        ("score_map_height", pa.int32()),
        ("score_map_width", pa.int32()),
        ("score_map", pa.large_list(pa.float16())),
    ]
)


def product_folder(product: str | None) -> str:
    """The folder (relative to the output) of a product's rows: its name, or :data:`UNROUTED` for None."""
    if product is None:
        return UNROUTED
    if not NAME_PATTERN.match(product):
        msg = f"product {product!r}: not a product name, cannot name a score folder"
        raise ValueError(msg)
    return product


def row_fingerprint(products: Sequence[str | None], image_ids: Sequence[str]) -> int:
    """An order-free fingerprint of a multiset of rows, keyed by ``(product, image_id)``: the sum of each key's
    64-bit BLAKE2b digest, modulo 2**64.

    The score job commits only when the rows it wrote have the fingerprint of its inputs, so a row written twice
    and another missing (which leave the count unchanged) stop the commit. Sums of fingerprints are fingerprints
    of the union: each write task fingerprints its own rows.
    """
    total = 0
    for product, image_id in zip(products, image_ids, strict=True):
        key = f"{'' if product is None else product}\x00{image_id}".encode()
        total += int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return total % 2**64


def shard_source(shard_uri: str, image_id: str) -> str:
    """The ``source_uri`` of a row scored from an ingested shard: ``<shard.parquet>#<image_id>``."""
    return f"{shard_uri}#{image_id}"


def parse_source(source_uri: str) -> tuple[str, str | None]:
    """``source_uri`` -> ``(file or shard URI, image_id in the shard or None)``; the inverse of :func:`shard_source`.

    A plain file URI (a raw image) gives ``(uri, None)``; so does a ``#`` in a raw file's name, since only a
    ``.parquet`` base names a shard.
    """
    base, sep, image_id = source_uri.partition("#")
    if sep and image_id and base.endswith(".parquet"):
        return base, image_id
    return source_uri, None


def read_manifest(output: str) -> dict[str, Any] | None:
    """The committed job's ``_manifest.json`` under ``output``, or None when nothing was committed there."""
    return store.read_json_or_none(store.join(output, MANIFEST))


def committed_files(output: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """The URIs of the parts of the job committed at ``output``, as its manifest lists them (every product).

    Raises ValueError when ``output`` holds no committed job (no manifest).
    """
    manifest = manifest if manifest is not None else read_manifest(output)
    if manifest is None:
        msg = f"{output}: no committed score job (no {MANIFEST})"
        raise ValueError(msg)
    return [store.join(output, f) for entry in manifest.get("products", {}).values() for f in entry.get("files", [])]


def encode_maps(maps: Sequence[np.ndarray | None]) -> dict[str, pa.Array]:
    """One (H, W) map (any float dtype) or None per row -> the :data:`MAP_COLUMNS` arrays (float16 values).

    Shapes may differ from row to row.
    """
    heights, widths, flats = [], [], []
    for i, score_map in enumerate(maps):
        if score_map is None:
            heights.append(None)
            widths.append(None)
            flats.append(None)
            continue
        array = np.asarray(score_map)
        if array.ndim != 2:
            msg = f"encode_maps: row {i}: expected an (H, W) map, got shape {array.shape}"
            raise ValueError(msg)
        heights.append(array.shape[0])
        widths.append(array.shape[1])
        flats.append(np.ascontiguousarray(array, np.float16).ravel())
    return {
        "score_map_height": pa.array(heights, pa.int32()),
        "score_map_width": pa.array(widths, pa.int32()),
        "score_map": pa.array(flats, SCHEMA.field("score_map").type),
    }


def decode_maps(table: pa.Table) -> list[np.ndarray | None]:
    """The :data:`MAP_COLUMNS` of score rows -> one (H, W) float16 array, or None where the row has no map.

    Raises ValueError when a column is missing or a map's length is not its height x width.
    """
    missing = [c for c in MAP_COLUMNS if c not in table.column_names]
    if missing:
        msg = f"score rows lack column(s) {', '.join(missing)} (not the score-row contract of tsdn_platform.score_rows)"
        raise ValueError(msg)
    column = table["score_map"].combine_chunks()
    heights = table["score_map_height"].to_pylist()
    widths = table["score_map_width"].to_pylist()
    valid = pc.is_valid(column).to_pylist()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    maps: list[np.ndarray | None] = []
    for i, ok in enumerate(valid):
        if not ok:
            maps.append(None)
            continue
        flat = values[offsets[i] : offsets[i + 1]]
        height, width = heights[i], widths[i]
        if height is None or width is None or flat.size != height * width:
            msg = f"score row {i}: score_map holds {flat.size} values, not height x width = {height} x {width}"
            raise ValueError(msg)
        maps.append(flat.reshape(height, width))
    return maps
