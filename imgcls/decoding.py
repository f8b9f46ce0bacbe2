"""Hostile-input defences for image decoding: a format allowlist, a header-only cost model, and a killable pool.

Three layers, each cheaper than the next, so a bad image costs as little as possible:

1. `probe` reads only the container headers (JPEG markers, PNG chunks, GIF/BMP/WebP/TIFF headers) with our
   own bounded parsers: no Pillow plugin ever runs on bytes we have not identified, so a format outside the
   allowlist (XBM, PPM, TGA, QOI, ...) is refused by name before any parser touches it.
2. `check_cost` turns the header into an estimate of the decode's CPU time and peak memory (pixels x bands x
   bit depth, JPEG scans x blocks, the resize's intermediate image, ...) and refuses anything over the
   per-image budget with the reason. The estimate is calibrated on a 2-core x86 VM (docs/hostile-input.md).
3. `DecodePool` decodes in worker processes that the kernel stops at `cpu_seconds` of CPU time (ITIMER_PROF,
   RLIMIT_CPU as a backstop) and whose address space is capped (RLIMIT_AS), and the caller kills a worker
   the moment its request's deadline passes or it is cancelled. So even an image the estimate gets wrong
   costs at most `cpu_seconds` and one worker's memory, and never outlives its request.

Training and export use layers 1-2 in process (`imgcls.preprocessing.load_uint8`): a bad file is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import re
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from imgcls.errors import DecodeAborted, DecodeMemoryError, ImageDecodeError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from imgcls.preprocessing import PreprocessingSpec

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000  # well above any camera photo, far below a decompression bomb
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # the formats we have a cost model for
DEFAULT_FORMATS = SUPPORTED_FORMATS
_ALIASES = {"JPG": "JPEG", "TIF": "TIFF", "MPO": "JPEG"}

MiB = 1024 * 1024


@dataclass(frozen=True)
class DecodeLimits:
    """What one image may be and may cost. Estimates are checked before decoding; the pool enforces the rest.

    `cost_budget_seconds` and `memory_budget_bytes` bound the *estimated* CPU time and peak memory of one
    decode (checked from the headers, in the caller). `cpu_seconds` and `memory_limit_bytes` are the hard
    bounds the pool's workers run under, which hold even when the estimate is wrong; keep them above the
    budgets so that a correctly estimated image is never killed.
    """

    formats: tuple[str, ...] = DEFAULT_FORMATS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_jpeg_scans: int = 100  # libjpeg re-walks every block once per scan; real encoders use <= ~20
    max_chunks: int = 20_000  # PNG chunks, GIF blocks, WebP chunks: Pillow walks each one in Python
    max_exif_bytes: int = 256 * 1024  # JPEG's APP1 caps real EXIF at 64 KB; PNG/WebP have no cap of their own
    cost_budget_seconds: float = 0.8
    memory_budget_bytes: int = 384 * MiB
    cpu_seconds: float = 1.0
    memory_limit_bytes: int = 512 * MiB
    wall_seconds: float = 10.0  # a worker stuck without using CPU (it should never be) is killed after this

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", parse_formats(self.formats))
        if self.cpu_seconds <= 0 or self.wall_seconds <= 0:
            raise ValueError("cpu_seconds and wall_seconds must be > 0")


def parse_formats(formats: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """`"jpeg,png"` or a sequence -> canonical Pillow names; only formats with a cost model are accepted.

    The server's `--image-formats` / IMGCLS_IMAGE_FORMATS goes through here, so a typo fails at start-up.
    """
    if formats is None:
        return DEFAULT_FORMATS
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for item in items:
        name = str(item).strip().upper()
        if not name:
            continue
        name = _ALIASES.get(name, name)
        if name not in SUPPORTED_FORMATS:
            raise ValueError(f"image format {item!r} is not supported (no decode cost model); "
                             f"choose from {', '.join(SUPPORTED_FORMATS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("the image format allowlist is empty")
    return tuple(out)


# --- header probes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageHeader:
    """What the container headers say, before any pixel is decoded."""

    format: str  # Pillow's plugin name: the only one `Image.open(formats=...)` will be given
    width: int
    height: int
    bands: int  # samples per pixel in the file
    bits: int  # bits per sample
    pil_pixel_bytes: int  # bytes per pixel of the image Pillow builds (RGB is stored as 4)
    alpha: bool = False
    frames: int = 1  # frames in the file; only the first is ever decoded
    progressive: bool = False
    scans: int = 1
    scan_blocks: int = 0  # JPEG: 8x8 blocks entropy-decoded, summed over scans
    coef_bytes: int = 0  # JPEG progressive: libjpeg's whole-image coefficient buffer
    chunks: int = 0
    compression: str = ""
    exif_bytes: int = 0

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class DecodeCost:
    """The estimated cost of decoding (and resizing) one image."""

    header: ImageHeader
    decoded_size: tuple[int, int]  # (width, height) Pillow decodes to (JPEG draft scaling applied)
    cpu_seconds: float
    memory_bytes: int
    reasons: list[str] = field(default_factory=list)


def _u16be(b: bytes, o: int) -> int:
    return (b[o] << 8) | b[o + 1]


_JPEG_SOF = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless", 0xC5: "differential",
             0xC6: "differential progressive", 0xC7: "differential lossless", 0xC9: "arithmetic",
             0xCA: "arithmetic progressive", 0xCB: "arithmetic lossless", 0xCD: "arithmetic differential",
             0xCE: "arithmetic differential progressive", 0xCF: "arithmetic differential lossless"}
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # the next marker after entropy-coded data


def _probe_jpeg(data: bytes, limits: DecodeLimits) -> ImageHeader:
    n = len(data)
    pos = 2
    sof: tuple[int, int, int, int, list[tuple[int, int, int]]] | None = None  # marker, precision, w, h, comps
    blocks_by_comp: dict[int, int] = {}
    scans = scan_blocks = chunks = exif = 0
    while pos < n:
        if data[pos] != 0xFF:  # libjpeg skips stray bytes between markers (with a warning); so do we
            nxt = data.find(b"\xff", pos)
            if nxt < 0:
                break
            pos = nxt
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        chunks += 1
        if chunks > limits.max_chunks:
            raise ImageDecodeError(f"JPEG with over {limits.max_chunks} markers")
        if marker == 0xD9:
            break
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            continue
        if pos + 2 > n:
            break
        length = _u16be(data, pos)
        if length < 2:
            raise ImageDecodeError("corrupt JPEG (marker segment shorter than its length field)")
        seg = data[pos + 2:pos + length]
        if marker == 0xE1 and seg[:6] == b"Exif\x00\x00":
            exif += len(seg)
        if marker in _JPEG_SOF and sof is None:
            if len(seg) < 6:
                raise ImageDecodeError("corrupt JPEG (short frame header)")
            precision, height, width, ncomp = seg[0], _u16be(seg, 1), _u16be(seg, 3), seg[5]
            if marker not in (0xC0, 0xC1, 0xC2):
                raise ImageDecodeError(f"{_JPEG_SOF[marker]} JPEG coding is not accepted "
                                       "(only baseline and progressive Huffman JPEG)")
            if height == 0 or width == 0:
                raise ImageDecodeError(f"JPEG with a {width}x{height} frame (zero or DNL-defined size)")
            if precision != 8 or not 1 <= ncomp <= 4 or len(seg) < 6 + 3 * ncomp:
                raise ImageDecodeError(f"JPEG with {precision}-bit samples and {ncomp} components is not accepted")
            comps = [(seg[6 + 3 * i], seg[7 + 3 * i] >> 4 or 1, seg[7 + 3 * i] & 15 or 1) for i in range(ncomp)]
            sof = (marker, precision, width, height, comps)
            hmax = max(c[1] for c in comps)
            vmax = max(c[2] for c in comps)
            for cid, hs, vs in comps:
                cw = math.ceil(width * hs / hmax)
                ch = math.ceil(height * vs / vmax)
                blocks_by_comp[cid] = math.ceil(cw / 8) * math.ceil(ch / 8)
        pos += length
        if marker == 0xDA:
            if sof is None:
                raise ImageDecodeError("corrupt JPEG (scan before the frame header)")
            scans += 1
            if scans > limits.max_jpeg_scans:
                kind = "progressive" if sof[0] == 0xC2 else "baseline"
                raise ImageDecodeError(f"{kind} JPEG with more than {limits.max_jpeg_scans} scans; "
                                       f"at most {limits.max_jpeg_scans} allowed")
            ns = seg[0] if seg else 0
            scan_blocks += sum(blocks_by_comp.get(seg[1 + 2 * i], 0) for i in range(ns) if 2 + 2 * i <= len(seg))
            m = _JPEG_MARKER.search(data, pos)
            pos = m.start() if m else n
    if sof is None:
        raise ImageDecodeError("corrupt or truncated JPEG (no frame header)")
    if scans == 0:
        raise ImageDecodeError("corrupt or truncated JPEG (no image data)")
    marker, _, width, height, comps = sof
    progressive = marker == 0xC2
    total_blocks = sum(blocks_by_comp.values())
    return ImageHeader(
        "JPEG", width, height, len(comps), 8, 1 if len(comps) == 1 else 4, progressive=progressive, scans=scans,
        scan_blocks=scan_blocks, coef_bytes=total_blocks * 128 if progressive or scans > 1 else 0, chunks=chunks,
        compression=_JPEG_SOF[marker], exif_bytes=exif)


_PNG_BANDS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _probe_png(data: bytes, limits: DecodeLimits) -> ImageHeader:
    n = len(data)
    pos = 8
    ihdr = None
    frames = 1
    chunks = exif = 0
    while pos + 8 <= n:
        length = struct.unpack_from(">I", data, pos)[0]
        ctype = data[pos + 4:pos + 8]
        body = pos + 8
        chunks += 1
        if chunks > limits.max_chunks:
            raise ImageDecodeError(f"PNG with over {limits.max_chunks} chunks; at most {limits.max_chunks} allowed")
        if ctype == b"IHDR":
            if length < 13 or body + 13 > n:
                raise ImageDecodeError("corrupt PNG (short IHDR)")
            ihdr = struct.unpack_from(">IIBBBBB", data, body)
        elif ihdr is None:
            raise ImageDecodeError("corrupt PNG (first chunk is not IHDR)")
        elif ctype == b"acTL" and length >= 8 and body + 8 <= n:
            frames = max(1, struct.unpack_from(">I", data, body)[0])
        elif ctype == b"eXIf":
            exif += length
        elif ctype == b"IEND":
            break
        pos = body + length + 4
    if ihdr is None:
        raise ImageDecodeError("corrupt or truncated PNG (no IHDR)")
    width, height, depth, ctype, _, _, interlace = ihdr
    if ctype not in _PNG_BANDS or depth not in (1, 2, 4, 8, 16):
        raise ImageDecodeError(f"corrupt PNG (colour type {ctype}, bit depth {depth})")
    if width == 0 or height == 0:
        raise ImageDecodeError(f"PNG with a {width}x{height} image")
    bands = _PNG_BANDS[ctype]
    # I;16 or L/P/1; RGB, RGBA and LA are stored 4 bytes per pixel (16-bit samples reduced to 8)
    pil = (2 if depth == 16 else 1) if ctype in (0, 3) else 4
    return ImageHeader("PNG", width, height, bands, depth, pil, alpha=ctype in (4, 6), frames=frames,
                       chunks=chunks, compression="deflate" + (" interlaced" if interlace else ""), exif_bytes=exif)


def _probe_gif(data: bytes, limits: DecodeLimits) -> ImageHeader:
    n = len(data)
    if n < 13:
        raise ImageDecodeError("corrupt or truncated GIF (short header)")
    sw, sh, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
    blocks = 0
    while pos < n:
        kind = data[pos]
        if kind == 0x2C:  # image descriptor: the first frame, the only one decoded
            if pos + 10 > n:
                break
            left, top, fw, fh = struct.unpack_from("<HHHH", data, pos + 1)
            width, height = max(sw, left + fw), max(sh, top + fh)
            if width == 0 or height == 0:
                raise ImageDecodeError(f"GIF with a {width}x{height} image")
            return ImageHeader("GIF", width, height, 1, 8, 4, chunks=blocks, compression="LZW")
        if kind != 0x21 or pos + 2 > n:  # anything but an extension before the first frame: no frame
            break
        pos += 2
        while pos < n and data[pos]:  # the extension's sub-blocks; Pillow walks them in Python
            blocks += 1
            if blocks > limits.max_chunks:
                raise ImageDecodeError(f"GIF with over {limits.max_chunks} extension blocks before its first frame")
            pos += data[pos] + 1
        pos += 1
    raise ImageDecodeError("corrupt or truncated GIF (no image frame)")


_BMP_COMPRESSION = {0: "none", 1: "RLE8", 2: "RLE4", 3: "bitfields", 4: "JPEG", 5: "PNG", 6: "alpha bitfields"}


def _probe_bmp(data: bytes, limits: DecodeLimits) -> ImageHeader:
    if len(data) < 26:
        raise ImageDecodeError("corrupt or truncated BMP (short header)")
    dib = struct.unpack_from("<I", data, 14)[0]
    if dib == 12:
        width, height, _, bpp = struct.unpack_from("<HHHH", data, 18)
        compression = 0
    elif dib >= 40 and len(data) >= 14 + 40:
        width, height, _, bpp, compression = struct.unpack_from("<iiHHI", data, 18)
        height = abs(height)
    else:
        raise ImageDecodeError(f"BMP with an unsupported header ({dib} bytes)")
    if compression in (1, 2):
        raise ImageDecodeError(f"{_BMP_COMPRESSION[compression]}-compressed BMP is not accepted "
                               "(Pillow decodes it in pure Python); save it uncompressed")
    if compression not in (0, 3, 6):
        raise ImageDecodeError(f"BMP with {_BMP_COMPRESSION.get(compression, compression)} compression "
                               "is not accepted")
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"BMP with a {width}x{height} image")
    if bpp not in (1, 2, 4, 8, 16, 24, 32):
        raise ImageDecodeError(f"BMP with {bpp} bits per pixel")
    pil = 1 if bpp <= 8 else 4
    return ImageHeader("BMP", width, height, 1 if bpp <= 8 else 3, min(bpp, 8), pil, alpha=bpp == 32,
                       compression=_BMP_COMPRESSION[compression])


def _probe_webp(data: bytes, limits: DecodeLimits) -> ImageHeader:
    n = len(data)
    pos = 12
    size = None
    alpha = False
    frames = 0
    chunks = exif = 0
    kind = ""
    while pos + 8 <= n:
        fourcc = data[pos:pos + 4]
        length = struct.unpack_from("<I", data, pos + 4)[0]
        body = data[pos + 8:pos + 8 + min(length, 16)]
        chunks += 1
        if chunks > limits.max_chunks:
            raise ImageDecodeError(f"WebP with over {limits.max_chunks} chunks")
        if fourcc == b"VP8X" and len(body) >= 10:
            alpha = bool(body[0] & 0x10)
            size = (int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1)
            kind = "extended"
        elif fourcc == b"VP8 " and size is None:
            if len(body) < 10 or body[3:6] != b"\x9d\x01\x2a":
                raise ImageDecodeError("corrupt WebP (bad VP8 frame header)")
            size = (struct.unpack_from("<H", body, 6)[0] & 0x3FFF, struct.unpack_from("<H", body, 8)[0] & 0x3FFF)
            kind = "lossy"
        elif fourcc == b"VP8L" and size is None:
            if len(body) < 5 or body[0] != 0x2F:
                raise ImageDecodeError("corrupt WebP (bad VP8L header)")
            bits = struct.unpack_from("<I", body, 1)[0]
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
            alpha = bool(bits >> 28 & 1)
            kind = "lossless"
        elif fourcc == b"ANMF":
            frames += 1
        elif fourcc == b"EXIF":
            exif += length
        pos += 8 + length + (length & 1)
    if size is None:
        raise ImageDecodeError("corrupt or truncated WebP (no image header)")
    width, height = size
    if width == 0 or height == 0:
        raise ImageDecodeError(f"WebP with a {width}x{height} image")
    return ImageHeader("WEBP", width, height, 4 if alpha else 3, 8, 4, alpha=alpha, frames=max(1, frames),
                       chunks=chunks, compression=kind, exif_bytes=exif)


_TIFF_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8,
                   18: 8}
_TIFF_COMPRESSION = {1: "none", 5: "LZW", 8: "deflate", 32946: "deflate"}
_TIFF_MAX_TAG_BYTES = 8 * MiB  # strip/tile offsets of a 50-megapixel image in 16 px tiles are ~1.6 MB


def _probe_tiff(data: bytes, limits: DecodeLimits) -> ImageHeader:
    n = len(data)
    if data[:4] in (b"II+\x00", b"MM\x00+"):
        raise ImageDecodeError("BigTIFF is not accepted")
    end = "<" if data[:2] == b"II" else ">"
    if n < 8:
        raise ImageDecodeError("corrupt or truncated TIFF (short header)")
    ifd = struct.unpack_from(end + "I", data, 4)[0]
    if ifd + 2 > n:
        raise ImageDecodeError("corrupt or truncated TIFF (first directory outside the file)")
    count = struct.unpack_from(end + "H", data, ifd)[0]
    if count > 1000:
        raise ImageDecodeError(f"TIFF directory with {count} entries")
    tags: dict[int, list[int]] = {}
    pieces = 0  # strips or tiles: Pillow loads each one from Python
    for i in range(count):
        off = ifd + 2 + 12 * i
        if off + 12 > n:
            raise ImageDecodeError("corrupt or truncated TIFF (directory runs past the end)")
        tag, typ, cnt = struct.unpack_from(end + "HHI", data, off)
        size = _TIFF_TYPE_SIZE.get(typ, 1) * cnt
        if size > _TIFF_MAX_TAG_BYTES:
            raise ImageDecodeError(f"TIFF tag {tag} holds {size} bytes; at most {_TIFF_MAX_TAG_BYTES} allowed")
        if tag in (273, 324):  # StripOffsets, TileOffsets
            pieces = max(pieces, cnt)
        if tag in (256, 257, 258, 259, 262, 277, 284, 339) and typ in (3, 4) and cnt:
            fmt = "H" if typ == 3 else "I"
            where = off + 8 if size <= 4 else struct.unpack_from(end + "I", data, off + 8)[0]
            take = min(cnt, 8)
            if where + take * _TIFF_TYPE_SIZE[typ] > n:
                raise ImageDecodeError(f"corrupt TIFF (tag {tag} points outside the file)")
            tags[tag] = list(struct.unpack_from(end + fmt * take, data, where))
    width, height = tags.get(256, [0])[0], tags.get(257, [0])[0]
    if width == 0 or height == 0:
        raise ImageDecodeError(f"TIFF with a {width}x{height} image")
    compression = tags.get(259, [1])[0]
    if compression not in _TIFF_COMPRESSION:
        raise ImageDecodeError(f"TIFF with compression scheme {compression} is not accepted "
                               "(only uncompressed, LZW and deflate)")
    sample_format = set(tags.get(339, [1]))
    if sample_format - {1}:
        kind = "floating-point" if 3 in sample_format else "signed or undefined"
        raise ImageDecodeError(f"TIFF with {kind} samples (SampleFormat {sorted(sample_format)}) is not accepted; "
                               "only unsigned integer samples")
    bits = set(tags.get(258, [1]))
    if not bits <= {1, 2, 4, 8, 16}:
        raise ImageDecodeError(f"TIFF with {sorted(bits)}-bit samples is not accepted (1, 2, 4, 8 or 16 only)")
    spp = tags.get(277, [1])[0]
    if not 1 <= spp <= 8:
        raise ImageDecodeError(f"TIFF with {spp} samples per pixel")
    depth = max(bits)
    pil = 2 if spp == 1 and depth == 16 else (1 if spp == 1 else 4)
    if pieces > limits.max_chunks:
        raise ImageDecodeError(f"TIFF in {pieces} strips or tiles; at most {limits.max_chunks} allowed")
    return ImageHeader("TIFF", width, height, spp, depth, pil, alpha=spp in (2, 4), chunks=pieces,
                       compression=_TIFF_COMPRESSION[compression])


_PROBES: dict[str, Callable[[bytes, DecodeLimits], ImageHeader]] = {
    "JPEG": _probe_jpeg, "PNG": _probe_png, "GIF": _probe_gif, "BMP": _probe_bmp, "WEBP": _probe_webp,
    "TIFF": _probe_tiff,
}


def sniff(data: bytes) -> str | None:
    """The format the bytes claim by their magic number, as Pillow names it; None if unrecognised.

    Our own formats first (their magic numbers are disjoint, so this is what Pillow would pick too), then
    Pillow's `_accept` prefix tests of every other plugin, only to name a refused format in the message:
    those never parse anything.
    """
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    from PIL import Image

    Image.init()
    prefix = data[:64]
    for name, (_, accept) in Image.OPEN.items():
        if accept is None or name in SUPPORTED_FORMATS or name == "MPO":
            continue
        try:
            if accept(prefix):
                return name
        except Exception:  # a plugin's prefix test failing only means "not this format"
            continue
    return None


def probe(data: bytes, limits: DecodeLimits) -> ImageHeader:
    """Identify the format (refusing one outside the allowlist) and read its header; raises ImageDecodeError."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"encoded image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    fmt = sniff(data)
    allowed = ", ".join(limits.formats)
    if fmt is None:
        raise ImageDecodeError(f"not a decodable image (unknown or unsupported format; accepted: {allowed})")
    if fmt not in limits.formats:
        raise ImageDecodeError(f"{fmt} images are not accepted (accepted formats: {allowed})")
    try:
        header = _PROBES[fmt](data, limits)
    except ImageDecodeError:
        raise
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        raise ImageDecodeError(f"corrupt or truncated {fmt} header ({type(exc).__name__})") from None
    if header.pixels > limits.max_pixels:
        raise ImageDecodeError(f"image is {header.width}x{header.height} = {header.pixels} pixels, "
                               f"over the limit of {limits.max_pixels}")
    if header.exif_bytes > limits.max_exif_bytes:
        raise ImageDecodeError(f"EXIF block of {header.exif_bytes} bytes; at most {limits.max_exif_bytes} allowed")
    return header


# --- the cost model ----------------------------------------------------------------------------------------
# CPU constants in seconds, fitted on the reference machine (docs/hostile-input.md) and rounded up.
_CPU_PER_BYTE = {"JPEG": 12e-9, "PNG": 4e-9, "GIF": 6e-9, "BMP": 1e-9, "WEBP": 10e-9, "TIFF": 8e-9}
_CPU_PER_PROGRESSIVE_BYTE = 35e-9  # progressive JPEG: successive-approximation entropy decoding, per byte
_CPU_PER_DECODED_PIXEL = {"JPEG": 8e-9, "PNG": 6e-9, "GIF": 12e-9, "BMP": 3e-9, "WEBP": 40e-9, "TIFF": 6e-9}
_CPU_PER_RAW_BYTE = 4.5e-9  # inflating / unpacking the decoded samples (PNG, TIFF, BMP)
_CPU_PER_BLOCK_SCAN = 10e-9  # libjpeg: one 8x8 block in one scan
_CPU_PER_CHUNK = 2e-6  # Pillow walks PNG chunks and GIF blocks in Python
_CPU_PER_CONVERTED_PIXEL = 8e-9  # colour conversion, EXIF transpose, the resize's first pass
_ROW_OVERHEAD = 16  # Pillow keeps a pointer per row (and more): a 1x50M image costs 400 MB before any pixel


def jpeg_draft_scale(width: int, height: int, target: tuple[int, int] | None) -> int:
    """The DCT scale Pillow's `draft` picks for a square request of max(target) (1, 2, 4 or 8)."""
    if target is None:
        return 1
    side = max(target)
    scale = min(width // side, height // side)
    for s in (8, 4, 2, 1):
        if scale >= s:
            return s
    return 1


def estimate_cost(header: ImageHeader, target_size: tuple[int, int] | None, encoded_bytes: int) -> DecodeCost:
    """Estimated CPU seconds and peak bytes of decoding the first frame, converting to RGB and resizing.

    `target_size` is the model input (height, width); None when the image is only decoded.
    """
    fmt = header.format
    scale = jpeg_draft_scale(header.width, header.height, target_size) if fmt == "JPEG" else 1
    dw, dh = math.ceil(header.width / scale), math.ceil(header.height / scale)
    decoded = dw * dh
    raw = header.height * math.ceil(header.width * header.bands * header.bits / 8)
    # EXIF orientation 5-8 swaps the sides before the resize; the probe does not parse it, so assume the worse
    rows = max(dw, dh)
    pil_bytes = decoded * header.pil_pixel_bytes + dh * _ROW_OVERHEAD
    rgb_bytes = decoded * 4 + rows * _ROW_OVERHEAD
    # Peak copies alive at once: the decoded image, the RGB(A) conversions (alpha is composited onto white
    # through two more full-size RGBA images), and EXIF transpose's copy.
    if header.alpha or (fmt in ("GIF", "PNG") and header.bands == 1):
        conversions = 3 * rgb_bytes
    elif header.pil_pixel_bytes == 2:  # 16-bit grey: scaled in row blocks to L, then RGB
        conversions = decoded + rgb_bytes
    else:
        conversions = rgb_bytes
    transpose = rgb_bytes
    resize = 0
    if target_size is not None:
        out_h, out_w = target_size
        resize = out_w * rows * 4 + rows * _ROW_OVERHEAD + out_w * out_h * 4  # Pillow resizes horizontally first
    codec = decoded * 6 if fmt == "WEBP" else 0  # libwebp decodes into its own RGBA buffer, then Pillow copies
    memory = encoded_bytes + pil_bytes + codec + conversions + transpose + resize + header.coef_bytes
    cpu = (encoded_bytes * (_CPU_PER_BYTE[fmt] + (_CPU_PER_PROGRESSIVE_BYTE if header.progressive else 0))
           + decoded * _CPU_PER_DECODED_PIXEL[fmt]
           + header.scan_blocks * _CPU_PER_BLOCK_SCAN + header.chunks * _CPU_PER_CHUNK
           + decoded * _CPU_PER_CONVERTED_PIXEL * (3 if header.alpha else 1)
           + (raw * _CPU_PER_RAW_BYTE if fmt in ("PNG", "TIFF", "BMP") else 0)
           + (target_size[1] * rows * _CPU_PER_CONVERTED_PIXEL if target_size else 0))
    return DecodeCost(header, (dw, dh), cpu, int(memory))


def _describe(header: ImageHeader) -> str:
    kind = f"{header.bits}-bit {header.format}" if header.bits > 8 else header.format
    if header.format == "JPEG" and header.progressive:
        kind = f"progressive JPEG with {header.scans} scans"
    return f"{kind} of {header.width}x{header.height}"


def check_cost(data: bytes, limits: DecodeLimits, target_size: tuple[int, int] | None = None) -> DecodeCost:
    """Probe the headers and refuse an image whose estimated decode is over the per-image budget.

    Raises ImageDecodeError naming the reason; returns the estimate (which the pool uses to bound the memory
    in flight). Costs microseconds to a few milliseconds (a JPEG's markers are found with a C regex).
    """
    header = probe(data, limits)
    cost = estimate_cost(header, target_size, len(data))
    if cost.memory_bytes > limits.memory_budget_bytes:
        raise ImageDecodeError(f"{_describe(header)} would need about {cost.memory_bytes // MiB} MiB to decode; "
                               f"the budget is {limits.memory_budget_bytes // MiB} MiB")
    if cost.cpu_seconds > limits.cost_budget_seconds:
        raise ImageDecodeError(f"{_describe(header)} would take about {cost.cpu_seconds:.1f} CPU-seconds to decode; "
                               f"the budget is {limits.cost_budget_seconds:g}")
    return cost


def resolve_limits(limits: DecodeLimits | None = None, **overrides: object) -> DecodeLimits:
    """`limits` with the keyword overrides that are not None (the preprocessing functions' **limits)."""
    limits = limits or DecodeLimits()
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(DecodeLimits.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown decode limit(s): {', '.join(sorted(unknown))}")
    return replace(limits, **given) if given else limits


# --- the decode pool ---------------------------------------------------------------------------------------

_POLL_SECONDS = 0.02  # how often a waiting caller looks at its deadline and cancel flag: the ~100 ms bound
_READY = b"R"
_TEST_PREFIX = b"IMGCLS-TEST-"
_SHM_BYTES = 4 * MiB  # per worker: uint8 outputs up to ~1180x1180x3 come back through shared memory


def _vm_bytes() -> int | None:
    """This process's address-space size (Linux); None where /proc is missing (the RLIMIT_AS cap is skipped)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _test_hook(data: bytes, spec: PreprocessingSpec) -> np.ndarray:
    """Simulated decodes for the pool's tests (enabled only by `DecodePool(_test_hooks=True)`)."""
    command, _, arg = data[len(_TEST_PREFIX):].decode().partition(":")
    if command == "SPIN":  # burn CPU (the CPU-time bound must stop it)
        end = time.process_time() + float(arg)
        while time.process_time() < end:
            pass
    elif command == "SLEEP":  # take wall time without CPU (deadline and cancel must stop it)
        time.sleep(float(arg))
    elif command == "ALLOC":  # allocate (the address-space bound must refuse it)
        bytearray(int(arg))
    elif command == "CRASH":
        os.abort()
    h, w = spec.input_size
    return np.zeros((h, w, 3), np.uint8)


def _worker_main(conn: Connection, cpu_seconds: float, memory_limit: int, test_hooks: bool,
                 shm_path: str | None, nice: int = 0) -> None:
    """A decode worker: bounded by the kernel, answers one request at a time until its pipe closes.

    ITIMER_PROF (default action: terminate) stops a decode at `cpu_seconds` of CPU time with no Python in
    the way, even inside a C decoder; RLIMIT_CPU backs it up; RLIMIT_AS turns an allocation past the memory
    bound into MemoryError (reported, then the worker exits so its heap is returned).
    """
    import mmap
    import resource

    from imgcls.preprocessing import load_uint8

    for sig in (signal.SIGPROF, signal.SIGXCPU, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends us
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if nice:
        os.nice(nice)
    base = _vm_bytes()
    if base is not None:
        address_space = base + memory_limit
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or hard > address_space:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    shm = None
    if shm_path:
        with open(shm_path, "r+b") as f:
            shm = mmap.mmap(f.fileno(), _SHM_BYTES)
    conn.send_bytes(_READY)
    while True:
        try:
            message = conn.recv()
            if message is None:
                return
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        spec, limits, cost = message
        used = sum(os.times()[:2])
        soft = math.ceil(used + cpu_seconds) + 1
        if cpu_hard == resource.RLIM_INFINITY or soft < cpu_hard:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, cpu_hard))
        status = b"E"
        signal.setitimer(signal.ITIMER_PROF, cpu_seconds)
        try:
            if test_hooks and data.startswith(_TEST_PREFIX):
                arr = _test_hook(data, spec)
            else:  # uint8: a quarter of float32's bytes to hand back; the caller normalizes (DecodePool._answer)
                arr = load_uint8(data, spec, limits=limits, cost=cost)
            if shm is not None and arr.nbytes <= _SHM_BYTES:
                np.frombuffer(shm, np.uint8, count=arr.size)[:] = arr.reshape(-1)
                reply, status = b"", b"S"
            else:
                reply, status = arr.tobytes(), b"K"
        except DecodeMemoryError:  # after a failed allocation, start afresh rather than trust this heap
            reply = (f"the image needs more memory to decode than the {memory_limit // MiB} MiB "
                     "a decode may use").encode()
            status = b"X"
        except ImageDecodeError as exc:
            reply = str(exc).encode()
        except MemoryError:
            reply = (f"the image needs more memory to decode than the {memory_limit // MiB} MiB "
                     "a decode may use").encode()
            status = b"X"
        except Exception as exc:  # Pillow has more ways to fail on hostile input than it documents
            reply = f"could not decode the image ({type(exc).__name__})".encode()
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        del data
        conn.send_bytes(reply + status)
        if status == b"X":
            return


class _Worker:
    """One worker process, its pipe and (with the shm transport) its output buffer."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, limits: DecodeLimits, test_hooks: bool,
                 shm: bool, nice: int = 0) -> None:
        self.shm_path: str | None = None
        self.mm = None
        fd = -1
        if shm:
            import mmap
            import tempfile

            try:
                fd, self.shm_path = tempfile.mkstemp(prefix="imgcls-decode-", dir="/dev/shm")
            except OSError as exc:
                log.warning("no shared memory for decode results (%s); using the pipe", exc)
                fd = -1
        if fd >= 0:
            try:
                # Reserve the pages now: a full tmpfs must fail here (fall back to the pipe), not SIGBUS later.
                os.posix_fallocate(fd, 0, _SHM_BYTES)
                self.mm = mmap.mmap(fd, _SHM_BYTES)
            except OSError as exc:
                log.warning("no shared memory for decode results (%s); using the pipe", exc)
                os.unlink(self.shm_path)
                self.shm_path = None
            finally:
                os.close(fd)
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, name="imgcls-decode", daemon=True,
                                   args=(child, limits.cpu_seconds, limits.memory_limit_bytes, test_hooks,
                                         self.shm_path, nice))
        self.process.start()
        child.close()
        self.conn = parent

    def wait_ready(self, timeout: float) -> bool:
        try:
            ok = self.conn.poll(timeout) and self.conn.recv_bytes() == _READY
        except (EOFError, OSError):
            ok = False
        if self.shm_path:  # both sides have it mapped now; nothing to clean up if we die
            with contextlib.suppress(OSError, ValueError, EOFError):
                os.unlink(self.shm_path)
            self.shm_path = None
        return ok

    def kill(self) -> None:
        with contextlib.suppress(OSError, ValueError, EOFError):
            os.kill(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, EOFError):
            self.conn.close()

    def reap(self) -> None:
        self.process.join(5)
        if self.mm is not None:
            with contextlib.suppress(OSError, ValueError, EOFError):
                self.mm.close()


class DecodePool:
    """Decode images in `workers` killable worker processes, so no image can cost more than the hard bounds.

    `decode` is blocking and thread-safe (meant for up to `workers` calling threads; more just wait). The
    cost check runs in the caller first, so cheap refusals never reach a worker. Then:

    - the estimated decode memory of the images in flight never exceeds `memory_budget_bytes` (None: no
      server-wide bound beyond `workers` x the per-image budget). An image whose estimate alone is over it is
      refused at once (ImageDecodeError); otherwise the caller waits for room until its deadline or cancel
      (DecodeAborted with reason "memory", "deadline" or "cancelled").
    - a worker is killed, and its slot refilled from a pre-started spare, when the decode uses
      `limits.cpu_seconds` of CPU (the kernel stops it; DecodeAborted "cpu"), when the request's deadline
      passes or `cancelled()` turns true (checked every 20 ms), or after `limits.wall_seconds`.
    - a worker's address space is capped at its start-up size + `limits.memory_limit_bytes`.

    Workers start with the "forkserver" method (the server has gRPC threads, so plain fork is unsafe; a
    forkserver child starts in ~10 ms with Pillow and NumPy already imported), else "spawn".
    `transport` is how the float32 result comes back: "shm" (a per-worker shared-memory buffer) or "pipe".
    """

    def __init__(self, workers: int, limits: DecodeLimits | None = None, *, memory_budget_bytes: int | None = None,
                 start_method: str | None = None, transport: str = "shm", nice: int = 0,
                 _test_hooks: bool = False) -> None:
        if workers < 1:
            raise ValueError("a decode pool needs at least one worker")
        if transport not in ("shm", "pipe"):
            raise ValueError(f"transport must be 'shm' or 'pipe', got {transport!r}")
        self.workers = workers
        self.limits = limits or DecodeLimits()
        self.memory_budget_bytes = memory_budget_bytes
        self.transport = transport if transport == "pipe" or os.path.isdir("/dev/shm") else "pipe"
        method = start_method or ("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                  else "spawn")
        self._ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            self._ctx.set_forkserver_preload(["imgcls.preprocessing", "imgcls.decoding"])
        self._test_hooks = _test_hooks
        self.nice = nice  # workers run this much nicer than the caller (the server keeps its I/O loop ahead)
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._spare: _Worker | None = None
        self._live = 0
        self._memory_in_flight = 0
        self._closed = False
        self.respawns = 0
        started = [self._new_worker() for _ in range(workers + 1)]
        if not all(w.wait_ready(120) for w in started):
            for w in started:
                w.kill()
            raise RuntimeError("decode workers failed to start")
        self._idle, self._spare, self._live = started[:workers], started[workers], workers

    def _new_worker(self) -> _Worker:
        return _Worker(self._ctx, self.limits, self._test_hooks, self.transport == "shm", self.nice)

    # -- waiting helpers (called with self._cond held) --

    def _wait(self, deadline: float | None, cancelled: Callable[[], bool], waiting_for: str) -> None:
        if self._closed:
            raise DecodeAborted("the decode pool is shut down", "closed")
        if cancelled():
            raise DecodeAborted("request cancelled", "cancelled")
        timeout = _POLL_SECONDS
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                reason = "memory" if waiting_for == "memory" else "deadline"
                raise DecodeAborted(f"deadline passed while waiting for {waiting_for}", reason)
            timeout = min(timeout, left)
        self._cond.wait(timeout)

    def _reserve(self, memory: int, deadline: float | None, cancelled: Callable[[], bool]) -> None:
        budget = self.memory_budget_bytes
        with self._cond:
            if budget is not None:
                if memory > budget:
                    raise ImageDecodeError(f"the image would need about {memory // MiB} MiB to decode, over the "
                                           f"server's decode memory budget of {budget // MiB} MiB")
                while self._memory_in_flight + memory > budget:
                    self._wait(deadline, cancelled, "memory")
            self._memory_in_flight += memory

    def _unreserve(self, memory: int) -> None:
        with self._cond:
            self._memory_in_flight -= memory
            self._cond.notify_all()

    def _acquire(self, deadline: float | None, cancelled: Callable[[], bool]) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise DecodeAborted("the decode pool is shut down", "closed")
                if self._idle:
                    worker = self._idle.pop()
                    if worker.process.is_alive():
                        return worker
                    self._retire_locked(worker)
                    continue
                self._wait(deadline, cancelled, "a decode worker")

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            if self._closed:
                worker.kill()
                return
            self._idle.append(worker)
            self._cond.notify_all()

    def _retire(self, worker: _Worker) -> None:
        with self._cond:
            self._retire_locked(worker)

    def _retire_locked(self, worker: _Worker) -> None:
        """Kill a worker, put the spare in its place at once, and start a new spare in the background."""
        worker.kill()
        self._live -= 1
        self.respawns += 1
        if self._spare is not None and not self._closed:
            self._idle.append(self._spare)
            self._spare = None
            self._live += 1
            self._cond.notify_all()
        threading.Thread(target=self._refill, args=(worker,), name="imgcls-decode-respawn", daemon=True).start()

    def _refill(self, dead: _Worker) -> None:
        """Reap a dead worker and start its replacement (the new spare, or a slot if none was spare).

        Retries with backoff while the pool is open: a slot must never stay empty because one fork failed.
        """
        dead.reap()
        delay = 0.1
        while not self._closed:
            worker = None
            try:
                worker = self._new_worker()
                ok = worker.wait_ready(120)
            except Exception:  # fork failures (EAGAIN, ENOMEM) must not end the thread silently
                log.exception("could not start a decode worker")
                ok = False
            with self._cond:
                if ok and not self._closed:
                    if self._live < self.workers:
                        self._idle.append(worker)
                        self._live += 1
                        self._cond.notify_all()
                    elif self._spare is None:
                        self._spare = worker
                    else:
                        worker.kill()
                    return
            if worker is not None:
                worker.kill()
            if self._closed:
                return
            log.error("a decode worker failed to start; retrying in %.1f s", delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- the API --

    def decode(self, data: bytes, spec: PreprocessingSpec, *, deadline: float | None = None,
               cancelled: Callable[[], bool] = lambda: False) -> np.ndarray:
        """Encoded bytes to the float32 HxWx3 model input, as `preprocess_bytes` returns it.

        `deadline` is a `time.monotonic()` time. Raises ImageDecodeError (the image's fault: refused format,
        over budget, corrupt, crashed the decoder) or DecodeAborted (deadline, cancel, CPU-time bound, pool
        closed; see its `reason`).
        """
        if self._test_hooks and data.startswith(_TEST_PREFIX):
            cost, memory = None, 0
        else:
            cost = check_cost(data, self.limits, spec.input_size)
            memory = cost.memory_bytes
        self._reserve(memory, deadline, cancelled)
        try:
            worker = self._acquire(deadline, cancelled)
            return self._run(worker, data, spec, cost, deadline, cancelled)
        finally:
            self._unreserve(memory)

    def _run(self, worker: _Worker, data: bytes, spec: PreprocessingSpec, cost: DecodeCost | None,
             deadline: float | None, cancelled: Callable[[], bool]) -> np.ndarray:
        h, w = spec.input_size
        count = h * w * 3
        try:
            worker.conn.send((spec, self.limits, cost))
            worker.conn.send_bytes(data)
        except (OSError, EOFError):
            return self._died(worker)
        start = time.monotonic()
        via_shm = worker.mm is not None and count <= _SHM_BYTES
        buf = bytearray(1 if via_shm else count + 1)  # the reply is a status byte, or the uint8 array itself
        while True:
            timeout = _POLL_SECONDS
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
            try:
                ready = worker.conn.poll(timeout)
            except (OSError, EOFError):
                ready = True
            if ready:
                try:
                    n = worker.conn.recv_bytes_into(buf)
                    reply = memoryview(buf)[:n]
                except multiprocessing.BufferTooShort as exc:  # an error message longer than the buffer
                    reply = memoryview(exc.args[0])
                except (OSError, EOFError):
                    return self._died(worker)
                return self._answer(worker, reply, buf, spec)
            now = time.monotonic()
            reason = None
            if self._closed:
                reason, message = "closed", "the decode pool is shut down"
            elif cancelled():
                reason, message = "cancelled", "request cancelled while decoding; the decode was stopped"
            elif deadline is not None and now >= deadline:
                reason, message = "deadline", "deadline passed while decoding; the decode was stopped"
            elif now - start > self.limits.wall_seconds:
                reason, message = "timeout", f"decode took over {self.limits.wall_seconds:g} s; it was stopped"
            if reason is not None:
                self._retire(worker)
                raise DecodeAborted(message, reason)

    def _answer(self, worker: _Worker, reply: memoryview, buf: bytearray, spec: PreprocessingSpec) -> np.ndarray:
        """The worker's reply: the resized uint8 image (in its shared memory, or in `buf`), normalized here.

        Handing back uint8 rather than the float32 input moves a quarter of the bytes between processes (and
        between cores' caches): on a 2-core VM a lone decode's p50 fell by 0.08-0.27 ms, and `imgcls serve`
        answered 1-8% more at 32 clients (docs/benchmarks.md, 2026-12-01).
        """
        from imgcls.preprocessing import normalize  # not at the top: preprocessing imports this module

        h, w = spec.input_size
        count = h * w * 3
        status = bytes(reply[-1:])
        if status == b"S":
            try:  # normalize copies out of the worker's buffer before the worker may take the next image
                return normalize(np.frombuffer(worker.mm, np.uint8, count=count).reshape(h, w, 3), spec)
            finally:
                self._release(worker)
        if status == b"K" and len(reply) == count + 1:
            self._release(worker)
            return normalize(np.frombuffer(buf, np.uint8, count=count).reshape(h, w, 3), spec)
        message = bytes(reply[:-1]).decode(errors="replace") or "could not decode the image"
        if status == b"X":  # the worker exits after a failed allocation; a fresh one takes its place
            self._retire(worker)
            raise DecodeMemoryError(message)
        self._release(worker)
        raise ImageDecodeError(message)

    def _died(self, worker: _Worker) -> np.ndarray:
        worker.process.join(1)
        code = worker.process.exitcode
        self._retire(worker)
        if code is not None and -code in (signal.SIGPROF, signal.SIGXCPU):
            raise DecodeAborted(f"the decode ran past the CPU-time bound of {self.limits.cpu_seconds:g} s; "
                                "it was stopped", "cpu")
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            if -code == signal.SIGKILL:
                raise DecodeAborted("the decode worker was killed (out of memory?)", "killed")
            raise ImageDecodeError(f"the image crashed the decoder ({name})")
        raise DecodeAborted(f"the decode worker exited unexpectedly (exit code {code})", "killed")

    def close(self) -> None:
        """Stop every worker (busy ones too: their callers get DecodeAborted "closed" within 20 ms)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            workers = list(self._idle) + ([self._spare] if self._spare else [])
            self._idle, self._spare = [], None
            self._cond.notify_all()
        for worker in workers:
            worker.kill()
        for worker in workers:
            worker.reap()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict:
        """Idle workers, spare ready, estimated memory in flight, respawns so far (for metrics and tests)."""
        with self._cond:
            return {"idle": len(self._idle), "spare": self._spare is not None, "live": self._live,
                    "memory_in_flight": self._memory_in_flight, "respawns": self.respawns}
