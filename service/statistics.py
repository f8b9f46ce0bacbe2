"""Per-version request, queue and compute statistics: what Triton's ModelStatistics extension reports.

Prometheus (metrics.py) is for dashboards across replicas; these are cumulative totals for one loaded version,
read by KServe v2 clients such as perf_analyzer to split a latency into queue, preprocessing and inference.
They live on the LoadedModel, so they start at zero when a version loads and go away with it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStats:
    """Cumulative totals, updated from the request, decode and batcher threads under one lock."""

    success: Duration = field(default_factory=Duration)  # requests, whole time in the server
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)  # per image
    compute_input: Duration = field(default_factory=Duration)  # per image: decode + preprocess
    compute_infer: Duration = field(default_factory=Duration)  # per batch
    inference_count: int = 0  # images through the model
    execution_count: int = 0  # batches
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)  # batch size -> compute_infer
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def request(self, ok: bool, seconds: float) -> None:
        with self.lock:
            (self.success if ok else self.fail).add(seconds)

    def preprocessed(self, seconds: float) -> None:
        with self.lock:
            self.compute_input.add(seconds)

    def batch(self, size: int, waits: list[float], seconds: float) -> None:
        with self.lock:
            self.inference_count += size
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            self.compute_infer.add(seconds)
            self.queue.add(sum(waits), len(waits))
            self.batches.setdefault(size, Duration()).add(seconds)

    def snapshot(self) -> ModelStats:
        """A consistent copy to read without holding the lock."""
        with self.lock:
            return ModelStats(
                Duration(**vars(self.success)), Duration(**vars(self.fail)), Duration(**vars(self.queue)),
                Duration(**vars(self.compute_input)), Duration(**vars(self.compute_infer)), self.inference_count,
                self.execution_count, self.last_inference_ms,
                {size: Duration(**vars(d)) for size, d in self.batches.items()})
