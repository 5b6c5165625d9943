"""PatchCore's bank search: the two backends of ``nearest_distance`` (torch, faiss-cpu) on the same data.

The queries are the patch features of real-sized batches (``--images`` images at ``--image-size`` through the
Lite0 PatchCore embedding, so the feature width is the one the platform searches); the bank is a random subset
of training-like patches of the sizes a fitted bank has. Each searcher runs ``--repeats`` times per case and the
median is reported, with torch threads fixed (``--threads``) and faiss given the same number of threads.

    python benchmarks/nn_search.py --threads 1 --out benchmarks/results/nn_search.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from tsdn.patchcore import PatchCore, PatchCoreConfig, nearest_distance


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _patches(features: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B * h * w, D) float32."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).float().contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=8, help="images per query batch")
    parser.add_argument("--banks", default="2304,10000,40000", help="bank sizes (rows)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)

    model = PatchCore(PatchCoreConfig(image_size=args.image_size)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        images = torch.rand(args.images, 3, args.image_size, args.image_size, generator=generator)
        queries = _patches(model.embed(images))  # (B * h * w, D)
        pool = _patches(model.embed(torch.rand(16, 3, args.image_size, args.image_size, generator=generator)))
    rows = []
    for size in (int(s) for s in args.banks.split(",")):
        reps = max(1, -(-size // len(pool)))
        bank = torch.cat([pool] * reps)[:size] + 0.01 * torch.randn(size, pool.shape[1], generator=generator)

        def torch_search(bank=bank):
            with torch.inference_mode():
                return nearest_distance(queries, bank, backend="torch")

        def faiss_search(bank=bank):
            with torch.inference_mode():
                return nearest_distance(queries, bank, backend="faiss")

        want, got = torch_search().numpy(), faiss_search().numpy()
        torch_s, faiss_s = _median_s(torch_search, args.repeats), _median_s(faiss_search, args.repeats)
        row = {
            "bank": size,
            "queries": len(queries),
            "dim": int(queries.shape[1]),
            "torch_s": round(torch_s, 4),
            "faiss_s": round(faiss_s, 4),
            "faiss_speedup": round(torch_s / faiss_s, 2),
            "max_abs_diff": float(np.abs(want - got).max()),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "command": "python benchmarks/nn_search.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "threads": args.threads,
        "image_size": args.image_size,
        "faiss_version": faiss.__version__,
        "torch_version": torch.__version__,
        "rows": rows,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
