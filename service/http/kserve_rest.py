"""KServe v2 / Open Inference Protocol REST, as Triton serves it: tritonclient.http and perf_analyzer `-i http`
work unchanged.

Each endpoint builds the gRPC message of `kserve.py` and calls the same handler, so model resolution, tensor
parsing (`kserve_tensors.py`), the classification extension, statistics and errors are the gRPC port's. What is
HTTP's own lives here: JSON tensors (BYTES elements as base64 strings, FP32 as numbers, nested or flat) and the
binary tensor data extension (`Inference-Header-Content-Length`: the JSON header, then each tensor with a
`binary_data_size` parameter in input order; outputs come back binary when asked with `binary_data` or the
request parameter `binary_data_output`). A request parameter `timeout` (microseconds, as tritonclient sends it)
is a deadline, like `?timeout=` seconds. Method labels: `http.v2.<gRPC method>`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from aiohttp import web

from imgcls.service import protocols
from imgcls.service.core import Call, RequestError, invalid, short
from imgcls.service.http.app import JSON_TYPE, HttpServer, json_response, parse_json, set_timeout
from imgcls.service.http.convert import b64decode, to_json
from imgcls.service.kserve import EXTENSIONS, Service
from imgcls.service.kserve_tensors import CLASSIFICATION, join_bytes, split_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"
HTTP_EXTENSIONS = (*EXTENSIONS, "binary_tensor_data")
MAX_NESTING = 8  # JSON tensor data deeper than this is not a tensor the model takes


def _message(type_name: str, **fields: Any) -> Any:
    return protocols.message(f"inference.{type_name}")(**fields)


class KServeRest:
    def __init__(self, http: HttpServer) -> None:
        self.http = http
        self.service = Service(http.core)

    # --- health and metadata -------------------------------------------------------------------------------------

    async def live(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        return json_response({"live": True})

    async def ready(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        ready = (await self.service.ServerReady(None, None, call)).ready
        if ready:
            return json_response({"ready": True})
        why = "draining" if not self.http.core.accepting else "models are still loading (or none is published yet)"
        return json_response({"ready": False, "error": f"not ready: {why}", "code": "UNAVAILABLE"}, 503)

    async def server_metadata(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        data = to_json(await self.service.ServerMetadata(None, None, call))
        data["extensions"] = list(HTTP_EXTENSIONS)
        return json_response(data)

    async def model_metadata(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        name, version = _target(request)
        return json_response(to_json(await self.service.ModelMetadata(
            _message("ModelMetadataRequest", name=name, version=version), None, call)))

    async def model_ready(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        name, version = _target(request)
        ready = (await self.service.ModelReady(_message("ModelReadyRequest", name=name, version=version), None,
                                                call)).ready
        if ready:
            return json_response({"name": name, "ready": True})
        try:  # say why: unknown model or version (404), or the server is not ready
            self.service._resolve(name, version)
            why, code, status = "the server is not ready (loading or draining)", "UNAVAILABLE", 503
        except RequestError as exc:
            why, code, status = exc.message, exc.code.name, 404 if exc.code.name == "NOT_FOUND" else 400
        return json_response({"name": name, "ready": False, "error": why, "code": code}, status)

    async def model_config(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        name, version = _target(request)
        response = await self.service.ModelConfig(_message("ModelConfigRequest", name=name, version=version),
                                                  None, call)
        return json_response(to_json(response.config))

    async def model_stats(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        name, version = _target(request)
        return json_response(to_json(await self.service.ModelStatistics(
            _message("ModelStatisticsRequest", name=name, version=version), None, call)))

    async def repository_index(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        ready = False
        if body.strip():
            data = parse_json(body)
            if not isinstance(data, dict) or not isinstance(data.get("ready", False), bool):
                raise invalid('the body must be a JSON object like {"ready": true}')
            ready = data.get("ready", False)
        response = await self.service.RepositoryIndex(_message("RepositoryIndexRequest", ready=ready), None, call)
        return json_response([to_json(m) for m in response.models])

    # --- inference ----------------------------------------------------------------------------------------------

    async def infer(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        name, version = _target(request)
        header, binary = _split_body(request, body)
        message, binary_outputs = infer_request(header, binary, name, version, call)
        response = await self.service.ModelInfer(message, None, call)
        return infer_response(response, binary_outputs)


def _target(request: web.Request) -> tuple[str, str]:
    return request.match_info.get("name", ""), request.match_info.get("version", "")


def _split_body(request: web.Request, body: bytes) -> tuple[Any, memoryview]:
    """The JSON header and the binary tensor data after it (empty without the extension)."""
    length = request.headers.get(HEADER_LENGTH)
    if length is None:
        return parse_json(body), memoryview(b"")
    if not length.isdigit() or int(length) > len(body):
        raise invalid(f"{HEADER_LENGTH} {short(length, 32)} must be a byte count within the {len(body)}-byte body")
    cut = int(length)
    return parse_json(body[:cut], "inference header"), memoryview(body)[cut:]


def _flatten(data: Any, what: str) -> list[Any]:
    """Tensor data, nested as its shape or flat (the spec allows both), as one flat list."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [(iter(data), 0)]
    while stack:
        items, depth = stack[-1]
        item = next(items, stack)
        if item is stack:
            stack.pop()
        elif isinstance(item, list):
            if depth + 1 > MAX_NESTING:
                raise invalid(f"{what} nests deeper than {MAX_NESTING} levels")
            stack.append((iter(item), depth + 1))
        else:
            flat.append(item)
    return flat


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{what} must be an integer, got {short(value, 64)}")
    return value


def infer_request(header: Any, binary: memoryview, name: str, version: str, call: Call) -> tuple[Any, list[bool]]:
    """A KServe v2 REST inference request as a gRPC ModelInferRequest, and which outputs to answer binary."""
    if not isinstance(header, dict):
        raise invalid("the inference request must be a JSON object with \"inputs\"")
    message = _message("ModelInferRequest", model_name=name, model_version=version)
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise invalid("\"id\" must be a string")
    message.id = request_id
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise invalid("\"parameters\" must be a JSON object")
    if "timeout" in parameters:
        timeout_us = _int(parameters["timeout"], "parameter \"timeout\" (microseconds)")
        if timeout_us <= 0:
            raise invalid("parameter \"timeout\" (microseconds) must be positive")
        set_timeout(call, timeout_us / 1e6)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid("\"inputs\" must be a non-empty list of tensors")
    offset = 0
    for i, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise invalid(f"input {i} must be a JSON object with name, shape, datatype and data")
        tensor_name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(tensor_name, str) or not isinstance(datatype, str):
            raise invalid(f"input {i} needs a string \"name\" and \"datatype\"")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and
                                                  -1 <= d < 2**62 for d in shape):
            raise invalid(f"input {short(tensor_name, 64)}: \"shape\" must be a list of integers")
        message.inputs.add(name=tensor_name, datatype=datatype, shape=shape)
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            size = _int(size, f"input {short(tensor_name, 64)} binary_data_size")
            if size < 0 or offset + size > len(binary):
                raise invalid(f"input {short(tensor_name, 64)}: binary_data_size {size} runs past the "
                              f"{len(binary)} bytes of binary data after the header")
            message.raw_input_contents.append(bytes(binary[offset:offset + size]))
            offset += size
        elif "data" in item:
            message.raw_input_contents.append(_json_contents(tensor_name, datatype, item["data"]))
        else:
            raise invalid(f"input {short(tensor_name, 64)} has neither \"data\" nor a binary_data_size parameter")
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes of binary data follow the tensors the header describes")
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list):
        raise invalid("\"outputs\" must be a list")
    binary_default = parameters.get("binary_data_output", False) is True
    binary_outputs = []
    for i, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise invalid(f"output {i} must be a JSON object with a string \"name\"")
        output = message.outputs.add(name=item["name"])
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise invalid(f"output {short(item['name'], 64)}: \"parameters\" must be a JSON object")
        if params.get(CLASSIFICATION) not in (None, 0):
            output.parameters[CLASSIFICATION].int64_param = _int(params[CLASSIFICATION], "classification")
        binary_outputs.append(params.get("binary_data", binary_default) is True)
    return message, binary_outputs or [binary_default]


def _json_contents(name: str, datatype: str, data: Any) -> bytes:
    """JSON tensor data as raw contents: BYTES elements are base64 strings (encoded images are not text);
    FP32 elements are numbers."""
    what = f"input {short(name, 64)}"
    flat = _flatten(data, what)
    if datatype == "BYTES":
        return join_bytes([b64decode(value, f"{what} element {j}") for j, value in enumerate(flat)])
    if datatype == "FP32":
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
            raise invalid(f"{what}: FP32 data must be numbers")
        return np.asarray(flat, dtype="<f4").tobytes()
    raise invalid(f"{what} has datatype {short(datatype, 32)}; images are BYTES, preprocessed pixels FP32")


def infer_response(response: Any, binary_outputs: list[bool]) -> web.Response:
    """A ModelInferResponse as JSON, with the outputs asked binary after the JSON header."""
    data: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        data["id"] = response.id
    outputs, chunks = [], []
    for i, tensor in enumerate(response.outputs):
        raw = response.raw_output_contents[i]
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary_outputs[min(i, len(binary_outputs) - 1)]:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif tensor.datatype == "FP32":
            entry["data"] = np.frombuffer(raw, "<f4").tolist()
        else:
            entry["data"] = [item.decode("utf-8", "replace") for item in split_bytes(raw)]
        outputs.append(entry)
    data["outputs"] = outputs
    header = json.dumps(data, separators=(",", ":")).encode()
    if not chunks:
        return web.Response(body=header, content_type=JSON_TYPE)
    return web.Response(body=header + b"".join(chunks), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(header))})


def add_routes(router: web.UrlDispatcher, http: HttpServer) -> None:
    api = KServeRest(http)

    def get(path: str, method: str, handler, admit: bool = True) -> None:
        async def endpoint(request: web.Request) -> web.StreamResponse:
            return await http.run(request, f"v2.{method}", handler, admit=admit)
        router.add_get(path, endpoint, allow_head=False)

    get("/v2", "ServerMetadata", api.server_metadata, admit=False)
    get("/v2/health/live", "ServerLive", api.live, admit=False)
    get("/v2/health/ready", "ServerReady", api.ready, admit=False)
    get("/v2/models/stats", "ModelStatistics", api.model_stats)
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        get(base, "ModelMetadata", api.model_metadata)
        get(base + "/ready", "ModelReady", api.model_ready, admit=False)
        get(base + "/config", "ModelConfig", api.model_config)
        get(base + "/stats", "ModelStatistics", api.model_stats)

        async def infer(request: web.Request) -> web.StreamResponse:
            return await http.run(request, "v2.ModelInfer", api.infer, inference=True)
        router.add_post(base + "/infer", infer)

    async def index(request: web.Request) -> web.StreamResponse:
        return await http.run(request, "v2.RepositoryIndex", api.repository_index, admit=False)
    router.add_post("/v2/repository/index", index)
