"""Triton's own Python backend serving a repository model, without pytriton's proxy: the same job as `imgcls serve`.

This file has two roles. Run as a script (inside .venv-peers, started by benchmarks/bench_peers.py), it writes a
Triton model repository into a temporary folder, with this file as the model's `model.py`, and runs the
`tritonserver` binary that nvidia-pytriton bundles. Loaded by Triton's Python backend stub, its
`TritonPythonModel` takes a BYTES tensor [N, 1] of encoded images, decodes and preprocesses them with
`imgcls.preprocessing` (manifest spec, decode thread pool) and runs the ONNX file with imgcls's onnxruntime
session options, inside the stub: one process hop less than pytriton (benchmarks/triton_model.py), whose
callable lives in a separate Python process. Triton's dynamic batcher gets imgcls's batch size and delay.

    python benchmarks/triton_backend.py --model-repository runs/repo --model flowers --grpc-port P --http-port Q
        --metrics-port R
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"


class TritonPythonModel:
    """The model as Triton's Python backend loads it (`model.py`, in the stub's interpreter: the peers venv)."""

    def initialize(self, args: dict) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}

        from imgcls.preprocessing import preprocess_bytes
        from imgcls.service import repository, runtimes

        entry = next(e for e in repository.scan(Path(params["repository"])) if e.name == params["model"])
        artifact = runtimes.choose_artifact(entry.manifest, "onnx")
        self.runtime = runtimes.load_runtime(entry.folder, artifact, int(params["threads"]),
                                             spin=params.get("spin") == "1")
        self.spec = entry.manifest.preprocessing
        self.preprocess = preprocess_bytes
        self.pool = ThreadPoolExecutor(int(params["decode_workers"]), thread_name_prefix="decode")
        self.np = np
        self.runtime.run(np.zeros((1, *self.spec.input_size, 3), np.float32))  # warm-up, as imgcls does

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        np = self.np
        arrays = [pb_utils.get_input_tensor_by_name(r, INPUT_NAME).as_numpy().reshape(-1) for r in requests]
        try:
            x = np.stack(list(self.pool.map(lambda d: self.preprocess(bytes(d), self.spec), np.concatenate(arrays))))
            y = self.runtime.run(x).astype(np.float32, copy=False)
        except Exception as exc:  # one bad image fails its batch here; a benchmark sends none
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        bounds = np.cumsum([len(a) for a in arrays])[:-1]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT_NAME, part)])
                for part in np.split(y, bounds)]


def config_pbtxt(args: argparse.Namespace, classes: int) -> str:
    params = {"repository": str(args.model_repository.resolve()),
              "model": args.model, "threads": str(args.threads), "decode_workers": str(args.decode_workers),
              "spin": "1" if args.spin else "0"}
    parameters = "\n".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items())
    return f"""name: "{args.model}"
backend: "python"
max_batch_size: {args.max_batch_size}
input [{{ name: "{INPUT_NAME}" data_type: TYPE_STRING dims: [1] }}]
output [{{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [{classes}] }}]
dynamic_batching {{ max_queue_delay_microseconds: {round(args.max_queue_delay_ms * 1000)} }}
instance_group [{{ count: {args.instances} kind: KIND_CPU }}]
{parameters}
"""


def layout(root: Path, args: argparse.Namespace, classes: int) -> tuple[Path, Path]:
    """tritonserver and its Python backend (with the stub for this Python) and a one-model repository."""
    import pytriton

    bundled = Path(pytriton.__file__).parent / "tritonserver"
    server = root / "tritonserver"
    shutil.copytree(bundled, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    shutil.copy2(bundled / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
                 / "triton_python_backend_stub", server / "backends" / "python")
    model = root / "models" / args.model
    (model / "1").mkdir(parents=True)
    shutil.copy2(__file__, model / "1" / "model.py")
    (model / "config.pbtxt").write_text(config_pbtxt(args, classes))
    return server, root / "models"


def run_server(server: Path, models: Path, args: argparse.Namespace) -> int:
    """tritonserver in the foreground; prints `triton ready:` once the model is loaded, stops it on SIGTERM."""
    import os

    import pytriton

    libs = [str(Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
    # The stub embeds libpython (LIBDIR) and finds its prefix through `python3` on PATH, as pytriton arranges it:
    # this venv's bin first, so the stub runs in this venv (its NumPy, its editable imgcls). Without it the stub
    # used the base installation's packages and its BYTES inputs arrived as garbage.
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join([*libs, os.environ.get("LD_LIBRARY_PATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    cmd = [str(server / "bin" / "tritonserver"), "--model-repository", str(models),
           "--backend-directory", str(server / "backends"), "--grpc-address", "127.0.0.1",
           "--grpc-port", str(args.grpc_port), "--http-address", "127.0.0.1", "--http-port", str(args.http_port),
           "--metrics-port", str(args.metrics_port), "--allow-gpu-metrics", "false", "--exit-on-error", "true",
           "--exit-timeout-secs", "5",
           "--backend-config", "python,shm-default-byte-size=16777216"]  # a batch of 32 photos
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def forward(signum, frame) -> None:
        proc.terminate()  # tritonserver drains and exits on SIGTERM

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    threading.Thread(target=_relay, args=(proc, args.model), daemon=True).start()
    return proc.wait()


def _relay(proc: subprocess.Popen, model: str) -> None:
    loaded = grpc = False
    for line in proc.stdout:
        sys.stdout.write(line)
        loaded |= f"successfully loaded '{model}'" in line
        grpc |= "Started GRPCInferenceService" in line
        if loaded and grpc:
            print(f"triton ready: model {model}", flush=True)
            loaded = grpc = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    # bench_peers.py passes `imgcls serve`'s defaults (service/server.py ServeConfig).
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--spin", action="store_true",
                        help="onnxruntime threads spin within a run, as imgcls's lone-batch runtime does")
    parser.add_argument("--instances", type=int, default=1, help="model instances (each its own stub)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    args = parser.parse_args(argv)

    from imgcls.service import repository

    entry = next((e for e in repository.scan(args.model_repository) if e.name == args.model), None)
    if entry is None:
        parser.error(f"--model {args.model}: not in {args.model_repository}")
    with tempfile.TemporaryDirectory(prefix="triton-backend-") as tmp:
        server, models = layout(Path(tmp), args, len(entry.manifest.class_names))
        return run_server(server, models, args)


if __name__ == "__main__":
    sys.exit(main())
