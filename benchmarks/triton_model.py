"""Serve a repository model with NVIDIA Triton (through nvidia-pytriton) doing the same job as `imgcls serve`.

Runs inside .venv-peers (`make peers-env`), started by benchmarks/bench_peers.py. The model takes a BYTES
tensor [N, 1] of encoded images, as imgcls's KServe v2 endpoint does, and returns FP32 probabilities [N, C].
Decoding and preprocessing happen in the Python callable with the same `imgcls.preprocessing` code and the
same manifest spec, so Triton does the same work per request as imgcls's server-side decode; onnxruntime gets
the same session options (imgcls.service.runtimes.OnnxRuntime), and Triton's dynamic batcher the same
maximum batch size and queue delay as `imgcls serve`'s defaults.

    python benchmarks/triton_model.py --model-repository runs/repo --model flowers --grpc-port P --http-port Q
        --metrics-port R
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from imgcls.preprocessing import preprocess_bytes
from imgcls.service import repository, runtimes

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"


def python_lib_dir() -> str:
    """The running Python's own lib folder: Triton's Python backend stub must load this libpython, not the
    system's (a different build that fails to start the stub)."""
    return sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """pytriton's serve() stops tritonserver and removes its workspace on KeyboardInterrupt. A process started in
    the background of a non-interactive shell inherits SIGINT ignored, so install the handlers explicitly, and
    treat SIGTERM the same way."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def make_infer(entry, threads: int, decode_workers: int, spin: bool = False):
    """The batched callable: encoded bytes [N, 1] -> probabilities [N, C], decoding on a thread pool (Pillow
    releases the GIL) the way imgcls's decode workers do."""
    from pytriton.decorators import batch

    runtime = runtimes.load_runtime(entry.folder, runtimes.choose_artifact(entry.manifest, "onnx"), threads,
                                      spin=spin)
    spec = entry.manifest.preprocessing
    pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="decode")
    runtime.run(np.zeros((1, *spec.input_size, 3), np.float32))  # warm-up, as imgcls does before SERVING

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        encoded = inputs[INPUT_NAME].reshape(-1)
        x = np.stack(list(pool.map(lambda d: preprocess_bytes(bytes(d), spec), encoded)))
        return {OUTPUT_NAME: runtime.run(x).astype(np.float32, copy=False)}

    return infer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    # bench_peers.py passes `imgcls serve`'s defaults (service/server.py ServeConfig, not importable here: this
    # environment has none of the server's dependencies).
    parser.add_argument("--threads", type=int, default=runtimes.default_threads(), help="onnxruntime threads")
    parser.add_argument("--spin", action="store_true",
                        help="onnxruntime threads spin within a run, as imgcls's lone-batch runtime does")
    parser.add_argument("--decode-workers", type=int, default=runtimes.default_threads())
    parser.add_argument("--instances", type=int, default=1, help="model instances (each its own session)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    stop_on_signals()

    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (python_lib_dir(), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    entry = next((e for e in repository.scan(args.model_repository) if e.name == args.model), None)
    if entry is None:
        parser.error(f"--model {args.model}: not in {args.model_repository}")
    classes = len(entry.manifest.class_names)
    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=args.grpc_port, http_address="127.0.0.1",
                          http_port=args.http_port, metrics_port=args.metrics_port, allow_gpu_metrics=False,
                          exit_on_error=True)
    # perf_analyzer reads the statistics endpoint, which pytriton restricts by default.
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        triton.bind(
            model_name=entry.name,
            infer_func=[make_infer(entry, args.threads, args.decode_workers, args.spin) for _ in range(args.instances)],
            inputs=[Tensor(name=INPUT_NAME, dtype=bytes, shape=(1,))],
            outputs=[Tensor(name=OUTPUT_NAME, dtype=np.float32, shape=(classes,))],
            config=ModelConfig(max_batch_size=args.max_batch_size, batcher=DynamicBatcher(
                max_queue_delay_microseconds=round(args.max_queue_delay_ms * 1000))),
            strict=True,
        )
        print(f"triton ready: grpc 127.0.0.1:{args.grpc_port}, model {entry.name} v{entry.version}", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
