"""`imgcls export`. Argparse only at import; TensorFlow, tf2onnx and the runtimes load inside the command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from imgcls.cli_format import add_command

FORMATS_HELP = "savedmodel, tflite, tflite-fp16, tflite-int8, onnx, or all (space or comma separated)"


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "export", help="export a bundle to SavedModel/TFLite/ONNX, verify and publish it to a model repository",
        description="Convert a bundle written by `imgcls train` into REPO/NAME/VERSION/ (SavedModel, TFLite fp32, "
                    "fp16 and int8, ONNX), check every artifact against the SavedModel on a labelled sample, "
                    "benchmark it, and publish atomically. Nothing is published when a check fails; a running "
                    "`imgcls serve` on the repository picks the new version up at its next poll.",
        examples=["imgcls export --model runs/mine --repository runs/repo --name mine",
                  "imgcls export --model runs/mine --repository runs/repo --name mine --formats tflite onnx",
                  "imgcls export --model runs/mine --repository runs/repo --name mine --no-benchmark --json"])
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="model bundle folder (from `imgcls train`)")
    p.add_argument("--repository", type=Path, required=True, metavar="DIR", help="model repository root folder")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--version", type=int, default=None, metavar="N",
                   help="version to write (default: highest existing + 1)")
    p.add_argument("--formats", nargs="+", default=["all"], metavar="FORMAT", help=FORMATS_HELP)
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="labelled check folder (class subfolders named like the model's classes); "
                        "default: the bundle's val+test split")
    p.add_argument("--max-check-images", type=int, default=None, metavar="N",
                   help="check on a stratified subset of this size (default: every check image)")
    p.add_argument("--calibration-images", type=int, default=200, metavar="N",
                   help="int8 calibration: at most this many training images, stratified by class")
    p.add_argument("--calibration-data", type=Path, default=None, metavar="DIR",
                   help="int8 calibration images folder (default: the bundle's training split)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed for the calibration and check subsets")
    p.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="runtime threads for checks and benchmark "
                   "(default: the cores available)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="batch size of the check runs")
    p.add_argument("--benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="time every artifact (batch 1 and 32) and record the figures in the manifest")
    p.add_argument("--bench-runs", type=int, default=50, metavar="N", help="timed batch-1 calls per artifact")
    p.add_argument("--bench-batch-runs", type=int, default=10, metavar="N", help="timed batch-32 calls per artifact")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object (no progress)")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from imgcls.errors import ImgclsError
    from imgcls.export.pipeline import ExportConfig, default_threads, run_export
    from imgcls.export.report import artifact_table, default_runtime, fastest
    from imgcls.runtimes import DEFAULT_ORDER

    if args.bench_runs < 1 or args.bench_batch_runs < 1:
        raise ImgclsError("--bench-runs and --bench-batch-runs must be at least 1")
    cfg = ExportConfig(
        model=args.model, repository=args.repository, name=args.name, version=args.version, formats=args.formats,
        data=args.data, max_check_images=args.max_check_images, calibration_images=args.calibration_images,
        calibration_data=args.calibration_data, seed=args.seed, opset=args.opset,
        threads=args.threads or default_threads(), batch_size=args.batch_size, benchmark=args.benchmark,
        bench={"batch1_runs": args.bench_runs, "batch_runs": args.bench_batch_runs}, progress=not args.json,
    )
    summary = run_export(cfg)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"\npublished {summary['name']} version {summary['version']}: {summary['entry']}")
    print(f"checked on {summary['check_images']} images; SavedModel accuracy {summary['reference_accuracy']:.2%}\n")
    print(artifact_table(summary["artifacts"]))
    best, served = fastest(summary["artifacts"]), default_runtime(summary["artifacts"])
    if best:
        print(f"\nfastest full-precision runtime at batch 32 in this run: {best}")
    if served:
        print(f"imgcls serve runs {served} by default (fixed order {' > '.join(DEFAULT_ORDER)}; --runtime to change)")
    return 0
