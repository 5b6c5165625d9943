"""tsdn.resize (numpy + Pillow) equals torch's F.interpolate, the resizes the models were trained and scored with."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tsdn.resize import (
    input_shape,
    matching_input_shape,
    parse_image_size,
    resize_antialiased,
    resize_bilinear,
    resize_map,
    resize_mask,
    to_network_input,
)

IMAGE_SHAPES = [(37, 53), (300, 211), (128, 128), (900, 700), (64, 64), (20, 500)]
MAP_SHAPES = [(37, 53), (129, 31), (300, 200), (64, 64), (16, 24), (200, 40)]


def _torch(plane: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    tensor = torch.from_numpy(plane)[None, None]
    return F.interpolate(tensor, size=size, mode="bilinear", antialias=antialias, align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize(("shape", "side"), [(s, side) for s in IMAGE_SHAPES for side in (64, 128)])
def test_network_input_equals_torch_antialiased_bilinear(shape, side):
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    want = F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
    got = to_network_input(rgb, side)
    assert got.shape == (3, side, side) and got.dtype == np.float32
    assert np.abs(got - want.clamp(0, 1).numpy()).max() <= 5e-7  # a few float32 ulps


@pytest.mark.parametrize("shape", MAP_SHAPES)
def test_map_resizes_equal_torch(shape):
    plane = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    assert np.abs(resize_bilinear(plane, shape) - _torch(plane, shape, antialias=False)).max() <= 2e-6
    assert np.abs(resize_antialiased(plane, shape) - _torch(plane, shape, antialias=True)).max() <= 5e-6


def test_same_size_is_the_identity_and_bad_shapes_are_refused():
    plane = np.random.default_rng(2).random((32, 48)).astype(np.float32)
    np.testing.assert_array_equal(resize_bilinear(plane, (32, 48)), plane)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        resize_bilinear(plane[None], (8, 8))
    with pytest.raises(ValueError, match="uint8"):
        to_network_input(plane, 32)


@pytest.mark.parametrize(
    ("source", "target"), [((900, 900), (128, 128)), ((1408, 512), (64, 64)), ((37, 91), (128, 96))]
)
def test_resize_mask_is_torch_nearest_and_binary(source, target):
    mask = (np.random.default_rng(3).random(source) > 0.7).astype(np.uint8) * 255
    want = F.interpolate(torch.from_numpy(mask > 0).float()[None, None], size=target, mode="nearest")
    got = resize_mask(mask, target)
    assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1}
    np.testing.assert_array_equal(got, want[0, 0].numpy().astype(np.uint8))
    np.testing.assert_array_equal(resize_mask(mask, source), mask > 0)


def test_resize_map_shrinks_antialiased_and_grows_bilinear():
    plane = np.random.default_rng(4).random((64, 64)).astype(np.float32)
    np.testing.assert_array_equal(resize_map(plane, (64, 64)), plane)
    np.testing.assert_array_equal(resize_map(plane, (32, 48)), resize_antialiased(plane, (32, 48)))
    np.testing.assert_array_equal(resize_map(plane, (128, 96)), resize_bilinear(plane, (128, 96)))
    # one side shrinking is enough to need the antialiased filter
    np.testing.assert_array_equal(resize_map(plane, (32, 128)), resize_antialiased(plane, (32, 128)))


def test_a_network_input_of_another_aspect_equals_torch():
    rgb = np.random.default_rng(2).integers(0, 256, (250, 630, 3)).astype(np.uint8)
    ours = to_network_input(rgb, (128, 320))
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    theirs = F.interpolate(image, size=(128, 320), mode="bilinear", align_corners=False, antialias=True)[0]
    assert ours.shape == (3, 128, 320)
    assert np.abs(ours - theirs.clamp(0, 1).numpy()).max() < 5e-7
    assert np.array_equal(to_network_input(rgb, 64), to_network_input(rgb, (64, 64)))


def test_input_shape_reads_both_spellings():
    assert (
        input_shape(192) == (192, 192) and input_shape((320, 128)) == (320, 128) and input_shape([96, 64]) == (96, 64)
    )
    for bad in ("192", [192], (1.5, 2), True):
        with pytest.raises(ValueError, match="expected S"):
            input_shape(bad)


@pytest.mark.parametrize(
    ("image_shape", "size", "expected"),
    [
        ((630, 250), 192, (320, 128)),  # kolektor's parts at the pixels of 192 x 192
        ((250, 630), 192, (128, 320)),
        ((1024, 1024), 256, (256, 256)),  # square images keep a square input
        ((480, 640), (128, 128), (96, 160)),
        ((100, 5000), 128, (32, 896)),  # never below one stride of 32
    ],
)
def test_matching_input_shape_keeps_the_pixels_at_the_images_aspect(image_shape, size, expected):
    shape = matching_input_shape(image_shape, size)
    assert shape == expected and all(side % 32 == 0 for side in shape)


def test_matching_input_shape_refuses_an_empty_image():
    with pytest.raises(ValueError, match="both sides must be positive"):
        matching_input_shape((0, 10), 128)


def test_parse_image_size_turns_a_list_into_a_tuple_and_names_no_shape_for_junk():
    assert parse_image_size([320, 128]) == ((320, 128), (320, 128))
    assert parse_image_size(192) == (192, (192, 192))
    assert parse_image_size("192") == ("192", None) and parse_image_size([1, 2, 3]) == ((1, 2, 3), None)
