"""Runtimes: one small class per artifact format, all with `run(float32 NHWC batch) -> probabilities [N, C]`.

A runtime is called from one thread only (its model's batcher), so none of them locks. TensorFlow is
imported inside `SavedModelRuntime` alone: serving ONNX or TFLite never loads it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from imgcls.errors import ImgclsError
from imgcls.manifest import Artifact, Manifest

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tflite", "tflite-fp16", "tflite-int8", "savedmodel")
FULL_PRECISION = ("onnx", "tflite", "savedmodel")  # candidates for the default; fp16/int8 only when asked
FALLBACK_ORDER = FULL_PRECISION  # when the manifest has no benchmark numbers to compare


class Runtime(Protocol):
    format: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, H, W, 3], normalized per the manifest -> float32 probabilities [N, C]."""
        ...


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class OnnxRuntime:
    format = "onnx"

    def __init__(self, path: Path, threads: int, input_name: str | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads would spin on the cores the decode workers need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        self.input_name = input_name if input_name in names else names[0]
        self.output_name = self.session.get_outputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]


class TFLiteRuntime:
    """LiteRT interpreter with XNNPACK. A TFLite interpreter has fixed shapes, and resizing one costs an arena
    reallocation, so batches run as power-of-two chunks (13 = 8 + 4 + 1), each size on its own interpreter,
    created once and kept. On CPU, XNNPACK's time per image is flat in the batch size while memory grows
    with it, so chunks stop at `max_chunk` images."""

    def __init__(self, path: Path, threads: int, fmt: str = "tflite", max_chunk: int = 8) -> None:
        self.format = fmt
        self.model = path.read_bytes()
        self.threads = threads
        self.max_chunk = max_chunk
        self._by_size: dict[int, object] = {}
        self._interpreter(1)  # fail at load time, not on the first request

    def _interpreter(self, n: int):
        interp = self._by_size.get(n)
        if interp is None:
            from ai_edge_litert.interpreter import Interpreter

            interp = Interpreter(model_content=self.model, num_threads=self.threads)
            inp = interp.get_input_details()[0]
            if int(inp["shape"][0]) != n:
                interp.resize_tensor_input(inp["index"], [n, *inp["shape"][1:]], strict=False)
            interp.allocate_tensors()
            self._by_size[n] = interp
        return interp

    def _run_chunk(self, batch: np.ndarray) -> np.ndarray:
        interp = self._interpreter(len(batch))
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        x = batch
        if inp["dtype"] in (np.int8, np.uint8):  # full-integer model: quantize with its own parameters
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

    def run(self, batch: np.ndarray) -> np.ndarray:
        outputs, start = [], 0
        while start < len(batch):
            size = min(self.max_chunk, 1 << ((len(batch) - start).bit_length() - 1))
            outputs.append(self._run_chunk(batch[start:start + size]))
            start += size
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)


class SavedModelRuntime:
    """TensorFlow SavedModel, signature `serving_default`. The only runtime that imports TensorFlow."""

    format = "savedmodel"

    def __init__(self, path: Path, threads: int, input_name: str | None, output_name: str | None) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            import tensorflow as tf
        except ImportError:
            raise ImgclsError("runtime savedmodel needs TensorFlow (pip install 'imgcls[train]')") from None
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already initialized in this process; keep its settings
            pass
        self._tf = tf
        self._fn = tf.saved_model.load(str(path)).signatures["serving_default"]
        inputs = list(self._fn.structured_input_signature[1])
        self.input_name = input_name if input_name in inputs else inputs[0]
        self.output_name = output_name

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = self._fn(**{self.input_name: self._tf.constant(batch)})
        key = self.output_name if self.output_name in out else next(iter(out))
        return out[key].numpy().astype(np.float32, copy=False)


def load_runtime(folder: Path, artifact: Artifact, threads: int) -> Runtime:
    """Instantiate the runtime for one artifact of the repository entry in `folder`."""
    path = folder / artifact.file.rstrip("/")
    if not path.exists():
        raise ImgclsError(f"{path}: artifact {artifact.format!r} named in the manifest is missing")
    input_name = artifact.inputs[0].name if artifact.inputs else None
    output_name = artifact.outputs[0].name if artifact.outputs else None
    if artifact.format == "onnx":
        return OnnxRuntime(path, threads, input_name)
    if artifact.format.startswith("tflite"):
        return TFLiteRuntime(path, threads, artifact.format)
    if artifact.format == "savedmodel":
        return SavedModelRuntime(path, threads, input_name, output_name)
    raise ImgclsError(f"unknown artifact format {artifact.format!r}")


def _batch_of(key: str) -> int:
    digits = "".join(c if c.isdigit() else " " for c in key).split()
    return int(digits[0]) if digits else 0


def _fastest(candidates: list[Artifact]) -> Artifact | None:
    """The fastest candidate by a benchmark number every candidate reports: throughput at the largest batch
    (e.g. `batch32_images_per_s`), else a p50 latency (e.g. `batch1_p50_ms`). None when there is no such number."""
    numeric = [{k for k, v in a.benchmark.items() if isinstance(v, int | float)} for a in candidates]
    common = set.intersection(*numeric) if numeric else set()
    throughput = sorted((k for k in common if k.endswith("images_per_s")), key=_batch_of)
    if throughput:
        return max(candidates, key=lambda a: a.benchmark[throughput[-1]])
    latency = sorted((k for k in common if k.endswith("_ms") and "p50" in k), key=_batch_of)
    if latency:
        return min(candidates, key=lambda a: a.benchmark[latency[0]])
    return None


def choose_artifact(manifest: Manifest, requested: str | None = None,
                    available: tuple[str, ...] = FORMATS) -> Artifact:
    """The artifact to serve: the requested format, else the fastest full-precision one by the export's
    benchmark numbers (the same kind of number for all candidates), else the first of onnx > tflite > savedmodel.
    `available` leaves out formats whose runtime library is not installed."""
    present = {a.format: a for a in manifest.artifacts}
    if requested:
        if requested not in present:
            raise ImgclsError(
                f"model {manifest.name} v{manifest.version} has no {requested!r} artifact "
                f"(it has: {', '.join(sorted(present))})"
            )
        return present[requested]
    candidates = [present[f] for f in FALLBACK_ORDER if f in present and f in available]
    if not candidates:
        raise ImgclsError(
            f"model {manifest.name} v{manifest.version} has no full-precision artifact this server can run "
            f"(it has: {', '.join(sorted(present))}); pass --runtime to pick one"
        )
    return _fastest(candidates) or candidates[0]


def tensorflow_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None
