"""Decode isolation, measured: DecodePool vs in-process decoding, respawn and abort latency, former cost bombs.

    .venv/bin/python benchmarks/bench_decode.py --images ~/.keras/datasets/flower_photos [--before] [--json F]

Prints a Markdown report (the figures in docs/hostile-input.md come from it):
- throughput decoding the photos to 224x224 with DecodePool(2) (shm and pipe transports) vs two threads
  calling `preprocess_bytes` in process, alternated in rounds so load drift hits both alike;
- per-image overhead (one thread, sequential), and the header cost check alone;
- worker start (respawn) time, forkserver and spawn;
- the time from a deadline or a cancel to DecodeAborted and the slot being free again;
- each former cost bomb now (refused in the caller: CPU and peak RSS of a fresh process), and with the
  limits raised so it reaches a worker: wall time to the kill, the worker's CPU time and peak RSS;
- `--before`: the same bombs through plain Pillow (Image.open + load), as before the fix;
- `--fuzz SECONDS`: mutated files of every accepted format decoded in process: only ImageDecodeError may
  come out, and the worst CPU time of one case is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from imgcls.decoding import DecodeLimits, DecodePool, _Worker, check_cost  # noqa: E402
from imgcls.errors import DecodeAborted  # noqa: E402
from imgcls.preprocessing import IMAGE_EXTENSIONS, PreprocessingSpec, preprocess_bytes  # noqa: E402

SPEC = PreprocessingSpec(input_size=(224, 224))
CLK = os.sysconf("SC_CLK_TCK")


def bombs() -> dict[str, bytes]:
    from test_decoding import many_scan_jpeg, png16_bomb, rle_bmp, tall_png

    return {
        "RLE8 BMP 49000000x1 (1 KB)": rle_bmp(),
        "progressive JPEG, 5000 scans, 4096x4096": many_scan_jpeg(5000, (4096, 4096)),
        "16-bit RGB PNG 7071x7071": png16_bomb(),
        "PNG 1x50000000": tall_png(),
    }


def load_photos(folder: Path, limit: int) -> list[bytes]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    step = max(1, len(paths) // limit)
    return [p.read_bytes() for p in paths[::step][:limit]]


def throughput(decode, photos: list[bytes], threads: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        for _ in ex.map(decode, photos):
            pass
    return len(photos) / (time.perf_counter() - start)


def sequential_ms(decode, photos: list[bytes]) -> float:
    start = time.perf_counter()
    for data in photos:
        decode(data)
    return (time.perf_counter() - start) / len(photos) * 1e3


def workers_cpu(pool: DecodePool | None) -> float:
    """CPU seconds used so far by a pool's worker processes (0 for the in-process runner)."""
    if pool is None:
        return 0.0
    workers = list(pool._idle) + ([pool._spare] if pool._spare else [])
    return sum((_proc_cpu_and_hwm(w.process.pid) or (0.0, 0))[0] for w in workers)


def bench_throughput(photos: list[bytes], rounds: int, chunk: int = 100) -> dict:
    """Rounds of `chunk` photos per runner, interleaved, so the shared machine's load drift hits all alike."""

    def in_process(d: bytes):
        return preprocess_bytes(d, SPEC)

    names = ("in_process", "pool_shm", "pool_pipe")
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    done = dict.fromkeys(names, 0)
    per_round: dict[str, list[float]] = {k: [] for k in names}
    seq: dict[str, list[float]] = {k: [] for k in names}
    with DecodePool(2, transport="shm") as shm, DecodePool(2, transport="pipe") as pipe:
        runners = {"in_process": (in_process, None), "pool_shm": (lambda d: shm.decode(d, SPEC), shm),
                   "pool_pipe": (lambda d: pipe.decode(d, SPEC), pipe)}
        for run, _ in runners.values():  # warm up (page cache, first-call imports)
            throughput(run, photos[:20], 2)
        for r in range(rounds):
            for start in range(0, len(photos), chunk):
                part = photos[start:start + chunk]
                order = list(runners.items())
                if (r + start // chunk) % 2:
                    order.reverse()
                for name, (run, pool) in order:
                    c0, w0, t0 = time.process_time(), workers_cpu(pool), time.perf_counter()
                    throughput(run, part, 2)
                    wall[name] += time.perf_counter() - t0
                    cpu[name] += time.process_time() - c0 + workers_cpu(pool) - w0
                    done[name] += len(part)
            for name, (run, _) in runners.items():
                per_round[name].append(done[name] / wall[name])
                seq[name].append(sequential_ms(run, photos[:50]))
    check = []
    for d in photos:
        t = time.perf_counter()
        check_cost(d, DecodeLimits(), SPEC.input_size)
        check.append(time.perf_counter() - t)
    return {
        "images": len(photos), "rounds": rounds,
        "img_per_s_2_threads": {k: round(done[k] / wall[k], 1) for k in names},
        "cpu_ms_per_image_parent_plus_workers": {k: round(cpu[k] / done[k] * 1e3, 2) for k in names},
        "ms_per_image_sequential_median_of_rounds": {k: round(statistics.median(v), 2) for k, v in seq.items()},
        "cost_check_ms_mean": round(statistics.mean(check) * 1e3, 3),
        "cost_check_ms_max": round(max(check) * 1e3, 3),
    }


def bench_respawn(reps: int) -> dict:
    import multiprocessing

    result = {}
    for method in ("forkserver", "spawn"):
        ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(["imgcls.preprocessing", "imgcls.decoding"])
            w = _Worker(ctx, DecodeLimits(), False, True)  # start the fork server itself first
            w.wait_ready(60)
            w.kill()
            w.reap()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            w = _Worker(ctx, DecodeLimits(), False, True)
            assert w.wait_ready(60)
            times.append(time.perf_counter() - t)
            w.kill()
            w.reap()
        result[method] = {"median_ms": round(statistics.median(times) * 1e3, 1),
                          "max_ms": round(max(times) * 1e3, 1)}
    return result


def bench_abort(reps: int) -> dict:
    late_deadline, late_cancel, refill = [], [], []
    with DecodePool(2, _test_hooks=True) as pool:
        for i in range(2 * reps):
            while not pool.stats()["spare"]:
                time.sleep(0.005)
            start = time.monotonic()
            if i % 2 == 0:
                deadline = start + 0.1
                try:
                    pool.decode(b"IMGCLS-TEST-SLEEP:30", SPEC, deadline=deadline)
                except DecodeAborted:
                    late_deadline.append(time.monotonic() - deadline)
            else:
                flag = threading.Event()
                threading.Timer(0.1, flag.set).start()
                try:
                    pool.decode(b"IMGCLS-TEST-SLEEP:30", SPEC, cancelled=flag.is_set)
                except DecodeAborted:
                    late_cancel.append(time.monotonic() - start - 0.1)
            assert pool.stats()["live"] == 2  # the slot is free the moment decode() raises
            t = time.monotonic()
            while not pool.stats()["spare"]:
                time.sleep(0.002)
            refill.append(time.monotonic() - t)

    def summary(xs: list[float]) -> dict:
        return {"median_ms": round(statistics.median(xs) * 1e3, 1), "max_ms": round(max(xs) * 1e3, 1)}

    return {"deadline_to_abort": summary(late_deadline), "cancel_to_abort": summary(late_cancel),
            "new_spare_ready_after_abort": summary(refill)}


_CHILD = r"""
import resource, sys, time
import io
from PIL import Image
from imgcls.preprocessing import PreprocessingSpec, preprocess_bytes
data = open(sys.argv[1], "rb").read()
mode = sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.process_time()
err = ""
try:
    if mode == "before":  # the decode step as it was: any format, no cost check (the resize is left out:
        Image.MAX_IMAGE_PIXELS = None  # for the 1x50M PNG it would try to allocate 45 GB)
        im = Image.open(io.BytesIO(data)); im.draft("RGB", (224, 224)); im.load()
    else:
        preprocess_bytes(data, PreprocessingSpec(input_size=(224, 224)))
except Exception as exc:
    err = f"{type(exc).__name__}: {exc}"
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(time.process_time() - t, peak, peak - base, err[:160], sep="\t")
"""


def run_child(path: Path, mode: str, timeout: float) -> dict:
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), mode], capture_output=True, text=True,
                             timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"cpu_s": None, "peak_rss_mib": None, "result": f"still running after {timeout:g} s (killed)"}
    if out.returncode:
        return {"cpu_s": None, "peak_rss_mib": None, "result": f"exit {out.returncode}: {out.stderr[-200:]}"}
    cpu, rss, growth, err = out.stdout.strip("\n").split("\t")
    return {"cpu_s": round(float(cpu), 3), "peak_rss_mib": round(float(rss)),
            "rss_growth_mib": round(float(growth)), "result": err or "decoded"}


def _proc_cpu_and_hwm(pid: int) -> tuple[float, int] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        hwm = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmHWM"))
    except (OSError, StopIteration, IndexError):
        return None
    return (int(stat[11]) + int(stat[12])) / CLK, hwm * 1024


def bench_bombs(before: bool, tmp: Path) -> dict:
    result = {}
    # Every estimate-based check off; the hard bounds (1 CPU-second, 512 MiB) as shipped.
    raised = DecodeLimits(max_jpeg_scans=10**6, cost_budget_seconds=1e9, memory_budget_bytes=1 << 40,
                          max_pixels=10**9)
    for name, data in bombs().items():
        path = tmp / f"bomb-{abs(hash(name))}"
        path.write_bytes(data)
        row: dict = {"bytes": len(data), "now_in_process": run_child(path, "now", 120)}
        if before:
            row["before_plain_pillow"] = run_child(path, "before", 120)
        # Through a worker with every estimate-based check disabled: only the hard bounds stop it.
        if "BMP" in name:  # the RLE rule is a format rule, not an estimate: nothing to raise, so it never runs
            row["pool_hard_bound"] = "refused by the format rule before dispatch"
        else:
            with DecodePool(1, raised) as pool:
                pids = {w.process.pid for w in pool._idle}
                seen: dict[int, tuple[float, int]] = {}
                stop = threading.Event()

                def watch(pids=pids, seen=seen, stop=stop) -> None:
                    while not stop.is_set():
                        for pid in pids:
                            got = _proc_cpu_and_hwm(pid)
                            if got:
                                seen[pid] = got
                        time.sleep(0.005)

                watcher = threading.Thread(target=watch)
                watcher.start()
                start = time.monotonic()
                try:
                    pool.decode(data, SPEC)
                    outcome = "decoded"
                except Exception as exc:  # report whatever happened
                    outcome = f"{type(exc).__name__}({getattr(exc, 'reason', '')}): {exc}"
                wall = time.monotonic() - start
                stop.set()
                watcher.join()
            cpu, hwm = max(seen.values()) if seen else (None, None)
            row["pool_hard_bound"] = {"wall_s": round(wall, 3), "worker_cpu_s_last_seen": cpu,
                                      "worker_peak_rss_mib": round(hwm / 2**20) if hwm else None,
                                      "result": outcome[:200]}
        result[name] = row
        path.unlink()
    return result


def bench_fuzz(seconds: float, seed: int = 7) -> dict:
    """Mutate small files of every accepted format (byte sets, fake markers, truncations, insertions) and
    decode them in process: only ImageDecodeError may come out; report the worst CPU time of one case."""
    import io

    import numpy as np
    from PIL import Image
    from test_decoding import many_scan_jpeg

    from imgcls.errors import ImageDecodeError

    spec = PreprocessingSpec(input_size=(32, 32))
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8))

    def enc(fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    seeds = [enc(f) for f in ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")] + [
        enc("JPEG", progressive=True), enc("TIFF", compression="tiff_lzw"), enc("WEBP", lossless=True),
        many_scan_jpeg(50, (64, 64))]
    worst, cases, other = 0.0, 0, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        data = bytearray(seeds[rng.integers(len(seeds))])
        for _ in range(rng.integers(1, 10)):
            op, pos = rng.integers(4), rng.integers(0, len(data))
            if op == 0:
                data[pos] = rng.integers(256)
            elif op == 1:
                data[pos:pos + 2] = bytes([0xFF, rng.integers(256)])
            elif op == 2:
                data = data[:pos]
            else:
                data[pos:pos] = bytes(rng.integers(0, 256, rng.integers(1, 8), dtype=np.uint8))
            if not data:
                break
        t = time.process_time()
        try:
            preprocess_bytes(bytes(data), spec)
        except ImageDecodeError:
            pass
        except Exception as exc:  # what this run is looking for
            other.append(f"{type(exc).__name__}: {str(exc)[:100]}")
        worst = max(worst, time.process_time() - t)
        cases += 1
    return {"seconds": seconds, "cases": cases, "worst_cpu_s": round(worst, 3), "other_exceptions": len(other),
            "examples": other[:5]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=Path.home() / ".keras/datasets/flower_photos")
    parser.add_argument("--limit", type=int, default=400, help="photos to use")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", action="store_true", help="also run the bombs through plain Pillow")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "respawn", "abort", "bombs"])
    parser.add_argument("--fuzz", type=float, default=0, metavar="SECONDS",
                        help="also mutate-and-decode for this long (in process)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report: dict = {"machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
                                "python": sys.version.split()[0]}}
    from PIL import __version__ as pil_version

    report["machine"]["pillow"] = pil_version
    if "throughput" not in args.skip:
        photos = load_photos(args.images, args.limit)
        report["throughput"] = bench_throughput(photos, args.rounds)
        print(json.dumps({"throughput": report["throughput"]}, indent=1), flush=True)
    if "respawn" not in args.skip:
        report["respawn"] = bench_respawn(7)
        print(json.dumps({"respawn": report["respawn"]}, indent=1), flush=True)
    if "abort" not in args.skip:
        report["abort"] = bench_abort(10)
        print(json.dumps({"abort": report["abort"]}, indent=1), flush=True)
    if "bombs" not in args.skip:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            report["bombs"] = bench_bombs(args.before, Path(tmp))
        print(json.dumps({"bombs": report["bombs"]}, indent=1), flush=True)
    if args.fuzz:
        import warnings

        warnings.simplefilter("ignore")  # Pillow warns on every truncated TIFF
        report["fuzz"] = bench_fuzz(args.fuzz)
        print(json.dumps({"fuzz": report["fuzz"]}, indent=1), flush=True)
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
