"""KServe v2 tensors <-> what the batcher takes and gives: encoded images or a float32 batch in, probabilities
or top-k classification strings out.

Kept apart from the gRPC handlers (`kserve.py`) so the wire encodings (raw little-endian contents, BYTES
elements with a 4-byte length prefix, Triton's "score:index:label" classification strings) are plain
functions over messages and arrays.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from imgcls.service.core import checked_count, invalid, short

IMAGES = "images"  # BYTES [N] or [N, 1]: encoded images, preprocessed by the server
PIXELS = "pixels"  # FP32 [N, H, W, 3]: already preprocessed as the manifest says
PROBABILITIES = "probabilities"  # FP32 [N, C]
CLASSIFICATION = "classification"  # requested-output parameter (int64): top-k as BYTES [N, k]


_invalid = invalid


def split_bytes(raw: bytes) -> list[bytes]:
    """Decode a raw BYTES tensor: each element is a 4-byte little-endian length, then that many bytes."""
    view, items, pos = memoryview(raw), [], 0
    while pos < len(view):
        if pos + 4 > len(view):
            raise _invalid(f"raw BYTES contents end inside a length prefix at byte {pos}")
        (size,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + size > len(view):
            raise _invalid(f"raw BYTES element {len(items)} claims {size} bytes, only {len(view) - pos} left")
        items.append(bytes(view[pos:pos + size]))
        pos += size
    return items


def join_bytes(items: list[bytes]) -> bytes:
    """Encode BYTES elements as raw contents (the inverse of `split_bytes`)."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


@dataclass
class Inputs:
    """A request's one input: encoded images, or a preprocessed batch."""

    images: list[bytes] | None = None
    pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.pixels)


def parse_inputs(request, pixel_shape: Callable[[list[int]], None] | None = None) -> Inputs:
    """Read `images` or `pixels` from a ModelInferRequest (in `contents` or `raw_input_contents`).
    `pixel_shape` checks a pixel tensor's declared shape against the model before anything is allocated."""
    if len(request.inputs) != 1:
        raise _invalid(f"{len(request.inputs)} inputs; send exactly one: {IMAGES!r} (BYTES [N], encoded images) "
                       f"or {PIXELS!r} (FP32 [N, H, W, 3], preprocessed)")
    tensor = request.inputs[0]
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise _invalid(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} input(s)")
    if raw and tensor.HasField("contents"):
        raise _invalid(f"input {tensor.name!r} has both contents and raw_input_contents")
    shape = list(tensor.shape)
    if not shape or any(d < 0 for d in shape):
        raise _invalid(f"input {short(tensor.name, 64)} has shape {shape[:8]}; give every dimension, batch first")
    count = checked_count(shape, f"input {short(tensor.name, 64)}")
    if tensor.name == IMAGES:
        if tensor.datatype != "BYTES":
            raise _invalid(f"input {IMAGES!r} must be BYTES (encoded images), got "
                           f"{short(tensor.datatype, 32) if tensor.datatype else 'no datatype'}")
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise _invalid(f"input {IMAGES!r} has shape {shape}; expected [N] or [N, 1]")
        images = split_bytes(raw[0]) if raw else list(tensor.contents.bytes_contents)
        if len(images) != count:
            raise _invalid(f"input {IMAGES!r} has shape {shape} but {len(images)} elements")
        if not images:
            raise _invalid("no images in the request")
        return Inputs(images=images)
    if tensor.name == PIXELS:
        if tensor.datatype != "FP32":
            raise _invalid(f"input {PIXELS!r} must be FP32, got {short(tensor.datatype, 32) or 'no datatype'}")
        sent = len(raw[0]) // 4 if raw else len(tensor.contents.fp32_contents)
        if raw and len(raw[0]) != 4 * count:
            raise _invalid(f"input {PIXELS!r} has shape {shape[:8]} ({4 * count} bytes) but {len(raw[0])} raw bytes")
        if not raw and sent != count:
            raise _invalid(f"input {PIXELS!r} has shape {shape[:8]} but {sent} fp32_contents")
        if pixel_shape is not None:
            pixel_shape(shape)
        values = np.frombuffer(raw[0], "<f4") if raw else np.asarray(tensor.contents.fp32_contents, np.float32)
        return Inputs(pixels=values.reshape(shape).astype(np.float32, copy=False))
    raise _invalid(f"unknown input {short(tensor.name, 64)}; the model takes {IMAGES!r} (BYTES) or {PIXELS!r} (FP32)")


@dataclass(frozen=True)
class Output:
    """One requested output: the probabilities, or with `top_k` Triton's classification strings."""

    top_k: int | None = None


def parse_outputs(request) -> list[Output]:
    """The outputs to answer, in request order; none requested means the probabilities."""
    if not request.outputs:
        return [Output()]
    outputs = []
    for requested in request.outputs:
        if requested.name != PROBABILITIES:
            raise _invalid(f"unknown output {short(requested.name, 64)}; the model has {PROBABILITIES!r}")
        top_k = None
        if CLASSIFICATION in requested.parameters:
            param = requested.parameters[CLASSIFICATION]
            kind = param.WhichOneof("parameter_choice")
            top_k = getattr(param, kind) if kind in ("int64_param", "uint64_param") else None
            if top_k is None or top_k < 1:
                raise _invalid(f"output parameter {CLASSIFICATION!r} must be an integer >= 1")
        outputs.append(Output(top_k))
    return outputs


def encode_outputs(response, probs: np.ndarray, outputs: list[Output], class_names: list[str]) -> None:
    """Append each output to a ModelInferResponse as raw contents, as Triton answers."""
    n, classes = probs.shape
    for output in outputs:
        tensor = response.outputs.add(name=PROBABILITIES)
        if output.top_k is None:
            tensor.datatype = "FP32"
            tensor.shape[:] = [n, classes]
            response.raw_output_contents.append(probs.astype("<f4").tobytes())
            continue
        k = min(output.top_k, classes)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        items = [f"{probs[row, i]:f}:{i}:{class_names[i]}".encode() for row in range(n) for i in top[row]]
        tensor.datatype = "BYTES"
        tensor.shape[:] = [n, k]
        response.raw_output_contents.append(join_bytes(items))
