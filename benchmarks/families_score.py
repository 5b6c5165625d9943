"""Batch-scoring throughput of each registered version (both families) of a product, through the Ray Data job.

For every version of ``--product`` in ``--store`` (as left by ``benchmarks/families.py``): ``run_scoring`` on the
ingested test split with that version pinned, ``--repeats`` times, one local cluster for all runs; reports the
job's images/s (median), its wall time, and the size of the version's weights file (TSDN: the network;
PatchCore: the encoder plus the memory bank).

    python benchmarks/families_score.py --store .tsdn/families-demo/store --dataset families --product transistor \\
        --repeats 2 --out benchmarks/results/families_score_transistor.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tsdn_platform import layout, store
from tsdn_platform.ray_session import init_ray
from tsdn_platform.registry import Registry
from tsdn_platform.score import ScoreConfig, run_scoring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--dataset", default="families")
    parser.add_argument("--product", required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    init_ray()
    registry = Registry(args.store)
    rows = []
    for version in registry.list_versions(args.product):
        metrics = registry.metrics(args.product, version)
        speeds, walls = [], []
        for repeat in range(args.repeats):
            cfg = ScoreConfig(
                store=args.store,
                input=store.join(layout.dataset_uri(args.store, args.dataset, args.product), "test"),
                output=layout.scores_uri(args.store, f"bench-{version}-{repeat}"),
                product=args.product,
                version=version,
            )
            started = time.perf_counter()
            manifest = run_scoring(cfg)
            walls.append(time.perf_counter() - started)
            speeds.append(float(manifest["timings"]["images_per_s"]))
        row = {
            "version": version,
            "family": metrics.get("family", "tsdn"),
            "images": manifest["rows_written"],
            "images_per_s": round(statistics.median(speeds), 2),
            "job_wall_s": round(statistics.median(walls), 1),
            "weights_bytes": metrics["files"]["model.safetensors"]["bytes"],
            "test_image_auroc": metrics["test"]["image_auroc"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = (
            f"python benchmarks/families_score.py --store {args.store} --dataset {args.dataset} "
            f"--product {args.product} --repeats {args.repeats} --out {args.out}"
        )
        args.out.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
