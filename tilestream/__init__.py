"""tilestream: edge-to-cloud image recognition on Apache Kafka.

This package holds what every stage shares and nothing else — the contracts between stages
(:mod:`tilestream.envelope`, :mod:`tilestream.records`, :mod:`tilestream.topics`), their
cryptography (:mod:`tilestream.crypto`, :mod:`tilestream.keys`), the one home of configuration
(:mod:`tilestream.config`), the exception tree (:mod:`tilestream.errors`) and small pure helpers
(:mod:`tilestream.imageinfo`, :mod:`tilestream.metrics`). It imports no framework, no Kafka
client and no stage (checked by ``lint-imports``). Beside it: ``kafkaio`` (every Kafka client),
the stages ``edge_agent``, ``stream_processor``, ``classifier``, ``dashboard``; ``deploy`` runs
Kafka; ``tilestream_cli`` is the command line on top of all of them.
"""

__version__ = "0.1.0"
