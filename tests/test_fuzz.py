"""Bounded fuzz of every pure record handler, per topic: 100,000 mutated and crafted records each
(byte flips, truncations, splices, JSON type swaps), counting what escapes the handler's own refusal
type. Anything else — a KeyError, a RecursionError, a MemoryError — would crash or stall the stage
that reads that topic. (`tile-features` is fuzzed through the classifier's per-record method in
test_classifier_stage.py.)"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Callable, Iterator

import numpy as np
import pytest

from classifier import registry
from classifier.model import ModelRefused
from dashboard.feed import decode
from edge_agent.agent import EdgeAgent
from stream_processor import tilejobs
from stream_processor.stage import ProcessorStage
from tilestream import topics
from tilestream.config import AgentSettings, FeatureConfig, Settings
from tilestream.metrics import Metrics
from tilestream.stagekeys import StageKeys
from tilestream.records import (AgentHeartbeat, DeadLetter, FrameResult, RecordError, StageMetrics, TileLabel)

N = 100_000
JSON_VALUES = [None, True, False, -1, 0, 2**64, 1e308, float("-inf"), "", "x" * 300, [], {}, [[]], {"a": {}},
               [0] * 50, "\u0000\ud7ff"]


def mutations(valid: bytes, rng: random.Random) -> Iterator[bytes]:
    """Byte flips, truncations, splices of two copies, and (for JSON) a field replaced by another type."""
    try:
        d = json.loads(valid)
    except ValueError:
        d = None
    while True:
        kind = rng.randrange(5 if isinstance(d, dict) else 4)
        if kind == 0:
            b = bytearray(valid)
            for _ in range(rng.randrange(1, 9)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            yield bytes(b)
        elif kind == 1:
            yield valid[:rng.randrange(len(valid))]
        elif kind == 2:
            i, j = sorted(rng.randrange(len(valid)) for _ in range(2))
            yield valid[:i] + valid[j:] + valid[i:j]
        elif kind == 3:
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        else:
            m = dict(d)
            m[rng.choice(list(d))] = rng.choice(JSON_VALUES)
            yield json.dumps(m).encode()


def fuzz(valid: bytes, handler: Callable[[bytes], object], refusal: type, seed: int) -> tuple[int, int, list]:
    """(refused, accepted, escaped) over N records."""
    rng = random.Random(seed)
    gen = mutations(valid, rng)
    refused = accepted = 0
    escaped = []
    for _ in range(N):
        value = next(gen)
        try:
            handler(value)
            accepted += 1
        except refusal:
            refused += 1
        except Exception as exc:  # noqa: BLE001 - what the stage's own refusal type did not cover
            escaped.append((type(exc).__name__, str(exc)[:120], value[:80]))
    return refused, accepted, escaped


def check(refused: int, accepted: int, escaped: list) -> None:
    assert escaped == [], f"{len(escaped)} escaped, e.g. {escaped[:3]}"
    assert refused > N // 2, "the mutations were not refused: the fuzz did not reach the checks"


@pytest.fixture(scope="module")
def frame_keys(tmp_path_factory):
    from tilestream.keys import KeyStore

    store = KeyStore(tmp_path_factory.mktemp("fuzz-keys") / "keys")
    store.init()
    StageKeys(store.path).init()
    store.enroll("cam-fuzz")
    return store


class Refusal(Exception):
    """A record the stage answered with a dead letter (other than ``internal``)."""


def stage_handler(on_record: Callable[[bytes, int, int], list]) -> Callable[[bytes], object]:
    """One of the processor's per-record methods as a fuzz handler: a dead letter is a refusal; an
    ``internal`` one is a bug the guard caught, so it counts as escaped."""
    offsets = iter(range(1, 10**9))

    def handle(value: bytes) -> None:
        out = on_record(value, 0, next(offsets))
        letters = [DeadLetter.from_json(o.value) for o in out if o.topic == topics.DEAD_LETTERS]
        if letters and letters[0].reason == "internal":
            raise RuntimeError(letters[0].message)
        if letters:
            raise Refusal(letters[0].reason)
    return handle


def test_frames_through_the_processors_handler(frame_keys, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="tilestream.processor")  # 100,000 dead-letter lines: not kept
    agent = EdgeAgent(AgentSettings(camera_id="cam-fuzz", source="unused"), frame_keys, "127.0.0.1:1",
                      4 * 1024 * 1024, state_dir=tmp_path / "agent")
    image = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) % 251).astype(np.uint8)
    _, sealed = agent.seal(image, time.time_ns())  # fresh: the stage checks the capture time
    stage = ProcessorStage.create(Settings(keys_dir=str(frame_keys.path)), Metrics("tilestream_test"))
    assert [o.topic for o in stage.on_frame(sealed, 0, 0)] == [topics.TILE_FEATURES, topics.REPLAY_MARKS]
    check(*fuzz(sealed, stage_handler(stage.on_frame), Refusal, seed=1))


def test_tile_jobs_through_the_processors_handler(frame_keys, caplog):
    caplog.set_level(logging.ERROR, logger="tilestream.processor")
    from tilestream.envelope import FrameHeader

    kid, keys = frame_keys.tile_keys()
    header = FrameHeader(camera_id="cam-fuzz", seq=1, capture_ns=1, width=128, height=128, encoding="png",
                         device_key_id=b"\0" * 8, cloud_key_id=b"\0" * 8)
    [(_, record), *_] = tilejobs.make_jobs(header, np.zeros((128, 128), np.uint8), FeatureConfig(), 2, kid, keys[kid])
    stage = ProcessorStage.create(Settings(keys_dir=str(frame_keys.path)), Metrics("tilestream_test"))
    assert [o.topic for o in stage.on_tile_job(record, 0, 0)] == [topics.TILE_FEATURES, topics.REPLAY_MARKS]
    check(*fuzz(record, stage_handler(stage.on_tile_job), Refusal, seed=2))


def test_model_records_through_verify_record(frame_keys, tmp_path):
    from classifier.model import TileModel

    frame_keys.init_model_release()
    kid, key = frame_keys.model_release_private_key()
    rng = np.random.default_rng(0)
    model = TileModel.train(rng.normal(0, 1, (40, 4)), np.array(["a", "b"] * 20), FeatureConfig(), kind="logistic")
    meta = dict(model.meta(), name="default", version=1)
    record = registry.sign_record(meta, b"PK\x03\x04 not really a model" * 20, kid, key)
    keys = frame_keys.model_release_public_keys()
    registry.verify_record(record, keys)
    check(*fuzz(record, lambda v: registry.verify_record(v, keys), ModelRefused, seed=3))


@pytest.mark.parametrize("topic, valid", [
    (topics.RESULTS, FrameResult("cam", 1, "cam/1", 1, 2, 1.0, "person", {"person": 0.9, "background": 0.1},
                                 [TileLabel(0, 0, 0, 64, 64, "person", 0.9)], True, 1, [], "m", 1).to_json()),
    (topics.HEARTBEATS, AgentHeartbeat("cam", "0.1.0", 1, 5.0, {"captured": 3, "sent": 2}).to_json()),
    (topics.METRICS, StageMetrics("classifier", "h:1", 1, 2.0, {"results_total": 3.0}, {"frames_per_s": 1.0},
                                  {"capture_to_result": {"p50": 1.0}}).to_json()),
    (topics.DEAD_LETTERS, DeadLetter.of("processor", "malformed", "no", b"\x00" * 100).to_json()),
], ids=lambda v: v if isinstance(v, str) else "")
def test_records_read_by_the_dashboard_and_consumers(topic, valid):
    decode(topic, valid)
    check(*fuzz(valid, lambda v: decode(topic, v), RecordError, seed=hash(topic) % 1000))


def test_signed_results_through_verify_result(tmp_path):
    """What every reader of `results` does first (tail, the classifier's read-back, the dashboard)."""
    from classifier.results import verify_result
    from tilestream.errors import Refused
    from tilestream.stagekeys import StageKeys

    store = StageKeys(tmp_path / "keys")
    store.init()
    result = FrameResult("cam", 1, "cam/1", 1, 2, 1.0, "person", {"person": 1.0}, [], True, 1, [], "m", 1)
    valid = result.to_signed(*store.for_classifier().signer.current())
    keys = store.result_keys()
    assert verify_result(valid, keys).frame_id == "cam/1"
    check(*fuzz(valid, lambda v: verify_result(v, keys), Refused, seed=4))
