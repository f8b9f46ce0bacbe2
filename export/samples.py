"""The images the export runs on: the labelled check sample and the int8 calibration sample.

Both are decoded with the shared core (`load_uint8`, then `normalize` per batch), so the export checks
see exactly the pixels the server will feed. Images are kept as uint8 and normalized batch by batch:
a thousand 224 px images are 150 MB as uint8 but 600 MB as float32.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcls.errors import ImageDecodeError, ImgclsError
from imgcls.manifest import Manifest
from imgcls.preprocessing import IMAGE_EXTENSIONS, PreprocessingSpec, load_uint8, normalize, read_file

SPLITS = ("train", "val", "test")
Row = tuple[str, int]  # (path relative to the root, class index; -1 when unlabelled)


@dataclass
class Sample:
    """Decoded images (uint8 NHWC) with their labels, the files they came from and what was skipped."""

    images: np.ndarray
    labels: np.ndarray
    files: list[str]
    root: str
    source: str
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, spec: PreprocessingSpec, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(self), batch_size):
            yield normalize(self.images[i:i + batch_size], spec)

    def describe(self, with_files: bool = False) -> dict:
        doc = {"source": self.source, "root": self.root, "images": len(self), "skipped": self.skipped}
        if with_files:
            doc["files"] = self.files
        return doc


def read_split(bundle: Path, manifest: Manifest) -> dict:
    """The bundle's split.json: {"root": ..., "train"|"val"|"test": [[relpath, class_index], ...]}."""
    path = bundle / manifest.dataset.get("split_file", "split.json")
    if not path.is_file():
        raise ImgclsError(f"{bundle} records no split ({path.name} is missing); pass --data DIR")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        root = doc["root"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImgclsError(f"{path}: not a readable split file ({exc})") from None
    return {"root": root, **{k: [(str(f), int(c)) for f, c in doc.get(k, [])] for k in SPLITS}}


def subsample(rows: list[Row], limit: int | None, seed: int) -> list[Row]:
    """At most `limit` rows, taken round-robin over the classes after a seeded shuffle (stratified)."""
    if limit is None or len(rows) <= limit:
        return list(rows)
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Row]] = {}
    for row in rows:
        by_class.setdefault(row[1], []).append(row)
    queues = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_class.items())]
    picked: list[Row] = []
    while len(picked) < limit:
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop())
    return sorted(picked)


def load_rows(root: Path, rows: list[Row], spec: PreprocessingSpec, source: str, progress: bool = False) -> Sample:
    """Decode rows; unreadable files are skipped and listed (a photo that cannot be decoded cannot be scored)."""
    h, w = spec.input_size
    images = np.zeros((len(rows), h, w, 3), np.uint8)
    labels, files, skipped = [], [], []
    iterator = rows
    if progress and len(rows) > 50:
        from tqdm import tqdm

        iterator = tqdm(rows, desc=f"decoding {source}", unit="img", leave=False)
    for rel, label in iterator:
        try:
            images[len(files)] = load_uint8(read_file(root / rel), spec)
        except (OSError, ImageDecodeError) as exc:
            skipped.append({"file": rel, "reason": str(exc)})
            continue
        except Exception as exc:  # one hostile file must never end an export: skip it, say why
            skipped.append({"file": rel, "reason": f"could not decode ({type(exc).__name__}: {exc})"[:300]})
            continue
        files.append(rel)
        labels.append(label)
    return Sample(images[:len(files)], np.asarray(labels, np.int64), files, str(root), source, skipped)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def labelled_rows(folder: Path, class_names: list[str]) -> tuple[Path, list[Row]]:
    """Rows of a labelled folder (class subfolders named like the model's classes).

    A pre-split folder (train/ val/ test/) contributes its val/ and test/ parts, never train/.
    """
    if not folder.is_dir():
        raise ImgclsError(f"--data {folder}: not a folder")
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs and set(subdirs) <= set(SPLITS) and {"val", "test"} & set(subdirs):
        parts = [folder / s for s in ("val", "test") if s in subdirs]
    else:
        parts = [folder]
    rows: list[Row] = []
    for part in parts:
        classes = sorted(p.name for p in part.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise ImgclsError(f"{part} has class folder(s) the model does not know: {', '.join(unknown)} "
                              f"(model classes: {', '.join(class_names)})")
        for name in classes:
            rows += [(str(p.relative_to(folder)), class_names.index(name)) for p in image_files(part / name)]
    if not rows:
        raise ImgclsError(f"--data {folder}: no images in class subfolders named like the model's classes "
                          f"({', '.join(class_names)})")
    return folder, rows


def check_sample(bundle: Path, manifest: Manifest, data: Path | None, limit: int | None, seed: int,
                 progress: bool = False) -> Sample:
    """The held-aside labelled sample: `--data DIR`, else the bundle's val+test split."""
    spec = manifest.preprocessing
    if data is not None:
        root, rows = labelled_rows(Path(data), manifest.class_names)
        source = "--data"
    else:
        split = read_split(bundle, manifest)
        root, rows, source = Path(split["root"]), split["val"] + split["test"], "bundle val+test split"
        if not rows:
            raise ImgclsError(f"{bundle} has empty val and test splits; pass --data DIR")
        if not (root / rows[0][0]).is_file():
            raise ImgclsError(f"the bundle's data folder {root} is gone or changed; pass --data DIR")
        if any(not 0 <= c < manifest.num_classes for _, c in rows):
            raise ImgclsError(f"{bundle}/split.json has class indices outside the manifest's classes")
    sample = load_rows(root, subsample(rows, limit, seed), spec, source, progress)
    if not len(sample):
        raise ImgclsError(f"none of the {len(rows)} check images under {root} could be decoded")
    return sample


def calibration_sample(bundle: Path, manifest: Manifest, folder: Path | None, count: int, seed: int,
                       progress: bool = False) -> Sample:
    """Representative images for int8 calibration: the bundle's training split (or `--calibration-data`)."""
    spec = manifest.preprocessing
    if folder is not None:
        if not Path(folder).is_dir():
            raise ImgclsError(f"--calibration-data {folder}: not a folder")
        root = Path(folder)
        rows = [(str(p.relative_to(root)), -1) for p in image_files(root)]
        source = "--calibration-data"
    else:
        split = read_split(bundle, manifest)
        root, rows, source = Path(split["root"]), split["train"], "bundle train split"
        if rows and not (root / rows[0][0]).is_file():
            raise ImgclsError(f"the bundle's training images under {root} are gone; int8 calibration needs "
                              "them (pass --calibration-data DIR, or leave out tflite-int8)")
    if not rows:
        raise ImgclsError(f"no calibration images found ({source} {root})")
    sample = load_rows(root, subsample(rows, count, seed), spec, source, progress)
    if not len(sample):
        raise ImgclsError(f"none of the calibration images under {root} could be decoded")
    return sample
