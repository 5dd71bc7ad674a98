"""librdkafka (confluent-kafka) clients: the edge agent's frame producer, the classifier's group
consumer and results producer.

Why a second client library: at camera rate a produce request costs kafka-python 1.33-1.36 CPU
ms (about 1,500 Python calls per request in its I/O thread) and librdkafka 0.29-0.31 ms with the
same settings (``python -m benchmarks.agent_bench``, "the Kafka client alone"). The agent's goal
is at most 1.5x the CPU of capture + encode per frame, 1.07 ms of overhead per vtest frame, of
which crypto, spool and syncer already use about 0.72 ms: only a client whose per-request work
is in C fits in what is left. Measured with the switch (two sittings, before and after back to
back, 15 s windows, 2 reps, shared 2-core machine): the agent went from 2.06x/2.06x to
1.60x/1.54x capture + encode at 10 fps and from 2.10x/2.05x to 1.56x/1.47x at 25 fps; the
client's I/O threads from 1.3-1.4 ms per frame (kafka-python) to 0.16-0.21 (librdkafka).

:func:`producer` builds a ``confluent_kafka.Producer`` from the same :class:`Connection` as every
other client, so the transport security is spelled here once for librdkafka's names:

* ``PLAINTEXT``; ``SSL`` with server verification against ``ssl_cafile`` (the system CAs when
  none: ``probe``) and the broker's host name checked (``https`` identification), as
  :meth:`Connection.ssl_context` does; mutual TLS with ``ssl_certfile``/``ssl_keyfile`` or a
  camera's certificate and key held in memory (``ssl.certificate.pem``/``ssl.key.pem``: handed
  to librdkafka as strings, never written to a file); ``SASL_SSL`` with SCRAM.
* :data:`PROFILES` ``frames`` has the meaning of kafkaio.clients' ``frames`` profile: ``acks=all``,
  idempotent, no linger, 1 MB batches, keyed records partitioned as kafka-python and the Java
  client do (murmur2), so a camera's heartbeats land where they did.

The classifier (:mod:`classifier.service`) uses :func:`group_consumer` and :func:`producer` with the
``stage`` profile: one synchronous loop, no asyncio; why, with figures, is in its docstring.

Callbacks (delivery reports, errors, commits, rebalances, logs) run only inside
``poll()``/``consume()``/``flush()``/``close()``, in the thread that calls them: the agent's sender
thread, the classifier's loop. librdkafka's own threads (``rdk:main``, ``rdk:broker<n>``) never
run Python code.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from kafkaio.connection import Connection, connection

PROFILES: dict[str, dict[str, Any]] = {
    "frames": {"acks": "all", "enable.idempotence": True, "linger.ms": 0, "batch.size": 1024 * 1024,
               "partitioner": "murmur2_random"},
    # Records between stages (the classifier's results and dead letters), as kafkaio.clients'
    # ``stage``: acks=all, idempotent; no linger (the classifier hands over a poll's outputs at once;
    # a 5 ms linger delayed each result by itself: send->readable p50 9.9 vs 3.5-4.9 ms); keyed as
    # the Java client and aiokafka place them (murmur2), so a camera's results stay on the
    # partition they were on.
    "stage": {"acks": "all", "enable.idempotence": True, "linger.ms": 0, "partitioner": "murmur2_random"},
}

# A hung broker (SIGSTOPped, a frozen VM) answers nothing while the kernel still accepts its
# connections: as the kafka-python clients (kafkaio.clients), one request waits at most 10 s, a
# connection attempt too (librdkafka's default is 30 s), and metadata is at most 10 s old
# (default 5 minutes), so a partition whose leader moved is written to the new leader soon.
REQUEST_TIMEOUT_MS = 10000
CONNECT_TIMEOUT_MS = 10000
METADATA_REFRESH_MS = 10000


def security_config(where: Connection | str) -> dict[str, Any]:
    """librdkafka's bootstrap and security settings for ``where`` (secrets included: never log it)."""
    conn = connection(where)
    cfg: dict[str, Any] = {"bootstrap.servers": conn.bootstrap, "security.protocol": conn.security_protocol.lower()}
    if conn.tls:
        cfg["ssl.ca.location"] = conn.ssl_cafile or "probe"
        cfg["ssl.endpoint.identification.algorithm"] = "https"
        if conn.ssl_certfile:
            cfg["ssl.certificate.location"] = conn.ssl_certfile
            cfg["ssl.key.location"] = conn.ssl_keyfile
        elif conn.ssl_cert_pem:
            cfg["ssl.certificate.pem"] = conn.ssl_cert_pem
            cfg["ssl.key.pem"] = conn.ssl_key_pem
    if conn.sasl:
        cfg.update({"sasl.mechanism": conn.sasl_mechanism, "sasl.username": conn.sasl_username,
                    "sasl.password": conn.sasl_password})
    return cfg


def _config(where: Connection | str, settings: dict[str, Any], callbacks: dict[str, Any]) -> dict[str, Any]:
    """One client's librdkafka configuration: the security of ``where``, the hung-broker bounds on
    connecting and on metadata age every client shares, ``settings``, and those of ``callbacks``
    (client id, error/log/commit callbacks) that are given (``None``: librdkafka's default)."""
    return {**security_config(where),
            "socket.connection.setup.timeout.ms": CONNECT_TIMEOUT_MS,
            "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
            **settings,
            **{k: v for k, v in callbacks.items() if v is not None}}


def producer(where: Connection | str, profile: str = "frames", client_id: str | None = None, *,
             max_request_bytes: int, delivery_timeout_ms: int, reconnect_backoff_max_ms: int = 10000,
             error_cb: Callable | None = None, logger: logging.Logger | None = None, **overrides):
    """A ``confluent_kafka.Producer`` of one of the :data:`PROFILES` (librdkafka names in ``overrides``).

    ``max_request_bytes`` bounds a produce request (the largest frame the topic accepts plus
    room); ``delivery_timeout_ms`` is how long a record may wait for Kafka's acknowledgement,
    retries included, before its delivery report says it failed. Making one does not contact a
    broker: see :func:`check_connected`.
    """
    from confluent_kafka import Producer

    return Producer(_config(where, {
        **PROFILES[profile],
        "message.max.bytes": max_request_bytes,
        "message.timeout.ms": delivery_timeout_ms,
        "request.timeout.ms": REQUEST_TIMEOUT_MS,
        "reconnect.backoff.max.ms": reconnect_backoff_max_ms,
        **overrides,
    }, {"client.id": client_id or None, "error_cb": error_cb, "logger": logger}))


# Membership timing of librdkafka group consumers. Heartbeats come from librdkafka's own thread,
# so a long model call in the consumer's thread never delays one; only max.poll.interval.ms
# between two polls counts. The session is 30 s, not the 10 s the classifier had on aiokafka,
# because librdkafka, unlike aiokafka, also judges the session on the client side: with no
# successful heartbeat response for session.timeout.ms it drops its assignment and rejoins.
# Heartbeats share the coordinator connection with offset commits, and the broker answers one
# request of a connection at a time, so a commit waiting for a frozen replica (SIGSTOPped broker,
# acks=all on __consumer_offsets) or a coordinator that died (~9 s until KRaft fences it) held
# them for a whole request timeout (10 s): with a 10 s session the classifier lost its partitions
# in both fault tests, then waited for a JoinGroup that needed the same frozen write, and its
# results stopped 28.6 s (broker-stop) and 21.9 s (leader-kill) while the processor's stopped
# 16.2 s and 10.0 s (tests/test_cluster_faults.py, 2026-12-02 12:11). 30 s > one request timeout
# + a heartbeat interval + fencing. The price: a classifier that crashed without leaving the group
# hands its partitions on after 30 s instead of 10 (one that stops leaves the group at once).
GROUP_TIMING = {"session.timeout.ms": 30000, "heartbeat.interval.ms": 3000, "max.poll.interval.ms": 120000}

# How many KB of fetched records librdkafka may hold ahead of the application (default 64 MB; the
# high-level consumer has one queue for all its partitions). A tile-features record of a vtest
# frame is 37 KB, so 16 MB is ~440 frames queued: far more than one poll takes, and the memory a
# hostile producer can make this consumer hold stays bounded (records are at most the topic's
# max.message.bytes, 1 MB).
QUEUED_MAX_KBYTES = 16 * 1024


def group_consumer(where: Connection | str, group_id: str, client_id: str, *, error_cb: Callable | None = None,
                   logger: logging.Logger | None = None, on_commit: Callable | None = None, **overrides):
    """A ``confluent_kafka.Consumer`` in ``group_id`` with manual commits of explicit offsets,
    starting at the earliest offset (librdkafka names in ``overrides``).

    Requests to a hung node are given up after :data:`REQUEST_TIMEOUT_MS` (``socket.timeout.ms``:
    a consumer's fetch, commit, heartbeat and offset requests; the default is 60 s), as every
    other client's. Offsets are never stored or committed by librdkafka itself: the caller commits
    what it knows to be safe. Callbacks (``error_cb``, ``on_commit``, rebalance, logs) run only
    inside ``poll()``/``consume()``/``close()``, in the caller's thread.
    """
    from confluent_kafka import Consumer

    return Consumer(_config(where, {
        **GROUP_TIMING,
        "group.id": group_id, "client.id": client_id,
        "enable.auto.commit": False, "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
        "socket.timeout.ms": REQUEST_TIMEOUT_MS,
        "queued.max.messages.kbytes": QUEUED_MAX_KBYTES,
        **overrides,
    }, {"error_cb": error_cb, "logger": logger, "on_commit": on_commit}))


def check_connected(p, timeout_s: float) -> None:
    """Raise unless a broker answered a metadata request within ``timeout_s`` (librdkafka
    connects lazily: a producer to an absent broker is made without an error)."""
    p.list_topics(timeout=timeout_s)


def as_exception(err) -> Exception:
    """A delivery report's ``KafkaError`` as an exception (what the callers' error paths take)."""
    from confluent_kafka import KafkaException

    return KafkaException(err)


def is_rebalance_refusal(err) -> bool:
    """Whether a commit's error says the group is rebalancing or this member was replaced (not a
    failure: the revocation callback commits again, or the new owner re-reads)."""
    from confluent_kafka import KafkaError

    return err.code() in (KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
                          KafkaError.UNKNOWN_MEMBER_ID, KafkaError._ASSIGNMENT_LOST, KafkaError._STATE)


def means_disconnected(err) -> bool:
    """Whether a client error (``error_cb``) says the producer cannot reach Kafka: every broker
    down, authentication refused, or a fatal error (the producer is done)."""
    from confluent_kafka import KafkaError

    return err.fatal() or err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._AUTHENTICATION)
