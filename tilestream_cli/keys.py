"""``tilestream keys ...``: the cloud key, admin (registry) key, device enrolment and bundles,
tile-job keys, the model-release key, and ``export --role`` of one role's key subset.

``keys export --role ROLE --out DIR`` copies from the key directory exactly the files a host of that
role needs (``ROLE_FILES``; README "Deploying beyond one machine"), private keys 0600, into a new
directory to install as that host's ``keys_dir``:

    processor   cloud/ (HPKE private + public keys, current), tile/ (tile-job keys), admin/*.pub,
                registry.json, stage/*.key + stage/current (MAC of tile batches)
    classifier  stage/*.key + stage/current, results/ (signing key, its .pub, current),
                release/*.pub (which models to trust)
    consumer    results/*.pub (dashboard, `results tail`: verify results, cannot make them)

Never exported: admin/*.key (registry signing), release/*.key (model signing), device bundles
(one file per camera, from ``enroll``).

``enroll --broker`` gives the camera a broker principal of its own, in its bundle's ``kafka``
field: ``--broker-auth scram`` (default) a SCRAM user ``camera-<id>`` with its password;
``--broker-auth tls`` a client certificate and key (PEM) from the CA in ``--client-ca DIR``
(``ca.pem`` + ``ca.key``; the local broker's ``<state>/tls``), principal ``camera-<id>@<hex>``,
for the brokers' mutual-TLS listener. Either gets the agent's ACLs only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tilestream.config import Settings

from tilestream_cli.common import connection

# Role -> files of the key directory (glob patterns, relative) a host of that role needs.
ROLE_FILES = {
    "processor": ("cloud/*.key", "cloud/*.pub", "cloud/current", "tile/*.key", "tile/current", "admin/*.pub",
                  "registry.json", "stage/*.key", "stage/current"),
    "classifier": ("stage/*.key", "stage/current", "results/*.key", "results/*.pub", "results/current",
                   "release/*.pub"),
    "consumer": ("results/*.pub",),
}
MAX_EXPORT_FILE_BYTES = 64 * 1024 * 1024  # registry.json's own bound (tilestream.keys.MAX_REGISTRY_BYTES)


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from tilestream.errors import ConfigError
    from tilestream.keys import KeyStore, RegistryRefused

    store = KeyStore(settings.keys_path(), admin_dir=args.admin_dir)
    args.conn = connection(args, settings)  # --broker: the admin principal of the configuration
    if args.action in ("enroll", "rotate-device", "revoke") and not args.camera_id:
        print(f"error: keys {args.action} needs a CAMERA_ID", file=sys.stderr)
        return 2
    if args.action == "export":
        dest = args.out or args.camera_id
        if not args.role or not dest:
            print(f"error: keys export needs --role {'|'.join(ROLE_FILES)} and --out DIR", file=sys.stderr)
            return 2
        try:
            files = export_role(store.path, args.role, Path(dest))
        except (FileExistsError, FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"exported the {args.role} keys ({len(files)} files) to {dest}: "
              f"{', '.join(str(f) for f in files)}")
        return 0
    try:
        return _keys(args, store)
    except (ConfigError, RegistryRefused, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _keys(args: argparse.Namespace, store) -> int:
    if args.action == "init":
        ids = store.init(args.suite)
        print(f"cloud key {ids['cloud']}, admin key {ids['admin']} and tile-job key {ids['tile']} in {store.path}")
        print(f"processors need {store.path} without admin/*.key (keep the admin key where devices are enrolled; "
              f"`--admin-dir` if it lives elsewhere)")
    elif args.action == "rotate-cloud":
        print(f"new cloud key {store.rotate_cloud(args.suite)} ({args.suite}); older keys still open older frames; "
              f"devices seal to it once they get a new bundle")
    elif args.action in ("enroll", "rotate-device"):
        out = Path(args.out) if args.out else store.bundle_path(args.camera_id)
        if args.action == "enroll" and out.exists():
            print(f"error: {out} exists: `tilestream keys rotate-device {args.camera_id}` makes a new device key "
                  f"(or give --out)", file=sys.stderr)
            return 2
        if args.broker_auth == "tls" and not args.client_ca:
            print("error: --broker-auth tls needs --client-ca DIR (ca.pem + ca.key of the brokers' client CA)",
                  file=sys.stderr)
            return 2
        issued: dict = {}
        creds = (lambda cam: _broker_credential(args.conn, cam, args.broker_auth, args.client_ca, issued)) \
            if args.broker else None
        kid = store.enroll(args.camera_id, out, broker_credentials=creds)
        if issued.get("principal"):
            print(f"broker: client certificate for User:{issued['principal']} (agent ACLs) in the bundle")
            if args.action == "rotate-device":
                n = _broker_revoke(args.conn, args.camera_id, keep=f"User:{issued['principal']}")
                print(f"broker: the camera's other broker credentials are revoked ({n} ACLs removed, "
                      f"older certificates denied)")
        print(f"enrolled {args.camera_id} with device key {kid}; install {out} (mode 0600) on the camera "
              f"(`tilestream agent --bundle FILE`, or [agent] bundle)")
        if args.action == "rotate-device":
            print(f"revoke its old key with `tilestream keys revoke {args.camera_id} --key-id OLD` once the device "
                  f"uses the new bundle")
    elif args.action == "revoke":
        print(f"revoked {', '.join(store.revoke(args.camera_id, args.key_id)) or 'nothing'}")
        if args.broker:
            print(f"broker: removed {_broker_revoke(args.conn, args.camera_id)} ACLs and the SCRAM credential of "
                  f"camera-{args.camera_id}; its client certificates (camera-{args.camera_id}@*) are denied everything")
    elif args.action == "list":
        print(json.dumps(store.devices(), indent=2, sort_keys=True))
    elif args.action == "sign-registry":
        print(f"signed the registry ({store.sign_registry()} devices) with admin key {store.init_admin()}")
    elif args.action == "trust-admin":
        if not args.pub:
            print("error: keys trust-admin needs --pub FILE", file=sys.stderr)
            return 2
        print(f"trusting registry admin key {store.trust_admin(args.pub)}")
    elif args.action == "tile-key":
        return _tile_key(args, store)
    elif args.action == "init-release":
        kid = store.init_model_release()
        print(f"model release key {kid} in {store.path / 'release'}; classifiers elsewhere need "
              f"{store.path / 'release' / (kid + '.pub')} (`tilestream keys trust-release --pub FILE`)")
    elif args.action == "rotate-release":
        print(f"models are now signed with release key {store.rotate_model_release()}; older release keys stay "
              f"trusted until `tilestream keys untrust-release --key-id OLD` (publish the models again first)")
    elif args.action == "trust-release":
        if not args.pub:
            print("error: keys trust-release needs --pub FILE", file=sys.stderr)
            return 2
        print(f"trusting model release key {store.trust_model_release(args.pub)}")
    elif args.action == "untrust-release":
        if not args.key_id:
            print("error: keys untrust-release needs --key-id KID", file=sys.stderr)
            return 2
        store.untrust_model_release(args.key_id)
        print(f"model release key {args.key_id} is no longer trusted here")
    return 0


def _tile_key(args: argparse.Namespace, store) -> int:
    what = args.camera_id
    tdir = store.path / "tile"
    if what == "create":
        kid = store.create_tile_key()
        current = store.tile_keys()[0]
        print(f"tile-job key {kid} in {tdir}" + (" (current)" if kid == current else f"; current is still {current}: "
              f"copy {tdir} to every processor host, restart them, then `tilestream keys tile-key rotate --key-id {kid}`"))
    elif what == "rotate":
        kid = store.rotate_tile_key(args.key_id)
        print(f"new tile jobs are sealed with {kid}; older keys still open in-flight jobs until "
              f"`tilestream keys tile-key remove --key-id OLD`; copy {tdir} to every processor host")
    elif what == "list":
        for k in store.list_tile_keys():
            print(f"{k['key_id']}{'  current' if k['current'] else ''}")
    elif what == "remove":
        if not args.key_id:
            print("error: keys tile-key remove needs --key-id KID", file=sys.stderr)
            return 2
        store.remove_tile_key(args.key_id)
        print(f"tile-job key {args.key_id} removed from {tdir}")
    else:
        print("error: keys tile-key create|rotate|list|remove", file=sys.stderr)
        return 2
    return 0


def _broker_credential(conn, camera_id: str, auth: str = "scram", client_ca: str | None = None,
                       issued: dict | None = None) -> dict:
    """The camera's own broker principal, with the agent's ACLs only (Write frames and heartbeats,
    Read frames for reconciliation), created with the admin principal of ``conn``: a SCRAM user
    ``camera-<id>`` and its password, or (``auth="tls"``) a client certificate ``camera-<id>@<hex>``
    and its key from the CA in ``client_ca``. What goes into the bundle: that, nothing of anyone else's."""
    from deploy.kafka_security import MECHANISM, add_camera_cert, add_camera_user, camera_username
    from kafkaio import clients

    camera_username(camera_id)  # a bad id is refused before anything is created
    admin = clients.admin(conn)
    try:
        if auth == "tls":
            cert = add_camera_cert(admin, Path(client_ca), camera_id)
            if issued is not None:
                issued["principal"] = cert.principal
            return {"security_protocol": "SSL", "principal": cert.principal, "ssl_certificate": cert.cert_pem,
                    "ssl_key": cert.key_pem}
        password = add_camera_user(admin, None, camera_id)
    finally:
        admin.close()
    return {"sasl_mechanism": MECHANISM, "sasl_username": camera_username(camera_id), "sasl_password": password}


def _broker_revoke(conn, camera_id: str, keep: str | None = None) -> int:
    from deploy.kafka_security import revoke_camera_user
    from kafkaio import clients

    admin = clients.admin(conn)
    try:
        return revoke_camera_user(admin, None, camera_id, keep=keep)
    finally:
        admin.close()


def export_role(keys_dir: Path, role: str, dest: Path) -> list[Path]:
    """Copy the files of ``keys_dir`` that ``role`` needs (``ROLE_FILES``) into the new directory
    ``dest``; returns their relative paths. Private keys (``*.key``) are written 0600, directories
    0700. Refuses a ``dest`` that exists non-empty or lies inside ``keys_dir``, symlinks, and a
    role whose every needed kind of key is missing (a half-made key directory)."""
    from tilestream.keys import _write

    if role not in ROLE_FILES:
        raise ValueError(f"unknown role {role!r} ({', '.join(ROLE_FILES)})")
    src, dest = keys_dir.resolve(), dest.absolute()
    if dest.resolve() == src or src in dest.resolve().parents:
        raise ValueError(f"{dest} is inside the key directory {src}")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty")
    files: list[Path] = []
    for pattern in ROLE_FILES[role]:
        found = sorted(p for p in src.glob(pattern) if p.is_file() and not p.is_symlink())
        if not found and not pattern.endswith("current"):
            raise FileNotFoundError(f"{src} has no {pattern} (a {role} needs it)")
        files += [p.relative_to(src) for p in found]
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    dest.chmod(0o700)
    for rel in files:
        with open(src / rel, "rb") as fh:
            data = fh.read(MAX_EXPORT_FILE_BYTES + 1)
        if len(data) > MAX_EXPORT_FILE_BYTES:
            raise ValueError(f"{src / rel} is larger than {MAX_EXPORT_FILE_BYTES} bytes")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(dest / rel, data, 0o600 if rel.suffix == ".key" else 0o644)
    return files


def register(sub) -> None:
    ks = sub.add_parser("keys", help="cloud key pair, device enrolment, tile-job keys and the model-release key")
    ks.add_argument("action", choices=["init", "enroll", "rotate-device", "rotate-cloud", "revoke", "list",
                                       "sign-registry", "trust-admin", "tile-key",
                                       "init-release", "rotate-release", "trust-release", "untrust-release",
                                       "export"])
    ks.add_argument("camera_id", nargs="?", help="the camera (enroll, rotate-device, revoke); "
                                                 "tile-key: create|rotate|list|remove")
    ks.add_argument("--key-id")
    ks.add_argument("--broker", action="store_true",
                    help="enroll/rotate-device: also create the camera's own SCRAM user (agent ACLs) on the configured "
                         "Kafka and put it in the bundle; revoke: also delete it there (needs the admin principal)")
    ks.add_argument("--broker-auth", choices=["scram", "tls"], default="scram",
                    help="with --broker: the camera's broker credential is a SCRAM user (default) or a client "
                         "certificate for the brokers' mutual-TLS listener (needs --client-ca)")
    ks.add_argument("--client-ca", help="--broker-auth tls: directory with the client CA's ca.pem and ca.key "
                                        "(the local broker's STATE/tls)")
    ks.add_argument("--role", choices=sorted(ROLE_FILES), help="export: whose subset of the key directory")
    ks.add_argument("--out", help="enroll/rotate-device: the device bundle to write (default bundles/CAMERA.bundle "
                                  "next to the keys directory); export: the new key directory")
    ks.add_argument("--admin-dir", help="where the admin (registry-signing) private key is (default KEYS_DIR/admin)")
    ks.add_argument("--pub", help="trust-release/trust-admin: a public key file (<kid>.pub of the other machine)")
    ks.add_argument("--suite", choices=["x25519", "mlkem768-x25519"], default="x25519",
                    help="HPKE KEM of a new cloud key (mlkem768-x25519: hybrid post-quantum)")
    ks.set_defaults(func=cmd_keys)
