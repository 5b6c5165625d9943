"""``python _fault_job.py PAUSE_AT SIGNAL_DIR tsdn-args...``: the ``tsdn`` CLI, paused once at a chosen point.

``PAUSE_AT`` is ``module:attribute`` (``-`` for none), e.g. ``tsdn_platform.ingest:_commit`` or
``ray.data.dataset:Dataset.take_all``; with a ``workers:`` prefix the point is patched in every Ray worker
process of the job's local cluster too (through its ``worker_process_setup_hook``), for code that runs in a task
or a Train worker, e.g. ``workers:tsdn_platform.train_checkpoints:upload``. On the first call in any process the
job creates ``SIGNAL_DIR/paused`` and waits for ``SIGNAL_DIR/resume`` before going on, so a test can stop the S3
server at exactly that point of the job. The exit status is the CLI's.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time
from pathlib import Path

WORKERS = "workers:"


def _pause_at(target: str, signal_dir: Path) -> None:
    module_name, _, attribute = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = attribute.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)

    @functools.wraps(original)
    def paused(*args, **kwargs):
        try:  # one pause per job, whichever process gets there first
            os.close(os.open(signal_dir / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return original(*args, **kwargs)
        (signal_dir / "paused").touch()
        while not (signal_dir / "resume").exists():
            time.sleep(0.05)
        return original(*args, **kwargs)

    setattr(owner, name, paused)


def _pause_in_workers(target: str, signal_dir: Path) -> None:
    """Wrap ``ray.init`` so that every worker of the cluster it starts runs :func:`_pause_at` at start-up."""
    import ray

    init = ray.init

    @functools.wraps(init)
    def init_with_pause(*args, **kwargs):
        runtime_env = dict(kwargs.get("runtime_env") or {})
        hook = runtime_env.get("worker_process_setup_hook")

        def setup() -> None:
            if hook:
                module_name, _, name = hook.rpartition(".")
                getattr(importlib.import_module(module_name), name)()
            _pause_at(target, signal_dir)

        runtime_env["worker_process_setup_hook"] = setup
        return init(*args, **{**kwargs, "runtime_env": runtime_env})

    ray.init = init_with_pause


if __name__ == "__main__":
    pause_at, signal_dir, *argv = sys.argv[1:]
    if pause_at.startswith(WORKERS):
        pause_at = pause_at[len(WORKERS) :]
        _pause_in_workers(pause_at, Path(signal_dir))
    if pause_at != "-":
        _pause_at(pause_at, Path(signal_dir))
    from tsdn_platform.cli import main

    sys.exit(main(argv))
