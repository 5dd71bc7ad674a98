"""Key custody (tilestream/keys.py): who holds which key.

Device private keys exist only in device bundles (never in the cloud key directory); the device
registry is signed by an admin key and a processor refuses any registry that does not verify
(keeping the last good one, never crashing); the tile-job key is made, rotated and removed by
command, with an explicit ``current``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tilestream import crypto
from tilestream.config import FeatureConfig, Settings
from tilestream.envelope import FrameHeader
from tilestream.errors import ConfigError
from tilestream.keys import (BUNDLE_FORMAT, DeviceBundle, DeviceRegistry, KeyStore, RegistryRefused, TileKeyMissing,
                             verify_registry)
from tilestream.metrics import Metrics

IMAGE = b"\xff\xd8 not really a jpeg"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _seal(keys, camera: str, seq: int = 1) -> bytes:
    ckid, suite, cloud_pub = keys.cloud_public_key()
    dkid, dev = keys.device_private_key(camera)
    h = FrameHeader(camera, seq, 1, 640, 480, "jpeg", ckid, dkid, suite=suite)
    return crypto.seal_frame(IMAGE, h, cloud_pub, dev)


# -- device bundles: the device key never lives in the key directory --------------------------
def test_key_directory_holds_no_device_private_key_and_every_private_key_is_0600(keystore):
    bundle = keystore.bundle_path("cam-test")
    raw = base64.b64decode(json.loads(bundle.read_text())["device_key"]["ed25519"])
    assert not (keystore.path / "devices").exists()
    assert not bundle.resolve().is_relative_to(keystore.path.resolve())
    privates = sorted(p.relative_to(keystore.path).parts[0] for p in keystore.path.rglob("*.key"))
    assert privates == ["admin", "cloud", "release", "results", "stage", "tile"]
    for p in keystore.path.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert raw not in data and base64.b64encode(raw) not in data, f"{p} holds the device private key"
            if p.suffix == ".key":
                assert _mode(p) == 0o600, p
    assert _mode(bundle) == 0o600


def test_the_bundle_holds_what_the_camera_needs_and_seals_frames_the_processor_opens(keystore):
    bundle_file = keystore.bundle_path("cam-test")
    d = json.loads(bundle_file.read_text())
    assert d["format"] == BUNDLE_FORMAT and d["camera_id"] == "cam-test" and d["kafka"] is None
    ckid = keystore.cloud_public_key()[0].hex()
    assert d["cloud_keys"]["current"] == ckid and set(d["cloud_keys"]["keys"]) == {ckid}
    assert "x25519" in d["cloud_keys"]["keys"][ckid] and set(d["cloud_keys"]["keys"][ckid]) <= {"suite", "x25519", "mlkem768"}
    reg = keystore.devices()["cam-test"]
    assert [e["key_id"] for e in reg] == [d["device_key"]["key_id"]]
    assert set(reg[0]) == {"key_id", "public_key", "status", "enrolled_at"}  # public only

    bundle = DeviceBundle.load(bundle_file)
    blob = _seal(bundle, "cam-test")
    header, image = crypto.open_frame(blob, keystore.cloud_private_keys(), keystore.device_registry(check_every_s=0))
    assert (header.camera_id, image) == ("cam-test", IMAGE)
    with pytest.raises(ConfigError, match="not 'cam-other'"):
        bundle.device_private_key("cam-other")


def test_the_broker_credential_hook_fills_the_kafka_field(keystore, tmp_path):
    out = tmp_path / "cam-k.bundle"
    keystore.enroll("cam-k", out, broker_credentials=lambda cam: {"sasl_username": cam, "sasl_password": "s3cret"})
    assert json.loads(out.read_text())["kafka"] == {"sasl_username": "cam-k", "sasl_password": "s3cret"}
    assert DeviceBundle.load(out).kafka["sasl_username"] == "cam-k"


def test_bundles_are_refused_inside_the_key_dir_readable_by_others_or_damaged(keystore, tmp_path):
    with pytest.raises(ValueError, match="must not be written into the key directory"):
        keystore.enroll("cam-x", keystore.path / "cam-x.bundle")
    with pytest.raises(ConfigError):
        KeyStore(keystore.path, bundle_dir=keystore.path / "bundles")
    with pytest.raises(ValueError):
        keystore.enroll("../escape")
    loose = tmp_path / "loose.bundle"
    shutil.copy(keystore.bundle_path("cam-test"), loose)
    os.chmod(loose, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        DeviceBundle.load(loose)
    os.chmod(loose, 0o600)
    d = json.loads(loose.read_text())
    d["device_key"]["key_id"] = "00" * 8
    loose.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="not a tilestream device bundle"):
        DeviceBundle.load(loose)
    loose.write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match="not a tilestream device bundle"):
        DeviceBundle.load(loose)


def test_the_admin_private_key_can_live_apart_from_the_processors_key_dir(tmp_path):
    keys, admin = tmp_path / "keys", tmp_path / "offline-admin"
    provisioning = KeyStore(keys, admin_dir=admin)
    provisioning.init()
    provisioning.enroll("cam-a")
    assert list((keys / "admin").glob("*.key")) == [] and len(list(admin.glob("*.key"))) == 1
    processor_side = KeyStore(keys)
    registry = processor_side.device_registry(check_every_s=0)
    assert registry.serial >= 1 and not registry.refused
    assert crypto.open_frame(_seal(provisioning, "cam-a"), processor_side.cloud_private_keys(), registry)[1] == IMAGE
    with pytest.raises(FileNotFoundError, match="no admin key here"):
        processor_side.enroll("cam-b")  # the processor side cannot enrol a camera


# -- the signed registry ------------------------------------------------------------------------
def _doc(store: KeyStore) -> dict:
    return json.loads(store.registry_path.read_text())


def _write_doc(store: KeyStore, doc: dict) -> None:
    tmp = store.registry_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, store.registry_path)  # a new inode: the registry notices the change


def test_a_tampered_registry_is_refused_and_the_last_good_one_kept(keystore, caplog):
    dkid = keystore.device_private_key("cam-test")[0]
    keystore.revoke("cam-test")
    metrics = Metrics("test")
    registry = keystore.device_registry(check_every_s=0, metrics=metrics)
    assert registry(dkid).revoked
    # An attacker re-activates the revoked key by editing the body and keeping the signature.
    doc = _doc(keystore)
    body = json.loads(doc["body"])
    body["devices"]["cam-test"][0]["status"] = "active"
    doc["body"] = json.dumps(body)
    _write_doc(keystore, doc)
    with caplog.at_level(logging.ERROR, logger="tilestream.keys"):
        assert registry(dkid).revoked  # the last good registry is still in use
    assert registry.refused["bad_signature"] == 1
    assert metrics.counter("registry_refused_total", reason="bad_signature") == 1
    assert any("registry_refused" in r.getMessage() for r in caplog.records)
    with pytest.raises(RegistryRefused) as exc:
        keystore.enroll("cam-new")  # the admin side does not extend (and so re-sign) a tampered registry
    assert exc.value.reason == "bad_signature"
    # Signed by another admin key: not trusted here.
    stranger = KeyStore(keystore.path.parent / "stranger", bundle_dir=keystore.path.parent / "stranger-bundles")
    stranger.init()
    stranger.enroll("cam-test")
    shutil.copy(stranger.registry_path, keystore.registry_path)
    assert registry(dkid).revoked and registry.refused["unknown_admin_key"] == 1
    assert registry(stranger.device_private_key("cam-test")[0]) is None


def test_an_older_signed_registry_is_refused_as_a_rollback(keystore, tmp_path):
    dkid = keystore.device_private_key("cam-test")[0]
    before = tmp_path / "registry-before-revocation.json"
    shutil.copy(keystore.registry_path, before)
    keystore.revoke("cam-test")
    registry = keystore.device_registry(check_every_s=0)
    assert registry(dkid).revoked
    shutil.copy(before, keystore.registry_path)  # validly signed, but it predates the revocation
    assert registry(dkid).revoked and registry.refused["rollback"] == 1


def test_an_unsigned_registry_is_refused_until_the_admin_signs_it(keystore):
    dkid = keystore.device_private_key("cam-test")[0]
    devices = keystore.devices()
    _write_doc(keystore, {"devices": devices})  # the format of older versions
    registry = DeviceRegistry(keystore.registry_path, check_every_s=0)
    assert registry(dkid) is None and registry.refused["unsigned"] == 1
    assert keystore.sign_registry() == 1
    assert registry(dkid).camera_id == "cam-test"


BROKEN = [b"", b"{", b"\x00\xff\xfe", b"[]", b"null", b'{"format": "tilestream-registry/2"}',
          b'{"format": "tilestream-registry/2", "body": 5, "signed_by": "x", "signature": "y"}',
          b'{"format": "tilestream-registry/2", "body": "{}", "signed_by": "0011223344556677", "signature": "!!"}',
          b'{"devices": {"cam": [{"key_id": 1e400}]}}', b" " * 1000]


def test_a_broken_or_missing_registry_never_crashes_the_processor(keystore):
    dkid = keystore.device_private_key("cam-test")[0]
    good = keystore.registry_path.read_bytes()
    registry = keystore.device_registry(check_every_s=0)
    for blob in BROKEN:
        keystore.registry_path.unlink()
        keystore.registry_path.write_bytes(blob)
        assert registry(dkid).camera_id == "cam-test", blob  # last good kept
        assert DeviceRegistry(keystore.registry_path, check_every_s=0)(dkid) is None, blob  # a fresh start: none
    keystore.registry_path.unlink()
    assert registry(dkid).camera_id == "cam-test" and registry.refused["missing"] == 1
    keystore.registry_path.mkdir()  # not even a file
    assert registry(dkid).camera_id == "cam-test"
    keystore.registry_path.rmdir()
    keystore.registry_path.write_bytes(good)
    assert registry(dkid).camera_id == "cam-test"
    assert sum(registry.refused.values()) >= len(BROKEN) + 2


def test_a_signed_registry_with_hostile_entries_is_refused(keystore):
    """Even a registry the admin key signed is bounded: a bad entry refuses it, it does not crash."""
    dkid = keystore.device_private_key("cam-test")[0]
    registry = keystore.device_registry(check_every_s=0)
    admin_kid, admin = keystore._admin_private_key()
    hostile = [{"../x": []}, {"cam": "x"}, {"cam": [{"key_id": "zz", "public_key": "", "status": "active"}]},
               {"cam": [{"key_id": "00" * 8, "public_key": "AAAA", "status": "active"}]},
               {"cam": [{"key_id": "00" * 8, "public_key": "A" * 44, "status": "active"}]},
               {"cam": [{"key_id": "00" * 8, "public_key": base64.b64encode(bytes(32)).decode(), "status": "??"}]}]
    for devices in hostile:
        body = json.dumps({"serial": 99, "devices": devices})
        doc = {"format": "tilestream-registry/2", "signed_by": admin_kid,
               "signature": base64.b64encode(admin.sign(b"tilestream/registry/v2\x00" + body.encode())).decode(),
               "body": body}
        with pytest.raises(RegistryRefused) as exc:
            verify_registry(json.dumps(doc).encode(), keystore.admin_public_keys())
        assert exc.value.reason == "malformed", devices
        _write_doc(keystore, doc)
        assert registry(dkid).camera_id == "cam-test"
    assert registry.refused["malformed"] == len(hostile)


# -- tile-job keys ------------------------------------------------------------------------------
def _job(store: KeyStore) -> bytes:
    from stream_processor import tilejobs

    kid, keys = store.tile_keys()
    header = FrameHeader("cam-test", 1, 1, 128, 64, "jpeg", b"\0" * 8, b"\0" * 8)
    gray = np.zeros((64, 128), np.uint8)
    return tilejobs.make_jobs(header, gray, FeatureConfig(), 1, kid, keys[kid])[0][1]


def _opens(record: bytes, store: KeyStore) -> bool:
    from stream_processor import tilejobs

    try:
        tilejobs.open_job(record, store.tile_keys()[1])
        return True
    except crypto.FrameRejected as exc:
        assert exc.reason == "decrypt_failed"
        return False


def test_tile_key_lifecycle_create_rotate_remove(tmp_path):
    store = KeyStore(tmp_path / "keys")
    store.init_cloud()
    with pytest.raises(TileKeyMissing, match="tile-key create"):
        store.tile_keys()  # never made silently
    assert not (store.path / "tile").exists()
    first = store.create_tile_key()
    assert store.tile_keys()[0] == first and _mode(store.path / "tile" / f"{first}.key") == 0o600
    old_job = _job(store)
    second = store.create_tile_key()  # added, not current: distribute it first
    assert store.tile_keys()[0] == first
    assert [(k["key_id"], k["current"]) for k in store.list_tile_keys()] == sorted([(first, True), (second, False)])
    os.utime(store.path / "tile" / f"{second}.key", (2**31, 2**31))  # newest by mtime does not matter
    assert store.tile_keys()[0] == first
    assert store.rotate_tile_key(second) == second and store.tile_keys()[0] == second
    assert _opens(old_job, store)  # in-flight jobs of the old key still open
    with pytest.raises(ValueError, match="current"):
        store.remove_tile_key(second)
    store.remove_tile_key(first)
    assert not _opens(old_job, store)  # removed: its jobs no longer open
    third = store.rotate_tile_key()  # a new key, current at once
    assert store.tile_keys()[0] == third and set(store.tile_keys()[1]) == {second, third}
    with pytest.raises(KeyError):
        store.rotate_tile_key("0" * 16)


def test_a_damaged_tile_key_or_current_is_a_clear_error(tmp_path):
    store = KeyStore(tmp_path / "keys")
    kid = store.create_tile_key()
    (store.path / "tile" / f"{kid}.key").write_bytes(base64.b64encode(os.urandom(32)))
    with pytest.raises(ConfigError, match="damaged or renamed"):
        store.tile_keys()
    (store.path / "tile" / f"{kid}.key").unlink()
    with pytest.raises(TileKeyMissing, match="not in"):
        store.tile_keys()


def test_the_processor_refuses_to_start_without_a_tile_key(tmp_path):
    from stream_processor.app import create_app

    store = KeyStore(tmp_path / "keys")
    store.init_cloud()
    store.init_admin()
    settings = Settings(keys_dir=str(store.path))
    with pytest.raises(TileKeyMissing, match="tilestream keys tile-key create"):
        create_app(settings, "127.0.0.1:9", tmp_path / "faust", web_port=0)
    assert not (store.path / "tile").exists()


# -- the command line ---------------------------------------------------------------------------
def _cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TILESTREAM_KEYS_DIR=str(tmp_path / "keys"), TILESTREAM_HOME=str(tmp_path / "home"))
    return subprocess.run([sys.executable, "-m", "tilestream_cli", *argv], env=env, capture_output=True, text=True,
                          timeout=120)


def test_keys_commands_end_to_end(tmp_path):
    assert _cli(tmp_path, "keys", "init").returncode == 0
    out = _cli(tmp_path, "keys", "enroll", "cam-cli")
    assert out.returncode == 0, out.stderr
    bundle = tmp_path / "bundles" / "cam-cli.bundle"
    assert bundle.exists() and _mode(bundle) == 0o600 and str(bundle) in out.stdout
    again = _cli(tmp_path, "keys", "enroll", "cam-cli")
    assert again.returncode == 2 and "rotate-device" in again.stderr  # a bundle is not overwritten silently
    assert _cli(tmp_path, "keys", "rotate-device", "cam-cli").returncode == 0
    listed = json.loads(_cli(tmp_path, "keys", "list").stdout)
    assert len(listed["cam-cli"]) == 2 and all("public_key" in e for e in listed["cam-cli"])
    tiles = _cli(tmp_path, "keys", "tile-key", "list").stdout.split("\n")
    current = [line.split()[0] for line in tiles if line.endswith("current")]
    assert len(current) == 1
    created = _cli(tmp_path, "keys", "tile-key", "create")
    assert created.returncode == 0 and "current is still" in created.stdout
    new = created.stdout.split()[2]
    assert _cli(tmp_path, "keys", "tile-key", "remove", "--key-id", current[0]).returncode == 2  # current
    assert _cli(tmp_path, "keys", "tile-key", "rotate", "--key-id", new).returncode == 0
    assert _cli(tmp_path, "keys", "tile-key", "remove", "--key-id", current[0]).returncode == 0
    assert _cli(tmp_path, "keys", "tile-key", "list").stdout.split() == [new, "current"]
    # The agent takes its keys from the bundle only, and says so when there is none.
    out = _cli(tmp_path, "agent", "--source", str(tmp_path), "--camera-id", "cam-none")
    assert out.returncode == 2 and "no device bundle" in out.stderr and "keys enroll cam-none" in out.stderr
    os.chmod(bundle, 0o640)
    out = _cli(tmp_path, "agent", "--source", str(tmp_path), "--camera-id", "cam-cli", "--bundle", str(bundle))
    assert out.returncode == 2 and "chmod 600" in out.stderr
