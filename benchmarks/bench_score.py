"""Batch-scoring throughput: the Ray Data score job against a plain PyTorch loop, same model, same run.

The plain loop gets the images already decoded and calls ``Predictor.predict`` batch by batch, once with
one torch thread and once with one per core; the faster of the two is the baseline (on an oversubscribed
machine multi-threaded torch can lose to one thread). It runs over the first ``--loop-images`` of the same
images (its rate per image does not depend on how many). The Ray job lists, reads, decodes, scores (an actor
pool splitting the same cores) and writes Parquet, so it pays for everything a real job does, start-up
included. Loops and jobs alternate ``--repeats`` times, and each job is compared with the faster loop of its
own repeat (this machine is shared and noisy; both met the same load).

Two job sizes per repeat: ``--images`` (default 16384, an archive-sized job: on 2 cores it runs ~4 minutes,
so the job's fixed cost weighs what it does in real use) and ``--small-images`` (default a quarter). Their
difference separates the fixed cost (worker start-up and imports, model load, the last write) from the
per-image rate: marginal rate = extra images / extra seconds. Also measured: bytes per output row and the
peak RSS of a scorer actor (read from /proc while the job runs).

    .venv/bin/python benchmarks/bench_score.py --images 16384 --image-size 128 --actors 2

Prints a Markdown table for the "Scoring" section of BENCHMARKS.md. Everything stays on this machine: a
local-folder store and a local Ray cluster on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _actor_memory import ActorMemory
from PIL import Image

from tsdn.checkpoint import checkpoint_files
from tsdn.config import TSDNConfig
from tsdn.image import decode_image, to_rgb
from tsdn.model import TSDN
from tsdn.scoring import fit_calibration
from tsdn_platform import store
from tsdn_platform.ray_session import init_ray
from tsdn_platform.registry import Registry
from tsdn_platform.score import ScoreConfig, run_scoring

PRODUCT = "bench"


def _texture(seed: int, size: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = 128 + 60 * np.sin(xx / 6.0 + seed)[..., None] * np.cos(yy / 9.0)[..., None]
    pixels = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _plain_loop(predictor, images: list[np.ndarray], batch_size: int) -> float:
    """Images/s of ``Predictor.predict`` over already decoded images (after one warm-up batch)."""
    predictor.predict(images[:batch_size])
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        predictor.predict(images[i : i + batch_size])
    return len(images) / (time.perf_counter() - start)


def _join(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16384)
    parser.add_argument("--small-images", type=int, help="images of the second job (default: a quarter)")
    parser.add_argument("--loop-images", type=int, default=4096, help="images of the plain loop (at most --images)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the input images and the model")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm encoder (random weights)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--actors", type=int, default=2, help="scorer actors; each gets cores/actors CPUs")
    parser.add_argument("--map-size", type=int, default=64, help="output_map_size of the job")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", help="default: a temporary folder")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-score-"))
    store_uri, input_uri, output_uri = (str(workdir / name) for name in ("store", "images", "scores"))
    small_input_uri, small_output_uri = str(workdir / "images-small"), str(workdir / "scores-small")
    small = args.small_images or max(args.batch_size, args.images // 4)
    if not 0 < small < args.images:
        parser.error(f"--small-images must lie in (0, {args.images})")
    model = TSDN(TSDNConfig(backbone=args.backbone, weights="none", image_size=args.image_size))
    calibration = fit_calibration(np.linspace(0.05, 0.15, 16))
    registry = Registry(store_uri)
    registry.register(PRODUCT, checkpoint_files(model, calibration), {"test": {"image_auroc": 0.5}}, promote="always")
    loop_images = min(args.loop_images, args.images)
    decoded = []
    for i in range(args.images):
        data = _texture(i, args.image_size)
        store.write_bytes(store.join(input_uri, PRODUCT, f"{i:05d}.png"), data)
        if i < small:
            store.write_bytes(store.join(small_input_uri, PRODUCT, f"{i:05d}.png"), data)
        if i < loop_images:
            decoded.append(to_rgb(decode_image(data, f"{i:05d}.png"))[0])
    predictor, _ = registry.load_predictor(PRODUCT)
    predictor.batch_size = args.batch_size

    cfg = ScoreConfig(
        store=store_uri,
        input=input_uri,
        output=output_uri,
        product=PRODUCT,
        batch_size=args.batch_size,
        num_actors=(args.actors, args.actors),
        num_cpus_per_actor=cores / args.actors,
        output_map_size=args.map_size,
    )
    init_ray()  # Ray's own start-up is not the job's; the actors' start-up (model load) is
    thread_counts = sorted({1, cores})
    loop_rates: dict[int, list[float]] = {n: [] for n in thread_counts}
    small_cfg = dataclasses.replace(cfg, input=small_input_uri, output=small_output_uri)
    job_seconds, small_seconds, peaks = [], [], []
    manifest: dict = {}
    for _ in range(args.repeats):
        for threads in thread_counts:
            torch.set_num_threads(threads)
            loop_rates[threads].append(_plain_loop(predictor, decoded, args.batch_size))
        with ActorMemory() as memory:
            manifest = run_scoring(cfg)
        job_seconds.append(manifest["timings"]["score_s"])
        peaks.append(memory.peak_bytes)
        small_seconds.append(run_scoring(small_cfg)["timings"]["score_s"])
    parts = [store.join(output_uri, f) for product in manifest["products"].values() for f in product["files"]]
    part_bytes = sum(Path(p).stat().st_size for p in parts)

    best_threads = max(thread_counts, key=lambda n: max(loop_rates[n]))
    loop = max(loop_rates[best_threads])
    # Each repeat's faster loop: the baseline its two jobs are paired with (they met the same load).
    repeat_loops = [max(rates[i] for rates in loop_rates.values()) for i in range(args.repeats)]
    # Fixed cost and per-image rate from the best (shortest) time of each size: T(n) = fixed + n / marginal.
    marginal = (args.images - small) / (min(job_seconds) - min(small_seconds))
    fixed = min(small_seconds) - small / marginal
    print(f"machine: {platform.machine()}, {cores} cores, torch {torch.__version__}")
    print(
        f"workload: {args.images} and {small} PNG images {args.image_size}x{args.image_size}, {args.backbone} "
        f"TSDN at {args.image_size} px, batch {args.batch_size}, {args.actors} actors x {cores / args.actors:g} "
        f"CPU, maps {args.map_size}x{args.map_size}, {args.repeats} repeats; loop over {loop_images} images"
    )
    print()
    print("| measure | value |")
    print("|---|---|")
    for threads in thread_counts:
        rates = ", ".join(f"{r:.1f}" for r in loop_rates[threads])
        print(f"| plain PyTorch loop (decoded images, {threads} threads), images/s per repeat | {rates} |")
    for images, seconds in ((args.images, job_seconds), (small, small_seconds)):
        rates = [images / t for t in seconds]
        paired = [rate / base for rate, base in zip(rates, repeat_loops, strict=True)]
        print(f"| Ray Data job of {images} images (read + decode + score + write), images/s | {_join(rates)} |")
        print(
            f"| ratio {images}-image job / faster loop of the same repeat (median) | "
            f"**{_join(paired)}** ({statistics.median(paired):.2f}) |"
        )
    print(f"| job fixed cost (start-up, model load, last write) | {fixed:.1f} s |")
    print(f"| job marginal rate, (n - n_small) / (T - T_small), best times | {marginal:.1f} images/s |")
    print(f"| ratio marginal rate / best loop ({best_threads} threads) | {marginal / loop:.2f} |")
    print(f"| bytes per output row (Parquet, zstd, incl. score map) | {part_bytes / manifest['rows_written']:.0f} |")
    print(f"| peak RSS of a scorer actor | {max(peaks) / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
