"""Atomic, concurrent-safe publication into a model repository `REPO/NAME/VERSION/`.

A version is assembled in a hidden staging folder inside REPO (`REPO/.NAME.tmp-XXXX`, same file system,
ignored by the server because of the dot) and renamed into place, so a watcher never sees half a
version. Choosing the version number and renaming happen under an exclusive `flock` on the REPO
folder itself, so concurrent exports (same or different names) never take the same number and no
lock file is left behind. A failed export removes its staging folder, and REPO itself if it created it.

A killed export (kill -9, OOM, a lost machine) cannot remove its staging folder, so each staging folder
records its writer in `.writer` (host, pid, and the process's start time, which tells a live pid from a
reused one), and every export first removes the staging folders whose writer is gone (`clean_stale`):
same host and the pid dead or now another process. A folder whose writer cannot be checked (written on
another host, or from before `.writer` existed, or killed between mkdir and writing it) is removed only when
nothing in it changed for `STALE_AFTER_S`, so a concurrent export is never touched.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from imgcls.errors import ImgclsError

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
STAGING_RE = re.compile(r"^\.(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,127})\.tmp-[0-9a-f]+$")
WRITER_FILE = ".writer"
STALE_AFTER_S = 6 * 3600.0  # writer unknown: removed after this long without a change


def validate_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise ImgclsError(f"--name {name!r}: use letters, digits, '_', '-' or '.', starting with a letter or digit")
    return name


def versions(model_dir: Path) -> list[int]:
    """Every numeric version folder, with or without a manifest (a number in use is never reused)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and int(p.name) >= 1)


def refuse_existing(repo: Path, name: str, version: int | None) -> None:
    if version is not None and version < 1:
        raise ImgclsError(f"--version {version}: versions are integers from 1")
    if version is not None and (repo / name / str(version)).exists():
        raise ImgclsError(f"{repo / name / str(version)} already exists; versions are immutable, "
                          "choose another --version or leave it out for the next free one")


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None when there is no
    such process (or no /proc): with the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # fields after "(comm)" start at field 3


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writer_record() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}


def _last_change(folder: Path) -> float:
    """Newest mtime of the folder and everything in it (a long conversion keeps writing files)."""
    newest = folder.stat().st_mtime
    for path in folder.rglob("*"):
        with suppress(OSError):
            newest = max(newest, path.lstat().st_mtime)
    return newest


def stale_reason(folder: Path, now: float | None = None, stale_after: float = STALE_AFTER_S) -> str | None:
    """Why the staging `folder` is left over from a dead export, or None when it may still be in use."""
    try:
        writer = json.loads((folder / WRITER_FILE).read_text())
        host, pid, start = str(writer["host"]), int(writer["pid"]), writer.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        writer = None
    if writer is not None and host == socket.gethostname():
        if not _pid_alive(pid):
            return f"its export (pid {pid}) is gone"
        current = _start_time(pid)
        if start is not None and current is not None and current != start:
            return f"its export (pid {pid}) is gone; the pid now belongs to another process"
        return None
    try:
        idle = (time.time() if now is None else now) - _last_change(folder)
    except OSError:
        return None
    if idle > stale_after:
        who = f"written on {host}" if writer is not None else "no writer recorded"
        return f"{who}, unchanged for {idle / 3600:.1f} h"
    return None


def clean_stale(repo: Path, stale_after: float = STALE_AFTER_S) -> list[Path]:
    """Remove the staging folders (`REPO/.NAME.tmp-*`, any NAME) that killed exports left behind; returns
    them. Never touches a folder whose export may still be running (see the module docstring)."""
    removed = []
    try:
        children = list(Path(repo).iterdir())
    except OSError:
        return removed
    for folder in children:
        if not STAGING_RE.match(folder.name) or folder.is_symlink() or not folder.is_dir():
            continue
        reason = stale_reason(folder, stale_after=stale_after)
        if reason is None:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            log.warning("removed %s, a staging folder left by a killed export (%s)", folder, reason)
            removed.append(folder)
    return removed


class Staging:
    """The hidden folder a version is built in; `publish` renames it into place, `discard` removes it."""

    def __init__(self, repo: Path, name: str) -> None:
        self.repo = Path(repo)
        if self.repo.exists() and not self.repo.is_dir():
            raise ImgclsError(f"--repository {self.repo}: exists and is not a folder")
        self.created_repo = not self.repo.exists()
        self.repo.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.removed_stale = clean_stale(self.repo)
        # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide the version from a server
        # running as another user. mkdir honours the umask like any other folder of the repository.
        while True:
            self.path = self.repo / f".{name}.tmp-{secrets.token_hex(4)}"
            try:
                self.path.mkdir()
                break
            except FileExistsError:
                continue
        try:  # who writes here, so that a later export can tell this folder from a killed export's
            (self.path / WRITER_FILE).write_text(json.dumps(writer_record()))
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        self.published: Path | None = None

    def publish(self, version: int | None, finalize: Callable[[int], None]) -> tuple[int, Path]:
        """Pick the version (given, or highest existing + 1), let `finalize(version)` write the manifest
        into the staging folder, then rename it to REPO/NAME/VERSION; all under the repository lock."""
        with _locked(self.repo):
            model_dir = self.repo / self.name
            chosen = version if version is not None else (max(versions(model_dir), default=0) + 1)
            target = model_dir / str(chosen)
            if target.exists():
                raise ImgclsError(f"{target} already exists (another export took version {chosen}); "
                                  "nothing was published")
            finalize(chosen)
            with suppress(FileNotFoundError):  # not part of the published version
                (self.path / WRITER_FILE).unlink()
            model_dir.mkdir(exist_ok=True)
            os.rename(self.path, target)
        self.published = target
        return chosen, target

    def discard(self) -> None:
        if self.published is None:
            shutil.rmtree(self.path, ignore_errors=True)
            if self.created_repo:
                with suppress(OSError):  # rmdir only succeeds when empty: a concurrent export may use it
                    self.repo.rmdir()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
