"""Model runners: the one call :class:`tsdn.predict.Predictor` swaps between eager torch and exported runtimes.

A runner maps a preprocessed batch to the model's anomaly map and image score; everything before (decode, RGB,
resize) and after (calibration, the map at the image's resolution) is the Predictor's, for every runtime.

======================  =====================================  ==========================================
runtime                 loads                                  imports
======================  =====================================  ==========================================
``torch``               the module (``TSDN`` / ``PatchCore``)  torch, timm, kornia
``onnxruntime``         ``model.onnx`` of an ``onnx`` export   onnxruntime, numpy
``openvino``            ``model.xml`` + ``model.bin`` of an    openvino, numpy
                        ``openvino`` export (or ``model.onnx``)
======================  =====================================  ==========================================

An export (written by :func:`tsdn.export.export_model`) is a folder of the format's files plus ``export.json``:
the input size and layout, the normalisation (inside the graph), the calibration, the score source, the model
family, the source version and the sha256 of the weights it came from and of every file. This module reads it
with numpy alone, so an edge box or a scorer actor running an export never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from tsdn.calibration import Calibration
from tsdn.config_io import json_member

__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_JSON",
    "EXPORT_VERSION",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "RUNTIMES",
    "SCORED_MAP_NAME",
    "ExportedModel",
    "ModelRunner",
    "OnnxRuntimeRunner",
    "OpenVinoRunner",
    "RunnerOutput",
    "TorchRunner",
    "load_exported",
    "model_outputs",
    "read_export_dir",
    "runtime_format",
    "runtime_problem",
]

EXPORT_JSON = "export.json"
EXPORT_VERSION = 1
#: export format -> the files it holds beside ``export.json``.
EXPORT_FORMATS: dict[str, tuple[str, ...]] = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin")}
#: the runtimes of scoring and serving; every one but ``torch`` runs an export.
RUNTIMES = ("torch", "onnxruntime", "openvino")


def runtime_problem(runtime: str, gpus: float, gpu_key: str) -> str | None:
    """Why a job's ``runtime`` setting cannot work (an unknown name, or an exported runtime asked to use GPUs)."""
    if runtime not in RUNTIMES:
        return f"runtime={runtime!r}: expected one of {', '.join(RUNTIMES)}"
    if runtime != "torch" and gpus > 0:
        return f"runtime={runtime}: runs on the CPU; use runtime torch with {gpu_key} > 0"
    return None


INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "anomaly_score")
#: the third output of an export whose image score reduces another map than ``anomaly_map`` (TSDN's ``map_strides``);
#: an export without it (a model that scores its own map, or one written before 2026-12-07) has none.
SCORED_MAP_NAME = "scored_map"


class RunnerOutput(NamedTuple):
    """A runner's result.

    Attributes:
        anomaly_map: (B, 1, S, S) float32, the map of the model's score source (of its ``map_strides`` stages, with
            them), before the calibration's ``map_offset``.
        anomaly_score: (B,) float32 image scores.
        scored_map: (B, 1, S, S) float32, the map the score reduces, where it is not ``anomaly_map`` (TSDN's
            ``map_strides``: every stage's map; in the score's units); None for a model that scores its own map.
    """

    anomaly_map: np.ndarray
    anomaly_score: np.ndarray
    scored_map: np.ndarray | None = None


@runtime_checkable
class ModelRunner(Protocol):
    """The model call: ``runner(batch)`` with ``batch`` (B, 3, H, W) float32 in [0, 1], (H, W) = ``image_size``.

    ``family`` names the model family (``tsdn``, ``patchcore``) that answers.
    """

    image_size: tuple[int, int]
    family: str

    def __call__(self, batch: np.ndarray) -> RunnerOutput: ...


def runtime_format(runtime: str) -> str:
    """The export format a runtime loads: ``onnxruntime`` -> ``onnx``, ``openvino`` -> ``openvino``."""
    formats = {"onnxruntime": "onnx", "openvino": "openvino"}
    if runtime not in formats:
        msg = f"runtime {runtime!r}: runs no export; expected one of {', '.join(formats)}"
        raise ValueError(msg)
    return formats[runtime]


def _threads() -> int:
    """Intra-op threads for an exported runtime: ``OMP_NUM_THREADS`` when set (Ray sets it to an actor's CPUs;
    neither runtime reads it itself), else 0 = the runtime's default (one per core)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() else 0


def _check_batch(batch: np.ndarray, size: tuple[int, int], who: str) -> np.ndarray:
    if batch.ndim != 4 or batch.shape[0] == 0 or batch.shape[1:] != (3, *size):
        msg = f"{who}: expected a non-empty (B, 3, {size[0]}, {size[1]}) batch, got {tuple(batch.shape)}"
        raise ValueError(msg)
    return np.ascontiguousarray(batch, dtype=np.float32)


class TorchRunner:
    """Eager torch: ``model.predict`` (either family) on ``device``, under inference mode.

    Args:
        model: a ``TSDN`` or ``PatchCore`` (switched to eval mode and moved to ``device``).
        device: None keeps the model's device.
    """

    def __init__(self, model: Any, device: Any = None) -> None:
        import torch  # here, not at the top: processes running an export never import torch

        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.image_size = model.cfg.input_shape
        self.family = str(model.FAMILY)
        self.scores_another_map = SCORED_MAP_NAME in model_outputs(model)

    def __call__(self, batch: np.ndarray) -> RunnerOutput:
        import torch

        batch = _check_batch(batch, self.image_size, "TorchRunner")
        with torch.inference_mode():
            pred = self.model.predict(torch.from_numpy(batch).to(self.device))
        scored_map = pred.scored_map.float().cpu().numpy() if self.scores_another_map else None
        return RunnerOutput(
            pred.anomaly_map.float().cpu().numpy(), pred.anomaly_score.float().cpu().numpy().reshape(-1), scored_map
        )


class OnnxRuntimeRunner:
    """An ONNX export on ONNX Runtime's CPU provider.

    Args:
        model: the ``model.onnx`` bytes.
        image_size: (H, W) of the export's (B, 3, H, W) input.
        threads: intra-op threads; None = ``OMP_NUM_THREADS`` if set, else one per core.
        family: the exported model's family (from ``export.json``).
    """

    def __init__(self, model: bytes, image_size: tuple[int, int], threads: int | None = None, family: str = "") -> None:
        import onnxruntime as ort  # optional dependency (the ``export`` extra)

        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads() if threads is None else threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.image_size = image_size
        self.family = family
        self.outputs = _output_names(output.name for output in self.session.get_outputs())

    def __call__(self, batch: np.ndarray) -> RunnerOutput:
        batch = _check_batch(batch, self.image_size, "OnnxRuntimeRunner")
        return _runner_output(self.session.run(self.outputs, {INPUT_NAME: batch}))


class OpenVinoRunner:
    """An OpenVINO IR export (or an ONNX model, which OpenVINO reads too) compiled for the CPU.

    Args:
        files: ``{"model.xml", "model.bin"}`` bytes, or ``{"model.onnx"}``.
        image_size: (H, W) of the (B, 3, H, W) input.
        threads: inference threads; None = ``OMP_NUM_THREADS`` if set, else one per core.
        family: the exported model's family (from ``export.json``).
    """

    def __init__(
        self, files: Mapping[str, bytes], image_size: tuple[int, int], threads: int | None = None, family: str = ""
    ) -> None:
        import openvino as ov  # optional dependency (the ``export`` extra)

        core = ov.Core()
        if "model.xml" in files:
            model = core.read_model(model=files["model.xml"], weights=files["model.bin"])
        else:
            model = core.read_model(model=files["model.onnx"], weights=b"")
        count = _threads() if threads is None else threads
        config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": count} if count else {})}
        self.compiled = core.compile_model(model, "CPU", config)
        self.image_size = image_size
        self.family = family
        self.outputs = _output_names(name for output in self.compiled.outputs for name in output.get_names())

    def __call__(self, batch: np.ndarray) -> RunnerOutput:
        batch = _check_batch(batch, self.image_size, "OpenVinoRunner")
        result = self.compiled(batch)
        return _runner_output([np.asarray(result[self.compiled.output(name)]) for name in self.outputs])


def model_outputs(model: Any) -> tuple[str, ...]:
    """The outputs a model's call gives, eager or exported: :data:`OUTPUT_NAMES`, and :data:`SCORED_MAP_NAME` for a
    model whose image score reduces another map than its anomaly map (TSDN's ``scores_another_map``)."""
    return (*OUTPUT_NAMES, *((SCORED_MAP_NAME,) if getattr(model, "scores_another_map", False) else ()))


def _output_names(names: Iterable[str]) -> list[str]:
    """The outputs an exported graph is read for: :data:`OUTPUT_NAMES`, and :data:`SCORED_MAP_NAME` where it has it."""
    present = set(names)
    missing = [name for name in OUTPUT_NAMES if name not in present]
    if missing:
        msg = f"exported graph: no output(s) {', '.join(missing)}; it has {', '.join(sorted(present))}"
        raise ValueError(msg)
    return [*OUTPUT_NAMES, *([SCORED_MAP_NAME] if SCORED_MAP_NAME in present else [])]


def _runner_output(values: list[np.ndarray]) -> RunnerOutput:
    """An exported graph's outputs, in :func:`_output_names` order -> float32 :class:`RunnerOutput`."""
    anomaly_map, anomaly_score = (np.asarray(v, dtype=np.float32) for v in values[:2])
    scored_map = np.asarray(values[2], dtype=np.float32) if len(values) > 2 else None
    return RunnerOutput(anomaly_map, anomaly_score.reshape(-1), scored_map)


class ExportedModel(NamedTuple):
    """A loaded export: the runner, the calibration and ``export.json``."""

    runner: ModelRunner
    calibration: Calibration
    meta: dict[str, Any]


def load_exported(files: Mapping[str, bytes], runtime: str | None = None, threads: int | None = None) -> ExportedModel:
    """Check an export's files against ``export.json`` and load it on ``runtime`` (None: the format's own).

    Raises:
        ValueError: ``export.json`` missing, unreadable or of another version; a file missing or whose sha256
            differs; a runtime that cannot run the format.
    """
    meta = _parse_meta(files)
    fmt = meta["format"]
    runtime = runtime or {"onnx": "onnxruntime", "openvino": "openvino"}[fmt]
    if runtime not in RUNTIMES[1:]:
        msg = f"runtime {runtime!r}: an export runs on {' or '.join(RUNTIMES[1:])}"
        raise ValueError(msg)
    if runtime == "onnxruntime" and fmt != "onnx":
        msg = f"runtime onnxruntime runs onnx exports; this export is {fmt!r} (export with --format onnx)"
        raise ValueError(msg)
    size = (int(meta["input_size"][0]), int(meta["input_size"][1]))
    calibration = Calibration.from_dict(meta["calibration"])
    model_files = {name: files[name] for name in EXPORT_FORMATS[fmt]}
    if runtime == "onnxruntime":
        runner: ModelRunner = OnnxRuntimeRunner(model_files["model.onnx"], size, threads, meta["family"])
    else:
        runner = OpenVinoRunner(model_files, size, threads, meta["family"])
    return ExportedModel(runner, calibration, meta)


def _parse_meta(files: Mapping[str, bytes]) -> dict[str, Any]:
    meta = json_member(files, EXPORT_JSON, "export")
    if meta.get("export_version") != EXPORT_VERSION:
        msg = f"export {EXPORT_JSON}: export_version {meta.get('export_version')!r}, this code reads {EXPORT_VERSION}"
        raise ValueError(msg)
    fmt = meta.get("format")
    if fmt not in EXPORT_FORMATS:
        msg = f"export {EXPORT_JSON}: unknown format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}"
        raise ValueError(msg)
    for name in EXPORT_FORMATS[fmt]:
        if name not in files:
            msg = f"export: {name} missing (a {fmt} export holds {', '.join(EXPORT_FORMATS[fmt])})"
            raise ValueError(msg)
        expected = meta.get("files", {}).get(name, {}).get("sha256")
        if expected != hashlib.sha256(files[name]).hexdigest():
            msg = f"export: {name}: sha256 does not match {EXPORT_JSON} (corrupt or replaced file)"
            raise ValueError(msg)
    return meta


def read_export_dir(directory: str | Path) -> dict[str, bytes]:
    """The files of an export folder (``export.json`` and the format's files) as ``{name: bytes}``."""
    root = Path(directory)
    meta_path = root / EXPORT_JSON
    if not meta_path.is_file():
        msg = f"{root}: not an export folder ({EXPORT_JSON} missing; write one with `tsdn export`)"
        raise ValueError(msg)
    files = {EXPORT_JSON: meta_path.read_bytes()}
    fmt = _format_of(root, files[EXPORT_JSON])
    for name in EXPORT_FORMATS[fmt]:
        path = root / name
        if not path.is_file():
            msg = f"{root}: {name} missing (a {fmt} export holds {', '.join(EXPORT_FORMATS[fmt])})"
            raise ValueError(msg)
        files[name] = path.read_bytes()
    return files


def _format_of(root: Path, meta_bytes: bytes) -> str:
    try:
        fmt = json.loads(meta_bytes).get("format")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        msg = f"{root / EXPORT_JSON}: not an export description ({exc})"
        raise ValueError(msg) from exc
    if fmt not in EXPORT_FORMATS:
        msg = f"{root / EXPORT_JSON}: unknown format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}"
        raise ValueError(msg)
    return fmt
