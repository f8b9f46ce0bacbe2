"""Latency and throughput of each artifact with the runtime the service uses, threads set explicitly.

Batch 1: median and p90 latency over `batch1_runs` calls after a warm-up. Batch 32: throughput from the
median time of `batch_runs` calls (the median, not the mean, because the machine is shared). The keys:
`batch1_p50_ms`, `batch1_p90_ms`, `batch32_images_per_s`, `threads`. They describe the artifact; the server
does not pick its runtime by them (they move with a neighbour's load, and did pick three runtimes for three
exports of one bundle): it uses a fixed order, see docs/export.md.
The runners mirror the service's settings: onnxruntime without spinning threads, TFLite batches run as
power-of-two chunks of at most 8 on cached interpreters (`tflite_max_chunk`; XNNPACK time per image is
flat in the batch size, memory is not).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np

from imgcls.cpus import cpu_limits

from .runners import Runner


@dataclass(frozen=True)
class BenchSettings:
    threads: int
    batch1_runs: int = 50
    batch_runs: int = 10
    warmup: int = 3
    batch_size: int = 32
    tflite_max_chunk: int | None = 8  # the service runs TFLite batches in power-of-two chunks of at most 8

    def describe(self) -> dict:
        return {**asdict(self), "machine": machine()}


def machine() -> dict:
    limits = cpu_limits()  # affinity and cgroup quota: a container's --cpus shows here, not the host's cores
    return {"cpu": platform.processor() or platform.machine(), "cores_available": limits.usable,
            "cpu_affinity": limits.affinity, "cpu_quota": limits.quota,
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def _times(fn, x: np.ndarray, runs: int) -> np.ndarray:
    out = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        fn(x)
        out[i] = time.perf_counter() - t0
    return out


def tile(images: np.ndarray, n: int) -> np.ndarray:
    """`n` inputs made of the given (normalized) images, repeated as needed."""
    reps = -(-n // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:n], dtype=np.float32)


def benchmark(runner: Runner, images: np.ndarray, settings: BenchSettings) -> dict:
    """Benchmark figures for one runner on real (normalized float32) images."""
    one = tile(images, 1)
    many = tile(images, settings.batch_size)
    for _ in range(settings.warmup):
        runner.run(one)
    runner.run(many)
    single = _times(runner.run, one, settings.batch1_runs) * 1000
    batched = _times(runner.run, many, settings.batch_runs)
    b = settings.batch_size
    return {
        "load_1m": round(os.getloadavg()[0], 2),  # the machine may be shared: context for the figures
        "threads": settings.threads,
        "batch1_p50_ms": round(float(np.median(single)), 3),
        "batch1_p90_ms": round(float(np.percentile(single, 90)), 3),
        "batch1_runs": settings.batch1_runs,
        f"batch{b}_p50_ms": round(float(np.median(batched)) * 1000, 3),
        f"batch{b}_images_per_s": round(b / float(np.median(batched)), 2),
        f"batch{b}_runs": settings.batch_runs,
        **({"tflite_max_chunk": settings.tflite_max_chunk} if getattr(runner, "max_chunk", None) else {}),
    }
