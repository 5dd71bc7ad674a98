"""``tilestream stage-keys create|rotate|list|remove|trust-results``: the keys that authenticate
records between stages (the stage key MACs tile batches; the results key signs results)."""

from __future__ import annotations

import argparse
import sys

from tilestream.config import Settings


def cmd_stage_keys(args: argparse.Namespace, settings: Settings) -> int:
    """The stage key (HMAC of tile batches) and the results-signing key (tilestream.stagekeys)."""
    from tilestream.stagekeys import KINDS, StageKeys

    store = StageKeys(settings.keys_path())
    kinds = (args.kind,) if args.kind else KINDS
    try:
        if args.action == "create":
            for kind, kid in store.init(kinds).items():
                print(f"{kind} key {kid} is current in {store.path / kind}")
            if "results" in kinds:
                print(f"consumers of results verify with {store.path / 'results' / '*.pub'} "
                      f"(`tilestream stage-keys trust-results --pub FILE` on their machine)")
        elif args.action == "rotate":
            if not args.kind:
                print("error: stage-keys rotate needs --kind stage|results", file=sys.stderr)
                return 2
            print(f"new {args.kind} key {store.rotate(args.kind)} is current; older {args.kind} keys still verify "
                  f"until `tilestream stage-keys remove --kind {args.kind} --key-id OLD`")
        elif args.action == "remove":
            if not args.kind or not args.key_id:
                print("error: stage-keys remove needs --kind stage|results and --key-id KID", file=sys.stderr)
                return 2
            store.remove(args.kind, args.key_id)
            print(f"{args.kind} key {args.key_id} removed: records made with it no longer verify here")
        elif args.action == "trust-results":
            if not args.pub:
                print("error: stage-keys trust-results needs --pub FILE", file=sys.stderr)
                return 2
            print(f"trusting results key {store.trust_results(args.pub)}")
        else:
            for k in store.list():
                if k.kind in kinds:
                    print(f"{k.kind:<8} {k.kid}  {'current' if k.current else '       '}  "
                          f"{'private' if k.private else 'public '}  created {k.created}")
    except (KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    return 0


def register(sub) -> None:
    sk = sub.add_parser("stage-keys", help="the stage key (MAC of tile batches) and the results-signing key")
    sk.add_argument("action", choices=["create", "rotate", "list", "remove", "trust-results"])
    sk.add_argument("--kind", choices=["stage", "results"], help="which key (create, list: both by default)")
    sk.add_argument("--key-id")
    sk.add_argument("--pub", help="trust-results: a results public key file (results/<kid>.pub of a classifier)")
    sk.set_defaults(func=cmd_stage_keys)
