"""How training and evaluation turn a shard batch's images into the model's input (tsdn_platform.train_eval)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from tsdn_platform.train_eval import as_images


def test_read_only_batches_from_the_object_store_become_float_images_without_a_warning():
    """Ray hands out numpy batches as read-only views; wrapping one made torch warn on every submitted job's console."""
    array = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    array.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = as_images(array)
    assert images.dtype == torch.float32 and images.shape == (2, 3, 4, 4)
    torch.testing.assert_close(images, torch.from_numpy(array.astype(np.float32) / 255.0))
    images.zero_()  # the result is the caller's: the batch it came from is untouched
    assert array.max() == 2 * 3 * 4 * 4 - 1


def test_float_batches_and_tensors_keep_their_values():
    floats = np.random.default_rng(0).random((1, 3, 4, 4)).astype(np.float64)
    torch.testing.assert_close(as_images(floats), torch.from_numpy(floats).float())
    as_uint8 = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(as_images(as_uint8), torch.ones(1, 3, 2, 2))
    as_float = torch.rand(1, 3, 2, 2)
    assert as_images(as_float) is as_float  # already the model's input: no copy
