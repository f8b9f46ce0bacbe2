"""Reading a model repository (`REPO/NAME/VERSION/manifest.json`, as `imgcls export` writes it).

Only the shared core is used: manifests are read and validated with `imgcls.manifest.read_manifest`, and
artifacts are checked with the core's `verify_checksum` (the same hash export writes, `imgcls.runtimes`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from imgcls.errors import ImgclsError
from imgcls.manifest import MANIFEST_FILE, Manifest, read_manifest
from imgcls.runtimes import verify_checksum

log = logging.getLogger(__name__)

__all__ = ["POLICY_HELP", "Entry", "VersionPolicy", "fingerprint", "list_versions", "read_entry", "scan",
           "verify_checksum", "warn_once"]


@dataclass(frozen=True)
class Entry:
    """One model version on disk."""

    name: str
    version: int
    folder: Path
    manifest: Manifest


POLICY_HELP = "latest, latest:N, all or specific:V1,V2,..."


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve, as TF Serving names them: the newest `count` (`latest[:N]`),
    `all`, or `specific:1,3`. Applied to the versions that are on disk and have not failed, so a broken
    newest version leaves the one before it in service."""

    kind: str = "latest"  # latest | all | specific
    count: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str | VersionPolicy, flag: str = "--version-policy") -> VersionPolicy:
        if isinstance(text, VersionPolicy):
            return text
        kind, _, arg = str(text).strip().partition(":")
        kind, arg = kind.strip().lower(), arg.strip()
        try:
            if kind == "latest":
                count = int(arg) if arg else 1
                if count >= 1:
                    return cls("latest", count)
            elif kind == "all" and not arg:
                return cls("all", 0)
            elif kind == "specific":
                versions = tuple(sorted({int(v) for v in arg.split(",") if v.strip()}))
                if versions and versions[0] >= 1:
                    return cls("specific", 0, versions)
        except ValueError:
            pass
        raise ImgclsError(f"{flag} {text!r}: expected {POLICY_HELP}")

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of `available`, ascending."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.count:]

    def __str__(self) -> str:
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, self.versions))
        return "all" if self.kind == "all" else ("latest" if self.count == 1 else f"latest:{self.count}")


def _versions(model_dir: Path) -> list[int]:
    """Version folders that hold a manifest (a half-written export has none yet and is skipped)."""
    found = []
    for child in model_dir.iterdir():
        if child.is_dir() and child.name.isdigit() and int(child.name) >= 1:
            if (child / MANIFEST_FILE).is_file():
                found.append(int(child.name))
            else:
                warn_once(f"{child}: no {MANIFEST_FILE}, skipped (an export in progress?)")
    if not found:
        warn_once(f"{model_dir}: no version folders with a manifest, skipped")
    return sorted(found)


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A poll every few seconds must not repeat the same warning each time."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def list_versions(root: Path) -> dict[str, list[int]]:
    """Model name -> versions on disk with a manifest (models with none are left out). Cheap: one listing
    per model and a stat per version, so the server can poll it."""
    root = Path(root)
    if not root.is_dir():
        raise ImgclsError(f"--model-repository {root}: not a folder")
    found = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            versions = _versions(model_dir)
        except OSError as exc:  # removed while we looked
            log.warning("%s: cannot list (%s), skipped", model_dir, exc)
            continue
        if versions:
            found[model_dir.name] = versions
    return found


def read_entry(root: Path, name: str, version: int) -> Entry:
    """Read and validate one version's manifest; it must be a model entry naming its own folder."""
    folder = Path(root) / name / str(version)
    manifest = read_manifest(folder)
    if manifest.kind != "model":
        raise ImgclsError(f"{folder / MANIFEST_FILE}: kind is {manifest.kind!r}, expected a 'model' entry")
    if manifest.name != name or manifest.version != version:
        raise ImgclsError(
            f"{folder / MANIFEST_FILE}: says {manifest.name} v{manifest.version}, but the folder is {name}/{version}"
        )
    return Entry(name, version, folder, manifest)


def fingerprint(folder: Path) -> tuple:
    """Identity of a version folder's contents (names, sizes, mtimes of its top-level files, and the
    folder's inode): a version that failed is retried only when this changes, not on every poll."""
    try:
        items = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())
        return (folder.stat().st_ino, *items)
    except OSError:
        return ()


def scan(root: Path, policy: str | VersionPolicy = "latest") -> list[Entry]:
    """Entries to serve under one policy for every model (`"latest"`, `"all"`, ...); raises on any bad manifest."""
    chosen = VersionPolicy.parse(policy)
    entries = [read_entry(root, name, v) for name, versions in list_versions(root).items()
               for v in chosen.select(versions)]
    if not entries:
        raise ImgclsError(f"--model-repository {root}: no models found (expected NAME/VERSION/{MANIFEST_FILE})")
    return entries
