"""How many CPUs PatchCore's embedding actors ask for (tsdn_platform.fit_patchcore.embedder_cpus)."""

from __future__ import annotations

import pytest

from tsdn_platform.fit_patchcore import embedder_cpus


def test_the_embedding_actors_get_the_workers_cpus_while_the_cluster_has_one_to_spare():
    assert embedder_cpus(1, 1, 2) == 1  # the patchcore preset on a 2-core machine
    assert embedder_cpus(2, 1, 4) == 2
    assert embedder_cpus(8, 2, 24) == 8  # two actors on a 24-CPU cluster


@pytest.mark.parametrize(
    ("cpus_per_worker", "num_workers", "cluster", "expected"),
    [(2, 1, 2, 1.0), (4, 1, 4, 3.0), (2, 2, 4, 1.5), (8, 3, 24, 23 / 3)],
)
def test_actors_that_would_hold_every_cpu_leave_one_to_the_tasks_that_feed_them(
    cpus_per_worker, num_workers, cluster, expected
):
    """The `cpu` preset's 2 CPUs per worker on a 2-core machine hung the fit (tests/integration/test_train.py)."""
    cpus = embedder_cpus(cpus_per_worker, num_workers, cluster)
    assert cpus == pytest.approx(expected)
    assert num_workers * cpus <= cluster - 1


def test_a_one_cpu_cluster_keeps_the_request():
    assert embedder_cpus(1, 1, 1) == 1  # nothing to spare: cached rows reach the actors without a task
