"""``tilestream results tail``: print results as they arrive."""

from __future__ import annotations

import argparse
import sys

from tilestream.config import Settings

from tilestream_cli.common import connection


def cmd_results(args: argparse.Namespace, settings: Settings) -> int:
    from classifier.results import tail
    from tilestream.stagekeys import StageKeys

    keys = StageKeys(settings.keys_path()).result_keys()
    if not len(keys):
        print(f"error: no results public key in {settings.keys_path() / 'results'}: "
              "`tilestream stage-keys trust-results --pub FILE` (a classifier's results/<kid>.pub)", file=sys.stderr)
        return 2

    try:
        for r in tail(connection(args, settings), camera_id=args.camera, from_beginning=args.from_beginning,
                      max_results=args.max, keys=keys):
            print(format_result(r), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def format_result(r) -> str:
    p = r.probabilities.get(r.label, 0.0)
    flag = "" if r.complete else f"  INCOMPLETE missing={r.missing_tiles}"
    return f"{r.camera_id:>10}  seq={r.seq:<6} label={r.label:<11} p={p:.2f}  latency={r.latency_ms:8.1f} ms{flag}"


def register(sub) -> None:
    r = sub.add_parser("results", help="read the results topic")
    r.add_argument("action", choices=["tail"])
    r.add_argument("--camera")
    r.add_argument("--from-beginning", action="store_true")
    r.add_argument("--max", type=int, default=0)
    r.set_defaults(func=cmd_results)
