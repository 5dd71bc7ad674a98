"""``tilestream keys ...``: the cloud key, device enrolment, the model-release key."""

from __future__ import annotations

import argparse
import sys
from tilestream.config import Settings



def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from tilestream.keys import KeyStore

    store = KeyStore(settings.keys_path())
    if args.action in ("enroll", "rotate-device", "revoke") and not args.camera_id:
        print(f"error: keys {args.action} needs a CAMERA_ID", file=sys.stderr)
        return 2
    if args.action == "init":
        print(f"cloud key {store.init_cloud(args.suite)} in {store.path}")
    elif args.action == "rotate-cloud":
        print(f"new cloud key {store.rotate_cloud(args.suite)} ({args.suite}); older keys still open older frames")
    elif args.action == "enroll":
        print(f"enrolled {args.camera_id} with device key {store.enroll(args.camera_id)}")
    elif args.action == "rotate-device":
        kid = store.enroll(args.camera_id)
        print(f"{args.camera_id} now signs with {kid}; revoke its old key with "
              f"`tilestream keys revoke {args.camera_id} --key-id OLD` once the device uses the new one")
    elif args.action == "revoke":
        print(f"revoked {', '.join(store.revoke(args.camera_id, args.key_id)) or 'nothing'}")
    elif args.action == "list":
        print(store.registry_path.read_text() if store.registry_path.exists() else "{}")
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
        try:
            store.untrust_model_release(args.key_id)
        except (KeyError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"model release key {args.key_id} is no longer trusted here")
    return 0


def register(sub) -> None:
    ks = sub.add_parser("keys", help="cloud key pair, device enrolment and the model-release key")
    ks.add_argument("action", choices=["init", "enroll", "rotate-device", "rotate-cloud", "revoke", "list",
                                       "init-release", "rotate-release", "trust-release", "untrust-release"])
    ks.add_argument("camera_id", nargs="?")
    ks.add_argument("--key-id")
    ks.add_argument("--pub", help="trust-release: a release public key file (release/<kid>.pub of the publisher)")
    ks.add_argument("--suite", choices=["x25519", "mlkem768-x25519"], default="x25519",
                    help="HPKE KEM of a new cloud key (mlkem768-x25519: hybrid post-quantum)")
    ks.set_defaults(func=cmd_keys)
