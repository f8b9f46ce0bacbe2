"""The plain endpoint, for people and scripts: `POST /predict` with an image as the raw body, or several as
multipart form data, answers JSON top-k labels; `GET /models` lists what is served.

A thin adapter over imgcls.v1 (`native.py`): the request becomes a `PredictRequest`, so an image of several
that fails gets its own error while the others get their labels, and a request of one image fails with that
image's status (400 for an undecodable one). Method labels: `http.Predict`, `http.ListModels`.
"""

from __future__ import annotations

import email.parser
import email.policy
from typing import Any

import grpc
from aiohttp import web

from imgcls.service.core import Call, invalid, short
from imgcls.service.http.app import HttpServer, elapsed_ms, json_response
from imgcls.service.native import Native
from imgcls.v1 import inference_pb2 as pb

MULTIPART = "multipart/form-data"


def _int_param(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None or text == "":
        return None
    if not text.isdigit() or len(text) > 9:
        raise invalid(f"query parameter {name} must be a non-negative integer, got {short(text, 32)}")
    return int(text)


def images_from_body(request: web.Request, body: bytes) -> tuple[list[str], list[bytes]]:
    """(file names, image bytes) from a raw body or multipart form data (every part with content). Any other
    media type is the image itself: `curl --data-binary` sends application/x-www-form-urlencoded."""
    ctype = request.headers.get("Content-Type", "")
    if ctype.lower().startswith(MULTIPART):
        return _multipart(ctype, body)
    if not body:
        raise invalid("the body is empty; send an image file (curl --data-binary @photo.jpg) or multipart form "
                      "data (curl -F file=@photo.jpg)")
    return [request.query.get("filename", "")], [body]


def _multipart(ctype: str, body: bytes) -> tuple[list[str], list[bytes]]:
    """Parsed in memory (the body is already read under the size limit): every file part is one image."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + ctype.encode("latin-1", "replace") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise invalid("the multipart/form-data body does not parse (boundary missing or wrong)")
    names, images = [], []
    for part in message.iter_parts():
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is None and not data:
            continue
        names.append(filename or part.get_param("name", header="content-disposition") or "")
        images.append(data)
    if not images:
        raise invalid("the multipart/form-data body has no file parts")
    return names, images


class Plain:
    def __init__(self, http: HttpServer) -> None:
        self.native = Native(http.core)

    async def predict(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        names, images = images_from_body(request, body)
        message = pb.PredictRequest(images=images, model_name=request.query.get("model", ""),
                                    model_version=_int_param(request, "version") or 0,
                                    request_id=request.query.get("request_id", ""))
        top_k = _int_param(request, "top_k")
        if top_k is not None:
            message.top_k = top_k
        response = await self.native.predict(message, None, call)
        results: list[dict[str, Any]] = []
        for name, result in zip(names, response.results, strict=True):
            entry: dict[str, Any] = {"filename": name}
            if result.status.code:
                entry["error"] = {"code": _code_name(result.status.code), "message": result.status.message}
            else:
                entry["labels"] = [{"index": label.index, "name": label.name, "score": label.score}
                                   for label in result.labels]
            results.append(entry)
        return json_response({"model": response.model_name, "version": response.model_version,
                              "results": results, "server_ms": elapsed_ms(call)})

    async def models(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        """Every model with its versions, state and failures (what the web page shows)."""
        core = self.native.core
        served, failed = core.models, core.failed
        models = []
        for name in sorted(set(served) | set(failed)):
            versions = [{"version": v, "state": "READY", "runtime": m.runtime,
                         "classes": list(m.entry.manifest.class_names), "backbone": m.entry.manifest.backbone}
                        for v, m in sorted(served.get(name, {}).items())]
            versions += [{"version": v, "state": "FAILED", "error": error}
                         for v, error in sorted(failed.get(name, {}).items()) if v not in served.get(name, {})]
            models.append({"name": name, "versions": versions})
        ready = core.serving()
        return json_response({"ready": ready, "models": models})


def _code_name(code: int) -> str:
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


def add_routes(router: web.UrlDispatcher, http: HttpServer) -> None:
    api = Plain(http)

    async def predict(request: web.Request) -> web.StreamResponse:
        return await http.run(request, "Predict", api.predict, inference=True)

    async def models(request: web.Request) -> web.StreamResponse:
        return await http.run(request, "ListModels", api.models, admit=False)

    router.add_post("/predict", predict)
    router.add_get("/models", models, allow_head=False)
