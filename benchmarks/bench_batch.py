"""Benchmark `imgcls batch` against `imgcls serve` on this machine, next to the in-process pipeline.

Links a bundle's test split (split.json) into class folders, starts `imgcls serve` on free ports, runs
`imgcls batch` (a subprocess, fresh output each time) for each --settings entry `BATCHxCONCURRENCY`, and
reports the median images/s of --repeats runs. For comparison it measures, in the same run, the service
benchmark's (b): decode + preprocess + runtime in process, pipelined batches (benchmarks/bench_service.py).

    python benchmarks/bench_batch.py --model-repository runs/repo --model flowers --bundle runs/flowers \
        [--settings 16x4,32x2,8x8] [--repeats 3] [--json runs/bench_batch.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "scripts"))

from bench_service import Server, bench_in_process  # noqa: E402  (benchmarks/ is not a package)
from demo import test_split_folder  # noqa: E402

from imgcls.preprocessing import preprocess_bytes  # noqa: E402
from imgcls.service import repository, runtimes  # noqa: E402


def run_batch(port: int, model: str, folder: Path, out: Path, batch: int, concurrency: int) -> dict:
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "imgcls.cli", "batch", "--target", f"127.0.0.1:{port}", "--model", model,
           "--input", str(folder), "--output", str(out), "--batch-size", str(batch), "--concurrency",
           str(concurrency), "--no-progress", "--json", "--labels-from-folders"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"imgcls batch failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--bundle", type=Path, required=True, help="bundle whose split.json test split is used")
    parser.add_argument("--settings", default="16x4,32x2,8x8", help="BATCHxCONCURRENCY, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runtime", default=None, help="artifact format (default: what the server would pick)")
    parser.add_argument("--threads", type=int, default=runtimes.default_threads(), help="inference threads")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of the in-process measurement")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    entry = next((e for e in repository.scan(args.model_repository) if e.name == args.model), None)
    if entry is None:
        parser.error(f"no model {args.model} in {args.model_repository}")
    artifact = runtimes.choose_artifact(entry.manifest, args.runtime)
    settings = [tuple(int(x) for x in s.split("x")) for s in args.settings.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        folder = Path(tmp) / "test"
        count = test_split_folder(args.bundle, folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        print(f"# {entry.name} v{entry.version} ({entry.manifest.backbone}, {artifact.format}), {count} test images, "
              f"{args.threads} inference threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
              file=sys.stderr)

        runtime = runtimes.load_runtime(entry.folder, artifact, args.threads)
        data = [p.read_bytes() for p in files]
        in_process = bench_in_process(runtime, entry.manifest.preprocessing, data, [1, 32], args.duration / 2,
                                      args.threads)
        del runtime
        preprocess_bytes(data[0], entry.manifest.preprocessing)

        server = Server(["--model-repository", str(args.model_repository), "--runtime",
                         f"{entry.name}={artifact.format}", "--inference-threads", str(args.threads),
                         "--decode-workers", str(args.threads)])
        rows = []
        try:
            port, _ = server.wait_ports()
            from imgcls.client.client import Client

            with Client(f"127.0.0.1:{port}") as client:
                client.wait_until_serving(120)
            run_batch(port, entry.name, folder, Path(tmp) / "warmup.jsonl", 16, 4)
            results: dict[tuple[int, int], list[dict]] = {s: [] for s in settings}
            for _ in range(args.repeats):  # round robin, so that a neighbour's load hits every setting alike
                for batch, concurrency in settings:
                    results[(batch, concurrency)].append(
                        run_batch(port, entry.name, folder, Path(tmp) / "out.jsonl", batch, concurrency))
            for (batch, concurrency), runs in results.items():
                rates = [r["images_per_second"] for r in runs]
                rows.append({"batch_size": batch, "concurrency": concurrency, "files": runs[0]["files"],
                             "images_per_s": statistics.median(rates), "runs": rates,
                             "accuracy": runs[0]["evaluation"]["accuracy"]})
                print(f"batch {batch} x {concurrency}: {statistics.median(rates):.1f} images/s "
                      f"(runs {', '.join(f'{r:.1f}' for r in rates)})", file=sys.stderr)
        finally:
            server.stop()

    b_best = max(r["images_per_s"] for r in in_process)
    print("| how | setting | images/s |")
    print("|---|---|---:|")
    for r in in_process:
        print(f"| in process, (b) of bench_service.py | {r['setting']} | {r['images_per_s']:.1f} |")
    for r in rows:
        print(f"| `imgcls batch` via the server | --batch-size {r['batch_size']} --concurrency {r['concurrency']} | "
              f"{r['images_per_s']:.1f} ({r['images_per_s'] / b_best:.0%} of (b)'s best) |")
    print(f"\nserved accuracy on the {rows[0]['files']} test images: {100 * rows[0]['accuracy']:.2f}%; "
          f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        meta = {"model": entry.name, "version": entry.version, "runtime": artifact.format, "threads": args.threads,
                "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                "when": time.strftime("%Y-%m-%d %H:%M:%S")}
        args.json.write_text(json.dumps({"meta": meta, "in_process": in_process, "batch": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
