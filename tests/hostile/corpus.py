"""A deterministic corpus of hostile encoded images (issue 15), generated in memory from a fixed seed.

Every `Case` has a unique name, its bytes, a family (`kind`) and the outcome the server must give for it:

- ACCEPT: a real image a user could send, in a format the docs promise (JPEG, PNG, WebP, GIF, BMP without
  RLE; TIFF per `TIFF_EXPECT`): it must be classified (labels, finite scores);
- REJECT: INVALID_ARGUMENT with a short reason; never a label, never INTERNAL/UNKNOWN, never a hang;
- ANY: either of the two (bits flipped in the middle of a valid image may or may not break it; the suite
  then checks only the invariants: a clean answer, the same on every protocol).

The server under test is started with `MAX_IMAGE_BYTES` and `MAX_IMAGE_PIXELS` (the "limit" family sits
exactly at and one over them). `kind == "cost"` marks the cost bombs inside those limits (expensive for a
decoder without a cost model: the suite sends them apart from the rest and measures their CPU time).

Nothing here depends on the decoder under test: only Pillow (to encode), zlib and hand-written headers.
"""

from __future__ import annotations

import argparse
import gzip
import io
import random
import struct
import sys
import tarfile
import time
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

SEED = 15  # issue 15
ACCEPT, REJECT, ANY = "accept", "reject", "any"
# The server under test runs with these limits (tests/hostile/wire.py passes them as flags).
MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000
# TIFF is "maybe" in the issue ("TIFF if it can be made safe"); plain 8-bit photos in TIFF are expected to be
# classified. Set to REJECT here (one place) if the format allowlist leaves TIFF out by default.
TIFF_EXPECT = ACCEPT
MB = 1024 * 1024
FIXED_TIME = (2020, 1, 1, 0, 0, 0)  # archive timestamps: the same bytes on every run


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expect: str  # ACCEPT, REJECT or ANY
    kind: str  # the family: good, mutation, truncation, random, non-image, bomb, cost, limit, exif, icc, ...
    note: str = ""

    @property
    def heavy(self) -> bool:
        """Sent apart from the bulk: cost bombs and the multi-megabyte limit cases."""
        return self.kind == "cost" or len(self.data) > 2 * MB

    def __repr__(self) -> str:  # pytest ids and failure lists: never the bytes
        return f"Case({self.name}, {len(self.data)} B, {self.expect})"


# --- building blocks -------------------------------------------------------------------------------------------


def photo(seed: int, width: int = 64, height: int = 48) -> Image.Image:
    """A photo-like RGB image: smooth coloured gradients plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        np.sin(xx / rng.uniform(3, 20) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(3, 20) + rng.uniform(0, 6))
        for _ in range(3)
    ]
    arr = np.stack(channels, -1) * 90 + rng.uniform(80, 170, 3) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # e.g. "saving I mode images as PNG is deprecated": still what we want
        warnings.simplefilter("ignore", DeprecationWarning)
        img.save(buf, format=fmt, **params)
    return buf.getvalue()


def segment(marker: int, payload: bytes) -> bytes:
    """One JPEG marker segment (payload up to 65533 bytes)."""
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_insert(jpeg: bytes, *segments: bytes) -> bytes:
    """Insert segments right after SOI."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment; a scan's entropy-coded data belongs to its SOS segment."""
    pos, out = 2, []
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append((marker, pos, pos + 2))
            break
        end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == 0xDA:
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
        out.append((marker, pos, end))
        pos = end
    return out


def jpeg_set_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header's dimensions (what a header-only bomb claims)."""
    for marker, start, _ in jpeg_segments(jpeg):
        if marker in (0xC0, 0xC1, 0xC2):
            return jpeg[: start + 5] + struct.pack(">HH", height, width) + jpeg[start + 9 :]
    raise ValueError("no SOF")


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_ihdr(width: int, height: int, depth: int = 8, color: int = 2, interlace: int = 0) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace))


def zlib_zeros(total: int) -> bytes:
    """A zlib stream of `total` zero bytes, without compressing them all: after the first megabyte, every
    further megabyte (sync-flushed) compresses to the same bytes, and the Adler-32 of zeros is arithmetic."""
    blocks, rest = divmod(total, MB)
    if blocks < 4:
        return zlib.compress(bytes(total), 9)
    comp, block = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(MB)
    first, second, third = (comp.compress(block) + comp.flush(zlib.Z_SYNC_FLUSH) for _ in range(3))
    assert second == third, "deflate state did not settle"
    tail = comp.compress(bytes(rest)) + comp.flush()
    adler = ((total % 65521) << 16) | 1
    return b"\x78\xda" + first + second * (blocks - 1) + tail + struct.pack(">I", adler)


def png_uniform(width: int, height: int, depth: int = 8, color: int = 2) -> bytes:
    """A valid PNG of one colour (zeros, filter 0) of any size; the pixels are never held in memory."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    row_bytes = 1 + (width * channels * depth + 7) // 8
    extra = png_chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff") if color == 3 else b""
    idat = png_chunk(b"IDAT", zlib_zeros(row_bytes * height))
    return PNG_SIGNATURE + png_ihdr(width, height, depth, color) + extra + idat + png_chunk(b"IEND", b"")


def png_insert(png: bytes, *chunks: bytes) -> bytes:
    """Insert chunks right after IHDR."""
    end = 8 + 8 + 13 + 4
    return png[:end] + b"".join(chunks) + png[end:]


def bmp(width: int, height: int, bits: int, compression: int, pixels: bytes, colours: int | None = None) -> bytes:
    """A BMP (BITMAPINFOHEADER) with a grey palette for <= 8 bits."""
    ncol = (1 << bits) if bits <= 8 and colours is None else (colours or 0)
    palette = b"".join(
        struct.pack("<BBBB", i * 255 // max(1, ncol - 1), i * 255 // max(1, ncol - 1), i * 255 // max(1, ncol - 1), 0)
        for i in range(ncol)
    )
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(pixels), 2835, 2835, ncol, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def exif_tiff(entries: list[tuple[int, int, int, bytes]], next_ifd: int = 0, byte_order: bytes = b"II") -> bytes:
    """An EXIF APP1 payload: "Exif\\0\\0" + a TIFF header + one IFD of (tag, type, count, 4-byte value)."""
    e = "<" if byte_order == b"II" else ">"
    body = struct.pack(e + "H", len(entries))
    for tag, typ, count, value in entries:
        body += struct.pack(e + "HHI", tag, typ, count) + value.ljust(4, b"\x00")[:4]
    body += struct.pack(e + "I", next_ifd)
    return b"Exif\x00\x00" + byte_order + struct.pack(e + "HI", 42, 8) + body


def short(value: int, byte_order: str = "<") -> bytes:
    return struct.pack(byte_order + "H", value)


# --- the families ----------------------------------------------------------------------------------------------


Add = Callable[..., None]


def _good(add: Add) -> None:
    """Real images in the promised formats, in the shapes users send."""
    sizes = [(64, 48), (48, 64), (32, 32), (300, 200), (1, 1), (2, 3), (1000, 4), (4, 1000)]
    for i, (w, h) in enumerate(sizes):
        img = photo(100 + i, w, h)
        add(f"good-jpeg-{w}x{h}", encode(img, "JPEG", quality=85), ACCEPT, "good")
        add(f"good-png-{w}x{h}", encode(img, "PNG"), ACCEPT, "good")
    img = photo(120, 120, 90)
    for q in (5, 50, 100):
        add(f"good-jpeg-quality-{q}", encode(img, "JPEG", quality=q), ACCEPT, "good")
    for sub in (0, 1, 2):
        add(f"good-jpeg-subsampling-{sub}", encode(img, "JPEG", subsampling=sub), ACCEPT, "good")
    add("good-jpeg-progressive", encode(img, "JPEG", progressive=True), ACCEPT, "good")
    add("good-jpeg-optimized", encode(img, "JPEG", optimize=True), ACCEPT, "good")
    add("good-jpeg-restart-markers", encode(img, "JPEG", restart_marker_blocks=1), ACCEPT, "good")
    add("good-jpeg-grey", encode(img.convert("L"), "JPEG"), ACCEPT, "good")
    add("good-jpeg-cmyk", encode(img.convert("CMYK"), "JPEG"), ACCEPT, "good", "print workflows send CMYK JPEGs")
    add(
        "good-jpeg-trailing-bytes",
        encode(img, "JPEG") + bytes(range(256)) * 4,
        ACCEPT,
        "good",
        "phones append data after EOI",
    )
    try:
        from PIL import ImageCms

        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
        # littlecms stamps the creation time (bytes 24-35) and an MD5 of it (84-99): fix both for stable bytes
        srgb = srgb[:24] + struct.pack(">6H", 2020, 1, 1, 0, 0, 0) + srgb[36:84] + bytes(16) + srgb[100:]
        add("good-jpeg-srgb-icc", encode(img, "JPEG", icc_profile=srgb), ACCEPT, "good")
        add("good-png-srgb-icc", encode(img, "PNG", icc_profile=srgb), ACCEPT, "good")
    except ImportError:  # pragma: no cover - littlecms is in every Pillow wheel
        pass
    add("good-png-rgba", encode(img.convert("RGBA"), "PNG"), ACCEPT, "good")
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(img.size))
    add("good-png-rgba-gradient-alpha", encode(rgba, "PNG"), ACCEPT, "good")
    add("good-png-grey", encode(img.convert("L"), "PNG"), ACCEPT, "good")
    add("good-png-grey-alpha", encode(rgba.convert("LA"), "PNG"), ACCEPT, "good")
    add("good-png-palette", encode(img.quantize(64), "PNG"), ACCEPT, "good")
    add("good-png-palette-transparency", encode(img.quantize(16), "PNG", transparency=3), ACCEPT, "good")
    add("good-png-1bit", encode(img.convert("1"), "PNG"), ACCEPT, "good")
    add(
        "good-png-16bit-grey",
        encode(Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257), "PNG"),
        ACCEPT,
        "good",
        "scanners and editors write 16-bit PNGs",
    )
    add("good-png-compress-0", encode(img, "PNG", compress_level=0), ACCEPT, "good")
    frames = [photo(130 + k, 80, 60) for k in range(3)]
    add("good-png-apng-3-frames", encode(frames[0], "PNG", save_all=True, append_images=frames[1:]), ACCEPT, "good")
    add("good-webp-lossy", encode(img, "WEBP", quality=80), ACCEPT, "good")
    add("good-webp-lossless", encode(img, "WEBP", lossless=True), ACCEPT, "good")
    add("good-webp-alpha", encode(rgba, "WEBP"), ACCEPT, "good")
    add("good-webp-animated", encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]), ACCEPT, "good")
    add("good-webp-1x1", encode(photo(131, 1, 1), "WEBP"), ACCEPT, "good")
    add("good-gif", encode(img, "GIF"), ACCEPT, "good")
    add("good-gif-transparency", encode(img.quantize(32), "GIF", transparency=0), ACCEPT, "good")
    add(
        "good-gif-animated-3-frames",
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        ACCEPT,
        "good",
    )
    add("good-gif-interlaced", encode(img, "GIF", interlace=True), ACCEPT, "good")
    add("good-bmp-24bit", encode(img, "BMP"), ACCEPT, "good")
    add("good-bmp-32bit", encode(img.convert("RGBA"), "BMP"), ACCEPT, "good")
    add("good-bmp-8bit-palette", encode(img.quantize(200), "BMP"), ACCEPT, "good")
    add("good-bmp-grey", encode(img.convert("L"), "BMP"), ACCEPT, "good")
    add("good-bmp-1bit", encode(img.convert("1"), "BMP"), ACCEPT, "good")
    top_down = bytearray(encode(img, "BMP"))
    struct.pack_into("<i", top_down, 22, -img.height)  # negative height: rows stored top-down
    top_down[54:] = b"".join(
        bytes(top_down[54 + r * ((img.width * 3 + 3) & ~3) : 54 + (r + 1) * ((img.width * 3 + 3) & ~3)])
        for r in reversed(range(img.height))
    )
    add("good-bmp-top-down", bytes(top_down), ACCEPT, "good")
    for compression in ("raw", "tiff_lzw", "tiff_adobe_deflate"):
        add(f"good-tiff-{compression}", encode(img, "TIFF", compression=compression), TIFF_EXPECT, "good")
    for compression in ("packbits", "jpeg"):  # which TIFF compressions are safe is the decoder's call
        add(f"good-tiff-{compression}", encode(img, "TIFF", compression=compression), ANY, "good")
    add("good-tiff-rgba", encode(rgba, "TIFF", compression="tiff_lzw"), TIFF_EXPECT, "good")
    add("good-tiff-grey", encode(img.convert("L"), "TIFF"), TIFF_EXPECT, "good")


MUTATION_FORMATS = {  # the 7 formats whose valid files are mutated, with what a broken-but-parsable one yields
    "jpeg": ("JPEG", {"quality": 90}, ANY),
    "png": ("PNG", {}, ANY),
    "webp": ("WEBP", {"quality": 80}, ANY),
    "gif": ("GIF", {}, ANY),
    "bmp": ("BMP", {}, ANY),
    "tiff": ("TIFF", {"compression": "tiff_lzw"}, ANY if TIFF_EXPECT == ACCEPT else REJECT),
    "ico": ("ICO", {"sizes": [(48, 48)]}, REJECT),  # outside the promised formats, broken or not
}


def _mutations(add: Add) -> None:
    """Bit flips and overwritten runs (outcome depends on where they land), truncations and smashed magics
    (always fatal), over two base images per format."""
    for f_index, (key, (fmt, params, flipped)) in enumerate(MUTATION_FORMATS.items()):
        for b_index, (w, h) in enumerate([(64, 48), (96, 72)]):
            base = encode(photo(200 + 10 * f_index + b_index, w, h), fmt, **params)
            rng = random.Random(f"{SEED}-{key}-{b_index}")
            n_flips = (8, 5) if b_index == 0 else (3, 2)
            for bits in (1, 2, 4, 8, 32):
                for k in range(n_flips[0] if bits <= 4 else n_flips[1]):
                    data = bytearray(base)
                    for _ in range(bits):  # the whole file, headers included
                        pos = rng.randrange(len(data))
                        data[pos] ^= 1 << rng.randrange(8)
                    add(f"mut-{key}{b_index}-flip{bits}-{k}", bytes(data), flipped, "mutation")
            for k in range(12 if b_index == 0 else 6):
                data = bytearray(base)
                length = rng.choice((2, 4, 8, 16, 64, 256))
                pos = rng.randrange(len(data) - length)
                data[pos : pos + length] = rng.randbytes(length)
                add(f"mut-{key}{b_index}-overwrite{length}-{k}", bytes(data), flipped, "mutation")
            for k in range(4 if b_index == 0 else 2):  # a run of 0x00 / 0xFF, as a broken disk or transfer leaves
                data = bytearray(base)
                length = min(rng.choice((16, 128, 1024)), len(data) // 2)
                pos = rng.randrange(len(data) // 4, len(data) - length)
                data[pos : pos + length] = (b"\x00" if k % 2 == 0 else b"\xff") * length
                add(f"mut-{key}{b_index}-fill{length}-{k}", bytes(data), flipped, "mutation")
            fractions = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9) if b_index == 0 else (0.15, 0.45, 0.75)
            for fraction in fractions:
                add(
                    f"trunc-{key}{b_index}-{int(fraction * 100)}pct",
                    base[: int(len(base) * fraction)],
                    REJECT,
                    "truncation",
                    "truncated inside the pixel data: must fail, never decode half-grey",
                )
            if b_index == 0:
                for cut in (1, 2, 4, 8, 16, 32):
                    add(f"trunc-{key}-first-{cut}-bytes", base[:cut], REJECT, "truncation")
                add(f"magic-{key}-zeroed", bytes(4) + base[4:], REJECT, "mutation", "signature destroyed")
                add(f"magic-{key}-random", rng.randbytes(4) + base[4:], REJECT, "mutation", "signature destroyed")
                add(f"mut-{key}-reversed", base[::-1], REJECT, "mutation")
                add(f"mut-{key}-doubled-header", base[: len(base) // 10] + base, ANY, "mutation")
    # Header fields set to edge values (checksums fixed, so only the value is wrong)
    png = encode(photo(300), "PNG")
    for name, (w, h, depth, color, interlace) in {
        "width-0": (0, 48, 8, 2, 0),
        "height-0": (64, 0, 8, 2, 0),
        "depth-3": (64, 48, 3, 2, 0),
        "colortype-5": (64, 48, 8, 5, 0),
        "colortype-3-no-plte": (64, 48, 8, 3, 0),
        "interlace-2": (64, 48, 8, 2, 2),
        "width-2pow31": (2**31, 48, 8, 2, 0),
        "height-2pow32-1": (64, 2**32 - 1, 8, 2, 0),
        "depth-16-mismatch": (64, 48, 16, 2, 0),
        "wider-than-data": (65, 48, 8, 2, 0),
    }.items():
        ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, interlace))
        add(f"hdr-png-{name}", png[:8] + ihdr + png[33:], REJECT, "mutation")
    add("hdr-png-bad-crc", png[:29] + b"\x00\x00\x00\x00" + png[33:], REJECT, "mutation")
    add("hdr-png-no-iend", png[:-12], ANY, "mutation", "only the end marker missing")
    add("hdr-png-idat-split-1-byte", _png_split_idat(png), ACCEPT, "good", "valid: IDAT in 1-byte chunks")
    jpg = encode(photo(301), "JPEG")
    for name, (w, h) in {"width-0": (0, 48), "height-0": (64, 0), "65535x1": (65535, 1), "1x65535": (1, 65535)}.items():
        add(f"hdr-jpeg-{name}", jpeg_set_size(jpg, w, h), REJECT, "mutation")
    for name, (w, h) in {"wider": (128, 48), "taller": (64, 96)}.items():  # libjpeg pads the missing blocks grey
        add(f"hdr-jpeg-{name}", jpeg_set_size(jpg, w, h), ANY, "mutation", "only libjpeg's warnings tell")
    bmp_ok = encode(photo(302), "BMP")
    add("hdr-bmp-planes-9", bmp_ok[:26] + struct.pack("<H", 9) + bmp_ok[28:], ANY, "mutation", "a field readers ignore")
    for name, offset, fmt, value in (
        ("width-0", 18, "<i", 0),
        ("height-0", 22, "<i", 0),
        ("width-neg", 18, "<i", -64),
        ("bpp-7", 28, "<H", 7),
        ("bpp-0", 28, "<H", 0),
        ("compression-9", 30, "<I", 9),
        ("offset-past-end", 10, "<I", 10**6),
        ("header-size-1", 14, "<I", 1),
        ("header-size-huge", 14, "<I", 2**31),
    ):
        data = bytearray(bmp_ok)
        struct.pack_into(fmt, data, offset, value)
        add(f"hdr-bmp-{name}", bytes(data), REJECT, "mutation")
    gif = encode(photo(303), "GIF")
    for name, (w, h) in {"screen-0x0": (0, 0), "screen-1x1": (1, 1)}.items():
        add(
            f"hdr-gif-{name}",
            gif[:6] + struct.pack("<HH", w, h) + gif[10:],
            ANY,
            "mutation",
            "the frame is outside the logical screen",
        )
    add("hdr-gif-no-frames", gif[: 13 + 3 * 256] + b";", REJECT, "mutation")


def _png_split_idat(png: bytes) -> bytes:
    pos, chunks, idat = 8, [], b""
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        tag, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if tag == b"IDAT":
            idat += data
        else:
            if tag == b"IEND":
                chunks.extend(png_chunk(b"IDAT", idat[i : i + 1]) for i in range(len(idat)))
            chunks.append(png_chunk(tag, data))
        pos += 12 + length
    return PNG_SIGNATURE + b"".join(chunks)


MAGICS = {
    "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    "png": PNG_SIGNATURE,
    "gif87": b"GIF87a",
    "gif89": b"GIF89a",
    "bmp": b"BM",
    "webp": b"RIFF\x00\x10\x00\x00WEBPVP8 ",
    "webp-lossless": b"RIFF\x00\x10\x00\x00WEBPVP8L",
    "tiff-le": b"II*\x00",
    "tiff-be": b"MM\x00*",
    "ico": b"\x00\x00\x01\x00",
    "psd": b"8BPS",
    "qoi": b"qoif",
    "dds": b"DDS |",
    "jp2": b"\x00\x00\x00\x0cjP  \r\n\x87\n",
    "j2k": b"\xff\x4f\xff\x51",
    "icns": b"icns",
    "pcx": b"\x0a\x05\x01\x08",
    "ppm": b"P6\n",
    "fits": b"SIMPLE  =                    T",
    "avif": b"\x00\x00\x00\x1cftypavif",
    "heic": b"\x00\x00\x00\x18ftypheic",
    "sgi": b"\x01\xda",
    "blp": b"BLP2",
}


def _random(add: Add) -> None:
    """Random bytes, uniform and structured, alone and behind each format's signature."""
    rng = random.Random(f"{SEED}-random")
    for length in (1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 64, 100, 255, 256, 1000, 4096, 65536, MB):
        for k in range(3 if length < 65536 else 1):
            add(f"random-{length}-{k}", rng.randbytes(length), REJECT, "random")
    add("empty", b"", REJECT, "random")
    for length in (1, 1024, MB):
        add(f"zeros-{length}", bytes(length), REJECT, "random")
        add(f"ones-{length}", b"\xff" * length, REJECT, "random")
    add("ascii-noise-4k", bytes(rng.randrange(32, 127) for _ in range(4096)), REJECT, "random")
    for magic_name, magic in MAGICS.items():
        for length in (0, 16, 1000):
            add(
                f"magic-only-{magic_name}-plus-{length}",
                magic + rng.randbytes(length),
                REJECT,
                "random",
                "a signature followed by noise",
            )


def _non_images(add: Add) -> None:
    """Files users upload by mistake (or on purpose): documents, archives, executables, media."""
    jpeg = encode(photo(400), "JPEG")
    text = "A photo of a cat, honest. Ünïcödé 🐱\n" * 40
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(zipfile.ZipInfo("cat.jpg", FIXED_TIME), jpeg)
    zdeflated = io.BytesIO()
    with zipfile.ZipFile(zdeflated, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(zipfile.ZipInfo("notes.txt", FIXED_TIME), text, zipfile.ZIP_DEFLATED)
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w") as t:
        info = tarfile.TarInfo("cat.jpg")
        info.size, info.mtime = len(jpeg), 0
        t.addfile(info, io.BytesIO(jpeg))
    import base64

    b64 = base64.b64encode(jpeg)
    files = {
        "text-ascii": b"hello world\n" * 100,
        "text-utf8": text.encode(),
        "text-utf16": text.encode("utf-16"),
        "text-one-line": b"cat",
        "html": b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
        "json": b'{"image": "cat.jpg", "label": "cat"}',
        "xml": b'<?xml version="1.0"?><a><b/></a>',
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48"><rect width="64" height="48"/></svg>',
        "csv": b"path,label\ncat.jpg,cat\n",
        "base64-jpeg": b64,
        "data-url-jpeg": b"data:image/jpeg;base64," + b64,
        "hex-jpeg": jpeg.hex().encode(),
        "pdf": b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
        b"trailer<</Root 1 0 R>>\n%%EOF\n",
        "pdf-pillow": encode(photo(401), "PDF", creationDate=time.gmtime(0), modDate=time.gmtime(0)),
        "postscript": b"%!PS-Adobe-3.0\n/Times findfont 12 scalefont\nshowpage\n",
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\n0 0 moveto 64 48 lineto stroke\n%%EOF\n",
        "zip-with-jpeg": zbuf.getvalue(),
        "zip-deflated": zdeflated.getvalue(),
        "tar-with-jpeg": tbuf.getvalue(),
        "gzip-jpeg": gzip.compress(jpeg, mtime=0),
        "bzip2-header": b"BZh91AY&SY" + bytes(64),
        "xz-header": b"\xfd7zXZ\x00" + bytes(64),
        "7z-header": b"7z\xbc\xaf\x27\x1c" + bytes(64),
        "rar-header": b"Rar!\x1a\x07\x01\x00" + bytes(64),
        "zstd-header": b"\x28\xb5\x2f\xfd" + bytes(64),
        "elf": b"\x7fELF\x02\x01\x01\x00" + bytes(8) + struct.pack("<HHI", 2, 62, 1) + bytes(200),
        "pe-mz": b"MZ\x90\x00" + bytes(56) + struct.pack("<I", 64) + b"PE\x00\x00" + bytes(200),
        "mach-o": b"\xcf\xfa\xed\xfe" + bytes(200),
        "java-class": b"\xca\xfe\xba\xbe\x00\x00\x00\x34" + bytes(64),
        "wasm": b"\x00asm\x01\x00\x00\x00",
        "shell-script": b"#!/bin/sh\nrm -rf /tmp/x\n",
        "python": b"import os\nprint(os.getcwd())\n",
        "mp4": struct.pack(">I", 24) + b"ftypisom\x00\x00\x02\x00isomiso2" + struct.pack(">I", 8) + b"free",
        "mp3-id3": b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(100),
        "wav": b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 8000, 1, 8),
        "avi": b"RIFF" + struct.pack("<I", 100) + b"AVI LIST" + bytes(92),
        "ogg": b"OggS\x00\x02" + bytes(64),
        "sqlite": b"SQLite format 3\x00" + bytes(84),
        "pickle": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
        "protobuf-ish": b"\x0a\x04tiny\x1a\x03abc",
        "ttf-font": b"\x00\x01\x00\x00\x00\x0c" + bytes(100),
    }
    for name, data in files.items():
        add(f"nonimage-{name}", data, REJECT, "non-image")


def _bombs(add: Add) -> None:
    """Headers that claim more pixels than the limit (refused from the header, cheaply)."""
    add("bomb-png-20000x20000-zeros", png_uniform(20000, 20000, 1, 0), REJECT, "bomb", "400 Mpx of 1-bit zeros")
    for w, h in ((65535, 65535), (2**31 - 1, 1), (1, 2**31 - 1), (100000, 100000)):
        add(
            f"bomb-png-header-{w}x{h}",
            PNG_SIGNATURE + png_ihdr(w, h) + png_chunk(b"IDAT", zlib.compress(bytes(64))) + png_chunk(b"IEND", b""),
            REJECT,
            "bomb",
        )
    jpg = encode(photo(500), "JPEG")
    for w, h in ((65535, 65535), (65535, 800), (8000, 7000)):
        add(f"bomb-jpeg-header-{w}x{h}", jpeg_set_size(jpg, w, h), REJECT, "bomb")
    frame = encode(Image.new("P", (1, 1)), "GIF")
    for w, h in ((65535, 65535), (10000, 10000)):
        add(f"bomb-gif-screen-{w}x{h}", frame[:6] + struct.pack("<HH", w, h) + frame[10:], REJECT, "bomb")
    add("bomb-bmp-header-100000x100000", bmp(100000, 100000, 24, 0, bytes(64)), REJECT, "bomb")
    add("bomb-bmp-header-2pow31-1-wide", bmp(2**31 - 1, 1, 8, 0, bytes(64)), REJECT, "bomb")
    add("bomb-bmp-header-negative-huge", bmp(50000, -50000, 8, 0, bytes(64)), REJECT, "bomb")
    tif = bytearray(encode(Image.new("L", (8, 8)), "TIFF"))
    for w, h in ((100000, 100000), (2**31, 2)):
        data = _tiff_set_size(bytes(tif), w, h)
        add(f"bomb-tiff-header-{w}x{h}", data, REJECT, "bomb")
    vp8l = b"/" + struct.pack("<I", (16383) | (16383 << 14))  # VP8L signature + 14-bit dims minus one
    add(
        "bomb-webp-lossless-16384x16384",
        b"RIFF"
        + struct.pack("<I", 4 + 8 + len(vp8l) + 16)
        + b"WEBPVP8L"
        + struct.pack("<I", len(vp8l) + 16)
        + vp8l
        + bytes(16),
        REJECT,
        "bomb",
    )
    vp8x = struct.pack("<I", 0) + (2**24 - 1).to_bytes(3, "little") + (2**24 - 1).to_bytes(3, "little")
    add(
        "bomb-webp-extended-16777216-square",
        b"RIFF" + struct.pack("<I", 4 + 8 + 10) + b"WEBPVP8X" + struct.pack("<I", 10) + vp8x,
        REJECT,
        "bomb",
    )


def _tiff_set_size(tif: bytes, width: int, height: int) -> bytes:
    """Rewrite ImageWidth/ImageLength (as LONG) in a little-endian TIFF's first IFD."""
    data = bytearray(tif)
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for i in range(count):
        pos = ifd + 2 + 12 * i
        tag, _typ, _n = struct.unpack_from("<HHI", data, pos)
        if tag in (256, 257):
            struct.pack_into("<HHII", data, pos, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


def _progressive_scans(width: int, height: int, scans: int) -> bytes:
    """A flat progressive JPEG whose last (tiny) refinement scan is repeated: each copy makes the decoder walk
    every block of the image again, for ~16 bytes of file."""
    base = encode(Image.new("L", (width, height), 128), "JPEG", progressive=True, quality=90)
    segs = jpeg_segments(base)
    start, end = next((s, e) for m, s, e in reversed(segs) if m == 0xDA)
    return base[:end] + base[start:end] * (scans - 1) + base[end:]


def _cost(add: Add) -> None:
    """Cost bombs inside the limits: small files, fewer than MAX_IMAGE_PIXELS, whose decode costs seconds of
    CPU or gigabytes of memory without a cost model (issue 15, item 2)."""
    # RLE8: one pixel, then "end of line" on a 49 Mpx row: Pillow pads it one byte at a time in Python.
    add(
        "cost-bmp-rle8-49000000x1",
        bmp(49_000_000, 1, 8, 1, b"\x01\x00\x00\x00\x00\x01"),
        REJECT,
        "cost",
        "1,084 bytes, RLE8 (pure-Python decoder)",
    )
    add("cost-bmp-rle4-49000000x1", bmp(49_000_000, 1, 4, 2, b"\x01\x00\x00\x00\x00\x01"), REJECT, "cost")
    add(
        "cost-bmp-rle8-7000x7000-eol-rows",
        bmp(7000, 7000, 8, 1, b"\x01\x07\x00\x00" * 7000 + b"\x00\x01"),
        REJECT,
        "cost",
    )
    add(
        "cost-bmp-rle8-small-photo",
        _bmp_rle8(photo(600).quantize(16)),
        REJECT,
        "cost",
        "even a small RLE BMP: outside the allowlist (no RLE)",
    )
    for (w, h), scans in (((1024, 1024), 1000), ((2048, 2048), 5000), ((2048, 2048), 20000), ((4096, 4096), 2000)):
        add(f"cost-jpeg-progressive-{w}x{h}-{scans}-scans", _progressive_scans(w, h, scans), REJECT, "cost")
    add("cost-png-16bit-grey-7071x7071", png_uniform(7071, 7071, 16, 0), REJECT, "cost", "~3 CPU-s in Pillow")
    add("cost-png-rgb-1x50000000", png_uniform(1, 50_000_000, 8, 2), REJECT, "cost", "194 KB -> 2.3 GB RSS")
    add("cost-png-grey-50000000x1", png_uniform(50_000_000, 1, 8, 0), REJECT, "cost")
    add("cost-png-rgba-7071x7071", png_uniform(7071, 7071, 8, 6), REJECT, "cost", "200 MB RGBA at the pixel limit")
    add(
        "cost-gif-7000x7000-20000-frames",
        _gif_frames(7000, 7000, 20000),
        REJECT,
        "cost",
        "every frame is composited on a 49 Mpx canvas",
    )


def _bmp_rle8(img: Image.Image) -> bytes:
    w, h = img.size
    pixels = img.tobytes()
    out = bytearray()
    for row in range(h - 1, -1, -1):  # bottom-up
        line = pixels[row * w : (row + 1) * w]
        x = 0
        while x < w:
            run = 1
            while x + run < w and run < 255 and line[x + run] == line[x]:
                run += 1
            out += bytes([run, line[x]])
            x += run
        out += b"\x00\x00"
    out += b"\x00\x01"
    return bmp(w, h, 8, 1, bytes(out), colours=256)


def _gif_frames(width: int, height: int, frames: int) -> bytes:
    """A GIF with a huge logical screen and many 1x1 frames (a few bytes each)."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    head += b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    frame = b"!\xf9\x04\x00\x01\x00\x00\x00" + b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame * frames + b";"


def _limits(add: Add) -> None:
    """Exactly at and one over the byte and pixel limits."""
    base = encode(photo(700, 640, 480), "JPEG", quality=90)
    for name, target, expect in (
        ("at", MAX_IMAGE_BYTES, ACCEPT),
        ("one-under", MAX_IMAGE_BYTES - 1, ACCEPT),
        ("one-over", MAX_IMAGE_BYTES + 1, REJECT),
    ):
        add(
            f"limit-bytes-{name}-jpeg",
            _pad_jpeg(base, target),
            expect,
            "limit",
            "a real photo with big metadata (COM segments)",
        )
    add("limit-bytes-over-png-trailing", encode(photo(701), "PNG").ljust(MAX_IMAGE_BYTES + 1, b"\x00"), REJECT, "limit")
    # exactly MAX_IMAGE_PIXELS: a big smooth photo (JPEG decodes it at 1/8 scale for a 32 px model)
    w, h = 10000, MAX_IMAGE_PIXELS // 10000
    big = photo(702, 250, h * 250 // w).resize((w, h), Image.Resampling.BILINEAR)
    at = encode(big, "JPEG", quality=70)
    add(f"limit-pixels-at-jpeg-{w}x{h}", at, ACCEPT, "limit", "a 50 Mpx camera photo")
    add(f"limit-pixels-one-over-jpeg-{w}x{h + 1}", jpeg_set_size(at, w, h + 1), REJECT, "limit")
    add("limit-pixels-one-over-png-50000001x1", png_uniform(MAX_IMAGE_PIXELS + 1, 1, 1, 0), REJECT, "limit")
    add("limit-pixels-one-over-png-7072x7071", png_uniform(7072, 7071, 1, 0), REJECT, "limit")
    add("limit-pixels-one-over-gif-7072x7071", _gif_frames(7072, 7071, 1), REJECT, "limit")


def _pad_jpeg(jpeg: bytes, size: int) -> bytes:
    """The same JPEG grown to exactly `size` bytes with COM segments after SOI (4 + up to 65533 bytes each)."""
    need = size - len(jpeg)
    count = -(-need // 65537)
    payload = need - 4 * count
    assert payload >= 0, "too small to pad with segments"
    sizes = [payload // count + (1 if i < payload % count else 0) for i in range(count)]
    data = jpeg_insert(jpeg, *(segment(0xFE, b"c" * n) for n in sizes))
    assert len(data) == size, (len(data), size)
    return data


def _exif_icc(add: Add) -> None:
    """Junk metadata on real photos: classified (metadata is not the image) and never an error."""
    img = photo(800, 64, 48)
    base = encode(img, "JPEG")
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        add(f"exif-orientation-{orientation}", encode(img, "JPEG", exif=exif.tobytes()), ACCEPT, "exif")
    for orientation in (0, 9, 255, 65535):
        add(
            f"exif-orientation-invalid-{orientation}",
            jpeg_insert(base, segment(0xE1, exif_tiff([(0x0112, 3, 1, short(orientation))]))),
            ACCEPT,
            "exif",
        )
    payloads = {
        "orientation-ascii": exif_tiff([(0x0112, 2, 4, b"ABC\x00")]),
        "orientation-count-huge": exif_tiff([(0x0112, 3, 2**31, short(6))]),
        "orientation-rational": exif_tiff([(0x0112, 5, 1, struct.pack("<I", 10**6))]),
        "ifd-loop": exif_tiff([(0x0112, 3, 1, short(6))], next_ifd=8),
        "ifd-offset-past-end": exif_tiff([(0x0112, 3, 1, short(6))], next_ifd=2**31),
        "exif-ifd-pointer-loop": exif_tiff([(0x8769, 4, 1, struct.pack("<I", 8))]),
        "gps-ifd-pointer-past-end": exif_tiff([(0x8825, 4, 1, struct.pack("<I", 2**30))]),
        "big-endian-orientation-3": exif_tiff([(0x0112, 3, 1, short(3, ">"))], byte_order=b"MM"),
        "entry-count-65535": b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff" + bytes(32),
        "bad-byte-order": b"Exif\x00\x00XX*\x00\x08\x00\x00\x00" + bytes(32),
        "truncated-header": b"Exif\x00\x00II*",
        "only-magic": b"Exif\x00\x00",
        "random-body": b"Exif\x00\x00" + random.Random(f"{SEED}-exif").randbytes(2000),
        "tag-type-0": exif_tiff([(0x0112, 0, 1, short(6)), (0x010F, 99, 3, b"ab\x00")]),
    }
    for name, payload in payloads.items():
        add(f"exif-{name}", jpeg_insert(base, segment(0xE1, payload)), ACCEPT, "exif")
    add(
        "exif-two-app1-segments",
        jpeg_insert(
            base,
            segment(0xE1, exif_tiff([(0x0112, 3, 1, short(6))])),
            segment(0xE1, exif_tiff([(0x0112, 3, 1, short(8))])),
        ),
        ACCEPT,
        "exif",
    )
    add(
        "exif-xmp-junk",
        jpeg_insert(base, segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta" + b"A" * 5000)),
        ACCEPT,
        "exif",
    )
    add(
        "exif-max-size-segments",
        jpeg_insert(base, *[segment(0xE1, b"Exif\x00\x00" + bytes(65527))] * 4),
        ACCEPT,
        "exif",
    )
    png = encode(img, "PNG")
    add(
        "exif-png-exif-chunk-orientation-6",
        png_insert(png, png_chunk(b"eXIf", exif_tiff([(0x0112, 3, 1, short(6))])[6:])),
        ACCEPT,
        "exif",
    )
    add("exif-png-exif-chunk-garbage", png_insert(png, png_chunk(b"eXIf", b"garbage" * 10)), ACCEPT, "exif")
    add("exif-webp-garbage", encode(img, "WEBP", exif=b"Exif\x00\x00garbage" * 20), ACCEPT, "exif")
    add("exif-webp-orientation-8", encode(img, "WEBP", exif=exif_tiff([(0x0112, 3, 1, short(8))])), ACCEPT, "exif")
    rng = random.Random(f"{SEED}-icc")
    add("icc-random", encode(img, "JPEG", icc_profile=rng.randbytes(3000)), ACCEPT, "icc")
    add("icc-truncated-header", encode(img, "JPEG", icc_profile=b"\x00\x00\x0c\x48lcms"), ACCEPT, "icc")
    add(
        "icc-claims-huge-size",
        encode(img, "JPEG", icc_profile=struct.pack(">I", 2**31) + rng.randbytes(124)),
        ACCEPT,
        "icc",
    )
    add(
        "icc-multi-chunk-bad-sequence",
        jpeg_insert(
            base,
            segment(0xE2, b"ICC_PROFILE\x00\x05\x02" + rng.randbytes(200)),
            segment(0xE2, b"ICC_PROFILE\x00\x09\x02" + rng.randbytes(200)),
        ),
        ACCEPT,
        "icc",
    )
    add(
        "icc-chunk-count-zero", jpeg_insert(base, segment(0xE2, b"ICC_PROFILE\x00\x00\x00" + bytes(100))), ACCEPT, "icc"
    )
    add("icc-large-1mb", encode(img, "JPEG", icc_profile=rng.randbytes(MB)), ACCEPT, "icc")
    add("icc-png-random", encode(img, "PNG", icc_profile=rng.randbytes(3000)), ACCEPT, "icc")
    add(
        "icc-png-iccp-bad-zlib",
        png_insert(png, png_chunk(b"iCCP", b"junk\x00\x00" + rng.randbytes(500))),
        ANY,
        "icc",
        "an ancillary chunk that cannot be inflated",
    )
    add(
        "icc-png-iccp-zlib-bomb",
        png_insert(png, png_chunk(b"iCCP", b"bomb\x00\x00" + zlib_zeros(200 * MB))),
        ANY,
        "icc",
        "200 MB of zeros inflating from ~200 KB",
    )
    add(
        "text-png-ztxt-zlib-bomb",
        png_insert(png, png_chunk(b"zTXt", b"Comment\x00\x00" + zlib_zeros(100 * MB))),
        ANY,
        "exif",
    )
    add(
        "text-png-1000-text-chunks",
        png_insert(png, *[png_chunk(b"tEXt", b"k%d\x00v" % i) for i in range(1000)]),
        ACCEPT,
        "exif",
    )
    add(
        "text-png-itxt-bad-utf8",
        png_insert(png, png_chunk(b"iTXt", b"k\x00\x00\x00\x00\x00\xff\xfe\xfd")),
        ACCEPT,
        "exif",
    )
    add(
        "text-png-unknown-critical-chunk",
        png_insert(png, png_chunk(b"ABCD", b"1234")),
        ANY,
        "exif",
        "an unknown critical chunk: the PNG spec says stop",
    )
    add("text-png-unknown-ancillary-chunk", png_insert(png, png_chunk(b"abCd", b"1234")), ACCEPT, "exif")
    add("text-jpeg-comment-php", jpeg_insert(base, segment(0xFE, b"<?php system($_GET['c']); ?>")), ACCEPT, "exif")


# Pillow modes and how each reaches a promised format; 16-bit, 32-bit and float are not photos users send
PHOTO_MODES = (
    "1",
    "L",
    "LA",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBX",
    "CMYK",
    "YCbCr",
    "I;16",
    "I;16B",
    "I;16L",
    "I;16N",
    "I",
)


def _modes(add: Add) -> None:
    """20+ Pillow modes, each saved in every promised format that takes it."""
    img = photo(900, 48, 40)
    grey = np.asarray(img.convert("L"), np.float32)
    arrays: dict[str, Image.Image] = {}
    for mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa"):
        try:
            arrays[mode] = (
                img.convert("RGBA").convert(mode) if mode in ("LA", "La", "RGBa", "PA") else img.convert(mode)
            )
        except ValueError:
            try:
                arrays[mode] = img.convert("RGBA").convert("P").convert(mode)
            except ValueError:
                continue
    arrays["I;16"] = Image.fromarray((grey * 257).astype(np.uint16))
    arrays["I;16B"] = Image.frombytes("I;16B", img.size, (grey * 257).astype(">u2").tobytes())
    arrays["I;16L"] = Image.frombytes("I;16L", img.size, (grey * 257).astype("<u2").tobytes())
    arrays["I"] = Image.fromarray((grey * 1000).astype(np.int32))
    arrays["I;16N"] = Image.frombytes("I;16N", img.size, (grey * 257).astype("=u2").tobytes())
    arrays["F"] = Image.fromarray((grey / 255.0).astype(np.float32))
    for mode_img in arrays.values():  # RGB->LAB attaches a littlecms profile stamped with the current time
        mode_img.info.pop("icc_profile", None)
    formats = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
    seen = set()
    for mode, mode_img in arrays.items():
        for fmt, key in formats.items():
            try:
                data = encode(mode_img, fmt)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if (data, mode) in seen:
                continue
            seen.add((data, mode))
            if fmt == "TIFF":
                expect = TIFF_EXPECT if mode in PHOTO_MODES and mode not in ("YCbCr", "I") else ANY
            else:
                expect = ACCEPT if mode in PHOTO_MODES or mode in ("La", "RGBa", "LAB", "HSV") else ANY
            safe = {"La": "la-premultiplied", "RGBa": "rgba-premultiplied"}.get(mode, mode.replace(";", "").lower())
            add(f"mode-{safe}-{key}", data, expect, "mode", f"Pillow mode {mode} saved as {fmt}")
    signed = encode(Image.fromarray((grey * 100).astype(np.uint16)), "TIFF", tiffinfo={339: 2})  # SampleFormat=2
    add("mode-i16s-tiff", signed, ANY, "mode", "Pillow mode I;16S (signed 16-bit TIFF, opened as I)")


def _polyglots(add: Add) -> None:
    """One file, two formats: classified when it starts as a promised image, refused otherwise."""
    img = photo(1000)
    jpeg, png, gif = encode(img, "JPEG"), encode(img, "PNG"), encode(img, "GIF")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr(zipfile.ZipInfo("payload.js", FIXED_TIME), "alert(1)")
    zip_bytes = zbuf.getvalue()
    pdf = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    html = b"<html><script>alert(document.cookie)</script></html>"
    mp4 = struct.pack(">I", 24) + b"ftypmp42\x00\x00\x00\x00mp42isom" + struct.pack(">I", 8) + b"mdat"
    for name, data, expect in (
        ("jpeg-then-zip", jpeg + zip_bytes, ACCEPT),
        ("jpeg-then-pdf", jpeg + pdf, ACCEPT),
        ("jpeg-then-html", jpeg + html, ACCEPT),
        ("jpeg-motion-photo-mp4", jpeg + mp4, ACCEPT),
        ("png-then-zip", png + zip_bytes, ACCEPT),
        ("png-then-html", png + html, ACCEPT),
        ("gif-then-javascript", gif + b"*/=1;alert(1);/*", ACCEPT),
        ("png-then-jpeg", png + jpeg, ACCEPT),
        ("jpeg-then-jpeg", jpeg + encode(photo(1001), "JPEG"), ACCEPT),
        ("jpeg-com-html", jpeg_insert(jpeg, segment(0xFE, html)), ACCEPT),
        ("png-text-html", png_insert(png, png_chunk(b"tEXt", b"Comment\x00" + html)), ACCEPT),
        ("zip-then-jpeg", zip_bytes + jpeg, REJECT),
        ("pdf-then-jpeg", pdf + jpeg, REJECT),
        ("html-then-jpeg", html + jpeg, REJECT),
        ("html-then-png", html + png, REJECT),
        ("whitespace-then-jpeg", b"\n" + jpeg, REJECT),
        ("bom-then-png", b"\xef\xbb\xbf" + png, REJECT),
        ("jpeg-inside-pdf-stream", pdf[:-6] + b"stream\n" + jpeg + b"\nendstream\n%%EOF\n", REJECT),
        ("gif-header-js-comment", b"GIF89a/*" + b"\x00" * 7 + b"*/=1;alert(1)", REJECT),
        ("bmp-header-html", b"BM" + html, REJECT),
    ):
        add(f"polyglot-{name}", data, expect, "polyglot")


def _text_formats(add: Add) -> None:
    """Formats Pillow opens that are plain text: none of them is a photo."""
    bits = (np.asarray(photo(1100, 16, 16).convert("L")) > 128).astype(int)
    xbm_bytes = [int("".join(str(b) for b in reversed(bits[r, c : c + 8])), 2) for r in range(16) for c in (0, 8)]
    xbm = (
        "#define cat_width 16\n#define cat_height 16\nstatic char cat_bits[] = {\n"
        + ", ".join(f"0x{b:02x}" for b in xbm_bytes)
        + "};\n"
    ).encode()
    add("textfmt-xbm-16x16", xbm, REJECT, "text-format")
    add("textfmt-xbm-pillow", encode(photo(1101).convert("1"), "XBM"), REJECT, "text-format")
    add(
        "textfmt-xbm-hotspot",
        b"#define a_width 8\n#define a_height 2\n#define a_x_hot 1\n#define a_y_hot 1\n"
        b"static unsigned char a_bits[] = { 0xff, 0x00 };\n",
        REJECT,
        "text-format",
    )
    add(
        "textfmt-xbm-huge-claim",
        b"#define a_width 10000\n#define a_height 5000\nstatic char a_bits[] = { 0x00 };\n",
        REJECT,
        "text-format",
    )
    xpm = (
        b'/* XPM */\nstatic char *cat[] = {\n"8 4 2 1",\n"a c #FF0000",\n"b c #0000FF",\n'
        b'"aaaabbbb",\n"abababab",\n"bbbbaaaa",\n"babababa"\n};\n'
    )
    add("textfmt-xpm-8x4", xpm, REJECT, "text-format")
    palette = [f'"{chr(65 + i)} c #{i * 16:02X}{255 - i * 16:02X}80",\n' for i in range(16)]
    rows = ['"' + "".join(chr(65 + (x * y) % 16) for x in range(32)) + '",\n' for y in range(32)]
    add(
        "textfmt-xpm-32x32-16-colours",
        ('/* XPM */\nstatic char *p[] = {\n"32 32 16 1",\n' + "".join(palette) + "".join(rows) + "};\n").encode(),
        REJECT,
        "text-format",
    )
    add("textfmt-xpm-none-colour", xpm.replace(b"#0000FF", b"None"), REJECT, "text-format")
    grey = np.asarray(photo(1102, 12, 8).convert("L"))
    rgb = np.asarray(photo(1103, 12, 8))
    add(
        "textfmt-ppm-p1",
        ("P1\n12 8\n" + "\n".join(" ".join(str(int(v > 128)) for v in row) for row in grey)).encode(),
        REJECT,
        "text-format",
    )
    add(
        "textfmt-ppm-p2",
        ("P2\n12 8\n255\n" + "\n".join(" ".join(map(str, row)) for row in grey)).encode(),
        REJECT,
        "text-format",
    )
    add(
        "textfmt-ppm-p2-maxval-65535",
        ("P2\n12 8\n65535\n" + "\n".join(" ".join(str(int(v) * 257) for v in row) for row in grey)).encode(),
        REJECT,
        "text-format",
    )
    add(
        "textfmt-ppm-p3",
        ("P3\n12 8\n255\n" + "\n".join(" ".join(map(str, row.ravel())) for row in rgb)).encode(),
        REJECT,
        "text-format",
    )
    add(
        "textfmt-ppm-p3-comments",
        ("P3\n# a comment\n12 8 # more\n255\n" + "\n".join(" ".join(map(str, row.ravel())) for row in rgb)).encode(),
        REJECT,
        "text-format",
    )
    add("textfmt-ppm-p2-huge-claim", b"P2\n7000 7000\n255\n1 2 3\n", REJECT, "text-format")
    add("textfmt-ppm-p3-one-pixel", b"P3 1 1 255 255 0 0", REJECT, "text-format")
    add("textfmt-ppm-p1-no-whitespace", b"P1\n4 4\n0101101001011010", REJECT, "text-format")
    for mode, key in (("1", "p4"), ("L", "p5"), ("RGB", "p6"), ("I", "p5-16bit")):
        img = photo(1104, 12, 8)
        src = img.convert(mode) if mode != "I" else Image.fromarray(np.asarray(img.convert("L"), np.int32) * 200)
        add(f"textfmt-ppm-binary-{key}", encode(src, "PPM"), REJECT, "text-format", "PPM/PGM/PBM: not promised")
    add(
        "textfmt-pam-p7",
        b"P7\nWIDTH 2\nHEIGHT 2\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n" + bytes(12),
        REJECT,
        "text-format",
    )
    for name, value in (("nan", np.nan), ("inf", np.inf), ("finite", 0.5)):
        pfm = b"Pf\n4 4\n-1.0\n" + np.full(16, value, "<f4").tobytes()
        add(f"textfmt-pfm-{name}", pfm, REJECT, "text-format", "float PFM")


def _float_tiffs(add: Add) -> None:
    """Float TIFFs of NaN and infinities are never a photo (issue 15, item 4: NaN TIFF -> "dandelion" 0.82)."""
    shape = (40, 48)
    rng = np.random.default_rng(SEED)
    values = {
        "nan": np.full(shape, np.nan),
        "pos-inf": np.full(shape, np.inf),
        "neg-inf": np.full(shape, -np.inf),
        "mixed-nan-inf": rng.choice([np.nan, np.inf, -np.inf], shape),
        "half-nan": np.where(rng.random(shape) < 0.5, np.nan, 0.5),
        "one-nan-pixel": np.where(np.arange(shape[0] * shape[1]).reshape(shape) == 7, np.nan, 0.5),
        "max-float": np.full(shape, np.finfo(np.float32).max),
        "denormals": np.full(shape, 1e-45),
    }
    for name, arr in values.items():
        data = encode(Image.fromarray(arr.astype(np.float32)), "TIFF")
        expect = ANY if name in ("max-float", "denormals") else REJECT
        add(f"float-tiff-{name}", data, expect, "float", "mode F TIFF")
    add(
        "float-tiff-nan-lzw",
        encode(Image.fromarray(np.full(shape, np.nan, np.float32)), "TIFF", compression="tiff_lzw"),
        REJECT,
        "float",
    )


def _other_formats(add: Add) -> None:
    """Formats Pillow reads that the docs never promise: refused, however valid (the allowlist)."""
    img = photo(1200, 64, 48)
    savers = [
        ("tga", "TGA", {}),
        ("tga-rle", "TGA", {"compression": "tga_rle"}),
        ("tga-rgba", "TGA", {"mode": "RGBA"}),
        ("pcx", "PCX", {}),
        ("pcx-palette", "PCX", {"mode": "P"}),
        ("ico", "ICO", {}),
        ("ico-png-256", "ICO", {"sizes": [(256, 256)]}),
        ("dds", "DDS", {}),
        ("dds-rgba", "DDS", {"mode": "RGBA"}),
        ("dds-bc1", "DDS", {"pixel_format": "DXT1"}),
        ("qoi", "QOI", {}),
        ("qoi-rgba", "QOI", {"mode": "RGBA"}),
        ("j2k", "JPEG2000", {}),
        ("jp2", "JPEG2000", {"no_jp2": False}),
        ("j2k-irreversible", "JPEG2000", {"irreversible": True}),
        ("icns", "ICNS", {}),
        ("avif", "AVIF", {}),
        ("sgi", "SGI", {}),
        ("sgi-grey", "SGI", {"mode": "L"}),
        ("im", "IM", {}),
        ("msp", "MSP", {"mode": "1"}),
        ("spider", "SPIDER", {"mode": "F"}),
        ("blp", "BLP", {"mode": "P"}),
        ("dib", "DIB", {}),
        ("eps", "EPS", {}),
        ("ppm", "PPM", {}),
        ("palm", "PALM", {"mode": "P"}),
        ("mpo", "MPO", {}),
        ("wmf-none", None, {}),
    ]
    for name, fmt, params in savers:
        if fmt is None:
            continue
        mode = params.pop("mode", None)
        src = img if mode is None else (img.convert("RGBA").convert(mode) if mode in ("RGBA",) else img.convert(mode))
        if fmt in ("ICNS",):
            src = photo(1201, 128, 128)
        try:
            data = encode(src, fmt, **params)
        except (OSError, ValueError, KeyError, TypeError, ImportError):
            continue  # this Pillow build cannot write it
        expect = ANY if fmt == "MPO" else REJECT
        note = "MPO starts as a baseline JPEG (cameras write it)" if fmt == "MPO" else f"{fmt}: not promised"
        add(f"format-{name}", data, expect, "format", note)
        for k, cut in enumerate((0.5,)):
            add(f"format-{name}-truncated-{k}", data[: int(len(data) * cut)], REJECT, "format")
    qoi = encode(img, "QOI")
    add("format-qoi-24-bytes-named-png", qoi[:24], REJECT, "format", "issue 15, item 7: IndexError in training")
    add("format-qoi-header-only", qoi[:14], REJECT, "format")
    fits = (
        b"SIMPLE  =                    T"
        + b" " * 50
        + b"BITPIX  =                  -32"
        + b" " * 49
        + b"NAXIS   =                    2"
        + b" " * 49
        + b"NAXIS1  =                   16"
        + b" " * 49
        + b"NAXIS2  =                   16"
        + b" " * 49
        + b"END"
        + b" " * 77
    ).ljust(2880, b" ")
    add("format-fits-float-nan", fits + np.full(256, np.nan, ">f4").tobytes().ljust(2880, b"\x00"), REJECT, "format")
    add("format-fits-float-zero", fits + bytes(2880), REJECT, "format")
    psd = (
        b"8BPS\x00\x01"
        + bytes(6)
        + struct.pack(">HIIHH", 3, 48, 64, 8, 3)
        + struct.pack(">I", 0) * 3
        + struct.pack(">H", 0)
        + bytes(64 * 48 * 3)
    )
    add("format-psd-raw", psd, REJECT, "format")
    add("format-xvthumb", b"P7 332\n#XVVERSION:\n#IMGINFO:\n#END_OF_COMMENTS\n8 8 255\n" + bytes(64), REJECT, "format")
    add(
        "format-gbr-brush",
        struct.pack(">IIIII", 28 + 4, 2, 8, 8, 1) + b"GIMP" + struct.pack(">I", 10) + b"x\x00" + bytes(64),
        REJECT,
        "format",
    )
    add("format-pcd-stub", bytes(2048) + b"PCD_IPI" + bytes(4096), REJECT, "format")
    add("format-ftex-stub", b"FTEX" + struct.pack("<IIIII", 1, 8, 8, 1, 1) + bytes(128), REJECT, "format")
    add("format-mcidas-stub", struct.pack(">I", 0) + struct.pack(">I", 4) + bytes(248), REJECT, "format")
    add("format-grib-stub", b"GRIB" + bytes(64), REJECT, "format")
    add("format-bufr-stub", b"BUFR" + bytes(64), REJECT, "format")
    add("format-hdf5-stub", b"\x89HDF\r\n\x1a\n" + bytes(64), REJECT, "format")
    add("format-wmf-stub", b"\xd7\xcd\xc6\x9a" + bytes(64), REJECT, "format")
    add("format-heic-stub", MAGICS["heic"] + bytes(64), REJECT, "format")
    add("format-cur", _as_cur(encode(photo(1202, 32, 32), "ICO", sizes=[(32, 32)])), REJECT, "format")
    add("format-fli-stub", struct.pack("<IHHHHH", 128, 0xAF12, 1, 64, 48, 8) + bytes(118), REJECT, "format")
    add("format-sun-raster", struct.pack(">8I", 0x59A66A95, 8, 8, 8, 64, 1, 0, 0) + bytes(64), REJECT, "format")
    add("format-imt-stub", b"\x0c\x00" + b"width 8\x0cheight 8\x0cpixel n8\x0c" + bytes(64), REJECT, "format")


def _as_cur(ico: bytes) -> bytes:
    return ico[:2] + b"\x02\x00" + ico[4:]


FAMILIES: tuple[Callable[[Add], None], ...] = (
    _good,
    _mutations,
    _random,
    _non_images,
    _bombs,
    _cost,
    _limits,
    _exif_icc,
    _modes,
    _polyglots,
    _text_formats,
    _float_tiffs,
    _other_formats,
)


@cache
def build() -> tuple[Case, ...]:
    """Every case, in a fixed order (same bytes on every run of the same Pillow)."""
    return collect(FAMILIES)


def collect(families) -> tuple[Case, ...]:
    """The cases of some families only (e.g. cheap seeds for the property tests)."""
    cases: list[Case] = []
    names: set[str] = set()

    def add(name: str, data: bytes, expect: str, kind: str, note: str = "") -> None:
        assert name not in names, f"duplicate case name {name}"
        assert expect in (ACCEPT, REJECT, ANY), expect
        names.add(name)
        cases.append(Case(name, bytes(data), expect, kind, note))

    for family in families:
        family(add)
    return tuple(cases)


def digest(cases: tuple[Case, ...]) -> str:
    """One SHA-256 over the corpus: two runs (or machines with the same Pillow) generated the same cases."""
    import hashlib

    h = hashlib.sha256()
    for case in cases:
        h.update(f"{case.name}\0{case.expect}\0{len(case.data)}\0".encode())
        h.update(case.data)
    return h.hexdigest()


def by_name() -> dict[str, Case]:
    return {case.name: case for case in build()}


def iter_kind(*kinds: str) -> Iterator[Case]:
    return (case for case in build() if case.kind in kinds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List (or write out) the generated hostile-input corpus.")
    parser.add_argument("--list", action="store_true", help="one line per case: name, bytes, expect, kind")
    parser.add_argument("--write", metavar="DIR", help="write each case to DIR/NAME.bin (for other tools)")
    parser.add_argument("--digest", action="store_true", help="print a SHA-256 of every name, expectation and byte")
    args = parser.parse_args(argv)
    cases = build()
    if args.list:
        for case in cases:
            print(f"{case.name:60s} {len(case.data):>10d} {case.expect:7s} {case.kind}")
    if args.digest:
        print(digest(cases))
    if args.write:
        from pathlib import Path

        out = Path(args.write)
        out.mkdir(parents=True, exist_ok=True)
        for case in cases:
            (out / f"{case.name}.bin").write_bytes(case.data)
    print(
        f"{len(cases)} cases: {dict(Counter(c.expect for c in cases))}; by kind {dict(Counter(c.kind for c in cases))}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
