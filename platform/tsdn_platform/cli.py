"""The ``tsdn`` command line. One subcommand per job; each imports its module only when it runs,
so ``tsdn --help`` stays fast and does not start Ray."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
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


def _config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default, help="YAML file or preset name in jobs/configs/")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field (dotted keys, YAML values); repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsdn",
        description="Train, batch-score and serve TSDN anomaly-detection models on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"tsdn-platform {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text, add_arguments) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(args._module)
    return int(module.main(args) or 0)


# --- subcommands -------------------------------------------------------------------------------
# Each module named here exposes ``main(args: argparse.Namespace) -> int``.


@command("serve", "tsdn_platform.serve", "Serve the best model of every product line over HTTP (Ray Serve)")
def _serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="store URI holding registry/ (local folder or s3://bucket/prefix)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    _config_args(p)


if __name__ == "__main__":
    sys.exit(main())
