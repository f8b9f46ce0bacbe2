"""What the KServe v2 front-end costs next to `imgcls.v1.Inference` on the same server, and what sending
preprocessed pixels instead of encoded images changes.

Starts `imgcls serve` in a subprocess and drives it with N closed-loop clients, one single-image request at
a time each: `Predict` (imgcls client), `ModelInfer` with the encoded image (through tritonclient, and through
a plain grpc stub, which leaves out the client library's own cost), `ModelInfer` with preprocessed float32
pixels (tritonclient, FP32 input `pixels`, computed before the clock starts). The calls take turns in
`--rounds` short slices per concurrency, so load from other processes falls on all of them alike. Prints a
markdown table.

    python benchmarks/bench_kserve.py --model-repository REPO --model flowers --images DIR [--duration 8]
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

import numpy as np

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
    import grpc
    import tritonclient.grpc as triton

    from imgcls.client.client import Client
    from imgcls.service import protocols
    from imgcls.service.kserve_tensors import join_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per call and concurrency")
    parser.add_argument("--rounds", type=int, default=4, help="slices each measurement is split into")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-images", type=int, default=128)
    parser.add_argument("--server-arg", action="append", default=[], help="extra `imgcls serve` flag (repeat)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    [entry] = [e for e in repository.scan(args.model_repository) if e.name == args.model]
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[: args.max_images]
    data = [p.read_bytes() for p in files]
    pixels = [preprocess_bytes(d, entry.manifest.preprocessing)[None] for d in data]
    print(f"# {entry.name} v{entry.version}, {len(data)} images, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)

    server = Server(["--model-repository", str(args.model_repository), *args.server_arg])
    rows = []
    try:
        port, _ = server.wait_ports()
        target = f"127.0.0.1:{port}"
        with Client(target, timeout=30) as imgcls_client:
            imgcls_client.wait_until_serving(120)
            kserve = triton.InferenceServerClient(target)

            def images_input(i: int) -> list:
                tensor = triton.InferInput("images", [1], "BYTES")
                tensor.set_data_from_numpy(np.array([data[i % len(data)]], dtype=np.object_))
                return [tensor]

            def pixels_input(i: int) -> list:
                x = pixels[i % len(pixels)]
                tensor = triton.InferInput("pixels", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                return [tensor]

            channel = grpc.insecure_channel(target)
            request_cls, response_cls = protocols.method_types("inference.GRPCInferenceService", "ModelInfer")
            stub = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                       request_serializer=request_cls.SerializeToString,
                                       response_deserializer=response_cls.FromString)

            def plain(i: int) -> object:
                request = request_cls(model_name=args.model)
                request.inputs.add(name="images", datatype="BYTES", shape=[1, 1])
                request.raw_input_contents.append(join_bytes([data[i % len(data)]]))
                return stub(request, timeout=30)

            calls = {
                "Predict (encoded image)": lambda i: imgcls_client.predict([data[i % len(data)]], model=args.model,
                                                                          top_k=1),
                "ModelInfer (encoded image, tritonclient)": lambda i: kserve.infer(args.model, images_input(i)),
                "ModelInfer (encoded image, grpc stub)": plain,
                "ModelInfer (FP32 pixels, tritonclient)": lambda i: kserve.infer(args.model, pixels_input(i)),
            }
            for call in calls.values():
                for i in range(20):  # warm-up: connections, first batches
                    call(i)
            for n in (int(c) for c in args.concurrency.split(",")):
                totals = {name: [0, 0.0, []] for name in calls}
                for _ in range(args.rounds):
                    for name, call in calls.items():
                        count, seconds, latencies = closed_loop(call, n, args.duration / args.rounds)
                        totals[name][0] += count
                        totals[name][1] += seconds
                        totals[name][2] += latencies
                for name, (count, seconds, latencies) in totals.items():
                    rows.append(row(name, f"{n} client{'s' if n > 1 else ''}", count, seconds, latencies))
                    print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr)
            kserve.close()
            channel.close()
    finally:
        server.stop()
    print(markdown(rows).replace("| stage |", "| call |", 1))
    print(f"\nload average after: {os.getloadavg()[0]:.1f}; runtime {runtimes.default_threads()} threads")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
