"""``tilestream dashboard``: the real-time web dashboard."""

from __future__ import annotations

import argparse

from tilestream.config import Settings

from tilestream_cli.common import connection


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    from dashboard.options import run

    return run(args, connection(args, settings))


def register(sub) -> None:
    from dashboard.options import add_arguments as dashboard_arguments  # argparse only: no aiohttp import

    db = sub.add_parser("dashboard", help="real-time web dashboard (reads only Kafka)", allow_abbrev=False)
    dashboard_arguments(db)  # the token: $TILESTREAM_DASHBOARD_TOKEN or --token-file, never an argument
    db.set_defaults(func=cmd_dashboard)
