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
