"""bench_instances.py runs end to end on the tiny fixture model and reports every layout and chunk size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_instances.py"


@pytest.mark.slow
def test_bench_instances_reports_layouts_and_chunks(service_repo, tmp_path):
    out = tmp_path / "instances.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(service_repo / "tiny" / "2"), "--threads", "2",
                           "--duration", "0.2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["layouts"]] == [1, 4, 16]
    assert all(r[k] > 0 for r in result["layouts"] for k in "ABCD")
    cells = {(r["format"], r["threads"], r["chunk"]) for r in result["chunks"]}
    assert cells == {(f, t, c) for f in ("onnx", "tflite") for t in (1, 2) for c in (None, 8, 4, 1)}
    assert all(r["images_per_s"] > 0 and r["memory_mib"] >= 0 for r in result["chunks"])
    assert "| 16 |" in proc.stdout and "| tflite | 2 | whole |" in proc.stdout
    rounds = [(i, n) for i in (1, 2, 3) for n in ("sleep", "spin")]
    assert [(r["round"], r["threads"]) for r in result["lone"]] == rounds
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 and r["cpu_after_run_ms"] >= 0 for r in result["lone"])
    assert "| 3 | spin |" in proc.stdout
