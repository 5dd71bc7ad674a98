"""Sealing and opening frames: HPKE (RFC 9180) + Ed25519, all from the ``cryptography`` package.

Pure functions, no I/O: keys come in as objects, bytes go out. Key files and the device
registry are :mod:`tilestream.keys`.

* seal: HPKE base mode to the cloud's public key — DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 /
  AES-256-GCM by default, or the hybrid post-quantum MLKEM768-X25519 KEM when the cloud key
  is of that kind — with ``info = INFO_PREFIX + header`` so the header is authenticated by
  the seal; then Ed25519 with the device's key over the SHA-256 digest of header + ciphertext
  (envelope v2; v1 frames, signed over the bytes themselves, are still verified).
* open: parse, look up the device by key id, verify the signature, look up the cloud
  private key by key id, decrypt. Every refusal is a :class:`FrameRejected` carrying a
  dead-letter reason code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Mapping

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from tilestream import envelope
from tilestream.envelope import Envelope, EnvelopeError, FrameHeader
from tilestream.errors import Refused

INFO_PREFIX = b"tilestream/frame/v1\x00"
SUITES = {
    envelope.SUITE_X25519: Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM),
    envelope.SUITE_MLKEM768_X25519: Suite(KEM.MLKEM768_X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM),
}
SUITE_NAMES = {"x25519": envelope.SUITE_X25519, "mlkem768-x25519": envelope.SUITE_MLKEM768_X25519}


class FrameRejected(Refused):
    """A frame the cloud refuses. ``reason`` is the dead-letter reason code."""

    def __init__(self, reason: str, message: str, header: FrameHeader | None = None):
        super().__init__(reason, message)
        self.header = header


def raw_public(key: x25519.X25519PublicKey | ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(raw: bytes) -> bytes:
    """8-byte key id: the start of SHA-256 over the raw public key bytes."""
    return hashlib.sha256(raw).digest()[: envelope.KEY_ID_LEN]


def key_id(public_key: x25519.X25519PublicKey | ed25519.Ed25519PublicKey) -> bytes:
    return key_id_of(raw_public(public_key))


@dataclass(frozen=True)
class DeviceKey:
    """A device's public key as the cloud knows it (from the registry)."""

    camera_id: str
    public_key: ed25519.Ed25519PublicKey
    revoked: bool = False


def seal_frame(
    image: bytes,
    header: FrameHeader,
    cloud_public,
    device_private: ed25519.Ed25519PrivateKey,
) -> bytes:
    """Encrypt ``image`` to the cloud (suite from ``header.suite``) and sign it as the device."""
    header_bytes = header.pack()
    sealed = SUITES[header.suite].encrypt(image, cloud_public, info=INFO_PREFIX + header_bytes)
    signature = device_private.sign(envelope.signed_message(header.version, header_bytes, sealed))
    return envelope.assemble(header_bytes, sealed, signature)


def verify_frame(blob: bytes, devices: Callable[[bytes], DeviceKey | None]) -> Envelope:
    """Parse and check the signature against the registry (``devices``: key id -> DeviceKey)."""
    try:
        env = envelope.parse(blob)
    except EnvelopeError as exc:
        raise FrameRejected(exc.reason, str(exc)) from None
    h = env.header
    device = devices(h.device_key_id)
    if device is None:
        raise FrameRejected("unknown_device", f"device key {h.device_key_id.hex()} is not enrolled", h)
    if device.camera_id != h.camera_id:
        raise FrameRejected(
            "bad_signature", f"device key {h.device_key_id.hex()} belongs to {device.camera_id!r}, not {h.camera_id!r}", h
        )
    if device.revoked:
        raise FrameRejected("revoked_device", f"device key {h.device_key_id.hex()} of {h.camera_id!r} is revoked", h)
    try:
        device.public_key.verify(env.signature, envelope.signed_message(h.version, env.header_bytes, env.sealed))
    except InvalidSignature:
        raise FrameRejected("bad_signature", f"signature of frame {h.frame_id} does not verify", h) from None
    return env


def open_envelope(env: Envelope, cloud_keys: Mapping[bytes, object]) -> bytes:
    """Decrypt a verified envelope with the cloud key its header names."""
    h = env.header
    private = cloud_keys.get(h.cloud_key_id)
    if private is None:
        raise FrameRejected("decrypt_failed", f"frame {h.frame_id} is sealed to unknown cloud key {h.cloud_key_id.hex()}", h)
    try:
        return SUITES[h.suite].decrypt(env.sealed, private, info=INFO_PREFIX + env.header_bytes)
    except (InvalidTag, ValueError, TypeError):  # TypeError: a key of the other suite
        raise FrameRejected("decrypt_failed", f"frame {h.frame_id} does not open with cloud key {h.cloud_key_id.hex()}", h) from None


def open_frame(
    blob: bytes,
    cloud_keys: Mapping[bytes, object],
    devices: Callable[[bytes], DeviceKey | None],
) -> tuple[FrameHeader, bytes]:
    """verify_frame then open_envelope: the header and the encoded image bytes."""
    env = verify_frame(blob, devices)
    return env.header, open_envelope(env, cloud_keys)
