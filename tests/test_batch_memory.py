"""`imgcls batch` memory does not grow with the number of files: 1,000 vs 4,000 files through a real server.

The job runs in a subprocess that imports everything first and then traces its Python allocations
(tracemalloc peak) and reports its peak RSS. Holding anything per file (the list of paths, the records, the
file bytes) would add well over a megabyte for 3,000 more files; the streaming job adds ~8 bytes per file
(the hashed resume index).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from service_fixtures import running_server, sample_image

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture

MEASURE = """
import json, resource, sys, tracemalloc
import imgcls.cli, imgcls.client.batch, imgcls.client.batch_io, imgcls.client.client
imgcls.cli.build_parser()  # every module the command needs is imported before measuring
tracemalloc.start()
rc = imgcls.cli.main(sys.argv[1:])
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"rc": rc, "peak": peak, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}),
      file=sys.stderr)
"""


def _tree(root: Path, files: int, data: bytes) -> Path:
    for i in range(files):
        folder = root / f"d{i // 100:03d}"
        if i % 100 == 0:
            folder.mkdir(parents=True)
        (folder / f"{i:05d}.png").write_bytes(data)
    return root


@pytest.mark.slow
def test_memory_is_flat_in_the_number_of_files(service_repo, tmp_path):
    data = sample_image(11, size=(40, 40), fmt="PNG")  # ~5 KB: holding the bytes of every file would show
    inputs = {n: _tree(tmp_path / f"in{n}", n, data) for n in (1000, 4000)}
    results = {}
    with running_server(service_repo, decode_workers=2) as server:
        for n, folder in inputs.items():
            out = tmp_path / f"out{n}.jsonl"
            proc = subprocess.run(
                [sys.executable, "-c", MEASURE, "batch", "--target", f"127.0.0.1:{server.port}", "--model", "tiny",
                 "--input", str(folder), "--output", str(out), "--no-progress", "--json"],
                capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            assert proc.returncode == 0, proc.stderr[-3000:]
            measured = json.loads(proc.stderr.strip().splitlines()[-1])
            summary = json.loads(proc.stdout)
            assert summary["files"] == summary["ok"] == n
            assert out.read_bytes().count(b"\n") == n
            results[n] = measured
    small, large = results[1000], results[4000]
    print(f"tracemalloc peak: 1k files {small['peak'] / 1024:.0f} KiB, 4k files {large['peak'] / 1024:.0f} KiB; "
          f"peak RSS: {small['rss_kb'] / 1024:.1f} MiB, {large['rss_kb'] / 1024:.1f} MiB")
    assert large["peak"] - small["peak"] < 512 * 1024, results  # < 175 bytes per extra file
    assert large["rss_kb"] - small["rss_kb"] < 16 * 1024, results  # RSS is noisier (allocator, gRPC core)
