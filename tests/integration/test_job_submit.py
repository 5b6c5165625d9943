"""``ray job submit --working-dir .`` for real: a local head with token auth, jobs against SeaweedFS S3.

The head runs from this venv (its raylet's ``PATH`` decides which ``python`` a job entrypoint gets) without
any AWS setting: the S3 settings reach the jobs only through the runtime env built from
``infra/runtime_env.yaml``, as they would on a cluster. The head is stopped by the PID of the
``ray start --block`` process this module started (SIGTERM makes it stop every process it spawned).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from _ports import free_ports

from tsdn_platform import store
from tsdn_platform.config import preset_path
from tsdn_platform.registry import METRICS_FILE, MODEL_FILES, Registry

# The module's jobs run one after another on a shared 2-core machine: a generous hang guard for the whole chain.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
START_ATTEMPTS = 3
# Hang guards only (a wedged head or job fails the test instead of blocking the suite); nothing asserts on time.
HEAD_READY_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = 1200.0
STOP_TIMEOUT_S = 60.0
TRAIN_PRESET = "tiny"  # timm test_efficientnet, 64 px: seconds per epoch on CPU
_HEAD_PORTS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)

# Run as `python -c PROBE <uri>` inside a submitted job: where the driver and a Ray task import tsdn_platform
# from, written to S3 through the store (so the job's S3 settings are exercised too).
PROBE = """
import os, platform, sys
import ray
from tsdn_platform import store

def origin():
    import platform, tsdn_platform
    return {"cwd": os.getcwd(), "tsdn_platform": tsdn_platform.__file__, "system": platform.system()}

ray.init()
store.write_json(sys.argv[1], {"driver": origin(), "task": ray.get(ray.remote(origin).remote())})
"""


@dataclass(frozen=True)
class Head:
    """A running local head: ``address`` is its Jobs API, ``client_env`` what a Ray CLI client needs."""

    address: str
    token: str
    client_env: dict[str, str]

    def api(self, path: str) -> Any:
        request = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def submit(self, submission_id: str, runtime_env: Path, *entrypoint: str) -> subprocess.CompletedProcess[str]:
        """``ray job submit`` from the repo root, as CI runs it; waits for the job and returns the CLI's result."""
        command = [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--address",
            self.address,
            "--submission-id",
            submission_id,
            "--working-dir",
            ".",
            "--runtime-env",
            str(runtime_env),
            "--log-style",
            "record",
            "--",
            *entrypoint,
        ]
        try:
            return subprocess.run(
                command, cwd=ROOT, env=self.client_env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as exc:
            status = self.api(f"/api/jobs/{submission_id}")["status"]
            logs = self.api(f"/api/jobs/{submission_id}/logs")["logs"]
            msg = f"job {submission_id}: still {status} after {JOB_TIMEOUT_S:.0f} s; its logs:\n{logs[-8000:]}"
            raise AssertionError(msg) from exc


def _base_env(token_path: Path) -> dict[str, str]:
    """This environment without Ray, AWS or PYTHONPATH settings, plus token auth and the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_")) and k != "PYTHONPATH"}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # The head was started in its own session: its process group is exactly what this module started.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)


def _ready(proc: subprocess.Popen[bytes], log_path: Path, head: Head) -> bool:
    deadline = time.monotonic() + HEAD_READY_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        if "Ray runtime started" in log_path.read_text(errors="replace"):
            try:
                return head.api("/api/version")["ray_version"] is not None
            except (OSError, urllib.error.URLError, ValueError):
                pass
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    workdir = tmp_path_factory.mktemp("ray_head")
    token = secrets.token_hex(32)
    token_path = workdir / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    env = _base_env(token_path)
    # `ray start --node-ip-address=127.0.0.1` alone still advertises (and binds the GCS to) the machine's other
    # interface: Ray 2.60 "resolves" loopback to a routable IP unless told this is a single-machine cluster.
    head_env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    failures = []
    for attempt in range(START_ATTEMPTS):
        ports = dict(zip(_HEAD_PORTS, free_ports(len(_HEAD_PORTS))))
        # Short on purpose: Ray puts Unix sockets under it and socket paths are limited to 107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="tsdn-rj-")
        log_path = workdir / f"head{attempt}.log"
        command = [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=4",
            "--num-gpus=0",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=head_env, cwd=workdir, start_new_session=True
            )
        head = Head(address=f"http://127.0.0.1:{ports['--dashboard-port']}", token=token, client_env=env)
        if _ready(proc, log_path, head):
            try:
                yield head
            finally:
                _stop(proc)
                shutil.rmtree(temp_dir, ignore_errors=True)
            return
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
        failures.append(f"attempt {attempt}: exit {proc.poll()}\n{log_path.read_text(errors='replace')[-3000:]}")
    msg = "local Ray head did not start:\n" + "\n".join(failures)
    raise RuntimeError(msg)


@pytest.fixture(scope="module")
def runtime_env(s3, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """infra/runtime_env.yaml plus the S3 settings, the way infra/README.md tells users on a non-AWS S3."""
    spec = yaml.safe_load((ROOT / "infra" / "runtime_env.yaml").read_text())
    spec["env_vars"] = {**spec.get("env_vars", {}), **s3.env}
    path = tmp_path_factory.mktemp("runtime_env") / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _assert_succeeded(head: Head, submission_id: str, result: subprocess.CompletedProcess[str]) -> None:
    output = f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, output
    assert head.api(f"/api/jobs/{submission_id}")["status"] == "SUCCEEDED", output


def test_submitted_job_runs_the_uploaded_checkout_with_token_auth(ray_head, runtime_env, s3):
    out_uri = store.join(s3.uri("job-probe"), "origin.json")
    result = ray_head.submit("tsdn-probe", runtime_env, "python", "-c", PROBE, out_uri)
    _assert_succeeded(ray_head, "tsdn-probe", result)
    report = store.read_json(out_uri)
    for where in ("driver", "task"):
        seen = report[where]
        # The job and its workers import tsdn_platform from the uploaded working_dir's platform/ folder (via
        # PYTHONPATH from infra/runtime_env.yaml), not from this checkout's editable install.
        assert seen["tsdn_platform"] == os.path.join(seen["cwd"], "platform", "tsdn_platform", "__init__.py")
        assert "working_dir_files" in seen["cwd"]
        assert not seen["cwd"].startswith(str(ROOT))
        assert seen["system"] == "Linux"  # the standard library's platform module is not shadowed
    # Without the token the Jobs API refuses the same request.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.address}/api/jobs/tsdn-probe", timeout=10)
    assert refused.value.code in (401, 403)


def test_failed_job_fails_ray_job_submit(ray_head, runtime_env):
    result = ray_head.submit("tsdn-failing", runtime_env, "python", "-m", "jobs.ingest", "--config", "no-such-preset")
    assert result.returncode != 0
    assert ray_head.api("/api/jobs/tsdn-failing")["status"] == "FAILED"
    # It failed for the reason given, inside the job: the preset lookup ran on the cluster.
    assert "'no-such-preset': no such file, and not a preset" in ray_head.api("/api/jobs/tsdn-failing/logs")["logs"]


@dataclass(frozen=True)
class Ingested:
    store_uri: str
    products: list[str]


@pytest.fixture(scope="module")
def ingested(ray_head, runtime_env, s3, demo_root) -> Ingested:
    """The demo dataset uploaded to S3 and ingested there by a submitted ``jobs.ingest``."""
    source = s3.uri("mvtec-src")
    for path in sorted(p for p in demo_root.rglob("*") if p.is_file()):
        store.copy(str(path), store.join(source, path.relative_to(demo_root).as_posix()))
    store_uri = s3.uri("store")
    # Superpixel maps at the training resolution and segment count of the `tiny` preset the train job uses.
    model = yaml.safe_load(preset_path(TRAIN_PRESET).read_text())["model"]
    result = ray_head.submit(
        "tsdn-ingest",
        runtime_env,
        *("python", "-m", "jobs.ingest", source, "--store", store_uri, "--dataset", "demo"),
        *("--image-size", str(model["image_size"]), "--set", f"n_segments={model['n_segments']}"),
    )
    _assert_succeeded(ray_head, "tsdn-ingest", result)
    return Ingested(store_uri, sorted(p.name for p in demo_root.iterdir() if (p / "train" / "good").is_dir()))


@dataclass(frozen=True)
class Trained:
    product: str
    console: str  # what ``ray job submit`` printed while it followed the job


@pytest.fixture(scope="module")
def trained(ray_head, runtime_env, ingested) -> Trained:
    """One product line trained by a submitted ``jobs.train`` with the :data:`TRAIN_PRESET` config."""
    product = ingested.products[0]
    result = ray_head.submit(
        "tsdn-train",
        runtime_env,
        *("python", "-m", "jobs.train", "--store", ingested.store_uri, "--dataset", "demo"),
        *("--products", product, "--config", TRAIN_PRESET, "--promote", "always"),
    )
    _assert_succeeded(ray_head, "tsdn-train", result)
    return Trained(product, result.stdout)


def test_ingest_job_writes_shards_to_s3(ingested, demo_root):
    for product in ingested.products:
        manifest = store.read_json(store.join(ingested.store_uri, "datasets", "demo", product, "manifest.json"))
        expected = {
            split: sum(1 for p in (demo_root / product / split).rglob("*") if p.is_file())
            for split in ("train", "test")
        }
        assert manifest["n_rows"] == expected
        for split in ("train", "test"):
            split_uri = store.join(ingested.store_uri, "datasets", "demo", product, split)
            shards = store.list_files(split_uri, suffixes=[".parquet"])
            assert len(shards) == len(manifest["files"][split]) > 0


def test_train_job_registers_a_best_model(ingested, trained):
    product = trained.product
    registry = Registry(ingested.store_uri)
    (version,) = registry.list_versions(product)
    assert registry.best(product)["version"] == version
    version_uri = registry.version_uri(product, version)
    for name in (*MODEL_FILES, METRICS_FILE):
        assert store.exists(store.join(version_uri, name)), name
    # Only the requested product line was trained.
    assert all(registry.list_versions(p) == [] for p in ingested.products if p != product)


def test_a_submitted_job_shows_the_platform_lines_and_not_ray_narration_from_its_workers(trained):
    """The job's workers get the quiet set-up hook from the driver (``ray_session.connected_runtime_env``): without
    it the same job printed 145 worker lines (Ray Data's plans and progress bars, one "Reporting training result" per
    report and worker)."""
    console = trained.console
    assert f"[{trained.product}] epoch 2/2 loss=" in console  # the platform's per-epoch line, from the Train worker
    assert "promoted" in console  # the driver's results table
    for narration in ("Starting execution of Dataset", "Running Dataset", "Reporting training result"):
        assert narration not in console, narration
    assert "The given NumPy array is not writable" not in console


def test_score_job_writes_parquet_with_the_best_model(ray_head, runtime_env, ingested, trained, demo_root):
    product = trained.product
    best = Registry(ingested.store_uri).best(product)["version"]
    output = store.join(ingested.store_uri, "scores", "job-submit")
    result = ray_head.submit(
        "tsdn-score",
        runtime_env,
        *("python", "-m", "jobs.score", "--store", ingested.store_uri, "--output", output, "--product", product),
        *("--input", store.join(ingested.store_uri, "datasets", "demo", product, "test")),
    )
    _assert_succeeded(ray_head, "tsdn-score", result)
    manifest = store.read_json(store.join(output, "_manifest.json"))
    fs, _ = store.resolve(output)
    parts = store.list_files(store.join(output, product), suffixes=[".parquet"])
    table = pa.concat_tables([pq.read_table(store.resolve(part)[1], filesystem=fs) for part in parts])
    n_test = sum(1 for p in (demo_root / product / "test").rglob("*") if p.is_file())
    assert table.num_rows == manifest["rows_written"] == n_test
    assert manifest["errors"] == 0 and manifest["model_versions"] == {product: best}
    rows = table.select(["product", "model_version", "anomaly_score", "threshold", "is_anomalous", "error"]).to_pylist()
    assert {(r["product"], r["model_version"], r["error"]) for r in rows} == {(product, best, None)}
    assert all(r["is_anomalous"] == (r["anomaly_score"] >= r["threshold"]) for r in rows)
    meta, _ = Registry(ingested.store_uri).model_json(product, best)
    side = manifest["config"]["output_map_size"] or int(meta["input_size"][0])  # null: the model's input size
    shape = (side, side)
    assert tuple(manifest["products"][product]["map_shape"]) == shape
    assert set(zip(table["score_map_height"].to_pylist(), table["score_map_width"].to_pylist())) == {shape}
    assert not store.list_files(store.join(output, "_staging"))  # committed: nothing left half-written
