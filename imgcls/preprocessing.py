"""The one image preprocessing implementation, shared by training, `evaluate` and the server.

Decoding uses Pillow and returns NumPy arrays, so the serving path needs no TensorFlow. Every step that
could differ between training and serving (EXIF orientation, colour conversion, resize filter,
normalization) is decided here and recorded in the manifest as a `PreprocessingSpec`.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from imgcls.errors import ImageDecodeError

# Truncated files must fail loudly (and be skipped by the scan), never decode half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 50_000_000  # well above any camera photo, far below a decompression bomb
DEFAULT_MAX_BYTES = 32 * 1024 * 1024

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class PreprocessingSpec:
    """How an RGB uint8 image becomes the model's float input: `(reorder(x) * scale - mean) / std`.

    `mean` and `std` are given in `channel_order`. The model input is NHWC float32 of `input_size`
    (height, width). This is enough to reproduce any Keras `preprocess_input` mode ("tf", "caffe",
    "torch", or pass-through for models that normalize inside themselves).
    """

    input_size: tuple[int, int]
    mode: str = "tf"
    resize: str = "bilinear"
    channel_order: str = "RGB"
    scale: float = 1.0 / 127.5
    mean: tuple[float, float, float] = (1.0, 1.0, 1.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.resize not in _RESAMPLE:
            raise ValueError(f"resize must be one of {sorted(_RESAMPLE)}, got {self.resize!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be (height, width) > 0, got {self.input_size!r}")
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain zeros")

    def to_dict(self) -> dict:
        return asdict(self)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparent pixels become white rather than whatever colour they hid."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = max(float(arr.max()), 1.0)
        scale = 255.0 / (65535.0 if peak > 255 else 255.0)
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode encoded bytes to an upright RGB Pillow image (first frame of animations).

    Raises ImageDecodeError for empty, oversized, truncated or non-image input. `draft_size` lets
    JPEG decode at a reduced scale that is still at least that large (much faster for big photos).
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if len(data) > max_bytes:
        raise ImageDecodeError(f"encoded image is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
                )
            if draft_size is not None and img.format == "JPEG":
                side = max(draft_size)
                img.draft("RGB", (side, side))
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a decodable image (unknown or unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"not a decodable image ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image ({exc})") from None


def resize_image(img: Image.Image, spec: PreprocessingSpec) -> np.ndarray:
    """Resize (squash, no crop: the whole photo is kept) to the spec's size; uint8 HxWx3."""
    height, width = spec.input_size
    if img.size != (width, height):
        img = img.resize((width, height), resample=_RESAMPLE[spec.resize])
    return np.asarray(img, dtype=np.uint8)


def normalize(images: np.ndarray, spec: PreprocessingSpec) -> np.ndarray:
    """uint8 (or float 0..255) RGB array [..., 3] to the model's float32 input."""
    x = np.asarray(images, dtype=np.float32)
    if spec.channel_order == "BGR":
        x = x[..., ::-1]
    x = x * np.float32(spec.scale)
    x -= np.asarray(spec.mean, dtype=np.float32)
    if any(s != 1.0 for s in spec.std):
        x /= np.asarray(spec.std, dtype=np.float32)
    return x


def load_uint8(data: bytes, spec: PreprocessingSpec, **limits) -> np.ndarray:
    """Encoded bytes to the resized uint8 RGB array the model input is computed from."""
    img = decode_image(data, draft_size=spec.input_size, **limits)
    return resize_image(img, spec)


def preprocess_bytes(data: bytes, spec: PreprocessingSpec, **limits) -> np.ndarray:
    """Encoded bytes to one float32 HxWx3 model input."""
    return normalize(load_uint8(data, spec, **limits), spec)


def read_file(path: str | os.PathLike) -> bytes:
    return Path(path).read_bytes()


def preprocess_file(path: str | os.PathLike, spec: PreprocessingSpec, **limits) -> np.ndarray:
    return preprocess_bytes(read_file(path), spec, **limits)
