"""The HTML report: per-product thresholds, ground truth, confusion, curves, every image; one offline file.

Two products with thresholds ten times apart: ``cable`` is labelled (an ingested shard with masks, two defect
types), ``bottle`` is unlabelled raw image files with an error row. No Ray, no S3. The browser test renders
the page in headless Chromium and checks what its script did (skipped where Chromium is not installed).
"""

from __future__ import annotations

import base64
import html
import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _browser import dump_dom
from PIL import Image
from sklearn.metrics import roc_auc_score

from tsdn.image import colorize
from tsdn.metrics import image_auroc
from tsdn_platform.report import mask_outline, overlay_heatmap, write_report
from tsdn_platform.report_stats import Confusion, outcome, product_stats
from tsdn_platform.score_rows import encode_maps

# cable, threshold 0.5: (image_id, label, defect_type, score) -> TP 3, FP 1, FN 1, TN 2
CABLE = [
    ("good/0.png", 0, "good", 0.1),
    ("good/1.png", 0, "good", 0.3),
    ("good/2.png", 0, "good", 0.6),
    ("cut/0.png", 1, "cut", 0.7),
    ("cut/1.png", 1, "cut", 0.4),
    ("cut/2.png", 1, "cut", 0.9),
    ("bent/0.png", 1, "bent", 0.8),
]
# bottle, threshold 4.0 (8 x cable's, so its maps scale exactly), no labels
BOTTLE = [("b0.png", 2.0), ("b1.png", 4.8), ("b2.png", 7.2)]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _image() -> np.ndarray:
    yy, xx = np.mgrid[0:48, 0:64]
    return np.stack([xx * 4, yy * 5, np.full_like(xx, 90)], axis=-1).astype(np.uint8)


def _map(level: float) -> np.ndarray:
    score_map = np.zeros((16, 16), np.float32)
    score_map[4:8, 4:8] = level
    return score_map


def _rows(tmp_path) -> list[dict]:
    """Score rows (dicts of the score-row contract) of both products, maps included."""
    shard_rows, rows = [], []
    for image_id, label, *_ in CABLE:
        mask = np.zeros((48, 64), np.uint8)
        mask[10:30, 20:40] = 255
        shard_rows.append({"image_id": image_id, "image": _png(_image()), "mask": _png(mask) if label else None})
    shard = tmp_path / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(shard_rows), shard)
    for image_id, label, defect, score in CABLE:
        rows.append(
            {
                "image_id": image_id,
                "source_uri": f"{shard}#{image_id}",
                "product": "cable",
                "model_version": "c1",
                "anomaly_score": score,
                "normalized_score": score,  # threshold 0.5 -> 0.5
                "is_anomalous": score >= 0.5,
                "threshold": 0.5,
                "error": None,
                "label": label,
                "defect_type": defect,
                "has_mask": bool(label),
                "score_map": _map(score),
            }
        )
    for image_id, score in BOTTLE:
        path = tmp_path / image_id
        Image.fromarray(_image()).save(path)
        rows.append(
            {
                "image_id": image_id,
                "source_uri": str(path),
                "product": "bottle",
                "model_version": "b1",
                "anomaly_score": score,
                "normalized_score": score / 8.0,
                "is_anomalous": score >= 4.0,
                "threshold": 4.0,
                "error": None,
                "label": None,
                "defect_type": None,
                "has_mask": None,
                "score_map": _map(score),
            }
        )
    rows.append({**rows[-1], "image_id": "broken.png", "anomaly_score": None, "normalized_score": None})
    rows[-1].update(is_anomalous=None, threshold=None, score_map=None, error="broken.png: not a PNG/JPEG")
    return rows


def _cards(page: str) -> list[dict[str, str]]:
    """Every card's data attributes, plus ``hidden`` and its two images, in page order."""
    cards = []
    for attrs, body in re.findall(r'<figure (class="card[^>]*)>(.*?)</figure>', page, re.S):
        card = dict(re.findall(r'data-(\w+)="([^"]*)"', attrs))
        card["hidden"] = bool(re.search(r"\bhidden\b", attrs))
        card["images"] = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', body)
        cards.append(card)
    return cards


def _decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def _confusion_cells(page: str, product: str) -> dict[str, int]:
    table = re.search(rf'<table class="confusion" data-product="{product}">(.*?)</table>', page, re.S).group(1)
    return {name: int(value) for name, value in re.findall(r'data-cell="(\w+)">(\d+)<', table)}


@pytest.fixture
def report(tmp_path):
    index = write_report(_rows(tmp_path), tmp_path / "report", title="Line 4 <night shift>")
    return index, index.read_text()


def test_report_is_one_offline_file_with_every_scored_image_in_normalised_order(report):
    index, page = report
    assert index.name == "index.html"
    assert "Line 4 &lt;night shift&gt;" in page  # escaped
    assert "http://" not in page and "https://" not in page and "<script src" not in page and "<link" not in page
    cards = _cards(page)
    assert len(cards) == len(CABLE) + len(BOTTLE)  # every scored image; the error row is in the errors table
    norms = [float(c["norm"]) for c in cards]
    assert norms == sorted(norms, reverse=True)  # never the raw score across products
    assert all(len(c["images"]) == 2 for c in cards)
    assert all(_decode(data).shape == (48, 64, 3) for c in cards for data in c["images"])  # small: not enlarged
    assert "broken.png: not a PNG/JPEG" in page
    outcomes = {c["name"]: c["outcome"] for c in cards}
    assert outcomes["good/2.png"] == "FP" and outcomes["cut/1.png"] == "FN" and outcomes["b1.png"] == "unlabelled"


def test_each_product_has_its_own_threshold_and_heatmap_scale(report):
    _, page = report
    cards = {c["name"]: c for c in _cards(page)}
    # bottle's b1 (4.8 of threshold 4.0) and cable's good/2 (0.6 of 0.5) sit at the same point of their scales:
    # on the same image their heatmaps are the same picture. (good/2 is a good part: no mask outline.)
    assert cards["b1.png"]["images"][1] == cards["good/2.png"]["images"][1]
    assert cards["b0.png"]["images"][1] != cards["good/2.png"]["images"][1]
    summary = re.search(r'<table class="summary">(.*?)</table>', page, re.S).group(1)
    cable = re.findall(r"<td>(.*?)</td>", re.search(r'<tr data-product="cable">(.*?)</tr>', summary).group(1))
    bottle = re.findall(r"<td>(.*?)</td>", re.search(r'<tr data-product="bottle">(.*?)</tr>', summary).group(1))
    assert cable[1:6] == ["c1", "0.5000", "7", "0", "4 / 7"]
    assert bottle[1:6] == ["b1", "4.0000", "4", "1", "2 / 3"]


def test_confusion_curves_and_the_two_thresholds_for_labelled_products(report):
    _, page = report
    assert _confusion_cells(page, "cable") == {"TP": 3, "FN": 1, "FP": 1, "TN": 2}
    assert 'class="confusion" data-product="bottle"' not in page  # no labels, no matrix
    assert "No ground truth" in page
    for kind in ("roc", "pr"):
        svg = re.search(rf'<svg class="curve {kind}" data-product="cable".*?</svg>', page, re.S).group(0)
        assert len(re.search(r'<polyline points="([^"]+)"', svg).group(1).split()) >= 7
        assert 'class="operating-point"' in svg
    assert 'class="curve roc" data-product="bottle"' not in page
    assert "calibrated threshold</b> (0.5000)" in page and "F1-optimal threshold</b> (0.4000)" in page
    defects = re.search(r'<table class="defects" data-product="cable">(.*?)</table>', page, re.S).group(1)
    assert re.search(r'<tr data-defect="cut"><td>cut</td><td>3</td><td>2 / 3</td><td>0.889</td></tr>', defects)
    assert re.search(r'<tr data-defect="bent"><td>bent</td><td>1</td><td>1 / 1</td><td>1.000</td></tr>', defects)


def test_mask_outlines_mark_the_ground_truth(report):
    _, page = report
    cards = {c["name"]: c for c in _cards(page)}
    original = _decode(cards["cut/0.png"]["images"][0]).astype(int)
    plain = _decode(cards["good/0.png"]["images"][0]).astype(int)
    cyan = (original[..., 0] < 80) & (original[..., 1] > 180) & (original[..., 2] > 180)
    assert cyan[10, 20:40].mean() > 0.8 and cyan[20, 20] and not cyan[20, 30]  # the border, not the inside
    assert not ((plain[..., 0] < 80) & (plain[..., 1] > 180) & (plain[..., 2] > 180)).any()
    assert page.count("mask outlined") == 4


def test_mask_outline_is_the_inner_border():
    mask = np.zeros((10, 12), bool)
    mask[2:8, 3:10] = True
    edge = mask_outline(mask)
    assert not (edge & ~mask).any()
    assert edge[2, 3:10].all() and edge[3, 4:9].all() and edge[2:8, 3].all()  # 2 px wide
    assert not edge[4:6, 5:8].any()
    assert not mask_outline(np.zeros((4, 4), bool)).any()


def test_product_stats_match_sklearn_and_tsdn_metrics():
    rows = [
        {"product": "cable", "anomaly_score": s, "is_anomalous": s >= 0.5, "threshold": 0.5, "label": lab}
        | {"defect_type": d, "model_version": "c1"}
        for _, lab, d, s in CABLE
    ]
    stats = product_stats("cable", rows)
    assert stats.confusion == Confusion(tp=3, fp=1, fn=1, tn=2)
    assert stats.confusion.recall == 0.75 and stats.confusion.false_positive_rate == pytest.approx(1 / 3)
    labels = np.array([lab for _, lab, _, _ in CABLE])
    scores = np.array([s for *_, s in CABLE])
    assert stats.auroc == image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    fpr, tpr = stats.roc
    assert np.trapezoid(tpr, fpr) == pytest.approx(stats.auroc)
    by_type = {d.defect_type: d for d in stats.defects}
    for defect in ("cut", "bent"):
        keep = np.array([d in ("good", defect) for _, _, d, _ in CABLE])
        assert by_type[defect].auroc == pytest.approx(roc_auc_score(labels[keep], scores[keep]))
        assert by_type[defect].auroc == image_auroc(labels[keep], scores[keep])
    assert (by_type["cut"].images, by_type["cut"].flagged) == (3, 2)
    assert stats.f1_threshold == 0.4 and stats.f1_confusion == Confusion(tp=4, fp=1, fn=0, tn=2)


def test_product_stats_without_both_classes_or_labels():
    only_good = [{"anomaly_score": s, "is_anomalous": s >= 0.5, "threshold": 0.5, "label": 0} for s in (0.1, 0.7)]
    stats = product_stats("p", only_good)
    assert stats.confusion == Confusion(tp=0, fp=1, fn=0, tn=1)
    assert stats.roc is None and stats.auroc is None and stats.f1_threshold is None and stats.defects == []
    partly = [*only_good, {"anomaly_score": 0.2, "is_anomalous": False, "threshold": 0.5, "label": None}]
    assert product_stats("p", partly).confusion is None  # not every scored row is labelled
    assert [outcome(1, True), outcome(0, True), outcome(1, False), outcome(0, False)] == ["TP", "FP", "FN", "TN"]
    assert outcome(None, True) == "unlabelled"


def test_cards_are_capped_misclassified_first_with_a_note(tmp_path):
    page = write_report(_rows(tmp_path), tmp_path / "report", max_images=3).read_text()
    cards = _cards(page)
    assert len(cards) == 3
    assert {"good/2.png", "cut/1.png"} <= {c["name"] for c in cards}  # the FP and the FN
    assert "Showing 3 of 10 scored images" in page
    assert _confusion_cells(page, "cable") == {"TP": 3, "FN": 1, "FP": 1, "TN": 2}  # counts use every row


def test_report_reads_a_score_parquet_file_and_reports_missing_originals(tmp_path):
    rows = _rows(tmp_path)[-3:]  # b1, b2, broken
    rows[0]["source_uri"] = str(tmp_path / "gone.png")
    maps = [r.pop("score_map") for r in rows]
    table = pa.Table.from_pylist(rows)
    for name, column in encode_maps(maps).items():
        table = table.append_column(name, column)
    pq.write_table(table, tmp_path / "part-0.parquet")
    page = write_report(tmp_path / "part-0.parquet", tmp_path / "report").read_text()
    assert len(_cards(page)) == 2  # the error row is not a card
    assert "original unavailable" in page and "gone.png" in page
    assert page.count('alt="heatmap overlay"') == 2


def test_overlay_blends_a_resized_map_onto_the_image():
    image = np.full((40, 60, 3), 100, np.uint8)
    score_map = np.zeros((4, 6), np.float32)
    out = overlay_heatmap(image, score_map, vmax=1.0, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.rint(0.5 * 100 + 0.5 * colorize(np.zeros((40, 60)), 1.0)))


def test_report_rejects_bad_max_images(tmp_path):
    with pytest.raises(ValueError, match="max_images"):
        write_report([], tmp_path, max_images=0)


def test_filters_and_sorting_run_in_a_browser(report):
    """The page's script, in headless Chromium: filters from the URL fragment hide cards, sorting reorders."""
    index, _ = report
    dom = dump_dom(index)
    cards = _cards(dom)
    assert len(cards) == 10 and not any(c["hidden"] for c in cards)
    assert re.search(r'<span id="shown">10</span>', dom)
    for fragment, want in {
        "product=cable": {image_id for image_id, *_ in CABLE},
        "product=cable&outcome=FN": {"cut/1.png"},
        "decision=anomalous&product=bottle": {"b1.png", "b2.png"},
        "defect=cut&outcome=TP": {"cut/0.png", "cut/2.png"},
        "outcome=FN&product=bottle": set(),  # bottle has no labels
        "defect=hole": set(),  # a linked value that no card has filters to nothing, not to everything
    }.items():
        dom = dump_dom(index, fragment)
        visible = [c for c in _cards(dom) if not c["hidden"]]
        assert {html.unescape(c["name"]) for c in visible} == want, fragment
        assert re.search(rf'<span id="shown">{len(want)}</span>', dom), fragment
    dom = dump_dom(index, "sort=name")
    names = [html.unescape(c["name"]) for c in _cards(dom)]
    assert names == sorted(names)
    dom = dump_dom(index, "sort=score")
    order = [(c["product"], float(c["score"])) for c in _cards(dom)]
    assert order == sorted(order, key=lambda pair: (pair[0], -pair[1]))  # raw scores ranked within a product


def test_a_quantile_threshold_says_how_often_an_unseen_good_image_reaches_it():
    from tsdn_platform.report import _threshold_promise

    calibration = {"threshold": 0.5, "method": "normal-quantile", "quantile": 0.99, "n_normal": 10}
    calibration.update(expected_false_positive_rate=0.0991, false_positive_rate_95=0.2726)
    promise = _threshold_promise(calibration, 0.5)
    assert "the 99 % quantile of the scores of 10 normal images" in promise
    assert "reaches it 9.9 % of the time on average, and up to 27.3 % (a 95 % bound" in promise
    assert _threshold_promise(calibration, 0.7) == ""  # the rows were decided at another threshold
    assert _threshold_promise({"threshold": 0.5, "method": "f1-optimal"}, 0.5) == ""  # not a quantile
    assert _threshold_promise({}, 0.5) == ""  # no score manifest (rows or a Parquet file)
