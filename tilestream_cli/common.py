"""What several commands share: the Kafka connection and the local broker of the configuration."""

from __future__ import annotations

import argparse

from kafkaio import Connection
from tilestream.config import Settings


def connection(args: argparse.Namespace, settings: Settings) -> Connection:
    """Bootstrap and transport security from the configuration; ``--bootstrap`` overrides the address."""
    return Connection.from_settings(settings.kafka, args.bootstrap)


def local_kafka(args: argparse.Namespace, settings: Settings):
    from deploy.local_kafka import LocalKafka

    k = settings.kafka
    return LocalKafka(
        args.kafka_version or k.version,
        k.host,
        args.port or k.port,
        args.controller_port or k.controller_port,
        state_dir=args.state_dir,
        brokers=getattr(args, "brokers", None),
        secure=getattr(args, "secure", None) or None,  # absent: the state dir's recorded mode
        internal_port=getattr(args, "internal_port", None),
        mtls_port=getattr(args, "mtls_port", None),
    )
