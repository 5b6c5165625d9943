"""Checkpoint files: safetensors + model.json, strict and bit-identical round trip, no pickle."""

import dataclasses
import json
import struct

import pytest
import safetensors.torch
import torch

from tsdn.checkpoint import FORMAT_VERSION, checkpoint_files, load_checkpoint
from tsdn.config import TSDNConfig
from tsdn.losses import TSDNLoss
from tsdn.model import TSDN
from tsdn.scoring import fit_calibration

CFG = TSDNConfig(
    image_size=64, backbone="test_efficientnet", weights="none", feature_channels=8, fne_hidden=16, fne_pool=2
)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = TSDN(CFG).train()
    image = torch.rand(2, 3, 64, 64)
    mask = (torch.rand(2, 1, 64, 64) > 0.7).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    total, _ = TSDNLoss(CFG)(model(image), image, mask)
    total.backward()
    optimizer.step()  # weights and BatchNorm statistics now differ from any fresh init
    calibration = fit_calibration([0.1, 0.2, 0.3, 0.25])
    return model.eval(), calibration


def test_round_trip_is_bit_identical(trained):
    model, calibration = trained
    files = checkpoint_files(model, calibration, extra={"manifest_sha256": "abc"})
    assert set(files) == {"model.safetensors", "model.json"}
    loaded, loaded_calibration, meta = load_checkpoint(files)
    assert not loaded.training
    assert loaded_calibration == calibration
    assert meta["extra"] == {"manifest_sha256": "abc"}
    assert loaded.cfg == CFG
    image = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = model.predict(image), loaded.predict(image)
    for a, b in zip(expected, actual):
        assert torch.equal(a, b)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_model_json_describes_everything_needed_to_score(trained):
    model, calibration = trained
    meta = json.loads(checkpoint_files(model, calibration)["model.json"])
    assert meta["format_version"] == FORMAT_VERSION
    assert TSDNConfig.from_dict(meta["config"]) == CFG
    assert meta["backbone"] == "test_efficientnet"
    assert meta["input_size"] == [64, 64]
    assert meta["normalization"]["mean"] == pytest.approx(list(model.encoder.pretrained_cfg["mean"]))
    assert meta["normalization"]["std"] == pytest.approx(list(model.encoder.pretrained_cfg["std"]))
    assert meta["calibration"] == calibration.to_dict()
    assert meta["extra"] == {}


def test_weights_are_safetensors_not_pickle(trained):
    model, calibration = trained
    data = checkpoint_files(model, calibration)["model.safetensors"]
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == set(model.state_dict())
    assert not data.startswith(b"\x80")  # a pickle protocol >= 2 stream starts with PROTO


def test_channels_last_model_saves_and_loads(trained):
    model, calibration = trained
    last = TSDN(CFG)
    last.load_state_dict(model.state_dict())
    last = last.eval().to(memory_format=torch.channels_last)
    loaded, _, _ = load_checkpoint(checkpoint_files(last, calibration))
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_bad_checkpoints_are_named(trained):
    model, calibration = trained
    files = checkpoint_files(model, calibration)
    with pytest.raises(ValueError, match=r"model\.json missing"):
        load_checkpoint({"model.safetensors": files["model.safetensors"]})
    meta = json.loads(files["model.json"])
    with pytest.raises(ValueError, match="format_version 99"):
        load_checkpoint({**files, "model.json": json.dumps({**meta, "format_version": 99}).encode()})
    other = dataclasses.replace(CFG, feature_channels=4)
    mismatched = json.dumps({**meta, "config": other.to_dict()}).encode()
    with pytest.raises(ValueError, match="does not match the model"):
        load_checkpoint({**files, "model.json": mismatched})
    with pytest.raises(ValueError, match=r"model\.safetensors: unreadable"):
        load_checkpoint({**files, "model.safetensors": b"\x00" * 16})
    with pytest.raises(ValueError, match="not JSON"):
        load_checkpoint({**files, "model.json": b"{"})


def test_loading_never_fetches_the_backbone_weights_and_keeps_the_spec(tmp_path, trained):
    model, calibration = trained
    weights = tmp_path / "encoder.safetensors"
    safetensors.torch.save_file(model.encoder.state_dict(), weights)
    cfg = dataclasses.replace(CFG, weights=str(weights))
    pretrained = TSDN(cfg).eval()
    files = checkpoint_files(pretrained, calibration)
    weights.unlink()  # a server has the checkpoint, not the training-time weights source
    loaded, _, meta = load_checkpoint(files)
    assert loaded.cfg == cfg and meta["config"]["weights"] == str(weights)
    assert json.loads(checkpoint_files(loaded, calibration)["model.json"])["config"] == meta["config"]
    for key, value in pretrained.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
