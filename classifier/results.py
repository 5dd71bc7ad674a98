"""Reading the results topic from Python: typed :class:`FrameResult` objects.

Any Kafka client can read ``results`` (plain JSON, schema ``tilestream/schemas/result.v1.json``);
this is the small helper for our own users and for ``tilestream results tail``.
"""

from __future__ import annotations

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
) -> Iterator[FrameResult]:
    """Yield results as they arrive (optionally only one camera's), without joining a group."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             client_id=f"tilestream-tail-{uuid.uuid4().hex[:6]}")
    try:
        parts = [TopicPartition(topics.RESULTS, p) for p in sorted(consumer.partitions_for_topic(topics.RESULTS) or ())]
        consumer.assign(parts)
        (consumer.seek_to_beginning if from_beginning else consumer.seek_to_end)(*parts)
        for tp in parts:
            consumer.position(tp)  # resolve the seek now, so "from now" means now
        seen = 0
        timeout_ms = int(idle_timeout_s * 1000) if idle_timeout_s else float("inf")
        consumer.config["consumer_timeout_ms"] = timeout_ms
        for message in consumer:
            result = FrameResult.from_json(message.value)
            if camera_id is not None and result.camera_id != camera_id:
                continue
            yield result
            seen += 1
            if max_results and seen >= max_results:
                return
    finally:
        consumer.close()
