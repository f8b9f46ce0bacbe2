"""Prometheus metrics, in a registry per server (so tests can run several servers in one process).

Histograms, not summaries, so they aggregate across replicas. Names carry their unit and counters end
in `_total`, per the Prometheus naming conventions.

With `--workers N` every serving process writes its values to prometheus-client's multiprocess folder
(PROMETHEUS_MULTIPROC_DIR, set by the supervisor before a worker starts) and the supervisor alone serves
/metrics, summing them: a request is counted once, by the process that answered it. Gauges say how they
combine (`multiprocess_mode`): queue depth and calls in flight add up over live processes, the loaded-model
gauges take the largest value (every worker loads the same versions).

Beside the request metrics, every /metrics has the process basics and what is running (issue 19):
`imgcls_build_info` (1, with the versions as labels) and `python_info`; a single process adds prometheus-client's
standard `process_*` (CPU, memory, file descriptors) and `python_gc_*` collectors. Those are per process and
multiprocess mode cannot add them up, so under `--workers` /metrics shows the supervisor's own `process_*`
(the pod's main process) plus `imgcls_worker_*{worker="1".."N"}` read from each live worker's /proc at scrape
time, and no `python_gc_*`. docs/metrics.md is the reference (tests/test_metrics_reference.py holds it to
what a real server serves).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import imgcls

# No `X_created` series beside each counter and histogram (prometheus-client's default adds one per label set, a
# gauge holding its creation time that nothing here reads): it doubles the series, and multiprocess mode has none,
# so one process and --workers now serve the same families (docs/metrics.md). Process-wide, which suits a server.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Distributions named in imgcls_build_info, as label -> distribution (the runtimes that decide the answers).
BUILD_PACKAGES = {"grpcio": "grpcio", "onnxruntime": "onnxruntime", "litert": "ai-edge-litert"}


def build_labels() -> dict[str, str]:
    """imgcls_build_info's labels: imgcls' version, the Python version and the serving libraries' versions."""
    labels = {"version": imgcls.__version__, "python": platform.python_version()}
    for label, dist in BUILD_PACKAGES.items():
        try:
            labels[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            labels[label] = "none"
    return labels


class BuildInfoCollector(Collector):
    """`imgcls_build_info{version,python,grpcio,onnxruntime,litert} 1`. A collector rather than an Info metric:
    it reads nothing from the multiprocess folder (Info has no multiprocess mode), so the supervisor and a
    single server say the same."""

    def __init__(self) -> None:
        self.labels = build_labels()

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("imgcls_build_info", "Always 1; the labels say which imgcls and which "
                                   "libraries serve.", labels=list(self.labels))
        family.add_metric(list(self.labels.values()), 1)
        yield family


class WorkerProcessCollector(Collector):
    """`imgcls_worker_*{worker}`: prometheus-client's process collector run on each live worker's pid (the
    supervisor's view of /proc/PID), renamed from `process_*`. Only under `--workers`, where each worker's
    process metrics would otherwise be invisible (multiprocess mode sums metric files, not /proc)."""

    def __init__(self, workers: Callable[[], dict[str, int]]) -> None:
        self.workers = workers  # worker label -> pid, asked at every scrape (workers are replaced)

    def collect(self) -> Iterable[Metric]:
        from prometheus_client import ProcessCollector

        families: dict[str, Metric] = {}
        for worker, pid in sorted(self.workers().items()):
            per_pid = ProcessCollector(pid=lambda pid=pid: pid, registry=None)
            for family in per_pid.collect():  # nothing for a pid that is gone
                name = "imgcls_worker_" + family.name.removeprefix("process_")
                out = families.setdefault(name, Metric(name, f"Per worker (--workers): {family.documentation}",
                                                       family.type))
                for sample in family.samples:
                    out.add_sample("imgcls_worker_" + sample.name.removeprefix("process_"),
                                   {**sample.labels, "worker": worker}, sample.value)
        return list(families.values())


def _add_standard_collectors(registry: CollectorRegistry, *, gc: bool = True) -> None:
    """prometheus-client's process, platform and GC collectors (the ones its default registry has), on a
    registry of our own. New instances, not the default registry's: those would register there twice."""
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    if gc:
        GCCollector(registry=registry)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.request_latency = Histogram(
            "imgcls_request_duration_seconds", "Time from receiving a request to sending its response.",
            ["method", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "imgcls_queue_wait_seconds",
            "Time an image waited from admission to its batch: for a decode worker and in the batcher queue "
            "(decoding itself excluded).",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.preprocess_latency = Histogram(
            "imgcls_preprocess_duration_seconds", "Decode, orient, resize and normalize time per image.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_latency = Histogram(
            "imgcls_inference_duration_seconds", "Runtime time per batch.",
            ["model", "runtime"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "imgcls_batch_size", "Images per batch formed by the dynamic batcher.",
            ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.requests = Counter(
            "imgcls_requests", "Requests answered, by gRPC status code.",
            ["method", "model", "version", "code"], registry=r)
        self.images = Counter(
            "imgcls_images", "Images handled, by outcome (OK = classified).",
            ["model", "version", "code"], registry=r)
        self.wasted_images = Counter(
            "imgcls_wasted_images", "Images computed for requests that had already failed (cancelled, or past "
            "their deadline when the batch finished).", ["model"], registry=r)
        self.expired_images = Counter(
            "imgcls_expired_images", "Admitted images dropped before compute because their deadline passed.",
            ["model"], registry=r)
        self.queue_depth = Gauge(
            "imgcls_queue_depth", "Images admitted and waiting for inference (decoding or queued).",
            ["model"], registry=r, multiprocess_mode="livesum")
        self.admitted_images = Gauge(
            "imgcls_admitted_images", "Images admitted and not yet answered (decoding, queued or in a running "
            "batch): what --max-queue-size bounds.", ["model"], registry=r, multiprocess_mode="livesum")
        self.shedding = Gauge(
            "imgcls_shedding", "1 while the model sheds load: after a refusal at --max-queue-size it admits only "
            "--overload-target-ms of work, until it has refused nothing for a second or for 1-32 s at most.",
            ["model"], registry=r, multiprocess_mode="livemax")
        self.inflight = Gauge("imgcls_inflight_requests", "Requests being handled.", ["method"], registry=r,
                              multiprocess_mode="livesum")
        self.model_loaded = Gauge(
            "imgcls_model_loaded", "1 for each model version loaded and serving.",
            ["model", "version", "backbone", "runtime"], registry=r, multiprocess_mode="livemax")
        self.model_load_seconds = Gauge(
            "imgcls_model_load_duration_seconds", "Time to load and warm up a model version.",
            ["model", "version", "runtime"], registry=r, multiprocess_mode="livemax")
        self.model_load_failures = Counter(
            "imgcls_model_load_failures", "Model versions that failed to load, verify or pass the probe.",
            ["model", "version"], registry=r)
        self.model_swaps = Counter(
            "imgcls_model_swaps", "Changes of the set of versions served (hot reload: loads and unloads).",
            ["model"], registry=r)
        r.register(BuildInfoCollector())
        _add_standard_collectors(r)

    def exposition(self) -> bytes:
        """/metrics in Prometheus text format: this registry's, or with --workers every process's sum (what the
        supervisor's metrics port serves), so the HTTP port's imgcls_* agree with it whichever worker answers.
        A worker does not know its siblings' pids: here the process_* are the answering worker's and there is no
        imgcls_worker_* (the metrics port, which the ServiceMonitor scrapes, has them)."""
        from prometheus_client import generate_latest

        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            return generate_latest(self.registry)
        return generate_latest(multiprocess_registry(folder))

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Start the /metrics HTTP server in a daemon thread; returns the http server (has `server_port`)."""
        httpd, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return httpd


def multiprocess_registry(folder: str, workers: Callable[[], dict[str, int]] | None = None) -> CollectorRegistry:
    """What /metrics shows under `--workers`: every process's imgcls_* values summed (prometheus-client's
    multiprocess mode), imgcls_build_info and python_info, this process's own process_* (the supervisor's,
    when it serves), and with `workers` (label -> pid) each worker's process metrics as imgcls_worker_*.
    No python_gc_*: one process's garbage collector says nothing about the others."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)
    registry.register(BuildInfoCollector())
    _add_standard_collectors(registry, gc=False)
    if workers is not None:
        registry.register(WorkerProcessCollector(workers))
    return registry


def serve_multiprocess(folder: str, port: int, addr: str = "0.0.0.0",
                       workers: Callable[[], dict[str, int]] | None = None):
    """/metrics for all serving processes (`--workers`): the sum of what each wrote to `folder`, plus the
    process metrics of the supervisor and of each worker in `workers` (label -> pid, asked at each scrape)."""
    httpd, _thread = start_http_server(port, addr=addr, registry=multiprocess_registry(folder, workers))
    return httpd
