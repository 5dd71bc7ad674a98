"""``tilestream kafka start|stop|status|fetch``: the local Apache Kafka (deploy/local_kafka.py)."""

from __future__ import annotations

import argparse
import sys
from tilestream.config import Settings

from tilestream_cli.common import local_kafka


def cmd_kafka(args: argparse.Namespace, settings: Settings) -> int:
    from deploy.kafka_security import SecurityError
    from deploy.local_kafka import KafkaError
    from tilestream.topics import pipeline_topics

    try:
        lk = local_kafka(args, settings)
        if args.action == "fetch":
            print(lk.ensure_jars())
        elif args.action == "start":
            info = lk.start(pipeline_topics(settings.kafka))
            print(f"bootstrap: {info.bootstrap}")
            if lk.secure:
                print(f"security: SASL_SSL SCRAM-SHA-512; CA {lk.ca_file}; "
                      f"credentials (mode 0600) {lk.state_dir / 'credentials.json'}")
                print(f"mutual TLS (client certificates from {lk.ca_file.parent}): {lk.mtls_bootstrap}")
        elif args.action == "stop":
            if not lk.stop():
                print(f"no local Kafka running for {lk.state_dir}")
        elif args.action == "status":
            info = lk.status()
            if info is None:
                print(f"down (state dir {lk.state_dir})")
                return 3
            if lk.brokers == 1:
                print(f"up: Apache Kafka {info.version} at {info.bootstrap} (pid {info.pid}); log: {info.log}")
            else:
                print(f"up: Apache Kafka {info.version} cluster at {info.bootstrap}")
                for node_id, node in lk.nodes_status().items():
                    print(f"  node {node_id}: " + (f"up at {node.host}:{node.port} (pid {node.pid}); log: {node.log}"
                                                   if node else "down"))
    except (KafkaError, SecurityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:

    k = sub.add_parser("kafka", help="run a local Apache Kafka (KRaft): one node, a 3-node cluster, secured")
    k.add_argument("action", choices=["start", "stop", "status", "fetch"])
    k.add_argument("--version", dest="kafka_version", help="Kafka version (default 4.1.1; 3.9.1 supported)")
    k.add_argument("--port", type=int)
    k.add_argument("--controller-port", type=int)
    k.add_argument("--state-dir", help="broker data/log directory (default ~/.cache/tilestream/kafka/broker-PORT)")
    k.add_argument("--brokers", type=int, help="nodes (broker+controller) on 127.0.0.1..N, same ports each "
                                               "(default 1; 3: replication 3, min.insync.replicas 2)")
    k.add_argument("--secure", action="store_true",
                   help="SASL_SSL + SCRAM-SHA-512 clients, TLS between nodes, one user + ACLs per role")
    k.add_argument("--internal-port", type=int, help="secure mode: inter-broker SSL port (default controller port + 1)")
    k.add_argument("--mtls-port", type=int, help="secure mode: client listener that requires client certificates "
                                                 "(default controller port + 2, a free port if that one is taken)")
    k.set_defaults(func=cmd_kafka)
