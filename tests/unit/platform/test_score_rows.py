"""The score-row contract: maps of any shape round-trip through one Parquet file and the three default readers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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
