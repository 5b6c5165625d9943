"""The local Ray cluster listens on the loopback interface only."""

import ipaddress
import logging
import os
import time
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

_LISTEN = "0A"


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # the process ended, or is not ours to inspect
            continue
        inodes.update(link[len("socket:[") : -1] for link in links if link.startswith("socket:["))
    return inodes


def _listening_addresses(inodes: set[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    addresses = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != _LISTEN or inode not in inodes:
                continue
            raw = bytes.fromhex(local.split(":")[0])
            # /proc prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, width // 2, 4))
            address = ipaddress.ip_address(words)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            addresses.append(address)
    return addresses


def test_local_cluster_binds_loopback_only(ray_local):
    import ray

    @ray.remote
    def node_ip() -> str:
        return ray.util.get_node_ip_address()

    assert ray.get(node_ip.remote()) == "127.0.0.1"
    addresses = _listening_addresses(_socket_inodes(_descendants(os.getpid())))
    assert addresses, "found no listening socket of the Ray cluster"
    assert all(address.is_loopback for address in addresses), addresses


def test_a_local_cluster_is_known_as_one_that_cannot_grow(ray_local):
    """Training starts no more lines than a local cluster's CPUs hold (``train.concurrent_products``); a process that
    did not start its cluster (``ray job submit`` onto one that may autoscale) is not told so."""
    import subprocess
    import sys

    from tsdn_platform.ray_session import on_local_cluster

    assert on_local_cluster()
    code = "from tsdn_platform.ray_session import on_local_cluster; print(on_local_cluster())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_local_cluster_keeps_idle_workers_while_actors_hold_every_cpu(ray_local):
    """A ``num_cpus=0`` task (the score job's Parquet writes) keeps its worker between runs even when an actor
    pool holds every CPU. Ray's default keeps idle workers only up to the node's free CPUs, so there the idle
    worker is killed after 1 s and the next write pays a fresh worker and its imports."""
    import ray

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self) -> bool:
            return True

    @ray.remote(num_cpus=0)
    def worker_pid() -> int:
        return os.getpid()

    holders = [Holder.remote() for _ in range(int(ray.cluster_resources()["CPU"]))]
    try:
        ray.get([holder.ready.remote() for holder in holders])
        pid = ray.get(worker_pid.remote())
        time.sleep(3.0)  # Ray checks for idle workers to kill every 200 ms, after 1 s idle
        assert Path(f"/proc/{pid}").exists(), "the idle worker was killed"
    finally:
        for holder in holders:
            ray.kill(holder)


def test_local_cluster_has_its_own_temp_dir_and_quiet_workers(ray_local):
    import ray

    temp_dir = ray._private.worker._global_node.get_temp_dir_path()
    assert Path(temp_dir).name.startswith("tsdn-ray-")  # not the machine-wide /tmp/ray

    @ray.remote(num_cpus=0)
    def levels() -> dict[str, object]:
        import logging
        import warnings

        from ray.data import ExecutionOptions, ExecutionResources  # reads RAY_DATA_LOGGING_CONFIG

        with warnings.catch_warnings(record=True) as caught:
            # what Ray Train's default DataConfig does on every fit (Ray 2.60 deprecates its own call)
            ExecutionOptions(exclude_resources=ExecutionResources.zero())
        return {
            "data": logging.getLogger("ray.data").level,
            "train": logging.getLogger("ray.train").level,
            "progress": logging.getLogger("ray.data._internal.progress").getEffectiveLevel(),
            "progress_bars_off": os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS"),
            "warnings": [str(w.message) for w in caught],
        }

    if os.environ.get("TSDN_VERBOSE"):
        pytest.skip("TSDN_VERBOSE is set: this session asked for Ray's own logs")
    seen = ray.get(levels.remote())
    assert seen["train"] == logging.WARNING and seen["progress_bars_off"] == "1"
    # "Progress bars disabled" (the job's own choice) stays off the console; other Ray Data warnings stay on
    assert seen["progress"] == logging.ERROR and seen["data"] != logging.ERROR
    assert not [w for w in seen["warnings"] if "exclude_resources" in w], seen["warnings"]


def test_quiet_env_and_loggers_follow_verbose(monkeypatch):
    from tsdn_platform import ray_session

    monkeypatch.delenv(ray_session.VERBOSE_ENV, raising=False)
    quiet = ray_session.quiet_env()
    assert quiet["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert Path(quiet["RAY_DATA_LOGGING_CONFIG"]).is_file()  # shipped as package data
    assert int(quiet["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]) >= 600
    for key, value in quiet.items():  # restored after the test, as is every logger level quiet_ray_loggers sets
        monkeypatch.setenv(key, value)
    touched = [*ray_session._CHATTY_LOGGERS, ray_session._PG_CLEANER_LOGGER, ray_session._PROGRESS_LOGGER]
    levels = {name: logging.getLogger(name).level for name in touched}
    progress = logging.getLogger(ray_session._PROGRESS_LOGGER)
    try:
        progress.setLevel(logging.NOTSET)  # the driver: ray.data imported before RAY_DATA_LOGGING_CONFIG was set
        with warnings.catch_warnings():
            ray_session.quiet_ray_loggers()
        assert progress.getEffectiveLevel() == logging.ERROR  # "Progress bars disabled" stays off the console
        assert logging.getLogger("ray.data").getEffectiveLevel() == logging.WARNING  # its other warnings stay on
        # Ray Data's one-instant "no available CPUs ... will hang" is marked for its file log only (its console
        # filter drops records with ``hide``); its other warnings are not, and a second call adds no second filter.
        records: list[logging.LogRecord] = []
        capture = logging.Handler()
        capture.emit = records.append
        dataset = logging.getLogger(ray_session._DATASET_LOGGER)
        dataset.addHandler(capture)
        with warnings.catch_warnings():
            ray_session.quiet_ray_loggers()
        dataset.warning(
            "Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang"
        )
        dataset.warning("some other warning")
        dataset.removeHandler(capture)
        assert [getattr(r, "hide", False) for r in records] == [True, False]
        assert len([f for f in dataset.filters if isinstance(f, ray_session._HideMomentaryNoCpuWarning)]) == 1
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        dataset = logging.getLogger(ray_session._DATASET_LOGGER)
        for f in list(dataset.filters):
            if isinstance(f, ray_session._HideMomentaryNoCpuWarning):
                dataset.removeFilter(f)
    monkeypatch.setenv(ray_session.VERBOSE_ENV, "1")
    assert ray_session.verbose() and ray_session.quiet_env() == {}


def test_a_job_on_a_running_cluster_adds_the_quiet_hook_unless_verbose_or_its_runtime_env_has_one(monkeypatch):
    """``init_ray(address)`` merges this into the submitted job's runtime_env (Ray refuses a field both set)."""
    import json

    from tsdn_platform import ray_session

    monkeypatch.delenv(ray_session.VERBOSE_ENV, raising=False)
    monkeypatch.delenv(ray_session._JOB_CONFIG_ENV, raising=False)
    hook = {"worker_process_setup_hook": "tsdn_platform.ray_session.quiet_ray_loggers"}
    assert ray_session.connected_runtime_env() == hook  # a driver that connected itself (RAY_ADDRESS)
    submitted = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip", "env_vars": {"PYTHONPATH": "platform"}}}
    monkeypatch.setenv(ray_session._JOB_CONFIG_ENV, json.dumps(submitted))
    assert ray_session.connected_runtime_env() == hook  # infra/runtime_env.yaml names no hook
    submitted["runtime_env"]["worker_process_setup_hook"] = "team.logging.setup"
    monkeypatch.setenv(ray_session._JOB_CONFIG_ENV, json.dumps(submitted))
    assert ray_session.connected_runtime_env() == {}  # the user's own hook stays, and the job starts
    monkeypatch.delenv(ray_session._JOB_CONFIG_ENV)
    monkeypatch.setenv(ray_session.VERBOSE_ENV, "1")
    assert ray_session.connected_runtime_env() == {}  # --verbose: Ray's own lines from every worker
