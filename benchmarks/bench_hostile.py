"""The hostile-input flood of issue 15, in one command: does one good request still get through?

Starts `imgcls serve` (the tiny test model by default), measures a good request every 100 ms unloaded, then
floods the server with the worst generated inputs (cost bombs, decompression bombs, the multi-megabyte limit
cases, other formats) from 8 client threads over all three protocols while the same good request every
100 ms measures latency; reads the server's CPU time and memory from /proc; and sends SIGTERM while the flood
is still running. Goals (issue 15): loaded p99 < 3x unloaded p99, peak RSS < 1.5 GiB, SIGTERM exits within
the grace period; the CPU per hostile image is reported (the per-image bound of 1 CPU-second is asserted by
tests/test_fuzz_server.py, image by image).

    python benchmarks/bench_hostile.py [--model-repository REPO --model NAME] [--clients 8] [--duration 20]
        [--grace-period 10] [--json results.json]

Without --model-repository it uses the tiny model repository of the tests (built once, ~20 s, with
TensorFlow, into .pytest_cache). Prints a markdown table; exit code 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import queue
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hostile import corpus, wire  # noqa: E402
from hostile.protocol import good_image  # noqa: E402

GiB = 1024**3


def worst_inputs() -> list[corpus.Case]:
    """The inputs that cost a decoder without a cost model the most, plus cheap refusals in between."""
    cases = corpus.build()
    worst = [c for c in cases if c.kind in ("cost", "bomb") or (c.kind == "limit" and c.expect == corpus.REJECT)]
    worst += [c for c in cases if c.kind in ("format", "text-format", "float")][::4]
    return worst


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Prober(threading.Thread):
    """One good request every `interval` seconds (imgcls.v1 Predict); latencies in seconds."""

    def __init__(self, clients: wire.Clients, interval: float = 0.1, timeout: float = 10.0) -> None:
        super().__init__(daemon=True, name="prober")
        self.clients, self.interval, self.timeout = clients, interval, timeout
        self.latencies: list[float] = []
        self.failures: Counter = Counter()
        self.stop = threading.Event()
        self.image = good_image(11)

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            outcome = self.clients.classify("v1", self.image, timeout=self.timeout)
            if outcome.accepted:
                self.latencies.append(outcome.seconds)
            else:
                self.failures[outcome.code] += 1
                self.latencies.append(max(outcome.seconds, self.timeout if outcome.code == "DEADLINE_EXCEEDED" else 0))
            next_at += self.interval
            self.stop.wait(max(0.0, next_at - time.monotonic()))


class Flooder(threading.Thread):
    def __init__(
        self, index: int, clients: wire.Clients, cases: list[corpus.Case], stop: threading.Event, interval: float = 0.0
    ) -> None:
        super().__init__(daemon=True, name=f"flood-{index}")
        self.index, self.clients, self.cases, self.stop_event = index, clients, cases, stop
        self.interval = interval
        self.counter = None  # a multiprocessing.Value: requests answered, read by the parent at the window's end
        self.codes: Counter = Counter()
        self.sent = 0

    def run(self) -> None:
        i = self.index * 7
        while not self.stop_event.is_set():
            case = self.cases[i % len(self.cases)]
            proto = wire.PROTOCOLS[(i // len(self.cases) + self.index) % len(wire.PROTOCOLS)]
            outcome = self.clients.classify(proto, case.data, timeout=10.0, variant=i)
            self.sent += 1
            self.codes[outcome.code] += 1
            if self.counter is not None:
                with self.counter.get_lock():
                    self.counter.value += 1
            i += 1
            if self.interval:
                self.stop_event.wait(self.interval)


def flood_process(
    target: str, model: str, cases: list[corpus.Case], clients: int, interval: float, counter, stop, results
) -> None:
    """The flood, in its own process so the clients' interpreter lock does not delay the timed good request."""
    import resource

    import grpc

    wire.MODEL = model

    channel = grpc.insecure_channel(target, options=wire._channel_options())
    done = threading.Event()
    flooders = [Flooder(i, wire.Clients(channel), cases, done, interval) for i in range(clients)]
    for flooder in flooders:
        flooder.counter = counter
    for flooder in flooders:
        flooder.start()
    results.put("started")
    stop.wait()
    done.set()
    for flooder in flooders:
        flooder.join(15)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    codes = dict(sum((f.codes for f in flooders), Counter()))
    results.put((sum(f.sent for f in flooders), codes, usage.ru_utime + usage.ru_stime))
    channel.close()


class MemorySampler(threading.Thread):
    def __init__(self, server: wire.Server) -> None:
        super().__init__(daemon=True, name="rss")
        self.server, self.peak, self.stop = server, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.server.alive():
            memory = self.server.memory()
            self.peak = max(self.peak, memory["VmRSS"], memory["VmHWM"])
            self.stop.wait(0.1)


def default_repository() -> Path:
    from service_fixtures import cached_repository

    return cached_repository(ROOT / ".pytest_cache" / "d" / "imgcls-service-fixture")


def run(args: argparse.Namespace) -> dict:
    repo = args.model_repository or default_repository()
    wire.MODEL = args.model
    cases = worst_inputs()
    server = wire.Server(repo, decode_workers=args.decode_workers, grace_period=args.grace_period).start()
    result: dict = {
        "meta": {
            "host": platform.node(),
            "python": platform.python_version(),
            "clients": args.clients,
            "client_interval_s": args.client_interval,
            "duration_s": args.duration,
            "grace_period_s": args.grace_period,
            "hostile_inputs": len(cases),
            "repository": str(repo),
            "model": args.model,
        }
    }
    try:
        clients = wire.Clients(server.channel)
        for _ in range(10):  # warm up
            clients.classify("v1", good_image(12), timeout=10)
        prober = Prober(clients)
        prober.start()
        time.sleep(args.baseline)
        prober.stop.set()
        prober.join()
        unloaded = prober.latencies

        memory = MemorySampler(server)
        memory.start()
        context = multiprocessing.get_context("spawn")
        stop, results, counter = context.Event(), context.Queue(), context.Value("q", 0)
        flood = context.Process(
            target=flood_process,
            args=(server.target, args.model, cases, args.clients, args.client_interval, counter, stop, results),
            daemon=True,
        )
        flood.start()
        assert results.get(timeout=120) == "started", "the flood process did not start"
        cpu_before, sent_before = server.cpu_seconds(), counter.value
        prober = Prober(clients)
        prober.start()
        time.sleep(args.duration)
        prober.stop.set()
        prober.join(15)
        cpu = server.cpu_seconds() - cpu_before
        in_window = counter.value - sent_before  # hostile requests answered while CPU was measured
        peak = max(memory.peak, server.memory()["VmHWM"])
        alive = server.alive()
        health = server.health(timeout=5) if alive else "DEAD"

        # SIGTERM while the flood goes on
        exit_code, exit_seconds = server.terminate(timeout=args.grace_period + 15)
        stop.set()
        memory.stop.set()
        try:
            sent, codes, client_cpu = results.get(timeout=60)
        except queue.Empty:
            sent, codes, client_cpu = 0, {"flood process lost": 1}, float("nan")
        flood.join(10)
        if flood.is_alive():
            flood.kill()
    finally:
        server.close()
    loaded = prober.latencies
    ratio = percentile(loaded, 99) / percentile(unloaded, 99) if unloaded else float("nan")
    result["rows"] = {
        "unloaded_p50_ms": percentile(unloaded, 50) * 1000,
        "unloaded_p99_ms": percentile(unloaded, 99) * 1000,
        "loaded_p50_ms": percentile(loaded, 50) * 1000,
        "loaded_p99_ms": percentile(loaded, 99) * 1000,
        "p99_ratio": ratio,
        "good_requests": len(loaded),
        "good_failures": dict(prober.failures),
        "hostile_requests": sent,
        "hostile_codes": dict(codes),
        "server_cpu_s": cpu,
        "flood_client_cpu_s": client_cpu,
        "hostile_requests_in_window": in_window,
        "cpu_s_per_hostile_image": cpu / in_window if in_window else float("nan"),
        "peak_rss_gib": peak / GiB,
        "alive_after_flood": alive,
        "health_after_flood": health,
        "sigterm_exit_code": exit_code,
        "sigterm_exit_s": exit_seconds,
    }
    rows = result["rows"]
    result["goals"] = {
        "p99 under load < 3x unloaded": bool(ratio < 3),
        "every good request answered": not prober.failures,
        "server alive and SERVING after the flood": alive and health == "SERVING",
        "peak RSS < 1.5 GiB": rows["peak_rss_gib"] < 1.5,
        "SIGTERM exits within the grace period": exit_code == 0 and exit_seconds <= args.grace_period + 1,
    }
    return result


def table(result: dict) -> str:
    r = result["rows"]
    lines = [
        "| measure | value |",
        "|---|---|",
        f"| good request p50 / p99, unloaded | {r['unloaded_p50_ms']:.1f} / {r['unloaded_p99_ms']:.1f} ms |",
        f"| good request p50 / p99, during the flood | {r['loaded_p50_ms']:.1f} / {r['loaded_p99_ms']:.1f} ms |",
        f"| p99 ratio (goal < 3) | {r['p99_ratio']:.2f} |",
        f"| good requests (failed) | {r['good_requests']} ({r['good_failures'] or 'none'}) |",
        f"| hostile requests from {result['meta']['clients']} clients: during the timed window (in all) | "
        f"{r['hostile_requests_in_window']} ({r['hostile_requests']}) |",
        f"| their answers, SIGTERM included | {', '.join(f'{k} {v}' for k, v in sorted(r['hostile_codes'].items()))} |",
        f"| server CPU during the flood (flood clients' CPU, same machine) | {r['server_cpu_s']:.1f} s "
        f"({r['flood_client_cpu_s']:.1f} s) |",
        f"| CPU per hostile image | {r['cpu_s_per_hostile_image'] * 1000:.1f} ms |",
        f"| peak RSS (goal < 1.5 GiB) | {r['peak_rss_gib']:.2f} GiB |",
        f"| SIGTERM during the flood: exit code, seconds (grace {result['meta']['grace_period_s']:g} s) | "
        f"{r['sigterm_exit_code']}, {r['sigterm_exit_s']:.1f} s |",
        "",
        "| goal | met |",
        "|---|---|",
        *(f"| {goal} | {'yes' if met else 'NO'} |" for goal, met in result["goals"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Flood imgcls serve with hostile inputs; measure a good request.")
    parser.add_argument("--model-repository", type=Path, help="default: the tests' tiny model repository")
    parser.add_argument("--model", default="tiny", help="model name the good and hostile requests use")
    parser.add_argument("--clients", type=int, default=8, help="flooding client threads (default 8)")
    parser.add_argument(
        "--client-interval",
        type=float,
        default=0.0,
        help="seconds each flooding client waits between requests (default 0: closed loop)",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of flood (default 20)")
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds of unloaded probing (default 5)")
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--grace-period", type=float, default=10.0, help="the server's --grace-period")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    result = run(args)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if all(result["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
