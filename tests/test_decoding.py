"""Hostile input on the decode side: the format allowlist, the cost model and the killable decode pool.

Every hostile file is generated here at run time (no binary corpus); the generators are reused by
tests/test_preprocessing.py, tests/test_data.py and benchmarks/bench_decode.py.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from imgcls.decoding import DecodeLimits, DecodePool, check_cost, parse_formats, probe
from imgcls.errors import DecodeAborted, DecodeMemoryError, ImageDecodeError
from imgcls.preprocessing import PreprocessingSpec, preprocess_bytes

SPEC = PreprocessingSpec(input_size=(32, 32))

# --- generators of hostile files ----------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rle_bmp(width: int = 49_000_000, height: int = 1, bits: int = 8) -> bytes:
    """RLE8/RLE4 BMP: one pixel, then "end of line": Pillow pads the row a byte at a time in Python
    (1,084 bytes -> ~10 CPU-seconds at this width)."""
    colours = 1 << bits
    palette = b"\x00\x00\x00\x00" * colours
    body = b"\x01\x00\x00\x00\x00\x01"  # run of 1 pixel, end of line, end of bitmap
    offset = 14 + 40 + len(palette)
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 1 if bits == 8 else 2, len(body), 2835, 2835,
                      colours, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + dib + palette + body


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int = 8, colour_type: int = 0, extra: bytes = b"") -> bytes:
    """A PNG of zero-filled rows, compressed in streaming fashion (a 50-megapixel one is ~100-300 KB)."""
    bands = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour_type]
    row = b"\x00" * (1 + (width * bands * bit_depth + 7) // 8)
    per_block = max(1, (1 << 20) // len(row))
    comp = zlib.compressobj(9)
    parts = []
    left = height
    while left > 0:
        n = min(left, per_block)
        parts.append(comp.compress(row * n))
        left -= n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + extra + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def png16_bomb(side: int = 7071) -> bytes:
    """16-bit RGB, 50 megapixels: ~2-3 CPU-seconds in Pillow."""
    return raw_png(side, side, 16, 2)


def tall_png(height: int = 50_000_000) -> bytes:
    """1 x 50M pixels: ~100 KB; Pillow's per-row bookkeeping and the resize drove RSS to 2.3 GB."""
    return raw_png(1, height, 8, 0)


_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def many_scan_jpeg(scans: int = 5000, size: tuple[int, int] = (1024, 1024)) -> bytes:
    """A progressive JPEG whose first AC scan is repeated: libjpeg walks every block once per scan."""
    data = encode(Image.new("L", size, 128), "JPEG", progressive=True, quality=90)
    pos, segments = 2, []
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            break
        end = pos + 2 + struct.unpack_from(">H", data, pos + 2)[0]
        if marker == 0xDA:
            end = _MARKER.search(data, end).start()
        segments.append((marker, data[pos:end]))
        pos = end
    sos = [s for m, s in segments if m == 0xDA]
    ac_first = next(s for s in sos if s[5 + 2 * s[4]] > 0 and s[7 + 2 * s[4]] >> 4 == 0)
    return b"\xff\xd8" + b"".join(s for _, s in segments) + ac_first * (scans - len(sos)) + b"\xff\xd9"


def float_tiff(value: float) -> bytes:
    return encode(Image.fromarray(np.full((16, 16), value, np.float32), mode="F"), "TIFF")


def qoi_truncated() -> bytes:
    """24 bytes: a QOI header and a few bytes of data; Pillow's QOI decoder raised IndexError on it."""
    return b"qoif" + struct.pack(">IIBB", 64, 64, 3, 0) + b"\xfe\x10\x20\x30\x55\x55\x55\x55\x55\x00"


TEXT_FORMATS = {
    "XBM": lambda: encode(Image.new("1", (16, 16)), "XBM"),
    "XPM": lambda: b'/* XPM */\nstatic char *x[] = {\n"2 2 1 1",\n"a c #FF0000",\n"aa",\n"aa"};\n',
    "PPM": lambda: b"P3\n2 2\n255\n255 0 0 255 0 0 255 0 0 255 0 0\n",
}
OTHER_FORMATS = ["PCX", "ICO", "SGI", "DDS", "QOI", "JPEG2000", "ICNS", "MSP"]


def other_format(fmt: str) -> bytes:
    if fmt == "QOI":
        return qoi_truncated()
    img = Image.new("1" if fmt == "MSP" else "RGB", (16, 16))
    return encode(img, fmt)


# --- allowlist and cost model ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(TEXT_FORMATS))
def test_text_formats_refused_by_name(fmt):
    with pytest.raises(ImageDecodeError, match=rf"{fmt} images are not accepted \(accepted formats: JPEG, PNG"):
        probe(TEXT_FORMATS[fmt](), DecodeLimits())


@pytest.mark.parametrize("fmt", OTHER_FORMATS)
def test_formats_outside_the_allowlist_refused(fmt):
    try:
        data = other_format(fmt)
    except (KeyError, OSError) as exc:
        pytest.skip(f"this Pillow cannot write {fmt}: {exc}")
    with pytest.raises(ImageDecodeError, match=rf"{fmt} images are not accepted"):
        probe(data, DecodeLimits())


def test_allowlist_is_configurable():
    jpeg = encode(Image.new("RGB", (8, 8)), "JPEG")
    with pytest.raises(ImageDecodeError, match=r"JPEG images are not accepted \(accepted formats: PNG\)"):
        probe(jpeg, DecodeLimits(formats="png"))
    assert parse_formats("jpg, PNG,tif") == ("JPEG", "PNG", "TIFF")
    with pytest.raises(ValueError, match="'xbm' is not supported"):
        parse_formats("jpeg,xbm")
    with pytest.raises(ValueError, match="empty"):
        parse_formats(" , ")


@pytest.mark.parametrize("bits", [8, 4])
def test_rle_bmp_refused_from_the_header(bits):
    data = rle_bmp(bits=bits)
    assert len(data) < 1200
    start = time.process_time()
    with pytest.raises(ImageDecodeError, match=f"RLE{bits}-compressed BMP is not accepted"):
        check_cost(data, DecodeLimits())
    assert time.process_time() - start < 0.05


def test_many_scan_progressive_jpeg_refused():
    data = many_scan_jpeg(5000, (256, 256))
    with pytest.raises(ImageDecodeError, match="progressive JPEG with more than 100 scans; at most 100 allowed"):
        check_cost(data, DecodeLimits())
    header = probe(data, DecodeLimits(max_jpeg_scans=10_000))
    assert header.progressive and header.scans == 5000
    # the estimate grows with the scans, so a raised scan limit still meets the CPU budget
    with pytest.raises(ImageDecodeError, match="CPU-seconds"):
        check_cost(many_scan_jpeg(5000, (1024, 1024)), DecodeLimits(max_jpeg_scans=10_000))


def test_16bit_50_megapixel_png_over_cpu_budget():
    with pytest.raises(ImageDecodeError, match=r"16-bit PNG of 7071x7071 would (take|need) about"):
        check_cost(png16_bomb(), DecodeLimits(), (224, 224))


def test_1xN_png_over_memory_budget():
    data = tall_png()
    assert len(data) < 200_000
    with pytest.raises(ImageDecodeError, match=r"PNG of 1x50000000 would need about \d+ MiB"):
        check_cost(data, DecodeLimits(), (224, 224))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 0.5])
def test_float_tiff_refused(value):
    with pytest.raises(ImageDecodeError, match="TIFF with floating-point samples"):
        probe(float_tiff(value), DecodeLimits())


@pytest.mark.parametrize("compression", [None, "tiff_lzw", "tiff_adobe_deflate"])
def test_integer_tiff_accepted(compression):
    kw = {"compression": compression} if compression else {}
    rgb = encode(Image.new("RGB", (40, 30), (10, 200, 30)), "TIFF", **kw)
    assert np.abs(preprocess_bytes(rgb, SPEC)[5, 5] - preprocess_bytes(encode(Image.new("RGB", (4, 4), (10, 200, 30)),
                                                                           "PNG"), SPEC)[0, 0]).max() < 0.02
    grey16 = encode(Image.fromarray(np.full((20, 20), 40000, np.uint16)), "TIFF", **kw)
    assert preprocess_bytes(grey16, SPEC).shape == (32, 32, 3)


def test_tiff_jpeg_compression_refused():
    data = bytearray(encode(Image.new("RGB", (8, 8)), "TIFF"))
    # patch the Compression tag (259) from 1 to 7 (JPEG)
    i = data.find(struct.pack("<HHI", 259, 3, 1))
    data[i + 8:i + 10] = struct.pack("<H", 7)
    with pytest.raises(ImageDecodeError, match="compression scheme 7 is not accepted"):
        probe(bytes(data), DecodeLimits())


def test_oversized_exif_refused():
    exif = b"MM\x00*\x00\x00\x00\x08" + b"\x00" * 400_000
    data = raw_png(8, 8, extra=_png_chunk(b"eXIf", exif))
    with pytest.raises(ImageDecodeError, match="EXIF block of 400008 bytes"):
        probe(data, DecodeLimits())


def test_png_with_too_many_chunks_refused():
    data = raw_png(8, 8, extra=_png_chunk(b"tEXt", b"a\x00b") * 30_000)
    with pytest.raises(ImageDecodeError, match="over 20000 chunks"):
        probe(data, DecodeLimits())


def test_gif_first_frame_only_and_cost_ignores_frames():
    frames = [Image.new("P", (64, 64), i % 200) for i in range(300)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    one = encode(frames[0], "GIF")
    many_cost = check_cost(data, DecodeLimits(), (32, 32))
    assert many_cost.header.frames == 1  # the probe stops at the first frame; so does Pillow
    assert many_cost.cpu_seconds < 2 * check_cost(one, DecodeLimits(), (32, 32)).cpu_seconds + 1e-3
    assert preprocess_bytes(data, SPEC).shape == (32, 32, 3)


def smooth_photo(width: int, height: int) -> Image.Image:
    """Camera-like content: smooth colour fields plus sensor noise (compresses like a photo, unlike pure noise)."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), np.uint8))
    arr = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
    arr += rng.integers(-12, 12, arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def test_normal_photos_are_within_budget():
    big, mid = smooth_photo(4000, 3000), smooth_photo(2400, 1600)
    for img, fmt, kw in ((big, "JPEG", {"quality": 90}), (big, "JPEG", {"progressive": True}),
                         (mid, "WEBP", {"method": 0}), (mid, "PNG", {"compress_level": 1}), (mid, "TIFF", {}),
                         (mid, "BMP", {})):
        cost = check_cost(encode(img, fmt, **kw), DecodeLimits(), (224, 224))
        assert cost.cpu_seconds < 0.8 and cost.memory_bytes < 384 << 20, (fmt, kw, cost)


@pytest.mark.parametrize("data", [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP",
                                  b"II*\x00", b"\xff\xd8\xff\xc0\x00\x11\x08", b"BM" + b"\x00" * 30])
def test_truncated_headers_are_decode_errors(data):
    with pytest.raises(ImageDecodeError):
        check_cost(data, DecodeLimits())


def test_fuzzed_headers_never_raise_anything_else():
    """Bit flips and truncations of every accepted format: the probe refuses or accepts, never crashes."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8))
    seeds = [encode(img, f) for f in ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")]
    seeds.append(encode(img, "JPEG", progressive=True))
    for seed in seeds:
        for _ in range(150):
            data = bytearray(seed[:rng.integers(1, len(seed) + 1)])
            for _ in range(rng.integers(1, 6)):
                data[rng.integers(0, len(data))] = rng.integers(0, 256)
            with contextlib.suppress(ImageDecodeError):
                preprocess_bytes(bytes(data), SPEC)


# --- the decode pool ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool():
    limits = DecodeLimits(cpu_seconds=0.3)
    p = DecodePool(2, limits, _test_hooks=True)
    yield p
    p.close()


def wait_for_spare(pool: DecodePool, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = pool.stats()
        if s["spare"] and s["live"] == pool.workers:
            return
        time.sleep(0.01)
    raise AssertionError(f"pool did not refill: {pool.stats()}")


def test_pool_matches_in_process_decode(pool):
    rng = np.random.default_rng(2)
    images = [encode(Image.fromarray(rng.integers(0, 255, (60, 80, 3), np.uint8)), f) for f in ("JPEG", "PNG", "WEBP")]
    spec = PreprocessingSpec(input_size=(224, 224))
    for data in images:
        out = pool.decode(data, spec)
        assert out.dtype == np.float32 and out.shape == (224, 224, 3) and out.flags.writeable
        np.testing.assert_array_equal(out, preprocess_bytes(data, spec))


def test_pool_pipe_transport_matches():
    data = encode(Image.new("RGB", (50, 40), (1, 2, 3)), "PNG")
    with DecodePool(1, transport="pipe") as p:
        np.testing.assert_array_equal(p.decode(data, SPEC), preprocess_bytes(data, SPEC))


def test_pool_refuses_in_the_caller(pool):
    before = pool.stats()["respawns"]
    start = time.monotonic()
    with pytest.raises(ImageDecodeError, match="XBM images are not accepted"):
        pool.decode(TEXT_FORMATS["XBM"](), SPEC)
    with pytest.raises(ImageDecodeError, match="RLE8-compressed BMP"):
        pool.decode(rle_bmp(), SPEC)
    assert time.monotonic() - start < 0.5
    assert pool.stats()["respawns"] == before


def test_pool_corrupt_image_is_a_decode_error(pool):
    data = encode(Image.effect_noise((200, 200), 60).convert("RGB"), "JPEG")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        pool.decode(data[: len(data) // 2], SPEC)


def test_cpu_bound_kills_a_slow_decode_and_respawns(pool):
    wait_for_spare(pool)
    before = pool.stats()["respawns"]
    start = time.monotonic()
    with pytest.raises(DecodeAborted, match=r"CPU-time bound of 0\.3 s") as info:
        pool.decode(b"IMGCLS-TEST-SPIN:30", SPEC)
    assert info.value.reason == "cpu"
    assert time.monotonic() - start < 6.0  # 0.3 CPU-s, on a 2-core machine that may be shared
    assert pool.stats()["respawns"] == before + 1
    assert pool.stats()["live"] == 2  # the spare took the slot at once
    wait_for_spare(pool)
    assert pool.decode(encode(Image.new("RGB", (8, 8)), "PNG"), SPEC).shape == (32, 32, 3)


def test_cpu_bound_holds_when_the_estimate_is_wrong():
    """A real cost bomb let through by raised limits is still stopped at the CPU-time bound."""
    limits = DecodeLimits(max_jpeg_scans=100_000, cost_budget_seconds=1e6, cpu_seconds=0.2)
    bomb = many_scan_jpeg(5000, (1024, 1024))  # ~0.6 CPU-s to decode
    with DecodePool(1, limits) as p:
        with pytest.raises(DecodeAborted) as info:
            p.decode(bomb, SPEC)
        assert info.value.reason == "cpu"


def test_deadline_frees_the_worker_within_100ms(pool):
    wait_for_spare(pool)
    start = time.monotonic()
    with pytest.raises(DecodeAborted, match="deadline passed while decoding") as info:
        pool.decode(b"IMGCLS-TEST-SLEEP:30", SPEC, deadline=start + 0.2)
    late = time.monotonic() - (start + 0.2)
    assert info.value.reason == "deadline"
    assert late < 0.1
    assert pool.stats()["live"] == 2


def test_cancel_frees_the_worker_within_100ms(pool):
    wait_for_spare(pool)
    flag = threading.Event()
    timer = threading.Timer(0.2, flag.set)
    timer.start()
    with pytest.raises(DecodeAborted, match="cancelled") as info:
        pool.decode(b"IMGCLS-TEST-SLEEP:30", SPEC, cancelled=flag.is_set)
    assert info.value.reason == "cancelled"
    assert pool.stats()["live"] == 2


def test_expired_deadline_aborts_before_dispatch(pool):
    with pytest.raises(DecodeAborted) as info:
        pool.decode(b"IMGCLS-TEST-SLEEP:30", SPEC, deadline=time.monotonic() - 1)
    assert info.value.reason == "deadline"


def test_crash_and_memory_bound_are_decode_errors(pool):
    wait_for_spare(pool)
    with pytest.raises(ImageDecodeError, match="crashed the decoder"):
        pool.decode(b"IMGCLS-TEST-CRASH", SPEC)
    wait_for_spare(pool)
    with pytest.raises(DecodeMemoryError, match="needs more memory"):
        pool.decode(b"IMGCLS-TEST-ALLOC:%d" % (4 << 30), SPEC)
    wait_for_spare(pool)
    assert pool.decode(encode(Image.new("RGB", (8, 8)), "PNG"), SPEC).shape == (32, 32, 3)


def test_memory_bound_holds_when_the_estimate_is_wrong():
    """With the estimate's budget raised past the hard bound, the worker's RLIMIT_AS still refuses the decode."""
    img = raw_png(4000, 4000, 8, 6)  # RGBA: ~300 MB to decode and composite onto white
    limits = DecodeLimits(memory_budget_bytes=4 << 30, cost_budget_seconds=100, cpu_seconds=5,
                          memory_limit_bytes=64 << 20)
    with DecodePool(1, limits) as p:
        with pytest.raises(DecodeMemoryError, match="more memory to decode than the 64 MiB"):
            p.decode(img, SPEC)
        assert p.stats()["respawns"] == 1  # the worker that failed an allocation is replaced
        wait_for_spare(p)
        assert p.decode(encode(Image.new("RGB", (8, 8)), "PNG"), SPEC).shape == (32, 32, 3)


def test_memory_budget_in_flight():
    img = encode(Image.new("RGB", (2000, 1500)), "PNG")
    need = check_cost(img, DecodeLimits(), SPEC.input_size).memory_bytes
    with DecodePool(2, memory_budget_bytes=need // 2) as p, pytest.raises(ImageDecodeError, match="memory budget"):
        p.decode(img, SPEC)
    with DecodePool(2, memory_budget_bytes=need + need // 2) as p:
        p._reserve(need, None, lambda: False)  # as if another image were being decoded
        result: list = []
        waiter = threading.Thread(target=lambda: result.append(p.decode(img, SPEC)))
        try:
            with pytest.raises(DecodeAborted) as info:
                p.decode(img, SPEC, deadline=time.monotonic() + 0.2)
            assert info.value.reason == "memory"
            waiter.start()  # no deadline: waits for room
            time.sleep(0.3)
            assert not result
        finally:
            p._unreserve(need)
        waiter.join(10)
        assert result and result[0].shape == (32, 32, 3)
        assert p.stats()["memory_in_flight"] == 0


def test_pool_is_thread_safe():
    rng = np.random.default_rng(3)
    images = [encode(Image.fromarray(rng.integers(0, 255, (50, 70, 3), np.uint8)), "JPEG") for _ in range(12)]
    expected = [preprocess_bytes(d, SPEC) for d in images]
    with DecodePool(2) as p:
        out: dict[int, np.ndarray] = {}

        def work(offset: int) -> None:
            for i in range(offset, len(images), 3):
                out[i] = p.decode(images[i], SPEC)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(out[i], e)


def test_close_aborts_a_decode_in_flight():
    p = DecodePool(1, _test_hooks=True)
    errors: list[Exception] = []

    def work() -> None:
        try:
            p.decode(b"IMGCLS-TEST-SLEEP:30", SPEC)
        except DecodeAborted as exc:
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    time.sleep(0.2)
    p.close()
    t.join(2)
    assert not t.is_alive() and errors and errors[0].reason == "closed"
    with pytest.raises(DecodeAborted):
        p.decode(b"IMGCLS-TEST-SLEEP:0", SPEC)


def test_wide_png_that_exif_turns_tall_is_costed_as_tall():
    """50M x 1 with an EXIF orientation of 6 would be resized as 1 x 50M (a 45 GB intermediate)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = raw_png(50_000_000, 1, 8, 0, extra=_png_chunk(b"eXIf", exif.tobytes()))
    with pytest.raises(ImageDecodeError, match=r"PNG of 50000000x1 would need about \d+ MiB"):
        check_cost(data, DecodeLimits(), (224, 224))


def test_spawn_start_method_works_too():
    """Where forkserver is unavailable the pool uses spawn (slower to start, same behaviour)."""
    data = encode(Image.new("RGB", (30, 20), (9, 99, 199)), "PNG")
    with DecodePool(1, start_method="spawn", _test_hooks=True) as p:
        np.testing.assert_array_equal(p.decode(data, SPEC), preprocess_bytes(data, SPEC))
        with pytest.raises(DecodeAborted) as info:
            p.decode(b"IMGCLS-TEST-SLEEP:30", SPEC, deadline=time.monotonic() + 0.1)
        assert info.value.reason == "deadline"
