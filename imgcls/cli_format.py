"""How every `imgcls` subcommand's help looks: one formatter and one way to add a subcommand.

Argparse only (the stages' CLI modules import this at start-up, so it must stay light). Why a formatter of
our own rather than `ArgumentDefaultsHelpFormatter`: that one appends "(default: X)" to every option, so
options whose help already says their default showed it twice, options without a default showed
"(default: None)", and `--no-x` flags showed "(default: True)". Here the default is shown exactly once:

- help that already mentions a default (or uses `%(default)s`) is left as it is;
- no default (None, False for a switch, an empty string or list) adds nothing;
- a `BooleanOptionalAction` (`--feature-cache, --no-feature-cache`) says "(default: on)" or "(default: off)";
- anything else gets "(default: X)".

Descriptions and epilogs are wrapped paragraph by paragraph, except lines indented by two spaces, which are
kept as written: the examples in every epilog stay copy-pasteable.
"""

from __future__ import annotations

import argparse
import re
import textwrap
from collections.abc import Sequence
from typing import Any

_DEFAULT_MENTIONED = re.compile(r"\bdefault\b|%\(default\)", re.IGNORECASE)
# Python 3.11's BooleanOptionalAction appends this to its help itself (3.13 no longer does).
_BOOL_SUFFIX = " (default: %(default)s)"


class HelpFormatter(argparse.HelpFormatter):
    """Defaults shown once, examples kept verbatim (see the module docstring)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 30,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, width)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text is None or text == argparse.SUPPRESS:
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            text = text.replace(_BOOL_SUFFIX, "")
            if action.default is None or action.default == argparse.SUPPRESS or _DEFAULT_MENTIONED.search(text):
                return text
            return f"{text} (default: {'on' if action.default else 'off'})"
        if _DEFAULT_MENTIONED.search(text) or not action.option_strings or action.required:
            return text
        if not describes_default(action.default) or isinstance(action, _NO_DEFAULT_ACTIONS):
            return text
        if isinstance(action.default, list | tuple):  # nargs="+": as one would type it, not a Python list
            shown = " ".join(map(str, action.default)).replace("%", "%%")
            return f"{text} (default: {shown})"
        return f"{text} (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in textwrap.dedent(text).strip("\n").split("\n\n"):
            if any(line.startswith("  ") for line in block.splitlines()):
                blocks.append(textwrap.indent(block, indent))  # examples: as written
            else:
                blocks.append(textwrap.fill(" ".join(block.split()), width, initial_indent=indent,
                                            subsequent_indent=indent))
        return "\n\n".join(blocks)


_NO_DEFAULT_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
                       argparse._VersionAction, argparse._AppendAction, argparse._CountAction)


def describes_default(value: Any) -> bool:
    """Whether a default is worth printing (None, empty and SUPPRESS are not)."""
    if value is None or value is argparse.SUPPRESS or value is False:
        return False
    return not (isinstance(value, str | list | tuple) and len(value) == 0)


def examples(*lines: str) -> str:
    """An epilog: 'examples:' and one indented command per line."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_command(sub: argparse._SubParsersAction, name: str, *, help: str, description: str,
                examples: Sequence[str], aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A subcommand with the shared formatter, a description and an example epilog (tests/test_cli_help.py
    checks every subcommand has both)."""
    return sub.add_parser(name, help=help, description=description, epilog=_examples(*examples),
                          formatter_class=HelpFormatter, aliases=list(aliases))


_examples = examples
