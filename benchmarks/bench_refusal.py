"""What refusing one call costs the server's CPU: bare grpc.aio against `imgcls serve` (issue 14).

Under overload a server refuses most calls, and each refusal takes CPU from the answers (docs/overload.md).
This floods two servers with refused unary calls of one encoded image each (32 concurrent calls from one
client process), and reports the server's CPU per call from /proc:

- `grpc.aio`: a bare grpc.aio server whose one method aborts with RESOURCE_EXHAUSTED: gRPC Python's floor.
- `imgcls serve`: the real server (`--model-repository`), asked for a model it does not have (NOT_FOUND): the
  whole request path up to the refusal (call accounting, parsing, metrics, the access-log line).

With 2+ CPUs the server runs on the first and the client on the second.

    python benchmarks/bench_refusal.py --model-repository runs/repo --image photo.jpg --calls 3200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overload import _proc_cpu_s  # the sibling script's /proc CPU reader

from imgcls.v1 import inference_pb2 as pb

BARE_MAIN = """
async def main():
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(handle, request_deserializer=lambda b: b,
                                                  response_serializer=lambda b: b)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("imgcls.v1.Inference",
                                                                          {"Predict": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"gRPC on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""
REFUSE = """
import asyncio, os, sys, grpc
async def handle(request, context):
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full (64 of 64 images waiting)",
                        trailing_metadata=(("retry-after-ms", "100"),))
"""


def bare_server(handler: str) -> str:
    """The script of a bare grpc.aio server: `handler` (imports and an `async def handle(request, context)` on
    raw bytes) answers imgcls.v1 Predict; it prints "gRPC on HOST:PORT" to stderr once it serves."""
    return handler + BARE_MAIN


BARE_SERVER = bare_server(REFUSE)


def launch(name: str, cmd: list[str]) -> tuple[subprocess.Popen, str]:
    """Start a server that prints "gRPC on HOST:PORT" to stderr (imgcls serve does too); its process and target."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd="/tmp")
    for line in proc.stderr:
        found = re.search(r"gRPC on ([\d.]+:\d+)", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep it drained
            return proc, found[1]
    proc.kill()
    proc.wait(30)
    raise SystemExit(f"{name} did not start")


async def flood(target: str, request: pb.PredictRequest, calls: int, concurrency: int = 32) -> dict[str, int]:
    codes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        predict = channel.unary_unary("/imgcls.v1.Inference/Predict",
                                      request_serializer=pb.PredictRequest.SerializeToString,
                                      response_deserializer=pb.PredictResponse.FromString)

        async def one(k: int) -> None:
            for _ in range(k):
                try:
                    await predict(request, timeout=30)
                    name = "OK"
                except grpc.aio.AioRpcError as exc:
                    name = exc.code().name
                codes[name] = codes.get(name, 0) + 1

        await asyncio.gather(*(one(calls // concurrency) for _ in range(concurrency)))
    return codes


def measure(name: str, cmd: list[str], request: pb.PredictRequest, calls: int, cores: list[int]) -> dict:
    pin = ["taskset", "-c", str(cores[0])] if len(cores) > 1 else []
    proc, target = launch(name, [*pin, *cmd])
    try:
        deadline = time.monotonic() + 180
        while "UNAVAILABLE" in asyncio.run(flood(target, request, 64)):  # still loading its models
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{name} did not become ready")
            time.sleep(0.5)
        asyncio.run(flood(target, request, max(64, calls // 10)))  # warm-up
        before, began = _proc_cpu_s(proc.pid), time.monotonic()
        codes = asyncio.run(flood(target, request, calls))
        cpu, wall = _proc_cpu_s(proc.pid) - before, time.monotonic() - began
    finally:
        proc.terminate()
        proc.wait(30)
    done = sum(codes.values())
    return {"server": name, "calls": done, "codes": codes, "ms_cpu_per_call": cpu / done * 1000,
            "calls_per_s": done / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True, help="the encoded image every call carries")
    parser.add_argument("--calls", type=int, default=3200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:
        os.sched_setaffinity(0, set(cores[1:]))  # the client off the server's core
    request = pb.PredictRequest(model_name="no-such-model", images=[args.image.read_bytes()])
    servers = {"grpc.aio": [sys.executable, "-c", BARE_SERVER],
               "imgcls serve": [sys.executable, "-m", "imgcls.cli", "serve", "--model-repository",
                                str(args.model_repository.resolve()), "--host", "127.0.0.1", "--port", "0",
                                "--metrics-port", "0", "--http-port", "-1", "--poll-interval", "0"]}
    rows = [measure(name, cmd, request, args.calls, cores) for _ in range(args.rounds) for name, cmd in servers.items()]
    print(f"{len(args.image.read_bytes()) / 1024:.0f} KiB image per call, server on core {cores[0]}"
          f"{'' if len(cores) > 1 else ' (shared with the client)'}")
    print("| server | refused calls | codes | server CPU per call | calls/s |\n|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['calls']} | {r['codes']} | {r['ms_cpu_per_call']:.3f} ms "
              f"| {r['calls_per_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpus": len(cores),
                                         "command": " ".join(sys.argv), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
