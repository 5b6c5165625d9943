"""Export a model's whole inference graph to ONNX or OpenVINO IR, checked against eager torch before it is written.

The graph (:class:`InferenceGraph`) is what :meth:`tsdn.predict.Predictor` calls the model for: a preprocessed
(B, 3, S, S) float32 batch in [0, 1] in (input ``image``, dynamic batch axis), the anomaly map (B, 1, S, S) and
the image score (B,) out (``anomaly_map``, ``anomaly_score``, as ``TSDN.predict`` returns them, so with
``map_strides`` the map of fewer stages than the score, and then a third output, ``scored_map``: the map the score
reduces, which a flagged image's mask falls back on), for the model's own score source: TSDN's
``reconstruction``, ``mask``, ``fused`` or ``feature`` (normalisation, encoder, decoders, blur and top-k inside),
and PatchCore's patch embedding with the nearest-neighbour search over its memory bank (the bank is a constant
of the graph, searched in fixed blocks of ``bank_chunk`` rows so that no (B·P, M) matrix larger than that exists).

The export is written only if the runtime it targets reproduces eager torch on a probe batch to within
:data:`PARITY_TOLERANCE` of the map's scale (``max(map range, max |map|)``); the measured differences are
recorded in ``export.json`` (format: :mod:`tsdn.runtime`).

The exporter is torch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``, opset 17): it traces
the eager modules as they are (timm's encoders, kornia's blur) and keeps a symbolic batch axis through
``dynamic_axes``. torch 2.9+ defaults to the ``torch.export`` path, which needs ``dynamic_shapes`` and refuses
the Python-level size arithmetic of the score functions; both write the same operators here.

onnx, onnxruntime and openvino are optional (the ``export`` extra) and imported only when an export runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tsdn.calibration import Calibration
from tsdn.checkpoint import MODEL_WEIGHTS, load_checkpoint
from tsdn.model import TSDN
from tsdn.patchcore import PatchCore, row_distance
from tsdn.runtime import (
    EXPORT_FORMATS,
    EXPORT_JSON,
    EXPORT_VERSION,
    INPUT_NAME,
    SCORED_MAP_NAME,
    OnnxRuntimeRunner,
    OpenVinoRunner,
    model_outputs,
)

__all__ = ["OPSET", "PARITY_TOLERANCE", "ExportError", "InferenceGraph", "export_checkpoint", "export_model"]

OPSET = 17
#: largest accepted |exported - torch| of maps and scores, as a fraction of the map's scale (fp32).
PARITY_TOLERANCE = 1e-4
_PROBE_BATCH = 3


class ExportError(ValueError):
    """The model cannot be exported (or the export does not reproduce it); the message says why. Picklable."""

    def __reduce__(self) -> tuple[type[ExportError], tuple[Any, ...]]:
        return (type(self), self.args)


class InferenceGraph(nn.Module):
    """The exported computation: ``image`` (B, 3, S, S) in [0, 1] -> (anomaly_map (B, 1, S, S), anomaly_score (B,)),
    and scored_map (B, 1, S, S) for a TSDN with ``map_strides`` (:attr:`output_names`).

    TSDN: :meth:`tsdn.model.TSDN.predict` as it is. PatchCore: :meth:`~tsdn.patchcore.PatchCore.embed`, the
    nearest bank row per patch by the expansion ``|q|^2 - 2 q.b + |b|^2`` (what ``torch.cdist`` and faiss
    search with) in static blocks of ``cfg.bank_chunk`` bank rows, the distance to it computed directly
    (:func:`~tsdn.patchcore.row_distance`, as :func:`~tsdn.patchcore.nearest_distance` returns it), then
    :meth:`~tsdn.patchcore.PatchCore.distance_map`.
    """

    def __init__(self, model: TSDN | PatchCore) -> None:
        super().__init__()
        self.model = model

    @property
    def output_names(self) -> tuple[str, ...]:
        """The graph's outputs, in order (:func:`tsdn.runtime.model_outputs`)."""
        return model_outputs(self.model)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pred = self._patchcore(image) if isinstance(self.model, PatchCore) else self.model.predict(image)
        return tuple(getattr(pred, name) for name in self.output_names)

    def _patchcore(self, image: torch.Tensor) -> Any:
        model = self.model
        emb = model.embed(image)
        dim, height, width = (int(n) for n in emb.shape[1:])  # fixed by S; the batch axis stays symbolic
        queries = emb.permute(0, 2, 3, 1).reshape(-1, height * width, dim).float()
        squared = queries.pow(2).sum(dim=-1, keepdim=True)
        best = index = None
        bank = model.bank
        for start in range(0, int(bank.shape[0]), model.cfg.bank_chunk):
            rows = bank[start : start + model.cfg.bank_chunk].float()
            value, found = (squared - 2.0 * queries @ rows.T + rows.pow(2).sum(dim=-1)).min(dim=-1)
            if best is None:
                best, index = value, found
            else:
                closer = value < best
                best, index = torch.where(closer, value, best), torch.where(closer, found + start, index)
        grid = row_distance(queries, bank, index).reshape(-1, 1, height, width)
        return model.distance_map(grid, tuple(int(n) for n in image.shape[-2:]))


def _probe(size: tuple[int, int]) -> torch.Tensor:
    """(_PROBE_BATCH, 3, H, W) in [0, 1]: a smooth pattern, uniform noise, and a mid-grey image with a bright square."""
    gen = torch.Generator().manual_seed(0)
    height, width = size
    yy, xx = torch.meshgrid(torch.linspace(0, 6.28, height), torch.linspace(0, 6.28, width), indexing="ij")
    smooth = torch.stack([0.5 + 0.4 * torch.sin(xx + k) * torch.cos(yy - k) for k in range(3)])
    square = torch.full((3, height, width), 0.5)
    square[:, height // 3 : height // 2, width // 3 : width // 2] = 1.0
    return torch.stack([smooth, torch.rand(3, height, width, generator=gen), square])


def _onnx_bytes(graph: InferenceGraph, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *graph.output_names)}
    with warnings.catch_warnings():
        # The tracer warns about every Python int taken from a size; sizes other than the batch are fixed here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (torch.zeros(2, 3, *size),),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=list(graph.output_names),
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return buffer.getvalue()


def _openvino_files(onnx_model: bytes) -> dict[str, bytes]:
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="tsdn-export-") as tmp:
        source = Path(tmp, "model.onnx")
        source.write_bytes(onnx_model)
        converted = ov.convert_model(str(source))
        # fp32 weights: compress_to_fp16 (the default) would change the maps beyond the parity tolerance
        ov.save_model(converted, str(Path(tmp, "model.xml")), compress_to_fp16=False)
        return {name: Path(tmp, name).read_bytes() for name in EXPORT_FORMATS["openvino"]}


def _missing_dependency(exc: ImportError) -> ExportError:
    return ExportError(f"export needs onnx, onnxruntime and openvino (pip install 'tsdn-platform[export]'): {exc}")


def export_model(
    model: TSDN | PatchCore,
    calibration: Calibration,
    fmt: str,
    source: Mapping[str, Any] | None = None,
) -> dict[str, bytes]:
    """Export ``model`` (eval mode, CPU) as ``fmt`` (``onnx`` or ``openvino``); returns ``{file name: bytes}``.

    ``source`` is recorded in ``export.json`` (the platform passes product, version and the sha256 of the weights).

    Raises:
        ExportError: unknown format, a PatchCore not fitted (no bank, or no statistics with ``pixel``), a missing
            optional dependency, or an export whose runtime does not reproduce eager torch within
            :data:`PARITY_TOLERANCE`.
    """
    if fmt not in EXPORT_FORMATS:
        msg = f"format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}"
        raise ExportError(msg)
    if isinstance(model, PatchCore):
        try:
            model.check_fitted()
        except RuntimeError as exc:
            raise ExportError(str(exc)) from exc
    model = model.cpu().eval()
    size = model.cfg.input_shape
    graph = InferenceGraph(model).eval()
    try:
        onnx_model = _onnx_bytes(graph, size)
        files = {"model.onnx": onnx_model} if fmt == "onnx" else _openvino_files(onnx_model)
        runner = OnnxRuntimeRunner(onnx_model, size) if fmt == "onnx" else OpenVinoRunner(files, size)
    except ImportError as exc:
        raise _missing_dependency(exc) from exc
    except RuntimeError as exc:  # the tracer's refusals (OnnxExporterError) and the runtimes' (their Fail)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = f"{model.FAMILY} ({model.cfg.backbone}, {size[0]}x{size[1]} px): cannot be exported as {fmt}: {first}"
        raise ExportError(msg) from exc
    graph.eval()  # torch.onnx.export restores the training flag it found; keep eval whatever the caller had
    probe = _probe(size)
    with torch.inference_mode():
        reference = model.predict(probe)
    got = runner(probe.numpy())
    expected_map = reference.anomaly_map.float().numpy()
    expected_score = reference.anomaly_score.float().numpy()
    scale = max(float(expected_map.max() - expected_map.min()), float(np.abs(expected_map).max()), 1e-12)
    parity = {
        "runtime": "onnxruntime" if fmt == "onnx" else "openvino",
        "probe_images": _PROBE_BATCH,
        "map_scale": scale,
        "max_abs_map": float(np.abs(got.anomaly_map - expected_map).max()),
        "max_abs_score": float(np.abs(got.anomaly_score - expected_score).max()),
        "tolerance": PARITY_TOLERANCE,
    }
    differences = [parity["max_abs_map"], parity["max_abs_score"]]
    if SCORED_MAP_NAME in graph.output_names:
        if got.scored_map is None:
            msg = f"{fmt} export: the runtime returned no {SCORED_MAP_NAME} output"
            raise ExportError(msg)
        parity["max_abs_scored_map"] = float(np.abs(got.scored_map - reference.scored_map.float().numpy()).max())
        differences.append(parity["max_abs_scored_map"])
    if max(differences) > PARITY_TOLERANCE * scale:
        scored_map = f", max |scored map diff| {differences[2]:.3g}" if len(differences) > 2 else ""
        msg = (
            f"{fmt} export does not reproduce the torch model: max |map diff| {parity['max_abs_map']:.3g}, "
            f"max |score diff| {parity['max_abs_score']:.3g}{scored_map} > {PARITY_TOLERANCE} x map scale {scale:.3g}"
        )
        raise ExportError(msg)
    files[EXPORT_JSON] = _meta(model, calibration, fmt, files, parity, source)
    return files


def _meta(
    model: TSDN | PatchCore,
    calibration: Calibration,
    fmt: str,
    files: Mapping[str, bytes],
    parity: dict[str, Any],
    source: Mapping[str, Any] | None,
) -> bytes:
    cfg = model.cfg
    height, width = cfg.input_shape
    meta = {
        "export_version": EXPORT_VERSION,
        "format": fmt,
        "family": model.FAMILY,
        "score_source": cfg.score_source if isinstance(model, TSDN) else "patch_distance",
        "score_topk": cfg.score_topk,
        # per-position statistics are constants of the exported graph
        "score_normalization": getattr(cfg, "score_normalization", "none"),
        "feature_distance": getattr(cfg, "feature_distance", "cosine"),
        "feature_whitening": getattr(cfg, "feature_whitening", "pooled"),
        # the map's stages, when not the score's (the calibration's map_offset puts it in the score's units)
        "map_strides": list(cfg.map_strides) if getattr(cfg, "map_strides", None) else None,
        # the blur of the map the score reads, when not the map's (map_strides; None: score_sigma)
        "image_score_sigma": getattr(cfg, "image_score_sigma", None),
        # the views whose maps the graph averages (TSDN's test_flips; with auto, the number the fit chose)
        "test_flips": model.test_flips if isinstance(model, TSDN) else 1,
        "backbone": cfg.backbone,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, height, width], "dtype": "float32", "range": [0.0, 1.0]},
        "outputs": {
            "anomaly_map": ["batch", 1, height, width],
            "anomaly_score": ["batch"],
            **({SCORED_MAP_NAME: ["batch", 1, height, width]} if SCORED_MAP_NAME in model_outputs(model) else {}),
        },
        "input_size": [height, width],
        "preprocess": "RGB (tsdn.image.to_rgb), /255, bilinear antialiased resize to input_size (tsdn.resize)",
        "normalization": {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(), "in_graph": True},
        "calibration": calibration.to_dict(),
        "config": cfg.to_dict(),
        "opset": OPSET,
        "torch_version": torch.__version__,
        "parity": parity,
        "source": dict(source or {}),
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in files.items()
        },
    }
    return json.dumps(meta, indent=2, sort_keys=True).encode()


def export_checkpoint(
    files: Mapping[str, bytes], fmt: str, source: Mapping[str, Any] | None = None
) -> dict[str, bytes]:
    """Export checkpoint files (:func:`tsdn.checkpoint.checkpoint_files`); ``source`` gains the weights' sha256."""
    model, calibration, _ = load_checkpoint(files)
    info = dict(source or {})
    info["weights_sha256"] = hashlib.sha256(files[MODEL_WEIGHTS]).hexdigest()
    return export_model(model, calibration, fmt, info)
