"""A training run's checkpoints: their files, their upload to the run folder, and reading them back.

A checkpoint folder ``<run>/checkpoint_epochNNNN/`` holds the weights and ``model.json`` of
:mod:`tsdn.checkpoint` (what the registry copies), the Adam state (``optimizer.safetensors``) and the JSON training
state (epoch, history, the optimizer's param groups). Every read and write goes through the store, so an outage
is waited out for the job's ``store_retry_s``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tsdn.checkpoint import MODEL_JSON, MODEL_WEIGHTS
from tsdn_platform import store

__all__ = [
    "CHECKPOINT_OPTIMIZER",
    "CHECKPOINT_STATE",
    "RESUME_FILES",
    "dir_name",
    "load_state",
    "read_reported",
    "state_files",
    "upload",
]

CHECKPOINT_STATE = "training_state.json"
CHECKPOINT_OPTIMIZER = "optimizer.safetensors"
# What a restarted worker reads to resume: the model, the training state and Adam's.
RESUME_FILES = (MODEL_WEIGHTS, MODEL_JSON, CHECKPOINT_STATE, CHECKPOINT_OPTIMIZER)


def state_files(
    model: Any, optimizer: torch.optim.Optimizer, calibration: Any, state: dict[str, Any]
) -> dict[str, bytes]:
    """Weights + model.json (tsdn.checkpoint), Adam state (safetensors) and the JSON training state, by file name."""
    import safetensors.torch

    from tsdn.checkpoint import checkpoint_files

    files = checkpoint_files(model, calibration, extra={"training": state})
    optim_state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, entry in optim_state["state"].items()
        for name, value in entry.items()
        if torch.is_tensor(value)
    }
    files[CHECKPOINT_OPTIMIZER] = safetensors.torch.save(tensors)
    files[CHECKPOINT_STATE] = json.dumps({**state, "param_groups": optim_state["param_groups"]}).encode()
    return files


def upload(run_uri: str, dir_name: str, files: Mapping[str, bytes]) -> Any:
    """Write a checkpoint's files into the run folder through the store; returns the ``ray.train.Checkpoint``.

    The platform uploads instead of Ray Train so that a store outage is waited out for ``store_retry_s`` (Ray's
    own upload retries three times, on top of the AWS SDK's attempts, whatever the budget) and surfaces as a
    :class:`store.StoreError`. Ray registers the checkpoint only after this returns, so an upload the outage cut
    short is a folder no kept checkpoint names (a resumed run overwrites it).
    """
    import ray.train

    uri = store.join(run_uri, dir_name)
    for name, data in files.items():
        store.write_bytes(store.join(uri, name), data)
    fs, path = store.resolve(uri)
    return ray.train.Checkpoint(path=path, filesystem=fs)


def load_state(files: Mapping[str, bytes], device: torch.device) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Checkpoint files -> (TSDN in train mode on ``device``, training state, Adam state for ``load_state_dict``)."""
    import safetensors.torch

    from tsdn.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint({name: files[name] for name in (MODEL_WEIGHTS, MODEL_JSON)}, device)
    state = json.loads(files[CHECKPOINT_STATE])
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in safetensors.torch.load(files[CHECKPOINT_OPTIMIZER]).items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer_state = {"state": per_param, "param_groups": state.pop("param_groups")}
    return model.train(), state, optimizer_state


def read_reported(run_uri: str, checkpoint: Any, names: Sequence[str]) -> dict[str, bytes]:
    """The named files of a reported ``ray.train.Checkpoint`` of the run at ``run_uri``, read through the store.

    Not through ``Checkpoint.as_directory()``: the workers of one node share its download folder, and a worker
    that arrives after another's download finished downloads again into it while the first is still reading
    (seen as a truncated optimizer file on restart after a worker failure).
    """
    uri = store.join(run_uri, os.path.basename(checkpoint.path.rstrip("/")))
    return {name: store.read_bytes(store.join(uri, name)) for name in names}


def dir_name(epoch: int) -> str:
    """The folder of the checkpoint reported after ``epoch``."""
    return f"checkpoint_epoch{epoch:04d}"
