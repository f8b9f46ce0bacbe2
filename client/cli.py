"""`imgcls predict` and `imgcls batch`. Argparse only at import; grpc loads inside the commands.

`--target` defaults to IMGCLS_TARGET when set, so a shell (or a Kubernetes Job) names its server once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from imgcls.cli_format import add_command
from imgcls.errors import ImgclsError

DEFAULT_TARGET = "localhost:50051"


def _target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=os.environ.get("IMGCLS_TARGET", DEFAULT_TARGET), metavar="HOST:PORT",
                        help=f"server address (env IMGCLS_TARGET, default {DEFAULT_TARGET})")


def _security(parser: argparse.ArgumentParser) -> None:
    """TLS and token flags (docs/security.md). The client's own certificate has no environment variable:
    IMGCLS_TLS_CERT/KEY are the server's, and a client in the server's container must not pick them up."""
    group = parser.add_argument_group("TLS and authentication")
    group.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs (implied by the flags "
                       "below)")
    group.add_argument("--tls-ca", metavar="FILE",
                       help="PEM CA certificate(s) that signed the server's certificate (env IMGCLS_TLS_CA)")
    group.add_argument("--tls-cert", metavar="FILE", help="this client's PEM certificate, for mutual TLS")
    group.add_argument("--tls-key", metavar="FILE", help="this client's PEM private key, for mutual TLS")
    group.add_argument("--tls-server-name", metavar="NAME",
                       help="the name the server's certificate must carry, when not the --target host")
    group.add_argument("--token", metavar="TOKEN",
                       help="bearer token sent with every call (env IMGCLS_TOKEN; visible to `ps` on the command "
                            "line: prefer the env or --token-file)")
    group.add_argument("--token-file", type=Path, metavar="FILE", help="read the bearer token from FILE (its "
                       "first line)")


def _token(args: argparse.Namespace) -> str | None:
    """--token, --token-file or IMGCLS_TOKEN (read here, not as the flag's default: help prints defaults)."""
    if args.token:
        return args.token
    if getattr(args, "token_file", None) is None:
        return os.environ.get("IMGCLS_TOKEN") or None
    try:
        lines = [line.strip() for line in args.token_file.read_text("utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ImgclsError(f"--token-file {args.token_file}: cannot read it ({exc})") from None
    token = next((line for line in lines if line and not line.startswith("#")), None)
    if token is None:
        raise ImgclsError(f"--token-file {args.token_file}: no token in it")
    return token


def _security_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"tls": args.tls, "tls_ca": args.tls_ca or os.environ.get("IMGCLS_TLS_CA") or None,
            "tls_cert": args.tls_cert, "tls_key": args.tls_key,
            "tls_server_name": args.tls_server_name, "token": _token(args)}


def register(sub: argparse._SubParsersAction) -> None:
    predict = add_command(
        sub, "predict", help="classify image files with a running server",
        description="Send image files to a running `imgcls serve` and print each file's top-k labels (a table, "
                    "or with --json one record per line, the records `imgcls batch` writes). Exit codes: 0 every "
                    "file answered; 1 some files failed (their error rows are printed); 2 usage error or a "
                    "request the server refuses (unknown model, ...); 3 server unavailable (not reachable within "
                    "--timeout).",
        examples=["imgcls predict photo.jpg other.png",
                  "imgcls predict --target 10.0.0.5:50051 --model flowers --top-k 3 photos/*.jpg",
                  "imgcls predict --json photo.jpg | jq .labels[0].name"])
    predict.add_argument("files", nargs="+", metavar="FILE", type=Path, help="image files to classify")
    _target(predict)
    predict.add_argument("--model", default="", help="model name (default: the server's only model)")
    predict.add_argument("--version", type=int, default=0, help="model version (default: the latest)")
    predict.add_argument("--top-k", type=int, default=5, help="labels per image")
    predict.add_argument("--json", action="store_true", help="JSON Lines, one record per file, in argument order")
    predict.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                         help="seconds per request, retries of an unavailable server included")
    predict.add_argument("--batch-size", type=int, default=16, help="images per request")
    _security(predict)
    predict.set_defaults(func=predict_command)

    batch = add_command(
        sub, "batch", help="classify a folder, glob or list of files through a running server (resumable)",
        description="Classify many files through a running `imgcls serve`: results are appended to --output as "
                    "they arrive, and re-running the same command resumes where it stopped (files with an error "
                    "row included: --retry-errors sends those again). A request that fails or times out while "
                    "the server is healthy is split and its files are sent one by one, so one bad or slow file "
                    "costs only its own error row. While it retries, it says on stderr what it is waiting for."
                    "\n\n"
                    "Exit codes: 0 all files answered; 1 some files failed (error rows; --allow-failures makes "
                    "it 0); 2 usage error or a job the server refuses (unknown model, ...); 3 server unavailable "
                    "(not reachable at the start, or it failed its health check after the retries; re-run to "
                    "resume); 130 interrupted.",
        examples=["imgcls batch --input photos/ --output results.jsonl",
                  "imgcls batch --input 'photos/**/*.jpg' --output results.csv --top-k 1",
                  "imgcls batch --input photos/ --output results.jsonl --labels-from-folders   # accuracy",
                  "imgcls batch --input photos/ --output results.jsonl --retry-errors          # resume"])
    _target(batch)
    batch.add_argument("--input", required=True, metavar="PATH",
                       help="a folder (searched recursively for images), a quoted glob ('photos/**/*.jpg') or a "
                            "text file with one path per line (relative to the file's folder)")
    batch.add_argument("--output", required=True, type=Path, metavar="FILE",
                       help="results file, .jsonl (the `imgcls predict --json` records) or .csv; appended to")
    batch.add_argument("--format", dest="output_format", choices=["jsonl", "csv"], default=None,
                       help="output format (default: from the --output extension)")
    batch.add_argument("--model", default="", help="model name (default: the server's only model)")
    batch.add_argument("--version", type=int, default=0, help="model version (default: the latest)")
    batch.add_argument("--top-k", type=int, default=5, help="labels per file")
    batch.add_argument("--batch-size", type=int, default=16, help="images per request")
    batch.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    batch.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="seconds per request attempt (default: %(default)s); a file alone that takes longer "
                            "while the server is healthy gets a DEADLINE_EXCEEDED error row")
    batch.add_argument("--retries", type=int, default=8,
                       help="retries of a request answered UNAVAILABLE, CANCELLED by a server shutting down, or "
                            "RESOURCE_EXHAUSTED (default: %(default)s); then it is split per file, or, if the "
                            "server fails its health check too, the job stops with exit code 3")
    batch.add_argument("--backoff", type=float, default=0.2, metavar="SECONDS",
                       help="first retry delay, doubled per retry")
    batch.add_argument("--max-backoff", type=float, default=10.0, metavar="SECONDS", help="cap on the retry delay")
    batch.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024, metavar="BYTES",
                       help="split requests larger than this (default: %(default)s, 16 MiB)")
    batch.add_argument("--retry-errors", "--retry-failed", dest="retry_errors", action="store_true",
                       help="remove the error rows of earlier runs from --output and send those files again "
                            "(without it, files with an error row are skipped like answered ones)")
    batch.add_argument("--allow-failures", action="store_true", help="exit 0 even when some files failed")
    batch.add_argument("--labels-from-folders", action="store_true",
                       help="the first folder below --input is each file's class: report accuracy per class")
    batch.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar on stderr (default: a bar when stderr is a terminal, else a line every "
                            "10 s)")
    batch.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    _security(batch)
    batch.set_defaults(func=batch_command)


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
    from imgcls.client.client import Client
    from imgcls.client.predict import predict_records

    if args.top_k < 1:
        raise ImgclsError("--top-k must be at least 1")
    if args.batch_size < 1:
        raise ImgclsError("--batch-size must be at least 1")
    with Client(args.target, timeout=args.timeout, on_retry=_say_retry("predict", args.target),
                **_security_kwargs(args)) as client:
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


def _say_retry(command: str, target: str) -> Any:
    """A retry callback that says on stderr what the command waits for, at most once a second."""
    import time

    last = [-1e9]

    def on_retry(error: Any, attempt: int, delay: float) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0:
            last[0] = now
            from imgcls.client.predict import short_reason

            print(f"imgcls {command}: waiting for {target} ({error.code.name}: {short_reason(error)}); retry "
                  f"{attempt + 1} in {delay:.1f} s", file=sys.stderr, flush=True)

    return on_retry


def batch_command(args: argparse.Namespace) -> int:
    from imgcls.client.batch import BatchConfig, run_command

    fields = BatchConfig.__dataclass_fields__
    values = {**vars(args), **_security_kwargs(args)}
    config = BatchConfig(**{k: v for k, v in values.items() if k in fields})
    return run_command(config, json_summary=args.json)
