"""Accuracy of TSDN per product line, the paper's ablations, and a PatchCore-style baseline, on the platform.

One command trains and evaluates on an MVTec-style root (the bundled demo data by default, or any MVTec AD
category), going through the same code as production:

    MVTec-style root  --tsdn_platform.ingest-->  <workdir>/store/datasets/bench
        --tsdn_platform.train (Ray Train, one run per product and ablation)-->  registry versions whose
          metrics.json holds the best checkpoint's test-split metrics
        --tsdn_platform.score (Ray Data job on the ingested test split, versions pinned)-->  score images/s
          and the job's own test metrics (a cross-check of the registry's)

Each ablation is the same run with ``tsdn.config.ABLATIONS[name]`` merged into the model config; ablations
whose switches coincide (``t3a``/``t4a``, ``t3b``/``t4c``, ``t3d``/``t4f``) are trained once and reported
under every name. ``--baseline patchcore`` adds the nearest-neighbour patch-feature baseline
(``benchmarks/patchcore.py``) on the same ingested images, the same training rows and the same backbone.

    python benchmarks/accuracy.py --ablations all --baseline patchcore --out benchmarks/results/ablations.json
    python benchmarks/accuracy.py --root /data/mvtec --products screw,zipper --config demo --set epochs=20

Printed per product and run: image AUROC, pixel AUROC, AUPRO, F1-max, training wall time, scoring images/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsdn.config import ABLATIONS, apply_ablation
from tsdn_platform import layout
from tsdn_platform.config import config_to_yaml, load_config
from tsdn_platform.ingest import IngestConfig, run_ingest
from tsdn_platform.registry import Registry
from tsdn_platform.score import ScoreConfig, run_scoring
from tsdn_platform.shards import read_split
from tsdn_platform.train import ProductResult, TrainConfig, run_training

logger = logging.getLogger("accuracy")

DATASET = "bench"
METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
BASELINE_RUN = "patchcore"
ROOT = Path(__file__).resolve().parents[1]
# Park et al., Tables 3 and 4: pixel AUROC (%) averaged over the MVTec categories each table reports
# (Table 3: carpet, grid, hazelnut, metal nut, screw, toothbrush, zipper; Table 4: screw, hazelnut, zipper,
# metal nut, wood, pill).
PAPER_PIXEL_AUROC = {
    "t3a": 91.6,
    "t3b": 84.3,
    "t3c": 92.7,
    "t3d": 95.6,
    "t4a": 91.0,
    "t4b": 91.5,
    "t4c": 86.6,
    "t4d": 91.0,
    "t4e": 92.9,
    "t4f": 94.8,
}


def _load_patchcore() -> Any:
    """benchmarks/ is a folder of scripts, not a package: load the baseline beside this file."""
    spec = importlib.util.spec_from_file_location("bench_patchcore", Path(__file__).with_name("patchcore.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def ablation_runs(spec: str | None) -> list[tuple[str, list[str]]]:
    """``"t3a,t4a"`` / ``"all"`` / None -> ``[(run name, [ablation names it stands for])]``.

    None is one run of the config as given (``"config"``). Ablations with identical switches share a run.
    """
    if not spec:
        return [("config", ["config"])]
    names = sorted(ABLATIONS) if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        known = ", ".join(sorted(ABLATIONS))
        msg = f"--ablations {spec!r}: unknown {', '.join(unknown)}; expected 'all' or names from {known}"
        raise ValueError(msg)
    runs: dict[tuple[tuple[str, bool], ...], list[str]] = {}
    for name in names:
        runs.setdefault(tuple(sorted(ABLATIONS[name].items())), []).append(name)
    return [(members[0], members) for members in runs.values()]


def prepare_root(args: argparse.Namespace, workdir: Path, image_size: int) -> str:
    """The MVTec-style root to ingest: ``--root``, or the demo dataset built under ``workdir``."""
    if args.root:
        return args.root
    from tsdn_platform.demo_data import make_demo_dataset

    products = args.products.split(",") if args.products else None
    out = workdir / "demo_data"
    shutil.rmtree(out, ignore_errors=True)  # this benchmark's own draw: a rerun draws it again, never beside the last
    summary = make_demo_dataset(out, seed=args.seed, image_size=image_size, products=products)
    logger.info("demo data: %s (%s)", out, ", ".join(summary["products"]))
    return str(out)


def train_run(base: TrainConfig, ablation: str) -> tuple[TrainConfig, dict[str, ProductResult], float]:
    """One training run of every product with ``ablation``'s switches; returns config, results, wall seconds."""
    cfg = base if ablation == "config" else dataclasses.replace(base, model=apply_ablation(base.model, ablation))
    start = time.perf_counter()
    results = run_training(cfg)
    return cfg, results, time.perf_counter() - start


def score_run(cfg: TrainConfig, versions: Mapping[str, str], output: str) -> dict[str, Any]:
    """The platform's batch-scoring job over the ingested test split with ``versions`` pinned; its manifest."""
    score_cfg = ScoreConfig(
        store=cfg.store,
        input=layout.dataset_uri(cfg.store, cfg.dataset),
        output=output,
        versions=dict(versions),
        split="test",
        batch_size=cfg.eval_batch_size,
        output_map_size=None,  # maps at the model's input size, where the registry's test metrics were taken
    )
    return run_scoring(score_cfg)


def _split_arrays(cfg: TrainConfig, product: str, split: str) -> dict[str, np.ndarray]:
    """An ingested split exactly as training and evaluation see it (decoded, resized), as numpy arrays."""
    columns = ["image", "mask", "label", "fold"]
    batches = list(
        read_split(cfg.store, cfg.dataset, product, split, columns=columns).iter_batches(batch_format="numpy")
    )
    return {c: np.concatenate([b[c] for b in batches]) for c in columns}


def baseline_run(
    cfg: TrainConfig, products: Sequence[str], pc_module: Any, reductions: tuple[int, ...], coreset: float
) -> dict[str, dict[str, Any]]:
    """PatchCore on the same images TSDN trained on (train rows outside the hold-out folds) and the same test split."""
    from tsdn.patchcore import PatchCore, PatchCoreConfig

    results = {}
    for product in products:
        train = _split_arrays(cfg, product, "train")
        if cfg.validation == "holdout":
            train = {k: v[~np.isin(train["fold"], cfg.holdout_folds)] for k, v in train.items()}
        test = _split_arrays(cfg, product, "test")
        pc_cfg = PatchCoreConfig(
            image_size=cfg.model.image_size,
            backbone=cfg.model.backbone,
            weights=cfg.model.weights,
            reductions=reductions,
            coreset_fraction=coreset,
            seed=cfg.seed,
        )
        torch.manual_seed(cfg.seed)
        start = time.perf_counter()
        model = PatchCore(pc_cfg)
        build_s = time.perf_counter() - start
        metrics = pc_module.run_patchcore(
            model,
            torch.from_numpy(train["image"]).float(),
            torch.from_numpy(test["image"]).float(),
            test["label"],
            (test["mask"][:, 0] > 0).astype(np.uint8),
        )
        metrics.update(build_s=build_s, train_images=len(train["image"]), test_images=len(test["label"]))
        results[product] = metrics
        logger.info("%s: patchcore %s", product, {k: round(float(v), 4) for k, v in metrics.items()})
    return results


def _in_process_images_per_s(cfg: TrainConfig, product: str, version: str, images: torch.Tensor) -> float:
    """Images/s of the registered predictor on preprocessed test images in this process (no Ray in the loop)."""
    predictor, _ = Registry(cfg.store).load_predictor(product, version)
    predictor.batch_size = cfg.eval_batch_size
    predictor.predict_tensor(images[: cfg.eval_batch_size])  # warm-up
    start = time.perf_counter()
    predictor.predict_tensor(images)
    return len(images) / (time.perf_counter() - start)


def collect_rows(
    cfg: TrainConfig,
    run: str,
    members: list[str],
    results: Mapping[str, ProductResult],
    wall_s: float,
    manifest: Mapping[str, Any] | None,
    test_images: Mapping[str, torch.Tensor],
) -> list[dict[str, Any]]:
    """One row per (product, ablation name) for the table and the JSON."""
    rows = []
    for product, result in results.items():
        row: dict[str, Any] = {"product": product, "run": run, "ok": result.ok}
        if not result.ok:
            row["error"] = result.error
        else:
            history = result.history
            train_loop_s = sum(h["epoch_s"] for h in history)
            row.update({m: result.test.get(m) for m in METRICS})
            row.update(
                version=result.version,
                best_epoch=result.best_epoch,
                val_pixel_auroc=result.val.get("val_pixel_auroc"),
                final_loss=history[-1]["loss"] if history else None,
                train_wall_s=wall_s,
                train_loop_s=train_loop_s,
                train_images_per_s=(sum(h["images_per_s"] * h["epoch_s"] for h in history) / train_loop_s)
                if train_loop_s
                else None,
                predict_images_per_s=_in_process_images_per_s(cfg, product, result.version, test_images[product]),
            )
            if manifest is not None:
                row["score_job_images_per_s"] = manifest["timings"]["images_per_s"]
                row["score_job"] = {k: manifest.get("metrics", {}).get(product, {}).get(k) for k in METRICS}
        rows.extend({**row, "ablation": name} for name in members)
    return rows


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header = (
        f"{'product':<10} {'run':<10} {'img AUROC':>9} {'pix AUROC':>9} {'AUPRO':>6} {'F1-max':>6} "
        f"{'train s':>7} {'job img/s':>9} {'pred img/s':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in sorted(rows, key=lambda r: (r["product"], r["ablation"])):
        if not r.get("ok", True):
            lines.append(f"{r['product']:<10} {r['ablation']:<10} FAILED: {r.get('error')}")
            continue
        train_s = r.get("train_wall_s", r.get("fit_s"))  # the baseline's "training" is its memory-bank fit
        predict_ips = r.get("predict_images_per_s", r.get("score_images_per_s"))
        lines.append(
            f"{r['product']:<10} {r['ablation']:<10} {_fmt(r.get('image_auroc')):>9} {_fmt(r.get('pixel_auroc')):>9} "
            f"{_fmt(r.get('aupro')):>6} {_fmt(r.get('f1_max')):>6} {_fmt(train_s, '.1f'):>7} "
            f"{_fmt(r.get('score_job_images_per_s'), '.1f'):>9} {_fmt(predict_ips, '.1f'):>10}"
        )
    return "\n".join(lines)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Pixel AUROC (%) per ablation and product, their mean, and the paper's mean for that row, as Markdown."""
    ok = [r for r in rows if r.get("ok", True) and r.get("pixel_auroc") is not None]
    products = sorted({r["product"] for r in ok})
    ablations = sorted({r["ablation"] for r in ok}, key=lambda a: (a == BASELINE_RUN, a))
    cells = {(r["ablation"], r["product"]): 100 * r["pixel_auroc"] for r in ok}
    lines = [
        "| run | " + " | ".join(products) + " | mean | paper (mean) |",
        "|---|" + "---:|" * (len(products) + 2),
    ]
    for ablation in ablations:
        values = [cells.get((ablation, p)) for p in products]
        present = [v for v in values if v is not None]
        mean = sum(present) / len(present) if present else None
        paper = PAPER_PIXEL_AUROC.get(ablation)
        row = [ablation, *(_fmt(v, ".1f") for v in values), _fmt(mean, ".1f"), _fmt(paper, ".1f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="MVTec-style root (<product>/train/good, ...); default: build the demo data")
    parser.add_argument("--products", help="comma-separated product lines (default: all found)")
    parser.add_argument("--config", default="demo", help="training config: preset name or YAML (default: demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ablations", help="'all' or comma-separated names of tsdn.config.ABLATIONS")
    parser.add_argument("--baseline", choices=["patchcore"], help="also run this baseline on the same data")
    parser.add_argument("--patchcore-reductions", default="8,16", help="encoder strides of the baseline's features")
    parser.add_argument("--patchcore-coreset", type=float, default=1.0, help="fraction of patches kept in the bank")
    parser.add_argument("--no-score-job", action="store_true", help="skip the Ray Data scoring job per run")
    parser.add_argument("--workdir", help="store, demo data and scores (default: a new .tsdn/accuracy/<time>)")
    parser.add_argument("--seed", type=int, default=0, help="demo data seed")
    parser.add_argument("--out", help="write every measurement as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    started = time.perf_counter()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    workdir = Path(args.workdir or ROOT / ".tsdn" / "accuracy" / stamp).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    runs = ablation_runs(args.ablations)
    explicit = {"store": str(workdir / "store"), "dataset": DATASET, "products": args.products}
    base = load_config(TrainConfig, args.config, args.overrides, explicit=explicit)

    import ray

    from tsdn_platform.ray_session import init_ray

    owns_ray = not ray.is_initialized()  # a caller's Ray session (a test's, a notebook's) is left running
    init_ray()
    try:
        root = prepare_root(args, workdir, base.model.image_size)
        ingest_start = time.perf_counter()
        ingest_cfg = IngestConfig(
            source=root,
            store=base.store,
            dataset=DATASET,
            products=args.products.split(",") if args.products else None,
            image_size=base.model.image_size,
            n_segments=base.model.n_segments,
            slic_compactness=base.model.slic_compactness,
        )
        index = run_ingest(ingest_cfg)
        ingest_s = time.perf_counter() - ingest_start
        products = sorted(index["products"])
        test_images = {p: torch.from_numpy(_split_arrays(base, p, "test")["image"]).float() for p in products}

        rows: list[dict[str, Any]] = []
        configs: dict[str, Any] = {}
        for run, members in runs:
            cfg, results, wall_s = train_run(base, run)
            configs[run] = {"members": members, "config": config_to_yaml(cfg)}
            versions = {p: r.version for p, r in results.items() if r.ok and r.version}
            manifest = None
            if versions and not args.no_score_job:
                manifest = score_run(cfg, versions, str(workdir / "scores" / run))
            rows.extend(collect_rows(cfg, run, members, results, wall_s, manifest, test_images))
            print(format_table(rows), flush=True)

        baseline: dict[str, dict[str, Any]] = {}
        if args.baseline == "patchcore":
            reductions = tuple(int(r) for r in args.patchcore_reductions.split(","))
            baseline = baseline_run(base, products, _load_patchcore(), reductions, args.patchcore_coreset)
            for product, metrics in baseline.items():
                rows.append({"product": product, "run": BASELINE_RUN, "ablation": BASELINE_RUN, **metrics})
    finally:
        if owns_ray:
            ray.shutdown()

    print()
    print(format_table(rows))
    print()
    print(markdown_table(rows))
    report = {
        "command": " ".join(["python", "benchmarks/accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "root": root,
        "workdir": str(workdir),
        "products": products,
        "ingest_s": ingest_s,
        "total_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        "runs": configs,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=float) + "\n")
        print(f"wrote {args.out}")
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
