"""The gRPC API against a real server: predictions, status codes, streaming, metadata, metrics, client, CLI."""

from __future__ import annotations

import io
import json
import random
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image
from service_fixtures import (
    OTHER_CLASSES,
    TINY_CLASSES,
    Reference,
    client_for,
    metric,
    running_server,
    sample_image,
    scrape,
)

from imgcls.client.client import ServiceError
from imgcls.v1 import inference_pb2 as pb
from imgcls.v1 import inference_pb2_grpc as pb_grpc

IMAGES = [sample_image(i, size=(40 + 7 * i, 30 + 5 * i), fmt="PNG" if i % 3 == 0 else "JPEG") for i in range(12)]
LIMITS = {"max_images_per_request": 8, "max_image_pixels": 1_000_000, "max_message_bytes": 4 * 1024 * 1024}

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture


@pytest.fixture(scope="module")
def server(service_repo):
    with running_server(service_repo, versions="all", **LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.InferenceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def reference(service_repo):
    return Reference(service_repo)


def _probs(result: pb.ImageResult, classes: int) -> np.ndarray:
    out = np.zeros(classes, np.float32)
    for label in result.labels:
        out[label.index] = label.score
    return out


def _code(exc_info) -> grpc.StatusCode:
    return exc_info.value.code()


def test_predict_matches_direct_model_output(stub, reference):
    response = stub.Predict(pb.PredictRequest(model_name="tiny", images=[IMAGES[0]], top_k=3))
    assert (response.model_name, response.model_version) == ("tiny", 2)
    [result] = response.results
    assert result.status.code == 0
    expected = reference.probs([IMAGES[0]])[0]
    np.testing.assert_allclose(_probs(result, 3), expected, atol=1e-5)
    assert [lb.index for lb in result.labels] == list(np.argsort(-expected))
    assert [lb.name for lb in result.labels] == [TINY_CLASSES[i] for i in np.argsort(-expected)]


def test_top_k_default_and_cap(stub):
    response = stub.Predict(pb.PredictRequest(model_name="tiny", images=[IMAGES[1]]))  # unset: 5, capped at 3
    assert len(response.results[0].labels) == 3
    response = stub.Predict(pb.PredictRequest(model_name="tiny", images=[IMAGES[1]], top_k=1))
    assert len(response.results[0].labels) == 1


def test_multi_image_request_reports_bad_image_and_keeps_order(stub, reference):
    images = [IMAGES[2], b"not an image", IMAGES[3], IMAGES[4][:50], IMAGES[5]]
    response = stub.Predict(pb.PredictRequest(model_name="tiny", images=images, top_k=3))
    codes = [r.status.code for r in response.results]
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert "decodable" in response.results[1].status.message
    assert response.results[1].labels == []
    expected = reference.probs([IMAGES[2], IMAGES[3], IMAGES[5]])
    for result, probs in zip([response.results[i] for i in (0, 2, 4)], expected, strict=True):
        np.testing.assert_allclose(_probs(result, 3), probs, atol=1e-5)


@pytest.mark.parametrize(
    ("request_kwargs", "code", "message"),
    [
        ({"model_name": "tiny"}, grpc.StatusCode.INVALID_ARGUMENT, "no images"),
        ({"model_name": "tiny", "images": [b"garbage"]}, grpc.StatusCode.INVALID_ARGUMENT, "decodable"),
        ({"model_name": "tiny", "images": [IMAGES[0]], "top_k": 0}, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        ({"model_name": "tiny", "images": [IMAGES[0]] * 9}, grpc.StatusCode.INVALID_ARGUMENT, "at most 8"),
        ({"images": [IMAGES[0]]}, grpc.StatusCode.INVALID_ARGUMENT, "model_name is required"),
        ({"model_name": "nope", "images": [IMAGES[0]]}, grpc.StatusCode.NOT_FOUND, "no model 'nope'"),
        ({"model_name": "tiny", "model_version": 7, "images": [IMAGES[0]]}, grpc.StatusCode.NOT_FOUND, "version 7"),
    ],
)
def test_status_codes(stub, request_kwargs, code, message):
    with pytest.raises(grpc.RpcError) as exc_info:
        stub.Predict(pb.PredictRequest(**request_kwargs))
    assert _code(exc_info) == code
    assert message in exc_info.value.details()


def test_decompression_bomb_and_message_size_limits(stub):
    buf = io.BytesIO()
    Image.new("RGB", (2000, 1000), "white").save(buf, format="PNG")  # 2 Mpx > 1 Mpx limit, ~10 kB encoded
    with pytest.raises(grpc.RpcError) as exc_info:
        stub.Predict(pb.PredictRequest(model_name="tiny", images=[buf.getvalue()]))
    assert _code(exc_info) == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the limit" in exc_info.value.details()
    with pytest.raises(grpc.RpcError) as exc_info:  # 5 MB message > 4 MB limit
        stub.Predict(pb.PredictRequest(model_name="tiny", images=[b"\0" * (5 * 1024 * 1024)]))
    assert _code(exc_info) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_versions(stub):
    assert stub.Predict(pb.PredictRequest(model_name="tiny", model_version=1, images=[IMAGES[0]])).model_version == 1
    assert stub.Predict(pb.PredictRequest(model_name="tiny", images=[IMAGES[0]])).model_version == 2
    other = stub.Predict(pb.PredictRequest(model_name="other", images=[IMAGES[0]], top_k=4))
    assert (other.model_name, other.model_version) == ("other", 1)
    assert sorted(lb.name for lb in other.results[0].labels) == sorted(OTHER_CLASSES)


def test_metadata_and_list_models(stub):
    meta = stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name="tiny"))
    assert (meta.name, meta.version, list(meta.versions)) == ("tiny", 2, [1, 2])
    assert list(meta.class_names) == TINY_CLASSES
    assert meta.backbone == "mobilenet_v2" and meta.runtime == "tflite"  # the default order: tflite > onnx
    assert set(meta.formats) == {"onnx", "tflite", "tflite-fp16", "tflite-int8", "savedmodel"}
    p = meta.preprocessing
    assert (p.height, p.width, p.mode, p.channel_order) == (32, 32, "tf", "RGB")
    assert p.scale == pytest.approx(1 / 127.5) and list(p.mean) == [1.0, 1.0, 1.0]
    assert stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name="tiny", model_version=1)).version == 1
    with pytest.raises(grpc.RpcError) as exc_info:
        stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name="missing"))
    assert _code(exc_info) == grpc.StatusCode.NOT_FOUND
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [(m.name, list(m.versions), m.num_classes, m.runtime) for m in models] == [
        ("other", [1], 4, "onnx"), ("tiny", [1, 2], 3, "tflite")]


def test_stream_answers_every_request_and_reports_failures_in_stream(stub, reference):
    requests = [
        pb.PredictRequest(model_name="tiny", images=[IMAGES[i], IMAGES[i + 1]], request_id=f"r{i}", top_k=3)
        for i in range(6)
    ]
    requests.insert(2, pb.PredictRequest(model_name="nope", images=[IMAGES[0]], request_id="bad-model"))
    requests.insert(4, pb.PredictRequest(model_name="tiny", images=[b"junk"], request_id="bad-image"))
    responses = {r.request_id: r for r in stub.PredictStream(iter(requests))}
    assert set(responses) == {r.request_id for r in requests}
    assert responses["bad-model"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert responses["bad-image"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for i in range(6):
        response = responses[f"r{i}"]
        assert not response.HasField("error")
        expected = reference.probs([IMAGES[i], IMAGES[i + 1]])
        for result, probs in zip(response.results, expected, strict=True):
            np.testing.assert_allclose(_probs(result, 3), probs, atol=1e-5)


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "imgcls.v1.Inference"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert {"imgcls.v1.Inference", "grpc.health.v1.Health"} <= set(services)


def test_client_accepts_paths_bytes_and_pil_images(server, reference, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(IMAGES[6])
    pil = Image.open(io.BytesIO(IMAGES[7])).convert("RGB")
    with client_for(server) as client:
        prediction = client.predict([path, IMAGES[8], pil, b"bad"], model="tiny", top_k=3, timeout=10)
        assert (prediction.model, prediction.version) == ("tiny", 2)
        assert [r.ok for r in prediction.results] == [True, True, True, False]
        assert prediction.results[3].error.code == "INVALID_ARGUMENT"
        png = io.BytesIO()
        pil.save(png, format="PNG")
        expected = reference.probs([IMAGES[6], IMAGES[8], png.getvalue()])
        for result, probs in zip(prediction.results[:3], expected, strict=True):
            got = {lb.index: lb.score for lb in result.labels}
            np.testing.assert_allclose([got[i] for i in range(3)], probs, atol=1e-5)
        with pytest.raises(ServiceError) as exc_info:
            client.predict([IMAGES[0]], model="nope")
        assert exc_info.value.code == grpc.StatusCode.NOT_FOUND
        streamed = list(client.predict_stream([[IMAGES[0]], [IMAGES[1], IMAGES[2]]], model="tiny"))
        assert sorted(p.request_id for p in streamed) == ["0", "1"]
        assert [m.name for m in client.list_models()] == ["other", "tiny"]
        assert client.metadata("other").class_names == OTHER_CLASSES
        assert client.health() == "SERVING"


def test_cli_predict_json_lines_in_argument_order(server, tmp_path, capsys):
    from imgcls.cli import main

    files = []
    for i in range(3):
        files.append(tmp_path / f"img{i}.jpg")
        files[-1].write_bytes(IMAGES[i])
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    args = [str(files[0]), str(tmp_path / "broken.jpg"), str(tmp_path / "missing.jpg"), str(files[1]), str(files[2])]
    code = main(["predict", "--target", f"127.0.0.1:{server.port}", "--model", "tiny", "--top-k", "2", "--json",
                 "--batch-size", "2", *args])
    assert code == 1  # some files failed
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in records] == args
    assert records[0].keys() == {"path", "model", "version", "labels"}
    assert (records[0]["model"], records[0]["version"]) == ("tiny", 2)
    assert [set(lb) for lb in records[0]["labels"]] == [{"index", "name", "score"}] * 2
    assert records[1].keys() == {"path", "error"} and records[1]["error"]["code"] == "INVALID_ARGUMENT"
    assert records[2]["error"]["code"] == "NOT_FOUND"
    code = main(["predict", "--target", f"127.0.0.1:{server.port}", "--model", "tiny", str(files[0])])
    assert code == 0
    out = capsys.readouterr().out
    assert "# tiny v2" in out and str(files[0]) in out
    assert main(["predict", "--target", f"127.0.0.1:{server.port}", str(files[0])]) == 2  # two models: --model needed
    assert "model_name is required" in capsys.readouterr().err


def test_concurrent_clients_get_their_own_results(server, reference):
    """Many parallel clients mixing models, image counts and both RPCs: every answer is for its own images."""
    expected = {i: reference.probs([img])[0] for i, img in enumerate(IMAGES)}
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop(seed: int) -> int:
        rng = random.Random(seed)
        checked = 0
        with client_for(server, timeout=30) as client:
            for _ in range(12):
                picks = [rng.randrange(len(IMAGES)) for _ in range(rng.choice([1, 1, 2, 3, 5]))]
                prediction = client.predict([IMAGES[i] for i in picks], model="tiny", top_k=3)
                for i, result in zip(picks, prediction.results, strict=True):
                    got = np.array([{lb.index: lb.score for lb in result.labels}[c] for c in range(3)])
                    if not np.allclose(got, expected[i], atol=1e-5):
                        with lock:
                            failures.append(f"client {seed}: image {i} got {got}, expected {expected[i]}")
                    checked += 1
        return checked

    with ThreadPoolExecutor(16) as pool:
        checked = sum(pool.map(client_loop, range(16)))
    assert not failures, failures[:5]
    assert checked > 16 * 12


def test_metrics_after_traffic(server):
    with client_for(server) as client:
        before = scrape(server)
        client.predict([IMAGES[0], IMAGES[1], b"bad"], model="other")
        with pytest.raises(ServiceError):
            client.predict([IMAGES[0]], model="other", top_k=0)
        after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("imgcls_requests_total", method="Predict", model="other", version="1", code="OK") == 1
    assert delta("imgcls_requests_total", method="Predict", model="other", version="1", code="INVALID_ARGUMENT") == 1
    assert delta("imgcls_images_total", model="other", version="1", code="OK") == 2
    assert delta("imgcls_images_total", model="other", version="1", code="INVALID_ARGUMENT") == 1
    assert delta("imgcls_request_duration_seconds_count", method="Predict", model="other") == 2
    assert delta("imgcls_preprocess_duration_seconds_count", model="other") == 2
    assert delta("imgcls_queue_wait_seconds_count", model="other") == 2
    assert delta("imgcls_batch_size_sum", model="other") == 2
    assert delta("imgcls_inference_duration_seconds_count", model="other", runtime="onnx") >= 1
    assert metric(after, "imgcls_model_loaded", model="tiny", version="2", backbone="mobilenet_v2",
                  runtime="tflite") == 1
    assert metric(after, "imgcls_model_load_duration_seconds", model="tiny", version="2", runtime="tflite") > 0
    assert metric(after, "imgcls_queue_depth", model="other") == 0
    assert metric(after, "imgcls_inflight_requests", method="Predict") == 0
    assert "imgcls_request_duration_seconds_bucket" in after  # histograms, not summaries


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_each_event_loop_serves_grpc_and_http_alike(service_repo, reference, kind):
    """`--event-loop`: the default (auto) runs on uvloop where it is installed; asyncio's loop must serve the
    same answers on both ports, since it is the fallback where uvloop has no wheel."""
    with running_server(service_repo, http_port=0, event_loop=kind) as server:
        assert server.event_loop_name == kind
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            response = pb_grpc.InferenceStub(channel).Predict(
                pb.PredictRequest(model_name="tiny", images=[IMAGES[2]], top_k=3), timeout=30)
        finally:
            channel.close()
        expected = reference.probs([IMAGES[2]])[0]
        np.testing.assert_allclose(_probs(response.results[0], 3), expected, atol=1e-5)
        request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/predict?model=tiny&top_k=3",
                                         data=IMAGES[2], headers={"Content-Type": "image/jpeg"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = json.loads(answer.read())
        assert body["results"][0]["labels"][0]["index"] == int(np.argmax(expected))


def test_the_event_loop_choice_is_checked(service_repo, monkeypatch):
    from imgcls.errors import ImgclsError
    from imgcls.service.server import InferenceServer, ServeConfig, new_event_loop

    with pytest.raises(ImgclsError, match="--event-loop tokio: choose one of auto, uvloop, asyncio"):
        InferenceServer(ServeConfig(model_repository=service_repo, event_loop="tokio"))
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as where uvloop is not installed
    with pytest.raises(ImgclsError, match="uvloop package is not installed"):
        new_event_loop("uvloop")
    loop = new_event_loop("auto")  # falls back
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()
