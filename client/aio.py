"""`AsyncClient`: the imgcls client on `grpc.aio`, for asyncio programs (web back-ends, crawlers).

    from imgcls.client import AsyncClient

    async with AsyncClient("localhost:50051") as client:
        prediction = await client.predict(["a.jpg", b"...png bytes..."], top_k=3)
        print(prediction.results[0].labels[0].name)

The same calls, results and retry policy as the sync `Client` (see imgcls/client/client.py: UNAVAILABLE,
CANCELLED by a server shutting down and RESOURCE_EXHAUSTED are retried with jittered exponential back-off,
within the call's `timeout`, honouring the server's `retry-after-ms`); only the waiting is `await`ed, so one
event loop can keep many calls in flight without a thread each. Reading image files is done in the default
executor so that a slow disk does not stall the loop.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgcls.client.client import (
    RECONNECT_OPTIONS,
    Backoff,
    Prediction,
    Security,
    ServiceError,
    _prediction,
    retryable,
    service_error,
    to_bytes,
)
from imgcls.v1 import inference_pb2 as pb
from imgcls.v1 import inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from imgcls.client.client import ImageInput

T = TypeVar("T")


class _TokenInterceptor:
    """Adds `authorization: Bearer <token>` to every call of a grpc.aio channel (see Security.header)."""

    def __init__(self, header: tuple[str, str]) -> None:
        self.header = header

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self.header)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)

    async def _call(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _UnaryUnary(_TokenInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await self._call(continuation, client_call_details, request)


class _UnaryStream(_TokenInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self._call(continuation, client_call_details, request)


class _StreamUnary(_TokenInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await self._call(continuation, client_call_details, request_iterator)


class _StreamStream(_TokenInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await self._call(continuation, client_call_details, request_iterator)


_TOKEN_INTERCEPTORS = (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)


class AsyncClient:
    """One `grpc.aio` channel; use as an async context manager or `await close()`. Create it inside the event
    loop that uses it (a grpc.aio channel belongs to one loop)."""

    RETRIES_WITHOUT_TIMEOUT = 10
    MIN_ATTEMPT_S = 0.05

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        retries: int | None = None,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        channel: grpc.aio.Channel | None = None,
        on_retry: Callable[[ServiceError, int, float], None] | None = None,
        tls: bool = False,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        token: str | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        """The same options as the sync `Client` (timeout: all attempts of one call together; TLS and the
        token: `imgcls.client.client.Security`)."""
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = Backoff(backoff, max_backoff)
        self.on_retry = on_retry
        self._closed = False
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes), *RECONNECT_OPTIONS]
        security = Security(tls, tls_ca, tls_cert, tls_key, token, tls_server_name)
        credentials = security.credentials()
        if channel is None and credentials is not None:
            header = security.header
            interceptors = [cls(header) for cls in _TOKEN_INTERCEPTORS] if header else None
            channel = grpc.aio.secure_channel(target, credentials, options=options + security.options(),
                                              interceptors=interceptors)
        self.channel = channel or grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Close the channel; calls in flight end CANCELLED and are not retried (the cancel was ours)."""
        self._closed = True
        await self.channel.close()

    async def _call(self, fn: Callable[..., Any], request: object, timeout: float | None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        limit = self.retries if self.retries is not None else (None if deadline else self.RETRIES_WITHOUT_TIMEOUT)
        attempt = 0
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await fn(request, timeout=left)
            except grpc.aio.AioRpcError as exc:
                error = service_error(exc)
            if not retryable(error, cancelled_by_us=self._closed) or (limit is not None and attempt >= limit):
                raise error
            delay = self.backoff.delay(attempt, error.retry_after)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left < self.MIN_ATTEMPT_S or (error.retry_after or 0.0) > left:
                    raise error
                delay = min(delay, left - self.MIN_ATTEMPT_S)
            if self.on_retry is not None:
                self.on_retry(error, attempt, delay)
            await asyncio.sleep(delay)
            attempt += 1

    async def predict(
        self,
        images: Sequence[ImageInput],
        *,
        model: str = "",
        version: int = 0,
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> Prediction:
        """Classify images with one model (version 0 = latest); see `Client.predict`."""
        data = await asyncio.get_running_loop().run_in_executor(None, lambda: [to_bytes(i) for i in images])
        request = pb.PredictRequest(model_name=model, model_version=version, images=data)
        if top_k is not None:
            request.top_k = top_k
        return _prediction(await self._call(self.stub.Predict, request, timeout))

    async def metadata(self, model: str = "", version: int = 0, timeout: float | None = None) -> pb.ModelMetadata:
        return await self._call(self.stub.GetModelMetadata,
                                pb.GetModelMetadataRequest(model_name=model, model_version=version), timeout)

    async def list_models(self, timeout: float | None = None) -> list[pb.ModelSummary]:
        return list((await self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout)).models)

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """SERVING, NOT_SERVING, ... as grpc.health.v1 reports it (no retries)."""
        try:
            response = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise service_error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Poll health until SERVING; ServiceError(UNAVAILABLE) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.health(timeout=max(0.1, min(2.0, deadline - time.monotonic()))) == "SERVING":
                    return
            except ServiceError:
                pass
            if time.monotonic() >= deadline:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"{self.target} not serving after {timeout:.0f}s")
            await asyncio.sleep(0.1)
