"""The classifier stage object (no Kafka): answers, refusals with one reason each, record
authentication (a tile batch without the processor's MAC never becomes a result; results come out
signed), and a bounded fuzz of tile-features records — of the JSON under a valid MAC and of the
MAC wrapper itself — that must never escape as an exception nor fall into the ``internal`` reason."""

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
from tilestream.errors import Refused
from tilestream.metrics import Metrics
from tilestream.records import (TAG_LEN, TILE_BATCH_MAGIC, DeadLetter, FrameResult, TileBatch, open_tile_batch,
                                seal_tile_batch)
from tilestream.stagekeys import StageKeys

DIM = 8


@pytest.fixture(scope="module")
def stage_keys(tmp_path_factory) -> StageKeys:
    store = StageKeys(tmp_path_factory.mktemp("stage-keys"))
    store.init()
    return store


@pytest.fixture(scope="module")
def ckeys(stage_keys):
    return stage_keys.for_classifier()


def classifier(model, ckeys, **kw) -> FrameClassifier:
    return FrameClassifier(model, Metrics("t"), keys=ckeys, **kw)


def signed(out, ckeys) -> FrameResult:
    """A result output, its signature verified with the classifier's own public keys."""
    return FrameResult.from_signed(out.value, ckeys.results)


@pytest.fixture(scope="module")
def model() -> TileModel:
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (60, DIM)), rng.normal(3, 1, (60, DIM))]).astype(np.float32)
    y = np.array(["background"] * 60 + ["person"] * 60)
    return TileModel.train(X, y, FeatureConfig(), kind="logistic")


class Frame:
    frame_id, camera_id, seq, capture_ns, width, height = "cam/1", "cam", 1, 1_000, 128, 64


def make(model: TileModel, n_tiles: int = 2, indices=(0, 1), dim: int = DIM, frame=Frame) -> TileBatch:
    tiles = [(Tile(i, 64 * (i % 2), 0, 64, 64), np.full(dim, float(i), np.float32)) for i in indices]
    return TileBatch.make(frame, n_tiles, tiles, model.feature_config.digest(), 2_000)


def body(model: TileModel, **kw) -> bytes:
    """The bare binary TileBatch body (what the MAC covers)."""
    return make(model, **kw).to_bytes()


def body_json(model: TileModel, **kw) -> bytes:
    """The JSON body processors wrote before the binary one (still read: a rolling upgrade)."""
    return make(model, **kw).to_json()


KEYS: dict = {}  # the module's current stage key, set by the autouse fixture below


@pytest.fixture(autouse=True)
def _current_stage_key(stage_keys):
    KEYS["current"] = stage_keys.mac_keys().current()


def wrap(json_bytes: bytes) -> bytes:
    """MACed with the module's current stage key, as the processor writes it."""
    return seal_tile_batch(json_bytes, *KEYS["current"])


def batch(model: TileModel, **kw) -> bytes:
    return wrap(body(model, **kw))


def reasons(outputs) -> list[str]:
    return [DeadLetter.from_json(o.value).reason for o in outputs if o.topic == topics.DEAD_LETTERS]


def test_a_complete_frame_is_answered_once(model, ckeys):
    stage = classifier(model, ckeys)
    [out] = stage.on_record(batch(model), 0, 10, 0.0, 5_000_000)
    assert out.topic == topics.RESULTS and out.key == b"cam"
    r = signed(out, ckeys)
    assert r.frame_id == "cam/1" and r.complete and len(r.tiles) == 2 and r.model_id == model.model_id
    assert stage.on_record(batch(model), 0, 11, 0.0, 5_000_000) == []  # redelivery: no second answer
    assert stage.assembler.committable() == {0: 12}


def test_a_frame_whose_tiles_stop_coming_is_answered_incomplete(model, ckeys):
    stage = classifier(model, ckeys, frame_timeout_s=5)
    assert stage.on_record(batch(model, n_tiles=3, indices=(1,)), 0, 0, 100.0, 0) == []
    assert stage.on_tick(104.0, 0) == []
    [out] = stage.on_tick(105.0, 0)
    r = signed(out, ckeys)
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
def test_each_refusal_of_the_json_body_has_its_one_reason(model, ckeys, mutate, reason):
    d = json.loads(body_json(model))
    mutate(d)
    stage = classifier(model, ckeys)
    out = stage.on_record(wrap(json.dumps(d).encode()), 3, 7, 0.0, 0)  # under a valid MAC: the parser decides
    assert reasons(out) == [reason]
    assert stage.metrics.counter("dead_letters_total", reason=reason) == 1
    assert stage.assembler.committable() == {3: 8}  # a refused record is passed, never re-read forever


def test_vectors_of_another_length_are_refused_as_dim_mismatch(model, ckeys):
    out = classifier(model, ckeys).on_record(batch(model, dim=DIM + 1), 0, 0, 0.0, 0)
    assert reasons(out) == ["dim_mismatch"]


GARBAGE = [b"", b"null", b"[]", b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000,
           b'{"a":' * 50_000 + b"1" + b"}" * 50_000]


@pytest.mark.parametrize("value", GARBAGE)
def test_garbage_under_a_valid_mac_is_malformed(model, ckeys, value):
    out = classifier(model, ckeys).on_record(wrap(value), 0, 0, 0.0, 0)
    assert reasons(out) == ["malformed"]


@pytest.mark.parametrize("value", GARBAGE + [b"TSB1", TILE_BATCH_MAGIC + b"\x10"])
def test_garbage_without_a_mac_is_bad_mac(model, ckeys, value):
    out = classifier(model, ckeys).on_record(value, 0, 0, 0.0, 0)
    assert reasons(out) == ["bad_mac"]


def test_an_oversized_record_is_refused_before_its_mac_is_computed(model, ckeys):
    out = classifier(model, ckeys).on_record(wrap(b" " * (17 * 1024 * 1024)), 0, 0, 0.0, 0)
    assert reasons(out) == ["too_large"]


def _forgeries(model, ckeys, tmp_path):
    """(name, record, reason) of every way a tile batch can lack the processor's MAC."""
    good = batch(model)
    kid, key = KEYS["current"]
    head = len(TILE_BATCH_MAGIC) + 1 + len(kid)
    other = StageKeys(tmp_path / "other")  # another deployment's (or an attacker's) stage key
    other_kid = other.rotate("stage")
    other_key = other.stage_keys()[other_kid]

    def flip(b: bytes, i: int) -> bytes:
        x = bytearray(b)
        x[i] ^= 0x01
        return bytes(x)

    renamed = body(model, frame=type("F", (Frame,), {"frame_id": "cam/2", "seq": 2}))
    moved = good[:head + TAG_LEN] + renamed  # another frame's identity under the old tag
    unenrolled = body(model, frame=type("F", (Frame,), {"frame_id": "ghost/1", "camera_id": "ghost"}))
    return [
        ("unwrapped, a valid batch for a camera never enrolled", unenrolled, "bad_mac"),
        ("unwrapped, a valid batch", body(model), "bad_mac"),
        ("MACed with a key this classifier does not hold", seal_tile_batch(body(model), other_kid, other_key),
         "unknown_key"),
        ("MACed with another key under our key id", seal_tile_batch(body(model), kid, other_key), "bad_mac"),
        ("one byte of the body altered", flip(good, len(good) - 20), "bad_mac"),
        ("one byte of the tag altered", flip(good, head + 3), "bad_mac"),
        ("another key id, same tag", good[:5] + (b"0123456789abcdef" if kid != "0123456789abcdef" else b"f" * 16)
         + good[head:], "unknown_key"),
        ("frame_id and seq changed, old tag kept", moved, "bad_mac"),
        ("tag truncated", good[:head + 10], "bad_mac"),
        ("key id not hex", good[:5] + b"ZZZZZZZZZZZZZZZZ" + good[head:], "bad_mac"),
        ("key id length 0", TILE_BATCH_MAGIC + b"\x00" + good[head:], "bad_mac"),
        ("key id length beyond the record", TILE_BATCH_MAGIC + b"\xff" + good[5:40], "bad_mac"),
        ("tag stripped", good[:head] + good[head + TAG_LEN:], "bad_mac"),
    ]


def test_forged_tile_batches_are_dead_letters_never_results(model, ckeys, tmp_path):
    forgeries = _forgeries(model, ckeys, tmp_path)
    stage = classifier(model, ckeys)
    for offset, (name, record, reason) in enumerate(forgeries):
        out = stage.on_record(record, 0, offset, 0.0, 0)
        assert [o.topic for o in out] == [topics.DEAD_LETTERS], name
        assert reasons(out) == [reason], name
    assert stage.assembler.pending == {} and stage.metrics.counter("results_total") == 0
    for reason in ("bad_mac", "unknown_key"):
        assert stage.metrics.counter("dead_letters_total", reason=reason) == sum(r == reason for *_, r in forgeries)
    # The genuine record next to them is answered.
    [out] = stage.on_record(batch(model), 0, len(forgeries), 0.0, 0)
    assert signed(out, ckeys).frame_id == "cam/1"


def test_a_rotated_stage_key_still_verifies_old_records_until_removed(model, tmp_path):
    store = StageKeys(tmp_path / "keys")
    store.init()
    ckeys = store.for_classifier(check_every_s=0.0)
    processor_keys = store.mac_keys(check_every_s=0.0)
    old_kid, old_key = processor_keys.current()
    old = seal_tile_batch(body(model), old_kid, old_key)
    new_kid = store.rotate("stage")
    assert new_kid != old_kid and processor_keys.current()[0] == new_kid  # the processor follows
    assert (store.path / "stage" / f"{new_kid}.key").stat().st_mode & 0o777 == 0o600
    new = seal_tile_batch(body(model, frame=type("F", (Frame,), {"frame_id": "cam/2", "seq": 2})),
                          *processor_keys.current())
    stage = classifier(model, ckeys)
    assert [o.topic for o in stage.on_record(old, 0, 0, 0.0, 0)] == [topics.RESULTS]
    assert [o.topic for o in stage.on_record(new, 0, 1, 0.0, 0)] == [topics.RESULTS]
    with pytest.raises(ValueError, match="current"):
        store.remove("stage", new_kid)
    store.remove("stage", old_kid)
    stage = classifier(model, ckeys)
    assert reasons(stage.on_record(old, 0, 2, 0.0, 0)) == ["unknown_key"]
    assert open_tile_batch(new, ckeys.mac) == body(model, frame=type("F", (Frame,), {"frame_id": "cam/2", "seq": 2}))


def test_a_rotated_results_key_still_verifies_old_results_until_removed(model, tmp_path):
    store = StageKeys(tmp_path / "keys")
    store.init()
    ckeys = store.for_classifier(check_every_s=0.0)
    [before] = classifier(model, ckeys).on_record(seal_tile_batch(body(model), *store.mac_keys().current()), 0, 0, 0.0, 0)
    old_kid = store.current_id("results")
    new_kid = store.rotate("results")
    [after] = classifier(model, ckeys).on_record(seal_tile_batch(body(model), *store.mac_keys().current()), 0, 0, 0.0, 0)
    assert json.loads(before.value)["signature"]["kid"] == old_kid
    assert json.loads(after.value)["signature"]["kid"] == new_kid  # the classifier signs with the new key at once
    consumer = store.result_keys(check_every_s=0.0)
    assert signed(before, ckeys).frame_id == FrameResult.from_signed(after.value, consumer).frame_id == "cam/1"
    store.remove("results", old_kid)
    with pytest.raises(Refused) as refused:
        FrameResult.from_signed(before.value, consumer)
    assert refused.value.reason == "unknown_key"
    assert FrameResult.from_signed(after.value, consumer).frame_id == "cam/1"


def test_a_huge_original_is_truncated_in_its_dead_letter(model, ckeys):
    [out] = classifier(model, ckeys).on_record(b"x" * (20 * 1024 * 1024), 0, 0, 0.0, 0)
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


def _wrapper_mutations(wrapped: bytes, rng: random.Random):
    """Mutations of the MAC wrapper: header, key id, tag, lengths, truncation, splices."""
    head = len(TILE_BATCH_MAGIC) + 1 + 16
    while True:
        kind = rng.randrange(6)
        b = bytearray(wrapped)
        if kind == 0:  # flips inside magic | length | key id | tag
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(head + TAG_LEN)] ^= 1 << rng.randrange(8)
            yield bytes(b)
        elif kind == 1:  # the key-id length byte set to anything
            b[4] = rng.randrange(256)
            yield bytes(b)
        elif kind == 2:  # cut anywhere in the header or the tag
            yield wrapped[:rng.randrange(head + TAG_LEN + 1)]
        elif kind == 3:  # a key id of random hex (unknown), or of random bytes
            kid = bytes(rng.choice(b"0123456789abcdef") for _ in range(16)) if rng.random() < 0.5 else \
                bytes(rng.randrange(256) for _ in range(16))
            yield wrapped[:5] + kid + wrapped[head:]
        elif kind == 4:  # bytes inserted or removed between tag and JSON
            i = head + TAG_LEN
            yield wrapped[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4))) + wrapped[i:] \
                if rng.random() < 0.5 else wrapped[:i] + wrapped[i + rng.randrange(1, 4):]
        else:  # a flip anywhere in the JSON, tag kept
            b[rng.randrange(head + TAG_LEN, len(b))] ^= 1 << rng.randrange(8)
            yield bytes(b)


def test_fuzz_no_record_escapes_or_lands_in_internal(model, ckeys):
    """Two thirds: mutated bodies under a valid MAC (so the fuzz reaches the parser), the binary
    body (tests/test_records_tile_batch.py's mutations) and the JSON body of before in turn; one
    third: a mutated MAC wrapper around a valid batch, which must never be accepted."""
    from tests.test_records_tile_batch import binary_mutations

    stage = classifier(model, ckeys, frame_timeout_s=1e9)
    rng = random.Random(1234)
    json_gen = _mutations(body_json(model), rng)
    binary_gen = binary_mutations(body(model, n_tiles=3, indices=(0, 1)), rng)
    wrapper_gen = _wrapper_mutations(batch(model), rng)
    escaped, n, wrapper_accepted, wrappers = 0, 100_000, 0, 0
    for i in range(n):
        if i % 3 == 2:
            wrappers += 1
            record = next(wrapper_gen)
        else:
            record = wrap(next(binary_gen if i % 3 == 0 else json_gen))
        try:
            out = stage.on_record(record, 0, i, 0.0, 0)
        except Exception:  # noqa: BLE001 - counting what the guard let through
            escaped += 1
            continue
        if i % 3 == 2 and not reasons(out) and record != batch(model):
            wrapper_accepted += 1
    assert escaped == 0
    assert stage.metrics.counter("dead_letters_total", reason="internal") == 0
    assert wrapper_accepted == 0, "a mutated MAC wrapper was accepted"
    mac_refused = sum(stage.metrics.counter("dead_letters_total", reason=r) for r in ("bad_mac", "unknown_key"))
    assert mac_refused >= wrappers * 0.99  # (a mutation may rarely reproduce the original record)
    refused = sum(v for (name, _), v in stage.metrics.counters.items() if name == "dead_letters_total")
    assert refused - mac_refused > (n - wrappers) // 2  # the body mutations really reached the parser and were refused


def _frame(i: int):
    return type("F", (Frame,), {"frame_id": f"cam/{i}", "seq": i})


def test_frames_answered_together_are_the_frames_answered_one_by_one(model, ckeys):
    """One poll's frames go through one model call; every output byte is what answering them one
    record at a time gives (Ed25519 signatures are deterministic), and a copy of a record inside
    the same poll is answered once."""
    records = [(batch(model, frame=_frame(i)), 0, i) for i in range(6)]
    records.insert(3, (records[1][0], 0, 99))  # a redelivered copy inside the poll
    one_by_one = classifier(model, ckeys)
    want = [o for v, p, off in records for o in one_by_one.on_record(v, p, off, 0.0, 7_000_000)]
    together = classifier(model, ckeys)
    got = together.on_records(records, 0.0, 7_000_000)
    assert got == want and [signed(o, ckeys).frame_id for o in got] == [f"cam/{i}" for i in range(6)]
    assert together.assembler.duplicates == 2  # the copy's two tiles
    assert together.metrics.counter("results_total") == 6 and together.assembler.pending == {}


def test_a_whole_frame_with_rows_out_of_order_is_answered_in_tile_order(model, ckeys):
    tiles = [(Tile(i, 64 * (i % 2), 0, 64, 64), np.full(DIM, 3.0 * (i == 2), np.float32)) for i in (2, 0, 1)]
    shuffled = TileBatch.make(Frame, 3, tiles, model.feature_config.digest(), 2_000)
    [out] = classifier(model, ckeys).on_record(wrap(shuffled.to_bytes()), 0, 0, 0.0, 0)
    r = signed(out, ckeys)
    assert [t.index for t in r.tiles] == [0, 1, 2] and [t.label for t in r.tiles] == ["background", "background",
                                                                                       "person"]


def test_a_whole_frame_record_while_a_band_of_it_is_pending_is_assembled(model, ckeys):
    stage = classifier(model, ckeys)
    assert stage.on_record(batch(model, n_tiles=2, indices=(0,)), 0, 0, 0.0, 0) == []
    [out] = stage.on_record(batch(model, n_tiles=2, indices=(0, 1)), 0, 1, 0.0, 0)
    assert signed(out, ckeys).complete and stage.assembler.duplicates == 1 and stage.assembler.pending == {}
    assert stage.on_record(batch(model, n_tiles=2, indices=(0, 1)), 0, 2, 0.0, 0) == []
    assert stage.assembler.committable() == {0: 3}


def test_a_frame_that_breaks_the_model_is_one_internal_dead_letter_and_the_others_are_answered(model, ckeys):
    class Breaks(TileModel):
        """The real model, except that it fails on rows of value 13 (a bug of ours, say)."""

        def predict_proba(self, X):
            if (X == 13).any():
                raise FloatingPointError("boom")
            return super().predict_proba(X)

    broken = Breaks(**{f: getattr(model, f) for f in model.__dataclass_fields__})
    bad = TileBatch.make(_frame(5), 1, [(Tile(0, 0, 0, 64, 64), np.full(DIM, 13.0, np.float32))],
                         model.feature_config.digest(), 2_000)
    records = [(batch(model, frame=_frame(4)), 0, 0), (wrap(bad.to_bytes()), 0, 1), (batch(model, frame=_frame(6)), 0, 2)]
    stage = classifier(broken, ckeys)
    out = stage.on_records(records, 0.0, 0)
    assert [o.topic for o in out] == [topics.RESULTS, topics.DEAD_LETTERS, topics.RESULTS]
    assert reasons(out) == ["internal"] and DeadLetter.from_json(out[1].value).source_offset == 1
    assert [signed(o, ckeys).frame_id for o in out if o.topic == topics.RESULTS] == ["cam/4", "cam/6"]
    assert stage.assembler.committable() == {0: 3} and stage.assembler.pending == {}
