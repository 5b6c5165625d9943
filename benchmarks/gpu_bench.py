"""Throughput and memory of TSDN training and scoring on one accelerator (run by ``benchmarks/gpu.sh``).

For every (backbone, input size) x precision case it measures, on synthetic batches made on the device:

- training images/s: SURF fill (:func:`tsdn.surf.surf_fill`) + TSDN forward + :class:`tsdn.losses.TSDNLoss` +
  backward + Adam step;
- scoring images/s: :meth:`tsdn.model.TSDN.predict` under ``torch.inference_mode``;
- peak device memory of each phase (``torch.cuda.max_memory_allocated``, CUDA only).

Precisions: ``fp32``, and ``bf16-cl`` = bf16 autocast with channels_last model and inputs (what the training
loop uses on GPUs). Weights are random ("none"): throughput does not depend on their values, and the GPU
machine has no network to fetch ImageNet weights. Each case runs ``warmup`` untimed iterations, then
``iters`` timed ones between device synchronisations.

``--device cpu --tiny`` is a smoke mode (timm ``test_efficientnet`` at 64 px, tiny batches) that proves the
script runs; its numbers mean nothing for a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from skimage import data as skdata
from skimage.transform import resize

from tsdn.config import TSDNConfig
from tsdn.losses import TSDNLoss
from tsdn.model import TSDN
from tsdn.surf import slic_labels
from tsdn.training import build_optimizer, train_step

PRECISIONS = ("fp32", "bf16-cl")
# (backbone, input size): the paper's configuration and the offline default's backbone at the same size.
GPU_CASES = (("efficientnet_b5", 352), ("tf_efficientnet_lite0", 352))
TINY_CASES = (("test_efficientnet", 64),)


@dataclass(frozen=True)
class CaseResult:
    backbone: str
    image_size: int
    precision: str
    train_batch: int
    score_batch: int
    train_images_per_s: float | None = None
    score_images_per_s: float | None = None
    train_peak_mib: float | None = None
    score_peak_mib: float | None = None
    params_m: float | None = None
    error: str | None = None


def _synthetic_batch(size: int, batch: int, n_segments: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A real photograph repeated ``batch`` times with its SLIC labels: images (B, 3, S, S), labels (B, S, S)."""
    photo = resize(skdata.astronaut(), (size, size), anti_aliasing=True)  # float in [0, 1]
    labels = slic_labels((photo * 255).astype(np.uint8), n_segments)
    images = torch.from_numpy(photo).float().permute(2, 0, 1).unsqueeze(0).repeat(batch, 1, 1, 1)
    label_t = torch.from_numpy(labels.astype(np.int64)).unsqueeze(0).repeat(batch, 1, 1)
    return images.to(device), label_t.to(device)


def _timed(step: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Seconds for ``iters`` calls of ``step`` after ``warmup`` untimed ones, device-synchronised."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _measure_training(
    model: TSDN, cfg: TSDNConfig, bf16: bool, device: torch.device, batch: int, warmup: int, iters: int
) -> tuple[float, float | None]:
    """(images/s, peak MiB) of SURF fill + forward + loss + backward + Adam step on one synthetic batch."""
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    loss_fn = TSDNLoss(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    generator = torch.Generator(device=device).manual_seed(0)
    images, labels = _synthetic_batch(cfg.image_size, batch, cfg.n_segments, device)
    images = images.contiguous(memory_format=memory_format)

    def step() -> None:
        # The training job's own step (tsdn.training), so the GPU figure is the shipped code's.
        train_step(model, loss_fn, optimizer, images, labels, cfg, generator, 1, autocast=bf16, channels_last=bf16)

    model.train()
    _reset_peak(device)
    seconds = _timed(step, warmup, iters, device)
    return batch * iters / seconds, _peak_mib(device)


def _measure_scoring(
    model: TSDN, cfg: TSDNConfig, bf16: bool, device: torch.device, batch: int, warmup: int, iters: int
) -> tuple[float, float | None]:
    """(images/s, peak MiB) of ``model.predict`` under inference_mode on one synthetic batch."""
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    images, _ = _synthetic_batch(cfg.image_size, batch, cfg.n_segments, device)
    images = images.contiguous(memory_format=memory_format)

    def step() -> None:
        with torch.inference_mode(), _autocast(device, bf16):
            model.predict(images)

    model.eval()
    _reset_peak(device)
    seconds = _timed(step, warmup, iters, device)
    return batch * iters / seconds, _peak_mib(device)


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def run_case(
    backbone: str,
    size: int,
    precision: str,
    device: torch.device,
    train_batch: int,
    score_batch: int,
    warmup: int,
    iters: int,
) -> CaseResult:
    """Measure one (backbone, size, precision) case; see the module docstring."""
    cfg = TSDNConfig(image_size=size, backbone=backbone, weights="none")
    bf16 = precision == "bf16-cl"
    model = TSDN(cfg).to(device=device, memory_format=torch.channels_last if bf16 else torch.contiguous_format)
    train_ips, train_mib = _measure_training(model, cfg, bf16, device, train_batch, warmup, iters)
    _reset_peak(device)  # frees the optimizer state and the training batch before scoring
    score_ips, score_mib = _measure_scoring(model, cfg, bf16, device, score_batch, warmup, iters)
    return CaseResult(
        backbone,
        size,
        precision,
        train_batch,
        score_batch,
        train_images_per_s=train_ips,
        score_images_per_s=score_ips,
        train_peak_mib=train_mib,
        score_peak_mib=score_mib,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: list[CaseResult]) -> str:
    header = (
        f"{'backbone':<24} {'size':>4} {'precision':<8} {'params M':>8} {'train img/s':>11} {'train MiB':>9} "
        f"{'score img/s':>11} {'score MiB':>9}  error"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.backbone:<24} {r.image_size:>4} {r.precision:<8} {_fmt(r.params_m, '.1f'):>8} "
            f"{_fmt(r.train_images_per_s, '.1f'):>11} {_fmt(r.train_peak_mib, '.0f'):>9} "
            f"{_fmt(r.score_images_per_s, '.1f'):>11} {_fmt(r.score_peak_mib, '.0f'):>9}  {r.error or ''}"
        )
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, str]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = str(torch.version.cuda)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (cuda, cuda:1, cpu)")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: test_efficientnet at 64 px, tiny batches")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (default 16; tiny 2)")
    parser.add_argument("--score-batch", type=int, default=None, help="scoring batch (default 32; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations per phase (default 5; tiny 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per phase (default 20; tiny 2)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available to torch {torch.__version__}", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32; bf16 is the fast path being measured
    torch.backends.cudnn.allow_tf32 = False
    cases = TINY_CASES if args.tiny else GPU_CASES
    train_batch = args.train_batch or (2 if args.tiny else 16)
    score_batch = args.score_batch or (2 if args.tiny else 32)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    iters = args.iters or (2 if args.tiny else 20)

    results = []
    for backbone, size in cases:
        for precision in PRECISIONS:
            start = time.perf_counter()
            try:
                result = run_case(backbone, size, precision, device, train_batch, score_batch, warmup, iters)
            except (RuntimeError, ValueError) as exc:  # e.g. out of memory: record it, measure the rest
                result = CaseResult(backbone, size, precision, train_batch, score_batch, error=str(exc)[:200])
            results.append(result)
            print(f"[{time.perf_counter() - start:6.1f} s] {result}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    report = {
        "environment": environment(device),
        "settings": {"warmup": warmup, "iters": iters, "weights": "none", "tf32": False},
        "results": [dataclasses.asdict(r) for r in results],
    }
    print()
    print(format_table(results))
    print()
    print(json.dumps(report, indent=2))
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
