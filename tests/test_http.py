"""The HTTP front-end (service/http/) on a real server: the real clients (tritonclient.http, TF Serving REST
JSON), the plain endpoint, status codes for bad input, queue full, drain, metrics, and the OpenAPI document.

Answers are checked against the gRPC Predict path of the same server (same probabilities) and against the
model run directly on the shared preprocessing.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.http as triton_http
from service_fixtures import Reference, gated_server, metric, running_server, sample_image, scrape
from tritonclient.utils import InferenceServerException

from imgcls.v1 import inference_pb2 as pb
from imgcls.v1 import inference_pb2_grpc as pb_grpc

pytest_plugins = ["service_plugin"]

MAX_BODY = 2_000_000  # --max-message-bytes for these servers: the oversized-body test sends more
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def server(service_repo):
    with running_server(service_repo, http_port=0, max_message_bytes=MAX_BODY, max_image_pixels=MAX_PIXELS) as s:
        yield s


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [sample_image(100 + i, size=(60 + 10 * i, 50 + 5 * i)) for i in range(4)]


def http(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=body, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def http_json(server, method: str, path: str, data=None, **kwargs) -> tuple[int, dict, object]:
    body = data if isinstance(data, bytes) or data is None else json.dumps(data).encode()
    status, headers, raw = http(server, method, path, body, **kwargs)
    return status, headers, json.loads(raw)


def grpc_probabilities(server, images: list[bytes], model: str = "tiny") -> np.ndarray:
    """The gRPC Predict path's probabilities, [N, C] by class index (top_k = every class)."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        response = pb_grpc.InferenceStub(channel).Predict(
            pb.PredictRequest(model_name=model, images=images, top_k=100), timeout=30)
    probs = np.zeros((len(images), len(response.results[0].labels)), np.float32)
    for row, result in enumerate(response.results):
        for label in result.labels:
            probs[row, label.index] = label.score
    return probs


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- KServe v2 REST through the real tritonclient.http ---------------------------------------------------------


@pytest.fixture(scope="module")
def triton(server):
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield client
    client.close()


def _images_input(images: list[bytes], binary: bool = True) -> triton_http.InferInput:
    tensor = triton_http.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary)
    return tensor


def test_tritonclient_http_gets_the_grpc_predict_probabilities(server, triton, images):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("tiny") and not triton.is_model_ready("tiny", "7")
    meta = triton.get_model_metadata("tiny")
    assert [i["name"] for i in meta["inputs"]] == ["images", "pixels"]
    assert triton.get_model_config("tiny")["max_batch_size"] >= 1
    result = triton.infer("tiny", [_images_input(images)], request_id="r1")  # binary in, binary out
    probs = result.as_numpy("probabilities")
    expected = grpc_probabilities(server, images)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert result.get_response()["id"] == "r1"
    # JSON output, and the classification extension (top-2 "score:index:label")
    outputs = [triton_http.InferRequestedOutput("probabilities", binary_data=False)]
    np.testing.assert_allclose(triton.infer("tiny", [_images_input(images)], outputs=outputs)
                               .as_numpy("probabilities"), expected, atol=1e-6)
    outputs = [triton_http.InferRequestedOutput("probabilities", binary_data=True, class_count=2)]
    top = triton.infer("tiny", [_images_input(images[:1])], outputs=outputs).as_numpy("probabilities")
    score, index, label = top[0][0].decode().split(":")
    assert int(index) == int(np.argmax(expected[0])) and abs(float(score) - expected[0].max()) < 1e-5
    assert label in ("cat", "dog", "bird")
    stats = triton.get_inference_statistics("tiny")["model_stats"]
    assert stats[0]["inference_stats"]["success"]["count"] >= 3


def test_tritonclient_http_pixels_and_json_base64(server, triton, images, service_repo):
    reference = Reference(service_repo, "tiny", 2)
    pixels = reference.inputs(images[:2]).astype(np.float32)
    tensor = triton_http.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    np.testing.assert_allclose(triton.infer("tiny", [tensor]).as_numpy("probabilities"),
                               grpc_probabilities(server, images[:2]), atol=1e-5)
    # JSON tensors by hand: BYTES elements are base64 strings
    request = {"inputs": [{"name": "images", "shape": [2, 1], "datatype": "BYTES",
                           "data": [[b64(images[0])], [b64(images[1])]]}]}
    status, _, body = http_json(server, "POST", "/v2/models/tiny/versions/2/infer", request)
    assert status == 200, body
    np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(2, 3),
                               grpc_probabilities(server, images[:2]), atol=1e-6)


def test_tritonclient_http_errors_name_the_problem(triton, images):
    with pytest.raises(InferenceServerException, match="no model 'nope'"):
        triton.infer("nope", [_images_input(images[:1])])
    with pytest.raises(InferenceServerException, match=r"could not|decode|image"):
        triton.infer("tiny", [_images_input([b"not an image"])])


# --- TF Serving REST -------------------------------------------------------------------------------------------


def test_tfserving_rest_b64_gets_the_grpc_top1_labels(server, images):
    expected = [["cat", "dog", "bird"][i] for i in np.argmax(grpc_probabilities(server, images), axis=1)]
    status, _, rows = http_json(server, "POST", "/v1/models/tiny:predict",
                                {"signature_name": "serving_default", "instances": [{"b64": b64(i)} for i in images]})
    assert status == 200, rows
    assert [p["top_class"] for p in rows["predictions"]] == expected
    status, _, cols = http_json(server, "POST", "/v1/models/tiny/versions/2:predict",
                                {"inputs": {"images": [{"b64": b64(i)} for i in images]}})
    assert status == 200 and cols["outputs"]["top_class"] == expected
    np.testing.assert_allclose(cols["outputs"]["probabilities"], [p["probabilities"] for p in rows["predictions"]])
    status, _, named = http_json(server, "POST", "/v1/models/tiny:predict",
                                 {"instances": [{"images": {"b64": b64(i)}} for i in images]})
    assert status == 200 and [p["top_class"] for p in named["predictions"]] == expected
    status, _, classified = http_json(server, "POST", "/v1/models/tiny:classify",
                                      {"examples": [{"image/encoded": {"b64": b64(i)}} for i in images]})
    assert status == 200 and [r[0][0] for r in classified["results"]] == expected


def test_tfserving_rest_status_and_metadata(server):
    status, _, body = http_json(server, "GET", "/v1/models/tiny")
    assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
    status, _, body = http_json(server, "GET", "/v1/models/tiny/versions/2/metadata")
    signatures = body["metadata"]["signature_def"]["signature_def"]
    assert status == 200 and {"serving_default", "preprocessed", "classification"} <= set(signatures)
    status, _, body = http_json(server, "GET", "/v1/models/tiny/labels/stable")
    assert status == 400 and "version_label" in body["error"]


# --- the plain endpoint ----------------------------------------------------------------------------------------


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "imgclsboundary7d1f"
    out = io.BytesIO()
    for name, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                  f"Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def test_plain_predict_raw_and_multipart(server, images):
    expected = grpc_probabilities(server, images)
    status, _, body = http_json(server, "POST", "/predict?model=tiny&top_k=3", images[0],
                                headers={"Content-Type": "image/jpeg"})
    assert status == 200, body
    assert body["model"] == "tiny" and body["version"] == 2
    scores = {label["index"]: label["score"] for label in body["results"][0]["labels"]}
    np.testing.assert_allclose([scores[i] for i in range(3)], expected[0], atol=1e-6)
    data, ctype = _multipart([("a.jpg", images[1]), ("broken.jpg", images[1][:40]), ("c.png", images[2])])
    status, _, body = http_json(server, "POST", "/predict?model=tiny&top_k=1", data,
                                headers={"Content-Type": ctype})
    assert status == 200, body
    a, broken, c = body["results"]
    assert (a["filename"], broken["filename"], c["filename"]) == ("a.jpg", "broken.jpg", "c.png")
    assert a["labels"][0]["index"] == int(np.argmax(expected[1]))
    assert c["labels"][0]["index"] == int(np.argmax(expected[2]))
    assert broken["error"]["code"] == "INVALID_ARGUMENT" and "labels" not in broken
    status, _, body = http_json(server, "GET", "/models")
    assert status == 200 and {m["name"] for m in body["models"]} == {"tiny", "other"}


# --- bad input: the right status, a body naming the problem, and the server keeps serving ----------------------


def _huge_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1500, 1000)).save(buf, format="PNG")  # 1.5 Mpx > MAX_PIXELS, a few KB
    return buf.getvalue()


BAD_INPUTS = [
    # (name, method, path, body, headers, status, text in the error)
    ("truncated jpeg", "POST", "/predict?model=tiny", lambda img: img[: len(img) // 2], {}, 400, "image"),
    ("not an image", "POST", "/predict?model=tiny", lambda img: b"hello, world" * 10, {}, 400, "image"),
    ("huge dimensions", "POST", "/predict?model=tiny", lambda img: _huge_png(), {}, 400, "pixels"),
    ("empty body", "POST", "/predict?model=tiny", lambda img: b"", {}, 400, "empty"),
    ("malformed json v2", "POST", "/v2/models/tiny/infer", lambda img: b'{"inputs": [', {}, 400, "not valid JSON"),
    ("malformed json tfs", "POST", "/v1/models/tiny:predict", lambda img: b"{'instances'", {}, 400, "not valid JSON"),
    ("bad base64 v2", "POST", "/v2/models/tiny/infer", lambda img: json.dumps({"inputs": [
        {"name": "images", "shape": [1], "datatype": "BYTES", "data": ["***not base64***"]}]}).encode(), {}, 400,
     "base64"),
    ("bad base64 tfs", "POST", "/v1/models/tiny:predict",
     lambda img: json.dumps({"instances": [{"b64": "@@@"}]}).encode(), {}, 400, "base64"),
    ("wrong shape", "POST", "/v2/models/tiny/infer", lambda img: json.dumps({"inputs": [
        {"name": "pixels", "shape": [1, 8, 8, 3], "datatype": "FP32", "data": [0.0] * 192}]}).encode(), {}, 400,
     "expects [N, 32, 32, 3]"),
    ("shape vs data", "POST", "/v2/models/tiny/infer", lambda img: json.dumps({"inputs": [
        {"name": "images", "shape": [3], "datatype": "BYTES", "data": [b64(img)]}]}).encode(), {}, 400,
     "but 1 elements"),
    ("wrong datatype", "POST", "/v2/models/tiny/infer", lambda img: json.dumps({"inputs": [
        {"name": "images", "shape": [1], "datatype": "INT32", "data": [1]}]}).encode(), {}, 400, "INT32"),
    ("ragged tfs pixels", "POST", "/v1/models/tiny:predict",
     lambda img: json.dumps({"instances": [[1.0, 2.0], [1.0]]}).encode(), {}, 400, "rectangular"),
    ("binary past the body", "POST", "/v2/models/tiny/infer", lambda img: json.dumps({"inputs": [
        {"name": "images", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 10**6}}]}).encode(),
     {}, 400, "binary_data_size"),
    ("oversized body", "POST", "/predict?model=tiny", lambda img: b"\xff" * (MAX_BODY + 10), {}, 413,
     "--max-message-bytes"),
    ("unknown model", "POST", "/v2/models/nope/infer", lambda img: json.dumps({"inputs": [
        {"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64(img)]}]}).encode(), {}, 404, "nope"),
    ("unknown version", "POST", "/v1/models/tiny/versions/9:predict",
     lambda img: json.dumps({"instances": [{"b64": b64(img)}]}).encode(), {}, 404, "no version 9"),
    ("bad timeout", "POST", "/predict?model=tiny&timeout=soon", lambda img: img, {}, 400, "timeout"),
    ("deadline", "POST", "/predict?model=tiny", lambda img: img, {"X-Request-Timeout": "0.000001"}, 504,
     "deadline"),
    ("unknown path", "GET", "/v3/whatever", lambda img: None, {}, 404, "/openapi.json"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_its_status_and_the_server_keeps_serving(server, images, case):
    _, method, path, make, headers, want, text = case
    status, _, raw = http(server, method, path, make(images[0]), headers)
    body = json.loads(raw)
    assert status == want, body
    assert text in body["error"], body
    status, _, body = http_json(server, "POST", "/predict?model=tiny", images[1])
    assert status == 200 and body["results"][0]["labels"], body


def test_requests_are_counted_with_an_http_method_label(server, images):
    before = metric(scrape(server), "imgcls_requests_total", method="http.Predict", code="OK")
    http(server, "POST", "/predict?model=tiny", images[0])
    text = scrape(server)
    assert metric(text, "imgcls_requests_total", method="http.Predict", code="OK") == before + 1
    _, _, page = http(server, "GET", "/metrics")
    assert b"imgcls_requests_total" in page


# --- overload and drain ----------------------------------------------------------------------------------------


def _post_in_thread(server, path: str, body: bytes, results: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(http(server, "POST", path, body)), daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_queue_full_is_429_with_retry_after_and_drain_finishes_calls_in_flight(service_repo, images):
    # two images admitted at most: the one in the running batch and one waiting
    with gated_server(service_repo, http_port=0, max_queue_size=2, max_batch_size=1, max_queue_delay_ms=0) as (
            server, gate):
        gate.gate.clear()
        held: list = []
        first = _post_in_thread(server, "/predict?model=tiny", images[0], held)  # in the running batch
        assert gate.entered.wait(10)
        second = _post_in_thread(server, "/predict?model=tiny", images[1], held)  # queued: the queue is full
        deadline = time.monotonic() + 10
        while server.models["tiny"][2].batcher.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, headers, raw = http(server, "POST", "/predict?model=tiny", images[2])
        assert status == 429, raw
        assert int(headers["Retry-After"]) >= 1 and "queue" in json.loads(raw)["error"]
        # drain: readiness and new calls 503 at once, the calls in flight still answered
        drainer = threading.Thread(target=server.drain, kwargs={"grace": 20}, daemon=True)
        drainer.start()
        deadline = time.monotonic() + 10
        while server.accepting and time.monotonic() < deadline:
            time.sleep(0.01)
        status, _, raw = http(server, "GET", "/v2/health/ready")
        assert status == 503 and b"draining" in raw
        status, _, raw = http(server, "POST", "/predict?model=tiny", images[2])
        assert status == 503 and b"draining" in raw
        gate.gate.set()
        for thread in (first, second, drainer):
            thread.join(20)
        assert sorted(status for status, _, _ in held) == [200, 200]


# --- the API description ---------------------------------------------------------------------------------------


def test_openapi_documents_every_route(server):
    import re

    status, _, doc = http_json(server, "GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    routes = set()
    for route in server.http.app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if path.startswith("/static/"):
            continue
        routes.add((re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path), route.method.lower()))
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    # TF Serving's /labels/ routes exist only to answer that labels are not supported
    assert {r for r in routes if "/labels/" not in r[0]} - documented == set(), "undocumented routes"
    status, _, page = http(server, "GET", "/docs")
    assert status == 200 and b"/static/docs.js" in page


def test_page_and_docs_need_nothing_from_elsewhere():
    """No CDN, no external fonts or scripts: every URL the static files name is this server's own."""
    import re
    from importlib import resources

    static = resources.files("imgcls.service.http") / "static"
    names = sorted(entry.name for entry in static.iterdir())
    assert {"index.html", "app.js", "docs.html", "docs.js"} <= set(names)
    for name in names:
        text = (static / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), f"{name} loads something from elsewhere"


def test_a_second_server_on_the_http_port_fails_instead_of_sharing_it(server, service_repo):
    """SO_REUSEPORT is for --workers only (tests/test_service_workers.py shares the port between workers): an
    unrelated second server must not silently take half of the first one's connections."""
    from imgcls.errors import ImgclsError

    with pytest.raises(ImgclsError, match=f"cannot serve HTTP on 127.0.0.1:{server.http_port}"), \
            running_server(service_repo, http_port=server.http_port, wait=False):
        pass


def test_unused_path_under_a_model_is_404_json(server):
    status, _, body = http_json(server, "GET", "/v2/models/tiny/versions/2/nothing")
    assert status == 404 and "openapi" in body["error"]


@pytest.mark.slow
def test_hot_reload_shows_over_http(service_repo, tmp_path, images):
    """A version published while serving answers HTTP requests once the scan loads it, like gRPC."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(service_repo / "tiny" / "1", repo / "tiny" / "1")
    with running_server(repo, http_port=0, poll_interval=0.2) as server:
        status, _, body = http_json(server, "POST", "/predict", images[0])
        assert status == 200 and body["version"] == 1
        shutil.copytree(service_repo / "tiny" / "2", repo / "tiny" / ".2.tmp")
        (repo / "tiny" / ".2.tmp").rename(repo / "tiny" / "2")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, _, body = http_json(server, "GET", "/v2/models/tiny")
            if body.get("versions") == ["2"]:
                break
            time.sleep(0.1)
        assert body["versions"] == ["2"], body
        status, _, body = http_json(server, "POST", "/predict", images[0])
        assert status == 200 and body["version"] == 2
