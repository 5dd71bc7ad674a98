"""Reading the results topic from Python: verified, typed :class:`FrameResult` objects.

Any Kafka client can read ``results``: JSON envelopes (schema ``tilestream/schemas/result.v2.json``)
carrying a v1 result (``result.v1.json``) as a string and the classifier's Ed25519 signature over
it (:mod:`tilestream.records`, "Record authentication"). Anyone with write access to the topic
can write a record there, so a result counts only once its signature verified with a trusted
results public key (``results/*.pub`` of the key directory, :mod:`tilestream.stagekeys`):
:func:`verify_result` is that check, :func:`tail` and :class:`AnsweredFrames` skip and count
whatever fails it. A valid signature says the classifier made this result, not when: a copy of
an old result re-written to the topic verifies too, so readers key results by ``frame_id``.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator, Mapping

from cryptography.hazmat.primitives.asymmetric import ed25519

from kafkaio import Connection
from kafkaio.clients import RangeReader
from tilestream import topics
from tilestream.errors import Refused
from tilestream.records import MAX_RESULT_BYTES, FrameResult, signed_result_frame_id

PublicKeys = Callable[[str], "ed25519.Ed25519PublicKey | None"] | Mapping[str, ed25519.Ed25519PublicKey]


def verify_result(data: bytes, public_keys: PublicKeys, max_bytes: int = MAX_RESULT_BYTES) -> FrameResult:
    """A ``results`` record -> its FrameResult, only if its signature verifies with one of
    ``public_keys`` (key id -> Ed25519 public key: a dict, or
    ``tilestream.stagekeys.StageKeys(dir).result_keys()``, which follows rotations).

    Raises :class:`tilestream.errors.Refused` with ``reason`` ``unsigned``, ``unknown_key``,
    ``bad_signature``, ``malformed``, ``too_large`` or ``too_many_tiles``.
    """
    return FrameResult.from_signed(data, public_keys, max_bytes)


def tail(
    where: Connection | str,
    camera_id: str | None = None,
    from_beginning: bool = False,
    max_results: int = 0,
    idle_timeout_s: float | None = None,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    skipped: list | None = None,
    *,
    keys: PublicKeys,
) -> Iterator[FrameResult]:
    """Yield verified results as they arrive (optionally one camera's), without joining a consumer group.

    Ends after ``max_results`` results, after ``idle_timeout_s`` without a record, or when
    ``stop`` is set (checked at least every 200 ms). ``ready`` is set once the start position is fixed.
    A record that is not a result signed with one of ``keys`` (see :func:`verify_result`; anyone
    with write access to the topic can write one) is skipped and appended to ``skipped`` as
    ``(partition, offset, "reason: error")`` when a list is given.
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
                        result = verify_result(message.value, keys)
                    except Exception as exc:  # noqa: BLE001 - a hostile record is skipped, never fatal
                        if skipped is not None:
                            reason = exc.reason if isinstance(exc, Refused) else type(exc).__name__
                            skipped.append((message.partition, message.offset, f"{reason}: {exc}"))
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
    added since the previous call. Only results signed with one of ``keys`` count: anything
    else is skipped and counted (``skipped``, per reason in ``skipped_by_reason``). One forged
    record must not stop the classifier from reading back, and a forged result must not make it
    believe a frame was answered (it would then drop that frame's tiles after a rebalance).
    """

    def __init__(self, where: Connection | str, keys: PublicKeys):
        self.reader = RangeReader(where, topics.RESULTS, client_id="tilestream-dedup")
        self.keys = keys
        self.since_ms: int | None = None
        self.skipped = 0
        self.skipped_by_reason: dict[str, int] = {}

    def catch_up(self, since_ms: int) -> set[str]:
        """Raises what the reader raises (e.g. KafkaTimeoutError while a broker hangs); the next call
        then reads again from ``since_ms``: the ids read before the failure were never returned."""
        try:
            if self.since_ms is None or since_ms < self.since_ms:
                self.reader.seek(since_ms)
                self.since_ms = since_ms
            ids: set[str] = set()
            for m in self.reader.read_to_end():
                try:
                    ids.add(signed_result_frame_id(m.value, self.keys))
                except Exception as exc:  # noqa: BLE001 - a hostile record is skipped, never fatal
                    reason = exc.reason if isinstance(exc, Refused) else "error"
                    self.skipped += 1
                    self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
            return ids
        except BaseException:
            self.since_ms = None
            raise

    def close(self) -> None:
        self.reader.close()

