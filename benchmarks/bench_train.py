"""Training throughput: the Ray Train loop (one worker) against a plain PyTorch loop, same run.

Both loops train the same model (same seed) with the same batch size on the same images and superpixel maps
and run the same per-step code (uint8 -> float, then ``tsdn.training.train_step``: SURF fill, forward, loss,
backward, Adam step). The Ray side
is the production loop, :func:`tsdn_platform.train.train_loop_per_worker`, fed by ``iter_torch_batches``
from a materialised Ray Dataset; it checkpoints and validates only after its last epoch, outside the timed
epochs. The plain loop runs before and after the Ray run (this machine is shared and noisy) and its mean
is the baseline. Steady state = the median images/s of every epoch but the first.

Also measured: Ray start-up (``ray.init`` of a local cluster) and the fixed cost of a ``TorchTrainer.fit``
(a trainer whose function returns at once).

    .venv/bin/python benchmarks/bench_train.py [--config demo] [--images 48] [--epochs 4] [--set key=value]

The plain loop runs in a fresh process with ``OMP_NUM_THREADS`` and torch threads set to the Ray worker's
CPUs (Ray sets ``OMP_NUM_THREADS`` from ``cpus_per_worker``), so both sides get the same threading setup.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data as skdata

from tsdn.losses import TSDNLoss
from tsdn.model import TSDN
from tsdn.surf import slic_labels
from tsdn.training import build_optimizer, set_epoch_lr, train_step
from tsdn_platform.config import load_config
from tsdn_platform.demo_data import texture_patch
from tsdn_platform.train import TrainConfig, build_trainer

TEXTURES = ("brick", "grass", "gravel")


def make_rows(n: int, size: int, n_segments: int, compactness: float, seed: int) -> list[dict[str, np.ndarray]]:
    """``n`` texture crops: ``image`` (3, S, S) uint8 and ``superpixels`` (S, S) int32, as the ingest writes."""
    rng = np.random.default_rng(seed)
    textures = [np.asarray(getattr(skdata, name)(), dtype=np.float32) / 255.0 for name in TEXTURES]
    rows = []
    for i in range(n):
        texture = textures[i % len(textures)]
        if texture.ndim == 2:
            texture = np.repeat(texture[..., None], 3, axis=2)
        rgb = np.round(texture_patch(texture, size, rng) * 255.0).astype(np.uint8)
        labels = slic_labels(rgb, n_segments, compactness).astype(np.int32)
        rows.append({"image": np.ascontiguousarray(rgb.transpose(2, 0, 1)), "superpixels": labels})
    return rows


def plain_loop(cfg: TrainConfig, rows: list[dict[str, np.ndarray]], threads: int) -> list[float]:
    """images/s of each epoch of a plain single-process loop doing the Ray loop's per-step work."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = TSDN(cfg.model).train()
    optimizer = build_optimizer(model, cfg.model)
    loss_fn = TSDNLoss(cfg.model)
    images_u8 = torch.from_numpy(np.stack([r["image"] for r in rows]))
    labels_all = torch.from_numpy(np.stack([r["superpixels"] for r in rows]))
    n_batches = len(rows) // cfg.batch_size
    rates = []
    for epoch in range(1, cfg.epochs + 1):
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1_009)
        set_epoch_lr(optimizer, cfg.model, epoch, cfg.epochs)
        started = time.perf_counter()
        for b in range(n_batches):
            chunk = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
            images = images_u8[chunk].float().div_(255.0)
            train_step(model, loss_fn, optimizer, images, labels_all[chunk], cfg.model, generator, epoch)
        rates.append(n_batches * cfg.batch_size / (time.perf_counter() - started))
    return rates


def plain_loop_subprocess(argv: list[str], threads: int) -> list[float]:
    """:func:`plain_loop` in a fresh interpreter with the Ray worker's ``OMP_NUM_THREADS``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, *argv, "--plain"], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        msg = f"plain loop subprocess failed ({out.returncode}):\n{out.stderr[-3000:]}"
        raise RuntimeError(msg)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ray_loop(cfg: TrainConfig, rows: list[dict[str, np.ndarray]], workdir: str) -> tuple[list[float], float, float]:
    """-> (images/s of each epoch, fit wall seconds, seconds of the fit outside the timed epochs)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # keep the output readable
    train = ray.data.from_items(rows).materialize()
    val = ray.data.from_items(rows[: cfg.batch_size]).materialize()
    test_rows = [
        {
            "image": row["image"],
            "mask": np.zeros((1, *row["superpixels"].shape), np.float32),
            "label": i % 2,
            "image_id": f"img{i}",
        }
        for i, row in enumerate(rows[: cfg.batch_size])
    ]
    test = ray.data.from_items(test_rows).materialize()
    trainer = build_trainer(cfg, "bench", "bench-ray", workdir, {"train": train, "val": val, "test": test})
    started = time.perf_counter()
    summary = trainer.fit().return_value
    wall = time.perf_counter() - started
    history = summary["history"]
    return [h["images_per_s"] for h in history], wall, wall - sum(h["epoch_s"] for h in history)


def trivial_fit(workdir: str) -> float:
    """Wall seconds of a one-worker ``TorchTrainer.fit`` whose function returns at once."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def noop(_: dict) -> None:
        return None

    trainer = TorchTrainer(
        noop,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="bench-noop", storage_path=workdir),
    )
    started = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - started


def steady(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="training preset (default: demo)")
    parser.add_argument("--images", type=int, default=48, help="training images (default: 48)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per loop (default: 4)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # the subprocess side
    args = parser.parse_args(argv)
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--plain"]

    with tempfile.TemporaryDirectory() as workdir:
        cfg = load_config(
            TrainConfig,
            args.config,
            args.overrides,
            explicit={"store": workdir, "dataset": "bench", "epochs": args.epochs, "num_workers": 1},
        )
        cfg = dataclasses.replace(cfg, checkpoint_every=cfg.epochs, keep_checkpoints=1, max_failures=0)
        threads = max(1, math.ceil(cfg.cpus_per_worker))
        print(
            f"config {args.config}: {cfg.model.backbone} @ {cfg.model.image_size}px, batch {cfg.batch_size}, "
            f"{args.images} images, {cfg.epochs} epochs, {threads} thread(s)",
            flush=True,
        )
        rows = make_rows(args.images, cfg.model.image_size, cfg.model.n_segments, cfg.model.slic_compactness, 0)
        if args.plain:
            print(json.dumps(plain_loop(cfg, rows, threads)))
            return 0

        plain_before = plain_loop_subprocess(forwarded, threads)
        print(f"plain (before): {[round(r, 2) for r in plain_before]} images/s", flush=True)

        import ray

        from tsdn_platform.ray_session import init_ray

        started = time.perf_counter()
        init_ray(num_cpus=threads + 1)
        init_s = time.perf_counter() - started
        noop_s = trivial_fit(str(Path(workdir) / "runs"))
        ray_rates, fit_s, overhead_s = ray_loop(cfg, rows, str(Path(workdir) / "runs"))
        ray.shutdown()
        print(f"ray train: {[round(r, 2) for r in ray_rates]} images/s", flush=True)

        plain_after = plain_loop_subprocess(forwarded, threads)
        print(f"plain (after): {[round(r, 2) for r in plain_after]} images/s", flush=True)

    baseline = (steady(plain_before) + steady(plain_after)) / 2
    ratio = steady(ray_rates) / baseline
    print()
    print("| measure | value |")
    print("|---|---|")
    print(
        f"| plain PyTorch loop, steady state | {baseline:.2f} images/s "
        f"(before {steady(plain_before):.2f}, after {steady(plain_after):.2f}) |"
    )
    print(f"| Ray Train loop (1 worker), steady state | {steady(ray_rates):.2f} images/s |")
    print(f"| ratio Ray / plain (target >= 0.9) | {ratio:.3f} |")
    print(f"| `ray.init` (local cluster) | {init_s:.1f} s |")
    print(f"| `TorchTrainer.fit` of a no-op function | {noop_s:.1f} s |")
    print(f"| real fit: wall / outside the timed epochs | {fit_s:.1f} s / {overhead_s:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
