"""The inference server's lifecycle: one gRPC port (imgcls.v1, KServe v2, TF Serving, health, reflection), the
metrics port, the models, start-up, hot reload and drain.

Requests are not handled here: every protocol front-end (`native.py`, `kserve.py`, `tfserving.py`) translates
its messages to and from the one request path in `core.py`; the models' lifecycle is `models.py`.

Concurrency model: gRPC's asyncio server on an event loop in its own thread. A call in progress is a
coroutine, so a waiting call or an idle stream holds no thread, and health checks answer on the same loop
however many calls wait. The work runs elsewhere: decoding on a thread pool, inference on one batcher thread
per model version (blocking C code that releases the GIL); the loop only parses, admits, waits and answers.
Why not the synchronous server: it holds a thread per call in progress, so 64 idle streams took every worker
and calls waiting for a worker were invisible to the metrics and to their deadlines (issue 14).

Lifecycle: `start()` binds the ports at once (health answers NOT_SERVING), loads and warms up the models in
the background, then turns health to SERVING. `drain()` (SIGTERM) turns health NOT_SERVING, answers new calls
UNAVAILABLE, lets every call already received finish within the grace period (open streams included), then
stops.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imgcls.cpus import cpu_limits
from imgcls.decoding import DEFAULT_FORMATS, DecodeLimits, DecodePool
from imgcls.errors import ImgclsError
from imgcls.preprocessing import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from imgcls.service import cluster, observability, repository, runtimes, security
from imgcls.service.core import Core
from imgcls.service.metrics import Metrics
from imgcls.service.models import LoadedModel, ModelManager, ReloadResult, RuntimeHook
from imgcls.service.native import SERVICE_NAME
from imgcls.service.statistics import ModelStats

log = logging.getLogger(__name__)

# Decoding, inference and model loading run this much nicer than the gRPC event loop, so that under a full CPU
# the loop still admits, refuses and answers health at once (a lower priority is allowed unprivileged).
WORK_NICENESS = 5
# Modules of imgcls.service that answer a protocol on the port; each has `handlers(core)` and `SERVICE_NAMES`.
PROTOCOLS: tuple[str, ...] = ("native", "kserve", "tfserving")
EVENT_LOOPS: tuple[str, ...] = ("auto", "uvloop", "asyncio")  # --event-loop; auto = uvloop where installed
__all__ = ["PROTOCOLS", "SERVICE_NAME", "InferenceServer", "LoadedModel", "ReloadResult", "ServeConfig"]


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """The server's event loop: uvloop's (libuv) where `kind` allows it and it is installed, else asyncio's.

    Why uvloop: every call and every answer crosses this one loop (the decode and batcher threads hand results
    back with `call_soon_threadsafe`), so its per-event cost shows once the model is busy. In A/B runs on 2
    cores, gRPC answered 4-11% more per second at 8 clients and 3-21% at 32 (docs/benchmarks.md); at 1 client
    the two were level, and over HTTP (parsed in C by aiohttp either way) within noise. "auto" falls back to
    asyncio where uvloop is missing (Windows has no wheel); "uvloop" makes its absence an error.
    """
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise ImgclsError("--event-loop uvloop: the uvloop package is not installed "
                                  "(pip install uvloop, or --event-loop auto)") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@dataclass
class ServeConfig:
    """Everything `imgcls serve` can be told; docs/serving.md lists flags and environment
    variables."""

    model_repository: Path
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 8000
    http_port: int | None = None  # HTTP front-end (service/http/), None = none; `imgcls serve` defaults to 8080
    runtime: str | None = None  # one format for every model, None = fastest full-precision
    model_runtimes: dict[str, str] = field(default_factory=dict)  # per model name, overrides `runtime`
    versions: str = "latest"  # version policy for every model: latest, latest:N, all, specific:1,3
    model_versions: dict[str, str] = field(default_factory=dict)  # per model name, overrides `versions`
    poll_interval: float = 0.0  # seconds between repository scans for new/removed versions; 0 = no reload
    require_models: bool = False  # an empty or missing repository is an error at start, not a wait
    inference_threads: int = field(default_factory=runtimes.default_threads)
    # Model instances per version: runtimes sharing `inference_threads` and taking batches from one queue;
    # None = automatic (models.plan_instances).
    instances: int | None = None
    decode_workers: int = field(default_factory=runtimes.default_threads)
    max_concurrent_calls: int = 1024  # calls in progress (streams count once) before RESOURCE_EXHAUSTED
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 64  # images per model decoding, queued or computing (docs/serving-core.md)
    # Load shedding: after a refusal at max_queue_size, admit only this many ms of expected work until the
    # model has refused nothing for a second, or for 1-32 s at most (docs/serving-core.md); 0 = off.
    overload_target_ms: float = 100.0
    max_images_per_request: int = 64
    max_message_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = DEFAULT_MAX_BYTES
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    image_formats: str = ",".join(DEFAULT_FORMATS)  # the allowlist (docs/hostile-input.md)
    decode_cpu_seconds: float = 1.0  # hard bound on one image's decode: the worker is killed past it
    decode_memory_mb: int = 768  # estimated decode memory of the images being decoded at once, server-wide
    decode_isolation: bool = True  # decode in killable worker processes (False: in threads, for debugging)
    default_top_k: int = 5
    stream_max_inflight: int = 32  # requests per stream admitted before the server stops reading it
    stream_idle_timeout: float = 300.0  # seconds a stream may stay open with nothing sent and nothing in flight
    grace_period: float = 30.0
    # Connection balancing (docs/serving.md): a connection older than this is asked to go (GOAWAY) once its
    # calls end, so long-lived clients spread over pods the autoscaler added; 0 = never.
    max_connection_age: float = 60.0
    # Then calls still open on it get this long before it is closed; None = as long as they take (streams too).
    max_connection_age_grace: float | None = None
    access_log: bool = True  # a line per call (logger imgcls.access); failed calls always, OK ones rate-limited
    access_log_rate: float = 10.0  # most lines per second for successful calls; the rest are counted, not logged
    keepalive_time: float = 60.0  # server pings an idle connection this often to find dead peers; 0 = never
    verify_checksums: bool = True
    # TLS on the gRPC and HTTP ports (docs/security.md); PEM files, re-read when they change.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mutual TLS: clients need a certificate this CA signed
    token_file: str | None = None  # bearer tokens, one a line, re-read when it changes
    tokens: list[str] = field(default_factory=list, repr=False)  # bearer tokens given directly (IMGCLS_TOKENS)
    auth_metrics: bool = False  # /metrics on the HTTP port needs a token too (the metrics port never does)
    event_loop: str = "auto"  # the loop the gRPC and HTTP front-ends run on (EVENT_LOOPS, new_event_loop)

    def validate(self) -> None:
        repository.VersionPolicy.parse(self.versions, "--version-policy")
        for name, text in self.model_versions.items():
            repository.VersionPolicy.parse(text, f"--model-version-policy {name}=")
        if self.poll_interval < 0:
            raise ImgclsError("--poll-interval must be >= 0 (0 turns hot reload off)")
        for fmt in [self.runtime, *self.model_runtimes.values()]:
            if fmt is not None and fmt not in runtimes.FORMATS:
                raise ImgclsError(f"--runtime {fmt}: choose one of {', '.join(runtimes.FORMATS)}")
        if self.instances is not None and self.instances < 1:
            raise ImgclsError("--instances must be at least 1 (or auto)")
        positive = ("inference_threads", "decode_workers", "max_concurrent_calls", "max_batch_size", "max_queue_size",
                    "max_images_per_request", "max_message_bytes", "max_image_bytes", "max_image_pixels",
                    "default_top_k", "stream_max_inflight")
        for name in positive:
            if getattr(self, name) < 1:
                raise ImgclsError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_queue_delay_ms < 0 or self.grace_period < 0 or self.overload_target_ms < 0:
            raise ImgclsError("--max-queue-delay-ms, --overload-target-ms and --grace-period must be >= 0")
        if self.max_connection_age < 0 or self.keepalive_time < 0 or (self.max_connection_age_grace or 0) < 0:
            raise ImgclsError("--max-connection-age, --max-connection-age-grace and --keepalive-time must be >= 0")
        if self.access_log_rate < 0:
            raise ImgclsError("--access-log-rate must be >= 0")
        if self.stream_idle_timeout <= 0:
            raise ImgclsError("--stream-idle-timeout must be > 0")
        if self.event_loop not in EVENT_LOOPS:
            raise ImgclsError(f"--event-loop {self.event_loop}: choose one of {', '.join(EVENT_LOOPS)}")
        if self.decode_cpu_seconds <= 0 or self.decode_memory_mb < 1:
            raise ImgclsError("--decode-cpu-seconds must be > 0 and --decode-memory-mb at least 1")
        security.check_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        try:
            self.decode_limits()
        except ValueError as exc:
            raise ImgclsError(f"--image-formats {self.image_formats}: {exc}") from None

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(formats=self.image_formats, max_bytes=self.max_image_bytes,
                            max_pixels=self.max_image_pixels, cpu_seconds=self.decode_cpu_seconds,
                            cost_budget_seconds=min(0.8, 0.8 * self.decode_cpu_seconds))

    def policy(self, model: str) -> repository.VersionPolicy:
        return repository.VersionPolicy.parse(self.model_versions.get(model, self.versions))

    def to_json(self) -> str:
        """What a `--workers` supervisor hands each serving process (supervisor.py)."""
        return json.dumps({**asdict(self), "model_repository": str(self.model_repository)})

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        data = json.loads(text)
        return cls(**{**data, "model_repository": Path(data["model_repository"])})

    def check_repository(self) -> dict[str, list[int]]:
        """The versions on disk; ImgclsError for what must stop the start (a missing folder, an empty one when
        models are required, --runtime for a model that is not there)."""
        # A missing folder stays an error (a typo, most likely: a mounted volume is a folder even when empty).
        on_disk = repository.list_versions(self.model_repository)
        if not on_disk and (self.require_models or self.poll_interval <= 0):
            why = "--require-models is set" if self.require_models else "hot reload is off (--poll-interval 0)"
            raise ImgclsError(f"--model-repository {self.model_repository}: no models found (expected "
                              f"NAME/VERSION/manifest.json), and {why}")
        unknown = set(self.model_runtimes) - set(on_disk)
        if unknown:
            raise ImgclsError(f"--runtime names unknown models: {', '.join(sorted(unknown))}")
        return on_disk



def connection_options(cfg: ServeConfig) -> list[tuple[str, int]]:
    """gRPC channel arguments for connection age and keepalive. gRPC adds +-10% jitter to the age, so the
    clients of one pod do not all reconnect at once. Client pings are allowed down to every 10 s, also
    without calls in flight: stricter, and a client configured to ping more often gets GOAWAY too_many_pings."""
    options = [("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
               ("grpc.http2.max_ping_strikes", 2)]
    if cfg.max_connection_age > 0:
        options.append(("grpc.max_connection_age_ms", int(cfg.max_connection_age * 1000)))
        if cfg.max_connection_age_grace is not None:
            options.append(("grpc.max_connection_age_grace_ms", int(cfg.max_connection_age_grace * 1000)))
    if cfg.keepalive_time > 0:
        options += [("grpc.keepalive_time_ms", int(cfg.keepalive_time * 1000)), ("grpc.keepalive_timeout_ms", 20_000)]
    return options


def freeze_heap() -> int:
    """Collect once, then move every object alive now out of reach of the cyclic garbage collector
    (`gc.freeze`); returns how many objects that was.

    A served process carries ~70,000 tracked objects from start-up (modules, runtimes, the gRPC and HTTP
    servers) that live until it exits. Each full collection walked them all: 25-47 ms with the GIL held,
    every 12-14 s at 160 requests a second on 2 cores, during which the event loop could neither answer
    health nor refuse a call. Frozen, a full collection walks only what serving created since: ~1 ms
    (docs/serving-core.md). The collection first leaves no garbage to freeze. A frozen object that later
    becomes unreachable is still freed by reference counting; only one caught in a reference cycle would
    stay, and the start-up heap lives until exit anyway.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class InferenceServer:
    """One server: gRPC port, metrics port, the loaded models. `runtime_hook` lets tests wrap a runtime."""

    def __init__(self, config: ServeConfig, *, runtime_hook: RuntimeHook | None = None,
                 link: cluster.WorkerLink | None = None) -> None:
        """`link`: this is one of several serving processes sharing the ports (`--workers`, supervisor.py)."""
        config.validate()
        self.config = config
        self.metrics = Metrics()
        self.manager = ModelManager(config, self.metrics, runtime_hook=runtime_hook, nice=WORK_NICENESS)
        self.decoder: DecodePool | None = None  # started in start(): worker processes
        self.core = Core(config, self.manager, self.metrics, config.decode_workers, decode=self._decode,
                         nice=WORK_NICENESS)
        self.load_error: BaseException | None = None
        self._freeze_heap = False  # serve_forever: freeze the start-up heap once ready (freeze_heap)
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self.http = None  # the HTTP front-end (service/http/): on the gRPC loop, through the same core
        self.security = security.Security()  # TLS and tokens, from the config in start() (files read there)
        self._stop_requested = threading.Event()
        self._stopped = threading.Event()
        self._loop = new_event_loop(config.event_loop)
        self._loop_thread = threading.Thread(target=self._run_loop, name="grpc-loop", daemon=True)
        self._grpc: grpc.aio.Server | None = None
        self._httpd = None
        self.health = health.aio.HealthServicer()
        self._health_names: tuple[str, ...] = ("", SERVICE_NAME)
        self._waiting_for_models = False  # the repository had no model at start
        self.link = link
        self.core.access_log = observability.AccessLog(config.access_log_rate) if config.access_log else None
        self.core.tracing = observability.Tracing.from_environment()  # OTEL_* variables; None = off
        if link is not None:
            self.core.peer_stats = link.peer_stats
            self.core.peers_ready = link.whole_server_ready

    def _decode(self, data: bytes, spec, *, deadline: float | None, cancelled) -> object:
        if self.decoder is None:
            raise ImgclsError("the decode pool is not running")
        return self.decoder.decode(data, spec, deadline=deadline, cancelled=cancelled)

    # --- what tests and tools read ------------------------------------------------------------------------------

    @property
    def models(self) -> dict[str, dict[int, LoadedModel]]:
        return self.manager.models

    @property
    def failed(self) -> dict[str, dict[int, str]]:
        return self.manager.failed

    @failed.setter
    def failed(self, value: dict[str, dict[int, str]]) -> None:
        self.manager.failed = value

    @property
    def _retiring(self) -> list[LoadedModel]:
        return self.manager.retiring

    @property
    def event_loop_name(self) -> str:
        """"uvloop" or "asyncio": what `--event-loop` resolved to (logged at start)."""
        return "uvloop" if type(self._loop).__module__.startswith("uvloop") else "asyncio"

    @property
    def ready(self) -> threading.Event:
        return self.core.ready

    @property
    def accepting(self) -> bool:
        return self.core.accepting

    def reload(self) -> ReloadResult:
        """One scan of the repository (see models.ModelManager.reload)."""
        return self.manager.reload()

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _on_loop(self, coro, timeout: float | None = 30.0):
        """Run a coroutine on the server's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stats_snapshot(self) -> list[tuple[str, int, ModelStats]]:
        """This process's statistics per served version, for the other workers (cluster.py)."""
        return [(name, version, model.stats.snapshot()) for name, versions in list(self.models.items())
                for version, model in list(versions.items())]

    def _set_health(self, status) -> None:
        async def set_all() -> None:
            for name in self._health_names:
                await self.health.set(name, status)

        if self._loop.is_running():
            self._on_loop(set_all())

    def start(self) -> InferenceServer:
        """Check the repository and flags (errors raise here), bind ports, load models in the background."""
        cfg = self.config
        self.manager.formats = runtimes.FORMATS if runtimes.tensorflow_installed() else tuple(
            f for f in runtimes.FORMATS if f != "savedmodel")
        on_disk = cfg.check_repository()
        self._waiting_for_models = not on_disk
        if not on_disk:
            log.warning("--model-repository %s has no model yet: NOT_SERVING until one is published (checked "
                        "every %gs)", cfg.model_repository, cfg.poll_interval)
        for name in sorted(set(cfg.model_versions) - set(on_disk)):
            log.warning("--model-version-policy names %s, not in the repository (yet)", name)

        self.security = security.Security.from_config(cfg)
        protocol_modules = [importlib.import_module(f"imgcls.service.{name}") for name in PROTOCOLS]
        # health answers for the whole server ("") and for every service on the port
        self._health_names = ("", *(s for module in protocol_modules for s in module.SERVICE_NAMES))
        if cfg.decode_isolation:
            self.decoder = DecodePool(cfg.decode_workers, cfg.decode_limits(),
                                      memory_budget_bytes=cfg.decode_memory_mb * 1024 * 1024, nice=WORK_NICENESS)
        else:
            self.core.use_thread_decode(cfg.decode_limits())
        self._loop_thread.start()
        address = f"{cfg.host}:{cfg.port}" if ":" not in cfg.host else f"[{cfg.host}]:{cfg.port}"
        self.port = self._on_loop(self._start_grpc(protocol_modules, address))
        if cfg.http_port is not None:
            from imgcls.service.http import HttpServer

            self.http = HttpServer(self.core, cfg, self.security)
            self.http_port = self._on_loop(self.http.start(cfg.host, cfg.http_port, shared=self.link is not None))
            log.info("HTTP on %s:%d (KServe v2 and TF Serving REST, /predict, web page)", cfg.host, self.http_port)
        if self.link is None:  # with --workers, the supervisor serves every process's metrics
            try:
                self._httpd = self.metrics.serve(cfg.metrics_port, cfg.host)
            except OSError as exc:
                raise ImgclsError(f"cannot serve metrics on {cfg.host}:{cfg.metrics_port} ({exc})") from None
            self.metrics_port = self._httpd.server_port
            log.info("gRPC on %s:%d, metrics on %s:%d/metrics; loading %d model(s)",
                     cfg.host, self.port, cfg.host, self.metrics_port, len(on_disk))
        else:
            self.link.start_publishing(self._stats_snapshot)
            asyncio.run_coroutine_threadsafe(self._follow_whole_server(), self._loop)
            log.info("gRPC on %s:%d (worker %d of %d); loading %d model(s)",
                     cfg.host, self.port, self.link.index + 1, self.link.workers, len(on_disk))
        log.info("requests ports: %s", self.security.describe())
        log.info("CPUs: %s; %d inference thread(s) per model, %d decode worker(s); %s event loop",
                 cpu_limits().describe(), cfg.inference_threads, cfg.decode_workers, self.event_loop_name)
        threading.Thread(target=self._loader, name="model-loader", daemon=True).start()
        return self

    async def _start_grpc(self, protocol_modules: list, address: str) -> int:
        cfg = self.config
        self.core.loop = asyncio.get_running_loop()
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 1 if self.link is not None else 0),
                   *connection_options(cfg)]
        # No maximum_concurrent_rpcs: gRPC would refuse past it before any handler ran, unseen by the metrics;
        # the core refuses past --max-concurrent-calls instead, counted with its code.
        interceptors = []
        if self.security.tokens:  # (mTLS is the handshake's on gRPC: no certificate, no call)
            interceptors.append(security.AuthInterceptor(self.security.auth, security.recorder(self.core)))
        self._grpc = grpc.aio.server(options=options, interceptors=interceptors)
        for module in protocol_modules:
            self._grpc.add_generic_rpc_handlers(module.handlers(self.core))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        for name in self._health_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            if self.security.certificates is not None:
                port = self._grpc.add_secure_port(address, self.security.certificates.grpc_credentials())
            else:
                port = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:
            raise ImgclsError(f"cannot listen on {address} ({exc}); is the port in use?") from None
        await self._grpc.start()
        return port

    def _loader(self) -> None:
        """Load the models, turn health SERVING, then (hot reload) poll the repository until stopped."""
        os.nice(WORK_NICENESS)  # and the runtime threads the loads create inherit it
        if not self._waiting_for_models:  # models on disk at start: each must serve something, or we stop
            try:
                self.manager.check_startup(self.reload().on_disk)
            except BaseException as exc:  # reported by serve_forever / wait_until_ready
                log.error("loading models failed: %s", exc)
                self.load_error = exc
                self._stop_requested.set()
                return
        interval = self.config.poll_interval
        scan = self._waiting_for_models  # an empty repository at start: look again at once
        self._become_ready()
        if interval <= 0:
            return
        log.info("hot reload: scanning %s every %gs", self.config.model_repository, interval)
        while scan or not self.manager.closing.wait(interval):
            scan = False
            try:
                self.reload()
            except Exception as exc:  # e.g. the repository volume went away: keep serving what is loaded
                log.error("repository scan failed, serving what is loaded: %s", exc)
            self._become_ready()

    def _become_ready(self) -> None:
        """Health SERVING once some model serves (at start, or when the first version of an empty repository
        appears); never while draining."""
        if self.core.ready.is_set() or not self.models or not self.core.accepting or self.manager.closing.is_set():
            return
        if self._freeze_heap:
            log.info("gc: froze %d objects at start-up (full collections skip them from now on)", freeze_heap())
        self.core.ready.set()
        if self.link is not None:  # health turns SERVING once every worker is ready (_follow_whole_server)
            self.link.set_state(cluster.READY)
        else:
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready: %s", ", ".join(f"{n} v{v} ({m.runtime})" for n, vs in self.models.items()
                                        for v, m in vs.items()))

    async def _follow_whole_server(self) -> None:
        """With --workers: health answers for the whole server, SERVING only while every worker is ready and
        none drains (a worker being replaced after a crash makes the pod unready until it is warm again)."""
        serving = False
        while self.core.accepting:
            whole = self.core.serving()
            if whole != serving:
                serving = whole
                status = health_pb2.HealthCheckResponse.SERVING if whole else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in self._health_names:
                    await self.health.set(name, status)
            await asyncio.sleep(0.1)

    def wait_until_ready(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.core.ready.is_set():
            if self.load_error is not None:
                raise self.load_error
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self.core.ready.wait(0.05 if left is None else min(0.05, left))
        return True

    def drain(self, grace: float | None = None) -> None:
        """Stop taking calls (health NOT_SERVING, new calls UNAVAILABLE), let every call already received
        finish within `grace` seconds (open streams included), then stop. Safe to call twice."""
        if self._stopped.is_set():
            return
        grace = self.config.grace_period if grace is None else grace
        deadline = time.monotonic() + grace
        self.core.accepting = False
        if self.link is not None:
            self.link.set_state(cluster.DRAINING)
        if self._loop.is_running():
            self._on_loop(self.health.enter_graceful_shutdown())  # every service NOT_SERVING, and stays so
        left = self.core.wait_idle(grace)
        if left:
            log.warning("grace period over with %d call(s) still in flight; cancelling them", left)
        self.stop(max(0.0, deadline - time.monotonic()))

    def stop(self, grace: float | None = 0) -> None:
        """Stop at once (in-flight calls get `grace` seconds), release ports and threads."""
        if self._stopped.is_set():
            return
        self.core.accepting = False
        self.manager.closing.set()
        if self._grpc is not None and self._loop.is_running():
            try:
                self._on_loop(self._grpc.stop(grace), timeout=(grace or 0) + 10)
            except Exception as exc:  # a stop that hangs must not keep the process alive
                log.warning("gRPC server stop: %s", exc)
        if self.http is not None and self._loop.is_running():
            try:
                self._on_loop(self.http.stop(grace or 0), timeout=(grace or 0) + 10)
            except Exception as exc:
                log.warning("HTTP server stop: %s", exc)
        self.manager.close()
        self.core.close()
        if self.core.tracing is not None:
            self.core.tracing.shutdown()  # exports the spans still batched
        if self.decoder is not None:
            self.decoder.close()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self.link is not None:
            self.link.close()
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(5)
        self._stopped.set()
        self._stop_requested.set()
        if self.port:  # a start that failed before binding has nothing to report stopped
            log.info("stopped")

    def request_stop(self) -> None:
        """Ask `serve_forever` to drain (what SIGTERM does); returns at once, usable from a signal handler."""
        self._stop_requested.set()

    def serve_forever(self) -> int:
        """Start, drain on SIGTERM / SIGINT, return 0 after a clean drain (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())
        self._freeze_heap = True  # this process is the server's alone (a test's in-process server is not)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        while not self._stop_requested.wait(0.5):
            pass
        if self.load_error is not None:
            self.stop()
            if isinstance(self.load_error, ImgclsError):
                raise self.load_error
            raise ImgclsError(f"loading models failed: {self.load_error}") from self.load_error
        log.info("draining (grace period %.0fs)", self.config.grace_period)
        self.drain()
        return 0
