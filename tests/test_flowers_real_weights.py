"""Real MobileNetV2 ImageNet weights on a small flower subset: accuracy must be far above chance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from imgcls.cli import main

KERAS = Path.home() / ".keras"
WEIGHTS = KERAS / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
FLOWERS = KERAS / "datasets" / "flower_photos"


@pytest.mark.slow
def test_mobilenet_v2_imagenet_on_flower_subset(tmp_path: Path, capsys):
    if not WEIGHTS.is_file() or not FLOWERS.is_dir():
        pytest.skip(f"offline Keras cache not in {KERAS} (run `make keras-cache`)")
    data = tmp_path / "flowers"
    per_split = {"train": 16, "val": 6, "test": 10}
    for cls in sorted(p for p in FLOWERS.iterdir() if p.is_dir()):
        files = sorted(cls.glob("*.jpg"))
        start = 0
        for split, n in per_split.items():
            (data / split / cls.name).mkdir(parents=True)
            for f in files[start:start + n]:
                shutil.copy(f, data / split / cls.name / f.name)
            start += n
    out = tmp_path / "bundle"
    assert main(["train", "--data", str(data), "--out", str(out), "--backbone", "mobilenet_v2", "--epochs", "15",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 5 classes: chance is 20%. A linear head on ImageNet features gets far more from 16 photos a class.
    assert summary["test_accuracy"] >= 0.7, summary
