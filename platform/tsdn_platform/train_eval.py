"""Validation and test evaluation of a model being trained (rank 0 of the Train workers, and PatchCore's fit).

:func:`validate_holdout` is the leak-free validation on held-out ``train/good`` images with synthetic defects
(checkpoint selection, calibration and promotion come from it); :func:`validate_test` the paper's protocol on the
labelled test split; :func:`validate_and_calibrate` runs the configured one and fits the calibration on its normal
images; :func:`final_evaluation` scores the best kept checkpoint on the test split with the serving
predictor after the last epoch. The batching helpers turn shard batches into the model's input.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from tsdn.calibration import DEFAULT_QUANTILE, Calibration, quantile_for_false_positive_rate
from tsdn.checkpoint import MODEL_JSON, MODEL_WEIGHTS
from tsdn_platform import train_checkpoints
from tsdn_platform.train_checkpoints import CHECKPOINT_STATE
from tsdn_platform.train_config import TrainConfig

__all__ = [
    "HoldoutValidation",
    "as_images",
    "collect_test",
    "final_evaluation",
    "metric_or_low",
    "predict_arrays",
    "shard_batches",
    "validate_and_calibrate",
    "validate_holdout",
    "validate_test",
]


def as_images(images: Any) -> torch.Tensor:
    """Shard images -> (B, 3, S, S) float32 in [0, 1] (uint8 shards are scaled)."""
    if isinstance(images, torch.Tensor):
        scale, tensor = images.dtype == torch.uint8, images.float()
    else:
        # Ray hands out numpy batches as read-only views of its object store, which torch warns about when it
        # wraps one; the float32 copy is the one copy made either way.
        array = np.asarray(images)
        scale, tensor = array.dtype == np.uint8, torch.from_numpy(array.astype(np.float32))
    return tensor.div_(255.0) if scale else tensor


def shard_images(shard: Any, batch_size: int, device: Any) -> Iterator[torch.Tensor]:
    """The images of a worker's train shard, once through: (B, 3, H, W) float32 in [0, 1] on ``device``."""
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
        yield as_images(batch["image"])


def shard_batches(shard: Any, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches of a (non-split) validation/test shard; every row is kept."""
    yield from shard.iter_batches(batch_size=batch_size, batch_format="numpy")


def predict_arrays(predictor: Any, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``predictor.predict_tensor`` -> scores (B,) and maps (B, S, S) as numpy float32."""
    pred = predictor.predict_tensor(images)
    return pred.anomaly_score.numpy(), pred.anomaly_map[:, 0].numpy()


class HoldoutValidation(NamedTuple):
    """What :func:`validate_holdout` measured."""

    metrics: dict[str, float]  # val_image_auroc, val_pixel_auroc
    normal_scores: np.ndarray  # (N,) the clean held-out images' scores: the calibration's sample
    normal_map_maxima: np.ndarray  # (N,) their maps' maxima
    labels: np.ndarray  # (2N,) 0 for a clean image, 1 for one with a synthetic defect
    scores: np.ndarray  # (2N,) every validation image's score, in the order of ``labels``

    def image_scores(self) -> dict[str, list]:
        """``{"labels", "scores"}`` as JSON lists: what a version carries to compare families on the same images."""
        return {"labels": self.labels.astype(int).tolist(), "scores": self.scores.astype(float).tolist()}


def validate_holdout(predictor: Any, batches: Iterable[Mapping[str, np.ndarray]], seed: int) -> HoldoutValidation:
    """Leak-free validation: held-out normal images, clean and with one synthetic defect each.

    The defects are :func:`tsdn.defects.validation_set`'s (drawn scratches, stains, holes, cracks, colour spots
    and cut-paste patches), not SURF's training distortion, so the metric measures whether the model finds
    defects it never trained on; no test image is involved. Before scoring, the model's ``score_scales`` are
    fitted on the clean copies (the ``fused`` source reads them).

    Args:
        predictor: a :class:`tsdn.predict.Predictor` around the model being validated.
        batches: numpy batches of the held-out shard (``image`` (B, 3, S, S) uint8 or float).
        seed: the validation draws (the same set at every validation and for every version).

    Returns:
        the metrics, the clean images' scores and maps' maxima (they calibrate: :func:`validate_and_calibrate`),
        and every validation image's label and score (families are compared on them: ``tsdn.metrics.paired_auroc_gap``).
    """
    from tsdn.defects import validation_set
    from tsdn.metrics import image_auroc, pixel_auroc

    clean = [_as_uint8_hwc(batch["image"]) for batch in batches]
    if not clean:
        msg = "validation: the held-out split is empty; ingest more train images or change holdout_folds"
        raise ValueError(msg)
    normal = np.concatenate(clean)
    val = validation_set(normal, seed=seed)
    images = torch.from_numpy(val.images).permute(0, 3, 1, 2).float().div_(255.0)
    predictor.model.fit_score_scales(list(images[: len(normal)].split(predictor.batch_size)))
    pred = predictor.predict_tensor(images)
    scores, maps = pred.anomaly_score.numpy(), pred.anomaly_map[:, 0].numpy()
    metrics = {
        "val_image_auroc": image_auroc(val.labels, scores),
        "val_pixel_auroc": pixel_auroc(val.masks, maps),
    }
    clean_maps = maps[val.labels == 0]
    maxima = clean_maps.reshape(len(clean_maps), -1).max(axis=1)
    return HoldoutValidation(metrics, scores[val.labels == 0], maxima, np.asarray(val.labels), scores)


def _as_uint8_hwc(images: Any) -> np.ndarray:
    """Shard images (B, 3, S, S) uint8 or float in [0, 1] -> (B, S, S, 3) uint8."""
    array = np.asarray(images)
    if array.dtype != np.uint8:
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1))


def collect_test(
    predict: Any, batches: Iterable[Mapping[str, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Run ``predict(images) -> (scores, maps)`` over the test split; returns labels, scores, masks, maps, ids."""
    labels, scores, masks, maps, ids = [], [], [], [], []
    for batch in batches:
        batch_scores, batch_maps = predict(as_images(batch["image"]))
        scores.append(batch_scores)
        maps.append(batch_maps)
        labels.append(np.asarray(batch["label"]).astype(np.int64))
        masks.append((np.asarray(batch["mask"]).reshape(batch_maps.shape) > 0).astype(np.uint8))
        ids.extend(str(i) for i in batch["image_id"])
    if not scores:
        msg = "test split is empty"
        raise ValueError(msg)
    return np.concatenate(labels), np.concatenate(scores), np.concatenate(masks), np.concatenate(maps), ids


def validate_test(
    predictor: Any, batches: Iterable[Mapping[str, np.ndarray]]
) -> tuple[dict[str, float], np.ndarray, np.ndarray, np.ndarray]:
    """The paper's protocol: validate on the labelled test split. Returns metrics, scores (N,), labels (N,) and the
    maps' maxima (N,).

    The model's ``score_scales`` are fitted on the test split's normal images first (this protocol reads the
    test labels anyway).
    """
    from tsdn.metrics import image_auroc, pixel_auroc

    rows = list(batches)
    normal = [as_images(b["image"])[np.asarray(b["label"]) == 0] for b in rows]
    normal = [n for n in normal if len(n)]
    if normal:
        predictor.model.fit_score_scales(normal)
    labels, scores, masks, maps, _ = collect_test(lambda x: predict_arrays(predictor, x), rows)
    metrics = {"val_image_auroc": image_auroc(labels, scores), "val_pixel_auroc": pixel_auroc(masks, maps)}
    return metrics, scores, labels, maps.reshape(len(maps), -1).max(axis=1)


def threshold_quantile(n_normal: int, target_false_positive_rate: float | None) -> float:
    """The quantile of ``n_normal`` held-out normal scores the threshold is set at: the one whose expected false
    positive rate is the target (:func:`tsdn.calibration.quantile_for_false_positive_rate`; ``ValueError`` when
    ``n_normal`` images cannot promise it), or :data:`tsdn.calibration.DEFAULT_QUANTILE` without a target."""
    if target_false_positive_rate is None:
        return DEFAULT_QUANTILE
    return quantile_for_false_positive_rate(n_normal, target_false_positive_rate)


def validate_and_calibrate(
    predictor: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    validation: str,
    seed: int,
    target_false_positive_rate: float | None = None,
) -> tuple[dict[str, float], Calibration, dict[str, list] | None]:
    """The configured validation (``holdout``: :func:`validate_holdout`; ``test``: :func:`validate_test`) and the
    calibration fitted on its normal images' scores: at :func:`threshold_quantile` of them, or F1-optimal on the
    labelled test split. A model whose map is not the one it scores (TSDN's ``map_strides``) gets the
    ``map_offset`` that puts its map in the score's units. The third item is the hold-out validation's
    :meth:`HoldoutValidation.image_scores` (None for ``test``: the test split's scores are not a selection's).
    """
    from tsdn.scoring import fit_calibration

    separate_map = getattr(predictor.model, "map_positions", None) is not None
    if validation == "holdout":
        held = validate_holdout(predictor, batches, seed)
        quantile = threshold_quantile(len(held.normal_scores), target_false_positive_rate)
        map_maxima = held.normal_map_maxima if separate_map else None
        calibration = fit_calibration(held.normal_scores, quantile=quantile, normal_map_maxima=map_maxima)
        return held.metrics, calibration, held.image_scores()
    metrics, scores, labels, maxima = validate_test(predictor, batches)
    normal = labels == 0
    map_maxima = maxima[normal] if separate_map else None
    return metrics, fit_calibration(scores[normal], scores, labels, normal_map_maxima=map_maxima), None


def _clean_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def final_evaluation(
    cfg: TrainConfig, product: str, run_uri: str, start_epoch: int, history: list[dict[str, Any]], predictor_cls: Any
) -> dict[str, Any]:
    """Rank 0, after training: the best kept checkpoint, evaluated on the test split with the serving predictor."""
    import ray.train
    import ray.train.torch

    from tsdn.metrics import evaluate

    reported = ray.train.get_all_reported_checkpoints()
    if not reported:
        msg = f"{product}: no checkpoint was reported"
        raise RuntimeError(msg)
    best = max(reported, key=lambda r: (metric_or_low(r.metrics, cfg.checkpoint_metric), r.metrics["epoch"]))
    files = train_checkpoints.read_reported(run_uri, best.checkpoint, (MODEL_WEIGHTS, MODEL_JSON, CHECKPOINT_STATE))
    predictor = predictor_cls.from_files(files, device=ray.train.torch.get_device(), batch_size=cfg.eval_batch_size)

    test_shard = ray.train.get_dataset_shard("test")
    labels, scores, masks, maps, ids = collect_test(
        lambda x: predict_arrays(predictor, x), shard_batches(test_shard, cfg.eval_batch_size)
    )
    # The maps the score job stores: the calibration's map_offset added (map_strides), at its Parquet's float16
    # precision. One metric, one value in both jobs.
    shown = predictor.calibration.shift_map(maps)
    flagged = predictor.calibration.is_anomalous(scores)  # the decisions the registered version ships
    test = evaluate(labels, scores, masks, shown.astype(np.float16).astype(np.float32), flagged=flagged)
    return {
        "checkpoint_dir": os.path.basename(best.checkpoint.path.rstrip("/")),
        "best_epoch": int(best.metrics["epoch"]),
        "val": {k: _clean_number(v) for k, v in best.metrics.items() if k.startswith("val_")},
        "test": {k: _clean_number(float(v)) for k, v in test.items()},
        "history": history,
        "resumed_from_epoch": start_epoch,
        "test_scores": dict(zip(ids, scores.tolist())),
        # None for a checkpoint written before they were kept, or validated on the test split
        "val_image_scores": json.loads(files[CHECKPOINT_STATE]).get("val_image_scores"),
    }


def metric_or_low(metrics: Mapping[str, Any], name: str) -> float:
    """``metrics[name]`` as a float, or -inf when it is missing or not finite (it then ranks last)."""
    value = metrics.get(name)
    if value is None or not isinstance(value, int | float) or not math.isfinite(float(value)):
        return -math.inf
    return float(value)
