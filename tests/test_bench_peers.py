"""The side-by-side benchmark runs end to end against a real Triton (tiny fixture model, very short measurements).

Triton and perf_analyzer are benchmark-only peers in .venv-peers (`make peers-env`): without them the test skips.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from service_fixtures import sample_image, write_images

from imgcls.preprocessing import preprocess_bytes
from imgcls.service import repository, runtimes

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "bench_peers.py"


_INFER = """
import json, sys, numpy as np, tritonclient.grpc as g
client, out = g.InferenceServerClient(sys.argv[1]), []
for path in sys.argv[3:]:
    tensor = g.InferInput("images", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[open(path, "rb").read()]], dtype=object))
    out.append(client.infer(sys.argv[2], [tensor]).as_numpy("probabilities")[0].tolist())
print(json.dumps(out))
"""


def benchmark_module(name: str):
    """A script of benchmarks/ imported as a module (they import each other as siblings)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def bench_peers_module():
    return benchmark_module("bench_peers")


def peers_or_skip():
    bench_peers = bench_peers_module()
    try:
        return bench_peers.find_peers()
    except bench_peers.PeersMissing as exc:
        pytest.skip(f"Triton / perf_analyzer not installed (benchmark-only peers): {exc}")


@pytest.mark.slow
@pytest.mark.parametrize(("script", "spin"), [("triton_backend.py", False), ("triton_model.py", False),
                                              ("triton_backend.py", True)])
def test_triton_peer_does_the_same_job(service_repo, tmp_path, script, spin):
    """Both Triton variants (Python backend, pytriton) answer encoded images with exactly imgcls's probabilities:
    same decode, preprocessing and ONNX file, so the benchmark compares servers, not models (`--triton-spin`
    changes how onnxruntime's threads wait, not what they compute)."""
    peers = peers_or_skip()
    paths = []
    for i, fmt in enumerate(["JPEG", "PNG", "JPEG"]):
        paths.append(tmp_path / f"{i}.{fmt.lower()}")
        paths[-1].write_bytes(sample_image(i, fmt=fmt))
    entry = next(e for e in repository.scan(service_repo) if e.name == "tiny")
    runtime = runtimes.load_runtime(entry.folder, runtimes.choose_artifact(entry.manifest, "onnx"), 1)
    expected = runtime.run(np.stack([preprocess_bytes(p.read_bytes(), entry.manifest.preprocessing) for p in paths]))
    triton = bench_peers_module().TritonServer(peers, service_repo, "tiny", 1, script, spin)
    try:
        url = triton.wait_ready()
        out = subprocess.run([str(peers.python), "-c", _INFER, url, "tiny", *map(str, paths)], capture_output=True,
                             text=True, timeout=120)
    finally:
        triton.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    np.testing.assert_allclose(np.array(json.loads(out.stdout)), expected, atol=1e-6)


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
                           ("Triton 2.51 (Python backend)", "perf_analyzer 2.51"),
                           ("Triton 2.51 (pytriton 0.7.0)", "perf_analyzer 2.51")]:
        for c in (1, 4):
            assert (server, client, c) in measured, (server, client, c, out.stdout)
    assert sum(r["server"] == "in-process ceiling" for r in result["rows"]) == 2  # 1 at a time, batch 4
    assert [g["concurrency"] for g in result["goal"]] == [1, 1, 4, 4]
    assert "| Triton 2.51 (pytriton 0.7.0) | KServe v2 gRPC | perf_analyzer 2.51 | 4" in out.stdout


def test_goal_is_the_median_of_each_rounds_ratio():
    """With --rounds, each round's imgcls and Triton rows (measured back to back) make one ratio, and the goal is
    judged on the median: one lucky or unlucky round on a drifting machine decides nothing."""
    bench_peers = bench_peers_module()
    triton = next(iter(bench_peers.TRITONS))

    def row(server, k, rate, p99):
        return {"server": server, "client": bench_peers.PERF_ANALYZER, "concurrency": 8, "round": k,
                "images_per_s": rate, "p99_ms": p99}

    rows = [row(bench_peers.IMGCLS, 1, 130.0, 90.0), row(triton, 1, 100.0, 100.0),  # 1.30x
            row(bench_peers.IMGCLS, 2, 95.0, 110.0), row(triton, 2, 100.0, 100.0),  # 0.95x
            row(bench_peers.IMGCLS, 3, 98.0, 99.0), row(triton, 3, 100.0, 100.0)]  # 0.98x
    (g,) = [g for g in bench_peers.goal(rows, [8]) if g["triton"] == triton]
    assert g["round_ratios"] == pytest.approx([1.30, 0.95, 0.98])
    assert g["throughput_ratio"] == pytest.approx(0.98) and g["p99_diff_ms"] == pytest.approx(-1.0)
    assert g["met"] is False  # the best round alone (1.30x) would have said met
    (one,) = [g for g in bench_peers.goal(rows[:2], [8]) if g["triton"] == triton]
    assert one["throughput_ratio"] == pytest.approx(1.30) and one["met"] is True
    table = bench_peers.markdown([{**r, "protocol": "KServe v2 gRPC", "p50_ms": 1.0, "stable": True,
                                   "server_batch": None} for r in rows])
    assert "| round |" in table and "| 8 | 2 | 95.0 |" in table
