"""Connect to Ray the same way from every job: a cluster when one is given, else a local one on loopback."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
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


# ``tsdn --verbose`` sets it; every job reads it through :func:`verbose` (workers get it with the TSDN_* variables).
VERBOSE_ENV = "TSDN_VERBOSE"
# Ray's loggers that narrate every dataset, report and deployment at INFO; quiet jobs keep their warnings.
_CHATTY_LOGGERS = ("ray.data", "ray.train", "ray.serve", "ray.tune", "ray.util.placement_group")


_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_PROGRESS_LOGGER = "ray.data._internal.progress"  # its one warning: "Progress bars disabled"
_TRAIN_REPORT_MODULE = ("train", "v2", "_internal", "execution", "context.py")
_EXCLUDE_RESOURCES_WARNING = r"`ExecutionOptions\.exclude_resources` is deprecated"
_DATASET_LOGGER = "ray.data.dataset"
_NO_CPU_WARNING = "does not have any available CPUs"
# Run in every worker of a platform job (local or submitted) when it starts: :func:`quiet_ray_loggers`.
WORKER_SETUP_HOOK = "tsdn_platform.ray_session.quiet_ray_loggers"
# Where Ray's job manager hands a submitted job's config (its runtime_env) to the driver
# (``ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR``, a private module).
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Whether the cluster this process uses is a local one that init_ray started (set once it has): its CPUs are all it
# will ever have, where a cluster it connected to may have an autoscaler.
_started_local = False


def verbose() -> bool:
    """Whether the user asked for Ray's own progress and INFO lines (``tsdn --verbose``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _HideMomentaryNoCpuWarning(logging.Filter):
    """Ray Data's "currently does not have any available CPUs. The Dataset job will hang" looks at one instant, when
    a dataset starts executing: a product line whose data loading starts while the other lines' trainers and reads
    hold every CPU for a moment is told it will hang, and then waits for a CPU (the demo said so on most runs). The
    record stays in the session's ``ray-data.log`` and leaves the console (Ray Data's own ``hide`` attribute). The
    hangs it would name for real, workers holding every CPU while their reads wait, the training driver prevents
    (:func:`worker_cpus`, ``train.concurrent_products``); ``--verbose`` shows it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _NO_CPU_WARNING in record.getMessage():
            record.hide = True
        return True


def quiet_ray_loggers() -> None:
    """Ray's INFO narration off (warnings stay), Ray Data progress bars off: the platform prints its own lines.

    Runs in the driver and, as the ``worker_process_setup_hook`` (:data:`WORKER_SETUP_HOOK`) of a local cluster or
    of a submitted job (:func:`connected_runtime_env`), in every worker; does nothing under ``--verbose``. Ray Data
    reads :func:`quiet_env` when it is imported; a process that imported it already gets its ``DataContext`` switched
    instead.
    """
    if verbose():
        return
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Train's placement-group cleaner polls the State API, which needs the dashboard a local cluster does not
    # start; it then warns every few seconds that the API "may be temporarily unavailable" (20 lines a demo).
    logging.getLogger(_PG_CLEANER_LOGGER).setLevel(logging.ERROR)
    # Ray Data warns once per process that progress bars are off, which the quiet job did itself. A level on the
    # logger holds whenever ray.data is imported (the driver imports it before RAY_DATA_LOGGING_CONFIG is set).
    logging.getLogger(_PROGRESS_LOGGER).setLevel(logging.ERROR)
    dataset_logger = logging.getLogger(_DATASET_LOGGER)
    if not any(isinstance(f, _HideMomentaryNoCpuWarning) for f in dataset_logger.filters):
        dataset_logger.addFilter(_HideMomentaryNoCpuWarning())
    # Every ``ray.train.report`` call is logged at INFO by a logger named after its module's *file path*
    # (``logging.getLogger(__file__)``), outside the ``ray.train`` hierarchy that LoggingConfig filters.
    import ray

    report_logger = os.path.join(os.path.dirname(ray.__file__), *_TRAIN_REPORT_MODULE)
    logging.getLogger(report_logger).setLevel(logging.WARNING)
    # Ray Train's default DataConfig copies ``exclude_resources`` into new ExecutionOptions on every fit, which
    # Ray 2.60 itself deprecates: a warning per training run about Ray's own call, not about the platform's.
    warnings.filterwarnings("ignore", message=_EXCLUDE_RESOURCES_WARNING, category=DeprecationWarning)
    os.environ.update(quiet_env())  # read when ray.data (and Ray Train's controller) start
    if "ray.data" not in sys.modules:
        return
    from ray.data import DataContext

    context = DataContext.get_current()  # datasets built in this process carry it to their executors
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def quiet_env() -> dict[str, str]:
    """Environment of a quiet job: Ray Data's progress bars off, its console at WARNING; nothing when verbose.

    A trainer that waits for CPUs (several product lines queue on one cluster) waits quietly: Ray Train's
    worker-group start timeout (60 s by default, then an ERROR traceback and a retry) becomes an hour.
    """
    if verbose():
        return {}
    return {
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3600",
    }


def forwarded_env() -> dict[str, str]:
    """Environment variables every worker needs: the AWS settings and the platform's own ``TSDN_*``."""
    keys = [k for k in os.environ if k in AWS_ENV_VARS or k.startswith("TSDN_")]
    return {k: os.environ[k] for k in sorted(keys)}


def worker_cpus(cpus_per_worker: float, num_workers: int, cluster_cpus: float) -> float:
    """The CPUs each of ``num_workers`` workers that Ray Data feeds (Ray Train workers reading data that are not
    cached, PatchCore's embedding actors) asks for: ``cpus_per_worker``, unless together they would hold every CPU
    of the cluster; then they share all but one, which the Ray Data tasks that feed them need. Holding all of them
    hung the job for ever (the `cpu` preset's 2 CPUs per worker on a 2-core machine). A cluster with no CPU to spare
    (an autoscaler's empty head, a one-CPU machine) keeps the request."""
    spare = cluster_cpus - 1
    if num_workers * cpus_per_worker <= spare or spare <= 0:
        return cpus_per_worker
    return spare / num_workers


def connected_runtime_env() -> dict[str, Any]:
    """What a job that connects to a running cluster adds to its runtime_env: the quiet worker set-up hook.

    Without it a submitted job's workers narrate every dataset and report and draw Ray Data's progress bars on the
    job's console (``ray job submit`` printed about 150 such lines for a two-epoch ``tiny`` training). Nothing is
    added under ``--verbose``, or when the job's own runtime_env names a set-up hook: Ray refuses a field that both
    set (the job manager leaves the submitted runtime_env in the driver's environment).
    """
    if verbose():
        return {}
    submitted = json.loads(os.environ.get(_JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}
    if "worker_process_setup_hook" in submitted:
        return {}
    return {"worker_process_setup_hook": WORKER_SETUP_HOOK}


def on_local_cluster() -> bool:
    """Whether this process runs on a local cluster that :func:`init_ray` started: one that cannot grow."""
    return _started_local


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
        # On a cluster the job's runtime_env (``ray job submit --runtime-env``) carries the settings; Ray merges
        # what the driver adds here into it, field by field.
        logger.info("connecting to Ray at %s", address)
        quiet_ray_loggers()
        ray.init(address=address, runtime_env=connected_runtime_env(), **kwargs)
        return
    _keep_local_cluster_on_loopback()
    system_config = dict(kwargs.pop("_system_config", None) or {})
    if SOFT_LIMIT_ENV not in os.environ:
        system_config.setdefault("num_workers_soft_limit", num_cpus or os.cpu_count() or 1)
    # Its own temp dir: Ray's default /tmp/ray is shared by every local cluster of the machine, and a second
    # cluster there makes Ray's placement-group cleaner of the first one fail loudly ("multiple active Ray
    # instances").
    kwargs.setdefault("_temp_dir", tempfile.mkdtemp(prefix="tsdn-ray-"))
    logger.info("starting a local Ray cluster on 127.0.0.1 (logs under %s)", kwargs["_temp_dir"])
    env_vars = {**quiet_env(), **forwarded_env()}
    quiet_ray_loggers()
    ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env={"env_vars": env_vars, "worker_process_setup_hook": WORKER_SETUP_HOOK},
        _system_config=system_config,
        **kwargs,
    )
    global _started_local
    _started_local = True


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
