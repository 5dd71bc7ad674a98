"""The binary tile batch body (:class:`tilestream.records.TileBatch`): round trips in both dtypes,
one refusal per way a header can lie, and a bounded fuzz (truncations, bit flips, header fields set
to anything, huge lengths) under which the reader refuses with RecordError and never raises
anything else nor returns a batch that breaks its own bounds."""

from __future__ import annotations

import random
import struct
from collections import namedtuple

import numpy as np
import pytest

from tilestream.records import (BODY_HEAD_LEN, MAX_DIM, MAX_TILE_BATCH_BYTES, MAX_TILES, FrameRef, RecordError,
                                TileBatch)

T = namedtuple("T", "index x y w h")
FRAME = FrameRef("cam-x/7", "cam-x", 7, 1_000, 128, 64)
HEAD = struct.Struct("<4sB3sQQQIIIIIHHHH")  # the layout, written out here on purpose (not imported)
FIELDS = ("magic", "dtype", "reserved", "seq", "capture_ns", "processed_ns", "width", "height", "n_tiles", "rows",
          "dim", "n_fid", "n_cam", "n_dig", "reserved2")


def make(n_tiles=3, indices=(0, 2), dim=5, dtype="float32", frame=FRAME, values=None) -> TileBatch:
    tiles = [(T(i, 32 * (i % 4), 32 * (i // 4), 32, 32),
              np.linspace(-1, 1, dim, dtype=np.float32) * (i + 1) if values is None else values)
             for i in indices]
    return TileBatch.make(frame, n_tiles, tiles, "sha256:feed", 5_000, dtype=dtype)


def patch(body: bytes, **fields) -> bytes:
    """The body with header fields replaced (the rest kept as it was)."""
    d = dict(zip(FIELDS, HEAD.unpack_from(body)))
    d.update(fields)
    return HEAD.pack(*(d[f] for f in FIELDS)) + body[HEAD.size:]


def test_the_layout_is_the_documented_one():
    assert HEAD.size == BODY_HEAD_LEN == 60


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_in_each_dtype(dtype):
    b = make(dtype=dtype)
    body = b.to_bytes()
    assert len(body) == 60 + 2 * 20 + 2 * 5 * (4 if dtype == "float32" else 2) + len("cam-x/7cam-xsha256:feed")
    back = TileBatch.from_bytes(body)
    assert back == b and back.dtype == dtype and back.tiles == [[0, 0, 0, 32, 32], [2, 64, 0, 32, 32]]
    m = back.matrix()
    assert m.dtype == np.float32 and m.shape == (2, 5)
    want = np.stack([np.linspace(-1, 1, 5, dtype=np.float32) * (i + 1) for i in (0, 2)])
    assert np.allclose(m, want, atol=0 if dtype == "float32" else 2e-3)
    assert [t.tile_index for t in back.split()] == [0, 2] and back.split()[1].vector().shape == (5,)


def test_float16_values_out_of_its_range_are_written_as_float32():
    b = make(dtype="float16", values=np.array([1e6, 0, 0, 0, 0], np.float32))
    assert b.dtype == "float32" and TileBatch.from_bytes(b.to_bytes()).matrix()[0, 0] == 1e6


def test_an_empty_batch_round_trips():
    b = make(indices=(), dim=0)
    assert TileBatch.from_bytes(b.to_bytes()) == b


GOOD = make().to_bytes()


@pytest.mark.parametrize("name, data", [
    ("empty", b""),
    ("magic only", b"TBF1"),
    ("another magic", b"TBF2" + GOOD[4:]),
    ("header cut", GOOD[:BODY_HEAD_LEN - 1]),
    ("one byte missing", GOOD[:-1]),
    ("one byte trailing", GOOD + b"\0"),
    ("dtype 0", patch(GOOD, dtype=0)),
    ("dtype float64", patch(GOOD, dtype=3)),
    ("reserved set", patch(GOOD, reserved=b"\0\1\0")),
    ("second reserved set", patch(GOOD, reserved2=1)),
    ("n_tiles 0", patch(GOOD, n_tiles=0)),
    ("n_tiles huge", patch(GOOD, n_tiles=10**7)),
    ("more rows than tiles", patch(GOOD, n_tiles=1)),
    ("rows huge", patch(GOOD, rows=2**32 - 1, n_tiles=MAX_TILES)),
    ("dim huge", patch(GOOD, dim=2**32 - 1)),
    ("dim one more", patch(GOOD, dim=6)),
    ("frame id length 0", patch(GOOD, n_fid=0)),
    ("frame id length huge", patch(GOOD, n_fid=65_535)),
    ("digest length huge", patch(GOOD, n_dig=65_535)),
    ("seq above int64", patch(GOOD, seq=2**63)),
    ("capture above int64", patch(GOOD, capture_ns=2**64 - 1)),
    ("processed above int64", patch(GOOD, processed_ns=2**63)),
    ("width 0", patch(GOOD, width=0)),
    ("height above MAX_SIDE", patch(GOOD, height=65_536)),
    ("tile outside the frame", patch(GOOD, width=64)),
    ("index twice", make(indices=(1, 1)).to_bytes()),
    ("index >= n_tiles", make(n_tiles=2, indices=(0, 2)).to_bytes()),
    ("NaN feature", make(values=np.array([np.nan, 0, 0, 0, 0], np.float32)).to_bytes()),
    ("inf feature", make(values=np.array([np.inf, 0, 0, 0, 0], np.float32)).to_bytes()),
    ("not UTF-8 id", GOOD[:-len("cam-x/7cam-xsha256:feed")] + b"\xff" * 7 + GOOD[-len("cam-xsha256:feed"):]),
    ("oversized", b"TBF1" + b"\0" * MAX_TILE_BATCH_BYTES),
    ("not bytes", "TBF1"),
])
def test_each_lie_of_a_header_is_refused(name, data):
    with pytest.raises(RecordError):
        TileBatch.from_bytes(data)


def test_negative_and_zero_sized_rectangles_are_refused():
    for k, v in ((0, -1), (1, -1), (2, -1), (3, 0), (4, 0), (3, -5), (4, 70_000)):
        rect = bytearray(GOOD)
        struct.pack_into("<i", rect, BODY_HEAD_LEN + 4 * k, v)
        with pytest.raises(RecordError):
            TileBatch.from_bytes(bytes(rect))


def binary_mutations(valid: bytes, rng: random.Random):
    """Truncations, bit flips, header fields set to anything (huge lengths included) and splices
    of a valid binary body."""
    head = dict(zip(FIELDS, HEAD.unpack_from(valid)))
    big = [0, 1, 2, 3, 255, 65_535, 2**31 - 1, 2**31, 2**32 - 1]
    while True:
        kind = rng.randrange(5)
        if kind == 0:
            yield valid[:rng.randrange(len(valid))]
        elif kind == 1:
            b = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            yield bytes(b)
        elif kind == 2:
            f = rng.choice(FIELDS[1:])
            if f == "reserved":
                v = bytes(rng.randrange(256) for _ in range(3))
            elif f in ("seq", "capture_ns", "processed_ns"):
                v = rng.choice([0, 2**63 - 1, 2**63, 2**64 - 1, rng.randrange(2**64)])
            elif f in ("n_fid", "n_cam", "n_dig", "reserved2"):
                v = rng.choice([0, 1, 7, 64, 65_535, rng.randrange(65_536)])
            elif f == "dtype":
                v = rng.randrange(256)
            else:
                v = rng.choice(big + [head[f] + 1, max(0, head[f] - 1), rng.randrange(2**32)])
            yield patch(valid, **{f: v})
        elif kind == 3:  # a rectangle value set to anything
            b = bytearray(valid)
            struct.pack_into("<i", b, BODY_HEAD_LEN + 4 * rng.randrange(5 * head["rows"]),
                             rng.choice([-1, 0, 1, 2**31 - 1, -2**31, rng.randrange(-200, 200)]))
            yield bytes(b)
        else:  # bytes inserted or removed anywhere
            i = rng.randrange(len(valid))
            yield valid[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5))) + valid[i:] \
                if rng.random() < 0.5 else valid[:i] + valid[i + rng.randrange(1, 5):]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fuzz_the_reader_refuses_or_returns_a_batch_within_bounds(dtype):
    rng = random.Random(99)
    gen = binary_mutations(make(n_tiles=4, indices=(0, 1, 3), dtype=dtype).to_bytes(), rng)
    refused = 0
    for _ in range(20_000):
        data = next(gen)
        try:
            b = TileBatch.from_bytes(data)
        except RecordError:
            refused += 1
            continue
        # Accepted (a flip inside a feature value or an id character): it must hold its bounds.
        m = b.matrix()
        assert m.shape == (len(b.tiles), b.dim) and np.isfinite(m).all() and b.dim <= MAX_DIM
        assert 1 <= b.n_tiles <= MAX_TILES and len({t[0] for t in b.tiles}) == len(b.tiles)
        assert all(0 <= i < b.n_tiles and 0 <= x < b.frame_width and 0 <= y < b.frame_height and w > 0 and h > 0
                   for i, x, y, w, h in b.tiles)
        assert b.to_bytes() == data  # nothing was read that is not written back: no slack in the format
    assert refused > 10_000


def test_a_whole_frame_tile_round_trips():
    """One tile covering a 768x576 frame has 20,752 values (HOG cell 16): a setting, not an attack."""
    from tilestream.config import FeatureConfig
    from stream_processor.features import feature_length

    dim = feature_length(FeatureConfig(tile_size=768))
    assert dim > 8_192
    b = make(n_tiles=1, indices=(0,), dim=dim)
    assert TileBatch.from_bytes(b.to_bytes()).dim == dim
