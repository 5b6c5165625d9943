"""The stages of the score job's Ray Data pipeline (:mod:`tsdn_platform.score` builds and runs it).

    decode_inputs (CPU tasks)  ->  Scorer (actor pool; the Predictors)  ->  ScoreDatasink (write tasks)

Each stage is a plain callable Ray Data ships to its workers: ``select_shard_rows`` turns ingested shard rows into
the decode stage's input, ``decode_inputs`` reads and decodes a batch (an input's own error becomes that row's
``error``; a store failure propagates and fails the job), ``Scorer`` scores decoded rows into the score-row
contract (:mod:`tsdn_platform.score_rows`), and ``ScoreDatasink`` stages one Parquet part per product and
write task. This module imports torch only inside ``Scorer`` (through the Predictor), so the write tasks that
deserialize the sink start without it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor
from ray.data.datasource.datasink import WriteResult

from tsdn.image import decode_image, to_rgb
from tsdn_platform import store
from tsdn_platform.score_rows import (
    MAP_COLUMNS,
    SCHEMA,
    TRUTH_COLUMNS,
    UNROUTED,
    encode_maps,
    product_folder,
    row_fingerprint,
    shard_source,
)

__all__ = [
    "DECODED_SCHEMA",
    "MAX_ERROR_SAMPLES",
    "ScoreDatasink",
    "Scorer",
    "decode_inputs",
    "read_input",
    "select_shard_rows",
]

MAX_ERROR_SAMPLES = 20
# The sink's ``store_retry_s`` default (a parameter named like the module would shadow it).
_STORE_RETRY_S = store.DEFAULT_RETRY_S


DECODED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("product", pa.string()),
        ("pixels", pa.large_binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("error", pa.string()),
        *((name, SCHEMA.field(name).type) for name in TRUTH_COLUMNS),
    ]
)


def read_input(row: dict[str, Any]) -> bytes:
    """An input's encoded bytes. ValueError when the object vanished since the listing (this input's error);
    any other :class:`store.StoreError` is the store failing, and propagates to fail the job."""
    if "image" in row:
        return row["image"]
    try:
        return store.read_bytes(row["source_uri"])
    except store.StoreError as exc:
        if exc.kind != store.NOT_FOUND:
            raise
        msg = f"{row['source_uri']}: no longer exists (listed, then gone before it was read)"
        raise ValueError(msg) from exc


def decode_inputs(batch: pa.Table, unavailable: Mapping[str, str], max_pixels: int, store_retry_s: float) -> pa.Table:
    """Read (raw inputs) and decode one batch into RGB pixels; input errors become rows with ``error`` set.

    Output ``pixels``: ``(height, width, 3)`` uint8, row-major bytes.
    """
    with store.retry_budget(store_retry_s):
        return _decode_rows(batch, unavailable, max_pixels)


def _decode_rows(batch: pa.Table, unavailable: Mapping[str, str], max_pixels: int) -> pa.Table:
    rows = batch.to_pylist()
    out: dict[str, list[Any]] = {name: [] for name in DECODED_SCHEMA.names}
    for row in rows:
        uri = row["source_uri"]
        product = row["product"]
        pixels, height, width, error = None, None, None, None
        if product is None:
            error = f"{uri}: path does not match the product pattern"
        elif product in unavailable:
            error = f"{uri}: {unavailable[product]}"
        else:
            try:
                rgb, _ = to_rgb(decode_image(read_input(row), uri, max_pixels))
                height, width = rgb.shape[:2]
                pixels = np.ascontiguousarray(rgb).tobytes()
            except (ValueError, OSError) as exc:  # ImageDecodeError is a ValueError; store failures are not caught
                error = str(exc)
        truth = [row.get(name) for name in TRUTH_COLUMNS]  # raw images have none
        for name, value in zip(
            DECODED_SCHEMA.names, (row["image_id"], uri, product, pixels, height, width, error, *truth), strict=True
        ):
            out[name].append(value)
    return pa.table(out, schema=DECODED_SCHEMA)


class Scorer:
    """Scorer actor: loads every product's pinned Predictor once (on its first batch), then scores decoded batches.

    Not in ``__init__``: an actor whose ``__init__`` raises reaches the driver as an ActorDiedError that keeps
    its cause only as text, so a store outage while loading weights could not be told from a bug. Raised from
    a batch, the StoreError reaches the driver as itself.
    """

    def __init__(
        self,
        store_uri: str,
        versions: Mapping[str, str],
        shapes: Mapping[str, tuple[int, int]],
        batch_size: int,
        device: str | None,
        store_retry_s: float,
        runtime: str = "torch",
    ) -> None:
        self._store_uri = store_uri
        self._runtime = runtime
        self._versions = dict(versions)
        self._shapes = {p: tuple(s) for p, s in shapes.items()}
        self._batch_size = batch_size
        self._device = device
        self._store_retry_s = store_retry_s
        self._loaded: dict[str, Any] | None = None

    def _predictors(self) -> dict[str, Any]:
        if self._loaded is None:
            from tsdn_platform.registry import Registry

            registry = Registry(self._store_uri)
            with store.retry_budget(self._store_retry_s):
                loaded = {
                    p: registry.load_predictor(p, v, device=self._device, runtime=self._runtime)[0]
                    for p, v in self._versions.items()
                }
            for predictor in loaded.values():
                predictor.batch_size = self._batch_size  # one forward pass per product per Ray Data batch
            self._loaded = loaded
        return self._loaded

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        by_product: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            if row["error"] is None:
                by_product[row["product"]].append(i)
        results: dict[int, Any] = {}
        for product, indices in by_product.items():
            images = [
                np.frombuffer(bytearray(rows[i]["pixels"]), np.uint8).reshape(rows[i]["height"], rows[i]["width"], 3)
                for i in indices
            ]
            detections = self._predictors()[product].predict(images, map_size=self._shapes[product])
            results.update(zip(indices, detections, strict=True))
        scalars = [name for name in SCHEMA.names if name not in MAP_COLUMNS]
        out: dict[str, list[Any]] = {name: [] for name in scalars}
        maps = []
        for i, row in enumerate(rows):
            det = results.get(i)
            values = {
                **{name: row[name] for name in ("image_id", "source_uri", "product", "error", *TRUTH_COLUMNS)},
                "model_version": self._versions.get(row["product"]),
                "anomaly_score": None if det is None else float(det.anomaly_score),
                "normalized_score": None if det is None else float(det.normalized_score),
                "is_anomalous": None if det is None else bool(det.is_anomalous),
                "threshold": None if det is None else float(det.threshold),
            }
            for name in scalars:
                out[name].append(values[name])
            maps.append(None if det is None else det.anomaly_map)
        columns = {name: pa.array(out[name], SCHEMA.field(name).type) for name in scalars} | encode_maps(maps)
        return pa.table({name: columns[name] for name in SCHEMA.names}, schema=SCHEMA)


class ScoreDatasink(Datasink):
    """Writes each write task's rows to ``<staging>/<product>/part-<part_prefix>-<task>.parquet`` (zstd).

    ``results`` (on the driver, after the write): one dict per file with ``product``, ``file``, ``rows``,
    ``fingerprint`` (:func:`~tsdn_platform.score_rows.row_fingerprint` of its rows), ``errors`` and a few
    ``error_samples``.
    """

    def __init__(
        self,
        staging: str,
        part_prefix: str,
        min_rows: int,
        store_retry_s: float = _STORE_RETRY_S,
    ) -> None:
        self._staging = staging
        self._part_prefix = part_prefix
        self._min_rows = min_rows
        self._store_retry_s = store_retry_s
        self.results: list[dict[str, Any]] = []

    @property
    def min_rows_per_write(self) -> int:
        return self._min_rows

    def write(self, blocks: Iterable[Any], ctx: Any) -> list[dict[str, Any]]:
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        written = []
        unrouted = pc.is_null(table["product"])
        for product in sorted({p or UNROUTED for p in table["product"].to_pylist()}):
            # equal() is null for null products, and filter() drops null selections
            part = table.filter(unrouted if product == UNROUTED else pc.equal(table["product"], product))
            name = f"part-{self._part_prefix}-{ctx.task_idx:05d}.parquet"
            uri = store.join(self._staging, product_folder(None if product == UNROUTED else product), name)
            buffer = pa.BufferOutputStream()
            pq.write_table(part, buffer, compression="zstd")
            with store.retry_budget(self._store_retry_s):
                store.write_bytes(uri, buffer.getvalue().to_pybytes())
            errors = part.filter(pc.is_valid(part["error"]))["error"].to_pylist()
            written.append(
                {
                    "product": product,
                    "file": uri,
                    "rows": part.num_rows,
                    "fingerprint": row_fingerprint(part["product"].to_pylist(), part["image_id"].to_pylist()),
                    "errors": len(errors),
                    "error_samples": errors[:MAX_ERROR_SAMPLES],
                }
            )
        return written

    def on_write_complete(self, write_result: WriteResult) -> None:
        self.results = [r for returned in write_result.write_returns for r in returned]


def select_shard_rows(batch: pa.Table, uris: Mapping[str, str], split: str | None, product: str | None) -> pa.Table:
    """Ingested shard rows -> the decode stage's input; ``source_uri`` = ``<shard uri>#<image_id>``."""
    if split is not None:
        batch = batch.filter(pc.field("split") == split)
    if product is not None:
        batch = batch.filter(pc.field("product") == product)
    sources = [
        shard_source(uris[path], str(image_id)) for path, image_id in zip(batch["path"].to_pylist(), batch["image_id"])
    ]
    names = batch.column_names
    nulls = pa.nulls(batch.num_rows)
    return pa.table(
        {
            "image_id": batch["image_id"],
            "source_uri": pa.array(sources, pa.string()),
            "product": batch["product"],
            "image": batch["image"],
            "label": batch["label"].cast(pa.int8()) if "label" in names else nulls.cast(pa.int8()),
            "defect_type": batch["defect_type"] if "defect_type" in names else nulls.cast(pa.string()),
            "has_mask": pc.is_valid(batch["mask"]) if "mask" in names else nulls.cast(pa.bool_()),
        }
    )
