"""The benchmark script runs end to end (on the tiny fixture model, with very short measurements)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from service_fixtures import write_images

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_service.py"


@pytest.mark.slow
def test_bench_service_smoke(service_repo, tmp_path):
    write_images(tmp_path / "images", count=6)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--model-repository", str(service_repo), "--model", "tiny",
         "--images", str(tmp_path / "images"), "--duration", "0.3", "--batch-sizes", "1,4", "--concurrency", "1,4",
         "--threads", "1", "--json", str(tmp_path / "bench.json")],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| (c) server | 4 clients |" in out.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [r["stage"] for r in result["rows"]].count("(c) server") == 2
    assert result["meta"]["runtime"] == "tflite"  # the default order: tflite > onnx
    assert {"c32_fraction_of_b_best", "c1_p50_minus_b_single_p50_ms"} & set(result["goals"])
