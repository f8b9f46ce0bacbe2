"""Benchmark the artifacts of a published repository entry, as `imgcls export` does, without re-exporting.

    python benchmarks/bench_export.py /tmp/repo/flowers/1 [--threads 2] [--rounds 3] [--update-manifest]

Same runtimes and settings as the export (onnxruntime, LiteRT with XNNPACK, TensorFlow; threads set
explicitly). Inputs are random pixels normalized per the manifest (latency does not depend on content).
With `--rounds N` the formats are measured in turn N times and each figure is the median over rounds,
so a neighbour's burst on a shared machine does not land on one format only. `--update-manifest`
writes the figures into the entry's `artifact.benchmark` (what the server reads to pick its runtime).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from imgcls.errors import ImgclsError
from imgcls.export.bench import BenchSettings, benchmark
from imgcls.export.pipeline import default_threads
from imgcls.export.report import artifact_table, fastest
from imgcls.export.runners import open_runner, set_tensorflow_threads
from imgcls.manifest import read_manifest, write_manifest
from imgcls.preprocessing import normalize


def run(entry: Path, threads: int, rounds: int, settings: BenchSettings, formats: list[str] | None) -> dict:
    manifest = read_manifest(entry)
    if manifest.kind != "model":
        raise ImgclsError(f"{entry}: not a repository entry (kind {manifest.kind!r})")
    h, w = manifest.preprocessing.input_size
    rng = np.random.default_rng(0)
    images = normalize(rng.integers(0, 256, (settings.batch_size, h, w, 3), dtype=np.uint8), manifest.preprocessing)
    chosen = [a for a in manifest.artifacts if not formats or a.format in formats]
    if any(a.format == "savedmodel" for a in chosen):
        set_tensorflow_threads(threads)
    runners = {a.format: open_runner(a.format, entry / a.file, threads, settings.tflite_max_chunk) for a in chosen}
    per_round: dict[str, list[dict]] = {fmt: [] for fmt in runners}
    for r in range(rounds):
        for fmt, runner in runners.items():
            print(f"round {r + 1}/{rounds}: {fmt}", file=sys.stderr, flush=True)
            per_round[fmt].append(benchmark(runner, images, settings))
    figures = {}
    for fmt, results in per_round.items():
        merged = dict(results[0])
        for key in results[0]:
            if key.endswith(("_ms", "_per_s")):
                merged[key] = round(float(np.median([res[key] for res in results])), 3)
        figures[fmt] = {**merged, "rounds": rounds, "input": "random pixels"}
    return {"manifest": manifest, "figures": figures}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("entry", type=Path, help="repository entry folder REPO/NAME/VERSION")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--runs", type=int, default=50, help="timed batch-1 calls per round")
    p.add_argument("--batch-runs", type=int, default=10, help="timed batch-32 calls per round")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--formats", nargs="*", default=None, help="only these artifact formats")
    p.add_argument("--update-manifest", action="store_true", help="store the figures in the entry's manifest")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    settings = BenchSettings(threads=args.threads, batch1_runs=args.runs, batch_runs=args.batch_runs)
    try:
        result = run(args.entry, args.threads, max(1, args.rounds), settings, args.formats)
    except ImgclsError as exc:
        print(f"bench_export: error: {exc}", file=sys.stderr)
        return 2
    manifest, figures = result["manifest"], result["figures"]
    artifacts = [{**a.model_dump(), "benchmark": figures.get(a.format, a.benchmark)} for a in manifest.artifacts]
    if args.update_manifest:
        updated = manifest.model_copy(update={"artifacts": [
            a.model_copy(update={"benchmark": figures[a.format]}) if a.format in figures else a
            for a in manifest.artifacts]})
        write_manifest(args.entry, updated)
    if args.json:
        print(json.dumps({"entry": str(args.entry), "machine": settings.describe()["machine"], "benchmark": figures}))
    else:
        print(artifact_table([a for a in artifacts if a["format"] in figures]))
        best = fastest(artifacts)
        if best:
            print(f"\nfastest full-precision runtime at batch 32: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
