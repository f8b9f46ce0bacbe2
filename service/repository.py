"""Reading a model repository (`REPO/NAME/VERSION/manifest.json`, as `imgcls export` writes it).

Only the shared core is used: manifests are read and validated with `imgcls.manifest.read_manifest`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from imgcls.errors import ImgclsError
from imgcls.manifest import MANIFEST_FILE, Artifact, Manifest, read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One model version on disk."""

    name: str
    version: int
    folder: Path
    manifest: Manifest


def _versions(model_dir: Path) -> list[int]:
    """Version folders that hold a manifest (a half-written export has none yet and is skipped)."""
    found = []
    for child in model_dir.iterdir():
        if child.is_dir() and child.name.isdigit() and int(child.name) >= 1:
            if (child / MANIFEST_FILE).is_file():
                found.append(int(child.name))
            else:
                log.warning("%s: no %s, skipped (an export in progress?)", child, MANIFEST_FILE)
    return sorted(found)


def scan(root: Path, policy: str = "latest") -> list[Entry]:
    """Entries to serve: every model's latest version (`policy="latest"`) or all its versions (`"all"`)."""
    root = Path(root)
    if not root.is_dir():
        raise ImgclsError(f"--model-repository {root}: not a folder")
    entries = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = _versions(model_dir)
        if not versions:
            log.warning("%s: no version folders with a manifest, skipped", model_dir)
            continue
        for version in versions if policy == "all" else versions[-1:]:
            folder = model_dir / str(version)
            manifest = read_manifest(folder)
            if manifest.kind != "model":
                raise ImgclsError(f"{folder / MANIFEST_FILE}: kind is {manifest.kind!r}, expected a 'model' entry")
            if manifest.name != model_dir.name or manifest.version != version:
                raise ImgclsError(
                    f"{folder / MANIFEST_FILE}: says {manifest.name} v{manifest.version}, "
                    f"but the folder is {model_dir.name}/{version}"
                )
            entries.append(Entry(model_dir.name, version, folder, manifest))
    if not entries:
        raise ImgclsError(f"--model-repository {root}: no models found (expected NAME/VERSION/{MANIFEST_FILE})")
    return entries


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_sha256(folder: Path) -> str:
    """`imgcls export`'s folder hash: sha256 over the sorted lines `relpath NUL sha256(file) LF`."""
    lines = sorted(f"{p.relative_to(folder).as_posix()}\0{_file_sha256(p)}\n" for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def verify_checksum(folder: Path, artifact: Artifact) -> None:
    """Check an artifact against the manifest's sha256. Folders (saved_model/) are checked only when the
    manifest says they carry export's tree hash (`sha256_method: "tree: ..."`)."""
    path = folder / artifact.file.rstrip("/")
    if path.is_file():
        actual = _file_sha256(path)
    elif path.is_dir() and str((artifact.model_extra or {}).get("sha256_method", "")).startswith("tree"):
        actual = _tree_sha256(path)
    else:
        return
    if actual != artifact.sha256:
        raise ImgclsError(f"{path}: sha256 does not match the manifest (corrupt or replaced file)")
