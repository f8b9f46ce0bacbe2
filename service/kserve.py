"""KServe v2 / Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), on the imgcls port.

So that tritonclient, KServe clients, Triton's perf_analyzer and anything else that speaks the protocol can
use imgcls without its own API. Requests go through the same model resolution, queue limits, dynamic
batcher, deadlines, cancellation, drain and metrics as `imgcls.v1.Inference` (method labels `ModelInfer`,
`ModelStreamInfer`). The protocol has no per-image status, so one failed image fails the request.
Tensors: `kserve_tensors.py`; messages: `protocols.py` (private descriptor pool).
"""

from __future__ import annotations

import re
from importlib import metadata

import grpc

from imgcls.service import protocols, streams
from imgcls.service.core import Call, Core, RequestError, invalid, short
from imgcls.service.kserve_tensors import (
    IMAGES,
    PIXELS,
    PROBABILITIES,
    encode_outputs,
    parse_inputs,
    parse_outputs,
)
from imgcls.service.models import LoadedModel
from imgcls.service.statistics import ModelStats

SERVICE = "inference.GRPCInferenceService"
SERVICE_NAMES = (SERVICE,)
# Triton's extension names; not "model_repository", whose load/unload methods imgcls does not have
EXTENSIONS = ("classification", "statistics")
PLATFORMS = {"onnx": "onnxruntime_onnx", "savedmodel": "tensorflow_savedmodel"}  # Triton's names; tflite*: below
_DIGITS = re.compile(r"[0-9]{1,9}")  # ASCII only: str.isdigit() accepts "²", which int() refuses


def _version(text: str) -> int:
    """KServe versions are strings; "" means the latest served."""
    if not text:
        return 0
    if not _DIGITS.fullmatch(text) or int(text) < 1:
        raise invalid(f"model version must be a positive integer, got {short(text, 64)}")
    return int(text)


class Service:
    """Translates KServe v2 messages to and from the request path."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.response_cls = protocols.message("inference.ModelInferResponse")
        self.stream_response = protocols.message("inference.ModelStreamInferResponse")

    # --- health and metadata --------------------------------------------------------------------------------

    async def ServerLive(self, request, context, call: Call):
        return protocols.message("inference.ServerLiveResponse")(live=True)

    async def ServerReady(self, request, context, call: Call):
        return protocols.message("inference.ServerReadyResponse")(ready=self._ready())

    async def ModelReady(self, request, context, call: Call):
        ready = False
        if self._ready():
            try:
                self.core.resolve(request.name, _version(request.version))
                ready = True
            except RequestError:
                pass
        return protocols.message("inference.ModelReadyResponse")(ready=ready)

    async def ServerMetadata(self, request, context, call: Call):
        try:
            ours = metadata.version("imgcls")
        except metadata.PackageNotFoundError:
            ours = "unknown"
        return protocols.message("inference.ServerMetadataResponse")(
            name="imgcls", version=ours, extensions=list(EXTENSIONS))

    async def ModelMetadata(self, request, context, call: Call):
        model = self._resolve(request.name, request.version)
        manifest = model.entry.manifest
        h, w = manifest.preprocessing.input_size
        response = protocols.message("inference.ModelMetadataResponse")(
            name=model.entry.name, versions=[str(v) for v in sorted(self.core.models.get(model.entry.name, {}))],
            platform=PLATFORMS.get(model.runtime, "litert_tflite"))
        response.inputs.add(name=IMAGES, datatype="BYTES", shape=[-1, 1])
        response.inputs.add(name=PIXELS, datatype="FP32", shape=[-1, h, w, 3])
        response.outputs.add(name=PROBABILITIES, datatype="FP32", shape=[-1, manifest.num_classes])
        return response

    async def ModelConfig(self, request, context, call: Call):
        """Triton's configuration, for tools that need it (perf_analyzer): batch dimension first, at most
        --max-images-per-request; both inputs optional, since a request sends one of them."""
        model = self._resolve(request.name, request.version)
        manifest = model.entry.manifest
        h, w = manifest.preprocessing.input_size
        config_cls = protocols.message("inference.ModelConfig")
        input_cls = protocols.message("inference.ModelInput")
        config = config_cls(name=model.entry.name, platform=PLATFORMS.get(model.runtime, "litert_tflite"),
                            max_batch_size=self.core.config.max_images_per_request)
        config.input.add(name=IMAGES, data_type="TYPE_STRING", dims=[1], optional=True)
        config.input.add(name=PIXELS, data_type="TYPE_FP32", format=input_cls.FORMAT_NHWC, dims=[h, w, 3],
                         optional=True)
        config.output.add(name=PROBABILITIES, data_type="TYPE_FP32", dims=[manifest.num_classes])
        config.dynamic_batching.max_queue_delay_microseconds = round(self.core.config.max_queue_delay_ms * 1000)
        return protocols.message("inference.ModelConfigResponse")(config=config)

    async def RepositoryIndex(self, request, context, call: Call):
        """Served versions are READY; versions that failed to load are UNAVAILABLE with the reason."""
        response = protocols.message("inference.RepositoryIndexResponse")()
        models, failed = self.core.models, self.core.failed
        for name in sorted(set(models) | set(failed)):
            for version in sorted(set(models.get(name, {})) | set(failed.get(name, {}))):
                if version in models.get(name, {}):
                    response.models.add(name=name, version=str(version), state="READY")
                elif not request.ready:
                    response.models.add(name=name, version=str(version), state="UNAVAILABLE",
                                        reason=failed[name][version])
        return response

    async def ModelStatistics(self, request, context, call: Call):
        """Triton's statistics extension: cumulative totals per served version since it loaded (a version
        that hot reload replaced takes its totals with it). Empty name = every model, empty version = all."""
        served = self.core.models
        if request.name:
            if request.version:
                models = [self._resolve(request.name, request.version)]
            else:
                self._resolve(request.name, "")  # NOT_FOUND naming what is served
                models = list(served.get(request.name, {}).values())
        elif request.version:
            raise invalid("a version needs a model name")
        else:
            models = [m for name in sorted(served) for m in served[name].values()]
        response = protocols.message("inference.ModelStatisticsResponse")()
        for model in sorted(models, key=lambda m: (m.entry.name, m.entry.version)):
            _fill_statistics(response.model_stats.add(), model, self.core.statistics(model))
        return response

    # --- inference ------------------------------------------------------------------------------------------

    async def ModelInfer(self, request, context, call: Call):
        call.model = model = self._resolve(request.model_name, request.model_version)
        inputs = parse_inputs(request, pixel_shape=lambda shape: self.core.check_pixel_shape(model, shape))
        outputs = parse_outputs(request)
        if inputs.images is not None:
            result = await self.core.infer(call, model, images=inputs.images)
        else:
            result = await self.core.infer(call, model, pixels=inputs.pixels)
        name, version = model.labels
        response = self.response_cls(model_name=name, model_version=version, id=request.id)
        encode_outputs(response, result.probabilities(), outputs, list(model.entry.manifest.class_names))
        return response

    async def stream_message(self, request, call: Call):
        return self.stream_response(infer_response=await self.ModelInfer(request, None, call))

    def stream_error(self, request, error: RequestError, call: Call):
        infer = self.response_cls(model_name=request.model_name[:256], model_version=request.model_version[:64],
                                  id=request.id[:256])
        return self.stream_response(error_message=f"{error.code.name}: {error.message}", infer_response=infer)

    # --- helpers --------------------------------------------------------------------------------------------

    def _ready(self) -> bool:
        return self.core.serving()

    def _resolve(self, name: str, version: str) -> LoadedModel:
        number = _version(version)
        try:
            return self.core.resolve(name, number)
        except RequestError as exc:
            reason = self.core.failed.get(name, {}).get(number)
            if reason is not None:
                raise RequestError(exc.code, f"model {short(name)} version {number} failed to load: {reason}") \
                    from None
            raise


def _fill_statistics(out, model: LoadedModel, stats: ModelStats) -> None:
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


def handlers(core: Core) -> list[grpc.GenericRpcHandler]:
    """The generic handler the server registers (see `server.PROTOCOLS`)."""
    service = Service(core)
    unadmitted = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "RepositoryIndex")  # health-like
    methods = {
        name: core.unary_handler(name, *protocols.method_types(SERVICE, name), getattr(service, name),
                                 admit=name not in unadmitted, inference=name == "ModelInfer")
        for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                     "ModelConfig", "ModelStatistics", "RepositoryIndex")}
    methods["ModelStreamInfer"] = streams.handler(
        core, "ModelStreamInfer", *protocols.method_types(SERVICE, "ModelStreamInfer"), service.stream_message,
        service.stream_error)
    return [grpc.method_handlers_generic_handler(SERVICE, methods)]
