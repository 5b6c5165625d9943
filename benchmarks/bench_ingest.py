"""Ingest throughput (images/s) and the SLIC share of the time, against a plain single-process loop.

Builds the demo dataset (``tsdn_platform.demo_data``), then alternates ``--repeats`` times:

(a) plain loop: one process reads, decodes, validates, SLIC-labels (train split) every image with the same
    per-image function the ingest job uses, and writes one zstd Parquet file per split and product;
(b) ``run_ingest``: the Ray Data job (local cluster on 127.0.0.1, ``--cpus`` CPUs), staging, swap, manifests.

The first Ray run also pays for starting the Ray workers (reported separately as "cold"). The SLIC share is
the SLIC seconds summed over images (from ``ingest_report.json``) divided by the per-image processing seconds
(decode + SLIC) and by the CPU budget of the run (wall x CPUs).

    .venv/bin/python benchmarks/bench_ingest.py --image-size 256 --n-train 40 --repeats 3 --cpus 2

Prints a Markdown row for the "Ingest" section of BENCHMARKS.md and a JSON line. Everything stays local.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from tsdn_platform import layout, store
from tsdn_platform.demo_data import make_demo_dataset
from tsdn_platform.ingest import IngestConfig, _plan, _process_item, discover, run_ingest
from tsdn_platform.ray_session import init_ray
from tsdn_platform.shards import SCHEMA


def plain_loop(cfg: IngestConfig, out: Path) -> tuple[float, int]:
    """The same per-image work in one process, no Ray. Returns (wall seconds, rows written)."""
    start = time.perf_counter()
    items, _ = _plan(cfg, discover(cfg.source, cfg.products))
    settings = cfg.item_settings()
    groups: dict[tuple[str, str], list[dict]] = {}
    for item in items:
        row = _process_item(item, settings)
        if row["error"] is None:
            groups.setdefault((item["product"], item["split"]), []).append(row)
    for (product, split), rows in groups.items():
        path = out / product / split / "part-00000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, compression="zstd")
    return time.perf_counter() - start, sum(len(rows) for rows in groups.values())


def ray_ingest(cfg: IngestConfig) -> tuple[float, int, float, float]:
    """One ``run_ingest``. Returns (wall seconds, rows, SLIC seconds, decode seconds) summed over products."""
    start = time.perf_counter()
    index = run_ingest(cfg)
    wall = time.perf_counter() - start
    rows = sum(sum(entry["n_rows"].values()) for entry in index["products"].values())
    slic = decode = 0.0
    for product in index["products"]:
        report_uri = store.join(layout.dataset_uri(cfg.store, cfg.dataset, product), "ingest_report.json")
        timing = store.read_json(report_uri)["timing"]
        slic += timing["slic_s"]
        decode += timing["decode_s"]
    return wall, rows, slic, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=256, help="side of the demo images and of the SLIC maps")
    parser.add_argument("--n-train", type=int, default=40, help="train images per product (3 products)")
    parser.add_argument("--n-segments", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        # the split BENCHMARKS.md's rows were measured on (the demo's test split grew to 30 good images later)
        make_demo_dataset(
            root / "src", seed=0, image_size=args.image_size, n_train=args.n_train, n_test_good=10, n_defects_per_type=4
        )
        init_ray(num_cpus=args.cpus)
        cfg = IngestConfig(
            source=str(root / "src"),
            store=str(root / "store"),
            dataset="bench",
            image_size=args.image_size,
            n_segments=args.n_segments,
        )
        cold_wall, *_ = ray_ingest(cfg)
        plain_loop(cfg, root / "plain-warmup")  # imports and first-call costs, like the Ray workers' cold start
        plain, ingest = [], []
        for repeat in range(args.repeats):
            plain.append(plain_loop(cfg, root / f"plain{repeat}"))
            ingest.append(ray_ingest(cfg))
        ray.shutdown()

    plain_wall, rows = min(plain)
    wall, ray_rows, slic, decode = min(ingest)
    assert rows == ray_rows, (rows, ray_rows)
    result = {
        "images": rows,
        "image_size": args.image_size,
        "n_segments": args.n_segments,
        "cpus": args.cpus,
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "plain_images_per_s": round(rows / plain_wall, 2),
        "ingest_images_per_s": round(rows / wall, 2),
        "ingest_cold_images_per_s": round(rows / cold_wall, 2),
        "speedup_vs_plain": round(plain_wall / wall, 2),
        "slic_share_of_image_work": round(slic / (slic + decode), 3),
        "slic_share_of_cpu_budget": round(slic / (wall * args.cpus), 3),
    }
    cells = [
        time.strftime("%H:%M"),
        result["load_avg_1m"],
        f"{rows} x {args.image_size} px, N_s={args.n_segments}",
        result["plain_images_per_s"],
        f"{result['ingest_images_per_s']} ({result['ingest_cold_images_per_s']} cold)",
        f"{result['speedup_vs_plain']}x",
        f"{result['slic_share_of_image_work']:.0%}",
        f"{result['slic_share_of_cpu_budget']:.0%}",
    ]
    print("| " + " | ".join(str(cell) for cell in cells) + " |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
