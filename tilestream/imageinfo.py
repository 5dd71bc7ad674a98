"""What decoding an image will cost, read from its encoded bytes alone (pure; no pixel decoding).

Used by the processor (frames off the wire) and by the edge agent (files from a folder) to
refuse, *before* OpenCV is called, an image whose decoding would cost far more than its size
in bytes suggests. Two kinds of such images, both measured (figures below):

* **decompression bombs**: a 200-byte PNG can declare 100,000 x 100,000 pixels; OpenCV would
  allocate and fill them all. The header gives width x height: refused over ``max_pixels``.
* **work bombs**: a small image whose decoder loops over its pixels many times. A progressive
  JPEG is decoded scan by scan and *every* scan walks every 8x8 block of its component, even
  an empty one (12-60 bytes: one end-of-band run per 32767 blocks), so the time grows with
  scans x pixels, not with bytes or pixels. The marker walk counts the scans (SOS segments).
  For PNG, libpng inflates whatever zlib data follows the rows the header asks for ("Too much
  image data" is only a warning), so a 100 x 100 PNG can carry gigabytes of inflate work.

Budget, in **pixel-scan units** (pixels x decoding passes over them; a pass is a JPEG scan,
1 for every other format): at most ``max_pixels * COST_PER_PIXEL`` units, and at most
``MAX_SCANS`` scans whatever the size. Measured with ``cv2.imdecode(..., IMREAD_GRAYSCALE)``,
OpenCV 4.14 / libjpeg-turbo 3.1 / libpng 1.6.58, one core of the 2-core dev machine:

    image                                               bytes   decode    check()
    vtest frame 768x576, JPEG q80 baseline (1 scan)      68 KB   0.8 ms    0.03 ms
    the same, progressive (10 scans)                     62 KB   2.8 ms    0.03 ms
    the same, PNG                                       620 KB   10.6 ms   5.5 ms (the inflate)
    6000x6000 progressive, 10 scans (flat black)        212 KB   0.28 s
    6000x6000 progressive, 64 scans (MAX_SCANS)         215 KB   0.49 s
    6000x6000 progressive, 1000 empty scans             270 KB   3.9 s
    6000x6000 progressive, 4000 empty scans             447 KB   34 s      5.6 ms (refused)
    100x100 PNG + 2 GB of zlib data after the rows      1.9 MB   4.3 s     refused at 64 KB
    4000x4000 PNG interlaced (Adam7) vs not              16 KB   0.08 s vs 0.09 s
    1000x1000 PNG in 300,000 one-byte IDAT chunks       3.9 MB   0.03 s
    64x64 JPEG + 121,000 DHT / 666,000 APP1 segments    4.0 MB   0.015 s / 0.12 s

An empty scan costs ~0.1 ns per pixel (~6 ns per 8x8 block), about 1/40 of decoding the
pixels once, so: COST_PER_PIXEL = 16 lets every legitimate encoder through (libjpeg's
progressive script is 6 scans for grey, 10 for colour; mozjpeg's ~12) and adds at most
~16 x 0.1 ns = 1.6 ns per pixel of empty-scan work, ~0.06 s at the processor's 40 MP limit,
on top of a full decode of that size (~0.3 s). MAX_SCANS = 64 is 5x what any encoder writes:
more is an attack whatever the size (the budget alone would let a 1 MP image have 640 scans).
Interlaced PNGs cost no more than plain ones (so they are not refused), and
many chunks or segments cost libpng/libjpeg little but cost *this walk* a Python iteration
each, so their number is bounded (MAX_JPEG_SEGMENTS, MAX_PNG_CHUNKS, MAX_RIFF_CHUNKS).

The walks are bounded: a Python step per marker segment or chunk (bounded counts), and the
JPEG entropy-coded data between markers is skipped with one C-level regex search. The one
step that is not header-only is PNG's: its zlib stream is inflated into a 64 KB window that
is thrown away, stopping as soon as it yields more than the rows the header implies (bounded
by the pixel limit, checked first): it costs what libpng's own inflate of a well-formed file
costs, and it is the only way to see data hidden after the rows without trusting libpng.

Refusals are :class:`ImageHeaderError` (a ValueError) with a ``reason``: ``too_large`` (a
limit or the budget is exceeded), ``bad_image`` (malformed or truncated structure),
``unsupported_format`` (not a format the caller accepts, or a variant whose cost this module
cannot bound: animated WebP or PNG, BigTIFF, JPEG-in-TIFF).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field

from tilestream.errors import Refused

COST_PER_PIXEL = 16  # pixel-scan units allowed per pixel of the pixel limit (see the docstring)
MAX_SCANS = 64  # JPEG SOS segments, whatever the image size
MAX_JPEG_SEGMENTS = 1024  # marker segments of a JPEG (ICC profiles: up to 255 APP2; progressive: a DHT per scan)
MAX_PNG_CHUNKS = 16384  # libpng writes 8 KB IDATs: a 64 MiB PNG has 8192
MAX_RIFF_CHUNKS = 64  # a still WebP has at most VP8X, ICCP, ALPH, VP8/VP8L, EXIF, XMP
MAX_TIFF_ENTRIES = 1024  # tags in the first IFD
INFLATE_WINDOW = 64 * 1024

FORMATS = frozenset({"jpeg", "png", "webp", "bmp", "tiff", "pnm"})  # what probe() can read
WIRE_FORMATS = frozenset({"jpeg", "png", "webp"})  # what the envelope carries (envelope.ENCODINGS)


class ImageHeaderError(Refused, ValueError):
    """An image refused from its bytes; ``reason``: too_large | bad_image | unsupported_format."""

    def __init__(self, message: str, reason: str = "bad_image"):
        super().__init__(reason, message)


def _bad(message: str) -> ImageHeaderError:
    return ImageHeaderError(message, "bad_image")


def _costly(message: str) -> ImageHeaderError:
    return ImageHeaderError(message, "too_large")


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    passes: int = 1  # decoding passes over every pixel: the SOS segments of a JPEG, 1 otherwise
    progressive: bool = False
    # PNG: (start, end) of each IDAT payload and the inflated size the header implies.
    idat: tuple[tuple[int, int], ...] = field(default=(), repr=False, compare=False)
    raw_bytes: int = field(default=0, repr=False, compare=False)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def cost(self) -> int:
        """Decode cost in pixel-scan units."""
        return self.pixels * self.passes


@dataclass(frozen=True)
class DecodeLimits:
    """What one image may cost to decode. ``max_cost`` 0: ``max_pixels * COST_PER_PIXEL``."""

    max_bytes: int
    max_pixels: int
    max_scans: int = MAX_SCANS
    max_cost: int = 0
    formats: frozenset[str] = WIRE_FORMATS

    @property
    def budget(self) -> int:
        return self.max_cost or self.max_pixels * COST_PER_PIXEL


def probe(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) of a structurally sound image; raises ImageHeaderError."""
    info = inspect(data)
    return info.format, info.width, info.height


def check(data: bytes, limits: DecodeLimits) -> ImageInfo:
    """Everything short of decoding: size, format, structure, pixels, scans, decode budget.

    Returns the image's :class:`ImageInfo` when ``cv2.imdecode`` may be called on ``data``;
    raises :class:`ImageHeaderError` otherwise. Cheap limits first: the bounded inflate of a
    PNG runs only once its pixel count is known to be within the limit.
    """
    if len(data) > limits.max_bytes:
        raise _costly(f"{len(data)} bytes > limit {limits.max_bytes}")
    info = inspect(data, limits.formats)
    what = f"{info.format} {info.width}x{info.height}"
    if info.pixels > limits.max_pixels:
        raise _costly(f"{what} declares {info.pixels} pixels > limit {limits.max_pixels}")
    if info.passes > limits.max_scans:
        raise _costly(f"{what} has {info.passes} scans > limit {limits.max_scans}")
    if info.cost > limits.budget:
        raise _costly(f"{what} with {info.passes} scans costs {info.cost} pixel-scans > budget {limits.budget}")
    if info.format == "png":
        _png_inflate_bounded(data, info)
    return info


def inspect(data: bytes, formats: frozenset[str] = FORMATS) -> ImageInfo:
    """Format, size and decoding passes from a bounded walk of the structure (no inflate, no decode)."""
    fmt = sniff(data)
    if fmt is None:
        raise ImageHeaderError("not a JPEG, PNG, WebP, BMP, TIFF or PNM image", "unsupported_format")
    if fmt not in formats:
        raise ImageHeaderError(f"{fmt} is not accepted here (only {', '.join(sorted(formats))})", "unsupported_format")
    info = _READERS[fmt](data)
    if info.width <= 0 or info.height <= 0:
        raise _bad(f"{fmt} declares an empty image ({info.width}x{info.height})")
    return info


def sniff(data: bytes) -> str | None:
    """The format by its magic bytes, or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"\xff\xd8":
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:1] == b"P" and data[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6"):
        return "pnm"
    return None


# -- JPEG ---------------------------------------------------------------------------------------
# Start-of-frame markers: SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
# The next marker after entropy-coded data: FF followed by anything but a stuffed 00, a restart
# marker RSTn or another FF (fill). One FF at a time, so a long FF run costs no backtracking.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_NOT_FILL = re.compile(rb"[^\xff]")


def _jpeg(data: bytes) -> ImageInfo:
    i, n = 2, len(data)
    frame: tuple[int, int, bool] | None = None
    scans = segments = 0
    while True:
        if i + 2 > n:
            raise _bad("truncated JPEG (no end-of-image marker)")
        if data[i] != 0xFF:
            raise _bad(f"JPEG marker expected at byte {i}")
        if data[i + 1] == 0xFF:  # fill bytes before a marker
            m = _NOT_FILL.search(data, i + 1)
            if m is None:
                raise _bad("truncated JPEG (fill bytes up to the end)")
            i = m.start() - 1
        marker = data[i + 1]
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise _costly(f"JPEG with more than {MAX_JPEG_SEGMENTS} marker segments ({scans} scans so far)")
        if marker == 0xD9:  # EOI: what follows is not decoded
            break
        if marker in (0xD8, 0x00):
            raise _bad(f"JPEG with a misplaced {marker:02X} marker at byte {i}")
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            i += 2
            continue
        if i + 4 > n:
            raise _bad("truncated JPEG segment")
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        end = i + 2 + length
        if length < 2 or end > n:
            raise _bad(f"JPEG segment {marker:02X} at byte {i} with a bad length {length}")
        if marker in _SOF:
            if frame is not None:
                raise _bad("JPEG with a second frame header")
            if length < 8:
                raise _bad("JPEG frame header too short")
            h, w, comps = struct.unpack(">HHB", data[i + 5:i + 10])
            if not 1 <= comps <= 4 or length != 8 + 3 * comps:
                raise _bad(f"JPEG frame header with {comps} components and length {length}")
            frame = (w, h, marker in _PROGRESSIVE)
        elif marker == 0xDA:
            if frame is None:
                raise _bad("JPEG scan before any frame header")
            comps = data[i + 4] if length >= 3 else 0
            if not 1 <= comps <= 4 or length != 6 + 2 * comps:
                raise _bad(f"JPEG scan header with {comps} components and length {length}")
            scans += 1
            nxt = _NEXT_MARKER.search(data, end)  # skip the entropy-coded data
            if nxt is None:
                raise _bad("truncated JPEG (scan data up to the end)")
            i = nxt.start()
            continue
        i = end
    if frame is None:
        raise _bad("JPEG without a frame header")
    if scans == 0:
        raise _bad("JPEG without a scan")
    w, h, progressive = frame
    return ImageInfo("jpeg", w, h, passes=scans, progressive=progressive)


# -- PNG ----------------------------------------------------------------------------------------
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_raw_bytes(w: int, h: int, depth: int, colour: int, interlaced: bool) -> int:
    """Bytes the zlib stream must inflate to: each row's filter byte plus its packed samples."""
    bits = depth * _PNG_CHANNELS[colour]
    if not interlaced:
        return h * (1 + (w * bits + 7) // 8)
    total = 0
    for x0, y0, dx, dy in _ADAM7:
        pw, ph = (w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy
        if pw > 0 and ph > 0:
            total += ph * (1 + (pw * bits + 7) // 8)
    return total


def _png(data: bytes) -> ImageInfo:
    n = len(data)
    if n < 33 or data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        raise _bad("PNG without an IHDR chunk first")
    w, h, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if w >= 1 << 31 or h >= 1 << 31 or depth not in _PNG_DEPTHS.get(colour, ()) \
            or compression or filtering or interlace > 1:
        raise _bad(f"PNG header out of range ({w}x{h}, depth {depth}, colour type {colour}, interlace {interlace})")
    i, chunks = 33, 1
    idat: list[tuple[int, int]] = []
    idat_done = False
    while True:
        if i + 12 > n:
            raise _bad("truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        end = i + 12 + length
        if length >= 1 << 31 or end > n:
            raise _bad(f"truncated PNG chunk {kind!r} at byte {i}")
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise _costly(f"PNG with more than {MAX_PNG_CHUNKS} chunks")
        if kind == b"IDAT":
            if idat_done:
                raise _bad("PNG with IDAT chunks that are not consecutive")
            idat.append((i + 8, i + 8 + length))
        elif idat:
            idat_done = True
        if kind == b"IEND":
            break
        if kind == b"acTL":  # APNG: frames after the default image, as WebP's ANMF
            raise ImageHeaderError("animated PNG", "unsupported_format")
        if kind == b"IHDR":
            raise _bad("PNG with a second IHDR")
        i = end
    if not idat:
        raise _bad("PNG without image data")
    return ImageInfo("png", w, h, idat=tuple(idat), raw_bytes=_png_raw_bytes(w, h, depth, colour, bool(interlace)))


def _png_inflate_bounded(data: bytes, info: ImageInfo) -> None:
    """Inflate the IDAT stream into a throw-away window; refuse it if it does not end where the
    header says the rows end (more data: the inflate bomb; less or broken: a bad image)."""
    z = zlib.decompressobj()
    out = 0
    view = memoryview(data)
    try:
        for start, end in info.idat:
            chunk = view[start:end]
            while chunk and not z.eof:
                out += len(z.decompress(chunk, INFLATE_WINDOW))
                if out > info.raw_bytes:
                    raise _bad(f"PNG image data inflates past the {info.raw_bytes} bytes its "
                               f"{info.width}x{info.height} header implies")
                chunk = z.unconsumed_tail
            if z.eof:
                break
    except zlib.error as exc:
        raise _bad(f"PNG image data is not a valid zlib stream: {exc}") from None
    if not z.eof or out != info.raw_bytes:
        raise _bad(f"PNG image data inflates to {out} bytes{'' if z.eof else ' (unterminated)'}, "
                   f"its header implies {info.raw_bytes}")


# -- WebP ---------------------------------------------------------------------------------------
def _webp(data: bytes) -> ImageInfo:
    (riff_len,) = struct.unpack("<I", data[4:8])
    stop = 8 + riff_len
    if riff_len < 4 or stop > len(data):
        raise _bad(f"truncated WebP (RIFF says {riff_len} bytes, the file has {len(data) - 8})")
    i, chunks = 12, 0
    canvas: tuple[int, int] | None = None
    frame: tuple[int, int] | None = None
    while i + 8 <= stop:
        kind, size = data[i:i + 4], struct.unpack("<I", data[i + 4:i + 8])[0]
        p, end = i + 8, i + 8 + size + (size & 1)
        if p + size > stop:
            raise _bad(f"truncated WebP chunk {kind!r}")
        chunks += 1
        if chunks > MAX_RIFF_CHUNKS:
            raise _costly(f"WebP with more than {MAX_RIFF_CHUNKS} chunks")
        if kind == b"VP8X":
            if i != 12 or size < 10:
                raise _bad("WebP VP8X chunk misplaced or short")
            if data[p] & 0x02:
                raise ImageHeaderError("animated WebP", "unsupported_format")
            canvas = (1 + int.from_bytes(data[p + 4:p + 7], "little"), 1 + int.from_bytes(data[p + 7:p + 10], "little"))
        elif kind in (b"ANIM", b"ANMF"):
            raise ImageHeaderError("animated WebP", "unsupported_format")
        elif kind in (b"VP8 ", b"VP8L"):
            if frame is not None:
                raise _bad("WebP with more than one bitstream")
            frame = _vp8_size(data, p, size) if kind == b"VP8 " else _vp8l_size(data, p, size)
        i = end
    if frame is None:
        raise _bad("WebP without a VP8/VP8L bitstream")
    if canvas is not None and canvas != frame:
        raise _bad(f"WebP canvas {canvas[0]}x{canvas[1]} is not its bitstream's {frame[0]}x{frame[1]}")
    return ImageInfo("webp", *frame)


def _vp8_size(data: bytes, p: int, size: int) -> tuple[int, int]:
    if size < 10 or data[p + 3:p + 6] != b"\x9d\x01\x2a":
        raise _bad("WebP VP8 bitstream without a key frame header")
    w, h = struct.unpack("<HH", data[p + 6:p + 10])
    return w & 0x3FFF, h & 0x3FFF


def _vp8l_size(data: bytes, p: int, size: int) -> tuple[int, int]:
    if size < 5 or data[p] != 0x2F:
        raise _bad("WebP VP8L bitstream without its signature")
    b = data[p + 1:p + 5]
    w = 1 + (((b[1] & 0x3F) << 8) | b[0])
    h = 1 + (((b[3] & 0x0F) << 10) | (b[2] << 2) | ((b[1] & 0xC0) >> 6))
    return w, h


# -- BMP, TIFF, PNM (folder sources at the agent) ----------------------------------------------
def _bmp(data: bytes) -> ImageInfo:
    if len(data) < 26:
        raise _bad("truncated BMP header")
    (dib,) = struct.unpack("<I", data[14:18])
    if dib == 12:
        w, h = struct.unpack("<HH", data[18:22])
    elif 40 <= dib <= 124 and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        h = abs(h)  # negative: rows stored top-down
    else:
        raise _bad(f"BMP with an unknown {dib}-byte header")
    return ImageInfo("bmp", w, h)


# Compressions whose decoding cost is bounded by the pixels: none, LZW, deflate (two codes),
# PackBits. JPEG-in-TIFF (6, 7) would smuggle a JPEG past the scan count; the rest are rare.
_TIFF_COMPRESSIONS = {1, 5, 8, 32946, 32773}


def _tiff(data: bytes) -> ImageInfo:
    order = "<" if data[:2] == b"II" else ">"
    if struct.unpack(order + "H", data[2:4])[0] == 43:
        raise ImageHeaderError("BigTIFF", "unsupported_format")
    if len(data) < 8:
        raise _bad("truncated TIFF header")
    (ifd,) = struct.unpack(order + "I", data[4:8])
    if ifd + 2 > len(data):
        raise _bad("TIFF directory past the end")
    (entries,) = struct.unpack(order + "H", data[ifd:ifd + 2])
    if entries > MAX_TIFF_ENTRIES or ifd + 2 + 12 * entries > len(data):
        raise _bad(f"TIFF directory of {entries} entries")
    tags = {}
    for k in range(entries):
        e = ifd + 2 + 12 * k
        tag, typ, count = struct.unpack(order + "HHI", data[e:e + 8])
        if tag in (256, 257, 259) and count == 1 and typ in (3, 4):
            tags[tag] = struct.unpack(order + ("H" if typ == 3 else "I"), data[e + 8:e + (10 if typ == 3 else 12)])[0]
    if 256 not in tags or 257 not in tags:
        raise _bad("TIFF without its image width and length")
    compression = tags.get(259, 1)
    if compression not in _TIFF_COMPRESSIONS:
        raise ImageHeaderError(f"TIFF with compression {compression}", "unsupported_format")
    return ImageInfo("tiff", tags[256], tags[257])


_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n]*\n)*(\d{1,10})")


def _pnm(data: bytes) -> ImageInfo:
    head = data[:4096]  # the header is a few tokens; comments are bounded by this window
    values, i = [], 2
    for _ in range(2 if data[1:2] in b"14" else 3):
        m = _PNM_TOKEN.match(head, i)
        if m is None:
            raise _bad("PNM header without its width, height and maximum value")
        values.append(int(m.group(1)))
        i = m.end()
    return ImageInfo("pnm", values[0], values[1])


_READERS = {"jpeg": _jpeg, "png": _png, "webp": _webp, "bmp": _bmp, "tiff": _tiff, "pnm": _pnm}
