"""The shared preprocessing: every accepted image mode decodes to upright RGB; bad bytes fail clearly."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from imgcls.backbones import BACKBONES, get_backbone
from imgcls.errors import ImageDecodeError, ImgclsError
from imgcls.preprocessing import (
    DecodeLimits,
    PreprocessingSpec,
    decode_image,
    load_uint8,
    normalize,
    preprocess_bytes,
)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


RED = (200, 30, 30)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"])
def test_formats_decode_to_rgb(fmt):
    data = encode(Image.new("RGB", (40, 30), RED), fmt)
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (40, 30)
    px = np.asarray(img)[15, 20].astype(int)
    assert np.abs(px - RED).max() < 40  # lossy formats and GIF palettes are close, not exact


@pytest.mark.parametrize("mode,value,expected", [
    ("L", 128, (128, 128, 128)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("RGBA", (10, 20, 30, 0), (255, 255, 255)),  # fully transparent becomes white
    ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
    ("LA", (50, 255), (50, 50, 50)),
    ("P", 3, None),
])
def test_modes_convert_to_rgb(mode, value, expected):
    img = Image.new(mode, (8, 8), value)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = np.asarray(decode_image(encode(img, fmt)))
    assert out.shape == (8, 8, 3)
    if expected is not None:
        assert np.abs(out[4, 4].astype(int) - expected).max() <= 3


def test_16bit_grayscale_scaled_not_clipped():
    arr = np.full((6, 6), 30000, dtype=np.uint16)
    out = np.asarray(decode_image(encode(Image.fromarray(arr), "PNG")))
    assert 100 < out[0, 0, 0] < 140  # 30000/65535*255 = 117, not clipped to 255


def test_gif_first_frame():
    frames = [Image.new("RGB", (10, 10), (255, 0, 0)), Image.new("RGB", (10, 10), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(decode_image(buf.getvalue()))
    assert out[5, 5, 0] > 200 and out[5, 5, 2] < 50


def test_exif_orientation_is_honoured():
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 60)
    arr = np.asarray(out).mean(axis=2)
    assert arr[:10].mean() > 200 and arr[-10:].mean() < 50  # the stripe is now on top


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"this is not an image", "not a decodable image"),
])
def test_bad_bytes(data, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_image(data)


def test_truncated_jpeg():
    data = encode(Image.effect_noise((200, 200), 60).convert("RGB"), "JPEG")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_and_size_limits():
    data = encode(Image.new("RGB", (1000, 1000)), "PNG")
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(data, max_pixels=500_000)
    with pytest.raises(ImageDecodeError, match="bytes, over the limit"):
        decode_image(data, max_bytes=100)


def test_resize_and_normalize_shape_and_range():
    spec = get_backbone("mobilenet_v2").preprocessing(64)
    x = preprocess_bytes(encode(Image.new("RGB", (300, 200), (255, 0, 0)), "PNG"), spec)
    assert x.shape == (64, 64, 3) and x.dtype == np.float32
    assert np.allclose(x[0, 0], [1.0, -1.0, -1.0])


def test_large_jpeg_draft_still_resizes_to_spec():
    spec = get_backbone("resnet50").preprocessing()
    data = encode(Image.effect_noise((2000, 1500), 50).convert("RGB"), "JPEG")
    assert load_uint8(data, spec).shape == (224, 224, 3)


@pytest.mark.parametrize("name", sorted(n for n, b in BACKBONES.items() if b.family == "keras"))
def test_spec_matches_keras_preprocess_input(name):
    """Our normalization equals the Keras `preprocess_input` of each backbone's own module."""
    import importlib

    backbone = BACKBONES[name]
    module = importlib.import_module(f"tf_keras.applications.{backbone.keras_module}")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.float32)
    expected = np.asarray(module.preprocess_input(x.copy()))
    ours = normalize(x.astype(np.uint8), backbone.preprocessing())
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(n for n, b in BACKBONES.items() if b.family == "lite"))
def test_lite_spec_is_the_reference_normalization(name):
    """EfficientNet-Lite has no Keras module: its checkpoints were trained on (x - 127) / 128, RGB (the
    reference efficientnet_lite_builder.py's MEAN_RGB and STDDEV_RGB)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    ours = normalize(x, BACKBONES[name].preprocessing())
    np.testing.assert_allclose(ours, (x.astype(np.float32) - 127.0) / 128.0, rtol=1e-6, atol=1e-6)


def _reference_normalize(x: np.ndarray, spec: PreprocessingSpec) -> np.ndarray:
    """The spec's formula as written, broadcasting per-channel arrays: what `normalize` must equal bit for bit."""
    x = np.asarray(x, dtype=np.float32)
    if spec.channel_order == "BGR":
        x = x[..., ::-1]
    x = x * np.float32(spec.scale) - np.asarray(spec.mean, dtype=np.float32)
    return x / np.asarray(spec.std, dtype=np.float32)


@pytest.mark.parametrize("spec", [
    *(BACKBONES[n].preprocessing() for n in sorted(BACKBONES)),
    PreprocessingSpec(input_size=(8, 8), channel_order="BGR", scale=1.0, mean=(103.9, 116.8, 123.7)),
    PreprocessingSpec(input_size=(8, 8), scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    PreprocessingSpec(input_size=(8, 8), channel_order="BGR", scale=0.5, mean=(3.0, 3.0, 3.0), std=(2.0, 2.0, 2.0)),
], ids=lambda s: f"{s.mode}-{s.channel_order}-{s.mean[0]:g}-{s.std[0]:g}")
def test_normalize_is_bit_exact_for_every_dtype_and_layout(spec):
    """The fast path (in place, with scalars: one for a uniform mean and std, else one per channel) changes no
    bit, so a model sees what it saw in training; nor does it touch the caller's array. Every uint8 value in
    every channel, a flipped (strided) batch, and float input."""
    every = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (3, 5, 7, 3))
    for x in (every.astype(np.uint8), batch.astype(np.uint8), batch.astype(np.uint8)[:, :, ::-1],
              batch.astype(np.float32), batch.astype(np.float64)):
        before = x.copy()
        ours = normalize(x, spec)
        assert ours.dtype == np.float32 and ours.shape == x.shape
        np.testing.assert_array_equal(ours, _reference_normalize(x, spec))
        np.testing.assert_array_equal(x, before)


def test_spec_validation():
    with pytest.raises(ValueError, match="resize"):
        PreprocessingSpec(input_size=(8, 8), resize="cubic-ish")
    with pytest.raises(ValueError, match="channel_order"):
        PreprocessingSpec(input_size=(8, 8), channel_order="GBR")


def test_unknown_backbone_lists_choices():
    with pytest.raises(ImgclsError, match=r"unknown backbone 'resnet9000'.*mobilenet_v2"):
        get_backbone("resnet9000")
    assert get_backbone("MobileNet-V2").name == "mobilenet_v2"


# --- hostile input: the in-process path (training, export) enforces the allowlist and the cost budget --------


def test_in_process_decode_refuses_cost_bombs_fast():
    from test_decoding import many_scan_jpeg, rle_bmp, tall_png

    spec = get_backbone("mobilenet_v2").preprocessing(64)
    for data, match in ((rle_bmp(), "RLE8-compressed BMP is not accepted"),
                        (many_scan_jpeg(5000, (128, 128)), "progressive JPEG with more than 100 scans"),
                        (tall_png(), r"PNG of 1x50000000 would need about \d+ MiB")):
        start = time.process_time()
        with pytest.raises(ImageDecodeError, match=match):
            load_uint8(data, spec)
        assert time.process_time() - start < 0.2  # the header is enough; nothing is decoded


@pytest.mark.parametrize("name", ["XBM", "XPM", "PPM"])
def test_text_formats_are_not_classified(name):
    from test_decoding import TEXT_FORMATS

    with pytest.raises(ImageDecodeError, match=f"{name} images are not accepted"):
        preprocess_bytes(TEXT_FORMATS[name](), get_backbone("mobilenet_v2").preprocessing(32))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_tiff_are_refused(value):
    from test_decoding import float_tiff

    with pytest.raises(ImageDecodeError, match="floating-point samples"):
        decode_image(float_tiff(value))


def test_format_allowlist_parameter():
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    assert decode_image(png, formats="png,jpeg").size == (8, 8)
    with pytest.raises(ImageDecodeError, match=r"PNG images are not accepted \(accepted formats: JPEG\)"):
        decode_image(png, formats=("JPEG",))
    with pytest.raises(ImageDecodeError, match="not accepted"):
        load_uint8(png, get_backbone("mobilenet_v2").preprocessing(32), limits=DecodeLimits(formats="gif"))
    with pytest.raises(TypeError, match="max_pixel"):
        decode_image(png, max_pixel=5)


def test_16bit_grey_conversion_matches_the_float64_formula():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65536, (37, 41), dtype=np.uint16)
    arr[0, 0] = 65535
    out = np.asarray(decode_image(encode(Image.fromarray(arr), "PNG")))[..., 0]
    expected = np.clip(arr.astype(np.float64) * (255.0 / 65535.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_progressive_jpeg_decodes_with_draft():
    img = Image.effect_noise((300, 200), 40).convert("RGB")
    prog = encode(img, "JPEG", progressive=True)
    assert decode_image(prog).size == (300, 200)
    assert load_uint8(prog, get_backbone("mobilenet_v2").preprocessing(64)).shape == (64, 64, 3)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_junk_exif_means_no_orientation_not_a_bad_photo(fmt):
    img = Image.new("RGB", (30, 20), RED)
    junk = b"garbage" * 10 if fmt == "PNG" else b"Exif\x00\x00garbage" * 20
    data = encode(img, fmt, exif=junk)
    out = decode_image(data)
    assert out.size == (30, 20)
    assert np.abs(np.asarray(out)[10, 15].astype(int) - RED).max() < 40
