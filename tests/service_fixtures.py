"""A tiny model repository for the service tests and the benchmark smoke run.

Builds, with TensorFlow, what `imgcls export` writes: `REPO/NAME/VERSION/manifest.json` plus artifacts.

- `tiny/2`: 32x32 input, 3 classes, artifacts onnx, tflite, tflite-fp16, tflite-int8 and savedmodel;
- `tiny/1`: the same weights, onnx only (for version selection);
- `other/1`: 40x40 input, 4 classes, onnx only (a second model).

Building takes ~20 s, so it runs once in a subprocess (the test process stays TensorFlow-free) and the
result is cached in pytest's cache directory, keyed by this file's content. Also a script:
`python tests/service_fixtures.py --repo DIR --images DIR` (for `benchmarks/bench_service.py`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

TINY_CLASSES = ["cat", "dog", "bird"]
OTHER_CLASSES = ["red", "green", "blue", "grey"]
FIXTURE_KEY = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def sample_image(seed: int, size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> bytes:
    """A deterministic, varied photo-like image (smooth gradients plus noise), encoded."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    channels = [np.sin(xx / rng.uniform(3, 20) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(3, 20)) for _ in range(3)]
    arr = (np.stack(channels, -1) * 100 + 128 + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_images(folder: Path, count: int = 24) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        fmt, ext = (("PNG", "png") if i % 4 == 3 else ("JPEG", "jpg"))
        path = folder / f"img_{i:03d}.{ext}"
        path.write_bytes(sample_image(1000 + i, size=(64 + 8 * i, 48 + 4 * i), fmt=fmt))
        paths.append(path)
    return paths


# --- building (needs TensorFlow, tf_keras, tf2onnx) ----------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _keras_model(size: int, classes: int, seed: int):
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    inputs = tf_keras.Input((size, size, 3), name="images")
    x = tf_keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = tf_keras.layers.GlobalAveragePooling2D(name="pool")(x)
    init = tf_keras.initializers.RandomNormal(stddev=2.0, seed=seed)
    x = tf_keras.layers.Dense(classes, activation="softmax", kernel_initializer=init, name="head")(x)
    outputs = tf_keras.layers.Activation("linear", name="probabilities")(x)
    return tf_keras.Model(inputs, outputs)


def _tensor(name: str, shape: list, dtype: str = "float32", q: tuple | None = None) -> dict:
    info = {"name": name, "shape": shape, "dtype": dtype}
    if q is not None:
        info["scale"], info["zero_point"] = float(q[0]), int(q[1])
    return info


def _artifact(folder: Path, fmt: str, file: str, size: int, classes: int, benchmark: dict | None = None) -> dict:
    path = folder / file.rstrip("/")
    names, io_dtype, q_in, q_out = ("images", "probabilities"), "float32", None, None
    if fmt.startswith("tflite"):
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(path))
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        names, io_dtype = (inp["name"], out["name"]), np.dtype(inp["dtype"]).name
        if io_dtype == "int8":
            q_in, q_out = inp["quantization"], out["quantization"]
    return {
        "format": fmt, "file": file, "sha256": _sha256(path), "size_bytes": _size(path),
        "inputs": [_tensor(names[0], [None, size, size, 3], io_dtype, q_in)],
        "outputs": [_tensor(names[1], [None, classes], io_dtype, q_out)],
        "benchmark": benchmark or {},
    }


def _entry(folder: Path, name: str, version: int, size: int, classes: list[str], artifacts: list[dict]) -> None:
    from imgcls.backbones import get_backbone
    from imgcls.manifest import parse_manifest, write_manifest

    data = {
        "schema_version": 1, "kind": "model", "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "backbone": "mobilenet_v2", "preprocessing": get_backbone("mobilenet_v2").preprocessing(size).to_dict(),
        "class_names": classes, "name": name, "version": version, "artifacts": artifacts,
        "export": {"source": "tests/service_fixtures.py"},
    }
    write_manifest(folder, parse_manifest(data))


def _convert(model, folder: Path, size: int, formats: set[str], seed: int) -> None:
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="images"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=13, output_path=str(folder / "model.onnx"))
    saved = folder / "saved_model"
    model.save(str(saved), save_format="tf")
    rng = np.random.default_rng(seed)

    def representative():
        for _ in range(16):
            yield [rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)]

    for fmt, file in (("tflite", "model.tflite"), ("tflite-fp16", "model_fp16.tflite"),
                      ("tflite-int8", "model_int8.tflite")):
        if fmt not in formats:
            continue
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        if fmt == "tflite-fp16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif fmt == "tflite-int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        (folder / file).write_bytes(converter.convert())
    if "savedmodel" not in formats:
        shutil.rmtree(saved)


def build_repository(repo: Path) -> Path:
    """Write the fixture repository into `repo` (created; must not exist or be empty)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tiny2 = repo / "tiny" / "2"
    tiny2.mkdir(parents=True)
    _convert(_keras_model(32, len(TINY_CLASSES), seed=1), tiny2, 32,
             {"tflite", "tflite-fp16", "tflite-int8", "savedmodel"}, seed=1)
    n = len(TINY_CLASSES)
    _entry(tiny2, "tiny", 2, 32, TINY_CLASSES, [
        _artifact(tiny2, "savedmodel", "saved_model/", 32, n, {"batch1_p50_ms": 3.0, "batch32_images_per_s": 900}),
        _artifact(tiny2, "onnx", "model.onnx", 32, n, {"batch1_p50_ms": 0.2, "batch32_images_per_s": 9000}),
        _artifact(tiny2, "tflite", "model.tflite", 32, n, {"batch1_p50_ms": 0.3, "batch32_images_per_s": 8000}),
        _artifact(tiny2, "tflite-fp16", "model_fp16.tflite", 32, n),
        _artifact(tiny2, "tflite-int8", "model_int8.tflite", 32, n, {"batch32_images_per_s": 20000}),
    ])
    tiny1 = repo / "tiny" / "1"
    tiny1.mkdir(parents=True)
    shutil.copy(tiny2 / "model.onnx", tiny1 / "model.onnx")
    _entry(tiny1, "tiny", 1, 32, TINY_CLASSES, [_artifact(tiny1, "onnx", "model.onnx", 32, n)])
    other = repo / "other" / "1"
    other.mkdir(parents=True)
    _convert(_keras_model(40, len(OTHER_CLASSES), seed=2), other, 40, set(), seed=2)
    _entry(other, "other", 1, 40, OTHER_CLASSES, [_artifact(other, "onnx", "model.onnx", 40, len(OTHER_CLASSES))])
    return repo


def cached_repository(cache_root: Path) -> Path:
    """The fixture repository under `cache_root/<key>/repo`, built in a subprocess when missing."""
    target = cache_root / FIXTURE_KEY / "repo"
    if (target / "other" / "1" / "manifest.json").is_file():
        return target
    tmp = cache_root / f"{FIXTURE_KEY}.building.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, __file__, "--repo", str(tmp / "repo")], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"building the fixture repository failed:\n{proc.stdout}\n{proc.stderr}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target.parent, ignore_errors=True)
    os.replace(tmp, target.parent)
    return target


# --- test helpers (imported by tests/test_service_*.py; the pytest fixture is in service_plugin.py) ---------


@contextmanager
def running_server(repo: Path, runtime_hook=None, wait: bool = True, **overrides) -> Iterator:
    """A real InferenceServer on 127.0.0.1, free ports; stopped on exit whatever happened."""
    from imgcls.service.server import InferenceServer, ServeConfig

    settings = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "inference_threads": 1, "decode_workers": 2,
                "grace_period": 5.0, **overrides}
    config = ServeConfig(model_repository=repo, **settings)
    server = InferenceServer(config, runtime_hook=runtime_hook)
    try:
        server.start()
    except BaseException:
        server.stop()  # what started before the failure (loop, decode pool, gRPC port)
        raise
    try:
        if wait:
            assert server.wait_until_ready(30), "server did not become ready"
        yield server
    finally:
        server.stop()


@contextmanager
def gated_server(repo: Path, model: str = "tiny", **overrides) -> Iterator:
    """`running_server` whose `model` runs behind a GatedRuntime (warm-up calls forgotten); yields (server, gate)
    and opens the gate on exit."""
    gates: dict[str, GatedRuntime] = {}

    def hook(entry, runtime):
        gates[entry.name] = GatedRuntime(runtime)
        return gates[entry.name]

    with running_server(repo, runtime_hook=hook, **overrides) as server:
        gate = gates[model]
        gate.reset()
        try:
            yield server, gate
        finally:
            gate.gate.set()


def client_for(server, **kwargs):
    from imgcls.client.client import Client

    return Client(f"127.0.0.1:{server.port}", **kwargs)


def scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample in Prometheus text format (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class Reference:
    """The model's direct output (onnxruntime on the shared preprocessing), to check served results against."""

    def __init__(self, repo: Path, name: str = "tiny", version: int = 2) -> None:
        import onnxruntime as ort

        from imgcls.manifest import read_manifest

        folder = repo / name / str(version)
        self.manifest = read_manifest(folder)
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])

    def inputs(self, images: list[bytes]) -> np.ndarray:
        from imgcls.preprocessing import preprocess_bytes

        return np.stack([preprocess_bytes(data, self.manifest.preprocessing) for data in images])

    def probs(self, images: list[bytes]) -> np.ndarray:
        return self.session.run(None, {"images": self.inputs(images)})[0]


class GatedRuntime:
    """Wraps a runtime so a test can hold batches (gate cleared) and see what reached the model."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.format = inner.format
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[np.ndarray] = []
        self.lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.batches.append(batch.copy())
        self.entered.set()
        assert self.gate.wait(20), "test forgot to open the gate"
        return self.inner.run(batch)

    def reset(self) -> None:
        """Forget the warm-up calls."""
        with self.lock:
            self.batches.clear()
        self.entered.clear()

    def images_seen(self) -> int:
        with self.lock:
            return sum(len(b) for b in self.batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny service-test model repository.")
    parser.add_argument("--repo", type=Path, required=True, help="output repository folder (must not exist)")
    parser.add_argument("--images", type=Path, help="also write sample images here")
    args = parser.parse_args(argv)
    if args.repo.exists() and any(args.repo.iterdir()):
        parser.error(f"{args.repo} exists and is not empty")
    build_repository(args.repo)
    if args.images:
        write_images(args.images)
    print(json.dumps({"repo": str(args.repo), "images": str(args.images) if args.images else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
