"""``tilestream``: the one command-line entry point, one module per command group.

    tilestream kafka start|stop|status|fetch   local Apache Kafka: one node, a 3-node cluster, secured (kafka.py)
    tilestream samples fetch                   OpenCV sample data from Debian's opencv-doc (samples.py)
    tilestream keys ...                        cloud key, device enrolment, model-release key (keys.py)
    tilestream stage-keys ...                  keys that authenticate tile batches and results (stagekeys.py)
    tilestream agent                           edge agent: source -> sealed frames -> Kafka (agent.py)
    tilestream process                         Faust stream processor, one worker (process.py)
    tilestream classify                        online classifier -> results (classify.py)
    tilestream train | models publish|show     training and the model registry (models.py)
    tilestream results tail                    print results as they arrive (results.py)
    tilestream dashboard                       real-time web dashboard (dashboard.py)
    tilestream demo                            all of the above on vtest.avi, on the local Kafka (demo.py)

This package sits on top of everything: it may import every stage; nothing imports it (the
layering is checked by ``lint-imports``, see README "Layers"). ``procs`` starts child processes of
our own commands for the demo, the tests and the benchmarks.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

from tilestream.config import load_settings

from tilestream_cli import (agent, classify, dashboard, demo, kafka, keys, models, process, results, samples,
                            stagekeys)

GROUPS = (kafka, samples, keys, stagekeys, agent, process, models, classify, results, dashboard, demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tilestream", description="Edge-to-cloud image recognition on Apache Kafka.")
    p.add_argument("--config", help="TOML configuration file (default: $TILESTREAM_CONFIG)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: [kafka] bootstrap, else the local broker)")
    p.add_argument("--log-level", default=os.environ.get("TILESTREAM_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import faulthandler

    from tilestream.metrics import setup_logging

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` dumps every thread's stack
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings = load_settings(args.config)
    return int(args.func(args, settings) or 0)
