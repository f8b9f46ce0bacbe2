"""How to spend a model's inference threads: one runtime with all of them, or several single-threaded
instances side by side; and what computing batches in chunks saves in memory and costs in speed.

The figures behind `imgcls serve --instances auto` and `imgcls.runtimes.serving_chunk` (docs/scaling.md,
docs/benchmarks.md 2026-11-30). Random input, no decoding: the runtimes alone.

    python benchmarks/bench_instances.py --model runs/repo/flowers/1 [--threads 2] [--duration 6] [--json F]

Part 1 (ONNX): throughput at batch 1, 4 and 16 for
  A one session with `threads` threads, one caller;
  B `threads` sessions of 1 thread, one caller thread each;
  C one session with `threads` threads, `threads` callers;
  D `threads` sessions of `threads` threads each, one caller each.
Part 2 (ONNX and TFLite, each in a fresh process so resident memory is its own): memory after a warm-up up to
batch 32 and throughput at batch 16, with whole batches and with chunks of 8, 4 and 1.
Part 3 (ONNX, the lone-batch runtime): batch-1 latency of one session with `threads` threads whose threads
sleep between operators or spin within a run (`OnnxRuntime(spin=True)`), each call after a 4 ms pause as a
lone client's requests arrive (decoding in between), and the CPU the process uses in the 0.3 s after a run.
`--parts 3` runs only that part.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imgcls.manifest import read_manifest  # noqa: E402
from imgcls.runtimes import open_runtime  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def throughput(runs: list, callers: int, batch: np.ndarray, duration: float) -> float:
    """Images per second with `callers` threads, caller i calling runs[i % len(runs)] in a loop."""
    counts = [0] * callers
    stop = time.monotonic() + duration

    def caller(i: int) -> None:
        run = runs[i % len(runs)]
        while time.monotonic() < stop:
            run(batch)
            counts[i] += len(batch)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - start)


def part1(model: Path, threads: int, duration: float) -> list[dict]:
    manifest = read_manifest(model)
    artifact = manifest.artifact("onnx")
    if artifact is None:
        raise SystemExit(f"{model}: no ONNX artifact")
    h, w = manifest.preprocessing.input_size
    path = model / artifact.file

    def session(n: int):
        return open_runtime("onnx", path, n, max_chunk=None).run

    rows = []
    for size in (1, 4, 16):
        x = np.random.default_rng(0).random((size, h, w, 3), dtype=np.float32)
        layouts = {"A": ([session(threads)], 1), "B": ([session(1) for _ in range(threads)], threads),
                   "C": ([session(threads)], threads), "D": ([session(threads) for _ in range(threads)], threads)}
        row = {"batch": size}
        for name, (runs, callers) in layouts.items():
            for run in runs:
                run(x)  # warm-up
            row[name] = round(throughput(runs, callers, x, duration), 1)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def part3(model: Path, threads: int, rounds: int = 3, calls: int = 150) -> list[dict]:
    manifest = read_manifest(model)
    artifact = manifest.artifact("onnx")
    if artifact is None:
        raise SystemExit(f"{model}: no ONNX artifact")
    h, w = manifest.preprocessing.input_size
    x = np.random.default_rng(0).random((1, h, w, 3), dtype=np.float32)
    runtimes = {"sleep": open_runtime("onnx", model / artifact.file, threads),
                "spin": open_runtime("onnx", model / artifact.file, threads, spin=True)}
    rows = []
    for r in range(rounds):  # alternated, so that a drift of the machine's speed hits both alike
        for name, runtime in runtimes.items():
            for _ in range(10):
                runtime.run(x)
            times = []
            for _ in range(calls):
                time.sleep(0.004)
                start = time.perf_counter()
                runtime.run(x)
                times.append(time.perf_counter() - start)
            cpu = time.process_time()
            time.sleep(0.3)
            row = {"round": r + 1, "threads": name, "p50_ms": round(float(np.median(times)) * 1000, 2),
                   "p99_ms": round(float(np.percentile(times, 99)) * 1000, 2),
                   "cpu_after_run_ms": round((time.process_time() - cpu) * 1000, 1)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def part2_one(model: Path, fmt: str, threads: int, chunk: int | None, duration: float) -> dict:
    """In this process: a runtime with `chunk`, warmed up to batch 32, then timed at batch 16."""
    manifest = read_manifest(model)
    artifact = manifest.artifact(fmt)
    h, w = manifest.preprocessing.input_size
    before = rss_mib()
    runtime = open_runtime(fmt, model / artifact.file.rstrip("/"), threads, max_chunk=chunk)
    for n in (1, 2, 4, 8, 16, 32):
        runtime.run(np.zeros((n, h, w, 3), np.float32))
    grown = rss_mib() - before
    x = np.random.default_rng(0).random((16, h, w, 3), dtype=np.float32)
    return {"format": fmt, "threads": threads, "chunk": chunk, "memory_mib": round(grown),
            "images_per_s": round(throughput([runtime.run], 1, x, duration), 1)}


def part2(model: Path, threads: int, duration: float) -> list[dict]:
    rows = []
    manifest = read_manifest(model)
    for fmt in ("onnx", "tflite"):
        if manifest.artifact(fmt) is None:
            continue
        for n in sorted({1, threads}):
            for chunk in (None, 8, 4, 1):
                out = subprocess.run([sys.executable, __file__, "--model", str(model), "--one", fmt, str(n),
                                      str(chunk or 0), "--duration", str(duration)],
                                     capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a repository version folder (manifest.json)")
    parser.add_argument("--threads", type=int, default=2, help="the inference threads to spend (default 2)")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (default 1,2,3)")
    parser.add_argument("--one", nargs=3, metavar=("FORMAT", "THREADS", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        fmt, threads, chunk = args.one[0], int(args.one[1]), int(args.one[2]) or None
        print(json.dumps(part2_one(args.model, fmt, threads, chunk, args.duration)))
        return 0
    parts = {p.strip() for p in args.parts.split(",")}
    result: dict = {"threads": args.threads}
    t = args.threads
    if "1" in parts:
        result["layouts"] = part1(args.model, args.threads, args.duration)
        print(f"| batch | A: 1 session x {t} threads | B: {t} x 1 thread | C: 1 x {t}, {t} callers | D: {t} x {t} |")
        print("|---:|---:|---:|---:|---:|")
        for r in result["layouts"]:
            print(f"| {r['batch']} | {r['A']} | {r['B']} | {r['C']} | {r['D']} |")
    if "2" in parts:
        result["chunks"] = part2(args.model, args.threads, args.duration)
        print("\n| runtime | threads | chunk | memory after warm-up | img/s at batch 16 |\n|---|---:|---:|---:|---:|")
        for r in result["chunks"]:
            print(f"| {r['format']} | {r['threads']} | {r['chunk'] or 'whole'} | +{r['memory_mib']} MiB "
                  f"| {r['images_per_s']} |")
    if "3" in parts:
        result["lone"] = part3(args.model, args.threads)
        print(f"\n| round | {t} threads | batch-1 p50 ms | p99 ms | CPU in the 0.3 s after a run |\n"
              "|---:|---|---:|---:|---:|")
        for r in result["lone"]:
            print(f"| {r['round']} | {r['threads']} | {r['p50_ms']} | {r['p99_ms']} | {r['cpu_after_run_ms']} ms |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
