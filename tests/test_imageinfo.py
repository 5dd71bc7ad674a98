"""The decode-cost check (tilestream.imageinfo) on crafted hostile images, alone and through the
processor's stage (:class:`stream_processor.stage.ProcessorStage`, the worker's per-frame path; no broker).

The crafted images are never decoded here: the 3000-scan JPEG below takes OpenCV about a second,
the reviewer's 6000x6000 one 34 s. That the check refuses without decoding is shown by structure
(the module cannot decode: it imports no codec, see the first test) and by the refusal reason.
"""

from __future__ import annotations

import random
import re
import struct
import subprocess
import sys
import time
import zlib

import cv2
import numpy as np
import pytest

from stream_processor.stage import ProcessorStage
from tilestream import crypto, topics
from tilestream.config import Settings
from tilestream.envelope import FrameHeader
from tilestream.imageinfo import (FORMATS, MAX_JPEG_SEGMENTS, MAX_SCANS, DecodeLimits, ImageHeaderError, check,
                                  inspect, probe)
from tilestream.metrics import Metrics
from tilestream.records import DeadLetter

LIMITS = DecodeLimits(max_bytes=4 << 20, max_pixels=40_000_000)  # the processor's defaults


# -- crafting ---------------------------------------------------------------------------------
def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a well-formed JPEG, a scan's entropy-coded data included."""
    out, i = [], 2
    while data[i + 1] != 0xD9:
        marker = data[i + 1]
        end = i + 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker == 0xDA:
            end = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]").search(data, end).start()
        out.append((marker, i, end))
        i = end
    return out + [(0xD9, i, i + 2)]


def progressive_jpeg(width: int, height: int, scans: int) -> bytes:
    """A flat progressive JPEG whose smallest scan (an AC band: a few end-of-band runs) is repeated
    until the file has ``scans`` scans: the decoder walks every block once per scan."""
    ok, buf = cv2.imencode(".jpg", np.full((height, width), 128, np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    data = buf.tobytes()
    segs = jpeg_segments(data)
    sos = [(s, e) for m, s, e in segs if m == 0xDA]
    s, e = min(sos, key=lambda se: se[1] - se[0])
    eoi = segs[-1][1]
    return data[:eoi] + data[s:e] * (scans - len(sos)) + data[eoi:]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, raw: bytes) -> bytes:
    """A greyscale 8-bit PNG with ``raw`` (filter bytes + rows, or anything else) as its zlib stream."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b""))


def refused(data: bytes, limits: DecodeLimits = LIMITS) -> ImageHeaderError:
    with pytest.raises(ImageHeaderError) as exc:
        check(data, limits)
    return exc.value


# -- the module -------------------------------------------------------------------------------
def test_the_check_is_pure_it_imports_no_codec_framework_or_stage():
    code = ("import sys, tilestream.imageinfo; "
            "bad = [m for m in ('cv2', 'numpy', 'PIL', 'faust', 'kafka', 'stream_processor', 'edge_agent', 'classifier') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp", ".tif", ".ppm"])
def test_what_encoders_write_passes_with_its_size(ext):
    image = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    data = cv2.imencode(ext, image)[1].tobytes()
    info = check(data, DecodeLimits(1 << 20, 10_000, formats=FORMATS))
    assert (info.width, info.height, info.passes) == (53, 37, 1)


def test_a_progressive_jpeg_of_a_real_frame_passes_with_its_scans_counted(vtest_path):
    from sampledata import iter_video_frames

    frame = next(iter(iter_video_frames(str(vtest_path), max_frames=1)))
    data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    info = check(data, LIMITS)
    assert (info.format, info.width, info.height, info.progressive) == ("jpeg", 768, 576, True)
    assert 2 <= info.passes <= 12  # libjpeg's script: 10 scans for colour


# -- JPEG work bombs --------------------------------------------------------------------------
def test_a_progressive_jpeg_with_thousands_of_empty_scans_is_too_large():
    bomb = progressive_jpeg(2000, 2000, 3000)
    assert len(bomb) < 100_000 and 2000 * 2000 < LIMITS.max_pixels  # small, and within the pixel limit
    err = refused(bomb)
    assert err.reason == "too_large" and "marker segments" in str(err)


def test_more_scans_than_the_limit_is_too_large_whatever_the_size():
    assert inspect(progressive_jpeg(64, 64, MAX_SCANS)).passes == MAX_SCANS
    check(progressive_jpeg(64, 64, MAX_SCANS), LIMITS)
    err = refused(progressive_jpeg(64, 64, MAX_SCANS + 1))
    assert err.reason == "too_large" and f"{MAX_SCANS + 1} scans > limit {MAX_SCANS}" in str(err)


def test_scans_times_pixels_over_the_budget_is_too_large():
    data = progressive_jpeg(1000, 1000, 40)  # 40 M pixel-scans
    limits = DecodeLimits(4 << 20, max_pixels=2_000_000)  # budget 16 x 2 M = 32 M
    err = refused(data, limits)
    assert err.reason == "too_large" and "pixel-scans > budget 32000000" in str(err)
    assert check(data, DecodeLimits(4 << 20, max_pixels=3_000_000)).cost == 40_000_000


def test_a_jpeg_of_many_segments_is_refused_before_its_walk_gets_long():
    ok, buf = cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))
    data = buf.tobytes()
    comments = b"\xff\xfe\x00\x04ab" * (MAX_JPEG_SEGMENTS + 1)
    assert refused(data[:2] + comments + data[2:]).reason == "too_large"


def test_truncated_and_malformed_jpegs_are_bad_images():
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = buf.tobytes()
    for cut in (3, 10, 100, len(data) // 2, len(data) - 2):
        assert refused(data[:cut]).reason == "bad_image", cut
    sof = data.index(b"\xff\xc0")
    assert refused(data[:sof] + data[sof:sof + 4] + b"\x00" * 4 + data[sof + 8:]).reason == "bad_image"  # 0 components
    assert refused(b"\xff\xd8\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00\xff\xd9").reason == "bad_image"  # scan, no frame
    sos = data.index(b"\xff\xda")
    assert refused(data[:sos] + data[sof:sos] + data[sos:]).reason == "bad_image"  # a second frame header
    assert check(data + b"trailing bytes after the end marker", LIMITS).passes == 1


# -- PNG --------------------------------------------------------------------------------------
def test_a_30000_by_30000_png_header_is_too_large():
    bomb = png(30000, 30000, b"\x00" * (30001 * 100))  # a few KB; 900 MP if decoded
    err = refused(bomb)
    assert err.reason == "too_large" and "30000x30000" in str(err)


def test_zlib_data_after_the_rows_is_a_bad_image_found_within_one_window():
    rows = (b"\x00" + b"\x00" * 100) * 100
    assert check(png(100, 100, rows), LIMITS).format == "png"
    bomb = png(100, 100, rows + b"\x00" * 50_000_000)  # 49 KB of zlib: 50 MB more inflate work for libpng
    err = refused(bomb)
    assert err.reason == "bad_image" and "inflates past the 10100 bytes" in str(err)
    assert refused(png(100, 100, rows[:-1])).reason == "bad_image"  # one byte short


def test_truncated_and_malformed_pngs_are_bad_images():
    data = cv2.imencode(".png", np.random.default_rng(3).integers(0, 256, (40, 40), dtype=np.uint8))[1].tobytes()
    for cut in (20, 40, len(data) // 2, len(data) - 12, len(data) - 1):
        assert refused(data[:cut]).reason == "bad_image", cut
    idat = data.index(b"IDAT") - 4
    assert refused(data[:idat] + data[-12:]).reason == "bad_image"  # no image data
    broken = bytearray(data)
    broken[idat + 10:idat + 20] = b"\xff" * 10
    assert refused(bytes(broken)).reason == "bad_image"  # not a zlib stream any more


def test_other_formats_and_animated_webp_are_unsupported():
    assert refused(b"GIF89a" + b"\x00" * 64).reason == "unsupported_format"
    bmp = cv2.imencode(".bmp", np.zeros((4, 4, 3), np.uint8))[1].tobytes()
    assert refused(bmp).reason == "unsupported_format"  # not on the wire
    assert check(bmp, DecodeLimits(1 << 20, 100, formats=FORMATS)).format == "bmp"
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x02, 0, 0, 0]) + (99).to_bytes(3, "little") * 2
    anim = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    assert refused(anim).reason == "unsupported_format"
    still = png(4, 4, b"\x00\x00\x00\x00\x00" * 4)
    apng = still[:33] + png_chunk(b"acTL", struct.pack(">II", 1000, 0)) + still[33:]
    assert refused(apng).reason == "unsupported_format"


def test_probe_survives_any_mutation_with_a_clean_refusal_or_an_answer():
    """Random truncations and byte flips of real files: only ImageHeaderError, never IndexError,
    struct.error or a hang."""
    rng = random.Random(7)
    image = np.random.default_rng(4).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    samples = [cv2.imencode(ext, image)[1].tobytes() for ext in (".jpg", ".png", ".webp", ".bmp", ".tif", ".ppm")]
    samples.append(progressive_jpeg(32, 24, 12))
    for _ in range(3000):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)):]
        try:
            check(bytes(data), DecodeLimits(1 << 20, 1_000_000, formats=FORMATS))
        except ImageHeaderError as exc:
            assert exc.reason in ("bad_image", "too_large", "unsupported_format")


def test_probe_still_answers_format_and_size():
    assert probe(cv2.imencode(".webp", np.zeros((5, 7, 3), np.uint8))[1].tobytes()) == ("webp", 7, 5)


# -- through the processor ----------------------------------------------------------------------
@pytest.fixture
def seal(keystore):
    cloud_kid, suite, cloud_public = keystore.cloud_public_key()
    device_kid, device_key = keystore.device_private_key("cam-test")

    def sealed(data: bytes, width: int, height: int, encoding: str = "jpeg", seq: int = 1) -> bytes:
        header = FrameHeader("cam-test", seq, time.time_ns(), width, height, encoding, cloud_kid, device_kid, suite=suite)
        return crypto.seal_frame(data, header, cloud_public, device_key)

    return sealed


@pytest.fixture
def processor(keystore):
    settings = Settings(keys_dir=str(keystore.path))
    settings.kafka.max_frame_bytes, settings.processor.max_image_pixels = LIMITS.max_bytes, LIMITS.max_pixels
    return ProcessorStage.create(settings, Metrics("tilestream_test"))


def rejection(processor: ProcessorStage, blob: bytes) -> DeadLetter:
    """The dead letter the processor's per-frame path makes of ``blob`` (then the frame's replay mark:
    it was accepted before its image was refused, so a copy of it is a replay)."""
    out = processor.on_frame(blob, 0, 1)
    assert [o.topic for o in out] == [topics.DEAD_LETTERS, topics.REPLAY_MARKS]
    return DeadLetter.from_bytes(out[0].value)


def test_the_processor_dead_letters_work_bombs_as_too_large_and_broken_images_as_bad(processor, seal):
    good = cv2.imencode(".jpg", np.random.default_rng(5).integers(0, 256, (240, 320), dtype=np.uint8))[1].tobytes()
    out = processor.on_frame(seal(good, 320, 240), 0, 0)
    assert [o.topic for o in out] == [topics.TILE_FEATURES, topics.REPLAY_MARKS]

    r = rejection(processor, seal(progressive_jpeg(2000, 2000, 3000), 2000, 2000, seq=2))
    assert r.reason == "too_large" and r.frame_id == "cam-test/2"
    r = rejection(processor, seal(progressive_jpeg(320, 240, MAX_SCANS + 1), 320, 240, seq=3))
    assert r.reason == "too_large" and "scans > limit" in r.message
    r = rejection(processor, seal(png(30000, 30000, b"\x00" * 30001), 30000 % 65536, 30000, "png", seq=4))
    assert r.reason == "too_large"
    rows = (b"\x00" + b"\x00" * 320) * 240
    r = rejection(processor, seal(png(320, 240, rows + b"\x00" * 10_000_000), 320, 240, "png", seq=5))
    assert r.reason == "bad_image" and "inflates past" in r.message
    r = rejection(processor, seal(good[: len(good) // 2], 320, 240, seq=6))
    assert r.reason == "bad_image" and "truncated" in r.message
    gif = b"GIF89a" + struct.pack("<HH", 320, 240) + b"\x00" * 32
    r = rejection(processor, seal(gif, 320, 240, seq=7))
    assert r.reason == "bad_image"  # the wire knows no reason unsupported_format
