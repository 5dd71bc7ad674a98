"""Key files and the device registry (the I/O side of :mod:`tilestream.crypto`).

A key directory holds::

    cloud/<kid>.key        cloud private key, JSON {suite, raw key parts in base64}, mode 0600 (cloud only)
    cloud/<kid>.pub        cloud public key, JSON {suite, raw key parts in base64} (what agents seal to)
    cloud/current          key id agents seal to now; older keys still open older frames
    cloud/tile-<kid>.key   AES-256 key for tile jobs between cloud workers, mode 0600 (cloud only)
    devices/<camera>/<kid>.key   device Ed25519 private key, mode 0600 (device side only)
    devices/<camera>/current
    release/<kid>.key      model-release Ed25519 private key, PEM, mode 0600 (where models are published only)
    release/<kid>.pub      a trusted model-release public key, JSON {suite: "ed25519", ed25519: base64}
                           (what classifiers verify model records with; copy it to every classifier)
    release/current        key id `models publish` signs with now; older .pub files stay trusted
    registry.json          enrolled device public keys and their status (what the processor reads)

Private keys are never logged and never leave this directory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from tilestream.crypto import SUITE_NAMES, DeviceKey, key_id, key_id_of, raw_public


def _load_key_file(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        if "suite" not in d:
            raise ValueError("no suite")
        return d
    except ValueError:
        raise ValueError(f"{path} is not a tilestream key file (made by an older version?); "
                         "create the cloud key again with `tilestream keys init` in an empty keys directory") from None


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _private_pem(key: x25519.X25519PrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class KeyStore:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    # -- cloud keys -------------------------------------------------------------------
    def init_cloud(self, suite: str = "x25519") -> str:
        """Create the cloud key pair unless one exists; returns the current key id (hex)."""
        current = self.path / "cloud" / "current"
        self.tile_keys()  # the cloud workers' internal key for tile jobs, provisioned with the cloud key
        if current.exists():
            return current.read_text().strip()
        return self.rotate_cloud(suite)

    def rotate_cloud(self, suite: str = "x25519") -> str:
        """Make a new cloud key current; older keys stay so frames sealed to them still open.

        ``suite``: "x25519" (default) or "mlkem768-x25519" (hybrid post-quantum).
        """
        if suite == "x25519":
            private = x25519.X25519PrivateKey.generate()
            pub = {"x25519": _b64(raw_public(private.public_key()))}
            priv = {"x25519": _b64(private.private_bytes_raw())}
        elif suite == "mlkem768-x25519":
            m, x = mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
            pub = {"mlkem768": _b64(m.public_key().public_bytes_raw()), "x25519": _b64(raw_public(x.public_key()))}
            priv = {"mlkem768_seed": _b64(m.private_bytes_raw()), "x25519": _b64(x.private_bytes_raw())}
        else:
            raise ValueError(f"unknown suite {suite!r} (x25519, mlkem768-x25519)")
        kid = key_id_of(b"".join(base64.b64decode(v) for v in pub.values())).hex()
        _write(self.path / "cloud" / f"{kid}.key", json.dumps({"suite": suite, **priv}).encode(), 0o600)
        _write(self.path / "cloud" / f"{kid}.pub", json.dumps({"suite": suite, **pub}).encode(), 0o644)
        _write(self.path / "cloud" / "current", kid.encode(), 0o644)
        return kid

    def cloud_public_key(self) -> tuple[bytes, int, object]:
        """(key id, envelope suite id, public key object) of the current cloud key."""
        kid = self._current(self.path / "cloud", "no cloud key: run `tilestream keys init`")
        d = _load_key_file(self.path / "cloud" / f"{kid}.pub")
        xpub = x25519.X25519PublicKey.from_public_bytes(base64.b64decode(d["x25519"]))
        if d["suite"] == "x25519":
            return bytes.fromhex(kid), SUITE_NAMES["x25519"], xpub
        mpub = mlkem.MLKEM768PublicKey.from_public_bytes(base64.b64decode(d["mlkem768"]))
        return bytes.fromhex(kid), SUITE_NAMES[d["suite"]], hpke.MLKEM768X25519PublicKey(mpub, xpub)

    def cloud_private_keys(self) -> dict[bytes, object]:
        keys: dict[bytes, object] = {}
        for f in sorted(p for p in (self.path / "cloud").glob("*.key") if not p.name.startswith("tile-")):
            d = _load_key_file(f)
            x = x25519.X25519PrivateKey.from_private_bytes(base64.b64decode(d["x25519"]))
            if d["suite"] == "x25519":
                keys[bytes.fromhex(f.stem)] = x
            else:
                m = mlkem.MLKEM768PrivateKey.from_seed_bytes(base64.b64decode(d["mlkem768_seed"]))
                keys[bytes.fromhex(f.stem)] = hpke.MLKEM768X25519PrivateKey(m, x)
        if not keys:
            raise FileNotFoundError(f"no cloud private key in {self.path / 'cloud'}: run `tilestream keys init`")
        return keys

    def tile_keys(self) -> tuple[str, dict[str, bytes]]:
        """(current id, all keys) of the internal AES-256-GCM key for tile jobs; made on first use."""
        cdir = self.path / "cloud"
        files = sorted(cdir.glob("tile-*.key"), key=lambda f: f.stat().st_mtime)
        if not files:
            key = os.urandom(32)
            kid = hashlib.sha256(b"tilestream/tile-key/" + key).hexdigest()[:16]
            _write(cdir / f"tile-{kid}.key", base64.b64encode(key), 0o600)
            files = [cdir / f"tile-{kid}.key"]
        keys = {f.stem[len("tile-"):]: base64.b64decode(f.read_bytes()) for f in files}
        return files[-1].stem[len("tile-"):], keys

    # -- model release keys -----------------------------------------------------------
    # A key of its own, not the cloud key: whoever holds it decides what code-like artifact every
    # classifier runs, so it can live on the machine models are published from, while classifiers
    # (and the cloud key's machines) hold only its public keys.
    def init_model_release(self) -> str:
        """Create the model-release key pair unless one exists; returns the current key id (hex)."""
        current = self.path / "release" / "current"
        if current.exists():
            return current.read_text().strip()
        return self.rotate_model_release()

    def rotate_model_release(self) -> str:
        """Make a new release key current. The old public keys stay trusted, so the models signed
        with them keep loading until they are published again and the old key is untrusted."""
        private = ed25519.Ed25519PrivateKey.generate()
        kid = key_id(private.public_key()).hex()
        rdir = self.path / "release"
        _write(rdir / f"{kid}.key", _private_pem(private), 0o600)
        _write(rdir / f"{kid}.pub", _release_pub_json(private.public_key()), 0o644)
        _write(rdir / "current", kid.encode(), 0o644)
        return kid

    def trust_model_release(self, pub_file: str | os.PathLike[str]) -> str:
        """Trust a release public key file (``release/<kid>.pub`` of the publishing machine)."""
        key = _read_release_pub(Path(pub_file))
        kid = key_id(key).hex()
        _write(self.path / "release" / f"{kid}.pub", _release_pub_json(key), 0o644)
        return kid

    def untrust_model_release(self, kid: str) -> None:
        """Stop trusting release key ``kid`` (not the current one: rotate first)."""
        rdir = self.path / "release"
        current = (rdir / "current").read_text().strip() if (rdir / "current").exists() else None
        if kid == current:
            raise ValueError(f"release key {kid} is the current one: `tilestream keys rotate-release` first")
        pub = rdir / f"{kid}.pub"
        if not _RELEASE_KID.fullmatch(kid) or not pub.exists():
            raise KeyError(f"release key {kid!r} is not trusted here")
        pub.unlink()

    def model_release_private_key(self) -> tuple[bytes, ed25519.Ed25519PrivateKey]:
        rdir = self.path / "release"
        kid = self._current(rdir, "no model release key: run `tilestream keys init-release` where models are published")
        key = serialization.load_pem_private_key((rdir / f"{kid}.key").read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey) or key_id(key.public_key()).hex() != kid:
            raise ValueError(f"{rdir / (kid + '.key')} is not the Ed25519 release key {kid}")
        return bytes.fromhex(kid), key

    def model_release_public_keys(self) -> dict[bytes, ed25519.Ed25519PublicKey]:
        """Every trusted release public key now (key id -> key)."""
        keys = {}
        for f in sorted((self.path / "release").glob("*.pub"))[:MAX_RELEASE_KEYS]:
            key = _read_release_pub(f)
            if key_id(key).hex() == f.stem:  # a file named for another key is ignored
                keys[bytes.fromhex(f.stem)] = key
        return keys

    def model_release_keys(self, check_every_s: float = 1.0) -> "ReleaseKeys":
        """The trusted release public keys as a lookup that follows changes of ``release/``."""
        return ReleaseKeys(self, check_every_s)

    # -- devices ----------------------------------------------------------------------
    def enroll(self, camera_id: str) -> str:
        """Create a device key pair for ``camera_id`` and register its public key."""
        private = ed25519.Ed25519PrivateKey.generate()
        kid = key_id(private.public_key()).hex()
        ddir = self.path / "devices" / camera_id
        _write(ddir / f"{kid}.key", _private_pem(private), 0o600)
        _write(ddir / "current", kid.encode(), 0o644)
        reg = self._load_registry()
        reg.setdefault(camera_id, []).append(
            {
                "key_id": kid,
                "public_key": _b64(raw_public(private.public_key())),
                "status": "active",
                "enrolled_at": int(time.time()),
            }
        )
        self._save_registry(reg)
        return kid

    def revoke(self, camera_id: str, kid: str | None = None) -> list[str]:
        """Revoke one key of a device, or all of them; returns the revoked key ids."""
        reg = self._load_registry()
        if camera_id not in reg:
            raise KeyError(f"device {camera_id!r} is not enrolled")
        revoked = []
        for entry in reg[camera_id]:
            if kid is None or entry["key_id"] == kid:
                entry["status"] = "revoked"
                entry["revoked_at"] = int(time.time())
                revoked.append(entry["key_id"])
        self._save_registry(reg)
        return revoked

    def device_private_key(self, camera_id: str) -> tuple[bytes, ed25519.Ed25519PrivateKey]:
        ddir = self.path / "devices" / camera_id
        kid = self._current(ddir, f"device {camera_id!r} has no key here: run `tilestream keys enroll {camera_id}`")
        key = serialization.load_pem_private_key((ddir / f"{kid}.key").read_bytes(), password=None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        return bytes.fromhex(kid), key

    @property
    def registry_path(self) -> Path:
        return self.path / "registry.json"

    def _current(self, d: Path, missing: str) -> str:
        try:
            return (d / "current").read_text().strip()
        except FileNotFoundError:
            raise FileNotFoundError(f"{missing} (looked in {d})") from None

    def _load_registry(self) -> dict[str, list[dict]]:
        try:
            return json.loads(self.registry_path.read_text())["devices"]
        except FileNotFoundError:
            return {}

    def _save_registry(self, devices: dict[str, list[dict]]) -> None:
        _write(self.registry_path, json.dumps({"devices": devices}, indent=2, sort_keys=True).encode(), 0o644)


MAX_RELEASE_KEYS = 64
_RELEASE_KID = re.compile(r"[0-9a-f]{16}")


def _release_pub_json(key: ed25519.Ed25519PublicKey) -> bytes:
    return json.dumps({"suite": "ed25519", "ed25519": _b64(raw_public(key))}).encode()


def _read_release_pub(path: Path) -> ed25519.Ed25519PublicKey:
    with open(path, "rb") as fh:
        blob = fh.read(4097)
    try:
        if len(blob) > 4096:
            raise ValueError("too large")
        d = json.loads(blob)
        if d.get("suite") != "ed25519":
            raise ValueError("not an ed25519 key")
        return ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(d["ed25519"], validate=True))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is not a tilestream release public key") from None


class ReleaseKeys:
    """Key id -> trusted release public key, re-read when ``release/`` changes (so a rotated or
    untrusted key takes effect without restarting the classifier)."""

    def __init__(self, store: KeyStore, check_every_s: float = 1.0):
        self.store = store
        self.check_every_s = check_every_s
        self._checked = 0.0
        self._mtime: float | None = None
        self._keys: dict[bytes, ed25519.Ed25519PublicKey] = {}

    def __call__(self, kid: bytes) -> ed25519.Ed25519PublicKey | None:
        now = time.monotonic()
        if now - self._checked >= self.check_every_s or self._mtime is None:
            self._checked = now
            try:
                mtime = (self.store.path / "release").stat().st_mtime_ns
            except FileNotFoundError:
                mtime = None
            if mtime != self._mtime:
                self._keys = self.store.model_release_public_keys() if mtime is not None else {}
                self._mtime = mtime
        return self._keys.get(kid)


class DeviceRegistry:
    """Key id -> DeviceKey, reloaded when registry.json changes (so revocation needs no restart)."""

    def __init__(self, path: str | os.PathLike[str], check_every_s: float = 1.0):
        self.path = Path(path)
        self.check_every_s = check_every_s
        self._mtime: float | None = None
        self._checked = 0.0
        self._by_kid: dict[bytes, DeviceKey] = {}
        self._reload()

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._by_kid, self._mtime = {}, None
            return
        if st.st_mtime == self._mtime:
            return
        devices = json.loads(self.path.read_text())["devices"]
        by_kid = {}
        for camera_id, entries in devices.items():
            for e in entries:
                pub = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(e["public_key"]))
                by_kid[bytes.fromhex(e["key_id"])] = DeviceKey(camera_id, pub, e.get("status") == "revoked")
        self._by_kid, self._mtime = by_kid, st.st_mtime

    def __call__(self, kid: bytes) -> DeviceKey | None:
        now = time.monotonic()
        if now - self._checked >= self.check_every_s:
            self._checked = now
            self._reload()
        return self._by_kid.get(kid)
