"""The model registry is a compacted Kafka topic: publishing a model switches running classifiers.

``models`` (one partition, compacted, key = model name) holds, per name, the newest published
model as one signed record. Publishing assigns the next version number for that name. Every
classifier reads the topic from the start, follows it while it runs and swaps models between
two poll batches — no restart, no frame lost or answered twice, and every result names the
model version that made it.

Anyone who can write to Kafka can write to ``models``, so a record is trusted only for its
signature. Layout (big-endian)::

    b"TSM2" | u32 m | meta JSON (m bytes) | u32 h | signature header JSON (h bytes) | 64-byte signature | skops bytes

* meta: :meth:`TileModel.meta` plus ``name`` and ``version`` (so a record signed for one name or
  version means nothing under another); at most 64 KiB, nesting at most 16.
* signature header: ``{"alg": "ed25519", "kid": "<16 hex digits>"}``, at most 256 bytes.
* signature: Ed25519 by the model-release key ``kid`` over
  ``SIGNATURE_DOMAIN || SHA-256(b"TSM2" || u32 m || meta || u64 n || skops)`` — hash-then-sign
  with a domain string, as :mod:`tilestream.envelope` v2 does for frames (a model is up to
  64 MB: Ed25519 hashes its message twice with SHA-512; hashing it once is enough).

The release key is an Ed25519 key of its own (``tilestream keys init-release``, kept where
models are published); classifiers hold only its public keys (``release/<kid>.pub``).
:func:`verify_record` checks structure, bounds and signature before anything of the record is
parsed — the skops bytes reach :meth:`TileModel.from_bytes` (allow-list audit, then skops,
then the estimator's shape) only once the signature verified. A TSM1 record (the former,
unsigned format) is refused as ``unsigned``. :class:`ModelWatcher` never raises for a bad
record: it keeps the running model and reports each refusal (:meth:`ModelWatcher.take_refusals`)
so the classifier counts, logs and dead-letters it.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from kafkaio import Connection, clients
from kafkaio.clients import RangeReader
from tilestream import topics

from classifier.model import MAX_META_BYTES, ModelRefused, TileModel, parse_meta

MAGIC = b"TSM2"
MAGIC_UNSIGNED = b"TSM1"
SIGNATURE_DOMAIN = b"tilestream/model-signature/v2/sha256\x00"
SIGNATURE_LEN = 64
MAX_SIG_HEADER_BYTES = 256
MAX_RECORD_BYTES = topics.MAX_MODEL_BYTES
DEAD_LETTER_HEAD_BYTES = 4096  # what a dead letter keeps of a refused record (records reach 64 MB)
_LEN = struct.Struct(">I")
_LEN64 = struct.Struct(">Q")
_KID = re.compile(r"[0-9a-f]{16}")
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

Keys = Callable[[bytes], "ed25519.Ed25519PublicKey | None"] | Mapping[bytes, ed25519.Ed25519PublicKey]


@dataclass(frozen=True)
class SignedRecord:
    meta_bytes: bytes
    kid: bytes
    signature: bytes
    skops: bytes


def signed_message(meta_bytes: bytes, skops: bytes) -> bytes:
    """What the release key's signature covers (see the module doc)."""
    digest = hashlib.sha256(MAGIC)
    digest.update(_LEN.pack(len(meta_bytes)))
    digest.update(meta_bytes)
    digest.update(_LEN64.pack(len(skops)))
    digest.update(skops)
    return SIGNATURE_DOMAIN + digest.digest()


def sign_record(meta: dict[str, Any], skops: bytes, kid: bytes, key: ed25519.Ed25519PrivateKey) -> bytes:
    """Pure: a TSM2 record of ``meta`` and ``skops`` signed by release key ``kid``."""
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    if len(meta_bytes) > MAX_META_BYTES:
        raise ModelRefused("too_large", f"model metadata of {len(meta_bytes)} bytes exceeds {MAX_META_BYTES}")
    header = json.dumps({"alg": "ed25519", "kid": kid.hex()}, separators=(",", ":")).encode()
    signature = key.sign(signed_message(meta_bytes, skops))
    record = MAGIC + _LEN.pack(len(meta_bytes)) + meta_bytes + _LEN.pack(len(header)) + header + signature + skops
    if len(record) > MAX_RECORD_BYTES:
        raise ModelRefused("too_large", f"model record of {len(record)} bytes exceeds the models topic's {MAX_RECORD_BYTES}")
    return record


def parse_record(data: bytes) -> SignedRecord:
    """Split a record into its parts, every length bounded; no signature check, nothing parsed
    but the 256-byte signature header."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 8:
        raise ModelRefused("malformed", "not a tilestream model record (too short)")
    if len(data) > MAX_RECORD_BYTES:
        raise ModelRefused("too_large", f"model record of {len(data)} bytes exceeds {MAX_RECORD_BYTES}")
    if data[:4] == MAGIC_UNSIGNED:
        raise ModelRefused("unsigned", "unsigned model record (TSM1): publish it again with `tilestream models publish`")
    if data[:4] != MAGIC:
        raise ModelRefused("malformed", "not a tilestream model record (bad magic)")
    (m,) = _LEN.unpack_from(data, 4)
    if m > MAX_META_BYTES or len(data) < 8 + m + _LEN.size:
        raise ModelRefused("malformed", f"model metadata length {m} is over {MAX_META_BYTES} or past the record")
    meta_bytes = data[8:8 + m]
    (h,) = _LEN.unpack_from(data, 8 + m)
    start = 8 + m + _LEN.size
    if h > MAX_SIG_HEADER_BYTES or len(data) < start + h + SIGNATURE_LEN:
        raise ModelRefused("malformed", f"signature header length {h} is over {MAX_SIG_HEADER_BYTES} or past the record")
    try:
        header = json.loads(data[start:start + h])
    except (ValueError, RecursionError):
        raise ModelRefused("malformed", "signature header is not JSON") from None
    if not (isinstance(header, dict) and header.get("alg") == "ed25519" and isinstance(header.get("kid"), str)
            and _KID.fullmatch(header["kid"])):
        raise ModelRefused("malformed", "signature header is not {alg: ed25519, kid: 16 hex digits}")
    sig_start = start + h
    return SignedRecord(bytes(meta_bytes), bytes.fromhex(header["kid"]), bytes(data[sig_start:sig_start + SIGNATURE_LEN]),
                        bytes(data[sig_start + SIGNATURE_LEN:]))


def _lookup(keys: Keys, kid: bytes) -> ed25519.Ed25519PublicKey | None:
    key = keys.get(kid) if isinstance(keys, Mapping) else keys(kid)
    return key if isinstance(key, ed25519.Ed25519PublicKey) else None


def verify_record(data: bytes, keys: Keys) -> tuple[dict[str, Any], bytes]:
    """(meta, skops bytes) of a record whose signature verifies with a trusted release key.

    The metadata is parsed only after the signature verified; the skops bytes are returned
    untouched (load them with :meth:`TileModel.from_bytes`).
    """
    rec = parse_record(data)
    public = _lookup(keys, rec.kid)
    if public is None:
        raise ModelRefused("unknown_key", f"model record is signed by {rec.kid.hex()}, not a trusted model-release key")
    try:
        public.verify(rec.signature, signed_message(rec.meta_bytes, rec.skops))
    except InvalidSignature:
        raise ModelRefused("bad_signature", f"signature by release key {rec.kid.hex()} does not verify") from None
    meta = parse_meta(rec.meta_bytes)
    if not isinstance(meta.get("name"), str) or meta["version"] < 1:
        raise ModelRefused("malformed", "signed model metadata has no name or no version")
    return meta, rec.skops


def pack(path: str | Path, version: int, name: str, kid: bytes, key: ed25519.Ed25519PrivateKey) -> bytes:
    """The signed record of the model file ``path`` (and ``<path>.json``) as ``version`` of ``name``."""
    path = Path(path)
    meta = parse_meta(Path(str(path) + ".json").read_bytes())
    meta["name"], meta["version"] = name, version
    return sign_record(meta, path.read_bytes(), kid, key)


def unpack(data: bytes, expected_digest: str | None, keys: Keys, name: str | None = None) -> TileModel:
    """Verify a record (refusing it before any parsing unless its signature verifies), then load it."""
    meta, skops = verify_record(data, keys)
    if name is not None and meta["name"] != name:
        raise ModelRefused("wrong_name", f"record under key {name!r} is signed for model {meta['name']!r}")
    return TileModel.from_bytes(skops, meta, expected_digest)


def meta_of(data: bytes, keys: Keys) -> dict:
    """The verified metadata of a record."""
    return verify_record(data, keys)[0]


@dataclass(frozen=True)
class Refusal:
    """A refused record of the models topic, as the classifier reports it."""

    reason: str
    message: str
    partition: int | None
    offset: int | None
    head: bytes  # the record's first DEAD_LETTER_HEAD_BYTES bytes
    size: int


class ModelWatcher:
    """Follows the models topic; ``poll()`` returns a newer model for ``name`` when one arrived.

    ``keys``: the trusted release public keys (key id -> key, or a callable such as
    :meth:`tilestream.keys.KeyStore.model_release_keys`, which follows rotation without a restart).
    Only records whose signature verifies count: an unsigned or forged record claiming a huge
    version number can neither be loaded nor hide the models published after it. Refused
    records are counted in ``refused`` and kept (the newest 64) for :meth:`take_refusals`.
    """

    def __init__(self, where: Connection | str, name: str = "default", expected_digest: str | None = None, *,
                 keys: Keys):
        self.name = name
        self.expected_digest = expected_digest
        self.keys = keys
        self.reader = RangeReader(where, topics.MODELS, client_id="tilestream-models",
                                  fetch_max_bytes=MAX_RECORD_BYTES + 1024 * 1024,
                                  max_partition_fetch_bytes=MAX_RECORD_BYTES + 1024 * 1024)
        self.reader.seek("beginning")
        self.version = 0
        self.model_id: str | None = None
        self.refused = 0
        self._refusals: deque[Refusal] = deque(maxlen=64)

    def _refuse(self, exc: ModelRefused, data: bytes, partition: int | None, offset: int | None) -> None:
        self.refused += 1
        self._refusals.append(Refusal(exc.reason, str(exc)[:1000], partition, offset,
                                      bytes(data[:DEAD_LETTER_HEAD_BYTES]), len(data)))

    @property
    def pending_refusals(self) -> tuple[Refusal, ...]:
        """The refusals not taken yet (the classifier reports them at its next model check)."""
        return tuple(self._refusals)

    def take_refusals(self) -> list[Refusal]:
        """The refusals since the last call (at most the newest 64)."""
        out = list(self._refusals)
        self._refusals.clear()
        return out

    def latest(self) -> tuple[int, bytes | None]:
        """Read up to the end now: (newest verified version for the name, its record)."""
        newest, _ = self._scan()
        return newest[0], newest[1]

    def _scan(self) -> tuple[tuple[int, bytes | None], tuple[int | None, int | None]]:
        newest: tuple[int, bytes | None] = (self.version, None)
        where: tuple[int | None, int | None] = (None, None)
        for m in self.reader.read_to_end():
            if m.key != self.name.encode() or not m.value:
                continue  # another model's record (its classifiers check it), or a tombstone
            try:
                meta, _ = verify_record(m.value, self.keys)
                if meta["name"] != self.name:
                    raise ModelRefused("wrong_name", f"record under key {self.name!r} is signed for "
                                                     f"model {meta['name']!r}")
            except ModelRefused as exc:
                self._refuse(exc, m.value, m.partition, m.offset)
                continue
            if meta["version"] > newest[0]:
                newest, where = (meta["version"], m.value), (m.partition, m.offset)
        return newest, where

    def poll(self) -> TileModel | None:
        """A newer model for the name, or None (also when the newest record is refused: see
        :meth:`take_refusals`; the newest version is then not tried again)."""
        (version, data), (partition, offset) = self._scan()
        if data is None:
            return None
        self.version = version
        try:
            model = unpack(data, self.expected_digest, self.keys, self.name)
        except ModelRefused as exc:
            self._refuse(exc, data, partition, offset)
            return None
        self.model_id = model.model_id
        return model

    def close(self) -> None:
        self.reader.close()


def publish(where: Connection | str, path: str | Path, name: str = "default", expected_digest: str | None = None, *,
            keystore) -> int:
    """Sign the model at ``path`` with ``keystore``'s current release key and publish it as the next
    version of ``name``; returns that version.

    Refuses (:class:`ModelRefused`) what classifiers would refuse: the record is verified with
    the keystore's own trusted release keys and loaded through every check before it is sent.
    """
    if not _NAME.fullmatch(name):
        raise ModelRefused("malformed", f"model name {name[:80]!r} is not 1..64 characters of [A-Za-z0-9_.:-]")
    TileModel.load(path, expected_digest=expected_digest)  # refuse here what classifiers would refuse
    kid, key = keystore.model_release_private_key()
    keys = keystore.model_release_public_keys()
    watcher = ModelWatcher(where, name, keys=keys)
    try:
        version = watcher.latest()[0] + 1
    finally:
        watcher.close()
    record = pack(path, version, name, kid, key)
    unpack(record, expected_digest, keys, name)
    producer = clients.producer(where, "stage", max_request_size=len(record) + 64 * 1024)
    try:
        producer.send(topics.MODELS, key=name.encode(), value=record).get(timeout=60)
    finally:
        producer.close()
    return version
