"""The gRPC inference server: `imgcls.v1.Inference` plus health, reflection and Prometheus metrics.

Concurrency model: grpc's synchronous server (a thread per in-flight call), a decode thread pool and one
batcher thread per model version. Chosen over grpc.aio because every step that costs time (Pillow
decode/resize, NumPy normalization, onnxruntime / LiteRT / TensorFlow inference) is a blocking C call
that releases the GIL, so plain threads overlap them on all cores with no executor hand-offs; request
handlers only wait on an Event. Cancellation and deadlines come from the grpc context
(`add_callback`, `time_remaining`), streaming is a generator fed by a reader thread.

Lifecycle: `start()` binds the ports at once (health answers NOT_SERVING), loads and warms up the
models in the background, then turns health to SERVING. `drain()` (SIGTERM) turns health NOT_SERVING,
answers new calls UNAVAILABLE, lets calls in flight finish within the grace period, then stops.

Hot reload (`poll_interval` > 0): the loader thread rescans the repository; a version the policy now
wants is loaded, warmed up and probed with no lock held, then the model's version table is replaced in
one assignment (copy on write: readers see the old table or the new one, never a mix), and a version
no longer wanted is unloaded once no call that could have resolved it is left (see `lifecycle`).
A version that fails is recorded in `failed` and never replaces what is serving.
"""

from __future__ import annotations

import importlib
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imgcls.errors import ImageDecodeError, ImgclsError
from imgcls.preprocessing import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, PreprocessingSpec, preprocess_bytes
from imgcls.service import lifecycle, repository, runtimes
from imgcls.service.batcher import Batcher, Cancelled, DeadlineExceeded, Job, QueueFull, ShuttingDown
from imgcls.service.metrics import Metrics
from imgcls.service.statistics import ModelStats
from imgcls.v1 import inference_pb2 as pb
from imgcls.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "imgcls.v1.Inference"
# Modules of imgcls.service that answer other protocols on the same port; each has
# `handlers(server: InferenceServer) -> list[grpc.GenericRpcHandler]` and `SERVICE_NAMES`.
PROTOCOLS: tuple[str, ...] = ("kserve", "tfserving")
NO_DEADLINE = 1e8  # grpc reports a huge time_remaining for calls without a deadline


@dataclass
class ServeConfig:
    """Everything `imgcls serve` can be told; the README (Serving over gRPC) lists flags and environment variables."""

    model_repository: Path
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 8000
    runtime: str | None = None  # one format for every model, None = fastest full-precision
    model_runtimes: dict[str, str] = field(default_factory=dict)  # per model name, overrides `runtime`
    versions: str = "latest"  # version policy for every model: latest, latest:N, all, specific:1,3
    model_versions: dict[str, str] = field(default_factory=dict)  # per model name, overrides `versions`
    poll_interval: float = 0.0  # seconds between repository scans for new/removed versions; 0 = no reload
    inference_threads: int = field(default_factory=runtimes.default_threads)
    decode_workers: int = field(default_factory=runtimes.default_threads)
    grpc_workers: int = 64
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 256
    max_images_per_request: int = 64
    max_message_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = DEFAULT_MAX_BYTES
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    default_top_k: int = 5
    stream_max_inflight: int = 32  # requests per stream admitted before the server stops reading it
    grace_period: float = 30.0
    verify_checksums: bool = True

    def validate(self) -> None:
        repository.VersionPolicy.parse(self.versions, "--version-policy")
        for name, text in self.model_versions.items():
            repository.VersionPolicy.parse(text, f"--model-version-policy {name}=")
        if self.poll_interval < 0:
            raise ImgclsError("--poll-interval must be >= 0 (0 turns hot reload off)")
        for fmt in [self.runtime, *self.model_runtimes.values()]:
            if fmt is not None and fmt not in runtimes.FORMATS:
                raise ImgclsError(f"--runtime {fmt}: choose one of {', '.join(runtimes.FORMATS)}")
        positive = ("inference_threads", "decode_workers", "grpc_workers", "max_batch_size", "max_queue_size",
                    "max_images_per_request", "max_message_bytes", "max_image_bytes", "max_image_pixels",
                    "default_top_k", "stream_max_inflight")
        for name in positive:
            if getattr(self, name) < 1:
                raise ImgclsError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_images_per_request > self.max_queue_size:
            raise ImgclsError("--max-images-per-request cannot exceed --max-queue-size")
        if self.max_queue_delay_ms < 0 or self.grace_period < 0:
            raise ImgclsError("--max-queue-delay-ms and --grace-period must be >= 0")

    def policy(self, model: str) -> repository.VersionPolicy:
        return repository.VersionPolicy.parse(self.model_versions.get(model, self.versions))


@dataclass
class LoadedModel:
    entry: repository.Entry
    runtime: str
    batcher: Batcher
    stats: ModelStats = field(default_factory=ModelStats, compare=False)  # Triton's ModelStatistics

    @property
    def spec(self) -> PreprocessingSpec:
        return self.entry.manifest.preprocessing

    @property
    def labels(self) -> tuple[str, str]:
        return self.entry.name, str(self.entry.version)


class RequestError(Exception):
    """Ends a call (or one message of a stream) with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class ReloadResult:
    """What one repository scan changed: (model, version) pairs."""

    loaded: list[tuple[str, int]] = field(default_factory=list)
    retired: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, int]] = field(default_factory=list)
    on_disk: dict[str, list[int]] = field(default_factory=dict)  # what the scan found


def _status(code: grpc.StatusCode, message: str = "") -> pb.Status:
    return pb.Status(code=code.value[0], message=message)


RuntimeHook = Callable[[repository.Entry, runtimes.Runtime], runtimes.Runtime]


class InferenceServer:
    """One server: gRPC port, metrics port, the loaded models. `runtime_hook` lets tests wrap a runtime."""

    def __init__(self, config: ServeConfig, *, runtime_hook: RuntimeHook | None = None) -> None:
        config.validate()
        self.config = config
        self.runtime_hook = runtime_hook
        self.metrics = Metrics()
        self.models: dict[str, dict[int, LoadedModel]] = {}
        # model -> version -> error, for versions that failed to load or their probe (never served);
        # replaced, not mutated, like `models`
        self.failed: dict[str, dict[int, str]] = {}
        self._failed_prints: dict[tuple[str, int], tuple] = {}  # retried only when the folder changes
        self.ready = threading.Event()
        self.accepting = True
        self.load_error: BaseException | None = None
        self.port = 0
        self.metrics_port = 0
        self._stop_requested = threading.Event()
        self._stopped = threading.Event()
        self._inflight = 0
        self._inflight_zero = threading.Condition()
        self._decode_pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")
        self._formats: tuple[str, ...] = ()
        self._epochs = lifecycle.CallEpochs()
        self._reload_lock = threading.Lock()
        self._closing = threading.Event()  # stop(): no more loads or polls
        self._retiring: list[LoadedModel] = []  # unloaded, waiting for their last calls
        self._grpc: grpc.Server | None = None
        self._grpc_pool: ThreadPoolExecutor | None = None
        self._httpd = None
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._health_names: tuple[str, ...] = ("", SERVICE_NAME)

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> InferenceServer:
        """Check the repository and flags (errors raise here), bind ports, load models in the background."""
        cfg = self.config
        self._formats = runtimes.FORMATS if runtimes.tensorflow_installed() else tuple(
            f for f in runtimes.FORMATS if f != "savedmodel")
        on_disk = repository.list_versions(cfg.model_repository)
        if not on_disk:
            raise ImgclsError(f"--model-repository {cfg.model_repository}: no models found "
                              "(expected NAME/VERSION/manifest.json)")
        unknown = set(cfg.model_runtimes) - set(on_disk)
        if unknown:
            raise ImgclsError(f"--runtime names unknown models: {', '.join(sorted(unknown))}")
        for name in sorted(set(cfg.model_versions) - set(on_disk)):
            log.warning("--model-version-policy names %s, not in the repository (yet)", name)

        protocol_modules = [importlib.import_module(f"imgcls.service.{name}") for name in PROTOCOLS]
        # health answers for the whole server ("") and for every service on the port
        self._health_names = ("", SERVICE_NAME, *(s for module in protocol_modules for s in module.SERVICE_NAMES))
        for name in self._health_names:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self._grpc_pool = ThreadPoolExecutor(cfg.grpc_workers, thread_name_prefix="grpc")
        # Calls beyond the handler threads wait in gRPC's own queue; past this many, gRPC itself answers
        # RESOURCE_EXHAUSTED, so a flood of single-image calls is bounded like a full batcher queue.
        self._grpc = grpc.server(self._grpc_pool, options=options,
                                 maximum_concurrent_rpcs=cfg.grpc_workers + cfg.max_queue_size)
        pb_grpc.add_InferenceServicer_to_server(Servicer(self), self._grpc)
        for module in protocol_modules:
            self._grpc.add_generic_rpc_handlers(module.handlers(self))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        address = f"{cfg.host}:{cfg.port}" if ":" not in cfg.host else f"[{cfg.host}]:{cfg.port}"
        try:
            self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:
            raise ImgclsError(f"cannot listen on {address} ({exc}); is the port in use?") from None
        try:
            self._httpd = self.metrics.serve(cfg.metrics_port, cfg.host)
        except OSError as exc:
            raise ImgclsError(f"cannot serve metrics on {cfg.host}:{cfg.metrics_port} ({exc})") from None
        self.metrics_port = self._httpd.server_port
        self._grpc.start()
        log.info("gRPC on %s:%d, metrics on %s:%d/metrics; loading %d model(s)",
                 cfg.host, self.port, cfg.host, self.metrics_port, len(on_disk))
        threading.Thread(target=self._loader, name="model-loader", daemon=True).start()
        return self

    def _loader(self) -> None:
        """Load the models, turn health SERVING, then (hot reload) poll the repository until stopped."""
        try:
            self._check_startup(self.reload().on_disk)
        except BaseException as exc:  # reported by serve_forever / wait_until_ready
            log.error("loading models failed: %s", exc)
            self.load_error = exc
            self._stop_requested.set()
            return
        if self.accepting and not self._closing.is_set():
            self.ready.set()
            for name in self._health_names:
                self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("ready: %s", ", ".join(f"{n} v{v} ({m.runtime})" for n, vs in self.models.items()
                                            for v, m in vs.items()))
        interval = self.config.poll_interval
        if interval <= 0:
            return
        log.info("hot reload: scanning %s every %gs", self.config.model_repository, interval)
        while not self._closing.wait(interval):
            try:
                self.reload()
            except Exception as exc:  # e.g. the repository volume went away: keep serving what is loaded
                log.error("repository scan failed, serving what is loaded: %s", exc)

    def _check_startup(self, on_disk: dict[str, list[int]]) -> None:
        """At startup every model on disk must serve something (as before hot reload existed); a model
        with a good older version serves it and reports the failed newer one."""
        for name, versions in on_disk.items():
            if name in self.models:
                for version, error in sorted(self.failed.get(name, {}).items()):
                    log.warning("%s v%d not served: %s", name, version, error)
                continue
            failures = self.failed.get(name, {})
            if failures:
                version, error = max(failures.items())
                raise ImgclsError(f"model {name}: no version could be loaded; v{version}: {error}")
            raise ImgclsError(f"model {name}: version policy {self.config.policy(name)} selects none of its "
                              f"versions on disk {versions}")

    def reload(self) -> ReloadResult:
        """One scan of the repository: load what the version policies now want, unload what they no longer
        want or what was removed, remember failures. Runs in the loader thread; tests may call it."""
        result = ReloadResult()
        with self._reload_lock:
            if self._closing.is_set():
                return result
            root = self.config.model_repository
            on_disk = result.on_disk = repository.list_versions(root)
            if not on_disk and self.models:  # an unmounted or briefly empty volume, not a decision to stop
                repository.warn_once(f"--model-repository {root} looks empty; keeping the models loaded")
                return result
            self._forget_failures(on_disk)
            for name in sorted(set(on_disk) | set(self.models) | set(self.failed)):
                if self._closing.is_set():
                    break
                self._sync_model(name, on_disk.get(name, []), result)
        return result

    def _forget_failures(self, on_disk: dict[str, list[int]]) -> None:
        """Drop failures of versions that are gone or whose files changed (those get another try)."""
        root = self.config.model_repository
        kept: dict[str, dict[int, str]] = {}
        for name, versions in self.failed.items():
            for version, error in versions.items():
                key = (name, version)
                if version in on_disk.get(name, ()) and \
                        repository.fingerprint(root / name / str(version)) == self._failed_prints.get(key):
                    kept.setdefault(name, {})[version] = error
                else:
                    self._failed_prints.pop(key, None)
        if kept != self.failed:
            self.failed = kept

    def _sync_model(self, name: str, on_disk: list[int], result: ReloadResult) -> None:
        current = self.models.get(name, {})
        loaded: dict[int, LoadedModel] = {}
        policy = self.config.policy(name)
        while True:  # each failure removes a candidate, so this ends
            failed = self.failed.get(name, {})
            wanted = policy.select([v for v in on_disk if v not in failed])
            todo = [v for v in wanted if v not in current and v not in loaded]
            if not todo:
                break
            for version in todo:
                model = self._load_version(name, version)
                if model is None:
                    result.failed.append((name, version))
                else:
                    loaded[version] = model
        if self._closing.is_set():
            for model in loaded.values():
                model.batcher.stop()
            return
        serving = {v: m for v, m in sorted({**current, **loaded}.items()) if v in wanted}
        unused = [m for v, m in loaded.items() if v not in serving]
        retired = [m for v, m in current.items() if v not in serving]
        if not loaded and not retired:
            return
        models = dict(self.models)  # copy on write: a reader holds the old table or the new one
        if serving:
            models[name] = serving
        else:
            models.pop(name, None)
        self.models = dict(sorted(models.items()))
        epoch = self._epochs.advance()  # calls from now on can only see the new table
        if self._closing.is_set():  # stop() may have missed the new table
            for model in loaded.values():
                model.batcher.stop()
        self.metrics.model_swaps.labels(name).inc()
        result.loaded += [(name, v) for v in loaded if v in serving]
        result.retired += [(name, m.entry.version) for m in retired]
        if current:
            log.info("%s now serves %s (was %s)", name, sorted(serving) or "nothing", sorted(current))
        for model in unused + retired:
            self._retiring.append(model)
            threading.Thread(target=self._retire, args=(model, epoch), daemon=True,
                             name=f"retire-{name}-v{model.entry.version}").start()

    def _record_failure(self, name: str, version: int, error: str) -> None:
        root = self.config.model_repository
        self._failed_prints[(name, version)] = repository.fingerprint(root / name / str(version))
        self.failed = {**self.failed, name: {**self.failed.get(name, {}), version: error}}
        self.metrics.model_load_failures.labels(name, str(version)).inc()
        serving = sorted(self.models.get(name, {}))
        log.error("%s v%d failed, not served (serving %s): %s", name, version, serving or "nothing", error)

    def _load_version(self, name: str, version: int) -> LoadedModel | None:
        """Read, verify, load, warm up and probe one version; None (and a recorded failure) if any step fails."""
        cfg = self.config
        try:
            entry = repository.read_entry(cfg.model_repository, name, version)
            requested = cfg.model_runtimes.get(name, cfg.runtime)
            fmt = runtimes.choose_artifact(entry.manifest, requested, self._formats).format
            return self._load(entry, fmt)
        except Exception as exc:
            error = str(exc) if isinstance(exc, ImgclsError) else f"{type(exc).__name__}: {exc}"
            self._record_failure(name, version, error)
            return None

    def _load(self, entry: repository.Entry, fmt: str) -> LoadedModel:
        cfg, m = self.config, self.metrics
        start = time.monotonic()
        artifact = entry.manifest.artifact(fmt)
        assert artifact is not None
        if cfg.verify_checksums:
            repository.verify_checksum(entry.folder, artifact)
        runtime = runtimes.load_runtime(entry.folder, artifact, cfg.inference_threads)
        if self.runtime_hook is not None:
            runtime = self.runtime_hook(entry, runtime)
        h, w = entry.manifest.preprocessing.input_size
        # Warm-up: first calls allocate and compile (and create TFLite's per-size interpreters).
        for n in sorted({1 << i for i in range(cfg.max_batch_size.bit_length())} | {cfg.max_batch_size}):
            out = runtime.run(np.zeros((n, h, w, 3), np.float32))
            if out.shape != (n, entry.manifest.num_classes):
                raise ImgclsError(f"{entry.folder} ({fmt}): output shape {out.shape}, expected "
                                  f"({n}, {entry.manifest.num_classes}) from the manifest's class_names")
        lifecycle.probe(runtime, entry, artifact)
        name, version = entry.name, str(entry.version)
        stats = ModelStats()
        batcher = Batcher(
            runtime.run, max_batch_size=cfg.max_batch_size, max_queue_delay=cfg.max_queue_delay_ms / 1000,
            max_queue_size=cfg.max_queue_size, name=f"{name}-v{version}",
            on_batch=self._batch_observer(name, fmt, stats), on_depth=m.queue_depth.labels(name).set,
        )
        batcher.start()
        seconds = time.monotonic() - start
        m.model_load_seconds.labels(name, version, fmt).set(seconds)
        m.model_loaded.labels(name, version, entry.manifest.backbone, fmt).set(1)
        log.info("loaded %s v%s (%s, %s) in %.2fs", name, version, entry.manifest.backbone, fmt, seconds)
        return LoadedModel(entry, fmt, batcher, stats)

    def _retire(self, model: LoadedModel, epoch: int) -> None:
        """Unload a version once no call that could have resolved it is left: wait for the calls that
        started before the swap (at most the grace period), then let its batcher finish what it admitted."""
        deadline = time.monotonic() + self.config.grace_period
        name, version = model.labels
        if not self._epochs.wait_before(epoch, self.config.grace_period):
            log.warning("%s v%s: %d call(s) from before the swap still open after %.0fs (streams?); unloading",
                        name, version, self._epochs.in_flight_before(epoch), self.config.grace_period)
        model.batcher.close(max(1.0, deadline - time.monotonic()))
        for gauge, labels in ((self.metrics.model_loaded, (name, version, model.entry.manifest.backbone,
                                                           model.runtime)),
                              (self.metrics.model_load_seconds, (name, version, model.runtime))):
            with suppress(KeyError):  # never set when the version failed before its gauges
                gauge.remove(*labels)
        if model in self._retiring:
            self._retiring.remove(model)
        log.info("unloaded %s v%s", name, version)

    def _batch_observer(self, model: str, fmt: str, stats: ModelStats) -> Callable[[int, list[float], float], None]:
        batch_size = self.metrics.batch_size.labels(model)
        wait = self.metrics.queue_wait.labels(model)
        infer = self.metrics.inference_latency.labels(model, fmt)

        def observe(size: int, waits: list[float], seconds: float) -> None:
            stats.batch(size, seconds)
            batch_size.observe(size)
            infer.observe(seconds)
            for w in waits:
                wait.observe(w)

        return observe

    def wait_until_ready(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready.is_set():
            if self.load_error is not None:
                raise self.load_error
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self.ready.wait(0.05 if left is None else min(0.05, left))
        return True

    def drain(self, grace: float | None = None) -> None:
        """Stop taking calls (health NOT_SERVING, new calls UNAVAILABLE), let calls in flight finish within
        `grace` seconds, then stop everything. Safe to call twice."""
        if self._stopped.is_set():
            return
        grace = self.config.grace_period if grace is None else grace
        deadline = time.monotonic() + grace
        self.accepting = False
        self.health.enter_graceful_shutdown()  # every service NOT_SERVING, and stays so
        with self._inflight_zero:
            self._inflight_zero.wait_for(lambda: self._inflight == 0, timeout=grace)
            left = self._inflight
        if left:
            log.warning("grace period over with %d call(s) still in flight; cancelling them", left)
        self.stop(max(0.0, deadline - time.monotonic()))

    def stop(self, grace: float | None = 0) -> None:
        """Stop at once (in-flight calls get `grace` seconds), release ports and threads."""
        if self._stopped.is_set():
            return
        self.accepting = False
        self._closing.set()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        for model in [m for versions in self.models.values() for m in versions.values()] + list(self._retiring):
            model.batcher.stop()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self._grpc_pool is not None:
            self._grpc_pool.shutdown(wait=False)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        self._stopped.set()
        self._stop_requested.set()
        log.info("stopped")

    def request_stop(self) -> None:
        """Ask `serve_forever` to drain (what SIGTERM does); returns at once, usable from a signal handler."""
        self._stop_requested.set()

    def serve_forever(self) -> int:
        """Start, drain on SIGTERM / SIGINT, return 0 after a clean drain (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())
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

    # --- request handling helpers -----------------------------------------------------------------------------

    @contextmanager
    def track(self, method: str, pin_models: bool = True) -> Iterator[None]:
        """Count a call in flight (for the gauge and for draining). With `pin_models`, a version that hot
        reload replaces during the call stays loaded until the call ends; a long stream passes False and
        pins each message instead (`pin_models()`), so it does not keep an old version resident."""
        gauge = self.metrics.inflight.labels(method)
        with self._inflight_zero:
            self._inflight += 1
        gauge.inc()
        try:
            if pin_models:
                with self.pin_models():
                    yield
            else:
                yield
        finally:
            gauge.dec()
            with self._inflight_zero:
                self._inflight -= 1
                self._inflight_zero.notify_all()

    @contextmanager
    def pin_models(self) -> Iterator[None]:
        """Hold the versions resolved inside this block loaded: wrap resolve() through submit(); once a job is
        admitted its batcher finishes it even if the version is being unloaded (see `lifecycle`)."""
        epoch = self._epochs.enter()
        try:
            yield
        finally:
            self._epochs.leave(epoch)

    def check_accepting(self) -> None:
        if not self.accepting:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is draining")
        if not self.ready.is_set():
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "models are still loading")

    def resolve(self, name: str, version: int) -> LoadedModel:
        """The model version a request asked for (0 = latest); reads the version table once."""
        models = self.models  # one snapshot: hot reload replaces the table, never changes it in place
        if not name:
            if len(models) != 1:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"model_name is required; serving: {', '.join(sorted(models))}")
            name = next(iter(models))
        versions = models.get(name)
        failed = self.failed.get(name, {})
        if versions is None:
            why = f" (failed to load: {self._failures(failed)})" if failed else ""
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"no model {name!r}{why}; serving: {', '.join(sorted(models))}")
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            why = f" (it failed to load: {failed[version]})" if version in failed else ""
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model {name!r} has no version {version}{why}; serving: {sorted(versions)}")
        return versions[version]

    @staticmethod
    def _failures(failed: dict[int, str]) -> str:
        return "; ".join(f"v{v}: {error}" for v, error in sorted(failed.items()))

    def submit(self, model: LoadedModel, images: list[bytes], deadline: float | None,
               on_done: Callable[[Job], object] | None = None) -> Job:
        """Reserve queue slots for the images and hand them to the decode pool."""
        try:
            job = model.batcher.admit(len(images), deadline, on_done)
        except QueueFull as exc:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"model {model.entry.name}: {exc}") from None
        except ShuttingDown as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        for i, data in enumerate(images):
            self._decode_pool.submit(self._decode, model, job, i, data)
        return job

    def submit_tensors(self, model: LoadedModel, batch: np.ndarray, deadline: float | None,
                       on_done: Callable[[Job], object] | None = None) -> Job:
        """Admit an already-preprocessed float32 [N, H, W, 3] batch (for clients that preprocess themselves);
        it skips decoding but shares the model's queue, batches and limits with encoded images."""
        h, w = model.spec.input_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (h, w, 3):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"preprocessed input has shape {list(batch.shape)}; model {model.entry.name} "
                               f"expects [N, {h}, {w}, 3]")
        if not 1 <= len(batch) <= self.config.max_images_per_request:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{len(batch)} images; 1 to {self.config.max_images_per_request} per request")
        try:
            job = model.batcher.admit(len(batch), deadline, on_done)
        except QueueFull as exc:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"model {model.entry.name}: {exc}") from None
        except ShuttingDown as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        for i, x in enumerate(np.asarray(batch, np.float32)):
            model.batcher.put(job, i, x)
        return job

    @staticmethod
    def call_deadline(context: grpc.ServicerContext, start: float) -> float | None:
        """The call's deadline on the monotonic clock, None when the client set none."""
        remaining = context.time_remaining()
        return start + remaining if remaining is not None and remaining < NO_DEADLINE else None

    @staticmethod
    def wait(model: LoadedModel, job: Job, deadline: float | None, context: grpc.ServicerContext) -> None:
        """Wait for a job; a client that cancels frees its queue slots, a passed deadline raises."""
        context.add_callback(lambda: job.done.is_set() or model.batcher.cancel(job))
        if not job.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
            model.batcher.cancel(job)
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")

    def record(self, method: str, model: LoadedModel | None, code: grpc.StatusCode, start: float,
               job: Job | None = None) -> None:
        """Count a finished call of any protocol: Prometheus, and the version's statistics (`job`, when the
        call got that far, splits a successful call's time into queue and compute)."""
        name, version = model.labels if model else ("", "")
        seconds = time.monotonic() - start
        self.metrics.requests.labels(method, name, version, code.name).inc()
        self.metrics.request_latency.labels(method, name).observe(seconds)
        if model is not None:
            model.stats.request(code == grpc.StatusCode.OK, seconds, job)

    @staticmethod
    def first_error(job: Job) -> RequestError | None:
        """For protocols with no per-image status: the first failed image fails the whole request."""
        for i, value in enumerate(job.results):
            if not isinstance(value, np.ndarray):
                return RequestError(error_code(value), f"image {i}: {value}" if job.n > 1 else str(value))
        return None

    def _decode(self, model: LoadedModel, job: Job, index: int, data: bytes) -> None:
        if job.cancelled:
            return
        if job.expired():
            model.batcher.fail(job, index, DeadlineExceeded("deadline exceeded before decoding"))
            return
        start = time.monotonic()
        try:
            x = preprocess_bytes(data, model.spec, max_pixels=self.config.max_image_pixels,
                                 max_bytes=self.config.max_image_bytes)
        except ImageDecodeError as exc:
            model.batcher.fail(job, index, exc)
            return
        except Exception as exc:  # Pillow has more ways to fail on hostile input than it documents
            log.warning("preprocessing raised %s: %s", type(exc).__name__, exc)
            model.batcher.fail(job, index, ImageDecodeError(f"could not decode the image ({type(exc).__name__})"))
            return
        seconds = time.monotonic() - start
        self.metrics.preprocess_latency.labels(model.entry.name).observe(seconds)
        job.add_input(seconds)
        model.batcher.put(job, index, x)

    def response(self, model: LoadedModel, job: Job, top_k: int, request_id: str) -> pb.PredictResponse:
        """Build the response from a finished job; raises RequestError when the request as a whole failed."""
        name, version = model.labels
        classes = model.entry.manifest.class_names
        k = min(top_k, len(classes))
        results = []
        codes = []
        for value in job.results:
            if isinstance(value, np.ndarray):
                top = np.argsort(-value, kind="stable")[:k]
                labels = [pb.Label(index=int(i), name=classes[i], score=float(value[i])) for i in top]
                results.append(pb.ImageResult(labels=labels, status=_status(grpc.StatusCode.OK)))
                codes.append(grpc.StatusCode.OK)
                continue
            code = error_code(value)
            codes.append(code)
            results.append(pb.ImageResult(status=_status(code, str(value))))
        for code in codes:
            self.metrics.images.labels(name, version, code.name).inc()
        for code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
                     grpc.StatusCode.INTERNAL):
            if code in codes:  # the request as a whole failed
                raise RequestError(code, results[codes.index(code)].status.message)
        if job.n == 1 and codes[0] != grpc.StatusCode.OK:
            raise RequestError(codes[0], results[0].status.message)
        return pb.PredictResponse(model_name=name, model_version=model.entry.version, results=results,
                                  request_id=request_id)


def error_code(error: object) -> grpc.StatusCode:
    """The gRPC status for one image's failure (decode error, deadline, cancel, shutdown, other)."""
    if isinstance(error, ImageDecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, Cancelled):
        return grpc.StatusCode.CANCELLED
    if isinstance(error, ShuttingDown):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


class Servicer(pb_grpc.InferenceServicer):
    """The `imgcls.v1.Inference` methods; all state lives in the InferenceServer."""

    def __init__(self, server: InferenceServer) -> None:
        self.s = server

    def _validate(self, request: pb.PredictRequest) -> int:
        """Checks that do not depend on the model; returns top_k."""
        cfg = self.s.config
        if not request.images:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "no images in the request")
        if len(request.images) > cfg.max_images_per_request:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{len(request.images)} images; at most {cfg.max_images_per_request} per request")
        top_k = request.top_k if request.HasField("top_k") else cfg.default_top_k
        if top_k < 1:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"top_k must be >= 1, got {top_k}")
        return top_k

    def _record(self, method: str, model: LoadedModel | None, code: grpc.StatusCode, start: float,
                job: Job | None = None) -> None:
        self.s.record(method, model, code, start, job)

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        start, model, code, job = time.monotonic(), None, grpc.StatusCode.OK, None
        with self.s.track("Predict"):
            try:
                self.s.check_accepting()
                model = self.s.resolve(request.model_name, request.model_version)
                top_k = self._validate(request)
                deadline = self.s.call_deadline(context, start)
                job = self.s.submit(model, list(request.images), deadline)
                self.s.wait(model, job, deadline, context)
                return self.s.response(model, job, top_k, request.request_id)
            except RequestError as exc:
                code = exc.code
                context.abort(exc.code, exc.message)
            except Exception:
                log.exception("Predict failed")
                code = grpc.StatusCode.INTERNAL
                context.abort(code, "internal error (see the server log)")
            finally:
                self._record("Predict", model, code, start, job)

    def PredictStream(self, request_iterator, context: grpc.ServicerContext) -> Iterator[pb.PredictResponse]:
        with self.s.track("PredictStream", pin_models=False):  # pinned per message in _Stream._admit
            try:
                self.s.check_accepting()
            except RequestError as exc:
                context.abort(exc.code, exc.message)
            yield from _Stream(self, request_iterator, context).run()

    def GetModelMetadata(self, request: pb.GetModelMetadataRequest, context) -> pb.ModelMetadata:
        with self.s.track("GetModelMetadata"):
            try:
                self.s.check_accepting()
                model = self.s.resolve(request.model_name, request.model_version)
            except RequestError as exc:
                context.abort(exc.code, exc.message)
            m = model.entry.manifest
            spec = m.preprocessing
            name = model.entry.name
            return pb.ModelMetadata(
                name=name, version=model.entry.version,
                versions=sorted(self.s.models.get(name, {model.entry.version: model})),
                failed_versions=_failed_versions(self.s.failed.get(name, {})),
                backbone=m.backbone, class_names=m.class_names,
                preprocessing=pb.Preprocessing(
                    height=spec.input_size[0], width=spec.input_size[1], mode=spec.mode, resize=spec.resize,
                    channel_order=spec.channel_order, scale=spec.scale, mean=spec.mean, std=spec.std),
                formats=[a.format for a in m.artifacts], runtime=model.runtime, created_at=m.created_at,
            )

    def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        with self.s.track("ListModels"):
            try:
                self.s.check_accepting()
            except RequestError as exc:
                context.abort(exc.code, exc.message)
            models, failed = self.s.models, self.s.failed  # snapshots: hot reload replaces both
            summaries = []
            for name in sorted(set(models) | set(failed)):
                summary = pb.ModelSummary(name=name, failed_versions=_failed_versions(failed.get(name, {})))
                if name in models:  # else every version of it failed: listed so the failure shows
                    versions = models[name]
                    latest = versions[max(versions)]
                    summary.versions.extend(sorted(versions))
                    summary.backbone, summary.runtime = latest.entry.manifest.backbone, latest.runtime
                    summary.num_classes = latest.entry.manifest.num_classes
                summaries.append(summary)
            return pb.ListModelsResponse(models=summaries)


def _failed_versions(failed: dict[int, str]) -> list[pb.FailedVersion]:
    return [pb.FailedVersion(version=v, error=error) for v, error in sorted(failed.items())]


_END = object()


class _Stream:
    """One PredictStream call: a reader thread admits requests (at most `stream_max_inflight` at a time,
    so a fast client is slowed by flow control rather than refused), finished jobs come back through a
    queue and are yielded as they complete. Per-request failures are answered in-stream."""

    def __init__(self, servicer: Servicer, requests, context: grpc.ServicerContext) -> None:
        self.servicer, self.s, self.requests, self.context = servicer, servicer.s, requests, context
        self.out: queue.Queue = queue.Queue()
        self.window = threading.Semaphore(self.s.config.stream_max_inflight)
        self.jobs: dict[int, tuple[LoadedModel, Job]] = {}
        self.lock = threading.Lock()
        self.closed = False
        remaining = context.time_remaining()
        self.deadline = time.monotonic() + remaining if remaining < NO_DEADLINE else None

    def run(self) -> Iterator[pb.PredictResponse]:
        self.context.add_callback(self._cancel_all)
        threading.Thread(target=self._read, name="stream-reader", daemon=True).start()
        answered, total = 0, None
        while total is None or answered < total:
            item = self.out.get()
            if isinstance(item, tuple) and item[0] is _END:
                total = item[1]
                continue
            answered += 1
            self.window.release()
            yield self._answer(*item)

    def _answer(self, request: pb.PredictRequest, start: float, model: LoadedModel | None, job: Job | None,
                top_k: int, error: RequestError | None) -> pb.PredictResponse:
        if error is None and job is not None:
            with self.lock:
                self.jobs.pop(id(job), None)
            try:
                response = self.s.response(model, job, top_k, request.request_id)
                self.servicer._record("PredictStream", model, grpc.StatusCode.OK, start, job)
                return response
            except RequestError as exc:
                error = exc
        self.servicer._record("PredictStream", model, error.code, start)
        return pb.PredictResponse(request_id=request.request_id, error=_status(error.code, error.message),
                                  model_name=model.entry.name if model else request.model_name,
                                  model_version=model.entry.version if model else request.model_version)

    def _read(self) -> None:
        count = 0
        try:
            for request in self.requests:
                while not self.window.acquire(timeout=0.1):
                    if self.closed:
                        return
                count += 1
                self._admit(request)
        except Exception as exc:  # the client cancelled or the connection broke: nothing left to answer
            log.debug("stream reader stopped: %s", exc)
        finally:
            self.out.put((_END, count))

    def _admit(self, request: pb.PredictRequest) -> None:
        start, model, top_k = time.monotonic(), None, 0
        try:
            with self.s.pin_models():  # the stream itself does not pin versions, each request does
                model = self.s.resolve(request.model_name, request.model_version)
                top_k = self.servicer._validate(request)
                with self.lock:
                    if self.closed:  # read after the client cancelled: admitting it would run an orphan job
                        raise RequestError(grpc.StatusCode.CANCELLED, "stream cancelled")
                    job = self.s.submit(model, list(request.images), self.deadline,
                                        on_done=lambda job: self.out.put((request, start, model, job, top_k, None)))
                    if not job.done.is_set():
                        self.jobs[id(job)] = (model, job)
        except RequestError as exc:
            self.out.put((request, start, model, None, top_k, exc))

    def _cancel_all(self) -> None:
        self.closed = True
        with self.lock:
            jobs = list(self.jobs.values())
            self.jobs.clear()
        for model, job in jobs:
            model.batcher.cancel(job)
