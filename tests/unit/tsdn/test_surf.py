import numpy as np
import pytest
import torch
from skimage import data

from tsdn.surf import SURF, decode_labels, encode_labels, slic_labels, surf_fill


@pytest.fixture(scope="module")
def texture() -> np.ndarray:
    return data.astronaut()[100:196, 150:246].copy()  # (96, 96, 3) uint8


@pytest.fixture(scope="module")
def labels(texture: np.ndarray) -> np.ndarray:
    return slic_labels(texture, n_segments=40)


def _batch(labels: np.ndarray, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(batch, 3, *labels.shape, generator=torch.Generator().manual_seed(7))
    return images, torch.from_numpy(np.stack([labels] * batch).astype(np.int64))


def test_slic_labels_are_contiguous_and_near_n_segments(labels: np.ndarray, texture: np.ndarray):
    assert labels.dtype == np.uint16
    assert labels.shape == texture.shape[:2]
    present = np.unique(labels)
    np.testing.assert_array_equal(present, np.arange(present.size))
    assert 20 <= present.size <= 60


def test_slic_labels_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match="uint8"):
        slic_labels(np.zeros((8, 8, 3), np.float32), 4)


def test_encode_decode_round_trip_is_exact_and_compact(labels: np.ndarray):
    encoded = encode_labels(labels)
    decoded = decode_labels(encoded, shape=labels.shape)
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, labels)
    assert len(encoded) < labels.astype(np.int64).nbytes / 20


def test_encode_keeps_full_uint16_range():
    labels = np.array([[0, 65535], [1234, 7]], dtype=np.int64)
    np.testing.assert_array_equal(decode_labels(encode_labels(labels)), labels)


def test_decode_rejects_garbage_and_wrong_shape(labels: np.ndarray):
    with pytest.raises(ValueError, match="not an encoded label map"):
        decode_labels(b"PNG\x00" + bytes(20))
    with pytest.raises(ValueError, match="expected"):
        decode_labels(encode_labels(labels), shape=(1, 1))
    with pytest.raises(ValueError, match="corrupt"):
        decode_labels(encode_labels(labels)[:-10])


def test_surf_fills_exactly_n_segments_and_nothing_else(labels: np.ndarray):
    images, lab = _batch(labels)
    distorted, mask = surf_fill(images, lab, n_filled=5, generator=torch.Generator().manual_seed(0))
    assert distorted.shape == images.shape and mask.shape == (3, 1, *labels.shape)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for b in range(images.shape[0]):
        filled = mask[b, 0].bool()
        chosen = lab[b][filled].unique()
        assert chosen.numel() == 5
        # the mask is the union of whole superpixels
        assert torch.equal(filled, torch.isin(lab[b], chosen))
        # unfilled pixels untouched, each filled segment has one colour
        assert torch.equal(distorted[b][:, ~filled], images[b][:, ~filled])
        for segment in chosen:
            pixels = distorted[b][:, lab[b] == segment]
            assert torch.equal(pixels, pixels[:, :1].expand_as(pixels))
            assert pixels.min() >= 0 and pixels.max() <= 1


def test_surf_choice_differs_between_samples(labels: np.ndarray):
    images, lab = _batch(labels, batch=4)
    _, mask = surf_fill(images, lab, n_filled=5, generator=torch.Generator().manual_seed(1))
    assert len({tuple(mask[b].flatten().tolist()) for b in range(4)}) > 1


def test_surf_seeding(labels: np.ndarray):
    images, lab = _batch(labels)
    a = surf_fill(images, lab, 5, torch.Generator().manual_seed(3))
    b = surf_fill(images, lab, 5, torch.Generator().manual_seed(3))
    c = surf_fill(images, lab, 5, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_surf_fills_all_segments_when_fewer_than_requested():
    lab = torch.tensor([[[0, 0, 1], [2, 2, 1], [2, 2, 1]], [[5, 5, 5], [5, 9, 9], [5, 9, 9]]])
    images = torch.full((2, 3, 3, 3), 0.5)
    distorted, mask = surf_fill(images, lab, n_filled=50, generator=torch.Generator().manual_seed(0))
    assert mask.all()
    # sample 1 has labels {5, 9} only: the absent labels 0..4, 6..8 must not count as "filled"
    assert lab[1][mask[1, 0].bool()].unique().tolist() == [5, 9]
    assert distorted.shape == images.shape


def test_surf_zero_filled_is_identity(labels: np.ndarray):
    images, lab = _batch(labels)
    distorted, mask = surf_fill(images, lab, n_filled=0)
    assert torch.equal(distorted, images)
    assert not mask.any()


def test_surf_module_matches_function(labels: np.ndarray):
    images, lab = _batch(labels)
    module_out = SURF(n_filled=4)(images, lab, torch.Generator().manual_seed(5))
    function_out = surf_fill(images, lab, 4, torch.Generator().manual_seed(5))
    assert torch.equal(module_out[0], function_out[0]) and torch.equal(module_out[1], function_out[1])


def test_surf_rejects_mismatched_shapes(labels: np.ndarray):
    images, lab = _batch(labels)
    with pytest.raises(ValueError, match="do not match"):
        surf_fill(images, lab[:, :-1], 5)


def test_surf_contiguous_fast_path_matches_general_path(labels: np.ndarray):
    images, lab = _batch(labels)
    general = surf_fill(images, lab, 5, torch.Generator().manual_seed(8))
    fast = surf_fill(images, lab.int(), 5, torch.Generator().manual_seed(8), contiguous=True)
    assert torch.equal(general[0], fast[0]) and torch.equal(general[1], fast[1])


def test_surf_contiguous_fast_path_respects_each_samples_label_count():
    # sample 0 has labels 0..1, sample 1 has 0..5: a sample never "fills" a label it does not have
    lab = torch.tensor([[[0, 0, 1], [0, 1, 1], [1, 1, 1]], [[0, 1, 2], [3, 4, 5], [5, 5, 5]]])
    images = torch.full((2, 3, 3, 3), 0.5)
    for seed in range(20):
        _, mask = surf_fill(images, lab, 2, torch.Generator().manual_seed(seed), contiguous=True)
        assert mask[0].all()  # both of sample 0's superpixels
        assert lab[1][mask[1, 0].bool()].unique().numel() == 2
