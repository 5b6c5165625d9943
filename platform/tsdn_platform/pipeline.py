"""ingest -> train -> score for a set of product lines, as one job (``tsdn pipeline``, ``python -m jobs.pipeline``).

The three stages are the same functions the single-stage commands run; this module only threads the
shared settings through them so that they agree: the ingest resolution and SLIC settings come from the
training config's model, the score job reads the test split that ingest wrote, and every product line
that trained is scored by the version the registry holds as best.

Config layout (YAML, ``--set`` overrides with dotted keys)::

    source: s3://bucket/mvtec          # MVTec-style root
    store: s3://bucket/tsdn            # datasets/, runs/, registry/, scores/
    dataset: mvtec
    products: [bottle, cable]          # null = every product of the source
    train_config: demo                 # preset or file for the training job
    train: {epochs: 10}                # overrides of the training config
    ingest: {}                         # overrides of the ingest config
    score: {batch_size: 16}            # overrides of the score config
    output: null                       # default <store>/scores/<dataset>-test
    report_dir: null                   # an HTML report of the most anomalous test images
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from tsdn.config_io import from_dict, merge
from tsdn_platform import layout
from tsdn_platform.config import check_required, config_to_yaml, load_config
from tsdn_platform.names import ALL, parse_products
from tsdn_platform.train_config import format_reused, format_selections

logger = logging.getLogger(__name__)

__all__ = ["PipelineConfig", "PipelineResult", "format_summary", "main", "run_pipeline"]


@dataclass
class PipelineConfig:
    source: str = ""
    store: str = ""
    dataset: str = ""
    products: list[str] | str | None = None
    train_config: str = "demo"
    train: dict[str, Any] = field(default_factory=dict)
    ingest: dict[str, Any] = field(default_factory=dict)
    score: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    report_dir: str | None = None
    address: str | None = None

    def __post_init__(self) -> None:
        check_required(self, ("source", "store", "dataset"))
        self.products = parse_products(self.products)

    def score_output(self) -> str:
        return self.output or layout.scores_uri(self.store, f"{self.dataset}-test")


@dataclass
class PipelineResult:
    ingest: dict[str, Any]
    train: dict[str, Any]
    score: dict[str, Any] | None
    timings: dict[str, float]


def stage_configs(cfg: PipelineConfig) -> tuple[Any, Any]:
    """The resolved ingest and training configs; ingest takes resolution and SLIC settings from the model."""
    from tsdn_platform.ingest import IngestConfig
    from tsdn_platform.train import TrainConfig

    shared = {"store": cfg.store, "dataset": cfg.dataset, "products": cfg.products or ALL}
    train_cfg = load_config(TrainConfig, cfg.train_config, explicit=merge(cfg.train, shared))
    model = train_cfg.model
    ingest_cfg = from_dict(
        IngestConfig,
        merge(
            {
                "source": cfg.source,
                "store": cfg.store,
                "dataset": cfg.dataset,
                "products": cfg.products,
                "image_size": model.image_size,
                "n_segments": model.n_segments,
                "slic_compactness": model.slic_compactness,
                "address": cfg.address,
            },
            cfg.ingest,
        ),
    )
    return ingest_cfg, train_cfg


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    """Ingest the source, train every product line, score the test split of those that trained."""
    from tsdn_platform.ingest import run_ingest
    from tsdn_platform.ray_session import init_ray
    from tsdn_platform.score import ScoreConfig, run_scoring
    from tsdn_platform.train import run_training

    ingest_cfg, train_cfg = stage_configs(cfg)
    init_ray(cfg.address)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    logger.info("[1/3] ingest %s -> %s", cfg.source, layout.dataset_uri(cfg.store, cfg.dataset))
    index = run_ingest(ingest_cfg)
    timings["ingest_s"] = time.perf_counter() - started

    started = time.perf_counter()
    logger.info("[2/3] train %s", ", ".join(index["products"]))
    results = run_training(train_cfg)
    timings["train_s"] = time.perf_counter() - started
    trained = [product for product, result in results.items() if result.ok]

    score_manifest = None
    if trained:
        started = time.perf_counter()
        output = cfg.score_output()
        logger.info("[3/3] score the test split of %s -> %s", ", ".join(trained), output)
        score_cfg = from_dict(
            ScoreConfig,
            merge(
                {
                    "store": cfg.store,
                    "input": layout.dataset_uri(cfg.store, cfg.dataset),
                    "output": output,
                    "split": "test",
                    "versions": {p: results[p].version for p in trained},
                    "report_dir": cfg.report_dir,
                },
                cfg.score,
            ),
        )
        score_manifest = run_scoring(score_cfg)
        timings["score_s"] = time.perf_counter() - started
    return PipelineResult(ingest=index, train=results, score=score_manifest, timings=timings)


def format_summary(result: PipelineResult) -> str:
    """Per product line: test metrics measured by the score job (the ranking, and the decisions at the calibrated
    threshold), the registered version, scoring speed; then what each threshold promises on unseen good images."""
    score = result.score or {}
    metrics = score.get("metrics", {})
    images_per_s = score.get("timings", {}).get("images_per_s")
    header = (
        f"{'product':<12} {'family':<10} {'image AUROC':>11} {'pixel AUROC':>11} {'AUPRO':>7} {'F1-max':>7} "
        f"{'recall':>7} {'FPR':>7} {'images/s':>9}  version"
    )
    lines = [header, "-" * (len(header) + 20)]
    promises = []
    for product, trained in result.train.items():
        if not trained.ok:
            first_line = (trained.error or "").strip().splitlines()[:1] or ["unknown error"]
            lines.append(f"{product:<12} training failed: {first_line[0]}")
            continue
        m = metrics.get(product, {})
        cells = [_fmt(m.get(k)) for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "recall")]
        lines.append(
            f"{product:<12} {trained.family:<10} {cells[0]:>11} {cells[1]:>11} {cells[2]:>7} {cells[3]:>7} "
            f"{cells[4]:>7} {_fmt(m.get('false_positive_rate')):>7} {_fmt(images_per_s, 1):>9}  {trained.version}"
        )
        promise = _threshold_promise(product, (score.get("products", {}).get(product) or {}).get("calibration"))
        if promise:
            promises.append(promise)
    if any(k in values for values in metrics.values() for k in ("recall", "false_positive_rate")):
        lines += ["", "recall, FPR: the shares of defective and of good test images flagged at the threshold"]
    if promises:
        lines += ["how often an unseen good image reaches each threshold (expected, and the 95 % bound):", *promises]
    return "\n".join([*lines, *format_reused(result.train), *format_selections(result.train)])


def _threshold_promise(product: str, calibration: dict[str, Any] | None) -> str | None:
    """One line: a quantile threshold, its normal images, and how often an unseen good image reaches it."""
    if not calibration or calibration.get("expected_false_positive_rate") is None:
        return None
    return (
        f"  {product:<12} threshold {calibration['threshold']:.3f} = the {100 * calibration['quantile']:.3g} % "
        f"quantile of {calibration['n_normal']} normal images' scores: "
        f"{100 * calibration['expected_false_positive_rate']:.1f} %, "
        f"up to {100 * calibration['false_positive_rate_95']:.1f} %"
    )


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def main(args: argparse.Namespace) -> int:
    explicit = {
        "source": args.source,
        "store": args.store,
        "dataset": args.dataset,
        "products": args.products,
        "output": args.output,
        "report_dir": args.report,
        "address": args.address,
    }
    cfg = load_config(PipelineConfig, args.config, args.overrides, explicit=explicit)
    logger.info("pipeline config:\n%s", config_to_yaml(cfg))
    result = run_pipeline(cfg)
    print(format_summary(result))
    if result.score is not None:
        print(json.dumps({"scores": cfg.score_output(), "report": result.score.get("report")}, indent=2))
    failed = [p for p, r in result.train.items() if not r.ok]
    return 1 if failed or result.score is None else 0
