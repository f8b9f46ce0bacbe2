"""Per-version request, queue and compute statistics: what Triton's ModelStatistics extension reports.

Prometheus (metrics.py) is for dashboards across replicas; these are cumulative totals for one loaded version,
read by KServe v2 clients such as perf_analyzer to split a latency into queue, preprocessing and inference.
They live on the LoadedModel, so they start at zero when a version loads and go away with it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from imgcls.service.batcher import Job


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStats:
    """Cumulative totals, updated from the request and batcher threads under one lock.

    As in Triton, success, queue and the three compute durations count successful requests (perf_analyzer
    refuses statistics whose compute counts differ) and add each request's own time; execution_count and
    batch_stats count batches.
    """

    success: Duration = field(default_factory=Duration)  # requests, whole time in the server
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)  # waiting in the batcher's queue
    compute_input: Duration = field(default_factory=Duration)  # decode + preprocess
    compute_infer: Duration = field(default_factory=Duration)  # the batches the request was part of
    compute_output: Duration = field(default_factory=Duration)  # from the last result to the response
    inference_count: int = 0  # images through the model
    execution_count: int = 0  # batches
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)  # batch size -> compute_infer
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")

    def request(self, ok: bool, seconds: float, job: Job | None = None) -> None:
        """A finished inference call; `job` (absent when it failed before admission) splits its time."""
        with self.lock:
            if not ok:
                self.fail.add(seconds)
                return
            self.success.add(seconds)
            parts = (0.0, 0.0, 0.0, 0.0)
            if job is not None and job.done_at > 0:
                parts = (job.queue_s, job.input_s, job.infer_s, max(0.0, time.monotonic() - job.done_at))
            split = (self.queue, self.compute_input, self.compute_infer, self.compute_output)
            for duration, part in zip(split, parts, strict=True):
                duration.add(part)

    def batch(self, size: int, seconds: float) -> None:
        with self.lock:
            self.inference_count += size
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            self.batches.setdefault(size, Duration()).add(seconds)

    def snapshot(self) -> ModelStats:
        """A consistent copy to read without holding the lock."""
        with self.lock:
            return ModelStats(
                Duration(**vars(self.success)), Duration(**vars(self.fail)), Duration(**vars(self.queue)),
                Duration(**vars(self.compute_input)), Duration(**vars(self.compute_infer)),
                Duration(**vars(self.compute_output)), self.inference_count,
                self.execution_count, self.last_inference_ms,
                {size: Duration(**vars(d)) for size, d in self.batches.items()})

    def add(self, other: ModelStats) -> ModelStats:
        """Add another process's totals for the same version (`--workers`); last_inference is the later."""
        for name in self.DURATIONS:
            mine, theirs = getattr(self, name), getattr(other, name)
            mine.count += theirs.count
            mine.ns += theirs.ns
        self.inference_count += other.inference_count
        self.execution_count += other.execution_count
        self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)
        for size, d in other.batches.items():
            self.batches.setdefault(size, Duration()).add(0.0, d.count)
            self.batches[size].ns += d.ns
        return self

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: asdict(getattr(self, name)) for name in self.DURATIONS}
        out.update(inference_count=self.inference_count, execution_count=self.execution_count,
                   last_inference_ms=self.last_inference_ms,
                   batches={str(size): asdict(d) for size, d in self.batches.items()})
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelStats:
        return cls(**{name: Duration(**data[name]) for name in cls.DURATIONS},
                   inference_count=data["inference_count"], execution_count=data["execution_count"],
                   last_inference_ms=data["last_inference_ms"],
                   batches={int(size): Duration(**d) for size, d in data["batches"].items()})
