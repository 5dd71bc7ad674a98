"""Reading the results topic from Python: typed :class:`FrameResult` objects.

Any Kafka client can read ``results`` (plain JSON, schema ``tilestream/schemas/result.v1.json``);
this is the small helper for our own users and for ``tilestream results tail``.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

from kafkaio import Connection
from kafkaio.clients import RangeReader
from tilestream import topics
from tilestream.records import MAX_ID_LEN, FrameResult, RecordError, parse_json_object


def tail(
    where: Connection | str,
    camera_id: str | None = None,
    from_beginning: bool = False,
    max_results: int = 0,
    idle_timeout_s: float | None = None,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    skipped: list | None = None,
) -> Iterator[FrameResult]:
    """Yield results as they arrive (optionally one camera's), without joining a consumer group.

    Ends after ``max_results`` results, after ``idle_timeout_s`` without a record, or when
    ``stop`` is set (checked at least every 200 ms). ``ready`` is set once the start position is fixed.
    A record that is not a result (anyone with write access to the topic can write one) is
    skipped and appended to ``skipped`` as ``(partition, offset, error)`` when a list is given.
    """
    reader = RangeReader(where, topics.RESULTS, client_id="tilestream-tail")
    try:
        reader.seek("beginning" if from_beginning else "end")
        if ready is not None:
            ready.set()
        seen = 0
        last = time.monotonic()
        while stop is None or not stop.is_set():
            batch = reader.consumer.poll(timeout_ms=200)
            if not batch:
                if idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                    return
                continue
            last = time.monotonic()
            for records in batch.values():
                for message in records:
                    try:
                        result = FrameResult.from_json(message.value)
                    except Exception as exc:  # noqa: BLE001 - a hostile record is skipped, never fatal
                        if skipped is not None:
                            skipped.append((message.partition, message.offset, f"{type(exc).__name__}: {exc}"))
                        continue
                    if camera_id is not None and result.camera_id != camera_id:
                        continue
                    yield result
                    seen += 1
                    if max_results and seen >= max_results:
                        return
    finally:
        reader.close()


class AnsweredFrames:
    """The frame ids on the results topic since some time, read incrementally.

    ``catch_up(since_ms)`` reads the results written since ``since_ms`` (broker time) up to
    the end now; a later call with the same or a later ``since_ms`` only reads what was
    added since the previous call. Records that are not results are skipped and counted
    (``skipped``): one forged record must not stop the classifier from reading back.
    """

    def __init__(self, where: Connection | str):
        self.reader = RangeReader(where, topics.RESULTS, client_id="tilestream-dedup")
        self.since_ms: int | None = None
        self.skipped = 0

    def catch_up(self, since_ms: int) -> set[str]:
        """Raises what the reader raises (e.g. KafkaTimeoutError while a broker hangs); the next call
        then reads again from ``since_ms``: the ids read before the failure were never returned."""
        try:
            if self.since_ms is None or since_ms < self.since_ms:
                self.reader.seek(since_ms)
                self.since_ms = since_ms
            ids: set[str] = set()
            for m in self.reader.read_to_end():
                fid = _frame_id_of(m.value)
                if fid is None:
                    self.skipped += 1
                else:
                    ids.add(fid)
            return ids
        except BaseException:
            self.since_ms = None
            raise

    def close(self) -> None:
        self.reader.close()


def _frame_id_of(value: bytes) -> str | None:
    try:
        d = parse_json_object(value, 16 * 1024 * 1024, "result")
    except RecordError:
        return None
    fid = d.get("frame_id")
    return fid if isinstance(fid, str) and 0 < len(fid) <= MAX_ID_LEN else None
