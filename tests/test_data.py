"""Scanning, splitting and the corrupt-file scan of the training stage."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from helpers import make_dataset
from PIL import Image

from imgcls.backbones import get_backbone
from imgcls.errors import ImgclsError
from imgcls.training import data


def test_split_is_stratified_and_reproducible(tmp_path):
    root = make_dataset(tmp_path / "d", classes=3, per_class=20, size=16)
    a = data.scan(root, val_fraction=0.2, test_fraction=0.2, seed=7)
    b = data.scan(root, val_fraction=0.2, test_fraction=0.2, seed=7)
    c = data.scan(root, val_fraction=0.2, test_fraction=0.2, seed=8)
    assert a.class_names == ["class_0", "class_1", "class_2"]
    assert {k: v.files for k, v in a.splits.items()} == {k: v.files for k, v in b.splits.items()}
    assert a.splits["test"].files != c.splits["test"].files
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        assert a.splits[split].counts(a.class_names) == dict.fromkeys(a.class_names, n)
    every = [f for s in a.splits.values() for f in s.files]
    assert len(every) == len(set(every)) == 60  # no file in two splits, none lost
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_presplit_folder_is_used_as_is(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        make_dataset(tmp_path / split, classes=2, per_class=n, size=16)
    ds = data.scan(tmp_path)
    assert ds.presplit
    assert [len(ds.splits[s]) for s in data.SPLITS] == [12, 4, 6]
    shutil.rmtree(tmp_path / "val")  # no val/: carved from train/, stratified, test/ untouched
    carved = data.scan(tmp_path, val_fraction=0.5)
    assert [len(carved.splits[s]) for s in data.SPLITS] == [6, 6, 6]
    assert carved.splits["val"].counts(carved.class_names) == {"class_0": 3, "class_1": 3}
    make_dataset(tmp_path / "val", classes=2, per_class=2, size=16)
    (tmp_path / "val" / "class_9").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "class_9" / "x.png")
    with pytest.raises(ImgclsError, match="classes not in train"):
        data.scan(tmp_path)


def test_bad_files_are_skipped_and_listed(tmp_path):
    root = make_dataset(tmp_path / "d", classes=2, per_class=8, size=16)
    (root / "class_0" / "zero.jpg").write_bytes(b"")
    (root / "class_0" / "text.jpg").write_text("not a photo")
    buf = io.BytesIO()
    Image.effect_noise((120, 120), 40).convert("RGB").save(buf, "JPEG")
    (root / "class_1" / "truncated.jpg").write_bytes(buf.getvalue()[:400])
    (root / "class_1" / "notes.txt").write_text("ignored")
    ds = data.scan(root, val_fraction=0.25, test_fraction=0.25, seed=0)
    arrays = data.load_images(ds, get_backbone("mobilenet_v2").preprocessing(16), progress=False)
    skipped = dict(ds.skipped)
    assert set(skipped) == {"class_0/zero.jpg", "class_0/text.jpg", "class_1/truncated.jpg", "class_1/notes.txt"}
    assert "empty" in skipped["class_0/zero.jpg"] and "truncated" in skipped["class_1/truncated.jpg"]
    assert sum(len(a[0]) for a in arrays.values()) == 16
    kept = [f for s in ds.splits.values() for f in s.files]
    assert not set(kept) & set(skipped)


@pytest.mark.parametrize("setup,match", [
    (lambda p: None, "does not exist"),
    (lambda p: make_dataset(p, classes=1, per_class=3, size=8), "at least two class"),
    (lambda p: (make_dataset(p, classes=2, per_class=3, size=8), (p / "empty").mkdir()), "no image files.*empty"),
])
def test_clear_errors(tmp_path, setup, match):
    setup(tmp_path / "d")
    with pytest.raises(ImgclsError, match=match):
        data.scan(tmp_path / "d")


def test_class_losing_every_image_to_decode_errors_is_an_error(tmp_path):
    root = make_dataset(tmp_path / "d", classes=2, per_class=4, size=8)
    shutil.rmtree(root / "class_1")
    (root / "class_1").mkdir()
    for i in range(4):
        (root / "class_1" / f"{i}.jpg").write_bytes(b"garbage")
    ds = data.scan(root, val_fraction=0.25, test_fraction=0.25)
    with pytest.raises(ImgclsError, match=r"no valid training image.*class_1"):
        data.load_images(ds, get_backbone("mobilenet_v2").preprocessing(16), progress=False)


def test_class_weights_balance_rare_classes():
    w = data.class_weights(np.array([0] * 30 + [1] * 10), 2)
    assert w[1] == pytest.approx(3 * w[0]) and w[0] == pytest.approx(40 / 60)


def test_any_decode_failure_skips_the_file_not_the_run(tmp_path, monkeypatch):
    """A 24-byte truncated QOI named .png crashed `imgcls train` with IndexError; now it is listed and skipped,
    and so is a file on which the decoder raises anything at all."""
    from test_decoding import qoi_truncated, rle_bmp

    root = make_dataset(tmp_path / "d", classes=2, per_class=6, size=16)
    (root / "class_0" / "qoi.png").write_bytes(qoi_truncated())
    (root / "class_1" / "rle.bmp").write_bytes(rle_bmp())
    (root / "class_1" / "boom.jpg").write_bytes(b"\xff\xd8\xff boom")
    real = data.load_uint8

    def flaky(raw, spec, **kw):
        if raw.startswith(b"\xff\xd8\xff boom"):
            raise IndexError("index out of range (simulated decoder bug)")
        return real(raw, spec, **kw)

    monkeypatch.setattr(data, "load_uint8", flaky)
    ds = data.scan(root, val_fraction=0.25, test_fraction=0.25, seed=0)
    arrays = data.load_images(ds, get_backbone("mobilenet_v2").preprocessing(16), progress=False)
    skipped = dict(ds.skipped)
    assert set(skipped) == {"class_0/qoi.png", "class_1/rle.bmp", "class_1/boom.jpg"}
    assert "QOI images are not accepted" in skipped["class_0/qoi.png"]
    assert "RLE8-compressed BMP" in skipped["class_1/rle.bmp"]
    assert "IndexError" in skipped["class_1/boom.jpg"]
    assert sum(len(a[0]) for a in arrays.values()) == 12


def test_export_samples_skip_any_failing_file(tmp_path, monkeypatch):
    """int8 calibration / check samples: the same rule as the training scan (export/samples.py)."""
    from test_decoding import qoi_truncated

    from imgcls.export import samples

    root = make_dataset(tmp_path / "d", classes=2, per_class=3, size=16)
    (root / "class_0" / "qoi.png").write_bytes(qoi_truncated())
    (root / "class_1" / "boom.jpg").write_bytes(b"\xff\xd8\xff boom")
    real = samples.load_uint8

    def flaky(raw, spec, **kw):
        if raw.startswith(b"\xff\xd8\xff boom"):
            raise IndexError("simulated decoder bug")
        return real(raw, spec, **kw)

    monkeypatch.setattr(samples, "load_uint8", flaky)
    rows = [(str(p.relative_to(root)), -1) for p in samples.image_files(root)]
    sample = samples.load_rows(root, rows, get_backbone("mobilenet_v2").preprocessing(16), "test")
    reasons = {s["file"]: s["reason"] for s in sample.skipped}
    assert set(reasons) == {"class_0/qoi.png", "class_1/boom.jpg"}
    assert "QOI images are not accepted" in reasons["class_0/qoi.png"] and "IndexError" in reasons["class_1/boom.jpg"]
    assert len(sample) == 6
