"""benchmarks/bench_refusal.py runs end to end against both servers (tiny fixture model, few calls)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from service_fixtures import write_images
from test_bench_peers import BENCHMARKS

pytest_plugins = ["service_plugin"]


@pytest.mark.slow
def test_bench_refusal_floods_both_servers_with_refused_calls(service_repo, tmp_path):
    write_images(tmp_path / "images", count=1)
    [image] = sorted((tmp_path / "images").rglob("*.*"))
    out = tmp_path / "refusal.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_refusal.py"), "--model-repository",
                           str(service_repo), "--image", str(image), "--calls", "128", "--rounds", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["server"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["grpc.aio"]["codes"] == {"RESOURCE_EXHAUSTED": 128}
    assert rows["imgcls serve"]["codes"] == {"NOT_FOUND": 128}  # refused, after it was ready to serve
    assert all(r["ms_cpu_per_call"] > 0 and r["calls_per_s"] > 0 for r in rows.values())
    assert "| imgcls serve | 128 |" in proc.stdout
