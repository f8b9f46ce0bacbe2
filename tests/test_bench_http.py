"""benchmarks/bench_http.py runs end to end on the tiny fixture model (very short measurements, no Triton: its
start takes a minute and tests/test_bench_peers.py already runs it). Without .venv-peers (`make peers-env`)
only the two Python-client rows are measured, and the notes say why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from service_fixtures import write_images

pytest_plugins = ["service_plugin"]

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_http.py"


@pytest.mark.slow
def test_bench_http_smoke(service_repo, tmp_path):
    write_images(tmp_path / "images", count=6)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--model-repository", str(service_repo), "--model", "tiny",
         "--images", str(tmp_path / "images"), "--duration", "1", "--concurrency", "1", "2", "--stability", "1000",
         "--no-triton", "--json", str(tmp_path / "http.json")],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "http.json").read_text())
    rows = {(r["protocol"], r["concurrency"]): r for r in result["rows"]}
    protocols = ["imgcls Predict gRPC", "HTTP POST /predict"]
    if not result["notes"]:  # perf_analyzer is there: its two rows too
        protocols += ["KServe v2 REST (binary)", "KServe v2 gRPC"]
    for protocol in protocols:
        for c in (1, 2):
            row = rows[(protocol, c)]
            assert row["images_per_s"] > 0 and row["cpu_ms_per_image"] > 0, row
    goals = {g["goal"] for g in result["goals"]}
    assert any("p50 within 2 ms" in g for g in goals)
    assert "| imgcls | HTTP POST /predict | Python (http.client) | 2 |" in out.stdout
