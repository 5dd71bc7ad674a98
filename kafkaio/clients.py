"""Synchronous clients (kafka-python): producer profiles, admin, group-less range reads.

Producer profiles (every one idempotent with ``acks=all``: a frame or a result the broker
acknowledged is on every in-sync replica and is never written twice by a retry):

* ``frames`` — durable frame producers with kafka-python (benchmarks, tools; the edge agent's own
  producer is librdkafka with the same meaning, :mod:`kafkaio.rdkafka`, because kafka-python
  cost 1.33-1.36 CPU ms per produce request at camera rate and librdkafka 0.29-0.31): 1 MB
  batches (frames are 50-100 KB; the default 16 KB batch made every frame its own request), a
  request size that fits the largest frame the topic accepts, and no linger: a camera hands over
  one frame every 40-100 ms, so waiting 5 ms for a second one never batched anything and only
  woke kafka-python's I/O thread once more per frame (I/O thread 1.52 -> 1.14 ms per frame at
  10 fps, 1.37 -> 1.04 at 25 fps, benchmarks/agent_bench.py, when the agent used kafka-python).
  The price is paid when a backlog drains (after an outage): batches are then smaller and the
  I/O thread costs 0.68 instead of 0.35 ms per frame, 249 instead of 290 frames/s (as fast as
  possible, 600 frames, median of 3), still 10-25x a camera's rate;
* ``stage`` — records between stages and to operators (results, dead letters, metrics, models).

"Read a range without a group" is :func:`read_range`: assign every partition of a topic, start
at a time or an offset per partition, read up to the end offsets *as of the call*, never join a
consumer group and never commit. The model registry, the classifier's read-back of answered
frames, the agent's reconciliation, ``results tail`` and the tests all read this way.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Iterable, Iterator

from kafkaio.connection import Connection, connection
from tilestream.errors import ConfigError
from tilestream.topics import TopicSpec

PROFILES: dict[str, dict[str, Any]] = {
    "frames": {"acks": "all", "enable_idempotence": True, "linger_ms": 0, "batch_size": 1024 * 1024},
    "stage": {"acks": "all", "enable_idempotence": True, "linger_ms": 5},
}


def producer(where: Connection | str, profile: str = "stage", client_id: str | None = None, **overrides):
    """A kafka-python producer of one of the :data:`PROFILES`, ``overrides`` last."""
    from kafka import KafkaProducer

    conn = connection(where)
    kw = {**conn.client_kwargs(), **PROFILES[profile], **overrides}
    if client_id:
        kw["client_id"] = client_id
    return KafkaProducer(**kw)


# A hung broker (SIGSTOPped, a frozen VM) still has its TCP connections accepted by the kernel: a
# request to it is answered only by the client's own timeout. kafka-python's consumer default
# (30 s) is also the whole budget of end_offsets/offsets_for_times, so one request to a hung node
# used it up and the call failed (the classifier's read-back of answered frames, which then
# exited). 10 s per request, and :data:`OFFSETS_BUDGET_MS` for a whole lookup, so a request
# that hangs is retried against the new leader (KRaft fences a silent broker after 9 s).
CONSUMER_REQUEST_TIMEOUT_MS = 10000
# A whole offsets lookup or read to the end: fencing (9 s) + one timed-out request (10 s) + a
# metadata refresh (at most METADATA_MAX_AGE_MS) is ~30 s. It was 60 s: a client stuck on a hung
# node then held the classifier's read-back (and with it every tile) for 60 s per attempt; past
# this budget the caller gives up on the client and makes a fresh one (see below).
OFFSETS_BUDGET_MS = 30000
# kafka-python refreshes metadata after a timed-out ListOffsets only if something else asked for
# it (fetcher ``_fetch_offsets_by_times_async``: a RetriableError without ``need_update`` backs
# off and asks the same node again), so with its 5-minute default a reader kept asking a node that
# had hung, then lost its leadership, for every try of the budget. Same bound as the aiokafka
# clients (kafkaio.aio.METADATA_MAX_AGE_MS): one metadata request per 10 s per client.
METADATA_MAX_AGE_MS = 10000


def consumer(where: Connection | str, client_id: str = "tilestream", group_id: str | None = None, **overrides):
    """A kafka-python consumer; group-less (``group_id=None``, no commits) unless a group is given."""
    from kafka import KafkaConsumer

    conn = connection(where)
    kw = {"request_timeout_ms": CONSUMER_REQUEST_TIMEOUT_MS, "metadata_max_age_ms": METADATA_MAX_AGE_MS, **overrides}
    return KafkaConsumer(**conn.client_kwargs(), client_id=f"{client_id}-{uuid.uuid4().hex[:6]}",
                         group_id=group_id, enable_auto_commit=False, **kw)


def admin(where: Connection | str, **overrides):
    from kafka.admin import KafkaAdminClient

    return KafkaAdminClient(**connection(where).client_kwargs(), client_id="tilestream-admin",
                            **{"request_timeout_ms": 10000, "metadata_max_age_ms": METADATA_MAX_AGE_MS, **overrides})


def partitions(c, topic: str, wait_s: float = 0.0) -> list:
    """The topic's partitions as TopicPartitions (waiting up to ``wait_s`` for metadata)."""
    from kafka import TopicPartition

    deadline = time.monotonic() + wait_s
    while True:
        found = c.partitions_for_topic(topic)
        if found or time.monotonic() >= deadline:
            return [TopicPartition(topic, p) for p in sorted(found or ())]
        time.sleep(0.2)


class RangeReader:
    """Group-less reads of one topic: position every partition, then read to the end *now*.

    ``start`` is ``"beginning"``, ``"end"``, a broker timestamp in ms (int) or a callable
    ``partition -> offset | None`` (None: the end). Reading again later continues where the
    previous read stopped, so a follower (the model registry) only reads what was added.
    """

    def __init__(self, where: Connection | str, topic: str, client_id: str = "tilestream-reader", **overrides):
        self.topic = topic
        self.consumer = consumer(where, client_id=client_id, **overrides)
        self.parts = partitions(self.consumer, topic, wait_s=10.0)
        if not self.parts:
            self.consumer.close()
            raise RuntimeError(f"topic {topic} has no partitions (not created yet?)")
        self.consumer.assign(self.parts)
        self.next_offsets: dict[int, int] = {}  # partition -> offset after the last record handed out

    def seek(self, start: str | int | Callable[[int], int | None]) -> None:
        c = self.consumer
        if start == "beginning":
            c.seek_to_beginning(*self.parts)
        elif start == "end":
            c.seek_to_end(*self.parts)
        else:
            end = c.end_offsets(self.parts, timeout_ms=OFFSETS_BUDGET_MS)
            if isinstance(start, int):
                found = c.offsets_for_times({tp: max(0, start) for tp in self.parts}, timeout_ms=OFFSETS_BUDGET_MS)
                offsets = {tp: found[tp].offset if found.get(tp) is not None else end[tp] for tp in self.parts}
            else:
                offsets = {tp: start(tp.partition) for tp in self.parts}
                offsets = {tp: end[tp] if o is None else min(o, end[tp]) for tp, o in offsets.items()}
            for tp, o in offsets.items():
                c.seek(tp, o)
        for tp in self.parts:
            c.position(tp, timeout_ms=OFFSETS_BUDGET_MS)  # resolve the seek now, so "the end" means now

    def read_to_end(self, stall_ms: int = OFFSETS_BUDGET_MS) -> Iterator:
        """Every record from the current positions up to the end offsets as of this call.

        Raises ``TimeoutError`` when no record came for ``stall_ms`` while the end is not reached:
        a fetch from a leader that hung loops here until the client's metadata moves on, which
        kafka-python 3.0.12 did not always do (with 5-minute-old metadata, see
        METADATA_MAX_AGE_MS; the classifier's model check, then on its loop, held it 22 s in a
        read of the models topic whose leader was frozen, py-spy). The caller reads again,
        with a fresh reader that continues at ``next_offsets`` (:meth:`read_from`). A long read
        that progresses (a big topic on a slow machine) never times out."""
        c = self.consumer
        end = c.end_offsets(self.parts, timeout_ms=stall_ms)
        progress = time.monotonic()
        while any(c.position(tp, timeout_ms=stall_ms) < end[tp] for tp in self.parts):
            if time.monotonic() - progress > stall_ms / 1000:
                raise TimeoutError(f"{self.topic}: no record for {stall_ms / 1000:.0f} s before the end offsets")
            for records in c.poll(timeout_ms=500).values():
                progress = time.monotonic()
                for m in records:
                    self.next_offsets[m.partition] = m.offset + 1
                    yield m

    def read_from(self, offsets: dict[int, int]) -> None:
        """Position the partitions in ``offsets`` there (the others stay where they are): how a
        fresh reader continues where a stuck one stopped (``next_offsets`` of the old one)."""
        for tp in self.parts:
            if tp.partition in offsets:
                self.consumer.seek(tp, offsets[tp.partition])

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> "RangeReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_range(where: Connection | str, topic: str, start: str | int | Callable[[int], int | None] = "beginning") -> list:
    """Every record of ``topic`` from ``start`` up to its end offsets now."""
    with RangeReader(where, topic) as reader:
        reader.seek(start)
        return list(reader.read_to_end())


def ensure_topics(where: Connection | str, specs: Iterable[TopicSpec], replication: int = 1,
                  min_insync_replicas: int | None = None) -> list[str]:
    """Create the topics of ``specs`` that do not exist yet; returns the names created.

    ``replication`` copies of each partition; ``min_insync_replicas`` (a topic config, unless a
    spec sets its own) is how many of them an ``acks=all`` write needs: 3 and 2 on a 3-broker
    cluster, so one broker can fail without losing an acknowledged record or stopping writes.
    """
    from kafka.admin import NewTopic
    from kafka.errors import NoError, TopicAlreadyExistsError, for_code

    if replication < 1 or (min_insync_replicas is not None and not 1 <= min_insync_replicas <= replication):
        raise ConfigError(f"need 1 <= min.insync.replicas ({min_insync_replicas}) <= replication ({replication})")
    admin_client = admin(where)
    created: list[str] = []
    new: list = []
    try:
        existing = set(admin_client.list_topics())
        for spec in specs:
            if spec.name in existing:
                continue
            configs = dict(spec.configs)
            if min_insync_replicas is not None:
                configs.setdefault("min.insync.replicas", str(min_insync_replicas))
            new.append(NewTopic(spec.name, spec.partitions, replication, topic_configs=configs))
        if new:
            # One request for all: the controller commits them together (one request per
            # topic took 1.5 s each on a 3-node cluster, 12 s for the pipeline's eight).
            # wait_for_metadata: a caller may describe or produce to the topics right away.
            result = admin_client.create_topics(new, timeout_ms=30000, raise_errors=False, wait_for_metadata=True)
            for t in result["topics"]:
                error = for_code(t["error_code"])
                if error is NoError:
                    created.append(t["name"])
                elif error is not TopicAlreadyExistsError:
                    raise error(f"creating topic {t['name']}: {t.get('error_message') or error.__name__}")
    finally:
        admin_client.close()
    order = [n.name for n in new]
    return sorted(created, key=order.index)  # in the order of ``specs``
