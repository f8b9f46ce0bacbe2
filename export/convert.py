"""Converters: the bundle's SavedModel to each published format.

Every format is converted from the bundle's SavedModel (`serving_default`), the very graph the checks
use as reference, never from model.keras. Notes for TF 2.21 / tf_keras 2.21 / tf2onnx 1.17:

- TFLite: `tf.lite.TFLiteConverter.from_saved_model(..., signature_keys=["serving_default"])` works as is.
  The converter names tensors `serving_default_images:0` / `StatefulPartitionedCall:0`; the model's
  SignatureDef keeps `images` / `probabilities`. The batch dimension is stored as 1 with
  shape_signature -1, so runtimes must `resize_tensor_input` + `allocate_tensors` for other sizes.
- int8: full-integer PTQ (`TFLITE_BUILTINS_INT8`, int8 input and output). The representative dataset
  yields one normalized image at a time (batch 1 is what the calibrator expects).
- ONNX: tf2onnx 1.17 has no Python `from_saved_model` (only the CLI has `--saved-model`), so the loaded
  `serving_default` function is wrapped in a `tf.function` with an input spec named `images` and a dict
  output `probabilities` and passed to `tf2onnx.convert.from_function`; that keeps both names in the
  ONNX graph. (`from_keras` on the tf_keras model also works but would convert a different graph than
  the reference.) tf2onnx names the dynamic batch `unk__NN`; it is renamed `batch`. Opset 17 by default
  (tf2onnx 1.17 supports up to 18; onnxruntime 1.31 runs both).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from imgcls.errors import ImgclsError

ORDER = ("savedmodel", "tflite", "tflite-fp16", "tflite-int8", "onnx")
FILES = {"savedmodel": "saved_model", "tflite": "model.tflite", "tflite-fp16": "model_fp16.tflite",
         "tflite-int8": "model_int8.tflite", "onnx": "model.onnx"}
DEFAULT_OPSET = 17
log = logging.getLogger(__name__)

Calibration = Callable[[], Iterator[list[np.ndarray]]]


def to_savedmodel(saved_model: Path, out: Path) -> dict:
    """The bundle's SavedModel is already the serving contract (serving_default, dynamic batch): copy it."""
    shutil.copytree(saved_model, out)
    return {"signature": "serving_default"}


def to_tflite(saved_model: Path, out: Path, fmt: str, calibration: Calibration | None = None) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=["serving_default"])
    extra: dict = {}
    if fmt == "tflite-fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
        extra["quantization"] = "float16 weights"
    elif fmt == "tflite-int8":
        if calibration is None:
            raise ValueError("tflite-int8 needs a calibration generator")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = calibration
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        extra["quantization"] = "full-integer int8 post-training (int8 input and output)"
    try:
        out.write_bytes(converter.convert())
    except Exception as exc:  # the converter raises ConverterError / RuntimeError with MLIR diagnostics
        raise ImgclsError(f"{fmt}: TFLite conversion failed: {str(exc).strip().splitlines()[-1][:300]}") from exc
    return extra


def to_onnx(saved_model: Path, out: Path, opset: int = DEFAULT_OPSET) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    loaded = tf.saved_model.load(str(saved_model))  # must outlive the trace: it owns the variables
    fn = loaded.signatures["serving_default"]
    spec = fn.structured_input_signature[1]["images"]
    input_signature = [tf.TensorSpec(spec.shape, tf.float32, name="images")]

    @tf.function(input_signature=input_signature)
    def serve(images):
        return {"probabilities": fn(images=images)["probabilities"]}

    try:
        model, _ = tf2onnx.convert.from_function(serve, input_signature=input_signature, opset=opset)
    except Exception as exc:
        raise ImgclsError(f"onnx: tf2onnx conversion failed (opset {opset}): {str(exc)[:300]}") from exc
    finally:
        del loaded
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    import onnx

    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return {"opset": opset, "converter": f"tf2onnx {tf2onnx.__version__} from_function(serving_default)"}


def calibration_generator(batches: Callable[[], Iterator[np.ndarray]]) -> Calibration:
    """TFLite's representative_dataset: a callable yielding [one float32 image with batch 1]."""

    def generate() -> Iterator[list[np.ndarray]]:
        for batch in batches():
            for image in batch:
                yield [image[None].astype(np.float32)]

    return generate
