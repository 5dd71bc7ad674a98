"""One frame identity (:class:`tilestream.records.FrameRef`) in every per-frame record, and the wire
bytes: a tile batch's binary body (what the stage key MACs, written out field by field below), the
JSON body processors wrote before it (still read, for a rolling upgrade) and a tile job's header
(the AES-GCM associated data) are pinned here."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest

from stream_processor.tilejobs import TileJob
from tilestream.envelope import FrameHeader
from tilestream.records import FrameRef, RecordError, TileBatch

HEADER = FrameHeader("cam-pin", 42, 1_700_000_000_123_456_789, 96, 64, "jpeg", b"c" * 8, b"d" * 8)
LEGACY_JSON = (b'{"frame_id":"cam-pin/42","camera_id":"cam-pin","seq":42,"capture_ns":1700000000123456789,"frame_width":96,'
         b'"frame_height":64,"n_tiles":6,"feature_digest":"sha256:abcd","processed_ns":1700000001000000000,"tiles":'
         b'[[0,0,0,32,32],[1,32,0,32,32],[2,64,0,32,32],[3,0,32,32,32],[4,32,32,32,32],[5,64,32,32,32]],"dim":4,'
         b'"features":"AAAAAAAAgD8AAABAAABAQAAAgD8AAABAAABAQAAAgEAAAABAAABAQAAAgEAAAKBAAABAQAAAgEAAAKBAAADAQAAAgEAAAKBA'
         b'AADAQAAA4EAAAKBAAADAQAAA4EAAAABB"}')
def _le(v: int, n: int) -> bytes:
    return v.to_bytes(n, "little")


FEATURES = np.array([np.arange(4) + i for i in range(6)], dtype="<f4")
RECTS = [[i, 32 * (i % 3), 32 * (i // 3), 32, 32] for i in range(6)]
BATCH = (b"TBF1" + b"\x02" + b"\0\0\0"                                             # magic, float16, reserved
         + _le(42, 8) + _le(1_700_000_000_123_456_789, 8) + _le(1_700_000_001_000_000_000, 8)  # seq, capture, processed
         + _le(96, 4) + _le(64, 4) + _le(6, 4) + _le(6, 4) + _le(4, 4)                 # w, h, n_tiles, rows, dim
         + _le(10, 2) + _le(7, 2) + _le(11, 2) + b"\0\0"                              # id lengths, reserved
         + b"".join(_le(v, 4) for r in RECTS for v in r)                               # rectangles, int32
         + FEATURES.astype("<f2").tobytes()                                            # matrix, float16
         + b"cam-pin/42" + b"cam-pin" + b"sha256:abcd")
JOB = (b'{"frame_id":"cam-pin/42","camera_id":"cam-pin","seq":42,"capture_ns":1700000000123456789,"frame_width":96,'
       b'"frame_height":64,"n_tiles":6,"band":1,"n_bands":2,"y0":32,"band_height":32,"first_tile":3,"last_tile":6,'
       b'"key_id":"0123456789abcdef","made_ns":1700000000500000000}')


def batch() -> TileBatch:
    tiles = [(NS(index=i, x=32 * (i % 3), y=32 * (i // 3), w=32, h=32), np.arange(4, dtype=np.float32) + i)
             for i in range(6)]
    return TileBatch.make(HEADER, 6, tiles, "sha256:abcd", 1_700_000_001_000_000_000)


def test_the_tile_batch_bytes_are_the_pinned_ones_and_read_back_the_same():
    b = batch()
    assert b.to_bytes() == BATCH and len(BATCH) == 60 + 6 * 20 + 6 * 4 * 2 + 28
    back = TileBatch.from_bytes(BATCH)
    assert back == b and back.to_bytes() == BATCH
    assert np.array_equal(back.matrix(), FEATURES) and back.tiles == RECTS and back.dtype == "float16"
    assert back.frame == FrameRef.of(HEADER) == FrameRef("cam-pin/42", "cam-pin", 42, 1_700_000_000_123_456_789, 96, 64)
    assert (back.frame_id, back.camera_id, back.seq, back.frame_width, back.frame_height) == ("cam-pin/42", "cam-pin",
                                                                                              42, 96, 64)
    [t] = [t for t in back.split() if t.tile_index == 1]
    assert t.frame is back.frame and (t.frame_id, t.capture_ns, t.x) == ("cam-pin/42", 1_700_000_000_123_456_789, 32)


def test_the_json_body_of_before_is_still_read_the_same():
    b = batch()
    assert b.to_json() == LEGACY_JSON
    back = TileBatch.from_bytes(LEGACY_JSON)
    assert back.dtype == "float32" and (back.frame, back.n_tiles, back.tiles) == (b.frame, b.n_tiles, b.tiles)
    assert np.array_equal(back.matrix(), b.matrix()) and back.to_json() == LEGACY_JSON
    assert TileBatch.make(HEADER, 6, [(NS(index=t[0], x=t[1], y=t[2], w=t[3], h=t[4]), r) for t, r in
                                      zip(back.tiles, back.matrix())], back.feature_digest, back.processed_ns).to_bytes() == BATCH


def test_the_tile_job_header_is_the_one_written_before():
    job = TileJob(FrameRef.of(HEADER), 6, 1, 2, 32, 32, 3, 6, "0123456789abcdef", 1_700_000_000_500_000_000)
    assert job.header_json() == JOB
    import json

    assert TileJob.from_header(json.loads(JOB)) == job
    with pytest.raises(TypeError):
        TileJob.from_header({k: v for k, v in json.loads(JOB).items() if k != "camera_id"})
    assert FrameRef.of(job) is job.frame  # a batch of a band takes the job's frame as it is


@pytest.mark.parametrize("field, value", [("frame_id", ""), ("camera_id", "x" * 129), ("seq", -1), ("seq", True),
                                          ("capture_ns", 2**63), ("frame_width", 0), ("frame_height", 65_536)])
def test_the_frame_fields_are_bounded_in_one_place(field, value):
    import json

    d = json.loads(LEGACY_JSON)
    d[field] = value
    with pytest.raises(RecordError, match=field):
        FrameRef.read(d)
    with pytest.raises(RecordError):
        TileBatch.from_bytes(json.dumps(d).encode())
