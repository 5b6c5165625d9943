"""Ingest into a local folder and into SeaweedFS, read back for training, bad input, idempotence."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import pickle
import shutil
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tsdn.config_io import ConfigError
from tsdn.surf import decode_labels, slic_labels
from tsdn_platform import layout, shards, store
from tsdn_platform.cli import main as cli_main
from tsdn_platform.ingest import IngestConfig, _process_item, _staging_name, run_ingest, sweep_stale_staging
from tsdn_platform.shards import IngestError, read_manifest, read_split, resize_image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIZE = 64
SEGMENTS = 40


def _config(source: str, store_uri: str, **kwargs) -> IngestConfig:
    settings = {"image_size": SIZE, "n_segments": SEGMENTS, "rows_per_file": 4, **kwargs}
    return IngestConfig(source=source, store=store_uri, dataset="demo", **settings)


def _rows(store_uri: str, product: str, split: str, dataset: str = "demo") -> list[dict]:
    """Every shard row of one split, in manifest file order."""
    manifest = read_manifest(store_uri, dataset, product)
    rows = []
    for entry in manifest["files"][split]:
        fs, path = store.resolve(store.join(store_uri, "datasets", dataset, product, entry["path"]))
        table = pq.read_table(path, filesystem=fs)
        assert table.num_rows == entry["rows"]
        rows.extend(table.to_pylist())
    return rows


def _upload(root: Path, uri: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            store.write_bytes(store.join(uri, str(path.relative_to(root))), path.read_bytes())


@pytest.fixture(scope="module")
def ingested(demo_root, ray_local, s3, tmp_path_factory):
    """The demo data ingested twice into a local store and from an S3 source into S3."""
    local_store = str(tmp_path_factory.mktemp("store"))
    s3_source, s3_store = s3.uri("source"), s3.uri("store")
    _upload(demo_root, s3_source)
    out = {}
    for name, source, store_uri in (("local", str(demo_root), local_store), ("s3", s3_source, s3_store)):
        first = run_ingest(_config(source, store_uri))
        rows = {(p, split): _rows(store_uri, p, split) for p in first["products"] for split in ("train", "test")}
        second = run_ingest(_config(source, store_uri))
        out[name] = {"store": store_uri, "first": first, "second": second, "rows_first": rows}
    return out


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_rows_match_the_source_files(ingested, demo_root, kind):
    run = ingested[kind]
    index = run["second"]
    assert sorted(index["products"]) == sorted(p.name for p in demo_root.iterdir() if p.is_dir())
    for product in index["products"]:
        manifest = read_manifest(run["store"], "demo", product)
        expected = Counter(
            (path.parts[-3], path.parts[-2])
            for path in (demo_root / product).glob("*/*/*.png")
            if "ground_truth" not in path.parts
        )
        counts = {(split, defect): n for split, defects in manifest["counts"].items() for defect, n in defects.items()}
        assert counts == dict(expected)
        assert manifest["image_size"] == SIZE and manifest["slic"]["n_segments"] == SEGMENTS
        assert manifest["n_skipped"] == 0 and manifest["source_shape"] == [SIZE, SIZE]
        for split in ("train", "test"):
            rows = _rows(run["store"], product, split)
            ids = [row["image_id"] for row in rows]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            assert len(rows) == manifest["n_rows"][split] == sum(n for (s, _), n in expected.items() if s == split)
            for row in rows:
                source_bytes = (demo_root / row["image_id"]).read_bytes()
                assert row["image"] == source_bytes
                assert row["sha256"] == hashlib.sha256(source_bytes).hexdigest()
                assert (row["height"], row["width"], row["source_mode"]) == (SIZE, SIZE, "RGB")
                assert row["label"] == int(row["defect_type"] != "good")
                assert row["fold"] == int(hashlib.sha1(row["image_id"].encode()).hexdigest()[:8], 16) % 10
                if row["defect_type"] == "good":
                    assert row["mask"] is None
                else:
                    _, _, defect, filename = row["image_id"].split("/")
                    mask_path = demo_root / product / "ground_truth" / defect / filename.replace(".png", "_mask.png")
                    mask = np.asarray(Image.open(io.BytesIO(row["mask"])))
                    assert mask.shape == (row["height"], row["width"])
                    np.testing.assert_array_equal(mask, np.asarray(Image.open(mask_path)))
                if split == "test":
                    assert row["superpixels"] is None
                else:
                    labels = decode_labels(row["superpixels"], (SIZE, SIZE))
                    rgb = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
                    resized = np.round(resize_image(rgb, SIZE).transpose(1, 2, 0) * 255).astype(np.uint8)
                    np.testing.assert_array_equal(labels, slic_labels(resized, SEGMENTS))
                    assert len(np.unique(labels)) == labels.max() + 1 >= 2


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_rerun_is_idempotent(ingested, kind):
    run = ingested[kind]
    assert run["first"]["content_hash"] == run["second"]["content_hash"]
    assert run["first"]["products"] == run["second"]["products"]
    for (product, split), rows in run["rows_first"].items():
        assert _rows(run["store"], product, split) == rows
    dataset_uri = store.join(run["store"], "datasets", "demo")
    assert not [uri for uri in store.list_files(dataset_uri) if "_staging-" in uri]
    shards = store.list_files(dataset_uri, suffixes=(".parquet",))
    listed = [
        store.join(dataset_uri, p, f["path"])
        for p in run["second"]["products"]
        for files in read_manifest(run["store"], "demo", p)["files"].values()
        for f in files
    ]
    assert shards == sorted(listed)


def test_local_and_s3_ingest_agree(ingested):
    assert ingested["local"]["second"]["content_hash"] == ingested["s3"]["second"]["content_hash"]


def test_changed_source_changes_the_hash(ingested, demo_root, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(demo_root / "brick", source / "brick")
    image_path = source / "brick" / "train" / "good" / "000.png"
    pixels = np.asarray(Image.open(image_path)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image_path)
    manifest = run_ingest(_config(str(source), str(tmp_path / "store")))
    original = ingested["local"]["second"]["products"]["brick"]["content_hash"]
    assert manifest["products"]["brick"]["content_hash"] != original


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_files_are_reported_not_fatal(demo_root, ray_local, tmp_path):
    root = tmp_path / "src" / "widget"
    shutil.copytree(demo_root / "gravel" / "train", root / "train")
    (root / "test" / "good").mkdir(parents=True)
    (root / "ground_truth" / "hole").mkdir(parents=True)
    rgb = np.asarray(Image.open(root / "train" / "good" / "000.png"))
    good_png = _png(rgb)
    gray = rgb.mean(axis=2).astype(np.uint8)
    files = {
        "train/good/corrupt.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 20,
        "train/good/truncated.png": good_png[: len(good_png) // 2],
        "train/good/gray16.png": _png(gray.astype(np.uint16) * 257),
        "train/good/gray8.png": _png(gray),
        "train/good/rgba.png": _png(np.dstack([rgb, np.full(gray.shape, 200, np.uint8)])),
        "train/good/palette.png": None,
        "train/good/notes.txt": b"not an image",
        "test/good/000.png": good_png,
        "test/hole/bad_size.png": good_png,
        "ground_truth/hole/bad_size_mask.png": _png(np.zeros((8, 8), np.uint8)),
        "test/hole/soft.png": good_png,
        "ground_truth/hole/soft_mask.png": _png(np.tile(np.arange(SIZE, dtype=np.uint8) * 4, (SIZE, 1))),
        "test/hole/unreadable.png": good_png,
        "ground_truth/hole/unreadable_mask.png": b"not a png",
        "ground_truth/hole/orphan_mask.png": _png(np.zeros((SIZE, SIZE), np.uint8)),
    }
    for rel, data in files.items():
        if data is not None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
    Image.fromarray(rgb).convert("P").save(root / "train" / "good" / "palette.png")
    store_uri = str(tmp_path / "store")
    run_ingest(_config(str(tmp_path / "src"), store_uri))

    report = json.loads((tmp_path / "store" / "datasets" / "demo" / "widget" / "ingest_report.json").read_text())
    skipped = {Path(entry["file"]).name: entry["reason"] for entry in report["skipped"]}
    assert set(skipped) == {
        "corrupt.png",
        "truncated.png",
        "notes.txt",
        "bad_size.png",
        "unreadable.png",
        "orphan_mask.png",
    }
    assert "corrupt or truncated" in skipped["truncated.png"]
    assert "corrupt.png" in skipped["corrupt.png"]
    assert "mask is 8x8, image is 64x64" in skipped["bad_size.png"]
    assert "unusable mask" in skipped["unreadable.png"]
    assert "without a matching test image" in skipped["orphan_mask.png"]
    converted = {Path(entry["file"]).name: entry["notes"] for entry in report["converted"]}
    assert converted["gray16.png"] == "converted I;16 to RGB"
    assert converted["gray8.png"] == "converted L to RGB"
    assert converted["rgba.png"] == "converted RGBA to RGB"
    assert converted["palette.png"] == "converted P to RGB"
    assert converted["soft.png"].startswith("mask thresholded at 128")

    rows = {row["image_id"]: row for row in _rows(store_uri, "widget", "train") + _rows(store_uri, "widget", "test")}
    assert rows["widget/train/good/gray16.png"]["source_mode"] == "I;16"
    soft_mask = np.asarray(Image.open(io.BytesIO(rows["widget/test/hole/soft.png"]["mask"])))
    assert set(np.unique(soft_mask)) == {0, 255}
    assert (soft_mask[:, 32:] == 255).all() and (soft_mask[:, :32] == 0).all()
    manifest = read_manifest(store_uri, "demo", "widget")
    assert manifest["n_skipped"] == 6
    assert manifest["counts"] == {"train": {"good": 10}, "test": {"good": 1, "hole": 1}}


def test_a_line_whose_train_images_are_all_bad_names_their_reasons_only(ray_local, tmp_path):
    """The error listed a bad test image's reason among the train images' (three at most, sorted)."""
    root = tmp_path / "src" / "widget"
    for rel, data in (("train/good/a.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20), ("test/good/0.png", b"nope")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    with pytest.raises(IngestError, match="widget: every train image was rejected") as caught:
        run_ingest(_config(str(tmp_path / "src"), str(tmp_path / "store")))
    assert "a.png" in str(caught.value) and "0.png" not in str(caught.value)


def test_an_input_that_distorts_the_images_aspect_is_warned_with_a_size_that_keeps_it(
    demo_root, ray_local, tmp_path, caplog
):
    root = tmp_path / "src" / "strip"  # tall parts, 64 x 24 px, like kolektor's
    (root / "train" / "good").mkdir(parents=True)
    (root / "test" / "good").mkdir(parents=True)
    for i, path in enumerate(sorted((demo_root / "gravel" / "train" / "good").glob("*.png"))[:6]):
        Image.open(path).crop((20, 0, 44, 64)).save(root / "train" / "good" / f"{i:03d}.png")
    Image.open(path).crop((0, 0, 24, 64)).save(root / "test" / "good" / "000.png")
    store_uri = str(tmp_path / "store")
    with caplog.at_level("WARNING", logger="tsdn_platform.ingest"):
        run_ingest(_config(str(tmp_path / "src"), store_uri, image_size=32, n_segments=10))
    assert read_manifest(store_uri, "demo", "strip")["source_shape"] == [64, 24]
    assert "strip: the train images are 64 x 24 px" in caplog.text
    assert "changes their aspect 2.7x" in caplog.text and "--image-size 64x32" in caplog.text

    caplog.clear()
    with caplog.at_level("WARNING", logger="tsdn_platform.ingest"):
        run_ingest(_config(str(tmp_path / "src"), str(tmp_path / "kept"), image_size=(64, 24), n_segments=10))
    assert "changes their aspect" not in caplog.text


def test_empty_or_non_mvtec_trees_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no product folders found") as info:
        run_ingest(_config(str(tmp_path / "empty"), str(tmp_path / "store")))
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)
    assert str(info.value).startswith(str(tmp_path / "empty"))
    (tmp_path / "flat" / "images").mkdir(parents=True)
    (tmp_path / "flat" / "images" / "a.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(IngestError, match="expected an MVTec-style tree"):
        run_ingest(_config(str(tmp_path / "flat"), str(tmp_path / "store")))


def test_unknown_product_is_named(demo_root, tmp_path):
    with pytest.raises(IngestError, match="product\\(s\\) marble not found"):
        run_ingest(_config(str(demo_root), str(tmp_path / "store"), products=["marble"]))


def test_discovered_folders_follow_the_one_name_rule(tmp_path):
    """A folder ingest discovers becomes a product id: ``my prod`` is refused as train would refuse it."""
    from tsdn_platform.names import validate_name
    from tsdn_platform.train import TrainConfig

    for product in ("my prod", "-x"):
        (tmp_path / "src" / product / "train" / "good").mkdir(parents=True)
        (tmp_path / "src" / product / "train" / "good" / "0.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(IngestError, match="'-x', 'my prod' are not valid product ids"):
        run_ingest(_config(str(tmp_path / "src"), str(tmp_path / "store")))
    with pytest.raises(ConfigError, match=r"product id 'a\.\.b'"):
        _config(str(tmp_path / "src"), str(tmp_path / "store"), products=["a..b"])
    with pytest.raises(ValueError, match="product id 'my prod'"):
        TrainConfig(store="s", dataset="d", products=["my prod"])
    assert validate_name("x" * 64) == "x" * 64
    with pytest.raises(ValueError, match="1-64 characters"):
        validate_name("x" * 65)


def test_s3_down_is_a_clear_error(s3, demo_root, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    target = f"s3://{s3.bucket}/unreachable"
    with pytest.raises(store.StoreError) as info:
        run_ingest(_config(str(demo_root), target, store_retry_s=1))
    assert info.value.kind == "unreachable"
    assert str(info.value).startswith(f"{target}/datasets/demo")
    with pytest.raises(store.StoreError, match="unreachable"):
        run_ingest(_config(f"{target}/source", "/tmp/never-written", store_retry_s=1))


def _item(tmp_path: Path, name: str = "a.png", label: int = 0) -> dict:
    split, defect = ("test", "hole") if label else ("train", "good")
    return {
        "image_id": f"widget/{split}/{defect}/{name}",
        "product": "widget",
        "split": split,
        "label": label,
        "defect_type": defect,
        "source_uri": str(tmp_path / name),
        "mask_uri": str(tmp_path / f"{name}.mask.png") if label else "",
    }


@pytest.mark.parametrize("kind", ["unreachable", "throttled", "unavailable", "access_denied", "missing_bucket"])
@pytest.mark.parametrize("what", ["image", "mask"])
def test_a_failing_store_is_not_a_bad_image(tmp_path, monkeypatch, kind, what):
    """issue 15: a store failure while reading an input fails the job; it is never a skipped image."""
    (tmp_path / "a.png").write_bytes(_png(np.zeros((SIZE, SIZE, 3), np.uint8)))
    real = store.read_bytes

    def read_bytes(uri: str) -> bytes:
        if what == "image" or uri.endswith(".mask.png"):
            raise store.StoreError(uri, "injected", kind)
        return real(uri)

    monkeypatch.setattr(store, "read_bytes", read_bytes)
    settings = _config(str(tmp_path), str(tmp_path)).item_settings()
    with pytest.raises(store.StoreError) as info:
        _process_item(_item(tmp_path, label=1), settings)
    assert info.value.kind == kind


def test_an_input_gone_since_the_listing_is_that_input_s_error(tmp_path):
    (tmp_path / "b.png").write_bytes(_png(np.zeros((SIZE, SIZE, 3), np.uint8)))
    settings = _config(str(tmp_path), str(tmp_path)).item_settings()
    row = _process_item(_item(tmp_path, "gone.png"), settings)
    assert row["error"] == f"{tmp_path / 'gone.png'}: no longer exists (listed, then gone before it was read)"
    row = _process_item(_item(tmp_path, "b.png", label=1), settings)  # its mask was never there
    assert row["error"].startswith("unusable mask: ") and "no longer exists" in row["error"]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_readers_find_shards_through_the_manifests_only(ingested, kind):
    store_uri = ingested[kind]["store"]
    products = sorted(ingested[kind]["second"]["products"])
    assert shards.ingested_products(store_uri, "demo") == products
    assert shards.ingested_products(store_uri, "nosuch") == []
    brick = layout.dataset_uri(store_uri, "demo", "brick")
    test_files = shards.committed_files(store_uri, "demo", "brick", "test")
    assert test_files and all(uri.startswith(store.join(brick, "test") + "/") for uri in test_files)
    # A shard an interrupted run left beside the committed ones is never returned: only a manifest lists files.
    stray = store.join(brick, "test", "part-99999.parquet")
    store.write_bytes(stray, b"not a committed shard")
    try:
        assert shards.files_under(store.join(brick, "test")) == test_files
        assert shards.files_under(brick, "test") == test_files
        assert shards.files_under(store.join(brick, "test"), "train") == []
        everything = shards.files_under(layout.dataset_uri(store_uri, "demo"))
        listed = [shards.committed_files(store_uri, "demo", p, split) for p in products for split in ("train", "test")]
        assert everything == [uri for files in listed for uri in files]
        assert stray not in everything
        assert shards.files_under(store.join(brick, "nothing-here")) is None
    finally:
        store.delete(stray)
    with pytest.raises(IngestError, match="product 'nosuch' is not ingested in dataset 'demo'"):
        shards.committed_files(store_uri, "demo", "nosuch", "test")
    with pytest.raises(ValueError, match="split 'val'"):
        shards.committed_files(store_uri, "demo", "brick", "val")


def test_read_split_for_training(ingested, demo_root):
    store_uri = ingested["s3"]["store"]
    train = read_split(store_uri, "demo", "brick", "train", columns=["image", "superpixels", "mask", "label", "fold"])
    batches = list(train.iter_torch_batches(batch_size=4))
    assert sum(len(b["label"]) for b in batches) == 6
    batch = batches[0]
    assert batch["image"].shape[1:] == (3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["superpixels"].shape[1:] == (SIZE, SIZE) and batch["superpixels"].dtype == torch.int32
    assert batch["mask"].shape[1:] == (1, SIZE, SIZE) and batch["mask"].sum() == 0
    assert set(batch["label"].tolist()) == {0} and all(0 <= f < 10 for f in batch["fold"].tolist())

    test_rows = read_split(store_uri, "demo", "brick", "test", image_dtype="uint8").take_all()
    assert "superpixels" not in test_rows[0]
    by_id = {row["image_id"]: row for row in test_rows}
    hole = by_id["brick/test/hole/000.png"]
    assert hole["image"].dtype == np.uint8 and hole["label"] == 1 and hole["defect_type"] == "hole"
    expected_image = np.asarray(Image.open(demo_root / "brick" / "test" / "hole" / "000.png")).transpose(2, 0, 1)
    np.testing.assert_array_equal(hole["image"], expected_image)  # already at S: resize is the identity
    source_mask = np.asarray(Image.open(demo_root / "brick" / "ground_truth" / "hole" / "000_mask.png")) > 0
    np.testing.assert_array_equal(hole["mask"][0], source_mask.astype(np.float32))
    assert by_id["brick/test/good/000.png"]["mask"].sum() == 0


def test_cli_ingest(demo_root, ray_local, tmp_path, capsys):
    store_uri = str(tmp_path / "store")
    argv = ["ingest", str(demo_root), "--store", store_uri, "--dataset", "cli", "--products", "gravel"]
    argv += ["--image-size", "32", "--set", "n_segments=20"]
    assert cli_main(argv) == 0
    manifest = read_manifest(store_uri, "cli", "gravel")
    assert manifest["image_size"] == 32 and manifest["slic"]["n_segments"] == 20
    assert "gravel: 6 train, 7 test rows" in capsys.readouterr().out
    assert (tmp_path / "store" / "datasets" / "cli" / "ingest_config.yaml").read_text().startswith("source:")

    rows = read_split(store_uri, "cli", "gravel", "test").take_all()  # decoded at the manifest's 32 px
    row = next(r for r in rows if r["image_id"] == "gravel/test/crack/000.png")
    assert row["image"].shape == (3, 32, 32) and row["mask"].shape == (1, 32, 32)
    source = np.asarray(Image.open(demo_root / "gravel" / "ground_truth" / "crack" / "000_mask.png")) > 0
    expected = F.interpolate(torch.from_numpy(source.astype(np.float32))[None, None], size=(32, 32), mode="nearest")
    np.testing.assert_array_equal(row["mask"], expected[0].numpy())
    with pytest.raises(IngestError, match="not ingested"):
        read_split(store_uri, "cli", "brick", "train")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_stale_staging_folders_of_dead_runs_are_swept_young_ones_kept(kind, s3, tmp_path):
    root = store.join(s3.uri("sweep") if kind == "s3" else str(tmp_path), "datasets", "demo")
    now = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
    stale = _staging_name(now - dt.timedelta(hours=25))
    young = _staging_name(now - dt.timedelta(hours=1))
    for name in (stale, young, "_staging-0123456789ab"):  # the last: a name from before the time stamp
        store.write_bytes(store.join(root, name, "brick", "train", "part-00000.parquet"), b"staged")
    store.write_json(store.join(root, "brick", "manifest.json"), {"files": {}})
    assert sweep_stale_staging(root, now=now) == [stale]
    assert store.list_dirs(root) == sorted(["_staging-0123456789ab", young, "brick"])
    assert sweep_stale_staging(root, now=now) == []
