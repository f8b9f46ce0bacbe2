"""docs/metrics.md is the metrics reference: held to what real servers serve on /metrics.

A real server (one process) and a real `--workers 2` supervisor are started on the tiny fixture repository,
sent a Predict, and scraped; every family served must be a row of the reference with the same type and labels,
and every row must be served where its "served" column says. Families that have no sample yet (no failed load,
no wasted image) still show their HELP/TYPE lines; their labels come from the server's own metric objects.
Also: imgcls_build_info names the running versions, and the per-worker collector follows live pids.
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import client_for, running_server, sample_image, scrape

import imgcls
from imgcls.service.metrics import WorkerProcessCollector

pytest_plugins = ["service_plugin"]

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
WHERE = {"always", "one process", "--workers"}
TYPES = {"counter", "gauge", "histogram"}


@dataclass(frozen=True)
class Row:
    name: str
    type: str
    labels: frozenset[str]
    where: str


def reference() -> dict[str, Row]:
    """The rows of docs/metrics.md's metric tables (| `name` | type | labels | meaning | served |)."""
    rows: dict[str, Row] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not re.fullmatch(r"`[a-z_]+`", cells[0]):
            continue
        name = cells[0].strip("`")
        assert name not in rows, f"{name} documented twice"
        assert cells[1] in TYPES, f"{name}: type {cells[1]!r}"
        assert cells[4] in WHERE, f"{name}: served {cells[4]!r}"
        assert len(cells[3]) > 10, f"{name}: say what it means"
        labels = frozenset(re.findall(r"`([a-z_]+)`", cells[2]))
        assert labels or cells[2] == "—", f"{name}: labels {cells[2]!r}"
        rows[name] = Row(name, cells[1], labels, cells[4])
    assert len(rows) > 20, "docs/metrics.md: no metric table found"
    return rows


def served(text: str, server=None) -> dict[str, Row]:
    """Families in an exposition, as documented names (counters with `_total`), type and label names."""
    known = {}
    if server is not None:  # label names of families with no sample yet, from the metric objects
        from prometheus_client.metrics import MetricWrapperBase

        for value in vars(server.metrics).values():
            if isinstance(value, MetricWrapperBase):
                known[value._name] = frozenset(value._labelnames)
    out = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = frozenset(k for s in family.samples for k in s.labels if k not in ("le", "quantile"))
        if not family.samples:
            labels = known.get(family.name, labels)
        out[name] = Row(name, family.type, labels, "")
    return out


def compare(documented: dict[str, Row], got: dict[str, Row], where: set[str]) -> list[str]:
    expected = {n: r for n, r in documented.items() if r.where in where}
    if not Path("/proc/self/stat").exists():  # prometheus-client reads process metrics from /proc (Linux)
        expected = {n: r for n, r in expected.items() if not n.startswith(("process_", "imgcls_worker_"))}
    problems = [f"served but not in docs/metrics.md: {n}" for n in sorted(got.keys() - documented.keys())]
    problems += [f"documented as served ({expected[n].where}) but not served: {n}"
                 for n in sorted(expected.keys() - got.keys())]
    problems += [f"served where docs/metrics.md says it is not ({documented[n].where}): {n}"
                 for n in sorted(got.keys() & documented.keys() - expected.keys())]
    for n in sorted(got.keys() & expected.keys()):
        if got[n].type != expected[n].type:
            problems.append(f"{n}: served as {got[n].type}, documented as {expected[n].type}")
        if got[n].labels != expected[n].labels:
            problems.append(f"{n}: served labels {sorted(got[n].labels)}, documented {sorted(expected[n].labels)}")
    return problems


def samples(text: str, name: str) -> list:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def test_reference_table_parses():
    rows = reference()
    assert {"imgcls_requests_total", "imgcls_build_info", "process_resident_memory_bytes",
            "python_gc_collections_total", "imgcls_worker_resident_memory_bytes"} <= rows.keys()


@pytest.fixture(scope="module")
def one_process(service_repo) -> tuple[str, dict[str, Row]]:
    """A real server's /metrics after one Predict: (exposition, served families)."""
    with running_server(service_repo, runtime="onnx", poll_interval=0) as server:
        with client_for(server, timeout=30) as client:
            client.predict([sample_image(1)], model="tiny", top_k=1)
        text = scrape(server)
        return text, served(text, server)


def test_one_process_serves_exactly_the_reference(one_process):
    text, got = one_process
    problems = compare(reference(), got, {"always", "one process"})
    assert not problems, "\n".join(problems)

    # The request really shows (not just HELP lines), and the basics carry real values.
    ok = [s for s in samples(text, "imgcls_requests_total") if s.labels["code"] == "OK"]
    assert ok and ok[0].labels["method"] == "Predict" and ok[0].value >= 1
    (build,) = samples(text, "imgcls_build_info")
    assert build.value == 1
    assert build.labels["version"] == imgcls.__version__ and build.labels["python"] == platform.python_version()
    import onnxruntime

    assert build.labels["onnxruntime"] == onnxruntime.__version__
    assert not [f for f in text_string_to_metric_families(text) if f.name.endswith("_created")]
    if Path("/proc/self/stat").exists():
        (rss,) = samples(text, "process_resident_memory_bytes")
        assert rss.value > 10e6  # a server with a model loaded, not an empty stand-in
        (start,) = samples(text, "process_start_time_seconds")
        assert time.time() - 3600 < start.value <= time.time()


def test_worker_collector_follows_live_pids():
    """imgcls_worker_* for each pid the supervisor names, and nothing for one that has exited."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc: process metrics are Linux-only")
    child = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "up\n"  # running Python, not a process still being exec'd
        pids = {"1": child.pid}
        collector = WorkerProcessCollector(lambda: dict(pids))
        families = {f.name: f for f in collector.collect()}
        assert {"imgcls_worker_cpu_seconds", "imgcls_worker_resident_memory_bytes",
                "imgcls_worker_start_time_seconds", "imgcls_worker_open_fds"} <= families.keys()
        assert families["imgcls_worker_cpu_seconds"].type == "counter"
        (rss,) = families["imgcls_worker_resident_memory_bytes"].samples
        assert rss.labels == {"worker": "1"} and rss.value > 1e6
        pids["2"] = 2 ** 22 + 7  # above Linux's largest pid: never a live process
        families = {f.name: f for f in collector.collect()}
        assert {s.labels["worker"] for s in families["imgcls_worker_resident_memory_bytes"].samples} == {"1"}
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert list(collector.collect()) == []


@pytest.mark.slow
def test_workers_serve_exactly_the_reference(service_repo, one_process):
    from imgcls.service.server import ServeConfig
    from imgcls.service.supervisor import Supervisor

    config = ServeConfig(model_repository=service_repo, host="127.0.0.1", port=0, metrics_port=0, http_port=0,
                         inference_threads=1, decode_workers=1, grace_period=5.0, runtime="onnx", poll_interval=0)
    sup = Supervisor(config, 2).start()
    supervising = threading.Thread(target=sup.supervise, daemon=True)
    supervising.start()
    try:
        assert sup.wait_until_ready(120), sup.states()
        import grpc

        from imgcls.v1 import inference_pb2 as pb
        from imgcls.v1 import inference_pb2_grpc as pb_grpc

        with grpc.insecure_channel(f"127.0.0.1:{sup.port}") as channel:
            pb_grpc.InferenceStub(channel).Predict(
                pb.PredictRequest(model_name="tiny", images=[sample_image(2)], top_k=1), timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{sup.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{sup.http_port}/metrics", timeout=10) as response:
            http_text = response.read().decode()  # answered by one worker
        pids = {str(w.index + 1): w.process.pid for w in sup.workers}
    finally:
        sup.request_stop()
        supervising.join(10)
        assert sup.stop() == 0

    # Multiprocess mode writes a family's first sample, not its HELP line: the families that had no sample in
    # the one-process run (no failed load, no wasted image yet) may be absent here; nothing else may.
    _, single = one_process
    no_sample = {f.name + "_total" if f.type == "counter" else f.name
                 for f in text_string_to_metric_families(one_process[0]) if not f.samples}
    assert no_sample < single.keys() and "imgcls_requests_total" not in no_sample
    got = served(text)
    problems = compare(reference(), got, {"always", "--workers"})
    problems = [p for p in problems if not (p.startswith("documented as served") and p.split()[-1] in no_sample)]
    assert not problems, "\n".join(problems)
    ok = [s for s in samples(text, "imgcls_requests_total") if s.labels["code"] == "OK"]
    assert sum(s.value for s in ok) == 1  # counted once, by the worker that answered
    # The HTTP port's /metrics, from whichever worker: the same sum, that worker's process_*, no imgcls_worker_*
    http_ok = [s for s in samples(http_text, "imgcls_requests_total") if s.labels["code"] == "OK"]
    assert sum(s.value for s in http_ok) == 1
    assert not [n for n in served(http_text) if n.startswith(("imgcls_worker_", "python_gc_"))]
    assert samples(http_text, "imgcls_build_info")
    if Path("/proc/self/stat").exists():
        rss = {s.labels["worker"]: s.value for s in samples(text, "imgcls_worker_resident_memory_bytes")}
        assert rss.keys() == pids.keys() == {"1", "2"}
        assert all(v > 10e6 for v in rss.values())  # each worker has a model loaded
        starts = {s.labels["worker"]: s.value for s in samples(text, "imgcls_worker_start_time_seconds")}
        (supervisor_start,) = samples(text, "process_start_time_seconds")
        assert all(v >= supervisor_start.value - 1 for v in starts.values())
