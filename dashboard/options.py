"""The dashboard's command-line options, shared by ``python -m dashboard`` and ``tilestream dashboard``.

Light on purpose (argparse only): ``tilestream``'s parser is built on every CLI call. The token
is never an argument — a command line is readable by every user of the machine (``ps``,
``/proc/*/cmdline``) — it comes from ``$TILESTREAM_DASHBOARD_TOKEN`` or ``--token-file``.
``--token`` is kept only to refuse it with that explanation (without echoing the value).
"""

from __future__ import annotations

import argparse
import sys

TOKEN_ENV = "TILESTREAM_DASHBOARD_TOKEN"  # the same name as dashboard.auth.TOKEN_ENV


class _RefuseToken(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"--token is not accepted: a command line is visible to every user of the machine. "
                     f"Set ${TOKEN_ENV} or pass --token-file FILE (mode 0600).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token-file", help=f"file holding the access token, mode 0600, re-read when it changes "
                                        f"(default: ${TOKEN_ENV}); required off loopback")
    p.add_argument("--token", nargs="?", action=_RefuseToken, help=argparse.SUPPRESS)
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name browsers use to reach the dashboard (repeatable; loopback names and the bind "
                        "address are always allowed; required when binding to 0.0.0.0 or ::)")
    p.add_argument("--max-sse-clients", type=int, default=100, help="open event streams at most (default 100)")
    p.add_argument("--session-hours", type=float, default=12.0, help="lifetime of a signed-in session (default 12)")
    p.add_argument("--window", type=float, default=300.0, help="seconds of history read at start (default 300)")
    p.add_argument("--max-record-bytes", type=int, default=256 * 1024,
                   help="larger results, heartbeats and metrics records are ignored and counted (default 262144)")
    p.add_argument("--max-tiles", type=int, default=4096, help="results listing more tiles are ignored and counted (default 4096)")
    p.add_argument("--max-snapshot-bytes", type=int, default=4 * 1024 * 1024,
                   help="JSON budget of one snapshot; cameras beyond it are left out and counted (default 4194304)")


def run(args: argparse.Namespace, where) -> int:
    """Start the dashboard from parsed options (blocking); 2 on a refused configuration."""
    from dashboard.auth import DashboardError, load_token
    from dashboard.feed import RecordLimits
    from dashboard.server import run_dashboard
    from dashboard.state import StateConfig

    try:
        token = None if args.token_file else load_token(None)
        try:
            limits = RecordLimits(max_record_bytes=args.max_record_bytes, max_tiles=args.max_tiles)
        except ValueError as exc:
            raise DashboardError(str(exc)) from None
        if args.max_snapshot_bytes < 64 * 1024:
            raise DashboardError("--max-snapshot-bytes must be at least 65536")
        run_dashboard(where, args.host, args.port, token, token_file=args.token_file, allowed_hosts=args.allowed_host,
                      window_s=args.window, max_sse_clients=args.max_sse_clients,
                      session_ttl_s=args.session_hours * 3600.0, limits=limits,
                      state_config=StateConfig(max_snapshot_bytes=args.max_snapshot_bytes))
    except DashboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["TOKEN_ENV", "add_arguments", "run"]
