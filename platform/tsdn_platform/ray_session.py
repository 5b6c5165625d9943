"""Connect to Ray the same way from every job: a cluster when one is given, else a local one on loopback."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

# The standard AWS settings the store honours; forwarded to every Ray worker so that tasks, actors
# and Train workers on any node reach the same S3 endpoint with the same credentials.
AWS_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)

# Ray's own setting for how many idle workers a node keeps (``ray start`` reads it from the environment too).
# Left at its default, Ray 2.60 keeps idle workers only up to the node's *free* CPUs (measured): while a scorer
# pool holds every CPU, each ``num_cpus=0`` Parquet write task gets a fresh worker that imports Ray Data,
# pandas and pyarrow again (about 1.2 s of CPU on a 2-core node, taken from the scorers, and once more on the
# job's critical path at the last write). A local cluster therefore sets it to its CPU count.
SOFT_LIMIT_ENV = "RAY_num_workers_soft_limit"


def forwarded_env() -> dict[str, str]:
    """Environment variables every worker needs: the AWS settings and the platform's own ``TSDN_*``."""
    keys = [k for k in os.environ if k in AWS_ENV_VARS or k.startswith("TSDN_")]
    return {k: os.environ[k] for k in sorted(keys)}


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Initialise Ray once per process.

    ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) connects to a running cluster.
    Without one, a local cluster starts bound to 127.0.0.1 only; it never listens on another interface.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # On a cluster the job's runtime_env (``ray job submit --runtime-env``) carries the settings;
        # a second runtime_env here would override it.
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, **kwargs)
        return
    _keep_local_cluster_on_loopback()
    logger.info("starting a local Ray cluster on 127.0.0.1")
    system_config = dict(kwargs.pop("_system_config", None) or {})
    if SOFT_LIMIT_ENV not in os.environ:
        system_config.setdefault("num_workers_soft_limit", num_cpus or os.cpu_count() or 1)
    ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env={"env_vars": forwarded_env()},
        _system_config=system_config,
        **kwargs,
    )


def _keep_local_cluster_on_loopback() -> None:
    """Make a local cluster listen on 127.0.0.1 only.

    Ray 2.60 replaces ``_node_ip_address="127.0.0.1"`` by the machine's routable address
    (``services.resolve_ip_for_localhost``) and then binds GCS and raylet on every interface. Its single-host
    mode, the one it uses on macOS and Windows, keeps the loopback address; it is chosen by
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which Ray reads when it is imported, so the already-imported
    constant is switched too. Only for a cluster this process starts: a multi-node cluster needs routable
    addresses, and ``init_ray(address=...)`` leaves it alone.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # processes the cluster starts
    ray_constants.ENABLE_RAY_CLUSTER = False
