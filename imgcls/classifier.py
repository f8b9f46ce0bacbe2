"""`imgcls.Classifier`: classify images in this process, no server, with exactly the server's preprocessing.

    import imgcls

    clf = imgcls.Classifier.load("runs/repo/flowers")     # a repository model (latest version), a version
    for labels in clf.predict(["a.jpg", b"...jpeg bytes...", pil_image, numpy_array], top_k=3):
        print(labels[0].name, labels[0].score)

What it loads, and why:

- a repository version (REPO/NAME/VERSION/, written by `imgcls export`) runs the artifact `imgcls serve`
  would run: the first of `imgcls.runtimes.DEFAULT_ORDER` (TFLite, then ONNX, then SavedModel) whose runtime
  is installed, checked against the manifest's sha256; `runtime=` picks another (tflite-int8, ...);
- a model folder (REPO/NAME/) means its highest version;
- a bundle (written by `imgcls train`) has only its SavedModel, so TensorFlow runs it (the `train` extra).

Preprocessing is `imgcls.preprocessing`, the one implementation that training, `imgcls evaluate` and the
server use: encoded images are decoded with the same allowlist and limits, EXIF orientation, JPEG draft
decoding and resize, so a file gets the same scores here as from `imgcls serve` and `imgcls evaluate`.
PIL images and NumPy arrays are already decoded: they are converted to RGB and resized the same way (as the
client sends a PIL image, losslessly).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, Union

import numpy as np

from imgcls.errors import ImageDecodeError, ImgclsError
from imgcls.manifest import MANIFEST_FILE, Manifest, read_manifest
from imgcls.preprocessing import load_uint8, normalize, resize_image
from imgcls.runtimes import (
    FORMATS,
    Runtime,
    SavedModelRuntime,
    choose_artifact,
    default_threads,
    load_runtime,
    verify_checksum,
)

if TYPE_CHECKING:
    from PIL import Image

# What `predict` accepts for one image.
ImageInput: TypeAlias = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, "Image.Image", np.ndarray]

# The Python module each artifact format's runtime needs (a format whose module is missing is not chosen).
_RUNTIME_MODULES = {"onnx": "onnxruntime", "tflite": "ai_edge_litert", "tflite-fp16": "ai_edge_litert",
                    "tflite-int8": "ai_edge_litert", "savedmodel": "tensorflow"}


@dataclass(frozen=True)
class Label:
    """One of an image's top-k classes: its index in the model's output, its name and its probability."""

    index: int
    name: str
    score: float


def installed_formats() -> tuple[str, ...]:
    """Artifact formats whose runtime library is installed here."""
    return tuple(f for f in FORMATS if importlib.util.find_spec(_RUNTIME_MODULES[f]) is not None)


def _latest_version(folder: Path) -> Path | None:
    versions = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / MANIFEST_FILE).is_file()]
    return max(versions, key=lambda p: int(p.name)) if versions else None


class Classifier:
    """A loaded model and its preprocessing. Not thread-safe (one runtime, called from one thread at a time);
    load one per thread, or guard `predict` with a lock."""

    def __init__(self, runtime: Runtime, manifest: Manifest, path: Path) -> None:
        self.runtime = runtime
        self.manifest = manifest
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, runtime: str | None = None, threads: int | None = None,
             verify_checksums: bool = True) -> Classifier:
        """Load a bundle, a repository version, or a repository model folder (its latest version).

        `runtime`: an artifact format of a repository version (default: what `imgcls serve` runs). `threads`:
        the runtime's threads (default: the CPUs this process may use)."""
        folder = Path(path)
        if not folder.exists():
            raise ImgclsError(f"{folder}: no such bundle or model folder")
        if not (folder / MANIFEST_FILE).is_file():
            latest = _latest_version(folder) if folder.is_dir() else None
            if latest is None:
                raise ImgclsError(f"{folder}: not a bundle (no {MANIFEST_FILE}) nor a repository model folder "
                                  f"(no VERSION/{MANIFEST_FILE} below it)")
            folder = latest
        manifest = read_manifest(folder)
        threads = threads or default_threads()
        if manifest.kind == "bundle":
            if runtime not in (None, "savedmodel"):
                raise ImgclsError(f"{folder} is a bundle: it has only its SavedModel (runtime {runtime!r} needs "
                                  "a repository version written by `imgcls export`)")
            model = manifest.model
            return cls(SavedModelRuntime(folder / model.get("saved_model", "saved_model"), threads,
                                         model.get("input_name"), model.get("output_name")), manifest, folder)
        artifact = choose_artifact(manifest, runtime, available=installed_formats())
        if verify_checksums:
            verify_checksum(folder, artifact)
        return cls(load_runtime(folder, artifact, threads), manifest, folder)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def format(self) -> str:
        """The artifact format that runs (savedmodel, tflite, onnx, ...)."""
        return self.runtime.format

    def preprocess(self, images: ImageInput | Iterable[ImageInput]) -> np.ndarray:
        """The model input for the images: float32 [N, H, W, 3], exactly as the server computes it."""
        spec = self.manifest.preprocessing
        arrays = [self._pixels(image, spec, i) for i, image in enumerate(_as_list(images))]
        if not arrays:
            h, w = spec.input_size
            return np.zeros((0, h, w, 3), np.float32)
        return normalize(np.stack(arrays), spec)

    def predict_proba(self, images: ImageInput | Iterable[ImageInput], batch_size: int = 32) -> np.ndarray:
        """Class probabilities, float32 [N, classes], in the order of `class_names`."""
        x = self.preprocess(images)
        if len(x) == 0:
            return np.zeros((0, len(self.manifest.class_names)), np.float32)
        return np.concatenate([self.runtime.run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    def predict(self, images: ImageInput | Iterable[ImageInput], top_k: int = 5,
                batch_size: int = 32) -> list[list[Label]]:
        """The top-k labels of each image, best first, one list per image in input order.

        `images`: one image or a sequence of them, each a file path, encoded bytes, a PIL image or a NumPy
        uint8 array (H x W grey, H x W x 3 RGB or H x W x 4 RGBA; a 4-D array is a batch of images). An image
        that cannot be decoded raises ImageDecodeError naming its position."""
        if top_k < 1:
            raise ImgclsError("top_k must be at least 1")
        probs = self.predict_proba(images, batch_size)
        names = self.manifest.class_names
        k = min(top_k, len(names))
        out = []
        for row in probs:
            best = np.argsort(-row, kind="stable")[:k]
            out.append([Label(int(i), names[int(i)], float(row[i])) for i in best])
        return out

    @staticmethod
    def _pixels(image: Any, spec: Any, position: int) -> np.ndarray:
        """One image as the resized uint8 RGB array the model input is computed from."""
        try:
            if isinstance(image, str | os.PathLike):
                return load_uint8(Path(image).read_bytes(), spec)
            if isinstance(image, bytes | bytearray | memoryview):
                return load_uint8(bytes(image), spec)
            if isinstance(image, np.ndarray):
                return resize_image(_array_image(image), spec)
            if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
                from imgcls.preprocessing import _to_rgb

                return resize_image(_to_rgb(image), spec)
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"image {position}: {exc}") from None
        except OSError as exc:
            raise ImgclsError(f"image {position}: {image}: {exc.strerror or exc}") from None
        raise TypeError(f"image {position}: expected a path, bytes, a PIL image or a NumPy array, "
                        f"got {type(image).__name__}")


def _array_image(array: np.ndarray) -> Any:
    from PIL import Image

    from imgcls.preprocessing import _to_rgb

    if array.dtype != np.uint8:
        raise ImageDecodeError(f"a NumPy image must be uint8 (0..255), got {array.dtype}")
    if array.ndim == 2:
        return Image.fromarray(array, "L").convert("RGB")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return _to_rgb(Image.fromarray(np.ascontiguousarray(array), "RGB" if array.shape[2] == 3 else "RGBA"))
    raise ImageDecodeError(f"a NumPy image must be H x W, H x W x 3 or H x W x 4, got shape {array.shape}")


def _as_list(images: Any) -> Sequence[Any]:
    """One image or many: a path, bytes, a PIL image or a 2-/3-D array is one; a 4-D array is a batch."""
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, str | os.PathLike | bytes | bytearray | memoryview) or hasattr(images, "convert"):
        return [images]
    return list(images)
