"""Serving memory under hostile requests: RSS of the model replica and the ingress before, during and after.

The hostile image of issue 15: a PNG of 6300x6300 pixels (under the serving limit of 40 M pixels) that
compresses to 131 KB (flat grey), generated here. A tiny TSDN model (timm's ``test_efficientnet``, random weights) is
registered in a throw-away local store and served by ``tsdn_platform.serve.start_server`` on 127.0.0.1 with
the default limits (``max_image_pixels``, ``max_concurrent_decodes``); ``--concurrency`` clients then send
the image ``--requests`` times in all (a closed loop bounded in requests and in seconds, ``bench_serve.load``).
The RSS of each deployment's processes is sampled from /proc every 0.2 s (``_actor_memory.ActorMemory``):
``baseline`` is the mean over ``--settle-s`` seconds after a warm-up with small images, ``peak`` the highest
sample during the load, ``after`` the mean over the last 3 s of ``--settle-s`` seconds after it. A deployment
passes when ``after`` is within ``--margin-mib`` of its baseline.

    .venv/bin/python benchmarks/serve_memory.py                       # prints a Markdown table + JSON
    .venv/bin/python benchmarks/serve_memory.py --write BENCHMARKS.md # also replaces its "### Serving memory" body
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from _actor_memory import ActorMemory
from bench_serve import PRODUCT, _env, load, make_image, register_model, write_section
from PIL import Image

DEPLOYMENTS = {"model replica": b"TSDNModel", "ingress": b"TSDNIngress"}
MIB = 2**20


def hostile_png(side: int) -> bytes:
    """A flat grey ``side`` x ``side`` RGB PNG: deflate's best ratio (~900:1; 131 KB at 6300)."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=6300, help="side of the hostile PNG")
    parser.add_argument("--requests", type=int, default=8, help="hostile requests in all (upper bound)")
    parser.add_argument("--concurrency", type=int, default=4, help="clients sending at once")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="time bound of the load")
    parser.add_argument("--settle-s", type=float, default=15.0, help="seconds sampled before and after the load")
    parser.add_argument("--margin-mib", type=float, default=200.0, help="allowed after - baseline, per deployment")
    parser.add_argument("--write", type=Path, help="replace the '### Serving memory' section of this Markdown file")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    command = " ".join([".venv/bin/python benchmarks/serve_memory.py", *sys.argv[1:]])

    import ray
    from ray import serve

    from tsdn_platform.ray_session import init_ray
    from tsdn_platform.serve import ServeConfig, start_server

    image = hostile_png(args.side)
    small = make_image(64)
    token = "bench-token"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = f"/v1/products/{PRODUCT}/detect"
    # Only this process's own cluster: the machine is shared, and another job's Serve replicas carry the same names.
    samplers = {name: ActorMemory(marker=marker, ancestor=os.getpid()) for name, marker in DEPLOYMENTS.items()}
    with tempfile.TemporaryDirectory(prefix="tsdn-bench-serve-memory-") as store:
        register_model(store, "test_efficientnet", 64)
        init_ray(num_cpus=2)
        try:
            cfg = ServeConfig(store=store, port=port, auth_tokens_env="TSDN_BENCH_TOKENS")
            with _env("TSDN_BENCH_TOKENS", token):
                start_server(cfg)
            for sampler in samplers.values():
                sampler.__enter__()
            load(port, path, small, token, 2, 8, 60.0)  # warm-up: model load, connections
            try:
                time.sleep(args.settle_s)
                load_start = time.monotonic()
                latencies, _, errors, elapsed = load(
                    port, path, image, token, args.concurrency, args.requests, args.max_seconds
                )
                load_end = time.monotonic()
                time.sleep(args.settle_s)
                end = time.monotonic()
            finally:
                for sampler in samplers.values():
                    sampler.__exit__(None, None, None)
        finally:
            serve.shutdown()
            ray.shutdown()
    rows = {}
    for name, sampler in samplers.items():
        baseline = sampler.rss_between(load_start - args.settle_s, load_start)
        during = sampler.rss_between(load_start, load_end)
        after = sampler.rss_between(end - 3.0, end)
        rows[name] = {
            "baseline_mib": sum(baseline) / len(baseline) / MIB,
            "peak_mib": max(during) / MIB,
            "after_mib": sum(after) / len(after) / MIB,
        }
        rows[name]["within_margin"] = rows[name]["after_mib"] - rows[name]["baseline_mib"] <= args.margin_mib
    result = {
        "png_bytes": len(image),
        "side": args.side,
        "answered": len(latencies),
        "errors": errors,
        "load_s": elapsed,
        "p50_ms": sorted(latencies)[len(latencies) // 2] if latencies else None,
        "deployments": rows,
    }
    table = markdown(result, args, command)
    print(table)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.write:
        write_section(args.write, table, title="### Serving memory")
    return 0 if all(row["within_margin"] for row in rows.values()) and not errors else 1


def markdown(result: dict, args: argparse.Namespace, command: str) -> str:
    lines = [
        f"Hostile request: a {result['side']}x{result['side']} RGB PNG of {result['png_bytes'] / 1000:.0f} KB "
        f"({result['side'] ** 2 / 1e6:.1f} M pixels, under the default `max_image_pixels` of 40 M); "
        f"{args.concurrency} clients, {args.requests} requests; default `max_concurrent_decodes` (2); "
        "model: `test_efficientnet`, 64 px, one replica (1 CPU), one ingress.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Answered {result['answered']} (errors {result['errors']}) in {result['load_s']:.1f} s, "
        f"p50 {result['p50_ms'] or 0:.0f} ms.",
        "",
        "| process | baseline MiB | peak MiB (during) | after MiB | after - baseline | within "
        f"{args.margin_mib:g} MiB |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, row in result["deployments"].items():
        lines.append(
            f"| {name} | {row['baseline_mib']:.0f} | {row['peak_mib']:.0f} | {row['after_mib']:.0f} "
            f"| {row['after_mib'] - row['baseline_mib']:+.0f} | {'yes' if row['within_margin'] else 'no'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
