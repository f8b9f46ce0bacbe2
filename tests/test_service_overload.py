"""Issue 14: what the asyncio request path guarantees under overload and misuse, on a real server.

Idle streams hold no thread and cannot starve unary calls or health; a stream ends after its idle timeout;
a malformed stream message is answered in-stream and the stream goes on; refusals are fast, carry a retry
hint and are counted; a deadline the queue cannot meet is refused before compute; every call made shows up
once in `imgcls_requests_total`; compute spent on requests that already failed is counted as wasted.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_fixtures import gated_server, metric, running_server, sample_image, scrape

from imgcls.service import protocols
from imgcls.service.core import RETRY_AFTER_KEY
from imgcls.v1 import inference_pb2 as pb
from imgcls.v1 import inference_pb2_grpc as pb_grpc

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture

IMAGES = [sample_image(300 + i) for i in range(8)]


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _total_requests(text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "imgcls_requests_total")


@pytest.fixture
def gated(service_repo):
    """The `tiny` model behind a gate; one image per batch, three images admitted (one computing, two waiting)."""
    with gated_server(service_repo, max_batch_size=1, max_queue_size=3, max_queue_delay_ms=0) as (server, gate):
        yield server, gate


def _held_and_slow(gated):
    """The gated server with its gate closed and its per-image cost estimate at 0.5 s; (server, gate, model)."""
    server, gate = gated
    gate.gate.clear()
    model = server.models["tiny"][2]
    for _ in range(30):  # a moving average: as if each image had taken 0.5 s for a while
        model.batcher.observe(1, 0.5)
    return server, gate, model


def _idle_stream(channel: grpc.Channel, stop: threading.Event):
    """A PredictStream that sends nothing until `stop` is set."""

    def nothing() -> Iterator[pb.PredictRequest]:
        stop.wait(30)
        return
        yield  # pragma: no cover - makes this a generator

    return pb_grpc.InferenceStub(channel).PredictStream(nothing(), timeout=60)


def test_idle_streams_hold_no_worker_unary_and_health_still_answer(service_repo):
    """96 idle streams (the synchronous server had 64 workers in all) leave Predict and health working."""
    with running_server(service_repo) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stop = threading.Event()
        streams = [_idle_stream(channel, stop) for _ in range(96)]
        try:
            wait_for(lambda: metric(scrape(server), "imgcls_inflight_requests", method="PredictStream") == 96,
                     what="96 streams open")
            stub = pb_grpc.InferenceStub(channel)
            for image in IMAGES[:4]:
                answer = stub.Predict(pb.PredictRequest(model_name="tiny", images=[image]), timeout=5)
                assert answer.results[0].status.code == 0
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            stop.set()
            for stream in streams:
                stream.cancel()


def test_a_stream_idle_past_its_timeout_is_closed_unavailable(service_repo):
    with running_server(service_repo, stream_idle_timeout=0.5) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stop = threading.Event()
        stream = _idle_stream(channel, stop)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc_info:
            list(stream)
        stop.set()
        assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "idle" in exc_info.value.details()
        assert 0.4 < time.monotonic() - start < 10


def test_malformed_stream_messages_are_answered_and_the_stream_goes_on(service_repo):
    """Issue 15's wedge: one KServe message with model_version "²" (isdigit() but not int()) used to leave its
    stream and a worker waiting forever. Now it is answered INVALID_ARGUMENT and the next message is served;
    the same for imgcls.v1 with a bad top_k."""
    request_cls, response_cls = protocols.method_types("inference.GRPCInferenceService", "ModelStreamInfer")
    with running_server(service_repo) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       request_serializer=request_cls.SerializeToString,
                                       response_deserializer=response_cls.FromString)

        def infer(version: str, request_id: str):
            request = request_cls(model_name="tiny", model_version=version, id=request_id)
            tensor = request.inputs.add(name="images", datatype="BYTES", shape=[1])
            tensor.contents.bytes_contents.append(IMAGES[0])
            return request

        outbox: queue.Queue = queue.Queue()
        responses = stream(iter(outbox.get, None), timeout=30)
        outbox.put(infer("²", "bad"))
        bad = next(responses)
        assert bad.error_message.startswith("INVALID_ARGUMENT") and "positive integer" in bad.error_message
        outbox.put(infer("2", "good"))
        good = next(responses)
        assert good.error_message == "" and good.infer_response.id == "good"
        outbox.put(None)
        assert list(responses) == []

        native = pb_grpc.InferenceStub(channel).PredictStream(iter([
            pb.PredictRequest(model_name="tiny", images=[IMAGES[1]], top_k=0, request_id="bad"),
            pb.PredictRequest(model_name="x" * 10_000, images=[IMAGES[1]], request_id="unknown"),
            pb.PredictRequest(model_name="tiny", images=[IMAGES[1]], request_id="good")]), timeout=30)
        answers = {a.request_id: a for a in native}
        assert answers["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert answers["unknown"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert len(answers["unknown"].error.message) < 2000  # a 10 kB name is not echoed whole
        assert answers["good"].error.code == 0 and answers["good"].results[0].labels


def test_full_queue_refusal_carries_a_retry_hint_and_is_counted(gated):
    server, gate = gated
    gate.gate.clear()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        before = _total_requests(scrape(server))
        running = stub.Predict.future(pb.PredictRequest(model_name="tiny", images=[IMAGES[0]]), timeout=20)
        assert gate.entered.wait(5)
        queued = [stub.Predict.future(pb.PredictRequest(model_name="tiny", images=[image]), timeout=20)
                  for image in IMAGES[1:3]]
        wait_for(lambda: server.models["tiny"][2].batcher.depth == 2, what="two images queued")
        with pytest.raises(grpc.RpcError) as exc_info:
            stub.Predict(pb.PredictRequest(model_name="tiny", images=[IMAGES[3]]), timeout=10)
        assert exc_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        hints = dict(exc_info.value.trailing_metadata() or ())
        assert int(hints[RETRY_AFTER_KEY]) >= 10
        gate.gate.set()
        for future in (running, *queued):
            assert future.result().results[0].status.code == 0
        after = scrape(server)
    assert metric(after, "imgcls_requests_total", method="Predict", model="tiny", version="2",
                  code="RESOURCE_EXHAUSTED") == 1
    assert _total_requests(after) - before == 4  # every call made, once, whatever its outcome


def test_after_a_refusal_at_the_limit_the_model_sheds_load_until_it_refuses_nothing_for_a_while(gated):
    """An open-loop overload fills the queue to the limit and every admitted call would then wait for all of
    it: once a call is refused at the limit, a call the full limit would admit is refused too unless its images
    fit in --overload-target-ms, and `imgcls_shedding` says so, until nothing has been refused for a second
    (an idle server too: its gauge goes back to 0 without a call)."""
    server, gate, model = _held_and_slow(gated)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceStub(channel)

        def predict(image: bytes, timeout: float = 20):
            return stub.Predict.future(pb.PredictRequest(model_name="tiny", images=[image]), timeout=timeout)

        running = predict(IMAGES[0])
        assert gate.entered.wait(5)
        queued = [predict(image) for image in IMAGES[1:3]]
        wait_for(lambda: model.batcher.depth == 2, what="two images queued")
        assert metric(scrape(server), "imgcls_shedding", model="tiny") == 0  # a long queue alone is no overload
        with pytest.raises(grpc.RpcError) as exc_info:
            predict(IMAGES[3]).result()
        assert exc_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in exc_info.value.details()
        assert metric(scrape(server), "imgcls_shedding", model="tiny") == 1
        queued[1].cancel()  # a slot frees up, but 2 images ahead need ~1.5 s: more than the 100 ms target
        wait_for(lambda: model.batcher.depth == 1, what="the cancelled image's slot to be freed")
        with pytest.raises(grpc.RpcError) as exc_info:
            predict(IMAGES[4]).result()
        assert exc_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "shedding load" in exc_info.value.details()
        assert int(dict(exc_info.value.trailing_metadata())[RETRY_AFTER_KEY]) >= 10
        gate.gate.set()
        assert running.result().results[0].status.code == 0 and queued[0].result().results[0].status.code == 0
        wait_for(lambda: metric(scrape(server), "imgcls_shedding", model="tiny") == 0, what="shedding to end")
        assert predict(IMAGES[5]).result().results[0].status.code == 0
        text = scrape(server)
    assert metric(text, "imgcls_requests_total", method="Predict", model="tiny", version="2",
                  code="RESOURCE_EXHAUSTED") == 2


def test_a_deadline_the_queue_cannot_meet_is_refused_before_compute(gated):
    """Admission knows the per-image cost: with images queued ahead and too little time left, the request is
    refused DEADLINE_EXCEEDED at once instead of waiting in the queue to expire."""
    server, gate, model = _held_and_slow(gated)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        running = stub.Predict.future(pb.PredictRequest(model_name="tiny", images=[IMAGES[0]]), timeout=20)
        assert gate.entered.wait(5)
        queued = stub.Predict.future(pb.PredictRequest(model_name="tiny", images=[IMAGES[1]]), timeout=20)
        wait_for(lambda: model.batcher.depth == 1, what="one image queued")
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc_info:
            stub.Predict(pb.PredictRequest(model_name="tiny", images=[IMAGES[2]]), timeout=0.3)
        assert exc_info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "queue ahead" in exc_info.value.details()
        assert time.monotonic() - start < 0.25  # refused, not left to expire
        assert model.batcher.depth == 1  # it never took a slot
        gate.gate.set()
        assert running.result().results[0].status.code == 0 and queued.result().results[0].status.code == 0
    assert gate.images_seen() == 2


def test_images_computed_for_a_request_that_already_failed_are_counted_wasted(gated):
    server, gate = gated
    gate.gate.clear()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        call = stub.Predict.future(pb.PredictRequest(model_name="tiny", images=[IMAGES[0]]), timeout=2)
        assert gate.entered.wait(5)  # in the model when its deadline passes
        with pytest.raises(grpc.RpcError) as exc_info:
            call.result()
        assert exc_info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server's copy of the deadline (arrival + the grpc-timeout header) can end a few ms after the
        # client's on a loaded machine: let it pass too before the model finishes, or the image is not waste.
        time.sleep(0.3)
        gate.gate.set()
        wait_for(lambda: metric(scrape(server), "imgcls_wasted_images_total", model="tiny") == 1,
                 what="the wasted image to be counted")


def test_calls_past_the_concurrency_limit_are_refused_and_health_is_not(gated):
    server, gate = gated
    server.config.max_concurrent_calls = 2
    gate.gate.clear()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        held = [stub.Predict.future(pb.PredictRequest(model_name="tiny", images=[image]), timeout=20)
                for image in IMAGES[:2]]
        wait_for(lambda: server.core.inflight() == 2, what="two calls in progress")
        with pytest.raises(grpc.RpcError) as exc_info:
            stub.ListModels(pb.ListModelsRequest(), timeout=5)
        assert exc_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        gate.gate.set()
        for future in held:
            assert future.result().results[0].status.code == 0
