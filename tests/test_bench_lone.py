"""benchmarks/bench_lone.py runs end to end on the tiny fixture model and reports every step it measures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from service_fixtures import write_images
from test_bench_peers import BENCHMARKS

pytest_plugins = ["service_plugin"]


@pytest.mark.slow
def test_bench_lone_measures_decoding_the_server_and_the_grpc_floor(service_repo, tmp_path):
    write_images(tmp_path / "images", count=8)
    out = tmp_path / "lone.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_lone.py"), "--model-repository", str(service_repo),
                           "--model", "tiny", "--images", str(tmp_path / "images"), "--count", "8", "--calls", "40",
                           "--rounds", "2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["images"] == 8
    assert [r["round"] for r in res["decode"]] == [1, 2]
    for r in res["decode"]:
        assert r["in_process"]["mean_ms"] > 0 and r["pool"]["mean_ms"] > 0
        assert r["pool_overhead_ms"] == pytest.approx(r["pool"]["mean_ms"] - r["in_process"]["mean_ms"])
    assert [(r["round"], r["server"]) for r in res["calls"]] == [
        (1, "imgcls serve"), (1, "bare grpc.aio"), (2, "imgcls serve"), (2, "bare grpc.aio")]
    for r in res["calls"]:
        assert r["calls"] == 40 and r["client"]["mean_ms"] > 0 and r["server_cpu_ms"] > 0
    for r in (r for r in res["calls"] if r["server"] == "imgcls serve"):
        # The server's histograms saw exactly these calls: each step is part of the whole request.
        assert 0 < r["preprocess_ms"] < r["request_ms"] and 0 < r["inference_ms"] < r["request_ms"]
        assert r["queue_ms"] >= 0 and r["decode_workers_cpu_ms"] > 0
    assert "| 2 | imgcls serve |" in proc.stdout and "| 2 | bare grpc.aio |" in proc.stdout
