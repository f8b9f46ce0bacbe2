"""What one access-log line costs the server, written or left out by the rate limit (issue 14).

Calls `AccessLog.write` the way the request path does (fields built only for a line that is written) N times
per kind of call, through a real `logging` handler writing to a file, text or JSON (`imgcls --log-format`),
and reports the process CPU per call. Refusals under load are rate-limited (`--access-log-rate`, 10/s);
other failures are always written, so they show what a written line costs.

    python benchmarks/bench_access_log.py --lines 20000
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

from imgcls.logs import JsonFormatter
from imgcls.service import observability

KINDS = {"refusal (rate-limited)": "RESOURCE_EXHAUSTED", "success (rate-limited)": "OK",
         "failure (always written)": "INVALID_ARGUMENT"}


def measure(fmt: str, lines: int, rate: float, path: Path) -> list[dict]:
    handler = logging.FileHandler(path, mode="w")
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker="1"))
    logger = logging.getLogger("imgcls.access")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    rows = []
    try:
        for kind, code in KINDS.items():
            access = observability.AccessLog(rate)

            def fields(code: str = code) -> dict:
                return {"method": "Predict", "model": "flowers", "version": "1", "images": 1, "code": code,
                        "ms": 0.4, "batch": None, "peer": "ipv4:127.0.0.1:50422", "trace_id": ""}

            before = sum(1 for _ in path.open()) if path.exists() else 0
            began = time.process_time()
            for _ in range(lines):
                access.write(fields, code=code)
            cpu = time.process_time() - began
            handler.flush()
            written = sum(1 for _ in path.open()) - before
            rows.append({"format": fmt, "kind": kind, "code": code, "calls": lines, "lines_written": written,
                         "us_cpu_per_call": cpu / lines * 1e6})
    finally:
        logger.handlers, logger.level, logger.propagate = saved
        handler.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20000, help="calls per kind and format")
    parser.add_argument("--rate", type=float, default=10.0, help="--access-log-rate (default 10)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("text", "json"):
            rows += measure(fmt, args.lines, args.rate, Path(tmp) / f"access-{fmt}.log")
    print("| format | call | lines written of calls | CPU per call |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['format']} | {r['kind']} | {r['lines_written']} of {r['calls']} | {r['us_cpu_per_call']:.1f} us |")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
                                         "command": " ".join(sys.argv), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
