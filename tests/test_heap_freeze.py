"""The served process freezes its start-up heap (service/server.py `freeze_heap`), and benchmarks/gcprobe with
benchmarks/gc_pauses.py measure what each garbage collection costs."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref

from test_bench_peers import BENCHMARKS

from imgcls.service.server import freeze_heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_freeze_heap_collects_garbage_first_then_hides_the_rest_from_full_collections():
    garbage_a, garbage_b = Node(), Node()
    garbage_a.other, garbage_b.other = garbage_b, garbage_a  # a cycle only the cyclic collector can free
    garbage = weakref.ref(garbage_a)
    del garbage_a, garbage_b
    alive = Node()
    alive.other = alive
    try:
        frozen = freeze_heap()
        assert garbage() is None, "garbage alive at the freeze must be collected, not frozen for good"
        assert frozen == gc.get_freeze_count() > 0
        assert not any(obj is alive for obj in gc.get_objects()), "a frozen object is walked by no collection"
        later = Node()
        assert any(obj is later for obj in gc.get_objects()), "objects made after the freeze are collected as usual"
    finally:
        gc.unfreeze()  # this test process is not a server: give its objects back to the collector
    assert any(obj is alive for obj in gc.get_objects())


def test_gcprobe_records_each_collection_and_gc_pauses_summarizes_them(tmp_path):
    prefix = tmp_path / "gc"
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS / "gcprobe"), "GCPROBE_OUT": str(prefix)}
    code = "import gc\nfor _ in range(3):\n    gc.collect()\ngc.collect(0)\n"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    files = sorted(tmp_path.glob("gc.*"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert len(record["pauses_ms"]["2"]) >= 3 and len(record["pauses_ms"]["0"]) >= 1
    assert all(ms >= 0 for ms in record["pauses_ms"]["2"])
    assert len(record["full"]) == len(record["pauses_ms"]["2"])

    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gc_pauses.py"), str(files[0]), "--json", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(out.read_text())
    full = next(row for row in summary["rows"] if row["generation"] == 2)
    assert full["collections"] == len(record["pauses_ms"]["2"])
    assert full["max_ms"] == round(max(record["pauses_ms"]["2"]), 2)
    assert "| 2 |" in proc.stdout and "full collections:" in proc.stdout

    bad = tmp_path / "gc.broken"
    bad.write_text("{")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gc_pauses.py"), str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "gc.broken" in proc.stderr and "Traceback" not in proc.stderr


def test_gcprobe_does_nothing_without_its_variable(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "GCPROBE_OUT"}, "PYTHONPATH": str(BENCHMARKS / "gcprobe")}
    proc = subprocess.run([sys.executable, "-c", "import gc; print(len(gc.callbacks))"], env=env, check=True,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.stdout.strip() == "0"
    assert list(tmp_path.iterdir()) == []
