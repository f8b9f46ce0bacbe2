"""Runtimes for the server: the core's (`imgcls.runtimes`), which export uses too, so what the export checked
and benchmarked is what the server runs.

Kept as a module so the server and the benchmarks go on importing `imgcls.service.runtimes`; every name
here is the core's. TensorFlow is imported inside `SavedModelRuntime` alone: serving ONNX or TFLite never
loads it.
"""

from __future__ import annotations

from imgcls.runtimes import (
    DEFAULT_ORDER,
    FALLBACK_ORDER,
    FORMATS,
    FULL_PRECISION,
    OnnxRuntime,
    Runtime,
    SavedModelRuntime,
    TFLiteRuntime,
    choose_artifact,
    default_threads,
    load_runtime,
    open_runtime,
    tensorflow_installed,
)

__all__ = [
    "DEFAULT_ORDER", "FALLBACK_ORDER", "FORMATS", "FULL_PRECISION", "OnnxRuntime", "Runtime", "SavedModelRuntime",
    "TFLiteRuntime", "choose_artifact", "default_threads", "load_runtime", "open_runtime", "tensorflow_installed",
]
