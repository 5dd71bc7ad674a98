from __future__ import annotations

import numpy as np

from classifier.assembler import FrameAssembler
from tilestream.records import FrameRef, TileFeatures


def tile(frame: str, index: int, n: int = 3) -> TileFeatures:
    return TileFeatures(frame=FrameRef(frame, "c", int(frame.split("/")[1]), 1, 8, 8), tile_index=index, n_tiles=n, x=0, y=0, w=8, h=8, feature_digest="d",
                        processed_ns=2, vec=np.zeros(4, np.float32))


def test_frame_completes_once_and_redelivery_is_ignored():
    a = FrameAssembler(timeout_s=10)
    assert a.add(tile("c/1", 0), 0, 10, 0.0) is None
    assert a.add(tile("c/1", 0), 0, 11, 0.0) is None  # duplicate tile
    assert a.add(tile("c/1", 2), 0, 12, 0.0) is None
    frame = a.add(tile("c/1", 1), 0, 13, 0.0)
    assert frame is not None and frame.complete and frame.missing() == []
    a.done(frame)
    assert a.add(tile("c/1", 1), 0, 14, 0.0) is None  # redelivered after the result
    assert a.duplicates == 2
    assert a.pending == {}


def test_commit_never_passes_a_pending_frame():
    a = FrameAssembler(timeout_s=10)
    a.add(tile("c/1", 0), 0, 5, 0.0)   # frame 1 pending from offset 5
    a.add(tile("c/2", 0, n=1), 0, 6, 0.0)
    a.done(a.pending["c/2"])
    assert a.committable() == {0: 5}
    a.add(tile("c/1", 1), 0, 7, 0.0)
    f = a.add(tile("c/1", 2), 0, 8, 0.0)
    a.done(f)
    assert a.committable() == {0: 9}


def test_timed_out_frames_name_their_missing_tiles():
    a = FrameAssembler(timeout_s=5)
    a.add(tile("c/1", 1), 0, 0, 100.0)
    assert a.expired(104.9) == []
    [f] = a.expired(105.0)
    assert not f.complete and f.missing() == [0, 2]


def test_revoked_partitions_drop_their_frames():
    a = FrameAssembler()
    a.add(tile("c/1", 0), 0, 0, 0.0)
    a.add(tile("c/2", 0), 1, 0, 0.0)
    a.forget_partitions({0})
    assert list(a.pending) == ["c/2"]
    assert a.committable() == {1: 0}


def test_a_tile_batch_carries_every_tile_exactly():
    from tilestream.records import TileBatch
    from stream_processor.tiling import Tile

    class Frame:
        frame_id, camera_id, seq, capture_ns, width, height = "c/7", "c", 7, 5, 100, 50

    vecs = [np.arange(3, dtype=np.float32) + i for i in range(4)]
    tiles = [(Tile(i, 10 * i, 0, 10, 10), v) for i, v in enumerate(vecs)]
    wire = TileBatch.make(Frame, 9, tiles, "dig", 123).to_bytes()
    back = TileBatch.from_bytes(wire).split()
    assert [(t.tile_index, t.x, t.n_tiles, t.frame_width) for t in back] == [(i, 10 * i, 9, 100) for i in range(4)]
    for t, v in zip(back, vecs):
        np.testing.assert_array_equal(t.vector(), v)
    a = FrameAssembler()
    frame = None
    for t in back:  # one record (one offset) holds several tiles of the frame
        frame = a.add(t, 0, 42, 0.0) or frame
    assert frame is None and a.committable() == {0: 42}
