"""Reading the results topic from Python: typed :class:`FrameResult` objects.

Any Kafka client can read ``results`` (plain JSON, schema ``tilestream/schemas/result.v1.json``);
this is the small helper for our own users and for ``tilestream results tail``.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Iterator

from tilestream import topics
from tilestream.records import FrameResult


def tail(
    bootstrap: str,
    camera_id: str | None = None,
    from_beginning: bool = False,
    max_results: int = 0,
    idle_timeout_s: float | None = None,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
) -> Iterator[FrameResult]:
    """Yield results as they arrive (optionally one camera's), without joining a consumer group.

    Ends after ``max_results`` results, after ``idle_timeout_s`` without a record, or when
    ``stop`` is set (checked at least every 200 ms). ``ready`` is set once the start position is fixed.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             client_id=f"tilestream-tail-{uuid.uuid4().hex[:6]}")
    try:
        parts = [TopicPartition(topics.RESULTS, p) for p in sorted(consumer.partitions_for_topic(topics.RESULTS) or ())]
        consumer.assign(parts)
        (consumer.seek_to_beginning if from_beginning else consumer.seek_to_end)(*parts)
        for tp in parts:
            consumer.position(tp)  # resolve the seek now, so "from now" means now
        if ready is not None:
            ready.set()
        seen = 0
        last = time.monotonic()
        while stop is None or not stop.is_set():
            batch = consumer.poll(timeout_ms=200)
            if not batch:
                if idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                    return
                continue
            last = time.monotonic()
            for records in batch.values():
                for message in records:
                    result = FrameResult.from_json(message.value)
                    if camera_id is not None and result.camera_id != camera_id:
                        continue
                    yield result
                    seen += 1
                    if max_results and seen >= max_results:
                        return
    finally:
        consumer.close()


class AnsweredFrames:
    """The frame ids on the results topic since some time, read incrementally.

    ``catch_up(since_ms)`` reads the results written since ``since_ms`` (broker time) up to
    the end now; a later call with the same or a later ``since_ms`` only reads what was
    added since the previous call.
    """

    def __init__(self, bootstrap: str):
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                      client_id=f"tilestream-dedup-{uuid.uuid4().hex[:6]}")
        self.parts = [TopicPartition(topics.RESULTS, p)
                      for p in sorted(self.consumer.partitions_for_topic(topics.RESULTS) or ())]
        self.consumer.assign(self.parts)
        self.since_ms: int | None = None

    def catch_up(self, since_ms: int) -> set[str]:
        import json

        c = self.consumer
        end = c.end_offsets(self.parts)
        if self.since_ms is None or since_ms < self.since_ms:
            starts = c.offsets_for_times({tp: max(0, since_ms) for tp in self.parts})
            for tp in self.parts:
                c.seek(tp, starts[tp].offset if starts.get(tp) is not None else end[tp])
            self.since_ms = since_ms
        ids: set[str] = set()
        while any(c.position(tp) < end[tp] for tp in self.parts):
            for records in c.poll(timeout_ms=1000).values():
                for m in records:
                    ids.add(json.loads(m.value)["frame_id"])
        return ids

    def close(self) -> None:
        self.consumer.close()
