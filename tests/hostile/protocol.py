"""Malformed requests on every protocol (issue 15, items 1, 3, 4 and 5), each with the status codes allowed.

A `Call` is one unary request, already serialized (so undecodable bytes are cases too), with the codes the
server may answer; `Stream` is a sequence of messages on one streaming call, each expected to be answered
("ok") or answered with an in-stream error ("error"), the stream going on after every error.

Client mistakes are INVALID_ARGUMENT, or NOT_FOUND for a model or version that is not served; never
INTERNAL or UNKNOWN. That includes `kind == "undecodable"`: bytes that are not the request message at all
(INVALID_ARGUMENT, however the server parses its messages).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from hostile.corpus import encode, photo

IA, NF, OK = "INVALID_ARGUMENT", "NOT_FOUND", "OK"
V1 = "/imgcls.v1.Inference/"
KSERVE = "/inference.GRPCInferenceService/"
TFS = "/tensorflow.serving.PredictionService/"
TFS_MODEL = "/tensorflow.serving.ModelService/"
SIZE = 32  # the tiny model's input
DT_INVALID, DT_FLOAT, DT_DOUBLE, DT_INT32, DT_STRING = 0, 1, 2, 3, 7


@dataclass
class Call:
    name: str
    protocol: str  # v1, kserve, tfserving
    method: str  # full gRPC path
    request: bytes
    codes: tuple[str, ...]
    response: Callable[[bytes], object] | None = None  # deserializer, to check an OK answer
    check: Callable[[object], str | None] | None = None  # an OK answer's extra check: None or what is wrong
    kind: str = "request"


@dataclass
class Stream:
    name: str
    method: str
    messages: list[bytes]
    expect: list[str]  # per message: "ok" or "error"
    ids: list[str] = field(default_factory=list)  # request ids, to match answers (completion order)


def good_image(seed: int = 1) -> bytes:
    return encode(photo(seed, 64, 48), "JPEG", quality=90)


def _names() -> dict[str, str]:
    return {
        "upper": "TINY",
        "trailing-space": "tiny ",
        "leading-space": " tiny",
        "nul": "tiny\x00",
        "slash": "tiny/2",
        "dotdot": "../tiny",
        "superscript-2": "²",
        "cjk": "模型",
        "emoji": "🐱",
        "format-string": "%s%s%n",
        "sql": "' OR 1=1 --",
        "rtl-override": "\u202etiny",
        "10kb": "m" * 10_240,
        "1mb": "m" * 1_048_576,
        "newline": "tiny\nX-Injected: 1",
    }


@cache
def calls() -> tuple[Call, ...]:
    from tritonclient.grpc import service_pb2 as kpb

    from imgcls.service import protocols
    from imgcls.v1 import inference_pb2 as pb

    out: list[Call] = []
    good, good2 = good_image(1), good_image(2)

    def v1(name: str, codes, check=None, method: str = "Predict", **fields) -> None:
        cls = pb.PredictRequest if method == "Predict" else pb.GetModelMetadataRequest
        reply = pb.PredictResponse if method == "Predict" else pb.ModelMetadata
        out.append(
            Call(
                f"v1-{name}",
                "v1",
                V1 + method,
                cls(**fields).SerializeToString(),
                tuple(codes),
                reply.FromString,
                check,
            )
        )

    # --- imgcls.v1 -----------------------------------------------------------------------------------------------
    v1("ok", [OK], model_name="tiny", images=[good])
    v1("empty-request", [IA])
    v1("no-model-name-two-served", [IA], images=[good])
    v1("no-images", [IA], model_name="tiny")
    v1("unknown-model", [NF], model_name="nope", images=[good])
    for key, name in _names().items():
        v1(f"model-name-{key}", [NF, IA], model_name=name, images=[good])
        v1(f"metadata-model-name-{key}", [NF, IA], method="GetModelMetadata", model_name=name)
    for version, codes in ((-1, [NF, IA]), (1, [NF]), (3, [NF]), (2**62, [NF]), (-(2**63), [NF, IA]), (2, [OK])):
        v1(f"version-{version}", codes, model_name="tiny", model_version=version, images=[good])
    v1("metadata-version--1", [NF, IA], method="GetModelMetadata", model_name="tiny", model_version=-1)
    for top_k, codes in ((0, [IA]), (-1, [IA]), (-(2**31), [IA]), (1, [OK]), (3, [OK]), (4, [OK]), (2**31 - 1, [OK])):
        v1(
            f"top-k-{top_k}",
            codes,
            _labels_at_most(min(max(top_k, 1), 3)) if codes == [OK] else None,
            model_name="tiny",
            images=[good],
            top_k=top_k,
        )
    v1("65-images", [IA], model_name="tiny", images=[good] * 65)
    v1("64-images", [OK], _result_count(64), model_name="tiny", images=[good] * 64)
    v1("one-empty-image", [IA], model_name="tiny", images=[b""])
    v1("good-and-empty-image", [OK], _per_image([0, 3]), model_name="tiny", images=[good, b""])
    v1(
        "good-and-garbage-images",
        [OK],
        _per_image([0, 3, 0, 3]),
        model_name="tiny",
        images=[good, b"garbage", good2, b"\xff\xd8\xff"],
    )
    v1("request-id-100kb", [OK], model_name="tiny", images=[good], request_id="r" * 102_400)
    v1("other-model", [OK], model_name="other", images=[good])

    # --- KServe v2 -----------------------------------------------------------------------------------------------
    def ks(name: str, codes, request, check=None, method: str = "ModelInfer") -> None:
        reply = {
            "ModelInfer": kpb.ModelInferResponse,
            "ModelMetadata": kpb.ModelMetadataResponse,
            "ModelReady": kpb.ModelReadyResponse,
            "ModelConfig": kpb.ModelConfigResponse,
            "ModelStatistics": kpb.ModelStatisticsResponse,
        }[method]
        out.append(
            Call(
                f"kserve-{name}",
                "kserve",
                KSERVE + method,
                request.SerializeToString(),
                tuple(codes),
                reply.FromString,
                check,
            )
        )

    def infer(model: str = "tiny", version: str = "", images: list[bytes] | None = None, **kw):
        request = kpb.ModelInferRequest(model_name=model, model_version=version, **kw)
        if images is not None:
            request.inputs.add(name="images", datatype="BYTES", shape=[len(images)]).contents.bytes_contents.extend(
                images
            )
        return request

    def pixels(values: np.ndarray | None = None, shape=None, raw: bytes | None = None, fp32: bool = False, **kw):
        request = kpb.ModelInferRequest(model_name="tiny", **kw)
        arr = np.zeros((1, SIZE, SIZE, 3), np.float32) if values is None else values
        tensor = request.inputs.add(name="pixels", datatype="FP32", shape=list(arr.shape) if shape is None else shape)
        if fp32:
            tensor.contents.fp32_contents.extend(arr.ravel().tolist())
        else:
            request.raw_input_contents.append(arr.astype("<f4").tobytes() if raw is None else raw)
        return request

    ks("ok", [OK], infer(images=[good]), _kserve_finite)
    ks("ok-version-2", [OK], infer(version="2", images=[good]), _kserve_finite)
    for version in (
        "²",
        "-1",
        "0",
        "1e3",
        "01",
        "2 ",
        " 2",
        "٢",
        "+2",
        "2.0",
        "0x2",
        "99999999999999999999999",
        "1",
        "3",
        "v" * 10_240,
        "\x00",
        "NaN",
        "inf",
    ):
        key = version.encode("unicode_escape").decode()[:20] if version != "v" * 10_240 else "10kb"
        ks(f"version-{key}", [IA, NF], infer(version=version, images=[good]))
    for method in ("ModelMetadata", "ModelConfig", "ModelStatistics"):
        request_cls = getattr(kpb, f"{method}Request")
        ks(f"{method}-version-superscript-2", [IA, NF], request_cls(name="tiny", version="²"), method=method)
        ks(f"{method}-name-1mb", [NF, IA], request_cls(name="m" * 1_048_576), method=method)
    ks(
        "ModelReady-version-superscript-2",
        [OK, IA, NF],
        kpb.ModelReadyRequest(name="tiny", version="²"),
        _not_ready,
        method="ModelReady",
    )
    for key, name in _names().items():
        ks(f"model-name-{key}", [NF, IA], infer(model=name, images=[good]))
    ks("no-inputs", [IA], infer())
    two = infer(images=[good])
    two.inputs.add(name="images", datatype="BYTES", shape=[1]).contents.bytes_contents.append(good)
    ks("two-inputs", [IA], two)
    for name, (input_name, datatype) in {
        "unknown-input": ("image", "BYTES"),
        "images-fp32": ("images", "FP32"),
        "images-no-datatype": ("images", ""),
        "images-int8": ("images", "INT8"),
        "images-lowercase-bytes": ("images", "bytes"),
        "pixels-bytes": ("pixels", "BYTES"),
    }.items():
        request = kpb.ModelInferRequest(model_name="tiny")
        request.inputs.add(name=input_name, datatype=datatype, shape=[1]).contents.bytes_contents.append(good)
        ks(name, [IA], request)
    for name, shape in {
        "shape-empty": [],
        "shape-minus-1": [-1],
        "shape-zero": [0],
        "shape-2x2": [2, 2],
        "shape-2pow63-1": [2**63 - 1],
        "shape-2pow62x2": [2**62, 2],
        "shape-3-for-1": [3],
    }.items():
        request = kpb.ModelInferRequest(model_name="tiny")
        request.inputs.add(name="images", datatype="BYTES", shape=shape).contents.bytes_contents.append(good)
        ks(f"images-{name}", [IA], request)
    request = infer(images=[good])
    request.raw_input_contents.extend([struct.pack("<I", len(good)) + good] * 2)
    ks("raw-count-mismatch", [IA], request)
    request = infer(images=[good])
    request.raw_input_contents.append(struct.pack("<I", len(good)) + good)
    ks("contents-and-raw", [IA], request)
    for name, raw in {
        "raw-prefix-claims-4gb": struct.pack("<I", 2**32 - 1) + good,
        "raw-prefix-truncated": b"\x10\x00\x00",
        "raw-empty": b"",
        "raw-zero-length-image": struct.pack("<I", 0),
    }.items():
        request = kpb.ModelInferRequest(model_name="tiny", raw_input_contents=[raw])
        request.inputs.add(name="images", datatype="BYTES", shape=[1])
        ks(name, [IA], request)
    ks("65-images", [IA], infer(images=[good] * 65))
    ks("good-and-garbage-image", [IA], infer(images=[good, b"garbage"]))
    ks("pixels-zeros", [OK], pixels(), _kserve_finite)
    ks("pixels-fp32-contents", [OK], pixels(np.full((1, SIZE, SIZE, 3), 0.25, np.float32), fp32=True), _kserve_finite)
    for name, value in {"nan": np.nan, "pos-inf": np.inf, "neg-inf": -np.inf}.items():
        ks(f"pixels-all-{name}", [IA], pixels(np.full((1, SIZE, SIZE, 3), value, np.float32)))
        one = np.zeros((2, SIZE, SIZE, 3), np.float32)
        one[1, 5, 7, 2] = value
        ks(f"pixels-one-{name}", [IA], pixels(one))
    ks("pixels-fp32-contents-nan", [IA], pixels(np.full((1, SIZE, SIZE, 3), np.nan, np.float32), fp32=True))
    for name, value in {"1e38": 1e38, "minus-1e38": -1e38, "denormal": 1e-45}.items():
        # finite, but far outside what preprocessing produces: refused, or answered with finite scores
        ks(f"pixels-finite-{name}", [OK, IA], pixels(np.full((1, SIZE, SIZE, 3), value, np.float32)), _kserve_finite)
    for name, shape in {
        "33-rows": [1, 33, SIZE, 3],
        "4-channels": [1, SIZE, SIZE, 4],
        "rank-3": [1, SIZE, SIZE],
        "batch-0": [0, SIZE, SIZE, 3],
        "batch-65": [65, SIZE, SIZE, 3],
    }.items():
        ks(f"pixels-shape-{name}", [IA], pixels(np.zeros(shape, np.float32)))
    ks("pixels-claims-1x10000x10000x3", [IA], pixels(shape=[1, 10000, 10000, 3], raw=bytes(12)))
    ks("pixels-shape-2pow32-2pow32-1-1", [IA], pixels(shape=[2**32, 2**32, 1, 1], raw=bytes(16)))
    ks("pixels-shape-overflow-int64", [IA], pixels(shape=[2**62, 2**62, 2**62, 3], raw=bytes(16)))
    ks("pixels-raw-not-multiple-of-4", [IA], pixels(raw=bytes(4 * SIZE * SIZE * 3 - 1)))
    ks(
        "pixels-fp32-contents-count-mismatch",
        [IA],
        pixels(np.zeros((1, 4, 4, 3), np.float32), shape=[1, SIZE, SIZE, 3], fp32=True),
    )
    for name, param in {
        "unknown-output": None,
        "classification-0": 0,
        "classification--1": -1,
        "classification-string": "3",
        "classification-bool": True,
    }.items():
        request = infer(images=[good])
        output = request.outputs.add(name="nope" if param is None else "probabilities")
        if param is not None:
            _set_param(output.parameters["classification"], param)
        ks(f"output-{name}", [IA], request)
    for k in (1, 3, 100, 2**64 - 1):
        request = infer(images=[good])
        param = request.outputs.add(name="probabilities").parameters["classification"]
        if k < 2**63:
            param.int64_param = k
        else:
            param.uint64_param = k
        ks(f"output-classification-{k}", [OK], request)
    request = infer(images=[good])
    _set_param(request.parameters["junk"], "x" * 1000)
    request.parameters["priority"].int64_param = -5
    ks("request-parameters-junk", [OK], request, _kserve_finite)
    ks("request-id-100kb", [OK], infer(images=[good], id="i" * 102_400))

    # --- TF Serving ----------------------------------------------------------------------------------------------
    predict_cls = protocols.message("tensorflow.serving.PredictRequest")
    predict_reply = protocols.message("tensorflow.serving.PredictResponse")

    def tf(name: str, codes, request, check=None, method: str = "Predict", service: str = TFS) -> None:
        reply = {
            "Predict": predict_reply,
            "Classify": protocols.message("tensorflow.serving.ClassificationResponse"),
            "GetModelMetadata": protocols.message("tensorflow.serving.GetModelMetadataResponse"),
            "GetModelStatus": protocols.message("tensorflow.serving.GetModelStatusResponse"),
        }[method]
        out.append(
            Call(
                f"tfserving-{name}",
                "tfserving",
                service + method,
                request.SerializeToString(),
                tuple(codes),
                reply.FromString,
                check,
            )
        )

    def tf_predict(
        model: str | None = "tiny",
        version: int | None = None,
        key: str = "images",
        dtype: int = DT_STRING,
        dims: list[int] | None = None,
        strings: list[bytes] | None = None,
        floats: list[float] | None = None,
        content: bytes | None = None,
        **spec,
    ):
        request = predict_cls()
        if model is not None:
            request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = version
        for attr, value in spec.items():
            setattr(request.model_spec, attr, value)
        tensor = request.inputs[key]
        tensor.dtype = dtype
        for d in [1] if dims is None else dims:
            tensor.tensor_shape.dim.add(size=d)
        if strings is not None:
            tensor.string_val.extend(strings)
        if floats is not None:
            tensor.float_val.extend(floats)
        if content is not None:
            tensor.tensor_content = content
        return request

    tf("ok", [OK], tf_predict(strings=[good]), _tf_finite)
    tf("no-model-name-two-served", [IA], tf_predict(model=None, strings=[good]))
    tf("unknown-model", [NF], tf_predict(model="nope", strings=[good]))
    tf("model-name-10kb", [NF, IA], tf_predict(model="m" * 10_240, strings=[good]))
    tf("model-name-1mb", [NF, IA], tf_predict(model="m" * 1_048_576, strings=[good]))
    for version, codes in ((-1, [NF, IA]), (0, [NF, IA]), (1, [NF]), (3, [NF]), (2**62, [NF])):
        tf(f"version-{version}", codes, tf_predict(version=version, strings=[good]))
    tf("version-label", [IA, NF], tf_predict(strings=[good], version_label="stable"))
    tf("signature-bogus", [IA], tf_predict(strings=[good], signature_name="bogus"))
    tf("no-inputs", [IA], predict_cls(model_spec={"name": "tiny"}))
    request = tf_predict(strings=[good])
    request.inputs["other"].CopyFrom(request.inputs["images"])
    tf("two-inputs", [IA], request)
    for name, dtype in {"int32": DT_INT32, "double": DT_DOUBLE, "invalid": DT_INVALID, "dtype-999": 999}.items():
        tf(f"dtype-{name}", [IA], tf_predict(dtype=dtype, strings=[good]))
    tf("strings-shape-2x2", [IA], tf_predict(dims=[2, 2], strings=[good] * 4))
    tf("strings-shape-1-two-values", [IA], tf_predict(dims=[1], strings=[good, good]))
    tf("strings-shape-minus-1", [IA], tf_predict(dims=[-1], strings=[good]))
    request = tf_predict(strings=[good])
    request.inputs["images"].tensor_shape.unknown_rank = True
    tf("strings-unknown-rank", [IA], request)
    tf("strings-scalar-one-image", [OK], tf_predict(dims=[], strings=[good]), _tf_finite)
    tf("strings-shape-1x1", [OK], tf_predict(dims=[1, 1], strings=[good]), _tf_finite)
    tf("strings-65-images", [IA], tf_predict(dims=[65], strings=[good] * 65))
    tf("strings-empty-image", [IA], tf_predict(strings=[b""]))
    tf("strings-shape-2pow32-values-1", [IA], tf_predict(dims=[2**32], strings=[good]))
    tf(
        "float-claims-1x10000x10000x3-one-value",
        [IA],
        tf_predict(key="input", dtype=DT_FLOAT, dims=[1, 10000, 10000, 3], floats=[0.5]),
    )
    tf(
        "float-claims-1x10000x10000x3-no-values",
        [IA],
        tf_predict(key="input", dtype=DT_FLOAT, dims=[1, 10000, 10000, 3]),
    )
    tf(
        "float-shape-2pow32-2pow32-1-1",
        [IA],
        tf_predict(key="input", dtype=DT_FLOAT, dims=[2**32, 2**32, 1, 1], floats=[0.5]),
    )
    tf("float-shape-overflow-int64", [IA], tf_predict(key="input", dtype=DT_FLOAT, dims=[2**62, 2**62, 4], floats=[1]))
    # np.prod wraps to 0: no values "match", then the reshape fails (issue 15, item 3: INTERNAL)
    tf(
        "float-shape-2pow32-2pow32-1-1-no-values",
        [IA],
        tf_predict(key="input", dtype=DT_FLOAT, dims=[2**32, 2**32, 1, 1]),
    )
    tf(
        "float-shape-2pow32-2pow32-1-1-empty-content",
        [IA],
        tf_predict(key="input", dtype=DT_FLOAT, dims=[2**32, 2**32, 1, 1], content=b""),
    )
    tf(
        "float-fill-one-value",
        [OK],
        tf_predict(key="input", dtype=DT_FLOAT, dims=[1, SIZE, SIZE, 3], floats=[0.0]),
        _tf_finite,
    )
    zeros = np.zeros((1, SIZE, SIZE, 3), "<f4")
    tf(
        "float-content-zeros",
        [OK],
        tf_predict(key="input", dtype=DT_FLOAT, dims=[1, SIZE, SIZE, 3], content=zeros.tobytes()),
        _tf_finite,
    )
    for name, value in {"nan": np.nan, "pos-inf": np.inf, "neg-inf": -np.inf}.items():
        tf(f"float-fill-{name}", [IA], tf_predict(key="input", dtype=DT_FLOAT, dims=[1, SIZE, SIZE, 3], floats=[value]))
        one = zeros.copy()
        one[0, 1, 2, 0] = value
        tf(
            f"float-content-one-{name}",
            [IA],
            tf_predict(key="input", dtype=DT_FLOAT, dims=[1, SIZE, SIZE, 3], content=one.tobytes()),
        )
    tf(
        "float-content-length-mismatch",
        [IA],
        tf_predict(key="input", dtype=DT_FLOAT, dims=[1, SIZE, SIZE, 3], content=bytes(12)),
    )
    tf("float-shape-33-rows", [IA], tf_predict(key="input", dtype=DT_FLOAT, dims=[1, 33, SIZE, 3], floats=[0.0]))
    tf("float-batch-0", [IA], tf_predict(key="input", dtype=DT_FLOAT, dims=[0, SIZE, SIZE, 3]))
    request = tf_predict(strings=[good])
    request.output_filter.append("logits")
    tf("output-filter-unknown", [IA], request)
    request = tf_predict(strings=[good])
    request.output_filter.append("top_class")
    tf("output-filter-top-class", [OK], request)
    classify_cls = protocols.message("tensorflow.serving.ClassificationRequest")

    def classify(*features) -> object:
        request = classify_cls(model_spec={"name": "tiny"})
        for feature in features:
            example = request.input.example_list.examples.add()
            if feature is not None:
                example.features.feature[feature[0]].CopyFrom(feature[1])
        return request

    feature_cls = protocols.message("tensorflow.Feature")
    tf("classify-no-input", [IA], classify_cls(model_spec={"name": "tiny"}), method="Classify")
    tf("classify-example-without-feature", [IA], classify(None), method="Classify")
    tf(
        "classify-two-values",
        [IA],
        classify(("image/encoded", feature_cls(bytes_list={"value": [good, good]}))),
        method="Classify",
    )
    tf(
        "classify-int64-feature",
        [IA],
        classify(("image/encoded", feature_cls(int64_list={"value": [1]}))),
        method="Classify",
    )
    tf(
        "classify-garbage-image",
        [IA],
        classify(("image/encoded", feature_cls(bytes_list={"value": [b"junk"]}))),
        method="Classify",
    )
    tf("classify-ok", [OK], classify(("image/encoded", feature_cls(bytes_list={"value": [good]}))), method="Classify")
    metadata_cls = protocols.message("tensorflow.serving.GetModelMetadataRequest")
    tf("metadata-no-fields", [IA], metadata_cls(model_spec={"name": "tiny"}), method="GetModelMetadata")
    tf(
        "metadata-unknown-field",
        [IA],
        metadata_cls(model_spec={"name": "tiny"}, metadata_field=["x" * 10_000]),
        method="GetModelMetadata",
    )
    status_cls = protocols.message("tensorflow.serving.GetModelStatusRequest")
    tf(
        "status-unknown-model",
        [NF],
        status_cls(model_spec={"name": "m" * 10_240}),
        method="GetModelStatus",
        service=TFS_MODEL,
    )
    request = status_cls(model_spec={"name": "tiny"})
    request.model_spec.version.value = 7
    tf("status-unknown-version", [NF], request, method="GetModelStatus", service=TFS_MODEL)

    # --- bytes that are not the request message ------------------------------------------------------------------
    garbage = {
        "invalid-tag": b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
        "truncated-field": b"\x0a\x20tiny",
        "wrong-wire-type": b"\x0d\x01\x02\x03\x04" + b"\x1a\x02ab",
    }
    for key, data in garbage.items():
        for protocol, method in (
            ("v1", V1 + "Predict"),
            ("kserve", KSERVE + "ModelInfer"),
            ("tfserving", TFS + "Predict"),
        ):
            out.append(Call(f"{protocol}-undecodable-{key}", protocol, method, data, (IA,), kind="undecodable"))
    unknown_fields = pb.PredictRequest(model_name="tiny", images=[good]).SerializeToString() + b"\xa2\x06\x03abc"
    out.append(
        Call("v1-unknown-field-number", "v1", V1 + "Predict", unknown_fields, (OK,), pb.PredictResponse.FromString)
    )
    return tuple(out)


def _set_param(param, value) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    else:
        param.string_param = value


def _labels_at_most(k: int) -> Callable[[object], str | None]:
    def check(reply) -> str | None:
        n = len(reply.results[0].labels)
        return None if 1 <= n <= k else f"{n} labels, expected 1..{k}"

    return check


def _result_count(n: int) -> Callable[[object], str | None]:
    def check(reply) -> str | None:
        ok = sum(1 for r in reply.results if r.status.code == 0 and r.labels)
        return None if ok == n == len(reply.results) else f"{ok} of {len(reply.results)} classified, expected {n}"

    return check


def _per_image(codes: list[int]) -> Callable[[object], str | None]:
    """imgcls.v1's per-image status: good images keep their labels next to bad ones."""

    def check(reply) -> str | None:
        got = [r.status.code for r in reply.results]
        if got != codes:
            return f"per-image codes {got}, expected {codes}"
        for r in reply.results:
            if r.status.code == 0 and not r.labels:
                return "a good image without labels"
            if r.status.code != 0 and not r.status.message:
                return "a failed image without a reason"
        return None

    return check


def _kserve_finite(reply) -> str | None:
    from hostile.wire import kserve_probabilities

    probs = kserve_probabilities(reply)
    if not probs or not all(np.isfinite(p).all() for p in probs):
        return f"probabilities missing or not finite: {probs!r:.200}"
    return None


def _tf_finite(reply) -> str | None:
    from hostile.wire import tfserving_probabilities

    probs = tfserving_probabilities(reply)
    if not probs or not all(np.isfinite(p).all() for p in probs):
        return f"probabilities missing or not finite: {probs!r:.200}"
    return None


def _not_ready(reply) -> str | None:
    return "version '²' reported ready" if reply.ready else None


@cache
def streams() -> tuple[Stream, ...]:
    """Streams that mix malformed messages with good ones: every message answered, the stream goes on."""
    from tritonclient.grpc import service_pb2 as kpb

    from imgcls.v1 import inference_pb2 as pb

    good = good_image(3)
    v1_messages = [
        ("ok", dict(model_name="tiny", images=[good])),
        ("error", dict(model_name="tiny")),
        ("ok", dict(model_name="tiny", images=[good])),
        ("error", dict(model_name="nope", images=[good])),
        ("error", dict(model_name="tiny", images=[good], top_k=0)),
        ("error", dict(model_name="m" * 1_048_576, images=[good])),
        ("error", dict(model_name="tiny", images=[b"junk"])),
        ("ok", dict(model_name="tiny", images=[good])),
        ("error", dict(model_name="tiny", model_version=-1, images=[good])),
        ("error", dict(model_name="tiny", images=[good] * 65)),
        ("ok", dict(model_name="tiny", images=[good, b"junk"])),
        ("ok", dict(model_name="tiny", images=[good])),
    ]
    v1_stream = Stream(
        "v1-stream-malformed-messages",
        V1 + "PredictStream",
        [pb.PredictRequest(request_id=f"m{i}", **f).SerializeToString() for i, (_, f) in enumerate(v1_messages)],
        [e for e, _ in v1_messages],
        [f"m{i}" for i in range(len(v1_messages))],
    )

    def infer(i: int, version: str = "", model: str = "tiny", images=None, nan: bool = False, shape=None):
        request = kpb.ModelInferRequest(model_name=model, model_version=version, id=f"k{i}")
        if nan:
            request.inputs.add(name="pixels", datatype="FP32", shape=[1, SIZE, SIZE, 3])
            request.raw_input_contents.append(np.full((1, SIZE, SIZE, 3), np.nan, "<f4").tobytes())
        elif shape is not None:
            request.inputs.add(name="pixels", datatype="FP32", shape=shape)
            request.raw_input_contents.append(bytes(16))
        elif images is not None:
            request.inputs.add(name="images", datatype="BYTES", shape=[len(images)]).contents.bytes_contents.extend(
                images
            )
        return request

    specs = [
        ("error", dict(version="²")),
        ("ok", dict(images=[good])),
        ("error", dict(nan=True)),
        ("error", dict(version="-1", images=[good])),
        ("error", dict()),
        ("ok", dict(images=[good])),
        ("error", dict(shape=[2**32, 2**32, 1, 1])),
        ("error", dict(version="1e3", images=[good])),
        ("error", dict(model="m" * 1_048_576, images=[good])),
        ("error", dict(images=[b"junk"])),
        ("ok", dict(images=[good])),
    ]
    ks_stream = Stream(
        "kserve-stream-malformed-messages",
        KSERVE + "ModelStreamInfer",
        [infer(i, **s).SerializeToString() for i, (_, s) in enumerate(specs)],
        [e for e, _ in specs],
        [f"k{i}" for i in range(len(specs))],
    )
    wedge = kpb.ModelInferRequest(model_name="tiny", model_version="²").SerializeToString()
    only_bad = Stream("kserve-stream-only-a-superscript-version", KSERVE + "ModelStreamInfer", [wedge], ["error"], [""])
    flood = [
        kpb.ModelInferRequest(model_name="tiny", model_version="²", id=f"w{i}").SerializeToString() for i in range(50)
    ]
    many = Stream(
        "kserve-stream-50-bad-versions-then-good",
        KSERVE + "ModelStreamInfer",
        [*flood, infer(99, images=[good]).SerializeToString()],
        ["error"] * 50 + ["ok"],
        [f"w{i}" for i in range(50)] + ["k99"],
    )
    return (v1_stream, ks_stream, only_bad, many)
