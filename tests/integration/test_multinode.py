"""The platform across nodes: Ray clusters of three nodes on 127.0.0.1 whose nodes share nothing but the S3 store.

``_multinode.py`` runs each scenario in its own process (this one already holds the tests' single-node cluster):
training with its two DDP workers on two different nodes, reading shards from and checkpointing to S3, then a
score job; a score job that loses one of the two nodes its actors sit on; serving that loses the node of one of
its two model replicas. Where actors ran is read from the GCS actor table (node ids, dead actors included).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _ports import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.multinode]

SCRIPT = Path(__file__).with_name("_multinode.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(scenario: str, s3, store_uri: str, tmp_path: Path, *args: str) -> tuple[dict, str]:
    """Run a scenario of ``_multinode.py`` on ``store_uri`` in its own process; returns its result and output."""
    tmp_path.mkdir(exist_ok=True)
    out = tmp_path / "result.json"
    env = {**os.environ, **s3.env, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), scenario, store_uri, str(tmp_path / "work"), str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return json.loads(out.read_text()), output


def test_training_and_scoring_span_two_nodes_through_s3_only(s3, tmp_path):
    from tsdn_platform import store
    from tsdn_platform.registry import Registry

    store_uri = s3.uri("multinode")
    result, _ = _run("train", s3, store_uri, tmp_path)
    # Two worker nodes with one ``trainer`` slot each: two DDP workers asking for a slot each cannot share a node.
    assert sorted(result["trainer_slots"].values()) == [1.0, 1.0]
    train = result["train"]
    assert train["ok"], train["error"]
    # The DDP workers ran on both worker nodes, never on the head: node ids of Ray Train's worker actors, from
    # the GCS actor table (Ray Train's own node_rank groups workers by IP, and every node here is 127.0.0.1).
    workers = result["actors"]["train"]
    assert len(workers) >= 2 and {w["node"] for w in workers} == {"node_a", "node_b"}, workers
    # Checkpoints and the model went to S3; nothing of the run was written under the local work folder.
    assert store.list_files(store.join(store_uri, "runs", "brick"), recursive=True)
    assert Registry(store_uri).best("brick")["version"] == train["version"]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["mvtec"]
    # Every test image scored exactly once by the two scorer actors.
    score = result["score"]
    n_test = sum(1 for _ in (tmp_path / "work" / "mvtec" / "brick" / "test").rglob("*.png"))
    assert (score["rows_written"], score["errors"]) == (n_test, 0)
    # The same run (same shards, preset and seed) with both workers on one node, twice, each in its own store:
    # the two-node run's first-epoch loss agrees with theirs within the spread of the two. DDP across nodes
    # computes what it computes on one node (here all three runs' losses were bit-identical: the spread is 0, so
    # the 1e-6 relative slack is only float noise).
    one_node = [_run("train-one-node", s3, s3.uri("one-node"), tmp_path / f"one-node-{i}")[0]["train"] for i in (1, 2)]
    print(json.dumps({"two_nodes": train["losses"], "one_node": [r["losses"] for r in one_node]}))
    assert all(r["ok"] for r in one_node), one_node
    first = [r["losses"][0] for r in one_node]
    spread = max(first) - min(first)
    assert abs(train["losses"][0] - sum(first) / 2) <= spread + 1e-6 * first[0], (train["losses"], first)


def test_training_that_loses_a_node_resumes_from_the_last_s3_checkpoint_on_a_fresh_node(s3, tmp_path):
    from _multinode import TRAIN_EPOCHS

    from tsdn_platform.registry import Registry

    store_uri = s3.uri("multinode")
    result, output = _run("train-node-loss", s3, store_uri, tmp_path, "fresh-node")
    removal, outcome = result["removal"], result["outcome"]
    # The node went while both DDP workers ran, after Ray Train had registered a checkpoint on S3.
    assert removal["running"] and removal["workers"] == ["node_a", "node_b"] and removal["checkpoints"], removal
    assert outcome["finished"] and outcome.get("ok"), outcome
    assert Registry(store_uri).best("brick")["version"] == outcome["version"]
    # A second worker group, on node_b and the fresh node_c, took over (within max_failures: 1 of the preset).
    nodes = [w["node"] for w in result["actors"]["train"]]
    assert sorted(nodes) == ["node_a", "node_b", "node_b", "node_c"], nodes
    # ... and resumed from a checkpoint on S3 instead of starting again at epoch 1: the epoch lines of the second
    # group's rank 0 (another process) start at the epoch after a checkpoint that was on S3 when the node went
    # (the last one there may still have been uploading, not yet registered) and run on to the last epoch.
    lines = re.findall(rf"pid=(\d+)\)\S* \[brick\] epoch (\d+)/{TRAIN_EPOCHS} ", output)
    by_process: dict[str, list[int]] = {}
    for pid, epoch in lines:
        by_process.setdefault(pid, []).append(int(epoch))
    assert len(by_process) == 2, lines
    first, second = by_process.values()
    on_s3 = [int(c.removeprefix("checkpoint_epoch")) for c in removal["checkpoints"]]
    assert first[0] == 1 and second[0] - 1 in on_s3, (by_process, removal)
    assert second == list(range(second[0], TRAIN_EPOCHS + 1)), by_process


def test_training_that_loses_a_node_with_none_to_replace_it_fails_cleanly(s3, tmp_path):
    from _multinode import TRAIN_START_TIMEOUT_S

    from tsdn_platform.registry import Registry

    store_uri = s3.uri("multinode")
    result, _ = _run("train-node-loss", s3, store_uri, tmp_path, "no-spare-node")
    removal, outcome = result["removal"], result["outcome"]
    assert removal["running"] and removal["workers"] == ["node_a", "node_b"] and removal["checkpoints"], removal
    # No node offers the second trainer slot: the restarted group cannot start, and with max_start_failures: 1
    # the product line fails after two waits of RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, saying why.
    assert outcome["finished"] and outcome.get("ok") is False, outcome
    assert "WorkerGroupStartupTimeoutError" in outcome["error"] or "timed out" in outcome["error"].lower(), outcome
    assert outcome["after_removal_s"] >= 2 * TRAIN_START_TIMEOUT_S, outcome
    # Nothing was registered.
    assert Registry(store_uri).best("brick") is None


@pytest.mark.parametrize("fresh_node", ["fresh-node", "no-spare-node"])
def test_a_score_job_that_loses_a_node_commits_every_row_once_or_nothing(s3, tmp_path, fresh_node):
    result, output = _run("score-node-loss", s3, s3.uri("multinode"), tmp_path, fresh_node)
    removal, outcome, committed = result["removal"], result["outcome"], result["committed"]
    # The node went mid-job: both scorer actors were alive, one on each worker node, and most rows still to do.
    alive = sorted(a["node"] for a in removal["actors"] if a["state"] == "ALIVE")
    assert alive == ["node_a", "node_b"], removal
    assert removal["job_running"] and removal["staged_rows"] < len(result["inputs"]) / 2, removal
    assert outcome["finished"], output[-6000:]
    if "error" in outcome:
        # Failed: nothing committed, the previous output is intact.
        assert committed == result["first"], outcome["error"]
    else:
        # Completed (Ray restarted the lost actor, on the fresh node or on node_b's CPU once the pool let go of
        # the other actor, and re-ran the lost tasks): every input row exactly once in the committed Parquet, and
        # no other part file beside the manifest's.
        assert outcome["rows_written"] == committed["rows_written"] == len(result["inputs"])
        assert sorted(committed["image_ids"]) == sorted(result["inputs"])
        assert len(set(committed["image_ids"])) == len(committed["image_ids"])
        assert committed["errors"] == 0
        assert committed["parts_on_store"] == committed["files"]


def test_serving_keeps_answering_when_a_replica_node_is_lost(s3, tmp_path):
    from _multinode import STREAM_AFTER_LOSS_S

    result, _ = _run("serve-node-loss", s3, s3.uri("multinode"), tmp_path, str(free_ports(1)[0]))
    print(json.dumps(result))  # the numbers infra/README.md quotes (pytest -s shows them)
    # The ingress on the head, one model replica on each worker node; the lost node's replica was answering, and
    # the other one answered the stream after the loss.
    assert result["placed"] == {"ingress": ["head"], "replicas": ["node_a", "node_b"]}, result
    before, after, lost = result["served_before"], result["served_after"], result["lost"]
    assert before[lost] >= 5, result
    survivor = ({"node_a", "node_b"} - {lost}).pop()
    assert after.get(survivor, 0) - before.get(survivor, 0) >= 100, result
    requests = result["requests"]
    assert requests["failed_before_removal"] == 0, requests
    # Only requests caught on the lost replica fail; the router drops it and every later request succeeds on the
    # other one, long before the stream ends (it runs for STREAM_AFTER_LOSS_S more).
    assert requests["after_removal"] >= 100, requests
    assert requests["failed"] <= 10, requests
    assert requests["last_failure_s"] is None or requests["last_failure_s"] < STREAM_AFTER_LOSS_S / 2, requests
    assert requests["answered_after_s"] >= STREAM_AFTER_LOSS_S - 1, requests
    # A fresh node gets the replacement replica that the controller could not place before.
    assert result["replacement_after_join_s"] < 120, result
