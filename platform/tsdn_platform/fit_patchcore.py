"""Fitting the PatchCore family on Ray: patch features by Ray Data actors, a bounded pool, a coreset, a version.

Per product line, inside the line's (zero-CPU) Ray task:

1. The ingested train rows outside the hold-out folds stream through :class:`PatchEmbedder` actors
   (``map_batches`` with an ``ActorPoolStrategy`` of ``num_workers`` actors, each with ``cpus_per_worker`` CPUs but
   never every CPU of the cluster, :func:`tsdn_platform.ray_session.worker_cpus`, and a GPU with ``use_gpu``), each
   holding the frozen encoder and returning every image's locally aware patch features.
2. The task folds the stream into a uniform sample of at most ``patchcore.max_patches`` patches (the fit's
   memory bound), then selects the greedy k-center coreset (:func:`tsdn.patchcore.greedy_coreset`).
3. The model is validated like TSDN (hold-out normals with synthetic defects, :func:`train_eval.validate_holdout`),
   calibrated on the clean held-out scores, evaluated on the test split, and written as a run
   (``<store>/runs/<product>/<run>/model.safetensors``, ``model.json``, ``metrics.json``) and a registry version
   whose ``family`` is ``patchcore``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from tsdn.checkpoint import MODEL_JSON, MODEL_WEIGHTS
from tsdn.patchcore import PatchCoreConfig
from tsdn_platform import layout, store
from tsdn_platform.ray_session import worker_cpus
from tsdn_platform.train_eval import collect_test, predict_arrays, shard_batches, validate_and_calibrate

__all__ = ["PatchEmbedder", "fit_patchcore"]

logger = logging.getLogger(__name__)


class PatchEmbedder:
    """Ray Data actor: ``{"image": (B, 3, S, S) uint8}`` -> ``{"patches": (B, h * w, D) float16}``."""

    def __init__(self, cfg: dict[str, Any], device: str, threads: int = 1) -> None:
        from tsdn.patchcore import PatchCore

        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = PatchCore(PatchCoreConfig(**_tuples(cfg)), opener=store.read_bytes).to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(np.asarray(batch["image"])).to(self.device).float().div_(255.0)
        emb = self.model.embed(images)
        patches = emb.permute(0, 2, 3, 1).reshape(emb.shape[0], -1, emb.shape[1])
        return {"patches": patches.to(torch.float16).cpu().numpy()}


def _tuples(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def fit_patchcore(cfg: Any, product: str, run_name: str, datasets: dict[str, Any]) -> dict[str, Any]:
    """Fit, validate, evaluate and save one product line's PatchCore; returns the run summary.

    ``cfg`` is the :class:`tsdn_platform.train_config.TrainConfig`; ``datasets`` its ``{"train", "val", "test"}``.
    The summary has the keys :func:`tsdn_platform.train.run_product` records (``checkpoint_dir``, ``val``,
    ``test``, ``history``, ``best_epoch``, ``resumed_from_epoch``, ``test_scores``) plus ``fit``.
    """
    import ray

    from tsdn.checkpoint import checkpoint_files
    from tsdn.metrics import evaluate
    from tsdn.patchcore import PatchCore
    from tsdn.predict import Predictor

    pc_cfg = cfg.patchcore
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    cpus = worker_cpus(cfg.cpus_per_worker, cfg.num_workers, ray.cluster_resources().get("CPU", 0.0))
    # No select_columns before the actors: it is a Ray Data task of its own, which needs a CPU (the actors read
    # only "image"); cached (materialised) rows then reach them without any task.
    embedded = datasets["train"].map_batches(
        PatchEmbedder,
        fn_constructor_kwargs={"cfg": pc_cfg.to_dict(), "device": device, "threads": max(1, int(cpus))},
        batch_size=cfg.eval_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
        num_cpus=cpus,
        num_gpus=cfg.gpus_per_worker if cfg.use_gpu else 0,
    )
    model = PatchCore(pc_cfg, opener=store.read_bytes)
    batches = embedded.iter_batches(batch_size=None, batch_format="numpy")
    try:
        stats = model.fit_patches(torch.from_numpy(batch["patches"]) for batch in batches)
    except ValueError as exc:
        msg = f"{product}: {exc}"
        raise ValueError(msg) from exc
    fit = {
        **stats,
        "bank_bytes": int(model.bank.numel() * model.bank.element_size()),
        "fit_s": round(time.perf_counter() - started, 2),
    }
    logger.info("%s: PatchCore fit %s", product, fit)

    predictor = Predictor(model, calibration=None, device=device, batch_size=cfg.eval_batch_size)
    val_batches = shard_batches(datasets["val"], cfg.eval_batch_size)
    val, calibration, val_image_scores = validate_and_calibrate(
        predictor, val_batches, cfg.validation, cfg.validation_seed, cfg.target_false_positive_rate
    )
    predictor.calibration = calibration
    labels, scores, masks, maps, ids = collect_test(
        lambda x: predict_arrays(predictor, x), shard_batches(datasets["test"], cfg.eval_batch_size)
    )
    test = evaluate(labels, scores, masks, maps)

    run_uri = layout.run_uri(cfg.store, product, run_name)
    checkpoint_dir = "patchcore"
    files = checkpoint_files(model, calibration, extra={"training": {"product": product, "run": run_name, "fit": fit}})
    for name in (MODEL_WEIGHTS, MODEL_JSON):
        store.replace_bytes(store.join(run_uri, checkpoint_dir, name), files[name])
    history = [{"epoch": 1, **{k: float(v) for k, v in val.items()}, **fit}]
    return {
        "checkpoint_dir": checkpoint_dir,
        "best_epoch": 1,
        "val": {k: float(v) for k, v in val.items()},
        "test": {k: (None if not np.isfinite(v) else float(v)) for k, v in test.items()},
        "history": history,
        "resumed_from_epoch": 0,
        "test_scores": dict(zip(ids, scores.tolist())),
        "val_image_scores": val_image_scores,
        "fit": fit,
    }
