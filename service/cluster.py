"""What the serving processes of one `imgcls serve --workers N` share: a state folder the supervisor creates.

Why files, not a manager process or pipes: every worker is a plain `imgcls` process started with
`python -m imgcls.service.worker`, and each must keep answering its own calls even while a sibling is stuck,
crashed or being replaced. Reading a few bytes from a shared memory map or a small JSON file never blocks on
another process, and a crashed worker leaves nothing locked behind.

The folder holds:

- `config.json`: the ServeConfig every worker runs with (written once by the supervisor);
- `state`: one byte per worker, memory-mapped: STARTING, READY or DRAINING. Health answers for the whole
  server (SERVING only while every worker is READY), whichever worker a health check reaches;
- `stats/PID.json`: each worker's ModelStatistics totals per served version, published a few times a
  second, so KServe's ModelStatistics sums over the processes (a dead worker's last totals stay counted, as
  its Prometheus counters do);
- `prometheus/`: prometheus-client's multiprocess folder (PROMETHEUS_MULTIPROC_DIR), read by the
  supervisor's /metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from imgcls.service.statistics import ModelStats

log = logging.getLogger(__name__)

STARTING, READY, DRAINING = 0, 1, 2
STATE_NAMES = {STARTING: "starting", READY: "ready", DRAINING: "draining"}
STATS_PUBLISH_SECONDS = 0.2


def state_path(folder: Path) -> Path:
    return folder / "state"


def create_state(folder: Path, workers: int) -> None:
    """The supervisor's part: an all-STARTING state file and the stats and prometheus folders."""
    state_path(folder).write_bytes(bytes([STARTING]) * workers)
    (folder / "stats").mkdir(exist_ok=True)
    (folder / "prometheus").mkdir(exist_ok=True)


class StateBoard:
    """The shared state bytes, memory-mapped (reads and one-byte writes are atomic enough: a reader sees the
    old or the new value)."""

    def __init__(self, folder: Path) -> None:
        with open(state_path(folder), "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)

    def __len__(self) -> int:
        return len(self._map)

    def set(self, index: int, state: int) -> None:
        self._map[index] = state

    def get(self, index: int) -> int:
        return self._map[index]

    def states(self) -> list[int]:
        return list(self._map[:])

    def all_ready(self) -> bool:
        return all(s == READY for s in self._map[:])

    def close(self) -> None:
        self._map.close()


@dataclasses.dataclass
class WorkerLink:
    """One worker's view of the shared folder: its own state byte, the others', and the statistics files."""

    folder: Path
    index: int
    board: StateBoard = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.board = StateBoard(self.folder)
        self._own_stats = self.folder / "stats" / f"{os.getpid()}.json"
        self._stop = threading.Event()
        self._last_published = ""
        self._snapshot: Callable[[], Iterable[tuple[str, int, ModelStats]]] | None = None

    @property
    def workers(self) -> int:
        return len(self.board)

    def set_state(self, state: int) -> None:
        self.board.set(self.index, state)

    def whole_server_ready(self) -> bool:
        return self.board.all_ready()

    # --- statistics across processes ------------------------------------------------------------------------

    def publish(self, snapshot: Callable[[], Iterable[tuple[str, int, ModelStats]]]) -> None:
        """Write this worker's totals (atomically: a reader never sees half a file), if they changed."""
        data = {f"{name}/{version}": stats.to_json() for name, version, stats in snapshot()}
        text = json.dumps(data, sort_keys=True)
        if text == self._last_published:
            return
        tmp = self._own_stats.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self._own_stats)
        self._last_published = text

    def start_publishing(self, snapshot: Callable[[], Iterable[tuple[str, int, ModelStats]]]) -> None:
        self._snapshot = snapshot

        def run() -> None:
            while not self._stop.wait(STATS_PUBLISH_SECONDS):
                try:
                    self.publish(snapshot)
                except Exception as exc:  # a full disk must not stop serving
                    log.warning("cannot publish statistics for the other workers: %s", exc)

        threading.Thread(target=run, name="stats-publisher", daemon=True).start()

    def peer_stats(self, name: str, version: int) -> list[ModelStats]:
        """The other processes' published totals for one version (this process's own are live, not read)."""
        found = []
        for path in (self.folder / "stats").glob("*.json"):
            if path == self._own_stats:
                continue
            try:
                entry = json.loads(path.read_text()).get(f"{name}/{version}")
            except (OSError, ValueError):
                continue  # being replaced: os.replace makes that rare, and the next read sees it
            if entry is not None:
                found.append(ModelStats.from_json(entry))
        return found

    def close(self) -> None:
        """Publish the last totals (they stay counted after this process exits) and let go of the map."""
        self._stop.set()
        if self._snapshot is not None:
            try:
                self.publish(self._snapshot)
            except Exception as exc:
                log.warning("cannot publish the last statistics: %s", exc)
        self.board.close()
