"""`imgcls serve --workers N`: N serving processes sharing one gRPC port, one /metrics, one health.

Why processes: one Python process does not use many cores well (one interpreter, one batcher per model, one
inference session whose threads share the cores with the decoders). Measured in issue 16 on 16 cores: 12
cores in one process did 52% per core of what 2 did, and two processes of 6 cores did 1.44x one of 12. So the
server pre-forks workers, as gunicorn does and as Triton runs model instances in their own processes.

Design (docs/scaling.md has the measurements behind it):

- Each worker is a whole InferenceServer (worker.py) with 1/N of the CPUs for its inference and decode
  threads. Every worker binds the same port with SO_REUSEPORT and the kernel spreads new connections over
  them; a connection (and so a stream) stays with one worker. The supervisor keeps a socket bound to the port
  for its whole life, so port 0 means one free port for all, and a restarted worker gets the same one.
- The supervisor loads no model and answers no request: it starts the workers, serves /metrics (the sum of
  every worker's values, prometheus-client's multiprocess mode), forwards SIGTERM/SIGINT, and replaces a
  worker that dies (logged, with back-off when it keeps dying).
- What the workers share lives in a temporary folder (cluster.py): a state byte per worker, so that health
  answers for the whole server (SERVING only while every worker is ready; NOT_SERVING while any drains or
  warms up), and each worker's ModelStatistics totals, so KServe's ModelStatistics sums over processes.
- Hot reload: each worker scans the repository itself and loads, checks and swaps on its own, so a version
  that fails its checks fails them in every worker and replaces nothing anywhere. For the seconds a swap takes,
  workers may answer from different versions, exactly as replicas behind a Service do during a rollout.
- SIGTERM: every worker drains at once (health NOT_SERVING, new calls UNAVAILABLE, admitted calls finish);
  the supervisor exits 0 when every worker did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from imgcls.errors import ImgclsError
from imgcls.service import cluster
from imgcls.service.metrics import serve_multiprocess
from imgcls.service.server import ServeConfig

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 30.0  # seconds between restarts of a worker that keeps dying
STABLE_SECONDS = 60.0  # a worker that lived this long starts its back-off afresh when it dies


def plan(config: ServeConfig, workers: int, cpus: int, *, explicit_inference: bool,
         explicit_decode: bool) -> ServeConfig:
    """One worker's config: the CPUs split between the workers (unless the thread flags were given), and the
    server-wide decode memory budget split too. Per-process limits (queue size, calls) stay per worker."""
    share = max(1, cpus // workers)
    return replace(config,
                   inference_threads=config.inference_threads if explicit_inference else share,
                   decode_workers=config.decode_workers if explicit_decode else share,
                   decode_memory_mb=max(1, config.decode_memory_mb // workers))


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT, never listening: it keeps the port for the workers
    (which bind it with SO_REUSEPORT too) and turns port 0 into one concrete free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port and _listening(host, port, family):  # SO_REUSEPORT would let us share another server's port
        raise ImgclsError(f"cannot listen on {host}:{port}: another server is listening there")
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ImgclsError(f"cannot listen on {host}:{port} ({exc}); is the port in use?") from None
    return sock


def _listening(host: str, port: int, family: socket.AddressFamily) -> bool:
    """Whether something accepts connections on host:port (the wildcard address is probed on loopback)."""
    probe = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((probe, port)) == 0


@dataclass
class Worker:
    index: int
    process: subprocess.Popen
    started: float
    ever_ready: bool = False
    failures: int = 0  # deaths in a row without living STABLE_SECONDS
    restart_at: float | None = None  # waiting to be restarted (back-off)


class Supervisor:
    """Start with `start()`, then `serve_forever()` (main thread), or `stop()` from tests."""

    def __init__(self, config: ServeConfig, workers: int, *, log_level: str = "INFO") -> None:
        if workers < 1:
            raise ImgclsError("--workers must be at least 1")
        config.validate()
        self.config = config
        self.count = workers
        self.log_level = log_level
        self.folder = Path(tempfile.mkdtemp(prefix="imgcls-serve-"))
        self.workers: list[Worker] = []
        self.port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._sockets: list[socket.socket] = []
        self._httpd = None
        self._board: cluster.StateBoard | None = None
        self._stop_requested = threading.Event()
        self._stopping = False
        self._all_ready_logged = False
        self.restarts = 0
        self.failure: ImgclsError | None = None

    # --- start -----------------------------------------------------------------------------------------------

    def start(self) -> Supervisor:
        cfg = self.config
        try:
            on_disk = cfg.check_repository()
            grpc_sock = reserve_port(cfg.host, cfg.port)
            self._sockets.append(grpc_sock)
            self.port = grpc_sock.getsockname()[1]
            worker_cfg = replace(cfg, port=self.port)
            if cfg.http_port is not None:  # the HTTP front-end's port is shared the same way
                http_sock = reserve_port(cfg.host, cfg.http_port)
                self._sockets.append(http_sock)
                self.http_port = http_sock.getsockname()[1]
                worker_cfg = replace(worker_cfg, http_port=self.http_port)
            cluster.create_state(self.folder, self.count)
            (self.folder / "config.json").write_text(worker_cfg.to_json())
            self._board = cluster.StateBoard(self.folder)
            try:
                self._httpd = serve_multiprocess(str(self.folder / "prometheus"), cfg.metrics_port, cfg.host,
                                                 workers=self._worker_pids)
            except OSError as exc:
                raise ImgclsError(f"cannot serve metrics on {cfg.host}:{cfg.metrics_port} ({exc})") from None
            self.metrics_port = self._httpd.server_port
        except BaseException:
            self._cleanup()
            raise
        http = f", HTTP on {cfg.host}:{self.http_port}" if cfg.http_port is not None else ""
        log.info("gRPC on %s:%d, metrics on %s:%d/metrics%s: %d workers, each with %d inference thread(s) per "
                 "model and %d decode worker(s); %d model(s) in the repository", cfg.host, self.port, cfg.host,
                 self.metrics_port, http, self.count, cfg.inference_threads, cfg.decode_workers, len(on_disk))
        self.workers = [self._spawn(i) for i in range(self.count)]
        return self

    def _spawn(self, index: int, failures: int = 0) -> Worker:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.folder / "prometheus")}
        assert self._board is not None
        self._board.set(index, cluster.STARTING)
        env.setdefault("IMGCLS_LOG_LEVEL", self.log_level)
        process = subprocess.Popen([sys.executable, "-m", "imgcls.service.worker", str(self.folder), str(index)],
                                   env=env)
        log.info("worker %d started (pid %d)", index + 1, process.pid)
        return Worker(index, process, time.monotonic(), failures=failures)

    def _worker_pids(self) -> dict[str, int]:
        """Worker label ("1".."N", as in the logs) -> pid of each started worker, for imgcls_worker_* metrics."""
        return {str(w.index + 1): w.process.pid for w in list(self.workers) if w.restart_at is None}

    # --- supervise -------------------------------------------------------------------------------------------

    def states(self) -> list[str]:
        assert self._board is not None
        return [cluster.STATE_NAMES.get(s, "?") for s in self._board.states()]

    def all_ready(self) -> bool:
        return self._board is not None and self._board.all_ready() and all(
            w.process.poll() is None for w in self.workers)

    def wait_until_ready(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.all_ready():
            self.check()
            if self.failure is not None:
                raise self.failure
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def check(self) -> None:
        """One round of supervision: note readiness, replace dead workers (or fail the start)."""
        if self._stopping or self._board is None:
            return
        now = time.monotonic()
        for i, w in enumerate(self.workers):
            if w.restart_at is not None:
                if now >= w.restart_at:
                    self.workers[i] = self._spawn(w.index, w.failures)
                continue
            code = w.process.poll()
            if code is None:
                if not w.ever_ready and self._board.get(w.index) == cluster.READY:
                    w.ever_ready = True
                continue
            self._board.set(w.index, cluster.STARTING)
            self._mark_dead(w.process.pid)
            if not w.ever_ready and not self._all_ready_logged and w.failures == 0 and self.restarts == 0:
                # dying before ever serving at start: a config or model problem that a restart repeats
                self.failure = ImgclsError(f"worker {w.index + 1} exited with code {code} while starting; "
                                           "see its log above")
                self._stop_requested.set()
                return
            lived = now - w.started
            failures = 0 if lived >= STABLE_SECONDS else w.failures + 1
            delay = 0.0 if failures <= 1 else min(RESTART_BACKOFF_MAX, 0.5 * 2 ** (failures - 1))
            log.error("worker %d (pid %d) exited with %s after %.0fs; restarting it%s", w.index + 1, w.process.pid,
                      _describe_exit(code), lived, f" in {delay:.1f}s" if delay else "")
            self.restarts += 1
            w.failures, w.restart_at = failures, now + delay
        if not self._all_ready_logged and self.all_ready():
            self._all_ready_logged = True
            log.info("ready: all %d workers serving", self.count)

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):  # drop its live gauges (queue depth, in flight); counters stay
            multiprocess.mark_process_dead(pid, str(self.folder / "prometheus"))

    def request_stop(self) -> None:
        self._stop_requested.set()

    def supervise(self) -> None:
        """Check on the workers a few times a second until a stop is requested (or the start failed)."""
        while not self._stop_requested.wait(0.2):
            self.check()

    def serve_forever(self) -> int:
        """Start, supervise, drain every worker on SIGTERM/SIGINT; 0 when every worker drained cleanly."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())
        self.start()
        self.supervise()
        if self.failure is not None:
            self.stop()
            raise self.failure
        log.info("draining %d workers (grace period %.0fs)", self.count, self.config.grace_period)
        return self.stop()

    def stop(self, grace: float | None = None) -> int:
        """SIGTERM every worker (each drains within the grace period), wait, kill what is left; the exit
        status: 0 when every worker exited 0."""
        if self._stopping:
            return 0
        self._stopping = True
        grace = self.config.grace_period if grace is None else grace
        for w in self.workers:
            if w.restart_at is None and w.process.poll() is None:
                w.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 15
        status = 0
        for w in self.workers:
            if w.restart_at is not None:
                continue
            try:
                code = w.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop within the grace period; killing it", w.index + 1,
                          w.process.pid)
                w.process.kill()
                code = w.process.wait()
            if code != 0:
                log.error("worker %d exited with %s while draining", w.index + 1, _describe_exit(code))
                status = 1
        self._cleanup()
        log.info("stopped")
        return status

    def _cleanup(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        if self._board is not None:
            self._board.close()
            self._board = None
        shutil.rmtree(self.folder, ignore_errors=True)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
