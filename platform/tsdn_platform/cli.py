"""The ``tsdn`` command line. One subcommand per job; each imports its module only when it runs,
so ``tsdn --help`` stays fast and does not start Ray.

Exit status: 0 the job did its work (and committed its output); 1 it ran and failed (``tsdn score``: too many
error rows) or hit an unexpected error; 2 a mistake the user can fix (a config key or value, a missing input,
store, bucket, dataset, product or version, credentials the store refuses); 3 the store failed
(unreachable, throttling, 5xx) for longer than the job's ``store_retry_s``: nothing new was committed, and
running it again later is the remedy. Every failure is one line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from tsdn_platform import __version__

# subcommand -> (module, one-line help, function adding its arguments)
_Adder = Callable[[argparse.ArgumentParser], None]
_COMMANDS: dict[str, tuple[str, str, _Adder]] = {}


def command(name: str, module: str, help_text: str) -> Callable[[_Adder], _Adder]:
    def register(add_arguments: _Adder) -> _Adder:
        _COMMANDS[name] = (module, help_text, add_arguments)
        return add_arguments

    return register


class _JobParser(argparse.ArgumentParser):
    """A subcommand's parser; ``--help`` of a job with a config lists its keys (the config class imported only then)."""

    config_class: str | None = None  # "module:ClassName"

    def format_help(self) -> str:
        text = super().format_help()
        if self.config_class is None:
            return text
        module, name = self.config_class.split(":")
        keys = config_keys(getattr(importlib.import_module(module), name))
        return f"{text}\nconfig keys (--set KEY=VALUE; the class defaults, which --config presets override):\n{keys}\n"


def config_keys(cls: type, prefix: str = "") -> str:
    """One line per field of a config dataclass (nested ones expanded): ``key  type = default``."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    lines = []
    for field in dataclasses.fields(cls):
        if field.name.startswith("_"):
            continue
        kind = hints.get(field.name, field.type)
        if dataclasses.is_dataclass(kind):
            lines.append(config_keys(kind, f"{prefix}{field.name}."))
            continue
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "(required)"
        shown = getattr(kind, "__name__", None) if not typing.get_args(kind) else None
        key = f"{prefix}{field.name}"
        lines.append(f"  {key:<28} {shown or str(kind).replace('typing.', '')} = {default}")
    return "\n".join(lines)


def _config_args(parser: argparse.ArgumentParser, default: str | None = None, config: str | None = None) -> None:
    if isinstance(parser, _JobParser):
        parser.config_class = config
    parser.add_argument("--config", default=default, help="YAML file or preset name in jobs/configs/")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field (dotted keys, YAML values); repeatable",
    )


def _seconds(value: str) -> float:
    seconds = float(value)
    if not seconds >= 0:  # also refuses nan
        msg = f"{value!r}: expected seconds >= 0"
        raise argparse.ArgumentTypeError(msg)
    return seconds


def image_size_arg(value: str) -> int | tuple[int, int]:
    """``--image-size``: ``S`` (a square input) or ``HxW`` (e.g. ``320x128`` for parts shot at 2.5:1)."""
    parts = value.lower().split("x")
    if len(parts) in (1, 2) and all(part.strip().isdigit() for part in parts):
        sides = tuple(int(part) for part in parts)
        return sides[0] if len(sides) == 1 else sides
    msg = f"{value!r}: expected S or HxW in pixels (e.g. 192 or 320x128)"
    raise argparse.ArgumentTypeError(msg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsdn",
        description="Train, batch-score and serve TSDN anomaly-detection models on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"tsdn-platform {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and Ray's own INFO logs and progress bars"
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of a failure")
    # Also accepted after the subcommand; SUPPRESS keeps a subcommand's absent flag from hiding the top-level one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    # ``python -m jobs.<name>`` puts every argument after the subcommand: a submitted job's ``--verbose``.
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_JobParser)
    for name, (module, help_text, add_arguments) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _original(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, rather than the RayTaskError whose text is a remote traceback."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is not None and isinstance(exc, ray_exceptions.RayTaskError) and exc.cause is not None:
        return _original(exc.cause)
    return exc


def exit_status(exc: BaseException) -> int:
    """The exit status of a failed command (see the module docstring)."""
    # Imported here, on the failure path only: they pull in pyarrow, which `tsdn --help` does not need.
    from tsdn_platform import store
    from tsdn_platform.registry import RegistryError

    exc = _original(exc)
    if isinstance(exc, store.StoreError):
        return 3 if exc.transient or exc.kind == store.ERROR else 2
    if isinstance(exc, (ValueError, LookupError, RegistryError)):  # ConfigError, IngestError are ValueErrors
        return 2
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["TSDN_VERBOSE"] = "1"  # tsdn_platform.ray_session.VERBOSE_ENV; workers inherit it
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        module = importlib.import_module(args._module)
        return int(module.main(args) or 0)
    except Exception as exc:
        status = exit_status(exc)
        if args.debug:
            traceback.print_exc()
        cause = _original(exc)
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if status == 1 and not isinstance(cause, RuntimeError):
            detail = f"{type(cause).__name__}: {detail}"
        hint = "" if args.debug else " (--debug shows the traceback)"
        print(f"tsdn {args.command}: {detail}{hint if status == 1 else ''}", file=sys.stderr)
        return status


# --- subcommands -------------------------------------------------------------------------------
# Each module named here exposes ``main(args: argparse.Namespace) -> int``.


@command("serve", "tsdn_platform.serve", "Serve the best model of every product line over HTTP (Ray Serve)")
def _serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="store URI holding registry/ (local folder or s3://bucket/prefix)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    _config_args(p, config="tsdn_platform.serve:ServeConfig")


@command("train", "tsdn_platform.train", "Train one model per product line and family on Ray and register it")
def _train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="store URI (s3://bucket/prefix or a folder) holding datasets/, runs/, registry/")
    p.add_argument("--dataset", help="ingested dataset name (<store>/datasets/<name>)")
    p.add_argument("--products", help="comma-separated product lines, or 'all' (default: all)")
    p.add_argument("--families", help="comma-separated model families, tsdn and/or patchcore (default: the preset's)")
    p.add_argument("--promote", choices=("better", "always", "never"), help="best-pointer policy (default: better)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    _config_args(p, default="demo", config="tsdn_platform.train:TrainConfig")


@command("models", "tsdn_platform.registry", "List, show and promote registered model versions")
def _models(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="versions per product, the best marked with *")
    listing.add_argument("--product", help="only this product")
    show = actions.add_parser("show", help="best pointer and metrics.json of a version (default: the best)")
    show.add_argument("product")
    show.add_argument("version", nargs="?")
    promote = actions.add_parser("promote", help="make a version the best (a human override)")
    promote.add_argument("product")
    promote.add_argument("version")
    promote.add_argument("--reason", default="manual promotion", help="recorded in best.json")
    promote.add_argument("--expected-generation", type=int, help="fail if the pointer is no longer at this generation")
    for action in (listing, show, promote):
        action.add_argument("--store", required=True, help="store URI (s3://bucket/prefix or a folder)")
        action.add_argument(
            "--store-retry-s",
            type=_seconds,
            default=60.0,  # store.DEFAULT_RETRY_S, spelt out: importing the store here would pull in pyarrow
            help="how long an unreachable, throttling or failing store is retried before exit 3 (default 60)",
        )


@command("demo-data", "tsdn_platform.demo_data", "Write the MVTec-style demo dataset made from skimage textures")
def _demo_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--products", help="comma-separated subset of brick,grass,gravel (default: all)")
    p.add_argument("--n-train", type=int, default=40, help="train/good images per product")
    p.add_argument("--n-test-good", type=int, default=30, help="test/good images per product")
    p.add_argument("--n-defects-per-type", type=int, default=4, help="test images per defect type and product")
    p.add_argument(
        "--defect-style",
        choices=["clear", "subtle"],
        default="clear",
        help="clear (default): defects a person can find on every texture; "
        "subtle: faint on purpose (the validation's style)",
    )


@command("ingest", "tsdn_platform.ingest", "Ingest an MVTec-style tree (folder or s3:// prefix) into Parquet shards")
def _ingest(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", help="MVTec-style root: a folder or an s3:// prefix")
    p.add_argument("--store", help="store URI (s3://bucket/prefix or a folder); shards go to <store>/datasets/<name>")
    p.add_argument("--dataset", help="dataset name")
    p.add_argument("--products", help="comma-separated product lines (default: every folder with train/good)")
    p.add_argument(
        "--image-size",
        type=image_size_arg,
        help="training resolution of the superpixel maps: S or HxW, e.g. 320x128 (default 352)",
    )
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    _config_args(p, config="tsdn_platform.ingest:IngestConfig")


@command("pipeline", "tsdn_platform.pipeline", "ingest -> train -> score for a set of product lines, as one job")
def _pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", help="MVTec-style root: a folder or an s3:// prefix")
    p.add_argument("--store", help="store URI (s3://bucket/prefix or a folder)")
    p.add_argument("--dataset", help="dataset name")
    p.add_argument("--products", help="comma-separated product lines (default: all)")
    p.add_argument("--output", help="score output URI (default <store>/scores/<dataset>-test)")
    p.add_argument("--report", help="folder for an HTML report of the most anomalous test images")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    _config_args(p, config="tsdn_platform.pipeline:PipelineConfig")


@command("demo", "tsdn_platform.demo", "The embedded default end to end: demo data, ingest, train, score, report")
def _demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=".tsdn/demo", help="where data, store and report go (default .tsdn/demo)")
    p.add_argument("--seed", type=int, default=0, help="demo dataset seed")
    p.add_argument("--fresh", action="store_true", help="delete the work folder first")


@command("export", "tsdn_platform.export", "Export a registered version as ONNX or OpenVINO IR (the whole graph)")
def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("product", help="product line")
    p.add_argument("--version", help="the version to export (default: the best)")
    p.add_argument("--store", required=True, help="store URI holding registry/ (s3://bucket/prefix or a folder)")
    p.add_argument("--format", required=True, choices=("onnx", "openvino"), help="onnx (ONNX Runtime) or openvino (IR)")
    p.add_argument("--out", help="folder to write the export to (what `tsdn predict --model` reads)")
    p.add_argument("--register", action="store_true", help="store it in the registry beside the version's weights")


@command("predict", "tsdn_platform.edge", "Score image files with an exported model: no Ray, no torch (edge boxes)")
def _predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, BMP, TIFF)")
    p.add_argument("--model", required=True, help="an export folder (tsdn export --out DIR)")
    p.add_argument("--runtime", choices=("onnxruntime", "openvino"), help="default: the export's own")
    p.add_argument("--threshold", type=float, help="raw-score threshold override (default: the calibrated one)")
    p.add_argument(
        "--include", default="", help="comma-separated extras of the detect answer: mask, anomaly_map, heatmap"
    )
    p.add_argument("--out", help="write the JSON lines to this file instead of stdout")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")


@command("score", "tsdn_platform.score", "Batch-score images with each product's best model into Parquet (Ray Data)")
def _score(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="store URI holding the registry (s3://bucket/prefix or a folder)")
    p.add_argument("--input", help="folder/S3 prefix of raw images, or ingested shards (.../<product>/test)")
    p.add_argument("--output", help="output URI: <product>/part-*.parquet + _manifest.json")
    routing = p.add_mutually_exclusive_group()
    routing.add_argument("--product", help="product line of every input (filters ingested shards)")
    routing.add_argument("--product-from-path", help="path pattern naming the product, e.g. '{product}/**'")
    p.add_argument("--version", help="pin this model version instead of the registry's best")
    p.add_argument("--report", help="folder for an HTML report of the most anomalous images")
    p.add_argument("--report-max-images", type=int, help="most image cards in the report (default 400)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    _config_args(p, config="tsdn_platform.score:ScoreConfig")


if __name__ == "__main__":
    sys.exit(main())
