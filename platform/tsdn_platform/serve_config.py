"""``tsdn serve`` / ``serve deploy`` settings: :class:`ServeConfig` (YAML + ``--set`` overrides, validated).

Read where the application is built (``tsdn serve``, or the Serve controller's build task for ``serve deploy``)
and bound into the ingress deployment; the model deployment gets only the fields it needs.
"""

import math
from dataclasses import dataclass
from typing import Any

from tsdn.config_io import ConfigError, check
from tsdn.runtime import runtime_problem

__all__ = ["BATCH_SIZE", "BATCH_WAIT_S", "ServeConfig"]

BATCH_SIZE = 8
BATCH_WAIT_S = 0.01


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
        check(self, bool(self.store), "store", "a local folder or s3://bucket/prefix holding registry/")
        positive = (
            "port",
            "max_body_bytes",
            "max_image_pixels",
            "max_concurrent_decodes",
            "models_per_replica",
            "max_batch_size",
            "num_replicas",
            "ingress_replicas",
            "max_ongoing_requests",
        )
        for name in positive:
            check(self, getattr(self, name) >= 1, name, ">= 1")
        check(self, self.port <= 65535, "port", "<= 65535")
        non_negative = (
            "batch_wait_timeout_s",
            "num_gpus_per_replica",
            "num_cpus_per_replica",
            "ingress_num_cpus",
            "pointer_ttl_s",
        )
        for name in non_negative:
            value = getattr(self, name)
            check(self, math.isfinite(value) and value >= 0, name, "a finite number >= 0")
        check(
            self,
            self.max_ongoing_requests >= self.max_batch_size,
            "max_ongoing_requests",
            f">= max_batch_size ({self.max_batch_size}), or a replica could never fill a batch",
        )
        if self.autoscaling_config is not None:
            low = self.autoscaling_config.get("min_replicas", 1)
            high = self.autoscaling_config.get("max_replicas", 1)
            ok = isinstance(low, int) and isinstance(high, int) and 0 <= low <= high and high >= 1
            check(self, ok, "autoscaling_config", "integers 0 <= min_replicas <= max_replicas, >= 1")
        check(self, self.route_prefix.startswith("/"), "route_prefix", "a path starting with '/'")
        problem = runtime_problem(self.runtime, self.num_gpus_per_replica, "num_gpus_per_replica")
        if problem is not None:
            raise ConfigError(problem)
