"""Record authentication between stages: the key files of tilestream.stagekeys (modes, rotation,
removal, trust, the CLI), the wire formats of tilestream.records, and forged results on a real
``results`` topic, skipped and counted by ``tail`` and ``AnsweredFrames``."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from classifier.results import AnsweredFrames, tail, verify_result
from tilestream import topics
from tilestream.errors import ConfigError, Refused
from tilestream.records import (RESULT_SIG_CONTEXT, FrameResult, TileLabel, open_signed_result, open_tile_batch,
                                seal_tile_batch, sign_result, signed_result_frame_id)
from tilestream.stagekeys import StageKeys

from conftest import result_keys


def _result(camera: str = "cam-a", seq: int = 1) -> FrameResult:
    return FrameResult(camera, seq, f"{camera}/{seq}", 1_000, 2_000, 0.001, "person", {"person": 0.75, "background": 0.25},
                       [TileLabel(0, 0, 0, 64, 64, "person", 0.75)], True, 1, [], "scene-abc", 1)


def test_key_files_modes_ids_and_listing(tmp_path):
    store = StageKeys(tmp_path / "keys")
    ids = store.init()
    assert store.init() == ids  # idempotent
    for kind, kid in ids.items():
        assert len(kid) == 16 and int(kid, 16) >= 0
        assert (store.path / kind / f"{kid}.key").stat().st_mode & 0o777 == 0o600
        assert (store.path / kind / "current").read_text() == kid
    assert (store.path / "results" / f"{ids['results']}.pub").stat().st_mode & 0o777 == 0o644
    listed = {(k.kind, k.kid, k.current, k.private) for k in store.list()}
    assert listed == {("stage", ids["stage"], True, True), ("results", ids["results"], True, True)}
    # A stage key's id says nothing about the key: it is a hash of a label and the key.
    key = store.stage_keys()[ids["stage"]]
    assert key.hex()[:16] != ids["stage"] and len(key) == 32


def test_no_keys_means_no_start(tmp_path):
    empty = StageKeys(tmp_path / "none")
    with pytest.raises(ConfigError, match="stage-keys create"):
        empty.mac_keys().current()
    with pytest.raises(ConfigError, match="stage-keys create"):
        empty.for_classifier()
    assert len(empty.result_keys()) == 0


def test_a_key_file_named_for_another_key_is_ignored(tmp_path):
    store = StageKeys(tmp_path / "keys")
    ids = store.init()
    (store.path / "stage" / f"{ids['stage']}.key").rename(store.path / "stage" / "0000000000000000.key")
    assert store.stage_keys() == {}


def test_a_consumer_trusts_the_public_key_only(tmp_path):
    classifier = StageKeys(tmp_path / "classifier")
    kid = classifier.init(("results",))["results"]
    consumer = StageKeys(tmp_path / "consumer")
    assert consumer.trust_results(classifier.path / "results" / f"{kid}.pub") == kid
    assert not list((consumer.path / "results").glob("*.key"))
    raw = _result().to_signed(*classifier.results_private_key())
    assert verify_result(raw, consumer.result_keys()).frame_id == "cam-a/1"
    with pytest.raises(ConfigError):
        consumer.results_private_key()  # it cannot sign
    with pytest.raises(ValueError, match="not a tilestream results public key"):
        consumer.trust_results(classifier.path / "results" / f"{kid}.key")


def test_the_signed_bytes_are_exactly_the_result_string():
    key = ed25519.Ed25519PrivateKey.generate()
    raw = _result().to_signed("00112233445566aa", key)
    envelope = json.loads(raw)
    assert envelope["schema_version"] == 2 and envelope["result"].encode() == _result().to_json()
    # What the README tells a consumer in any language to do:
    key.public_key().verify(base64.b64decode(envelope["signature"]["sig"]),
                            b"tilestream/result/v2\x00" + envelope["result"].encode("utf-8"))
    assert RESULT_SIG_CONTEXT == b"tilestream/result/v2\x00"
    assert open_signed_result(raw, {"00112233445566aa": key.public_key()}) == ("00112233445566aa", _result().to_json())


@pytest.mark.parametrize("mutate, reason", [
    (lambda e: e.update(signature=None), "malformed"),
    (lambda e: e.pop("signature"), "malformed"),
    (lambda e: e["signature"].update(alg="hmac"), "bad_signature"),
    (lambda e: e["signature"].update(sig="A" * 88), "bad_signature"),
    (lambda e: e["signature"].update(sig="!" * 88), "bad_signature"),
    (lambda e: e["signature"].update(sig=e["signature"]["sig"][:-4]), "bad_signature"),
    (lambda e: e["signature"].update(kid="ffffffffffffffff"), "unknown_key"),
    (lambda e: e["signature"].update(kid=["x"]), "bad_signature"),
    (lambda e: e.update(result=e["result"].replace("0.75", "0.25", 1)), "bad_signature"),
    (lambda e: e.update(result=e["result"] + " "), "bad_signature"),
    (lambda e: e.update(result="\u00e9" + e["result"]), "malformed"),
    (lambda e: e.update(result=json.loads(e["result"])), "malformed"),  # the object instead of its bytes
    (lambda e: e.update(schema_version=3), "malformed"),
])
def test_each_forged_result_has_its_reason(mutate, reason):
    key = ed25519.Ed25519PrivateKey.generate()
    keys = {"00112233445566aa": key.public_key()}
    envelope = json.loads(_result().to_signed("00112233445566aa", key))
    mutate(envelope)
    with pytest.raises(Refused) as refused:
        verify_result(json.dumps(envelope).encode(), keys)
    assert refused.value.reason == reason
    with pytest.raises(Refused) as refused:  # the dedup read-back refuses it alike
        signed_result_frame_id(json.dumps(envelope).encode(), keys)
    assert refused.value.reason == reason


def test_the_dedup_read_back_takes_the_frame_id_of_a_verified_result_only():
    key = ed25519.Ed25519PrivateKey.generate()
    keys = {"00112233445566aa": key.public_key()}
    for camera, seq in [("cam-a", 0), ("cam-a", 1), ("x.y_z-9", 2**62)]:
        raw = _result(camera, seq).to_signed("00112233445566aa", key)
        assert signed_result_frame_id(raw, keys) == verify_result(raw, keys).frame_id == f"{camera}/{seq}"
    # Another writer's field order is read whole, and read strictly: a frame id that is not
    # camera_id/seq is refused there, even signed.
    d = json.loads(_result("cam-b", 7).to_json())
    reordered = json.dumps(dict(reversed(list(d.items())))).encode()
    assert signed_result_frame_id(sign_result(reordered, "00112233445566aa", key), keys) == "cam-b/7"
    d["frame_id"] = "cam-c/7"
    for payload in (json.dumps(d, separators=(",", ":")).encode(), json.dumps(dict(reversed(list(d.items())))).encode()):
        with pytest.raises(Refused) as refused:
            signed_result_frame_id(sign_result(payload, "00112233445566aa", key), keys)
        assert refused.value.reason == "malformed"
    # In our field order but with a raw control character in the ids (JSON does not allow one; our
    # classifier escapes it): the strict reader refuses it, so the head match must not take it.
    raw_ctl = (b'{"camera_id":"cam\x01d","seq":7,"frame_id":"cam\x01d/7"'
               + _result("camd", 7).to_json()[len(b'{"camera_id":"camd","seq":7,"frame_id":"camd/7"'):])
    signed = sign_result(raw_ctl, "00112233445566aa", key)
    for read in (verify_result, signed_result_frame_id):
        with pytest.raises(Refused) as refused:
            read(signed, keys)
        assert refused.value.reason == "malformed"


def test_an_unsigned_result_is_refused_as_unsigned():
    with pytest.raises(Refused) as refused:
        verify_result(_result().to_json(), {})
    assert refused.value.reason == "unsigned"


def test_the_mac_covers_the_key_id_and_the_context(tmp_path):
    store = StageKeys(tmp_path / "keys")
    kid = store.init(("stage",))["stage"]
    keys = store.stage_keys()
    wrapped = seal_tile_batch(b'{"a":1}', kid, keys[kid])
    assert open_tile_batch(wrapped, keys) == b'{"a":1}'
    kid2 = store.rotate("stage")
    keys = store.stage_keys()
    keys[kid2] = keys[kid]  # the same key under another id: the id is inside the MAC
    moved = wrapped[:5] + kid2.encode() + wrapped[5 + 16:]
    with pytest.raises(Refused) as refused:
        open_tile_batch(moved, keys)
    assert refused.value.reason == "bad_mac"


def test_the_cli_creates_rotates_lists_and_removes(tmp_path):
    env = dict(os.environ, TILESTREAM_KEYS_DIR=str(tmp_path / "keys"), TILESTREAM_HOME=str(tmp_path / "home"))

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tilestream_cli", "stage-keys", *argv], env=env, capture_output=True,
                              text=True, timeout=60)

    assert cli("create").returncode == 0
    store = StageKeys(tmp_path / "keys")
    old = store.current_id("stage")
    rotated = cli("rotate", "--kind", "stage")
    assert rotated.returncode == 0 and store.current_id("stage") != old
    listing = cli("list").stdout
    assert old in listing and store.current_id("stage") in listing and store.current_id("results") in listing
    assert cli("rotate").returncode == 2  # which kind?
    refused = cli("remove", "--kind", "stage", "--key-id", store.current_id("stage"))
    assert refused.returncode == 2 and "current" in refused.stderr
    assert cli("remove", "--kind", "stage", "--key-id", old).returncode == 0
    assert old not in cli("list").stdout
    assert cli("remove", "--kind", "stage", "--key-id", old).returncode == 2
    secret = base64.b64encode(store.stage_keys()[store.current_id("stage")]).decode()
    assert secret not in listing and "PRIVATE KEY" not in listing  # ids and roles only, never key material


@pytest.mark.kafka
def test_forged_results_on_the_topic_are_skipped_and_counted(kafka, keystore, tmp_path):
    """Signed results next to an unsigned one, one re-labelled under a valid signature, one signed by
    a stranger and garbage, on the real results topic: tail and AnsweredFrames see the signed ones only."""
    from kafka import KafkaProducer

    store = StageKeys(keystore.path)
    signer = store.results_private_key()
    stranger = StageKeys(tmp_path / "stranger")
    stranger.init(("results",))
    good = [_result("cam-auth", seq).to_signed(*signer) for seq in (1, 2)]
    relabelled = json.loads(good[0])
    relabelled["result"] = relabelled["result"].replace('"label":"person"', '"label":"background"')
    forged = [_result("cam-auth", 3).to_json(), json.dumps(relabelled).encode(),
              _result("cam-auth", 4).to_signed(*stranger.results_private_key()), b"garbage"]
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    try:
        for value in [good[0], *forged, good[1]]:
            producer.send(topics.RESULTS, key=b"cam-auth", value=value).get(30)
    finally:
        producer.close()

    skipped: list = []
    seen = [r for r in tail(kafka.bootstrap, camera_id="cam-auth", from_beginning=True, idle_timeout_s=3,
                            skipped=skipped, keys=result_keys(keystore))]
    assert [(r.frame_id, r.label) for r in seen] == [("cam-auth/1", "person"), ("cam-auth/2", "person")]
    assert sorted(s[2].split(":")[0] for s in skipped) == ["bad_signature", "malformed", "unknown_key", "unsigned"]

    answered = AnsweredFrames(kafka.bootstrap, store.result_keys())
    try:
        ids = answered.catch_up(0)
    finally:
        answered.close()
    assert "cam-auth/1" in ids and "cam-auth/2" in ids
    assert "cam-auth/3" not in ids and "cam-auth/4" not in ids  # a forged result never marks a frame answered
    assert answered.skipped == 4
    assert answered.skipped_by_reason == {"unsigned": 1, "bad_signature": 1, "unknown_key": 1, "malformed": 1}
