"""`imgcls.cpus.usable_cpus` on faked cgroup trees: v2, v1, hybrid, no limit ("max", -1), nested limits,
missing and garbled files. The real machine's answer is checked only for being sane."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgcls.cpus import cgroup_quota, cpu_limits, usable_cpus


def _files(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _proc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


V2_PROC = "0::/kubepods/pod1/c1\n"


@pytest.mark.parametrize(("cpu_max", "affinity", "expected"), [
    ("200000 100000", 64, 2),   # docker --cpus 2 on a 64-core host
    ("150000 100000", 64, 2),   # 1.5 CPUs: rounded up
    ("50000 100000", 64, 1),    # half a CPU: at least 1
    ("800000 100000", 4, 4),    # a quota above the affinity: the affinity
    ("max 100000", 16, 16),     # no limit
    ("garbage", 16, 16),        # unreadable: no limit
])
def test_cgroup_v2(tmp_path, cpu_max, affinity, expected):
    root = _files(tmp_path / "cg", {"cgroup.controllers": "cpu memory", "kubepods/pod1/c1/cpu.max": cpu_max})
    assert usable_cpus(root, _proc(tmp_path, V2_PROC), affinity=affinity) == expected


def test_cgroup_v2_nested_limit_on_an_ancestor_wins(tmp_path):
    root = _files(tmp_path / "cg", {"cgroup.controllers": "cpu", "kubepods/cpu.max": "max 100000",
                                    "kubepods/pod1/cpu.max": "300000 100000", "kubepods/pod1/c1/cpu.max": "max 100000"})
    limits = cpu_limits(root, _proc(tmp_path, V2_PROC), affinity=8)
    assert limits.quota == 3 and limits.usable == 3 and limits.source.endswith("pod1/cpu.max")
    assert "3 usable CPUs" in limits.describe() and "affinity 8" in limits.describe()


def test_cgroup_v2_inside_a_namespace_reads_the_mount_itself(tmp_path):
    """A container with its own cgroup namespace sees itself as `/`; the mount holds its limit."""
    root = _files(tmp_path / "cg", {"cgroup.controllers": "cpu", "cpu.max": "250000 100000"})
    assert usable_cpus(root, _proc(tmp_path, "0::/\n"), affinity=32) == 3
    # a path from the host's point of view that does not exist under this mount: the mount itself
    assert usable_cpus(root, _proc(tmp_path, "0::/system.slice/docker-abc.scope\n"), affinity=32) == 3


@pytest.mark.parametrize(("quota", "period", "expected"), [
    ("200000", "100000", 2), ("-1", "100000", 16), ("25000", "50000", 1), ("350000", "100000", 4)])
def test_cgroup_v1(tmp_path, quota, period, expected):
    root = _files(tmp_path / "cg", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": quota,
                                    "cpu,cpuacct/docker/abc/cpu.cfs_period_us": period,
                                    "memory/docker/abc/memory.limit_in_bytes": "1"})
    proc = _proc(tmp_path, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert usable_cpus(root, proc, affinity=16) == expected


def test_cgroup_v1_in_a_container_sees_its_cgroup_at_the_mount(tmp_path):
    root = _files(tmp_path / "cg", {"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"})
    proc = _proc(tmp_path, "2:cpuacct:/docker/abc\n1:cpu:/docker/abc\n")
    assert cgroup_quota(root, proc) == (1.0, str(root / "cpu" / "cpu.cfs_quota_us"))
    assert usable_cpus(root, proc, affinity=8) == 1


def test_hybrid_v1_with_unified_v2_limit(tmp_path):
    root = _files(tmp_path / "cg", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000",
                                    "unified/app/cpu.max": "200000 100000"})
    proc = _proc(tmp_path, "1:cpu:/\n0::/app\n")
    assert usable_cpus(root, proc, affinity=8) == 2


@pytest.mark.parametrize("files", [
    {},                                                        # no cgroup file system at all
    {"cgroup.controllers": "memory"},                          # v2 without the cpu controller's files
    {"cpu/cpu.cfs_quota_us": "200000"},                        # v1 with the period missing
    {"cpu/cpu.cfs_quota_us": "x", "cpu/cpu.cfs_period_us": "y"},  # garbled
])
def test_missing_or_unreadable_files_mean_no_limit(tmp_path, files):
    root = _files(tmp_path / "cg", files)
    (tmp_path / "cg").mkdir(exist_ok=True)
    assert usable_cpus(root, tmp_path / "no-proc-file", affinity=6) == 6
    assert cgroup_quota(root, tmp_path / "no-proc-file") == (None, "")


def test_this_machine():
    limits = cpu_limits()
    assert 1 <= limits.usable <= limits.affinity
    assert usable_cpus() == limits.usable


def test_service_default_threads_use_it(tmp_path, monkeypatch):
    """What `imgcls serve` sizes its inference threads and decode workers from, by default."""
    import imgcls.cpus
    from imgcls.service.runtimes import default_threads

    assert default_threads() == usable_cpus()
    root = _files(tmp_path / "cg", {"cgroup.controllers": "cpu", "cpu.max": "100000 100000"})
    monkeypatch.setattr(imgcls.cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(imgcls.cpus, "PROC_SELF_CGROUP", _proc(tmp_path, "0::/\n"))
    monkeypatch.setattr(imgcls.cpus, "affinity_cpus", lambda: 64)  # a 64-core host, `docker run --cpus 1`
    assert default_threads() == 1
    assert "1 usable CPUs: affinity 64, cgroup quota 1 CPUs" in imgcls.cpus.cpu_limits().describe()
    from imgcls.service.server import ServeConfig

    config = ServeConfig(model_repository=tmp_path)
    assert (config.inference_threads, config.decode_workers) == (1, 1)  # not 64 and 64
