"""Staging folders left by killed exports are removed by the next export; a running export's never are.

No TensorFlow here: `publish.Staging` is what every export goes through, and a real export killed with
SIGKILL is simulated by a child process that creates its staging folder and is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from imgcls.export import publish


def _staging(repo: Path, name: str, writer: dict | None, age_s: float = 0.0) -> Path:
    folder = repo / f".{name}.tmp-{os.urandom(4).hex()}"
    (folder / "saved_model").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"half written")
    if writer is not None:
        (folder / publish.WRITER_FILE).write_text(json.dumps(writer))
    if age_s:
        past = time.time() - age_s
        for path in [*folder.rglob("*"), folder]:
            os.utime(path, (past, past), follow_symlinks=False)
    return folder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_folders_of_dead_or_unknown_old_writers_are_removed(tmp_path):
    repo = tmp_path / "repo"
    (repo / "flowers" / "1").mkdir(parents=True)
    me = publish.writer_record()
    dead = _staging(repo, "flowers", {**me, "pid": _dead_pid()})
    reused = _staging(repo, "cars", {**me, "start": "1"})  # our pid, another start time: the pid was reused
    running = _staging(repo, "flowers", me)  # a concurrent export (this process)
    legacy_old = _staging(repo, "flowers", None, age_s=publish.STALE_AFTER_S + 60)
    legacy_new = _staging(repo, "flowers", None)  # killed before writing .writer, or just created
    other_host_old = _staging(repo, "flowers", {**me, "host": "elsewhere"}, age_s=publish.STALE_AFTER_S + 60)
    other_host_new = _staging(repo, "flowers", {**me, "host": "elsewhere"})
    not_staging = repo / ".flowers.backup"
    not_staging.mkdir()

    removed = publish.clean_stale(repo)
    assert sorted(removed) == sorted([dead, reused, legacy_old, other_host_old])
    for folder in (dead, reused, legacy_old, other_host_old):
        assert not folder.exists()
    for folder in (running, legacy_new, other_host_new, not_staging, repo / "flowers" / "1"):
        assert folder.exists()


def test_a_new_export_cleans_up_and_publishes_without_its_writer_file(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    dead = _staging(repo, "m", {**publish.writer_record(), "pid": _dead_pid()})
    with publish.Staging(repo, "m") as staging:
        assert staging.removed_stale == [dead] and not dead.exists()
        writer = json.loads((staging.path / publish.WRITER_FILE).read_text())
        assert writer["pid"] == os.getpid() and writer["start"]
        assert publish.stale_reason(staging.path) is None  # our own folder is never stale
        (staging.path / "model.onnx").write_bytes(b"x")
        version, path = staging.publish(None, lambda v: (staging.path / "manifest.json").write_text("{}"))
    assert version == 1 and sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.onnx"]
    assert sorted(p.name for p in repo.iterdir()) == ["m"]


def test_an_export_killed_with_sigkill_leaves_a_folder_the_next_one_removes(tmp_path):
    repo = tmp_path / "repo"
    code = ("import sys, time; from pathlib import Path; from imgcls.export.publish import Staging;"
            "s = Staging(Path(sys.argv[1]), 'flowers'); print(s.path, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(repo)], stdout=subprocess.PIPE, text=True)
    try:
        left = Path(proc.stdout.readline().strip())
        assert left.is_dir()
        assert publish.clean_stale(repo) == []  # its writer is alive: a concurrent export, left alone
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
    assert left.is_dir()  # a killed export cannot clean up after itself
    with publish.Staging(repo, "other") as staging:
        assert staging.removed_stale == [left] and not left.exists()
