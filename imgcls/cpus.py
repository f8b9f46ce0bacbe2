"""How many CPUs this process may really use: the smaller of its CPU affinity and its cgroup CPU quota.

Why both: `os.sched_getaffinity` sees the cores a process may be scheduled on, but a container limited by a
CPU *quota* (`docker run --cpus 2`, a Kubernetes CPU limit) keeps every core of the host in its affinity and
is throttled instead. Sizing thread pools from the affinity alone would start 64 inference and 64 decode
threads on 2 CPUs of quota, which then fight for the quota and lose throughput to context switches.

The quota is read from the cgroup file system, both versions:

- cgroup v2: `cpu.max` holds `QUOTA PERIOD` (microseconds) or `max PERIOD` (no limit);
- cgroup v1: `cpu.cfs_quota_us` (-1 = no limit) and `cpu.cfs_period_us` in the `cpu` (or `cpu,cpuacct`)
  controller's hierarchy.

Limits nest, so every ancestor of the process's cgroup (as `/proc/self/cgroup` names it) up to the mount
point is read and the smallest limit wins. Inside a container with a cgroup namespace the process's cgroup
is `/` and the mount point is the container's own cgroup, which holds its limit. A quota of 1.5 CPUs gives
2 (rounded up: the last half CPU still runs a thread), never less than 1. Missing or unreadable files mean
"no limit": the affinity decides.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CpuLimits:
    """What `usable_cpus` decided from, so the server can log it at start-up."""

    affinity: int
    quota: float | None  # CPUs of cgroup quota (e.g. 1.5); None when there is no quota
    source: str  # the file the quota came from, or "" when none

    @property
    def usable(self) -> int:
        if self.quota is None:
            return max(1, self.affinity)
        return max(1, min(self.affinity, math.ceil(self.quota - 1e-9)))

    def describe(self) -> str:
        quota = "no cgroup CPU quota" if self.quota is None else f"cgroup quota {self.quota:g} CPUs ({self.source})"
        return f"{self.usable} usable CPUs: affinity {self.affinity}, {quota}"


def affinity_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """Controller -> cgroup path from `/proc/self/cgroup` lines `ID:CONTROLLERS:PATH`; v2's line has no
    controllers and is stored under ""."""
    text = _read(proc_cgroup) or ""
    found: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            found[""] = path
        for controller in controllers.split(","):
            if controller:
                found[controller] = path
    return found


def _ancestors(mount: Path, cgroup_path: str) -> list[Path]:
    """The process's cgroup folder under `mount` and each parent up to `mount` itself, deepest first.
    When the named folder is not under this mount (a container that sees only its own cgroup), the mount
    itself is the process's cgroup."""
    parts = [p for p in cgroup_path.strip().split("/") if p and p not in (".", "..")]
    folders = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    existing = [f for f in folders if f.is_dir()]
    return existing or [mount]


def _v2_quota(folder: Path) -> float | None:
    text = _read(folder / "cpu.max")
    if not text:
        return None
    fields = text.split()
    if fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(folder: Path) -> float | None:
    quota_text, period_text = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        quota, period = int(quota_text or ""), int(period_text or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_quota(root: Path | None = None, proc_cgroup: Path | None = None) -> tuple[float | None, str]:
    """The smallest CPU quota (in CPUs) over the process's cgroup and its ancestors, and the file it came
    from; (None, "") when no level sets one. `root`/`proc_cgroup` default to `CGROUP_ROOT` and
    `PROC_SELF_CGROUP`, read at call time so that a test can point them at a faked tree."""
    root = Path(CGROUP_ROOT if root is None else root)
    own = _own_cgroups(Path(PROC_SELF_CGROUP if proc_cgroup is None else proc_cgroup))
    candidates: list[tuple[Path, object]] = []
    if (root / "cgroup.controllers").is_file() or (root / "cpu.max").is_file():  # v2 (unified) mount
        candidates += [(f, _v2_quota) for f in _ancestors(root, own.get("", "/"))]
    else:  # v1: the cpu controller's own mount (named cpu, cpu,cpuacct or cpuacct,cpu)
        for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            mount = root / name
            if mount.is_dir():
                candidates += [(f, _v1_quota) for f in _ancestors(mount, own.get("cpu", "/"))]
                break
        if (root / "unified").is_dir():  # hybrid: v2 hierarchy beside the v1 controllers
            candidates += [(f, _v2_quota) for f in _ancestors(root / "unified", own.get("", "/"))]
    best: tuple[float | None, str] = (None, "")
    for folder, read in candidates:
        quota = read(folder)  # type: ignore[operator]
        if quota is not None and (best[0] is None or quota < best[0]):
            name = "cpu.max" if read is _v2_quota else "cpu.cfs_quota_us"
            best = (quota, str(folder / name))
    return best


def cpu_limits(root: Path | None = None, proc_cgroup: Path | None = None, affinity: int | None = None) -> CpuLimits:
    """The affinity and quota `usable_cpus` decides from; `describe()` is the line to log at start-up."""
    quota, source = cgroup_quota(root, proc_cgroup)
    return CpuLimits(affinity if affinity is not None else affinity_cpus(), quota, source)


def usable_cpus(root: Path | None = None, proc_cgroup: Path | None = None, affinity: int | None = None) -> int:
    """min(CPU affinity, cgroup CPU quota rounded up), at least 1. `root` and `proc_cgroup` let a test fake
    the cgroup file tree; `affinity` overrides the affinity count (tests)."""
    return cpu_limits(root, proc_cgroup, affinity).usable


# `imgcls serve --workers auto`: one serving process per this many usable CPUs. Why 2 (docs/scaling.md): on a
# 16-core machine, six 2-CPU workers on 12 cores did 92-101% per core of one 2-CPU server, three 4-CPU workers
# 81-91%, one 12-CPU process 49-57%; p99 at 1 client stayed at 20 ms. Each worker holds its own model copy
# (about 650 MiB for MobileNetV2 on ONNX), so memory grows with the CPUs as it would with 2-CPU pods. A 2- or
# 3-CPU pod keeps one process.
CPUS_PER_WORKER = 2


def auto_workers(cpus: int) -> int:
    """Serving processes for `cpus` usable CPUs (`--workers auto`)."""
    return max(1, cpus // CPUS_PER_WORKER)
