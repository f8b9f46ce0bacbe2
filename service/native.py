"""The imgcls.v1 `Inference` service: translates its messages to and from the request path (`core.py`).

imgcls.v1 has a status per image: in a request of several images, an undecodable one gets its own error and
the others their labels; a request of one image fails with that image's status.
"""

from __future__ import annotations

import grpc

from imgcls.service import streams
from imgcls.service.core import Call, Core, RequestError, Result
from imgcls.v1 import inference_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "imgcls.v1.Inference"
SERVICE_NAMES = (SERVICE_NAME,)


def _status(code: grpc.StatusCode, message: str = "") -> pb.Status:
    return pb.Status(code=code.value[0], message=message)


class Native:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def predict(self, request: pb.PredictRequest, context, call: Call) -> pb.PredictResponse:
        core = self.core
        call.model = model = core.resolve(request.model_name, request.model_version)
        core.check_count(len(request.images))
        top_k = core.top_k(request.top_k if request.HasField("top_k") else None)
        result = await core.infer(call, model, images=list(request.images))
        return self._response(result, top_k, request.request_id)

    @staticmethod
    def _response(result: Result, top_k: int, request_id: str) -> pb.PredictResponse:
        images = []
        for image, labels in zip(result.images, result.top_k(top_k), strict=True):
            if labels is None:
                images.append(pb.ImageResult(status=_status(image.code, image.message)))
            else:
                images.append(pb.ImageResult(labels=[pb.Label(index=i, name=n, score=s) for i, n, s in labels],
                                             status=_status(grpc.StatusCode.OK)))
        if len(result.images) == 1 and result.images[0].error is not None:
            raise RequestError(result.images[0].code, result.images[0].message)
        name, version = result.model.labels
        return pb.PredictResponse(model_name=name, model_version=int(version), results=images,
                                  request_id=request_id)

    async def stream_message(self, request: pb.PredictRequest, call: Call) -> pb.PredictResponse:
        return await self.predict(request, None, call)

    @staticmethod
    def stream_error(request: pb.PredictRequest, error: RequestError, call: Call) -> pb.PredictResponse:
        model = call.model
        return pb.PredictResponse(request_id=request.request_id, error=_status(error.code, error.message),
                                  model_name=model.entry.name if model else request.model_name[:256],
                                  model_version=model.entry.version if model else request.model_version)

    async def metadata(self, request: pb.GetModelMetadataRequest, context, call: Call) -> pb.ModelMetadata:
        model = self.core.resolve(request.model_name, request.model_version)
        m = model.entry.manifest
        spec = m.preprocessing
        name = model.entry.name
        return pb.ModelMetadata(
            name=name, version=model.entry.version,
            versions=sorted(self.core.models.get(name, {model.entry.version: model})),
            failed_versions=_failed_versions(self.core.failed.get(name, {})),
            backbone=m.backbone, class_names=m.class_names,
            preprocessing=pb.Preprocessing(
                height=spec.input_size[0], width=spec.input_size[1], mode=spec.mode, resize=spec.resize,
                channel_order=spec.channel_order, scale=spec.scale, mean=spec.mean, std=spec.std),
            formats=[a.format for a in m.artifacts], runtime=model.runtime, created_at=m.created_at,
        )

    async def list_models(self, request: pb.ListModelsRequest, context, call: Call) -> pb.ListModelsResponse:
        models, failed = self.core.models, self.core.failed  # snapshots: hot reload replaces both
        summaries = []
        for name in sorted(set(models) | set(failed)):
            summary = pb.ModelSummary(name=name, failed_versions=_failed_versions(failed.get(name, {})))
            if name in models:  # else every version of it failed: listed so the failure shows
                versions = models[name]
                latest = versions[max(versions)]
                summary.versions.extend(sorted(versions))
                summary.backbone, summary.runtime = latest.entry.manifest.backbone, latest.runtime
                summary.num_classes = latest.entry.manifest.num_classes
            summaries.append(summary)
        return pb.ListModelsResponse(models=summaries)


def _failed_versions(failed: dict[int, str]) -> list[pb.FailedVersion]:
    return [pb.FailedVersion(version=v, error=error) for v, error in sorted(failed.items())]


def handlers(core: Core) -> list[grpc.GenericRpcHandler]:
    api = Native(core)
    types = {name: (getattr(pb, m.input_type.name), getattr(pb, m.output_type.name))
             for name, m in pb.DESCRIPTOR.services_by_name["Inference"].methods_by_name.items()}
    methods = {
        "Predict": core.unary_handler("Predict", *types["Predict"], api.predict, inference=True),
        "GetModelMetadata": core.unary_handler("GetModelMetadata", *types["GetModelMetadata"], api.metadata),
        "ListModels": core.unary_handler("ListModels", *types["ListModels"], api.list_models),
        "PredictStream": streams.handler(core, "PredictStream", *types["PredictStream"], api.stream_message,
                                         api.stream_error),
    }
    assert set(methods) == set(types), "every imgcls.v1 method has a handler"
    return [grpc.method_handlers_generic_handler(SERVICE_NAME, methods)]
