"""Benchmark the serving path in one run and print a markdown table.

(a) the runtime alone on preprocessed batches, (b) decode + preprocess + runtime in this process (one image
at a time, and pipelined batches with a decode pool), (c) `imgcls serve` in a subprocess under closed-loop
load from 1, 8 and 32 concurrent single-image clients. Goals (issue 4): at 32 clients the server reaches
>= 80% of (b)'s best throughput, and at 1 client its p50 is within 5 ms of (b)'s single-image p50.

    python benchmarks/bench_service.py --model-repository REPO --model flowers --images DIR [--runtime onnx]
        [--duration 10] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from imgcls.preprocessing import IMAGE_EXTENSIONS, preprocess_bytes
from imgcls.service import repository, runtimes


def percentiles(latencies_s: list[float]) -> tuple[float, float]:
    ms = np.asarray(latencies_s) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def row(stage: str, setting: str, images: int, seconds: float, latencies: list[float]) -> dict:
    p50, p99 = percentiles(latencies)
    return {"stage": stage, "setting": setting, "images_per_s": images / seconds, "p50_ms": p50, "p99_ms": p99,
            "images": images}


def bench_runtime(runtime, x: np.ndarray, batch_sizes: list[int], duration: float) -> list[dict]:
    """(a): only `runtime.run` on already preprocessed batches; latency is per batch."""
    rows = []
    for b in batch_sizes:
        batch = np.resize(x, (b, *x.shape[1:]))
        for _ in range(3):
            runtime.run(batch)
        latencies, start = [], time.perf_counter()
        while time.perf_counter() - start < duration or len(latencies) < 5:
            t = time.perf_counter()
            runtime.run(batch)
            latencies.append(time.perf_counter() - t)
        rows.append(row("(a) runtime", f"batch {b}", b * len(latencies), time.perf_counter() - start, latencies))
    return rows


def bench_in_process(runtime, spec, data: list[bytes], batch_sizes: list[int], duration: float,
                     workers: int) -> list[dict]:
    """(b): bytes -> preprocess -> runtime. Single images sequentially (latency per image), then batches with
    the next batch decoding in a thread pool while the current one runs (throughput)."""
    latencies, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < duration or len(latencies) < 5:
        t = time.perf_counter()
        runtime.run(preprocess_bytes(data[i % len(data)], spec)[None])
        latencies.append(time.perf_counter() - t)
        i += 1
    rows = [row("(b) in-process", "1 image at a time", len(latencies), time.perf_counter() - start, latencies)]
    with ThreadPoolExecutor(workers) as pool:
        for b in batch_sizes:
            if b == 1:
                continue
            counter = iter(range(10**9))

            def decode_batch(b: int = b, counter=counter) -> list:
                return [pool.submit(preprocess_bytes, data[next(counter) % len(data)], spec) for _ in range(b)]

            nxt = decode_batch()
            latencies, images, start = [], 0, time.perf_counter()
            while time.perf_counter() - start < duration or len(latencies) < 3:
                t = time.perf_counter()
                current, nxt = nxt, decode_batch()
                runtime.run(np.stack([f.result() for f in current]))
                latencies.append(time.perf_counter() - t)
                images += b
            for f in nxt:
                f.result()
            rows.append(row("(b) in-process", f"batch {b}, {workers} decode threads", images,
                            time.perf_counter() - start, latencies))
    return rows


class Server:
    """`imgcls serve` in a subprocess on free ports."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        cmd = [sys.executable, "-m", "imgcls.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "0", "--http-port", "0", *args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.ports: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            found = re.search(r"gRPC on [\d.]+:(\d+), metrics on [\d.]+:(\d+)", line)
            if found:
                self.ports.put((int(found[1]), int(found[2])))

    def wait_ports(self, timeout: float = 60) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.ports.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        raise SystemExit("imgcls serve did not start:\n" + "".join(self.log))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def bench_server(target: str, model: str, data: list[bytes], concurrency: list[int], duration: float) -> list[dict]:
    """(c): N closed-loop clients, one single-image Predict at a time each."""
    from imgcls.client.client import Client

    rows = []
    with Client(target, timeout=30) as client:
        client.wait_until_serving(120)
        for _ in range(20):
            client.predict([data[0]], model=model)
        for n in concurrency:
            stop_at = time.perf_counter() + duration
            latencies: list[list[float]] = [[] for _ in range(n)]

            def loop(k: int, n: int = n, stop_at: float = stop_at, latencies: list = latencies) -> None:
                i = k
                while time.perf_counter() < stop_at:
                    t = time.perf_counter()
                    client.predict([data[i % len(data)]], model=model, top_k=1)
                    latencies[k].append(time.perf_counter() - t)
                    i += n

            start = time.perf_counter()
            threads = [threading.Thread(target=loop, args=(k,)) for k in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            flat = [x for per in latencies for x in per]
            rows.append(row("(c) server", f"{n} client{'s' if n > 1 else ''}", len(flat),
                            time.perf_counter() - start, flat))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| stage | setting | images/s | p50 ms | p99 ms |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['setting']} | {r['images_per_s']:.1f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> dict:
    b_rows = [r for r in rows if r["stage"] == "(b) in-process"]
    b_best = max(r["images_per_s"] for r in b_rows)
    b_single = next(r for r in b_rows if r["setting"] == "1 image at a time")["p50_ms"]
    c = {r["setting"]: r for r in rows if r["stage"] == "(c) server"}
    out = {"b_best_images_per_s": b_best, "b_single_p50_ms": b_single}
    if "32 clients" in c:
        out["c32_fraction_of_b_best"] = c["32 clients"]["images_per_s"] / b_best
    if "1 client" in c:
        out["c1_p50_minus_b_single_p50_ms"] = c["1 client"]["p50_ms"] - b_single
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", default="", help="model name (default: the repository's only model)")
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--runtime", default=None, help="artifact format (default: what the server would pick)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--threads", type=int, default=runtimes.default_threads(), help="inference threads")
    parser.add_argument("--decode-workers", type=int, default=runtimes.default_threads())
    parser.add_argument("--max-images", type=int, default=256, help="images loaded from --images")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `imgcls serve` flag (repeat)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    entries = [e for e in repository.scan(args.model_repository) if not args.model or e.name == args.model]
    if len(entries) != 1:
        parser.error(f"--model: choose one of {sorted(e.name for e in repository.scan(args.model_repository))}")
    entry = entries[0]
    artifact = runtimes.choose_artifact(entry.manifest, args.runtime)
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[: args.max_images]
    if not files:
        parser.error(f"no images under {args.images}")
    data = [p.read_bytes() for p in files]
    spec = entry.manifest.preprocessing
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    print(f"# {entry.name} v{entry.version} ({entry.manifest.backbone}, {artifact.format}), {len(data)} images, "
          f"{args.threads} inference threads, {os.cpu_count()} CPUs", file=sys.stderr)

    runtime = runtimes.load_runtime(entry.folder, artifact, args.threads)
    x = np.stack([preprocess_bytes(d, spec) for d in data[: max(batch_sizes)]])
    rows = bench_runtime(runtime, x, batch_sizes, args.duration / 2)
    rows += bench_in_process(runtime, spec, data, batch_sizes, args.duration / 2, args.decode_workers)
    del runtime

    server = Server(["--model-repository", str(args.model_repository), "--runtime", f"{entry.name}={artifact.format}",
                     "--inference-threads", str(args.threads), "--decode-workers", str(args.decode_workers),
                     *args.server_arg])
    try:
        port, _ = server.wait_ports()
        rows += bench_server(f"127.0.0.1:{port}", entry.name, data, concurrency, args.duration)
    finally:
        server.stop()

    summary = goals(rows)
    print(markdown(rows))
    if "c32_fraction_of_b_best" in summary:
        print(f"\n32 clients reach {summary['c32_fraction_of_b_best']:.0%} of (b)'s best throughput (goal >= 80%).")
    if "c1_p50_minus_b_single_p50_ms" in summary:
        print(f"1 client p50 is {summary['c1_p50_minus_b_single_p50_ms']:+.2f} ms from (b)'s single-image p50 "
              "(goal <= 5 ms).")
    if args.json:
        meta = {"model": entry.name, "version": entry.version, "backbone": entry.manifest.backbone,
                "runtime": artifact.format, "images": len(data), "threads": args.threads, "cpus": os.cpu_count(),
                "machine": platform.machine(), "python": platform.python_version()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "goals": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
