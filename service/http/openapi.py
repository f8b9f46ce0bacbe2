"""The OpenAPI 3 document at `/openapi.json`: every HTTP endpoint, maintained here next to the routes.

Maintained, not generated: the request formats (binary tensor data after a JSON header, multipart images,
TF Serving's row and columnar JSON) are not what a framework infers from handler signatures. The route table
is checked against it by tests/test_http.py, so an endpoint cannot go undocumented.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from aiohttp import web

from imgcls.service.http.app import HttpServer, json_response

ERROR = {"$ref": "#/components/schemas/Error"}
NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}, "description": "model name"}
VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"},
           "description": "model version (omit the /versions/{version} part for the latest)"}
TIMEOUT = {"name": "timeout", "in": "query", "schema": {"type": "number", "exclusiveMinimum": 0},
           "description": "deadline in seconds (also the X-Request-Timeout header): past it the answer is 504"}
STATUS = {
    "400": "invalid input: the body names the problem",
    "404": "unknown model or version",
    "413": "request body over --max-message-bytes",
    "429": "queue full or too many calls: retry after the Retry-After header (seconds)",
    "503": "not ready (loading) or draining",
    "504": "deadline (timeout) exceeded",
}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: {"description": STATUS[code], "content": {"application/json": {"schema": ERROR}}}
            for code in codes}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(summary: str, tag: str, responses: dict[str, Any], *, params: list | None = None,
        body: dict | None = None, description: str = "") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if description:
        op["description"] = description
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = body
    return op


def _versioned(paths: dict[str, Any], base: str, item: dict[str, Any], suffix: str = "") -> None:
    """The same operation on /models/{name}SUFFIX and /models/{name}/versions/{version}SUFFIX."""
    paths[base + suffix] = item
    versioned = {method: {**op, "parameters": [*op.get("parameters", []), VERSION]} for method, op in item.items()}
    paths[base + "/versions/{version}" + suffix] = versioned


def document() -> dict[str, Any]:
    try:
        ours = metadata.version("imgcls")
    except metadata.PackageNotFoundError:
        ours = "unknown"
    paths: dict[str, Any] = {}
    # --- plain ---------------------------------------------------------------------------------------------------
    paths["/predict"] = {"post": _op(
        "Classify images: the raw body, or several as multipart form data", "plain",
        {"200": _json({"$ref": "#/components/schemas/Prediction"}), **_errors("400", "404", "413", "429", "503",
                                                                               "504")},
        params=[{"name": "model", "in": "query", "schema": {"type": "string"},
                 "description": "model name (default: the only model served)"},
                {"name": "version", "in": "query", "schema": {"type": "integer", "minimum": 0},
                 "description": "model version (default: latest)"},
                {"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1},
                 "description": "labels per image (default --default-top-k)"}, TIMEOUT],
        body={"required": True, "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}},
        description="One image: the request fails with its status (400 for an undecodable image). Several "
                    "(multipart, every file part is one): each result has labels or its own error.")}
    paths["/models"] = {"get": _op("Served models, versions, their state and failures", "plain",
                                   {"200": _json({"type": "object"})})}
    # --- KServe v2 -------------------------------------------------------------------------------------------------
    v2 = "KServe v2 (Open Inference Protocol)"
    paths["/v2"] = {"get": _op("Server metadata and extensions", v2, {"200": _json({"type": "object"})})}
    paths["/v2/health/live"] = {"get": _op("Liveness", v2, {"200": _json({"type": "object"})})}
    paths["/v2/health/ready"] = {"get": _op("Readiness (a Kubernetes readiness probe may use it)", v2, {
        "200": _json({"type": "object"}), **_errors("503")})}
    paths["/v2/repository/index"] = {"post": _op("Every model version and its state (Triton's extension)", v2, {
        "200": _json({"type": "array", "items": {"type": "object"}})})}
    paths["/v2/models/stats"] = {"get": _op("Statistics of every served version", v2, {
        "200": _json({"type": "object"})})}
    base = "/v2/models/{name}"
    _versioned(paths, base, {"get": _op("Model metadata: inputs images (BYTES) or pixels (FP32), output "
                                        "probabilities", v2, {"200": _json({"type": "object"}), **_errors("404")},
                                        params=[NAME])})
    _versioned(paths, base, {"get": _op("Model readiness", v2, {"200": _json({"type": "object"}),
                                                                **_errors("404", "503")}, params=[NAME])}, "/ready")
    _versioned(paths, base, {"get": _op("Triton model configuration (what perf_analyzer reads)", v2, {
        "200": _json({"type": "object"}), **_errors("404")}, params=[NAME])}, "/config")
    _versioned(paths, base, {"get": _op("Statistics extension", v2, {"200": _json({"type": "object"}),
                                                                     **_errors("404")}, params=[NAME])}, "/stats")
    _versioned(paths, base, {"post": _op(
        "Inference: JSON tensors, or the binary tensor data extension", v2,
        {"200": _json({"$ref": "#/components/schemas/InferResponse"}),
         **_errors("400", "404", "413", "429", "503", "504")},
        params=[NAME, TIMEOUT, {"name": "Inference-Header-Content-Length", "in": "header",
                                "schema": {"type": "integer"},
                                "description": "binary tensor data extension: the JSON header's length in bytes; "
                                               "the tensors with a binary_data_size parameter follow it"}],
        body={"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        description="Input `images` (BYTES [N] or [N,1]: encoded image files; in JSON each element is a base64 "
                    "string) or `pixels` (FP32 [N,H,W,3], preprocessed as the manifest says). Output "
                    "`probabilities` FP32 [N,C], or with the parameter `classification: k` BYTES [N,k] "
                    "\"score:index:label\" strings. Parameter `binary_data` (per output) or `binary_data_output` "
                    "(request) answers binary; `timeout` (request parameter) is microseconds.")}, "/infer")
    # --- TF Serving --------------------------------------------------------------------------------------------------
    tfs = "TF Serving REST"
    base = "/v1/models/{name}"
    _versioned(paths, base, {"get": _op("Model version status", tfs, {"200": _json({"type": "object"}),
                                                                      **_errors("404")}, params=[NAME])})
    _versioned(paths, base, {"get": _op("Signatures (serving_default, preprocessed, classification)", tfs, {
        "200": _json({"type": "object"}), **_errors("404")}, params=[NAME])}, "/metadata")
    _versioned(paths, base, {"post": _op(
        "Predict: images as {\"b64\": ...}, row (instances) or columnar (inputs) format", tfs,
        {"200": _json({"type": "object", "description": "{\"predictions\": [{\"probabilities\": [...], "
                                                        "\"top_class\": \"...\"}]} or {\"outputs\": {...}}"}),
         **_errors("400", "404", "413", "429", "503", "504")},
        params=[NAME, TIMEOUT],
        body={"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/"
                                                                                   "TFPredictRequest"}}}})},
        ":predict")
    _versioned(paths, base, {"post": _op(
        "Classify: tf.Examples with the image in the feature image/encoded", tfs,
        {"200": _json({"type": "object", "description": "{\"results\": [[[label, score], ...]]}"}),
         **_errors("400", "404", "413", "429", "503", "504")},
        params=[NAME, TIMEOUT],
        body={"required": True, "content": {"application/json": {"schema": {"type": "object", "properties": {
            "signature_name": {"type": "string"}, "context": {"type": "object"},
            "examples": {"type": "array", "items": {"type": "object"}}}}}}})}, ":classify")
    # --- pages -------------------------------------------------------------------------------------------------------
    for path, summary in (("/", "The web page"), ("/docs", "This API's documentation (offline)"),
                          ("/metrics", "Prometheus metrics (the same as the metrics port)"),
                          ("/openapi.json", "This document")):
        paths[path] = {"get": _op(summary, "pages", {"200": {"description": "OK"}})}
    return {
        "openapi": "3.0.3",
        "info": {"title": "imgcls HTTP API", "version": ours,
                 "description": "Image classification over KServe v2 REST, TF Serving REST and a plain upload "
                                "endpoint, served by the same request path as the gRPC port (docs/http.md)."},
        "paths": paths,
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "string", "description": "what went wrong, naming the problem"},
                "code": {"type": "string", "description": "the gRPC status name (INVALID_ARGUMENT, ...)"}}},
            "Label": {"type": "object", "properties": {"index": {"type": "integer"}, "name": {"type": "string"},
                                                       "score": {"type": "number"}}},
            "Prediction": {"type": "object", "properties": {
                "model": {"type": "string"}, "version": {"type": "integer"},
                "server_ms": {"type": "number", "description": "time in the server, arrival to answer"},
                "results": {"type": "array", "items": {"type": "object", "properties": {
                    "filename": {"type": "string"},
                    "labels": {"type": "array", "items": {"$ref": "#/components/schemas/Label"}},
                    "error": {"type": "object", "properties": {"code": {"type": "string"},
                                                               "message": {"type": "string"}}}}}}}},
            "Tensor": {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
                "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                "datatype": {"type": "string", "enum": ["BYTES", "FP32"]},
                "parameters": {"type": "object"}, "data": {"type": "array", "items": {}}}},
            "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
                "id": {"type": "string"}, "parameters": {"type": "object"},
                "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
                "outputs": {"type": "array", "items": {"type": "object", "properties": {
                    "name": {"type": "string"}, "parameters": {"type": "object"}}}}}},
            "InferResponse": {"type": "object", "properties": {
                "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
                "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}}}},
            "TFPredictRequest": {"type": "object", "properties": {
                "signature_name": {"type": "string"},
                "instances": {"type": "array", "items": {}}, "inputs": {}}},
        }},
    }


def add_routes(router: web.UrlDispatcher, http: HttpServer) -> None:
    body = document()

    async def serve(request: web.Request) -> web.Response:
        return json_response(body)
    router.add_get("/openapi.json", serve, allow_head=False)
