"""Run an artifact the way the server will: onnxruntime, the LiteRT interpreter (XNNPACK), TensorFlow.

Every runner takes float32 NHWC normalized images of any batch size and returns float32 probabilities.
The export stage keeps its own small runners (stages share only the core, never `imgcls.service`);
they mirror the service's settings: explicit intra-op threads, one inter-op thread, sequential ONNX.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from imgcls.errors import ImgclsError

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"


class Runner(Protocol):
    format: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def set_tensorflow_threads(threads: int) -> bool:
    """Pin TensorFlow's thread pools; False when TF already started (its pools cannot change then)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        return True
    except RuntimeError:
        return tf.config.threading.get_intra_op_parallelism_threads() == threads


class SavedModelRunner:
    """`serving_default` of a SavedModel; checks it has the bundle contract's input and output."""

    format = "savedmodel"

    def __init__(self, path: Path, input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        self._tf = tf
        try:
            self.fn = tf.saved_model.load(str(path)).signatures["serving_default"]
        except KeyError:
            raise ImgclsError(f"{path}: SavedModel has no 'serving_default' signature") from None
        except (OSError, ValueError) as exc:
            raise ImgclsError(f"{path}: not a loadable SavedModel ({str(exc).splitlines()[0]})") from None
        inputs = self.fn.structured_input_signature[1]
        outputs = self.fn.structured_outputs
        if input_name not in inputs or output_name not in outputs:
            raise ImgclsError(f"{path}: serving_default must map '{input_name}' to '{output_name}', "
                              f"found inputs {sorted(inputs)} and outputs {sorted(outputs)}")
        if inputs[input_name].shape.rank != 4 or inputs[input_name].shape[0] is not None:
            raise ImgclsError(f"{path}: input '{input_name}' must be [None, H, W, 3] (dynamic batch), "
                              f"found {inputs[input_name].shape}")
        self.input_spec, self.output_spec = inputs[input_name], outputs[output_name]
        self.input_name, self.output_name = input_name, output_name

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = self.fn(**{self.input_name: self._tf.constant(batch, self._tf.float32)})
        return out[self.output_name].numpy().astype(np.float32, copy=False)


class TFLiteRunner:
    """LiteRT interpreter with its default XNNPACK delegate; one interpreter per batch size (TFLite shapes
    are fixed once tensors are allocated). int8 models are fed and read with their own scale/zero point.

    `max_chunk` splits a batch into power-of-two chunks of at most that size, as the service does
    (13 = 8 + 4 + 1); None runs the whole batch on one interpreter (the checks do, to prove large batches work).
    """

    def __init__(self, path: Path, threads: int, fmt: str = "tflite", max_chunk: int | None = None) -> None:
        self.format = fmt
        self.content = Path(path).read_bytes()
        self.threads = threads
        self.max_chunk = max_chunk
        self._by_size: dict[int, object] = {}
        self._interpreter(1)

    def _interpreter(self, n: int):
        if n not in self._by_size:
            from ai_edge_litert.interpreter import Interpreter

            interp = Interpreter(model_content=self.content, num_threads=self.threads)
            inp = interp.get_input_details()[0]
            if int(inp["shape"][0]) != n:
                interp.resize_tensor_input(inp["index"], [n, *inp["shape"][1:]], strict=False)
            interp.allocate_tensors()
            self._by_size[n] = interp
        return self._by_size[n]

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.max_chunk is None:
            return self._run(batch)
        outputs, start = [], 0
        while start < len(batch):
            size = min(self.max_chunk, 1 << ((len(batch) - start).bit_length() - 1))
            outputs.append(self._run(batch[start:start + size]))
            start += size
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        interp = self._interpreter(len(batch))
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        x = batch
        if inp["dtype"] in (np.int8, np.uint8):
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(batch / scale) + zero, info.min, info.max).astype(inp["dtype"])
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        y = interp.get_tensor(out["index"])
        if out["dtype"] in (np.int8, np.uint8):
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * np.float32(scale)
        return np.asarray(y, dtype=np.float32)


class OnnxRunner:
    format = "onnx"

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the service: no busy-wait
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]


def open_runner(fmt: str, path: Path, threads: int, tflite_max_chunk: int | None = None) -> Runner:
    if fmt == "savedmodel":
        return SavedModelRunner(path)
    if fmt.startswith("tflite"):
        return TFLiteRunner(path, threads, fmt, tflite_max_chunk)
    if fmt == "onnx":
        return OnnxRunner(path, threads)
    raise ImgclsError(f"unknown format {fmt!r}")
