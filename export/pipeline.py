"""`imgcls export`: bundle -> verified, benchmarked, atomically published repository entry.

Order matters: everything is converted into the staging folder and checked first; only when every
check passes is anything benchmarked, described in the manifest and renamed into the repository.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from imgcls import __version__
from imgcls.errors import ImgclsError
from imgcls.manifest import Artifact, Manifest, read_manifest, write_manifest
from imgcls.runtimes import DEFAULT_ORDER, TREE_METHOD, choose_artifact, default_threads

from . import convert, describe, faults, publish, samples
from .bench import BenchSettings, benchmark
from .checks import MAX_ACCURACY_DROP_POINTS, MIN_TOP1_AGREEMENT, CheckResult, ExportCheckError, run_checks
from .runners import SavedModelRunner, open_runner, set_tensorflow_threads

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    model: Path
    repository: Path
    name: str
    version: int | None = None
    formats: list[str] = field(default_factory=lambda: list(convert.ORDER))
    data: Path | None = None  # labelled check sample; default the bundle's val+test split
    max_check_images: int | None = None
    calibration_images: int = 200
    calibration_data: Path | None = None
    seed: int = 0
    opset: int = convert.DEFAULT_OPSET
    threads: int = field(default_factory=default_threads)
    batch_size: int = 32  # check batches
    benchmark: bool = True
    bench: dict = field(default_factory=dict)  # BenchSettings overrides: batch1_runs, batch_runs, warmup
    progress: bool = True
    fault: str | None = None  # test-only, see faults.py


class Progress:
    """One line per step on stderr, with its duration (conversions of a big model take a while)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, key: str, message: str) -> Iterator[None]:
        if self.enabled:
            print(f"export: {message} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        yield
        self.timings[key] = round(time.perf_counter() - t0, 3)
        if self.enabled:
            print(f"export: {message}: done in {self.timings[key]:.1f} s", file=sys.stderr, flush=True)


def parse_formats(values: list[str] | None) -> list[str]:
    """Formats in canonical order; accepts repeated flags, comma lists and `all`."""
    items = [v.strip().lower() for value in values or ["all"] for v in value.split(",") if v.strip()]
    if not items or "all" in items:
        return list(convert.ORDER)
    unknown = [v for v in items if v not in convert.ORDER]
    if unknown:
        raise ImgclsError(f"unknown format(s) {', '.join(map(repr, unknown))}; choose from: "
                          f"{', '.join(convert.ORDER)} (or all)")
    return [f for f in convert.ORDER if f in items]


def load_bundle(path: Path) -> Manifest:
    path = Path(path)
    if not path.exists():
        raise ImgclsError(f"--model {path}: no such folder")
    manifest = read_manifest(path)
    if manifest.kind != "bundle":
        raise ImgclsError(f"--model {path}: is a repository entry (kind {manifest.kind!r}), not a bundle "
                          "written by `imgcls train`")
    sm = path / manifest.model.get("saved_model", "saved_model")
    if not (sm / "saved_model.pb").is_file():
        raise ImgclsError(f"--model {path}: the bundle has no SavedModel at {sm}")
    return manifest


def validate(cfg: ExportConfig) -> tuple[Manifest, list[str]]:
    formats = parse_formats(cfg.formats)
    publish.validate_name(cfg.name)
    manifest = load_bundle(cfg.model)
    publish.refuse_existing(Path(cfg.repository), cfg.name, cfg.version)
    for flag, value, low in (("--threads", cfg.threads, 1), ("--batch-size", cfg.batch_size, 1),
                             ("--calibration-images", cfg.calibration_images, 1), ("--opset", cfg.opset, 13)):
        if value < low:
            raise ImgclsError(f"{flag} must be at least {low}")
    if cfg.max_check_images is not None and cfg.max_check_images < 1:
        raise ImgclsError("--max-check-images must be at least 1")
    faults.active(cfg.fault)
    return manifest, formats


def run_export(cfg: ExportConfig) -> dict:
    """Export, check, benchmark and publish; returns a summary. Raises ImgclsError, publishing nothing."""
    started = time.perf_counter()
    manifest, formats = validate(cfg)
    bundle = Path(cfg.model)
    spec = manifest.preprocessing
    fault = faults.active(cfg.fault)
    progress = Progress(cfg.progress)
    with progress.step("load_check_sample", "decoding the check sample"):
        sample = samples.check_sample(bundle, manifest, cfg.data, cfg.max_check_images, cfg.seed, cfg.progress)
    calibration = None
    if "tflite-int8" in formats:
        with progress.step("load_calibration", f"decoding up to {cfg.calibration_images} calibration images"):
            calibration = samples.calibration_sample(bundle, manifest, cfg.calibration_data,
                                                     cfg.calibration_images, cfg.seed, cfg.progress)
    threads_pinned = set_tensorflow_threads(cfg.threads)
    bundle_sm = bundle / manifest.model.get("saved_model", "saved_model")

    with publish.Staging(Path(cfg.repository), cfg.name) as staging:
        work = staging.path
        results: dict[str, CheckResult] = {}
        extras: dict[str, dict] = {}
        with progress.step("reference", f"running the bundle's SavedModel on {len(sample)} check images"):
            reference_runner = SavedModelRunner(bundle_sm)
            ref_result, reference = run_checks("savedmodel", reference_runner, sample, spec, cfg.batch_size,
                                               None, None)
        ref_acc = ref_result.accuracy
        for fmt in formats:
            target = work / convert.FILES[fmt]
            with progress.step(f"convert_{fmt}", f"converting to {fmt}"):
                extras[fmt] = _convert(fmt, bundle_sm, target, cfg, calibration, spec, fault)
                faults.apply(fault, fmt, target, manifest.num_classes)
            if fmt == "savedmodel":  # a byte-identical copy of the reference: same figures, no second run
                identical = describe.tree_sha256(target) == describe.tree_sha256(bundle_sm)
                result = CheckResult(fmt, ref_acc, {**ref_result.figures, "identical_to_bundle": identical},
                                     [] if identical else ["savedmodel: the copy differs from the bundle's"])
            else:
                with progress.step(f"check_{fmt}", f"checking {fmt} on {len(sample)} images"):
                    try:
                        runner = open_runner(fmt, target, cfg.threads)
                    except Exception as exc:
                        msg = f"{fmt}: the artifact does not load ({type(exc).__name__}: {str(exc)[:200]})"
                        result = CheckResult(fmt, None, {"error": msg, "passed": False}, [msg])
                    else:
                        result, _ = run_checks(fmt, runner, sample, spec, cfg.batch_size, reference, ref_acc)
            results[fmt] = result
        failures = [f for r in results.values() for f in r.failures]
        if failures:
            raise ExportCheckError("check failed, nothing published: " + "; ".join(failures))

        benchmarks: dict[str, dict] = {}
        if cfg.benchmark:
            settings = BenchSettings(threads=cfg.threads, **cfg.bench)
            bench_images = np.concatenate(list(sample.batches(spec, settings.batch_size))[:1])
            for fmt in formats:
                with progress.step(f"benchmark_{fmt}", f"benchmarking {fmt} ({cfg.threads} threads)"):
                    runner = open_runner(fmt, work / convert.FILES[fmt], cfg.threads, settings.tflite_max_chunk)
                    benchmarks[fmt] = benchmark(runner, bench_images, settings)

        with progress.step("describe", "hashing artifacts and writing the manifest"):
            artifacts = [_artifact(fmt, work, results[fmt], extras[fmt], benchmarks.get(fmt), reference_runner)
                         for fmt in formats]
        export_info = {
            "bundle": str(bundle.resolve()),
            "bundle_created_at": manifest.created_at,
            "formats": formats,
            "check_sample": {**sample.describe(), "reference_accuracy": ref_acc, "batch_size": cfg.batch_size},
            "thresholds": {"min_top1_agreement": MIN_TOP1_AGREEMENT,
                           "max_accuracy_drop_points": MAX_ACCURACY_DROP_POINTS},
            "threads": cfg.threads,
            "tensorflow_threads_pinned": threads_pinned,
            "benchmark": BenchSettings(threads=cfg.threads, **cfg.bench).describe() if cfg.benchmark else None,
            "library_versions": _versions(),
        }
        if calibration is not None:
            export_info["calibration"] = {**calibration.describe(with_files=True), "seed": cfg.seed,
                                          "requested": cfg.calibration_images}
        if fault:
            export_info["fault_injected"] = fault

        def finalize(version: int) -> None:
            export_info["timings"] = {**progress.timings, "total_s": round(time.perf_counter() - started, 3)}
            entry = manifest.model_copy(update={
                "kind": "model", "model": _model_info(manifest.model, formats), "name": cfg.name, "version": version,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "artifacts": artifacts, "export": export_info,
            })
            write_manifest(work, Manifest.model_validate(entry.model_dump()))

        version, path = staging.publish(cfg.version, finalize)

    written = read_manifest(path)
    return {"entry": str(path), "name": cfg.name, "version": version, "check_images": len(sample),
            "reference_accuracy": ref_acc, "artifacts": [a.model_dump() for a in written.artifacts],
            "default_runtime": choose_artifact(written).format if any(
                a.format in DEFAULT_ORDER for a in written.artifacts) else None,  # what `imgcls serve` runs
            "timings": written.export.get("timings", {})}


def _convert(fmt: str, saved_model: Path, target: Path, cfg: ExportConfig, calibration: samples.Sample | None,
             spec, fault: str | None) -> dict:
    if fmt == "savedmodel":
        return convert.to_savedmodel(saved_model, target)
    if fmt == "onnx":
        return convert.to_onnx(saved_model, target, cfg.opset)
    gen = None
    if fmt == "tflite-int8":
        scale = faults.calibration_scale(fault)
        gen = convert.calibration_generator(lambda: (b * scale for b in calibration.batches(spec, 32)))
    return convert.to_tflite(saved_model, target, fmt, gen)


def _artifact(fmt: str, work: Path, result: CheckResult, extra: dict, bench: dict | None,
              reference_runner: SavedModelRunner) -> Artifact:
    file = convert.FILES[fmt]
    sha, size = describe.checksum(work / file)
    if fmt == "savedmodel":
        inputs, outputs = describe.savedmodel_tensors(reference_runner)
        extra = {**extra, "sha256_method": TREE_METHOD}
    elif fmt == "onnx":
        inputs, outputs, opset = describe.onnx_tensors(work / file)
        extra = {**extra, "opset": opset}
    else:
        inputs, outputs, signatures = describe.tflite_tensors(work / file)
        extra = {**extra, "signatures": signatures}
    return Artifact(format=fmt, file=file, sha256=sha, size_bytes=size, inputs=inputs, outputs=outputs,
                    checks=result.figures, accuracy=result.accuracy, benchmark=bench or {}, **extra)


def _model_info(bundle_model: dict, formats: list[str]) -> dict:
    """The bundle's `model` section without the bundle files the entry does not contain."""
    info = {k: v for k, v in bundle_model.items() if k != "keras_model"}
    if "savedmodel" not in formats:
        info.pop("saved_model", None)
    return info


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"imgcls": __version__}
    for dist in ("tensorflow", "tf_keras", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert", "numpy"):
        with suppress(PackageNotFoundError):
            found[dist] = version(dist)
    return found
