"""The TF Serving gRPC API (PredictionService, ModelService) against a real server, driven by the real
`tensorflow-serving-api` client; plus the contract test that holds `proto/compat/` to the upstream
definitions, and a check that serving it never imports TensorFlow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from service_fixtures import OTHER_CLASSES, TINY_CLASSES, client_for, metric, running_server, sample_image, scrape

from imgcls.manifest import read_manifest
from imgcls.preprocessing import preprocess_bytes
from imgcls.service import protocols

pytest.importorskip("tensorflow_serving", reason="needs the tensorflow-serving-api client (dev extra)")
import tensorflow as tf
from google.protobuf import descriptor_pb2, descriptor_pool
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture

IMAGES = [sample_image(50 + i, size=(36 + 5 * i, 30 + 3 * i), fmt="PNG" if i % 2 else "JPEG") for i in range(5)]
LIMITS = {"max_images_per_request": 8, "max_message_bytes": 4 * 1024 * 1024}
COMPAT_PREFIXES = ("tensorflow/", "tensorflow_serving/", "xla/")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(service_repo):
    with running_server(service_repo, versions="all", **LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def channel(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield channel
    channel.close()


@pytest.fixture(scope="module")
def predictions(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def models(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)


@pytest.fixture(scope="module")
def native(server):
    """Probabilities [N, C] from the native imgcls.v1 Predict, the reference every TF Serving answer must equal."""
    client = client_for(server)

    def probs(images: list[bytes], model: str = "tiny", version: int = 0) -> np.ndarray:
        prediction = client.predict(images, model=model, version=version, top_k=100)
        out = np.zeros((len(images), len(prediction.results[0].labels)), np.float32)
        for row, result in zip(out, prediction.results, strict=True):
            for label in result.labels:
                row[label.index] = label.score
        return out

    yield probs
    client.close()


def _predict_request(model: str = "tiny", signature: str = "", **inputs) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(value)
    return request


def _images_tensor(images: list[bytes], shape: list[int] | None = None):
    return tf.make_tensor_proto(images, dtype=tf.string, shape=shape or [len(images)])


def _preprocessed(repo, images: list[bytes], model: str = "tiny", version: int = 2) -> np.ndarray:
    spec = read_manifest(repo / model / str(version)).preprocessing
    return np.stack([preprocess_bytes(data, spec) for data in images])


def _abort_code(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    return info.value.code(), info.value.details()


# --- the wire contract ------------------------------------------------------------------------------------------


def _upstream_pool() -> descriptor_pool.DescriptorPool:
    """The default pool, where the imported tensorflow_serving / tensorflow modules registered upstream files."""
    assert prediction_service_pb2.DESCRIPTOR and model_service_pb2.DESCRIPTOR  # imported: registered
    return descriptor_pool.Default()


def _compare_message(ours, theirs, problems: list[str]) -> None:
    for field in ours.fields:
        up = theirs.fields_by_name.get(field.name)
        if up is None:
            problems.append(f"{ours.full_name}.{field.name}: not upstream")
            continue
        mine = (field.number, field.type, field.is_repeated, field.has_presence, field.is_packed, field.json_name,
                field.message_type and field.message_type.full_name, field.enum_type and field.enum_type.full_name,
                field.containing_oneof and field.containing_oneof.name)
        upstream = (up.number, up.type, up.is_repeated, up.has_presence, up.is_packed, up.json_name,
                    up.message_type and up.message_type.full_name, up.enum_type and up.enum_type.full_name,
                    up.containing_oneof and up.containing_oneof.name)
        if mine != upstream:
            problems.append(f"{field.full_name}: ours {mine} != upstream {upstream}")
    for nested in ours.nested_types:
        up = theirs.nested_types_by_name.get(nested.name)
        if up is None:
            problems.append(f"{nested.full_name}: not upstream")
        else:
            _compare_message(nested, up, problems)
    for enum in ours.enum_types:
        _compare_enum(enum, theirs.enum_types_by_name.get(enum.name), problems)


def _compare_enum(ours, theirs, problems: list[str]) -> None:
    if theirs is None:
        problems.append(f"{ours.full_name}: not upstream")
        return
    mine = {v.name: v.number for v in ours.values}
    upstream = {v.name: v.number for v in theirs.values}
    if mine != upstream:
        problems.append(f"{ours.full_name}: ours {mine} != upstream {upstream}")


def test_compat_protos_match_upstream_field_by_field():
    """Every message, field, enum and method in proto/compat's TF files exists upstream with the same file,
    package, number, type, label, packing, oneof and type names: a wrong field number fails here."""
    ours_pool, upstream = protocols.pool(), _upstream_pool()
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(protocols.DESCRIPTOR_SET.read_bytes())
    files = [f for f in descriptor_set.file if f.name.startswith(COMPAT_PREFIXES)]
    assert {"tensorflow_serving/apis/prediction_service.proto", "tensorflow_serving/apis/model_service.proto",
            "tensorflow/core/framework/tensor.proto"} <= {f.name for f in files}
    problems: list[str] = []
    checked = 0
    for file_proto in files:
        ours = ours_pool.FindFileByName(file_proto.name)
        theirs = upstream.FindFileByName(file_proto.name)  # KeyError: no upstream file of that name
        assert ours.package == theirs.package, file_proto.name
        for message in ours.message_types_by_name.values():
            up = theirs.message_types_by_name.get(message.name)
            if up is None:
                problems.append(f"{message.full_name}: not in upstream {file_proto.name}")
                continue
            _compare_message(message, up, problems)
            checked += len(message.fields)
        for enum in ours.enum_types_by_name.values():
            _compare_enum(enum, theirs.enum_types_by_name.get(enum.name), problems)
        for service in ours.services_by_name.values():
            up_service = theirs.services_by_name[service.name]
            for method in service.methods:
                up = up_service.methods_by_name[method.name]
                mine = (method.input_type.full_name, method.output_type.full_name, method.client_streaming,
                        method.server_streaming)
                theirs_m = (up.input_type.full_name, up.output_type.full_name, up.client_streaming,
                            up.server_streaming)
                if mine != theirs_m:
                    problems.append(f"{method.full_name}: ours {mine} != upstream {theirs_m}")
    assert not problems, "\n".join(problems)
    assert checked > 40


def test_protocols_descriptor_set_is_current(tmp_path):
    """service/protocols.binpb is what `proto/generate.py` compiles from the committed proto/compat files."""
    out = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "service" / "protocols.binpb").read_bytes() == protocols.DESCRIPTOR_SET.read_bytes(), (
        "service/protocols.binpb is stale: run `python proto/generate.py` and commit it with the .proto files")


def test_contract_test_catches_a_wrong_field_number():
    """The comparison above is not vacuous: a copy of ModelSpec with `signature_name` renumbered fails it."""
    file_proto = descriptor_pb2.FileDescriptorProto()
    protocols.pool().FindFileByName("tensorflow_serving/apis/model.proto").CopyToProto(file_proto)
    file_proto.name = "broken/model.proto"
    file_proto.package = "broken"
    for field in file_proto.message_type[0].field:
        if field.name == "signature_name":
            field.number = 5
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    ours = protocols.pool()
    ours.FindFileByName("google/protobuf/wrappers.proto").CopyToProto(wrappers)
    pool.Add(wrappers)
    pool.Add(file_proto)
    problems: list[str] = []
    _compare_message(pool.FindMessageTypeByName("broken.ModelSpec"),
                     _upstream_pool().FindMessageTypeByName("tensorflow.serving.ModelSpec"), problems)
    assert len(problems) == 1 and "signature_name" in problems[0]


# --- Predict ----------------------------------------------------------------------------------------------------


def test_predict_encoded_images_equals_native_predict(predictions, native):
    response = predictions.Predict(_predict_request(images=_images_tensor(IMAGES)), timeout=10)
    assert (response.model_spec.name, response.model_spec.version.value) == ("tiny", 2)
    assert response.model_spec.signature_name == "serving_default"
    probs = tf.make_ndarray(response.outputs["probabilities"])
    assert probs.dtype == np.float32 and probs.shape == (len(IMAGES), len(TINY_CLASSES))
    np.testing.assert_allclose(probs, native(IMAGES), atol=1e-6)
    top = tf.make_ndarray(response.outputs["top_class"])
    assert [t.decode() for t in top] == [TINY_CLASSES[i] for i in probs.argmax(1)]


def test_predict_accepts_n_by_1_strings_any_key_and_output_filter(predictions, native):
    request = _predict_request(signature="serving_default", encoded=_images_tensor(IMAGES[:2], [2, 1]))
    request.output_filter.append("probabilities")
    response = predictions.Predict(request, timeout=10)
    assert list(response.outputs) == ["probabilities"]
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]), native(IMAGES[:2]), atol=1e-6)
    scalar = tf.make_tensor_proto(IMAGES[3])  # shape []: one image
    assert not scalar.tensor_shape.dim
    response = predictions.Predict(_predict_request(images=scalar), timeout=10)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]), native(IMAGES[3:4]), atol=1e-6)


def test_predict_preprocessed_floats_equals_encoded(predictions, service_repo, native):
    batch = _preprocessed(service_repo, IMAGES)
    request = _predict_request(signature="preprocessed", input=tf.make_tensor_proto(batch))
    assert request.inputs["input"].tensor_content  # what the real client sends for an ndarray
    response = predictions.Predict(request, timeout=10)
    assert response.model_spec.signature_name == "preprocessed"
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]), native(IMAGES), atol=1e-5)


def test_predict_preprocessed_float_val(predictions, service_repo, native):
    batch = _preprocessed(service_repo, IMAGES[:2])
    tensor = tf.make_tensor_proto(batch)
    tensor.ClearField("tensor_content")
    tensor.float_val.extend(batch.ravel().tolist())
    response = predictions.Predict(_predict_request(input=tensor), timeout=10)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]), native(IMAGES[:2]), atol=1e-5)


def test_predict_version_and_second_model(predictions, native):
    request = _predict_request(images=_images_tensor(IMAGES[:1]))
    request.model_spec.version.value = 1
    response = predictions.Predict(request, timeout=10)
    assert response.model_spec.version.value == 1
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]),
                               native(IMAGES[:1], version=1), atol=1e-6)
    response = predictions.Predict(_predict_request("other", images=_images_tensor(IMAGES[:3])), timeout=10)
    probs = tf.make_ndarray(response.outputs["probabilities"])
    assert probs.shape == (3, len(OTHER_CLASSES))
    np.testing.assert_allclose(probs, native(IMAGES[:3], model="other"), atol=1e-6)


# --- Classify ---------------------------------------------------------------------------------------------------


def _example(image: bytes, key: str = "image/encoded") -> example_pb2.Example:
    return example_pb2.Example(features=feature_pb2.Features(
        feature={key: feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[image]))}))


def test_classify_returns_every_class_sorted_with_native_scores(predictions, native):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "tiny"
    request.input.example_list.examples.extend(_example(image) for image in IMAGES[:3])
    response = predictions.Classify(request, timeout=10)
    assert (response.model_spec.name, response.model_spec.version.value) == ("tiny", 2)
    expected = native(IMAGES[:3])
    assert len(response.result.classifications) == 3
    for row, classifications in zip(expected, response.result.classifications, strict=True):
        order = np.argsort(-row, kind="stable")
        assert [c.label for c in classifications.classes] == [TINY_CLASSES[i] for i in order]
        np.testing.assert_allclose([c.score for c in classifications.classes], row[order], atol=1e-6)


def test_classify_with_context_and_classification_signature(predictions, native):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "tiny"
    request.model_spec.signature_name = "classification"
    request.input.example_list_with_context.examples.add()  # takes the image from the context
    request.input.example_list_with_context.examples.append(_example(IMAGES[1]))
    request.input.example_list_with_context.context.CopyFrom(_example(IMAGES[0]))
    response = predictions.Classify(request, timeout=10)
    assert response.model_spec.signature_name == "classification"
    expected = native(IMAGES[:2])
    for row, classifications in zip(expected, response.result.classifications, strict=True):
        scores = {c.label: c.score for c in classifications.classes}
        np.testing.assert_allclose([scores[name] for name in TINY_CLASSES], row, atol=1e-6)


# --- metadata and status ----------------------------------------------------------------------------------------


def test_get_model_metadata_signature_defs(predictions):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "other"
    response = predictions.GetModelMetadata(request, timeout=10)
    assert (response.model_spec.name, response.model_spec.version.value) == ("other", 1)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    defs = signatures.signature_def
    assert set(defs) == {"serving_default", "preprocessed", "classification"}

    def shape(info) -> list[int]:
        return [d.size for d in info.tensor_shape.dim]

    default = defs["serving_default"]
    assert default.method_name == "tensorflow/serving/predict"
    assert list(default.inputs) == ["images"]
    assert (default.inputs["images"].dtype, shape(default.inputs["images"])) == (tf.string.as_datatype_enum, [-1])
    probs = default.outputs["probabilities"]
    assert (probs.dtype, shape(probs)) == (tf.float32.as_datatype_enum, [-1, len(OTHER_CLASSES)])
    assert shape(default.outputs["top_class"]) == [-1]
    floats = defs["preprocessed"].inputs["input"]
    assert (floats.dtype, shape(floats)) == (tf.float32.as_datatype_enum, [-1, 40, 40, 3])
    classify = defs["classification"]
    assert classify.method_name == "tensorflow/serving/classify"
    assert shape(classify.outputs["scores"]) == [-1, len(OTHER_CLASSES)]


def test_get_model_status_reports_each_loaded_version(models):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "tiny"
    response = models.GetModelStatus(request, timeout=10)
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert [(s.version, s.state) for s in response.model_version_status] == [(1, available), (2, available)]
    assert all(s.status.error_code == 0 and not s.status.error_message for s in response.model_version_status)
    request.model_spec.version.value = 1
    assert [s.version for s in models.GetModelStatus(request, timeout=10).model_version_status] == [1]
    request.model_spec.version.value = 9
    code, message = _abort_code(models.GetModelStatus, request)
    assert code == grpc.StatusCode.NOT_FOUND and "no version 9" in message


def test_get_model_status_reports_a_failed_version(server, models, monkeypatch):
    failed = {**getattr(server, "failed", {}), "tiny": {3: "probe inference failed: output shape (1, 5)"}}
    monkeypatch.setattr(server, "failed", failed, raising=False)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "tiny"
    statuses = models.GetModelStatus(request, timeout=10).model_version_status
    assert [s.version for s in statuses] == [1, 2, 3]
    bad = statuses[2]
    assert bad.state == get_model_status_pb2.ModelVersionStatus.END
    assert bad.status.error_code == 2 and "probe inference failed" in bad.status.error_message


# --- errors -----------------------------------------------------------------------------------------------------


def test_errors_map_to_status_codes(predictions, models, service_repo):
    image = _images_tensor(IMAGES[:1])
    cases = [
        (_predict_request("nope", images=image), grpc.StatusCode.NOT_FOUND, "no model 'nope'"),
        (_predict_request("", images=image), grpc.StatusCode.INVALID_ARGUMENT, "model_spec.name is required"),
        (_predict_request(signature="predict", images=image), grpc.StatusCode.INVALID_ARGUMENT,
         "serving_default, preprocessed"),
        (_predict_request(images=tf.make_tensor_proto([[1, 2]], dtype=tf.int32)), grpc.StatusCode.INVALID_ARGUMENT,
         "dtype DT_INT32"),
        (_predict_request(input=tf.make_tensor_proto(np.zeros((1, 16, 16, 3), np.float32))),
         grpc.StatusCode.INVALID_ARGUMENT, "expects [N, 32, 32, 3]"),
        (_predict_request(images=_images_tensor(IMAGES[:4], [2, 2])), grpc.StatusCode.INVALID_ARGUMENT,
         "are [N] or [N, 1]"),
        (_predict_request(images=_images_tensor([b"not an image"])), grpc.StatusCode.INVALID_ARGUMENT, ""),
        (_predict_request(images=tf.make_tensor_proto([], dtype=tf.string, shape=[0])),
         grpc.StatusCode.INVALID_ARGUMENT, "no images"),
        (_predict_request(images=_images_tensor(IMAGES * 2)), grpc.StatusCode.INVALID_ARGUMENT, "at most 8"),
        (_predict_request(a=image, b=image), grpc.StatusCode.INVALID_ARGUMENT, "exactly one input"),
        (_predict_request(), grpc.StatusCode.INVALID_ARGUMENT, "exactly one input"),
    ]
    for request, expected, text in cases:
        code, message = _abort_code(predictions.Predict, request)
        assert code == expected and text in message, (request.model_spec, code, message)

    request = _predict_request(images=image)
    request.model_spec.version.value = 7
    assert _abort_code(predictions.Predict, request)[0] == grpc.StatusCode.NOT_FOUND
    request.model_spec.version_label = "stable"
    code, message = _abort_code(predictions.Predict, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "version_label" in message
    request = _predict_request(images=image)
    request.output_filter.append("logits")
    assert "logits" in _abort_code(predictions.Predict, request)[1]

    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "tiny"
    request.input.example_list.examples.append(_example(IMAGES[0], key="image"))
    code, message = _abort_code(predictions.Classify, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "image/encoded" in message
    request.input.example_list.examples[0].CopyFrom(_example(b"garbage"))
    assert _abort_code(predictions.Classify, request)[0] == grpc.StatusCode.INVALID_ARGUMENT

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["graph"])
    request.model_spec.name = "tiny"
    code, message = _abort_code(predictions.GetModelMetadata, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "signature_def" in message

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "nope"
    assert _abort_code(models.GetModelStatus, request)[0] == grpc.StatusCode.NOT_FOUND

    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = "tiny"
    assert _abort_code(predictions.Regress, regress)[0] == grpc.StatusCode.UNIMPLEMENTED


def test_requests_are_counted_under_tfserving_method_names(server, predictions):
    before = metric(scrape(server), "imgcls_requests_total", method="tfserving.Predict", model="tiny", code="OK")
    predictions.Predict(_predict_request(images=_images_tensor(IMAGES[:1])), timeout=10)
    after = scrape(server)
    assert metric(after, "imgcls_requests_total", method="tfserving.Predict", model="tiny", code="OK") == before + 1
    assert metric(after, "imgcls_requests_total", method="tfserving.Predict", model="nope", code="NOT_FOUND") == 0
    _abort_code(predictions.Predict, _predict_request("nope", images=_images_tensor(IMAGES[:1])))
    assert metric(scrape(server), "imgcls_requests_total", method="tfserving.Predict", code="NOT_FOUND") >= 1


# --- no TensorFlow on the serving path --------------------------------------------------------------------------

TF_FREE = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_serving", "tf_keras", "keras"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
import grpc
import imgcls.service.runtimes as runtimes
runtimes.tensorflow_installed = lambda: False  # as on a machine without TensorFlow
from imgcls.service import protocols
from imgcls.service.server import InferenceServer, ServeConfig

server = InferenceServer(ServeConfig(model_repository=REPO, host="127.0.0.1", port=0, metrics_port=0,
                                     inference_threads=1, decode_workers=1)).start()
assert server.wait_until_ready(60)
channel = grpc.insecure_channel("127.0.0.1:%d" % server.port)

def call(service, method, request):
    req_cls, resp_cls = protocols.method_types(service, method)
    return channel.unary_unary(f"/{service}/{method}", request_serializer=req_cls.SerializeToString,
                               response_deserializer=resp_cls.FromString)(request, timeout=20)

Predict = protocols.message("tensorflow.serving.PredictRequest")
request = Predict()
request.model_spec.name = "tiny"
request.inputs["images"].dtype = 7
request.inputs["images"].string_val.append(IMAGE)
request.inputs["images"].tensor_shape.dim.add(size=1)
response = call("tensorflow.serving.PredictionService", "Predict", request)
Status = protocols.message("tensorflow.serving.GetModelStatusRequest")
status = call("tensorflow.serving.ModelService", "GetModelStatus", Status(model_spec={"name": "tiny"}))
channel.close()
server.stop()
print(len(response.outputs["probabilities"].tensor_content), status.model_version_status[0].state,
      any(m.split(".")[0] in ("tensorflow", "tensorflow_serving") for m in sys.modules))
"""


def test_serves_tfserving_without_tensorflow(service_repo):
    """A process where TensorFlow cannot be imported serves Predict and GetModelStatus (ONNX runtime)."""
    code = f"REPO = {str(service_repo)!r}\nIMAGE = {IMAGES[0]!r}\n" + TF_FREE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(4 * len(TINY_CLASSES)), "30", "False"]
