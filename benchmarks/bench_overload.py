"""Overload and fault benchmark for `imgcls serve` (issue 14): capacity, overload, idle streams, SIGTERM.

Talks to the server only over the wire (imgcls.v1 Predict / PredictStream, grpc.health.v1 Check) and reads its
Prometheus /metrics, so it measures any version of the server the same way. Scenarios, each bounded in time:

  capacity  closed loop at 1, 8, 32 clients: throughput, p50/p99; the best is "capacity", 1 client's p99 is
            "unloaded p99"
  closed    closed loop at 128 and 512 clients, no deadline: goodput, refusals, admitted and refusal latency
  open      open loop (Poisson arrivals, independent of answers) at 2x and 4x capacity, without a deadline and
            with a 1 s one, plus 2x with 250 ms: goodput, admitted p99, refusal p99, wasted compute
  idle      64 and 500 PredictStream calls that send nothing: unary throughput (8 clients) and health latency
            during them against the same without
  sigterm   64 clients, SIGTERM mid-run: calls received before the signal that failed, exit code, drain time

During closed, open, idle and sigterm a prober calls health Check every 50 ms (1 s deadline). Per run: the
server's peak RSS (VmHWM) and CPU, the generator's own CPU, and the metrics check (the delta of
`imgcls_requests_total{method="Predict"}` against the calls the generator made). A verdict block compares with
issue 14's "Done when" targets.

The load generator is several spawned processes (`--procs`), each running grpc.aio clients on its own
connections, so one Python process is never the bottleneck; it sends pre-serialized requests and does not
parse answers. Everything it starts is stopped on exit, on error and on Ctrl-C; traffic goes to 127.0.0.1 only.

    python benchmarks/bench_overload.py --model-repository REPO --model flowers \\
        --images ~/.keras/datasets/flower_photos [--quick] [--scenarios capacity,open] [--serve-arg=--max-queue-size=32]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np

PREDICT = "/imgcls.v1.Inference/Predict"
PREDICT_STREAM = "/imgcls.v1.Inference/PredictStream"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
SCENARIOS = ("capacity", "closed", "open", "idle", "sigterm")

CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
OK = grpc.StatusCode.OK.value[0]
CANCELLED = grpc.StatusCode.CANCELLED.value[0]
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
REFUSALS = (EXHAUSTED, UNAVAILABLE)
MAX_CALLS_PER_CLIENT = 1_000_000  # a closed-loop client's calls in one run, whatever happens
LAG_LIMIT_MS = 50.0  # open-loop arrivals sent later than this (p99) mean the generator fell behind
RUNQ_LIMIT_PCT = 10.0  # a generator loop waiting for a CPU longer than this share of a run: machine too busy
STEADY_PCT = 10.0  # the 8-client rate after the overload runs further than this from capacity: the VM drifted
BUSY_LIMIT_PCT = 80.0  # a generator process using more of a core than this is close to being the bottleneck
FLAG_DRAINING = 1  # the status details say "draining"
FLAG_BENCH_CANCEL = 2  # the generator cancelled the call at its hard stop (never answered in time)

# Each channel its own TCP connection (gRPC otherwise shares one subchannel between identical channels).
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", 64 << 20),
                   ("grpc.max_receive_message_length", 64 << 20), ("grpc.enable_retries", 0)]


@dataclass
class Durations:
    """Seconds per measured run; `--quick` shrinks them for a smoke run."""

    capacity: float = 10.0
    closed: float = 20.0
    open: float = 20.0
    idle: float = 10.0
    sigterm: float = 10.0
    drain: float = 10.0  # after a run: how long outstanding calls get before the generator cancels them
    settle: float = 30.0  # after a run: how long to wait for the server's in-flight gauges to reach 0

    @classmethod
    def quick(cls) -> Durations:
        return cls(capacity=2.0, closed=3.0, open=3.0, idle=2.0, sigterm=3.0, drain=3.0, settle=10.0)

    def override(self, seconds: float) -> None:
        self.capacity = self.closed = self.open = self.idle = self.sigterm = seconds


# --- load generator processes (spawned: they must not inherit the parent's gRPC state) ----------------------


class _Stop:
    """A flag the coroutines read cheaply; a watcher task copies the cross-process event into it."""

    def __init__(self) -> None:
        self.set = False


async def _watch(event: Any, flag: _Stop) -> None:
    while not flag.set:
        if event.is_set():
            flag.set = True
            return
        await asyncio.sleep(0.02)


async def _call(method: Any, payload: bytes, timeout: float | None, out: list, examples: dict) -> int:
    """One unary call; appends (sent, ended, code, flags) and returns the code. A call the generator cancels is
    recorded before the cancellation goes on, so every call made is in `out`. `examples` keeps the first status
    details per code (what the server said, for the reader)."""
    sent = time.monotonic()
    try:
        await method(payload, timeout=timeout)
        code, flags = OK, 0
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code().value[0], exc.details() or ""
        flags = FLAG_DRAINING if "draining" in details else 0
        examples.setdefault(exc.code().name, details[:200])
    except asyncio.CancelledError:
        out.append((sent, time.monotonic(), CANCELLED, FLAG_BENCH_CANCEL))
        raise
    out.append((sent, time.monotonic(), code, flags))
    return code


async def _finish(tasks: set, flag: _Stop, stop_at: float, drain: float) -> None:
    """Wait for the calls still out until `stop_at + drain` (or `drain` after an early stop), then cancel."""
    hard = stop_at + drain
    while tasks and time.monotonic() < hard:
        if flag.set:
            hard = min(hard, time.monotonic() + drain)
        await asyncio.wait(list(tasks), timeout=0.1)
        tasks = {t for t in tasks if not t.done()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _run_load(spec: dict, target: str, payloads: list[bytes], event: Any) -> dict:
    flag = _Stop()
    watcher = asyncio.create_task(_watch(event, flag))
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(spec["channels"])]
    methods = [ch.unary_unary(PREDICT) for ch in channels]  # bytes in, bytes out: no protobuf work here
    with contextlib.suppress(asyncio.TimeoutError, grpc.aio.AioRpcError):
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), 5)
    records: list[tuple[float, float, int, int]] = []
    start_at, stop_at, timeout = spec["start_at"], spec["start_at"] + spec["duration"], spec["deadline"]
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    lags: list[float] = []
    examples: dict[str, str] = {}
    skipped = 0
    if spec["kind"] == "closed":
        pause, step, offset = spec["refusal_pause"], spec["clients_total"], spec["client_offset"]

        async def client(k: int) -> None:
            i = offset + k
            for _ in range(MAX_CALLS_PER_CLIENT):  # bounded in calls as well as in time
                if flag.set or time.monotonic() >= stop_at:
                    break
                code = await _call(methods[k % len(methods)], payloads[i % len(payloads)], timeout, records,
                                   examples)
                i += step
                if pause and code in REFUSALS:
                    await asyncio.sleep(pause)

        tasks = {asyncio.create_task(client(k)) for k in range(spec["clients"])}
    else:  # open loop: arrivals on a clock, whatever the answers
        rng = random.Random(spec["seed"])
        rate, tasks, i = spec["rate"], set(), spec["client_offset"]
        t = start_at + (0.0 if spec["poisson"] else spec["phase"] / rate)
        while not flag.set:
            t += rng.expovariate(rate) if spec["poisson"] else 1.0 / rate
            if t >= stop_at:
                break
            # behind schedule: still yield, so the calls already started make progress
            await asyncio.sleep(max(0.0, t - time.monotonic()))
            lags.append(time.monotonic() - t)
            if len(tasks) >= spec["max_outstanding"]:
                skipped += 1
                continue
            task = asyncio.create_task(_call(methods[i % len(methods)], payloads[i % len(payloads)], timeout,
                                             records, examples))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        tasks = set(tasks)
    await _finish(tasks, flag, stop_at, spec["drain"])
    flag.set = True
    await watcher
    for ch in channels:
        await ch.close(None)
    lag = np.asarray(lags) * 1000
    return {"records": np.asarray(records, dtype=np.float64).reshape(-1, 4), "skipped": skipped, "examples": examples,
            "lag_p99_ms": float(np.percentile(lag, 99)) if len(lag) else None,
            "lag_max_ms": float(lag.max()) if len(lag) else None}


def _own_scheduling_group() -> None:
    """A session of its own: with the kernel's autogroup scheduling (the default on most distributions) each
    session is a scheduling group weighing as much as the server's whole session, whatever its thread count,
    so a generator process gets the little CPU it needs on time instead of queueing behind the server's ~70
    threads (measured on 2 cores: the event loop waited for a CPU 80% of an open-loop run, arrivals went out
    3 s late). Also keeps a terminal's Ctrl-C away: the parent handles it and stops us."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.setsid()


def _worker_main(conn: Connection, target: str, payloads: list[bytes], event: Any) -> None:
    """A generator process: runs one load spec at a time until told to stop (None) or orphaned."""
    _own_scheduling_group()
    parent = os.getppid()
    while True:
        if not conn.poll(0.5):
            if os.getppid() != parent:
                return
            continue
        spec = conn.recv()
        if spec is None:
            return
        before, waited = os.times(), _runq_wait_s()
        try:
            result = asyncio.run(_run_load(spec, target, payloads, event))
        except Exception as exc:  # reported to the parent, which fails the run
            result = {"error": f"{type(exc).__name__}: {exc}"}
        after = os.times()
        result["cpu_s"] = (after.user - before.user) + (after.system - before.system)
        result["runq_wait_s"] = _runq_wait_s() - waited
        conn.send(result)


def _runq_wait_s() -> float:
    """Seconds this thread (the event loop's) has spent runnable but waiting for a CPU: when it grows, the
    machine is short of CPU for the generator and its timings include that wait."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


async def _ended(calls: list) -> Counter:
    """Status codes of the calls that have already ended."""
    return Counter([(await c.code()).name for c in calls if c.done()])


async def _hold(target: str, count: int, channels: int, event: Any, conn: Connection, max_life: float) -> dict:
    """Open `count` PredictStream calls that send nothing, report, hold them until `event`, then cancel."""
    chans = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(channels)]
    opened = [chans[i % channels].stream_stream(PREDICT_STREAM)() for i in range(count)]
    results = await asyncio.gather(*(asyncio.wait_for(c.wait_for_connection(), 10) for c in opened),
                                   return_exceptions=True)
    failed = Counter(type(r).__name__ if not isinstance(r, grpc.aio.AioRpcError) else r.code().name
                     for r in results if isinstance(r, BaseException))
    await asyncio.sleep(0.3)  # let the server reach them (a refused one ends here)
    ended = await _ended(opened)
    conn.send({"requested": count, "failed_to_open": dict(failed), "ended_before_close": dict(ended)})
    deadline = time.monotonic() + max_life
    while not event.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    ended = await _ended(opened)
    for c in opened:
        c.cancel()
    for ch in chans:
        await ch.close(None)
    return {"ended_while_held": dict(ended)}


def _holder_main(conn: Connection, target: str, count: int, channels: int, event: Any, max_life: float) -> None:
    _own_scheduling_group()
    before = os.times()
    try:
        result = asyncio.run(_hold(target, count, channels, event, conn, max_life))
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    after = os.times()
    result["cpu_s"] = (after.user - before.user) + (after.system - before.system)
    conn.send(result)


# --- orchestrator side ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the generator saw in one run: one row per call (sent, ended, code, flags), monotonic clock."""

    records: np.ndarray
    start: float
    duration: float
    cpu_s: list[float]
    wall_s: float
    runq_wait_s: list[float] = field(default_factory=list)
    skipped: int = 0
    lag_p99_ms: float | None = None
    lag_max_ms: float | None = None
    examples: dict = field(default_factory=dict)
    kind: str = "closed"

    @property
    def stop(self) -> float:
        return self.start + self.duration


class Generator:
    """Spawned client processes, each running grpc.aio coroutines; reused across runs."""

    def __init__(self, target: str, payloads: list[bytes], procs: int, channels: int) -> None:
        self.ctx = mp.get_context("spawn")
        self.event = self.ctx.Event()
        self.target, self.channels = target, channels
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(procs):
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(target=_worker_main, args=(child, target, payloads, self.event), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def _run(self, specs: list[dict], duration: float, drain: float, start_at: float) -> Run:
        self.event.clear()
        began = time.monotonic()
        used = [(conn, spec) for conn, spec in zip(self.conns, specs, strict=True) if spec is not None]
        for conn, spec in used:
            conn.send(spec)
        limit = start_at + duration + drain + 30
        results = []
        for conn, _ in used:
            if not conn.poll(max(0.1, limit - time.monotonic())):
                raise RuntimeError("a generator process did not finish its run in time")
            results.append(conn.recv())
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise RuntimeError(f"generator failed: {errors[0]}")
        lags = [r["lag_p99_ms"] for r in results if r.get("lag_p99_ms") is not None]
        maxes = [r["lag_max_ms"] for r in results if r.get("lag_max_ms") is not None]
        return Run(records=np.concatenate([r["records"] for r in results]), start=start_at, duration=duration,
                   cpu_s=[r["cpu_s"] for r in results], wall_s=time.monotonic() - began,
                   runq_wait_s=[r["runq_wait_s"] for r in results],
                   skipped=sum(r["skipped"] for r in results), lag_p99_ms=max(lags) if lags else None,
                   lag_max_ms=max(maxes) if maxes else None,
                   examples={k: v for r in results for k, v in r["examples"].items()},
                   kind=next(spec["kind"] for spec in specs if spec is not None))

    def closed(self, clients: int, duration: float, deadline: float | None, drain: float,
               refusal_pause: float = 0.0) -> Run:
        """`clients` closed-loop clients (a new call as soon as the last one ends), split over the processes."""
        n = len(self.procs)
        start_at = time.monotonic() + 0.5
        specs: list[dict | None] = []
        offset = 0
        for i in range(n):
            share = clients // n + (i < clients % n)
            if share == 0:
                specs.append(None)
                continue
            specs.append({"kind": "closed", "clients": share, "clients_total": clients, "client_offset": offset,
                          "channels": min(share, self.channels), "deadline": deadline, "start_at": start_at,
                          "duration": duration, "drain": drain, "refusal_pause": refusal_pause})
            offset += share
        return self._run(specs, duration, drain, start_at)

    def open(self, rate: float, duration: float, deadline: float | None, drain: float, poisson: bool,
             max_outstanding: int, seed: int) -> Run:
        """Arrivals at `rate` per second in all (each process rate/n), each one call, whatever the answers."""
        n = len(self.procs)
        start_at = time.monotonic() + 0.5
        specs: list[dict | None] = [
            {"kind": "open", "rate": rate / n, "poisson": poisson, "phase": i / n, "seed": seed * 1000 + i,
             "client_offset": i, "channels": self.channels, "deadline": deadline, "start_at": start_at,
             "duration": duration, "drain": drain, "max_outstanding": max(1, max_outstanding // n)}
            for i in range(n)]
        return self._run(specs, duration, drain, start_at)

    def stop_now(self) -> None:
        """Ask the running clients to stop issuing calls (outstanding calls get the drain time)."""
        self.event.set()

    def close(self) -> None:
        self.event.set()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


class StreamHolder:
    """A process holding `count` idle PredictStream calls open; `close()` cancels them and ends it."""

    def __init__(self, ctx: Any, target: str, count: int, channels: int, max_life: float) -> None:
        self.event = ctx.Event()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_holder_main, args=(child, target, count, channels, self.event, max_life),
                                daemon=True)
        self.proc.start()
        self.opened: dict = {}
        self.closed: dict = {}
        self.done = False

    def wait_open(self, timeout: float = 30.0) -> dict:
        if not self.conn.poll(timeout):
            raise RuntimeError("the idle streams were not opened in time")
        self.opened = self.conn.recv()
        if "error" in self.opened:
            raise RuntimeError(f"opening idle streams failed: {self.opened['error']}")
        return self.opened

    def close(self) -> dict:
        """Cancel the streams and end the process (again: a no-op)."""
        if self.done:
            return self.closed
        self.done = True
        self.event.set()
        if self.proc.is_alive() and self.conn.poll(15):
            with contextlib.suppress(EOFError):
                self.closed = self.conn.recv()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        return self.closed


class HealthProber:
    """grpc.health.v1 Check every `interval` seconds with a `timeout` deadline, each call independent of the
    last (a slow answer does not delay the next probe); on its own connection."""

    def __init__(self, target: str, interval: float = 0.05, timeout: float = 1.0, max_probes: int = 20000) -> None:
        from grpc_health.v1 import health_pb2

        self.interval, self.timeout, self.max_probes = interval, timeout, max_probes
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.check = self.channel.unary_unary(HEALTH_CHECK, request_serializer=None,
                                              response_deserializer=health_pb2.HealthCheckResponse.FromString)
        self.serving = health_pb2.HealthCheckResponse.SERVING
        self.results: list[tuple[float, str]] = []  # (latency s, "SERVING" / status name / gRPC code name)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.futures: list[Any] = []
        self.thread = threading.Thread(target=self._loop, name="health-prober", daemon=True)

    def __enter__(self) -> HealthProber:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(5)
        deadline = time.monotonic() + self.timeout + 1
        for future in self.futures:
            with contextlib.suppress(Exception):
                future.exception(timeout=max(0.0, deadline - time.monotonic()))
        self.channel.close()

    def _loop(self) -> None:
        tick = time.monotonic()
        while not self.stopping.is_set() and len(self.futures) < self.max_probes:
            sent = time.monotonic()
            future = self.check.future(b"", timeout=self.timeout)  # empty HealthCheckRequest: the whole server
            future.add_done_callback(lambda f, sent=sent: self._done(f, sent))
            self.futures.append(future)
            tick += self.interval
            self.stopping.wait(max(0.0, tick - time.monotonic()))

    def _done(self, future: Any, sent: float) -> None:
        latency = time.monotonic() - sent
        try:
            response = future.result()
            outcome = "SERVING" if response.status == self.serving else f"status {response.status}"
        except grpc.RpcError as exc:
            outcome = exc.code().name
        except Exception as exc:  # cancelled at close
            outcome = type(exc).__name__
        with self.lock:
            self.results.append((latency, outcome))

    def summary(self) -> dict:
        with self.lock:
            results = list(self.results)
        lat = np.asarray([r[0] for r in results]) * 1000
        failures = Counter(r[1] for r in results if r[1] != "SERVING")
        return {"probes": len(results), "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
                "max_ms": float(lat.max()) if len(lat) else None, "failures": sum(failures.values()),
                "failures_by_outcome": dict(failures)}


def _pct(values_ms: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values_ms, q)) if len(values_ms) else None


# --- the server and what it reports ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`imgcls serve` on free loopback ports, its log in a file; stopped (SIGTERM, then SIGKILL) on close."""

    def __init__(self, repository: Path, serve_args: list[str], log_dir: Path,
                 cores: list[int] | None = None) -> None:
        self.port, self.metrics_port = _free_port(), _free_port()
        # `taskset` execs the server, so the PID stays the server's; it sizes itself from that affinity.
        pin = ["taskset", "-c", ",".join(map(str, cores))] if cores else []
        self.command = [*pin, sys.executable, "-m", "imgcls.cli", "serve", "--model-repository", str(repository),
                        "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                        "--http-port", "0", "--poll-interval", "0", *serve_args]
        self.log_path = log_dir / "serve.log"
        self.log = self.log_path.open("w")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        # Its own session: Ctrl-C in the terminal reaches the benchmark, which then stops the server itself. Run
        # from the log folder: `-m` puts the working directory first on sys.path, and a checkout's imgcls/ there
        # would shadow the imgcls installed (or given in PYTHONPATH) that the caller chose.
        self.proc = subprocess.Popen(self.command, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=log_dir)
        self.pid = self.proc.pid

    def code_location(self) -> str:
        """Where the server's imgcls.service comes from (installed checkout, or PYTHONPATH), for the record."""
        probe = "import importlib.util as u; print(u.find_spec('imgcls.service').submodule_search_locations[0])"
        out = subprocess.run([sys.executable, "-c", probe], cwd=self.log_path.parent, capture_output=True,
                             text=True, timeout=60)
        return out.stdout.strip() or out.stderr.strip()[-200:]

    def tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def wait_serving(target: str, timeout: float, server: ServerProcess | None) -> None:
    from grpc_health.v1 import health_pb2

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary(HEALTH_CHECK, request_serializer=None,
                                    response_deserializer=health_pb2.HealthCheckResponse.FromString)
        while time.monotonic() < deadline:
            if server is not None and server.proc.poll() is not None:
                raise SystemExit(f"imgcls serve exited with {server.proc.returncode}:\n{server.tail()}")
            with contextlib.suppress(grpc.RpcError):
                if check(b"", timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.2)
    raise SystemExit(f"{target} did not become SERVING within {timeout:.0f} s"
                     + (f":\n{server.tail()}" if server else ""))


def check_model(target: str, model: str) -> str:
    """The model to call: `model`, or the server's only one. ListModels over the wire, no repository access."""
    from imgcls.v1 import inference_pb2 as pb
    from imgcls.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        names = [m.name for m in pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models]
    if model:
        if model not in names:
            raise SystemExit(f"--model {model!r}: the server serves {names}")
        return model
    if len(names) != 1:
        raise SystemExit(f"--model: choose one of {names}")
    return names[0]


Samples = dict[tuple[str, frozenset], float]


def scrape(url: str | None) -> Samples | None:
    """Every sample of /metrics, keyed by (sample name, labels); None without a URL or when unreachable."""
    if not url:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples | None, name: str, **labels: str) -> float | None:
    """Sum of a sample over every label set matching `labels`; None when the series does not exist."""
    if samples is None:
        return None
    values = [v for (n, ls), v in samples.items() if n == name and all((k, x) in ls for k, x in labels.items())]
    return sum(values) if values else None


def grouped(samples: Samples | None, name: str, by: str, **labels: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, ls), v in (samples or {}).items():
        if n == name and all((k, x) in ls for k, x in labels.items()):
            key = dict(ls).get(by, "")
            out[key] = out.get(key, 0.0) + v
    return out


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None else after - (before or 0.0)


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def _proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Observation:
    """Around one run: /metrics before and after (once the server has settled), the server's peak RSS (VmHWM,
    reset at the start where the kernel allows, else the highest VmRSS sampled) and CPU seconds."""

    def __init__(self, metrics_url: str | None, pid: int | None, settle: float) -> None:
        self.url, self.pid, self.settle = metrics_url, pid, settle
        self.before = scrape(metrics_url)
        self.hwm_reset = False
        if pid is not None:
            with contextlib.suppress(OSError):
                fd = os.open(f"/proc/{pid}/clear_refs", os.O_WRONLY)
                try:
                    os.write(fd, b"5")  # resets VmHWM to the current RSS (Linux >= 4.0)
                    self.hwm_reset = True
                finally:
                    os.close(fd)
        self.cpu0 = _proc_cpu_s(pid) if pid else None
        self.t0 = time.monotonic()
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        if pid is not None:
            self._sampler.start()
        self.after: Samples | None = None
        self.settled: bool | None = None
        self.server_cpu_s: float | None = None
        self.wall_s = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_rss = max(self.peak_rss, _proc_status(self.pid).get("VmRSS", 0))

    def finish(self, scrape_after: bool = True) -> Observation:
        cpu1 = _proc_cpu_s(self.pid) if self.pid else None
        self.wall_s = time.monotonic() - self.t0
        if cpu1 is not None and self.cpu0 is not None:
            self.server_cpu_s = cpu1 - self.cpu0
        self._stop.set()
        if self.pid is not None:
            self._sampler.join(1)
            status = _proc_status(self.pid)
            hwm = status.get("VmHWM", 0) if self.hwm_reset else 0
            self.peak_rss = max(self.peak_rss, hwm, status.get("VmRSS", 0))
        if scrape_after:
            self.settled = self._wait_settled()
            self.after = scrape(self.url)
        return self

    def _wait_settled(self) -> bool | None:
        """Wait until nothing is in flight or queued, so the counters include every call of the run."""
        if not self.url:
            return None
        deadline = time.monotonic() + self.settle
        while True:
            samples = scrape(self.url)
            busy = (total(samples, "imgcls_inflight_requests") or 0) + (total(samples, "imgcls_queue_depth") or 0)
            if samples is not None and busy == 0:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def server_figures(self, model: str, ok_answers: int) -> dict:
        """The server's side of the run. Wasted compute: from `imgcls_wasted_images_total` where the server has
        it, else estimated as the images it computed (`imgcls_batch_size_sum`) minus the OK answers the clients
        received (single-image calls): the server counts an image OK when it builds the answer, which can still
        reach the client after its deadline, so its own OK count would hide that waste."""
        b, a = self.before, self.after
        out: dict[str, Any] = {"peak_rss_mib": self.peak_rss / 2**20 if self.peak_rss else None,
                               "server_cpu_s": self.server_cpu_s, "settled": self.settled}
        if a is None:
            return out
        methods_after = grouped(a, "imgcls_requests_total", "method")
        methods_before = grouped(b, "imgcls_requests_total", "method")
        out["requests_by_method"] = {m: v - methods_before.get(m, 0.0) for m, v in methods_after.items()
                                     if v - methods_before.get(m, 0.0)}
        codes_after = grouped(a, "imgcls_requests_total", "code", method="Predict")
        codes_before = grouped(b, "imgcls_requests_total", "code", method="Predict")
        out["predict_by_code"] = {c: v - codes_before.get(c, 0.0) for c, v in codes_after.items()
                                  if v - codes_before.get(c, 0.0)}
        out["server_predict_requests"] = sum(out["predict_by_code"].values())
        computed = _delta(total(a, "imgcls_batch_size_sum", model=model), total(b, "imgcls_batch_size_sum",
                                                                               model=model))
        ok_images = _delta(total(a, "imgcls_images_total", model=model, code="OK"),
                           total(b, "imgcls_images_total", model=model, code="OK"))
        wasted = _delta(total(a, "imgcls_wasted_images_total", model=model),
                        total(b, "imgcls_wasted_images_total", model=model))
        source = "imgcls_wasted_images_total"
        if wasted is None and computed is not None:
            wasted, source = max(0.0, computed - ok_answers), "computed - OK answers"
        out.update(images_computed=computed, images_ok=ok_images, wasted_images=wasted, wasted_source=source,
                   expired_images=_delta(total(a, "imgcls_expired_images_total", model=model),
                                         total(b, "imgcls_expired_images_total", model=model)))
        out["wasted_pct"] = 100.0 * wasted / computed if wasted is not None and computed else (
            0.0 if computed == 0 else None)
        return out


# --- figures per run -----------------------------------------------------------------------------------------


def call_figures(run: Run, capacity: float | None = None) -> dict:
    """Generator-side figures (admitted = OK answers; refusals = RESOURCE_EXHAUSTED / UNAVAILABLE).

    Goodput counts the OK answers that arrived inside the measured window, per second: a server's rate of
    useful answers (answers that come later, from a backlog, are not that rate). Codes and latencies: closed
    loop, the calls sent inside the window; open loop, every call, since each was an arrival scheduled inside
    it, even one that a busy generator sent late."""
    r = run.records
    sent, ended, code, flags = r[:, 0], r[:, 1], r[:, 2].astype(int), r[:, 3].astype(int)
    latency_ms = (ended - sent) * 1000
    ok = code == OK
    goodput = float(np.sum(ok & (ended >= run.start) & (ended <= run.stop))) / run.duration
    window = np.ones(len(r), dtype=bool) if run.kind == "open" else (sent >= run.start) & (sent < run.stop)
    refused = window & np.isin(code, REFUSALS) & (flags & FLAG_BENCH_CANCEL == 0)
    codes = Counter(("CANCELLED(bench)" if f & FLAG_BENCH_CANCEL else CODE_NAMES.get(c, str(c)))
                    for c, f in zip(code[window], flags[window], strict=True))
    cores = sum(run.cpu_s) / run.wall_s if run.wall_s else None
    out = {
        "calls": len(r), "calls_in_window": int(window.sum()), "goodput": goodput,
        "ok": int(codes.get("OK", 0)), "codes": dict(codes),
        "admitted_p50_ms": _pct(latency_ms[window & ok], 50), "admitted_p99_ms": _pct(latency_ms[window & ok], 99),
        "refusal_p99_ms": _pct(latency_ms[refused], 99), "refused": int(refused.sum()),
        "deadline_exceeded": int(codes.get("DEADLINE_EXCEEDED", 0)),
        "generator_cpu_cores": cores, "generator_busiest_proc_pct": (
            100 * max(run.cpu_s) / run.wall_s if run.cpu_s and run.wall_s else None),
        "generator_runq_wait_pct": (100 * max(run.runq_wait_s) / run.wall_s
                                    if run.runq_wait_s and run.wall_s else None),
        "skipped_by_generator": run.skipped, "arrival_lag_p99_ms": run.lag_p99_ms,
        "details_by_code": run.examples,
    }
    if capacity:
        out["goodput_pct_of_capacity"] = 100 * goodput / capacity
    return out


def metrics_check(calls: dict, server: dict) -> dict:
    """Issue 14: the sum of imgcls_requests_total over codes equals the calls the generator made."""
    made, counted = calls["calls"], server.get("server_predict_requests")
    return {"generator_calls": made, "server_requests_total": counted,
            "equal": None if counted is None else int(counted) == made}


# --- scenarios -----------------------------------------------------------------------------------------------


@dataclass
class Bench:
    gen: Generator
    target: str
    model: str
    metrics_url: str | None
    pid: int | None
    server: ServerProcess | None
    d: Durations
    args: argparse.Namespace
    results: dict = field(default_factory=dict)

    def measured(self, run_fn: Any, probe: bool, capacity: float | None = None, after_run: Any = None) -> dict:
        """One run with its observation (and the health prober when `probe`); `after_run` (closing the idle
        streams) goes before the server is left to settle, so the counters it waits for can reach 0."""
        obs = Observation(self.metrics_url, self.pid, self.d.settle)
        prober = HealthProber(self.target, self.args.health_interval, 1.0) if probe else None
        with prober or contextlib.nullcontext():
            try:
                run = run_fn()
            finally:
                if after_run is not None:
                    after_run()
        obs.finish()
        calls = call_figures(run, capacity)
        server = obs.server_figures(self.model, int(np.sum(run.records[:, 2] == OK)))
        row = {**calls, "server": server, "metrics_check": metrics_check(calls, server)}
        if prober:
            row["health"] = prober.summary()
        return row

    def capacity(self) -> dict:
        self.gen.closed(8, min(1.0, self.d.capacity), None, self.d.drain)  # warm-up, not measured
        rows = []
        for n in self.args.capacity_clients:
            log(f"capacity: {n} closed-loop clients for {self.d.capacity:.0f} s")
            row = self.measured(lambda n=n: self.gen.closed(n, self.d.capacity, None, self.d.drain), probe=False)
            rows.append({"clients": n, **row})
        best = max(rows, key=lambda r: r["goodput"])
        one = next((r for r in rows if r["clients"] == 1), rows[0])
        return {"rows": rows, "capacity": best["goodput"], "capacity_clients": best["clients"],
                "unloaded_p99_ms": one["admitted_p99_ms"], "unloaded_p50_ms": one["admitted_p50_ms"]}

    def closed(self, capacity: float) -> dict:
        rows = []
        for n in self.args.closed_clients:
            log(f"closed loop: {n} clients, no deadline, for {self.d.closed:.0f} s")
            row = self.measured(lambda n=n: self.gen.closed(n, self.d.closed, None, self.d.drain,
                                                            self.args.refusal_pause_ms / 1000), True, capacity)
            rows.append({"clients": n, **row})
        return {"rows": rows}

    def open(self, capacity: float) -> dict:
        rows = []
        for factor, deadline in self.args.open_runs:
            rate = factor * capacity
            log(f"open loop: {factor:g}x capacity = {rate:.0f}/s, deadline {_deadline(deadline)}, "
                f"for {self.d.open:.0f} s")
            seed = int(factor * 100 + (deadline or 0) * 10)
            row = self.measured(lambda rate=rate, deadline=deadline, seed=seed: self.gen.open(
                rate, self.d.open, deadline, self.d.drain, not self.args.fixed_rate,
                self.args.max_outstanding, seed=seed), True, capacity)
            rows.append({"factor": factor, "rate": rate, "deadline_s": deadline, **row})
        return {"rows": rows}

    def idle(self) -> dict:
        rows = []
        deadline = self.args.idle_call_deadline
        for count in [0, *self.args.idle_streams]:
            log(f"idle streams: {count} open, 8 unary clients for {self.d.idle:.0f} s")
            holder = None
            try:
                if count:
                    holder = StreamHolder(self.gen.ctx, self.target, count, self.args.channels,
                                          max_life=self.d.idle + deadline + self.d.drain + 60)
                    holder.wait_open()
                row = self.measured(lambda: self.gen.closed(8, self.d.idle, deadline, self.d.drain), True,
                                    after_run=holder.close if holder else None)
            finally:
                if holder is not None:
                    holder.close()
            if holder:
                row["stream_calls"] = {**holder.opened, **holder.closed}
            rows.append({"streams": count, **row})
        base = rows[0]["goodput"]
        for row in rows:
            row["unary_vs_no_streams"] = row["goodput"] / base if base else None
        return {"rows": rows}

    def sigterm(self) -> dict:
        assert self.server is not None
        clients, after = self.args.sigterm_clients, self.d.sigterm / 2
        log(f"SIGTERM: {clients} clients, signal after {after:.1f} s")
        obs = Observation(self.metrics_url, self.pid, self.d.settle)
        box: dict[str, Any] = {}
        bound = self.d.sigterm + self.args.drain_bound

        def load() -> None:
            try:
                box["run"] = self.gen.closed(clients, bound, None, self.d.drain, self.args.refusal_pause_ms / 1000)
            except Exception as exc:
                box["error"] = exc

        thread = threading.Thread(target=load, daemon=True)
        with HealthProber(self.target, self.args.health_interval, 1.0) as prober:
            thread.start()
            time.sleep(0.5 + after)  # the generator starts 0.5 s after its specs are sent
            before_signal = scrape(self.metrics_url)
            signalled = time.monotonic()
            self.server.proc.send_signal(signal.SIGTERM)
            try:
                exit_code: int | None = self.server.proc.wait(self.args.drain_bound)
            except subprocess.TimeoutExpired:
                exit_code = None
            drain_s = time.monotonic() - signalled
            time.sleep(0.3)
            self.gen.stop_now()
            thread.join(bound + self.d.drain + 40)
        obs.before, obs.url = before_signal, None  # the server is gone: no scrape after
        obs.finish(scrape_after=False)
        if "error" in box:
            raise box["error"]
        run: Run = box["run"]
        run.duration = signalled - run.start  # the measured window ends at the signal
        return {"clients": clients, "exit_code": exit_code, "drain_s": drain_s, "signal_after_s": after,
                **classify_sigterm(run, signalled, self.args.at_once_ms / 1000),
                "load": call_figures(run), "health": prober.summary(),
                "server": {"peak_rss_mib": obs.peak_rss / 2**20 if obs.peak_rss else None}}


def classify_sigterm(run: Run, signalled: float, at_once: float) -> dict:
    """Calls sent before the signal: OK; refused at once (answered within `at_once` of being sent, UNAVAILABLE
    "draining": it reached the server after the signal, or RESOURCE_EXHAUSTED: refused for load on arrival; either
    way the server never took it in); the client's own deadline; failed (anything else: the server had received
    it and did not answer it). Calls sent after the signal, by code."""
    r = run.records
    sent, ended, code, flags = r[:, 0], r[:, 1], r[:, 2].astype(int), r[:, 3].astype(int)
    before = sent < signalled
    fast = (ended - sent) <= at_once
    draining = (code == UNAVAILABLE) & (flags & FLAG_DRAINING > 0)
    at_once_refused = before & fast & (draining | (code == EXHAUSTED))
    own_deadline = before & (code == DEADLINE)
    failed = before & (code != OK) & ~at_once_refused & ~own_deadline

    def names(mask: np.ndarray) -> dict[str, int]:
        return dict(Counter(("CANCELLED(bench)" if f & FLAG_BENCH_CANCEL else CODE_NAMES.get(c, str(c)))
                            + (" draining" if f & FLAG_DRAINING else "")
                            for c, f in zip(code[mask], flags[mask], strict=True)))

    return {"sent_before_signal": int(before.sum()), "ok_before_signal": int((before & (code == OK)).sum()),
            "refused_at_once": int(at_once_refused.sum()), "refused_at_once_by_code": names(at_once_refused),
            "own_deadline": int(own_deadline.sum()),
            "failed_received_before_signal": int(failed.sum()), "failed_by_code": names(failed),
            "draining_after_waiting": int((before & draining & ~fast).sum()),
            "in_flight_at_signal": int((before & (ended > signalled)).sum()),
            "sent_after_signal": int((~before).sum()), "after_signal_by_code": names(~before)}


def _deadline(d: float | None) -> str:
    return "none" if d is None else (f"{d * 1000:.0f} ms" if d < 1 else f"{d:g} s")


# --- report --------------------------------------------------------------------------------------------------


def _f(value: Any, fmt: str = ".1f", none: str = "-") -> str:
    if value is None:
        return none
    return format(value, fmt)


def _codes(codes: dict, skip: tuple[str, ...] = ("OK",)) -> str:
    parts = [f"{k} {v}" for k, v in sorted(codes.items(), key=lambda kv: -kv[1]) if k not in skip]
    return ", ".join(parts) or "0"


def _check(row: dict) -> str:
    c = row["metrics_check"]
    if c["server_requests_total"] is None:
        return f"{c['generator_calls']} / -"
    mark = "=" if c["equal"] else "≠"
    return f"{c['generator_calls']} {mark} {int(c['server_requests_total'])}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _rss(row: dict) -> str:
    return _f(row["server"].get("peak_rss_mib"), ".0f")


def _health(row: dict) -> str:
    h = row.get("health")
    return f"{_f(h['p99_ms'])} / {h['failures']}" if h else "-"


def _wasted(row: dict) -> str:
    s = row["server"]
    if s.get("wasted_images") is None:
        return "-"
    return f"{s['wasted_images']:.0f} of {s['images_computed']:.0f} ({_f(s['wasted_pct'], '.0f')}%)"


def report(res: dict) -> str:
    out = []
    if "capacity" in res:
        c = res["capacity"]
        out.append(f"## 1. Capacity (closed loop, single-image Predict): capacity {c['capacity']:.1f}/s at "
                   f"{c['capacity_clients']} clients, unloaded p99 {_f(c['unloaded_p99_ms'], '.2f')} ms")
        out.append(_table(["clients", "OK/s", "p50 ms", "p99 ms", "errors", "gen CPU cores", "server CPU s",
                           "peak RSS MiB", "calls = requests_total"],
                          [[str(r["clients"]), _f(r["goodput"]), _f(r["admitted_p50_ms"], ".2f"),
                            _f(r["admitted_p99_ms"], ".2f"), _codes(r["codes"]), _f(r["generator_cpu_cores"], ".2f"),
                            _f(r["server"].get("server_cpu_s")), _rss(r), _check(r)] for r in c["rows"]]))
    if "closed" in res:
        out.append("## 2. Closed loop overload, no deadline")
        out.append(_table(["clients", "goodput/s", "% cap", "OK", "refused / failed by code", "admitted p50 ms",
                           "admitted p99 ms", "refusal p99 ms", "health p99 ms / fails", "wasted images",
                           "gen CPU cores", "peak RSS MiB", "calls = requests_total"],
                          [[str(r["clients"]), _f(r["goodput"]), _f(r.get("goodput_pct_of_capacity"), ".0f"),
                            str(r["ok"]), _codes(r["codes"]), _f(r["admitted_p50_ms"]), _f(r["admitted_p99_ms"]),
                            _f(r["refusal_p99_ms"]), _health(r), _wasted(r), _f(r["generator_cpu_cores"], ".2f"),
                            _rss(r), _check(r)] for r in res["closed"]["rows"]]))
    if "open" in res:
        out.append("## 3. Open loop overload (arrivals independent of answers)")
        out.append(_table(["load", "deadline", "goodput/s", "% cap", "admitted p50 ms", "admitted p99 ms",
                           "refusal p99 ms", "DEADLINE_EXCEEDED", "other non-OK", "wasted images", "expired images",
                           "health p99 ms / fails", "gen lag p99 ms", "gen CPU cores", "peak RSS MiB",
                           "calls = requests_total"],
                          [[f"{r['factor']:g}x ({r['rate']:.0f}/s)", _deadline(r["deadline_s"]), _f(r["goodput"]),
                            _f(r.get("goodput_pct_of_capacity"), ".0f"), _f(r["admitted_p50_ms"]),
                            _f(r["admitted_p99_ms"]), _f(r["refusal_p99_ms"]), str(r["deadline_exceeded"]),
                            _codes(r["codes"], ("OK", "DEADLINE_EXCEEDED")), _wasted(r),
                            _f(r["server"].get("expired_images"), ".0f"), _health(r),
                            _f(r["arrival_lag_p99_ms"]), _f(r["generator_cpu_cores"], ".2f"), _rss(r), _check(r)]
                           for r in res["open"]["rows"]]))
    if "idle" in res:
        out.append("## 4. Idle streams (PredictStream calls that send nothing) vs unary Predict, 8 clients")
        rows = []
        for r in res["idle"]["rows"]:
            s = r.get("stream_calls", {})
            streams = "-" if not s else (f"{s['requested']} (failed to open: {_codes(s['failed_to_open'])}; ended "
                                         f"while held: {_codes(s.get('ended_while_held', {}), ())})")
            rows.append([str(r["streams"]), streams, _f(r["goodput"]), _f(100 * r["unary_vs_no_streams"], ".0f")
                         if r["unary_vs_no_streams"] is not None else "-", _f(r["admitted_p99_ms"]),
                         _codes(r["codes"]), _health(r), _rss(r), _check(r)])
        out.append(_table(["streams", "opened", "unary OK/s", "% of no streams", "unary p99 ms", "unary errors",
                           "health p99 ms / fails", "peak RSS MiB", "calls = requests_total"], rows))
    if "sigterm" in res:
        s = res["sigterm"]
        out.append(f"## 6. SIGTERM under load ({s['clients']} clients, signal after {s['signal_after_s']:.1f} s)")
        out.append(_table(["exit code", "drain s", "sent before", "OK", "in flight at signal", "refused at once",
                           "failed (received before signal)", "draining after waiting", "sent after signal",
                           "health p99 ms / fails", "peak RSS MiB"],
                          [[str(s["exit_code"]), _f(s["drain_s"], ".2f"), str(s["sent_before_signal"]),
                            str(s["ok_before_signal"]), str(s["in_flight_at_signal"]),
                            f"{s['refused_at_once']} ({_codes(s['refused_at_once_by_code'], ())})",
                            f"{s['failed_received_before_signal']} ({_codes(s['failed_by_code'], ())})",
                            str(s["draining_after_waiting"]),
                            f"{s['sent_after_signal']} ({_codes(s['after_signal_by_code'], ())})",
                            _health(s), _f(s["server"]["peak_rss_mib"], ".0f")]]))
    return "\n\n".join(out)


def _later_capacity(res: dict) -> float | None:
    """The idle-stream scenario's baseline (8 closed-loop clients, no streams), measured after the overload runs:
    the same load as capacity's 8-client run, so a second reading of the machine's speed."""
    rows = res.get("idle", {}).get("rows") or []
    return rows[0]["goodput"] if rows and rows[0]["streams"] == 0 else None


def verdicts(res: dict) -> list[dict]:
    """Issue 14's "Done when" targets, each met or not, with the numbers behind it."""
    out: list[dict] = []

    def add(target: str, met: bool | None, numbers: str) -> None:
        out.append({"target": target, "met": met, "numbers": numbers})

    unloaded = res.get("capacity", {}).get("unloaded_p99_ms")
    capacity, later = res.get("capacity", {}).get("capacity"), _later_capacity(res)
    if "idle" in res:
        for r in res["idle"]["rows"][1:]:
            ratio, h = r["unary_vs_no_streams"], r["health"]
            add(f"{r['streams']} idle streams: unary throughput within 10%",
                None if ratio is None else ratio >= 0.9,
                f"{r['goodput']:.1f}/s = {_f(None if ratio is None else 100 * ratio, '.0f')}% of "
                f"{res['idle']['rows'][0]['goodput']:.1f}/s without streams")
            add(f"{r['streams']} idle streams: health < 50 ms",
                None if h["p99_ms"] is None else h["p99_ms"] < 50 and h["failures"] == 0,
                f"p99 {_f(h['p99_ms'])} ms, {h['failures']} of {h['probes']} failed")
    if "open" in res:
        main_runs = [r for r in res["open"]["rows"] if r["deadline_s"] in (None, 1.0)]
        for r in main_runs:
            name = f"open {r['factor']:g}x, deadline {_deadline(r['deadline_s'])}"
            p99 = r["admitted_p99_ms"]
            add(f"{name}: admitted p99 <= 3x unloaded",
                None if p99 is None or unloaded is None else p99 <= 3 * unloaded,
                f"{_f(p99)} ms vs 3 x {_f(unloaded, '.2f')} = {_f(None if unloaded is None else 3 * unloaded)} ms")
            rp = r["refusal_p99_ms"]
            add(f"{name}: refusals p99 < 20 ms", None if rp is None else rp < 20,
                f"{_f(rp)} ms over {r['refused']} refusals" if rp is not None else "no refusals")
        for r in res["open"]["rows"]:
            if r["deadline_s"] == 1.0:
                # Against the higher of the capacity and the same load measured after the overload runs: a VM
                # that sped up during the run would otherwise flatter the percentage.
                ref = max(capacity or 0.0, later or 0.0) or None
                pct = None if ref is None else 100 * r["goodput"] / ref
                why = "" if not capacity or ref == capacity else (
                    f" (8 clients after the overload runs; {100 * r['goodput'] / capacity:.0f}% of the first "
                    f"{capacity:.1f}/s)")
                add(f"open {r['factor']:g}x, 1 s deadline: goodput >= 90% of capacity",
                    None if pct is None else pct >= 90, f"{r['goodput']:.1f}/s = {_f(pct, '.0f')}% of "
                    f"{_f(ref)}/s{why}")
            if r["deadline_s"] is not None:
                w = r["server"].get("wasted_pct")
                add(f"open {r['factor']:g}x, deadline {_deadline(r['deadline_s'])}: < 5% wasted compute",
                    None if w is None else w < 5, f"{_wasted(r)} [{r['server'].get('wasted_source', '')}]")
    if "sigterm" in res:
        s = res["sigterm"]
        add(f"SIGTERM at {s['clients']} clients: 0 failed among calls received before the signal",
            s["failed_received_before_signal"] == 0 and s["exit_code"] == 0,
            f"{s['failed_received_before_signal']} failed ({_codes(s['failed_by_code'], ())}), "
            f"{s['refused_at_once']} refused at once ({_codes(s['refused_at_once_by_code'], ())}), "
            f"exit code {s['exit_code']}, drain {s['drain_s']:.2f} s")
    probed = []  # health under load, one line for every run with a prober (the idle streams are judged above)
    for scenario in ("closed", "open", "idle"):
        for r in res.get(scenario, {}).get("rows", []):
            if r.get("health") and not (scenario == "idle" and r["streams"]):
                label = (f"open {r['factor']:g}x {_deadline(r['deadline_s'])}" if scenario == "open" else
                         f"closed {r['clients']}" if scenario == "closed" else "8 unary clients")
                probed.append((label, r["health"]))
    if probed:
        bad = [(label, h) for label, h in probed if h["p99_ms"] is None or h["p99_ms"] >= 50 or h["failures"]]
        add("health < 50 ms under load, never failing (issue 14, What to build 2)", not bad,
            f"{len(probed) - len(bad)} of {len(probed)} runs; " + "; ".join(
                f"{label}: p99 {_f(h['p99_ms'], '.0f')} ms, {h['failures']}/{h['probes']} failed"
                for label, h in (bad or probed)))
    if later is not None and capacity:
        add(f"(benchmark itself) capacity steady: 8 clients after the overload runs within {STEADY_PCT:.0f}% of "
            "the capacity", abs(later / capacity - 1) * 100 <= STEADY_PCT,
            f"{later:.1f}/s against {capacity:.1f}/s ({100 * (later / capacity - 1):+.0f}%; the machine's speed "
            "drifted, and every percentage of capacity with it)")
    if "open" in res:
        lagged = [f"{r['factor']:g}x {_deadline(r['deadline_s'])}: {r['arrival_lag_p99_ms']:.0f} ms"
                  for r in res["open"]["rows"] if (r["arrival_lag_p99_ms"] or 0) > LAG_LIMIT_MS]
        add(f"(benchmark itself) generator kept its open-loop schedule: arrival lag p99 <= {LAG_LIMIT_MS:.0f} ms",
            not lagged, "late: " + "; ".join(lagged) + " (the generator lacked CPU: those runs offered less than "
            "the nominal rate, in bursts)" if lagged else "every open-loop run on time")
    checks = [(scenario, r) for scenario in ("capacity", "closed", "open", "idle")
              for r in res.get(scenario, {}).get("rows", [])]
    waits = [(scenario, r["generator_runq_wait_pct"], r["generator_busiest_proc_pct"]) for scenario, r in checks
             if r.get("generator_runq_wait_pct") is not None]
    if waits:
        worst = max(waits, key=lambda w: w[1])
        busiest = max(w[2] or 0 for w in waits)
        add(f"(benchmark itself) generator not short of CPU: run-queue wait <= {RUNQ_LIMIT_PCT:.0f}% and no process "
            f"above {BUSY_LIMIT_PCT:.0f}% of a core", worst[1] <= RUNQ_LIMIT_PCT and busiest <= BUSY_LIMIT_PCT,
            f"worst wait {worst[1]:.0f}% of the time ({worst[0]}), busiest generator process {busiest:.0f}% of a "
            "core (a busy machine inflates every latency measured here)")
    if checks:
        bad = [f"{scenario} {_check(r)}" for scenario, r in checks if r["metrics_check"]["equal"] is False]
        unknown = all(r["metrics_check"]["equal"] is None for _, r in checks)
        add("metrics: sum of imgcls_requests_total{method=Predict} over codes = calls made, every run",
            None if unknown else not bad, f"{len(checks) - len(bad)} of {len(checks)} runs equal"
            + (f"; differ: {'; '.join(bad)}" if bad else ""))
    return out


def verdict_text(items: list[dict]) -> str:
    lines = ["## Verdict against issue 14 (Done when)"]
    for v in items:
        mark = {True: "met", False: "NOT met", None: "n/a"}[v["met"]]
        lines.append(f"- [{mark}] {v['target']}: {v['numbers']}")
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_payloads(folder: Path, limit: int, model: str) -> list[bytes]:
    """Serialized single-image imgcls.v1 PredictRequests (top_k 1), built once: the clients only send bytes."""
    from imgcls.v1 import inference_pb2 as pb

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise SystemExit(f"no images under {folder}")
    step = max(1, len(files) // limit)  # spread over the classes' folders, not the first one only
    chosen = files[::step][:limit]
    return [pb.PredictRequest(model_name=model, images=[p.read_bytes()], top_k=1).SerializeToString()
            for p in chosen]


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    mem = 0
    with contextlib.suppress(OSError, StopIteration):
        mem = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")).split()[1]) * 1024
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem / 2**30, 1), "os": platform.platform(),
            "python": platform.python_version(), "grpcio": grpc.__version__, "load_average_start": os.getloadavg()}


def _open_runs(text: str) -> list[tuple[float, float | None]]:
    """'2:none,2:1,4:none,4:1,2:0.25' -> [(factor, deadline seconds or None)]."""
    runs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        factor, _, deadline = part.partition(":")
        runs.append((float(factor), None if deadline in ("", "none") else float(deadline)))
    return runs


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-repository", type=Path, help="start `imgcls serve` on this repository")
    where.add_argument("--target", help="a running server HOST:PORT on this machine (the SIGTERM scenario is "
                                        "skipped); give --metrics-url and --pid for the server figures")
    p.add_argument("--metrics-url", help="with --target: its /metrics URL")
    p.add_argument("--pid", type=int, help="with --target: its process id (RSS, CPU)")
    p.add_argument("--model", default="", help="model name (default: the server's only model)")
    p.add_argument("--images", type=Path, required=True, help="folder of images, searched recursively")
    p.add_argument("--max-images", type=int, default=64, help="images loaded from --images (default 64)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra `imgcls serve` argument, repeat per word (e.g. --serve-arg=--max-queue-size "
                        "--serve-arg=16); not --host/--port/--metrics-port")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated, of {', '.join(SCENARIOS)} (default all); open and closed need the "
                        "capacity, measured first unless --capacity is given")
    p.add_argument("--quick", action="store_true", help="short runs (~2-3 s each) for a smoke test")
    p.add_argument("--duration", type=float, help="seconds of every measured run (overrides the defaults)")
    p.add_argument("--capacity", type=float, help="skip measuring capacity: OK answers/s at best")
    p.add_argument("--unloaded-p99-ms", type=float, help="with --capacity: the 1-client p99")
    p.add_argument("--capacity-clients", type=_ints, default=[1, 8, 32])
    p.add_argument("--closed-clients", type=_ints, default=[128, 512])
    p.add_argument("--open-runs", type=_open_runs, default=_open_runs("2:none,2:1,4:none,4:1,2:0.25"),
                   help="FACTOR:DEADLINE_S pairs (default 2:none,2:1,4:none,4:1,2:0.25)")
    p.add_argument("--fixed-rate", action="store_true", help="open loop at a fixed rate instead of Poisson")
    p.add_argument("--idle-streams", type=_ints, default=[64, 500])
    p.add_argument("--idle-call-deadline", type=float, default=5.0,
                   help="deadline of the unary calls during idle streams, so a wedged server ends them (s)")
    p.add_argument("--sigterm-clients", type=int, default=64)
    p.add_argument("--drain-bound", type=float, default=45.0, help="longest wait for the server to exit after "
                                                                   "SIGTERM (s)")
    p.add_argument("--at-once-ms", type=float, default=50.0,
                   help="a call sent before SIGTERM answered UNAVAILABLE 'draining' within this was refused, "
                        "not received (default 50)")
    p.add_argument("--refusal-pause-ms", type=float, default=50.0,
                   help="closed-loop clients pause this long after a refusal, as a real client backs off, so "
                        "fast refusals do not turn into a flood (default 50; 0 = none)")
    p.add_argument("--health-interval", type=float, default=0.05, help="seconds between health probes")
    p.add_argument("--server-cores", type=_ints, default=None, metavar="LIST",
                   help="pin the server to these cores (taskset) and the generator to the others, so that neither "
                        "takes CPU from the other (a machine with spare cores)")
    p.add_argument("--procs", type=int, default=4, help="load generator processes (default 4)")
    p.add_argument("--channels", type=int, default=8, help="connections per generator process (default 8)")
    p.add_argument("--max-outstanding", type=int, default=8000,
                   help="open loop: calls in flight at most, over all processes; arrivals past it are skipped "
                        "and counted")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds for the server to be SERVING")
    p.add_argument("--json", type=Path, help="also write every figure here as JSON ('-' = stdout)")
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"--scenarios: unknown {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    if args.target and not args.target.startswith(("127.0.0.1:", "localhost:", "[::1]:")):
        p.error("--target: loopback addresses only (127.0.0.1:PORT)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    d = Durations.quick() if args.quick else Durations()
    if args.duration:
        d.override(args.duration)
    began = time.monotonic()
    meta = {"machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "durations": d.__dict__, "procs": args.procs, "channels_per_proc": args.channels,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # `kill` of the benchmark cleans up like Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background (SIG_IGN)
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        server = None
        if args.model_repository:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_overload_")))
            server = ServerProcess(args.model_repository, args.serve_arg, log_dir, args.server_cores)
            stack.callback(server.close)
            if args.server_cores:  # the generator, its processes and the health prober: on the other cores
                others = set(os.sched_getaffinity(0)) - set(args.server_cores)
                if not others:
                    raise SystemExit("--server-cores: no cores left for the load generator")
                os.sched_setaffinity(0, others)
                meta["server_cores"], meta["generator_cores"] = args.server_cores, sorted(others)
            target, metrics_url, pid = (f"127.0.0.1:{server.port}",
                                        f"http://127.0.0.1:{server.metrics_port}/metrics", server.pid)
            meta["server_command"] = " ".join(c for c in server.command if c != sys.executable)
            meta["server_code"] = server.code_location()
            log(f"started imgcls serve (pid {pid}) on {target}")
        else:
            target, metrics_url, pid = args.target, args.metrics_url, args.pid
            if "sigterm" in args.scenarios:
                log("--target: skipping the SIGTERM scenario (it needs a server this benchmark started)")
                args.scenarios.remove("sigterm")
        wait_serving(target, args.start_timeout, server)
        if server and args.server_cores:  # what taskset really set, now that it has exec'd the server
            meta["server_affinity"] = sorted(os.sched_getaffinity(server.pid))
        model = check_model(target, args.model)
        payloads = load_payloads(args.images, args.max_images, model)
        meta.update(target=target, model=model, images=len(payloads), server_pid=pid,
                    image_kib_mean=sum(map(len, payloads)) / len(payloads) / 1024)
        log(f"model {model!r}, {len(payloads)} images, {args.procs} generator processes")
        gen = Generator(target, payloads, args.procs, args.channels)
        stack.callback(gen.close)
        bench = Bench(gen, target, model, metrics_url, pid, server, d, args)
        try:
            needs_capacity = {"capacity", "closed", "open"} & set(args.scenarios)
            if args.capacity:
                results["capacity"] = {"rows": [], "capacity": args.capacity, "capacity_clients": None,
                                       "unloaded_p99_ms": args.unloaded_p99_ms, "unloaded_p50_ms": None}
            elif needs_capacity:
                results["capacity"] = bench.capacity()
            capacity = results.get("capacity", {}).get("capacity")
            if "closed" in args.scenarios:
                results["closed"] = bench.closed(capacity)
            if "open" in args.scenarios:
                results["open"] = bench.open(capacity)
            if "idle" in args.scenarios:
                results["idle"] = bench.idle()
            if "sigterm" in args.scenarios:
                results["sigterm"] = bench.sigterm()
        except KeyboardInterrupt:
            log("interrupted: stopping the generator and the server")
            results["interrupted"] = True
        if server is not None and server.proc.poll() is not None and "sigterm" not in results:
            log(f"imgcls serve exited with {server.proc.returncode}:\n{server.tail()}")
    meta["wall_s"] = time.monotonic() - began
    meta["machine"]["load_average_end"] = os.getloadavg()
    results["verdict"] = verdicts(results)
    m = meta["machine"]
    print(f"# imgcls overload benchmark: {meta['command']}\n"
          f"# {m['cpus']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, load average "
          f"{' '.join(f'{x:.2f}' for x in m['load_average_start'])} at start, "
          f"{' '.join(f'{x:.2f}' for x in m['load_average_end'])} at end; model {meta.get('model')}, "
          f"{meta.get('images')} images; {args.procs} generator processes; {meta['wall_s']:.0f} s in all\n")
    print(report(results))
    print()
    print(verdict_text(results["verdict"]))
    if args.json:
        text = json.dumps({"meta": meta, "results": results}, indent=2, default=_jsonable) + "\n"
        if str(args.json) == "-":
            sys.stdout.write(text)
        else:
            args.json.write_text(text)
    return 130 if results.get("interrupted") else 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Iterator):
        return list(value)
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before the scenarios started; everything started was stopped on the way out
        sys.exit(130)
