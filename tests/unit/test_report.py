"""The HTML report: self-contained, sorted by score, heatmaps drawn with a numpy colormap. No Ray, no S3."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tsdn.image import colorize
from tsdn_platform.report import overlay_heatmap, write_report


def _rows(tmp_path, n: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        path = tmp_path / "images" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((48, 64, 3), 40 * i, np.uint8)).save(path)
        score_map = np.zeros((16, 16), np.float32)
        score_map[4:8, 4:8] = 0.1 * (i + 1)
        rows.append(
            {
                "image_id": f"img{i}.png",
                "source_uri": str(path),
                "product": "bottle" if i % 2 else "cable",
                "model_version": "v1",
                "anomaly_score": 0.1 * (i + 1),
                "is_anomalous": i >= 2,
                "threshold": 0.25,
                "score_map": score_map,
                "error": None,
            }
        )
    rows.append({**rows[0], "image_id": "broken.png", "anomaly_score": None, "is_anomalous": None, "threshold": None})
    rows[-1].update(score_map=None, error="broken.png: not a PNG/JPEG")
    return rows


def _images(page: str) -> list[np.ndarray]:
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))) for data in found]


def test_report_is_self_contained_and_sorted_by_score(tmp_path):
    index = write_report(_rows(tmp_path), tmp_path / "report", top_n=3, title="Line 4 <night shift>")
    page = index.read_text()
    assert index.name == "index.html"
    assert "Line 4 &lt;night shift&gt;" in page  # escaped
    assert "<script" not in page and "http://" not in page and "https://" not in page
    positions = [page.index(f"img{i}.png</h3>") for i in (3, 2, 1)]
    assert positions == sorted(positions)
    assert "img0.png</h3>" not in page and "broken.png</h3>" not in page  # top 3 only; errors have no score
    images = _images(page)
    assert len(images) == 6  # original + overlay per card
    assert all(img.shape == (48, 64, 3) for img in images)
    assert page.count("ANOMALOUS") == 2 and page.count(">normal &mdash;") == 1
    # summary: cable has img0, img2 and the error row
    cable = re.search(r"<tr><td>cable</td>(.*?)</tr>", page).group(1)
    assert re.findall(r"<td>(.*?)</td>", cable)[:3] == ["3", "1", "1 / 2"]


def test_report_reads_a_score_parquet_file_and_reports_missing_originals(tmp_path):
    rows = _rows(tmp_path, n=2)
    rows[1]["source_uri"] = str(tmp_path / "gone.png")
    maps = [r.pop("score_map") for r in rows]
    storage = pa.FixedSizeListArray.from_arrays(
        pa.array(
            np.concatenate([np.zeros(256, np.float16) if m is None else m.astype(np.float16).ravel() for m in maps])
        ),
        256,
        mask=pa.array([m is None for m in maps]),
    )
    column = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float16(), [16, 16]), storage)
    table = pa.Table.from_pylist(rows).append_column("score_map", column)
    pq.write_table(table, tmp_path / "part-0.parquet")
    page = write_report(tmp_path / "part-0.parquet", tmp_path / "report", top_n=5).read_text()
    assert page.count('class="card ') == 2  # the error row is not a card
    assert "original unavailable" in page and "gone.png" in page
    assert page.count('alt="heatmap overlay"') == 2


def test_overlay_blends_a_resized_map_onto_the_image():
    image = np.full((40, 60, 3), 100, np.uint8)
    score_map = np.zeros((4, 6), np.float32)
    out = overlay_heatmap(image, score_map, vmax=1.0, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.rint(0.5 * 100 + 0.5 * colorize(np.zeros((40, 60)), 1.0)))


def test_report_rejects_bad_top_n(tmp_path):
    with pytest.raises(ValueError, match="top_n"):
        write_report([], tmp_path, top_n=0)
