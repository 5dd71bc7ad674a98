"""Sealing and opening frames: every refusal has its reason; keys are stored 0600."""

from __future__ import annotations

import json
import stat

import pytest

from tilestream import crypto, envelope
from tilestream.crypto import FrameRejected
from tilestream.envelope import FrameHeader
from tilestream.keys import DeviceRegistry, KeyStore

IMAGE = bytes(range(256)) * 40


def header(store: KeyStore, camera: str = "cam-test", seq: int = 7) -> FrameHeader:
    ckid, suite, _ = store.cloud_public_key()
    dkid, _ = store.device_private_key(camera)
    return FrameHeader(camera, seq, 1_700_000_000_000_000_000, 640, 480, "jpeg", ckid, dkid, suite=suite)


def seal(store: KeyStore, camera: str = "cam-test", seq: int = 7) -> bytes:
    _, _, cloud_pub = store.cloud_public_key()
    _, dev = store.device_private_key(camera)
    return crypto.seal_frame(IMAGE, header(store, camera, seq), cloud_pub, dev)


def open_(store: KeyStore, blob: bytes):
    return crypto.open_frame(blob, store.cloud_private_keys(), DeviceRegistry(store.registry_path, check_every_s=0))


def test_round_trip_keeps_header_and_image(keystore):
    blob = seal(keystore)
    h, data = open_(keystore, blob)
    assert data == IMAGE
    assert h == header(keystore)
    assert h.frame_id == "cam-test/7"
    assert IMAGE[:64] not in blob  # the image is not in the record in plaintext


def test_v2_signs_a_sha256_digest_and_v1_frames_still_open(keystore):
    """Agents write v2 (Ed25519 over a domain-separated SHA-256 digest); v1 frames of agents not yet
    upgraded (Ed25519 over the bytes themselves) still verify and open."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric import ed25519

    blob = seal(keystore)
    env = envelope.parse(blob)
    assert env.header.version == envelope.VERSION == 2
    digest = hashlib.sha256(blob[: -envelope.SIGNATURE_LEN - len(env.sealed)] + env.sealed).digest()
    dev_pub = DeviceRegistry(keystore.registry_path)(env.header.device_key_id).public_key
    dev_pub.verify(env.signature, envelope.SIGNATURE_DOMAIN + digest)  # raises if it signs anything else
    assert isinstance(dev_pub, ed25519.Ed25519PublicKey)

    _, _, cloud_pub = keystore.cloud_public_key()
    _, dev = keystore.device_private_key("cam-test")
    v1 = FrameHeader(**{**{f: getattr(header(keystore), f) for f in FrameHeader.__slots__}, "version": 1})
    old = crypto.seal_frame(IMAGE, v1, cloud_pub, dev)
    h, data = open_(keystore, old)
    assert (h.version, data) == (1, IMAGE)


def test_a_signature_does_not_carry_over_between_envelope_versions(keystore):
    """Relabelling a v2 frame as v1 (or the reverse) with its signature kept is refused."""
    _, _, cloud_pub = keystore.cloud_public_key()
    _, dev = keystore.device_private_key("cam-test")
    for version, other in ((2, 1), (1, 2)):
        h = FrameHeader(**{**{f: getattr(header(keystore), f) for f in FrameHeader.__slots__}, "version": version})
        blob = bytearray(crypto.seal_frame(IMAGE, h, cloud_pub, dev))
        blob[4] = other
        with pytest.raises(FrameRejected) as exc:
            open_(keystore, bytes(blob))
        assert exc.value.reason == "bad_signature"


def test_every_single_flipped_byte_is_refused(keystore):
    blob = seal(keystore)
    reasons = set()
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(FrameRejected) as exc:
            open_(keystore, bytes(tampered))
        reasons.add(exc.value.reason)
    assert reasons <= {"malformed", "unsupported_version", "unknown_device", "bad_signature", "decrypt_failed"}
    assert "bad_signature" in reasons


def test_header_is_bound_into_the_seal_even_with_a_valid_signature(keystore):
    """Re-signing a changed header with the device key still fails: HPKE info covers the header."""
    blob = seal(keystore, seq=7)
    env = envelope.parse(blob)
    forged_header = header(keystore, seq=8).pack()
    _, dev = keystore.device_private_key("cam-test")
    sig = dev.sign(envelope.signed_message(envelope.VERSION, forged_header, env.sealed))
    with pytest.raises(FrameRejected) as exc:
        open_(keystore, envelope.assemble(forged_header, env.sealed, sig))
    assert exc.value.reason == "decrypt_failed"


def test_frame_sealed_to_another_cloud_key_is_refused(keystore, tmp_path):
    other = KeyStore(tmp_path / "other")
    other.init_cloud()
    _, _, other_pub = other.cloud_public_key()
    _, dev = keystore.device_private_key("cam-test")
    h = header(keystore)
    blob = crypto.seal_frame(IMAGE, h, other_pub, dev)  # header names our key, sealed to theirs
    with pytest.raises(FrameRejected) as exc:
        open_(keystore, blob)
    assert exc.value.reason == "decrypt_failed"


def test_unknown_and_revoked_devices_are_refused(keystore, tmp_path):
    stranger = KeyStore(tmp_path / "stranger", bundle_dir=tmp_path / "stranger-bundles")
    stranger.init()
    stranger.enroll("cam-test")
    _, dev = stranger.device_private_key("cam-test")
    _, _, cloud_pub = keystore.cloud_public_key()
    dkid, _ = stranger.device_private_key("cam-test")
    h = FrameHeader("cam-test", 1, 1, 640, 480, "jpeg", keystore.cloud_public_key()[0], dkid)
    with pytest.raises(FrameRejected) as exc:
        open_(keystore, crypto.seal_frame(IMAGE, h, cloud_pub, dev))
    assert exc.value.reason == "unknown_device"

    blob = seal(keystore)
    keystore.revoke("cam-test")
    with pytest.raises(FrameRejected) as exc:
        open_(keystore, blob)
    assert exc.value.reason == "revoked_device"


def test_a_device_cannot_speak_for_another_camera(keystore):
    keystore.enroll("cam-other")
    _, _, cloud_pub = keystore.cloud_public_key()
    dkid, dev = keystore.device_private_key("cam-other")
    h = FrameHeader("cam-test", 1, 1, 640, 480, "jpeg", keystore.cloud_public_key()[0], dkid)
    with pytest.raises(FrameRejected) as exc:
        open_(keystore, crypto.seal_frame(IMAGE, h, cloud_pub, dev))
    assert exc.value.reason == "bad_signature"


def test_rotated_cloud_key_still_opens_older_frames(keystore):
    old = seal(keystore, seq=1)
    keystore.rotate_cloud()
    new = seal(keystore, seq=2)
    assert envelope.parse(old).header.cloud_key_id != envelope.parse(new).header.cloud_key_id
    assert open_(keystore, old)[1] == IMAGE and open_(keystore, new)[1] == IMAGE


def test_private_keys_are_0600(keystore):
    keys = list(keystore.path.rglob("*.key"))
    # cloud HPKE key, tile-job key, registry admin key, model-release key, the stage key (MAC of tile
    # batches) and the results-signing key; no device key
    assert len(keys) == 6
    for k in keys:
        assert stat.S_IMODE(k.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "blob, reason",
    [
        (b"", "malformed"),
        (b"JUNK" + bytes(100), "malformed"),
        (b"TSFR\x03" + bytes(100), "unsupported_version"),
    ],
)
def test_malformed_records(blob, reason):
    with pytest.raises(envelope.EnvelopeError) as exc:
        envelope.parse(blob)
    assert exc.value.reason == reason


def test_truncated_record_is_malformed(keystore):
    blob = seal(keystore)
    with pytest.raises(envelope.EnvelopeError) as exc:
        envelope.parse(blob[:-1])
    assert exc.value.reason == "malformed"


def test_hybrid_post_quantum_suite_round_trip_and_rotation(keystore):
    """MLKEM768-X25519: frames sealed to it open; the X25519 key of before still opens its frames."""
    classic = seal(keystore, seq=1)
    kid = keystore.rotate_cloud("mlkem768-x25519")
    pq = seal(keystore, seq=2)
    env = envelope.parse(pq)
    assert env.header.suite == envelope.SUITE_MLKEM768_X25519 and env.header.cloud_key_id.hex() == kid
    assert len(env.sealed) - len(IMAGE) == 1120 + 16  # X-Wing encapsulation + AES-GCM tag
    assert open_(keystore, pq)[1] == IMAGE and open_(keystore, classic)[1] == IMAGE
    tampered = bytearray(pq)
    tampered[len(env.header_bytes) + 4 + 500] ^= 1  # inside the KEM ciphertext; re-sign so only the seal can object
    _, dev = keystore.device_private_key("cam-test")
    t_env = envelope.parse(bytes(tampered[:-64]) + bytes(64))
    forged = envelope.assemble(t_env.header_bytes, t_env.sealed, dev.sign(envelope.signed_message(envelope.VERSION, t_env.header_bytes, t_env.sealed)))
    with pytest.raises(FrameRejected) as exc:
        open_(keystore, forged)
    assert exc.value.reason == "decrypt_failed"


def test_public_key_files_hold_no_private_material(keystore):
    keystore.rotate_cloud("mlkem768-x25519")
    for f in (keystore.path / "cloud").glob("*.pub"):
        d = json.loads(f.read_text())
        assert "mlkem768_seed" not in d and set(d) <= {"suite", "x25519", "mlkem768"}
