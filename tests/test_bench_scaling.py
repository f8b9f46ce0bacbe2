"""benchmarks/bench_scaling.py runs end to end (tiny fixture model, 1 core, very short measurements).

It drives `imgcls serve --workers N` with perf_analyzer from .venv-peers (`make peers-env`); without it the test
skips, as tests/test_bench_peers.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
from service_fixtures import write_images
from test_bench_peers import BENCHMARKS, benchmark_module, peers_or_skip

pytest_plugins = ["service_plugin"]


@pytest.mark.slow
def test_bench_scaling_measures_each_worker_setting(service_repo, tmp_path):
    peers_or_skip()
    images = tmp_path / "images"
    images.mkdir()
    write_images(images, count=8)
    out = tmp_path / "scaling.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_scaling.py"), "--model-repository",
                           str(service_repo), "--model", "tiny", "--images", str(images), "--cores", "1",
                           "--workers", "1,2", "--concurrency", "1,4", "--duration", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    served = [(r["workers"], r["concurrency"]) for r in rows if r["kind"] == "server"]
    assert served == [(1, 1), (1, 4), (2, 1), (2, 4)]  # the worker count is what really ran (pids counted)
    for r in rows:
        assert r["images_per_s"] > 0 and r["cores"] == 1
    two = [r for r in rows if r["kind"] == "server" and r["workers"] == 2]
    assert all(r["rss_mib"] > r["rss_per_worker_mib"] > 0 for r in two)  # both workers and the supervisor
    assert {r["kind"] for r in rows} >= {"runtime alone, batch 32", "in-process decode + runtime, batch 32"}
    assert "| 1 | 2 | 4 |" in proc.stdout  # the markdown table


def test_configs_name_cores_and_workers_exactly():
    parse = benchmark_module("bench_scaling").parse_configs
    assert parse("2x1, 12x6,12xauto") == [(2, 1), (12, 6), (12, "auto")]
    for bad in ("12", "x3", "12x", "12x-1", "twox1", "12x3x4"):
        with pytest.raises(argparse.ArgumentTypeError, match="CORESxWORKERS"):
            parse(bad)


@pytest.mark.slow
def test_bench_scaling_runs_with_perf_analyzer_alone(service_repo, tmp_path):
    """The way it runs on a machine without .venv-peers (the 16-core device machine): the perf_analyzer binary
    alone, its libraries from LD_LIBRARY_PATH, the KServe metadata read with imgcls's own messages, exactly the
    configurations named, and the JSON written as it goes."""
    peers = peers_or_skip()
    images = tmp_path / "images"
    images.mkdir()
    write_images(images, count=4)
    out = tmp_path / "scaling.json"
    env = {**os.environ, "LD_LIBRARY_PATH": peers.pa_env.get("LD_LIBRARY_PATH", "")}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_scaling.py"), "--model-repository",
                           str(service_repo), "--model", "tiny", "--images", str(images), "--configs", "1x1,1xauto",
                           "--perf-analyzer", str(peers.perf_analyzer), "--no-alone", "--concurrency", "2",
                           "--duration", "1", "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["kind"], r["cores"], r["workers"], r["concurrency"]) for r in result["rows"]] == [
        ("server", 1, 1, 2), ("server", 1, 1, 2)]  # auto on 1 core is 1 worker; no runtime-alone rows
    assert all(r["images_per_s"] > 0 for r in result["rows"])
    assert "usable CPU" in result["machine"]["limits"]
    assert result["machine"]["onnxruntime"]
