"""Serving latency and throughput: HTTP through Ray Serve vs the predictor called in-process, same run.

Registers one TSDN model (random weights: latency does not depend on their values) in a throw-away local
store, measures ``Predictor.predict`` directly (one image per call, and batches of ``--batch``), then starts
the Serve application on 127.0.0.1 and drives ``POST /v1/products/<p>/detect`` with a closed-loop load
generator (N threads, one keep-alive connection each, bounded in requests and in seconds) at each
concurrency, with dynamic batching on (``max_batch_size=--batch``) and off (``max_batch_size=1``).

The machines this runs on are shared, so every level is divided by a reference taken around it (the mean
of a probe just before and one just after):
``direct req/s`` = one-image ``predict`` calls per second in this process, 1 thread like the replica.

    .venv/bin/python benchmarks/bench_serve.py                       # prints a Markdown table + JSON
    .venv/bin/python benchmarks/bench_serve.py --write BENCHMARKS.md # also replaces its "## Serving" body
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import io
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

PRODUCT = "bench"


@dataclasses.dataclass
class Level:
    """One measured configuration: latencies in ms, throughput in requests (images) per second."""

    mode: str
    concurrency: int
    requests: int
    p50_ms: float
    p99_ms: float
    rps: float
    baseline_rps: float
    """Direct one-image ``predict`` calls per second, the mean of a probe just before and just after this level."""
    mean_batch: float
    errors: int = 0


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def make_image(size: int) -> bytes:
    """A natural texture from scikit-image (no download), resized to ``size`` x ``size``, as PNG."""
    from skimage import data

    texture = Image.fromarray(data.astronaut()).resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    texture.save(buffer, format="PNG")
    return buffer.getvalue()


def register_model(store: str, backbone: str, image_size: int) -> None:
    from tsdn_platform.registry import Registry
    from tsdn_platform.testing import calibrate, register, tiny_model

    model = tiny_model("tsdn", seed=0, image_size=image_size, backbone=backbone)
    register(Registry(store), PRODUCT, model, calibrate(model, seed=0, n=4))


class Direct:
    """``Predictor.predict`` in this process, on the same decoded image the server gets."""

    def __init__(self, store: str, image: bytes) -> None:
        import torch

        from tsdn.image import decode_image
        from tsdn_platform.registry import Registry

        # A model replica has 1 CPU and Ray sets OMP_NUM_THREADS=1 in it: give the baseline the same.
        torch.set_num_threads(1)
        self.predictor, _ = Registry(store).load_predictor(PRODUCT)
        self.image = decode_image(image, "bench image")
        self.predictor.predict([self.image])  # warm-up

    def measure(self, size: int, requests: int, max_seconds: float) -> tuple[list[float], float]:
        """Calls of ``size`` images until ``requests`` images or ``max_seconds`` -> (latencies ms, images/s)."""
        latencies: list[float] = []
        deadline = time.perf_counter() + max_seconds
        start = time.perf_counter()
        while len(latencies) * size < requests and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            self.predictor.predict([self.image] * size)
            latencies.append((time.perf_counter() - t0) * 1000.0)
        return latencies, len(latencies) * size / (time.perf_counter() - start)

    def baseline(self, probe: int, max_seconds: float) -> float:
        """Images/s of one-image calls right now: the reference each measured level is divided by."""
        return self.measure(1, probe, max_seconds)[1]

    def level(self, size: int, requests: int, max_seconds: float, probe: int) -> Level:
        before = self.baseline(probe, max_seconds)
        latencies, rps = self.measure(size, requests, max_seconds)
        baseline = (before + self.baseline(probe, max_seconds)) / 2
        return Level(
            mode=f"direct predict, {size} image(s)/call",
            concurrency=1,
            requests=len(latencies) * size,
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
            rps=rps,
            baseline_rps=baseline,
            mean_batch=float(size),
        )


def load(
    port: int, path: str, image: bytes, token: str, concurrency: int, requests: int, max_seconds: float
) -> tuple[list[float], list[int], int, float]:
    """Closed loop: ``concurrency`` threads share a budget of ``requests`` and stop at ``max_seconds``."""
    lock = threading.Lock()
    budget = [requests]
    latencies: list[float] = []
    batches: list[int] = []
    errors = [0]
    deadline = time.perf_counter() + max_seconds
    headers = {"Content-Type": "image/png", "Authorization": f"Bearer {token}"}

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                t0 = time.perf_counter()
                conn.request("POST", path, body=image, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                elapsed_ms = (time.perf_counter() - t0) * 1000.0
                with lock:
                    if response.status == 200:
                        latencies.append(elapsed_ms)
                        batches.append(int(json.loads(payload)["batch_size"]))
                    else:
                        errors[0] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, batches, errors[0], time.perf_counter() - start


def bench_http(direct: Direct, store: str, image: bytes, args: argparse.Namespace) -> list[Level]:
    from ray import serve

    from tsdn_platform.serve import ServeConfig, start_server

    token = "bench-token"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = f"/v1/products/{PRODUCT}/detect"
    levels = []
    try:
        batching = ((f"HTTP, batching on (max {args.batch}, wait {args.wait * 1000:g} ms)", args.batch),)
        for mode, size in (*batching, ("HTTP, batching off", 1)):
            cfg = ServeConfig(
                store=store,
                port=port,
                max_batch_size=size,
                batch_wait_timeout_s=args.wait,
                max_ongoing_requests=64,
                auth_tokens_env="TSDN_BENCH_TOKENS",
            )
            with _env("TSDN_BENCH_TOKENS", token):
                start_server(cfg)
            load(port, path, image, token, 4, 16, args.max_seconds)  # warm-up: model load, connections
            for concurrency in args.concurrency:
                before = direct.baseline(args.probe, args.max_seconds)
                latencies, batches, errors, elapsed = load(
                    port, path, image, token, concurrency, args.requests, args.max_seconds
                )
                baseline = (before + direct.baseline(args.probe, args.max_seconds)) / 2
                levels.append(
                    Level(
                        mode=mode,
                        concurrency=concurrency,
                        requests=len(latencies),
                        p50_ms=percentile(latencies, 50),
                        p99_ms=percentile(latencies, 99),
                        rps=len(latencies) / elapsed,
                        baseline_rps=baseline,
                        mean_batch=statistics.fmean(batches),
                        errors=errors,
                    )
                )
                print(levels[-1], file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
    return levels


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set one environment variable for the ``with`` block."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def markdown(levels: list[Level], args: argparse.Namespace, command: str) -> str:
    rows = [
        "| mode | concurrency | requests | p50 ms | p99 ms | req/s | direct req/s | ratio | mean batch | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        rows.append(
            f"| {level.mode} | {level.concurrency} | {level.requests} | {level.p50_ms:.1f} | {level.p99_ms:.1f} "
            f"| {level.rps:.1f} | {level.baseline_rps:.1f} | {level.rps / level.baseline_rps:.2f} "
            f"| {level.mean_batch:.2f} | {level.errors} |"
        )
    machine = f"{platform.machine()}, {_cpus()} CPU cores visible, Python {platform.python_version()}, no GPU"
    return "\n".join(
        [
            f"Machine: {machine} (shared with other jobs: ratios within one run are what to read).",
            f"Model: TSDN `{args.backbone}` (random weights), {args.image_size} px input; "
            f"request image {args.request_size}x{args.request_size} PNG; one model replica (1 CPU), one ingress.",
            "",
            "```bash",
            command,
            "```",
            "",
            *rows,
            "",
            "- `req/s`: images answered per second (HTTP: closed loop, `concurrency` clients with keep-alive "
            "connections, each level bounded by `--requests` and `--max-seconds`); latencies are per request "
            "(HTTP: client-side, including decode, auth, routing and JSON).",
            "- `direct req/s`: one-image `Predictor.predict` calls per second in the benchmark process (1 torch "
            "thread, like the replica): mean of probes just before and just after the level; "
            "`ratio` = req/s / direct req/s.",
            "- `mean batch`: images per `Predictor.predict` call in the replica, from the responses' `batch_size`.",
        ]
    )


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def write_section(path: Path, body: str, title: str = "## Serving") -> None:
    """Replace the body of ``title`` in ``path`` (up to the next ``## `` or ``### `` heading, so a subsection such
    as ``### Serving memory`` keeps its own text), leaving the rest alone."""
    text = path.read_text()
    start = text.index(title + "\n") + len(title) + 1
    found = [i for i in (text.find("\n## ", start), text.find("\n### ", start)) if i >= 0]
    end = min(found) + 1 if found else len(text)
    path.write_text(text[:start] + "\n" + body.rstrip() + "\n\n" + text[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=128, help="model input side")
    parser.add_argument("--request-size", type=int, default=128, help="side of the PNG sent")
    parser.add_argument("--batch", type=int, default=8, help="max_batch_size with batching on")
    parser.add_argument("--wait", type=float, default=0.02, help="batch_wait_timeout_s with batching on")
    parser.add_argument("--probe", type=int, default=16, help="direct calls measured before each level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=96, help="requests per level (upper bound)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time bound per level")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--write", type=Path, help="replace the '## Serving' section of this Markdown file")
    parser.add_argument("--json", type=Path, help="also write the levels as JSON here")
    args = parser.parse_args()
    command = " ".join([".venv/bin/python benchmarks/bench_serve.py", *sys.argv[1:]])

    from tsdn_platform.ray_session import init_ray

    image = make_image(args.request_size)
    with tempfile.TemporaryDirectory(prefix="tsdn-bench-serve-") as store:
        register_model(store, args.backbone, args.image_size)
        direct = Direct(store, image)
        levels = [direct.level(size, args.requests, args.max_seconds, args.probe) for size in (1, args.batch)]
        init_ray(num_cpus=args.num_cpus)
        try:
            levels += bench_http(direct, store, image, args)
        finally:
            import ray

            ray.shutdown()
    table = markdown(levels, args, command)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([dataclasses.asdict(level) for level in levels], indent=2) + "\n")
    if args.write:
        write_section(args.write, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
