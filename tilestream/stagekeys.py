"""Keys that authenticate the records between stages (the I/O side; the wire format is in
:mod:`tilestream.records`).

Two kinds, in the same key directory as :mod:`tilestream.keys`::

    stage/<kid>.key      HMAC-SHA256 "stage key", JSON {suite: "hmac-sha256", key: base64 of 32 random
                         bytes}, mode 0600; shared by processors (MAC every TileBatch they write to
                         ``tile-features``) and classifiers (verify before parsing). Cloud-internal:
                         whoever holds it can write tile batches the classifier believes.
    stage/current        the key id processors MAC with now; every stage/*.key still verifies
    results/<kid>.key    Ed25519 results-signing private key, PEM, mode 0600 (classifiers only)
    results/<kid>.pub    its public key, JSON {suite: "ed25519", ed25519: base64} (give it to every
                         consumer of ``results``: they verify, they cannot forge)
    results/current      the key id classifiers sign with now; every results/*.pub still verifies

Why two mechanisms: tile batches go between cloud workers that already share secrets, so a MAC is
enough and cheapest; results are read by outside services, which must be able to verify a result
without being able to make one, so they are signed (Ed25519) with a key only classifiers hold.

Key ids are 16 hex characters like :func:`tilestream.crypto.key_id`: for results keys the start of
SHA-256 over the raw public key; for stage keys the start of SHA-256 over a label and the key
(a hash of 32 random bytes says nothing about them).

Rotation (``tilestream stage-keys rotate --kind stage|results``): a new key becomes current, older
keys keep verifying until removed (``tilestream stage-keys remove --kind K --key-id OLD``; the
current key cannot be removed). Running stages follow ``stage/`` and ``results/`` without a restart
(:class:`MacKeys`, :class:`ResultSigner`, :class:`ResultKeys` re-read a directory when its
files change, checked every ``check_every_s`` and at once on an unknown key id), so the order is:
copy the new key to every classifier (and the new ``.pub`` to every consumer) first, then to the
processors; remove the old key once nothing written with it is still to be read (the topic's
retention).

Cost (``timeit``, best of 5-7 repeats, cryptography 50.0.2, on the shared 2-core build machine at
load average 12-17, so upper bounds): HMAC-SHA256 MAC of a 94,356-byte tile batch (vtest.avi in
64 px tiles: 108 tiles x 160 float32, base64 JSON) 0.14 ms to seal, 0.15 ms to verify (~0.65 GB/s)
— against 1.06 ms to parse the same batch's JSON here and 17.6 CPU ms per frame for the whole
processor in one process (benchmarks/REPORT.md). Results
(9,630-byte v1 JSON, 11,583 bytes signed): Ed25519 sign 0.08 ms, verify 0.12 ms; verify+parse of
a signed result 0.46 ms against 0.40 ms for the bare parse. Making the result's JSON
(``dataclasses.asdict``, 0.94 ms) costs more than signing it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tilestream.crypto import key_id, key_id_of, raw_public
from tilestream.errors import ConfigError
from tilestream.keys import _private_pem, _write

KINDS = ("stage", "results")
STAGE_KEY_LEN = 32
MAX_KEYS = 64  # of each kind in a directory: more is a mistake, and each is tried by id only
KID = re.compile(r"[0-9a-f]{16}")
_STAGE_KID_LABEL = b"tilestream/stage-key/v1\x00"
_MAX_KEY_FILE = 4096


def stage_key_id(key: bytes) -> str:
    return key_id_of(_STAGE_KID_LABEL + key).hex()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _read_small(path: Path) -> bytes:
    with open(path, "rb") as fh:
        blob = fh.read(_MAX_KEY_FILE + 1)
    if len(blob) > _MAX_KEY_FILE:
        raise ValueError(f"{path} is larger than a key file")
    return blob


def read_stage_key(path: Path) -> bytes:
    try:
        d = json.loads(_read_small(path))
        if d.get("suite") != "hmac-sha256":
            raise ValueError("suite")
        key = base64.b64decode(d["key"], validate=True)
        if len(key) != STAGE_KEY_LEN:
            raise ValueError("length")
        return key
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is not a tilestream stage key") from None


def read_results_pub(path: Path) -> ed25519.Ed25519PublicKey:
    try:
        d = json.loads(_read_small(path))
        if d.get("suite") != "ed25519":
            raise ValueError("suite")
        return ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(d["ed25519"], validate=True))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is not a tilestream results public key") from None


def _results_pub_json(key: ed25519.Ed25519PublicKey) -> bytes:
    return json.dumps({"suite": "ed25519", "ed25519": _b64(raw_public(key))}).encode()


@dataclass(frozen=True)
class KeyInfo:
    kind: str
    kid: str
    current: bool
    private: bool  # a stage key, or a results key whose private half is here
    created: int  # file mtime, seconds since the epoch


class StageKeys:
    """The ``stage/`` and ``results/`` parts of a key directory."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def _dir(self, kind: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown stage key kind {kind!r} ({', '.join(KINDS)})")
        return self.path / kind

    def current_id(self, kind: str) -> str | None:
        try:
            kid = (self._dir(kind) / "current").read_text().strip()
        except FileNotFoundError:
            return None
        return kid if KID.fullmatch(kid) else None

    # -- create / rotate / remove -------------------------------------------------------
    def init(self, kinds: tuple[str, ...] = KINDS) -> dict[str, str]:
        """Create the keys of ``kinds`` that do not exist yet; returns kind -> current key id."""
        return {kind: self.current_id(kind) or self.rotate(kind) for kind in kinds}

    def rotate(self, kind: str) -> str:
        """A new key of ``kind`` becomes current; the older ones keep verifying until removed."""
        d = self._dir(kind)
        if kind == "stage":
            key = os.urandom(STAGE_KEY_LEN)
            kid = stage_key_id(key)
            _write(d / f"{kid}.key", json.dumps({"suite": "hmac-sha256", "key": _b64(key)}).encode(), 0o600)
        else:
            private = ed25519.Ed25519PrivateKey.generate()
            kid = key_id(private.public_key()).hex()
            _write(d / f"{kid}.key", _private_pem(private), 0o600)
            _write(d / f"{kid}.pub", _results_pub_json(private.public_key()), 0o644)
        _write(d / "current", kid.encode(), 0o644)
        return kid

    def remove(self, kind: str, kid: str) -> None:
        """Stop trusting key ``kid`` of ``kind`` here (never the current one: rotate first)."""
        d = self._dir(kind)
        if not KID.fullmatch(kid or ""):
            raise KeyError(f"{kid!r} is not a key id")
        if kid == self.current_id(kind):
            raise ValueError(f"{kind} key {kid} is the current one: `tilestream stage-keys rotate --kind {kind}` first")
        files = [f for f in (d / f"{kid}.key", d / f"{kid}.pub") if f.exists()]
        if not files:
            raise KeyError(f"no {kind} key {kid} here")
        for f in files:
            f.unlink()

    def trust_results(self, pub_file: str | os.PathLike[str]) -> str:
        """Trust a results public key file (``results/<kid>.pub`` of a classifier's key directory):
        what a consumer of ``results`` does to verify."""
        key = read_results_pub(Path(pub_file))
        kid = key_id(key).hex()
        _write(self._dir("results") / f"{kid}.pub", _results_pub_json(key), 0o644)
        return kid

    def list(self) -> list[KeyInfo]:
        out = []
        for kind in KINDS:
            d, current = self._dir(kind), self.current_id(kind)
            ids = sorted({f.stem for f in d.glob("*.key")} | {f.stem for f in d.glob("*.pub")}) if d.exists() else []
            for kid in (k for k in ids if KID.fullmatch(k)):
                f = d / f"{kid}.key"
                out.append(KeyInfo(kind, kid, kid == current, f.exists(),
                                   int((f if f.exists() else d / f"{kid}.pub").stat().st_mtime)))
        return out

    # -- loading -------------------------------------------------------------------------
    def stage_keys(self) -> dict[str, bytes]:
        """Every stage key here (key id -> key); a file named for another key is ignored."""
        keys = {}
        for f in sorted(self._dir("stage").glob("*.key"))[:MAX_KEYS]:
            key = read_stage_key(f)
            if stage_key_id(key) == f.stem:
                keys[f.stem] = key
        return keys

    def current_stage_key(self) -> tuple[str, bytes]:
        kid = self.current_id("stage")
        keys = self.stage_keys()
        if kid is None or kid not in keys:
            raise ConfigError(f"no current stage key in {self._dir('stage')}: run `tilestream stage-keys create` "
                              "and give the same stage/ to every processor and classifier")
        return kid, keys[kid]

    def results_public_keys(self) -> dict[str, ed25519.Ed25519PublicKey]:
        """Every trusted results public key here (key id -> key)."""
        keys = {}
        for f in sorted(self._dir("results").glob("*.pub"))[:MAX_KEYS]:
            key = read_results_pub(f)
            if key_id(key).hex() == f.stem:
                keys[f.stem] = key
        return keys

    def results_private_key(self) -> tuple[str, ed25519.Ed25519PrivateKey]:
        d = self._dir("results")
        kid = self.current_id("results")
        try:
            if kid is None:
                raise FileNotFoundError
            key = serialization.load_pem_private_key(_read_small(d / f"{kid}.key"), password=None)
        except FileNotFoundError:
            raise ConfigError(f"no results-signing key in {d}: run `tilestream stage-keys create` "
                              "on the classifiers") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey) or key_id(key.public_key()).hex() != kid:
            raise ConfigError(f"{d / (kid + '.key')} is not the Ed25519 results key {kid}")
        return kid, key

    # -- followers for running stages ------------------------------------------------------
    def mac_keys(self, check_every_s: float = 1.0) -> "MacKeys":
        return MacKeys(self, check_every_s)

    def result_signer(self, check_every_s: float = 1.0) -> "ResultSigner":
        return ResultSigner(self, check_every_s)

    def result_keys(self, check_every_s: float = 1.0) -> "ResultKeys":
        return ResultKeys(self, check_every_s)

    def for_classifier(self, check_every_s: float = 1.0) -> "ClassifierKeys":
        """The classifier's keys; ConfigError without a stage key or a results-signing key."""
        if not self.stage_keys():
            raise ConfigError(f"no stage key in {self._dir('stage')}: run `tilestream stage-keys create` and give "
                              "the same stage/ to every processor and classifier")
        return ClassifierKeys(self.mac_keys(check_every_s), self.result_signer(check_every_s),
                              self.result_keys(check_every_s))


_NEVER = object()
FORCED_CHECK_EVERY_S = 0.01


class _Follower:
    """Re-loads a directory's keys when it changed (checked every ``check_every_s``, and at once
    when asked for a key id it does not know: a key rotated a moment ago).

    "Changed" is the list of file names plus the ``current`` file's text, not the directory's
    mtime: Linux stamps mtimes from a coarse clock (a few ms), so a rotation right after a
    creation can leave the mtime as it was. A check is one listdir and one small read (~20 us).
    """

    kind = ""

    def __init__(self, store: StageKeys, check_every_s: float = 1.0):
        self.store = store
        self.check_every_s = check_every_s
        self._checked = self._forced = 0.0
        self._seen: object = _NEVER
        self._refresh(force=True)

    def _load(self, present: bool) -> None:
        raise NotImplementedError

    def _state(self) -> tuple | None:
        d = self.store.path / self.kind
        try:
            names = tuple(sorted(n for n in os.listdir(d) if not n.startswith(".tmp-")))
        except FileNotFoundError:
            return None
        try:
            current = (d / "current").read_bytes()[:64]
        except FileNotFoundError:
            current = b""
        return names, current

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.check_every_s:
            return
        self._checked = now
        state = self._state()
        if state != self._seen:
            try:
                self._load(state is not None)
            except (ValueError, OSError):
                if self._seen is _NEVER:
                    raise  # at start: refuse to run (ConfigError says what is missing)
                return  # a key file half-copied or removed under us: keep the keys we had, retry next check
            self._seen = state

    def _lookup(self, kid: str):
        self._refresh()
        if not isinstance(kid, str):
            return None
        hit = self._table().get(kid)
        now = time.monotonic()
        if hit is None and KID.fullmatch(kid) and now - self._forced >= min(self.check_every_s, FORCED_CHECK_EVERY_S):
            # A key rotated a moment ago. At most every 10 ms: a flood of records under made-up key
            # ids costs at most 100 directory reads a second (~2 ms of CPU), not one per record.
            self._forced = now
            self._refresh(force=True)  # a reload only if the directory changed
            hit = self._table().get(kid)
        return hit

    def _table(self) -> dict:
        raise NotImplementedError


class MacKeys(_Follower):
    """Stage keys: ``mac_keys(kid) -> key | None`` (verifying), ``mac_keys.current() -> (kid, key)`` (MACing)."""

    kind = "stage"

    def _load(self, present: bool) -> None:
        self._keys = self.store.stage_keys() if present else {}
        kid = self.store.current_id("stage")
        # ``current`` gone (removed by hand, half-copied): keep MACing with the key we had
        self._current = (kid, self._keys[kid]) if kid in self._keys else getattr(self, "_current", None)

    def _table(self) -> dict:
        return self._keys

    def __call__(self, kid: str) -> bytes | None:
        return self._lookup(kid)

    def current(self) -> tuple[str, bytes]:
        self._refresh()
        if self._current is None:
            self.store.current_stage_key()  # raises the ConfigError that says what to do
        return self._current  # type: ignore[return-value]


class ResultSigner(_Follower):
    """The classifier's results-signing key: ``signer.current() -> (kid, private key)``."""

    kind = "results"

    def _load(self, present: bool) -> None:
        self._current = self.store.results_private_key()

    def _table(self) -> dict:
        return {}

    def current(self) -> tuple[str, ed25519.Ed25519PrivateKey]:
        self._refresh()
        return self._current


class ResultKeys(_Follower):
    """Trusted results public keys: ``result_keys(kid) -> public key | None``; ``len()`` how many."""

    kind = "results"

    def _load(self, present: bool) -> None:
        self._keys = self.store.results_public_keys() if present else {}

    def _table(self) -> dict:
        return self._keys

    def __call__(self, kid: str) -> ed25519.Ed25519PublicKey | None:
        return self._lookup(kid)

    def __len__(self) -> int:
        self._refresh()
        return len(self._keys)


@dataclass(frozen=True)
class ClassifierKeys:
    """What a classifier holds: the stage keys (verify tile batches), its signing key (sign
    results) and the trusted results public keys (verify results read back)."""

    mac: Callable[[str], bytes | None]
    signer: ResultSigner
    results: Callable[[str], ed25519.Ed25519PublicKey | None]
