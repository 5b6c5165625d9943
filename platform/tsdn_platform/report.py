"""A self-contained HTML page of scoring results for a quality engineer: per product, its decisions against
the ground truth, and every image to look at.

:func:`write_report` takes score rows (a score job's output URI, one Parquet file, an Arrow table or row
dicts; the columns of :mod:`tsdn_platform.score_rows`) and writes ``<out_dir>/index.html``:

- per product line (each has its own model and calibrated threshold; raw scores of two products are never
  ranked together): images, errors, flagged share, the threshold; with ground truth (an ingested split) a
  confusion matrix at the calibrated threshold, recall, false-positive rate, image AUROC, the F1 at the
  calibrated and at the F1-optimal threshold (and why they differ), ROC and precision-recall curves as inline
  SVG with the calibrated operating point, per-defect-type AUROC and detection counts, and the pixel metrics
  of the job's ``_manifest.json``;
- every scored image as a card (capped at ``max_images``, misclassified ones first, with a note saying so):
  the original with the ground-truth mask outlined, the anomaly map over it coloured from 0 to 2 x its
  product's threshold (the detect API's heatmap scale: the threshold sits mid-scale, so colours compare within
  a product), raw and normalised score, decision, label, defect type and outcome (TP/FP/FN/TN);
- filters (product, decision, defect type, outcome) and sorting (normalised score, raw score within each
  product, name) by a small inline script; the state lives in the URL fragment (``#product=bottle&outcome=FN``)
  so a filtered view can be linked;
- the error rows, with their reasons.

Images are embedded as JPEG thumbnails (longer side :data:`DISPLAY_SIZE`) in data URIs, the script and styles
are inline: the page opens offline, with no CDN, in any browser. Counts, matrices and curves always use every
row; only the cards are capped.

Needs pyarrow, numpy and Pillow only (no Ray): the demo and notebooks call it on finished jobs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tsdn.image import colorize, decode_image, to_rgb
from tsdn.resize import resize_map, resize_mask
from tsdn_platform import store
from tsdn_platform.report_stats import OUTCOMES, UNLABELLED, Confusion, ProductStats, outcome, product_stats
from tsdn_platform.score_rows import (
    MAP_COLUMNS,
    SCHEMA,
    STAGING,
    UNROUTED,
    committed_files,
    decode_maps,
    parse_source,
    read_manifest,
)

logger = logging.getLogger(__name__)

__all__ = ["DISPLAY_SIZE", "MAX_IMAGES", "mask_outline", "overlay_heatmap", "write_report"]

DISPLAY_SIZE = 192
MAX_IMAGES = 400
_MAX_ERROR_ROWS = 200
_JPEG_QUALITY = 85
_OUTLINE = np.array([0, 255, 255], np.uint8)  # cyan: apart from every inferno colour
_ROW_COLUMNS = tuple(name for name in SCHEMA.names if name not in MAP_COLUMNS)


def overlay_heatmap(image: np.ndarray, score_map: np.ndarray, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """``image``: (H, W, 3) uint8; ``score_map``: (h, w) float, resized to (H, W) -> (H, W, 3) uint8 blend."""
    height, width = image.shape[:2]
    colours = colorize(resize_map(np.asarray(score_map, np.float32), (height, width)), vmax).astype(np.float32)
    return np.rint((1.0 - alpha) * image.astype(np.float32) + alpha * colours).astype(np.uint8)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool defect mask -> (H, W) bool: its boundary pixels (inside the mask, next to outside), 2 px wide."""
    inside = np.asarray(mask, bool)
    padded = np.pad(inside, 1, constant_values=False)
    eroded = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = inside & ~eroded
    grown = np.pad(edge, 1, constant_values=False)
    return inside & (grown[1:-1, 1:-1] | grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:])


@dataclass
class _Source:
    """Score rows without their maps, a loader of the maps of chosen rows, and the job's manifest (or None)."""

    rows: list[dict[str, Any]]
    load_maps: Callable[[Sequence[int]], dict[int, np.ndarray]]
    manifest: dict[str, Any] | None


def write_report(
    source: str | Path | pa.Table | Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    max_images: int = MAX_IMAGES,
    title: str = "TSDN anomaly report",
) -> Path:
    """Write ``<out_dir>/index.html`` and return its path.

    Args:
        source: a score job output (``<output>`` with ``<product>/part-*.parquet`` and ``_manifest.json``),
            one score Parquet file (local path or store URI), an Arrow table of score rows, or row dicts whose
            ``score_map`` is an (H, W) array or None.
        out_dir: local folder for ``index.html`` (created).
        max_images: most image cards on the page (the tables and curves count every row).
        title: page heading.
    """
    if max_images < 1:
        msg = f"max_images={max_images}: expected >= 1"
        raise ValueError(msg)
    data = _collect(source)
    by_product: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(data.rows):
        by_product[row.get("product") or UNROUTED].append(i)
    stats = {p: product_stats(p, [data.rows[i] for i in idx]) for p, idx in sorted(by_product.items())}
    # the page's default order, also without the script: normalised score, highest first
    shown = sorted(_choose_cards(data.rows, max_images), key=lambda i: -_normalized(data.rows[i]))
    maps = data.load_maps(shown)
    cards = [_card(data.rows[i], maps.get(i)) for i in shown]
    scored = sum(s.scored for s in stats.values())
    page = _PAGE.format(
        title=html.escape(title),
        facts=_job_facts(data.manifest),
        summary=_summary_table(stats, data.manifest),
        sections="\n".join(_product_section(s, _calibration(data.manifest, p)) for p, s in stats.items() if s.scored),
        controls=_controls(data.rows, shown),
        shown=len(shown),
        cap_note=_cap_note(len(shown), scored),
        cards="\n".join(cards) or "<p>No scored images.</p>",
        errors=_errors_table(data.rows),
        script=_SCRIPT,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    logger.info("report with %d of %d scored images written to %s", len(shown), scored, index)
    return index


def _choose_cards(rows: Sequence[Mapping[str, Any]], limit: int) -> list[int]:
    """Indices of the rows that get a card: scored rows, misclassified (FP, FN) first, then by normalised score."""
    scored = [i for i, r in enumerate(rows) if r.get("anomaly_score") is not None]

    def priority(i: int) -> tuple[bool, float]:
        row = rows[i]
        wrong = outcome(row.get("label"), row.get("is_anomalous")) in ("FP", "FN")
        return (not wrong, -_normalized(row))

    return sorted(scored, key=priority)[:limit]


def _normalized(row: Mapping[str, Any]) -> float:
    value = row.get("normalized_score")
    return -math.inf if value is None else float(value)


# --- gathering rows -------------------------------------------------------------------------------


def _collect(source: str | Path | pa.Table | Sequence[Mapping[str, Any]]) -> _Source:
    if isinstance(source, pa.Table):
        return _from_table(source)
    if not isinstance(source, (str, Path)):
        rows, maps = [], {}
        for i, given in enumerate(source):
            row = dict(given)
            score_map = row.pop("score_map", None)
            if score_map is not None:
                maps[i] = np.asarray(score_map, np.float32)
            rows.append(row)
        return _Source(rows, lambda wanted: {i: maps[i] for i in wanted if i in maps}, manifest=None)
    uri = str(source)
    if uri.endswith(".parquet"):
        return _from_table(_read(uri))
    return _from_output(uri.rstrip("/"))


def _read(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    fs, path = store.resolve(uri)
    if columns is not None:
        present = set(pq.read_schema(path, filesystem=fs).names)
        columns = [c for c in columns if c in present]
    return pq.read_table(path, filesystem=fs, columns=list(columns) if columns is not None else None)


def _maps_of(table: pa.Table) -> list[np.ndarray | None]:
    """The maps of score rows -> one (H, W) float32 array or None per row."""
    return [None if m is None else m.astype(np.float32) for m in decode_maps(table)]


def _from_table(table: pa.Table) -> _Source:
    rows = table.select([c for c in _ROW_COLUMNS if c in table.column_names]).to_pylist()
    maps = {i: m for i, m in enumerate(_maps_of(table)) if m is not None}
    return _Source(rows, lambda wanted: {i: maps[i] for i in wanted if i in maps}, manifest=None)


def _from_output(uri: str) -> _Source:
    """A committed job: the small columns of every part now, the maps of the rows that get a card later."""
    manifest = read_manifest(uri)
    if manifest is not None:
        files = committed_files(uri, manifest)
    else:  # Parquet score rows written by something else than the score job: every file but the staged ones
        files = [f for f in store.list_files(uri, suffixes=(".parquet",)) if f"/{STAGING}/" not in f]
    if not files:
        msg = f"{uri}: no score Parquet files"
        raise ValueError(msg)
    rows, origin = [], []
    for file in files:
        part = _read(file, _ROW_COLUMNS).to_pylist()
        origin.extend((file, j) for j in range(len(part)))
        rows.extend(part)

    def load_maps(wanted: Sequence[int]) -> dict[int, np.ndarray]:
        by_file: dict[str, list[int]] = defaultdict(list)
        for i in wanted:
            by_file[origin[i][0]].append(i)
        maps = {}
        for file, indices in by_file.items():
            file_maps = _maps_of(_read(file, MAP_COLUMNS))
            maps.update({i: file_maps[origin[i][1]] for i in indices if file_maps[origin[i][1]] is not None})
        return maps

    return _Source(rows, load_maps, manifest)


def _load_image(source_uri: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The original image of a score row and its ground-truth mask, if its source holds one.

    ``source_uri``: a file/object URI, or ``<shard.parquet>#<image_id>`` for ingested data (whose ``mask``
    column holds the mask). Returns ``(rgb (H, W, 3) uint8, mask (H, W) bool or None)``.
    """
    if not source_uri:
        msg = "row has no source_uri"
        raise ValueError(msg)
    base, image_id = parse_source(source_uri)
    mask = None
    if image_id is not None:
        fs, path = store.resolve(base)
        columns = [c for c in ("image", "mask") if c in pq.read_schema(path, filesystem=fs).names]
        # the filter skips row groups whose statistics exclude the id: no need to read the whole shard
        table = pq.read_table(path, filesystem=fs, columns=columns, filters=[("image_id", "=", image_id)])
        if table.num_rows == 0:
            msg = f"{source_uri}: image_id not found in the shard"
            raise ValueError(msg)
        data = table["image"][0].as_py()
        mask_data = table["mask"][0].as_py() if "mask" in columns else None
        if mask_data is not None:
            mask = np.asarray(decode_image(mask_data, f"{source_uri} (mask)").convert("L")) > 0
    else:
        data = store.read_bytes(source_uri)
    return to_rgb(decode_image(data, source_uri))[0], mask


# --- images ---------------------------------------------------------------------------------------


def _jpeg(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    # no chroma subsampling: it would smear the 2 px mask outlines' colour
    Image.fromarray(image).save(buffer, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _display(image: np.ndarray) -> np.ndarray:
    """Shrink (H, W, 3) uint8 so that its longer side is at most :data:`DISPLAY_SIZE`."""
    pil = Image.fromarray(image)
    pil.thumbnail((DISPLAY_SIZE, DISPLAY_SIZE), Image.BILINEAR)
    return np.asarray(pil)


def _draw_outline(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(h, w, 3) uint8 with the outline of ``mask`` (any size, resized to (h, w)) drawn in cyan."""
    if mask is None:
        return image
    height, width = image.shape[:2]
    small = resize_mask(np.asarray(mask, np.uint8), (height, width)) > 0
    out = image.copy()
    out[mask_outline(small)] = _OUTLINE
    return out


# --- HTML -----------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f} %"


def _attr(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _card(row: Mapping[str, Any], score_map: np.ndarray | None) -> str:
    try:
        rgb, mask = _load_image(row.get("source_uri"))
        image = _display(rgb)
        original = f'<img src="{_jpeg(_draw_outline(image, mask))}" alt="original">'
    except (store.StoreError, OSError, ValueError) as exc:  # ImageDecodeError is a ValueError
        image, mask = None, None
        original = f'<div class="missing">original unavailable: {html.escape(str(exc))}</div>'
    threshold = row.get("threshold")
    vmax = 2.0 * threshold if threshold else math.nan  # colorize falls back to the map's own maximum
    if score_map is None:
        heat = '<div class="missing">no score map</div>'
    else:
        base = image if image is not None else np.zeros((DISPLAY_SIZE, DISPLAY_SIZE, 3), np.uint8)
        heat = f'<img src="{_jpeg(_draw_outline(overlay_heatmap(base, score_map, vmax), mask))}" alt="heatmap overlay">'
    decision = "anomalous" if row.get("is_anomalous") else "normal"
    result = outcome(row.get("label"), row.get("is_anomalous"))
    label = row.get("label")
    truth = "no label" if label is None else ("defect" if label else "good")
    defect = row.get("defect_type") or "-"
    normalized = row.get("normalized_score")
    return _CARD.format(
        product=_attr(row["product"]),
        decision=decision,
        defect=_attr(defect),
        outcome=result,
        score=repr(float(row["anomaly_score"])),
        norm="" if normalized is None else repr(float(normalized)),
        name=_attr(row.get("image_id")),
        image_id=html.escape(str(row.get("image_id"))),
        original=original,
        heat=heat,
        outcome_text=result if result != UNLABELLED else "no label",
        product_text=html.escape(str(row["product"])),
        score_text=_fmt(float(row["anomaly_score"])),
        norm_text=_fmt(normalized, 3),
        threshold=_fmt(threshold),
        decision_text=decision.upper() if decision == "anomalous" else decision,
        truth=html.escape(truth),
        defect_text=html.escape(defect),
        mask_note=" &middot; mask outlined" if mask is not None and mask.any() else "",
        version=html.escape(str(row.get("model_version"))),
        source=html.escape(str(row.get("source_uri"))),
    )


def _job_facts(manifest: Mapping[str, Any] | None) -> str:
    if manifest is None:
        return ""
    facts = {k: manifest.get(k) for k in ("job_id", "committed_at", "rows_written", "errors")}
    facts["input"] = manifest.get("input", {}).get("uri")
    return '<p class="meta">' + html.escape(json.dumps(facts)) + "</p>"


def _manifest_metrics(manifest: Mapping[str, Any] | None, product: str) -> dict[str, Any]:
    return dict((manifest or {}).get("metrics", {}).get(product, {}))


def _summary_table(stats: Mapping[str, ProductStats], manifest: Mapping[str, Any] | None) -> str:
    head = [
        "product",
        "model version",
        "calibrated threshold",
        "images",
        "errors",
        "flagged anomalous",
        "defects (labelled)",
        "TP",
        "FP",
        "FN",
        "TN",
        "recall",
        "false-positive rate",
        "image AUROC",
        "pixel AUROC",
        "AUPRO",
    ]
    lines = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for product, s in stats.items():
        c = s.confusion
        metrics = _manifest_metrics(manifest, product)
        cells = [
            f'<a href="#product-{_attr(product)}">{html.escape(product)}</a>' if s.scored else html.escape(product),
            html.escape(", ".join(s.versions) or "-"),
            _fmt(s.threshold),
            str(s.rows),
            str(s.errors),
            f"{s.flagged} / {s.scored}",
            "-" if c is None else str(c.tp + c.fn),
            *(["-"] * 4 if c is None else [str(c.tp), str(c.fp), str(c.fn), str(c.tn)]),
            "-" if c is None else _pct(c.recall),
            "-" if c is None else _pct(c.false_positive_rate),
            _fmt(s.auroc, 3),
            _fmt(metrics.get("pixel_auroc"), 3),
            _fmt(metrics.get("aupro"), 3),
        ]
        lines.append(f'<tr data-product="{_attr(product)}">' + "".join(f"<td>{v}</td>" for v in cells) + "</tr>")
    shapes = {p: v.get("map_shape") for p, v in (manifest or {}).get("products", {}).items() if v.get("map_shape")}
    note = (
        "Confusion counts, recall and false-positive rate are at each product's calibrated threshold (the decision "
        "the rows record). Image AUROC is computed here from the rows' scores; pixel AUROC and AUPRO come from the "
        "job manifest (<code>metrics.&lt;product&gt;.pixel_auroc</code>, <code>.aupro</code>), measured at the "
        "stored score-map resolution"
        + (": " + html.escape(", ".join(f"{p} {s[0]}x{s[1]}" for p, s in sorted(shapes.items()))) if shapes else "")
        + ", not the image's."
    )
    return '<table class="summary">' + "".join(lines) + f'</table><p class="meta">{note}</p>'


def _confusion_table(product: str, c: Confusion) -> str:
    def cell(name: str, value: int, css: str) -> str:
        return f'<td class="{css}" data-cell="{name}">{value}</td>'

    return (
        f'<table class="confusion" data-product="{_attr(product)}">'
        "<tr><th></th><th>flagged anomalous</th><th>passed as normal</th></tr>"
        f"<tr><th>labelled defect</th>{cell('TP', c.tp, 'ok')}{cell('FN', c.fn, 'bad')}</tr>"
        f"<tr><th>labelled good</th>{cell('FP', c.fp, 'bad')}{cell('TN', c.tn, 'ok')}</tr>"
        "</table>"
    )


_PLOT = 200  # side of an SVG plot area in pixels
_MARGIN = 34


def _curve_svg(kind: str, product: str, x: np.ndarray, y: np.ndarray, point: tuple[float, float] | None) -> str:
    """An inline SVG line plot of (x, y) in [0, 1]^2 with axes, and ``point`` (the operating point) marked."""
    labels = {"roc": ("false-positive rate", "true-positive rate"), "pr": ("recall", "precision")}[kind]

    def px(value: float) -> float:
        return round(_MARGIN + value * _PLOT, 2)

    def py(value: float) -> float:
        return round(_MARGIN + (1.0 - value) * _PLOT, 2)

    points = " ".join(f"{px(a)},{py(b)}" for a, b in zip(x.tolist(), y.tolist()))
    side = _PLOT + 2 * _MARGIN
    parts = [
        f'<svg class="curve {kind}" data-product="{_attr(product)}" width="{side}" height="{side}" '
        f'viewBox="0 0 {side} {side}" role="img" aria-label="{labels[1]} over {labels[0]}, {_attr(product)}">',
        f'<rect x="{_MARGIN}" y="{_MARGIN}" width="{_PLOT}" height="{_PLOT}" class="frame"/>',
    ]
    for tick in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{px(tick)}" y="{side - 18}" class="tick">{tick:g}</text>')
        parts.append(f'<text x="{_MARGIN - 6}" y="{py(tick) + 4}" class="tick end">{tick:g}</text>')
    parts.append(f'<text x="{px(0.5)}" y="{side - 4}" class="axis">{labels[0]}</text>')
    parts.append(f'<text x="10" y="{py(0.5)}" class="axis" transform="rotate(-90 10 {py(0.5)})">{labels[1]}</text>')
    if kind == "roc":
        parts.append(f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(1)}" class="chance"/>')
    parts.append(f'<polyline points="{points}" class="line"/>')
    if point is not None and all(math.isfinite(v) for v in point):
        parts.append(
            f'<circle cx="{px(point[0])}" cy="{py(point[1])}" r="5" class="operating-point">'
            "<title>calibrated threshold</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _calibration(manifest: Mapping[str, Any] | None, product: str) -> dict[str, Any]:
    """The score job's account of the threshold a product's rows were decided at (``products.<p>.calibration``)."""
    return dict(((manifest or {}).get("products", {}).get(product) or {}).get("calibration") or {})


def _threshold_promise(calibration: Mapping[str, Any], threshold: float | None) -> str:
    """What a quantile threshold promises on unseen good images, when the rows were decided at it."""
    expected = calibration.get("expected_false_positive_rate")
    if expected is None or threshold is None or calibration.get("threshold") != threshold:
        return ""
    return (
        f'<p class="explain">The threshold is the {100 * calibration["quantile"]:.3g} % quantile of the scores of '
        f"{calibration['n_normal']} normal images the model did not train on. An unseen good image reaches it "
        f"{_pct(expected)} of the time on average, and up to {_pct(calibration['false_positive_rate_95'])} (a 95 % "
        "bound: the normal images were few and may have been a lucky draw); the nominal quantile holds only with "
        "hundreds of them.</p>"
    )


def _product_section(s: ProductStats, calibration: Mapping[str, Any]) -> str:
    name = html.escape(s.product)
    threshold = (
        f"calibrated threshold <b>{_fmt(s.threshold)}</b> (raw score units of this model; normalised score 0.5)"
        if s.threshold is not None
        else "no threshold"
    )
    if len(s.thresholds) > 1:
        threshold += f"; rows of several versions use thresholds {', '.join(_fmt(t) for t in s.thresholds)}"
    parts = [
        f'<section class="product" id="product-{_attr(s.product)}"><h2>{name}</h2>',
        f"<p>{s.scored} images scored, {s.flagged} flagged anomalous, {s.errors} error rows; {threshold}; "
        f"model {html.escape(', '.join(s.versions) or '-')}.</p>",
        _threshold_promise(calibration, s.threshold if len(s.thresholds) == 1 else None),
    ]
    if s.confusion is None:
        parts.append(
            '<p class="meta">No ground truth: these rows carry no labels (score an ingested split, e.g. '
            "<code>datasets/&lt;dataset&gt;/&lt;product&gt;/test</code>, to get them), so there is no confusion "
            "matrix nor curves.</p></section>"
        )
        return "".join(parts)
    c = s.confusion
    parts.append('<div class="evaluation">')
    parts.append(
        f"<div><h3>At the calibrated threshold</h3>{_confusion_table(s.product, c)}"
        f"<p>recall {_pct(c.recall)} &middot; false-positive rate {_pct(c.false_positive_rate)} &middot; "
        f"precision {_pct(c.precision)} &middot; F1 {_fmt(s.calibrated_f1, 3)}</p></div>"
    )
    if s.roc is not None and s.pr is not None:
        roc_point = (c.false_positive_rate, c.recall)
        pr_point = (c.recall, c.precision)
        parts.append(
            f"<div><h3>ROC (image AUROC {_fmt(s.auroc, 3)})</h3>"
            f"{_curve_svg('roc', s.product, *s.roc, roc_point)}</div>"
            f"<div><h3>Precision-recall</h3>{_curve_svg('pr', s.product, *s.pr, pr_point)}</div>"
        )
    parts.append("</div>")
    if s.f1_threshold is not None and s.f1_confusion is not None:
        f = s.f1_confusion
        parts.append(
            f'<p class="explain">The <b>calibrated threshold</b> ({_fmt(s.threshold)}) is what the model applies '
            "everywhere (batch scoring, the detect API). It was fixed when the model was trained, from held-out "
            "normal images (or a labelled validation split), never from the images of this report, so these "
            f"counts are an honest estimate of production behaviour. The <b>F1-optimal threshold</b> "
            f"({_fmt(s.f1_threshold)}) is the one that would have maximised F1 on exactly these labelled images: "
            f"F1 {_fmt(s.f1, 3)} (TP {f.tp}, FP {f.fp}, FN {f.fn}, TN {f.tn}) against {_fmt(s.calibrated_f1, 3)} "
            "at the calibrated one. It is chosen in hindsight on the data it is scored on, so it is optimistic; a "
            "large gap says the calibration does not match this data (drift, or too few normal validation "
            "images), not that the threshold should be moved to it.</p>"
        )
    if s.defects:
        rows = "".join(
            f'<tr data-defect="{_attr(d.defect_type)}"><td>{html.escape(d.defect_type)}</td><td>{d.images}</td>'
            f"<td>{d.flagged} / {d.images}</td><td>{_fmt(d.auroc, 3)}</td></tr>"
            for d in s.defects
        )
        parts.append(
            f'<h3>Per defect type</h3><table class="defects" data-product="{_attr(s.product)}">'
            "<tr><th>defect type</th><th>images</th><th>flagged at the calibrated threshold</th>"
            f"<th>AUROC vs good images</th></tr>{rows}</table>"
        )
    parts.append("</section>")
    return "".join(parts)


def _options(select_id: str, label: str, counts: Mapping[str, int], names: Mapping[str, str] | None = None) -> str:
    names = names or {}
    options = [f'<option value="">all ({sum(counts.values())})</option>']
    options += [f'<option value="{_attr(v)}">{html.escape(names.get(v, v))} ({n})</option>' for v, n in counts.items()]
    return f'<label>{label} <select id="{select_id}">{"".join(options)}</select></label>'


def _counts(values: Sequence[str], always: Sequence[str] = ()) -> dict[str, int]:
    """How often each value occurs: the ``always`` values first (zero counts kept), then the others sorted."""
    counts = Counter(values)
    return {v: counts[v] for v in always} | {v: counts[v] for v in sorted(counts) if v not in always}


def _controls(rows: Sequence[Mapping[str, Any]], shown: Sequence[int]) -> str:
    cards = [rows[i] for i in shown]
    labelled = any(r.get("label") is not None for r in cards)
    outcomes = _counts([outcome(r.get("label"), r.get("is_anomalous")) for r in cards], OUTCOMES if labelled else ())
    return " ".join(
        [
            _options("f-product", "product", _counts([str(r["product"]) for r in cards])),
            _options(
                "f-decision",
                "decision",
                _counts(["anomalous" if r["is_anomalous"] else "normal" for r in cards], ("anomalous", "normal")),
            ),
            _options("f-defect", "defect type", _counts([r.get("defect_type") or "-" for r in cards])),
            _options("f-outcome", "outcome", outcomes, {UNLABELLED: "no label"}),
            '<label>sort <select id="sort">'
            '<option value="norm">normalised score, high first</option>'
            '<option value="norm-asc">normalised score, low first</option>'
            '<option value="score">raw score, high first, within each product</option>'
            '<option value="name">name</option></select></label>',
        ]
    )


def _cap_note(shown: int, scored: int) -> str:
    if shown == scored:
        return f"All {scored} scored images."
    return (
        f"Showing {shown} of {scored} scored images (max_images): every misclassified one (FP, FN) first, then the "
        "highest normalised scores. The tables and curves above count all of them; the score Parquet has every row."
    )


def _errors_table(rows: Sequence[Mapping[str, Any]]) -> str:
    errors = [r for r in rows if r.get("error")]
    if not errors:
        return "<p>No error rows.</p>"
    lines = [
        f"<tr><td>{html.escape(str(r.get('product') or UNROUTED))}</td><td>{html.escape(str(r.get('image_id')))}"
        f"</td><td>{html.escape(str(r['error']))}</td></tr>"
        for r in errors[:_MAX_ERROR_ROWS]
    ]
    hidden = len(errors) - _MAX_ERROR_ROWS
    more = f'<p class="meta">{hidden} more error rows in the score Parquet.</p>' if hidden > 0 else ""
    return (
        '<table class="errors"><tr><th>product</th><th>image</th><th>error</th></tr>' + "".join(lines) + "</table>"
    ) + more


_CARD = """<figure class="card {outcome} {decision}" data-product="{product}" data-decision="{decision}" \
data-defect="{defect}" data-outcome="{outcome}" data-score="{score}" data-norm="{norm}" data-name="{name}">
<figcaption><span class="badge">{outcome_text}</span> <b>{decision_text}</b> &mdash; {image_id}</figcaption>
<div class="pair">{original}{heat}</div>
<p>normalised <b>{norm_text}</b> &middot; raw {score_text} / threshold {threshold} &middot; {product_text}</p>
<p>truth: {truth} &middot; defect type {defect_text}{mask_note} &middot; model {version}</p>
<p class="src">{source}</p>
</figure>"""

_SCRIPT = """
(function () {
  var box = document.getElementById("cards");
  var cards = Array.prototype.slice.call(box.querySelectorAll(".card"));
  var keys = ["product", "decision", "defect", "outcome"];
  var sorter = document.getElementById("sort");
  function control(key) { return document.getElementById("f-" + key); }
  function num(card, key) { var v = parseFloat(card.dataset[key]); return isNaN(v) ? -1e300 : v; }
  var orders = {
    "norm": function (a, b) { return num(b, "norm") - num(a, "norm"); },
    "norm-asc": function (a, b) { return num(a, "norm") - num(b, "norm"); },
    "score": function (a, b) {
      return a.dataset.product.localeCompare(b.dataset.product) || num(b, "score") - num(a, "score");
    },
    "name": function (a, b) { return a.dataset.name.localeCompare(b.dataset.name); }
  };
  function apply() {
    var shown = 0;
    cards.forEach(function (card) {
      var ok = keys.every(function (k) { return !control(k).value || card.dataset[k] === control(k).value; });
      card.hidden = !ok;
      if (ok) { shown += 1; }
    });
    cards.slice().sort(orders[sorter.value] || orders.norm).forEach(function (c) { box.appendChild(c); });
    document.getElementById("shown").textContent = String(shown);
    var state = keys.filter(function (k) { return control(k).value; }).map(function (k) {
      return k + "=" + encodeURIComponent(control(k).value);
    });
    if (sorter.value !== "norm") { state.push("sort=" + sorter.value); }
    try { history.replaceState(null, "", state.length ? "#" + state.join("&") : location.pathname); } catch (e) {}
  }
  location.hash.slice(1).split("&").forEach(function (part) {
    var pair = part.split("="), value = decodeURIComponent(pair[1] || "");
    if (keys.indexOf(pair[0]) >= 0 && value) {
      var select = control(pair[0]);
      select.value = value;
      if (select.value !== value) {  // a linked value no card has: filter to nothing, not silently to all
        select.add(new Option(value + " (0)", value));
        select.value = value;
      }
    }
    if (pair[0] === "sort") { sorter.value = value; }
  });
  keys.map(control).concat([sorter]).forEach(function (el) { el.addEventListener("change", apply); });
  apply();
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
table.confusion td {{ font-size: 1.3em; min-width: 3em; text-align: center; }}
td.ok {{ background: #e8f6ec; }} td.bad {{ background: #fbe9e7; }}
.evaluation {{ display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }}
section.product {{ border-top: 2px solid #ddd; margin-top: 1.5em; }}
svg.curve .frame {{ fill: none; stroke: #999; }} svg.curve .line {{ fill: none; stroke: #1f5fa8; stroke-width: 2; }}
svg.curve .chance {{ stroke: #bbb; stroke-dasharray: 4 4; }} svg.curve .operating-point {{ fill: #e67e22; }}
svg.curve text {{ font-size: 11px; fill: #444; text-anchor: middle; }} svg.curve text.end {{ text-anchor: end; }}
.controls {{ display: flex; flex-wrap: wrap; gap: 1em; margin: 0.5em 0; position: sticky; top: 0;
  background: #fff; padding: 0.5em 0; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 0.8em; }}
.card {{ border: 2px solid #ccc; border-radius: 6px; padding: 0.5em; width: 400px; margin: 0; font-size: 0.85em; }}
.card.anomalous {{ border-color: #c0392b; }} .card.normal {{ border-color: #27ae60; }}
.card p {{ margin: 0.2em 0; }} .card figcaption {{ margin-bottom: 0.3em; word-break: break-all; }}
.badge {{ display: inline-block; padding: 0 0.4em; border-radius: 3px; background: #ddd; font-weight: bold; }}
.card.TP .badge, .card.TN .badge {{ background: #c8ebd2; }} .card.FP .badge, .card.FN .badge {{ background: #f7c6bf; }}
.pair {{ display: flex; gap: 0.4em; }} .pair img {{ width: {display}px; height: auto; }}
.missing {{ width: {display}px; height: 96px; background: #eee; font-size: 0.8em; padding: 0.5em; }}
.src, .meta {{ color: #666; font-size: 0.8em; word-break: break-all; }} .explain {{ max-width: 60em; }}
</style></head><body>
<h1>{title}</h1>
{facts}
<p class="explain">Each product line has its own model and calibrated threshold, in that model's raw score units, so
raw scores of two products are not comparable. The <b>normalised score</b> maps each raw score through its
model's calibration to [0, 1], with 0.5 at the threshold: it is what ranks images across products. Heatmaps are
coloured from 0 to 2 &times; their product's threshold (inferno; the threshold is mid-scale, orange), as the detect
API's heatmap; a cyan line outlines the ground-truth defect mask where one exists.</p>
<h2>Per product</h2>
{summary}
{sections}
<h2>Images</h2>
<p class="meta">{cap_note} <span id="shown">{shown}</span> shown with the current filters. Left: the original;
right: the anomaly map over it. TP = defect flagged, FP = good part flagged, FN = defect passed, TN = good part
passed.</p>
<div class="controls">{controls}</div>
<div class="cards" id="cards">
{cards}
</div>
<h2>Errors</h2>
{errors}
<script>{script}</script>
</body></html>
""".replace("{display}", str(DISPLAY_SIZE))
