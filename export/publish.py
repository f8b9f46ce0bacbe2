"""Atomic, concurrent-safe publication into a model repository `REPO/NAME/VERSION/`.

A version is assembled in a hidden staging folder inside REPO (`REPO/.NAME.tmp-XXXX`, same file system,
ignored by the server because of the dot) and renamed into place, so a watcher never sees half a
version. Choosing the version number and renaming happen under an exclusive `flock` on the REPO
folder itself, so concurrent exports (same or different names) never take the same number and no
lock file is left behind. A failed export removes its staging folder, and REPO itself if it created it.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from imgcls.errors import ImgclsError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


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


class Staging:
    """The hidden folder a version is built in; `publish` renames it into place, `discard` removes it."""

    def __init__(self, repo: Path, name: str) -> None:
        self.repo = Path(repo)
        if self.repo.exists() and not self.repo.is_dir():
            raise ImgclsError(f"--repository {self.repo}: exists and is not a folder")
        self.created_repo = not self.repo.exists()
        self.repo.mkdir(parents=True, exist_ok=True)
        self.name = name
        # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide the version from a server
        # running as another user. mkdir honours the umask like any other folder of the repository.
        while True:
            self.path = self.repo / f".{name}.tmp-{secrets.token_hex(4)}"
            try:
                self.path.mkdir()
                break
            except FileExistsError:
                continue
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
