"""Dynamic batching, queue limits, deadlines, cancellation, health transitions and draining.

A `GatedRuntime` wraps the real ONNX runtime so a test can hold a batch in the model and observe what
reached it, which makes queue states deterministic without sleeps.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_fixtures import (
    Reference,
    client_for,
    gated_server,
    metric,
    running_server,
    sample_image,
    scrape,
)

from imgcls.client.client import ServiceError
from imgcls.service.batcher import Batcher, Cancelled, DeadlineExceeded, QueueFull
from imgcls.v1 import inference_pb2 as pb
from imgcls.v1 import inference_pb2_grpc as pb_grpc

IMAGES = [sample_image(100 + i) for i in range(8)]

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# --- the batcher alone -----------------------------------------------------------------------------------------


def _echo_batcher(**kwargs) -> tuple[Batcher, list[int]]:
    sizes: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return batch[:, :1, 0, 0]  # each row's own marker value

    batcher = Batcher(run, **{"max_batch_size": 4, "max_queue_delay": 0.05, "max_queue_size": 64, **kwargs})
    batcher.start()
    return batcher, sizes


def _marker(value: float) -> np.ndarray:
    return np.full((2, 2, 3), value, np.float32)


def test_batcher_splits_jobs_across_batches_and_keeps_each_jobs_order():
    batcher, sizes = _echo_batcher()
    try:
        jobs = [batcher.admit(n) for n in (3, 5, 2)]
        values = {}
        for j, job in enumerate(jobs):  # put out of order, interleaved across jobs
            for i in reversed(range(job.n)):
                values[(j, i)] = 100 * j + i
        for (j, i), v in sorted(values.items(), key=lambda kv: kv[1] % 7):
            batcher.put(jobs[j], i, _marker(v))
        for j, job in enumerate(jobs):
            assert job.done.wait(5)
            assert [float(r[0]) for r in job.results] == [100 * j + i for i in range(job.n)]
        assert max(sizes) <= 4 and sum(sizes) == 10
        assert batcher.depth == 0
    finally:
        batcher.stop()


def test_the_admission_limit_counts_images_in_a_running_batch():
    """`max_queue_size` bounds every image in the system: images being computed hold their slots until their
    batch returns, so a new request cannot queue behind a full running batch as well as a full queue."""
    entered, release = threading.Event(), threading.Event()

    def run(batch: np.ndarray) -> np.ndarray:
        entered.set()
        assert release.wait(10)
        return batch[:, :1, 0, 0]

    admitted: list[int] = []  # the imgcls_admitted_images gauge's values
    batcher = Batcher(run, max_batch_size=4, max_queue_delay=0.0, max_queue_size=4, on_admitted=admitted.append)
    batcher.start()
    try:
        running = batcher.admit(3)
        for i in range(3):
            batcher.put(running, i, _marker(i))
        assert entered.wait(5)
        wait_for(lambda: batcher.depth == 0)  # nothing waits: all three are in the model
        with pytest.raises(QueueFull, match="3 of 4 images admitted: 0 waiting, 3 being computed"):
            batcher.admit(2)
        one = batcher.admit(1)  # the fourth slot
        assert admitted[-1] == 4
        with pytest.raises(QueueFull):
            batcher.admit(1)
        release.set()
        assert running.done.wait(5)
        wait_for(lambda: _admits(batcher, 2))  # the finished batch gave its slots back
        batcher.put(one, 0, _marker(7))
        assert one.done.wait(5) and float(one.results[0][0]) == 7
        wait_for(lambda: admitted[-1] == 0)  # every image answered: nothing admitted
    finally:
        release.set()
        batcher.stop()


def _admits(batcher: Batcher, n: int) -> bool:
    try:
        job = batcher.admit(n)
    except QueueFull:
        return False
    batcher.cancel(job)
    return True


def test_batcher_refuses_when_full_and_frees_slots_on_cancel_and_failure():
    batcher, _ = _echo_batcher(max_queue_size=4)
    try:
        a = batcher.admit(3)
        with pytest.raises(QueueFull):
            batcher.admit(2)
        batcher.cancel(a)
        assert all(isinstance(r, Cancelled) for r in a.results) and batcher.depth == 0
        b = batcher.admit(4)
        batcher.fail(b, 0, ValueError("undecodable"))
        assert batcher.depth == 3
        for i in range(1, 4):
            batcher.put(b, i, _marker(i))
        assert b.done.wait(5) and isinstance(b.results[0], ValueError)
        assert batcher.depth == 0
    finally:
        batcher.stop()


def test_a_refusal_at_the_limit_sheds_load_until_nothing_is_refused_for_a_while(monkeypatch):
    """Below the limit nothing is refused, however long the queue; once a request is refused at the limit, the
    batcher admits only what it computes within the overload target, until it has refused nothing for
    SHED_QUIET seconds. Running empty does not end it: under overload the queue empties many times a second."""
    from imgcls.service import batcher as batching

    monkeypatch.setattr(batching, "SHED_QUIET", 0.3)
    states: list[bool] = []
    batcher = Batcher(lambda b: b, max_batch_size=1, max_queue_delay=0.0, max_queue_size=4, overload_target=0.25,
                      on_shedding=states.append)
    batcher.per_image = 0.1
    jobs = [batcher.admit(1) for _ in range(4)]  # a closed loop of 4 clients: 0.4 s of work, never refused
    assert not batcher.shedding and states == []
    with pytest.raises(QueueFull, match="queue full"):
        batcher.admit(1)
    assert batcher.shedding and states == [True]
    for job in jobs[:2]:
        batcher.cancel(job)
    with pytest.raises(QueueFull, match=r"shedding load: 2 images admitted need about 300 ms"):
        batcher.admit(1)  # the full limit would admit it: 3 images, 0.3 s > 0.25 s
    refused = time.monotonic()
    batcher.cancel(jobs[2])
    jobs[2:] = [jobs[3], batcher.admit(1)]  # 2 images, 0.2 s: within the target
    for job in jobs[2:]:
        batcher.cancel(job)
    if time.monotonic() - refused < 0.25:  # (a slow machine may have let the quiet time pass already)
        assert batcher.shedding and states == [True]  # empty, but it refused something 0.3 s ago at most
    time.sleep(max(0.0, refused + 0.35 - time.monotonic()))
    jobs = [batcher.admit(1) for _ in range(4)]  # the full limit again
    assert not batcher.shedding and states == [True, False]
    for job in jobs:
        batcher.cancel(job)


def test_retried_refusals_do_not_keep_shedding_on_past_its_probe_period(monkeypatch):
    """Clients that retry what shedding refused keep the refusals going even when their demand fits the full
    limit; shedding ends after its probe period anyway, and an overload that refills the queue at once
    brings it back with the period doubled."""
    from imgcls.service import batcher as batching

    monkeypatch.setattr(batching, "SHED_QUIET", 0.2)
    monkeypatch.setattr(batching, "SHED_PROBE_MAX", 0.8)
    batcher = Batcher(lambda b: b, max_batch_size=1, max_queue_delay=0.0, max_queue_size=2, overload_target=0.05)
    batcher.per_image = 1.0

    def retry_until_admitted() -> float:
        """Seconds of refusals, a retry every 20 ms, until a request is admitted."""
        start = time.monotonic()
        while True:
            try:
                jobs.append(batcher.admit(1))
                return time.monotonic() - start
            except QueueFull as exc:
                assert "shedding load" in str(exc)
                assert time.monotonic() - start < 5, "shedding never ended"
                time.sleep(0.02)

    jobs = [batcher.admit(1), batcher.admit(1)]
    with pytest.raises(QueueFull, match="queue full"):
        batcher.admit(1)  # shedding on, for 0.2 s at most
    batcher.cancel(jobs.pop())
    first = retry_until_admitted()
    assert 0.15 <= first < 0.6 and not batcher.shedding
    with pytest.raises(QueueFull, match="queue full"):
        batcher.admit(1)  # the queue is full again right away: the overload persists, 0.4 s this time
    batcher.cancel(jobs.pop())
    second = retry_until_admitted()
    assert 0.35 <= second < 1.0 and second > first
    for job in jobs:
        batcher.cancel(job)


def test_while_shedding_a_model_slower_than_the_target_still_gets_an_image_per_instance():
    batcher = Batcher([lambda b: b, lambda b: b], max_batch_size=1, max_queue_delay=0.0, max_queue_size=3,
                      overload_target=0.05)
    batcher.per_image = 1.0  # one image takes 20x the target
    jobs = [batcher.admit(1) for _ in range(3)]
    with pytest.raises(QueueFull, match="queue full"):
        batcher.admit(1)
    batcher.cancel(jobs[0])
    with pytest.raises(QueueFull, match="shedding load"):
        batcher.admit(1)  # a third image would wait for one of the two
    batcher.cancel(jobs[1])
    jobs = [jobs[2], batcher.admit(1)]  # one per instance: admitted, however slow
    assert batcher.shedding
    for job in jobs:
        batcher.cancel(job)


def test_without_an_overload_target_a_refusal_does_not_shed():
    batcher = Batcher(lambda b: b, max_batch_size=1, max_queue_delay=0.0, max_queue_size=2)
    batcher.per_image = 10.0
    jobs = [batcher.admit(1) for _ in range(2)]
    with pytest.raises(QueueFull):
        batcher.admit(1)
    batcher.cancel(jobs[0])
    batcher.cancel(batcher.admit(1))  # 20 s of work ahead, admitted: no target, no shedding
    assert not batcher.shedding


def test_batcher_drops_expired_images_before_compute():
    batcher, sizes = _echo_batcher()
    try:
        job = batcher.admit(2, deadline=time.monotonic() - 1)
        batcher.put(job, 0, _marker(1))
        batcher.put(job, 1, _marker(2))
        assert job.done.wait(5)
        assert all(isinstance(r, DeadlineExceeded) for r in job.results)
        assert sizes == []
    finally:
        batcher.stop()


def test_lone_image_is_not_held_for_the_queue_delay():
    batcher, _ = _echo_batcher(max_queue_delay=5.0)
    try:
        job = batcher.admit(1)
        start = time.monotonic()
        batcher.put(job, 0, _marker(1))
        assert job.done.wait(5)
        assert time.monotonic() - start < 1.0
    finally:
        batcher.stop()


# --- through the server ----------------------------------------------------------------------------------------


@pytest.fixture
def gated(service_repo):
    """A server whose `tiny` model runs behind a gate, with a 1-image batch and 3 images admitted at most: one
    in the running batch and two waiting."""
    with gated_server(service_repo, max_batch_size=1, max_queue_size=3, max_images_per_request=2,
                      max_queue_delay_ms=0) as (server, gate):
        yield server, gate


def _future(stub, image: bytes, timeout: float = 20):
    return stub.Predict.future(pb.PredictRequest(model_name="tiny", images=[image]), timeout=timeout)


def test_full_queue_is_resource_exhausted_at_once_and_cancel_frees_a_slot(gated):
    server, gate = gated
    gate.gate.clear()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        running = _future(stub, IMAGES[0])
        assert gate.entered.wait(5)  # in the model, holding the gate
        queued = [_future(stub, IMAGES[1]), _future(stub, IMAGES[2])]
        wait_for(lambda: server.models["tiny"][2].batcher.depth == 2)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc_info:
            stub.Predict(pb.PredictRequest(model_name="tiny", images=[IMAGES[3]]), timeout=10)
        assert exc_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - start < 1.0
        # the limit counts the image in the running batch too, not only the two waiting
        assert "3 of 3 images admitted: 2 waiting, 1 being computed" in exc_info.value.details()
        text = scrape(server)
        assert metric(text, "imgcls_queue_depth", model="tiny") == 2
        assert metric(text, "imgcls_admitted_images", model="tiny") == 3  # what the limit counts
        queued[1].cancel()  # the client gives up: its slot is freed
        wait_for(lambda: server.models["tiny"][2].batcher.depth == 1)
        replacement = _future(stub, IMAGES[4])
        wait_for(lambda: server.models["tiny"][2].batcher.depth == 2)
        gate.gate.set()
        for future in (running, queued[0], replacement):
            assert future.result().results[0].status.code == 0
        assert gate.images_seen() == 3  # the cancelled image never reached the model
        wait_for(lambda: metric(scrape(server), "imgcls_admitted_images", model="tiny") == 0)


def test_deadline_passed_in_queue_is_dropped_before_compute(gated, service_repo):
    server, gate = gated
    gate.gate.clear()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        running = _future(stub, IMAGES[0])
        assert gate.entered.wait(5)
        with pytest.raises(grpc.RpcError) as exc_info:
            stub.Predict(pb.PredictRequest(model_name="tiny", images=[IMAGES[5]]), timeout=0.3)
        assert exc_info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: server.models["tiny"][2].batcher.depth == 0)
        gate.gate.set()
        assert running.result().results[0].status.code == 0
    dropped = Reference(service_repo).inputs([IMAGES[5]])[0]
    assert gate.images_seen() == 1
    assert not any(np.array_equal(row, dropped) for batch in gate.batches for row in batch)


def test_multi_image_request_split_over_batches(gated, service_repo):
    server, gate = gated  # max batch size 1: a 2-image request needs two batches
    images = [IMAGES[6], IMAGES[7]]
    with client_for(server) as client:
        prediction = client.predict(images, model="tiny", top_k=3)
    expected = Reference(service_repo).probs(images)
    for result, probs in zip(prediction.results, expected, strict=True):
        got = {lb.index: lb.score for lb in result.labels}
        np.testing.assert_allclose([got[i] for i in range(3)], probs, atol=1e-5)
    assert [len(b) for b in gate.batches] == [1, 1]


def test_batches_form_under_concurrent_load(service_repo):
    with running_server(service_repo, max_batch_size=8, max_queue_delay_ms=50) as server:
        with client_for(server) as client, ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: client.predict([IMAGES[i % 8]], model="tiny"), range(64)))
        text = scrape(server)
    batches = metric(text, "imgcls_batch_size_count", model="tiny")
    assert metric(text, "imgcls_batch_size_sum", model="tiny") == 64
    assert batches < 64  # some batches held more than one image


def test_health_not_serving_until_loaded_then_serving_then_draining(service_repo):
    release = threading.Event()

    def slow_load(entry, runtime):
        assert release.wait(20)
        return runtime

    with running_server(service_repo, runtime_hook=slow_load, wait=False) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.InferenceStub(channel)

        def status(service: str = "") -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert status("imgcls.v1.Inference") == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as exc_info:
            stub.Predict(pb.PredictRequest(model_name="tiny", images=[IMAGES[0]]), timeout=5)
        assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
        # The client retries UNAVAILABLE: a call made while loading succeeds once the models are up.
        with client_for(server, retries=8, backoff=0.05) as client, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.predict, [IMAGES[0]], model="tiny", timeout=20)
            time.sleep(0.3)
            release.set()
            assert pending.result().results[0].ok
            with pytest.raises(ServiceError) as no_retry:
                client.predict([IMAGES[0]], model="nope")
            assert no_retry.value.code == grpc.StatusCode.NOT_FOUND
        assert status() == health_pb2.HealthCheckResponse.SERVING
        channel.close()


def test_drain_finishes_calls_in_flight_and_refuses_new_ones(gated):
    server, gate = gated
    gate.gate.clear()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.InferenceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    in_flight = _future(stub, IMAGES[0])
    assert gate.entered.wait(5)
    drainer = threading.Thread(target=server.drain, kwargs={"grace": 10})
    drainer.start()
    wait_for(lambda: not server.accepting)
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as exc_info:
        stub.Predict(pb.PredictRequest(model_name="tiny", images=[IMAGES[1]]), timeout=5)
    assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "draining" in exc_info.value.details()
    gate.gate.set()
    assert in_flight.result(timeout=10).results[0].status.code == 0
    drainer.join(10)
    assert not drainer.is_alive()
    channel.close()


def test_cancelled_stream_frees_its_slots_and_is_no_longer_in_flight(gated):
    server, gate = gated
    gate.gate.clear()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.InferenceStub(channel)
    # Two requests: one in the model, one queued. (A third could arrive before the batcher takes the first
    # and be refused by the 2-image queue, which made this test flaky.)
    requests = (pb.PredictRequest(model_name="tiny", images=[IMAGES[i]], request_id=str(i)) for i in range(2))
    stream = stub.PredictStream(requests, timeout=20)
    assert gate.entered.wait(5)
    wait_for(lambda: server.models["tiny"][2].batcher.depth == 1)
    stream.cancel()
    wait_for(lambda: server.models["tiny"][2].batcher.depth == 0)
    gate.gate.set()
    wait_for(lambda: metric(scrape(server), "imgcls_inflight_requests", method="PredictStream") == 0)
    assert gate.images_seen() == 1
    channel.close()


# --- model instances (several runtimes on one queue) -------------------------------------------------------------


class _Instance:
    """A runtime that records what it ran and can be held inside a batch."""

    def __init__(self, name: str, log: list[tuple[str, int]]) -> None:
        self.name, self.log = name, log
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.log.append((self.name, len(batch)))
        self.entered.set()
        assert self.gate.wait(10)
        return batch[:, :1, 0, 0]


def _instances_batcher(count: int, solo: bool = True, **kwargs):
    log: list[tuple[str, int]] = []
    runs = [_Instance(f"i{k}", log) for k in range(count)]
    lone = _Instance("solo", log) if solo else None
    batcher = Batcher([r.run for r in runs], solo=lone.run if lone else None,
                      **{"max_batch_size": 4, "max_queue_delay": 0.0, "max_queue_size": 64, **kwargs})
    batcher.start()
    return batcher, runs, lone, log


def test_lone_batches_run_on_the_all_threads_runtime_and_stay_on_one_instance():
    batcher, _runs, _lone, log = _instances_batcher(2)
    try:
        for k in range(5):  # one request at a time: each batch runs alone
            job = batcher.admit(1)
            batcher.put(job, 0, _marker(k))
            assert job.done.wait(5)
            assert float(job.results[0][0]) == k
        assert log == [("solo", 1)] * 5
    finally:
        batcher.stop()


def test_a_batch_is_not_lone_while_other_images_are_still_decoding():
    """Admitted images not yet queued are being decoded: the batch ahead of them runs on instance 0, not on the
    lone-batch runtime, whose spinning threads would take the decode workers' cores."""
    batcher, _runs, _lone, log = _instances_batcher(2)
    try:
        job = batcher.admit(2)  # two images admitted, only the first decoded yet
        batcher.put(job, 0, _marker(0))
        deadline = time.monotonic() + 5
        while not log and time.monotonic() < deadline:
            time.sleep(0.01)
        batcher.put(job, 1, _marker(1))
        assert job.done.wait(5)
        assert log == [("i0", 1), ("solo", 1)], log  # the last image ran alone: nothing else was decoding
    finally:
        batcher.stop()


def test_a_second_instance_takes_a_batch_while_the_first_is_busy():
    batcher, runs, lone, log = _instances_batcher(2)
    try:
        lone.gate.clear()  # the first batch runs alone (solo) and is held there
        first = batcher.admit(1)
        batcher.put(first, 0, _marker(1))
        assert lone.entered.wait(5)
        runs[1].gate.clear()
        second = batcher.admit(2)  # arrives while one instance is busy: instance 1 takes it, not alone
        for i in range(2):
            batcher.put(second, i, _marker(10 + i))
        assert runs[1].entered.wait(5), f"the second instance never ran a batch: {log}"
        assert ("i1", 2) in log and not first.done.is_set() and not second.done.is_set()
        lone.gate.set()
        runs[1].gate.set()
        assert first.done.wait(5) and second.done.wait(5)
        assert [float(r[0]) for r in second.results] == [10, 11]
        assert batcher.depth == 0
    finally:
        for r in [*runs, lone]:
            r.gate.set()
        batcher.stop()


class _Threads(_Instance):
    """An _Instance that also records which thread ran each batch."""

    def __init__(self, name: str, log: list[tuple[str, int]]) -> None:
        super().__init__(name, log)
        self.threads: list[str] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        return super().run(batch)


def test_a_lone_image_runs_on_the_callers_thread_only_when_it_may():
    """put(may_run=True) from a decode thread computes a lone image itself (no instance thread to wake); the
    event loop's put (may_run False) and an image that is not alone always go to an instance thread."""
    log: list[tuple[str, int]] = []
    runs = [_Threads(f"i{k}", log) for k in range(2)]
    lone = _Threads("solo", log)
    batcher = Batcher([r.run for r in runs], solo=lone.run, max_batch_size=4, max_queue_delay=0.0,
                      max_queue_size=64, name="m")
    batcher.start()
    try:
        job = batcher.admit(1)
        batcher.put(job, 0, _marker(3), may_run=True)
        assert job.done.is_set() and float(job.results[0][0]) == 3  # computed before put returned
        assert lone.threads == [threading.current_thread().name]
        assert batcher.depth == 0 and batcher._busy == 0 and not batcher._inline

        job = batcher.admit(1)
        batcher.put(job, 0, _marker(4))  # may_run False: the first instance's thread runs it (alone: solo)
        assert job.done.wait(5) and lone.threads[-1] == "batcher-m-0"

        job = batcher.admit(2)  # two images admitted: the first is not alone, so it is queued
        batcher.put(job, 0, _marker(5), may_run=True)
        wait_for(lambda: ("i0", 1) in log)
        assert not job.done.is_set()
        batcher.put(job, 1, _marker(6), may_run=True)  # now it is the only image in the system: runs here
        assert job.done.is_set() and [float(r[0]) for r in job.results] == [5, 6]
        assert runs[0].threads == ["batcher-m-0"] and lone.threads[-1] == threading.current_thread().name
    finally:
        batcher.stop()


@pytest.mark.parametrize("instances", [1, 2])
def test_a_run_on_the_callers_thread_holds_the_first_instances_place(instances):
    """While put() computes a lone image, the next batch goes to the second instance, or with one instance
    waits for it: never more batches at once than instances. close() waits for that run too, so the runtime
    is not released under it."""
    batcher, runs, lone, log = _instances_batcher(instances, solo=instances > 1)
    held = lone if lone is not None else runs[0]
    try:
        held.gate.clear()
        first = batcher.admit(1)
        caller = threading.Thread(target=batcher.put, args=(first, 0, _marker(1)), kwargs={"may_run": True})
        caller.start()
        assert held.entered.wait(5)
        held.entered.clear()
        second = batcher.admit(1)
        batcher.put(second, 0, _marker(2), may_run=True)  # not alone: another batch is running
        if instances == 2:
            assert second.done.wait(5) and log[-1] == ("i1", 1)
        else:
            time.sleep(0.2)
            assert not second.done.is_set() and log == [("i0", 1)]  # waits for the run in put()
        closer = threading.Thread(target=batcher.close, args=(10,))
        closer.start()
        time.sleep(0.2)
        assert closer.is_alive()  # close() waits for the run on the caller's thread
        held.gate.set()
        closer.join(5)
        caller.join(5)
        assert not closer.is_alive() and first.done.is_set() and second.done.is_set()
        assert [float(j.results[0][0]) for j in (first, second)] == [1, 2]
    finally:
        for r in [*runs, lone]:
            if r is not None:
                r.gate.set()
        batcher.stop()


def test_instances_split_a_large_request_and_keep_its_order():
    batcher, runs, _lone, log = _instances_batcher(2, solo=False)
    try:
        for r in runs:
            r.gate.clear()
        job = batcher.admit(12)
        for i in range(12):
            batcher.put(job, i, _marker(i))
        wait_for(lambda: runs[0].entered.is_set() and runs[1].entered.is_set())
        for r in runs:
            r.gate.set()
        assert job.done.wait(5)
        assert [float(r[0]) for r in job.results] == list(range(12))
        assert {name for name, _ in log} == {"i0", "i1"} and sum(n for _, n in log) == 12
        assert len(job.batches) == len(log) and job.infer_s > 0
    finally:
        for r in runs:
            r.gate.set()
        batcher.stop()


def test_close_with_several_instances_finishes_what_was_admitted():
    batcher, _runs, _lone, _log = _instances_batcher(3, solo=False)
    jobs = [batcher.admit(2) for _ in range(3)]
    for job in jobs:
        for i in range(2):
            batcher.put(job, i, _marker(i))
    assert batcher.close(10)
    assert all(job.done.is_set() for job in jobs)
    assert not any(t.is_alive() for t in batcher._threads)
    with pytest.raises(Exception, match="shutting down"):
        batcher.admit(1)


def test_instance_plan():
    from imgcls.service.models import plan_instances

    assert plan_instances("onnx", 2).runtime_threads == [1, 1, 2]  # two single-threaded + one for lone batches
    assert plan_instances("tflite-int8", 4).runtime_threads == [2, 2, 4]
    assert plan_instances("onnx", 1).runtime_threads == [1]
    assert plan_instances("savedmodel", 8).runtime_threads == [8]  # TensorFlow: one copy of the graph
    assert plan_instances("onnx", 2, requested=1).runtime_threads == [2]
    assert plan_instances("onnx", 6, requested=3).runtime_threads == [2, 2, 2, 6]
    assert plan_instances("onnx", 2, requested=4).runtime_threads == [1, 1, 1, 1, 2]
    assert plan_instances("onnx", 1, requested=2).runtime_threads == [1, 1]  # no more threads for a lone batch


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_server_with_two_instances_answers_like_the_model(service_repo, runtime, caplog):
    """Two instances (two inference threads, so one more runtime for lone batches): concurrent requests are
    spread over the instances and every answer is the model's own output for that request's images."""
    reference = Reference(service_repo)
    expected = reference.probs(IMAGES)
    with caplog.at_level("INFO", logger="imgcls.service.models"), running_server(
            service_repo, inference_threads=2, instances=2, model_runtimes={"tiny": runtime}, max_batch_size=4,
            max_queue_delay_ms=20) as server:
        with client_for(server) as client, ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda i: (i, client.predict([IMAGES[i % 8], IMAGES[(i + 3) % 8]],
                                                                 model="tiny", top_k=3)), range(48)))
        text = scrape(server)
    for i, result in results:
        for image, k in zip(result.results, (i % 8, (i + 3) % 8), strict=True):
            got = np.zeros(3, np.float32)
            for label in image.labels:
                got[label.index] = label.score
            np.testing.assert_allclose(got, expected[k], atol=2e-5)
    assert metric(text, "imgcls_batch_size_sum", model="tiny") == 96
    assert any("2 instance(s) x 1 thread(s), 2 threads for a lone batch" in r.getMessage() for r in caplog.records)


def test_only_the_lone_batch_runtime_spins(service_repo):
    """On 2 inference threads: two single-threaded instances that never spin, and the two-threaded runtime
    for lone batches, whose threads spin within a run (imgcls.runtimes.OnnxRuntime)."""
    loaded = []

    def hook(entry, runtime):
        loaded.append(runtime)
        return runtime

    with running_server(service_repo, runtime_hook=hook, inference_threads=2, model_runtimes={"tiny": "onnx"}):
        pass
    key = "session.intra_op.allow_spinning"
    by_model = [r.session.get_session_options() for r in loaded if r.session.get_inputs()[0].shape[1] == 32]
    assert [o.intra_op_num_threads for o in by_model] == [1, 1, 2]
    assert [o.get_session_config_entry(key) for o in by_model] == ["0", "0", "1"]


def test_expected_done_counts_the_last_batch_on_one_instance():
    """Admission's estimate: the work ahead is shared by the instances, the batch holding the new images is not."""
    one = Batcher(lambda b: b, max_batch_size=32, max_queue_delay=0.0, max_queue_size=64)
    two = Batcher([lambda b: b, lambda b: b], max_batch_size=32, max_queue_delay=0.0, max_queue_size=64)
    for batcher in (one, two):
        batcher.per_image = 0.01
        assert batcher.expected_done(1) == pytest.approx(0.01)  # nothing ahead: one image's time, on any count
        batcher.admit(64)
    assert one.expected_done(1) == pytest.approx(0.65)  # 65 images, one after the other
    # 65 images over two instances: 33 shared out (0.165 s), then a full batch of 32 on one instance (0.32 s)
    assert two.expected_done(1) == pytest.approx(0.485)
    assert two.expected_done(1) > two.expected_wait() + 0.01  # the old estimate left the last batch out
