"""The side-by-side benchmark runs end to end against a real Triton (tiny fixture model, very short measurements).

Triton and perf_analyzer are benchmark-only peers in .venv-peers (`make peers-env`): without them the test skips.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from service_fixtures import write_images

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "bench_peers.py"


def peers_or_skip():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_peers
    finally:
        sys.path.remove(str(BENCHMARKS))
    try:
        return bench_peers.find_peers()
    except bench_peers.PeersMissing as exc:
        pytest.skip(f"Triton / perf_analyzer not installed (benchmark-only peers): {exc}")


@pytest.mark.slow
def test_bench_peers_smoke(service_repo, tmp_path):
    peers_or_skip()
    write_images(tmp_path / "images", count=6)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--model-repository", str(service_repo), "--model", "tiny",
         "--images", str(tmp_path / "images"), "--duration", "1", "--concurrency", "1,4", "--stability", "1000",
         "--json", str(tmp_path / "peers.json")],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "peers.json").read_text())
    assert result["notes"] == [], result["notes"]
    measured = {(r["server"], r["client"], r["concurrency"]) for r in result["rows"] if r["images_per_s"] > 0}
    for server, client in [("imgcls", "bench_service.py (Python)"), ("imgcls", "perf_analyzer 2.51"),
                           ("Triton 2.51 (pytriton 0.7.0)", "perf_analyzer 2.51")]:
        for c in (1, 4):
            assert (server, client, c) in measured, (server, client, c, out.stdout)
    assert sum(r["server"] == "in-process ceiling" for r in result["rows"]) == 2  # 1 at a time, batch 4
    assert [g["concurrency"] for g in result["goal"]] == [1, 4]
    assert "| Triton 2.51 (pytriton 0.7.0) | KServe v2 gRPC | perf_analyzer 2.51 | 4" in out.stdout
