"""HTTP against gRPC on one `imgcls serve`, and against Triton's HTTP endpoint: same model, same images, one run.

At 1, 8 and 32 closed-loop clients sending single-image requests, level by level and back to back (so a change
in the machine's load hits every row of a level alike):

- imgcls `Predict` over gRPC (bench_service.py's Python client: the reference);
- imgcls `POST /predict` over HTTP, the raw photo as the body (a Python client of the same kind: a thread per
  client, each with its keep-alive connection);
- imgcls KServe v2 REST with the binary tensor extension, driven by Triton's `perf_analyzer -i http`;
- imgcls KServe v2 gRPC, by `perf_analyzer -i grpc` (the same client over the other protocol);
- Triton 2.51 (Python backend, the bench_peers.py setup: the same ONNX file, decode and preprocessing in the
  server) over its KServe v2 REST, by `perf_analyzer -i http`.

Goals (issue 17): HTTP >= 90% of gRPC Predict's throughput at 32 clients and its p50 within 2 ms at 1 client;
imgcls's KServe REST >= Triton's at every concurrency. With `--rounds N` every level is measured N times, even
rounds in the reverse order, and each goal is judged on the median of its per-round figure: this VM's speed
drifts by 15-25% within minutes, and one back-to-back pair cannot tell a 2% difference from that. Needs
`make peers-env` for perf_analyzer and Triton (without it, only the two Python-client rows).

    nice -n 10 python benchmarks/bench_http.py --model-repository runs/repo --model flowers \\
        --images ~/.keras/datasets/flower_photos --duration 10 --json runs/bench_http.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_peers  # the sibling scripts: Triton launcher, perf_analyzer runner, image loading
import bench_service

from imgcls.service import repository

CONCURRENCY = (1, 8, 32)
TRITON = "Triton 2.51 (Python backend)"


def http_port(server: bench_service.Server, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log:
            found = re.search(r"HTTP on [\d.]+:(\d+)", line)
            if found:
                return int(found[1])
        time.sleep(0.1)
    raise SystemExit("imgcls serve printed no HTTP port:\n" + "".join(server.log))


def bench_plain(port: int, model: str, data: list[bytes], n: int, duration: float) -> dict:
    """n closed-loop clients, one single-image POST /predict at a time each (keep-alive connections)."""
    path = f"/predict?model={model}&top_k=1"
    latencies: list[list[float]] = [[] for _ in range(n)]
    errors: list[str] = []
    stop_at = time.perf_counter() + duration

    def loop(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        i = k
        try:
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                conn.request("POST", path, body=data[i % len(data)], headers={"Content-Type": "image/jpeg"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    errors.append(f"{response.status} {body[:200]!r}")
                    return
                latencies[k].append(time.perf_counter() - t)
                i += n
        finally:
            conn.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(loop, range(n)))
    if errors:
        raise RuntimeError(f"POST /predict failed: {errors[0]}")
    seconds = time.perf_counter() - start
    r = bench_service.row("", "", sum(map(len, latencies)), seconds, [x for per in latencies for x in per])
    return {"images_per_s": r["images_per_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"]}


class CpuMeter:
    """CPU seconds of the imgcls server process (its event loop, where the front-ends run, and the batcher; not
    the decode worker processes, the same for every protocol) per image it classified while a block ran. Unlike
    throughput on a shared machine, CPU time per image does not depend on what else runs: it is the front-end's
    cost, compared across protocols."""

    def __init__(self, pid: int | None, metrics_url: str) -> None:
        self.pid, self.url, self.ms_per_image = pid, metrics_url, None

    def _read(self) -> tuple[float, float]:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        text = urllib.request.urlopen(self.url, timeout=10).read().decode()
        images = sum(float(m[1]) for m in re.finditer(r'^imgcls_images_total{[^}]*code="OK"[^}]*} (\S+)$', text, re.M))
        return cpu, images

    def __enter__(self) -> CpuMeter:
        self.start = self._read() if self.pid else None
        return self

    def __exit__(self, *exc) -> None:
        if self.start and not exc[0]:
            cpu, images = self._read()
            if images > self.start[1]:
                self.ms_per_image = 1000 * (cpu - self.start[0]) / (images - self.start[1])


def goals(rows: list[dict]) -> list[dict]:
    """The issue's goals, each figure computed within a round (its rows measured back to back) and judged on
    the median over rounds; `rounds` lists the per-round figures."""
    def pick(server: str, protocol: str, c: int, k: int) -> dict | None:
        return next((r for r in rows if r["server"] == server and r["protocol"] == protocol
                     and r["concurrency"] == c and r.get("round", 1) == k), None)

    rounds = sorted({r.get("round", 1) for r in rows})

    def per_round(a: tuple[str, str, int], b: tuple[str, str, int], figure) -> list[float]:
        return [figure(x, y) for k in rounds if (x := pick(*a, k)) and (y := pick(*b, k))]

    def add(goal: str, values: list[float], met) -> None:
        if values:
            value = statistics.median(values)
            out.append({"goal": goal, "value": round(value, 3), "rounds": [round(v, 3) for v in values],
                        "met": met(value)})

    out: list[dict] = []
    grpc = (bench_peers.IMGCLS, "imgcls Predict gRPC")
    for protocol in ("HTTP POST /predict", "KServe v2 REST (binary)"):
        ours = (bench_peers.IMGCLS, protocol)
        add(f"{protocol} >= 90% of gRPC Predict at 32",
            per_round((*ours, 32), (*grpc, 32), lambda h, g: h["images_per_s"] / g["images_per_s"]),
            lambda v: v >= 0.9)
        add(f"{protocol} p50 within 2 ms of gRPC Predict at 1",
            per_round((*ours, 1), (*grpc, 1), lambda h, g: h["p50_ms"] - g["p50_ms"]), lambda v: v <= 2.0)
    for c in sorted({r["concurrency"] for r in rows}):
        add(f"imgcls KServe REST >= Triton's at {c}",
            per_round((bench_peers.IMGCLS, "KServe v2 REST (binary)", c), (TRITON, "KServe v2 REST (binary)", c),
                      lambda m, t: m["images_per_s"] / t["images_per_s"]), lambda v: v >= 1)
    return out


def measure(args: argparse.Namespace, entry, data: list[bytes], workdir: Path) -> tuple[list[dict], list[str]]:
    notes: list[str] = []
    try:
        peers = bench_peers.find_peers(args.peers_venv)
    except bench_peers.PeersMissing as exc:
        peers = None
        notes.append(f"no perf_analyzer/Triton rows: {exc}")
    servers: list = []
    try:
        imgcls = bench_service.Server(["--model-repository", str(args.model_repository), "--runtime",
                                       f"{entry.name}=onnx", "--http-port", "0", *args.imgcls_arg])
        servers.append(imgcls)
        triton = None
        if peers is not None and not args.no_triton:
            triton = bench_peers.TritonServer(peers, args.model_repository, entry.name, args.triton_instances)
            servers.append(triton)
        port, metrics_port = imgcls.wait_ports()
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        hport = http_port(imgcls)
        target = f"127.0.0.1:{port}"
        bench_service.bench_server(target, entry.name, data, [1], 1.0)  # waits until serving; warm-up
        bench_plain(hport, entry.name, data, 8, 2.0)
        kserve: list[tuple[str, str, str, Path]] = []  # (server, protocol label, perf_analyzer -i, url)
        if peers is not None:
            ours = bench_peers.write_input_data(data, "images", workdir / "input-imgcls.json")
            kserve += [(bench_peers.IMGCLS, "KServe v2 REST (binary)", "http", f"127.0.0.1:{hport}", ours),
                       (bench_peers.IMGCLS, "KServe v2 gRPC", "grpc", target, ours)]
        if triton is not None:
            grpc_url = triton.wait_ready()
            name, why = bench_peers.kserve_bytes_input(peers, grpc_url, entry.name)
            if name is None:
                raise RuntimeError(f"Triton: {why}")
            theirs = bench_peers.write_input_data(data, name, workdir / "input-triton.json")
            kserve.append((TRITON, "KServe v2 REST (binary)", "http", f"127.0.0.1:{triton.http_port}", theirs))
        for _server, _label, protocol, url, input_json in kserve:  # warm-up, unmeasured
            bench_peers.perf_analyzer(peers, url, entry.name, input_json, max(CONCURRENCY), 1.5, 1000.0, workdir,
                                      protocol=protocol)
        rows = []
        pid = imgcls.proc.pid

        def measure_row(server: str, protocol: str, client: str, c: int, k: int, run) -> None:
            with CpuMeter(pid if server == bench_peers.IMGCLS else None, metrics_url) as meter:
                m = run()
            r = {**bench_peers.result(server, protocol, client, c, m, k), "cpu_ms_per_image": meter.ms_per_image}
            rows.append(r)
            print(f"# {c} (round {k}): {r['server']} {r['protocol']}: {r['images_per_s']:.1f} img/s, "
                  f"p50 {r['p50_ms']:.1f} ms", file=sys.stderr)

        for c in args.concurrency:
            for k in range(1, args.rounds + 1):
                level = [(bench_peers.IMGCLS, "imgcls Predict gRPC", "Python (grpcio)",
                          lambda c=c: bench_service.bench_server(target, entry.name, data, [c], args.duration)[0]),
                         (bench_peers.IMGCLS, "HTTP POST /predict", "Python (http.client)",
                          lambda c=c: bench_plain(hport, entry.name, data, c, args.duration))]
                level += [(server, label, bench_peers.PERF_ANALYZER,
                           lambda c=c, url=url, input_json=input_json, protocol=protocol: bench_peers.perf_analyzer(
                               peers, url, entry.name, input_json, c, args.duration, args.stability, workdir,
                               protocol=protocol))
                          for server, label, protocol, url, input_json in kserve]
                for server, label, client, run in (level if k % 2 else level[::-1]):  # even rounds: reversed
                    measure_row(server, label, client, c, k, run)
        return rows, notes
    finally:
        bench_peers.stop_all(servers)


def markdown(rows: list[dict]) -> str:
    rounds = any(r.get("round", 1) > 1 for r in rows)
    lines = ["| server | protocol | client | clients |" + (" round |" if rounds else "")
             + " images/s | p50 ms | p99 ms | server CPU ms/image |",
             "|---|---|---|---|" + ("---:|" if rounds else "") + "---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["concurrency"]):  # stable: within a level, the order measured
        flag = "" if r.get("stable", True) else " (unstable)"
        cpu = "-" if r.get("cpu_ms_per_image") is None else f"{r['cpu_ms_per_image']:.2f}"
        lines.append(f"| {r['server']} | {r['protocol']} | {r['client']} | {r['concurrency']} | "
                     + (f"{r.get('round', 1)} | " if rounds else "")
                     + f"{r['images_per_s']:.1f}{flag} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {cpu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=Path, required=True, help="a folder of photos (searched recursively)")
    parser.add_argument("--limit", type=int, default=64, help="photos to cycle through (default 64)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per row (default 10)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--stability", type=float, default=25.0, help="perf_analyzer --stability-percentage")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each level this many times, even rounds in reverse order; goals are judged on "
                             "the median of each round's figure (default 1)")
    parser.add_argument("--triton-instances", type=int, default=2)
    parser.add_argument("--no-triton", action="store_true", help="skip Triton (its start takes a minute)")
    parser.add_argument("--peers-venv", type=Path, default=bench_peers.DEFAULT_PEERS)
    parser.add_argument("--imgcls-arg", action="append", default=[], help="extra `imgcls serve` argument")
    parser.add_argument("--json", type=Path, help="also write the rows, goals and machine here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    bench_peers.stop_on_signals()
    versions = repository.list_versions(args.model_repository).get(args.model)
    if not versions:
        parser.error(f"no model {args.model} in {args.model_repository}")
    entry = repository.read_entry(args.model_repository, args.model, max(versions))
    data = bench_peers.load_images(args.images, args.limit)
    with tempfile.TemporaryDirectory(prefix="bench_http.") as tmp:
        rows, notes = measure(args, entry, data, Path(tmp))
    results = {"machine": bench_peers.machine(), "rows": rows, "goals": goals(rows), "notes": notes,
               "command": " ".join(sys.argv)}
    print(markdown(rows))
    for g in results["goals"]:
        each = "" if len(g["rounds"]) < 2 else f" (median of rounds: {', '.join(str(v) for v in g['rounds'])})"
        print(f"- {g['goal']}: {g['value']}{each} ({'met' if g['met'] else 'NOT met'})")
    for note in notes:
        print(f"- note: {note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
