"""The model registry on a local folder and on SeaweedFS: versions, the best pointer, races, the loader."""

from __future__ import annotations

import json
import pickle
import threading

import pytest

from tsdn_platform import store
from tsdn_platform.cli import main as cli_main
from tsdn_platform.registry import (
    METRICS_FILE,
    ModelRef,
    PointerConflictError,
    Registry,
    RegistryError,
    UnknownProductError,
    UnknownVersionError,
    metric_value,
    new_version_id,
    validate_name,
)

FILES = {"model.safetensors": b"weights", "model.json": b'{"config": {}}'}


def _metrics(image_auroc: float, run: str = "run-a") -> dict:
    return {
        "run_id": run,
        "test": {"image_auroc": image_auroc, "pixel_auroc": 0.5},
        "val": {"val_image_auroc": image_auroc, "val_pixel_auroc": 0.6},
    }


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def registry(request: pytest.FixtureRequest, tmp_path) -> Registry:
    if request.param == "local":
        return Registry(str(tmp_path / "store"))
    return Registry(request.getfixturevalue("s3").uri("registry"))


def test_register_writes_a_complete_version_and_the_first_becomes_best(registry):
    version = registry.register("bottle", FILES, _metrics(0.8), version="v1")
    assert version == "v1"
    assert registry.list_versions("bottle") == ["v1"]
    assert registry.list_products() == ["bottle"]
    record = registry.metrics("bottle", "v1")
    assert record["test"]["image_auroc"] == 0.8
    assert record["run_id"] == "run-a"
    assert record["product"] == "bottle" and record["version"] == "v1" and record["created_at"]
    assert set(record["files"]) == set(FILES)
    best = registry.best("bottle")
    assert best["version"] == "v1" and best["generation"] == 1 and best["value"] == 0.8
    files, ref = registry.load_files("bottle")
    assert files == FILES
    assert ref == ModelRef("bottle", "v1", record, registry.version_uri("bottle", "v1"))


def test_promotion_policies(registry):
    registry.register("cable", FILES, _metrics(0.8), version="v1")
    registry.register("cable", FILES, _metrics(0.7), version="v2")  # worse: stays
    assert registry.best("cable")["version"] == "v1"
    registry.register("cable", FILES, _metrics(0.8), version="v3")  # equal is not better
    assert registry.best("cable")["version"] == "v1"
    registry.register("cable", FILES, _metrics(0.9), version="v4")
    best = registry.best("cable")
    assert (best["version"], best["generation"], best["previous"]) == ("v4", 2, "v1")
    registry.register("cable", FILES, _metrics(0.1), promote="always", version="v5")
    assert registry.best("cable")["version"] == "v5"
    registry.register("cable", FILES, _metrics(0.99), promote="never", version="v6")
    assert registry.best("cable")["version"] == "v5"
    assert registry.list_versions("cable") == ["v1", "v2", "v3", "v4", "v5", "v6"]
    pointer = registry.promote("cable", "v2", reason="rollback by a human")
    assert (pointer["version"], pointer["generation"], pointer["reason"]) == ("v2", 4, "rollback by a human")
    assert registry.best("cable") == pointer
    # The best version again: nothing changes (it wrote generation 5 with previous "v2", losing "v5").
    assert registry.promote("cable", "v2") == pointer == registry.best("cable")
    # A strict promoter's stale or future generation is named as such.
    with pytest.raises(PointerConflictError, match=r"expected generation 3, found 4 \(another promoter won\)"):
        registry.promote("cable", "v1", expected_generation=3)
    with pytest.raises(PointerConflictError, match=r"expected generation 7, found 4 \(no such generation yet\)"):
        registry.promote("cable", "v1", expected_generation=7)
    with pytest.raises(RegistryError, match="already exists"):
        registry.register("cable", FILES, _metrics(0.5), version="v1")


def test_products_are_independent(registry):
    registry.register("a", FILES, _metrics(0.5), version="v1")
    registry.register("b", FILES, _metrics(0.9), version="v1")
    registry.register("b", FILES, _metrics(0.95), version="v2")
    assert registry.best("a")["version"] == "v1"
    assert registry.best("b")["version"] == "v2"
    assert registry.list_products() == ["a", "b"]


def test_a_half_written_version_is_never_listed_or_pointed_at(registry):
    registry.register("grid", FILES, _metrics(0.5), version="v1")
    half = registry.version_uri("grid", "v2")
    for name, data in FILES.items():
        store.write_bytes(store.join(half, name), data)
    assert registry.list_versions("grid") == ["v1"]
    with pytest.raises(UnknownVersionError, match="v2"):
        registry.promote("grid", "v2")
    assert registry.best("grid")["version"] == "v1"


def test_unknown_and_invalid_names(registry):
    with pytest.raises(UnknownProductError, match="nothing"):
        registry.load_files("nothing")
    assert registry.best("nothing") is None
    registry.register("screw", FILES, _metrics(0.5), promote="never", version="v1")
    with pytest.raises(UnknownProductError, match="no best version"):
        registry.resolve_version("screw")
    with pytest.raises(UnknownVersionError):
        registry.load_files("screw", "v9")
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 65, "a..b"):
        with pytest.raises(ValueError, match="expected 1-64"):
            registry.register(bad, FILES, _metrics(0.5))
    with pytest.raises(ValueError, match=r"missing model\.json"):
        registry.register("screw", {"model.safetensors": b""}, _metrics(0.5))


def test_a_corrupt_file_is_detected_on_load(registry):
    registry.register("tile", FILES, _metrics(0.5), version="v1")
    store.write_bytes(store.join(registry.version_uri("tile", "v1"), "model.safetensors"), b"tampered")
    with pytest.raises(RegistryError, match="sha256"):
        registry.load_files("tile")


def test_model_json_reads_and_checks_only_the_metadata(registry):
    registry.register("wood", FILES, _metrics(0.5), version="v1")
    store.write_bytes(store.join(registry.version_uri("wood", "v1"), "model.safetensors"), b"tampered")
    meta, ref = registry.model_json("wood")  # the weights are not read, so their damage is not seen here
    assert meta == {"config": {}} and ref.version == "v1"
    store.write_bytes(store.join(registry.version_uri("wood", "v1"), "model.json"), b"{}")
    with pytest.raises(RegistryError, match=r"model\.json: sha256"):
        registry.model_json("wood", "v1")
    with pytest.raises(UnknownProductError):
        registry.model_json("nothing")


def _race(n: int, target) -> list:
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_racing_strict_promoters_exactly_one_wins_per_generation(registry):
    n = 6
    for i in range(n):
        registry.register("wood", FILES, _metrics(0.5), promote="never", version=f"v{i}")
    registry.promote("wood", "v0")
    for generation in (1, 2):
        results = _race(n, lambda i, g=generation: registry.promote("wood", f"v{i}", expected_generation=g))
        winners = [r for r in results if isinstance(r, dict)]
        losers = [r for r in results if isinstance(r, PointerConflictError)]
        assert len(winners) == 1 and len(losers) == n - 1, results
        best = registry.best("wood")
        assert best == winners[0] and best["generation"] == generation + 1


def test_racing_promoters_without_expectation_lose_no_update(registry):
    n = 6
    for i in range(n):
        registry.register("zipper", FILES, _metrics(0.5), promote="never", version=f"v{i}")
    results = _race(n, lambda i: registry.promote("zipper", f"v{i}"))
    assert all(isinstance(r, dict) for r in results), results
    assert sorted(r["generation"] for r in results) == list(range(1, n + 1))
    best = registry.best("zipper")
    assert best["generation"] == n
    # The pointer chain names every promotion once: each update was applied on top of the previous one.
    by_generation = {r["generation"]: r for r in results}
    for generation in range(2, n + 1):
        assert by_generation[generation]["previous"] == by_generation[generation - 1]["version"]


@pytest.mark.integration
def test_seaweedfs_enforces_conditional_writes(s3):
    uri = s3.uri("probe")
    bucket, key = store.s3_bucket_key(store.join(uri, "registry", "p", "best.json"))
    assert store.conditional_writes_supported(bucket, key, store.boto3_client()) is True
    assert store.list_files(uri) == []  # the probe object is cleaned up


def test_local_lock_is_not_left_behind(tmp_path):
    registry = Registry(str(tmp_path))
    registry.register("pill", FILES, _metrics(0.5), version="v1")
    folder = tmp_path / "registry" / "pill"
    assert sorted(p.name for p in folder.iterdir()) == ["best.json", "versions"]
    assert json.loads((folder / "best.json").read_text())["version"] == "v1"
    assert (folder / "versions" / "v1" / METRICS_FILE).exists()


def test_errors_pickle_and_helpers():
    for exc in (
        UnknownProductError("s3://b/p", "bottle"),
        UnknownVersionError("s3://b/p", "bottle", "v1"),
        PointerConflictError("s3://b/p/best.json", "lost"),
        RegistryError("plain"),
    ):
        clone = pickle.loads(pickle.dumps(exc))
        assert type(clone) is type(exc) and str(clone) == str(exc)
    assert metric_value({"test": {"image_auroc": 0.9}}, "test.image_auroc") == 0.9
    assert metric_value({"test": {}}, "test.image_auroc") is None
    version = new_version_id("run-x")
    assert validate_name(version, "version") == version and len(version) == len("20261129T051200Z-") + 8


def test_models_cli_list_show_promote(tmp_path, capsys):
    root = str(tmp_path)
    registry = Registry(root)
    registry.register("nut", FILES, _metrics(0.9), version="v1")
    registry.register("nut", FILES, {**_metrics(0.7), "family": "patchcore"}, version="v2")
    assert cli_main(["models", "list", "--store", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["*", "nut"], ["nut", "v2"]]
    # the family of each version; versions recorded before the second family are TSDN
    assert "family=tsdn" in lines[0] and "family=patchcore" in lines[1]
    assert cli_main(["models", "promote", "nut", "v2", "--store", root, "--reason", "operator"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v2"
    assert cli_main(["models", "show", "nut", "--store", root]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["best"]["reason"] == "operator" and shown["metrics"]["version"] == "v2"
    assert cli_main(["models", "show", "bolt", "--store", root]) == 2
    assert "bolt" in capsys.readouterr().err
