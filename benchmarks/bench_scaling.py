"""How `imgcls serve` scales with the cores it is given, and what `--workers` changes (issue 16).

For each server size (1, 2, 4, 8, ... cores, up to what the machine has): the server is pinned to that many
cores with `taskset`, run with each `--workers` setting asked for, and driven by Triton's `perf_analyzer`
(KServe v2 gRPC, one encoded image per request, closed loop) pinned to the other cores; one gRPC channel per
perf_analyzer context (TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT=1), so connections spread over the workers
as many clients' would. Per size and setting: img/s, img/s per core, p50/p99, and the resident memory of the
server's processes. Then, at the same sizes, the runtime alone (batch 32) and decode + runtime in this process
(bench_service.py (a) and (b)), pinned the same way, to show where the limit is.

On a machine with too few cores to leave some for the load generator (this 2-core one), the server and
perf_analyzer share the cores; the table says so, and only ratios within the run mean anything.

    python benchmarks/bench_scaling.py --model-repository runs/repo --model flowers \\
        --images ~/.keras/datasets/flower_photos --cores 2 --workers 1,2 --concurrency 1,8,32 --duration 10

On a machine without .venv-peers (the 16-core device machine), `--perf-analyzer PATH` runs that binary alone
(its libraries on LD_LIBRARY_PATH), and `--configs 2x1,12x1,12x3` names exactly which (cores x workers) to run.
`--json` is rewritten after every configuration, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_peers  # perf_analyzer, its input file, the peers environment
import bench_service  # the runtime-alone and in-process measurements, the server launcher
import numpy as np

from imgcls.preprocessing import IMAGE_EXTENSIONS, preprocess_bytes
from imgcls.service import repository, runtimes


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def process_tree_rss(pid: int) -> dict[str, int]:
    """Resident memory (bytes) of a process and all its descendants, by pid, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    rss: dict[str, int] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss[str(p)] = int(line.split()[1]) * 1024
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return rss


def worker_pids(pid: int) -> list[int]:
    """The serving processes under a `--workers` supervisor (python -m imgcls.service.worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid and b"imgcls.service.worker" in cmd:
                found.append(int(entry.name))
    return found


def wait_serving(target: str, server: bench_service.Server, timeout: float = 180) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise SystemExit("imgcls serve exited:\n" + "".join(server.log[-40:]))
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise SystemExit("imgcls serve did not become SERVING:\n" + "".join(server.log[-40:]))


class PinnedServer(bench_service.Server):
    """`imgcls serve` started under `taskset`, so the supervisor and every worker it starts stay on `cores`."""

    def __init__(self, cores: list[int], args: list[str]) -> None:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        cmd = ["taskset", "-c", ",".join(map(str, cores)), sys.executable, "-m", "imgcls.cli", "serve", "--host",
               "127.0.0.1", "--port", "0", "--metrics-port", "0", *args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.ports: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()


def bench_server_size(peers: bench_peers.Peers, cores: list[int], load_cores: list[int], workers: int | str,
                      args: argparse.Namespace, data: list[bytes], workdir: Path) -> list[dict]:
    server = PinnedServer(cores, ["--model-repository", str(args.model_repository), "--workers", str(workers),
                                  "--http-port", "-1", "--poll-interval", "0", "--runtime", "onnx"])
    rows = []
    mine = os.sched_getaffinity(0)
    try:
        port, _metrics = server.wait_ports()
        target = f"127.0.0.1:{port}"
        wait_serving(target, server)
        os.sched_setaffinity(0, set(load_cores))  # perf_analyzer inherits it
        endpoint = bench_peers.prepare_endpoint(peers, "imgcls", target, args.model, data, 1, workdir)
        if endpoint.input_json is None:
            raise SystemExit(endpoint.note)
        rss = process_tree_rss(server.proc.pid)
        pids = worker_pids(server.proc.pid)
        for c in args.concurrency:
            m = bench_peers.perf_analyzer(peers, target, args.model, endpoint.input_json, c, args.duration,
                                          args.stability, workdir)
            rows.append({"kind": "server", "cores": len(cores), "workers": len(pids) or 1, "concurrency": c,
                         "images_per_s": m["images_per_s"], "per_core": m["images_per_s"] / len(cores),
                         "p50_ms": m["p50_ms"], "p99_ms": m["p99_ms"], "stable": m["stable"],
                         "rss_mib": sum(rss.values()) / 2**20})
            print(f"# {len(cores)} cores, {workers} workers, {c} clients: {m['images_per_s']:.1f} img/s, "
                  f"p50 {m['p50_ms']:.1f} ms, p99 {m['p99_ms']:.1f} ms", file=sys.stderr)
        per_worker = [sum(process_tree_rss(p).values()) for p in pids] or [sum(rss.values())]
        for r in rows:
            r["rss_per_worker_mib"] = sum(per_worker) / len(per_worker) / 2**20
    finally:
        os.sched_setaffinity(0, mine)
        server.stop()
    return rows


def bench_alone(entry, data: list[bytes], cores: list[int], duration: float) -> list[dict]:
    """Runtime alone at batch 32 and decode + runtime in this process, pinned to `cores`, threads = cores."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cores))
    try:
        runtime = runtimes.load_runtime(entry.folder, runtimes.choose_artifact(entry.manifest, "onnx"), len(cores))
        spec = entry.manifest.preprocessing
        x = np.stack([preprocess_bytes(d, spec) for d in data[:32]])
        out = []
        for r in bench_service.bench_runtime(runtime, x, [32], duration):
            out.append({"kind": "runtime alone, batch 32", "cores": len(cores), "images_per_s": r["images_per_s"],
                        "per_core": r["images_per_s"] / len(cores)})
        for r in bench_service.bench_in_process(runtime, spec, data, [32], duration,
                                                len(cores)):
            if r["setting"].startswith("batch"):
                out.append({"kind": "in-process decode + runtime, batch 32", "cores": len(cores),
                            "images_per_s": r["images_per_s"], "per_core": r["images_per_s"] / len(cores)})
        return out
    finally:
        os.sched_setaffinity(0, before)


def markdown(rows: list[dict]) -> str:
    lines = ["| cores | workers | clients | img/s | img/s per core | p50 ms | p99 ms | RSS MiB (all) "
             "| RSS MiB per worker |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] != "server":
            continue
        lines.append(f"| {r['cores']} | {r['workers']} | {r['concurrency']} | {r['images_per_s']:.1f} | "
                     f"{r['per_core']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rss_mib']:.0f} | "
                     f"{r.get('rss_per_worker_mib', 0):.0f} |")
    alone = [r for r in rows if r["kind"] not in ("server", "error")]
    lines += [f"\nFAILED: {r['cores']} cores x {r['workers']} workers: {r['error'].splitlines()[-1:]}"
              for r in rows if r["kind"] == "error"]
    if alone:
        lines += ["", "| cores | measured | img/s | img/s per core |", "|---:|---|---:|---:|"]
        lines += [f"| {r['cores']} | {r['kind']} | {r['images_per_s']:.1f} | {r['per_core']:.1f} |" for r in alone]
    return "\n".join(lines)


def parse_configs(text: str) -> list[tuple[int, int | str]]:
    """`2x1,12x3,12xauto` -> [(2, 1), (12, 3), (12, "auto")]: server cores x --workers."""
    out: list[tuple[int, int | str]] = []
    for item in text.split(","):
        cores, _, workers = item.strip().partition("x")
        if not cores.isdigit() or not (workers.isdigit() or workers == "auto"):
            raise argparse.ArgumentTypeError(f"{item!r}: expected CORESxWORKERS, e.g. 12x3 or 12xauto")
        out.append((int(cores), int(workers) if workers.isdigit() else "auto"))
    return out


def machine_facts() -> dict:
    """What the figures depend on: CPU model, counts, the limits imgcls sees, the kernel, library versions."""
    import onnxruntime

    from imgcls import cpus as imgcls_cpus

    model = ""
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {"cpus": len(os.sched_getaffinity(0)), "processor": model or platform.processor(),
            "kernel": platform.release(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "limits": imgcls_cpus.cpu_limits().describe()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--cores", type=_ints, default=None, help="server sizes, e.g. 1,2,4,8 (default: powers of "
                        "two up to the cores, leaving half for the load generator when there are 4 or more)")
    parser.add_argument("--workers", default="1,2", help="--workers settings to run at each size (auto allowed)")
    parser.add_argument("--concurrency", type=_ints, default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--stability", type=float, default=20.0)
    parser.add_argument("--images-limit", type=int, default=64)
    parser.add_argument("--configs", type=parse_configs, default=None,
                        help="exact server configurations CORESxWORKERS, e.g. 2x1,12x1,12x3 (instead of --cores x "
                             "--workers)")
    parser.add_argument("--no-alone", action="store_true", help="skip the runtime-alone and in-process rows")
    parser.add_argument("--alone-cores", type=_ints, default=None,
                        help="sizes at which to measure the runtime alone and in-process (default: every size)")
    parser.add_argument("--perf-analyzer", type=Path, default=None,
                        help="a perf_analyzer binary to use without .venv-peers (libraries from LD_LIBRARY_PATH)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    peers = bench_peers.standalone_peers(args.perf_analyzer) if args.perf_analyzer else bench_peers.find_peers()
    peers.pa_env["TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT"] = "1"  # a connection per perf_analyzer context
    [entry] = [e for e in repository.scan(args.model_repository) if e.name == args.model]
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:args.images_limit]
    data = [p.read_bytes() for p in files]
    cpus = sorted(os.sched_getaffinity(0))
    sizes = args.cores or [n for n in (1, 2, 4, 8, 12, 16, 32, 64) if n <= (len(cpus) // 2 if len(cpus) >= 4
                                                                            else len(cpus))]
    configs = args.configs or [(n, int(w) if w.strip() != "auto" else "auto")
                               for n in sizes for w in args.workers.split(",")]
    alone_sizes = [] if args.no_alone else (args.alone_cores or sorted({n for n, _ in configs}))
    rows: list[dict] = []
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine_facts(), "command": " ".join(sys.argv),
              "shared_cores": len(cpus) < 4, "rows": rows}
    print(f"# machine: {result['machine']}", file=sys.stderr)

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        for i, (n, workers) in enumerate(configs):
            if n > len(cpus):
                raise SystemExit(f"--configs {n}x{workers}: this machine has {len(cpus)} CPUs")
            cores = cpus[:n]
            load = cpus[n:] or cpus  # too few cores: the load generator shares them
            try:
                rows.extend(bench_server_size(peers, cores, load, workers, args, data, Path(tmp)))
            except (RuntimeError, SystemExit, OSError, subprocess.SubprocessError) as exc:  # keep what was measured
                rows.append({"kind": "error", "cores": n, "workers": workers, "error": str(exc)[-2000:]})
                print(f"# {n} cores, {workers} workers: FAILED {exc}", file=sys.stderr)
            last_of_size = all(m != n for m, _ in configs[i + 1:])
            if last_of_size and n in alone_sizes:
                rows.extend(bench_alone(entry, data, cores, args.duration))
            save()
    print(markdown(rows))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
