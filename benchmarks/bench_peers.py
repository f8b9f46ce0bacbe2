"""imgcls and NVIDIA Triton side by side: same model, same images, same client, one run, one table.

Measures on this machine, for one ONNX model of a repository: the in-process ceiling (decode + preprocess +
runtime, benchmarks/bench_service.py (b)); `imgcls serve` through its own `Predict` (bench_service's Python
client) and through its KServe v2 endpoint driven by Triton's `perf_analyzer`; and Triton 2.51 serving the same
ONNX file behind its dynamic batcher, decoding the same encoded photos with the same imgcls.preprocessing code,
driven by the same `perf_analyzer`, in two variants: Triton's own Python backend (benchmarks/triton_backend.py)
and nvidia-pytriton (benchmarks/triton_model.py). Concurrency 1, 8, 32, single-image requests; the servers are
measured level by level, back to back. Goal (issue 8): imgcls matches Triton's throughput at equal or lower
p99 at every concurrency. Triton and perf_analyzer live in .venv-peers (`make peers-env`), never in the
project's venv.

    python benchmarks/bench_peers.py --model-repository runs/repo --model flowers \\
        --images ~/.keras/datasets/flower_photos --duration 10 --json runs/bench_peers.json
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_service  # the sibling script: its in-process and Predict measurements

from imgcls.client.client import Client
from imgcls.preprocessing import IMAGE_EXTENSIONS
from imgcls.service import repository, runtimes
from imgcls.service.server import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PEERS = Path(os.environ.get("IMGCLS_PEERS_VENV", ROOT / ".venv-peers"))
SERVE_DEFAULTS = ServeConfig(model_repository=ROOT)
IMGCLS = "imgcls"
# The Triton variants: label -> launcher script (in benchmarks/, run with .venv-peers' Python).
TRITONS = {"Triton 2.51 (Python backend)": "triton_backend.py", "Triton 2.51 (pytriton 0.7.0)": "triton_model.py"}
PERF_ANALYZER = "perf_analyzer 2.51"


class PeersMissing(RuntimeError):
    """The peers environment is absent or broken; the message says how to fix it."""


@dataclass(frozen=True)
class Peers:
    """The benchmark peers in their own virtualenv: its Python (pytriton) and perf_analyzer."""

    python: Path | None  # None: perf_analyzer alone (`standalone_peers`), no Triton
    perf_analyzer: Path
    pa_env: dict[str, str]


def find_peers(venv: Path = DEFAULT_PEERS) -> Peers:
    """Locate .venv-peers and check that perf_analyzer starts (it needs libb64 and libcudart.so.12)."""
    python, pa = venv / "bin" / "python", venv / "bin" / "perf_analyzer"
    if not python.exists() or not pa.exists():
        raise PeersMissing(f"{venv}: no Triton/perf_analyzer environment; run `make peers-env` "
                           "(scripts/peers_env.sh) first")
    cudart = sorted(venv.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    ld = os.pathsep.join([*(str(p) for p in cudart), os.environ.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    env = {**os.environ, "LD_LIBRARY_PATH": ld}
    probe = subprocess.run([str(pa), "--version"], env=env, capture_output=True, text=True, timeout=30)
    if "error while loading shared libraries" in probe.stderr:
        raise PeersMissing(f"perf_analyzer does not start ({probe.stderr.strip()}); run `make peers-env`")
    return Peers(python, pa, env)


def standalone_peers(perf_analyzer: Path) -> Peers:
    """perf_analyzer without .venv-peers, for a machine that has no Triton (the 16-core device machine of
    bench_scaling.py): its libraries (libb64, libcudart.so.12) come from LD_LIBRARY_PATH, and the KServe v2
    metadata is read with imgcls's own stubs instead of tritonclient."""
    env = dict(os.environ)
    probe = subprocess.run([str(perf_analyzer), "--version"], env=env, capture_output=True, text=True, timeout=30)
    if "error while loading shared libraries" in probe.stderr:
        raise PeersMissing(f"perf_analyzer does not start ({probe.stderr.strip()}); put libb64.so.0d and "
                           "libcudart.so.12 on LD_LIBRARY_PATH")
    return Peers(None, perf_analyzer, env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bytes_input_with_imgcls_stubs(url: str, model: str) -> tuple[str | None, str]:
    import grpc

    from imgcls.service import protocols

    request_type, response_type = protocols.method_types("inference.GRPCInferenceService", "ModelMetadata")
    try:
        with grpc.insecure_channel(url) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata",
                                       request_serializer=request_type.SerializeToString,
                                       response_deserializer=response_type.FromString)
            meta = call(request_type(name=model), timeout=60)
    except grpc.RpcError as exc:
        return None, f"{exc.code().name}: {exc.details()}"
    name = next((i.name for i in meta.inputs if i.datatype == "BYTES"), "")
    return (name, "") if name else (None, "no BYTES input in ModelMetadata")


class TritonServer:
    """A Triton launcher (benchmarks/triton_backend.py or triton_model.py) in .venv-peers, in its own process
    group so that nothing it spawns (tritonserver, the Python backend stubs) outlives the benchmark."""

    def __init__(self, peers: Peers, repo: Path, model: str, instances: int,
                 script: str = "triton_backend.py", spin: bool = False) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        cmd = [str(peers.python), str(ROOT / "benchmarks" / script), "--model-repository", str(repo),
               "--model", model, "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
               "--metrics-port", str(free_port()), "--threads", str(SERVE_DEFAULTS.inference_threads),
               "--decode-workers", str(SERVE_DEFAULTS.decode_workers), "--instances", str(instances),
               "--max-batch-size", str(SERVE_DEFAULTS.max_batch_size),
               "--max-queue-delay-ms", str(SERVE_DEFAULTS.max_queue_delay_ms), *(["--spin"] if spin else [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.log: list[str] = []
        self.ready: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            if "triton ready:" in line:  # tritonserver writes to the same pipe: the line may start mid-log
                self.ready.put(True)

    def wait_ready(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.ready.get(timeout=0.5)
                return f"127.0.0.1:{self.grpc_port}"
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        raise RuntimeError("Triton did not start:\n" + "".join(self.log[-40:]))

    def stop(self) -> None:
        """SIGTERM to the launcher, which stops tritonserver and removes its temporary files; then SIGKILL to
        whatever of the process group is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


_METADATA = """
import sys, tritonclient.grpc as g
try:
    m = g.InferenceServerClient(sys.argv[1]).get_model_metadata(sys.argv[2], as_json=True)
except Exception as exc:
    sys.exit(f"{type(exc).__name__}: {exc}")
print(next((i["name"] for i in m.get("inputs", []) if i["datatype"] == "BYTES"), ""))
"""


def kserve_bytes_input(peers: Peers, url: str, model: str) -> tuple[str | None, str]:
    """The model's BYTES input as KServe v2 ModelMetadata reports it (tritonclient, the same library
    perf_analyzer's protocol comes from; imgcls's own stubs when there is no peers Python). (name, "") or
    (None, why)."""
    if peers.python is None:
        return _bytes_input_with_imgcls_stubs(url, model)
    out = subprocess.run([str(peers.python), "-c", _METADATA, url, model], capture_output=True, text=True,
                         timeout=60)
    name = out.stdout.strip()
    if out.returncode or not name:
        return None, (out.stderr.strip().splitlines() or ["no BYTES input in ModelMetadata"])[-1]
    return name, ""


def write_input_data(data: list[bytes], input_name: str, path: Path) -> Path:
    """perf_analyzer --input-data: one [1]-shaped BYTES tensor per step; `b64` holds the raw tensor contents,
    which for BYTES is each element with its 4-byte little-endian length prefix."""
    steps = [{input_name: {"b64": base64.b64encode(struct.pack("<I", len(d)) + d).decode(), "shape": [1]}}
             for d in data]
    path.write_text(json.dumps({"data": steps}))
    return path


def perf_analyzer(peers: Peers, url: str, model: str, input_json: Path, concurrency: int, duration: float,
                  stability: float, workdir: Path, protocol: str = "grpc") -> dict:
    """One concurrency level, closed loop, synchronous calls of one image each over `protocol` (grpc, or http:
    KServe v2 REST with the binary tensor extension, benchmarks/bench_http.py). perf_analyzer reports the
    last 3 measurement windows merged once they agree within `stability` percent, so each window is
    duration/3 and the figures cover about `duration` seconds. An unstable level is re-run accepting any
    spread and marked `stable: false`."""
    csv_path = workdir / f"pa-{url.rsplit(':', 1)[1]}-{concurrency}.csv"
    base = [str(peers.perf_analyzer), "-m", model, "-u", url, "-i", protocol, "-b", "1",
            "--concurrency-range", f"{concurrency}:{concurrency}", "--input-data", str(input_json),
            "--measurement-interval", str(max(500, round(duration * 1000 / 3))), "-f", str(csv_path)]
    timeout = 12 * duration + 120
    for stab, stable in ((stability, True), (1000.0, False)):
        out = subprocess.run([*base, "--stability-percentage", str(stab)], env=peers.pa_env, capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode == 0 and csv_path.exists():
            with csv_path.open() as f:
                rec = next(csv.DictReader(f))
            return {"images_per_s": float(rec["Inferences/Second"]), "p50_ms": float(rec["p50 latency"]) / 1000,
                    "p99_ms": float(rec["p99 latency"]) / 1000, "stable": stable,
                    "server_batch": server_batch(out.stdout)}
    raise RuntimeError(f"perf_analyzer failed against {url} at concurrency {concurrency}:\n"
                       f"{out.stdout[-2000:]}{out.stderr[-2000:]}")


def server_batch(report: str) -> float | None:
    """Mean batch the server ran, from the statistics perf_analyzer reads (inferences / executions)."""
    inferences = re.search(r"Inference count: (\d+)", report)
    executions = re.search(r"Execution count: (\d+)", report)
    if not (inferences and executions) or int(executions[1]) == 0:
        return None
    return int(inferences[1]) / int(executions[1])


def batch_totals(metrics_url: str) -> tuple[float, float]:
    """imgcls's `imgcls_batch_size` histogram (sum, count) over all models, from its Prometheus endpoint."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    total = {"sum": 0.0, "count": 0.0}
    for kind in total:
        for m in re.finditer(rf"^imgcls_batch_size_{kind}(?:{{[^}}]*}})? (\S+)$", text, re.M):
            total[kind] += float(m[1])
    return total["sum"], total["count"]


class BatchMeter:
    """Mean batch imgcls formed while a block ran (the Prometheus histogram's delta)."""

    def __init__(self, metrics_url: str | None) -> None:
        self.url, self.mean = metrics_url, None

    def __enter__(self) -> BatchMeter:
        self.start = batch_totals(self.url) if self.url else None
        return self

    def __exit__(self, *exc) -> None:
        if self.start and not exc[0]:
            end = batch_totals(self.url)
            count = end[1] - self.start[1]
            self.mean = (end[0] - self.start[0]) / count if count else None


def result(server: str, protocol: str, client: str, concurrency: int | str, m: dict, round_: int = 1) -> dict:
    return {"server": server, "protocol": protocol, "client": client, "concurrency": concurrency,
            "images_per_s": m["images_per_s"], "p50_ms": m["p50_ms"], "p99_ms": m["p99_ms"],
            "stable": m.get("stable", True), "server_batch": m.get("server_batch"), "round": round_}


@dataclass
class Endpoint:
    """One KServe v2 endpoint that perf_analyzer drives, with its input file (None: not measurable, see `note`)."""

    server: str
    url: str
    input_json: Path | None = None
    note: str = ""


def prepare_endpoint(peers: Peers, server: str, url: str, model: str, data: list[bytes], warm: int,
                     workdir: Path) -> Endpoint:
    """Find the BYTES input, write perf_analyzer's input file, and warm the server up (unmeasured)."""
    name, why = kserve_bytes_input(peers, url, model)
    if name is None:
        return Endpoint(server, url, note=f"{server}: no KServe v2 BYTES input ({why}); its perf_analyzer rows "
                                          "are missing")
    endpoint = Endpoint(server, url, write_input_data(data, name, workdir / f"input-{url.rsplit(':', 1)[1]}.json"))
    try:
        perf_analyzer(peers, url, model, endpoint.input_json, warm, 1.5, 1000.0, workdir)
    except RuntimeError as exc:
        endpoint.input_json, endpoint.note = None, f"{server} via {PERF_ANALYZER}: {str(exc).strip().splitlines()[-1]}"
    return endpoint


def measure_level(peers: Peers, endpoints: list[Endpoint], imgcls: tuple[str, str], model: str, data: list[bytes],
                  c: int, args: argparse.Namespace, workdir: Path, round_: int = 1) -> list[dict]:
    """One concurrency level on every server back to back, so a change in the machine's load between levels
    hits all of them alike: each KServe endpoint with perf_analyzer, then imgcls Predict with the Python client.
    Even rounds take the endpoints in reverse order, so a drift within a round favours none of them."""
    target, metrics_url = imgcls
    rows = []
    for ep in (endpoints if round_ % 2 else endpoints[::-1]):
        if ep.input_json is None:
            continue
        with BatchMeter(metrics_url if ep.server == IMGCLS else None) as meter:
            m = perf_analyzer(peers, ep.url, model, ep.input_json, c, args.duration, args.stability, workdir)
        if meter.url:  # imgcls reports no per-execution statistics to perf_analyzer; its histogram does
            m["server_batch"] = meter.mean
        rows.append(result(ep.server, "KServe v2 gRPC", PERF_ANALYZER, c, m, round_))
        print(f"# {ep.server} via {PERF_ANALYZER}, {c} (round {round_}): {m['images_per_s']:.1f} img/s",
              file=sys.stderr)
    with BatchMeter(metrics_url) as meter:
        (r,) = bench_service.bench_server(target, model, data, [c], args.duration)
    r["server_batch"] = meter.mean
    rows.append(result(IMGCLS, "imgcls Predict gRPC", "bench_service.py (Python)", c, r, round_))
    print(f"# {IMGCLS} Predict, {c} (round {round_}): {r['images_per_s']:.1f} img/s", file=sys.stderr)
    return rows


def stop_all(servers: list) -> None:
    """Stop every server even if another Ctrl-C or SIGTERM arrives meanwhile (it would abort the loop and
    leave the rest running); the signals are back to interrupting once all are down."""
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for server in reversed(servers):
            server.stop()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def bench_servers(peers: Peers, entry, data: list[bytes], concurrency: list[int], args: argparse.Namespace,
                  workdir: Path) -> tuple[list[dict], list[str]]:
    """`imgcls serve` (its defaults, ONNX runtime) and both Triton variants up side by side (idle, none uses CPU),
    measured level by level; all are stopped whatever happens."""
    servers: list = []
    try:
        imgcls = bench_service.Server(["--model-repository", str(args.model_repository), "--runtime",
                                       f"{entry.name}=onnx", *args.imgcls_arg])
        servers.append(imgcls)
        tritons = {}
        for label, script in TRITONS.items():
            tritons[label] = TritonServer(peers, args.model_repository, entry.name, args.triton_instances, script,
                                          args.triton_spin)
            servers.append(tritons[label])
        port, metrics_port = imgcls.wait_ports()
        target, metrics_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
        with Client(target, timeout=30) as client:
            client.wait_until_serving(180)  # the ports open before the models are loaded
        warm = max(concurrency)
        endpoints = [prepare_endpoint(peers, IMGCLS, target, entry.name, data, warm, workdir)]
        for label, triton in tritons.items():
            endpoints.append(prepare_endpoint(peers, label, triton.wait_ready(), entry.name, data, warm, workdir))
            if endpoints[-1].input_json is None:
                raise RuntimeError(endpoints[-1].note)
        rows = [r for c in concurrency for k in range(1, args.rounds + 1)
                for r in measure_level(peers, endpoints, (target, metrics_url), entry.name, data, c, args, workdir, k)]
        return rows, [ep.note for ep in endpoints if ep.note]
    finally:
        stop_all(servers)


def bench_ceiling(entry, data: list[bytes], concurrency: list[int], duration: float) -> list[dict]:
    """bench_service (b) with the ONNX runtime and imgcls serve's thread settings."""
    artifact = runtimes.choose_artifact(entry.manifest, "onnx")
    runtime = runtimes.load_runtime(entry.folder, artifact, SERVE_DEFAULTS.inference_threads)
    rows = bench_service.bench_in_process(runtime, entry.manifest.preprocessing, data, concurrency, duration,
                                          SERVE_DEFAULTS.decode_workers)
    return [result("in-process ceiling", "-", "-", r["setting"], r) for r in rows]


def machine() -> dict:
    """What the figures depend on: CPUs, model, memory, GPU presence, load before the run."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), model)
    except (OSError, subprocess.SubprocessError):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpus": runtimes.default_threads(), "cpu_model": model, "memory_gib": round(mem, 1),
            "gpu": "present" if shutil.which("nvidia-smi") else "none", "python": platform.python_version(),
            "load_before": os.getloadavg()}


def markdown(rows: list[dict]) -> str:
    rounds = any(r.get("round", 1) > 1 for r in rows)
    lines = ["| server | protocol | client | concurrency |" + (" round |" if rounds else "")
             + " img/s | p50 ms | p99 ms | mean batch |",
             "|---|---|---|---|" + ("---:|" if rounds else "") + "---:|---:|---:|---:|"]
    for r in rows:
        flag = " (unstable)" if not r["stable"] else ""
        batch = f"{r['server_batch']:.1f}" if r["server_batch"] else "-"
        lines.append(f"| {r['server']} | {r['protocol']} | {r['client']} | {r['concurrency']}{flag} | "
                     + (f"{r.get('round', '-')} | " if rounds else "")
                     + f"{r['images_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {batch} |")
    return "\n".join(lines)


def goal(rows: list[dict], concurrency: list[int]) -> list[dict]:
    """Per concurrency and Triton variant, imgcls's KServe endpoint against Triton, both driven by perf_analyzer:
    the ratio within each round (the two measured back to back), judged on the median over rounds."""
    def pick(server: str, c: int, k: int) -> dict | None:
        return next((r for r in rows if r["server"] == server and r["client"] == PERF_ANALYZER
                     and r["concurrency"] == c and r.get("round", 1) == k), None)

    rounds = sorted({r.get("round", 1) for r in rows})
    out = []
    for c in concurrency:
        for triton in TRITONS:
            pairs = [(mine, theirs) for k in rounds
                     if (mine := pick(IMGCLS, c, k)) and (theirs := pick(triton, c, k))]
            if not pairs:
                continue
            ratios = [mine["images_per_s"] / theirs["images_per_s"] for mine, theirs in pairs]
            p99 = [mine["p99_ms"] - theirs["p99_ms"] for mine, theirs in pairs]
            ratio, diff = statistics.median(ratios), statistics.median(p99)
            out.append({"concurrency": c, "triton": triton, "throughput_ratio": ratio, "p99_diff_ms": diff,
                        "round_ratios": ratios, "met": ratio >= 1 and diff <= 0})
    return out


def load_images(folder: Path, limit: int) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]
    return [p.read_bytes() for p in files]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """SIGTERM stops the servers through the same `finally` blocks as Ctrl-C; SIGINT is installed explicitly
    because a process started in the background of a non-interactive shell inherits it ignored."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-images", type=int, default=256, help="images loaded from --images")
    parser.add_argument("--stability", type=float, default=10.0,
                        help="perf_analyzer --stability-percentage (re-run unstable levels accepting any spread)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every level this many times, alternating the servers' order; the goal is "
                             "judged on the median of each round's ratio (this VM's speed drifts between runs)")
    parser.add_argument("--triton-instances", type=int, default=1, help="Triton model instances")
    parser.add_argument("--triton-spin", action="store_true",
                        help="Triton's onnxruntime threads spin within a run (imgcls's lone-batch runtime does; "
                             "default: they sleep between operators, as imgcls's instances do)")
    parser.add_argument("--imgcls-arg", action="append", default=[],
                        help="extra `imgcls serve` flag, e.g. --imgcls-arg=--decode-workers=1 (repeat)")
    parser.add_argument("--peers-venv", type=Path, default=DEFAULT_PEERS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    stop_on_signals()

    entry = next((e for e in repository.scan(args.model_repository) if e.name == args.model), None)
    if entry is None:
        parser.error(f"--model {args.model}: not in {args.model_repository}")
    data = load_images(args.images, args.max_images)
    if not data:
        parser.error(f"no images under {args.images}")
    try:
        peers = find_peers(args.peers_venv)
    except PeersMissing as exc:
        print(f"bench_peers: {exc}", file=sys.stderr)
        return 2
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    meta = {"model": entry.name, "version": entry.version, "backbone": entry.manifest.backbone, "runtime": "onnx",
            "images": len(data), "duration_s": args.duration, "rounds": args.rounds,
            "triton_instances": args.triton_instances,
            "triton_spin": args.triton_spin,
            "imgcls_args": args.imgcls_arg,
            "machine": machine()}
    print(f"# {entry.name} v{entry.version} ({entry.manifest.backbone}, onnx), {len(data)} images, machine "
          f"{meta['machine']}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        rows = bench_ceiling(entry, data, concurrency, args.duration / 2)
        served, notes = bench_servers(peers, entry, data, concurrency, args, Path(tmp))
    rows += sorted(served, key=lambda r: (r["server"] != IMGCLS, r["client"] != "bench_service.py (Python)",
                                         r["server"]))
    meta["load_after"] = os.getloadavg()
    summary = goal(rows, concurrency)

    m = meta["machine"]
    print(f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, GPU: {m['gpu']}; load average "
          f"{m['load_before'][0]:.2f} before, {meta['load_after'][0]:.2f} after.\n")
    print(markdown(rows) + "\n")
    for g in summary:
        each = "" if len(g["round_ratios"]) < 2 else \
            f" (median of rounds: {', '.join(f'{x:.2f}x' for x in g['round_ratios'])})"
        print(f"concurrency {g['concurrency']} vs {g['triton']}: imgcls throughput {g['throughput_ratio']:.2f}x"
              f"{each}, p99 {g['p99_diff_ms']:+.1f} ms: goal {'met' if g['met'] else 'NOT met'}")
    if summary:
        print(f"Goal (imgcls >= Triton throughput at <= p99, every concurrency, both variants): "
              f"{'met' if all(g['met'] for g in summary) else 'NOT met'}.")
    for note in notes:
        print(f"note: {note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "goal": summary, "notes": notes}, indent=2)
                             + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
