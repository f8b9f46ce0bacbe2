"""The one request path: every protocol's inference call goes from arrival to answer through `Core`.

A protocol front-end (`native.py` for imgcls.v1, `kserve.py`, `tfserving.py`) only translates: it turns its
message into images or a pixel tensor, calls `Core.infer`, and turns the `Result` (or the `RequestError`)
back into its message. Everything that decides whether and how a request is served lives here, once:

- **call accounting** (`Core.call`): in-flight gauge, drain, the version pin that keeps a model hot reload
  replaced loaded until the call ends, and one `imgcls_requests_total` row per call with its final code,
  whatever happened (refusals included), timed from arrival;
- **admission** (`Core.infer`): the server draining or still loading (UNAVAILABLE), model and version
  resolution (NOT_FOUND), request limits (INVALID_ARGUMENT), the per-model limit on images admitted
  (RESOURCE_EXHAUSTED with a `retry-after-ms` hint), and a deadline the queue cannot meet (refused at once,
  before it costs compute);
- **work**: decode on the decode pool (or finite pixel tensors), the dynamic batcher, the wait for the answer
  with the call's deadline and cancellation (a client that goes away frees its queue slots);
- **answers**: per-image results, top-k, `imgcls_images_total` per outcome, the version's statistics.

Concurrency: calls are coroutines on the gRPC asyncio loop (an idle stream or a waiting call costs no
thread); decoding runs on a thread pool and inference on the batcher's thread, both blocking C code that
releases the GIL. The batcher reports completion from its thread with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np

from imgcls.errors import DecodeAborted, ImageDecodeError
from imgcls.preprocessing import preprocess_bytes
from imgcls.service import lifecycle, observability
from imgcls.service.batcher import Cancelled, DeadlineExceeded, Job, QueueFull, ShuttingDown
from imgcls.service.metrics import Metrics
from imgcls.service.models import LoadedModel
from imgcls.service.statistics import ModelStats

log = logging.getLogger(__name__)

NO_DEADLINE = 1e8  # grpc reports a huge time_remaining for calls without a deadline
MAX_NAME_CHARS = 256  # model names echoed in errors are cut here (clients cap metadata at 8 KB)
MAX_MESSAGE_CHARS = 1024  # error messages are cut here
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata on RESOURCE_EXHAUSTED: when a retry may be admitted


def short(text: object, limit: int = MAX_NAME_CHARS) -> str:
    """`text` as repr, cut to `limit` characters: what a client sent, safe to echo in an error."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(str(text))} chars)"


class RequestError(Exception):
    """The one error type of the request path: ends a call (or one message of a stream) with a status."""

    def __init__(self, code: grpc.StatusCode, message: str, *, retry_after_ms: int | None = None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "..."
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return () if self.retry_after_ms is None else ((RETRY_AFTER_KEY, str(self.retry_after_ms)),)


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def error_code(error: object) -> grpc.StatusCode:
    """The status for one image's failure (decode error, deadline, cancel, shutdown, other)."""
    if isinstance(error, RequestError):
        return error.code
    if isinstance(error, ImageDecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, Cancelled):
        return grpc.StatusCode.CANCELLED
    if isinstance(error, ShuttingDown):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


# Failures of one image that fail a whole request, even where the protocol has per-image status.
REQUEST_FAILURES = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.INTERNAL)


class Limits(Protocol):
    """The settings the request path reads (ServeConfig has them all)."""

    max_images_per_request: int
    max_image_bytes: int
    max_image_pixels: int
    default_top_k: int
    max_concurrent_calls: int


class Models(Protocol):
    """What the request path needs from the model lifecycle (`models.ModelManager`)."""

    models: dict[str, dict[int, LoadedModel]]
    failed: dict[str, dict[int, str]]
    epochs: lifecycle.CallEpochs


@dataclass(frozen=True)
class Malformed:
    """What a request that does not parse as its message becomes, so the request path can answer it
    INVALID_ARGUMENT and count it (a deserializer that raises makes gRPC answer UNKNOWN and log a traceback)."""

    message_type: str
    error: str


def parser(request_cls: type) -> Callable[[bytes], Any]:
    """The request deserializer every front-end registers: the message, or `Malformed`."""
    name = request_cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return request_cls.FromString(data)
        except Exception as exc:  # google.protobuf.message.DecodeError and friends
            return Malformed(name, type(exc).__name__)

    return parse


def check_parsed(request: Any) -> None:
    if isinstance(request, Malformed):
        raise invalid(f"the request is not a valid {request.message_type} message ({request.error})")


@dataclass
class Image:
    """One image's outcome: probabilities [C] or the error that stopped it."""

    probabilities: np.ndarray | None
    error: BaseException | None = None

    @property
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK if self.error is None else error_code(self.error)

    @property
    def message(self) -> str:
        return "" if self.error is None else str(self.error)


@dataclass
class Result:
    """A finished inference: the version that answered and each image's outcome, in request order."""

    model: LoadedModel
    images: list[Image]

    def probabilities(self) -> np.ndarray:
        """[N, C] float32; for protocols without per-image status the first failed image fails the request."""
        for i, image in enumerate(self.images):
            if image.error is not None:
                prefix = f"image {i}: " if len(self.images) > 1 else ""
                raise RequestError(image.code, prefix + image.message)
        return np.stack([image.probabilities for image in self.images]).astype(np.float32, copy=False)

    def top_k(self, k: int) -> list[list[tuple[int, str, float]] | None]:
        """Per image, the `k` best (class index, name, score), best first (None for a failed image)."""
        classes = self.model.entry.manifest.class_names
        out: list[list[tuple[int, str, float]] | None] = []
        for image in self.images:
            if image.probabilities is None:
                out.append(None)
                continue
            order = np.argsort(-image.probabilities, kind="stable")[:min(k, len(classes))]
            out.append([(int(i), classes[i], float(image.probabilities[i])) for i in order])
        return out


@dataclass
class Call:
    """One call in progress: what its front-end found out, for the request metrics."""

    method: str
    start: float
    deadline: float | None
    model: LoadedModel | None = None
    job: Job | None = None
    inference: bool = False  # counts in the version's statistics (ModelStatistics)
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""  # why it failed, for the trace
    peer: str = ""  # who called, for the access log
    carrier: Mapping[str, str] | None = None  # the caller's headers/metadata: its W3C trace context


class Core:
    """The request path shared by every protocol. State it reads (`models`, `ready`, `accepting`) belongs to
    the server's lifecycle; the core never changes it."""

    def __init__(self, config: Limits, models: Models, metrics: Metrics, decode_workers: int,
                 decode: Callable[..., np.ndarray] | None = None, nice: int = 0) -> None:
        self.config = config
        self.lifecycle = models
        self.metrics = metrics
        self.ready = threading.Event()
        self.accepting = True
        self.loop: asyncio.AbstractEventLoop | None = None
        self._decode_threads = decode_workers
        self._decode_pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="decode",
                                               initializer=(lambda: os.nice(nice)) if nice else None)
        self._limits: object | None = None
        self._decode_fn = decode or self._decode_in_thread
        self._inflight = 0
        self._inflight_zero = threading.Condition()
        # Other serving processes' statistics for a version, and whether every process is ready (`--workers`,
        # service/cluster.py); None when this process is the whole server.
        self.peer_stats: Callable[[str, int], list[ModelStats]] | None = None
        self.peers_ready: Callable[[], bool] | None = None
        # What record() leaves behind per call (service/observability.py): set by the server from its flags.
        self.tracing: observability.Tracing | None = None
        self.access_log: observability.AccessLog | None = None

    @property
    def models(self) -> dict[str, dict[int, LoadedModel]]:
        return self.lifecycle.models

    @property
    def failed(self) -> dict[str, dict[int, str]]:
        return self.lifecycle.failed

    def serving(self) -> bool:
        """Readiness of the whole server, what health-like endpoints answer (gRPC health, KServe ServerReady,
        HTTP /v2/health/ready): models loaded, not draining, and with --workers every worker ready too."""
        return self.ready.is_set() and self.accepting and (self.peers_ready is None or self.peers_ready())

    def statistics(self, model: LoadedModel) -> ModelStats:
        """A version's ModelStatistics totals: this process's, plus every other serving process's."""
        total = model.stats.snapshot()
        if self.peer_stats is not None:
            name, version = model.entry.name, model.entry.version
            for other in self.peer_stats(name, version):
                total.add(other)
        return total

    # --- calls --------------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def call(self, method: str, context: grpc.aio.ServicerContext | None, *, pin: bool = True,
                   inference: bool = False, track: bool = True, record: bool = True,
                   headers: Mapping[str, str] | None = None, peer: str = ""):
        """A call from arrival to answer: counted in flight (`track`: drain waits for it), its model versions
        pinned (`pin`), and recorded once with its final code (`record`). A stream is tracked but neither
        pinned nor recorded; each of its messages is pinned and recorded but not tracked (streams.py).
        `headers`/`peer`: what a front-end without a gRPC context (HTTP) knows of the caller."""
        start = time.monotonic()
        call = Call(method, start, self.deadline(context, start), inference=inference, peer=peer, carrier=headers)
        if context is not None and record and (self.tracing is not None or self.access_log is not None):
            call.peer = context.peer() or ""
            if self.tracing is not None:
                call.carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        gauge = self.metrics.inflight.labels(method)
        if track:
            with self._inflight_zero:
                self._inflight += 1
            gauge.inc()
        epoch = self.lifecycle.epochs.enter() if pin else None
        try:
            yield call
        except RequestError as exc:
            call.code, call.message = exc.code, exc.message
            raise
        except asyncio.CancelledError:
            call.code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            call.code = grpc.StatusCode.INTERNAL
            raise
        finally:
            if epoch is not None:
                self.lifecycle.epochs.leave(epoch)
            if record:
                self.record(call)
            if track:
                gauge.dec()
                with self._inflight_zero:
                    self._inflight -= 1
                    self._inflight_zero.notify_all()

    def record(self, call: Call) -> None:
        name, version = call.model.labels if call.model else ("", "")
        end = time.monotonic()
        seconds = end - call.start
        self.metrics.requests.labels(call.method, name, version, call.code.name).inc()
        self.metrics.request_latency.labels(call.method, name).observe(seconds)
        if call.model is not None and call.inference:
            call.model.stats.request(call.code == grpc.StatusCode.OK, seconds, call.job)
        if self.tracing is None and self.access_log is None:
            return
        images = call.job.n if call.job is not None else 0
        batches = list(call.job.batches) if call.job is not None else []
        trace_id = ""
        if self.tracing is not None:
            attributes = {"rpc.method": call.method, "imgcls.code": call.code.name, "imgcls.images": images}
            if call.model is not None:
                attributes.update({"imgcls.model": name, "imgcls.version": int(version),
                                   "imgcls.runtime": call.model.runtime})
            if batches:
                attributes["imgcls.batch_size"] = max(batches)
            try:
                trace_id = self.tracing.record(call.method, call.start, end, call.carrier, attributes,
                                               observability.stages(call.job, end),
                                               None if call.code == grpc.StatusCode.OK else
                                               f"{call.code.name}: {call.message}"[:300])
            except Exception as exc:  # a broken exporter must not fail calls
                log.warning("tracing failed: %s", exc)
        if self.access_log is not None:
            self.access_log.write(lambda: {
                "method": call.method, "model": name, "version": version, "images": images, "code": call.code.name,
                "ms": round(seconds * 1000, 2), "batch": max(batches) if batches else None, "peer": call.peer,
                "trace_id": trace_id}, code=call.code.name)

    @contextmanager
    def pin(self) -> Iterator[None]:
        """Hold the versions resolved inside this block loaded (one stream message; see `lifecycle`)."""
        epoch = self.lifecycle.epochs.enter()
        try:
            yield
        finally:
            self.lifecycle.epochs.leave(epoch)

    def inflight(self) -> int:
        return self._inflight

    def wait_idle(self, timeout: float) -> int:
        """Block (not on the loop) until no call is in flight or `timeout`; returns the calls left."""
        with self._inflight_zero:
            self._inflight_zero.wait_for(lambda: self._inflight == 0, timeout=timeout)
            return self._inflight

    def unary(self, method: str, handler: Callable[[Any, Any, Call], Awaitable[Any]], *, admit: bool = True,
              inference: bool = False) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        """Wrap a front-end's translation as a gRPC unary behaviour: call accounting, admission checks
        (`admit`: refuse while draining or loading, and past --max-concurrent-calls) and the status mapping."""

        async def behaviour(request, context: grpc.aio.ServicerContext):
            error: RequestError | None = None
            async with self.call(method, context, inference=inference) as call:
                try:
                    check_parsed(request)
                    if admit:
                        self.check_accepting()
                    return await handler(request, context, call)
                except RequestError as exc:
                    call.code, error = exc.code, exc
                except Exception:
                    log.exception("%s failed", method)
                    call.code = grpc.StatusCode.INTERNAL
                    error = RequestError(call.code, "internal error (see the server log)")
            await context.abort(error.code, error.message, trailing_metadata=error.trailing_metadata())

        return behaviour

    def unary_handler(self, method: str, request_cls: type, response_cls: type,
                      handler: Callable[[Any, Any, Call], Awaitable[Any]], *, admit: bool = True,
                      inference: bool = False) -> grpc.RpcMethodHandler:
        """`unary` as a registered gRPC method (lenient parser, response serializer)."""
        return grpc.unary_unary_rpc_method_handler(
            self.unary(method, handler, admit=admit, inference=inference),
            request_deserializer=parser(request_cls), response_serializer=response_cls.SerializeToString)

    # --- admission ----------------------------------------------------------------------------------------------

    @staticmethod
    def deadline(context: grpc.aio.ServicerContext | None, start: float) -> float | None:
        """The call's deadline on the monotonic clock, None when the client set none."""
        remaining = context.time_remaining() if context is not None else None
        return start + remaining if remaining is not None and remaining < NO_DEADLINE else None

    def check_accepting(self) -> None:
        if not self.accepting:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is draining")
        if not self.ready.is_set():
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "models are still loading (or none is published yet)")
        if self._inflight > self.config.max_concurrent_calls:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self._inflight - 1} calls in progress; at most {self.config.max_concurrent_calls}",
                               retry_after_ms=100)

    def resolve(self, name: str, version: int) -> LoadedModel:
        """The model version a request asked for (0 = latest); reads the version table once."""
        models = self.models  # one snapshot: hot reload replaces the table, never changes it in place
        if not name:
            if len(models) != 1:
                raise invalid(f"model_name is required; serving: {', '.join(sorted(models))}")
            name = next(iter(models))
        versions = models.get(name)
        failed = self.failed.get(name, {})
        if versions is None:
            why = f" (failed to load: {_failures(failed)})" if failed else ""
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"no model {short(name)}{why}; serving: {', '.join(sorted(models))}")
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            why = f" (it failed to load: {failed[version]})" if version in failed else ""
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model {short(name)} has no version {version}{why}; serving: {sorted(versions)}")
        return versions[version]

    def top_k(self, requested: int | None) -> int:
        top_k = self.config.default_top_k if requested is None else requested
        if top_k < 1:
            raise invalid(f"top_k must be >= 1, got {top_k}")
        return top_k

    def check_count(self, n: int) -> None:
        if n < 1:
            raise invalid("no images in the request")
        if n > self.config.max_images_per_request:
            raise invalid(f"{n} images; at most {self.config.max_images_per_request} per request")

    def _admit(self, model: LoadedModel, n: int, deadline: float | None) -> Job:
        """Reserve queue slots for `n` images, or refuse at once: a full queue, or a deadline that the images
        already waiting would outlast."""
        batcher = model.batcher
        if deadline is not None:
            left = deadline - time.monotonic()
            wait = batcher.expected_done(n)
            if left <= 0 or wait > left:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"deadline exceeded: {max(0.0, left) * 1000:.0f} ms left, the queue ahead "
                                   f"needs about {wait * 1000:.0f} ms")
        try:
            return batcher.admit(n, deadline)
        except QueueFull as exc:
            retry = max(10, round(batcher.expected_wait() * 1000))
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"model {short(model.entry.name)}: {exc}",
                               retry_after_ms=retry) from None
        except ShuttingDown as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None

    # --- work ---------------------------------------------------------------------------------------------------

    async def infer(self, call: Call, model: LoadedModel, *, images: list[bytes] | None = None,
                    pixels: np.ndarray | None = None) -> Result:
        """Admit, decode (images) or check (pixels), batch, run, and wait for every image's outcome."""
        call.model = model
        if images is not None:
            self.check_count(len(images))
            for i, data in enumerate(images):
                if len(data) > self.config.max_image_bytes:  # before any queue slot or decode work
                    raise invalid(f"image {i}: {len(data)} bytes; at most {self.config.max_image_bytes}")
        else:
            assert pixels is not None
            self.check_pixels(model, pixels)
        job = call.job = self._admit(model, len(images) if images is not None else len(pixels), call.deadline)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        job.on_done = lambda _job: loop.call_soon_threadsafe(_resolve_future, done)
        if job.done.is_set():  # every image failed during admission (cannot happen today, but cheap)
            _resolve_future(done)
        if images is not None:
            for i, data in enumerate(images):
                self._decode_pool.submit(self._decode, model, job, i, data)
        else:
            for i, x in enumerate(pixels):
                model.batcher.put(job, i, x)
        try:
            timeout = None if call.deadline is None else max(0.0, call.deadline - time.monotonic())
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            model.batcher.cancel(job)
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        except asyncio.CancelledError:  # the client went away: free its slots, drop its queued images
            model.batcher.cancel(job)
            raise
        result = Result(model, [_image(v) for v in job.results])
        name, version = model.labels
        for image in result.images:
            self.metrics.images.labels(name, version, image.code.name).inc()
        for image in result.images:
            if image.code in REQUEST_FAILURES:  # the request as a whole failed
                raise RequestError(image.code, image.message)
        return result

    def check_pixels(self, model: LoadedModel, batch: np.ndarray) -> None:
        """A preprocessed float32 [N, H, W, 3] batch must match the model and hold finite values."""
        h, w = model.spec.input_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (h, w, 3):
            raise invalid(f"preprocessed input has shape {list(batch.shape)}; model {short(model.entry.name)} "
                          f"expects [N, {h}, {w}, 3]")
        self.check_count(len(batch))
        if not np.isfinite(batch).all():
            raise invalid("preprocessed input holds NaN or infinite values")
        bound = _input_bound(model.spec)
        if np.abs(batch).max() > bound:
            raise invalid(f"preprocessed input holds values beyond +-{bound:g}, far outside what the model's "
                          f"preprocessing produces ({model.spec.mode} mode); preprocess as the manifest says")

    def check_pixel_shape(self, model: LoadedModel, shape: list[int]) -> None:
        """Before allocating a tensor a client describes: its shape must be [N, H, W, 3] for this model with
        1 <= N <= --max-images-per-request (dims are Python ints: no overflow)."""
        h, w = model.spec.input_size
        if len(shape) != 4 or list(shape[1:]) != [h, w, 3]:
            raise invalid(f"preprocessed input has shape {_shape(shape)}; model {short(model.entry.name)} "
                          f"expects [N, {h}, {w}, 3]")
        self.check_count(shape[0])

    def _decode(self, model: LoadedModel, job: Job, index: int, data: bytes) -> None:
        """On a decode thread: decode one image into its queue slot, unless its request is already over."""
        if job.cancelled:
            return
        if job.expired():
            self.metrics.expired_images.labels(model.entry.name).inc()
            model.batcher.fail(job, index, DeadlineExceeded("deadline exceeded before decoding"))
            return
        start = time.monotonic()
        try:
            x = self._decode_fn(data, model.spec, deadline=job.deadline, cancelled=lambda: job.cancelled)
        except ImageDecodeError as exc:
            model.batcher.fail(job, index, exc)
            return
        except DecodeAborted as exc:
            model.batcher.fail(job, index, self._aborted(model, exc))
            return
        except Exception as exc:  # Pillow has more ways to fail on hostile input than it documents
            log.warning("preprocessing raised %s: %s", type(exc).__name__, exc)
            model.batcher.fail(job, index, ImageDecodeError(f"could not decode the image ({type(exc).__name__})"))
            return
        seconds = time.monotonic() - start
        self.metrics.preprocess_latency.labels(model.entry.name).observe(seconds)
        job.add_input(seconds)
        # With a second decode thread this one may run a lone image itself (Batcher.put): the next request's
        # decode never waits for it.
        model.batcher.put(job, index, x, waited=start - job.admitted_at, may_run=self._decode_threads > 1)

    def _aborted(self, model: LoadedModel, exc: DecodeAborted) -> Exception:
        """What a decode stopped by the pool means for its image (see imgcls.decoding.DecodePool)."""
        if exc.reason in ("cpu", "timeout", "killed"):  # the image's own fault: past a hard bound, or crashed
            return ImageDecodeError(f"the image could not be decoded within the server's limits ({exc})")
        if exc.reason == "cancelled":
            return Cancelled("request cancelled")
        if exc.reason == "closed":
            return ShuttingDown("server shutting down")
        self.metrics.expired_images.labels(model.entry.name).inc()  # deadline, or no decode memory until it
        return DeadlineExceeded(f"deadline exceeded while decoding ({exc})")

    def use_thread_decode(self, limits: object) -> None:
        """Decode in the decode threads themselves (allowlist and cost check, no process isolation)."""
        self._limits = limits
        self._decode_fn = self._decode_in_thread

    def _decode_in_thread(self, data: bytes, spec, *, deadline: float | None = None,
                          cancelled: Callable[[], bool] = lambda: False) -> np.ndarray:
        return preprocess_bytes(data, spec, limits=self._limits)

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)


def _image(value: object) -> Image:
    if not isinstance(value, np.ndarray):
        return Image(None, value if isinstance(value, BaseException) else RuntimeError(str(value)))
    if not np.isfinite(value).all():  # never an answer: a broken artifact, not the client's fault
        log.error("the model returned non-finite scores for an image")
        return Image(None, RuntimeError("the model returned non-finite scores"))
    return Image(value)


def _input_bound(spec) -> float:
    """A generous bound on preprocessed values: twice the largest magnitude `spec` gives a uint8 pixel,
    plus 1. Inputs beyond it are not images and can drive a model's softmax to NaN."""
    ends = [abs((v * spec.scale - m) / s) for v in (0.0, 255.0) for m, s in zip(spec.mean, spec.std, strict=True)]
    return 2 * max(ends) + 1


def _resolve_future(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _failures(failed: dict[int, str]) -> str:
    return "; ".join(f"v{v}: {error}" for v, error in sorted(failed.items()))


def _shape(shape: list[int]) -> str:
    text = str(list(shape[:8]))
    return text if len(shape) <= 8 else text[:-1] + f", ... ({len(shape)} dims)]"


def checked_count(shape: list[int], what: str) -> int:
    """The element count of a client-described shape, refusing negative dims (Python ints: no overflow)."""
    if any(d < 0 for d in shape):
        raise invalid(f"{what} has shape {_shape(shape)}; every dimension must be known")
    return math.prod(shape)
