"""KServe v2 / Open Inference Protocol on the imgcls port, driven by the real tritonclient (and by raw
messages for the malformed requests a client library would refuse to build)."""

from __future__ import annotations

import queue
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from service_fixtures import (
    TINY_CLASSES,
    GatedRuntime,
    Reference,
    client_for,
    gated_server,
    metric,
    running_server,
    sample_image,
    scrape,
)
from tritonclient.utils import InferenceServerException

from imgcls.service import protocols
from imgcls.service.kserve_tensors import join_bytes, split_bytes

IMAGES = [sample_image(i, size=(40 + 7 * i, 30 + 5 * i), fmt="PNG" if i % 3 == 0 else "JPEG") for i in range(6)]
SERVICE = "inference.GRPCInferenceService"

pytest_plugins = ["service_plugin"]


@pytest.fixture(scope="module")
def server(service_repo):
    with running_server(service_repo, versions="all", max_images_per_request=4) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def reference(service_repo):
    return Reference(service_repo)


def _images_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def _raw_call(server, method: str):
    """A stub for one method, with the server's own (private-pool) message classes."""
    request_cls, response_cls = protocols.method_types(SERVICE, method)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    call = channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=request_cls.SerializeToString,
                               response_deserializer=response_cls.FromString)
    return channel, call, request_cls


def test_bytes_codec_round_trip_and_truncation():
    items = [b"", b"abc", bytes(range(256)) * 3]
    assert split_bytes(join_bytes(items)) == items
    with pytest.raises(Exception, match="claims 3 bytes"):
        split_bytes(join_bytes([b"abc"])[:-1])
    with pytest.raises(Exception, match="inside a length prefix"):
        split_bytes(b"\1\0")


def test_server_and_model_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1") and client.is_model_ready("other")
    assert not client.is_model_ready("tiny", "7") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta.name == "imgcls" and "classification" in meta.extensions
    model = client.get_model_metadata("tiny")
    assert (model.name, list(model.versions), model.platform) == ("tiny", ["1", "2"], "litert_tflite")
    h, w = server.models["tiny"][2].spec.input_size
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("images", "BYTES", [-1, 1]), ("pixels", "FP32", [-1, h, w, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [("probabilities", "FP32", [-1, 3])]
    config = client.get_model_config("tiny", "1").config  # what perf_analyzer reads before it sends requests
    assert (config.name, config.max_batch_size) == ("tiny", 4)
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("images", 13, [1], True), ("pixels", 11, [h, w, 3], True)]  # TYPE_STRING, TYPE_FP32
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("probabilities", 11, [3])]
    index = client.get_model_repository_index()
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # grpc health knows the service too
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert {(m.name, m.version, m.state) for m in index.models} == {
        ("tiny", "1", "READY"), ("tiny", "2", "READY"), ("other", "1", "READY")}


def test_infer_encoded_images_matches_the_model(client, reference):
    result = client.infer("tiny", [_images_input(IMAGES[:3])], request_id="req-1")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("tiny", "2", "req-1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference.probs(IMAGES[:3]), atol=1e-5)
    older = client.infer("tiny", [_images_input(IMAGES[:1])], model_version="1").get_response()
    assert older.model_version == "1"


def test_infer_preprocessed_pixels_raw_and_in_contents(client, server, reference):
    pixels = reference.inputs(IMAGES[3:5])
    tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    result = client.infer("tiny", [tensor])
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference.probs(IMAGES[3:5]), atol=1e-5)

    channel, infer, request_cls = _raw_call(server, "ModelInfer")
    with channel:
        request = request_cls(model_name="tiny")
        request.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape)).contents.fp32_contents.extend(
            pixels.ravel().tolist())
        response = infer(request, timeout=10)
    probs = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))
    np.testing.assert_allclose(probs, reference.probs(IMAGES[3:5]), atol=1e-5)


def test_classification_extension_gives_top_k_labels(client, reference):
    outputs = [triton.InferRequestedOutput("probabilities", class_count=2)]
    labels = client.infer("tiny", [_images_input(IMAGES[:2])], outputs=outputs).as_numpy("probabilities")
    assert labels.shape == (2, 2)
    for row, probs in zip(labels, reference.probs(IMAGES[:2]), strict=True):
        top = np.argsort(-probs)[:2]
        parsed = [item.decode().split(":") for item in row]
        assert [(int(i), name) for _, i, name in parsed] == [(int(i), TINY_CLASSES[i]) for i in top]
        np.testing.assert_allclose([float(score) for score, _, _ in parsed], probs[top], atol=1e-5)
    capped = [triton.InferRequestedOutput("probabilities", class_count=10)]
    assert client.infer("tiny", [_images_input(IMAGES[:1])], outputs=capped).as_numpy("probabilities").shape == (1, 3)


def _request(request_cls, model="tiny", version="", name="images", datatype="BYTES", shape=None, items=None,
             raw=None, outputs=()):
    request = request_cls(model_name=model, model_version=version)
    items = [IMAGES[0]] if items is None and raw is None else items
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape if shape is not None else [len(items or [])])
    if raw is not None:
        request.raw_input_contents.append(raw)
    else:
        tensor.contents.bytes_contents.extend(items)
    for output in outputs:
        request.outputs.add(name=output)
    return request


@pytest.mark.parametrize(
    ("kwargs", "code", "message"),
    [
        ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "no model 'nope'"),
        ({"version": "7"}, grpc.StatusCode.NOT_FOUND, "no version 7"),
        ({"version": "latest"}, grpc.StatusCode.INVALID_ARGUMENT, "positive integer"),
        ({"name": "image"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'image'"),
        ({"datatype": "UINT8"}, grpc.StatusCode.INVALID_ARGUMENT, "must be BYTES"),
        ({"shape": [2]}, grpc.StatusCode.INVALID_ARGUMENT, "but 1 elements"),
        ({"shape": [1, 2]}, grpc.StatusCode.INVALID_ARGUMENT, "expected [N] or [N, 1]"),
        ({"items": []}, grpc.StatusCode.INVALID_ARGUMENT, "no images"),
        ({"items": [IMAGES[0]] * 5}, grpc.StatusCode.INVALID_ARGUMENT, "at most 4"),
        ({"items": [IMAGES[0], b"garbage"]}, grpc.StatusCode.INVALID_ARGUMENT, "image 1"),
        ({"raw": b"\5\0\0\0abc", "shape": [1]}, grpc.StatusCode.INVALID_ARGUMENT, "claims 5 bytes"),
        ({"outputs": ["logits"]}, grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'logits'"),
        ({"name": "pixels", "datatype": "FP32", "raw": b"\0" * 12, "shape": [1, 1, 1, 3]},
         grpc.StatusCode.INVALID_ARGUMENT, "expects [N, "),
        ({"name": "pixels", "datatype": "FP32", "raw": b"\0" * 8, "shape": [1, 1, 1, 3]},
         grpc.StatusCode.INVALID_ARGUMENT, "but 8 raw bytes"),
    ],
)
def test_infer_status_codes(server, kwargs, code, message):
    channel, infer, request_cls = _raw_call(server, "ModelInfer")
    with channel, pytest.raises(grpc.RpcError) as exc_info:
        infer(_request(request_cls, **kwargs), timeout=10)
    assert exc_info.value.code() == code
    assert message in exc_info.value.details()


def test_two_inputs_and_mixed_contents_are_refused(server):
    channel, infer, request_cls = _raw_call(server, "ModelInfer")
    with channel:
        request = _request(request_cls)
        request.inputs.add(name="pixels", datatype="FP32", shape=[1])
        with pytest.raises(grpc.RpcError, match="send exactly one"):
            infer(request, timeout=10)
        request = _request(request_cls)
        request.raw_input_contents.append(join_bytes([IMAGES[0]]))
        with pytest.raises(grpc.RpcError, match="both contents and raw_input_contents"):
            infer(request, timeout=10)


def test_tritonclient_reports_server_errors(client):
    with pytest.raises(InferenceServerException) as exc_info:
        client.infer("tiny", [_images_input([b"not an image"])])
    assert exc_info.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="no model 'nope'"):
        client.get_model_metadata("nope")


def test_stream_answers_every_request_by_id_and_keeps_going_after_errors(server, reference):
    answers: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=30)
        for i in range(4):
            client.async_stream_infer("tiny", [_images_input(IMAGES[i:i + 2])], request_id=f"r{i}")
        client.async_stream_infer("tiny", [_images_input([b"garbage"])], request_id="bad-image")
        client.async_stream_infer("nope", [_images_input(IMAGES[:1])], request_id="bad-model")
        client.async_stream_infer("tiny", [_images_input(IMAGES[5:6])], request_id="after")
        got = [answers.get(timeout=20) for _ in range(7)]
        client.stop_stream()
    finally:
        client.close()
    results = {result.get_response().id: result for result, error in got if error is None}
    errors = [str(error) for _, error in got if error is not None]
    assert set(results) == {"r0", "r1", "r2", "r3", "after"}
    assert len(errors) == 2
    assert any("INVALID_ARGUMENT" in e for e in errors) and any("no model 'nope'" in e for e in errors)
    for i in range(4):
        np.testing.assert_allclose(results[f"r{i}"].as_numpy("probabilities"), reference.probs(IMAGES[i:i + 2]),
                                   atol=1e-5)


def test_metrics_count_kserve_calls(client, server):
    before = metric(scrape(server), "imgcls_requests_total", method="ModelInfer", model="tiny", version="2",
                    code="OK")
    images_before = metric(scrape(server), "imgcls_images_total", model="tiny", version="2", code="OK")
    client.infer("tiny", [_images_input(IMAGES[:2])])
    text = scrape(server)
    assert metric(text, "imgcls_requests_total", method="ModelInfer", model="tiny", version="2",
                  code="OK") == before + 1
    assert metric(text, "imgcls_images_total", model="tiny", version="2", code="OK") == images_before + 2


def test_loading_then_ready_and_deadline(service_repo):
    """While models load: live, not ready, ModelInfer UNAVAILABLE. A held batch runs past the deadline."""
    gates: dict[str, GatedRuntime] = {}

    def hook(entry, runtime):
        gates[f"{entry.name}/{entry.version}"] = gate = GatedRuntime(runtime)
        gate.gate.clear()
        return gate

    with running_server(service_repo, runtime_hook=hook, wait=False) as server:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            assert _wait_for(lambda: any(g.entered.is_set() for g in gates.values()))
            assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready("tiny")
            with pytest.raises(InferenceServerException) as exc_info:
                client.infer("tiny", [_images_input(IMAGES[:1])])
            assert exc_info.value.status() == "StatusCode.UNAVAILABLE"
            for gate in list(gates.values()):
                gate.gate.set()
            while not server.wait_until_ready(0.2):  # later versions get their gate as they load
                for gate in list(gates.values()):
                    gate.gate.set()
            assert client.is_server_ready() and client.is_model_ready("tiny")
            gate = next(g for key, g in gates.items() if key.startswith("tiny/"))
            gate.reset()
            gate.gate.clear()
            with pytest.raises(InferenceServerException) as exc_info:
                client.infer("tiny", [_images_input(IMAGES[:1])], client_timeout=0.5)
            assert exc_info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            gate.gate.set()
            assert client.infer("tiny", [_images_input(IMAGES[:1])]).as_numpy("probabilities").shape == (1, 3)
        finally:
            for gate in list(gates.values()):
                gate.gate.set()
            client.close()


def _wait_for(condition, timeout: float = 20.0) -> bool:
    done = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if condition():
            return True
        done.wait(0.05)
    return False


def test_cancelled_stream_frees_its_slots_and_is_no_longer_in_flight(service_repo):
    # Room for all three in the queue: with exactly 2, the third could be refused before the first left it.
    with gated_server(service_repo, max_batch_size=1, max_queue_size=4, max_images_per_request=2,
                      max_queue_delay_ms=0) as (server, gate):
        gate.gate.clear()
        request_cls, response_cls = protocols.method_types(SERVICE, "ModelStreamInfer")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stream_call = channel.stream_stream(f"/{SERVICE}/ModelStreamInfer",
                                                    request_serializer=request_cls.SerializeToString,
                                                    response_deserializer=response_cls.FromString)
                requests = (_request(request_cls, items=[IMAGES[i]]) for i in range(3))
                stream = stream_call(requests, timeout=20)
                assert gate.entered.wait(5)
                batcher = server.models["tiny"][2].batcher
                assert _wait_for(lambda: batcher.depth == 2)  # one in the model, two queued
                stream.cancel()
                assert _wait_for(lambda: batcher.depth == 0)
                gate.gate.set()
                assert _wait_for(lambda: metric(scrape(server), "imgcls_inflight_requests",
                                                method="ModelStreamInfer") == 0)
                assert gate.images_seen() == 1
        finally:
            gate.gate.set()


def test_a_version_that_failed_to_load_is_reported(service_repo, tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(service_repo, repo)
    onnx = repo / "tiny" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-16] + b"\0" * 16)  # the manifest's sha256 no longer matches
    with running_server(repo, versions="all", runtime="onnx") as server:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            assert client.is_model_ready("tiny", "2") and not client.is_model_ready("tiny", "1")
            states = {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}
            assert states[("tiny", "2")] == ("READY", "")
            state, reason = states[("tiny", "1")]
            assert state == "UNAVAILABLE" and reason
            channel, index, request_cls = _raw_call(server, "RepositoryIndex")
            with channel:
                ready = index(request_cls(ready=True), timeout=10)
            assert {(m.name, m.version) for m in ready.models} == {("tiny", "2"), ("other", "1")}
            with pytest.raises(InferenceServerException, match="version 1 failed to load"):
                client.get_model_metadata("tiny", "1")
        finally:
            client.close()


def test_model_statistics_count_what_was_served(service_repo):
    """Triton's statistics extension, read with tritonclient (perf_analyzer reads the same): a fresh server,
    known traffic over two protocols, totals that add up."""
    with running_server(service_repo, max_queue_delay_ms=20) as server:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            assert "statistics" in client.get_server_metadata().extensions
            assert client.get_inference_statistics("tiny").model_stats[0].inference_count == 0
            client.infer("tiny", [_images_input(IMAGES[:1])])
            client.infer("tiny", [_images_input(IMAGES[1:3])])
            with pytest.raises(InferenceServerException):
                client.infer("tiny", [_images_input([b"not an image"])])
            client_for(server).predict([IMAGES[3]], model="tiny")  # imgcls.v1 Predict counts too
            stats = client.get_inference_statistics("tiny").model_stats
            assert [(m.name, m.version) for m in stats] == [("tiny", "2")]
            tiny = stats[0]
            infer = tiny.inference_stats
            assert (infer.success.count, infer.fail.count) == (3, 1)
            # Per successful request, as in Triton: perf_analyzer aborts when the compute counts differ.
            assert (infer.queue.count, infer.compute_input.count, infer.compute_infer.count,
                    infer.compute_output.count) == (3, 3, 3, 3)
            assert tiny.inference_count == 4 and 1 <= tiny.execution_count <= 4  # images, batches
            assert sum(b.compute_infer.count for b in tiny.batch_stats) == tiny.execution_count
            assert sum(b.batch_size * b.compute_infer.count for b in tiny.batch_stats) == 4
            assert infer.compute_input.ns > 0 and infer.compute_infer.ns > 0 and tiny.last_inference > 0
            assert infer.compute_infer.ns < infer.success.ns  # a request's batches run within its lifetime
            everything = client.get_inference_statistics().model_stats
            assert {(m.name, m.version) for m in everything} == {("tiny", "2"), ("other", "1")}
            assert next(m for m in everything if m.name == "other").inference_count == 0
            with pytest.raises(InferenceServerException, match="no model 'nope'"):
                client.get_inference_statistics("nope")
        finally:
            client.close()


def test_compat_protos_match_upstream_field_by_field():
    """Every message, field and enum value we declare exists upstream (tritonclient's generated descriptors)
    with the same number, type and cardinality, and every method has upstream's types: wire compatibility."""
    from tritonclient.grpc import model_config_pb2, service_pb2

    pool = protocols.pool()
    ours = [pool.FindFileByName("grpc_service.proto"), pool.FindFileByName("model_config.proto")]
    upstream = {fd.name: fd for fd in (service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR)}

    def check(mine, theirs) -> int:
        checked = 0
        for field in mine.fields:
            other = theirs.fields_by_name.get(field.name)
            assert other is not None, f"{mine.full_name}.{field.name} is not upstream"
            assert (field.number, field.type, field.is_repeated) == (other.number, other.type, other.is_repeated), \
                f"{mine.full_name}.{field.name}"
            kind = field.message_type or field.enum_type
            assert (kind.full_name if kind else None) == ((other.message_type or other.enum_type).full_name
                                                          if kind else None), f"{mine.full_name}.{field.name}"
            checked += 1
        for nested in mine.nested_types:
            checked += check(nested, theirs.nested_types_by_name[nested.name])
        for enum in mine.enum_types:
            assert {v.name: v.number for v in enum.values}.items() <= {
                v.name: v.number for v in theirs.enum_types_by_name[enum.name].values}.items()
        return checked

    fields = 0
    for fd in ours:
        for message in fd.message_types_by_name.values():
            fields += check(message, upstream[fd.name].message_types_by_name[message.name])
        for enum in fd.enum_types_by_name.values():
            assert {v.name: v.number for v in enum.values} == {
                v.name: v.number for v in upstream[fd.name].enum_types_by_name[enum.name].values}
    assert fields > 60
    service, theirs = pool.FindServiceByName(SERVICE), service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name, method.client_streaming,
                method.server_streaming) == (other.input_type.full_name, other.output_type.full_name,
                                             other.client_streaming, other.server_streaming)


def test_drain_not_ready_but_live_refuses_new_calls_and_finishes_the_one_in_flight(service_repo):
    gates: dict[str, GatedRuntime] = {}

    def hook(entry, runtime):
        gates[entry.name] = GatedRuntime(runtime)
        return gates[entry.name]

    with running_server(service_repo, runtime_hook=hook) as server:
        gate = gates["tiny"]
        gate.reset()
        gate.gate.clear()
        channel, infer, request_cls = _raw_call(server, "ModelInfer")
        ready_cls, ready_response = protocols.method_types(SERVICE, "ServerReady")
        live_cls, live_response = protocols.method_types(SERVICE, "ServerLive")
        try:
            with channel:
                ready = channel.unary_unary(f"/{SERVICE}/ServerReady", request_serializer=ready_cls.SerializeToString,
                                            response_deserializer=ready_response.FromString)
                live = channel.unary_unary(f"/{SERVICE}/ServerLive", request_serializer=live_cls.SerializeToString,
                                           response_deserializer=live_response.FromString)
                in_flight = infer.future(_request(request_cls), timeout=20)
                assert gate.entered.wait(5)
                drainer = threading.Thread(target=server.drain, args=(10.0,))
                drainer.start()
                assert _wait_for(lambda: not ready(ready_cls(), timeout=5).ready)
                assert live(live_cls(), timeout=5).live
                with pytest.raises(grpc.RpcError) as exc_info:
                    infer(_request(request_cls), timeout=5)
                assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
                gate.gate.set()
                response = in_flight.result(timeout=10)
                assert response.model_name == "tiny" and len(response.raw_output_contents[0]) == 3 * 4
                drainer.join(15)
                assert not drainer.is_alive()
        finally:
            gate.gate.set()


def test_an_open_stream_does_not_keep_a_replaced_version_loaded(service_repo, tmp_path):
    """Hot reload: ModelStreamInfer pins versions per request, so version 1 is unloaded while the stream stays
    open (not after the 60 s grace period), and the stream's next request is answered by version 2."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(service_repo / "tiny" / "1", repo / "tiny" / "1")
    feed: queue.Queue = queue.Queue()
    with running_server(repo, grace_period=60) as server:
        request_cls, response_cls = protocols.method_types(SERVICE, "ModelStreamInfer")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stream_call = channel.stream_stream(f"/{SERVICE}/ModelStreamInfer",
                                                request_serializer=request_cls.SerializeToString,
                                                response_deserializer=response_cls.FromString)
            responses = stream_call(iter(feed.get, None), timeout=30)
            feed.put(_request(request_cls, items=[IMAGES[0]]))
            assert next(responses).infer_response.model_version == "1"
            shutil.copytree(service_repo / "tiny" / "2", repo / "tiny" / ".staging-2")
            (repo / "tiny" / ".staging-2").rename(repo / "tiny" / "2")  # published atomically, as export does
            server.reload()
            assert _wait_for(lambda: metric(scrape(server), "imgcls_model_loaded", model="tiny", version="1") == 0,
                             timeout=10), "version 1 still loaded with the stream open"
            feed.put(_request(request_cls, items=[IMAGES[1]]))
            second = next(responses)
            assert (second.error_message, second.infer_response.model_version) == ("", "2")
            feed.put(None)
            assert list(responses) == []
