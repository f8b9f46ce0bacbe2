"""`imgcls serve`. Argparse only here; grpc, NumPy and runtimes load inside the command (`imgcls predict`
and `imgcls batch`, the client side, are in client/cli.py).

Every `serve` flag can also come from an environment variable, IMGCLS_ plus the flag name in upper case
with dashes as underscores (`--metrics-port` <- IMGCLS_METRICS_PORT); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from imgcls.cli_format import add_command
from imgcls.cpus import CPUS_PER_WORKER, auto_workers
from imgcls.errors import ImgclsError


def _env_name(flag: str) -> str:
    return "IMGCLS_" + flag.lstrip("-").upper().replace("-", "_")


def _flag(parser: argparse.ArgumentParser, flag: str, help: str, default: Any = None, **kwargs: Any) -> None:
    """An option whose default comes from its environment variable (argparse converts it with `type`)."""
    env = _env_name(flag)
    value = os.environ.get(env, default)
    shown = "" if default in (None, "") else f", default {default}"
    if kwargs.get("type") in (int, float):
        kwargs.setdefault("metavar", "N" if kwargs["type"] is int else "NUMBER")
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
    serve = add_command(
        sub, "serve", help="serve a model repository over gRPC (native, KServe v2, TF Serving) and HTTP",
        description="Serve every model of a repository, with Prometheus metrics, hot reload of new versions and "
                    "dynamic batching. The gRPC --port speaks three protocols at once: imgcls' own "
                    "(imgcls.v1.Inference, what `imgcls predict` and `imgcls batch` use), KServe v2 / Triton "
                    "(inference.GRPCInferenceService) and TF Serving (tensorflow.serving.PredictionService), "
                    "plus the standard gRPC health and reflection services. An empty repository is served "
                    "NOT_SERVING until the first `imgcls export` lands in it."
                    "\n\n"
                    "Every flag can also come from an environment variable, IMGCLS_ plus the flag name in upper "
                    "case with dashes as underscores (--metrics-port <- IMGCLS_METRICS_PORT); a flag on the "
                    "command line wins.",
        examples=["imgcls serve --model-repository runs/repo",
                  "imgcls serve --model-repository runs/repo --port 50051 --runtime onnx --poll-interval 5",
                  "IMGCLS_MODEL_REPOSITORY=/models imgcls serve   # as in the container image"])
    _flag(serve, "--model-repository", "repository folder (NAME/VERSION/manifest.json)", metavar="DIR")
    _flag(serve, "--host", "address to bind, for gRPC and metrics", "0.0.0.0")
    _flag(serve, "--port", "gRPC port (0 = any free port)", 50051, type=int)
    _flag(serve, "--metrics-port", "Prometheus /metrics port (0 = any free port)", 8000, type=int)
    _flag(serve, "--http-port", "HTTP port: KServe v2 and TF Serving REST, POST /predict, the web page at / "
          "(0 = any free port, -1 = no HTTP; docs/http.md)", 8080, type=int)
    _flag(serve, "--runtime", "artifact format for every model, or NAME=FORMAT per model, comma-separated: "
          "onnx, tflite, tflite-fp16, tflite-int8, savedmodel (default: the first full-precision one present of "
          "tflite > onnx > savedmodel)", "", metavar="FORMATS")
    policy_env = os.environ.get("IMGCLS_VERSION_POLICY", os.environ.get("IMGCLS_VERSIONS", "latest"))
    serve.add_argument("--version-policy", "--versions", dest="version_policy", default=policy_env, metavar="POLICY",
                       help="versions of every model to serve: latest, latest:N, all or specific:V1,V2 (env "
                            "IMGCLS_VERSION_POLICY, default latest; --versions/IMGCLS_VERSIONS is the older name)")
    serve.add_argument("--model-version-policy", action="append", metavar="NAME=POLICY",
                       help="per-model policy, overrides --version-policy; repeat the flag, or separate entries "
                            "with ';' (env IMGCLS_MODEL_VERSION_POLICY, used when the flag is not given)")
    _flag(serve, "--poll-interval", "seconds between scans of the repository for new, failed or removed versions "
          "(hot reload); 0 = load once at start", 10.0, type=float, metavar="SECONDS")
    _flag(serve, "--require-models", "true: an empty repository is an error at start, as before; false: stay up, "
          "NOT_SERVING, until the first version appears", "false", type=_bool, metavar="BOOL")
    _flag(serve, "--cpus", "CPUs to size workers and threads from (default: detected, the smaller of the CPU "
          "affinity and the cgroup CPU quota; k8s/ sets it from the pod's CPU limit)", None, type=int)
    _flag(serve, "--workers", "serving processes sharing the ports (docs/scaling.md): a number, or auto = one per "
          f"{CPUS_PER_WORKER} usable CPUs (affinity and cgroup quota), at least 1", "auto", metavar="N|auto")
    _flag(serve, "--inference-threads", "threads per model runtime, per worker (default: usable CPUs / workers)",
          None, type=int)
    _flag(serve, "--instances", "model instances per version, per worker, sharing --inference-threads: runtimes "
          "taking batches from one queue at once (docs/scaling.md); auto = 2 for ONNX and TFLite when there are "
          "2+ inference threads, else 1", "auto", metavar="N|auto")
    _flag(serve, "--decode-workers", "image decode/preprocess processes, per worker (default: usable CPUs / "
          "workers)", None, type=int)
    _flag(serve, "--max-concurrent-calls", "calls in progress (a stream counts once) before RESOURCE_EXHAUSTED; "
          "health checks are never refused", 1024, type=int)
    _flag(serve, "--max-batch-size", "largest batch the dynamic batcher forms", 32, type=int)
    _flag(serve, "--max-queue-delay-ms", "longest an image waits for its batch to fill", 2.0, type=float)
    _flag(serve, "--max-queue-size", "images admitted per model and not yet answered (decoding, queued or "
          "computing) before RESOURCE_EXHAUSTED: the admission limit, see docs/serving-core.md", 64, type=int)
    _flag(serve, "--overload-target-ms", "once a model has refused a request at --max-queue-size, admit only the "
          "images it expects to compute within this many ms, until it has refused nothing for a second or for "
          "1-32 s at most (load shedding, docs/serving-core.md); 0 = off", 60.0, type=float)
    _flag(serve, "--max-images-per-request", "more is INVALID_ARGUMENT", 64, type=int)
    _flag(serve, "--max-message-bytes", "largest gRPC message, either direction", 64 * 1024 * 1024, type=int)
    _flag(serve, "--max-image-bytes", "largest encoded image", 32 * 1024 * 1024, type=int)
    _flag(serve, "--max-image-pixels", "largest decoded image, width x height (decompression bombs)",
          50_000_000, type=int)
    _flag(serve, "--image-formats", "image formats accepted, comma-separated (others are INVALID_ARGUMENT before any "
          "decoder runs; docs/hostile-input.md)", "JPEG,PNG,WEBP,GIF,BMP,TIFF", metavar="FORMATS")
    _flag(serve, "--decode-cpu-seconds", "hard bound on one image's decode; its worker process is killed past it",
          1.0, type=float)
    _flag(serve, "--decode-memory-mb", "estimated decode memory of all images being decoded at once", 768, type=int)
    _flag(serve, "--decode-isolation", "decode in killable worker processes (false: in threads, no hard bound)",
          "true", type=_bool, metavar="BOOL")
    _flag(serve, "--event-loop", "the gRPC and HTTP front-ends' event loop: auto (uvloop where installed), uvloop "
          "or asyncio (docs/serving-core.md)", "auto", choices=("auto", "uvloop", "asyncio"))
    _flag(serve, "--default-top-k", "labels per image when a request does not say", 5, type=int)
    _flag(serve, "--stream-max-inflight", "requests of one stream in progress before reading pauses", 32, type=int)
    _flag(serve, "--stream-idle-timeout", "seconds a stream may stay open with nothing sent and nothing in "
          "progress before the server closes it (UNAVAILABLE)", 300.0, type=float)
    _flag(serve, "--max-connection-age", "seconds before a client connection is asked to reconnect (GOAWAY, "
          "+-10%% jitter) once its calls end, so long-lived clients spread over new pods; 0 = never", 60.0,
          type=float)
    _flag(serve, "--max-connection-age-grace", "seconds calls still open on such a connection get before it is "
          "closed (default: as long as they take, streams included)", None, type=float)
    _flag(serve, "--access-log", "log a line per call (logger imgcls.access; JSON fields with --log-format json)",
          "true", type=_bool, metavar="BOOL")
    _flag(serve, "--access-log-rate", "most access-log lines per second for successful calls, and again for "
          "refusals under load (other failures are always logged; the next line says how many were left out)",
          10.0, type=float)
    _flag(serve, "--keepalive-time", "seconds between the server's pings on an idle connection (finds dead "
          "clients); 0 = never", 60.0, type=float)
    _flag(serve, "--grace-period", "seconds calls in flight get to finish after SIGTERM", 30.0, type=float)
    _flag(serve, "--tls-cert", "PEM certificate (chain) for TLS on the gRPC and HTTP ports; re-read when the file "
          "changes, as cert-manager rotates it (docs/security.md)", metavar="FILE")
    _flag(serve, "--tls-key", "PEM private key of --tls-cert", metavar="FILE")
    _flag(serve, "--tls-client-ca", "PEM CA certificate(s): mutual TLS, a client must present a certificate one of "
          "them signed", metavar="FILE")
    _flag(serve, "--token-file", "bearer tokens, one a line (several: rotation), re-read when it changes; calls "
          "without one are UNAUTHENTICATED / 401, health never needs one. IMGCLS_TOKENS (comma-separated) adds "
          "tokens from the environment", metavar="FILE")
    _flag(serve, "--auth-metrics", "true: /metrics on the HTTP port needs a token too (the metrics port never "
          "does)", "false", type=_bool, metavar="BOOL")
    _flag(serve, "--verify-checksums", "check artifact sha256 against the manifest at load", "true", type=_bool,
          metavar="BOOL")
    serve.set_defaults(func=serve_command)


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


def _env_tokens() -> list[str]:
    from imgcls.service.security import parse_tokens

    return parse_tokens(os.environ.get("IMGCLS_TOKENS", ""), "IMGCLS_TOKENS")


def _count_or_auto(text: str, flag: str) -> int | None:
    """A flag that takes a positive number or `auto` (None)."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        count = int(text)
    except ValueError:
        raise ImgclsError(f"{flag} {text!r}: expected a number or auto") from None
    if count < 1:
        raise ImgclsError(f"{flag} must be at least 1 (or auto)")
    return count


def _workers(text: str, cpus: int) -> int:
    workers = _count_or_auto(text, "--workers")
    return auto_workers(cpus) if workers is None else workers


def serve_config(args: argparse.Namespace) -> tuple[Any, int]:
    """The config each serving process runs with, and how many processes (`--workers`): sized from the CPUs
    this process may use (affinity and cgroup quota, imgcls.cpus) unless the flags say otherwise."""
    from imgcls.cpus import usable_cpus
    from imgcls.service.server import ServeConfig

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
        instances=_count_or_auto(args.instances, "--instances"),
        max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms,
        overload_target_ms=args.overload_target_ms,
        max_queue_size=args.max_queue_size, max_images_per_request=args.max_images_per_request,
        max_message_bytes=args.max_message_bytes, max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels, default_top_k=args.default_top_k,
        image_formats=args.image_formats, decode_cpu_seconds=args.decode_cpu_seconds,
        decode_memory_mb=args.decode_memory_mb, decode_isolation=args.decode_isolation,
        stream_max_inflight=args.stream_max_inflight, stream_idle_timeout=args.stream_idle_timeout,
        grace_period=args.grace_period, max_connection_age=args.max_connection_age,
        max_connection_age_grace=args.max_connection_age_grace, keepalive_time=args.keepalive_time,
        access_log=args.access_log, access_log_rate=args.access_log_rate,
        verify_checksums=args.verify_checksums,
        tls_cert=args.tls_cert or None, tls_key=args.tls_key or None, tls_client_ca=args.tls_client_ca or None,
        token_file=args.token_file or None, auth_metrics=args.auth_metrics,
        tokens=_env_tokens(), event_loop=args.event_loop,
    )
    if args.cpus is not None and args.cpus < 1:
        raise ImgclsError("--cpus must be at least 1")
    cpus = args.cpus or usable_cpus()
    if args.cpus is not None:  # threads follow it too, not only the worker count
        config.inference_threads = config.decode_workers = args.cpus
    if args.inference_threads is not None:
        config.inference_threads = args.inference_threads
    if args.decode_workers is not None:
        config.decode_workers = args.decode_workers
    workers = _workers(args.workers, cpus)
    if workers > 1:
        from imgcls.service.supervisor import plan

        config = plan(config, workers, cpus, explicit_inference=args.inference_threads is not None,
                      explicit_decode=args.decode_workers is not None)
    return config, workers


def serve_command(args: argparse.Namespace) -> int:
    from imgcls.service.server import InferenceServer

    config, workers = serve_config(args)
    if workers == 1:
        return InferenceServer(config).serve_forever()
    from imgcls.service.security import Security
    from imgcls.service.supervisor import Supervisor

    Security.from_config(config)  # a bad certificate or token file: said once here, not by every worker
    level = "DEBUG" if logging.getLogger().isEnabledFor(logging.DEBUG) else "INFO"
    return Supervisor(config, workers, log_level=level).serve_forever()
