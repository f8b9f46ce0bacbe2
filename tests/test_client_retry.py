"""`Client` retries what a later attempt can fix (UNAVAILABLE, a server's CANCELLED, RESOURCE_EXHAUSTED with
its retry hint) up to the caller's own timeout, and nothing else; a server restarted mid-call is not noticed.

Most tests use `FakeServer`, a small imgcls.v1 server on a free loopback port whose answers a test scripts
(also used by tests/test_batch_failures.py); one uses the real server, restarted on the same port.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from imgcls.client.client import Backoff, Client, ServiceError
from imgcls.v1 import inference_pb2 as pb
from imgcls.v1 import inference_pb2_grpc as pb_grpc

CLASSES = ["cat", "dog", "bird"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Failure = tuple[grpc.StatusCode, str, dict[str, str]]


class FakeInference(pb_grpc.InferenceServicer):
    """Answers Predict with label `cat` for every image, after the scripted failures in `failures` (one per
    call). `on_image(data, context)` may return an error Status for one image, sleep, or abort the call."""

    def __init__(self) -> None:
        self.failures: deque[Failure] = deque()
        self.calls: list[tuple[float, list[bytes]]] = []
        self.on_image: Callable[[bytes, grpc.ServicerContext], pb.Status | None] | None = None
        self.lock = threading.Lock()

    def fail(self, code: grpc.StatusCode, times: int = 1, message: str = "scripted", **metadata: str) -> None:
        self.failures.extend([(code, message, metadata)] * times)

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        with self.lock:
            self.calls.append((time.monotonic(), list(request.images)))
            failure = self.failures.popleft() if self.failures else None
        if failure is not None:
            code, message, metadata = failure
            if metadata:
                context.set_trailing_metadata(tuple(metadata.items()))
            context.abort(code, message)
        response = pb.PredictResponse(model_name=request.model_name or "tiny", model_version=2,
                                      request_id=request.request_id)
        for data in request.images:
            status = self.on_image(data, context) if self.on_image else None
            result = response.results.add()
            if status is not None and status.code:
                result.status.CopyFrom(status)
            else:
                top_k = request.top_k if request.HasField("top_k") else 3
                for i, name in enumerate(CLASSES[:top_k]):
                    result.labels.add(index=i, name=name, score=1.0 / (i + 1))
        return response

    def GetModelMetadata(self, request, context) -> pb.ModelMetadata:
        if request.model_name not in ("", "tiny"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model_name!r} not found")
        return pb.ModelMetadata(name="tiny", version=2, versions=[2], class_names=CLASSES, runtime="onnx")

    def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelSummary(name="tiny", versions=[2], num_classes=3)])


class FakeServer:
    """A gRPC server with `FakeInference` and the standard health service; `stop()`/`start()` restart it on
    the same port (what a rollout does to a client)."""

    def __init__(self, port: int | None = None, workers: int = 8) -> None:
        self.port = port or free_port()
        self.service = FakeInference()
        self.health = health.HealthServicer()
        self.workers = workers
        self.server: grpc.Server | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        server = grpc.server(futures.ThreadPoolExecutor(self.workers))
        pb_grpc.add_InferenceServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        assert server.add_insecure_port(self.target) == self.port
        server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.server = server
        return self

    def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            self.server.stop(grace).wait(10)
            self.server = None


@contextmanager
def fake_server(**kwargs) -> Iterator[FakeServer]:
    server = FakeServer(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()


def _predict(client: Client, **kwargs) -> pb.PredictResponse:
    return client.predict([b"image"], model="tiny", **kwargs)


def test_unavailable_is_retried_until_it_works():
    with fake_server() as server, Client(server.target, timeout=10) as client:
        server.service.fail(grpc.StatusCode.UNAVAILABLE, times=6)
        assert _predict(client).results[0].ok
        assert len(server.service.calls) == 7


def test_retries_stop_at_the_callers_timeout_not_after_a_fixed_count():
    """Today's bug: ~1.5 s of back-off and then UNAVAILABLE, whatever the timeout."""
    with fake_server() as server, Client(server.target, timeout=3.0, backoff=0.05, max_backoff=0.5) as client:
        server.service.fail(grpc.StatusCode.UNAVAILABLE, times=10_000)
        started = time.monotonic()
        with pytest.raises(ServiceError) as info:
            _predict(client)
        took = time.monotonic() - started
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert 2.5 <= took <= 4.0, took  # used the 3 s, and not much more
    assert len(server.service.calls) >= 7


def test_server_cancel_is_retried_but_a_cancel_of_our_own_is_not():
    with fake_server() as server, Client(server.target, timeout=10) as client:
        server.service.fail(grpc.StatusCode.CANCELLED, times=2)
        assert _predict(client).results[0].ok and len(server.service.calls) == 3

    with fake_server() as server:
        entered = threading.Event()

        def hang(data, context):
            entered.set()
            time.sleep(3)

        server.service.on_image = hang
        client = Client(server.target, timeout=10)
        threading.Thread(target=lambda: (entered.wait(5), client.close()), daemon=True).start()
        started = time.monotonic()
        with pytest.raises(ServiceError) as info:
            _predict(client)
        assert info.value.code == grpc.StatusCode.CANCELLED and time.monotonic() - started < 2.5
        assert len(server.service.calls) == 1


def test_resource_exhausted_waits_for_the_servers_retry_hint():
    with fake_server() as server, Client(server.target, timeout=10, backoff=0.01) as client:
        server.service.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, times=2, message="queue full",
                            **{"retry-after-ms": "400"})
        assert _predict(client).results[0].ok
        times = [t for t, _ in server.service.calls]
    assert len(times) == 3
    assert all(b - a >= 0.39 for a, b in itertools.pairwise(times)), times


def test_a_retry_hint_longer_than_the_time_left_fails_at_once():
    with fake_server() as server, Client(server.target, timeout=1.0) as client:
        server.service.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, message="busy", **{"retry-after-ms": "5000"})
        started = time.monotonic()
        with pytest.raises(ServiceError) as info:
            _predict(client)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.retry_after == 5.0
    assert time.monotonic() - started < 0.5 and len(server.service.calls) == 1


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_other_codes_are_not_retried(code):
    with fake_server() as server, Client(server.target, timeout=5) as client:
        server.service.fail(code)
        with pytest.raises(ServiceError) as info:
            _predict(client)
    assert info.value.code == code and len(server.service.calls) == 1


def test_a_message_over_the_size_limit_is_not_retried():
    with fake_server() as server, Client(server.target, timeout=5, max_message_bytes=1000) as client, \
            pytest.raises(ServiceError) as info:
        client.predict([b"x" * 5000], model="tiny")
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in info.value.message


def test_retries_zero_means_none():
    with fake_server() as server, Client(server.target, timeout=5, retries=0) as client:
        server.service.fail(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(ServiceError):
            _predict(client)
    assert len(server.service.calls) == 1


def test_a_restart_of_two_and_a_half_seconds_is_not_noticed():
    server = FakeServer().start()
    try:
        with Client(server.target, timeout=10) as client:
            assert _predict(client).results[0].ok  # connected
            server.stop()
            restart = threading.Timer(2.5, server.start)
            restart.start()
            started = time.monotonic()
            assert _predict(client).results[0].ok  # sent while nothing listens on the port
            took = time.monotonic() - started
            restart.join()
        # By design at most ~4.5 s: a retry sleep of up to the client's 2 s cap began just before the restart
        # at 2.5 s, and by then the channel has reconnected (its back-off is capped at 1 s, RECONNECT_OPTIONS).
        # Measured 4.52 and 5.18 s on a busy CI machine, where the restart itself is slower: 2 s of slack, well
        # short of the client's 10 s timeout (a client that gave up early fails the call above instead).
        assert 2.4 <= took < 6.5, took
    finally:
        server.stop()


def test_a_call_in_flight_when_the_server_stops_is_retried_on_the_next_one():
    server = FakeServer().start()
    entered = threading.Event()

    def slow_once(data, context):
        if not entered.is_set():
            entered.set()
            time.sleep(2)

    server.service.on_image = slow_once
    try:
        def restart() -> None:
            entered.wait(5)
            server.stop(grace=0)  # cancels the call in flight, as a shutdown past its grace period does
            time.sleep(0.5)
            server.start()

        thread = threading.Thread(target=restart)
        thread.start()
        with Client(server.target, timeout=10) as client:
            assert _predict(client).results[0].ok
        thread.join()
        assert len(server.service.calls) >= 2
    finally:
        server.stop()


def test_backoff_is_exponential_with_jitter_and_capped():
    import random

    backoff = Backoff(0.1, 1.0, random.Random(1))
    delays = [backoff.delay(n) for n in range(8)]
    assert all(0.05 * 2**n <= d <= 0.1 * 2**n for n, d in enumerate(delays[:3]))
    assert all(0.5 <= d <= 1.0 for d in delays[4:])
    assert backoff.delay(0, hint=0.7) == 0.7


@pytest.mark.slow
def test_real_server_restarted_on_its_port_mid_run(service_repo):
    """The real server stopped (SIGTERM-like drain) and started again on the same port while a client keeps
    predicting with its timeout of 10 s: every call succeeds."""
    from service_fixtures import running_server, sample_image

    port = free_port()
    image = sample_image(3)
    errors: list[Exception] = []
    answered = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal answered
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            while not stop.is_set():
                try:
                    assert client.predict([image], model="tiny").results[0].ok
                    answered += 1
                except Exception as exc:
                    errors.append(exc)

    with running_server(service_repo, port=port, grace_period=2.0):
        thread = threading.Thread(target=load)
        thread.start()
        time.sleep(0.5)
    try:
        time.sleep(1.0)  # nothing listens for a while
        with running_server(service_repo, port=port):
            time.sleep(1.0)
            stop.set()
            thread.join(20)
    finally:
        stop.set()
        thread.join(20)
    assert not errors, errors[:3]
    assert answered > 0


pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture (real-server test only)
