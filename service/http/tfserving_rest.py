"""TensorFlow Serving's REST API: model status, metadata, `:predict` and `:classify`.

Each endpoint builds the gRPC message of `tfserving.py` and calls the same handler, so signatures, model
resolution, limits and errors are the gRPC port's. What is REST's own lives here: the JSON request formats
(`instances`, row by row, or `inputs`, column by column; images as `{"b64": "..."}`, pixels as nested numbers;
named inputs as objects) and the JSON answers (`predictions` for row requests, `outputs` for columnar ones, each
with `probabilities` and `top_class`). Unlike TF Serving, the model needs no decode op: the server decodes
and preprocesses. Method labels: `http.tfserving.<gRPC method>`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from aiohttp import web

from imgcls.service import protocols
from imgcls.service.core import Call, invalid, short
from imgcls.service.http.app import HttpServer, json_response, parse_json
from imgcls.service.http.convert import b64decode, to_json
from imgcls.service.tfserving import (
    DT_FLOAT,
    DT_STRING,
    FLOAT_INPUT,
    IMAGE_FEATURE,
    IMAGES_INPUT,
    PROBABILITIES,
    SIGNATURE_DEF_FIELD,
    TOP_CLASS,
    TFServing,
)

_DIGITS = "0123456789"


def _message(name: str) -> Any:
    return protocols.message(f"tensorflow.serving.{name}")()


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _spec(spec: Any, request: web.Request, signature: Any = "") -> None:
    """The URL's model, version or label (and the body's signature_name) as a ModelSpec."""
    spec.name = request.match_info["name"]
    version, label = request.match_info.get("version"), request.match_info.get("label")
    if version is not None:
        if not version or len(version) > 18 or any(c not in _DIGITS for c in version):
            raise invalid(f"version must be a number, got {short(version, 64)}")
        spec.version.value = int(version)
    elif label is not None:
        spec.version_label = label
    if not isinstance(signature, str):
        raise invalid("\"signature_name\" must be a string")
    spec.signature_name = signature


class TFServingRest:
    def __init__(self, http: HttpServer) -> None:
        self.api = TFServing(http.core)

    async def status(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        message = _message("GetModelStatusRequest")
        _spec(message.model_spec, request)
        return json_response(to_json(await self.api.get_model_status(message, None, call)))

    async def metadata(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        message = _message("GetModelMetadataRequest")
        _spec(message.model_spec, request)
        message.metadata_field.append(SIGNATURE_DEF_FIELD)
        response = await self.api.get_model_metadata(message, None, call)
        signatures = _message("SignatureDefMap")
        signatures.ParseFromString(response.metadata[SIGNATURE_DEF_FIELD].value)
        return json_response({"model_spec": to_json(response.model_spec),
                              "metadata": {SIGNATURE_DEF_FIELD: to_json(signatures)}})

    async def predict(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        data = parse_json(body)
        if not isinstance(data, dict):
            raise invalid('the body must be a JSON object with "instances" or "inputs"')
        message = _message("PredictRequest")
        _spec(message.model_spec, request, data.get("signature_name", ""))
        if ("instances" in data) == ("inputs" in data):
            raise invalid('give exactly one of "instances" (row format) or "inputs" (columnar format)')
        row = "instances" in data
        columns = _row_columns(data["instances"]) if row else _columns(data["inputs"])
        for key, values in columns.items():
            name, tensor = _tensor(key, values)
            message.inputs[name].CopyFrom(tensor)
        response = await self.api.predict(message, None, call)
        probs_tensor, top_tensor = response.outputs[PROBABILITIES], response.outputs[TOP_CLASS]
        dims = [d.size for d in probs_tensor.tensor_shape.dim]
        probs = np.frombuffer(probs_tensor.tensor_content, "<f4").reshape(dims).tolist()
        top = [value.decode() for value in top_tensor.string_val]
        if row:
            return json_response({"predictions": [{PROBABILITIES: p, TOP_CLASS: t}
                                                  for p, t in zip(probs, top, strict=True)]})
        return json_response({"outputs": {PROBABILITIES: probs, TOP_CLASS: top}})

    async def classify(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        data = parse_json(body)
        if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
            raise invalid('the body must be a JSON object with "examples": [{"image/encoded": {"b64": "..."}}]')
        message = _message("ClassificationRequest")
        _spec(message.model_spec, request, data.get("signature_name", ""))
        context = data.get("context")
        if context is not None:
            examples = message.input.example_list_with_context.examples
            _features(message.input.example_list_with_context.context, context, "context")
        else:
            examples = message.input.example_list.examples
        for i, example in enumerate(data["examples"]):
            _features(examples.add(), example, f"example {i}")
        if not data["examples"]:
            raise invalid(f'"examples" is empty; send at least one with the feature {IMAGE_FEATURE!r}')
        response = await self.api.classify(message, None, call)
        return json_response({"results": [[[c.label, c.score] for c in classification.classes]
                                          for classification in response.result.classifications]})


def _row_columns(instances: Any) -> dict[str, list[Any]]:
    """Row format: a list of instances, each a value or an object of named inputs."""
    if not isinstance(instances, list) or not instances:
        raise invalid('"instances" must be a non-empty list')
    named = [isinstance(row, dict) and not _is_b64(row) for row in instances]
    if not any(named):
        return {"": instances}
    if not all(named):
        raise invalid('"instances" mixes named inputs (objects) with plain values')
    keys = set(instances[0])
    for i, row in enumerate(instances):
        if set(row) != keys:
            raise invalid(f"instance {i} has inputs {sorted(row)[:8]}, instance 0 has {sorted(keys)[:8]}")
    return {key: [row[key] for row in instances] for key in keys}


def _columns(inputs: Any) -> dict[str, Any]:
    """Columnar format: one input's value (a batch), or an object of named inputs."""
    if isinstance(inputs, dict) and not _is_b64(inputs):
        if not inputs:
            raise invalid('"inputs" is an empty object')
        return inputs
    return {"": inputs}


def _tensor(key: str, values: Any) -> tuple[str, Any]:
    """A JSON value as a TensorProto: {"b64"} objects and strings are DT_STRING, numbers DT_FLOAT. An unnamed
    input ("" key) takes the signature's input name (tfserving.py accepts any one name)."""
    what = f"input {short(key or 'instances', 64)}"
    tensor = protocols.message("tensorflow.TensorProto")()
    shape: list[int]
    if _is_b64(values) or isinstance(values, str):  # one image
        values, shape = [values], []
    elif isinstance(values, list) and values and all(_is_b64(v) or isinstance(v, str) for v in values):
        shape = [len(values)]
    elif isinstance(values, list) and values and all(isinstance(v, list) and len(v) == 1 and
                                                     (_is_b64(v[0]) or isinstance(v[0], str)) for v in values):
        values, shape = [v[0] for v in values], [len(values), 1]
    else:
        try:
            array = np.asarray(values, dtype="<f4")
        except (ValueError, TypeError, RecursionError):
            raise invalid(f"{what} is neither images ({{\"b64\": ...}}) nor a rectangular array of numbers") from None
        if array.ndim == 0:
            raise invalid(f"{what} must be a batch (a list)")
        tensor.dtype = DT_FLOAT
        tensor.tensor_content = array.tobytes()
        tensor.tensor_shape.dim.extend(_dim(n) for n in array.shape)
        return key or FLOAT_INPUT, tensor
    tensor.dtype = DT_STRING
    for i, value in enumerate(values):
        tensor.string_val.append(b64decode(value["b64"], f"{what} element {i} b64") if isinstance(value, dict)
                                 else value.encode())
    tensor.tensor_shape.dim.extend(_dim(n) for n in shape)
    return key or IMAGES_INPUT, tensor


def _dim(size: int) -> Any:
    return protocols.message("tensorflow.TensorShapeProto.Dim")(size=size)


def _features(example: Any, features: Any, what: str) -> None:
    """A JSON object of features as a tf.Example: {"b64"} and strings are bytes, ints int64, floats float."""
    if not isinstance(features, dict):
        raise invalid(f"{what} must be a JSON object of features")
    for name, value in features.items():
        feature = example.features.feature[name]
        values = value if isinstance(value, list) else [value]
        if all(_is_b64(v) or isinstance(v, str) for v in values):
            feature.bytes_list.value.extend(
                b64decode(v["b64"], f"{what} feature {short(name, 64)}") if isinstance(v, dict) else v.encode()
                for v in values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            feature.int64_list.value.extend(values)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            feature.float_list.value.extend(values)
        else:
            raise invalid(f"{what} feature {short(name, 64)}: values must be all {{\"b64\"}}/strings, or numbers")


def add_routes(router: web.UrlDispatcher, http: HttpServer) -> None:
    api = TFServingRest(http)
    model = "/v1/models/{name:[^/:]+}"
    targets = (model, model + "/versions/{version:[^/:]+}", model + "/labels/{label:[^/:]+}")

    def route(verb: str, path: str, method: str, handler, inference: bool = False) -> None:
        async def endpoint(request: web.Request) -> web.StreamResponse:
            return await http.run(request, f"tfserving.{method}", handler, inference=inference)
        router.add_route(verb, path, endpoint)

    for target in targets:
        route("GET", target, "GetModelStatus", api.status)
        route("GET", target + "/metadata", "GetModelMetadata", api.metadata)
        route("POST", target + ":predict", "Predict", api.predict, inference=True)
        route("POST", target + ":classify", "Classify", api.classify, inference=True)
