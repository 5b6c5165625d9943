"""The shard contract's readers on a local store (no Ray): which files the manifests govern."""

from __future__ import annotations

from tsdn_platform import shards, store
from tsdn_platform.layout import dataset_uri


def test_a_product_without_a_manifest_is_left_out_and_the_others_keep_their_own_files(tmp_path):
    """Mid-swap, the index lists a product whose manifest is gone: its folder must not borrow another's files."""
    root = dataset_uri(str(tmp_path), "demo")
    store.write_json(store.join(root, shards.MANIFEST), {"products": {"alpha": {}, "beta": {}}})
    files = {"train": [{"path": "train/part-00000.parquet", "rows": 3}], "test": []}
    store.write_json(store.join(root, "beta", shards.MANIFEST), {"files": files})
    assert shards.files_under(root) == [store.join(root, "beta", "train/part-00000.parquet")]
    assert shards.ingested_products(str(tmp_path), "demo") == ["beta"]
    assert shards.files_under(store.join(root, "alpha")) is None
    assert shards.files_under(store.join(root, "beta", "test")) == []
    assert store.read_json_or_none(store.join(root, "alpha", shards.MANIFEST)) is None
