"""Property-based fuzzing (hypothesis) of the decoder and the request parsers (issue 15).

- `imgcls.preprocessing.preprocess_bytes`: for ANY bytes it returns a finite float32 array of the spec's shape
  or raises `ImageDecodeError`; nothing else (no IndexError, struct.error, MemoryError, ...), and the byte
  limit always holds;
- KServe `parse_inputs` (service/kserve_tensors.py) and the TF Serving tensor parsing (service/tfserving.py):
  any message gives a result or the service's request error (INVALID_ARGUMENT / NOT_FOUND), never another
  exception, and never an array larger than the model's input allows.

Example counts are small for CI; `IMGCLS_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz_properties.py` runs longer
by hand (docs/fuzzing.md). Inputs start from the generated corpus (tests/hostile/corpus.py) and mutate it.
"""

from __future__ import annotations

import importlib
import inspect
import io
import os
import struct

import grpc
import numpy as np
import pytest
from hostile import corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgcls.errors import ImageDecodeError
from imgcls.preprocessing import PreprocessingSpec, preprocess_bytes

EXAMPLES = int(os.environ.get("IMGCLS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("IMGCLS_FUZZ_EXAMPLES"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
SPECS = [
    PreprocessingSpec(input_size=(32, 32)),
    PreprocessingSpec(
        input_size=(24, 40), mode="caffe", channel_order="BGR", scale=1.0, mean=(103.9, 116.8, 123.7), resize="bicubic"
    ),
]
SIZE = 32
MAX_IMAGES = 64


# --- the decoder -------------------------------------------------------------------------------------------------


def _seeds() -> list[bytes]:
    """Small valid and nearly valid files of the cheap families to mutate (no cost bombs, nothing over 64 KiB)."""
    families = (
        corpus._good,
        corpus._modes,
        corpus._polyglots,
        corpus._text_formats,
        corpus._float_tiffs,
        corpus._other_formats,
    )
    return [c.data for c in corpus.collect(families) if len(c.data) < 64 * 1024]


SEEDS = _seeds()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(("flip", "set", "insert", "delete", "splice")))
        if action == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[pos] = draw(st.sampled_from((0x00, 0xFF, 0x7F, 0x80, 0x01)))
        elif action == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            data[pos : pos + 4] = struct.pack(
                ">I", draw(st.sampled_from((0, 1, 2**15, 2**16 - 1, 2**31 - 1, 2**32 - 1)))
            )
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


MAGICS = st.sampled_from([*corpus.MAGICS.values(), b"P1\n", b"P3\n", b"#define ", b"/* XPM */", b"Pf\n"])


def _decodes_or_refuses(data: bytes, spec: PreprocessingSpec, **limits) -> None:
    try:
        x = preprocess_bytes(data, spec, **limits)
    except ImageDecodeError as exc:
        assert str(exc).strip(), "an ImageDecodeError without a reason"
        assert len(str(exc)) <= 2048, f"a reason of {len(str(exc))} characters"
        return
    h, w = spec.input_size
    assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape == (h, w, 3), (type(x), x.dtype, x.shape)
    assert np.isfinite(x).all(), "non-finite model input from an image"


def test_decode_every_light_corpus_case():
    """The generated corpus replayed through the decoder itself (the server test sends it over the wire): only
    ImageDecodeError with a reason or a finite array; "reject" cases refused, "accept" cases decoded."""
    limits = {"max_bytes": corpus.MAX_IMAGE_BYTES, "max_pixels": corpus.MAX_IMAGE_PIXELS}
    wrong = []
    for case in corpus.build():
        if case.heavy:
            continue
        try:
            x = preprocess_bytes(case.data, SPECS[0], **limits)
        except ImageDecodeError as exc:
            outcome = corpus.REJECT
            if not str(exc).strip() or len(str(exc)) > 2048:
                wrong.append(f"{case.name}: reason of {len(str(exc))} characters")
        except Exception as exc:
            wrong.append(f"{case.name}: {type(exc).__name__}: {str(exc)[:150]}")
            continue
        else:
            outcome = corpus.ACCEPT
            if x.shape != (32, 32, 3) or x.dtype != np.float32 or not np.isfinite(x).all():
                wrong.append(f"{case.name}: decoded to {x.dtype} {x.shape}, finite {np.isfinite(x).all()}")
        if case.expect != corpus.ANY and outcome != case.expect:
            wrong.append(f"{case.name}: expected {case.expect}, got {outcome}")
    assert not wrong, f"{len(wrong)} cases:\n" + "\n".join(wrong)


@FUZZ
@given(data=st.binary(max_size=4096), spec=st.sampled_from(SPECS))
def test_decode_any_bytes(data, spec):
    _decodes_or_refuses(data, spec)


@FUZZ
@given(data=st.tuples(MAGICS, st.binary(max_size=2048)).map(b"".join), spec=st.sampled_from(SPECS))
def test_decode_signature_then_noise(data, spec):
    _decodes_or_refuses(data, spec)


@FUZZ
@given(data=mutated(), spec=st.sampled_from(SPECS))
def test_decode_mutated_images(data, spec):
    _decodes_or_refuses(data, spec)


@FUZZ
@given(data=mutated(), max_bytes=st.integers(1, 70_000), max_pixels=st.integers(1, 10_000))
def test_decode_limits_always_hold(data, max_bytes, max_pixels):
    """Over the byte limit is always refused; whatever is accepted fits the pixel limit."""
    if len(data) > max_bytes:
        with pytest.raises(ImageDecodeError):
            preprocess_bytes(data, SPECS[0], max_bytes=max_bytes, max_pixels=max_pixels)
        return
    _decodes_or_refuses(data, SPECS[0], max_bytes=max_bytes, max_pixels=max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:
        return  # Pillow cannot even read the header: refused above or decoded by other means
    try:
        preprocess_bytes(data, SPECS[0], max_bytes=max_bytes, max_pixels=max_pixels)
    except ImageDecodeError:
        return
    assert width * height <= max_pixels, f"a {width}x{height} image accepted with max_pixels={max_pixels}"


# --- the request parsers -----------------------------------------------------------------------------------------


def _request_error() -> type[Exception]:
    """The service's request error, wherever the server core keeps it."""
    for module in ("imgcls.service.core", "imgcls.service.server"):
        try:
            found = getattr(importlib.import_module(module), "RequestError", None)
        except ImportError:
            continue
        if found is not None:
            return found
    raise AssertionError("no RequestError in imgcls.service.core or imgcls.service.server")


RequestError = _request_error()


def _model_shape(shape) -> None:
    """What the server checks a pixel tensor's declared shape against: the tiny model's [N, 32, 32, 3]."""
    shape = list(shape)
    if len(shape) != 4 or shape[1:] != [SIZE, SIZE, 3] or not 1 <= shape[0] <= MAX_IMAGES:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"shape {shape[:8]} is not [N, {SIZE}, {SIZE}, 3]")


def _call_with_shape_check(function, *args):
    """Pass the model-shape check when the parser takes one (the parsers validate before allocating)."""
    params = list(inspect.signature(function).parameters)
    if len(params) > len(args):
        return function(*args, _model_shape)
    return function(*args)


def _refused_cleanly(exc: Exception) -> None:
    assert isinstance(exc, RequestError), f"{type(exc).__name__}: {str(exc)[:300]}"
    assert exc.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), exc.code
    assert exc.message.strip() and len(exc.message) <= 2048, f"reason of {len(exc.message)} characters"


DIMS = st.one_of(
    st.integers(0, 4),
    st.sampled_from((SIZE, 3, 64, 65, 10_000)),  # [1, 10000, 10000, 3]: 1.2 GB if allocated before checking
    st.integers(-(2**63), -1),
    st.sampled_from((2**31, 2**32, 2**62, 2**63 - 1)),
)
SHAPES = st.lists(DIMS, max_size=6)
NAMES = st.one_of(st.sampled_from(("images", "pixels", "input", "", "image", "IMAGES")), st.text(max_size=40))
DATATYPES = st.sampled_from(("BYTES", "FP32", "FP16", "INT8", "", "bytes", "fp32", "UINT8", "FP64"))
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)


def _kserve_module():
    return importlib.import_module("imgcls.service.kserve_tensors")


@st.composite
def kserve_requests(draw):
    from imgcls.service import protocols

    request = protocols.message("inference.ModelInferRequest")(model_name=draw(st.sampled_from(("tiny", "", "x"))))
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(("none", "bytes", "fp32", "raw-images", "raw-pixels", "raw-noise", "model")))
        if draw(st.booleans()):  # name and datatype that go together, so the parser gets to the contents
            name, datatype = ("pixels", "FP32") if kind in ("fp32", "raw-pixels", "model") else ("images", "BYTES")
        else:
            name, datatype = draw(NAMES), draw(DATATYPES)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=draw(SHAPES))
        if kind == "bytes":
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=64), max_size=4)))
        elif kind == "fp32":
            values = draw(st.lists(FLOATS, max_size=64))
            tensor.contents.fp32_contents.extend(values)
            if draw(st.booleans()):  # a shape that matches the values, so the parser gets past the count
                tensor.shape[:] = draw(st.sampled_from(([len(values)], [1, len(values)], [1, 1, 1, len(values)])))
        elif kind == "raw-images":
            items = draw(st.lists(st.binary(max_size=32), max_size=4))
            raw = b"".join(struct.pack("<I", len(x)) + x for x in items)
            request.raw_input_contents.append(raw[: draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw)
        elif kind == "raw-pixels":
            n = draw(st.integers(0, 2))
            values = np.full((n, SIZE, SIZE, 3), draw(FLOATS), "<f4")
            tensor.shape[:] = draw(st.sampled_from(([n, SIZE, SIZE, 3], list(tensor.shape))))
            request.raw_input_contents.append(values.tobytes())
        elif kind == "raw-noise":
            request.raw_input_contents.append(draw(st.binary(max_size=256)))
        elif kind == "model":  # a well-formed pixels tensor of the model's shape, any values
            tensor.name, tensor.datatype, tensor.shape[:] = "pixels", "FP32", [1, SIZE, SIZE, 3]
            tensor.ClearField("contents")
            request.raw_input_contents.append(np.full((1, SIZE, SIZE, 3), draw(FLOATS), "<f4").tobytes())
    if draw(st.booleans()) and request.raw_input_contents:
        request.raw_input_contents.append(draw(st.binary(max_size=16)))
    return request


def _check_inputs(result) -> None:
    """A parsed KServe input is images or a pixel batch within the model's limits."""
    images, pixels = getattr(result, "images", None), getattr(result, "pixels", None)
    assert (images is None) != (pixels is None), "exactly one of images / pixels"
    if pixels is not None:
        assert pixels.ndim == 4 and pixels.shape[1:] == (SIZE, SIZE, 3) and 1 <= len(pixels) <= MAX_IMAGES, (
            f"pixels of shape {pixels.shape} accepted"
        )
        assert pixels.dtype == np.float32


@FUZZ
@given(request=kserve_requests())
def test_kserve_parse_inputs(request):
    parse_inputs = _kserve_module().parse_inputs
    try:
        result = _call_with_shape_check(parse_inputs, request)
    except Exception as exc:
        _refused_cleanly(exc)
        return
    _check_inputs(result)


@FUZZ
@given(data=st.binary(max_size=512))
def test_kserve_parse_inputs_from_any_message_bytes(data):
    """Whatever bytes protobuf accepts as a ModelInferRequest, the parser answers cleanly."""
    from google.protobuf.message import DecodeError

    from imgcls.service import protocols

    try:
        request = protocols.message("inference.ModelInferRequest").FromString(data)
    except DecodeError:
        return
    try:
        result = _call_with_shape_check(_kserve_module().parse_inputs, request)
    except Exception as exc:
        _refused_cleanly(exc)
        return
    _check_inputs(result)


@FUZZ
@given(request=kserve_requests())
def test_kserve_parse_outputs(request):
    module = _kserve_module()
    requested = request.outputs.add(name="probabilities")
    try:
        module.parse_outputs(request)
    except Exception as exc:
        _refused_cleanly(exc)
    requested.parameters["classification"].string_param = "3"
    with pytest.raises(RequestError):
        module.parse_outputs(request)


@st.composite
def tf_tensors(draw):
    from imgcls.service import protocols

    tensor = protocols.message("tensorflow.TensorProto")(dtype=draw(st.sampled_from((0, 1, 2, 3, 7, 999))))
    if draw(st.integers(0, 9)) == 0:
        tensor.tensor_shape.unknown_rank = True
    model = draw(st.booleans())
    for d in [draw(st.integers(0, 3)), SIZE, SIZE, 3] if model else draw(SHAPES):
        tensor.tensor_shape.dim.add(size=d)
    kind = draw(st.sampled_from(("none", "strings", "floats", "one-float", "content", "content-noise")))
    if kind == "strings":
        tensor.string_val.extend(draw(st.lists(st.binary(max_size=32), max_size=4)))
    elif kind == "floats":
        tensor.float_val.extend(draw(st.lists(FLOATS, max_size=32)))
    elif kind == "one-float":
        tensor.float_val.append(draw(FLOATS))  # one value fills any shape: the 50-byte 1.2 GB request
    elif kind == "content":
        count = int(np.prod([d.size for d in tensor.tensor_shape.dim])) if model else draw(st.integers(0, 64))
        tensor.tensor_content = np.full(count, draw(FLOATS), "<f4").tobytes()
    elif kind == "content-noise":
        tensor.tensor_content = draw(st.binary(max_size=256))
    return tensor


def _tfserving():
    return importlib.import_module("imgcls.service.tfserving")


@FUZZ
@given(tensor=tf_tensors(), key=NAMES)
def test_tfserving_string_tensor(tensor, key):
    try:
        values = _tfserving()._string_values(key, tensor)
    except Exception as exc:
        _refused_cleanly(exc)
        return
    assert all(isinstance(v, bytes) for v in values)
    assert len(values) == len(tensor.string_val)


@FUZZ
@given(tensor=tf_tensors(), key=NAMES)
def test_tfserving_float_tensor(tensor, key):
    try:
        array = _call_with_shape_check(_tfserving()._float_array, key, tensor)
    except Exception as exc:
        _refused_cleanly(exc)
        return
    assert array.dtype == np.float32 and array.ndim == 4 and array.shape[1:] == (SIZE, SIZE, 3), array.shape
    assert 1 <= len(array) <= MAX_IMAGES, f"{len(array)} images accepted"


@FUZZ
@given(data=st.binary(max_size=512))
def test_tfserving_predict_request_from_any_bytes(data):
    """Any PredictRequest protobuf accepts: each input tensor parses cleanly or is refused cleanly."""
    from google.protobuf.message import DecodeError

    from imgcls.service import protocols

    try:
        request = protocols.message("tensorflow.serving.PredictRequest").FromString(data)
    except DecodeError:
        return
    for key, tensor in request.inputs.items():
        for parse in (
            lambda k, t: _tfserving()._string_values(k, t),
            lambda k, t: _call_with_shape_check(_tfserving()._float_array, k, t),
        ):
            try:
                parse(key, tensor)
            except Exception as exc:
                _refused_cleanly(exc)
