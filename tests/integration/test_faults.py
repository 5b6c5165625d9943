"""Store outages during real jobs: a private SeaweedFS, stopped by its PID and restarted on the same ports and data.

Each case runs the ``tsdn`` CLI in a subprocess (its own local Ray cluster, pointed at the private server) and
stops the server at a chosen point of the job (``_fault_job.py`` pauses the job there): before the first read,
when the map stage starts, or when the commit starts. An outage shorter than ``store_retry_s`` must be bridged
(exit 0, complete output); a longer one must fail the job (exit 3, one line naming the store failure) and leave
what was committed before byte-identical. docs/FAULTS.md is the matrix these tests check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from _seaweed import BUCKET, Weed, aws_env, pointed_at, start_weed

from tsdn.checkpoint import checkpoint_files
from tsdn.config import TSDNConfig
from tsdn.model import TSDN
from tsdn.scoring import fit_calibration
from tsdn_platform import store
from tsdn_platform.demo_data import make_demo_dataset
from tsdn_platform.registry import Registry
from tsdn_platform.shards import IngestError, read_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("_fault_job.py")
SIZE = 64
PRODUCTS = ("brick", "grass")
# Hang guards only; nothing asserts on them.
JOB_TIMEOUT_S = 400.0
PAUSE_TIMEOUT_S = 240.0
# A short budget for outages that must outlast it, a long one for outages it must bridge; the bridged outage
# (OUTAGE_S) is longer than what the AWS SDK's own attempts inside one request wait out (about 7 s here).
SHORT_RETRY_S = 2
LONG_RETRY_S = 90
OUTAGE_S = 12.0
ONE_LINE_UNREACHABLE = "the store is unreachable"


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    """A private server (other tests keep theirs), with this process's store pointed at it for the module."""
    server = start_weed(tmp_path_factory.mktemp("seaweedfs-faults"))
    try:
        with pointed_at(server.endpoint, unset=("RAY_ADDRESS",)):
            yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _server_running(weed: Weed) -> None:
    if weed.proc.poll() is not None:
        weed.start()


def _upload(root: Path, uri: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            store.write_bytes(store.join(uri, str(path.relative_to(root))), path.read_bytes())


def _snapshot(uri: str) -> dict[str, bytes]:
    """Every object under ``uri`` except staging areas, by relative path: what a reader can see."""
    prefix = uri.rstrip("/") + "/"
    out = {}
    for file in store.list_files(uri):
        relative = file[len(prefix) :]
        if not any(part.startswith("_staging") for part in relative.split("/")):
            out[relative] = store.read_bytes(file)
    return out


def _same_dataset(snapshot: dict[str, bytes]) -> dict[str, object]:
    """What two fault-free runs over one source agree on: all but the report's timings and the config file
    (which names the store)."""
    out: dict[str, object] = {}
    for name, data in snapshot.items():
        if name.endswith("ingest_report.json"):
            out[name] = {k: v for k, v in json.loads(data).items() if k != "timing"}
        elif not name.endswith("ingest_config.yaml"):
            out[name] = data
    return out


def _copy_tree(src: str, dst: str) -> None:
    prefix = src.rstrip("/") + "/"
    for file in store.list_files(src):
        store.copy(file, store.join(dst, file[len(prefix) :]))


class _Job:
    """One CLI run in a subprocess, optionally paused at ``pause_at`` until :meth:`resume`."""

    def __init__(self, weed: Weed, tmp: Path, argv: list[str], pause_at: str = "-") -> None:
        self.signals = tmp / f"signals-{time.monotonic_ns()}"
        self.signals.mkdir()
        env = {**os.environ, **aws_env(weed.endpoint), "OMP_NUM_THREADS": "1"}
        env.pop("RAY_ADDRESS", None)
        command = [sys.executable, str(JOB), pause_at, str(self.signals), *argv]
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def wait_paused(self) -> None:
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while not (self.signals / "paused").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                _, err = self.proc.communicate()
                pytest.fail(f"the job never reached its pause point (rc={self.proc.returncode}):\n{err[-4000:]}")
            time.sleep(0.05)

    def resume(self) -> None:
        (self.signals / "resume").touch()

    def finish(self) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"the job hung:\n{err[-4000:]}")
        return self.proc.returncode, out, err


def _last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("tsdn ")]
    return lines[-1] if lines else err[-2000:]


def _run_through_outage(
    weed: Weed, tmp: Path, argv: list[str], pause_at: str = "-", outage_s: float | None = None
) -> tuple[int, str, str]:
    """Run the CLI with the store down from ``pause_at`` on (``-``: from before the job starts).

    ``outage_s=None``: the store stays down until the job has finished (an outage outlasting any budget), then
    comes back; otherwise it comes back after ``outage_s`` while the job still runs (an outage to bridge).
    Returns the job's exit status, stdout and stderr.
    """
    if pause_at == "-":
        weed.stop()
        job = _Job(weed, tmp, argv)
    else:
        job = _Job(weed, tmp, argv, pause_at)
        job.wait_paused()
        weed.stop()
        job.resume()
    if outage_s is not None:
        time.sleep(outage_s)
        weed.start()
        return job.finish()
    try:
        return job.finish()
    finally:
        weed.start()


def _assert_store_failure(rc: int, err: str, retry_s: float | None = None) -> None:
    """Exit 3 and one last line naming the unreachable store (and, given ``retry_s``, the budget it outlasted)."""
    assert rc == 3, err[-4000:]
    assert ONE_LINE_UNREACHABLE in _last_line(err)
    if retry_s is not None:
        assert f"after {retry_s:g} s of retries" in _last_line(err)


# --- ingest ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(weed: Weed, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("fault-src") / "mvtec"
    make_demo_dataset(root, seed=1, image_size=SIZE, n_train=4, n_test_good=1, n_defects_per_type=1, products=PRODUCTS)
    uri = f"s3://{BUCKET}/faults-src"
    _upload(root, uri)
    return uri


def _ingest_argv(source: str, store_uri: str, retry_s: float) -> list[str]:
    return [
        *("ingest", source, "--store", store_uri, "--dataset", "demo", "--image-size", str(SIZE)),
        *("--set", "n_segments=40", "--set", "rows_per_file=2", "--set", f"store_retry_s={retry_s}"),
    ]


@pytest.fixture(scope="module")
def ingested(weed: Weed, source: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A complete dataset committed without faults: every case starts from a copy of it."""
    job = _Job(weed, tmp_path_factory.mktemp("ingest-ref"), _ingest_argv(source, f"s3://{BUCKET}/faults-ref", 5))
    rc, _, err = job.finish()
    assert rc == 0, err[-4000:]
    return _snapshot(f"s3://{BUCKET}/faults-ref")


def _fresh_store(name: str) -> str:
    uri = f"s3://{BUCKET}/{name}-{time.monotonic_ns()}"
    _copy_tree(f"s3://{BUCKET}/faults-ref", uri)
    return uri


def test_ingest_outage_before_the_first_read_fails_and_keeps_the_dataset(weed, source, ingested, tmp_path):
    store_uri = _fresh_store("ingest-down-at-start")
    rc, _, err = _run_through_outage(weed, tmp_path, _ingest_argv(source, store_uri, SHORT_RETRY_S))
    _assert_store_failure(rc, err, SHORT_RETRY_S)
    assert "Traceback" not in err
    assert _snapshot(store_uri) == ingested


def test_ingest_outage_outlasting_the_budget_in_the_map_fails_and_keeps_the_dataset(weed, source, ingested, tmp_path):
    """issue 15 item 1: this outage used to commit a shrunken dataset ("11 skipped") with exit 0."""
    store_uri = _fresh_store("ingest-down-in-map")
    argv = _ingest_argv(source, store_uri, SHORT_RETRY_S)
    rc, _, err = _run_through_outage(weed, tmp_path, argv, "ray.data.dataset:Dataset.take_all")
    _assert_store_failure(rc, err)
    assert _snapshot(store_uri) == ingested  # every manifest, shard and report byte-identical


def test_ingest_outage_shorter_than_the_budget_in_the_map_is_bridged(weed, source, ingested, tmp_path):
    store_uri = f"s3://{BUCKET}/ingest-bridged-{time.monotonic_ns()}"
    argv = _ingest_argv(source, store_uri, LONG_RETRY_S)
    rc, _, err = _run_through_outage(weed, tmp_path, argv, "ray.data.dataset:Dataset.take_all", OUTAGE_S)
    assert rc == 0, err[-4000:]
    assert _same_dataset(_snapshot(store_uri)) == _same_dataset(ingested)  # same shards, manifests, skips


@pytest.mark.parametrize(
    "pause_at", ["tsdn_platform.ingest:_commit", "tsdn_platform.store:move"], ids=["commit-start", "mid-swap"]
)
def test_ingest_outage_during_the_commit_never_leaves_a_mix(weed, source, ingested, tmp_path, pause_at):
    store_uri = _fresh_store("ingest-down-in-commit")
    rc, _, err = _run_through_outage(weed, tmp_path, _ingest_argv(source, store_uri, SHORT_RETRY_S), pause_at)
    _assert_store_failure(rc, err)
    after = _snapshot(store_uri)
    first = PRODUCTS[0]
    if pause_at.endswith(":_commit"):  # the first step (removing the old manifest) failed: nothing changed
        assert after == ingested
    else:  # the old manifest and shards were gone when the outage began: the product reads as "not ingested"
        assert f"datasets/demo/{first}/manifest.json" not in after
        with pytest.raises(IngestError, match="is not ingested"):
            read_manifest(store_uri, "demo", first)
        for name, data in ingested.items():
            if not name.startswith(f"datasets/demo/{first}/"):
                assert after.get(name) == data, name  # the other product and the index are untouched
    rc, _, err = _Job(weed, tmp_path, _ingest_argv(source, store_uri, SHORT_RETRY_S)).finish()
    assert rc == 0, err[-4000:]  # the next run repairs it
    assert _same_dataset(_snapshot(store_uri)) == _same_dataset(ingested)


# --- score ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored(weed: Weed, source: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A registered tiny model for the first product and a committed score output of its test images."""
    product = PRODUCTS[0]
    registry_store = f"s3://{BUCKET}/faults-models"
    torch.manual_seed(0)
    model = TSDN(TSDNConfig(backbone="test_efficientnet", weights="none", image_size=SIZE))
    files = checkpoint_files(model, fit_calibration(np.array([0.05, 0.1, 0.15])))
    Registry(registry_store).register(product, files, {"test": {"image_auroc": 0.5}}, promote="always", version="v1")
    output = f"s3://{BUCKET}/faults-scores"
    argv = _score_argv(registry_store, store.join(source, product, "test"), output, 5)
    rc, _, err = _Job(weed, tmp_path_factory.mktemp("score-ref"), argv).finish()
    assert rc == 0, err[-4000:]
    return {"store": registry_store, "input": store.join(source, product, "test"), "output": output}


def _score_argv(store_uri: str, input_uri: str, output: str, retry_s: float) -> list[str]:
    return [
        *("score", "--store", store_uri, "--input", input_uri, "--output", output, "--product", PRODUCTS[0]),
        *("--set", "batch_size=2", "--set", "min_rows_per_file=1", "--set", f"store_retry_s={retry_s}"),
    ]


def _committed(output: str) -> dict[str, bytes]:
    """The manifest and every file it lists: the committed output a reader trusts."""
    manifest = store.join(output, "_manifest.json")
    listed = [f for entry in store.read_json(manifest)["products"].values() for f in entry["files"]]
    return {"_manifest.json": store.read_bytes(manifest)} | {f: store.read_bytes(store.join(output, f)) for f in listed}


def _fresh_output(scored: dict[str, str], name: str) -> tuple[str, dict[str, bytes]]:
    output = f"s3://{BUCKET}/{name}-{time.monotonic_ns()}"
    _copy_tree(scored["output"], output)
    return output, _committed(output)


@pytest.mark.parametrize(
    "pause_at",
    ["-", "ray.data.dataset:Dataset.write_datasink", "tsdn_platform.score:_move_into_place"],
    ids=["before-the-first-read", "in-the-map", "in-the-commit"],
)
def test_score_outage_outlasting_the_budget_fails_and_keeps_the_previous_output(weed, scored, tmp_path, pause_at):
    """issue 15 item 2: this outage used to commit an all-error output over the good one, exit 0."""
    output, before = _fresh_output(scored, "score-down")
    argv = _score_argv(scored["store"], scored["input"], output, SHORT_RETRY_S)
    rc, _, err = _run_through_outage(weed, tmp_path, argv, pause_at)  # "-": down before the first read
    _assert_store_failure(rc, err)
    assert _committed(output) == before
    rows = store.read_json(store.join(output, "_manifest.json"))
    assert rows["errors"] == 0 and rows["rows_written"] > 0


def test_score_outage_shorter_than_the_budget_is_bridged(weed, scored, tmp_path):
    output, _ = _fresh_output(scored, "score-bridged")
    argv = _score_argv(scored["store"], scored["input"], output, LONG_RETRY_S)
    rc, _, err = _run_through_outage(weed, tmp_path, argv, "ray.data.dataset:Dataset.write_datasink", OUTAGE_S)
    assert rc == 0, err[-4000:]
    manifest = store.read_json(store.join(output, "_manifest.json"))
    previous = store.read_json(store.join(scored["output"], "_manifest.json"))
    assert manifest["attempt"] != previous["attempt"]  # a new commit, as complete as the fault-free one
    assert (manifest["rows_written"], manifest["errors"]) == (previous["rows_written"], 0)
    assert set(_snapshot(output)) == {"_manifest.json", *_committed(output)}  # the old parts are gone


# --- train ----------------------------------------------------------------------------------------


def _train_argv(store_uri: str, retry_s: float, seed: int) -> list[str]:
    """One tiny TSDN epoch on the first product (3 training images, 1 held out), promoted always; no restarts."""
    return [
        *("train", "--store", store_uri, "--dataset", "demo", "--products", PRODUCTS[0], "--config", "tiny"),
        *("--promote", "always", "--set", "model.n_segments=40", "--set", "num_workers=1"),
        *("--set", "epochs=1", "--set", "holdout_folds=[1]", "--set", "max_failures=0"),
        *("--set", f"seed={seed}", "--set", f"store_retry_s={retry_s}"),
    ]


@pytest.fixture(scope="module")
def trained(weed: Weed, ingested: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store with the ingested dataset, one finished run and its version registered as best."""
    store_uri = _fresh_store("train-ref")
    rc, _, err = _Job(weed, tmp_path_factory.mktemp("train-ref"), _train_argv(store_uri, 5, seed=0)).finish()
    assert rc == 0, err[-4000:]
    return store_uri


def _copy_store(src: str, name: str) -> tuple[str, dict[str, bytes]]:
    uri = f"s3://{BUCKET}/{name}-{time.monotonic_ns()}"
    _copy_tree(src, uri)
    return uri, _snapshot(uri)


def _pointer(store_uri: str) -> dict[str, object]:
    return store.read_json(Registry(store_uri).pointer_uri(PRODUCTS[0]))


def test_train_outage_during_a_checkpoint_upload_fails_and_keeps_registry_and_runs(weed, trained, tmp_path):
    """Rank 0 uploads the checkpoint through the store: the outage outlasts ``store_retry_s`` in the Train worker."""
    store_uri, before = _copy_store(trained, "train-down-in-upload")
    argv = _train_argv(store_uri, SHORT_RETRY_S, seed=1)
    rc, _, err = _run_through_outage(weed, tmp_path, argv, "workers:tsdn_platform.train_checkpoints:upload")
    _assert_store_failure(rc, err, SHORT_RETRY_S)
    after = _snapshot(store_uri)
    assert {name: after.get(name) for name in before} == before  # registry, pointer and the old run: the same bytes
    new = sorted(set(after) - set(before))
    old_runs = {name.split("/")[2] for name in before if name.startswith("runs/")}
    assert new and all(name.startswith(f"runs/{PRODUCTS[0]}/") for name in new)  # only the new run's own folder
    assert not {name.split("/")[2] for name in new} & old_runs


@pytest.mark.parametrize(
    "pause_at",
    ["workers:tsdn_platform.registry:Registry.register", "workers:tsdn_platform.registry:Registry._swap_pointer"],
    ids=["before-the-version", "before-the-pointer"],
)
def test_train_outage_while_registering_keeps_the_pointer(weed, trained, tmp_path, pause_at):
    """Down when registration starts: the registry is byte-identical. Down after the version was written, before
    the pointer update: old versions and the pointer are byte-identical, the new version is complete, and the
    next run of the same command (it resumes the finished run) applies the promotion policy to it."""
    store_uri, before = _copy_store(trained, "train-down-in-register")
    registry = Registry(store_uri)
    versions = registry.list_versions(PRODUCTS[0])
    argv = _train_argv(store_uri, SHORT_RETRY_S, seed=2)
    rc, _, err = _run_through_outage(weed, tmp_path, argv, pause_at)
    _assert_store_failure(rc, err)
    after = _snapshot(store_uri)
    registry_before = {name: data for name, data in before.items() if name.startswith("registry/")}
    assert {name: after.get(name) for name in registry_before} == registry_before  # old versions, pointer
    if pause_at.endswith(".register"):  # nothing of the new version was written
        assert {name: data for name, data in after.items() if name.startswith("registry/")} == registry_before
        return
    (version,) = registry.list_versions(PRODUCTS[0])[len(versions) :]  # complete: its files match metrics.json
    files, ref = registry.load_files(PRODUCTS[0], version)
    assert ref.version == version and set(files) == {"model.safetensors", "model.json"}
    rc, _, err = _Job(weed, tmp_path, argv).finish()  # the next run (the same run: it resumes) repairs it
    assert rc == 0, err[-4000:]
    assert registry.list_versions(PRODUCTS[0])[len(versions) :] == [version]  # registered once, not twice
    pointer = _pointer(store_uri)
    assert pointer["version"] == version and pointer["previous"] == versions[-1]
    assert pointer["generation"] == json.loads(registry_before[f"registry/{PRODUCTS[0]}/best.json"])["generation"] + 1


# --- registry promotion (`tsdn models promote`) ---------------------------------------------------


@pytest.fixture(scope="module")
def registered(weed: Weed) -> str:
    """A registry with two versions of the first product: ``v1`` best, ``v2`` registered but not promoted."""
    store_uri = f"s3://{BUCKET}/faults-promote"
    registry = Registry(store_uri)
    torch.manual_seed(0)
    model = TSDN(TSDNConfig(backbone="test_efficientnet", weights="none", image_size=SIZE))
    files = checkpoint_files(model, fit_calibration(np.array([0.05, 0.1, 0.15])))
    registry.register(PRODUCTS[0], files, {"val": {"val_image_auroc": 0.6}}, promote="always", version="v1")
    registry.register(PRODUCTS[0], files, {"val": {"val_image_auroc": 0.7}}, promote="never", version="v2")
    return store_uri


def _promote_argv(store_uri: str, retry_s: float) -> list[str]:
    return ["models", "promote", PRODUCTS[0], "v2", "--store", store_uri, "--store-retry-s", str(retry_s)]


@pytest.mark.parametrize(
    "pause_at", ["-", "tsdn_platform.registry:Registry._write_pointer"], ids=["before-the-command", "before-the-write"]
)
def test_promotion_outage_outlasting_the_budget_fails_and_keeps_the_pointer(weed, registered, tmp_path, pause_at):
    store_uri, before = _copy_store(registered, "promote-down")
    # before-the-write: the pointer was read and the version checked; the conditional write meets the outage.
    rc, _, err = _run_through_outage(weed, tmp_path, _promote_argv(store_uri, SHORT_RETRY_S), pause_at)
    _assert_store_failure(rc, err, SHORT_RETRY_S)
    assert _snapshot(store_uri) == before
    assert _pointer(store_uri)["version"] == "v1"


def test_promotion_outage_shorter_than_the_budget_is_bridged(weed, registered, tmp_path):
    store_uri, before = _copy_store(registered, "promote-bridged")
    argv = _promote_argv(store_uri, LONG_RETRY_S)
    rc, out, err = _run_through_outage(weed, tmp_path, argv, "tsdn_platform.registry:Registry._write_pointer", OUTAGE_S)
    assert rc == 0, err[-4000:]
    pointer = _pointer(store_uri)
    assert json.loads(out) == pointer
    assert (pointer["version"], pointer["previous"], pointer["generation"]) == ("v2", "v1", 2)
    changed = {name for name, data in _snapshot(store_uri).items() if before.get(name) != data}
    assert changed == {f"registry/{PRODUCTS[0]}/best.json"}  # the one object a promotion writes
