"""``tilestream process``: one stream-processor worker (Faust)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tilestream.config import Settings, cache_home

from tilestream_cli.common import connection


def cmd_process(args: argparse.Namespace, settings: Settings) -> int:
    from stream_processor.app import run_worker
    from tilestream.errors import ConfigError

    datadir = Path(args.datadir) if args.datadir else cache_home() / "processor" / f"worker-{args.http_port or settings.processor.web_port}"
    try:
        run_worker(settings, connection(args, settings), datadir, args.http_port, loglevel=args.loglevel)
    except ConfigError as exc:  # e.g. no tile-job key: refuse to start rather than make one of our own
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def register(sub) -> None:
    pr = sub.add_parser("process", help="run a stream-processor worker (Faust)")
    pr.add_argument("--http-port", "--web-port", dest="http_port", type=int,
                    help="/healthz and /metrics port (each worker needs its own)")
    pr.add_argument("--datadir", help="Faust data directory (each worker needs its own)")
    pr.add_argument("--loglevel", default="warning")
    pr.set_defaults(func=cmd_process)
