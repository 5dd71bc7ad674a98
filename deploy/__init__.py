"""How tilestream runs: the local single-node Kafka (:mod:`deploy.local_kafka`), systemd units."""
