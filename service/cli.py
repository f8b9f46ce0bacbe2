"""`imgcls serve` and `imgcls predict`. Argparse only here; grpc, NumPy and runtimes load inside the commands.

Every `serve` flag can also come from an environment variable, IMGCLS_ plus the flag name in upper case
with dashes as underscores (`--metrics-port` <- IMGCLS_METRICS_PORT); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from imgcls.errors import ImgclsError


def _env_name(flag: str) -> str:
    return "IMGCLS_" + flag.lstrip("-").upper().replace("-", "_")


def _flag(parser: argparse.ArgumentParser, flag: str, help: str, default: Any = None, **kwargs: Any) -> None:
    """An option whose default comes from its environment variable (argparse converts it with `type`)."""
    env = _env_name(flag)
    value = os.environ.get(env, default)
    shown = "" if default is None else f", default {default}"
    parser.add_argument(flag, default=value, help=f"{help} (env {env}{shown})", **kwargs)


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve a model repository over gRPC",
                           description="Serve every model of a repository over gRPC, with Prometheus metrics.")
    _flag(serve, "--model-repository", "repository folder (NAME/VERSION/manifest.json)", metavar="DIR")
    _flag(serve, "--host", "address to bind, for gRPC and metrics", "0.0.0.0")
    _flag(serve, "--port", "gRPC port (0 = any free port)", 50051, type=int)
    _flag(serve, "--metrics-port", "Prometheus /metrics port (0 = any free port)", 8000, type=int)
    _flag(serve, "--http-port", "HTTP port: KServe v2 and TF Serving REST, POST /predict, the web page at / "
          "(0 = any free port, -1 = no HTTP; docs/http.md)", 8080, type=int)
    _flag(serve, "--runtime", "artifact format for every model, or NAME=FORMAT per model, comma-separated: "
          "onnx, tflite, tflite-fp16, tflite-int8, savedmodel; default the first full-precision one of tflite > onnx > "
          "savedmodel", "")
    policy_env = os.environ.get("IMGCLS_VERSION_POLICY", os.environ.get("IMGCLS_VERSIONS", "latest"))
    serve.add_argument("--version-policy", "--versions", dest="version_policy", default=policy_env, metavar="POLICY",
                       help="versions of every model to serve: latest, latest:N, all or specific:V1,V2 (env "
                            "IMGCLS_VERSION_POLICY; --versions/IMGCLS_VERSIONS is the older name), default latest")
    serve.add_argument("--model-version-policy", action="append", metavar="NAME=POLICY",
                       help="per-model policy, overrides --version-policy; repeat the flag, or separate entries "
                            "with ';' (env IMGCLS_MODEL_VERSION_POLICY, used when the flag is not given)")
    _flag(serve, "--poll-interval", "seconds between scans of the repository for new, failed or removed versions "
          "(hot reload); 0 = load once at start", 10.0, type=float, metavar="SECONDS")
    _flag(serve, "--require-models", "an empty repository is an error at start (default: stay up, NOT_SERVING, "
          "until the first version appears)", "false", type=_bool, metavar="BOOL")
    _flag(serve, "--inference-threads", "threads per model runtime", None, type=int)
    _flag(serve, "--decode-workers", "image decode/preprocess threads", None, type=int)
    _flag(serve, "--max-concurrent-calls", "calls in progress (a stream counts once) before RESOURCE_EXHAUSTED; "
          "health checks are never refused", 1024, type=int)
    _flag(serve, "--max-batch-size", "largest batch the dynamic batcher forms", 32, type=int)
    _flag(serve, "--max-queue-delay-ms", "longest an image waits for its batch to fill", 2.0, type=float)
    _flag(serve, "--max-queue-size", "images admitted per model and not yet in a running batch (decoding or "
          "queued) before RESOURCE_EXHAUSTED: the admission limit, see docs/serving-core.md", 64, type=int)
    _flag(serve, "--max-images-per-request", "more is INVALID_ARGUMENT", 64, type=int)
    _flag(serve, "--max-message-bytes", "largest gRPC message, either direction", 64 * 1024 * 1024, type=int)
    _flag(serve, "--max-image-bytes", "largest encoded image", 32 * 1024 * 1024, type=int)
    _flag(serve, "--max-image-pixels", "largest decoded image, width x height (decompression bombs)",
          50_000_000, type=int)
    _flag(serve, "--image-formats", "image formats accepted, comma-separated (others are INVALID_ARGUMENT before any "
          "decoder runs; docs/hostile-input.md)", "JPEG,PNG,WEBP,GIF,BMP,TIFF")
    _flag(serve, "--decode-cpu-seconds", "hard bound on one image's decode; its worker process is killed past it",
          1.0, type=float)
    _flag(serve, "--decode-memory-mb", "estimated decode memory of all images being decoded at once", 768, type=int)
    _flag(serve, "--decode-isolation", "decode in killable worker processes (false: in threads, no hard bound)",
          "true", type=_bool, metavar="BOOL")
    _flag(serve, "--default-top-k", "labels per image when a request does not say", 5, type=int)
    _flag(serve, "--stream-max-inflight", "requests of one stream in progress before reading pauses", 32, type=int)
    _flag(serve, "--stream-idle-timeout", "seconds a stream may stay open with nothing sent and nothing in "
          "progress before the server closes it (UNAVAILABLE)", 300.0, type=float)
    _flag(serve, "--grace-period", "seconds calls in flight get to finish after SIGTERM", 30.0, type=float)
    _flag(serve, "--verify-checksums", "check artifact sha256 against the manifest at load", "true", type=_bool,
          metavar="BOOL")
    serve.set_defaults(func=serve_command)

    predict = sub.add_parser("predict", help="classify image files with a running server",
                             description="Send image files to an imgcls server and print their top-k labels.")
    predict.add_argument("files", nargs="+", metavar="FILE", type=Path)
    _flag(predict, "--target", "server address HOST:PORT", "localhost:50051")
    predict.add_argument("--model", default="", help="model name (default: the server's only model)")
    predict.add_argument("--version", type=int, default=0, help="model version (default: latest)")
    predict.add_argument("--top-k", type=int, default=5, help="labels per image (default 5)")
    predict.add_argument("--json", action="store_true", help="JSON Lines, one record per file, in argument order")
    predict.add_argument("--timeout", type=float, default=60.0, help="seconds per request, retries included")
    predict.add_argument("--batch-size", type=int, default=16, help="images per request (default 16)")
    predict.set_defaults(func=predict_command)

    batch = sub.add_parser(
        "batch", help="classify a folder, glob or list of files through a running server (resumable)",
        description="Classify many files through a running imgcls server: results are appended to --output as "
                    "they arrive, and re-running the same command resumes where it stopped (files with an error "
                    "row included: --retry-errors sends those again). A request that fails or times out while "
                    "the server is healthy is split and its files are sent one by one, so one bad or slow file "
                    "costs only its own error row. Exit codes: 0 all files answered, 1 some files failed (error "
                    "rows), 2 usage error or a job the server refuses (unknown model, ...), 3 server unavailable "
                    "(it failed its health check after the retries; re-run to resume), 130 interrupted.")
    _flag(batch, "--target", "server address HOST:PORT", "localhost:50051")
    batch.add_argument("--input", required=True, metavar="PATH",
                       help="a folder (searched recursively for images), a quoted glob ('photos/**/*.jpg') or a "
                            "text file with one path per line (relative to the file's folder)")
    batch.add_argument("--output", required=True, type=Path, metavar="FILE",
                       help="results file, .jsonl (the `imgcls predict --json` records) or .csv; appended to")
    batch.add_argument("--format", dest="output_format", choices=["jsonl", "csv"], default=None,
                       help="output format (default: from the --output extension)")
    batch.add_argument("--model", default="", help="model name (default: the server's only model)")
    batch.add_argument("--version", type=int, default=0, help="model version (default: latest)")
    batch.add_argument("--top-k", type=int, default=5, help="labels per file (default 5)")
    batch.add_argument("--batch-size", type=int, default=16, help="images per request (default 16)")
    batch.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    batch.add_argument("--timeout", type=float, default=60.0,
                       help="seconds per request attempt (default 60); a file alone that takes longer while the "
                            "server is healthy gets a DEADLINE_EXCEEDED error row")
    batch.add_argument("--retries", type=int, default=8,
                       help="retries of a request answered UNAVAILABLE, CANCELLED by a server shutting down, or "
                            "RESOURCE_EXHAUSTED (default 8); then it is split per file, or, if the server fails "
                            "its health check too, the job stops with exit code 3")
    batch.add_argument("--backoff", type=float, default=0.2, help="first retry delay in seconds, doubled per retry")
    batch.add_argument("--max-backoff", type=float, default=10.0, help="cap on the retry delay (default 10 s)")
    batch.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024,
                       help="split requests larger than this (default 16 MiB)")
    batch.add_argument("--retry-errors", "--retry-failed", dest="retry_errors", action="store_true",
                       help="remove the error rows of earlier runs from --output and send those files again "
                            "(without it, files with an error row are skipped like answered ones)")
    batch.add_argument("--allow-failures", action="store_true", help="exit 0 even when some files failed")
    batch.add_argument("--labels-from-folders", action="store_true",
                       help="the first folder below --input is each file's class: report accuracy per class")
    progress = batch.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="progress bar on stderr (default: when stderr is a terminal; else a line every 10 s)")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")
    batch.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    batch.set_defaults(func=batch_command)


def _runtimes(text: str) -> tuple[str | None, dict[str, str]]:
    default, per_model = None, {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" in part:
            name, fmt = (s.strip() for s in part.split("=", 1))
            per_model[name] = fmt
        else:
            default = part
    return default, per_model


def _model_policies(values: list[str] | str | None) -> dict[str, str]:
    """`--model-version-policy` entries (repeated flags, or one value with ';' between entries)."""
    if isinstance(values, str):  # from the environment variable
        values = [values]
    policies = {}
    for part in (p.strip() for value in values or [] for p in value.split(";")):
        if not part:
            continue
        name, sep, policy = part.partition("=")
        if not sep or not name.strip():
            raise ImgclsError(f"--model-version-policy {part!r}: expected NAME=POLICY, e.g. flowers=latest:2")
        policies[name.strip()] = policy.strip()
    return policies


def serve_command(args: argparse.Namespace) -> int:
    from imgcls.service.server import InferenceServer, ServeConfig

    if not args.model_repository:
        raise ImgclsError("--model-repository (or IMGCLS_MODEL_REPOSITORY) is required")
    runtime, per_model = _runtimes(args.runtime or "")
    config = ServeConfig(
        model_repository=Path(args.model_repository), host=args.host, port=args.port, metrics_port=args.metrics_port,
        http_port=None if args.http_port < 0 else args.http_port,
        runtime=runtime, model_runtimes=per_model, versions=args.version_policy,
        model_versions=_model_policies(args.model_version_policy or os.environ.get("IMGCLS_MODEL_VERSION_POLICY")),
        poll_interval=args.poll_interval, require_models=args.require_models,
        max_concurrent_calls=args.max_concurrent_calls,
        max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms,
        max_queue_size=args.max_queue_size, max_images_per_request=args.max_images_per_request,
        max_message_bytes=args.max_message_bytes, max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels, default_top_k=args.default_top_k,
        image_formats=args.image_formats, decode_cpu_seconds=args.decode_cpu_seconds,
        decode_memory_mb=args.decode_memory_mb, decode_isolation=args.decode_isolation,
        stream_max_inflight=args.stream_max_inflight, stream_idle_timeout=args.stream_idle_timeout,
        grace_period=args.grace_period,
        verify_checksums=args.verify_checksums,
    )
    if args.inference_threads is not None:
        config.inference_threads = args.inference_threads
    if args.decode_workers is not None:
        config.decode_workers = args.decode_workers
    return InferenceServer(config).serve_forever()


def predict_records(client: Any, files: list[Path], *, model: str, version: int, top_k: int,
                    batch_size: int, timeout: float) -> list[dict[str, Any]]:
    """One record per file, in order: the shape `imgcls batch` writes too."""
    import grpc

    from imgcls.service.client import ErrorInfo, ServiceError
    from imgcls.service.records import error_record, ok_record, read_error_record

    meta = client.metadata(model, version, timeout=timeout)  # fails once for a wrong model, not per file
    records: list[dict[str, Any] | None] = [None] * len(files)
    pending: list[tuple[int, bytes]] = []
    for i, path in enumerate(files):
        try:
            pending.append((i, path.read_bytes()))
        except OSError as exc:
            records[i] = read_error_record(str(path), exc)
    for start in range(0, len(pending), batch_size):
        chunk = pending[start:start + batch_size]
        try:
            prediction = client.predict([data for _, data in chunk], model=meta.name, version=meta.version,
                                        top_k=top_k, timeout=timeout)
            results = [(r.labels, r.error) for r in prediction.results]
        except ServiceError as exc:
            if len(chunk) == 1 and exc.code == grpc.StatusCode.INVALID_ARGUMENT:  # the image itself
                results = [([], ErrorInfo(exc.code.name, exc.message))]
            else:
                raise
        for (i, _), (labels, error) in zip(chunk, results, strict=True):
            path = str(files[i])
            if error is not None:
                records[i] = error_record(path, error.code, error.message)
            else:
                records[i] = ok_record(path, meta.name, meta.version, labels)
    return [r for r in records if r is not None]


def _table(records: list[dict[str, Any]]) -> str:
    width = max(len(r["path"]) for r in records)
    lines = []
    for r in records:
        if "error" in r:
            lines.append(f"{r['path']:<{width}}  error {r['error']['code']}: {r['error']['message']}")
        else:
            labels = "  ".join(f"{lb['name']} {lb['score']:.3f}" for lb in r["labels"])
            lines.append(f"{r['path']:<{width}}  {labels}")
    return "\n".join(lines)


def predict_command(args: argparse.Namespace) -> int:
    from imgcls.service.client import Client

    if args.top_k < 1:
        raise ImgclsError("--top-k must be at least 1")
    if args.batch_size < 1:
        raise ImgclsError("--batch-size must be at least 1")
    with Client(args.target, timeout=args.timeout) as client:
        records = predict_records(client, args.files, model=args.model, version=args.version, top_k=args.top_k,
                                  batch_size=args.batch_size, timeout=args.timeout)
    if args.json:
        for record in records:
            sys.stdout.write(json.dumps(record) + "\n")
    else:
        first = next((r for r in records if "model" in r), None)
        if first:
            print(f"# {first['model']} v{first['version']}")
        print(_table(records))
    sys.stdout.flush()
    return 1 if any("error" in r for r in records) else 0


def batch_command(args: argparse.Namespace) -> int:
    from imgcls.service.batch import BatchConfig, run_command

    fields = BatchConfig.__dataclass_fields__
    config = BatchConfig(**{k: v for k, v in vars(args).items() if k in fields})
    return run_command(config, json_summary=args.json)
