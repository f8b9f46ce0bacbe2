"""The design's boundaries, checked on the source: stages talk through files, not imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The client side (client/: predict, batch, the Python clients) is a stage like the others: it talks to the
# server over the wire only, so the server never imports it and it never imports the server.
STAGES = {"training": "imgcls.training", "export": "imgcls.export", "service": "imgcls.service",
          "client": "imgcls.client"}
# Core modules that may name a stage, and only inside a function (loaded when called, never on import):
# the CLI loads the stages' parsers, and the Python API's `imgcls.train` runs the training stage.
LAZY_STAGE_IMPORTS = {"cli.py": set(STAGES.values()), "api.py": {"imgcls.training"}}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_imports_no_other_stage(stage):
    folder = ROOT / stage
    if not folder.is_dir():
        pytest.skip(f"{stage}/ not written yet")
    others = [pkg for name, pkg in STAGES.items() if name != stage]
    for path in folder.rglob("*.py"):
        bad = {m for m in imported_modules(path) if any(m == o or m.startswith(o + ".") for o in others)}
        assert not bad, f"{path.relative_to(ROOT)} imports another stage: {bad}"


def _module_level_imports(path: Path) -> set[str]:
    """Imports executed when the module is imported (not those inside a function or a TYPE_CHECKING block)."""
    names: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(ast.parse(path.read_text(), str(path)).body)
    return names


def _stage_of(module: str) -> str | None:
    return next((pkg for pkg in STAGES.values() if module == pkg or module.startswith(pkg + ".")), None)


def test_core_imports_no_stage_and_no_tensorflow():
    for path in (ROOT / "imgcls").glob("*.py"):
        mods = imported_modules(path)
        assert not {m for m in mods if m.split(".")[0] in ("tensorflow", "tf_keras")}, path
        at_import = {m for m in _module_level_imports(path) if _stage_of(m)}
        assert not at_import, f"imgcls/{path.name} imports a stage when imported: {at_import}"
        lazy = {_stage_of(m) for m in mods if _stage_of(m)}
        allowed = LAZY_STAGE_IMPORTS.get(path.name, set())
        assert lazy <= allowed, f"imgcls/{path.name} imports {lazy - allowed}; the core knows no stage"


def test_server_and_client_never_import_each_other():
    """Explicitly, as the issue asked: the client side is its own program (a stage among the others)."""
    for folder, other in (("service", "imgcls.client"), ("client", "imgcls.service")):
        for path in (ROOT / folder).rglob("*.py"):
            bad = {m for m in imported_modules(path) if m == other or m.startswith(other + ".")}
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_core_preprocessing_loads_without_tensorflow():
    code = ("import sys, imgcls.preprocessing, imgcls.manifest, imgcls.backbones, imgcls.cli;"
            "imgcls.cli.build_parser();"
            "print(sorted(m for m in ('tensorflow', 'tf_keras', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_api_loads_no_stage_and_no_tensorflow_until_used():
    """`import imgcls` and the names of the Python API (imgcls.Classifier, imgcls.train) stay light: the
    training stage loads when `imgcls.train(...)` is called, TensorFlow only for a SavedModel or training."""
    code = ("import sys, imgcls; imgcls.Classifier, imgcls.train, imgcls.Bundle;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras')"
            " or m.startswith(('imgcls.training', 'imgcls.export', 'imgcls.service', 'imgcls.client'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- inside the server: one request path, thin front-ends, no cycles (issue 14) -------------------------------

SERVICE = ROOT / "service"
FRONT_ENDS = ("native", "kserve", "kserve_tensors", "tfserving")
# The request path and the model lifecycle know nothing of the server that assembles them or of any protocol.
LOWER_LAYERS = ("core", "streams", "models", "batcher", "lifecycle", "metrics", "statistics", "repository",
                "runtimes")


def _service_imports(name: str) -> set[str]:
    prefix = "imgcls.service."
    mods = imported_modules(SERVICE / f"{name}.py")
    found = {m[len(prefix):].split(".")[0] for m in mods if m.startswith(prefix)}
    for node in ast.walk(ast.parse((SERVICE / f"{name}.py").read_text())):  # from imgcls.service import x, y
        if isinstance(node, ast.ImportFrom) and node.module == "imgcls.service":
            found |= {a.name for a in node.names}
    return found


def test_front_ends_only_use_the_request_path_never_the_server_or_each_other():
    for name in FRONT_ENDS:
        bad = _service_imports(name) & ({"server", *FRONT_ENDS} - {name, "kserve_tensors"})
        assert not bad, f"service/{name}.py imports {bad}: a front-end translates through core.py only"


def test_request_path_and_lifecycle_import_no_front_end_and_not_the_server():
    for name in LOWER_LAYERS:
        bad = _service_imports(name) & {"server", "cli", *FRONT_ENDS}
        assert not bad, f"service/{name}.py imports {bad}"


def test_no_import_cycles_among_service_modules():
    graph = {path.stem: _service_imports(path.stem) & {p.stem for p in SERVICE.glob("*.py")}
             for path in SERVICE.glob("*.py")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*trail, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
