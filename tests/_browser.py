"""Render a local HTML file in headless Chromium and return the DOM after its scripts ran.

Needs the Debian package ``chromium`` (``/usr/bin/chromium``); ``.ci/run`` installs it. Where it is missing
the calling test is skipped with a message that names the package. Only ``file://`` URLs are opened, and the
flags keep Chromium off the network (no background requests, updates, sync or QUIC).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
_FLAGS = [
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=5000",
]


def dump_dom(page: Path, fragment: str = "", timeout_s: float = 120.0) -> str:
    """The serialised DOM of ``page`` (opened as ``file://...#fragment``) once its scripts have run."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"headless Chromium not found at {CHROMIUM}: install the Debian package 'chromium'")
    flags = [*_FLAGS, *(["--no-sandbox"] if os.geteuid() == 0 else [])]  # Chromium refuses root with a sandbox
    url = Path(page).resolve().as_uri() + (f"#{fragment}" if fragment else "")
    with tempfile.TemporaryDirectory(prefix="tsdn-chromium-") as profile:
        done = subprocess.run(
            [CHROMIUM, *flags, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    if done.returncode != 0 or "<html" not in done.stdout:
        msg = f"chromium failed on {url} (exit {done.returncode}): {done.stderr[-2000:]}"
        raise RuntimeError(msg)
    return done.stdout
