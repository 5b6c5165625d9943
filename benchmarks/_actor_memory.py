"""Peak RSS of Ray's scorer actors, sampled from /proc while a score job runs (Linux; benchmarks only)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

_VM_HWM = re.compile(r"^VmHWM:\s+(\d+) kB", re.MULTILINE)


def scorer_processes() -> list[Path]:
    """``/proc/<pid>`` of every process whose command line names the score job's actor class (``Scorer``)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"Scorer" in (proc / "cmdline").read_bytes():
                found.append(proc)
        except OSError:  # the process ended meanwhile
            continue
    return found


class ActorMemory:
    """Samples, in a thread while the job runs, the peak RSS (``VmHWM``) of the scorer actors started after it
    was created, and whether any of them mapped libtorch. Scorers that already existed (a previous job's actor
    can outlive its job for a while) are left out."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.peak_bytes = 0
        self.libtorch = False
        self._period_s = period_s
        self._before = set(scorer_processes())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ActorMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in scorer_processes():
                if proc in self._before:
                    continue
                try:
                    status = (proc / "status").read_text()
                    self.libtorch |= "libtorch" in (proc / "maps").read_text()
                except OSError:
                    continue
                match = _VM_HWM.search(status)
                if match:
                    self.peak_bytes = max(self.peak_bytes, int(match.group(1)) * 1024)
            self._stop.wait(self._period_s)
