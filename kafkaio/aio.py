"""asyncio clients (aiokafka): the classifier's group consumer and producer, the dashboard's reader.

Group membership lives in aiokafka's coordinator task on the service's event loop: heartbeats
are sent by that task whatever the service is computing, as long as the computing happens off
the loop (the classifier runs its model in a thread) — the same arrangement that kept the Faust
processor in its group in the runs where kafka-python's classifier was evicted (see
:mod:`kafkaio`). A member that misses ``max_poll_interval_ms`` between two ``getmany`` calls
leaves the group and aiokafka rejoins it on the next call, by itself.
"""

from __future__ import annotations

from typing import Any

from kafkaio.clients import PROFILES
from kafkaio.connection import Connection, connection

# Membership timing of group consumers. 10 s session / 3 s heartbeat: a dead classifier's
# partitions move within ~10 s; heartbeats come from their own task on the loop, so CPU load
# delays them by at most the longest stretch the loop is not served (tens of ms: model calls
# run in a thread).
GROUP_TIMING = {"session_timeout_ms": 10000, "heartbeat_interval_ms": 3000, "max_poll_interval_ms": 120000,
                "rebalance_timeout_ms": 60000}

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

# Request timeout of the idempotent aiokafka producers (the classifier's; Faust's through
# stream_processor.transport). A produce request to a hung leader waited for aiokafka's 40 s (and
# Faust's 20 min), i.e. for the node to come back: the classifier awaits every result's
# acknowledgement before it reads on, so one result batch for a partition of the frozen node
# stopped it for the whole 30 s freeze (no result from the fault to SIGCONT: 30.3 s), and Faust's
# commit, which flushes its producer first, hung 31 s. At 10 s the
# request is given up and the batch is sent again to the new leader. Only for idempotent
# producers: aiokafka then never expires a batch and the broker drops a copy it already has, so
# a timed-out request that did land is not written twice (a non-idempotent batch older than the
# timeout is failed instead).
PRODUCER_REQUEST_TIMEOUT_MS = 10000


def group_consumer(where: Connection | str, group_id: str, client_id: str, **overrides: Any):
    """An aiokafka consumer in ``group_id`` with manual commits, starting at the earliest offset."""
    from aiokafka import AIOKafkaConsumer

    kw = {**connection(where).client_kwargs(), "group_id": group_id, "client_id": client_id,
          "enable_auto_commit": False, "auto_offset_reset": "earliest", "metadata_max_age_ms": METADATA_MAX_AGE_MS,
          "request_timeout_ms": CONSUMER_REQUEST_TIMEOUT_MS, **GROUP_TIMING, **overrides}
    return AIOKafkaConsumer(**kw)


def reader(where: Connection | str, client_id: str, **overrides: Any):
    """A group-less aiokafka consumer (the caller assigns partitions and seeks)."""
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(**connection(where).client_kwargs(), group_id=None, enable_auto_commit=False,
                            client_id=client_id, **{"metadata_max_age_ms": METADATA_MAX_AGE_MS,
                                                            "request_timeout_ms": CONSUMER_REQUEST_TIMEOUT_MS, **overrides})


# Linger of the asyncio producers (the profiles' 5 ms is for kafka-python's callers). Their one
# user on the frame path, the classifier, queues a whole batch of outputs and then awaits their
# acknowledgements before it reads on: every record of the batch is appended before aiokafka's
# sender task can run, so they share requests without a linger, and a linger only delays each
# result (and the classifier's next read) by itself. Measured, back to back on the shared 2-core
# machine (open loops at 10-11 frames/s): a result's send() call to readable on `results` p50
# 9.9, 9.9, 10.2, 9.9, 13.8, 11.1 ms with 5 ms; 3.5, 3.5, 4.7, 4.9, 4.4, 3.8 ms with 0.
LINGER_MS = 0


def producer(where: Connection | str, client_id: str, profile: str = "stage", **overrides: Any):
    """An aiokafka producer of one of :data:`kafkaio.clients.PROFILES` (no linger: :data:`LINGER_MS`)."""
    from aiokafka import AIOKafkaProducer

    kw = {**connection(where).client_kwargs(), **PROFILES[profile], "linger_ms": LINGER_MS, "client_id": client_id,
          "metadata_max_age_ms": METADATA_MAX_AGE_MS, **overrides}
    if kw.get("enable_idempotence"):
        kw.setdefault("request_timeout_ms", PRODUCER_REQUEST_TIMEOUT_MS)
    if "batch_size" in kw:  # aiokafka's name for it
        kw["max_batch_size"] = kw.pop("batch_size")
    return AIOKafkaProducer(**kw)
