"""The score-row contract: maps of any shape round-trip through one Parquet file and the three default readers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tsdn_platform import score_rows, store
from tsdn_platform.score_rows import SCHEMA, UNROUTED, decode_maps, encode_maps, product_folder


def _table(maps: list[np.ndarray | None]) -> pa.Table:
    n = len(maps)
    columns = {name: pa.nulls(n, SCHEMA.field(name).type) for name in SCHEMA.names}
    columns["image_id"] = pa.array([f"img{i}" for i in range(n)])
    columns.update(encode_maps(maps))
    return pa.table(columns, schema=SCHEMA)


def test_maps_of_different_shapes_round_trip_through_parquet(tmp_path):
    rng = np.random.default_rng(0)
    maps = [rng.random((4, 6), np.float32), None, rng.random((3, 3)).astype(np.float16), np.zeros((1, 5))]
    pq.write_table(_table(maps), tmp_path / "part-0.parquet")
    table = pq.read_table(tmp_path / "part-0.parquet")
    assert table.schema.equals(SCHEMA)
    assert table["score_map_height"].to_pylist() == [4, None, 3, 1]
    assert table["score_map_width"].to_pylist() == [6, None, 3, 5]
    decoded = decode_maps(table)
    assert decoded[1] is None
    for want, got in zip(maps, decoded):
        if want is not None:
            assert got.dtype == np.float16 and got.shape == want.shape
            np.testing.assert_array_equal(got, np.asarray(want, np.float16))


def test_decode_works_on_a_slice_and_rejects_a_wrong_shape():
    maps = [np.full((2, 2), i, np.float16) for i in range(4)]
    sliced = decode_maps(_table(maps).slice(2))
    assert [m[0, 0] for m in sliced] == [2, 3]
    broken = _table(maps)
    broken = broken.set_column(
        broken.schema.get_field_index("score_map_width"), "score_map_width", pa.array([2, 2, 3, 2], pa.int32())
    )
    with pytest.raises(ValueError, match="score row 2: score_map holds 4 values, not height x width = 2 x 3"):
        decode_maps(broken)
    with pytest.raises(ValueError, match="score_map_height"):
        decode_maps(broken.drop_columns(["score_map_height"]))
    with pytest.raises(ValueError, match="expected an \\(H, W\\) map"):
        encode_maps([np.zeros((2, 2, 3))])


def test_product_folders_are_plain_names_that_no_reader_skips():
    assert product_folder("bottle") == "bottle"
    assert product_folder(None) == UNROUTED
    assert not UNROUTED.startswith(("_", ".")) and "=" not in UNROUTED  # not hidden, not a Hive key
    with pytest.raises(ValueError, match="not a product name"):
        product_folder("_staging")


def test_source_uris_of_shard_rows_round_trip_and_raw_files_stay_whole():
    uri = score_rows.shard_source("s3://b/datasets/d/p/test/part-00000.parquet", "p/test/crack/001.png")
    assert uri == "s3://b/datasets/d/p/test/part-00000.parquet#p/test/crack/001.png"
    assert score_rows.parse_source(uri) == ("s3://b/datasets/d/p/test/part-00000.parquet", "p/test/crack/001.png")
    # A raw image is its own source, even with a '#' in its name (only a .parquet base names a shard).
    assert score_rows.parse_source("/data/line#2/img.png") == ("/data/line#2/img.png", None)
    assert score_rows.parse_source("s3://b/x.parquet#") == ("s3://b/x.parquet#", None)


def test_committed_files_are_the_manifests_not_a_listing(tmp_path):
    output = str(tmp_path / "scores")
    with pytest.raises(ValueError, match="no committed score job"):
        score_rows.committed_files(output)
    assert score_rows.read_manifest(output) is None
    products = {"a": {"files": ["a/part-1.parquet"]}, "@unrouted": {"files": ["@unrouted/part-2.parquet"]}}
    manifest = {"products": products}
    store.write_json(store.join(output, score_rows.MANIFEST), manifest)
    store.write_bytes(store.join(output, "a", "part-stray.parquet"), b"left by a crashed attempt")
    assert score_rows.read_manifest(output) == manifest
    assert sorted(score_rows.committed_files(output)) == [
        store.join(output, "@unrouted/part-2.parquet"),
        store.join(output, "a/part-1.parquet"),
    ]


def test_the_row_fingerprint_is_order_free_additive_and_sees_a_row_swapped_for_a_duplicate():
    products = ["brick", "brick", None, "grass"]
    ids = ["good/000.png", "crack/001.png", "x.png", "good/000.png"]
    whole = score_rows.row_fingerprint(products, ids)
    assert score_rows.row_fingerprint(products[::-1], ids[::-1]) == whole
    # Sums of the fingerprints of parts are the fingerprint of the whole (what the score job adds up).
    parts = score_rows.row_fingerprint(products[:1], ids[:1]) + score_rows.row_fingerprint(products[1:], ids[1:])
    assert parts % 2**64 == whole
    # The same count, one row written twice and another missing: a different fingerprint.
    assert score_rows.row_fingerprint([*products[:3], "brick"], [*ids[:3], "good/000.png"]) != whole
    # The key is (product, image_id): the same image id under another product is another row.
    fingerprint = score_rows.row_fingerprint
    assert fingerprint(["grass"], ["good/000.png"]) != fingerprint(["brick"], ["good/000.png"])
    assert 0 <= whole < 2**64
    with pytest.raises(ValueError):
        score_rows.row_fingerprint(["brick"], [])
