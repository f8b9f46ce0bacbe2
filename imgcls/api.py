"""The Python API's training half: `imgcls.train(...)` returns the bundle that `imgcls train` writes.

    import imgcls

    bundle = imgcls.train(data="photos/", out="runs/mine", backbone="efficientnet_lite0")
    print(bundle.path, bundle.test_accuracy)
    clf = bundle.load()                     # an imgcls.Classifier on the bundle's SavedModel

One implementation: `imgcls train` calls this function with its flags (training/cli.py), and this function
builds the training stage's `TrainConfig` and runs `imgcls.training.train.train`, so the CLI and the API
cannot drift. The stage is imported inside the call (the core never imports a stage when it is imported:
tests/test_architecture.py), and it needs the `train` extra (TensorFlow).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgcls.errors import ImgclsError
from imgcls.manifest import Manifest, read_manifest

if TYPE_CHECKING:
    from imgcls.classifier import Classifier


@dataclass(frozen=True)
class Bundle:
    """A model bundle written by `imgcls train` (layout: `imgcls.manifest`)."""

    path: Path
    manifest: Manifest
    summary: dict[str, Any] = field(default_factory=dict)  # what `imgcls train --json` prints (after a train)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Bundle:
        """An existing bundle folder."""
        path = Path(path)
        manifest = read_manifest(path)
        if manifest.kind != "bundle":
            raise ImgclsError(f"{path} is a repository version, not a bundle")
        return cls(path, manifest)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def test_accuracy(self) -> float | None:
        """Accuracy on the held-out test split (None when the split was empty)."""
        return self.manifest.metrics.get("test_accuracy")

    def load(self, **kwargs: Any) -> Classifier:
        """An in-process `imgcls.Classifier` on this bundle (see `Classifier.load` for the options)."""
        from imgcls.classifier import Classifier

        return Classifier.load(self.path, **kwargs)


def check_data_folder(data: str | os.PathLike[str] | None) -> None:
    """Fail in milliseconds, before TensorFlow loads, on a data folder that does not exist."""
    if data is None:
        return
    folder = Path(data)
    if not folder.exists():
        raise ImgclsError(f"--data {folder} does not exist (expected a folder with one subfolder of photos per class)")
    if not folder.is_dir():
        raise ImgclsError(f"--data {folder}: not a folder (expected one subfolder of photos per class)")


def train(data: str | os.PathLike[str] | None = None, out: str | os.PathLike[str] = "runs/bundle", *,
          backbone: str = "efficientnet_lite0", progress: bool = True, **options: Any) -> Bundle:
    """Train a classifier on a folder of labelled photos and write a bundle to `out`; returns it.

    `data`: one subfolder per class, or train/ val/ test/ subfolders (None: the flower photos from the Keras
    cache). `options`: any other `imgcls train` flag, with underscores (`epochs=5`, `input_size=160`,
    `fine_tune_layers=30`, `weights="none"`, `overwrite=True`, ...); `imgcls train --help` and docs/cli.md
    list them with their defaults. `progress=False` keeps Keras' epoch lines quiet.
    """
    check_data_folder(data)
    from imgcls.training.train import TrainConfig
    from imgcls.training.train import train as run_training

    fields = TrainConfig.__dataclass_fields__
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(f"imgcls.train() got unknown option(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(k for k in fields if k not in ('out', 'data', 'backbone')))}")
    config = TrainConfig(out=Path(out), data=Path(data) if data is not None else None, backbone=backbone,
                         progress=progress, **options)
    summary = run_training(config)
    path = Path(summary.get("bundle", out))
    return Bundle(path, read_manifest(path), summary)
