"""``python _fault_job.py PAUSE_AT SIGNAL_DIR tsdn-args...``: the ``tsdn`` CLI, paused once at a chosen point.

``PAUSE_AT`` is ``module:attribute`` (``-`` for none), e.g. ``tsdn_platform.ingest:_commit`` or
``ray.data.dataset:Dataset.take_all``. On the first call the job creates ``SIGNAL_DIR/paused`` and waits for
``SIGNAL_DIR/resume`` before going on, so a test can stop the S3 server at exactly that point of the job.
The exit status is the CLI's.
"""

from __future__ import annotations

import functools
import importlib
import sys
import time
from pathlib import Path


def _pause_at(target: str, signal_dir: Path) -> None:
    module_name, _, attribute = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = attribute.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)
    done = []

    @functools.wraps(original)
    def paused(*args, **kwargs):
        if not done:
            done.append(True)
            (signal_dir / "paused").touch()
            while not (signal_dir / "resume").exists():
                time.sleep(0.05)
        return original(*args, **kwargs)

    setattr(owner, name, paused)


if __name__ == "__main__":
    pause_at, signal_dir, *argv = sys.argv[1:]
    if pause_at != "-":
        _pause_at(pause_at, Path(signal_dir))
    from tsdn_platform.cli import main

    sys.exit(main(argv))
