"""``python _multinode.py STORE WORKDIR OUT_JSON``: platform jobs on a real three-node Ray cluster.

The cluster (``ray.cluster_utils.Cluster``, on 127.0.0.1 only, in Ray's single-host mode as
``tsdn_platform.ray_session`` sets it) has a head with two CPUs (for the drivers' Ray Data tasks) and two worker
nodes of one CPU and one ``trainer`` slot each (plus ``node_a`` / ``node_b``); each node has its own raylet and
object store. The store is ``STORE`` (the
tests' SeaweedFS bucket): nothing is shared between the nodes but S3. Run in its own process because a pytest
process already holds the tests' single-node cluster.

The jobs, in order:

- train: ingest a tiny demo dataset into the store, then train the ``tiny`` preset (two DDP workers of one CPU
  each, so one on each worker node) with checkpoints on S3, and register the model;
- score: score the ingested test split with the registered model, two scorer actors of one CPU each (one per
  worker node).

OUT_JSON receives the results; Ray Train's worker-group lines (``world_rank=.., node_rank=..``), which the test
reads, are on this process's output (``TSDN_VERBOSE=1`` keeps them).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path


def _cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only: see tsdn_platform.ray_session
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from tsdn_platform.ray_session import forwarded_env

    ray_constants.ENABLE_RAY_CLUSTER = False
    # The head's CPUs run the drivers' Ray Data tasks (shard reads, decoding); each worker node offers one CPU and
    # one ``trainer`` slot, so two DDP workers that ask for a slot each land on two different nodes.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False, "node_ip_address": "127.0.0.1"},
    )
    for name in ("node_a", "node_b"):
        cluster.add_node(num_cpus=1, resources={name: 1.0, "trainer": 1.0}, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, runtime_env={"env_vars": forwarded_env()})
    return cluster


def main() -> None:
    store_uri, workdir, out = sys.argv[1:4]
    logging.basicConfig(level=logging.INFO)
    os.environ["TSDN_VERBOSE"] = "1"  # Ray Train's INFO lines name each worker's node rank
    import ray

    cluster = _cluster()
    result: dict = {
        "trainer_slots": {n["NodeID"]: n["Resources"]["trainer"] for n in ray.nodes() if n["Resources"].get("trainer")}
    }
    try:
        result["train"] = _train(store_uri, Path(workdir))
        result["score"] = _score(store_uri)
    finally:
        ray.shutdown()
        cluster.shutdown()
    Path(out).write_text(json.dumps(result))


def _train(store_uri: str, workdir: Path) -> dict:
    from tsdn_platform.config import load_config
    from tsdn_platform.demo_data import make_demo_dataset
    from tsdn_platform.ingest import IngestConfig, run_ingest
    from tsdn_platform.train import TrainConfig, run_training

    root = workdir / "mvtec"
    make_demo_dataset(root, seed=0, image_size=64, n_train=12, n_test_good=2, n_defects_per_type=1, products=["brick"])
    run_ingest(IngestConfig(source=str(root), store=store_uri, dataset="demo", image_size=64, n_segments=50))
    explicit = {"store": store_uri, "dataset": "demo", "products": "brick"}
    overrides = ["holdout_folds=[0,1,2,3]", "resources_per_worker={trainer: 1}"]
    cfg = load_config(TrainConfig, "tiny", overrides, explicit=explicit)
    brick = run_training(cfg)["brick"]
    return {"ok": brick.ok, "error": brick.error, "version": brick.version}


def _score(store_uri: str) -> dict:
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


if __name__ == "__main__":
    main()
