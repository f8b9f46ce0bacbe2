"""Records every garbage collection of the Python process it is loaded into (benchmarks/gc_pauses.py).

Put this folder on PYTHONPATH and set GCPROBE_OUT=PREFIX: each Python process started with them (the server,
its fork server and decode workers) writes PREFIX.<pid> (JSON) at exit: per generation, each collection's
duration in ms; for full collections (generation 2) also the seconds since start and the objects left in
generation 2. Timing uses `gc.callbacks`, which run around each collection with the GIL held.
"""

import atexit
import gc
import json
import os
import threading
import time

_START = time.monotonic()
_began: dict[int, float] = {}
_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
_full: list[tuple[float, float, int]] = []


def _callback(phase: str, info: dict) -> None:
    now = time.perf_counter()
    if phase == "start":
        _began[threading.get_ident()] = now
        return
    began = _began.pop(threading.get_ident(), None)
    if began is None:
        return
    generation = info["generation"]
    _pauses[generation].append((now - began) * 1e3)
    if generation == 2:
        _full.append((round(time.monotonic() - _START, 2), round((now - began) * 1e3, 2), len(gc.get_objects(2))))


def _write() -> None:
    prefix = os.environ.get("GCPROBE_OUT")
    if prefix and any(_pauses.values()):
        with open(f"{prefix}.{os.getpid()}", "w") as out:
            json.dump({"pid": os.getpid(), "pauses_ms": _pauses, "full": _full,
                       "frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}, out)


if os.environ.get("GCPROBE_OUT"):
    gc.callbacks.append(_callback)
    atexit.register(_write)
