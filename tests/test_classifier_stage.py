"""The classifier stage object (no Kafka): answers, refusals with one reason each, and a bounded fuzz
of tile-features records that must never escape as an exception nor fall into the ``internal`` reason."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from classifier.model import TileModel
from classifier.stage import FrameClassifier
from stream_processor.tiling import Tile
from tilestream import topics
from tilestream.config import FeatureConfig
from tilestream.metrics import Metrics
from tilestream.records import DeadLetter, FrameResult, TileBatch

DIM = 8


@pytest.fixture(scope="module")
def model() -> TileModel:
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (60, DIM)), rng.normal(3, 1, (60, DIM))]).astype(np.float32)
    y = np.array(["background"] * 60 + ["person"] * 60)
    return TileModel.train(X, y, FeatureConfig(), kind="logistic")


class Frame:
    frame_id, camera_id, seq, capture_ns, width, height = "cam/1", "cam", 1, 1_000, 128, 64


def batch(model: TileModel, n_tiles: int = 2, indices=(0, 1), dim: int = DIM, frame=Frame) -> bytes:
    tiles = [(Tile(i, 64 * (i % 2), 0, 64, 64), np.full(dim, float(i), np.float32)) for i in indices]
    return TileBatch.make(frame, n_tiles, tiles, model.feature_config.digest(), 2_000).to_bytes()


def reasons(outputs) -> list[str]:
    return [DeadLetter.from_json(o.value).reason for o in outputs if o.topic == topics.DEAD_LETTERS]


def test_a_complete_frame_is_answered_once(model):
    stage = FrameClassifier(model, Metrics("t"))
    [out] = stage.on_record(batch(model), 0, 10, 0.0, 5_000_000)
    assert out.topic == topics.RESULTS and out.key == b"cam"
    r = FrameResult.from_json(out.value)
    assert r.frame_id == "cam/1" and r.complete and len(r.tiles) == 2 and r.model_id == model.model_id
    assert stage.on_record(batch(model), 0, 11, 0.0, 5_000_000) == []  # redelivery: no second answer
    assert stage.assembler.committable() == {0: 12}


def test_a_frame_whose_tiles_stop_coming_is_answered_incomplete(model):
    stage = FrameClassifier(model, Metrics("t"), frame_timeout_s=5)
    assert stage.on_record(batch(model, n_tiles=3, indices=(1,)), 0, 0, 100.0, 0) == []
    assert stage.on_tick(104.0, 0) == []
    [out] = stage.on_tick(105.0, 0)
    r = FrameResult.from_json(out.value)
    assert not r.complete and r.missing_tiles == [0, 2]


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: d.update(n_tiles=10**7), "malformed"),              # was 26 s and 1.1 GiB
    (lambda d: d.update(feature_digest="0" * 16), "feature_mismatch"),
    (lambda d: d.update(tiles=[[0, 0, 0, 64, 64], [0, 64, 0, 64, 64]]), "malformed"),  # one index twice
    (lambda d: d.update(tiles=[[5, 0, 0, 64, 64]], n_tiles=2), "malformed"),          # index >= n_tiles
    (lambda d: d.update(frame_id=["not", "a", "string"]), "malformed"),
    (lambda d: d.update(frame_id="x" * 10_000), "malformed"),
    (lambda d: d.update(seq=-1), "malformed"),
    (lambda d: d.update(seq=True), "malformed"),
    (lambda d: d.update(features="!!!!" * 4), "malformed"),
    (lambda d: d.update(extra=1), "malformed"),
    (lambda d: d.pop("capture_ns"), "malformed"),
])
def test_each_refusal_has_its_one_reason(model, mutate, reason):
    d = json.loads(batch(model))
    mutate(d)
    stage = FrameClassifier(model, Metrics("t"))
    out = stage.on_record(json.dumps(d).encode(), 3, 7, 0.0, 0)
    assert reasons(out) == [reason]
    assert stage.metrics.counter("dead_letters_total", reason=reason) == 1
    assert stage.assembler.committable() == {3: 8}  # a refused record is passed, never re-read forever


def test_vectors_of_another_length_are_refused_as_dim_mismatch(model):
    out = FrameClassifier(model, Metrics("t")).on_record(batch(model, dim=DIM + 1), 0, 0, 0.0, 0)
    assert reasons(out) == ["dim_mismatch"]


@pytest.mark.parametrize("value", [b"", b"null", b"[]", b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000,
                                   b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b" " * (17 * 1024 * 1024)])
def test_garbage_is_malformed(model, value):
    out = FrameClassifier(model, Metrics("t")).on_record(value, 0, 0, 0.0, 0)
    assert reasons(out) == ["malformed"]


def test_a_huge_original_is_truncated_in_its_dead_letter(model):
    [out] = FrameClassifier(model, Metrics("t")).on_record(b"x" * (20 * 1024 * 1024), 0, 0, 0.0, 0)
    letter = DeadLetter.from_json(out.value)
    assert letter.original_size == 20 * 1024 * 1024 and len(letter.original) < letter.original_size
    assert len(out.value) < 4 * 1024 * 1024 + 64 * 1024  # fits the dead-letters topic


def _mutations(valid: bytes, rng: random.Random):
    """Byte flips, truncations, splices and type swaps of a valid record."""
    d = json.loads(valid)
    values = [None, True, -1, 0, 2**70, 1.5, "", "x" * 300, [], {}, [[0] * 5], "AAAA", [[-1, 0, 0, 1, 1]]]
    while True:
        kind = rng.randrange(4)
        if kind == 0:
            b = bytearray(valid)
            for _ in range(rng.randrange(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            yield bytes(b)
        elif kind == 1:
            yield valid[:rng.randrange(len(valid))]
        elif kind == 2:
            m = dict(d)
            m[rng.choice(list(d))] = rng.choice(values)
            yield json.dumps(m).encode()
        else:
            m = dict(d)
            m["tiles"] = [[rng.randrange(-2, 4) for _ in range(5)] for _ in range(rng.randrange(0, 4))]
            m["n_tiles"] = rng.randrange(0, 4)
            yield json.dumps(m).encode()


def test_fuzz_no_record_escapes_or_lands_in_internal(model):
    stage = FrameClassifier(model, Metrics("t"), frame_timeout_s=1e9)
    rng = random.Random(1234)
    valid = batch(model)
    gen = _mutations(valid, rng)
    escaped, n = 0, 100_000
    for i in range(n):
        try:
            stage.on_record(next(gen), 0, i, 0.0, 0)
        except Exception:  # noqa: BLE001 - counting what the guard let through
            escaped += 1
    assert escaped == 0
    assert stage.metrics.counter("dead_letters_total", reason="internal") == 0
    refused = sum(v for (name, _), v in stage.metrics.counters.items() if name == "dead_letters_total")
    assert refused > n // 2  # the mutations really were refused, not silently accepted
