"""Batch scoring on a local Ray cluster against SeaweedFS: rows, scores, errors, idempotence, routing, pins.

Three Ray Data jobs in all (each costs seconds on 2 cores): raw images routed by path pattern (run twice,
for idempotence), and an ingested test split with a pinned version, ground truth and a report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _browser import dump_dom
from PIL import Image

from tsdn.calibration import quantile_false_positive_rate
from tsdn.image import decode_image, to_rgb
from tsdn.scoring import fit_calibration
from tsdn_platform import store
from tsdn_platform.cli import main as cli_main
from tsdn_platform.config import ConfigError, load_config
from tsdn_platform.registry import Registry
from tsdn_platform.score import ScoreConfig, ScoreFailed, _path_regex, run_scoring
from tsdn_platform.score_rows import MANIFEST, MAP_COLUMNS, STAGING, UNROUTED, decode_maps
from tsdn_platform.score_stages import decode_inputs
from tsdn_platform.store import StoreError
from tsdn_platform.testing import register, tiny_model

SIZE = 64
MAP = 32


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _texture(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 128 + 60 * np.sin(xx / 5.0 + seed)[..., None] * np.cos(yy / 7.0)[..., None]
    return np.clip(base + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)


def _register(registry: Registry, product: str, version: str, seed: int, promote: str) -> None:
    model = tiny_model("tsdn", seed, image_size=SIZE)
    calibration = fit_calibration(np.array([0.05, 0.1, 0.15]) * (seed + 1))
    metrics = {"test": {"image_auroc": 0.5}, "run_id": f"{product}-{version}"}
    register(registry, product, model, calibration, metrics, promote=promote, version=version)


@pytest.fixture(scope="module")
def world(s3, ray_local):
    """A registry (alpha: v1 best + v2; beta: b1) and an input prefix of good, bad and unroutable files."""
    root = s3.uri("score")
    registry = Registry(store.join(root, "store"))
    _register(registry, "alpha", "v1", seed=0, promote="always")
    _register(registry, "alpha", "v2", seed=1, promote="never")
    _register(registry, "beta", "b1", seed=2, promote="always")
    good = {
        "alpha/a0.png": _png(_texture(0, 64, 64)),
        "alpha/line1/a1.png": _png(_texture(1, 72, 80)),
        "alpha/line1/deep/a2.jpg": _png(_texture(2, 96, 96), "JPEG"),
        "beta/b0.png": _png(_texture(3, 64, 64)),
        "beta/b1.png": _png(_texture(4, 80, 64)),
    }
    truncated = _png(_texture(5, 64, 64))
    bad = {
        "alpha/corrupt.png": np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes(),
        "alpha/truncated.png": truncated[: len(truncated) // 2],
        "beta/notes.txt": b"operator notes, not an image",
        "alpha/huge.png": _png(_texture(8, 160, 160)),  # over max_image_pixels
        "gamma/g0.png": _png(_texture(6, 64, 64)),  # no model for gamma
        "loose.png": _png(_texture(7, 64, 64)),  # matches no {product}/** path
    }
    for name, data in {**good, **bad}.items():
        store.write_bytes(store.join(root, "images", name), data)
    return {"root": root, "registry": registry, "good": good, "bad": bad}


@pytest.fixture(scope="module")
def routed(world):
    """The raw-image job, run twice with the same config: (first manifest, second manifest, config)."""
    cfg = ScoreConfig(
        store=store.join(world["root"], "store"),
        input=store.join(world["root"], "images"),
        output=store.join(world["root"], "scores"),
        product_from_path="{product}/**",
        output_map_size=MAP,
        max_image_pixels=120 * 120,
        batch_size=4,
        min_rows_per_file=1,
    )
    first = run_scoring(cfg)
    # A leftover part from an earlier job in the same output must not survive the rerun either.
    stale = store.join(cfg.output, "alpha", "part-stale-00099.parquet")
    store.copy(store.join(cfg.output, first["products"]["alpha"]["files"][0]), stale)
    second = run_scoring(cfg)
    return {"cfg": cfg, "first": first, "second": second, "stale": stale}


def _read_output(output: str) -> pa.Table:
    """Every score row of the committed output (one pyarrow read of the folder), maps dropped."""
    fs, path = store.resolve(output)
    return pq.read_table(path, filesystem=fs).drop_columns(list(MAP_COLUMNS))


def _expected(registry: Registry, product: str, version: str, data: bytes, name: str, map_size=None):
    predictor, _ = registry.load_predictor(product, version)
    rgb, _ = to_rgb(decode_image(data, name))
    return predictor.predict([rgb], map_size=map_size)[0]


@pytest.mark.integration
@pytest.mark.slow
def test_rows_equal_inputs_and_scores_equal_the_in_process_predictor(world, routed):
    table = _read_output(routed["cfg"].output)
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted([*world["good"], *world["bad"]])
    assert table.column_names == [
        "image_id",
        "source_uri",
        "product",
        "model_version",
        "anomaly_score",
        "normalized_score",
        "is_anomalous",
        "threshold",
        "error",
        "label",
        "defect_type",
        "has_mask",
    ]
    versions = {"alpha": "v1", "beta": "b1"}  # best of each product: v2 was never promoted
    for name, data in world["good"].items():
        row = rows[name]
        product = name.split("/")[0]
        assert row["error"] is None
        assert row["product"] == product
        assert row["model_version"] == versions[product]
        assert row["source_uri"] == store.join(world["root"], "images", name)
        det = _expected(world["registry"], product, versions[product], data, name)
        assert row["anomaly_score"] == pytest.approx(det.anomaly_score, rel=1e-5)
        assert row["threshold"] == pytest.approx(det.threshold)
        assert row["is_anomalous"] == det.is_anomalous
        assert row["normalized_score"] == pytest.approx(det.normalized_score, rel=1e-5)
        assert (row["label"], row["defect_type"], row["has_mask"]) == (None, None, None)  # raw images
    manifest = routed["first"]
    assert manifest["rows_written"] == manifest["input"]["inputs_seen"] == len(rows)
    assert manifest["model_versions"] == versions
    assert manifest["products"]["alpha"]["rows"] == 6
    assert manifest["config"]["product_from_path"] == "{product}/**"


@pytest.mark.integration
@pytest.mark.slow
def test_corrupt_wrong_type_and_unroutable_files_become_error_rows(world, routed):
    rows = {r["image_id"]: r for r in _read_output(routed["cfg"].output).to_pylist()}
    for name in world["bad"]:
        row = rows[name]
        assert row["error"], name
        assert row["anomaly_score"] is None and row["is_anomalous"] is None and row["threshold"] is None
        assert name in row["error"]  # the message names the input
    assert "gamma" in rows["gamma/g0.png"]["error"] and rows["gamma/g0.png"]["model_version"] is None
    assert "pattern" in rows["loose.png"]["error"] and rows["loose.png"]["product"] is None
    assert "max_pixels" in rows["alpha/huge.png"]["error"]
    manifest = routed["first"]
    assert manifest["errors"] == len(world["bad"])
    assert set(manifest["unavailable_products"]) == {"gamma"}
    assert manifest["products"][UNROUTED]["files"][0].startswith(f"{UNROUTED}/")  # loose.png
    assert manifest["products"]["gamma"]["map_shape"] is None
    assert sum(p["errors"] for p in manifest["products"].values()) == len(world["bad"])


_DEFAULT_READERS = textwrap.dedent(
    """
    import json, sys
    import duckdb
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    root, out = sys.argv[1], sys.argv[2]
    glob = f"{root}/*/*.parquet"
    names = [c[0] for c in duckdb.sql(f"DESCRIBE SELECT * FROM '{glob}'").fetchall()]
    readers = {
        "pyarrow": pq.read_table(root).to_pylist(),
        "pandas": pd.read_parquet(root).to_dict("records"),
        "duckdb": [dict(zip(names, r)) for r in duckdb.sql(f"SELECT * FROM read_parquet('{glob}')").fetchall()],
    }
    seen = {}
    for reader, records in readers.items():
        for r in records:
            m, shape = r.pop("score_map"), None
            if m is not None:
                shape = [int(r["score_map_height"]), int(r["score_map_width"])]
                name = f"{out}/{reader}-{r['image_id'].replace('/', '~')}.npy"
                np.save(name, np.asarray(m, np.float32).reshape(shape))
            # pandas: NaN for a null float, numpy scalars; make both plain JSON
            clean = {k: None if v is None or v != v else v.item() if hasattr(v, "item") else v for k, v in r.items()}
            seen.setdefault(reader, {})[r["image_id"]] = clean | {"shape": shape}
    types = dict(duckdb.sql(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM '{glob}')").fetchall())
    json.dump({"rows": seen, "duckdb_types": types, "ray": "ray" in sys.modules}, open(f"{out}/seen.json", "w"))
    """
)


def _read_with_default_readers(output: str, tmp_path: Path) -> tuple[dict, Path]:
    """Copy a committed output to a local folder and read it with pyarrow, pandas and duckdb, all defaults, in a
    process that never imports Ray or this project. Returns (what each reader saw, the folder of its maps)."""
    local = tmp_path / "output"
    for uri in store.list_files(output):
        target = local / uri[len(output.rstrip("/")) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.read_bytes(uri))
    seen = tmp_path / "seen"
    seen.mkdir()
    subprocess.run([sys.executable, "-c", _DEFAULT_READERS, str(local), str(seen)], check=True, timeout=120)
    return json.loads((seen / "seen.json").read_text()), seen


def _assert_readers_agree(seen: dict, expected: dict[str, dict]) -> None:
    """Every reader saw exactly the rows of ``expected`` (pyarrow through the store) with the same values."""
    for reader in ("pyarrow", "pandas", "duckdb"):
        rows = seen["rows"][reader]
        assert sorted(rows) == sorted(expected), reader
        for image_id, want in expected.items():
            got = rows[image_id]
            for name in ("product", "model_version", "is_anomalous", "error", "label", "defect_type", "has_mask"):
                assert got[name] == want[name], (reader, image_id, name)
            for name in ("anomaly_score", "normalized_score", "threshold"):
                assert got[name] == pytest.approx(want[name]), (reader, image_id, name)


@pytest.mark.integration
@pytest.mark.slow
def test_pyarrow_pandas_and_duckdb_read_the_output_with_their_defaults(world, routed, tmp_path):
    """issue 14 item 7: the whole output reads as one table, each reader recovers every map with its shape."""
    seen, maps = _read_with_default_readers(routed["cfg"].output, tmp_path)
    assert seen["ray"] is False
    assert seen["duckdb_types"]["score_map"] == "FLOAT[]" and seen["duckdb_types"]["product"] == "VARCHAR"
    expected = {r["image_id"]: r for r in _read_output(routed["cfg"].output).to_pylist()}
    assert len(expected) == len(world["good"]) + len(world["bad"])
    _assert_readers_agree(seen, expected)
    for reader in ("pyarrow", "pandas", "duckdb"):
        for image_id, row in expected.items():
            assert seen["rows"][reader][image_id]["shape"] == (None if row["error"] else [MAP, MAP])
    for image_id, data in world["good"].items():
        product = image_id.split("/")[0]
        version = {"alpha": "v1", "beta": "b1"}[product]
        det = _expected(world["registry"], product, version, data, image_id, map_size=(MAP, MAP))
        want = det.anomaly_map.astype(np.float16).astype(np.float32)
        for reader in ("pyarrow", "pandas", "duckdb"):
            got = np.load(maps / f"{reader}-{image_id.replace('/', '~')}.npy")
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4)
    fs, path = store.resolve(store.join(routed["cfg"].output, "alpha"))
    alpha = pq.read_table(path, filesystem=fs)  # one product's folder, and the contract's own decoder
    decoded = dict(zip(alpha["image_id"].to_pylist(), decode_maps(alpha)))
    np.testing.assert_array_equal(
        decoded["alpha/a0.png"].astype(np.float32), np.load(maps / "pyarrow-alpha~a0.png.npy")
    )


@pytest.mark.integration
@pytest.mark.slow
def test_rerun_replaces_instead_of_appending(routed):
    first, second, cfg = routed["first"], routed["second"], routed["cfg"]
    assert second["job_id"] == first["job_id"]
    # Exactly the second run's parts remain (write task numbering may differ between runs) + the manifest.
    committed = {store.join(cfg.output, f) for product in second["products"].values() for f in product["files"]}
    assert set(store.list_files(cfg.output)) == committed | {store.join(cfg.output, MANIFEST)}
    assert routed["stale"] not in committed
    assert _read_output(cfg.output).num_rows == first["rows_written"]
    assert store.read_json(store.join(cfg.output, MANIFEST))["job_id"] == first["job_id"]
    assert not store.exists(store.join(cfg.output, STAGING))


@pytest.mark.integration
@pytest.mark.slow
def test_a_crash_before_the_commit_keeps_the_previous_output(routed, monkeypatch):
    cfg, second = routed["cfg"], routed["second"]
    manifest_uri = store.join(cfg.output, MANIFEST)
    committed = {store.join(cfg.output, f) for product in second["products"].values() for f in product["files"]}

    def crash(uri: str, obj: object) -> None:
        raise RuntimeError(f"simulated crash before committing {uri}")

    monkeypatch.setattr(store, "replace_json", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_scoring(cfg)
    # The previous commit is whole: its manifest and every part it lists; the crashed attempt's parts sit beside.
    assert store.read_json(manifest_uri)["attempt"] == second["attempt"]
    files = set(store.list_files(cfg.output))
    assert committed <= files
    orphans = files - committed - {manifest_uri}
    assert orphans and all(f"-{second['attempt']}-" not in uri for uri in orphans)
    committed_rows = sum(pq.read_metadata(path, filesystem=fs).num_rows for fs, path in map(store.resolve, committed))
    assert committed_rows == second["rows_written"]

    monkeypatch.undo()
    third = run_scoring(cfg)  # the next run commits and removes both the old parts and the orphans
    now = {store.join(cfg.output, f) for product in third["products"].values() for f in product["files"]}
    assert set(store.list_files(cfg.output)) == now | {manifest_uri}
    assert third["rows_written"] == second["rows_written"] and third["attempt"] != second["attempt"]


@pytest.mark.integration
@pytest.mark.slow
def test_rows_that_are_not_the_inputs_are_never_committed(routed, monkeypatch):
    """The right number of rows but not the inputs' rows (one written twice, one missing): not committed."""
    from tsdn_platform.score_stages import ScoreDatasink

    cfg = routed["cfg"]
    manifest_uri = store.join(cfg.output, MANIFEST)
    before = store.read_bytes(manifest_uri)
    on_write_complete = ScoreDatasink.on_write_complete

    def one_row_swapped(self, write_result) -> None:  # runs on the driver, after every write task
        on_write_complete(self, write_result)
        self.results[0]["fingerprint"] += 1  # what a different multiset of the same size reads as

    monkeypatch.setattr(ScoreDatasink, "on_write_complete", one_row_swapped)
    with pytest.raises(RuntimeError, match=r"are not the \d+ inputs .*not committing"):
        run_scoring(cfg)
    assert store.read_bytes(manifest_uri) == before
    assert not store.list_files(store.join(cfg.output, STAGING), recursive=True)  # the attempt's parts are gone


@pytest.mark.parametrize("kind", ["unreachable", "throttled", "unavailable", "access_denied", "missing_bucket"])
def test_a_failing_store_is_not_an_error_row(monkeypatch, kind):
    """issue 15: a store failure while reading an input fails the job; it never becomes that row's error."""

    def read_bytes(uri: str) -> bytes:
        raise StoreError(uri, "injected", kind)

    monkeypatch.setattr(store, "read_bytes", read_bytes)
    batch = pa.table({"image_id": ["a.png"], "source_uri": ["s3://b/in/a.png"], "product": ["alpha"]})
    with pytest.raises(StoreError) as info:
        decode_inputs(batch, unavailable={}, max_pixels=10**6, store_retry_s=0)
    assert info.value.kind == kind


def test_an_input_gone_since_the_listing_is_that_row_s_error(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png(_texture(0, 8, 8)))
    uris = [str(tmp_path / "gone.png"), str(tmp_path / "ok.png")]
    batch = pa.table({"image_id": ["gone.png", "ok.png"], "source_uri": uris, "product": ["alpha", "alpha"]})
    out = decode_inputs(batch, unavailable={}, max_pixels=10**6, store_retry_s=0).to_pylist()
    assert out[0]["error"] == f"{uris[0]}: no longer exists (listed, then gone before it was read)"
    assert out[1]["error"] is None and (out[1]["height"], out[1]["width"]) == (8, 8)


@pytest.mark.integration
@pytest.mark.slow
def test_too_many_error_rows_fail_the_job_and_keep_the_previous_output(world, routed):
    """issue 14/15: an all-error (or mostly-error) result is not committed over good results; exit status 1."""
    cfg = routed["cfg"]
    manifest_uri = store.join(cfg.output, MANIFEST)
    before = {uri: store.read_bytes(uri) for uri in store.list_files(cfg.output)}
    errors, rows = routed["second"]["errors"], routed["second"]["rows_written"]
    assert 0 < errors < rows
    strict = dataclasses.replace(cfg, max_error_fraction=errors / rows - 0.01)
    with pytest.raises(ScoreFailed, match=f"{errors} of {rows} rows are errors .more than max_error_fraction"):
        run_scoring(strict)
    assert manifest_uri in before
    assert {uri: store.read_bytes(uri) for uri in store.list_files(cfg.output)} == before  # byte-identical

    # Every row an error (gamma has no model, beta's notes.txt is no image): fails at the default fraction too.
    output = store.join(world["root"], "scores-all-errors")
    argv = ["score", "--store", cfg.store, "--input", store.join(cfg.input, "beta"), "--output", output]
    store.write_bytes(store.join(output, "keep.txt"), b"an earlier file")
    assert cli_main([*argv, "--product", "gamma", "--set", "product_from_path=null"]) == 2  # no model at all
    single = store.join(world["root"], "images-bad-only")
    store.write_bytes(store.join(single, "beta", "notes.txt"), world["bad"]["beta/notes.txt"])
    argv = ["score", "--store", cfg.store, "--input", single, "--output", output, "--product", "beta"]
    assert cli_main(argv) == 1
    assert store.list_files(output) == [store.join(output, "keep.txt")]  # nothing committed, nothing left staged


def _shard(world) -> str:
    """An ingested test split of alpha, per the shard contract: 2 good and 2 defective images with masks."""
    rows = []
    for i in range(4):
        image = _texture(10 + i, SIZE, SIZE)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        label = int(i >= 2)
        if label:
            image[16:40, 20:44] = [255, 0, 255]  # a loud defect
            mask[16:40, 20:44] = 255
        rows.append(
            {
                "image_id": f"alpha/test/{'defect' if label else 'good'}/{i:03d}.png",
                "product": "alpha",
                "split": "test",
                "label": label,
                "defect_type": "spot" if label else "good",
                "image": _png(image),
                "mask": _png(mask) if label else None,
                "height": SIZE,
                "width": SIZE,
            }
        )
    uri = store.join(world["root"], "datasets", "demo", "alpha", "test", "part-00000.parquet")
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buffer, compression="zstd")
    store.write_bytes(uri, buffer.getvalue().to_pybytes())
    return uri.rsplit("/", 1)[0]


@pytest.fixture(scope="module")
def ingested(world, tmp_path_factory):
    """The CLI scoring an ingested split with a pinned version, model-size maps and a report."""
    split_uri = _shard(world)
    output = store.join(world["root"], "scores-ingested")
    report = tmp_path_factory.mktemp("report")
    argv = ["score", "--store", store.join(world["root"], "store"), "--input", split_uri, "--output", output]
    argv += ["--version", "v2", "--report", str(report), "--set", "output_map_size=null"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(argv)
    printed = out.getvalue()  # Ray may print worker lines too; the summary starts with "job_id"
    summary, _ = json.JSONDecoder().raw_decode(printed[printed.index('{\n  "job_id"') :])
    fs, path = store.resolve(store.join(split_uri, "part-00000.parquet"))
    shard = {r["image_id"]: r for r in pq.read_table(path, filesystem=fs).to_pylist()}
    return {"code": code, "summary": summary, "output": output, "split": split_uri, "shard": shard}


@pytest.mark.integration
@pytest.mark.slow
def test_ingested_split_with_pinned_version_metrics_and_report_via_the_cli(world, ingested):
    summary, output, split_uri = ingested["summary"], ingested["output"], ingested["split"]
    assert ingested["code"] == 0
    manifest = store.read_json(store.join(output, MANIFEST))
    table = _read_output(output)
    assert set(table["model_version"].to_pylist()) == {"v2"}  # pinned, although v1 is the best
    assert manifest["model_versions"] == {"alpha": "v2"}
    assert manifest["products"]["alpha"]["map_shape"] == [SIZE, SIZE]  # null = the model's input size
    shard = store.join(split_uri, "part-00000.parquet")
    for row in table.to_pylist():
        assert row["source_uri"] == f"{shard}#{row['image_id']}"
        truth = ingested["shard"][row["image_id"]]
        assert (row["label"], row["defect_type"]) == (truth["label"], truth["defect_type"])
        assert row["has_mask"] == (truth["mask"] is not None)
        det = _expected(world["registry"], "alpha", "v2", truth["image"], row["image_id"])
        assert row["anomaly_score"] == pytest.approx(det.anomaly_score, rel=1e-5)
        assert row["normalized_score"] == pytest.approx(det.normalized_score, rel=1e-5)
    metrics = manifest["metrics"]["alpha"]
    assert metrics["images"] == 4
    for name in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= metrics[name] <= 1.0
    assert summary["job_id"] == manifest["job_id"] and summary["rows_written"] == 4
    page = Path(summary["report"]).read_text()
    ranked = sorted(table.to_pylist(), key=lambda r: -r["normalized_score"])
    positions = [page.index(f"&mdash; {r['image_id']}</figcaption>") for r in ranked]
    assert positions == sorted(positions)  # every image, highest normalised score first
    assert page.count('alt="heatmap overlay"') == 4
    alpha = re.search(r'<tr data-product="alpha">(.*?)</tr>', page).group(1)
    assert f"<td>{metrics['pixel_auroc']:.3f}</td><td>{metrics['aupro']:.3f}</td>" in alpha  # the manifest's
    # the decisions the rows carry, and what the threshold (the 99 % quantile of 3 normal scores) promises
    flagged = [r["is_anomalous"] for r in table.to_pylist()]
    labels = [ingested["shard"][r["image_id"]]["label"] for r in table.to_pylist()]
    caught = [f for f, label in zip(flagged, labels, strict=True) if label]
    false_alarms = [f for f, label in zip(flagged, labels, strict=True) if not label]
    assert metrics["recall"] == sum(caught) / len(caught)
    assert metrics["false_positive_rate"] == sum(false_alarms) / len(false_alarms)
    calibration = manifest["products"]["alpha"]["calibration"]
    assert (calibration["method"], calibration["quantile"], calibration["n_normal"]) == ("normal-quantile", 0.99, 3)
    assert calibration["threshold"] == table["threshold"][0].as_py()
    expected, bound = quantile_false_positive_rate(3, 0.99)
    assert calibration["expected_false_positive_rate"] == pytest.approx(expected)
    assert calibration["false_positive_rate_95"] == pytest.approx(bound)
    assert f"An unseen good image reaches it {100 * expected:.1f} % of the time on average" in page


@pytest.mark.integration
@pytest.mark.slow
def test_default_readers_see_the_ground_truth_of_an_ingested_split(ingested, tmp_path):
    seen, maps = _read_with_default_readers(ingested["output"], tmp_path)
    expected = {r["image_id"]: r for r in _read_output(ingested["output"]).to_pylist()}
    assert {r["defect_type"] for r in expected.values()} == {"good", "spot"}
    _assert_readers_agree(seen, expected)
    for reader in ("pyarrow", "pandas", "duckdb"):
        for image_id, row in seen["rows"][reader].items():
            assert row["label"] == ingested["shard"][image_id]["label"]
            assert row["shape"] == [SIZE, SIZE]
            assert np.load(maps / f"{reader}-{image_id.replace('/', '~')}.npy").shape == (SIZE, SIZE)


def _visible_cards(dom: str) -> list[dict[str, str]]:
    cards = []
    for attrs in re.findall(r'<figure (class="card[^>]*)>', dom):
        if not re.search(r"\bhidden\b", attrs):
            cards.append(dict(re.findall(r'data-(\w+)="([^"]*)"', attrs)))
    return cards


@pytest.mark.integration
@pytest.mark.slow
def test_the_report_of_a_real_job_in_a_browser(ingested):
    """issue 14 item 3: the report of a score job, rendered in headless Chromium after its script ran."""
    page = Path(ingested["summary"]["report"])
    rows = _read_output(ingested["output"]).to_pylist()
    outcomes = Counter(
        ("TP" if r["is_anomalous"] else "FN") if r["label"] else ("FP" if r["is_anomalous"] else "TN") for r in rows
    )
    dom = dump_dom(page)
    assert len(_visible_cards(dom)) == len(rows) == 4
    matrix = re.search(r'<table class="confusion" data-product="alpha">(.*?)</table>', dom, re.S).group(1)
    cells = {name: int(n) for name, n in re.findall(r'data-cell="(\w+)">(\d+)<', matrix)}
    assert cells == {name: outcomes[name] for name in ("TP", "FP", "FN", "TN")}
    for kind in ("roc", "pr"):  # the split has both classes
        assert re.search(rf'<svg class="curve {kind}" data-product="alpha".*?<polyline points="[^"]+"', dom, re.S)
    for fragment, want in {
        **{f"outcome={name}": outcomes[name] for name in ("TP", "FP", "FN", "TN")},
        "defect=spot": 2,
        "decision=anomalous": sum(r["is_anomalous"] for r in rows),
        "product=alpha&defect=good": 2,
    }.items():
        dom = dump_dom(page, fragment)
        assert len(_visible_cards(dom)) == want, fragment
        assert f'<span id="shown">{want}</span>' in dom, fragment


@pytest.mark.integration
def test_a_missing_pinned_version_fails_before_any_row_is_written(world):
    from tsdn_platform.registry import UnknownVersionError

    cfg = ScoreConfig(
        store=store.join(world["root"], "store"),
        input=store.join(world["root"], "images", "alpha"),
        output=store.join(world["root"], "scores-missing"),
        product="alpha",
        version="v9",
    )
    with pytest.raises(UnknownVersionError, match="v9"):
        run_scoring(cfg)
    assert store.list_files(cfg.output) == []


def test_product_pattern_routing():
    regex = _path_regex("{product}/**")
    assert regex.match("bottle/broken/000.png").group("product") == "bottle"
    assert regex.match("loose.png") is None
    regex = _path_regex("line-{product}/*/*.png")
    assert regex.match("line-cable/2024/x.png").group("product") == "cable"
    assert regex.match("line-cable/2024/deep/x.png") is None
    assert regex.match("line-cable/2024/x.jpg") is None


def test_config_validation_names_the_field():
    base = {"store": "s", "input": "i", "output": "o"}
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(ScoreConfig, explicit={**base, "product": "a", "product_from_path": "{product}/**"})
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(ScoreConfig, explicit={**base, "product_from_path": "images/**"})
    with pytest.raises(ConfigError, match="num_actors"):
        load_config(ScoreConfig, explicit=base, overrides=["num_actors=[3, 2]"])
    with pytest.raises(ConfigError, match="input"):
        load_config(ScoreConfig, explicit={"store": "s", "output": "o"})
    cfg = load_config(ScoreConfig, explicit=base, overrides=["num_actors=[1, 4]", "output_map_size=null"])
    assert cfg.num_actors == (1, 4) and cfg.output_map_size is None
