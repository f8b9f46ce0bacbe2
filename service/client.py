"""A small typed client for the imgcls gRPC service.

    from imgcls.service.client import Client

    with Client("localhost:50051") as client:
        prediction = client.predict(["a.jpg", "b.png"], model="flowers", top_k=3)
        for result in prediction.results:
            print(result.labels[0].name if result.ok else result.error)

Images may be file paths, encoded bytes or PIL images (sent as PNG). Calls are retried with exponential
backoff while the server answers UNAVAILABLE (starting up, draining, restarting) within the call's
timeout, which covers all attempts. Other failures raise `ServiceError` carrying the gRPC status.
"""

from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgcls.errors import ImgclsError
from imgcls.v1 import inference_pb2 as pb
from imgcls.v1 import inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from typing import TypeAlias

    from PIL import Image

    ImageInput: TypeAlias = str | os.PathLike[str] | bytes | Image.Image

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
    """A call failed; `code` is the grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _error(status: pb.Status) -> ErrorInfo | None:
    if status.code == 0:
        return None
    return ErrorInfo(_CODE_NAMES.get(status.code, str(status.code)), status.message)


def to_bytes(image: ImageInput) -> bytes:
    """What the server accepts: encoded image bytes (PIL images are encoded losslessly as PNG)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"expected a path, bytes or a PIL image, got {type(image).__name__}")


def _prediction(response: pb.PredictResponse) -> Prediction:
    results = [
        ImageResult([Label(lb.index, lb.name, lb.score) for lb in r.labels], _error(r.status))
        for r in response.results
    ]
    error = _error(response.error) if response.HasField("error") else None
    return Prediction(response.model_name, response.model_version, results, response.request_id, error)


class Client:
    """Thread-safe; one channel per client. Use as a context manager or call `close()`."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        retries: int = 4,
        backoff: float = 0.1,
        max_message_bytes: int = 64 * 1024 * 1024,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self.channel = channel or grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, fn: Callable[..., T], request: object, timeout: float | None) -> T:
        """Call with retries on UNAVAILABLE; `timeout` bounds all attempts together."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = self.backoff
        for attempt in range(self.retries + 1):
            left = None if deadline is None else deadline - time.monotonic()
            try:
                return fn(request, timeout=left)
            except grpc.RpcError as exc:
                code = exc.code()
                out_of_time = deadline is not None and deadline - time.monotonic() <= delay
                if code != grpc.StatusCode.UNAVAILABLE or attempt == self.retries or out_of_time:
                    raise ServiceError(code, exc.details() or "") from None
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay *= 2
        raise AssertionError("unreachable")

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
            raise ServiceError(exc.code(), exc.details() or "") from None

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
            raise ServiceError(exc.code(), exc.details() or "") from None
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
