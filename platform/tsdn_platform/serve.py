"""Serve the best model of every product line over HTTP with Ray Serve.

One application, two deployments:

- ``TSDNIngress`` (FastAPI): bearer-token auth, product-id validation, body-size and content-type
  checks, image decoding with the decompression-bomb check, and the ``best.json`` pointer lookup.
- ``TSDNModel``: Ray Serve model multiplexing (an LRU of ``models_per_replica`` predictors per
  replica) and dynamic batching (``@serve.batch``; size and wait time from ``user_config``). Inference
  is :meth:`tsdn.predict.Predictor.predict`, the same function batch scoring calls.

API (JSON; errors are ``{"status": <code>, "reason": "..."}``, never a 500 for bad input):

- ``POST /v1/products/{product}/detect``: body = the image (``image/png``, ``image/jpeg``) or a
  ``multipart/form-data`` upload with one file part. Query: ``threshold`` (raw anomaly-score units,
  overrides the calibrated one), ``include=anomaly_map``. Answer: ``product``, ``model_version``,
  ``anomaly_score``, ``is_anomalous``, ``threshold``, ``inference_ms`` (the ``predict`` call of the batch
  the image was in), ``batch_size`` (images in that call) and, when asked, ``anomaly_map``: a base64 PNG
  heatmap at the image's resolution whose colour scale tops out at ``vmax`` = 2 x threshold (an image more
  than 4x the model's input on its short side is decoded smaller, a JPEG at a DCT scale and any image reduced
  on load by an integer factor, never below 4x the input: its maps are at that resolution). Errors: 401 no
  bearer token, 403 wrong token or one not scoped to the product, 404 unknown or invalid product id, 413
  body over ``max_body_bytes`` (by Content-Length, and by the bytes read), 415 other content types, 422
  undecodable image, more than ``max_image_pixels`` pixels (refused from the header, before decoding) or a
  bad query value, 400 a malformed multipart body (or more than one file) or Content-Length, 503 store
  unreachable.
- ``GET /v1/products``: products with a promoted model, their ``model_version`` and ``metrics``.
- ``GET /healthz``: no auth.

Version switching: the multiplexed model id is ``"<product>@<version>"``. The ingress re-reads a
product's ``best.json`` at most every ``pointer_ttl_s`` seconds, so ``pointer_ttl_s`` after a
promotion every new request is routed to the new version's model id; the model deployment loads it on
first use and the old version ages out of the LRU. No restart, and every response names the version
that answered.

Auth: tokens come from the environment variable ``auth_tokens_env`` (comma-separated) and/or the file
``auth_tokens_file`` (one per line, ``#`` comments). An entry ``TOKEN gearbox housing`` scopes a token to those
product lines (403 on any other; ``GET /v1/products`` lists only them); a bare ``TOKEN`` may use every one.
They are read once where the application is built
(``tsdn serve``, or the Serve controller's build task for ``serve deploy``); only their SHA-256 digests
reach the replicas, and a request's token is compared to each digest in constant time. ``auth_required``
defaults to "on when tokens are configured": the local demo on 127.0.0.1 runs open, and the server refuses
to listen on a non-loopback host without auth unless ``auth_required: false`` says so explicitly.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at run time, and
# on Serve's class-based ingress postponed (string) annotations are not resolved (``Request`` became a
# required query parameter).
import argparse
import asyncio
import ctypes
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from ray import serve
from ray.exceptions import RayActorError
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from tsdn.config_io import ConfigError, from_dict
from tsdn.image import ImageDecodeError, decode_image
from tsdn.response import INCLUDES, detect_answer
from tsdn.runtime import runtime_problem
from tsdn_platform.api_schema import (
    DETECT_REQUEST_BODY,
    DetectResponse,
    ErrorResponse,
    ProductDetails,
    ProductList,
    product_details,
    product_summary,
)
from tsdn_platform.config import load_config
from tsdn_platform.registry import Registry, RegistryError, validate_name
from tsdn_platform.store import StoreError, require

if TYPE_CHECKING:  # the ingress process never imports torch
    from tsdn.predict import Detection

__all__ = [
    "ApiError",
    "ServeConfig",
    "app_builder",
    "auth_required",
    "build_app",
    "config_from_args",
    "load_tokens",
    "main",
    "run_server",
    "start_server",
]

logger = logging.getLogger(__name__)

IMAGE_TYPES = frozenset({"image/png", "image/jpeg"})
MULTIPART = "multipart/form-data"
BATCH_OPTIONS = ("max_batch_size", "batch_wait_timeout_s")
BATCH_SIZE = 8
BATCH_WAIT_S = 0.01
# A large image is decoded small (tsdn.image.decode_image's min_size) but keeps at least this many times the
# model's input on each side: the last steps of downscaling stay with the predictor's antialiased resize, so a
# score moves by ~1-2 % against the full decode (tests/unit/tsdn/test_predict.py), not ~10 % as at 1x.
DECODE_KEEP = 4
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


@dataclass
class ServeConfig:
    """``tsdn serve`` / ``serve deploy`` settings (YAML + ``--set`` overrides, validated).

    ``host``, ``port``, ``app_name`` and ``route_prefix`` are used by ``tsdn serve`` only; under
    ``serve deploy`` the Serve config file's ``http_options`` and application entry decide them.
    """

    store: str = ""
    """Store URI holding ``registry/`` (a local folder or ``s3://bucket/prefix``)."""
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "tsdn"
    route_prefix: str = "/"
    max_body_bytes: int = 20 * 1024 * 1024
    """413 above this, checked on Content-Length and on the bytes actually read, before decoding."""
    max_image_pixels: int = 40_000_000
    """422 above this ``width * height``, refused from the header before any pixel is decoded (batch scoring's
    default is 64 000 000: a server holds many requests at once, a scorer one batch)."""
    max_concurrent_decodes: int = 2
    """Images an ingress replica decodes at once; more requests wait. Bounds the ingress's decoded-pixel memory
    to about ``max_concurrent_decodes x max_image_pixels x 4`` bytes however many requests are in flight; what
    reaches a model replica is reduced until its short side is below 8x the model's input."""
    models_per_replica: int = 4
    """Multiplexing LRU size: predictors a model replica keeps loaded. Size it to the working set."""
    max_batch_size: int = BATCH_SIZE
    """Dynamic batching; 1 switches batching off. Changeable at run time through ``user_config``."""
    batch_wait_timeout_s: float = BATCH_WAIT_S
    num_replicas: int = 1
    """Model replicas when ``autoscaling_config`` is not set."""
    autoscaling_config: dict[str, Any] | None = None
    """Ray Serve autoscaling for the model deployment (``min_replicas``, ``max_replicas``, ...)."""
    num_gpus_per_replica: float = 0.0
    num_cpus_per_replica: float = 1.0
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.25
    max_ongoing_requests: int = 64
    """Per replica, both deployments; at least ``max_batch_size`` so that batches can fill."""
    pointer_ttl_s: float = 2.0
    """A promotion is served at most this long after ``best.json`` changes."""
    auth_tokens_env: str = "TSDN_SERVE_TOKENS"
    auth_tokens_file: str | None = None
    auth_required: bool | None = None
    """None: required when any token is configured. True without tokens is an error."""
    runtime: str = "torch"
    """What runs the model in a replica: ``torch`` (the module), ``onnxruntime`` or ``openvino`` (the version's
    registered export, made on first use if absent; replicas then import neither torch nor timm)."""

    def __post_init__(self) -> None:
        if not self.store:
            msg = "store: required (a local folder or s3://bucket/prefix holding registry/)"
            raise ConfigError(msg)
        positive = {
            "port": self.port,
            "max_body_bytes": self.max_body_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_concurrent_decodes": self.max_concurrent_decodes,
            "models_per_replica": self.models_per_replica,
            "max_batch_size": self.max_batch_size,
            "num_replicas": self.num_replicas,
            "ingress_replicas": self.ingress_replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        for name, value in positive.items():
            if value < 1:
                msg = f"{name}: must be >= 1, got {value}"
                raise ConfigError(msg)
        if self.port > 65535:
            msg = f"port: must be <= 65535, got {self.port}"
            raise ConfigError(msg)
        non_negative = {
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "num_gpus_per_replica": self.num_gpus_per_replica,
            "num_cpus_per_replica": self.num_cpus_per_replica,
            "ingress_num_cpus": self.ingress_num_cpus,
            "pointer_ttl_s": self.pointer_ttl_s,
        }
        for name, value in non_negative.items():
            if not math.isfinite(value) or value < 0:
                msg = f"{name}: must be a finite number >= 0, got {value}"
                raise ConfigError(msg)
        if self.max_ongoing_requests < self.max_batch_size:
            msg = (
                f"max_ongoing_requests ({self.max_ongoing_requests}) < max_batch_size ({self.max_batch_size}): "
                "a replica could never fill a batch"
            )
            raise ConfigError(msg)
        if self.autoscaling_config is not None:
            low = self.autoscaling_config.get("min_replicas", 1)
            high = self.autoscaling_config.get("max_replicas", 1)
            if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high and high >= 1):
                msg = f"autoscaling_config: need integers 0 <= min_replicas <= max_replicas, >= 1; got {low}, {high}"
                raise ConfigError(msg)
        if not self.route_prefix.startswith("/"):
            msg = f"route_prefix: must start with '/', got {self.route_prefix!r}"
            raise ConfigError(msg)
        problem = runtime_problem(self.runtime, self.num_gpus_per_replica, "num_gpus_per_replica")
        if problem is not None:
            raise ConfigError(problem)


class ApiError(Exception):
    """An HTTP error with a reason, answered as ``{"status": ..., "reason": ...}``. Picklable."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason

    def __reduce__(self) -> tuple[type["ApiError"], tuple[int, str]]:
        return (type(self), (self.status, self.reason))


# --- auth --------------------------------------------------------------------------------------


Scope = frozenset[str] | None
"""The product lines a token may use; None: every one."""


def load_tokens(cfg: ServeConfig) -> list[str]:
    """The bearer tokens from ``cfg.auth_tokens_env`` (comma-separated) and ``cfg.auth_tokens_file``."""
    return list(load_token_scopes(cfg))


def load_token_scopes(cfg: ServeConfig) -> dict[str, Scope]:
    """Every configured token and the product lines it may use (None: every one).

    An entry is ``TOKEN`` (every product) or ``TOKEN PRODUCT [PRODUCT ...]`` (only those): comma-separated
    entries in the environment variable ``cfg.auth_tokens_env``, one entry per line in ``cfg.auth_tokens_file``
    (``#`` starts a comment line). A token listed more than once may use what any of its entries allows.
    """
    entries = os.environ.get(cfg.auth_tokens_env, "").split(",")
    if cfg.auth_tokens_file:
        path = Path(cfg.auth_tokens_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            msg = f"auth_tokens_file {path}: cannot read ({exc})"
            raise ConfigError(msg) from exc
        entries += [line for line in lines if not line.lstrip().startswith("#")]
    scopes: dict[str, Scope] = {}
    for entry in entries:
        if not entry.strip():
            continue
        token, *products = entry.split()
        try:
            scope = frozenset(validate_name(product) for product in products) or None
        except ValueError as exc:
            msg = f"auth token entry for products {' '.join(products)!r}: {exc}"
            raise ConfigError(msg) from exc
        previous = scopes.get(token, frozenset())
        scopes[token] = None if previous is None or scope is None else previous | scope
    return scopes


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def auth_required(cfg: ServeConfig, tokens: list[str]) -> bool:
    """``cfg.auth_required``, or when unset (None): whether any token is configured."""
    return bool(tokens) if cfg.auth_required is None else cfg.auth_required


def _auth_digests(cfg: ServeConfig) -> list[tuple[bytes, Scope]] | None:
    """SHA-256 digests of the accepted tokens with their scopes, or None when auth is off."""
    scopes = load_token_scopes(cfg)
    tokens = list(scopes)
    if not auth_required(cfg, tokens):
        if cfg.auth_required is None and not _is_loopback(cfg.host):
            msg = (
                f"host {cfg.host}: refusing to serve without auth on a non-loopback address; configure tokens "
                f"(env {cfg.auth_tokens_env} or auth_tokens_file) or set auth_required: false explicitly"
            )
            raise ConfigError(msg)
        logger.warning("serving WITHOUT authentication (no token configured)")
        return None
    if not tokens:
        msg = f"auth_required is true but no token is configured (env {cfg.auth_tokens_env}, auth_tokens_file)"
        raise ConfigError(msg)
    return [(_digest(token), scope) for token, scope in scopes.items()]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_token(authorization: str | None, digests: list[tuple[bytes, Scope]], product: str | None = None) -> Scope:
    """The scope of the request's token: 401 without a bearer token, 403 with a wrong one or one not scoped to
    ``product``. Every digest is compared, in constant time."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
    offered = _digest(token.strip())
    matched, scope = False, None
    for digest, allowed in digests:
        if hmac.compare_digest(offered, digest):
            matched, scope = True, allowed
    if not matched:
        raise ApiError(403, "invalid token")
    if product is not None and scope is not None and product not in scope:
        raise ApiError(403, f"this token is not allowed to use product {product!r}")
    return scope


# --- the anomaly-map heatmap --------------------------------------------------------------------

# Matplotlib's "inferno" sampled at 0, 1/4, 1/2, 3/4, 1; linear in between.
# --- the model deployment -----------------------------------------------------------------------


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
        )
        for detection, include in zip(detections, includes)
    ]


# --- the ingress --------------------------------------------------------------------------------

# Swagger UI and ReDoc load their scripts from a CDN, which an offline or air-gapped site cannot reach: they
# are off. The OpenAPI document is served by the ingress itself (``/openapi.json``), behind the same token as
# every other route but ``/healthz``.
api = FastAPI(
    title="TSDN anomaly detection",
    version="1",
    description="Industrial anomaly detection: the best model of every product line.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    # 401 names the scheme; 503 (store or replica unavailable) tells a client it may retry.
    headers = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": "1"}}.get(exc.status)
    return JSONResponse({"status": exc.status, "reason": exc.reason}, status_code=exc.status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"status": exc.status_code, "reason": str(exc.detail)}, status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"status": 422, "reason": reasons}, status_code=422)


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (401, "no bearer token"),
        (403, "wrong token"),
        (404, "unknown product, or none promoted"),
        (422, "a bad image or query value"),
        (503, "the model store is unreachable"),
    )
}


class _PointerCache:
    """``best.json`` per product, re-read at most every ``ttl_s`` seconds (misses are cached too)."""

    def __init__(self, registry: Registry, ttl_s: float) -> None:
        self._registry = registry
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, dict[str, Any] | None]] = {}

    async def best(self, product: str) -> dict[str, Any] | None:
        now = time.monotonic()
        cached = self._entries.get(product)
        if cached is not None and now - cached[0] < self._ttl_s:
            return cached[1]
        pointer = await asyncio.to_thread(self._registry.best, product)
        self._entries[product] = (now, pointer)
        return pointer


async def _single_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _store_failure(what: str, exc: Exception) -> ApiError:
    """A missing product or version is a 404; any other registry or store failure a 503 (retry later)."""
    # Exceptions raised in the model replica arrive wrapped (RayTaskError subclasses of the original type).
    # The cause names store paths and buckets: it goes to the server's log, never into a client's answer.
    cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
    if isinstance(exc, LookupError):
        logger.info("%s: not found: %s", what, cause)
        return ApiError(404, f"{what}: not found in the model registry")
    logger.warning("%s unavailable: %s", what, cause)
    return ApiError(503, f"{what} unavailable: the model store did not answer; retry later")


def _replica_lost(model: str, exc: RayActorError) -> ApiError:
    """The replica answering a request died or became unreachable mid-request (its node was lost): a 503 the
    client may retry at once, since Serve routes the next request to a live replica (infra/README.md, "Losing a
    node"). Without this, FastAPI answered a plain 500 outside the JSON error shape."""
    logger.warning("model %s: its replica was lost mid-request (%s)", model, type(exc).__name__)
    return ApiError(503, f"model {model}: the replica serving this request was lost; retry")


def _check_product_id(product: str) -> None:
    """404 for a path segment that cannot be a product id (the registry's one validator)."""
    try:
        validate_name(product)
    except ValueError as exc:
        raise ApiError(404, f"unknown product: {exc}") from exc


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


async def _multipart_image(request: Request, body: bytes) -> tuple[bytes, str]:
    """The one file part of a multipart upload (any field name) -> (bytes, a name for errors)."""
    parser = MultiPartParser(Headers(raw=request.headers.raw), _single_chunk(body), max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"malformed multipart body: {exc.message}") from exc
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:  # more than one is refused by the parser (max_files=1)
            raise ApiError(422, "multipart upload: expected exactly one file part, got none")
        upload = files[0]
        part_type = _media_type(upload.content_type)
        if part_type and part_type not in IMAGE_TYPES and part_type != "application/octet-stream":
            raise ApiError(415, f"file part {upload.filename!r}: unsupported content type {part_type!r}")
        return await upload.read(), f"upload {upload.filename or '(unnamed)'}"
    finally:
        await form.close()


def _return_large_frees_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB in this process, so every large block it frees goes back to the OS.

    Its dynamic threshold grows to 32 MiB after the first large free; Pillow decodes into 16 MiB blocks, which
    then come from the decode threads' heap arenas and stay there: a burst of 6300x6300 PNGs left the ingress
    317 MiB above its baseline (benchmarks/serve_memory.py; 5 MiB above with this). No-op without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


# Helpers the ingress calls are defined above it: ``serve.ingress`` captures the class (and the module
# globals its methods see) when it is decorated.
@serve.deployment(name="TSDNIngress")
@serve.ingress(api)
class TSDNIngress:
    """The HTTP API (``/v1``): validates and decodes requests, routes them to ``TSDNModel``."""

    def __init__(self, model: Any, cfg: ServeConfig, token_digests: list[tuple[bytes, Scope]] | None) -> None:
        self._model = model
        self._cfg = cfg
        self._digests = token_digests
        self._registry = Registry(cfg.store)
        self._pointers = _PointerCache(self._registry, cfg.pointer_ttl_s)
        self._version_cache: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._decodes = asyncio.Semaphore(cfg.max_concurrent_decodes)
        _return_large_frees_to_the_os()

    def _authorize(self, request: Request, product: str | None = None) -> Scope:
        """The token's scope (None: every product, or auth off); 401/403 as :func:`_check_token` says."""
        if self._digests is None:
            return None
        return _check_token(request.headers.get("authorization"), self._digests, product)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return api.openapi()

    @api.get("/v1/products", response_model=ProductList, responses=_ERRORS)
    async def products(self, request: Request) -> ProductList:
        """Every product with a promoted model that the token may use: version, family, input size, threshold and
        metrics."""
        scope = self._authorize(request)
        try:
            names = [n for n in await asyncio.to_thread(self._registry.list_products) if scope is None or n in scope]
            served = []
            for product in names:
                pointer = await self._pointers.best(product)
                if pointer is not None:
                    served.append(product_summary(product, pointer, *await self._version_files(product, pointer)))
        except (RegistryError, StoreError) as exc:
            raise _store_failure("the model registry", exc) from exc
        return ProductList(products=served)

    @api.get("/v1/products/{product}", response_model=ProductDetails, responses=_ERRORS)
    async def product(self, product: str, request: Request) -> ProductDetails:
        """One product's promoted version in full: calibration, config, training history, selection."""
        self._authorize(request, product)
        pointer = await self._promoted(product)
        try:
            return product_details(product, pointer, *await self._version_files(product, pointer))
        except (RegistryError, StoreError) as exc:
            raise _store_failure(f"product {product!r}", exc) from exc

    async def _promoted(self, product: str) -> dict[str, Any]:
        """The product's ``best.json`` pointer; 404 for an invalid name or a product with no promoted model."""
        _check_product_id(product)
        try:
            pointer = await self._pointers.best(product)
        except (RegistryError, StoreError) as exc:
            raise _store_failure(f"product {product!r}", exc) from exc
        if pointer is None:
            raise ApiError(404, f"unknown product {product!r}: no model is promoted for it")
        return pointer

    async def _version_files(self, product: str, pointer: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``metrics.json`` and ``model.json`` of a version; versions are immutable, so this cache never expires."""
        key = model_id(product, pointer["version"])
        if key not in self._version_cache:
            metrics = await asyncio.to_thread(self._registry.metrics, product, pointer["version"])
            model_json, _ = await asyncio.to_thread(self._registry.model_json, product, pointer["version"])
            self._version_cache[key] = (metrics, model_json)
        return self._version_cache[key]

    @api.post(
        "/v1/products/{product}/detect",
        response_model=DetectResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
        openapi_extra={"requestBody": DETECT_REQUEST_BODY},
    )
    async def detect(
        self,
        product: str,
        request: Request,
        threshold: float | None = Query(None, description="decision threshold override (anomaly-score units)"),
        include: str | None = Query(None, description=f"comma-separated extras: {', '.join(INCLUDES)}"),
    ) -> DetectResponse:
        """Detect anomalies in one image with the product's promoted model."""
        self._authorize(request, product)
        extras = frozenset(item.strip() for item in (include or "").split(",") if item.strip())
        if extras - set(INCLUDES):
            unknown = ", ".join(sorted(extras - set(INCLUDES)))
            raise ApiError(422, f"include: unknown value(s) {unknown}; expected any of {', '.join(INCLUDES)}")
        # Every family's raw scores are distances or probabilities (>= 0); a negative or zero threshold would
        # flag every image and make the heatmap's scale (2 x threshold) empty.
        if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
            raise ApiError(422, f"threshold: must be a finite number > 0, got {threshold}")
        _check_product_id(product)  # 404 before 415 and 413: the answer for a path that names nothing
        media_type = _media_type(request.headers.get("content-type"))
        if media_type not in IMAGE_TYPES and media_type != MULTIPART:
            allowed = ", ".join(sorted(IMAGE_TYPES | {MULTIPART}))
            raise ApiError(415, f"unsupported content type {media_type or '(none)'!r}; expected one of {allowed}")
        self._check_declared_length(request)
        pointer = await self._promoted(product)
        body = await self._read_body(request)
        if media_type == MULTIPART:
            data, name = await _multipart_image(request, body)
        else:
            data, name = body, f"{product} request body"
        try:
            _, model_json = await self._version_files(product, pointer)
        except (RegistryError, StoreError) as exc:
            raise _store_failure(f"product {product!r}", exc) from exc
        # Nothing larger than the model needs leaves the decode: a JPEG decodes at a DCT scale, any image is
        # reduced on load, so a replica never receives (or maps) a 40 M pixel image.
        input_size = (model_json.get("config") or {}).get("image_size")
        keep = DECODE_KEEP * input_size if input_size else None
        try:
            async with self._decodes:
                image = await asyncio.to_thread(decode_image, data, name, self._cfg.max_image_pixels, keep)
        except ImageDecodeError as exc:
            raise ApiError(422, str(exc)) from exc
        job = DetectRequest(
            model_id=model_id(product, pointer["version"]),
            image=image,
            threshold=threshold,
            include=extras,
        )
        try:
            result: DetectResult = await self._model.options(multiplexed_model_id=job.model_id).detect.remote(job)
        except (RegistryError, StoreError) as exc:
            raise _store_failure(f"model {job.model_id}", exc) from exc
        except RayActorError as exc:
            raise _replica_lost(job.model_id, exc) from exc
        return DetectResponse(
            product=result.product,
            model_version=result.model_version,
            family=result.family,
            **result.answer,
            inference_ms=round(result.inference_ms, 3),
            batch_size=result.batch_size,
        )

    def _check_declared_length(self, request: Request) -> None:
        """413 when Content-Length already announces more than ``max_body_bytes`` (nothing is read)."""
        declared = request.headers.get("content-length")
        if declared is None:
            return
        if not declared.strip().isdigit():
            raise ApiError(400, f"invalid Content-Length {declared!r}")
        if int(declared) > self._cfg.max_body_bytes:
            limit = self._cfg.max_body_bytes
            raise ApiError(413, f"body of {int(declared)} bytes exceeds the limit of {limit} bytes")

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as the bytes read pass ``max_body_bytes`` (chunked uploads too)."""
        limit = self._cfg.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


# --- building and running -----------------------------------------------------------------------


def build_app(cfg: ServeConfig) -> serve.Application:
    """The bound Serve application (ingress -> multiplexed, batched model deployment)."""
    model_options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.num_cpus_per_replica, "num_gpus": cfg.num_gpus_per_replica},
        "user_config": {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s},
    }
    if cfg.autoscaling_config is not None:
        model_options["autoscaling_config"] = dict(cfg.autoscaling_config)
    else:
        model_options["num_replicas"] = cfg.num_replicas
    model = TSDNModel.options(**model_options).bind(cfg.store, cfg.models_per_replica, cfg.runtime)
    return TSDNIngress.options(
        num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
    ).bind(model, cfg, _auth_digests(cfg))


def app_builder(args: Mapping[str, Any]) -> serve.Application:
    """Serve config entry point (``import_path: tsdn_platform.serve:app_builder``); ``args`` are ServeConfig fields."""
    return build_app(from_dict(ServeConfig, dict(args)))


def curl_example(url: str, auth: bool, product: str = "<product>") -> str:
    header = ' -H "Authorization: Bearer $TOKEN"' if auth else ""
    detect = f"{url}/v1/products/{product}/detect?include=anomaly_map"
    return f'curl -s{header} -H "Content-Type: image/png" --data-binary @image.png "{detect}"'


def start_server(cfg: ServeConfig) -> str:
    """Deploy the application on a local (or ``RAY_ADDRESS``) Ray cluster; returns the base URL."""
    from tsdn_platform.ray_session import init_ray

    app = build_app(cfg)
    init_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def run_server(cfg: ServeConfig) -> None:
    """``tsdn serve``: deploy, print the URL and a curl example, block until Ctrl-C or SIGTERM, shut down."""
    url = start_server(cfg)
    print(f"TSDN serving the best models of {cfg.store} at {url}/v1/products", flush=True)
    print(f"  try: {curl_example(url, auth_required(cfg, load_tokens(cfg)))}", flush=True)
    stop = threading.Event()
    # Both signals are handled here rather than left to Python's KeyboardInterrupt: a process started as a
    # background job of a non-interactive shell inherits SIGINT ignored, and Ctrl-C must still stop it.
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
        logger.info("stopping: shutting down Serve")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.shutdown()


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Defaults <- ``--config`` YAML <- ``--store/--host/--port`` <- ``--set`` overrides."""
    explicit = {"store": args.store, "host": args.host, "port": args.port}
    return load_config(ServeConfig, args.config, args.overrides, explicit)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    require(cfg.store)  # before Ray starts: a mistyped store is an error, not an empty product list
    run_server(cfg)
    return 0
