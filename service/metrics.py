"""Prometheus metrics, in a registry per server (so tests can run several servers in one process).

Histograms, not summaries, so they aggregate across replicas. Names carry their unit and counters end
in `_total`, per the Prometheus naming conventions.

With `--workers N` every serving process writes its values to prometheus-client's multiprocess folder
(PROMETHEUS_MULTIPROC_DIR, set by the supervisor before a worker starts) and the supervisor alone serves
/metrics, summing them: a request is counted once, by the process that answered it. Gauges say how they
combine (`multiprocess_mode`): queue depth and calls in flight add up over live processes, the loaded-model
gauges take the largest value (every worker loads the same versions).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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

    def exposition(self) -> bytes:
        """/metrics in Prometheus text format: this registry's, or with --workers every process's sum (what the
        supervisor's metrics port serves), so the HTTP port's /metrics agrees with it whichever worker answers."""
        from prometheus_client import generate_latest

        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        return generate_latest(registry)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Start the /metrics HTTP server in a daemon thread; returns the http server (has `server_port`)."""
        httpd, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return httpd


def serve_multiprocess(folder: str, port: int, addr: str = "0.0.0.0"):
    """/metrics for all serving processes (`--workers`): the sum of what each wrote to `folder`."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)
    httpd, _thread = start_http_server(port, addr=addr, registry=registry)
    return httpd
