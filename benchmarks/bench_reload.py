"""Measure a hot-reload swap: the server's memory while two versions are resident, how long the swap takes,
and whether any request fails.

Copies one model version of a repository into a scratch repository as version 1, starts `imgcls serve`
(subprocess, hot reload on), sends light closed-loop traffic, publishes a copy as version 2 the way
`imgcls export` does (hidden staging folder, manifest written, rename), and samples the server's
/proc/PID/status (VmRSS; VmHWM, the kernel's own peak, reset just before publishing) until version 1 is
unloaded and traffic has run a while on version 2. Prints a markdown table.

    python benchmarks/bench_reload.py --model-repository runs/repo --model flowers \\
        --images ~/.keras/datasets/flower_photos [--runtime onnx] [--poll-interval 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import Server

from imgcls.preprocessing import IMAGE_EXTENSIONS
from imgcls.service import repository

MIB = 1024 * 1024


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class RssSampler:
    """Samples VmRSS every `period` seconds in a thread: (monotonic time, bytes)."""

    def __init__(self, pid: int, period: float = 0.01) -> None:
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append((time.monotonic(), status_kib(self.pid, "VmRSS") * 1024))
            except (OSError, KeyError):
                return

    def between(self, start: float, end: float) -> list[int]:
        return [rss for t, rss in self.samples if start <= t <= end]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def publish(repo: Path, source: Path, name: str, version: int) -> None:
    """`imgcls export`'s publishing: build in a hidden staging folder of the repository, then rename."""
    staging = repo / f".{name}.tmp-bench{version}"
    shutil.copytree(source, staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    manifest["version"] = version
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    os.rename(staging, repo / name / str(version))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--runtime", default="onnx")
    parser.add_argument("--poll-interval", type=float, default=0.5)
    parser.add_argument("--clients", type=int, default=2, help="closed-loop single-image clients")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of traffic before publishing")
    parser.add_argument("--after", type=float, default=5.0, help="seconds of traffic after version 1 is unloaded")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `imgcls serve` flag (repeat)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from imgcls.client.client import Client, ServiceError

    source = next((e for e in repository.scan(args.model_repository) if e.name == args.model), None)
    if source is None:
        parser.error(f"no model {args.model!r} in {args.model_repository}")
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:64]
    if not files:
        parser.error(f"no images under {args.images}")
    data = [p.read_bytes() for p in files]

    with tempfile.TemporaryDirectory(prefix="bench-reload-") as tmp:
        repo = Path(tmp) / "repo"
        (repo / args.model).mkdir(parents=True)
        publish(repo, source.folder, args.model, 1)
        server = Server(["--model-repository", str(repo), "--runtime", args.runtime,
                         "--poll-interval", str(args.poll_interval), *args.server_arg])
        try:
            port, _ = server.wait_ports()
            sampler = RssSampler(server.proc.pid)
            stop = threading.Event()
            versions: list[list[tuple[float, int]]] = [[] for _ in range(args.clients)]
            errors: list[str] = []
            with Client(f"127.0.0.1:{port}", timeout=60, retries=8) as ready:  # wait until serving
                ready.predict([data[0]], model=args.model)

            def traffic(k: int) -> None:
                with Client(f"127.0.0.1:{port}", timeout=30, retries=0) as client:  # an error is an error
                    i = k
                    while not stop.is_set():
                        try:
                            p = client.predict([data[i % len(data)]], model=args.model)
                            versions[k].append((time.monotonic(), p.version))
                        except ServiceError as exc:
                            errors.append(f"{exc.code.name}: {exc}")
                        i += args.clients

            threads = [threading.Thread(target=traffic, args=(k,), daemon=True) for k in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(args.settle)
            before_end = time.monotonic()
            rss_before = statistics.median(sampler.between(before_end - 2, before_end))
            hwm_start = status_kib(server.proc.pid, "VmHWM") * 1024  # start-up peak: one version warming up
            hwm_reset = True
            try:  # reset VmHWM so it reports the swap's peak, not the start-up's
                Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")
            except OSError:
                hwm_reset = False
            published = time.monotonic()
            publish(repo, source.folder, args.model, 2)
            deadline = published + 120
            while not all(v and v[-1][1] == 2 for v in versions) and time.monotonic() < deadline:
                time.sleep(0.01)
            while not any(f"unloaded {args.model} v1" in line for line in server.log) and time.monotonic() < deadline:
                time.sleep(0.01)
            unloaded = time.monotonic()
            time.sleep(args.after)
            stop.set()
            for t in threads:
                t.join(30)
            end = time.monotonic()
            hwm = status_kib(server.proc.pid, "VmHWM") * 1024
            sampler.stop()
        finally:
            server.stop()

    first_v2 = min((t for v in versions for t, ver in v if ver == 2), default=float("nan"))
    load_line = next((line for line in server.log if f"loaded {args.model} v2" in line), "")
    load_s = float(load_line.rsplit(" in ", 1)[1].rstrip("s\n")) if load_line else float("nan")
    switches = [sum(1 for a, b in itertools.pairwise(v) if a[1] != b[1]) for v in versions]
    during = sampler.between(published, unloaded + 0.5)
    results = {
        "model": args.model, "runtime": args.runtime, "poll_interval_s": args.poll_interval, "clients": args.clients,
        "rss_before_mib": rss_before / MIB,
        "rss_peak_sampled_mib": max(during) / MIB,
        "vmhwm_startup_mib": hwm_start / MIB, "vmhwm_mib": hwm / MIB, "vmhwm_reset_before_publish": hwm_reset,
        "rss_after_mib": statistics.median(sampler.between(end - 2, end)) / MIB,
        "load_warmup_probe_s": load_s,
        "publish_to_first_v2_s": first_v2 - published,
        "publish_to_v1_unloaded_s": unloaded - published,
        "requests": sum(len(v) for v in versions), "errors": len(errors), "switches_per_client": switches,
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, {platform.platform()}",
        "load_average": os.getloadavg(),
    }
    print(f"# {args.model} ({args.runtime}), {args.clients} clients, poll {args.poll_interval}s; "
          f"{results['machine']}, load average {results['load_average'][0]:.2f}")
    print("| measure | value |\n|---|---:|")
    rows = [("peak RSS at start-up (v1 loading and warming up), VmHWM", f"{results['vmhwm_startup_mib']:.0f} MiB"),
            ("RSS before publishing (v1 serving)", f"{results['rss_before_mib']:.0f} MiB"),
            ("peak RSS during the swap, sampled every 10 ms", f"{results['rss_peak_sampled_mib']:.0f} MiB"),
            ("peak RSS during the swap, VmHWM" + ("" if hwm_reset else " (since start: reset refused)"),
             f"{results['vmhwm_mib']:.0f} MiB"),
            ("RSS after v1 was unloaded", f"{results['rss_after_mib']:.0f} MiB"),
            ("v2 load + checksum + warm-up + probe", f"{load_s:.2f} s"),
            ("publish -> first response from v2", f"{results['publish_to_first_v2_s']:.2f} s"),
            ("publish -> v1 unloaded", f"{results['publish_to_v1_unloaded_s']:.2f} s"),
            ("requests / errors", f"{results['requests']} / {results['errors']}"),
            ("version switches per client", ", ".join(map(str, switches)))]
    for name, value in rows:
        print(f"| {name} | {value} |")
    for error in errors[:5]:
        print("error:", error, file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if errors or any(s != 1 for s in switches) else 0


if __name__ == "__main__":
    sys.exit(main())
