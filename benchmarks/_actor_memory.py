"""RSS of Ray actor processes, sampled from /proc while a job runs (Linux; benchmarks only).

The score benchmarks read the peak RSS of the scorer actors (``Scorer``); the serving load test reads the
current RSS of the Serve replicas (``TSDNModel``, ``TSDNIngress``) over time, before, during and after a load.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

_VM_HWM = re.compile(r"^VmHWM:\s+(\d+) kB", re.MULTILINE)
_VM_RSS = re.compile(r"^VmRSS:\s+(\d+) kB", re.MULTILINE)


def actor_processes(marker: bytes = b"Scorer", ancestor: int | None = None) -> list[Path]:
    """``/proc/<pid>`` of every process whose command line (a Ray worker's title names its actor class) holds
    ``marker`` (the default is the score job's actor class); with ``ancestor``, only its descendants (this
    process's own local cluster, not another job's on a shared machine)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "cmdline").read_bytes() and (ancestor is None or _descends(proc, ancestor)):
                found.append(proc)
        except OSError:  # the process ended meanwhile
            continue
    return found


def _descends(proc: Path, ancestor: int) -> bool:
    pid = int(proc.name)
    while pid > 1:
        # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after its ")".
        pid = int((Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[1])
        if pid == ancestor:
            return True
    return False


class ActorMemory:
    """Samples, in a thread while the job runs, the RSS of the actors whose command line holds ``marker``.

    ``peak_bytes`` is the largest peak RSS (``VmHWM``) of any of them, and ``libtorch`` whether any mapped
    libtorch; ``samples`` holds ``(monotonic time, summed current RSS (VmRSS) in bytes)`` per period. With
    ``only_new`` (the default), actors that already existed (a previous job's can outlive its job for a while)
    are left out; with ``ancestor`` (a pid), only that process's descendants are sampled.
    """

    def __init__(
        self, period_s: float = 0.2, marker: bytes = b"Scorer", only_new: bool = True, ancestor: int | None = None
    ) -> None:
        self.peak_bytes = 0
        self.libtorch = False
        self.samples: list[tuple[float, int]] = []
        self._marker = marker
        self._ancestor = ancestor
        self._period_s = period_s
        self._before = set(actor_processes(marker, ancestor)) if only_new else set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ActorMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def rss_between(self, start: float, end: float) -> list[int]:
        """The summed RSS samples taken between two ``time.monotonic()`` readings."""
        return [rss for when, rss in self.samples if start <= when <= end]

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for proc in actor_processes(self._marker, self._ancestor):
                if proc in self._before:
                    continue
                try:
                    status = (proc / "status").read_text()
                    self.libtorch |= "libtorch" in (proc / "maps").read_text()
                except OSError:
                    continue
                peak, current = _VM_HWM.search(status), _VM_RSS.search(status)
                if peak:
                    self.peak_bytes = max(self.peak_bytes, int(peak.group(1)) * 1024)
                if current:
                    total += int(current.group(1)) * 1024
            self.samples.append((time.monotonic(), total))
            self._stop.wait(self._period_s)
