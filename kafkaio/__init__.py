"""Kafka I/O: the one place where tilestream builds Kafka clients.

Every producer, consumer and admin client of the agent, processor, classifier, dashboard, CLI,
tests and benchmarks is made here, from one :class:`Connection` (bootstrap servers + transport
security), so TLS, SASL and mutual TLS are set once and reach every client, Faust included.

Which client library where (the rule):

* **aiokafka** for every client on an asyncio loop: the Faust processor (Faust runs on it), the
  dashboard. Why not kafka-python for group members: its 3.0.12 group coordinator lost the
  classifier's membership and never rejoined — on a fresh machine with one core busy, 2 + 3 + 1
  failed tests in three clean-clone runs, every time "the classifier stopped answering"; watched from outside, a classifier that
  logged ``assigned`` sent no heartbeat, was dropped after its 10 s session timeout and then
  spun in ``poll()`` at ~93 % CPU (``LeaveGroup ... UnknownMemberIdError`` at shutdown). In the
  same runs the Faust processor (aiokafka) kept its membership and delivered every tile.
* **librdkafka** (confluent-kafka, :mod:`kafkaio.rdkafka`) for the edge agent's frame producer
  and for the classifier (its group consumer and its results producer, one synchronous loop).
  Why: at camera rate one produce request cost kafka-python 1.33-1.36 CPU ms (about 1,500
  Python calls per request in its I/O thread) and librdkafka 0.29-0.31 ms with the same settings
  (``benchmarks/agent_bench.py``, the client alone); the agent may add 1.07 ms per vtest frame to
  capture + encode (1.5x) and crypto + spool + syncer already use ~0.72 ms of it. With
  kafka-python the agent cost 2.10x capture + encode at 10 fps and 1.91x at 25 fps. The
  classifier on aiokafka spent more CPU per frame on its event loop, the hand-off to its model
  thread and the wait for acknowledgements than on the frame (4.5-4.8 CPU ms per frame at 20
  frames/s for 1.1 ms of work; on librdkafka 2.8-3.2, see :mod:`classifier.service`); librdkafka's
  heartbeats come from its own thread, so the membership problem above does not arise.
* **kafka-python** for the other synchronous code with no group membership: admin and topic
  creation, group-less reads of a range of a topic (model registry, read-back of answered
  frames, the agent's reconciliation, ``results tail``), the CLI, tests and benchmarks.

A hung broker (SIGSTOPped, a frozen VM: the kernel still accepts its connections, nothing
answers) costs a client one request timeout per request or connection attempt, so every client
has one of at most 10 s (:data:`kafkaio.aio.CONSUMER_REQUEST_TIMEOUT_MS`,
:data:`kafkaio.aio.PRODUCER_REQUEST_TIMEOUT_MS`, :data:`kafkaio.clients.CONSUMER_REQUEST_TIMEOUT_MS`,
:data:`kafkaio.rdkafka.REQUEST_TIMEOUT_MS`;
the library defaults were 30 s to 20 min), metadata at most 10 s old, and no stage waits for a
read that does not progress (:meth:`kafkaio.clients.RangeReader.read_to_end`). With a broker frozen
for 30 s under a real-time camera (``tests/test_cluster_faults.py``) the pipeline's longest gap
between results went from 61-91 s in earlier runs and 19-23 s in two runs on the day of the fix
(stages waiting until SIGCONT when the frozen node led a ``results`` or ``models`` partition or
coordinated a group) to 7.5-15.6 s, with results of new frames 9.5-14.5 s after the fault, before
the node came back (README "Broker faults").

Modules: :mod:`kafkaio.connection` (bootstrap + security, kwargs for each library, Faust's
broker settings), :mod:`kafkaio.clients` (producer profiles, admin, topic creation, group-less
range reads), :mod:`kafkaio.aio` (the dashboard's asyncio reader, the Faust clients' timeouts), :mod:`kafkaio.rdkafka`
(librdkafka: the agent's frame producer, the classifier's group consumer and producer).
"""

from kafkaio.connection import Connection, connection

__all__ = ["Connection", "connection"]
