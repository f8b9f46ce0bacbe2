"""The documentation is checked like code.

README.md is the page a newcomer reads in five minutes, so its size is bounded; everything else lives in
docs/. Links rot silently and documented flags drift from the parsers, so: every relative link in README.md
and docs/*.md must resolve (the file, and for `#anchor` a heading of that page), every `imgcls ...` command in
a fenced example (and in every `--help` epilog) must parse with the real argparse parser
(`imgcls.cli.build_parser`), the cheap ones (`--help`, `imgcls backbones`) run for real, the README's quick
start serve/predict/batch lines run against a real server, the reference flag tables name only real flags and
every flag is explained on some topic page, and Python examples must compile and import what exists.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgcls.cli import build_parser

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture (the tiny model repository)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
IMGCLS = Path(sys.executable).with_name("imgcls")

# A newcomer's five minutes (issue 20): at most ~300 lines, and no wall of tables hiding behind short lines.
README_MAX_LINES = 300
README_MAX_BYTES = 24_000


@dataclass(frozen=True)
class Block:
    """One fenced code block: its info string (language), its lines and the page line it starts on."""

    page: Path
    lang: str
    lines: tuple[str, ...]
    line: int


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def fenced_blocks(page: Path) -> list[Block]:
    blocks: list[Block] = []
    fence: str | None = None
    lang, body, start = "", [], 0
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.lstrip()
        if fence is None:
            match = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if match:
                fence, lang, body, start = match.group(1), match.group(2).lower(), [], number
        elif stripped.startswith(fence) and not stripped[len(fence):].strip():
            blocks.append(Block(page, lang, tuple(body), start))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{_rel(page)}: code block opened at line {start} is never closed"
    return blocks


def prose_lines(page: Path) -> list[tuple[int, str]]:
    """The page's lines outside fenced code blocks, with their line numbers."""
    inside: set[int] = set()
    for block in fenced_blocks(page):
        inside.update(range(block.line, block.line + len(block.lines) + 2))
    lines = page.read_text(encoding="utf-8").splitlines()
    return [(n, line) for n, line in enumerate(lines, 1) if n not in inside]


# ---------------------------------------------------------------- headings and links

def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger): link text kept, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # [text](url) -> text
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_' (unicode too, like GitHub)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, line in prose_lines(page):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(page: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in prose_lines(page):
        line = re.sub(r"`[^`]*`", "", line)  # a [x](y) inside inline code is not a link
        found += [(number, target) for target in LINK.findall(line)]
    return found


def relative_links() -> list[tuple[Path, int, str]]:
    return [(page, number, target) for page in PAGES for number, target in links(page)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: ... are not checked here


def test_readme_is_short() -> None:
    text = README.read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (limit {README_MAX_LINES}): move detail to docs/"
    assert len(text.encode()) <= README_MAX_BYTES, f"README.md is {len(text.encode())} bytes (limit {README_MAX_BYTES})"


def test_link_checker_finds_links_and_anchors() -> None:
    """The checker itself: it sees README's links to docs/, and slugs headings as GitHub does."""
    targets = [target for _, target in links(README)]
    assert any(t.startswith("docs/") and "#" in t for t in targets), targets
    assert github_slug("KServe v2 / Open Inference Protocol (`inference.GRPCInferenceService`)") == \
        "kserve-v2--open-inference-protocol-inferencegrpcinferenceservice"
    assert github_slug("Export formats (`imgcls export`, `benchmarks/bench_export.py`)") == \
        "export-formats-imgcls-export-benchmarksbench_exportpy"
    assert github_slug("2026-11-22: the first measurements (issues 2-7)") == \
        "2026-11-22-the-first-measurements-issues-2-7"


@pytest.mark.parametrize("page,line,target", relative_links(),
                         ids=[f"{_rel(p)}:{n}:{t}" for p, n, t in relative_links()])
def test_relative_link_resolves(page: Path, line: int, target: str) -> None:
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    where = f"{_rel(page)}:{line}: link {target!r}"
    assert dest.exists(), f"{where}: {dest} does not exist"
    if anchor:
        assert dest.suffix == ".md", f"{where}: an anchor into a file that is not markdown"
        assert anchor in anchors(dest), f"{where}: no heading with anchor #{anchor} in {_rel(dest)}"


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    """A page nobody links to is a page nobody reads: each docs/*.md is linked from README or docs/index.md."""
    linked: set[Path] = set()
    for page in (README, DOCS / "index.md"):
        for _, target in links(page):
            path = target.partition("#")[0]
            if path and not re.match(r"[a-z][a-z0-9+.-]*:", path):
                linked.add((page.parent / path).resolve())
    orphans = [_rel(p) for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"not linked from README.md or docs/index.md: {orphans}"


def test_readme_install_line_matches_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    extras = re.search(r"pip install -q -e \"(\.\[[^\]]*\])\"", makefile)
    assert extras, "the Makefile's install line changed shape; update this test"
    assert f'pip install -e "{extras.group(1)}"' in README.read_text(encoding="utf-8"), \
        f"README.md must give the install line the Makefile runs: {extras.group(1)}"


# ---------------------------------------------------------------- commands

@dataclass(frozen=True)
class Command:
    page: Path
    line: int
    argv: tuple[str, ...]  # without the leading "imgcls"

    def __str__(self) -> str:
        return f"{_rel(self.page)}:{self.line}: imgcls {shlex.join(self.argv)}"


SHELL_SEPARATORS = {"&&", "||", ";", "|", "&"}


def shell_commands(block: Block) -> list[tuple[int, list[str]]]:
    """Each simple command of a shell-like block: continuation lines joined, `$ ` prompts and comments dropped,
    split at `&&`, `|`, `;` and `&`, redirections removed."""
    found: list[tuple[int, list[str]]] = []
    logical, start = "", 0
    for offset, raw in enumerate(block.lines):
        line = raw.rstrip()
        if not logical:
            start = block.line + 1 + offset
            line = re.sub(r"^\s*\$\s+", "", line)
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        try:
            tokens = shlex.split(logical, comments=True)
        except ValueError:  # not shell (program output, YAML ...)
            tokens = []
        logical = ""
        command: list[str] = []
        for token in [*tokens, ";"]:
            if token in SHELL_SEPARATORS:
                if command:
                    found.append((start, command))
                command = []
            elif re.match(r"\d?>>?", token) or (command and re.match(r"\d?>>?", command[-1])):
                continue  # a redirection and its target
            else:
                command.append(token)
    return found


SHELL_LANGS = {"", "sh", "bash", "shell", "console", "text"}


def documented_commands() -> list[Command]:
    commands = []
    for page in PAGES:
        for block in fenced_blocks(page):
            if block.lang not in SHELL_LANGS:
                continue
            for line, argv in shell_commands(block):
                while argv and re.match(r"[A-Z_][A-Z0-9_]*=", argv[0]):
                    argv = argv[1:]  # IMGCLS_TARGET=... imgcls predict ...
                if argv and Path(argv[0]).name == "imgcls":
                    commands.append(Command(page, line, tuple(argv[1:])))
    return commands


COMMANDS = documented_commands()


def parse(argv: tuple[str, ...]) -> tuple[int, str]:
    """Parse with the real parser; (exit status, stderr). 0 for a parsed command or `--help`."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            build_parser().parse_args(list(argv))
        except SystemExit as exc:
            return int(exc.code or 0), err.getvalue()
    return 0, err.getvalue()


def test_commands_are_found_in_the_docs() -> None:
    """The extractor itself: README's quick start is found, every subcommand has a documented example."""
    readme = {c.argv[0] for c in COMMANDS if c.page == README and c.argv}
    assert {"train", "export", "serve", "predict", "batch"} <= readme, readme
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    documented = {c.argv[0] for c in COMMANDS if c.argv}
    assert not set(sub.choices) - documented, f"subcommands without a fenced example: {set(sub.choices) - documented}"


def test_parser_check_rejects_an_unknown_flag() -> None:
    status, err = parse(("train", "--no-such-flag", "1"))
    assert status == 2 and "--no-such-flag" in err


@pytest.mark.parametrize("command", COMMANDS, ids=[str(c) for c in COMMANDS])
def test_documented_command_parses(command: Command) -> None:
    status, err = parse(command.argv)
    assert status == 0, f"{command}\ndoes not parse with imgcls.cli.build_parser():\n{err}"


def epilog_examples() -> list[tuple[str, tuple[str, ...]]]:
    """The examples each subcommand's --help shows (its epilog): (subcommand, argv)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    examples = []
    for name, parser in sub.choices.items():
        block = Block(README, "sh", tuple((parser.epilog or "").splitlines()), 0)
        for _, argv in shell_commands(block):
            while argv and re.match(r"[A-Z_][A-Z0-9_]*=", argv[0]):
                argv = argv[1:]
            if argv and argv[0] == "imgcls":
                examples.append((name, tuple(argv[1:])))
    return examples


@pytest.mark.parametrize("name,argv", epilog_examples(), ids=[" ".join(a) for _, a in epilog_examples()])
def test_help_example_parses(name: str, argv: tuple[str, ...]) -> None:
    """The examples in `imgcls COMMAND --help` are held to the same parser as the docs'."""
    status, err = parse(argv)
    assert status == 0, f"an example in imgcls {name} --help does not parse: imgcls {shlex.join(argv)}\n{err}"


CHEAP = [c for c in COMMANDS if c.argv and (c.argv[-1] in ("--help", "-h", "--version") or c.argv == ("backbones",))]


@pytest.mark.parametrize("argv", sorted({("--help",), ("backbones",), *(c.argv for c in CHEAP)}),
                         ids=lambda argv: "imgcls " + " ".join(argv))
def test_cheap_command_runs(argv: tuple[str, ...]) -> None:
    """`imgcls --help`, `imgcls backbones` and every documented `... --help` run for real, quietly and fast."""
    result = subprocess.run([str(IMGCLS), *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    if argv[-1] in ("--help", "-h"):
        assert "usage: imgcls" in result.stdout


def test_documented_backbones_are_the_registry() -> None:
    """The backbone tables in docs/ name exactly what `imgcls backbones` lists."""
    result = subprocess.run([str(IMGCLS), "backbones"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip()}
    assert "mobilenet_v2" in listed
    pages = [DOCS / "training.md", DOCS / "backbones.md"]
    text = "\n".join(p.read_text(encoding="utf-8") for p in pages if p.exists())
    undocumented = sorted(name for name in listed if not re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text))
    assert not undocumented, f"backbones missing from docs/training.md and docs/backbones.md: {undocumented}"
    table = re.search(r"^## Backbones\n(.*?)(?=^## |\Z)", (DOCS / "training.md").read_text(encoding="utf-8"),
                      re.S | re.M)
    assert table, "docs/training.md has no Backbones section"
    named = {name.strip().removesuffix("(default)").strip()
             for row in re.findall(r"^\| ([^|]+) \|", table.group(1), re.M)[2:] for name in row.split(",")}
    assert named - listed == set(), f"docs/training.md names backbones imgcls does not have: {named - listed}"


# ---------------------------------------------------------------- other examples

def test_documented_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w.-]+):", makefile, re.M))
    missing = [f"{_rel(b.page)}:{line}: make {argv[1]}" for page in PAGES for b in fenced_blocks(page)
               if b.lang in SHELL_LANGS for line, argv in shell_commands(b)
               if argv[0] == "make" and len(argv) > 1 and not argv[1].startswith("-") and argv[1] not in targets]
    assert not missing, f"make targets the Makefile does not have: {missing}"


def test_documented_scripts_exist() -> None:
    """`python benchmarks/x.py ...`, `bash scripts/x.sh`: the file is in the repository."""
    missing = []
    for page in PAGES:
        for block in fenced_blocks(page):
            if block.lang not in SHELL_LANGS:
                continue
            for line, argv in shell_commands(block):
                script = argv[1] if Path(argv[0]).name in ("python", "python3", "bash") and len(argv) > 1 else ""
                if re.match(r"(benchmarks|scripts|proto|tests)/", script) and not (ROOT / script).exists():
                    missing.append(f"{_rel(page)}:{line}: {script}")
    assert not missing, f"documented scripts that do not exist: {missing}"


PYTHON_BLOCKS = [b for page in PAGES for b in fenced_blocks(page) if b.lang in ("python", "py")]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"{_rel(b.page)}:{b.line}" for b in PYTHON_BLOCKS])
def test_python_example_compiles_and_its_imgcls_imports_exist(block: Block) -> None:
    source = "\n".join(block.lines)
    tree = ast.parse(source, filename=f"{_rel(block.page)}:{block.line}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "imgcls":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), \
                    f"{_rel(block.page)}:{block.line}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "imgcls":
                    importlib.import_module(alias.name)
    # `import imgcls` then `imgcls.NAME`: the package has NAME (its API names load lazily, cheaply)
    import imgcls

    aliases = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names if alias.name == "imgcls"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            assert hasattr(imgcls, node.attr), f"{_rel(block.page)}:{block.line}: imgcls has no {node.attr}"


# ---------------------------------------------------------------- flag tables against the parsers

FLAG_TABLES = [("serving.md", "serve"), ("batch-jobs.md", "batch"), ("export.md", "export")]


def parser_flags(command: str) -> list[set[str]]:
    """The `--` option strings of each option of `imgcls COMMAND` (aliases and --no- forms together)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = [{flag for flag in action.option_strings if flag.startswith("--")}
               for action in sub.choices[command]._actions if action.help != argparse.SUPPRESS]
    return [flags for flags in options if flags and flags != {"--help"}]


def table_flags(page: Path) -> set[str]:
    """Flags named in the first column of the page's tables (rows like | `--port` | ...)."""
    flags: set[str] = set()
    for _, line in prose_lines(page):
        cell = re.match(r"\|\s*(`--[^|]*)\|", line)
        if cell:
            flags.update(re.findall(r"--[a-z][\w-]*", cell.group(1)))
    return flags


def topic_flags() -> set[str]:
    """Every `--flag` named on a topic page of docs/ (cli.md, generated from the parsers, does not count)."""
    return {flag for page in DOCS.glob("*.md") if page.name != "cli.md"
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", page.read_text(encoding="utf-8"))}


@pytest.mark.parametrize("page,command", FLAG_TABLES, ids=[f"{p}:{c}" for p, c in FLAG_TABLES])
def test_flag_table_matches_the_parser(page: str, command: str) -> None:
    """The reference table of `imgcls COMMAND` names only flags it has, and every option it has is explained on
    a topic page: this table, or the page of its feature (docs/cli.md alone, generated, does not count)."""
    documented, options = table_flags(DOCS / page), parser_flags(command)
    unknown = sorted(documented - set().union(*options))
    assert not unknown, f"docs/{page} documents flags that imgcls {command} does not have: {unknown}"
    explained = documented | topic_flags()
    unexplained = sorted(" / ".join(sorted(flags)) for flags in options if not flags & explained)
    assert not unexplained, f"options of imgcls {command} explained on no docs/ page but cli.md: {unexplained}"


# ---------------------------------------------------------------- the README's quick start, run

def quick_start() -> dict[str, list[str]]:
    """The README's quick-start commands by subcommand (the fenced block that trains, exports and serves)."""
    for block in fenced_blocks(README):
        commands = {argv[1]: argv for _, argv in shell_commands(block) if argv[0] == "imgcls" and len(argv) > 1}
        if {"train", "export", "serve", "predict", "batch"} <= set(commands):
            return commands
    raise AssertionError("README.md has no quick-start block with train, export, serve, predict and batch")


def metrics_curl_examples() -> list[tuple[str, str]]:
    """Documented curl commands against the metrics port (localhost:8000), as written: (where, command line).
    docs/http.md's curl examples have their own test (tests/test_http_docs.py)."""
    found = []
    for page in PAGES:
        for block in fenced_blocks(page):
            if block.lang not in SHELL_LANGS:
                continue
            for offset, line in enumerate(block.lines):
                one_line = not line.rstrip().endswith("\\")
                if re.match(r"\s*(\$\s+)?curl\s", line) and "localhost:8000" in line and one_line:
                    found.append((f"{_rel(page)}:{block.line + 1 + offset}", re.sub(r"^\s*\$\s+", "", line)))
    return found


@pytest.mark.slow
def test_readme_quick_start_serves_predicts_and_batches(service_repo: Path, tmp_path: Path) -> None:
    """The README's serve, predict and batch lines run verbatim (ports come from the environment, as every
    serve flag can) on a published copy of the tiny fixture model under the README's model name; train and
    export are too slow for here and are parsed above (tests/test_train.py and test_export.py run them)."""
    from service_fixtures import TINY_CLASSES, sample_image

    from imgcls.manifest import parse_manifest, read_manifest, write_manifest

    commands = quick_start()
    serve, predict, batch = commands["serve"], commands["predict"], commands["batch"]
    name = batch[batch.index("--model") + 1]
    assert predict[predict.index("--model") + 1] == name
    repo = tmp_path / serve[serve.index("--model-repository") + 1]
    shutil.copytree(service_repo / "tiny" / "2", repo / name / "1")
    manifest = read_manifest(repo / name / "1").model_dump(mode="json")
    write_manifest(repo / name / "1", parse_manifest({**manifest, "name": name, "version": 1}))
    for i, path in enumerate(a for a in predict[2:] if not a.startswith("-") and a != name):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(sample_image(i))
    folder = tmp_path / batch[batch.index("--input") + 1]
    for i in range(5):
        (folder / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{i % 2}" / f"{i}.jpg").write_bytes(sample_image(10 + i))

    env = {**os.environ, "IMGCLS_HOST": "127.0.0.1", "IMGCLS_PORT": "0", "IMGCLS_METRICS_PORT": "0",
           "IMGCLS_HTTP_PORT": "-1", "IMGCLS_WORKERS": "1", "IMGCLS_INFERENCE_THREADS": "1",
           "IMGCLS_DECODE_WORKERS": "1", "IMGCLS_GRACE_PERIOD": "5"}
    env.pop("IMGCLS_TARGET", None)
    server = subprocess.Popen([str(IMGCLS), *serve[1:]], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        log = []
        for line in server.stderr:  # ends when the server exits: the assertion below then shows why
            log.append(line)
            port = re.search(r"gRPC on [\d.]+:(\d+), metrics on [\d.]+:(\d+)", line)
            if port:
                break
        assert port, f"imgcls serve did not start:\n{''.join(log)}"
        threading.Thread(target=lambda: [log.append(line) for line in server.stderr], daemon=True).start()
        env["IMGCLS_TARGET"] = f"127.0.0.1:{port[1]}"

        shown = subprocess.run([str(IMGCLS), *predict[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=120)
        assert shown.returncode == 0, shown.stderr
        assert any(label in shown.stdout for label in TINY_CLASSES), shown.stdout

        done = subprocess.run([str(IMGCLS), *batch[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        output = tmp_path / batch[batch.index("--output") + 1]
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        assert len(rows) == 5 and all(row["model"] == name and row["labels"] for row in rows), rows

        examples = metrics_curl_examples() if shutil.which("curl") else []  # docs/deployment.md's rollout check
        assert examples or not shutil.which("curl"), "no documented curl of the metrics port found"
        for where, command in examples:
            script = command.replace("localhost:8000", f"127.0.0.1:{port[2]}")
            ran = subprocess.run(["bash", "-o", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                                 text=True, timeout=60)
            assert ran.returncode == 0 and ran.stdout.strip(), f"{where}: {command}\n{ran.stdout}{ran.stderr}"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(30) == 0, "".join(log)  # the documented drain: SIGTERM, exit 0
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(10)
