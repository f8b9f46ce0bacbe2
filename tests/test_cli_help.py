"""The command line a newcomer meets (issue 20): help for every option with its default said once, natural
--x/--no-x switches, a description and examples for every command, quiet libraries, one-line errors that
say what to do, exit codes as documented, shell completion, and docs/cli.md generated from the parsers."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from imgcls.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
IMGCLS = [sys.executable, "-m", "imgcls.cli"]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


COMMANDS = sorted(subcommands())


def option_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An option's help as printed (the formatter's additions and %(default)s expanded)."""
    return parser._get_formatter()._expand_help(action)


def run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("IMGCLS_", "TF_CPP", "ABSL_", "GRPC_"))}
    return subprocess.run([*IMGCLS, *args], capture_output=True, text=True, timeout=timeout,
                          env={**clean, **(env or {})})


# --- every parser, every option ---------------------------------------------------------------------------------

def test_the_walk_covers_every_stage():
    assert {"train", "evaluate", "backbones", "export", "serve", "predict", "batch"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_with_its_default_shown_once(name):
    parser = subcommands()[name]
    for action in parser._actions:
        text = option_help(parser, action)
        flag = "/".join(action.option_strings) or action.dest
        assert text and text.strip(), f"imgcls {name} {flag} has no help"
        assert "(default: None)" not in text and "default None" not in text, f"imgcls {name} {flag}: {text}"
        assert len(re.findall(r"\bdefault\b", text, re.IGNORECASE)) <= 1, f"imgcls {name} {flag}: {text}"
        shown = action.default not in (None, False, "", [], argparse.SUPPRESS) and action.option_strings and \
            not isinstance(action, argparse._HelpAction | argparse._VersionAction)
        if shown and not action.required:
            assert re.search(r"\bdefault\b", text, re.IGNORECASE), f"imgcls {name} {flag} hides its default: {text}"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_a_description_and_examples(name):
    parser = subcommands()[name]
    assert parser.description and len(parser.description) > 40, name
    assert parser.epilog and parser.epilog.startswith("examples:"), name
    assert any(line.strip().startswith(f"imgcls {name}") for line in parser.epilog.splitlines()[1:]), name
    assert parser.format_help().count("examples:") == 1


def test_switches_read_naturally():
    """A feature that is on by default is `--x, --no-x` (BooleanOptionalAction), never a bare `--no-x`."""
    for name, parser in subcommands().items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--no-"):
                    assert isinstance(action, argparse.BooleanOptionalAction), f"imgcls {name} {flag}"
    text = subcommands()["train"].format_help()
    assert "--feature-cache, --no-feature-cache" in " ".join(text.split())
    assert "(default: True)" not in text and "(default: on)" in text


def test_defaults_render_as_typed():
    export = " ".join(subcommands()["export"].format_help().split())
    assert "(default: all)" in export and "['all']" not in export


def test_serve_help_names_every_protocol_on_its_port():
    text = " ".join(subcommands()["serve"].format_help().split())
    assert "KServe v2" in text and "TF Serving" in text
    assert "default )" not in text  # an empty default is not shown


def test_batch_help_documents_the_exit_codes_it_returns():
    from imgcls.client import batch

    text = " ".join(subcommands()["batch"].description.split())
    for code, meaning in ((batch.EXIT_OK, "all files answered"), (batch.EXIT_FAILED_FILES, "some files failed"),
                          (2, "usage error"), (batch.EXIT_SERVER_GONE, "server unavailable"),
                          (batch.EXIT_INTERRUPTED, "interrupted")):
        assert f"{code} {meaning}" in text


# --- errors and logs, as a user sees them ------------------------------------------------------------------------

def test_train_on_a_missing_folder_is_one_line_and_exit_2():
    proc = run("train", "--data", "/nonexistent")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["imgcls train: error: --data /nonexistent does not exist (expected a "
                                        "folder with one subfolder of photos per class)"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_predict_without_a_server_names_the_target_and_the_fix(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    target = f"127.0.0.1:{_closed_port()}"
    proc = run("predict", "--target", target, "--timeout", "1", str(image))
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"imgcls predict: error: cannot reach {target}")
    assert f"is imgcls serve running at {target}? set --target or IMGCLS_TARGET" in last
    assert f"waiting for {target}" in proc.stderr and "Traceback" not in proc.stderr


def test_target_comes_from_the_environment(tmp_path):
    target = f"127.0.0.1:{_closed_port()}"
    proc = run("batch", "--input", str(tmp_path), "--output", str(tmp_path / "o.jsonl"), "--retries", "0",
               env={"IMGCLS_TARGET": target})
    assert proc.returncode == 3 and f"cannot reach {target}" in proc.stderr


@pytest.mark.slow
def test_tensorflow_import_is_silent_unless_verbose():
    """What every TensorFlow-loading command does before importing it (imgcls.cli.quiet_libraries)."""
    code = ("import sys; from imgcls.cli import quiet_libraries; quiet_libraries(False); import tensorflow as tf;"
            "tf.constant(1.0).numpy(); print('ok', file=sys.stderr)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "ABSL_", "GRPC_"))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=clean)
    assert proc.returncode == 0 and proc.stderr.splitlines() == ["ok"], proc.stderr


# --- completion and the generated reference ----------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("argcomplete") is None, reason="argcomplete not installed")
@pytest.mark.parametrize("line,expected", [("imgcls tr", "train"), ("imgcls train --fea", "--feature-cache"),
                                           ("imgcls batch --format j", "jsonl")])
def test_shell_completion(tmp_path, line, expected):
    out = tmp_path / "completions"
    env = {"_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line, "COMP_POINT": str(len(line)),
           "_ARGCOMPLETE_STDOUT_FILENAME": str(out)}
    proc = run(env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert expected in out.read_text().split()


def test_docs_cli_md_is_generated_from_the_parsers():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_cli_docs
    finally:
        sys.path.pop(0)
    expected = gen_cli_docs.render()
    assert (ROOT / "docs" / "cli.md").read_text() == expected, \
        "docs/cli.md differs from the parsers: run python scripts/gen_cli_docs.py"
    for name in COMMANDS:
        assert f"## imgcls {name}\n" in expected
