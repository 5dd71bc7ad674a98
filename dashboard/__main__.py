"""``python -m dashboard``: the dashboard on its own (``tilestream dashboard`` calls the same function).

The token comes from ``--token-file``, ``$TILESTREAM_DASHBOARD_TOKEN`` or ``--token`` (the last is
visible to other users in the process list: prefer the other two on shared machines).
"""

from __future__ import annotations

import argparse
import os
import sys

from tilestream.config import load_settings
from tilestream.metrics import setup_logging

from dashboard.server import TOKEN_ENV, DashboardError, run_dashboard


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dashboard", description="tilestream real-time dashboard")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: [kafka] bootstrap, else the local broker)")
    p.add_argument("--config", help="TOML configuration file (default: $TILESTREAM_CONFIG)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token", help=f"access token (default: ${TOKEN_ENV})")
    p.add_argument("--token-file", help="read the access token from this file")
    p.add_argument("--window", type=float, default=300.0, help="seconds of history read at start (default 300)")
    p.add_argument("--log-level", default=os.environ.get("TILESTREAM_LOG_LEVEL", "INFO"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    settings = load_settings(args.config)
    bootstrap = args.bootstrap or settings.kafka.bootstrap or f"{settings.kafka.host}:{settings.kafka.port}"
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as fh:
            token = fh.read().strip() or None
    try:
        run_dashboard(bootstrap, args.host, args.port, token, window_s=args.window)
    except DashboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
