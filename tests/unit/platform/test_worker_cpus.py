"""How many CPUs the workers Ray Data feeds ask for (tsdn_platform.ray_session.worker_cpus)."""

from __future__ import annotations

import pytest

from tsdn_platform.ray_session import worker_cpus


def test_the_embedding_actors_get_the_workers_cpus_while_the_cluster_has_one_to_spare():
    assert worker_cpus(1, 1, 2) == 1  # the patchcore preset on a 2-core machine
    assert worker_cpus(2, 1, 4) == 2
    assert worker_cpus(8, 2, 24) == 8  # two actors on a 24-CPU cluster


@pytest.mark.parametrize(
    ("cpus_per_worker", "num_workers", "cluster", "expected"),
    [(2, 1, 2, 1.0), (4, 1, 4, 3.0), (2, 2, 4, 1.5), (8, 3, 24, 23 / 3)],
)
def test_actors_that_would_hold_every_cpu_leave_one_to_the_tasks_that_feed_them(
    cpus_per_worker, num_workers, cluster, expected
):
    """The `cpu` preset's 2 CPUs per worker on a 2-core machine hung the fit (tests/integration/test_train.py)."""
    cpus = worker_cpus(cpus_per_worker, num_workers, cluster)
    assert cpus == pytest.approx(expected)
    assert num_workers * cpus <= cluster - 1


def test_a_one_cpu_cluster_keeps_the_request():
    assert worker_cpus(1, 1, 1) == 1  # nothing to spare: cached rows reach the actors without a task


def _cfg(**fields):
    from tsdn_platform.train import TrainConfig

    return TrainConfig(store="s", dataset="d", **fields)


def test_cached_lines_on_a_cluster_that_may_grow_all_start_so_their_demand_brings_up_nodes():
    from tsdn_platform.train import concurrent_products

    assert concurrent_products(_cfg(cpus_per_worker=2), 3, 4) == 3  # they queue on the cluster's resources
    assert concurrent_products(_cfg(cpus_per_worker=8), 3, 0) == 3  # an autoscaler's empty head
    assert concurrent_products(_cfg(cpus_per_worker=2, max_concurrent_products=2), 3, 4) == 2


@pytest.mark.parametrize(
    ("num_workers", "cpus_per_worker", "cap", "cluster", "expected"),
    [
        (1, 1, 0, 2, 2),  # the demo's three lines on a 2-core machine: the third could only wait
        (1, 2, 0, 2, 1),  # the cpu preset on a 2-core machine
        (2, 1, 0, 4, 2),
        (1, 1, 1, 4, 1),  # max_concurrent_products still caps
        (1, 4, 0, 2, 1),  # one line always starts, even one that does not fit
    ],
)
def test_cached_lines_on_a_local_cluster_start_as_many_as_its_cpus_hold(
    num_workers, cpus_per_worker, cap, cluster, expected
):
    from tsdn_platform.train import concurrent_products

    cfg = _cfg(num_workers=num_workers, cpus_per_worker=cpus_per_worker, max_concurrent_products=cap)
    assert concurrent_products(cfg, 3, cluster, fixed=True) == expected


@pytest.mark.parametrize(
    ("num_workers", "cpus_per_worker", "cap", "cluster", "expected"),
    [
        (1, 2, 0, 4, 1),  # two lines of 2 CPUs on 4 CPUs held them all and waited for their reads for ever
        (1, 1, 0, 2, 1),  # the demo preset's lines on a 2-core machine
        (1, 4, 0, 16, 3),  # a line per GPU, 4 CPUs each, on a 16-CPU node with 4 GPUs: 3 of them leave a CPU
        (2, 4, 0, 64, 7),
        (1, 1, 2, 64, 2),  # max_concurrent_products still caps
        (1, 8, 0, 0, 1),  # an autoscaler's empty head: one line, whose request brings up a node
    ],
)
def test_lines_reading_data_that_are_not_cached_leave_the_reads_a_cpu(
    num_workers, cpus_per_worker, cap, cluster, expected
):
    from tsdn_platform.train import concurrent_products

    cfg = _cfg(cache_data=False, num_workers=num_workers, cpus_per_worker=cpus_per_worker, max_concurrent_products=cap)
    running = concurrent_products(cfg, 10, cluster)
    assert running == expected == concurrent_products(cfg, 10, cluster, fixed=True)
    if running > 1:
        assert running * num_workers * cpus_per_worker <= cluster - 1
