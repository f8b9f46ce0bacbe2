"""What TLS, mutual TLS and bearer tokens cost per call and per new connection (docs/security.md).

Four `imgcls serve` processes on one model repository, started together: plaintext, TLS, TLS + token, mutual
TLS + token (certificates made here by tests/tls_certs.py, so `cryptography` from the dev extra is needed).
Then, in rounds, each server in turn (so a change in the machine's load hits every row alike):

- warm: sequential single-image Predicts over one open channel (the steady-state cost: encryption and the
  token check per call);
- new connection: a fresh channel each time (a local subchannel pool, so nothing is shared), then one
  health check: the TCP connect, the TLS handshake (with a client certificate for mTLS) and one call.

    nice -n 10 python benchmarks/bench_security.py --model-repository runs/repo --model flowers \\
        --images ~/.keras/datasets/flower_photos
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

import bench_peers  # noqa: E402  (image loading)
import bench_service  # noqa: E402  (imgcls serve in a subprocess)
from tls_certs import write_set  # noqa: E402

TOKEN = "bench-token-0123456789abcdef0123456789"


def modes(tls: Path) -> dict[str, tuple[list[str], dict]]:
    """Name -> (serve flags, client keyword arguments)."""
    cert = ["--tls-cert", str(tls / "server.crt"), "--tls-key", str(tls / "server.key")]
    token = ["--token-file", str(tls / "tokens")]
    return {
        "plaintext": ([], {}),
        "TLS": (cert, {"tls_ca": tls / "ca.crt"}),
        "TLS + token": (cert + token, {"tls_ca": tls / "ca.crt", "token": TOKEN}),
        "mTLS + token": (cert + token + ["--tls-client-ca", str(tls / "ca.crt")],
                         {"tls_ca": tls / "ca.crt", "token": TOKEN, "tls_cert": tls / "client.crt",
                          "tls_key": tls / "client.key"}),
    }


def fresh_channel(target: str, kwargs: dict) -> grpc.Channel:
    from imgcls.client.client import Security

    options = [("grpc.use_local_subchannel_pool", 1)]
    credentials = Security(**kwargs).credentials()
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def warm(target: str, kwargs: dict, model: str, images: list[bytes], n: int, offset: int) -> list[float]:
    from imgcls.client.client import Client

    out = []
    with Client(target, timeout=30, retries=0, **kwargs) as client:
        client.predict([images[0]], model=model, top_k=1)  # connected
        for i in range(n):
            t = time.perf_counter()
            client.predict([images[(offset + i) % len(images)]], model=model, top_k=1)
            out.append(time.perf_counter() - t)
    return out


def connect(target: str, kwargs: dict, n: int) -> list[float]:
    from imgcls.client.client import Client

    out = []
    for _ in range(n):
        t = time.perf_counter()
        with Client(target, timeout=30, retries=0, channel=fresh_channel(target, kwargs)) as client:
            client.health()
        out.append(time.perf_counter() - t)
    return out


def ms(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100)[round(q * 100) - 1] * 1000, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", default="flowers")
    parser.add_argument("--images", type=Path, required=True, help="folder of photos (searched recursively)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=60, help="warm Predicts per server per round")
    parser.add_argument("--connections", type=int, default=10, help="new connections per server per round")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    images = bench_peers.load_images(args.images, 64)
    with tempfile.TemporaryDirectory(prefix="imgcls-bench-tls-") as folder:
        tls = Path(folder)
        write_set(tls)
        (tls / "tokens").write_text(TOKEN + "\n")
        servers, targets = {}, {}
        try:
            for name, (flags, _) in modes(tls).items():
                servers[name] = bench_service.Server(["--model-repository", str(args.model_repository),
                                                      "--workers", "1", "--http-port", "-1", *flags])
            for name, server in servers.items():
                targets[name] = f"127.0.0.1:{server.wait_ports()[0]}"
            clients = {name: kwargs for name, (_, kwargs) in modes(tls).items()}
            for name in servers:  # ready: models loaded and warmed up
                deadline = time.monotonic() + 120
                while True:
                    try:
                        warm(targets[name], clients[name], args.model, images, 1, 0)
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
            calls = {name: [] for name in servers}
            handshakes = {name: [] for name in servers}
            for r in range(args.rounds):
                for name in servers:
                    calls[name] += warm(targets[name], clients[name], args.model, images, args.calls,
                                        r * args.calls)
                    handshakes[name] += connect(targets[name], clients[name], args.connections)
        finally:
            for server in servers.values():
                server.stop()

    rows = []
    base_call, base_connect = statistics.median(calls["plaintext"]), statistics.median(handshakes["plaintext"])
    for name in calls:
        rows.append({"mode": name, "predict_p50_ms": ms(calls[name], 0.5), "predict_p99_ms": ms(calls[name], 0.99),
                     "predict_vs_plaintext": round(statistics.median(calls[name]) / base_call, 3),
                     "new_connection_p50_ms": ms(handshakes[name], 0.5),
                     "new_connection_vs_plaintext": round(statistics.median(handshakes[name]) / base_connect, 2),
                     "calls": len(calls[name]), "connections": len(handshakes[name])})
    print("| mode | warm Predict p50 ms | p99 ms | p50 vs plaintext | new connection + health p50 ms "
          "| vs plaintext |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['predict_p50_ms']} | {row['predict_p99_ms']} | "
              f"{row['predict_vs_plaintext']}x | {row['new_connection_p50_ms']} | "
              f"{row['new_connection_vs_plaintext']}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
