"""In-process classification (`imgcls.Classifier`) with each runtime of one repository version.

    python benchmarks/bench_classifier.py --model runs/repo/flowers/1 --images ~/.keras/datasets/flower_photos

Why: `Classifier.load` picks the artifact `imgcls serve` would run (TFLite, then ONNX, then SavedModel:
`imgcls.runtimes.DEFAULT_ORDER`) and claims it is the fastest available in process too, where the
preprocessing (decode + resize on the calling thread) is part of every call. This measures, per runtime:
load time, images/s of `predict` on encoded files in batches of 32 (decode included), the p50 latency of
one image, and the top-1 agreement with the SavedModel. The runtimes take turns within each repeat, so a
shared machine's load shifts them alike: compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from imgcls.classifier import Classifier, installed_formats
from imgcls.manifest import read_manifest
from imgcls.preprocessing import IMAGE_EXTENSIONS


def images(folder: Path, count: int) -> list[bytes]:
    """`count` files, spread over the class folders (round robin, sorted), as encoded bytes."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    lists = [sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) for c in classes]
    picked: list[Path] = []
    for i in range(count):
        files = lists[i % len(lists)]
        picked.append(files[(i // len(lists)) % len(files)])
    return [p.read_bytes() for p in picked]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a repository version (REPO/NAME/VERSION)")
    parser.add_argument("--images", type=Path, required=True, help="a folder of class subfolders of photos")
    parser.add_argument("--count", type=int, default=96, help="images per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per runtime (median reported)")
    parser.add_argument("--single", type=int, default=20, help="one-image calls for the latency figure")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args(argv)

    manifest = read_manifest(args.model)
    formats = [a.format for a in manifest.artifacts if a.format in installed_formats()
               and a.format in ("tflite", "onnx", "savedmodel")]
    data = images(args.images, args.count)
    default = Classifier.load(args.model).format
    classifiers, load_s = {}, {}
    for fmt in formats:
        started = time.perf_counter()
        classifiers[fmt] = Classifier.load(args.model, runtime=fmt)
        load_s[fmt] = time.perf_counter() - started
        classifiers[fmt].predict(data[:32])  # warm-up (interpreters, graph tracing)
    rates: dict[str, list[float]] = {f: [] for f in formats}
    for _ in range(args.repeats):
        for fmt in formats:  # interleaved: the machine's load shifts every runtime alike
            started = time.perf_counter()
            classifiers[fmt].predict(data, batch_size=32)
            rates[fmt].append(len(data) / (time.perf_counter() - started))
    single: dict[str, float] = {}
    for fmt in formats:
        times = []
        for one in data[:args.single]:
            started = time.perf_counter()
            classifiers[fmt].predict(one, top_k=1)
            times.append(time.perf_counter() - started)
        single[fmt] = statistics.median(times) * 1000
    reference = "savedmodel" if "savedmodel" in classifiers else formats[0]
    top1 = {f: [labels[0].index for labels in classifiers[f].predict(data)] for f in formats}
    rows = {f: {"load_s": round(load_s[f], 2), "images_per_s": round(statistics.median(rates[f]), 1),
                "all_passes": [round(r, 1) for r in rates[f]], "one_image_p50_ms": round(single[f], 1),
                "top1_agreement": sum(a == b for a, b in zip(top1[f], top1[reference], strict=True)) / len(data)}
            for f in formats}
    result = {"model": str(args.model), "images": len(data), "default": default, "reference": reference,
              "runtimes": rows}
    if args.json:
        print(json.dumps(result))
        return 0
    best = max(rows, key=lambda f: rows[f]["images_per_s"])
    print(f"{args.model}: {len(data)} images, batches of 32, decode included; Classifier.load picks {default}")
    agree = "top-1 = " + reference
    print(f"{'runtime':<11} {'load s':>7} {'img/s':>7} {'x best':>7} {'1 image p50 ms':>15} {agree:>20}")
    for fmt, row in rows.items():
        print(f"{fmt:<11} {row['load_s']:>7.2f} {row['images_per_s']:>7.1f} "
              f"{row['images_per_s'] / rows[best]['images_per_s']:>7.2f} {row['one_image_p50_ms']:>15.1f} "
              f"{row['top1_agreement']:>20.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
