"""Run an artifact the way the server will: the core's runtimes (`imgcls.runtimes`), shared with the service.

Every runner takes float32 NHWC normalized images of any batch size and returns float32 probabilities.
Stages share only the core, never each other: the export used to keep its own copies of the loaders, which
drifted from the service's; now both use one implementation with the same settings (explicit intra-op
threads, one inter-op thread, sequential ONNX without spinning, TFLite chunking). What stays here is what
only the export wants: the SavedModel's bundle contract is enforced, and TFLite batches run whole unless
asked otherwise (the checks prove large batches work; the benchmark chunks like the server).
"""

from __future__ import annotations

from pathlib import Path

from imgcls.runtimes import OnnxRuntime, Runtime, SavedModelRuntime, TFLiteRuntime, open_runtime, set_tensorflow_threads

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"

Runner = Runtime
OnnxRunner = OnnxRuntime

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "OnnxRunner", "Runner", "SavedModelRunner", "TFLiteRunner", "open_runner",
           "set_tensorflow_threads"]


class SavedModelRunner(SavedModelRuntime):
    """`serving_default` of a SavedModel, checked against the bundle contract ('images' -> 'probabilities',
    dynamic batch). TensorFlow's threads are pinned by the caller (`set_tensorflow_threads`) beforehand."""

    def __init__(self, path: Path, input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME) -> None:
        super().__init__(path, None, input_name, output_name, strict=True)


class TFLiteRunner(TFLiteRuntime):
    """The core's TFLite runtime, whole batches by default (`max_chunk=None`); pass 8 to chunk like the server."""

    def __init__(self, path: Path, threads: int, fmt: str = "tflite", max_chunk: int | None = None) -> None:
        super().__init__(path, threads, fmt, max_chunk)


def open_runner(fmt: str, path: Path, threads: int, tflite_max_chunk: int | None = None) -> Runner:
    if fmt == "savedmodel":
        return SavedModelRunner(path)
    # ONNX runs whole batches here, as the checks prove large batches work; TFLite as asked.
    return open_runtime(fmt, path, threads, max_chunk=tflite_max_chunk if fmt.startswith("tflite") else None)
