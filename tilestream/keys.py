"""Key files, device bundles and the signed device registry (the I/O side of :mod:`tilestream.crypto`).

Custody: who holds what
-----------------------
A key directory (``keys_dir``; what processors read) holds::

    cloud/<kid>.key        cloud private key (HPKE), JSON {suite, raw key parts in base64}, mode 0600
    cloud/<kid>.pub        cloud public key, JSON {suite, raw key parts in base64} (what agents seal to)
    cloud/current          key id agents seal to now; older keys still open older frames
    tile/<kid>.key         AES-256 tile-job key shared by the cloud workers, base64, mode 0600
    tile/current           key id new tile jobs are sealed with; every tile/<kid>.key still opens jobs
    admin/<kid>.pub        a trusted admin (registry-signing) Ed25519 public key, JSON {suite, ed25519}
    admin/<kid>.key        the admin private key, PEM, mode 0600 -- only where devices are enrolled;
    admin/current          it can live elsewhere (``KeyStore(admin_dir=...)``, ``--admin-dir``)
    release/<kid>.key      model-release Ed25519 private key, PEM, mode 0600 (where models are published only)
    release/<kid>.pub      a trusted model-release public key, JSON {suite: "ed25519", ed25519: base64}
    release/current        key id `models publish` signs with now; older .pub files stay trusted
    registry.json          enrolled device PUBLIC keys and their status, signed by an admin key

A processor needs ``cloud/*.key``, ``tile/``, ``admin/*.pub`` and ``registry.json``: no device
private key is ever in the key directory, and the admin private key need not be either, so a
processor compromise opens frames but can neither forge a camera nor enrol one.

Device bundles: ``enroll`` makes a device key pair and writes everything the camera needs into
one JSON file, mode 0600, *outside* the key directory (default ``bundles/<camera>.bundle`` next
to it, ``bundle_dir``)::

    {"format": "tilestream-device-bundle/1", "camera_id": ..., "created_at": <unix s>,
     "device_key": {"key_id": <hex>, "ed25519": <raw private key, base64>},
     "cloud_keys": {"current": <kid>, "keys": {<kid>: <cloud/<kid>.pub JSON>}},
     "kafka": null}                  # broker credentials: filled by the ``broker_credentials`` hook

``kafka`` is the camera's own broker principal (``tilestream keys enroll --broker``), one of
``{"sasl_mechanism", "sasl_username", "sasl_password"}`` (SCRAM over TLS) or ``{"security_protocol":
"SSL", "principal", "ssl_certificate", "ssl_key"}`` (mutual TLS: PEM certificate chain and PKCS#8
key; :class:`kafkaio.Connection` loads them from memory and bounds them), or null.

The agent loads it with :class:`DeviceBundle` (``[agent] bundle``), which has the two methods
the agent uses from a :class:`KeyStore` (``cloud_public_key``, ``device_private_key``).

The registry (``registry.json``) is ``{"format": "tilestream-registry/2", "signed_by": <admin
kid>, "signature": <base64 Ed25519>, "body": <JSON text>}``; the signature covers
``REGISTRY_CONTEXT + body`` and the body is ``{"serial": n, "signed_at": <unix s>, "devices":
{camera: [{key_id, public_key, status, enrolled_at[, revoked_at]}]}}``. The serial grows with
every change so an older signed registry (one where a revoked key was still active) is refused
by a running processor. :class:`DeviceRegistry` refuses any registry that does not verify,
keeps the last good one, logs and counts the refusal; nothing in the file can crash it.

Private keys are never logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from tilestream.crypto import SUITE_NAMES, DeviceKey, key_id, key_id_of, raw_public
from tilestream.errors import ConfigError, Refused

log = logging.getLogger("tilestream.keys")


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


class DeviceKeys(Protocol):
    """What an edge agent needs: a :class:`DeviceBundle` on a camera (a :class:`KeyStore`, reading
    the bundles it wrote, on a one-machine setup)."""

    def cloud_public_key(self) -> tuple[bytes, int, object]: ...

    def device_private_key(self, camera_id: str) -> tuple[bytes, ed25519.Ed25519PrivateKey]: ...


class TileKeyMissing(ConfigError):
    """No tile-job key (or no current one): the processor refuses to run fan-out without it."""


class RegistryRefused(Refused, ValueError):
    """A registry.json that is not a valid signed registry; ``reason`` is its counted code."""


# Broker credentials for a device bundle: called with the camera id, returns what goes into
# bundle["kafka"] (e.g. a SCRAM user and password, or a client certificate and key in PEM).
BrokerCredentials = Callable[[str], Mapping]

BUNDLE_FORMAT = "tilestream-device-bundle/1"
REGISTRY_FORMAT = "tilestream-registry/2"
REGISTRY_CONTEXT = b"tilestream/registry/v2\x00"
# A registry of 100k cameras with two keys each is ~30 MB of JSON; beyond this it is hostile.
MAX_REGISTRY_BYTES = 64 * 1024 * 1024
MAX_BUNDLE_BYTES = 256 * 1024
_KID = re.compile(r"[0-9a-f]{16}")
# Camera ids name bundle files: no path separators, no leading dot, no control characters.
_CAMERA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+=-]{0,127}")


def check_camera_id(camera_id: str) -> str:
    if not isinstance(camera_id, str) or not _CAMERA_ID.fullmatch(camera_id):
        raise ValueError(f"camera id {camera_id!r}: 1..128 characters of A-Z a-z 0-9 . _ @ : + = -, "
                         "starting with a letter or digit")
    return camera_id


def default_bundle_path(keys_dir: str | os.PathLike[str], camera_id: str) -> Path:
    """Where ``enroll`` puts a camera's bundle by default: ``bundles/`` next to the key directory."""
    return Path(keys_dir).parent / "bundles" / f"{check_camera_id(camera_id)}.bundle"


def _cloud_public_from_json(kid: str, d: Mapping) -> tuple[bytes, int, object]:
    xpub = x25519.X25519PublicKey.from_public_bytes(base64.b64decode(d["x25519"], validate=True))
    if d["suite"] == "x25519":
        return bytes.fromhex(kid), SUITE_NAMES["x25519"], xpub
    if d["suite"] != "mlkem768-x25519":
        raise ValueError(f"unknown suite {d['suite']!r}")
    mpub = mlkem.MLKEM768PublicKey.from_public_bytes(base64.b64decode(d["mlkem768"], validate=True))
    return bytes.fromhex(kid), SUITE_NAMES[d["suite"]], hpke.MLKEM768X25519PublicKey(mpub, xpub)


def _ed25519_pub_json(key: ed25519.Ed25519PublicKey) -> bytes:
    return json.dumps({"suite": "ed25519", "ed25519": _b64(raw_public(key))}).encode()


def _read_ed25519_pub(path: Path, what: str) -> ed25519.Ed25519PublicKey:
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
        raise ValueError(f"{path} is not a tilestream {what} public key") from None


def _read_small(path: Path, limit: int) -> bytes:
    with open(path, "rb") as fh:
        blob = fh.read(limit + 1)
    if len(blob) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return blob


class KeyStore:
    """One key directory (see the module docstring), plus where this machine writes device bundles.

    ``bundle_dir``: where ``enroll`` writes bundles (default ``bundles/`` next to ``path``, never
    inside it); :meth:`device_private_key` reads them back, for one-machine setups and tests.
    ``admin_dir``: where the admin private key lives (default ``path/admin``); the trusted admin
    public keys are always ``path/admin/*.pub``.
    """

    def __init__(self, path: str | os.PathLike[str], *, bundle_dir: str | os.PathLike[str] | None = None,
                 admin_dir: str | os.PathLike[str] | None = None):
        self.path = Path(path)
        self.bundle_dir = Path(bundle_dir) if bundle_dir is not None else self.path.parent / "bundles"
        self.admin_dir = Path(admin_dir) if admin_dir is not None else self.path / "admin"
        if _inside(self.bundle_dir, self.path):
            raise ConfigError(f"device bundles ({self.bundle_dir}) must not be kept inside the key directory {self.path}")

    def init(self, suite: str = "x25519") -> dict[str, str]:
        """What ``tilestream keys init`` makes, each unless it exists: the cloud key, the admin key and
        the first tile-job key. Returns their ids ({"cloud", "admin", "tile"})."""
        cloud = self.init_cloud(suite)
        admin = self.init_admin()
        tile = self._current_or_none(self.path / "tile") or self.create_tile_key()
        return {"cloud": cloud, "admin": admin, "tile": tile}

    # -- cloud keys -------------------------------------------------------------------
    def init_cloud(self, suite: str = "x25519") -> str:
        """Create the cloud key pair unless one exists; returns the current key id (hex)."""
        current = self.path / "cloud" / "current"
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

    def _cloud_public_json(self) -> tuple[str, dict]:
        kid = self._current(self.path / "cloud", "no cloud key: run `tilestream keys init`")
        return kid, _load_key_file(self.path / "cloud" / f"{kid}.pub")

    def cloud_public_key(self) -> tuple[bytes, int, object]:
        """(key id, envelope suite id, public key object) of the current cloud key."""
        return _cloud_public_from_json(*self._cloud_public_json())

    def cloud_private_keys(self) -> dict[bytes, object]:
        keys: dict[bytes, object] = {}
        # tile-*.key: tile-job keys of versions before tile/ (not cloud HPKE keys)
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

    # -- tile-job keys ----------------------------------------------------------------
    # Every cloud worker must hold the same keys: a job sealed by one worker is opened by another.
    # So they are made by a command on one host and copied (the whole tile/ directory) to the
    # others, never made by a worker on its own; `current` names the key new jobs use.
    def create_tile_key(self, make_current: bool | None = None) -> str:
        """Add a new AES-256 tile-job key; it becomes current if asked, or if there is no current key.

        Rolling a new key over several hosts without refused jobs: ``create`` on one host, copy
        ``tile/`` to every worker and restart them (they all open both keys), then ``rotate KID``
        everywhere; ``remove`` the old key once no job sealed with it can still be in flight.
        """
        tdir = self.path / "tile"
        key = os.urandom(32)
        kid = _tile_kid(key)
        _write(tdir / f"{kid}.key", base64.b64encode(key), 0o600)
        if make_current or (make_current is None and self._current_or_none(tdir) is None):
            _write(tdir / "current", kid.encode(), 0o644)
        return kid

    def rotate_tile_key(self, kid: str | None = None) -> str:
        """Make ``kid`` (a key already here) current, or without ``kid`` a new key. Older keys stay
        and still open in-flight jobs until :meth:`remove_tile_key`."""
        if kid is None:
            return self.create_tile_key(make_current=True)
        keys = self._tile_key_files()
        if kid not in keys:
            raise KeyError(f"no tile-job key {kid!r} in {self.path / 'tile'}")
        _write(self.path / "tile" / "current", kid.encode(), 0o644)
        return kid

    def remove_tile_key(self, kid: str) -> None:
        """Delete tile-job key ``kid`` (never the current one): jobs sealed with it no longer open."""
        if kid == self._current_or_none(self.path / "tile"):
            raise ValueError(f"tile-job key {kid} is the current one: `tilestream keys tile-key rotate` first")
        path = self._tile_key_files().get(kid)
        if path is None:
            raise KeyError(f"no tile-job key {kid!r} in {self.path / 'tile'}")
        path.unlink()

    def list_tile_keys(self) -> list[dict]:
        """[{key_id, current, created_at}] of the tile-job keys here (no key material)."""
        current = self._current_or_none(self.path / "tile")
        return [{"key_id": kid, "current": kid == current, "created_at": int(f.stat().st_mtime)}
                for kid, f in sorted(self._tile_key_files().items())]

    def tile_keys(self) -> tuple[str, dict[str, bytes]]:
        """(current id, all keys) of the tile-job keys; :class:`TileKeyMissing` if there is none."""
        tdir = self.path / "tile"
        current = self._current_or_none(tdir)
        if current is None:
            raise TileKeyMissing(f"no tile-job key in {tdir}: create one with `tilestream keys tile-key create` "
                                 "on one host and copy that directory to every processor host (workers must share it)")
        keys = {}
        for kid, f in self._tile_key_files().items():
            try:
                key = base64.b64decode(_read_small(f, 256), validate=True)
            except ValueError:
                raise ConfigError(f"{f} is not a tile-job key (base64 of 32 bytes)") from None
            if len(key) != 32 or _tile_kid(key) != kid:
                raise ConfigError(f"{f} does not hold tile-job key {kid} (damaged or renamed)")
            keys[kid] = key
        if current not in keys:
            raise TileKeyMissing(f"{tdir / 'current'} names tile-job key {current!r}, which is not in {tdir}")
        return current, keys

    def _tile_key_files(self) -> dict[str, Path]:
        return {f.stem: f for f in (self.path / "tile").glob("*.key") if _KID.fullmatch(f.stem)}

    # -- admin key: signs the device registry -------------------------------------------
    def init_admin(self) -> str:
        """Create the admin (registry-signing) key pair unless one exists; returns its key id."""
        existing = self._current_or_none(self.admin_dir)
        if existing is not None:
            return existing
        private = ed25519.Ed25519PrivateKey.generate()
        kid = key_id(private.public_key()).hex()
        _write(self.admin_dir / f"{kid}.key", _private_pem(private), 0o600)
        _write(self.admin_dir / "current", kid.encode(), 0o644)
        _write(self.admin_dir / f"{kid}.pub", _ed25519_pub_json(private.public_key()), 0o644)
        _write(self.path / "admin" / f"{kid}.pub", _ed25519_pub_json(private.public_key()), 0o644)
        if not self.registry_path.exists():
            self._save_registry({}, 0)  # an empty signed registry: processors start with a verified one
        return kid

    def trust_admin(self, pub_file: str | os.PathLike[str]) -> str:
        """Trust an admin public key file (``admin/<kid>.pub`` of the enrolling machine)."""
        key = _read_ed25519_pub(Path(pub_file), "admin")
        kid = key_id(key).hex()
        _write(self.path / "admin" / f"{kid}.pub", _ed25519_pub_json(key), 0o644)
        return kid

    def admin_public_keys(self) -> dict[bytes, ed25519.Ed25519PublicKey]:
        """The trusted admin public keys (``admin/*.pub`` of the key directory): key id -> key."""
        keys = {}
        for f in sorted((self.path / "admin").glob("*.pub"))[:MAX_RELEASE_KEYS]:
            try:
                key = _read_ed25519_pub(f, "admin")
            except (OSError, ValueError) as exc:
                log.error(json.dumps({"event": "admin_key_unreadable", "path": str(f), "error": str(exc)}))
                continue
            if key_id(key).hex() == f.stem:  # a file named for another key is ignored
                keys[bytes.fromhex(f.stem)] = key
        return keys

    def _admin_private_key(self) -> tuple[str, ed25519.Ed25519PrivateKey]:
        kid = self._current(self.admin_dir, "no admin key here: the registry is signed where devices are enrolled "
                                            "(`tilestream keys init`, or --admin-dir where the admin key is kept)")
        key = serialization.load_pem_private_key((self.admin_dir / f"{kid}.key").read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey) or key_id(key.public_key()).hex() != kid:
            raise ValueError(f"{self.admin_dir / (kid + '.key')} is not the Ed25519 admin key {kid}")
        return kid, key

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
    def enroll(self, camera_id: str, out: str | os.PathLike[str] | None = None,
               broker_credentials: BrokerCredentials | None = None) -> str:
        """Create a device key pair for ``camera_id``: its public key goes into the signed registry,
        its private key only into the device bundle (``out``, default :meth:`bundle_path`).
        Enrolling a camera again is a device key rotation (the bundle is replaced). Returns the key id.

        ``broker_credentials(camera_id)`` fills ``bundle["kafka"]`` (None without it).
        """
        check_camera_id(camera_id)
        out = Path(out) if out is not None else self.bundle_path(camera_id)
        if _inside(out, self.path):
            raise ValueError(f"a device bundle ({out}) must not be written into the key directory {self.path}")
        serial, reg = self._registry()  # before anything is written: an unverifiable registry is not extended
        private = ed25519.Ed25519PrivateKey.generate()
        kid = key_id(private.public_key()).hex()
        cloud_kid, cloud_pub = self._cloud_public_json()
        bundle = {
            "format": BUNDLE_FORMAT,
            "camera_id": camera_id,
            "created_at": int(time.time()),
            "device_key": {"key_id": kid, "ed25519": _b64(private.private_bytes_raw())},
            "cloud_keys": {"current": cloud_kid, "keys": {cloud_kid: cloud_pub}},
            "kafka": dict(broker_credentials(camera_id)) if broker_credentials is not None else None,
        }
        _write(out, json.dumps(bundle, indent=2, sort_keys=True).encode(), 0o600)
        reg.setdefault(camera_id, []).append(
            {
                "key_id": kid,
                "public_key": _b64(raw_public(private.public_key())),
                "status": "active",
                "enrolled_at": int(time.time()),
            }
        )
        self._save_registry(reg, serial)
        return kid

    def bundle_path(self, camera_id: str) -> Path:
        return self.bundle_dir / f"{check_camera_id(camera_id)}.bundle"

    def revoke(self, camera_id: str, kid: str | None = None) -> list[str]:
        """Revoke one key of a device, or all of them; returns the revoked key ids."""
        serial, reg = self._registry()
        if camera_id not in reg:
            raise KeyError(f"device {camera_id!r} is not enrolled")
        revoked = []
        for entry in reg[camera_id]:
            if kid is None or entry["key_id"] == kid:
                entry["status"] = "revoked"
                entry["revoked_at"] = int(time.time())
                revoked.append(entry["key_id"])
        self._save_registry(reg, serial)
        return revoked

    def devices(self) -> dict[str, list[dict]]:
        """The verified registry's devices (camera -> key entries)."""
        return self._registry()[1]

    def device_bundle(self, camera_id: str) -> "DeviceBundle":
        return DeviceBundle.load(self.bundle_path(camera_id))

    def device_private_key(self, camera_id: str) -> tuple[bytes, ed25519.Ed25519PrivateKey]:
        """The device key from the camera's bundle in ``bundle_dir`` (one-machine setups, tests)."""
        path = self.bundle_path(camera_id)
        if not path.exists():
            raise FileNotFoundError(f"device {camera_id!r} has no bundle at {path}: run "
                                    f"`tilestream keys enroll {camera_id}` (device keys are never in the key directory)")
        return DeviceBundle.load(path).device_private_key(camera_id)

    @property
    def registry_path(self) -> Path:
        return self.path / "registry.json"

    def device_registry(self, check_every_s: float = 1.0, metrics=None) -> "DeviceRegistry":
        """The processor's view of the registry: verified against ``admin/*.pub``, reloaded on change."""
        return DeviceRegistry(self.registry_path, self.admin_public_keys(), check_every_s, metrics=metrics)

    def sign_registry(self) -> int:
        """Sign the registry as it is now, whatever its signature (an unsigned registry of an older
        version, or after checking a refused one by hand). Returns the number of devices."""
        try:
            blob = _read_small(self.registry_path, MAX_REGISTRY_BYTES)
        except FileNotFoundError:
            blob = b'{"devices": {}}'
        try:
            d = json.loads(blob)
            if isinstance(d, dict) and d.get("format") == REGISTRY_FORMAT:
                d = json.loads(d["body"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryRefused("malformed", f"{self.registry_path}: {exc}") from None
        devices = _check_devices(d.get("devices") if isinstance(d, dict) else None)
        serial = d.get("serial", 0)
        self._save_registry(devices, serial if isinstance(serial, int) and serial >= 0 else 0)
        return len(devices)

    def _current(self, d: Path, missing: str) -> str:
        try:
            return (d / "current").read_text().strip()
        except FileNotFoundError:
            raise FileNotFoundError(f"{missing} (looked in {d})") from None

    @staticmethod
    def _current_or_none(d: Path) -> str | None:
        try:
            kid = (d / "current").read_text().strip()
        except FileNotFoundError:
            return None
        return kid if _KID.fullmatch(kid) else None

    def _registry(self) -> tuple[int, dict[str, list[dict]]]:
        """(serial, devices) of the verified registry, (0, {}) if there is none; RegistryRefused if
        it does not verify (it is then never extended or re-signed by accident)."""
        try:
            blob = _read_small(self.registry_path, MAX_REGISTRY_BYTES)
        except FileNotFoundError:
            return 0, {}
        return verify_registry(blob, self.admin_public_keys())

    def _save_registry(self, devices: dict[str, list[dict]], serial: int) -> None:
        """Sign and write ``devices`` as the registry after ``serial``."""
        admin_kid, admin = self._admin_private_key()
        body = json.dumps({"serial": serial + 1, "signed_at": int(time.time()), "devices": devices},
                          indent=1, sort_keys=True)
        doc = {"format": REGISTRY_FORMAT, "signed_by": admin_kid,
               "signature": _b64(admin.sign(REGISTRY_CONTEXT + body.encode())), "body": body}
        _write(self.registry_path, json.dumps(doc, indent=1).encode(), 0o644)


def _tile_kid(key: bytes) -> str:
    return hashlib.sha256(b"tilestream/tile-key/" + key).hexdigest()[:16]


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def _check_devices(devices: object) -> dict[str, list[dict]]:
    """Bound and type-check the registry's device map; RegistryRefused("malformed") otherwise."""
    if not isinstance(devices, dict):
        raise RegistryRefused("malformed", "registry has no device map")
    for camera_id, entries in devices.items():
        if not isinstance(camera_id, str) or not _CAMERA_ID.fullmatch(camera_id) or not isinstance(entries, list):
            raise RegistryRefused("malformed", f"registry: bad device {str(camera_id)[:80]!r}")
        for e in entries:
            if (not isinstance(e, dict) or not isinstance(e.get("key_id"), str) or not _KID.fullmatch(e["key_id"])
                    or not isinstance(e.get("public_key"), str) or len(e["public_key"]) != 44
                    or e.get("status") not in ("active", "revoked")):
                raise RegistryRefused("malformed", f"registry: bad key entry of {camera_id!r}")
            try:
                if len(base64.b64decode(e["public_key"], validate=True)) != 32:
                    raise ValueError
            except ValueError:
                raise RegistryRefused("malformed", f"registry: bad public key of {camera_id!r}") from None
    return devices


def verify_registry(blob: bytes, admin_keys: Mapping[bytes, ed25519.Ed25519PublicKey]
                    ) -> tuple[int, dict[str, list[dict]]]:
    """(serial, devices) of a signed registry; :class:`RegistryRefused` (reason ``malformed``,
    ``unsigned``, ``unknown_admin_key`` or ``bad_signature``) if it is not one signed by a trusted admin key."""
    try:
        doc = json.loads(blob)
    except ValueError:
        raise RegistryRefused("malformed", "registry is not JSON") from None
    if not isinstance(doc, dict):
        raise RegistryRefused("malformed", "registry is not a JSON object")
    if doc.get("format") != REGISTRY_FORMAT:
        if "devices" in doc:
            raise RegistryRefused("unsigned", "registry is not signed (made by an older version?): check it, then "
                                              "`tilestream keys sign-registry` where the admin key is")
        raise RegistryRefused("malformed", f"registry format {str(doc.get('format'))[:40]!r}")
    body, signed_by, signature = doc.get("body"), doc.get("signed_by"), doc.get("signature")
    if not (isinstance(body, str) and isinstance(signed_by, str) and isinstance(signature, str)
            and _KID.fullmatch(signed_by)):
        raise RegistryRefused("malformed", "registry: body, signed_by or signature missing")
    key = admin_keys.get(bytes.fromhex(signed_by))
    if key is None:
        raise RegistryRefused("unknown_admin_key", f"registry is signed by admin key {signed_by}, which is not trusted here")
    try:
        key.verify(base64.b64decode(signature, validate=True), REGISTRY_CONTEXT + body.encode())
    except (InvalidSignature, ValueError):
        raise RegistryRefused("bad_signature", f"registry signature by admin key {signed_by} does not verify") from None
    try:
        inner = json.loads(body)
    except ValueError:
        raise RegistryRefused("malformed", "registry body is not JSON") from None
    serial = inner.get("serial") if isinstance(inner, dict) else None
    if not isinstance(serial, int) or isinstance(serial, bool) or serial < 0:
        raise RegistryRefused("malformed", "registry body has no serial")
    return serial, _check_devices(inner.get("devices"))


class DeviceBundle:
    """A camera's keys, loaded from its bundle file: what the agent needs and nothing more.

    Has the two methods the agent calls on a :class:`KeyStore`, so either can be given to it.
    """

    def __init__(self, path: Path, camera_id: str, device_kid: str, device_key: ed25519.Ed25519PrivateKey,
                 cloud_kid: str, cloud_key: dict, kafka: dict | None):
        self.path, self.camera_id, self.kafka = path, camera_id, kafka
        self._device = (bytes.fromhex(device_kid), device_key)
        self._cloud = _cloud_public_from_json(cloud_kid, cloud_key)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "DeviceBundle":
        path = Path(path)
        st = path.stat()
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise ConfigError(f"device bundle {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                              f"`chmod 600 {path}`; it holds the camera's private key")
        try:
            d = json.loads(_read_small(path, MAX_BUNDLE_BYTES))
            if d.get("format") != BUNDLE_FORMAT:
                raise ValueError(f"format {str(d.get('format'))[:40]!r}")
            camera_id = check_camera_id(d["camera_id"])
            dk = d["device_key"]
            key = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(dk["ed25519"], validate=True))
            if key_id(key.public_key()).hex() != dk["key_id"]:
                raise ValueError("device key id does not match the key")
            cloud_kid = d["cloud_keys"]["current"]
            cloud = d["cloud_keys"]["keys"][cloud_kid]
            _cloud_public_from_json(cloud_kid, cloud)  # checked here, not at the first frame
            kafka = d.get("kafka")
            if kafka is not None and not isinstance(kafka, dict):
                raise ValueError("kafka is not an object")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path} is not a tilestream device bundle ({exc})") from None
        return cls(path, camera_id, dk["key_id"], key, cloud_kid, cloud, kafka)

    def cloud_public_key(self) -> tuple[bytes, int, object]:
        return self._cloud

    def device_private_key(self, camera_id: str) -> tuple[bytes, ed25519.Ed25519PrivateKey]:
        if camera_id != self.camera_id:
            raise ConfigError(f"device bundle {self.path} is for camera {self.camera_id!r}, not {camera_id!r}")
        return self._device


MAX_RELEASE_KEYS = 64
_RELEASE_KID = _KID


def _release_pub_json(key: ed25519.Ed25519PublicKey) -> bytes:
    return _ed25519_pub_json(key)


def _read_release_pub(path: Path) -> ed25519.Ed25519PublicKey:
    return _read_ed25519_pub(path, "release")


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
    """Key id -> DeviceKey from the signed registry, reloaded when registry.json changes (so
    revocation needs no restart).

    A registry that does not verify against the trusted admin keys, is malformed, or is older
    (lower serial) than the one in use is refused: the last good one stays in use, the refusal is
    logged and counted (``refused[reason]``, and ``registry_refused_total{reason}`` in ``metrics``
    if given). A missing or unreadable file never raises: until a good registry was loaded no
    device is known. ``admin_keys`` None: the trusted keys of the key directory holding the
    registry (``admin/*.pub`` next to it), read once.
    """

    def __init__(self, path: str | os.PathLike[str], admin_keys: Mapping[bytes, ed25519.Ed25519PublicKey] | None = None,
                 check_every_s: float = 1.0, *, metrics=None):
        self.path = Path(path)
        if admin_keys is None:
            admin_keys = KeyStore(self.path.parent).admin_public_keys()
        self.admin_keys = dict(admin_keys)
        self.check_every_s = check_every_s
        self.metrics = metrics
        self.refused: Counter[str] = Counter()
        self.serial = -1  # of the registry in use; -1: none yet
        self._seen: tuple | None = None  # (mtime_ns, size, inode) of the file last looked at
        self._checked = 0.0
        self._by_kid: dict[bytes, DeviceKey] = {}
        if not self.admin_keys:
            log.error(json.dumps({"event": "registry_no_admin_key", "path": str(self.path),
                                  "error": "no trusted admin public key (admin/*.pub): every registry is refused"}))
        self._reload()

    def _refuse(self, reason: str, message: str) -> None:
        self.refused[reason] += 1
        if self.metrics is not None:
            self.metrics.inc("registry_refused_total", reason=reason)
        log.error(json.dumps({"event": "registry_refused", "path": str(self.path), "reason": reason, "error": message,
                              "keeping_serial": self.serial}))

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self._seen != ("missing",):
                self._seen = ("missing",)
                self._refuse("missing", "no registry file (keeping the last good registry, if any)")
            return
        except OSError as exc:
            self._seen = None
            self._refuse("unreadable", str(exc))
            return
        seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            serial, devices = verify_registry(_read_small(self.path, MAX_REGISTRY_BYTES), self.admin_keys)
            if serial < self.serial:
                raise RegistryRefused("rollback", f"registry serial {serial} is older than the one in use ({self.serial})")
            by_kid = {}
            for camera_id, entries in devices.items():
                for e in entries:
                    try:
                        pub = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(e["public_key"], validate=True))
                    except ValueError:
                        raise RegistryRefused("malformed", f"registry: bad public key of {camera_id!r}") from None
                    by_kid[bytes.fromhex(e["key_id"])] = DeviceKey(camera_id, pub, e["status"] == "revoked")
        except RegistryRefused as exc:
            self._refuse(exc.reason, str(exc))
            return
        except (OSError, ValueError) as exc:  # vanished or too large between stat and read
            self._refuse("unreadable", str(exc))
            return
        self._by_kid, self.serial = by_kid, serial
        log.info(json.dumps({"event": "registry_loaded", "path": str(self.path), "serial": serial,
                             "device_keys": len(by_kid)}))

    def __call__(self, kid: bytes) -> DeviceKey | None:
        now = time.monotonic()
        if now - self._checked >= self.check_every_s:
            self._checked = now
            self._reload()
        return self._by_kid.get(kid)
