"""The `imgcls` console command: one entry point, a subcommand per stage.

Each stage contributes a light `cli` module (argparse only; heavy libraries are imported inside the
command), so `imgcls serve` with an ONNX model never loads TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from imgcls import __version__
from imgcls.errors import ImgclsError

# Stage CLI modules; a stage that is not installed (e.g. training in the slim serving image) is skipped.
STAGE_CLIS = ("imgcls.training.cli", "imgcls.export.cli", "imgcls.service.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgcls", description="Turn a folder of labelled photos into a served image classifier."
    )
    parser.add_argument("--version", action="version", version=f"imgcls {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in STAGE_CLIS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # stage not installed
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ImgclsError as exc:
        print(f"imgcls {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"imgcls {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `imgcls ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
