"""The HTTP server: aiohttp on the server's own asyncio loop (the one grpc.aio runs on), one port for every HTTP
API, and the mapping from the request path's status codes to HTTP.

Why aiohttp: measured against Starlette on uvicorn (httptools) with the same handler, both cost about the same
server CPU per request (~0.23 ms, docs/http.md), and aiohttp runs on an existing loop as a library (no second
loop, no signal handlers, no extra dependency), binds with SO_REUSEPORT so several `--workers` processes share
the port, and cancels a handler whose client went away (the core then frees the request's queue slots).

Every API call goes through `HttpServer.run`: call accounting in `Core.call` (in-flight gauge, drain, version
pin, one `imgcls_requests_total` row with method label `http.<API>.<method>`), admission (`check_accepting`),
the request body read under the size limit (413), the call's deadline from `?timeout=` or the
`X-Request-Timeout` header (seconds), and the status mapping below; errors are JSON `{"error": ..., "code": ...}`
("error" is what both KServe v2 and TF Serving clients read).

TLS and bearer tokens (service/security.py) are the gRPC port's: the same certificate files (re-read at each
handshake when they changed) and the same token rule, as the first middleware, so a refused request is
answered 401 before its route runs or its body is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import grpc
from aiohttp import web

from imgcls.service.core import Call, Core, RequestError, invalid, short

log = logging.getLogger(__name__)

# The request path's codes as HTTP statuses. RESOURCE_EXHAUSTED (queue full, too many calls) is 429 with
# Retry-After, not 503: 503 means this replica is not ready or draining (probes and load balancers take it out
# of rotation); 429 says "this request, later", which is what a full queue means (docs/http.md).
STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,  # nginx's "client closed request": nobody reads it, the metrics do
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
TIMEOUT_HEADER = "X-Request-Timeout"  # seconds, like ?timeout=
JSON_TYPE = "application/json"
STATIC = resources.files("imgcls.service.http") / "static"
Handler = Callable[[web.Request, bytes, Call], Awaitable[web.StreamResponse]]


class HttpError(RequestError):
    """A RequestError with its own HTTP status (413 body too large, 415 wrong media type)."""

    def __init__(self, status: int, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.status = status


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    return web.Response(body=body, status=status, content_type=JSON_TYPE, headers=headers)


def error_response(error: RequestError) -> web.Response:
    status = getattr(error, "status", None) or STATUS.get(error.code, 500)
    headers = {}
    if error.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_ms / 1000)))
    return json_response({"error": error.message, "code": error.code.name}, status, headers)


def parse_json(body: bytes, what: str = "request body") -> Any:
    """JSON, or 400 naming where it broke."""
    if not body:
        raise invalid(f"the {what} is empty; expected JSON")
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise invalid(f"the {what} is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise invalid(f"the {what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise invalid(f"the {what} nests too deeply") from None


def seconds(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise invalid(f"{what} must be a number of seconds, got {short(text, 64)}") from None
    if not math.isfinite(value) or value <= 0:
        raise invalid(f"{what} must be a positive number of seconds, got {short(text, 64)}")
    return value


def set_timeout(call: Call, timeout_s: float) -> None:
    """Give the call a deadline `timeout_s` after its arrival (the earlier one wins)."""
    deadline = call.start + timeout_s
    call.deadline = deadline if call.deadline is None else min(call.deadline, deadline)


class HttpServer:
    """The HTTP port: routes of every API, started and stopped on the gRPC loop by `InferenceServer`."""

    def __init__(self, core: Core, config: Any, security: Any = None) -> None:
        """`security`: a service.security.Security (TLS and tokens), None = plaintext and no tokens."""
        from imgcls.service.http import kserve_rest, openapi, pages, plain, tfserving_rest
        from imgcls.service.security import Security, recorder

        self.core = core
        self.security = security or Security()
        self.max_body_bytes = int(config.max_message_bytes)
        middlewares = [self._unrouted]
        if self.security.auth is not None:
            self._refused = recorder(core)
            middlewares.insert(0, self._authenticate)
        self.app = web.Application(client_max_size=self.max_body_bytes, middlewares=middlewares)
        for module in (kserve_rest, tfserving_rest, plain, pages, openapi):
            module.add_routes(self.app.router, self)
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, *, shared: bool = False) -> int:
        """Bind and serve; returns the port bound. `shared` (`--workers`): SO_REUSEPORT, so the workers share
        the port; never otherwise, so a second server on a port in use fails instead of silently sharing it."""
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if shared:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            await self._runner.cleanup()
            from imgcls.errors import ImgclsError

            raise ImgclsError(f"cannot serve HTTP on {host}:{port} ({exc})") from None
        certificates = self.security.certificates
        site = web.SockSite(self._runner, sock, backlog=1024,
                            ssl_context=certificates.http_context() if certificates is not None else None)
        await site.start()
        return sock.getsockname()[1]

    async def stop(self, grace: float) -> None:
        """Close the port and let calls in flight finish within `grace` seconds (drain has already waited)."""
        if self._runner is not None:
            self._runner._shutdown_timeout = grace  # aiohttp reads it in cleanup(); set at construction only
            await self._runner.cleanup()
            self._runner = None

    # --- the one way an API call runs --------------------------------------------------------------------------

    async def run(self, request: web.Request, method: str, handler: Handler, *, admit: bool = True,
                  inference: bool = False) -> web.StreamResponse:
        """`handler` inside the request path's call accounting, with the body, deadline and status mapping."""
        core = self.core
        error: RequestError | None = None
        async with core.call(f"http.{method}", None, inference=inference, headers=request.headers,
                             peer=request.remote or "") as call:
            try:
                timeout = request.query.get("timeout") or request.headers.get(TIMEOUT_HEADER)
                if timeout is not None:
                    set_timeout(call, seconds(timeout, "timeout"))
                if admit:
                    core.check_accepting()
                body = await self._body(request) if request.method == "POST" else b""
                return await handler(request, body, call)
            except RequestError as exc:
                call.code, error = exc.code, exc
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("HTTP %s failed", method)
                call.code = grpc.StatusCode.INTERNAL
                error = RequestError(call.code, "internal error (see the server log)")
        return error_response(error)

    async def _body(self, request: web.Request) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise HttpError(413, grpc.StatusCode.INVALID_ARGUMENT,
                            f"request body over {self.max_body_bytes} bytes (--max-message-bytes)") from None

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """The gRPC port's token rule (security.Auth), and with mTLS the client certificate (optional at the
        handshake here, so that probes reach health); refusals are recorded under the method label `http`."""
        transport = request.transport
        certificate = bool(transport is not None and transport.get_extra_info("peercert"))
        refusal = self.security.auth.refusal(request.path, request.headers.get("Authorization"),
                                             client_certificate=certificate)
        if refusal is None:
            return await handler(request)
        self._refused("http", request.remote or "")
        return json_response({"error": refusal, "code": "UNAUTHENTICATED"}, 401, {"WWW-Authenticate": "Bearer"})

    @web.middleware
    async def _unrouted(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """Unknown paths and methods answer JSON that says where to look, like every other error here."""
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return json_response({"error": f"no endpoint {request.method} {short(request.path, 200)}; the API is "
                                           "described at /openapi.json and /docs", "code": "NOT_FOUND"}, 404)
        except web.HTTPMethodNotAllowed as exc:
            return json_response({"error": f"{request.method} not allowed on {short(request.path, 200)}; use "
                                           f"{', '.join(sorted(exc.allowed_methods))}", "code": "INVALID_ARGUMENT"},
                                 405, {"Allow": ",".join(sorted(exc.allowed_methods))})


def elapsed_ms(call: Call) -> float:
    return round((time.monotonic() - call.start) * 1000, 3)
