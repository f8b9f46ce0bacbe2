"""TensorFlow Serving's gRPC API on the server's port: `tensorflow.serving.PredictionService` (Predict,
Classify, GetModelMetadata) and `tensorflow.serving.ModelService` (GetModelStatus).

Existing TF Serving clients (`tensorflow_serving.apis` stubs, `tf.make_tensor_proto`) work unchanged, while
the server itself needs no TensorFlow: the messages come from the wire-compatible definitions in
`proto/compat/` (service/protocols.py). Requests go through the same decode pool, preprocessing and dynamic
batcher as the native `imgcls.v1.Inference/Predict`, so the answers are the same probabilities.

Signatures (what GetModelMetadata advertises; docs/protocols.md has examples):
- `serving_default` (Predict): input "images", DT_STRING [N] (or [N, 1]) encoded image files;
- `preprocessed` (Predict): input "input", DT_FLOAT [N, H, W, 3] already preprocessed as the manifest says;
  Predict takes exactly one input under any key, of either dtype, with either signature name;
- both answer "probabilities" DT_FLOAT [N, C] (column i = class i) and "top_class" DT_STRING [N];
- `classification` (Classify): tf.Examples with the encoded image in the bytes feature "image/encoded";
  every class with its score, best first.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np

from imgcls.service import protocols
from imgcls.service.core import Call, Core, RequestError, checked_count, invalid, short
from imgcls.service.models import LoadedModel

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
SERVICE_NAMES = (PREDICTION_SERVICE, MODEL_SERVICE)

DEFAULT_SIGNATURE = "serving_default"
PREPROCESSED_SIGNATURE = "preprocessed"
CLASSIFY_SIGNATURE = "classification"
PREDICT_SIGNATURES = (DEFAULT_SIGNATURE, PREPROCESSED_SIGNATURE)
CLASSIFY_SIGNATURES = (DEFAULT_SIGNATURE, CLASSIFY_SIGNATURE)
IMAGES_INPUT, FLOAT_INPUT = "images", "input"
PROBABILITIES, TOP_CLASS = "probabilities", "top_class"
IMAGE_FEATURE = "image/encoded"  # the tf.Example feature Classify reads
SIGNATURE_DEF_FIELD = "signature_def"
SIGNATURE_DEF_MAP_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
PREDICT_METHOD, CLASSIFY_METHOD = "tensorflow/serving/predict", "tensorflow/serving/classify"

# tensorflow/core/framework/types.proto and tensorflow_serving/apis/get_model_status.proto values.
DT_FLOAT, DT_STRING = 1, 7
AVAILABLE, END = 30, 50
UNKNOWN_ERROR = 2  # tensorflow.error.Code.UNKNOWN


def _msg(name: str):
    return protocols.message(name)


def _dtype_name(value: int) -> str:
    found = protocols.pool().FindEnumTypeByName("tensorflow.DataType").values_by_number.get(value)
    return found.name if found is not None else str(value)


_invalid = invalid


class TFServing:
    """Translates TF Serving messages to and from the request path."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def _model_name(self, spec) -> str:
        if spec.name:
            return spec.name
        models = self.core.models
        if len(models) == 1:
            return next(iter(models))
        raise _invalid(f"model_spec.name is required; serving: {', '.join(sorted(models))}")

    def _resolve(self, spec) -> LoadedModel:
        """model_spec -> a loaded version: `version` if set, else the latest; labels are not supported."""
        name = self._model_name(spec)
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            raise _invalid(f"model_spec.version_label {short(spec.version_label, 64)} is not supported; set "
                           "model_spec.version or leave it unset for the latest version")
        latest = self.core.resolve(name, 0)  # NOT_FOUND for an unknown model
        if choice != "version":
            return latest
        version = spec.version.value
        served = sorted(self.core.models.get(name, {latest.entry.version: latest}))
        if version < 1:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model {short(name)} has no version {version}; serving: {served}")
        return self.core.resolve(name, version)

    @staticmethod
    def _signature(spec, accepted: tuple[str, ...], method: str) -> str:
        name = spec.signature_name or DEFAULT_SIGNATURE
        if name not in accepted:
            raise _invalid(f"{method}: no signature {short(spec.signature_name, 64)}; signatures: "
                           f"{', '.join(accepted)}")
        return name

    def _model_spec(self, model: LoadedModel, signature: str = ""):
        spec = _msg("tensorflow.serving.ModelSpec")(name=model.entry.name, signature_name=signature)
        spec.version.value = model.entry.version
        return spec

    # --- PredictionService -------------------------------------------------------------------------------------

    async def predict(self, request, context, call: Call):
        call.model = model = self._resolve(request.model_spec)
        signature = self._signature(request.model_spec, PREDICT_SIGNATURES, "Predict")
        if len(request.inputs) != 1:
            raise _invalid(f"Predict takes exactly one input ({IMAGES_INPUT!r}: DT_STRING encoded images, or "
                           f"{FLOAT_INPUT!r}: DT_FLOAT [N, H, W, 3]); got {sorted(request.inputs) or 'none'}")
        outputs = (PROBABILITIES, TOP_CLASS)
        unknown = [key for key in request.output_filter if key not in outputs]
        if unknown:
            raise _invalid(f"output_filter names unknown outputs {[short(u, 64) for u in unknown[:8]]}; "
                           f"outputs: {', '.join(outputs)}")
        [(key, tensor)] = request.inputs.items()
        if tensor.dtype == DT_STRING:
            result = await self.core.infer(call, model, images=_string_values(key, tensor))
        elif tensor.dtype == DT_FLOAT:
            pixels = _float_array(key, tensor, lambda dims: self.core.check_pixel_shape(model, dims))
            result = await self.core.infer(call, model, pixels=pixels)
        else:
            raise _invalid(f"input {short(key, 64)} has dtype {_dtype_name(tensor.dtype)}; expected DT_STRING "
                           "(encoded images) or DT_FLOAT ([N, H, W, 3] preprocessed)")
        probs = result.probabilities()
        response = _msg("tensorflow.serving.PredictResponse")(model_spec=self._model_spec(model, signature))
        wanted = set(request.output_filter or outputs)
        if PROBABILITIES in wanted:
            response.outputs[PROBABILITIES].CopyFrom(_float_tensor(probs))
        if TOP_CLASS in wanted:
            names = model.entry.manifest.class_names
            top = [names[i].encode() for i in np.argmax(probs, axis=1)]
            response.outputs[TOP_CLASS].CopyFrom(_string_tensor(top, [len(top)]))
        return response

    async def classify(self, request, context, call: Call):
        call.model = model = self._resolve(request.model_spec)
        signature = self._signature(request.model_spec, CLASSIFY_SIGNATURES, "Classify")
        result = await self.core.infer(call, model, images=_example_images(request.input))
        probs = result.probabilities()
        names = model.entry.manifest.class_names
        result = _msg("tensorflow.serving.ClassificationResult")()
        for row in probs:
            classes = result.classifications.add().classes
            for i in np.argsort(-row, kind="stable"):
                classes.add(label=names[i], score=float(row[i]))
        return _msg("tensorflow.serving.ClassificationResponse")(
            model_spec=self._model_spec(model, signature), result=result)

    async def get_model_metadata(self, request, context, call: Call):
        call.model = model = self._resolve(request.model_spec)
        fields = list(request.metadata_field)
        if not fields:
            raise _invalid(f"metadata_field is empty; ask for {SIGNATURE_DEF_FIELD!r}")
        unsupported = [f for f in fields if f != SIGNATURE_DEF_FIELD]
        if unsupported:
            raise _invalid(f"metadata_field {[short(u, 64) for u in unsupported[:8]]} not supported; only "
                           f"{SIGNATURE_DEF_FIELD!r}")
        response = _msg("tensorflow.serving.GetModelMetadataResponse")(model_spec=self._model_spec(model))
        packed = response.metadata[SIGNATURE_DEF_FIELD]
        packed.type_url = SIGNATURE_DEF_MAP_URL
        packed.value = signature_defs(model).SerializeToString()
        return response

    # --- ModelService ------------------------------------------------------------------------------------------

    async def get_model_status(self, request, context, call: Call):
        spec = request.model_spec
        models, failed = self.core.models, self.core.failed
        known = sorted(set(models) | set(failed))
        name = spec.name
        if not name:
            if len(known) != 1:
                raise _invalid(f"model_spec.name is required; models: {', '.join(known)}")
            name = known[0]
        if name not in known:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no model {short(name)}; models: {', '.join(known)}")
        loaded = models.get(name, {})
        if loaded:
            call.model = loaded[max(loaded)]
        status_cls = _msg("tensorflow.serving.ModelVersionStatus")
        statuses = {v: status_cls(version=v, state=AVAILABLE, status={}) for v in loaded}
        for version, error in failed.get(name, {}).items():
            statuses.setdefault(version, status_cls(version=version, state=END,
                                                    status={"error_code": UNKNOWN_ERROR, "error_message": error}))
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            raise _invalid(f"model_spec.version_label {short(spec.version_label, 64)} is not supported")
        if choice == "version":
            if spec.version.value not in statuses:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"model {short(name)} has no version {spec.version.value}; versions: "
                                   f"{sorted(statuses)}")
            statuses = {spec.version.value: statuses[spec.version.value]}
        return _msg("tensorflow.serving.GetModelStatusResponse")(
            model_version_status=[statuses[v] for v in sorted(statuses)])


# --- tensors, examples, signatures -----------------------------------------------------------------------------


def _dims(key: str, tensor) -> list[int]:
    if tensor.tensor_shape.unknown_rank:
        raise _invalid(f"input {short(key, 64)} has an unknown rank; give its shape")
    dims = [d.size for d in tensor.tensor_shape.dim]
    checked_count(dims, f"input {short(key, 64)}")
    return dims


def _string_values(key: str, tensor) -> list[bytes]:
    """A DT_STRING tensor of encoded images: shape [N], [N, 1] or [] (one image)."""
    dims = _dims(key, tensor)
    if len(dims) > 2 or (len(dims) == 2 and dims[1] != 1):
        raise _invalid(f"input {short(key, 64)} has shape {dims[:8]}; encoded images are [N] or [N, 1]")
    values = list(tensor.string_val)
    expected = checked_count(dims, f"input {short(key, 64)}")
    if len(values) != expected:
        raise _invalid(f"input {short(key, 64)} has shape {dims} but {len(values)} values")
    return values


def _float_array(key: str, tensor, check_shape: Callable[[list[int]], None]) -> np.ndarray:
    """A DT_FLOAT tensor from tensor_content (little-endian) or float_val (one value fills the shape);
    `check_shape` validates the declared shape against the model before anything is allocated."""
    dims = _dims(key, tensor)
    check_shape(dims)
    count = checked_count(dims, f"input {short(key, 64)}")
    if tensor.tensor_content:
        if len(tensor.tensor_content) != 4 * count:
            raise _invalid(f"input {short(key, 64)}: tensor_content has {len(tensor.tensor_content)} bytes, "
                           f"shape {dims} needs {4 * count}")
        array = np.frombuffer(tensor.tensor_content, dtype="<f4")
    else:
        array = np.asarray(tensor.float_val, dtype=np.float32)
        if len(array) == 1 and count > 1:
            array = np.full(count, array[0], np.float32)
        elif len(array) != count:
            raise _invalid(f"input {short(key, 64)} has shape {dims} but {len(array)} float_val values")
    return array.reshape(dims).astype(np.float32, copy=False)


def _float_tensor(array: np.ndarray):
    tensor = _msg("tensorflow.TensorProto")(dtype=DT_FLOAT, tensor_content=array.astype("<f4").tobytes())
    tensor.tensor_shape.dim.extend(_dim(n) for n in array.shape)
    return tensor


def _string_tensor(values: list[bytes], shape: list[int]):
    tensor = _msg("tensorflow.TensorProto")(dtype=DT_STRING, string_val=values)
    tensor.tensor_shape.dim.extend(_dim(n) for n in shape)
    return tensor


def _dim(size: int):
    return _msg("tensorflow.TensorShapeProto.Dim")(size=size)


def _example_images(request_input) -> list[bytes]:
    """The encoded image of each tf.Example (feature "image/encoded"; context features count for every one)."""
    kind = request_input.WhichOneof("kind")
    if kind is None:
        raise _invalid("input has no examples; set input.example_list")
    examples = getattr(request_input, kind).examples
    context = request_input.example_list_with_context.context.features.feature if kind != "example_list" else {}
    images = []
    for i, example in enumerate(examples):
        features = example.features.feature
        feature = features[IMAGE_FEATURE] if IMAGE_FEATURE in features else context.get(IMAGE_FEATURE)
        if feature is None or feature.WhichOneof("kind") != "bytes_list":
            raise _invalid(f"example {i}: no bytes feature {IMAGE_FEATURE!r} (features: {sorted(features)})")
        if len(feature.bytes_list.value) != 1:
            raise _invalid(f"example {i}: {IMAGE_FEATURE!r} holds {len(feature.bytes_list.value)} values; "
                           "one encoded image per example")
        images.append(feature.bytes_list.value[0])
    return images


def signature_defs(model: LoadedModel):
    """The SignatureDefMap GetModelMetadata returns: the keys, dtypes and shapes Predict and Classify take."""
    h, w = model.spec.input_size
    classes = model.entry.manifest.num_classes
    tensor_info = _msg("tensorflow.TensorInfo")

    def info(name: str, dtype: int, shape: list[int]):
        t = tensor_info(name=name, dtype=dtype)
        t.tensor_shape.dim.extend(_dim(n) for n in shape)
        return t

    outputs = {PROBABILITIES: info(PROBABILITIES, DT_FLOAT, [-1, classes]), TOP_CLASS: info(TOP_CLASS, DT_STRING, [-1])}
    signature = _msg("tensorflow.SignatureDef")
    result = _msg("tensorflow.serving.SignatureDefMap")()
    result.signature_def[DEFAULT_SIGNATURE].CopyFrom(signature(
        inputs={IMAGES_INPUT: info(IMAGES_INPUT, DT_STRING, [-1])}, outputs=outputs, method_name=PREDICT_METHOD))
    result.signature_def[PREPROCESSED_SIGNATURE].CopyFrom(signature(
        inputs={FLOAT_INPUT: info(FLOAT_INPUT, DT_FLOAT, [-1, h, w, 3])}, outputs=outputs, method_name=PREDICT_METHOD))
    result.signature_def[CLASSIFY_SIGNATURE].CopyFrom(signature(
        inputs={"inputs": info("inputs", DT_STRING, [-1])},
        outputs={"classes": info("classes", DT_STRING, [-1, classes]),
                 "scores": info("scores", DT_FLOAT, [-1, classes])},
        method_name=CLASSIFY_METHOD))
    return result


def handlers(core: Core) -> list[grpc.GenericRpcHandler]:
    """The generic handlers `InferenceServer.start` adds for PredictionService and ModelService."""
    api = TFServing(core)

    def unary(service: str, method: str, body: Callable) -> grpc.RpcMethodHandler:
        return core.unary_handler(f"tfserving.{method}", *protocols.method_types(service, method), body,
                                  inference=method in ("Predict", "Classify"))

    return [
        grpc.method_handlers_generic_handler(PREDICTION_SERVICE, {
            "Predict": unary(PREDICTION_SERVICE, "Predict", api.predict),
            "Classify": unary(PREDICTION_SERVICE, "Classify", api.classify),
            "GetModelMetadata": unary(PREDICTION_SERVICE, "GetModelMetadata", api.get_model_metadata),
        }),
        grpc.method_handlers_generic_handler(MODEL_SERVICE, {
            "GetModelStatus": unary(MODEL_SERVICE, "GetModelStatus", api.get_model_status),
        }),
    ]
