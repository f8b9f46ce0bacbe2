"""Where one lone request's time goes: the budget behind the 1-client goals of issues 14 and 16.

With one client nothing overlaps, so a request's latency is the sum of its steps. This measures them:

1. decode: `preprocess_bytes` in this process against `DecodePool.decode` (one worker process, as the server
   decodes by default), alternated image by image, each call after a pause as a lone client's requests arrive
   (the model runs in between). The difference is what process isolation costs an image.
2. server: `imgcls serve` on the model, one client sending single-image Predict calls one after another: the
   client's latency, the server's own histograms per request (queue wait, preprocessing, inference, the whole
   request) and the CPU per request of the server process and of its decode workers (/proc).
3. grpc.aio: a bare grpc.aio server whose one method answers at once, sent the same images the same way: the
   wall time and server CPU per call that gRPC Python costs before any of imgcls's code runs.

    python benchmarks/bench_lone.py --model-repository runs/repo --model flowers \\
        --images ~/.keras/datasets/flower_photos [--calls 400] [--rounds 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overload import ServerProcess, _proc_cpu_s, scrape, total, wait_serving  # noqa: E402
from bench_refusal import bare_server, launch  # noqa: E402

from imgcls.decoding import DecodePool  # noqa: E402
from imgcls.manifest import read_manifest  # noqa: E402
from imgcls.preprocessing import preprocess_bytes  # noqa: E402
from imgcls.v1 import inference_pb2 as pb  # noqa: E402

PAUSE_S = 0.008  # between calls: about what the model takes for a lone image on 2 cores
ANSWER = """
import asyncio, sys, grpc
async def handle(request, context):
    return b"x" * 100
"""
HISTOGRAMS = {"request": "imgcls_request_duration_seconds", "queue": "imgcls_queue_wait_seconds",
              "preprocess": "imgcls_preprocess_duration_seconds", "inference": "imgcls_inference_duration_seconds"}


def _ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": statistics.median(values) * 1000, "mean_ms": statistics.fmean(values) * 1000}


def descendants_cpu_s(pid: int) -> float:
    """CPU seconds of every process below `pid` (the forkserver and its decode workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return sum(_proc_cpu_s(p) or 0.0 for p in found)


def decode_part(model_dir: Path, images: list[bytes], rounds: int) -> list[dict]:
    spec = read_manifest(model_dir).preprocessing
    rows = []
    with DecodePool(1) as pool:
        for data in images[:5]:  # warm both paths
            preprocess_bytes(data, spec)
            pool.decode(data, spec)
        for r in range(1, rounds + 1):
            times: dict[str, list[float]] = {"in process": [], "decode pool": []}
            for data in images:
                for name, fn in (("in process", lambda d: preprocess_bytes(d, spec)),
                                 ("decode pool", lambda d: pool.decode(d, spec))):
                    time.sleep(PAUSE_S)
                    start = time.perf_counter()
                    fn(data)
                    times[name].append(time.perf_counter() - start)
            inproc, pooled = _ms(times["in process"]), _ms(times["decode pool"])
            rows.append({"round": r, "images": len(images), "in_process": inproc, "pool": pooled,
                         "pool_overhead_ms": pooled["mean_ms"] - inproc["mean_ms"]})
    return rows


def _calls(target: str, requests: list[bytes], calls: int) -> list[float]:
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        predict = channel.unary_unary("/imgcls.v1.Inference/Predict")
        out = []
        for i in range(calls):
            start = time.perf_counter()
            predict(requests[i % len(requests)], timeout=30)
            out.append(time.perf_counter() - start)
        return out


def server_part(repository: Path, requests: list[bytes], calls: int, log_dir: Path) -> dict:
    server = ServerProcess(repository, [], log_dir)
    try:
        target = f"127.0.0.1:{server.port}"
        wait_serving(target, 180, server)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        _calls(target, requests, 20)  # warm-up
        before, cpu0, workers0 = scrape(url), _proc_cpu_s(server.pid), descendants_cpu_s(server.pid)
        latencies = _calls(target, requests, calls)
        cpu1, workers1, after = _proc_cpu_s(server.pid), descendants_cpu_s(server.pid), scrape(url)
    finally:
        server.close()
    row = {"client": _ms(latencies), "calls": calls,
           "server_cpu_ms": ((cpu1 or 0) - (cpu0 or 0)) / calls * 1000,
           "decode_workers_cpu_ms": (workers1 - workers0) / calls * 1000}
    for key, name in HISTOGRAMS.items():
        seconds = (total(after, name + "_sum") or 0) - (total(before, name + "_sum") or 0)
        count = (total(after, name + "_count") or 0) - (total(before, name + "_count") or 0)
        row[f"{key}_ms"] = seconds / count * 1000 if count else None
    return row


def bare_part(requests: list[bytes], calls: int) -> dict:
    proc, target = launch("the bare grpc.aio server", [sys.executable, "-c", bare_server(ANSWER)])
    try:
        _calls(target, requests, 20)  # warm-up
        cpu0 = _proc_cpu_s(proc.pid)
        latencies = _calls(target, requests, calls)
        cpu1 = _proc_cpu_s(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"client": _ms(latencies), "calls": calls, "server_cpu_ms": ((cpu1 or 0) - (cpu0 or 0)) / calls * 1000}


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(res: dict) -> str:
    lines = [f"# {res['command']}", f"# {res['cpus']} CPUs, {res['date']}, {res['images']} images", "",
             "## 1. Decoding one image: in this process against the decode pool (ms)", "",
             "| round | in process p50 | mean | decode pool p50 | mean | pool overhead (means) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in res["decode"]:
        lines.append(f"| {r['round']} | {r['in_process']['p50_ms']:.2f} | {r['in_process']['mean_ms']:.2f} | "
                     f"{r['pool']['p50_ms']:.2f} | {r['pool']['mean_ms']:.2f} | {r['pool_overhead_ms']:+.2f} |")
    lines += ["", "## 2-3. One client, single-image Predict calls one after another (ms per call)", "",
              "| round | server | client p50 | client mean | server: request | queue | preprocess | inference "
              "| server process CPU | decode workers CPU |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["calls"]:
        lines.append(f"| {r['round']} | {r['server']} | {r['client']['p50_ms']:.2f} | {r['client']['mean_ms']:.2f} "
                     f"| {_f(r.get('request_ms'))} | {_f(r.get('queue_ms'))} | {_f(r.get('preprocess_ms'))} "
                     f"| {_f(r.get('inference_ms'))} | {r['server_cpu_ms']:.2f} | "
                     f"{_f(r.get('decode_workers_cpu_ms'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True, help="the model's name in the repository (its latest version)")
    parser.add_argument("--images", type=Path, required=True, help="a folder of photos (searched recursively)")
    parser.add_argument("--count", type=int, default=100, help="how many photos to use")
    parser.add_argument("--calls", type=int, default=400, help="calls per server and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    repository = args.model_repository.resolve()
    versions = sorted((p for p in (repository / args.model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise SystemExit(f"no version of {args.model} in {repository}")
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, len(files) // args.count)
    images = [p.read_bytes() for p in files[::step][:args.count]]
    if not images:
        raise SystemExit(f"no photos under {args.images}")
    requests = [pb.PredictRequest(model_name=args.model, images=[d]).SerializeToString() for d in images]
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": len(os.sched_getaffinity(0)), "images": len(images),
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "decode": decode_part(versions[-1], images, args.rounds), "calls": []}
    with tempfile.TemporaryDirectory(prefix="bench-lone-") as tmp:
        for r in range(1, args.rounds + 1):  # alternated, so a drift of the machine's speed hits both
            res["calls"].append({"round": r, "server": "imgcls serve",
                                 **server_part(repository, requests, args.calls, Path(tmp))})
            res["calls"].append({"round": r, "server": "bare grpc.aio", **bare_part(requests, args.calls)})
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
