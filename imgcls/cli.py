# PYTHON_ARGCOMPLETE_OK
"""The `imgcls` console command: one entry point, a subcommand per stage.

Each stage contributes a light `cli` module (argparse only; heavy libraries are imported inside the
command), so `imgcls serve` with an ONNX model never loads TensorFlow, and `imgcls --help` (or shell
completion, docs/cli.md) answers at once.

TensorFlow's C++ logging (oneDNN, CUDA, cpu feature lines) and absl's are switched off before any command
can import TensorFlow, unless `-v`: a user error must read as one line, not as one line after a screen of
library chatter.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

from imgcls import __version__, logs
from imgcls.cli_format import HelpFormatter, examples
from imgcls.errors import ImgclsError

# Stage CLI modules; a stage that is not installed (e.g. training in the slim serving image) is skipped.
STAGE_CLIS = ("imgcls.training.cli", "imgcls.export.cli", "imgcls.service.cli", "imgcls.client.cli")

# Set before TensorFlow (or grpc) is imported, only when the user has not set them: TensorFlow's C++ logging
# at FATAL only (no "oneDNN custom operations" or "Unable to register cuDNN factory" lines), no VLOG, and
# grpc's core logging at ERROR. What TensorFlow prints while its libraries load, before its logging is set
# up, is silenced by `_QuietImport`.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_CPP_MAX_VLOG_LEVEL": "-1", "GRPC_VERBOSITY": "ERROR"}
QUIET_LOGGERS = ("tensorflow", "absl", "h5py", "matplotlib", "PIL", "tf2onnx")


def quiet_libraries(verbose: bool) -> None:
    """Keep TensorFlow's, absl's and grpc's own logs off unless `verbose` (see the module docstring)."""
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if not any(isinstance(finder, _QuietImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null (C++ code writes there directly, past `sys.stderr`)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Runs the first `import tensorflow` with stderr silenced.

    TensorFlow's native libraries log while they load, before absl's logging is set up and so whatever
    TF_CPP_MIN_LOG_LEVEL says ("All log messages before absl::InitializeLog() is called are written to
    STDERR", "Could not find cuda drivers on your machine"). Only the import is silenced; an import error
    still raises (and is reported) after stderr is back, and `-v` skips this altogether.
    """

    NAMES = frozenset({"tensorflow"})

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        # Only on the main thread: elsewhere (a server loading a SavedModel in the background) other threads'
        # lines would be lost with TensorFlow's.
        if fullname not in self.NAMES or threading.current_thread() is not threading.main_thread():
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self.inner  # the module keeps the real loader (resources, reloads)
        if module.__spec__ is not None:
            module.__spec__.loader = self.inner
        with _stderr_silenced():
            self.inner.exec_module(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgcls", formatter_class=HelpFormatter,
        description="Turn a folder of labelled photos into a served image classifier: train a bundle, export "
                    "it to a model repository, serve the repository over gRPC (native, KServe v2, TF Serving), "
                    "and classify files with predict or batch.",
        epilog=examples("imgcls train --data photos/ --out runs/mine",
                        "imgcls export --model runs/mine --repository runs/repo --name mine",
                        "imgcls serve --model-repository runs/repo",
                        "imgcls predict photo.jpg",
                        "imgcls batch --input photos/ --output results.jsonl",
                        "imgcls train --help   # any command's options (all of them: docs/cli.md)"),
    )
    parser.add_argument("--version", action="version", version=f"imgcls {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and TensorFlow's, absl's and grpc's own logs")
    parser.add_argument("--log-format", choices=logs.FORMATS, default=os.environ.get("IMGCLS_LOG_FORMAT", "text"),
                        help="text for people, json for log pipelines: one object per line (env IMGCLS_LOG_FORMAT, "
                             "default text)")
    parser.add_argument("--log-level", choices=logs.LEVELS, type=str.upper,
                        default=os.environ.get("IMGCLS_LOG_LEVEL", "INFO").upper(),
                        help="least severe level logged; -v means DEBUG (env IMGCLS_LOG_LEVEL, default INFO)")
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


def _autocomplete(parser: argparse.ArgumentParser) -> None:
    """Shell completion when argcomplete is installed (optional; docs/cli.md says how to turn it on)."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _autocomplete(parser)
    args = parser.parse_args(argv)
    quiet_libraries(args.verbose)
    level = "DEBUG" if args.verbose else args.log_level
    logs.configure(level, args.log_format)
    os.environ["IMGCLS_LOG_LEVEL"], os.environ["IMGCLS_LOG_FORMAT"] = level, args.log_format  # for child processes
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ImgclsError as exc:
        print(f"imgcls {args.command}: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print(f"imgcls {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `imgcls ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
