"""Model families through the platform on real MVTec-style product lines, beside the in-memory PatchCore baseline.

Per ``--data root:product``: ``tsdn_platform.ingest`` (Ray Data) at ``--image-size``, ``tsdn_platform.train`` with
the preset's ``families`` (Ray Train for TSDN, Ray Data actors + coreset for PatchCore), the registry's versions
(family, validation, test, fit time, bank bytes) and the selection; then, on the same ingested train rows
(outside the hold-out folds) and test rows, ``benchmarks/patchcore.py``'s baseline: the same model class with
the full bank (``coreset_fraction=1``), fitted and timed in one process.

    python benchmarks/families.py --data ../shared/data/mvtec:transistor --data ../shared/data/kolektor:kolektor \\
        --config patchcore --image-size 224 --workdir .tsdn/families --out benchmarks/results/families.json

A line shot at another aspect: ``--image-size 320x128 --set 'model.image_size=[320,128]'`` (and
``--set 'patchcore.image_size=[320,128]'`` for the preset's PatchCore section and the baseline).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tsdn.patchcore import PatchCore
from tsdn_platform.cli import image_size_arg
from tsdn_platform.config import load_config
from tsdn_platform.ingest import IngestConfig, run_ingest
from tsdn_platform.registry import Registry
from tsdn_platform.shards import read_split
from tsdn_platform.train import TrainConfig, run_training

DATASET = "families"


def _baseline_module():
    spec = importlib.util.spec_from_file_location("bench_patchcore", Path(__file__).with_name("patchcore.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _arrays(store: str, product: str, split: str, columns: list[str]) -> dict[str, np.ndarray]:
    rows = read_split(store, DATASET, product, split, columns=columns, image_dtype="uint8").take_all()
    return {c: np.stack([np.asarray(r[c]) for r in rows]) for c in columns}


def run(args: argparse.Namespace) -> list[dict]:
    workdir = Path(args.workdir).resolve()
    store = str(workdir / "store")
    results = []
    for spec in args.data:
        root, product = spec.rsplit(":", 1)
        started = time.perf_counter()
        run_ingest(
            IngestConfig(source=root, store=store, dataset=DATASET, image_size=args.image_size, products=[product])
        )
        ingest_s = time.perf_counter() - started
        explicit = {"store": store, "dataset": DATASET, "products": product}
        cfg = load_config(TrainConfig, args.config, args.set, explicit=explicit)
        started = time.perf_counter()
        outcome = run_training(cfg)[product]
        train_s = time.perf_counter() - started
        if not outcome.ok:
            msg = f"{product}: training failed: {outcome.error}"
            raise RuntimeError(msg)
        registry = Registry(store)
        for version in registry.list_versions(product):
            metrics = registry.metrics(product, version)
            if metrics.get("selection") != outcome.selection:  # the versions this run registered
                continue
            results.append(
                {
                    "product": product,
                    "run": metrics.get("family", "tsdn"),
                    "version": version,
                    "val": metrics["val"],
                    "test": metrics["test"],
                    "fit": metrics.get("fit"),
                    "selection": metrics.get("selection"),
                    "ingest_s": round(ingest_s, 1),
                    "train_job_s": round(train_s, 1),
                }
            )
        train = _arrays(store, product, "train", ["image", "fold"])
        keep = ~np.isin(train["fold"], cfg.holdout_folds)
        test = _arrays(store, product, "test", ["image", "mask", "label"])
        torch.manual_seed(0)
        full = {"coreset_fraction": 1.0, "coreset_max": 10**9, "max_patches": 10**9}
        model = PatchCore(dataclasses.replace(cfg.patchcore, **full))
        baseline = _baseline_module().run_patchcore(
            model,
            torch.from_numpy(train["image"][keep]).float().div_(255.0),
            torch.from_numpy(test["image"]).float().div_(255.0),
            test["label"],
            (test["mask"][:, 0] > 0).astype(np.uint8),
        )
        results.append({"product": product, "run": "baseline (full bank, in-process)", "test": baseline})
    return results


def format_table(results: Sequence[dict]) -> str:
    header = f"{'product':<12} {'run':<34} {'val img':>7} {'val pix':>7} {'img AUROC':>9} {'pix AUROC':>9}"
    lines = [header + f" {'AUPRO':>6} {'fit s':>6} {'bank MB':>7}"]
    for r in results:
        val, test, fit = r.get("val") or {}, r["test"], r.get("fit") or {}
        fit_s = fit.get("fit_s", test.get("fit_s"))
        bank = fit.get("bank_bytes")
        lines.append(
            f"{r['product']:<12} {r['run']:<34} {val.get('val_image_auroc', float('nan')):7.3f} "
            f"{val.get('val_pixel_auroc', float('nan')):7.3f} {test['image_auroc']:9.3f} {test['pixel_auroc']:9.3f} "
            f"{test['aupro']:6.3f} {fit_s if fit_s is not None else float('nan'):6.1f} "
            f"{(bank or float('nan')) / 1e6:7.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="ROOT:PRODUCT of an MVTec-style tree")
    parser.add_argument("--config", default="patchcore")
    parser.add_argument("--set", action="append", default=[], help="train config override key=value")
    parser.add_argument("--image-size", type=image_size_arg, default=224, help="S or HxW (the ingest's size)")
    parser.add_argument("--workdir", default=".tsdn/families")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    results = run(args)
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
