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
  bearer token or an unknown one, 403 a token not scoped to the product, 404 unknown or invalid product id, 413
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

Auth (:mod:`tsdn_platform.serve_auth`): bearer tokens, each optionally scoped to product lines, read once where
the application is built; only their SHA-256 digests reach the replicas. ``auth_required`` defaults to "on when
tokens are configured": the local demo on 127.0.0.1 runs open, and the server refuses to listen on a
non-loopback host without auth unless ``auth_required: false`` says so explicitly.

This module is the HTTP ingress and the application around it; the settings are
:mod:`tsdn_platform.serve_config`, the model deployment :mod:`tsdn_platform.serve_model` (their public names are
re-exported here).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at run time, and
# on Serve's class-based ingress postponed (string) annotations are not resolved (``Request`` became a
# required query parameter).
import argparse
import asyncio
import ctypes
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from tsdn.config_io import from_dict
from tsdn.image import ImageDecodeError, decode_image
from tsdn.resize import input_shape
from tsdn.response import INCLUDES, threshold_problem
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
from tsdn_platform.names import validate_name
from tsdn_platform.registry import Registry, RegistryError
from tsdn_platform.serve_auth import (
    ApiError,
    Scope,
    auth_digests,
    auth_required,
    check_token,
    load_token_scopes,
    load_tokens,
)
from tsdn_platform.serve_config import ServeConfig
from tsdn_platform.serve_model import DetectRequest, DetectResult, TSDNModel, model_id, split_model_id
from tsdn_platform.store import StoreError, require

__all__ = [
    "ApiError",
    "ServeConfig",
    "TSDNModel",
    "app_builder",
    "auth_required",
    "build_app",
    "config_from_args",
    "load_token_scopes",
    "load_tokens",
    "main",
    "run_server",
    "split_model_id",
    "start_server",
]

logger = logging.getLogger(__name__)

# The raw body types the detect route takes: the ones its OpenAPI document declares (tsdn.image decodes them all).
IMAGE_TYPES = frozenset(t for t in DETECT_REQUEST_BODY["content"] if t.startswith("image/"))
MULTIPART = "multipart/form-data"
# A large image is decoded small (tsdn.image.decode_image's min_size) but keeps at least this many times the
# model's input on each side: the last steps of downscaling stay with the predictor's antialiased resize, so a
# score moves by ~1-2 % against the full decode (tests/unit/tsdn/test_predict.py), not ~10 % as at 1x.
DECODE_KEEP = 4
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


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
        (401, "no bearer token, or one the server does not know"),
        (403, "a token not allowed to use the product"),
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
        """The token's scope (None: every product, or auth off); 401/403 as :func:`check_token` says."""
        if self._digests is None:
            return None
        return check_token(request.headers.get("authorization"), self._digests, product)

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
        if problem := threshold_problem(threshold):
            raise ApiError(422, problem)
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
        keep = DECODE_KEEP * max(input_shape(input_size)) if input_size else None
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
    ).bind(model, cfg, auth_digests(cfg))


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
