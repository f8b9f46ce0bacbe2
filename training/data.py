"""Dataset scanning, validation, splitting and loading.

Every file is decoded once up front with the shared preprocessing module: undecodable files are
listed and skipped before training starts (never a crash mid-epoch), and the decoded, resized uint8
pixels are kept for the in-memory training paths.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from imgcls.errors import ImageDecodeError, ImgclsError
from imgcls.preprocessing import IMAGE_EXTENSIONS, PreprocessingSpec, load_uint8

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """File paths (relative to the dataset root) and class indices of one split."""

    files: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def counts(self, class_names: list[str]) -> dict[str, int]:
        c = Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(class_names)}


@dataclass
class Dataset:
    root: Path
    class_names: list[str]
    splits: dict[str, Split]
    presplit: bool  # the folder came with train/val/test subfolders
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    def fingerprint(self) -> str:
        """sha256 over (split, path, label, size, mtime): changes when the data or split does."""
        h = hashlib.sha256()
        for name in SPLITS:
            for rel, label in zip(self.splits[name].files, self.splits[name].labels, strict=True):
                st = (self.root / rel).stat()
                h.update(f"{name}\0{rel}\0{label}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
        return h.hexdigest()


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _other_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_EXTENSIONS
    )


def scan(
    root: str | os.PathLike,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
) -> Dataset:
    """List a folder's images by class and split them (stratified, reproducible for a seed).

    Accepts `root/CLASS/*` or `root/{train,val,test}/CLASS/*`. Files with a non-image extension in a
    class folder are listed as skipped. Decodability is checked later by `load_images`.
    """
    root = Path(root)
    if not root.exists():
        raise ImgclsError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise ImgclsError(f"data path {root} is not a folder")
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ImgclsError("split fractions must be in [0, 1) and leave room for training data")

    subdirs = {p.name for p in _class_dirs(root)}
    presplit = "train" in subdirs and subdirs <= set(SPLITS)
    skipped: list[tuple[str, str]] = []
    if presplit:
        per_split: dict[str, dict[str, list[Path]]] = {}
        for name in SPLITS:
            folder = root / name
            per_split[name] = (
                {d.name: _image_files(d) for d in _class_dirs(folder)} if folder.is_dir() else {}
            )
        class_names = sorted(per_split["train"])
        for name in ("val", "test"):
            extra = set(per_split[name]) - set(class_names)
            if extra:
                raise ImgclsError(f"{root / name} has classes not in train/: {sorted(extra)}")
        _check_classes(root / "train", class_names, per_split["train"])
        splits = {}
        for name in SPLITS:
            split = Split()
            for idx, cls in enumerate(class_names):
                for path in per_split[name].get(cls, []):
                    split.files.append(str(path.relative_to(root)))
                    split.labels.append(idx)
            splits[name] = split
        if not splits["val"].files and val_fraction > 0:
            _carve_val(splits, val_fraction, seed)
        for name in SPLITS:
            if (root / name).is_dir():
                skipped += [(str(p.relative_to(root)), "not an image file extension")
                            for p in _other_files(root / name) if p.parent != root / name]
    else:
        by_class = {d.name: _image_files(d) for d in _class_dirs(root)}
        class_names = sorted(by_class)
        _check_classes(root, class_names, by_class)
        for d in _class_dirs(root):
            skipped += [(str(p.relative_to(root)), "not an image file extension") for p in _other_files(d)]
        splits = {name: Split() for name in SPLITS}
        rng = random.Random(seed)
        for idx, cls in enumerate(class_names):
            files = [str(p.relative_to(root)) for p in by_class[cls]]
            rng.shuffle(files)
            n = len(files)
            # Every split gets at least one image of each class that has three or more.
            n_test = max(1, round(n * test_fraction)) if n >= 3 and test_fraction > 0 else 0
            n_val = max(1, round(n * val_fraction)) if n >= 3 and val_fraction > 0 else 0
            parts = {"test": files[:n_test], "val": files[n_test:n_test + n_val], "train": files[n_test + n_val:]}
            for name, part in parts.items():
                splits[name].files += part
                splits[name].labels += [idx] * len(part)
    return Dataset(root=root, class_names=class_names, splits=splits, presplit=presplit, skipped=skipped)


def _carve_val(splits: dict[str, Split], fraction: float, seed: int) -> None:
    """A pre-split folder without val/: take a stratified validation split from train/."""
    rng = random.Random(seed)
    train, val = Split(), Split()
    for label in sorted(set(splits["train"].labels)):
        files = [f for f, lab in zip(splits["train"].files, splits["train"].labels, strict=True) if lab == label]
        rng.shuffle(files)
        n_val = max(1, round(len(files) * fraction)) if len(files) >= 3 else 0
        val.files += files[:n_val]
        val.labels += [label] * n_val
        train.files += files[n_val:]
        train.labels += [label] * (len(files) - n_val)
    splits["train"], splits["val"] = train, val


def _check_classes(folder: Path, class_names: list[str], by_class: dict[str, list[Path]]) -> None:
    if len(class_names) < 2:
        found = f"found {len(class_names)}: {class_names}" if class_names else "found none"
        raise ImgclsError(
            f"{folder} needs at least two class subfolders with images in them ({found}); "
            "expected DATA/CLASS_NAME/*.jpg or DATA/{train,val,test}/CLASS_NAME/*.jpg"
        )
    empty = [c for c in class_names if not by_class[c]]
    if empty:
        raise ImgclsError(f"class folder(s) with no image files in {folder}: {', '.join(empty)}")


def decode_files(root: Path, files: list[str], spec: PreprocessingSpec, *, workers: int | None = None,
                 progress: bool = True) -> list[np.ndarray | str]:
    """Decode and resize files in a thread pool: a uint8 array per file, or the reason it failed.

    Any exception is a reason, not a crash: the format allowlist and cost budget of `load_uint8` refuse
    most hostile files, and whatever else Pillow raises (IndexError on a truncated QOI named .png, ...)
    skips that one file.
    """
    workers = workers or min(8, (os.cpu_count() or 2) * 2)

    def work(rel: str) -> np.ndarray | str:
        try:
            return load_uint8((root / rel).read_bytes(), spec)
        except ImageDecodeError as exc:
            return str(exc)
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        except Exception as exc:  # one hostile file must never end a training run: skip it, say why
            log.warning("decoding %s raised %s: %s", rel, type(exc).__name__, exc)
            return f"could not decode ({type(exc).__name__}: {exc})"[:300]

    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(work, files), total=len(files), desc="decoding images", unit="img",
                         disable=not progress, leave=False))


def load_images(
    dataset: Dataset, spec: PreprocessingSpec, *, workers: int | None = None, progress: bool = True,
    require_train: bool = True,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode and resize every split to uint8 arrays; undecodable files are dropped and recorded.

    Returns {split: (images uint8 [N,H,W,3], labels int64 [N])}. Raises if a class loses every
    training image to decode errors (unless `require_train` is off, as for evaluation).
    """
    jobs = [(name, rel, label) for name in SPLITS
            for rel, label in zip(dataset.splits[name].files, dataset.splits[name].labels, strict=True)]
    results = decode_files(dataset.root, [rel for _, rel, _ in jobs], spec, workers=workers, progress=progress)

    kept: dict[str, Split] = {name: Split() for name in SPLITS}
    arrays: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for (name, rel, label), result in zip(jobs, results, strict=True):
        if isinstance(result, str):
            dataset.skipped.append((rel, result))
            continue
        kept[name].files.append(rel)
        kept[name].labels.append(label)
        arrays[name].append(result)
    dataset.splits = kept

    if require_train:
        empty = [c for c, n in kept["train"].counts(dataset.class_names).items() if n == 0]
        if empty:
            raise ImgclsError(f"class(es) with no valid training image after skipping bad files: {', '.join(empty)}")
    h, w = spec.input_size
    return {
        name: (
            np.stack(arrays[name]) if arrays[name] else np.zeros((0, h, w, 3), np.uint8),
            np.asarray(kept[name].labels, dtype=np.int64),
        )
        for name in SPLITS
    }


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced weights n / (k * count): rare classes count more in the loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    total = counts.sum()
    return {i: float(total / (num_classes * c)) if c else 0.0 for i, c in enumerate(counts)}
