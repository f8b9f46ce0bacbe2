"""Runtimes and artifact checksums, shared by export (checks, benchmark) and service (serving).

One class per artifact format, all with `run(float32 NHWC batch) -> float32 probabilities [N, C]`:
onnxruntime for `onnx`, the LiteRT interpreter (XNNPACK) for `tflite*`, TensorFlow for `savedmodel`. Export
and service used to keep a copy each and the copies drifted (thread settings, input names, chunking); here
there is one, so what the export checks and benchmarks is exactly what the server runs.

A runtime is called from one thread only (its model's batcher, or the export), so none of them locks.
TensorFlow is imported lazily inside `SavedModelRuntime` (via importlib, so the core never names it in an
import statement): serving ONNX or TFLite never loads it.

The default runtime (`choose_artifact`) is a fixed preference order, `DEFAULT_ORDER`, not the export's
benchmark numbers: those are noisy on a shared machine and made three exports of one bundle pick three
different runtimes, SavedModel among them (13 s to load, ~3x the memory, 35% slower to serve). The order
is justified by the measurements in docs/export.md.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from imgcls.cpus import usable_cpus
from imgcls.errors import ImgclsError
from imgcls.manifest import Artifact, Manifest

FORMATS = ("onnx", "tflite", "tflite-fp16", "tflite-int8", "savedmodel")
FULL_PRECISION = ("onnx", "tflite", "savedmodel")  # candidates for the default; fp16/int8 only when asked
# The server's default among the full-precision artifacts, first present wins (see docs/export.md for the
# measurements behind it). SavedModel is last and only ever chosen when neither ONNX nor TFLite exists.
DEFAULT_ORDER = ("tflite", "onnx", "savedmodel")
FALLBACK_ORDER = DEFAULT_ORDER  # the older name
TREE_METHOD = "tree: sha256 of sorted 'relpath NUL sha256' lines"


class Runtime(Protocol):
    format: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, H, W, 3], normalized per the manifest -> float32 probabilities [N, C]."""
        ...


def default_threads() -> int:
    """Threads for a runtime (and decode workers) when not told: the CPUs this process may use, which is
    the smaller of its affinity and its cgroup CPU quota (`imgcls.cpus`)."""
    return usable_cpus()


def tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def import_tensorflow() -> Any:
    """TensorFlow, imported on first use only, with its C++ logging quietened; a clear error without it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return importlib.import_module("tensorflow")
    except ImportError:
        raise ImgclsError("runtime savedmodel needs TensorFlow (pip install 'imgcls[train]')") from None


def set_tensorflow_threads(threads: int) -> bool:
    """Pin TensorFlow's thread pools; False when TF already started with other sizes (they cannot change)."""
    tf = import_tensorflow()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        return True
    except RuntimeError:
        return tf.config.threading.get_intra_op_parallelism_threads() == threads


# --- runtimes ---------------------------------------------------------------------------------------------------


class OnnxRuntime:
    """onnxruntime on CPU: explicit intra-op threads, one inter-op thread, sequential execution.

    Idle intra-op threads never spin: they would take the cores the decode workers need. With `spin` they
    spin within a run, between one operator and the next, and stop when the run returns
    ("session.force_spinning_stop"). That is for a runtime that runs alone (the server's lone-batch runtime):
    waking a sleeping thread for each of a model's operators cost MobileNetV2 about 1.5 ms of its 7.5-8 ms at
    batch 1 on 2 cores, and the spinning ends with the run.
    """

    format = "onnx"

    def __init__(self, path: Path, threads: int, input_name: str | None = None, max_chunk: int | None = None,
                 *, spin: bool = False) -> None:
        import onnxruntime as ort

        self.max_chunk = max_chunk  # larger batches run in pieces of this size: the memory arena stays that small

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin and threads > 1 else "0")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        self.input_name = input_name if input_name in names else names[0]
        self.output_name = self.session.get_outputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, np.float32)
        if self.max_chunk is None or len(x) <= self.max_chunk:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        return np.concatenate([self.session.run([self.output_name], {self.input_name: x[i:i + self.max_chunk]})[0]
                               for i in range(0, len(x), self.max_chunk)])


class TFLiteRuntime:
    """LiteRT interpreter with XNNPACK. A TFLite interpreter has fixed shapes, and resizing one costs an arena
    reallocation, so batches run as power-of-two chunks (13 = 8 + 4 + 1), each size on its own interpreter,
    created once and kept. On CPU, XNNPACK's time per image is flat in the batch size while memory grows
    with it, so chunks stop at `max_chunk` images (None: the whole batch on one interpreter, as the export's
    checks do to prove large batches work). int8 models are fed and read with their own scale/zero point."""

    def __init__(self, path: Path, threads: int, fmt: str = "tflite", max_chunk: int | None = 8) -> None:
        self.format = fmt
        self.model = Path(path).read_bytes()
        self.threads = threads
        self.max_chunk = max_chunk
        self._by_size: dict[int, Any] = {}
        self._interpreter(1)  # fail at load time, not on the first request

    def _interpreter(self, n: int) -> Any:
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
        if self.max_chunk is None:
            return self._run_chunk(batch)
        outputs, start = [], 0
        while start < len(batch):
            size = min(self.max_chunk, 1 << ((len(batch) - start).bit_length() - 1))
            outputs.append(self._run_chunk(batch[start:start + size]))
            start += size
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)


class SavedModelRuntime:
    """TensorFlow SavedModel, signature `serving_default`. The only runtime that imports TensorFlow.

    `threads` pins TensorFlow's pools when it has not started yet (None leaves them). `strict` (the export)
    requires the bundle contract: exactly the named input and output, input [None, H, W, 3]; otherwise
    (the server) the first input and output stand in for missing names."""

    format = "savedmodel"

    def __init__(self, path: Path, threads: int | None = None, input_name: str | None = None,
                 output_name: str | None = None, *, strict: bool = False) -> None:
        tf = import_tensorflow()
        if threads is not None:
            set_tensorflow_threads(threads)
        self._tf = tf
        try:
            self._fn = tf.saved_model.load(str(path)).signatures["serving_default"]
        except KeyError:
            raise ImgclsError(f"{path}: SavedModel has no 'serving_default' signature") from None
        except (OSError, ValueError) as exc:
            raise ImgclsError(f"{path}: not a loadable SavedModel ({str(exc).splitlines()[0]})") from None
        inputs = self._fn.structured_input_signature[1]
        outputs = self._fn.structured_outputs
        if strict:
            if input_name not in inputs or output_name not in outputs:
                raise ImgclsError(f"{path}: serving_default must map '{input_name}' to '{output_name}', "
                                  f"found inputs {sorted(inputs)} and outputs {sorted(outputs)}")
            shape = inputs[input_name].shape
            if shape.rank != 4 or shape[0] is not None:
                raise ImgclsError(f"{path}: input '{input_name}' must be [None, H, W, 3] (dynamic batch), "
                                  f"found {shape}")
        self.input_name = input_name if input_name in inputs else next(iter(inputs))
        self.output_name = output_name if output_name in outputs else next(iter(outputs))
        self.input_spec, self.output_spec = inputs[self.input_name], outputs[self.output_name]

    @property
    def fn(self) -> Any:
        """The loaded `serving_default` concrete function."""
        return self._fn

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = self._fn(**{self.input_name: self._tf.constant(batch, self._tf.float32)})
        key = self.output_name if self.output_name in out else next(iter(out))
        return out[key].numpy().astype(np.float32, copy=False)


def serving_chunk(fmt: str, threads: int) -> int | None:
    """Largest batch one runtime call computes when serving; bigger batches run in chunks (None: whole).

    Measured on 2 cores with the flowers MobileNetV2 (2026-11-30, docs/scaling.md). onnxruntime in chunks of 8
    is as fast as whole batches of 16-32, and its memory arena grows to what the largest call needed: about
    80 MiB for 8 images against 340 MiB for 32, per session; single-threaded, chunks of 4 are as fast again
    (35 MiB). Single-threaded TFLite (XNNPACK) is as fast one image at a time, on one interpreter instead of
    four (1, 2, 4, 8): 38 against 157 MiB. Two or more threads need larger batches to share out, so they
    keep chunks of 8."""
    if fmt == "onnx":
        return 8 if threads > 1 else 4
    if fmt.startswith("tflite"):
        return 8 if threads > 1 else 1
    return None


def open_runtime(fmt: str, path: Path, threads: int, *, input_name: str | None = None,
                 output_name: str | None = None, max_chunk: int | str | None = "auto", spin: bool = False) -> Runtime:
    """A runtime for the artifact file or folder `path` of format `fmt`; `max_chunk`: the largest batch one
    call computes ("auto": `serving_chunk`, None: whole batches, as the export's checks run them); `spin`:
    threads spin within a run (onnxruntime only; `OnnxRuntime`), for a runtime that runs alone."""
    chunk = serving_chunk(fmt, threads) if max_chunk == "auto" else max_chunk
    assert chunk is None or isinstance(chunk, int)
    if fmt == "onnx":
        return OnnxRuntime(path, threads, input_name, chunk, spin=spin)
    if fmt.startswith("tflite") and fmt in FORMATS:
        return TFLiteRuntime(path, threads, fmt, chunk)
    if fmt == "savedmodel":
        return SavedModelRuntime(path, threads, input_name, output_name)
    raise ImgclsError(f"unknown artifact format {fmt!r}")


def load_runtime(folder: Path, artifact: Artifact, threads: int, *, spin: bool = False) -> Runtime:
    """Instantiate the runtime for one artifact of the repository entry in `folder` (`spin`: `open_runtime`)."""
    path = Path(folder) / artifact.file.rstrip("/")
    if not path.exists():
        raise ImgclsError(f"{path}: artifact {artifact.format!r} named in the manifest is missing")
    input_name = artifact.inputs[0].name if artifact.inputs else None
    output_name = artifact.outputs[0].name if artifact.outputs else None
    return open_runtime(artifact.format, path, threads, input_name=input_name, output_name=output_name, spin=spin)


def choose_artifact(manifest: Manifest, requested: str | None = None,
                    available: tuple[str, ...] = FORMATS) -> Artifact:
    """The artifact to serve: the requested format, else the first full-precision one present in
    `DEFAULT_ORDER` (never SavedModel while ONNX or TFLite exists). Benchmark numbers in the manifest are
    not consulted: the choice must not change between two exports of one bundle. `available` leaves out
    formats whose runtime library is not installed."""
    present = {a.format: a for a in manifest.artifacts}
    if requested:
        if requested not in present:
            raise ImgclsError(
                f"model {manifest.name} v{manifest.version} has no {requested!r} artifact "
                f"(it has: {', '.join(sorted(present))})"
            )
        return present[requested]
    for fmt in DEFAULT_ORDER:
        if fmt in present and fmt in available:
            return present[fmt]
    raise ImgclsError(
        f"model {manifest.name} v{manifest.version} has no full-precision artifact this server can run "
        f"(it has: {', '.join(sorted(present))}); pass --runtime to pick one"
    )


# --- checksums --------------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(folder: Path) -> str:
    """A folder's hash (saved_model/): sha256 over the sorted lines `relpath NUL sha256(file) LF`, so the same
    files hash the same whatever order the file system lists them in."""
    folder = Path(folder)
    lines = sorted(f"{p.relative_to(folder).as_posix()}\0{file_sha256(p)}\n" for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def checksum(path: Path) -> tuple[str, int]:
    """(sha256, size in bytes) of a file, or the tree hash and total size of a folder: what export writes."""
    path = Path(path)
    if path.is_dir():
        return tree_sha256(path), sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return file_sha256(path), path.stat().st_size


def verify_checksum(folder: Path, artifact: Artifact) -> None:
    """Check an artifact against the manifest's sha256 (what `checksum` wrote at export). Folders are checked
    only when the manifest says they carry the tree hash (`sha256_method: "tree: ..."`)."""
    path = Path(folder) / artifact.file.rstrip("/")
    if path.is_file():
        actual = file_sha256(path)
    elif path.is_dir() and str((artifact.model_extra or {}).get("sha256_method", "")).startswith("tree"):
        actual = tree_sha256(path)
    else:
        return
    if actual != artifact.sha256:
        raise ImgclsError(f"{path}: sha256 does not match the manifest (corrupt or replaced file)")
