"""SURF throughput: per-sample SLIC + numpy fill (a naive data loader) vs. precomputed labels + batched torch fill.

    .venv/bin/python benchmarks/bench_surf.py [--rounds 5] [--batches 10] [--threads 1]

(a) what a loader without precomputation does for every training sample: ``slic_labels`` (N_s = 400) on the
    352 x 352 image, then fill S_s = 50 random superpixels in numpy.
(b) the platform's path: labels computed once at ingest; per step ``surf_fill`` on a (16, 3, 352, 352) batch
    exactly as the training loop calls it: a contiguous float32 NCHW batch and the shard's int32 labels, with
    ``contiguous=True`` (ingest stores SLIC labels 0..K-1).
(b') as (b), also counting the per-step decoding of the stored label maps (``decode_labels``) and stacking.

Images are 352 x 352 crops of real photographs/textures from ``skimage.data``. Prints images/s of each and
the ratios; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
from skimage import data
from skimage.color import gray2rgb

from tsdn.surf import decode_labels, encode_labels, slic_labels, surf_fill

SIZE = 352
N_SEGMENTS = 400
N_FILLED = 50
BATCH = 16


def crops(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` random (352, 352, 3) uint8 crops of astronaut, coffee, rocket and brick."""
    sources = [data.astronaut(), data.coffee(), data.rocket(), gray2rgb(data.brick())]
    out = []
    for i in range(count):
        source = sources[i % len(sources)]
        top = rng.integers(0, source.shape[0] - SIZE + 1)
        left = rng.integers(0, source.shape[1] - SIZE + 1)
        out.append(np.ascontiguousarray(source[top : top + SIZE, left : left + SIZE]))
    return out


def naive_surf(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """SLIC + numpy fill of one (H, W, 3) uint8 image -> (distorted (H, W, 3) uint8, mask (H, W) bool)."""
    labels = slic_labels(image, N_SEGMENTS)
    n_labels = int(labels.max()) + 1
    chosen = rng.choice(n_labels, size=min(N_FILLED, n_labels), replace=False)
    colours = rng.integers(0, 256, (n_labels, 3), dtype=np.uint8)
    mask = np.isin(labels, chosen)
    return np.where(mask[:, :, None], colours[labels], image), mask


def seconds(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``; CPU time of this process is far less sensitive to a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of (a), (b), (b')")
    parser.add_argument("--batches", type=int, default=10, help="timed batches of 16 per round for (b) and (b')")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (SLIC is single-threaded)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = crops(BATCH, rng)
    labels = [slic_labels(image, N_SEGMENTS) for image in images]
    encoded = [encode_labels(lab) for lab in labels]
    # What the training loop receives from its shard: contiguous (B, 3, S, S) float32 and (B, S, S) int32 labels.
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0).contiguous()
    label_batch = torch.from_numpy(np.stack(labels).astype(np.int32))
    generator = torch.Generator().manual_seed(0)

    def naive() -> None:
        for image in images:
            naive_surf(image, rng)

    def fill() -> None:
        for _ in range(args.batches):
            surf_fill(batch, label_batch, N_FILLED, generator, contiguous=True)

    def decode_and_fill() -> None:
        for _ in range(args.batches):
            stacked = torch.from_numpy(np.stack([decode_labels(blob) for blob in encoded]))
            surf_fill(batch, stacked, N_FILLED, generator, contiguous=True)

    decode_and_fill()  # warm-up
    # Interleaved rounds: the machine is shared, so each round's three rates see similar load.
    runs = {"a": (naive, BATCH), "b": (fill, BATCH * args.batches), "b2": (decode_and_fill, BATCH * args.batches)}
    rates: dict[str, list[float]] = {key: [] for key in runs}
    cpu_rates: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, (fn, count) in runs.items():
            wall, cpu = seconds(fn)
            rates[key].append(count / wall)
            cpu_rates[key].append(count / cpu)
    best = {key: max(values) for key, values in rates.items()}
    ratio = {key: statistics.median(r / a for r, a in zip(values, rates["a"])) for key, values in rates.items()}
    cpu_rate = {key: statistics.median(values) for key, values in cpu_rates.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"mean superpixels per image: {np.mean([lab.max() + 1 for lab in labels]):.0f} (n_segments {N_SEGMENTS})")
    print(f"mean encoded label map: {np.mean([len(b) for b in encoded]) / 1024:.1f} KiB")
    print(f"{args.rounds} interleaved rounds; images/s best of rounds; ratio = median of per-round ratios (best/best)")
    rows = [
        ("a", "(a)  per-sample SLIC + numpy fill", ""),
        ("b", "(b)  precomputed labels + surf_fill (16)", "b/a"),
        ("b2", "(b') (b) + decode_labels per step", "b'/a"),
    ]
    for key, title, name in rows:
        versus = f"   {name:4s} {ratio[key]:6.1f}x ({best[key] / best['a']:.1f}x)" if name else ""
        print(f"{title:42s} {best[key]:8.1f} images/s{versus}")
    print("per CPU-second of this process (median of rounds):")
    for key, title, name in rows:
        versus = f"   {name:4s} {cpu_rate[key] / cpu_rate['a']:6.1f}x" if name else ""
        print(f"{title:42s} {cpu_rate[key]:8.1f} images/CPU-s{versus}")


if __name__ == "__main__":
    main()
