"""`imgcls serve --workers N` (issue 16): several serving processes on one port behave as one server.

Against real worker processes on the tiny fixture repository: answers equal the model's own output whichever
worker answers; /metrics and KServe ModelStatistics add up every process (a request counted once); health
answers for the whole server; a killed worker is replaced; hot reload reaches every worker; SIGTERM under load
loses nothing and exits 0. The sizes chosen from a (faked) cgroup CPU quota are checked through the real
parser. Each process sees its own connections only, so the tests open one channel per client with a local
subchannel pool (otherwise gRPC Python shares one connection between channels to the same target).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_fixtures import Reference, metric, sample_image

from imgcls.service import cluster
from imgcls.v1 import inference_pb2 as pb
from imgcls.v1 import inference_pb2_grpc as pb_grpc

pytest_plugins = ["service_plugin"]

LOCAL = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own per channel


def _channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=LOCAL)


def _predict(target: str, images: list[bytes], model: str = "tiny", timeout: float = 20) -> pb.PredictResponse:
    with _channel(target) as channel:
        return pb_grpc.InferenceStub(channel).Predict(
            pb.PredictRequest(model_name=model, images=images, top_k=3), timeout=timeout)


def _health(target: str) -> int:
    with _channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


class Running:
    """A Supervisor started in this process (its workers are real `python -m imgcls.service.worker`), supervised
    by a thread; `close()` drains it."""

    def __init__(self, repo: Path, workers: int = 2, **overrides) -> None:
        from imgcls.service.server import ServeConfig
        from imgcls.service.supervisor import Supervisor

        settings = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "inference_threads": 1, "decode_workers": 1,
                    "grace_period": 5.0, "runtime": "onnx", **overrides}
        self.sup = Supervisor(ServeConfig(model_repository=repo, **settings), workers).start()
        self.thread = threading.Thread(target=self.sup.supervise, daemon=True)
        self.thread.start()
        self.target = f"127.0.0.1:{self.sup.port}"

    def close(self) -> int:
        self.sup.request_stop()
        self.thread.join(10)
        return self.sup.stop()


@pytest.fixture(scope="module")
def two_workers(service_repo, tmp_path_factory):
    repo = tmp_path_factory.mktemp("workers") / "repo"
    shutil.copytree(service_repo, repo)
    shutil.rmtree(repo / "other")
    running = Running(repo, poll_interval=0.5, http_port=0)
    try:
        assert running.sup.wait_until_ready(90), running.sup.states()
        _wait_serving(running.target)  # each worker turns its health within ~0.1 s of the last one's ready
        yield running, repo
    finally:
        running.close()


def _published_successes(running: Running) -> dict[str, int]:
    """Successful requests per worker (by pid) for tiny v2, from the statistics files the workers publish."""
    counts = {}
    for path in (running.sup.folder / "stats").glob("*.json"):
        entry = json.loads(path.read_text()).get("tiny/2")
        if entry:
            counts[path.stem] = entry["success"]["count"]
    return counts


@pytest.mark.slow
def test_two_workers_answer_as_one_server(two_workers):
    running, repo = two_workers
    assert len({w.process.pid for w in running.sup.workers}) == 2
    assert _health(running.target) == health_pb2.HealthCheckResponse.SERVING
    before = _scrape(running.sup.metrics_port)
    sent = 24
    images = [sample_image(100 + i) for i in range(sent)]
    reference = Reference(repo)
    expected = reference.probs(images)
    answers = []
    for data in images:  # each on its own connection: the kernel spreads them over the workers
        response = _predict(running.target, [data])
        answers.append({label.name: label.score for label in response.results[0].labels})
    classes = list(reference.manifest.class_names)
    for got, want in zip(answers, expected, strict=True):
        for name, score in got.items():
            assert score == pytest.approx(float(want[classes.index(name)]), abs=1e-5)
        top = classes[int(np.argmax(want))]
        assert max(got, key=got.get) == top

    # every process answered some, and /metrics counts each request once, whoever answered it
    time.sleep(cluster.STATS_PUBLISH_SECONDS * 3)
    after = _scrape(running.sup.metrics_port)
    counted = (metric(after, "imgcls_requests_total", method="Predict", model="tiny", code="OK")
               - metric(before, "imgcls_requests_total", method="Predict", model="tiny", code="OK"))
    assert counted == sent
    assert metric(after, "imgcls_model_loaded", model="tiny", version="2") == 1  # max over workers, not 2

    # KServe ModelStatistics sums the workers' totals (published a few times a second)
    from imgcls.service import protocols

    request = protocols.message("inference.ModelStatisticsRequest")(name="tiny", version="2")
    deadline = time.monotonic() + 5
    while True:
        with _channel(running.target) as channel:
            method = channel.unary_unary("/inference.GRPCInferenceService/ModelStatistics",
                                         request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=protocols.message(
                                             "inference.ModelStatisticsResponse").FromString)
            stats = method(request, timeout=5).model_stats[0]
        if stats.inference_stats.success.count >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    per_worker = _published_successes(running)
    assert len([c for c in per_worker.values() if c > 0]) == 2, per_worker  # both workers served some
    assert stats.inference_stats.success.count == sum(per_worker.values())
    assert stats.inference_stats.success.count >= sent

    # the HTTP port is shared the same way: every new connection is answered, by either worker
    for i in range(6):
        request = urllib.request.Request(f"http://127.0.0.1:{running.sup.http_port}/predict?model=tiny&top_k=1",
                                         data=images[i], method="POST")
        with urllib.request.urlopen(request, timeout=20) as response:
            body = json.loads(response.read())
        assert json.dumps(body).count(classes[int(np.argmax(expected[i]))]) >= 1, body


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_health_waits_for_it(two_workers, caplog):
    running, _repo = two_workers
    victim = running.sup.workers[0].process
    restarts = running.sup.restarts
    victim.kill()
    states_seen = set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # a connection queued at the killed worker is reset: None, retried
        states_seen.add(_health_or_none(running.target))
        replaced = running.sup.workers[0].process
        if replaced.pid != victim.pid and running.sup.all_ready() and \
                _health_or_none(running.target) == health_pb2.HealthCheckResponse.SERVING:
            break
        time.sleep(0.05)
    assert running.sup.workers[0].process.pid != victim.pid
    assert running.sup.restarts == restarts + 1
    assert health_pb2.HealthCheckResponse.NOT_SERVING in states_seen  # the whole server was not ready meanwhile
    _wait_serving(running.target)
    for i in range(8):  # and every connection is answered again
        assert _predict(running.target, [sample_image(300 + i)]).results[0].status.code == 0


@pytest.mark.slow
def test_hot_reload_reaches_every_worker(two_workers):
    running, repo = two_workers
    shutil.copytree(repo / "tiny" / "2", repo / "tiny" / "3")
    manifest = repo / "tiny" / "3" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": 2', '"version": 3'))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        versions = {_predict(running.target, [sample_image(400 + i)]).model_version for i in range(8)}
        if versions == {3}:
            break
        time.sleep(0.3)
    assert versions == {3}, versions  # eight new connections, spread over both workers, all on v3
    # a broken version replaces nothing anywhere
    shutil.copytree(repo / "tiny" / "3", repo / "tiny" / "4")
    (repo / "tiny" / "4" / "model.onnx").write_bytes(b"not a model")
    time.sleep(3)
    assert {_predict(running.target, [sample_image(500 + i)]).model_version for i in range(8)} == {3}
    shutil.rmtree(repo / "tiny" / "4")


@pytest.mark.slow
def test_sigterm_under_load_drains_every_worker_and_loses_nothing(service_repo, tmp_path):
    """The real command: `imgcls serve --workers 2`, SIGTERM while clients send; every call is answered OK
    or refused before admission (retryable: nothing admitted is lost), and the exit status is 0."""
    port_file = tmp_path / "log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(port_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "imgcls.cli", "serve", "--model-repository",
                                 str(service_repo), "--workers", "2", "--host", "127.0.0.1", "--port", "0",
                                 "--metrics-port", "0", "--http-port", "-1", "--inference-threads", "1",
                                 "--decode-workers", "1", "--grace-period", "10", "--runtime", "onnx",
                                 "--poll-interval", "0"], env=env, stderr=log, stdout=log)
    try:
        target = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and target is None:
            found = re.search(r"gRPC on 127\.0\.0\.1:(\d+)", port_file.read_text())
            target = f"127.0.0.1:{found[1]}" if found else None
            time.sleep(0.1)
        assert target, port_file.read_text()
        while _health_or_none(target) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline and proc.poll() is None, port_file.read_text()
            time.sleep(0.2)
        codes: Counter = Counter()
        details: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client(seed: int) -> None:
            with _channel(target) as channel:
                stub = pb_grpc.InferenceStub(channel)
                while not stop.is_set():
                    try:
                        stub.Predict(pb.PredictRequest(model_name="tiny", images=[sample_image(seed)] * 4),
                                     timeout=15)
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                        if code not in ("OK", "UNAVAILABLE"):
                            details.append(f"{code}: {exc.details()}")
                    with lock:
                        codes[code] += 1
                    if code not in ("OK",):
                        time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        with lock:
            before_signal = codes["OK"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, port_file.read_text()
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert before_signal > 0
    # Refused before admission: UNAVAILABLE (draining), or CANCELLED for a call that reached a worker's gRPC
    # server as it stopped, before any handler saw it (the single-process server does the same; the client
    # library retries both). Never another code, and no admitted call cancelled at the end of the grace period.
    assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, (codes, details)
    assert codes["CANCELLED"] <= 6, (codes, details)  # at most one per client, at the very end
    text = port_file.read_text()
    assert "draining 2 workers" in text and "exited with" not in text
    assert "still in flight" not in text, text


def _wait_serving(target: str, timeout: float = 10) -> None:
    """SERVING on 8 new connections in a row (each may reach either worker)."""
    deadline, streak = time.monotonic() + timeout, 0
    while streak < 8:
        assert time.monotonic() < deadline, "health never turned SERVING"
        streak = streak + 1 if _health_or_none(target) == health_pb2.HealthCheckResponse.SERVING else 0
        if not streak:
            time.sleep(0.05)


def _health_or_none(target: str) -> int | None:
    try:
        return _health(target)
    except grpc.RpcError:
        return None


def test_sizes_follow_the_cgroup_quota(tmp_path, monkeypatch):
    """On a 64-core host with a CPU quota, `--workers auto` and the per-worker threads come from the quota."""
    import imgcls.cpus
    from imgcls.cli import build_parser
    from imgcls.service.cli import serve_config

    (tmp_path / "repo").mkdir()
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu")
    proc_cgroup = tmp_path / "proc-self-cgroup"
    proc_cgroup.write_text("0::/\n")
    monkeypatch.setattr(imgcls.cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(imgcls.cpus, "PROC_SELF_CGROUP", proc_cgroup)
    monkeypatch.setattr(imgcls.cpus, "affinity_cpus", lambda: 64)
    for var in ("IMGCLS_WORKERS", "IMGCLS_CPUS", "IMGCLS_INFERENCE_THREADS", "IMGCLS_DECODE_WORKERS",
                "IMGCLS_DECODE_MEMORY_MB"):
        monkeypatch.delenv(var, raising=False)

    def sizes(quota: str, *flags: str) -> tuple[int, int, int, int]:
        (root / "cpu.max").write_text(quota)
        args = build_parser().parse_args(["serve", "--model-repository", str(tmp_path / "repo"), *flags])
        config, workers = serve_config(args)
        return workers, config.inference_threads, config.decode_workers, config.decode_memory_mb

    per = imgcls.cpus.CPUS_PER_WORKER
    assert sizes("200000 100000") == (1, 2, 2, 768)  # docker --cpus 2: one process, 2 threads (not 64)
    assert sizes(f"{per * 2}00000 100000") == (2, per, per, 384)  # two workers, the quota split between them
    assert sizes("max 100000") == (64 // per, per, per, 768 // (64 // per))  # no quota: the affinity
    assert sizes("800000 100000", "--workers", "1") == (1, 8, 8, 768)
    assert sizes("800000 100000", "--workers", "4", "--inference-threads", "3") == (4, 3, 2, 192)
    # --cpus (k8s sets it from the pod's CPU limit) overrides the detection, for workers and threads alike
    assert sizes("max 100000", "--cpus", "8") == (8 // per, per, per, 768 // (8 // per))
    assert sizes("max 100000", "--cpus", "3") == (1, 3, 3, 768)
