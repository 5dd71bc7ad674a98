"""tilestream: edge-to-cloud image recognition on Apache Kafka.

This package holds what every stage shares — the contracts between stages
(:mod:`tilestream.envelope`, :mod:`tilestream.records`, :mod:`tilestream.topics`),
their cryptography (:mod:`tilestream.crypto`, :mod:`tilestream.keys`), the one home of
configuration (:mod:`tilestream.config`) and the ``tilestream`` command line
(:mod:`tilestream.cli`). The stages live beside it: ``edge_agent``,
``stream_processor``, ``classifier``; ``deploy`` runs Kafka.
"""

__version__ = "0.1.0"
