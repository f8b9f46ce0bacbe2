"""benchmarks/bench_access_log.py runs, and the lines it counts show the rate limit at work."""

from __future__ import annotations

import json
import subprocess
import sys

from test_bench_peers import BENCHMARKS


def test_bench_access_log_counts_lines_written_per_kind(tmp_path):
    out = tmp_path / "access.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_access_log.py"), "--lines", "300",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["format"], r["code"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(f, c) for f in ("text", "json") for c in ("OK", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT")}
    for fmt in ("text", "json"):
        assert rows[fmt, "INVALID_ARGUMENT"]["lines_written"] == 300  # failures: every one
        for code in ("OK", "RESOURCE_EXHAUSTED"):  # the bucket's 10, plus what refilled while it ran
            assert 10 <= rows[fmt, code]["lines_written"] < 300
    assert all(r["us_cpu_per_call"] > 0 for r in rows.values())
    assert "| json | failure (always written) | 300 of 300 |" in proc.stdout
