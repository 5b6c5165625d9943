"""``tsdn export``: a registered version's whole inference graph as ONNX or OpenVINO IR (see :mod:`tsdn.export`).

``--out DIR`` writes the export's files (``model.onnx`` or ``model.xml`` + ``model.bin``, and ``export.json``)
into a folder that ``tsdn predict --model DIR`` runs without Ray or torch; ``--register`` stores it beside the
version's weights (``registry/<product>/versions/<v>/export/<format>/``), where score jobs and Serve replicas
with ``runtime: onnxruntime | openvino`` find it. Without ``--register`` they export on first use and register
what they made, so registering ahead only moves that cost (and the torch import) out of the first job.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tsdn_platform import store
from tsdn_platform.registry import Registry

__all__ = ["export_version", "main"]


def export_version(
    store_uri: str, product: str, version: str | None, fmt: str, out: str | None = None, register: bool = False
) -> dict[str, Any]:
    """Export ``product``'s ``version`` (default: the best) as ``fmt``; write it to ``out`` and/or register it.

    A registered export of the same weights is reused. Returns a summary: product, version, format, files,
    parity (the measured differences to eager torch), and where it was written.

    Raises:
        ValueError: neither ``out`` nor ``register``; :class:`tsdn.export.ExportError` (a ValueError) where the
            model cannot be exported; the registry's errors for an unknown product or version.
    """
    if not out and not register:
        msg = "export: give --out DIR, --register, or both"
        raise ValueError(msg)
    store.require(store_uri)
    registry = Registry(store_uri)
    files, ref = registry.load_export(product, version, fmt)
    reused = files is not None
    if files is None:
        from tsdn.export import export_checkpoint  # torch + onnx: only when an export is made

        checkpoint, ref = registry.load_files(product, ref.version)
        files = export_checkpoint(checkpoint, fmt, {"product": product, "version": ref.version})
    summary: dict[str, Any] = {"product": product, "version": ref.version, "format": fmt, "reused": reused}
    if register and not reused:
        summary["registered"] = registry.register_export(product, ref.version, files)
    elif register:
        summary["registered"] = registry.export_uri(product, ref.version, fmt)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        summary["out"] = str(folder)
    from tsdn.runtime import EXPORT_JSON

    meta = json.loads(files[EXPORT_JSON])
    summary["files"] = {name: info["bytes"] for name, info in meta["files"].items()}
    summary["parity"] = meta["parity"]
    return summary


def main(args: argparse.Namespace) -> int:
    """``tsdn export``: print the summary as JSON."""
    summary = export_version(args.store, args.product, args.version, args.format, args.out, args.register)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0
