"""The processor stage object (no Kafka): the worker's per-record path, run inline — tile batches
MACed with the stage key and a replay mark after them, the replay check (a copy is refused, the
same record re-read is processed again), fan-out of a large frame into tile jobs whose features
are the whole frame's, dead letters with one reason each, and the guard that turns a bug into an
``internal`` dead letter."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest

from stream_processor import replay
from stream_processor.pipeline import FrameProcessor
from stream_processor.stage import ProcessorStage, StageIO, run_inline
from tilestream import crypto, topics
from tilestream.config import Settings
from tilestream.envelope import FrameHeader
from tilestream.keys import KeyStore
from tilestream.metrics import Metrics
from tilestream.records import DeadLetter, TileBatch
from tilestream.stagekeys import StageKeys

CAM = "cam-stage"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = KeyStore(tmp_path_factory.mktemp("stage-keys") / "keys")
    store.init()
    StageKeys(store.path).init()
    store.enroll(CAM)
    return store


def stage_of(store, **processor) -> ProcessorStage:
    settings = Settings(keys_dir=str(store.path))
    for k, v in processor.items():
        setattr(settings.processor, k, v)
    return ProcessorStage.create(settings, Metrics("tilestream_test"))


def seal(store, image: np.ndarray, seq: int, capture_ns: int | None = None) -> bytes:
    cloud_kid, suite, cloud_public = store.cloud_public_key()
    device_kid, device_key = store.device_private_key(CAM)
    data = cv2.imencode(".png", image)[1].tobytes()
    h = FrameHeader(CAM, seq, time.time_ns() if capture_ns is None else capture_ns, image.shape[1], image.shape[0],
                    "png", cloud_kid, device_kid, suite=suite)
    return crypto.seal_frame(data, h, cloud_public, device_key)


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def topics_of(out) -> list[str]:
    return [o.topic for o in out]


def letter(out) -> DeadLetter:
    [o] = [o for o in out if o.topic == topics.DEAD_LETTERS]
    return DeadLetter.from_bytes(o.value)


def test_a_frame_becomes_one_maced_tile_batch_then_its_mark_and_a_copy_is_a_replay(store):
    stage = stage_of(store)
    blob = seal(store, image(240, 320), seq=1)
    out = stage.on_frame(blob, 2, 10)
    assert topics_of(out) == [topics.TILE_FEATURES, topics.REPLAY_MARKS]
    mac_keys = StageKeys(store.path).mac_keys()
    batch = TileBatch.from_wire(out[0].value, mac_keys)
    assert out[0].key == f"{CAM}/1".encode() and batch.frame_id == f"{CAM}/1"
    # the same features as the pure compute
    env = stage.processor.verify(blob)
    [expected], _ = stage.processor.process_verified(env)
    assert batch.tiles == expected.tiles and batch.features == expected.features
    mark = replay.decode_mark(out[1].key, out[1].value, stage.mark_keys)
    assert (mark.source, mark.partition, mark.camera, mark.high) == (topics.FRAMES, 2, CAM, 1)
    assert stage.metrics.counter("frames_total") == 1 and stage.metrics.counter("tiles_total") == len(batch.tiles)

    assert topics_of(stage.on_frame(blob, 2, 10)) == [topics.TILE_FEATURES]  # redelivery: processed, already marked
    copy = stage.on_frame(blob, 3, 77)
    assert topics_of(copy) == [topics.DEAD_LETTERS]  # refused before acceptance: no mark
    dl = letter(copy)
    assert (dl.stage, dl.reason, dl.frame_id, dl.source_topic, dl.source_partition, dl.source_offset) == \
        ("processor", "replay", f"{CAM}/1", topics.FRAMES, 3, 77)
    assert dl.original == blob
    assert stage.metrics.counter("dead_letters_total", reason="replay") == 1
    assert stage.metrics.counter("frames_total") == 2


def test_stale_and_forged_frames_are_dead_letters_with_one_reason(store):
    stage = stage_of(store)
    old = seal(store, image(64, 64), seq=5, capture_ns=time.time_ns() - int(7 * 3600e9))
    assert letter(stage.on_frame(old, 0, 1)).reason == "stale"
    forged = bytearray(seal(store, image(64, 64), seq=6))
    forged[-1] ^= 1
    assert letter(stage.on_frame(bytes(forged), 0, 2)).reason == "bad_signature"
    dl = letter(stage.on_frame(b"not a frame", 0, 3))
    assert dl.frame_id is None and dl.original == b"not a frame" and dl.reason != "internal"
    assert stage.metrics.counter("frames_total") == 0


def test_a_large_frame_fans_out_into_tile_jobs_whose_features_are_the_whole_frames(store):
    stage = stage_of(store, fanout_min_pixels=100_000, fanout_bands=3)
    whole = stage_of(store)  # below the default threshold: one batch
    img = image(400, 480, seed=3)
    blob = seal(store, img, seq=9)
    out = stage.on_frame(blob, 0, 5)
    assert topics_of(out) == [topics.TILE_JOBS] * 3 + [topics.REPLAY_MARKS]
    assert stage.metrics.counter("tile_jobs_total") == 3
    mac_keys = StageKeys(store.path).mac_keys()
    rows = {}
    for i, job in enumerate(out[:3]):
        assert job.key == f"{CAM}/9#{i}".encode()
        res = stage.on_tile_job(job.value, i, 100 + i)
        assert topics_of(res) == [topics.TILE_FEATURES, topics.REPLAY_MARKS]
        b = TileBatch.from_wire(res[0].value, mac_keys)
        rows.update({t[0]: (t, row) for t, row in zip(b.tiles, b.matrix())})
    assert letter(stage.on_tile_job(out[0].value, 0, 999)).reason == "replay"  # a copied job: no second set
    [full] = [TileBatch.from_wire(o.value, mac_keys) for o in whole.on_frame(blob, 0, 5)
              if o.topic == topics.TILE_FEATURES]
    assert sorted(rows) == [t[0] for t in full.tiles]
    for t, row in zip(full.tiles, full.matrix()):
        assert rows[t[0]][0] == t and np.array_equal(rows[t[0]][1], row)
    dl = letter(stage.on_tile_job(b"XXXX garbage", 0, 1))
    assert (dl.stage, dl.reason, dl.source_topic) == ("tiles", "malformed", topics.TILE_JOBS)


class BuggyProcessor(FrameProcessor):
    """A feature step with a bug we did not foresee."""

    def features_of(self, header, gray, times):
        raise ZeroDivisionError("a bug")


def test_a_bug_in_the_per_frame_work_is_an_internal_dead_letter_and_the_frame_keeps_its_mark(store, caplog):
    stage = stage_of(store)
    p = stage.processor
    stage.processor = BuggyProcessor(p.cloud_keys, p.devices, p.cfg, p.max_bytes, p.max_pixels)
    out = stage.on_frame(seal(store, image(64, 64), seq=20), 1, 1)
    assert topics_of(out) == [topics.DEAD_LETTERS, topics.REPLAY_MARKS]  # accepted, then refused: a copy is a replay
    dl = letter(out)
    assert dl.reason == "internal" and "ZeroDivisionError: a bug" in dl.message and dl.frame_id == f"{CAM}/20"
    assert any(json.loads(r.getMessage()).get("event") == "frame_failed" for r in caplog.records
               if r.name == "tilestream.processor")
    assert stage.metrics.counter("dead_letters_total", reason="internal") == 1


class _Recording(StageIO):
    """The inline StageIO, noting the ``pixels`` each compute step was given."""

    def __init__(self):
        super().__init__()
        self.pixels: list[int | None] = []

    async def compute(self, fn, *args, pixels=None):
        self.pixels.append(pixels)
        return fn(*args)


def test_the_worker_learns_a_frames_declared_pixels_before_its_work_and_the_image_is_held_to_them(store):
    """The worker runs a frame's open/decode/features on its loop when the signed header declares
    few pixels (stream_processor.app.runs_inline): the stage tells it the declared size, and an
    image larger than declared is refused before it is decoded, so the bound holds for hostile frames."""
    from stream_processor.app import INLINE_MAX_PIXELS, runs_inline

    stage = stage_of(store)
    io = _Recording()
    run_inline(stage.frame(seal(store, image(240, 320), seq=50), 0, 50, time.time_ns(), io))
    assert io.pixels == [240 * 320] and topics_of(io.sent) == [topics.TILE_FEATURES, topics.REPLAY_MARKS]
    assert runs_inline(240 * 320) and runs_inline(INLINE_MAX_PIXELS)
    assert not runs_inline(INLINE_MAX_PIXELS + 1) and not runs_inline(None) and not runs_inline(-1)
    # A header declaring 32x32 over a 1200x1000 image: refused as bad_image, never decoded.
    cloud_kid, suite, cloud_public = store.cloud_public_key()
    device_kid, device_key = store.device_private_key(CAM)
    data = cv2.imencode(".png", image(1000, 1200))[1].tobytes()
    h = FrameHeader(CAM, 51, time.time_ns(), 32, 32, "png", cloud_kid, device_kid, suite=suite)
    io = _Recording()
    run_inline(stage.frame(crypto.seal_frame(data, h, cloud_public, device_key), 0, 51, time.time_ns(), io))
    assert io.pixels == [32 * 32] and letter(io.sent).reason == "bad_image"
