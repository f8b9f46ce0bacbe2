"""A small typed client for the imgcls gRPC service.

    from imgcls.client import Client

    with Client("localhost:50051") as client:
        prediction = client.predict(["a.jpg", "b.png"], model="flowers", top_k=3)
        for result in prediction.results:
            print(result.labels[0].name if result.ok else result.error)

Images may be file paths, encoded bytes, PIL images or NumPy uint8 arrays (sent as PNG). Other failures raise
`ServiceError` carrying the gRPC status.

Retries, and why: a server restart (rollout, crash, SIGTERM) takes a few seconds, during which calls fail in
ways that a later attempt fixes. So unary calls are retried, with exponential back-off and jitter (so that
many clients do not come back in step), for as long as the call's own `timeout` allows (it covers every
attempt; nothing is retried past it), on:

- UNAVAILABLE: no server listening, starting up, or draining;
- CANCELLED, unless this client cancelled it (`close()`): the server shut down with the call in flight;
- RESOURCE_EXHAUSTED from an overloaded server, waiting at least the `retry-after-ms` it sends in the
  trailing metadata (not a message over the size limit: resending it cannot help).

Everything else (INVALID_ARGUMENT, NOT_FOUND, DEADLINE_EXCEEDED, ...) is raised at once. The channel's own
reconnect back-off is shortened too (gRPC's default waits 1 s, then 1.6x longer each time, before it even
tries to reconnect), so a restarted server is found within ~0.1-1 s of listening again.
"""

from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgcls.errors import ImgclsError
from imgcls.v1 import inference_pb2 as pb
from imgcls.v1 import inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from typing import TypeAlias

    import numpy as np
    from PIL import Image

    ImageInput: TypeAlias = str | os.PathLike[str] | bytes | Image.Image | np.ndarray

T = TypeVar("T")


@dataclass(frozen=True)
class Label:
    index: int
    name: str
    score: float


@dataclass(frozen=True)
class ErrorInfo:
    code: str  # gRPC status name, e.g. "INVALID_ARGUMENT"
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class ImageResult:
    labels: list[Label]
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Prediction:
    model: str
    version: int
    results: list[ImageResult]  # one per image, in request order
    request_id: str = ""
    error: ErrorInfo | None = None  # predict_stream only: the whole request failed


class ServiceError(ImgclsError):
    """A call failed; `code` is the grpc.StatusCode. `retry_after` is the server's hint in seconds
    (trailing metadata `retry-after-ms`), None when it sent none."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


RETRY_AFTER_KEY = "retry-after-ms"
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# Channel options: reconnect quickly after a restart instead of gRPC's 1 s, x1.6, up to 120 s back-off.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]


@dataclass(frozen=True)
class Security:
    """How a client reaches a server with TLS and a token (docs/security.md): `tls_ca` trusts that CA (PEM
    file; TLS with the system's CAs when only `tls` is set), `tls_cert`/`tls_key` are this client's own
    certificate for mutual TLS, `token` goes as `authorization: Bearer <token>` on every call.
    `tls_server_name`: the name the server's certificate must carry when it differs from the target's host
    (an IP address, a port-forward)."""

    tls: bool = False
    tls_ca: str | os.PathLike[str] | None = None
    tls_cert: str | os.PathLike[str] | None = None
    tls_key: str | os.PathLike[str] | None = None
    token: str | None = None
    tls_server_name: str | None = None

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.tls_ca or self.tls_cert or self.tls_key)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials, None for a plaintext channel; ImgclsError for a file that can't be read or a
        token that would go in clear text. The token is not in them: see `header`."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ImgclsError("--tls-cert and --tls-key go together (the client's certificate for mutual TLS)")
        token = (self.token or "").strip()
        if not self.uses_tls:
            if token:
                raise ImgclsError("a token needs TLS (--tls-ca FILE, or --tls for the system's CAs): gRPC sends "
                                  "tokens over encrypted channels only")
            return None
        if token and (not token.isascii() or not token.isprintable() or " " in token):
            raise ImgclsError("the token must be printable ASCII without spaces")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "--tls-ca"), private_key=_read(self.tls_key, "--tls-key"),
            certificate_chain=_read(self.tls_cert, "--tls-cert"))

    @property
    def header(self) -> tuple[str, str] | None:
        """The token as call metadata. Added by a channel interceptor rather than gRPC's call credentials
        (`access_token_call_credentials`): those run a Python plugin on another thread for every call, which
        cost about 1.5 ms a call here (docs/benchmarks.md, bench_security.py); metadata costs nothing."""
        token = (self.token or "").strip()
        return ("authorization", f"Bearer {token}") if token else None

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.tls_server_name)] if self.tls_server_name else []

    def channel(self, target: str, options: list) -> grpc.Channel | None:
        """A sync channel with these credentials and the token on every call; None for plain defaults."""
        credentials = self.credentials()
        if credentials is None:
            return None
        channel = grpc.secure_channel(target, credentials, options=options + self.options())
        header = self.header
        return grpc.intercept_channel(channel, _TokenInterceptor(header)) if header else channel


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a sync channel."""

    def __init__(self, header: tuple[str, str]) -> None:
        self.header = header

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details, [*(details.metadata or ()), self.header])

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def _read(path: str | os.PathLike[str] | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImgclsError(f"{flag} {path}: cannot read ({exc.strerror or exc})") from None


def _retry_after(exc: grpc.RpcError) -> float | None:
    try:
        metadata = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:  # not every RpcError carries metadata
        return None
    for key, value in metadata:
        if key == RETRY_AFTER_KEY:
            try:
                ms = float(value.decode() if isinstance(value, bytes) else value)
            except ValueError:
                return None
            return max(0.0, ms) / 1000.0 if ms == ms and ms != float("inf") else None
    return None


def service_error(exc: grpc.RpcError) -> ServiceError:
    """The ServiceError for a failed call, with the server's retry hint."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    details = (exc.details() if hasattr(exc, "details") else "") or ""  # type: ignore[attr-defined]
    return ServiceError(code or grpc.StatusCode.UNKNOWN, details, _retry_after(exc))


def too_large(exc: ServiceError) -> bool:
    """RESOURCE_EXHAUSTED because a message is over a size limit (either side's): not load, not retryable."""
    return exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in exc.message


def retryable(exc: ServiceError, *, cancelled_by_us: bool = False) -> bool:
    """Whether a later attempt of the same call can succeed (see the module docstring)."""
    if exc.code == grpc.StatusCode.UNAVAILABLE:
        return True
    if exc.code == grpc.StatusCode.CANCELLED:
        return not cancelled_by_us
    return exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not too_large(exc)


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off with jitter: attempt n waits `first * 2**n`, capped at `cap`, times a random
    factor in [0.5, 1]; never less than the server's retry hint."""

    first: float = 0.1
    cap: float = 2.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int, hint: float | None = None) -> float:
        base = min(self.cap, self.first * (2.0 ** min(attempt, 60))) * self.rng.uniform(0.5, 1.0)
        return max(base, hint) if hint is not None else base


def _error(status: pb.Status) -> ErrorInfo | None:
    if status.code == 0:
        return None
    return ErrorInfo(_CODE_NAMES.get(status.code, str(status.code)), status.message)


def to_bytes(image: ImageInput) -> bytes:
    """What the server accepts: encoded image bytes. PIL images and NumPy uint8 arrays (H x W, H x W x 3 RGB,
    H x W x 4 RGBA, as `imgcls.Classifier` takes them) are encoded losslessly as PNG."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if type(image).__module__ == "numpy" and hasattr(image, "dtype"):
        from PIL import Image

        if image.dtype != "uint8" or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise TypeError(f"a NumPy image must be uint8 H x W, H x W x 3 or H x W x 4, got {image.dtype} "
                            f"{image.shape}")
        image = Image.fromarray(image)
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"expected a path, bytes, a PIL image or a NumPy array, got {type(image).__name__}")


def _prediction(response: pb.PredictResponse) -> Prediction:
    results = [
        ImageResult([Label(lb.index, lb.name, lb.score) for lb in r.labels], _error(r.status))
        for r in response.results
    ]
    error = _error(response.error) if response.HasField("error") else None
    return Prediction(response.model_name, response.model_version, results, response.request_id, error)


class Client:
    """Thread-safe; one channel per client. Use as a context manager or call `close()`."""

    # With no timeout at all, a call is still not retried forever.
    RETRIES_WITHOUT_TIMEOUT = 10

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        retries: int | None = None,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        channel: grpc.Channel | None = None,
        on_retry: Callable[[ServiceError, int, float], None] | None = None,
        tls: bool = False,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        token: str | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        """`timeout`: seconds per call, all attempts together (None: no deadline). `retries`: at most this many
        retries per call (None: as many as the timeout allows; 0: none). `backoff`/`max_backoff`: the first
        retry delay and its cap. `on_retry(error, attempt, delay)` is called before each retry's sleep, so a
        program can say what it is waiting for instead of looking hung (the CLI prints it).
        `tls`, `tls_ca`, `tls_cert`, `tls_key`, `token`, `tls_server_name`: see `Security`. A TLS handshake that
        fails (wrong CA, expired certificate) is UNAVAILABLE, retried within the timeout like a server away."""
        self.target = target
        self.on_retry = on_retry
        self.timeout = timeout
        self.retries = retries
        self.backoff = Backoff(backoff, max_backoff)
        self._closed = False
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes), *RECONNECT_OPTIONS]
        if channel is None:
            channel = Security(tls, tls_ca, tls_cert, tls_key, token, tls_server_name).channel(target, options)
        self.channel = channel or grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the channel; calls in flight end CANCELLED, and are not retried (the cancel was ours)."""
        self._closed = True
        self.channel.close()

    # Time left for one more attempt below which a retry is not worth starting.
    MIN_ATTEMPT_S = 0.05

    def _call(self, fn: Callable[..., T], request: object, timeout: float | None) -> T:
        """Call with retries (see the module docstring); `timeout` bounds all attempts together."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        limit = self.retries if self.retries is not None else (None if deadline else self.RETRIES_WITHOUT_TIMEOUT)
        attempt = 0
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return fn(request, timeout=left)
            except grpc.RpcError as exc:
                error = service_error(exc)
            if not retryable(error, cancelled_by_us=self._closed) or (limit is not None and attempt >= limit):
                raise error
            delay = self.backoff.delay(attempt, error.retry_after)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left < self.MIN_ATTEMPT_S or (error.retry_after or 0.0) > left:
                    raise error  # no time for another attempt (or the server asked us to stay away longer)
                delay = min(delay, left - self.MIN_ATTEMPT_S)
            if self.on_retry is not None:
                self.on_retry(error, attempt, delay)
            time.sleep(delay)
            attempt += 1

    def predict(
        self,
        images: Sequence[ImageInput],
        *,
        model: str = "",
        version: int = 0,
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> Prediction:
        """Classify images with one model (version 0 = latest). Undecodable images in a multi-image request
        come back as results with `error` set; a single bad image raises ServiceError(INVALID_ARGUMENT)."""
        request = pb.PredictRequest(model_name=model, model_version=version, images=[to_bytes(i) for i in images])
        if top_k is not None:
            request.top_k = top_k
        return _prediction(self._call(self.stub.Predict, request, timeout))

    def predict_stream(
        self,
        batches: Iterable[Sequence[ImageInput]],
        *,
        model: str = "",
        version: int = 0,
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[Prediction]:
        """One request per batch over a single stream; yields predictions as they complete, each with
        `request_id` = the batch's index as a string. Not retried (a stream is not replayable)."""

        def requests() -> Iterator[pb.PredictRequest]:
            for i, batch in enumerate(batches):
                request = pb.PredictRequest(model_name=model, model_version=version, request_id=str(i),
                                            images=[to_bytes(img) for img in batch])
                if top_k is not None:
                    request.top_k = top_k
                yield request

        timeout = self.timeout if timeout is None else timeout
        try:
            for response in self.stub.PredictStream(requests(), timeout=timeout):
                yield _prediction(response)
        except grpc.RpcError as exc:
            raise service_error(exc) from None

    def metadata(self, model: str = "", version: int = 0, timeout: float | None = None) -> pb.ModelMetadata:
        return self._call(self.stub.GetModelMetadata,
                          pb.GetModelMetadataRequest(model_name=model, model_version=version), timeout)

    def list_models(self, timeout: float | None = None) -> list[pb.ModelSummary]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """SERVING, NOT_SERVING, ... as the standard grpc.health.v1 service reports it (no retries)."""
        try:
            response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            raise service_error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Poll health until SERVING; raises ServiceError(UNAVAILABLE) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=max(0.1, min(2.0, deadline - time.monotonic()))) == "SERVING":
                    return
            except ServiceError:
                pass
            if time.monotonic() >= deadline:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"{self.target} not serving after {timeout:.0f}s")
            time.sleep(0.1)
