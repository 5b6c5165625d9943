"""``python _multinode.py SCENARIO STORE WORKDIR OUT_JSON [ARG]``: platform jobs on a real multi-node Ray cluster.

Every cluster (``ray.cluster_utils.Cluster``, on 127.0.0.1 only, in Ray's single-host mode as
``tsdn_platform.ray_session`` sets it) has a head and two worker nodes, ``node_a`` and ``node_b`` (custom
resources of those names), of one CPU each; each node has its own raylet and object store. The store is ``STORE``
(the tests' SeaweedFS bucket): nothing is shared between the nodes but S3. Run in its own process because a pytest
process already holds the tests' single-node cluster.

Scenarios:

- ``train``: the head has two CPUs (for the drivers' Ray Data tasks), each worker node one ``trainer`` slot.
  Ingest a tiny demo dataset into the store, train the ``tiny`` preset (two DDP workers asking for a slot each,
  so one on each worker node) with checkpoints on S3, register the model, then score the ingested test split
  with two scorer actors.
- ``train-one-node``: the same training run with both DDP workers on the head (two ``trainer`` slots there).
- ``train-node-loss fresh-node|no-spare-node``: as ``train``, for 8 epochs; ``node_a`` is removed once Ray
  Train has registered a checkpoint. ``fresh-node``: a node with a ``trainer`` slot joins, for the new worker
  group to resume on; ``no-spare-node``: none does, and the run has ``max_start_failures: 1`` and a 15 s
  worker-group start timeout.
- ``score-node-loss fresh-node|no-spare-node``: the head has no CPU, so the two scorer actors (one CPU each) sit
  on the two worker nodes. Commit a first output, then score many small batches into the same output and remove
  ``node_a`` (``Cluster.remove_node``, its raylet and workers killed) once both actors are alive and some parts
  are staged. ``fresh-node``: a fresh one-CPU node joins, where the lost actor can restart; ``no-spare-node``:
  none does, and the lost actor can restart only where the pool frees a CPU.
- ``serve-node-loss PORT``: two model replicas on the two worker nodes behind the ingress and the HTTP proxy on
  the head (127.0.0.1:PORT); a bounded stream of requests runs while the node of the replica that answered more
  of it is removed, then a fresh node joins for the replacement replica.

OUT_JSON receives the results, including the node of every actor that ran (``actors``: from the GCS actor
table, which keeps dead actors too).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Actor classes whose placement the tests check, as the GCS actor table names them.
TRAIN_WORKER = "RayTrainWorker"
MAP_WORKER = "MapWorker("  # Ray Data's actor-pool workers: MapWorker(<operator>), here the scorer actors
SERVE_REPLICA = "ServeReplica:tsdn-multinode:TSDNModel"
SERVE_INGRESS = "ServeReplica:tsdn-multinode:TSDNIngress"
WORKERS = ("node_a", "node_b")
STREAM_AFTER_LOSS_S = 20.0
SCORE_ROWS = 400
TRAIN_EPOCHS = 8
TRAIN_START_TIMEOUT_S = 15  # Ray Train's worker-group start timeout in the no-spare-node case
TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's controller writes it once it registered one


def _cluster(
    head_cpus: int,
    worker_resources: dict[str, float] | None = None,
    workers: tuple[str, ...] = WORKERS,
    head_resources: dict[str, float] | None = None,
):
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only: see tsdn_platform.ray_session
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from tsdn_platform.ray_session import forwarded_env

    ray_constants.ENABLE_RAY_CLUSTER = False
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "resources": head_resources or {},
            "include_dashboard": False,
            "node_ip_address": "127.0.0.1",
        },
    )
    nodes = {name: _add_node(cluster, name, worker_resources) for name in workers}
    ray.init(address=cluster.address, runtime_env={"env_vars": forwarded_env()})
    cluster.wait_for_nodes()
    return cluster, nodes


def _add_node(cluster, name: str, extra: dict[str, float] | None = None):
    return cluster.add_node(num_cpus=1, resources={name: 1.0, **(extra or {})}, node_ip_address="127.0.0.1")


def _node_names(cluster, nodes: dict[str, Any]) -> dict[str, str]:
    """Node id -> name (``head``, ``node_a``, ...)."""
    return {cluster.head_node.node_id: "head", **{node.node_id: name for name, node in nodes.items()}}


def _actors(names: dict[str, str], class_prefix: str) -> list[dict[str, str]]:
    """Every actor of the cluster whose class name starts with ``class_prefix``: its state and node name.

    The GCS actor table (no dashboard needed, unlike ``ray.util.state``) keeps dead actors with their last node.
    """
    import ray

    return [
        {"state": a["State"], "node": names.get(a["Address"]["NodeID"], a["Address"]["NodeID"]), "name": a["Name"]}
        for a in ray._private.state.actors().values()
        if a["ActorClassName"].startswith(class_prefix) and a["Address"]["NodeID"]
    ]


def _train_and_score(store_uri: str, workdir: Path) -> dict[str, Any]:
    import ray

    cluster, nodes = _cluster(head_cpus=2, worker_resources={"trainer": 1.0})
    try:
        result: dict[str, Any] = {
            "trainer_slots": {
                n["NodeID"]: n["Resources"]["trainer"] for n in ray.nodes() if n["Resources"].get("trainer")
            }
        }
        result["train"] = _train(store_uri, workdir)
        result["score"] = _score(store_uri)
        result["actors"] = {"train": _actors(_node_names(cluster, nodes), TRAIN_WORKER)}
        return result
    finally:
        ray.shutdown()
        cluster.shutdown()


def _train_on_one_node(store_uri: str, workdir: Path) -> dict[str, Any]:
    """``train`` with both DDP workers on one node (the head, two ``trainer`` slots) and no score job: the
    reference for the two-node run's losses."""
    import ray

    cluster, _ = _cluster(head_cpus=4, workers=(), head_resources={"trainer": 2.0})
    try:
        return {"train": _train(store_uri, workdir)}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _train(store_uri: str, workdir: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    from tsdn_platform.config import load_config
    from tsdn_platform.demo_data import make_demo_dataset
    from tsdn_platform.ingest import IngestConfig, run_ingest
    from tsdn_platform.train import TrainConfig, run_training

    root = workdir / "mvtec"
    make_demo_dataset(root, seed=0, image_size=64, n_train=12, n_test_good=2, n_defects_per_type=1, products=["brick"])
    run_ingest(IngestConfig(source=str(root), store=store_uri, dataset="demo", image_size=64, n_segments=50))
    explicit = {"store": store_uri, "dataset": "demo", "products": "brick"}
    overrides = ["holdout_folds=[0,1,2,3]", "resources_per_worker={trainer: 1}", *extra]
    cfg = load_config(TrainConfig, "tiny", overrides, explicit=explicit)
    brick = run_training(cfg)["brick"]
    losses = [epoch["loss"] for epoch in brick.history]
    return {"ok": brick.ok, "error": brick.error, "version": brick.version, "losses": losses}


def _score(store_uri: str) -> dict[str, Any]:
    from tsdn_platform import store
    from tsdn_platform.score import ScoreConfig, run_scoring

    output = store.join(store_uri, "scores", "multinode")
    cfg = ScoreConfig(
        store=store_uri,
        input=store.join(store_uri, "datasets", "demo", "brick", "test"),
        output=output,
        product="brick",
        batch_size=2,
        num_actors=(2, 2),
        num_cpus_per_actor=1.0,
    )
    manifest = run_scoring(cfg)
    return {"rows_written": manifest["rows_written"], "errors": manifest["errors"], "output": output}


# --- node loss --------------------------------------------------------------------------------------------------

PRODUCT = "brick"
IMAGE_SIZE = 64


def _register_tiny_model(store_uri: str) -> str:
    """An untrained tiny TSDN registered as the best ``brick`` model (no training run: these scenarios are about
    the jobs that use a model, and a fit costs half a minute here)."""
    from tsdn_platform.registry import Registry
    from tsdn_platform.testing import calibrate, register, tiny_model

    model = tiny_model("tsdn", image_size=IMAGE_SIZE)
    return register(Registry(store_uri), PRODUCT, model, calibrate(model))


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_images(prefix: str, count: int) -> list[str]:
    """``count`` distinct PNGs under ``prefix``; returns their image ids (paths relative to ``prefix``)."""
    from tsdn_platform import store

    ids = [f"img-{i:04d}.png" for i in range(count)]
    for i, image_id in enumerate(ids):
        store.write_bytes(store.join(prefix, image_id), _png(i))
    return ids


def _committed(output: str) -> dict[str, Any]:
    """The committed output: its manifest's attempt and rows, every committed ``image_id``, the part files listed."""
    import pyarrow.parquet as pq

    from tsdn_platform import store
    from tsdn_platform.score import MANIFEST

    manifest = store.read_json(store.join(output, MANIFEST))
    listed = [f for p in manifest["products"].values() for f in p["files"]]
    ids: list[str] = []
    for relative in listed:
        fs, path = store.resolve(store.join(output, relative))
        ids += pq.read_table(path, filesystem=fs, columns=["image_id"])["image_id"].to_pylist()
    parts = sorted(f[len(output) + 1 :] for f in store.list_files(output, recursive=True) if f.endswith(".parquet"))
    return {
        "attempt": manifest["attempt"],
        "rows_written": manifest["rows_written"],
        "errors": manifest["errors"],
        "files": sorted(listed),
        "parts_on_store": [p for p in parts if not p.startswith("_staging/")],
        "image_ids": ids,
    }


def _wait(condition, timeout_s: float, what: str, poll_s: float = 0.2) -> float:
    """Poll ``condition()`` until true; returns the seconds waited. RuntimeError naming ``what`` on timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            msg = f"timed out after {timeout_s:.0f} s waiting for {what}"
            raise RuntimeError(msg)
        time.sleep(poll_s)
    return time.monotonic() - started


def _score_node_loss(store_uri: str, workdir: Path, fresh_node: str) -> dict[str, Any]:
    import ray

    from tsdn_platform import store
    from tsdn_platform.score import ScoreConfig, run_scoring

    # No CPU on the head: the two scorer actors (one CPU each) can only sit on node_a and node_b.
    cluster, nodes = _cluster(head_cpus=0)
    try:
        names = _node_names(cluster, nodes)
        _register_tiny_model(store_uri)
        output = store.join(store_uri, "scores", "node-loss")
        settings = {"store": store_uri, "output": output, "product": PRODUCT, "num_actors": (2, 2)}
        first_ids = _write_images(store.join(store_uri, "first"), 4)
        run_scoring(ScoreConfig(input=store.join(store_uri, "first"), **settings))
        first = _committed(output)

        ids = _write_images(store.join(store_uri, "inputs"), SCORE_ROWS)
        # Small batches and files: many tasks, so that the node goes while most rows are still to be scored.
        cfg = ScoreConfig(input=store.join(store_uri, "inputs"), batch_size=2, min_rows_per_file=8, **settings)
        outcome: dict[str, Any] = {}

        def job() -> None:
            try:
                outcome["rows_written"] = run_scoring(cfg)["rows_written"]
            except Exception as exc:  # the test reads what happened
                outcome["error"] = f"{type(exc).__name__}: {exc}"[:2000]

        def staged_rows() -> int:
            staging = store.join(output, "_staging")
            return 8 * len([f for f in store.list_files(staging, recursive=True) if f.endswith(".parquet")])

        def alive_on_both() -> bool:
            alive = {a["node"] for a in _actors(names, MAP_WORKER) if a["state"] == "ALIVE"}
            return {"node_a", "node_b"} <= alive

        thread = threading.Thread(target=job, daemon=True)
        started = time.monotonic()
        thread.start()
        _wait(
            lambda: not thread.is_alive() or (alive_on_both() and staged_rows() >= 16),
            120,
            "scorer actors on both nodes and 16 rows staged",
        )
        before = {"actors": _actors(names, MAP_WORKER), "staged_rows": staged_rows()}
        removed_at = time.monotonic()
        cluster.remove_node(nodes["node_a"], allow_graceful=False)
        removal = {"at_s": round(removed_at - started, 2), "job_running": thread.is_alive(), **before}
        if fresh_node == "fresh-node":
            nodes["node_c"] = _add_node(cluster, "node_c")
        names = _node_names(cluster, nodes)
        thread.join(timeout=300)
        outcome["finished"] = not thread.is_alive()
        outcome["after_removal_s"] = round(time.monotonic() - removed_at, 2)
        return {
            "inputs": ids,
            "first_inputs": first_ids,
            "first": first,
            "removal": removal,
            "outcome": outcome,
            "committed": _committed(output),
            "actors": _actors(names, MAP_WORKER),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def _train_node_loss(store_uri: str, workdir: Path, fresh_node: str) -> dict[str, Any]:
    import ray

    from tsdn_platform import store

    extra = [f"epochs={TRAIN_EPOCHS}"]
    if fresh_node == "no-spare-node":
        # Read by Ray Train's controller, a process of the cluster this process starts.
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(TRAIN_START_TIMEOUT_S)
        extra.append("max_start_failures=1")
    cluster, nodes = _cluster(head_cpus=2, worker_resources={"trainer": 1.0})
    try:
        names = _node_names(cluster, nodes)
        runs = store.join(store_uri, "runs", "brick")
        outcome: dict[str, Any] = {}

        def job() -> None:
            try:
                outcome.update(_train(store_uri, workdir, tuple(extra)))
            except Exception as exc:  # the test reads what happened
                outcome["raised"] = f"{type(exc).__name__}: {exc}"[:2000]

        def registered() -> list[str]:
            """Checkpoint folders on the store once Ray Train's controller has registered one (its snapshot)."""
            files = [f[len(runs) + 1 :] for f in store.list_files(runs, recursive=True)]
            if not any(f.endswith("/" + TRAIN_SNAPSHOT) for f in files):
                return []
            return sorted({part for f in files for part in f.split("/") if part.startswith("checkpoint_epoch")})

        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        _wait(
            lambda: not thread.is_alive() or (registered() and _alive(names, TRAIN_WORKER) == ["node_a", "node_b"]),
            400,
            "a registered checkpoint with a worker on each node",
        )
        removal = {"checkpoints": registered(), "workers": _alive(names, TRAIN_WORKER), "running": thread.is_alive()}
        removed_at = time.monotonic()
        cluster.remove_node(nodes["node_a"], allow_graceful=False)
        if fresh_node == "fresh-node":
            # A fresh node with a trainer slot, so that Ray Train can place a worker group of two again.
            nodes["node_c"] = _add_node(cluster, "node_c", {"trainer": 1.0})
            names = _node_names(cluster, nodes)
            regrouped = ["node_b", "node_c"]
            _wait(lambda: not thread.is_alive() or _alive(names, TRAIN_WORKER) == regrouped, 400, "a new group")
            outcome["regrouped_after_s"] = round(time.monotonic() - removed_at, 2)
        thread.join(timeout=420)
        outcome["finished"] = not thread.is_alive()
        outcome["after_removal_s"] = round(time.monotonic() - removed_at, 2)
        return {"removal": removal, "outcome": outcome, "actors": {"train": _actors(names, TRAIN_WORKER)}}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _serve_node_loss(store_uri: str, workdir: Path, port: str) -> dict[str, Any]:
    import ray
    from ray import serve

    from tsdn_platform.serve import ServeConfig, build_app

    # The head alone first, without a CPU: the ingress (asking for none) lands there; the worker nodes join once
    # it runs, and the two model replicas (one CPU each) can then only go to node_a and node_b.
    cluster, nodes = _cluster(head_cpus=0, workers=())
    try:
        _register_tiny_model(store_uri)
        cfg = ServeConfig(
            store=store_uri, port=int(port), app_name="tsdn-multinode", num_replicas=2, ingress_num_cpus=0
        )
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": cfg.port})
        deploy = threading.Thread(target=serve.run, args=(build_app(cfg),), kwargs={"name": cfg.app_name})
        deploy.start()
        names = _node_names(cluster, nodes)
        _wait(lambda: _alive(names, SERVE_INGRESS) == ["head"], 120, "the ingress on the head")
        nodes.update({name: _add_node(cluster, name) for name in WORKERS})
        names = _node_names(cluster, nodes)
        deploy.join(timeout=180)
        placed = {"ingress": _alive(names, SERVE_INGRESS), "replicas": _alive(names, SERVE_REPLICA)}

        url = f"http://127.0.0.1:{cfg.port}/v1/products/{PRODUCT}/detect"
        stream = _RequestStream(url, _png(0), clients=2, max_requests=1500, max_s=90.0)
        stream.start()
        # The node goes once a replica answers. Serve's router keeps a multiplexed model's requests on the replica
        # that loaded it while that one keeps up, so the other may have answered none: the busier one's node goes.
        _wait(lambda: max(_served(names).values(), default=0) >= 5, 60, "a replica answering")
        served = _served(names)
        lost = max(served, key=served.get)
        removed_at = time.monotonic()
        cluster.remove_node(nodes.pop(lost), allow_graceful=False)
        time.sleep(STREAM_AFTER_LOSS_S)  # the stream goes on with one replica
        stream.stop()
        served_after = _served(names)
        # A fresh node: the controller's replacement replica (pending so far, no CPU free) starts there.
        fresh = "node_c"
        nodes[fresh] = _add_node(cluster, fresh)
        names = _node_names(cluster, nodes)
        joined = time.monotonic()
        wanted = sorted([*(set(WORKERS) - {lost}), fresh])
        replaced_s = _wait(lambda: _alive(names, SERVE_REPLICA) == wanted, 180, "a replacement replica")
        return {
            "placed": placed,
            "served_before": served,
            "served_after": served_after,
            "lost": lost,
            "requests": stream.summary(removed_at),
            "replacement_s": round(replaced_s, 2),
            "replacement_after_join_s": round(time.monotonic() - joined, 2),
        }
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def _alive(names: dict[str, str], class_prefix: str) -> list[str]:
    return sorted(a["node"] for a in _actors(names, class_prefix) if a["state"] == "ALIVE")


def _served(names: dict[str, str]) -> dict[str, int]:
    """Node name -> requests its model replica answered so far (lines of the replica's Serve log that say OK)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    counts = {}
    for actor in _actors(names, SERVE_REPLICA):
        replica_id = actor["name"].rsplit("#", 1)[-1]
        for log in logs.glob(f"replica_*_TSDNModel_{replica_id}*.log"):
            counts[actor["node"]] = sum(" detect OK " in line for line in log.open(errors="replace"))
    return counts


class _RequestStream:
    """``clients`` threads POSTing one image to ``url`` until ``max_requests`` in all or ``max_s`` seconds; each
    request is recorded as (start, end, HTTP status or the exception's name)."""

    def __init__(self, url: str, body: bytes, clients: int, max_requests: int, max_s: float) -> None:
        self._url, self._body, self._max_requests, self._max_s = url, body, max_requests, max_s
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self.records: list[tuple[float, float, str]] = []

    def start(self) -> None:
        self._started = time.monotonic()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopped.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _client(self) -> None:
        import urllib.error
        import urllib.request

        while not self._stopped.is_set() and time.monotonic() - self._started < self._max_s:
            with self._lock:
                if len(self.records) >= self._max_requests:
                    return
            request = urllib.request.Request(self._url, data=self._body, headers={"Content-Type": "image/png"})
            began = time.monotonic()
            try:
                with urllib.request.urlopen(request, timeout=20) as answer:
                    status = str(answer.status)
            except urllib.error.HTTPError as exc:
                status = str(exc.code)
            except OSError as exc:
                status = type(exc).__name__
            with self._lock:
                self.records.append((began, time.monotonic(), status))

    def summary(self, removed_at: float) -> dict[str, Any]:
        """Counts before and after the removal, the failures, and when the last failed request ended."""
        after = [r for r in self.records if r[1] >= removed_at]
        failed = [r for r in after if r[2] != "200"]
        return {
            "total": len(self.records),
            "before_removal": len(self.records) - len(after),
            "failed_before_removal": sum(r[2] != "200" for r in self.records if r[1] < removed_at),
            "after_removal": len(after),
            "failed": len(failed),
            "failed_statuses": sorted({r[2] for r in failed}),
            "last_failure_s": round(max(r[1] for r in failed) - removed_at, 2) if failed else None,
            "slowest_after_s": round(max(r[1] - r[0] for r in after), 2) if after else None,
            "answered_after_s": round(max(r[1] for r in after) - removed_at, 2) if after else None,
        }


def main() -> None:
    scenario, store_uri, workdir, out, *rest = sys.argv[1:]
    logging.basicConfig(level=logging.INFO)
    os.environ["TSDN_VERBOSE"] = "1"  # Ray Train's INFO lines name each worker's node rank
    # Every worker's line as it was printed: the driver's dedup would merge lines that differ only in numbers
    # (the epoch lines of two worker groups) into "[repeated 2x across cluster]".
    os.environ["RAY_DEDUP_LOGS"] = "0"
    runs = {
        "train": _train_and_score,
        "train-one-node": _train_on_one_node,
        "score-node-loss": _score_node_loss,
        "serve-node-loss": _serve_node_loss,
        "train-node-loss": _train_node_loss,
    }
    result = runs[scenario](store_uri, Path(workdir), *rest)
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
