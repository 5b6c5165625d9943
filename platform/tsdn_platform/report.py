"""A self-contained HTML page of scoring results, so a person can look rather than read.

:func:`write_report` takes score rows (a score job's output URI, one Parquet file, an Arrow table or row
dicts) and writes ``<out_dir>/index.html``: a per-product summary table (rows, errors, anomalous share,
model versions, and image/pixel AUROC and AUPRO when the job's ``_manifest.json`` carries them), then the
``top_n`` most anomalous images, sorted by score, each with the original, its heatmap overlay, score,
threshold, product, model version and verdict. Images are embedded as base64 PNG and there is no script,
so the page opens offline in any browser. Heatmap colours share one scale across the page (0 to the
largest value shown), so a hot-looking map is hot compared with the others, not just within itself.

Needs pyarrow, numpy and Pillow only (no Ray): the demo and notebooks call it on finished jobs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from tsdn.image import colorize, decode_image, to_rgb
from tsdn_platform import store

logger = logging.getLogger(__name__)

__all__ = ["overlay_heatmap", "write_report"]

DISPLAY_SIZE = 256
_ROW_COLUMNS = ("image_id", "source_uri", "product", "model_version", "anomaly_score", "is_anomalous", "threshold")
_ROW_COLUMNS_WITH_ERROR = (*_ROW_COLUMNS, "error")


def overlay_heatmap(image: np.ndarray, score_map: np.ndarray, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """``image``: (H, W, 3) uint8; ``score_map``: (h, w) float, resized to (H, W) -> (H, W, 3) uint8 blend."""
    height, width = image.shape[:2]
    resized = Image.fromarray(np.asarray(score_map, np.float32), mode="F").resize((width, height), Image.BILINEAR)
    colours = colorize(np.asarray(resized), vmax).astype(np.float32)
    return np.rint((1.0 - alpha) * image.astype(np.float32) + alpha * colours).astype(np.uint8)


@dataclass
class _Rows:
    """Score rows without their maps, the (H, W) maps that were loaded (by row index), the job manifest."""

    rows: list[dict[str, Any]]
    maps: dict[int, np.ndarray]
    manifest: dict[str, Any] | None


def write_report(
    source: str | Path | pa.Table | Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    top_n: int = 16,
    title: str = "TSDN anomaly report",
) -> Path:
    """Write ``<out_dir>/index.html`` and return its path.

    Args:
        source: a score job output (``<output>`` with ``product=<p>/part-*.parquet`` and ``_manifest.json``),
            one score Parquet file (local path or store URI), an Arrow table of score rows, or row dicts whose
            ``score_map`` is an (H, W) array or None.
        out_dir: local folder for ``index.html`` (created).
        top_n: how many of the highest-scoring images to show.
        title: page heading.
    """
    if top_n < 1:
        msg = f"top_n={top_n}: expected >= 1"
        raise ValueError(msg)
    data = _collect(source, top_n)
    top = _most_anomalous(data.rows, top_n)
    shown = [data.maps[i] for i in top if data.maps.get(i) is not None]
    vmax = max([float(np.max(m)) for m in shown] + [data.rows[i]["threshold"] or 0.0 for i in top] + [1e-12])
    cards = [_card(data.rows[i], data.maps.get(i), vmax) for i in top]
    page = _PAGE.format(
        title=html.escape(title),
        summary=_summary_table(data.rows, data.manifest),
        count=len(top),
        vmax=vmax,
        cards="\n".join(cards) or "<p>No scored images.</p>",
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    logger.info("report with %d images written to %s", len(top), index)
    return index


def _most_anomalous(rows: Sequence[Mapping[str, Any]], n: int) -> list[int]:
    """Indices of the ``n`` highest-scoring rows (error rows have no score), highest first."""
    scored = [i for i, r in enumerate(rows) if r.get("anomaly_score") is not None]
    return sorted(scored, key=lambda i: -rows[i]["anomaly_score"])[:n]


# --- gathering rows -------------------------------------------------------------------------------


def _collect(source: str | Path | pa.Table | Sequence[Mapping[str, Any]], top_n: int) -> _Rows:
    if isinstance(source, pa.Table):
        return _from_table(source, manifest=None)
    if not isinstance(source, (str, Path)):
        rows, maps = [], {}
        for i, given in enumerate(source):
            row = dict(given)
            score_map = row.pop("score_map", None)
            if score_map is not None:
                maps[i] = np.asarray(score_map, np.float32)
            rows.append(row)
        return _Rows(rows, maps, manifest=None)
    uri = str(source)
    if uri.endswith(".parquet"):
        return _from_table(_read(uri), manifest=None)
    return _from_output(uri.rstrip("/"), top_n)


def _read(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    fs, path = store.resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=list(columns) if columns is not None else None)


def _maps_of(table: pa.Table) -> list[np.ndarray | None]:
    """``score_map`` (fixed-shape tensor, null for error rows) -> one (H, W) float32 array or None per row."""
    column = table["score_map"].combine_chunks()
    valid = pc.is_valid(column).to_pylist()
    shape = column.type.shape
    size = int(np.prod(shape))
    storage = column.storage  # fixed_size_list: null rows keep their (zero) slots in ``values``
    values = storage.values.to_numpy(zero_copy_only=False)[
        storage.offset * size : (storage.offset + len(column)) * size
    ]
    flat = values.reshape(len(column), *shape)
    return [flat[i].astype(np.float32) if ok else None for i, ok in enumerate(valid)]


def _from_table(table: pa.Table, manifest: dict[str, Any] | None) -> _Rows:
    columns = [c for c in _ROW_COLUMNS_WITH_ERROR if c in table.column_names]
    rows = table.select(columns).to_pylist()
    maps = {i: m for i, m in enumerate(_maps_of(table)) if m is not None}
    return _Rows(rows, maps, manifest)


def _from_output(uri: str, top_n: int) -> _Rows:
    """A committed job: read the small columns of every part, then the maps of the ``top_n`` rows only."""
    manifest_uri = store.join(uri, "_manifest.json")
    manifest = store.read_json(manifest_uri) if store.exists(manifest_uri) else None
    files = [f for f in store.list_files(uri, suffixes=(".parquet",)) if "/_staging/" not in f]
    if not files:
        msg = f"{uri}: no score Parquet files"
        raise ValueError(msg)
    rows, origin = [], []
    for file in files:
        part = _read(file, _ROW_COLUMNS_WITH_ERROR).to_pylist()
        origin.extend((file, j) for j in range(len(part)))
        rows.extend(part)
    wanted: dict[str, list[int]] = defaultdict(list)
    for i in _most_anomalous(rows, top_n):
        wanted[origin[i][0]].append(i)
    maps = {}
    for file, indices in wanted.items():
        file_maps = _maps_of(_read(file, ["score_map"]))
        maps.update({i: file_maps[origin[i][1]] for i in indices})
    return _Rows(rows, maps, manifest)


def _load_image(source_uri: str | None) -> np.ndarray:
    """The original image of a score row: a file/object URI, or ``<shard.parquet>#<image_id>`` for ingested data.

    Returns (H, W, 3) uint8.
    """
    if not source_uri:
        msg = "row has no source_uri"
        raise ValueError(msg)
    base, _, image_id = source_uri.partition("#")
    if image_id and base.endswith(".parquet"):
        fs, path = store.resolve(base)
        # the filter skips row groups whose statistics exclude the id: no need to read the whole shard
        table = pq.read_table(path, filesystem=fs, columns=["image"], filters=[("image_id", "=", image_id)])
        if table.num_rows == 0:
            msg = f"{source_uri}: image_id not found in the shard"
            raise ValueError(msg)
        data = table["image"][0].as_py()
    else:
        data = store.read_bytes(source_uri)
    return to_rgb(decode_image(data, source_uri))[0]


# --- HTML -----------------------------------------------------------------------------------------


def _png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _display(image: np.ndarray) -> np.ndarray:
    """Shrink (H, W, 3) uint8 so that its longer side is at most :data:`DISPLAY_SIZE`."""
    pil = Image.fromarray(image)
    pil.thumbnail((DISPLAY_SIZE, DISPLAY_SIZE), Image.BILINEAR)
    return np.asarray(pil)


def _card(row: Mapping[str, Any], score_map: np.ndarray | None, vmax: float) -> str:
    try:
        image = _display(_load_image(row.get("source_uri")))
        original = f'<img src="{_png(image)}" alt="original">'
    except (store.StoreError, OSError, ValueError) as exc:  # ImageDecodeError is a ValueError
        image = None
        original = f'<div class="missing">original unavailable: {html.escape(str(exc))}</div>'
    if score_map is None:
        heat = '<div class="missing">no score map</div>'
    else:
        base = image if image is not None else np.zeros((DISPLAY_SIZE, DISPLAY_SIZE, 3), np.uint8)
        heat = f'<img src="{_png(overlay_heatmap(base, score_map, vmax))}" alt="heatmap overlay">'
    verdict = "ANOMALOUS" if row.get("is_anomalous") else "normal"
    threshold = row.get("threshold")
    return _CARD.format(
        verdict_class="bad" if row.get("is_anomalous") else "good",
        verdict=verdict,
        image_id=html.escape(str(row.get("image_id"))),
        original=original,
        heat=heat,
        score=row["anomaly_score"],
        threshold="-" if threshold is None else f"{threshold:.4f}",
        product=html.escape(str(row.get("product"))),
        version=html.escape(str(row.get("model_version"))),
        source=html.escape(str(row.get("source_uri"))),
    )


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def _summary_table(rows: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any] | None) -> str:
    metrics = (manifest or {}).get("metrics", {})
    metric_names = sorted({k for m in metrics.values() for k, v in m.items() if isinstance(v, float)})
    by_product: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_product[str(row.get("product"))].append(row)
    head = ["product", "rows", "errors", "anomalous", "max score", "model version(s)", *metric_names]
    lines = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for product, mine in sorted(by_product.items()):
        scores = [r["anomaly_score"] for r in mine if r.get("anomaly_score") is not None]
        versions = sorted({str(r.get("model_version")) for r in mine if r.get("model_version")})
        cells = [
            product,
            len(mine),
            len(mine) - len(scores),
            f"{sum(bool(r.get('is_anomalous')) for r in mine)} / {len(scores)}",
            max(scores) if scores else "-",
            ", ".join(versions) or "-",
            *(metrics.get(product, {}).get(name, "-") for name in metric_names),
        ]
        lines.append("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in cells) + "</tr>")
    extra = ""
    if manifest is not None:
        facts = {k: manifest.get(k) for k in ("job_id", "committed_at", "rows_written", "errors")}
        facts["input"] = manifest.get("input", {}).get("uri")
        extra = "<p class=meta>" + html.escape(json.dumps(facts)) + "</p>"
    return "<table>" + "".join(lines) + "</table>" + extra


_CARD = """<div class="card {verdict_class}">
<h3>{verdict} &mdash; {image_id}</h3>
<div class="pair">{original}{heat}</div>
<p>score <b>{score:.4f}</b> &middot; threshold {threshold} &middot; product {product} &middot; model {version}</p>
<p class="src">{source}</p>
</div>"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 1em; }}
.card {{ border: 2px solid #ccc; border-radius: 6px; padding: 0.6em; width: 540px; }}
.card.bad {{ border-color: #c0392b; }} .card.good {{ border-color: #27ae60; }}
.card h3 {{ margin: 0 0 0.4em 0; font-size: 1em; }}
.pair {{ display: flex; gap: 0.5em; }} .pair img {{ width: 256px; height: auto; image-rendering: pixelated; }}
.missing {{ width: 256px; height: 128px; background: #eee; font-size: 0.8em; padding: 0.5em; }}
.src, .meta {{ color: #666; font-size: 0.8em; word-break: break-all; }}
</style></head><body>
<h1>{title}</h1>
<h2>Per product</h2>
{summary}
<h2>Top {count} most anomalous images</h2>
<p class="meta">Left: original. Right: anomaly map over the image (inferno colours, 0 to {vmax:.4f} for every
image on this page).</p>
<div class="cards">
{cards}
</div>
</body></html>
"""
