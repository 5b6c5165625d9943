"""The model deployment of the detection API: ``TSDNModel``, multiplexed and batched.

Ray Serve model multiplexing keeps an LRU of ``models_per_replica`` predictors per replica, keyed by the model id
``"<product>@<version>"``; dynamic batching (``@serve.batch``, size and wait time from ``user_config``) groups
requests, and each group of one model id is one :meth:`tsdn.predict.Predictor.predict` call, the same function
batch scoring calls. A request is one decoded image (:class:`DetectRequest`); the answer is a
:class:`DetectResult` carrying :func:`tsdn.response.detect_answer`.
"""

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image
from ray import serve

from tsdn.response import detect_answer
from tsdn_platform.registry import Registry
from tsdn_platform.serve_config import BATCH_SIZE, BATCH_WAIT_S

if TYPE_CHECKING:  # the ingress process never imports torch
    from tsdn.predict import Detection

__all__ = ["BATCH_OPTIONS", "DetectRequest", "DetectResult", "TSDNModel", "model_id", "split_model_id"]

logger = logging.getLogger(__name__)

BATCH_OPTIONS = ("max_batch_size", "batch_wait_timeout_s")


@dataclass
class DetectRequest:
    """One decoded image for one model id (``"<product>@<version>"``)."""

    model_id: str
    image: Image.Image
    threshold: float | None = None
    include: frozenset[str] = frozenset()


@dataclass
class DetectResult:
    """What the model deployment answers for one image: who answered and :func:`tsdn.response.detect_answer`."""

    product: str
    model_version: str
    family: str
    inference_ms: float
    batch_size: int
    answer: dict[str, Any]


def model_id(product: str, version: str) -> str:
    return f"{product}@{version}"


def split_model_id(mid: str) -> tuple[str, str]:
    product, sep, version = mid.partition("@")
    if not sep or not product or not version:
        msg = f"model id {mid!r}: expected '<product>@<version>'"
        raise ValueError(msg)
    return product, version


@serve.deployment(name="TSDNModel")
class TSDNModel:
    """Multiplexed, batched TSDN inference. One request = one decoded image of one model id."""

    def __init__(self, store: str, models_per_replica: int, runtime: str = "torch") -> None:
        self._registry = Registry(store)
        self._runtime = runtime

        # The LRU size comes from the config, so the multiplexed loader is wrapped per instance (Serve
        # detects multiplexing on instance attributes too). It must wrap a plain function, not a bound method.
        async def load(mid: str) -> Any:
            return await asyncio.to_thread(self._load, mid)

        self._get_model = serve.multiplexed(max_num_models_per_replica=models_per_replica)(load)
        self._batching: dict[str, float] = {"max_batch_size": BATCH_SIZE, "batch_wait_timeout_s": BATCH_WAIT_S}

    def _load(self, mid: str) -> Any:
        product, version = split_model_id(mid)
        predictor, ref = self._registry.load_predictor(product, version, runtime=self._runtime)
        logger.info("loaded %s (version %s, runtime %s)", product, ref.version, self._runtime)
        return predictor, ref

    def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        """``user_config``: ``max_batch_size`` (>= 1; 1 = no batching) and ``batch_wait_timeout_s`` (>= 0)."""
        unknown = sorted(set(user_config) - set(BATCH_OPTIONS))
        if unknown:
            msg = f"user_config: unknown key(s) {', '.join(unknown)}; expected {', '.join(BATCH_OPTIONS)}"
            raise ValueError(msg)
        size = user_config.get("max_batch_size", self._batching["max_batch_size"])
        wait = user_config.get("batch_wait_timeout_s", self._batching["batch_wait_timeout_s"])
        if not isinstance(size, int) or size < 1:
            msg = f"user_config.max_batch_size: expected an integer >= 1, got {size!r}"
            raise ValueError(msg)
        if not isinstance(wait, (int, float)) or not math.isfinite(wait) or wait < 0:
            msg = f"user_config.batch_wait_timeout_s: expected a number >= 0, got {wait!r}"
            raise ValueError(msg)
        self._detect_batch.set_max_batch_size(size)
        self._detect_batch.set_batch_wait_timeout_s(float(wait))
        self._batching = {"max_batch_size": size, "batch_wait_timeout_s": float(wait)}

    def batch_settings(self) -> dict[str, float]:
        """The batching settings in force: ``max_batch_size`` and ``batch_wait_timeout_s``."""
        return dict(self._batching)

    async def detect(self, request: DetectRequest) -> DetectResult:
        result = await self._detect_batch(request)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _detect_batch(self, requests: list[DetectRequest]) -> list[DetectResult | Exception]:
        # Serve already splits batches by multiplexed model id; grouping by the id each request carries
        # makes "one model per predict call" hold by construction. A threshold override is a predict
        # argument, so it splits a group too. A failing group fails only its own requests.
        groups: dict[tuple[str, float | None], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((request.model_id, request.threshold), []).append(index)
        results: dict[int, DetectResult | Exception] = {}
        for (mid, threshold), indices in groups.items():
            try:
                predictor, ref = await self._get_model(mid)
                images = [requests[i].image for i in indices]
                start = time.perf_counter()
                detections = await asyncio.to_thread(predictor.predict, images, threshold)
                elapsed_ms = (time.perf_counter() - start) * 1000.0
                answers = await asyncio.to_thread(_answers, detections, [requests[i].include for i in indices])
            except Exception as exc:
                logger.exception("inference failed for %s", mid)
                results.update(dict.fromkeys(indices, exc))
                continue
            for i, answer in zip(indices, answers):
                results[i] = DetectResult(
                    product=ref.product,
                    model_version=ref.version,
                    family=predictor.family,
                    inference_ms=elapsed_ms,
                    batch_size=len(indices),
                    answer=answer,
                )
        return [results[i] for i in range(len(requests))]


def _answers(detections: "list[Detection]", includes: list[frozenset[str]]) -> list[dict[str, Any]]:
    """Each detection's answer (PNG and float-map encoding run here, off the replica's event loop)."""
    return [
        detect_answer(
            anomaly_score=detection.anomaly_score,
            normalized_score=detection.normalized_score,
            threshold=detection.threshold,
            anomaly_map=detection.anomaly_map,
            include=include,
            scored_map=detection.scored_map,
        )
        for detection, include in zip(detections, includes)
    ]
