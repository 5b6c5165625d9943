"""``tsdn predict``: the standalone inferencer an edge box runs. No Ray, no torch, no timm in the process.

It loads an export folder (``tsdn export --out DIR``) on ONNX Runtime or OpenVINO, scores image files through
:class:`tsdn.predict.Predictor` (the pre- and post-processing scoring and serving use) and writes one JSON line
per image with the fields of the HTTP detect answer (:func:`tsdn.response.detect_answer`, plus ``product``,
``model_version``, ``family``, ``inference_ms``, ``batch_size``) and ``image``, the path it read. An image
that cannot be read or decoded gets a line with ``image`` and ``error`` instead; the command then exits 1.

Imports here are numpy, Pillow, the runtime and the numpy-only parts of ``tsdn``
(``image``, ``resize``, ``calibration``, ``runtime``, ``predict``, ``response``);
``tests/unit/test_export.py`` checks that torch, timm and ray stay out of the process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from tsdn.image import ImageDecodeError, decode_image
from tsdn.predict import Detection, Predictor
from tsdn.response import INCLUDES, detect_answer, threshold_problem
from tsdn.runtime import EXPORT_JSON, read_export_dir

__all__ = ["answer", "main", "predict_files"]


def answer(
    detection: Detection,
    source: dict[str, Any],
    family: str,
    image: str,
    inference_ms: float,
    batch_size: int,
    include: Sequence[str] = (),
) -> dict[str, Any]:
    """One image's line: who answered (the export's ``source``), the detect answer's fields, and the path."""
    fields = detect_answer(
        anomaly_score=detection.anomaly_score,
        normalized_score=detection.normalized_score,
        threshold=detection.threshold,
        anomaly_map=detection.anomaly_map,
        include=include,
        scored_map=detection.scored_map,
    )
    return {
        "image": image,
        "product": source.get("product", ""),
        "model_version": source.get("version", ""),
        "family": family,
        **fields,
        "inference_ms": round(inference_ms, 3),
        "batch_size": batch_size,
    }


def predict_files(
    model_dir: str,
    paths: Sequence[str],
    runtime: str | None = None,
    threshold: float | None = None,
    include: Sequence[str] = (),
    batch_size: int = 8,
) -> Iterator[dict[str, Any]]:
    """Score ``paths`` with the export in ``model_dir``; yields one answer (or error) dict per path, in order."""
    unknown = set(include) - set(INCLUDES)
    if unknown:
        msg = f"--include: unknown value(s) {', '.join(sorted(unknown))}; expected any of {', '.join(INCLUDES)}"
        raise ValueError(msg)
    files = read_export_dir(model_dir)
    predictor = Predictor.from_export(files, runtime, batch_size=batch_size)
    source = json.loads(files[EXPORT_JSON]).get("source", {})
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start : start + batch_size])
        images, readable, failed = [], [], {}
        for path in chunk:
            try:
                images.append(decode_image(Path(path).read_bytes(), path))
                readable.append(path)
            except (OSError, ImageDecodeError) as exc:
                failed[path] = str(exc) if isinstance(exc, ImageDecodeError) else f"{path}: {exc.strerror or exc}"
        began = time.perf_counter()
        detections = dict(zip(readable, predictor.predict(images, threshold))) if images else {}
        elapsed_ms = (time.perf_counter() - began) * 1000.0
        for path in chunk:
            if path in failed:
                yield {"image": path, "error": failed[path]}
            else:
                yield answer(detections[path], source, predictor.family, path, elapsed_ms, len(readable), include)


def main(args: argparse.Namespace) -> int:
    """``tsdn predict``: JSON lines on stdout (or ``--out``); exit 1 when any image could not be scored."""
    include = [item.strip() for item in args.include.split(",") if item.strip()]
    if args.batch_size < 1:
        msg = f"--batch-size: expected >= 1, got {args.batch_size}"
        raise ValueError(msg)
    if problem := threshold_problem(args.threshold):
        msg = f"--{problem}"
        raise ValueError(msg)
    if args.out and not Path(args.out).resolve().parent.is_dir():
        msg = f"--out {args.out}: its folder does not exist"
        raise ValueError(msg)
    out: TextIO = open(args.out, "w") if args.out else sys.stdout  # closed below
    failures = 0
    try:
        for line in predict_files(args.model, args.images, args.runtime, args.threshold, include, args.batch_size):
            failures += "error" in line
            out.write(json.dumps(line) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if failures:
        # Every failure is one line on stderr (the lines themselves went to --out, or stdout).
        where = f" (their lines in {args.out} say why)" if args.out else ""
        print(f"tsdn predict: {failures} of {len(args.images)} image(s) could not be scored{where}", file=sys.stderr)
    return 1 if failures else 0
