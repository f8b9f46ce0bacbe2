"""The design's boundaries, checked on the source: stages talk through files, not imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"training": "imgcls.training", "export": "imgcls.export", "service": "imgcls.service"}


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


def test_core_imports_no_stage_and_no_tensorflow():
    for path in (ROOT / "imgcls").glob("*.py"):
        mods = imported_modules(path)
        assert not {m for m in mods if m.split(".")[0] in ("tensorflow", "tf_keras")}, path
        stage_imports = {m for m in mods if any(m.startswith(p) for p in STAGES.values())}
        if path.name != "cli.py":  # the CLI names the stage modules as strings, loaded lazily
            assert not stage_imports, path


def test_core_preprocessing_loads_without_tensorflow():
    code = ("import sys, imgcls.preprocessing, imgcls.manifest, imgcls.backbones, imgcls.cli;"
            "imgcls.cli.build_parser();"
            "print(sorted(m for m in ('tensorflow', 'tf_keras', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
