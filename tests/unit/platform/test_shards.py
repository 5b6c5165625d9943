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


def test_rows_decode_at_a_rectangular_training_size():
    """A manifest's ``image_size`` [H, W] (a JSON list): images, masks and superpixel maps come out (H, W)."""
    import io

    import numpy as np
    from PIL import Image

    from tsdn.surf import encode_labels

    def png(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    rgb = np.random.default_rng(0).integers(0, 256, (250, 100, 3), dtype=np.uint8)
    mask = np.zeros((250, 100), np.uint8)
    mask[100:150, 20:40] = 255
    labels = np.arange(64 * 32, dtype=np.int32).reshape(64, 32) // 64
    batch = {
        "image_id": np.array(["a"]),
        "image": np.array([png(rgb)], dtype=object),
        "mask": np.array([png(mask)], dtype=object),
        "label": np.array([1]),
        "fold": np.array([0]),
        "defect_type": np.array(["crack"]),
        "superpixels": np.array([encode_labels(labels)], dtype=object),
    }
    out = shards._decode_rows(batch, [64, 32], "float32", superpixels=True)
    assert out["image"].shape == (1, 3, 64, 32) and out["mask"].shape == (1, 1, 64, 32)
    assert out["superpixels"].shape == (1, 64, 32) and np.array_equal(out["superpixels"][0], labels)
    assert out["mask"][0, 0, 26:39, 7:13].all() and out["mask"].sum() < 64 * 32 / 4
