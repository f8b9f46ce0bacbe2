"""What the TF Serving front-end costs next to `imgcls.v1.Inference` on the same server, and what sending
preprocessed pixels instead of encoded images changes.

Starts `imgcls serve` in a subprocess and drives it with N closed-loop clients, one single-image request at
a time each: `Predict` (imgcls client), TF Serving `Predict` with the encoded image (DT_STRING input
`images`) and with preprocessed float32 pixels (DT_FLOAT input `input`, signature `preprocessed`), both
through the real `tensorflow-serving-api` stub. Requests are built before the clock starts, so the figures
are the server's and the wire's, not `tf.make_tensor_proto`'s. Prints a markdown table.

    python benchmarks/bench_tfserving.py --model-repository REPO --model flowers --images DIR [--duration 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import Server, markdown, row

from imgcls.preprocessing import IMAGE_EXTENSIONS, preprocess_bytes
from imgcls.service import repository, runtimes


def closed_loop(call: Callable[[int], object], clients: int, duration: float) -> tuple[int, float, list[float]]:
    """`clients` threads calling `call(i)` back to back for `duration` seconds; (calls, seconds, latencies)."""
    stop_at = time.perf_counter() + duration
    latencies: list[list[float]] = [[] for _ in range(clients)]

    def loop(k: int) -> None:
        i = k
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            call(i)
            latencies[k].append(time.perf_counter() - t)
            i += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [x for per in latencies for x in per]
    return len(flat), time.perf_counter() - start, flat


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from imgcls.client.client import Client

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-images", type=int, default=128)
    parser.add_argument("--server-arg", action="append", default=[], help="extra `imgcls serve` flag (repeat)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    [entry] = [e for e in repository.scan(args.model_repository) if e.name == args.model]
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[: args.max_images]
    data = [p.read_bytes() for p in files]

    def request(key: str, tensor, signature: str) -> predict_pb2.PredictRequest:
        r = predict_pb2.PredictRequest()
        r.model_spec.name, r.model_spec.signature_name = args.model, signature
        r.inputs[key].CopyFrom(tensor)
        r.output_filter.append("probabilities")
        return r

    encoded = [request("images", tf.make_tensor_proto([d], dtype=tf.string), "serving_default") for d in data]
    pixels = [request("input", tf.make_tensor_proto(preprocess_bytes(d, entry.manifest.preprocessing)[None]),
                      "preprocessed") for d in data]
    print(f"# {entry.name} v{entry.version}, {len(data)} images, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)

    server = Server(["--model-repository", str(args.model_repository), *args.server_arg])
    rows = []
    try:
        port, _ = server.wait_ports()
        target = f"127.0.0.1:{port}"
        with Client(target, timeout=30) as imgcls_client, grpc.insecure_channel(target) as channel:
            imgcls_client.wait_until_serving(120)
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            calls = {
                "Predict (encoded image)": lambda i: imgcls_client.predict([data[i % len(data)]], model=args.model,
                                                                          top_k=1),
                "TF Serving Predict (encoded image)": lambda i: stub.Predict(encoded[i % len(data)], timeout=30),
                "TF Serving Predict (DT_FLOAT pixels)": lambda i: stub.Predict(pixels[i % len(data)], timeout=30),
            }
            for name, call in calls.items():
                for i in range(20):  # warm-up: connections, first batches
                    call(i)
                for n in (int(c) for c in args.concurrency.split(",")):
                    count, seconds, latencies = closed_loop(call, n, args.duration)
                    rows.append(row(name, f"{n} client{'s' if n > 1 else ''}", count, seconds, latencies))
                    print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr)
    finally:
        server.stop()
    print(markdown(rows).replace("| stage |", "| call |", 1))
    print(f"\nload average after: {os.getloadavg()[0]:.1f}; runtime {runtimes.default_threads()} threads")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
