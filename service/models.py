"""The model lifecycle, apart from request handling: scan the repository, load, verify, warm up and probe
versions, swap them in (hot reload) and unload them once no call can reach them.

Hot reload (`poll_interval` > 0): the server's loader thread calls `reload()`; a version the policy now wants
is loaded, warmed up and probed with no lock held, then the model's version table is replaced in one
assignment (copy on write: readers see the old table or the new one, never a mix), and a version no longer
wanted is unloaded once no call that could have resolved it is left (`lifecycle.CallEpochs`). A version that
fails is recorded in `failed` and never replaces what is serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from imgcls.errors import ImgclsError
from imgcls.preprocessing import PreprocessingSpec
from imgcls.service import lifecycle, repository, runtimes
from imgcls.service.batcher import Batcher
from imgcls.service.metrics import Metrics
from imgcls.service.statistics import ModelStats

log = logging.getLogger(__name__)

RuntimeHook = Callable[[repository.Entry, runtimes.Runtime], runtimes.Runtime]


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


@dataclass
class ReloadResult:
    """What one repository scan changed: (model, version) pairs."""

    loaded: list[tuple[str, int]] = field(default_factory=list)
    retired: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, int]] = field(default_factory=list)
    on_disk: dict[str, list[int]] = field(default_factory=dict)  # what the scan found


class Settings(Protocol):
    """The ServeConfig fields the lifecycle reads."""

    model_repository: object
    runtime: str | None
    model_runtimes: dict[str, str]
    inference_threads: int
    instances: int | None
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    overload_target_ms: float
    grace_period: float
    verify_checksums: bool

    def policy(self, model: str) -> repository.VersionPolicy: ...


INSTANCE_FORMATS = ("onnx", "tflite", "tflite-fp16", "tflite-int8")  # runtimes that gain from instances


@dataclass(frozen=True)
class InstancePlan:
    """How one model version's inference threads are spent: `count` instances of `threads` each, plus (when
    there are several) one runtime with all of them for a batch that runs alone, so that light load keeps the
    batch-1 latency of one runtime using every thread."""

    count: int
    threads: int
    solo_threads: int = 0  # 0: no such runtime

    @property
    def runtime_threads(self) -> list[int]:
        return [self.threads] * self.count + ([self.solo_threads] if self.solo_threads else [])

    def describe(self) -> str:
        text = f"{self.count} instance(s) x {self.threads} thread(s)"
        return text + (f", {self.solo_threads} threads for a lone batch" if self.solo_threads else "")


def plan_instances(fmt: str, threads: int, requested: int | None = None) -> InstancePlan:
    """`requested` instances (None: automatic) sharing `threads`. Automatic is 2 for ONNX and TFLite given 2
    or more threads: measured on 2 cores (docs/scaling.md), two single-threaded onnxruntime instances served
    1.1-1.4x the images of one two-threaded runtime at 8-32 clients. SavedModel stays at 1: TensorFlow's
    thread pools are process-wide and each copy of the graph costs its full memory."""
    threads = max(1, threads)
    count = requested if requested is not None else (2 if fmt in INSTANCE_FORMATS and threads >= 2 else 1)
    per = max(1, threads // count)
    solo = threads if count > 1 and threads > per else 0
    return InstancePlan(count, per, solo)


class ModelManager:
    """The served version tables (`models`, `failed`) and everything that changes them."""

    def __init__(self, config: Settings, metrics: Metrics, *, runtime_hook: RuntimeHook | None = None,
                 nice: int = 0) -> None:
        self.config = config
        self.metrics = metrics
        self.runtime_hook = runtime_hook
        self.nice = nice  # batcher threads run this much nicer than the server's I/O loop
        self.models: dict[str, dict[int, LoadedModel]] = {}
        # model -> version -> error, for versions that failed to load or their probe (never served);
        # replaced, not mutated, like `models`
        self.failed: dict[str, dict[int, str]] = {}
        self._failed_prints: dict[tuple[str, int], tuple] = {}  # retried only when the folder changes
        self.epochs = lifecycle.CallEpochs()
        self.formats: tuple[str, ...] = runtimes.FORMATS
        self._reload_lock = threading.Lock()
        self.closing = threading.Event()  # close(): no more loads
        self.retiring: list[LoadedModel] = []  # unloaded, waiting for their last calls

    def check_startup(self, on_disk: dict[str, list[int]]) -> None:
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
            if self.closing.is_set():
                return result
            root = self.config.model_repository
            on_disk = result.on_disk = repository.list_versions(root)
            if not on_disk and self.models:  # an unmounted or briefly empty volume, not a decision to stop
                repository.warn_once(f"--model-repository {root} looks empty; keeping the models loaded")
                return result
            self._forget_failures(on_disk)
            for name in sorted(set(on_disk) | set(self.models) | set(self.failed)):
                if self.closing.is_set():
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
        if self.closing.is_set():
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
        epoch = self.epochs.advance()  # calls from now on can only see the new table
        if self.closing.is_set():  # stop() may have missed the new table
            for model in loaded.values():
                model.batcher.stop()
        self.metrics.model_swaps.labels(name).inc()
        result.loaded += [(name, v) for v in loaded if v in serving]
        result.retired += [(name, m.entry.version) for m in retired]
        if current:
            log.info("%s now serves %s (was %s)", name, sorted(serving) or "nothing", sorted(current))
        for model in unused + retired:
            self.retiring.append(model)
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
            fmt = runtimes.choose_artifact(entry.manifest, requested, self.formats).format
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
        plan = plan_instances(fmt, cfg.inference_threads, cfg.instances)
        instances = []  # one runtime each: a TFLite interpreter is not safe to share between threads
        for i, n_threads in enumerate(plan.runtime_threads):
            # the lone-batch runtime runs while nothing else computes: its threads may spin within a run
            lone = bool(plan.solo_threads) and i == plan.count
            runtime = runtimes.load_runtime(entry.folder, artifact, n_threads, spin=lone)
            if self.runtime_hook is not None:
                runtime = self.runtime_hook(entry, runtime)
            instances.append(runtime)
        h, w = entry.manifest.preprocessing.input_size
        # Warm-up: first calls allocate and compile (and create TFLite's per-size interpreters).
        for runtime in instances:
            for n in sorted({1 << i for i in range(cfg.max_batch_size.bit_length())} | {cfg.max_batch_size}):
                warm_start = time.monotonic()
                out = runtime.run(np.zeros((n, h, w, 3), np.float32))
                warm_seconds = time.monotonic() - warm_start
                if out.shape != (n, entry.manifest.num_classes):
                    raise ImgclsError(f"{entry.folder} ({fmt}): output shape {out.shape}, expected "
                                      f"({n}, {entry.manifest.num_classes}) from the manifest's class_names")
            lifecycle.probe(runtime, entry, artifact)
        name, version = entry.name, str(entry.version)
        stats = ModelStats()
        batcher = Batcher(
            [r.run for r in instances[:plan.count]], solo=instances[-1].run if plan.solo_threads else None,
            max_batch_size=cfg.max_batch_size, max_queue_delay=cfg.max_queue_delay_ms / 1000,
            max_queue_size=cfg.max_queue_size, name=f"{name}-v{version}",
            on_batch=self._batch_observer(name, fmt, stats), on_depth=m.queue_depth.labels(name).set,
            on_admitted=m.admitted_images.labels(name).set,
            on_expired=m.expired_images.labels(name).inc,
            on_shedding=m.shedding.labels(name).set, overload_target=cfg.overload_target_ms / 1000,
        )
        batcher.observe(n, warm_seconds)  # a first cost estimate: the largest warm-up batch
        batcher.nice = self.nice
        batcher.start()
        seconds = time.monotonic() - start
        m.model_load_seconds.labels(name, version, fmt).set(seconds)
        m.model_loaded.labels(name, version, entry.manifest.backbone, fmt).set(1)
        log.info("loaded %s v%s (%s, %s, %s) in %.2fs", name, version, entry.manifest.backbone, fmt, plan.describe(),
                 seconds)
        return LoadedModel(entry, fmt, batcher, stats)

    def _retire(self, model: LoadedModel, epoch: int) -> None:
        """Unload a version once no call that could have resolved it is left: wait for the calls that
        started before the swap (at most the grace period), then let its batcher finish what it admitted."""
        deadline = time.monotonic() + self.config.grace_period
        name, version = model.labels
        if not self.epochs.wait_before(epoch, self.config.grace_period):
            log.warning("%s v%s: %d call(s) from before the swap still open after %.0fs (streams?); unloading",
                        name, version, self.epochs.in_flight_before(epoch), self.config.grace_period)
        model.batcher.close(max(1.0, deadline - time.monotonic()))
        for gauge, labels in ((self.metrics.model_loaded, (name, version, model.entry.manifest.backbone,
                                                           model.runtime)),
                              (self.metrics.model_load_seconds, (name, version, model.runtime))):
            with suppress(KeyError):  # never set when the version failed before its gauges
                gauge.labels(*labels).set(0)  # with --workers the summed series stays, at 0 (metrics.py)
                gauge.remove(*labels)
        if model in self.retiring:
            self.retiring.remove(model)
        log.info("unloaded %s v%s", name, version)

    def _batch_observer(self, model: str, fmt: str,
                        stats: ModelStats) -> Callable[[int, list[float], float, int], None]:
        batch_size = self.metrics.batch_size.labels(model)
        wait = self.metrics.queue_wait.labels(model)
        infer = self.metrics.inference_latency.labels(model, fmt)
        wasted_images = self.metrics.wasted_images.labels(model)

        def observe(size: int, waits: list[float], seconds: float, wasted: int) -> None:
            stats.batch(size, seconds)
            batch_size.observe(size)
            infer.observe(seconds)
            for w in waits:
                wait.observe(w)
            if wasted:
                wasted_images.inc(wasted)

        return observe

    def close(self) -> None:
        """Stop every batcher (loaded and retiring versions); no more loads."""
        self.closing.set()
        for model in [m for versions in self.models.values() for m in versions.values()] + list(self.retiring):
            model.batcher.stop()
