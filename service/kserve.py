"""KServe v2 / Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), on the imgcls port.

So that tritonclient, KServe clients, Triton's perf_analyzer and anything else that speaks the protocol can
use imgcls without its own API. Requests go through the same model resolution, queue limits, dynamic
batcher, deadlines, cancellation, drain and metrics as `imgcls.v1.Inference` (method labels `ModelInfer`,
`ModelStreamInfer`). The protocol has no per-image status, so one failed image fails the request.
Tensors: `kserve_tensors.py`; messages: `protocols.py` (private descriptor pool).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata

import grpc
import numpy as np

from imgcls.service import protocols
from imgcls.service.batcher import Job
from imgcls.service.kserve_tensors import (
    IMAGES,
    PIXELS,
    PROBABILITIES,
    Output,
    encode_outputs,
    parse_inputs,
    parse_outputs,
)
from imgcls.service.server import InferenceServer, LoadedModel, RequestError, error_code

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
SERVICE_NAMES = (SERVICE,)
# Triton's extension names; not "model_repository", whose load/unload methods imgcls does not have
EXTENSIONS = ("classification", "statistics")
PLATFORMS = {"onnx": "onnxruntime_onnx", "savedmodel": "tensorflow_savedmodel"}  # Triton's names; tflite*: below


def _version(text: str) -> int:
    """KServe versions are strings; "" means the latest served."""
    if not text:
        return 0
    if not text.isdigit() or int(text) < 1:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"model version must be a positive integer, got {text!r}")
    return int(text)


@dataclass
class _Call:
    """One admitted ModelInfer request, until its job is answered."""

    request: object
    start: float
    model: LoadedModel
    outputs: list[Output]
    job: Job


class Service:
    """The handlers; all state lives in the InferenceServer."""

    def __init__(self, server: InferenceServer) -> None:
        self.s = server
        self.response_cls = protocols.message("inference.ModelInferResponse")

    # --- health and metadata --------------------------------------------------------------------------------

    def ServerLive(self, request, context):
        return protocols.message("inference.ServerLiveResponse")(live=True)

    def ServerReady(self, request, context):
        return protocols.message("inference.ServerReadyResponse")(ready=self._ready())

    def ModelReady(self, request, context):
        ready = False
        if self._ready():
            try:
                self.s.resolve(request.name, _version(request.version))
                ready = True
            except RequestError:
                pass
        return protocols.message("inference.ModelReadyResponse")(ready=ready)

    def ServerMetadata(self, request, context):
        try:
            ours = metadata.version("imgcls")
        except metadata.PackageNotFoundError:
            ours = "unknown"
        return protocols.message("inference.ServerMetadataResponse")(
            name="imgcls", version=ours, extensions=list(EXTENSIONS))

    def ModelMetadata(self, request, context):
        with self.s.track("ModelMetadata"):
            try:
                self.s.check_accepting()
                model = self._resolve(request.name, request.version)
            except RequestError as exc:
                context.abort(exc.code, exc.message)
            manifest = model.entry.manifest
            h, w = manifest.preprocessing.input_size
            response = protocols.message("inference.ModelMetadataResponse")(
                name=model.entry.name, versions=[str(v) for v in sorted(self.s.models.get(model.entry.name, {}))],
                platform=PLATFORMS.get(model.runtime, "litert_tflite"))
            response.inputs.add(name=IMAGES, datatype="BYTES", shape=[-1, 1])
            response.inputs.add(name=PIXELS, datatype="FP32", shape=[-1, h, w, 3])
            response.outputs.add(name=PROBABILITIES, datatype="FP32", shape=[-1, manifest.num_classes])
            return response

    def ModelConfig(self, request, context):
        """Triton's configuration, for tools that need it (perf_analyzer): batch dimension first, at most
        --max-images-per-request; both inputs optional, since a request sends one of them."""
        with self.s.track("ModelConfig"):
            try:
                self.s.check_accepting()
                model = self._resolve(request.name, request.version)
            except RequestError as exc:
                context.abort(exc.code, exc.message)
            manifest = model.entry.manifest
            h, w = manifest.preprocessing.input_size
            config_cls = protocols.message("inference.ModelConfig")
            input_cls = protocols.message("inference.ModelInput")
            config = config_cls(name=model.entry.name, platform=PLATFORMS.get(model.runtime, "litert_tflite"),
                                max_batch_size=self.s.config.max_images_per_request)
            config.input.add(name=IMAGES, data_type="TYPE_STRING", dims=[1], optional=True)
            config.input.add(name=PIXELS, data_type="TYPE_FP32", format=input_cls.FORMAT_NHWC, dims=[h, w, 3],
                             optional=True)
            config.output.add(name=PROBABILITIES, data_type="TYPE_FP32", dims=[manifest.num_classes])
            config.dynamic_batching.max_queue_delay_microseconds = round(self.s.config.max_queue_delay_ms * 1000)
            return protocols.message("inference.ModelConfigResponse")(config=config)

    def RepositoryIndex(self, request, context):
        """Served versions are READY; versions that failed to load are UNAVAILABLE with the reason."""
        response = protocols.message("inference.RepositoryIndexResponse")()
        models = {name: dict(versions) for name, versions in list(self.s.models.items())}
        failed = {name: dict(versions) for name, versions in list(self.s.failed.items())}
        for name in sorted(set(models) | set(failed)):
            for version in sorted(set(models.get(name, {})) | set(failed.get(name, {}))):
                if version in models.get(name, {}):
                    response.models.add(name=name, version=str(version), state="READY")
                elif not request.ready:
                    response.models.add(name=name, version=str(version), state="UNAVAILABLE",
                                        reason=failed[name][version])
        return response

    def ModelStatistics(self, request, context):
        """Triton's statistics extension: cumulative totals per served version since it loaded (a version
        that hot reload replaced takes its totals with it). Empty name = every model, empty version = all."""
        with self.s.track("ModelStatistics"):
            try:
                self.s.check_accepting()
                if request.name:
                    if request.version:
                        models = [self._resolve(request.name, request.version)]
                    else:
                        self._resolve(request.name, "")  # NOT_FOUND naming what is served
                        models = list(self.s.models.get(request.name, {}).values())
                elif request.version:
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "a version needs a model name")
                else:
                    models = [m for name in sorted(self.s.models) for m in self.s.models[name].values()]
            except RequestError as exc:
                context.abort(exc.code, exc.message)
            response = protocols.message("inference.ModelStatisticsResponse")()
            for model in sorted(models, key=lambda m: (m.entry.name, m.entry.version)):
                _fill_statistics(response.model_stats.add(), model)
            return response

    # --- inference ------------------------------------------------------------------------------------------

    def ModelInfer(self, request, context):
        start, model, code, call = time.monotonic(), None, grpc.StatusCode.OK, None
        with self.s.track("ModelInfer"):
            try:
                self.s.check_accepting()
                deadline = self.s.call_deadline(context, start)
                model = self._resolve(request.model_name, request.model_version)
                call = self._admit(model, request, start, deadline)
                self.s.wait(model, call.job, deadline, context)
                return self._answer(call)
            except RequestError as exc:
                code = exc.code
                context.abort(exc.code, exc.message)
            except Exception:
                log.exception("ModelInfer failed")
                code = grpc.StatusCode.INTERNAL
                context.abort(code, "internal error (see the server log)")
            finally:
                self._record("ModelInfer", model, code, start, call.job if call else None)

    def ModelStreamInfer(self, requests, context) -> Iterator:
        with self.s.track("ModelStreamInfer", pin_models=False):  # pinned per request in _Stream._admit
            try:
                self.s.check_accepting()
            except RequestError as exc:
                context.abort(exc.code, exc.message)
            yield from _Stream(self, requests, context).run()

    # --- helpers --------------------------------------------------------------------------------------------

    def _ready(self) -> bool:
        return self.s.ready.is_set() and self.s.accepting

    def _resolve(self, name: str, version: str) -> LoadedModel:
        number = _version(version)
        try:
            return self.s.resolve(name, number)
        except RequestError as exc:
            reason = self.s.failed.get(name, {}).get(number)
            if reason is not None:
                raise RequestError(exc.code, f"model {name!r} version {number} failed to load: {reason}") from None
            raise

    def _admit(self, model: LoadedModel, request, start: float, deadline: float | None, on_done=None) -> _Call:
        """Validate a request for `model` and hand it to the batcher; raises RequestError."""
        inputs = parse_inputs(request)
        outputs = parse_outputs(request)
        if inputs.images is not None:
            limit = self.s.config.max_images_per_request
            if len(inputs.images) > limit:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"{len(inputs.images)} images; at most {limit} per request")
            job = self.s.submit(model, inputs.images, deadline, on_done)
        else:
            job = self.s.submit_tensors(model, inputs.pixels, deadline, on_done)
        return _Call(request, start, model, outputs, job)

    def _answer(self, call: _Call):
        """The response for a finished job; counts its images; raises RequestError when any image failed."""
        name, version = call.model.labels
        for value in call.job.results:
            code = grpc.StatusCode.OK if isinstance(value, np.ndarray) else error_code(value)
            self.s.metrics.images.labels(name, version, code.name).inc()
        error = self.s.first_error(call.job)
        if error is not None:
            raise error
        response = self.response_cls(model_name=name, model_version=version, id=call.request.id)
        encode_outputs(response, np.stack(call.job.results).astype(np.float32, copy=False), call.outputs,
                       list(call.model.entry.manifest.class_names))
        return response

    def _record(self, method: str, model: LoadedModel | None, code: grpc.StatusCode, start: float,
                job: Job | None = None) -> None:
        self.s.record(method, model, code, start, job)


def _fill_statistics(out, model: LoadedModel) -> None:
    stats = model.stats.snapshot()
    out.name, out.version = model.labels
    out.last_inference, out.inference_count, out.execution_count = (
        stats.last_inference_ms, stats.inference_count, stats.execution_count)
    infer = out.inference_stats
    for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        duration = getattr(stats, name)
        getattr(infer, name).count, getattr(infer, name).ns = duration.count, duration.ns
    for size in sorted(stats.batches):
        batch = out.batch_stats.add(batch_size=size)
        batch.compute_infer.count, batch.compute_infer.ns = stats.batches[size].count, stats.batches[size].ns
        # Decode happens per image before batching and responses per request after it: no batch-level time.
        batch.compute_input.count = batch.compute_output.count = stats.batches[size].count


_END = object()


class _Stream:
    """One ModelStreamInfer call. A reader thread admits requests (at most `stream_max_inflight` unanswered,
    so a fast client is slowed by flow control); responses are sent as jobs finish, in completion order,
    carrying the request `id`. A failed request is answered in-stream with `error_message`; the stream stays
    open, as in Triton."""

    def __init__(self, service: Service, requests, context: grpc.ServicerContext) -> None:
        self.service, self.s, self.requests, self.context = service, service.s, requests, context
        self.out: queue.Queue = queue.Queue()
        self.window = threading.Semaphore(self.s.config.stream_max_inflight)
        self.calls: dict[int, _Call] = {}
        self.lock = threading.RLock()  # re-entered when a job fails while it is being admitted
        self.closed = False
        self.deadline = self.s.call_deadline(context, time.monotonic())
        self.stream_response = protocols.message("inference.ModelStreamInferResponse")

    def run(self) -> Iterator:
        self.context.add_callback(self._cancel_all)
        threading.Thread(target=self._read, name="kserve-stream-reader", daemon=True).start()
        answered, total = 0, None
        while total is None or answered < total:
            item = self.out.get()
            if isinstance(item, tuple) and item[0] is _END:
                total = item[1]
                continue
            answered += 1
            self.window.release()
            yield self._respond(item)

    def _respond(self, item: _Call | tuple) -> object:
        if isinstance(item, _Call):
            with self.lock:
                self.calls.pop(id(item.job), None)
            try:
                response = self.service._answer(item)
                self.service._record("ModelStreamInfer", item.model, grpc.StatusCode.OK, item.start, item.job)
                return self.stream_response(infer_response=response)
            except RequestError as exc:
                request, start, model, error = item.request, item.start, item.model, exc
        else:
            request, start, model, error = item
        self.service._record("ModelStreamInfer", model, error.code, start)
        infer = self.service.response_cls(model_name=request.model_name, model_version=request.model_version,
                                          id=request.id)
        return self.stream_response(error_message=f"{error.code.name}: {error.message}", infer_response=infer)

    def _read(self) -> None:
        count = 0
        try:
            for request in self.requests:
                while not self.window.acquire(timeout=0.1):
                    if self.closed:
                        return
                count += 1
                self._admit(request)
        except Exception as exc:  # the client cancelled or the connection broke: nothing left to answer
            log.debug("stream reader stopped: %s", exc)
        finally:
            self.out.put((_END, count))

    def _admit(self, request) -> None:
        start = time.monotonic()
        holder: list[_Call] = []
        fired = threading.Event()

        def done(_job: Job) -> None:
            # The job may finish before `_admit` returns its call (cached failures, tiny batches).
            with self.lock:
                if fired.is_set() or not holder:
                    fired.set()
                    return
                fired.set()
            self.out.put(holder[0])

        model = None
        try:
            with self.s.pin_models():  # the stream itself does not pin versions (hot reload), each request does
                model = self.service._resolve(request.model_name, request.model_version)
                with self.lock:
                    if self.closed:  # read after the client cancelled: admitting it would run an orphan job
                        raise RequestError(grpc.StatusCode.CANCELLED, "stream cancelled")
                    call = self.service._admit(model, request, start, self.deadline, on_done=done)
                    holder.append(call)
                    finished_early = fired.is_set()
                    if not finished_early:
                        self.calls[id(call.job)] = call
            if finished_early:
                self.out.put(call)
        except RequestError as exc:
            self.out.put((request, start, model, exc))

    def _cancel_all(self) -> None:
        self.closed = True
        with self.lock:
            calls = list(self.calls.values())
            self.calls.clear()
        for call in calls:
            call.model.batcher.cancel(call.job)


def handlers(server: InferenceServer) -> list[grpc.GenericRpcHandler]:
    """The generic handler the server registers (see `server.PROTOCOLS`)."""
    service = Service(server)
    methods = {}
    for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                 "ModelConfig", "ModelStatistics", "RepositoryIndex"):
        request_cls, response_cls = protocols.method_types(SERVICE, name)
        methods[name] = grpc.unary_unary_rpc_method_handler(
            getattr(service, name), request_deserializer=request_cls.FromString,
            response_serializer=response_cls.SerializeToString)
    request_cls, response_cls = protocols.method_types(SERVICE, "ModelStreamInfer")
    methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        service.ModelStreamInfer, request_deserializer=request_cls.FromString,
        response_serializer=response_cls.SerializeToString)
    return [grpc.method_handlers_generic_handler(SERVICE, methods)]
