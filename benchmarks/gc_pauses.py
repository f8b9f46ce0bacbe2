"""Summarize the garbage collections that benchmarks/gcprobe recorded: one row per process and generation.

    PYTHONPATH=benchmarks/gcprobe GCPROBE_OUT=/tmp/gc/new imgcls serve ...   # then stop it (SIGTERM)
    python benchmarks/gc_pauses.py /tmp/gc/new.* [--json out.json]

Full collections (generation 2) are listed with when they happened (seconds after the process started),
their pause and the objects they walked, so pauses under load can be told from those at start-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def summarize(record: dict) -> list[dict]:
    rows = []
    for generation, pauses in sorted(record["pauses_ms"].items(), key=lambda kv: int(kv[0])):
        if not pauses:
            continue
        ordered = sorted(pauses)
        rows.append({"pid": record["pid"], "generation": int(generation), "collections": len(pauses),
                     "total_ms": round(sum(pauses), 2), "p50_ms": round(statistics.median(pauses), 3),
                     "max_ms": round(ordered[-1], 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="PREFIX.<pid> files written by benchmarks/gcprobe")
    parser.add_argument("--json", type=Path, help="also write the rows and full collections here")
    args = parser.parse_args(argv)
    rows, full = [], []
    print("| process | generation | collections | total ms | p50 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for path in args.files:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"gc_pauses: {path}: {exc}", file=sys.stderr)
            return 2
        for row in summarize(record):
            rows.append({"file": str(path), **row})
            print(f"| {path.name} (frozen {record['frozen']}, tracked {record['tracked']}) | {row['generation']} | "
                  f"{row['collections']} | {row['total_ms']} | {row['p50_ms']} | {row['max_ms']} |")
        for at, ms, objects in record["full"]:
            full.append({"file": str(path), "at_s": at, "pause_ms": ms, "objects_after": objects})
    if full:
        print("\nfull collections: " + "; ".join(f"{f['file'].rsplit('/', 1)[-1]} at {f['at_s']} s: {f['pause_ms']} ms"
                                                  for f in full))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "full": full}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
