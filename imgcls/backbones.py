"""Registry of ImageNet backbones from `tf_keras.applications`, each with its pretrained config.

Like timm's registry, an entry carries what a served model needs to be fed correctly: input size and
the normalization its ImageNet weights were trained with. This module imports no TensorFlow; building
the Keras model happens in the training stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imgcls.errors import ImgclsError
from imgcls.preprocessing import PreprocessingSpec

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


def _norm(mode: str) -> dict:
    """Keras `preprocess_input` modes expressed as PreprocessingSpec fields."""
    if mode == "tf":  # scale to [-1, 1]
        return {"channel_order": "RGB", "scale": 1 / 127.5, "mean": (1.0, 1.0, 1.0), "std": (1.0, 1.0, 1.0)}
    if mode == "caffe":  # RGB->BGR, subtract ImageNet mean, no scaling
        return {"channel_order": "BGR", "scale": 1.0, "mean": CAFFE_MEAN_BGR, "std": (1.0, 1.0, 1.0)}
    if mode == "torch":  # [0, 1] then ImageNet mean/std
        return {"channel_order": "RGB", "scale": 1 / 255.0, "mean": TORCH_MEAN, "std": TORCH_STD}
    if mode == "raw":  # 0..255 floats: the model normalizes inside itself
        return {"channel_order": "RGB", "scale": 1.0, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    raise ValueError(f"unknown normalization mode {mode!r}")


@dataclass(frozen=True)
class Backbone:
    name: str
    keras_class: str  # attribute of tf_keras.applications
    keras_module: str  # tf_keras.applications.<module>, whose preprocess_input defines `mode`
    input_size: int
    mode: str
    min_input_size: int = 32
    kwargs: dict = field(default_factory=dict)  # extra constructor arguments
    imagenet_file: str | None = None  # no-top weight file name in the Keras cache, for error messages

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
]

BACKBONES: dict[str, Backbone] = {b.name: b for b in _ENTRIES}


def get_backbone(name: str) -> Backbone:
    key = name.strip().lower().replace("-", "_")
    if key not in BACKBONES:
        raise ImgclsError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[key]
