"""asyncio clients (aiokafka): the dashboard's reader, and the timeouts the Faust processor's
aiokafka clients take (stream_processor/app.py hands them to Faust).

The classifier's group consumer and results producer were aiokafka clients here until 2026-12-02;
they moved to librdkafka (:mod:`kafkaio.rdkafka`, why in :mod:`classifier.service`).
"""

from __future__ import annotations

from typing import Any

from kafkaio.connection import Connection, connection

# How stale an aiokafka client's cluster metadata may get (aiokafka's default: 5 min). aiokafka
# 0.14.0 does not refresh metadata when a ListOffsets for a partition's position fails with
# NotLeaderForPartition (consumer/fetcher.py ``_update_fetch_positions``: log, sleep, retry the
# same node): after a broker was SIGSTOPped for 30 s and came back as a follower, the processor
# asked it for the offsets of its Faust assignor topic for 4 minutes (2,300 refusals) and
# processed nothing until the periodic refresh. 10 s bounds that, for one metadata request per
# 10 s per client. Faust takes it as ``consumer/producer_metadata_max_age_ms``.
METADATA_MAX_AGE_MS = 10000

# Request timeout of aiokafka consumers (aiokafka's default 40 s; Faust passes its own
# ``broker_request_timeout``, 90 s). A hung node's kernel accepts the request and nothing answers
# it, and aiokafka 0.14 judges its coordinator only when a heartbeat *returns*
# (group_coordinator.py ``_heartbeat_routine``: the session-expired check runs after
# ``_do_heartbeat``), unlike the Java client, which gives up on the coordinator when the session
# timeout passes. A connection attempt to the hung node also waits out this timeout, holding the
# client's connection lock (client.py ``_get_conn``), and FindCoordinator goes to a random node.
# With Faust's 90 s the processor whose coordinator froze marked it dead 0.5 s after SIGCONT,
# i.e. after the whole 30 s freeze; with 10 s, 12 s after the fault (hung-broker fault test).
# 10 s (= the session timeout; Faust refuses a request timeout below it): a heartbeat,
# commit, fetch or ListOffsets pinned to the frozen node fails after 10 s and the client moves on
# to the new coordinator or leader (KRaft fences the silent node after 9 s); at worst the new
# coordinator has expired the member and it rejoins: one rebalance. The price: a JoinGroup that
# waits more than 10 s for the other members is sent again (the broker keeps the member's place).
CONSUMER_REQUEST_TIMEOUT_MS = 10000

# Request timeout of the idempotent aiokafka producers (Faust's, through
# stream_processor.transport). A produce request to a hung leader waited for aiokafka's 40 s (and
# Faust's 20 min), i.e. for the node to come back: the classifier (then on aiokafka) awaited every result's
# acknowledgement before it reads on, so one result batch for a partition of the frozen node
# stopped it for the whole 30 s freeze (no result from the fault to SIGCONT: 30.3 s), and Faust's
# commit, which flushes its producer first, hung 31 s. At 10 s the
# request is given up and the batch is sent again to the new leader. Only for idempotent
# producers: aiokafka then never expires a batch and the broker drops a copy it already has, so
# a timed-out request that did land is not written twice (a non-idempotent batch older than the
# timeout is failed instead).
PRODUCER_REQUEST_TIMEOUT_MS = 10000


def reader(where: Connection | str, client_id: str, **overrides: Any):
    """A group-less aiokafka consumer (the caller assigns partitions and seeks)."""
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(**connection(where).client_kwargs(), group_id=None, enable_auto_commit=False,
                            client_id=client_id, **{"metadata_max_age_ms": METADATA_MAX_AGE_MS,
                                                            "request_timeout_ms": CONSUMER_REQUEST_TIMEOUT_MS, **overrides})
