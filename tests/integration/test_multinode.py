"""The platform across nodes: a three-node Ray cluster on 127.0.0.1 whose nodes share nothing but the S3 store.

``_multinode.py`` runs the jobs in its own process (this one already holds the tests' single-node cluster):
training with its two DDP workers on two different nodes, reading shards from and checkpointing to S3, then a
score job whose two actors sit on the two worker nodes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.multinode]

SCRIPT = Path(__file__).with_name("_multinode.py")
ROOT = Path(__file__).resolve().parents[2]


def test_training_and_scoring_span_two_nodes_through_s3_only(s3, tmp_path):
    from tsdn_platform import store
    from tsdn_platform.registry import Registry

    store_uri = s3.uri("multinode")
    out = tmp_path / "result.json"
    env = {**os.environ, **s3.env, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), store_uri, str(tmp_path / "work"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    result = json.loads(out.read_text())
    # Two worker nodes with one ``trainer`` slot each: two DDP workers asking for a slot each cannot share a node.
    assert sorted(result["trainer_slots"].values()) == [1.0, 1.0]
    train = result["train"]
    assert train["ok"], train["error"]
    # Ray Train started a group of two workers (its node_rank groups workers by IP, and every node here is
    # 127.0.0.1, so it cannot show the placement; the slots above force it).
    ranks = re.findall(r"world_rank=(\d+), local_rank=\d+, node_rank=\d+", output)
    assert sorted({int(w) for w in ranks}) == [0, 1], output[-6000:]
    # Checkpoints and the model went to S3; nothing of the run was written under the local work folder.
    assert store.list_files(store.join(store_uri, "runs", "brick"), recursive=True)
    assert Registry(store_uri).best("brick")["version"] == train["version"]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["mvtec"]
    # Every test image scored exactly once by the actors on the two nodes.
    score = result["score"]
    n_test = sum(1 for _ in (tmp_path / "work" / "mvtec" / "brick" / "test").rglob("*.png"))
    assert (score["rows_written"], score["errors"]) == (n_test, 0)
