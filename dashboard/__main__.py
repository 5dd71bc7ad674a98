"""``python -m dashboard``: the dashboard on its own (``tilestream dashboard`` takes the same options).

The token comes from ``--token-file`` or ``$TILESTREAM_DASHBOARD_TOKEN``, never from the command
line (see dashboard.options); Kafka's address and security (TLS, SASL) from the configuration.
"""

from __future__ import annotations

import argparse
import os
import sys

from kafkaio import Connection
from tilestream.config import load_settings
from tilestream.metrics import setup_logging

from dashboard.options import add_arguments, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dashboard", description="tilestream real-time dashboard",
                                allow_abbrev=False)
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: [kafka] bootstrap, else the local broker)")
    p.add_argument("--config", help="TOML configuration file (default: $TILESTREAM_CONFIG)")
    add_arguments(p)
    p.add_argument("--log-level", default=os.environ.get("TILESTREAM_LOG_LEVEL", "INFO"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    settings = load_settings(args.config)
    return run(args, Connection.from_settings(settings.kafka, args.bootstrap))


if __name__ == "__main__":
    sys.exit(main())
