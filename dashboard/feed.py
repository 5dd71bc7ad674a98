"""The dashboard's Kafka reader: four topics in, checked records into :class:`DashboardState`.

It reads only ``results``, ``dead-letters``, ``heartbeats`` and ``metrics``, with the group-less
aiokafka reader of :func:`kafkaio.aio.reader` on the aiohttp event loop (``where`` is a
:class:`kafkaio.Connection`, so TLS and SASL settings reach it, or a bare PLAINTEXT bootstrap
string): no consumer group and no commits — every partition is assigned and the reader starts
``window_s`` back in time (offsets by timestamp; the end where the topic is younger), so a freshly
opened dashboard is not empty.

Every record is hostile until checked (anyone with write access to a topic can write anything):
:func:`decode` reads it with the strict, bounded parsers of :mod:`tilestream.records` under the
dashboard's own tighter :class:`RecordLimits`, and a record that fails is ignored and counted in
``records_refused_total{topic,reason}`` (``too_large``, ``too_many_tiles``, ``grid_too_large``,
``malformed``). Why the limits: one forged 1.1 MB result of 10,000 tiles at distinct x and y
made a tile grid of 10^8 cells — a 225 MB snapshot, 2 GB RSS and 8 s per snapshot, sent to
every browser. A real result is ~9 KB (108 tiles of vtest.avi); a 4K frame in 64 px tiles is
2,040 tiles, ~170 KB.

Results are signed by the classifier (:mod:`tilestream.records`, "Record authentication"). When
results public keys are configured (``results/*.pub`` of the key directory, the ``result_keys``
of :class:`KafkaFeed`; by default the directory of the settings, ``$TILESTREAM_KEYS_DIR`` or
``~/.cache/tilestream/keys``, followed across rotations) a result is shown only if its signature
verifies; anything else, unsigned v1 results included, is refused and counted with its reason
(``unsigned``, ``unknown_key``, ``bad_signature``). With no key configured the dashboard still
works as before, a monitoring view of an unauthenticated topic: results (signed or not) are
shown, counted in ``results_unverified_total``, and ``/healthz`` says ``verifying: false``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from kafkaio import Connection
from kafkaio import aio as kafka_aio
from tilestream import topics
from tilestream.errors import Refused
from tilestream.metrics import Metrics
from tilestream.records import (MAX_DEAD_LETTER_BYTES, AgentHeartbeat, DeadLetter, FrameResult, RecordError,
                                RecordTooLarge, StageMetrics, result_envelope)

from dashboard.state import DashboardState

log = logging.getLogger("tilestream.dashboard")

TOPICS = (topics.RESULTS, topics.DEAD_LETTERS, topics.HEARTBEATS, topics.METRICS)
CLIENT_ID = "tilestream-dashboard"


@dataclass(frozen=True)
class RecordLimits:
    """What the dashboard accepts of one record (tighter than the topic contracts)."""

    max_record_bytes: int = 256 * 1024  # results, heartbeats, metrics
    max_dead_letter_bytes: int = MAX_DEAD_LETTER_BYTES  # a letter keeps up to 3 MiB of its original (never read here)
    max_tiles: int = 4096  # tiles listed in one result
    max_grid_cells: int = 16_384  # distinct x positions times distinct y positions of one result's tiles

    def __post_init__(self) -> None:
        for name in ("max_record_bytes", "max_dead_letter_bytes", "max_tiles", "max_grid_cells"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer")


def decode_result(raw: bytes, limits: RecordLimits = RecordLimits(), keys: Any = None) -> tuple[FrameResult, bool]:
    """(result, verified). With ``keys`` (key id -> results public key, non-empty) only a result
    whose signature verifies is returned; without, the payload of a signed result or a bare v1
    result is read unverified. Refused (with ``reason``) otherwise."""
    if keys is not None and len(keys):
        r, verified = FrameResult.from_signed(raw, keys, limits.max_record_bytes, limits.max_tiles), True
    else:
        payload, _ = result_envelope(raw, limits.max_record_bytes)
        r, verified = FrameResult.from_bytes(payload, limits.max_record_bytes, limits.max_tiles), False
    cells = len({t.x for t in r.tiles}) * len({t.y for t in r.tiles})
    if cells > limits.max_grid_cells:
        raise RecordTooLarge(f"a tile grid of {cells} cells exceeds {limits.max_grid_cells}", "grid_too_large")
    return r, verified


def default_result_keys() -> Any:
    """The results public keys of the settings' key directory (followed; empty: nothing verified)."""
    from tilestream.config import load_settings
    from tilestream.stagekeys import StageKeys

    try:
        keys = StageKeys(load_settings(None).keys_path()).result_keys()
    except Exception as exc:  # noqa: BLE001 - an unreadable key directory: say so, run unverified
        log.warning(json.dumps({"event": "result_keys_unreadable", "error": f"{type(exc).__name__}: {exc}"[:300]}))
        return None
    return keys  # followed: keys trusted while the dashboard runs take effect within a second


def decode(topic: str, raw: bytes, limits: RecordLimits = RecordLimits(), result_keys: Any = None) -> Any:
    """The record of ``topic`` as its tilestream.records dataclass; Refused (with ``reason``) if refused."""
    if topic == topics.RESULTS:
        return decode_result(raw, limits, result_keys)[0]
    if topic == topics.DEAD_LETTERS:
        # The original (still encrypted) is never shown: its size is checked, it is not decoded.
        return DeadLetter.from_bytes(raw, limits.max_dead_letter_bytes, keep_original=False)
    if topic == topics.HEARTBEATS:
        return AgentHeartbeat.from_bytes(raw, limits.max_record_bytes)
    if topic == topics.METRICS:
        return StageMetrics.from_bytes(raw, limits.max_record_bytes)
    raise RecordError(f"not a dashboard topic: {topic}")


def _cancelling() -> bool:
    """Whether the current task itself is being cancelled (not a CancelledError leaking from a library)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _stop_quietly(consumer) -> None:
    try:
        await asyncio.wait_for(consumer.stop(), 10)
    except asyncio.CancelledError:
        if _cancelling():
            raise
    except Exception:  # noqa: BLE001 - closing a consumer of a lost broker may fail in many ways
        pass


class KafkaFeed:
    """Reads the four topics into the state, from ``window_s`` ago, reconnecting on errors.

    Records older than the end offsets found at assignment (the back-fill) are placed at their
    Kafka timestamp (never in the future); records that arrive live are placed at their arrival,
    so a camera's clock never decides whether it looks online.
    """

    def __init__(self, where: Connection | str, state: DashboardState, metrics: Metrics, window_s: float = 300.0,
                 limits: RecordLimits | None = None, result_keys: Any = "settings"):
        self.where = where
        # "settings": the key directory of the settings; None: show results unverified
        self.result_keys = default_result_keys() if result_keys == "settings" else result_keys
        self.unverified = 0
        self.state = state
        self.metrics = metrics
        self.window_s = window_s
        self.limits = limits or RecordLimits()
        self.check_interval_s = 10.0
        self.connected = False
        self.error: str | None = None
        self.assigned: list[str] = []
        self.records = 0
        self.refused = 0
        self.last_record_at: float | None = None
        self.positions: dict[Any, int] = {}
        self.live_from: dict[Any, int] = {}
        self._last_refusal_log = 0.0

    def health(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "topics": self.assigned,
            "records": self.records,
            "refused": self.refused,
            "verifying": self.result_keys is not None and bool(len(self.result_keys)),
            "unverified": self.unverified,
            "last_record_age_s": None if self.last_record_at is None else round(time.time() - self.last_record_at, 1),
            "error": self.error,
        }

    async def run(self) -> None:
        backoff = 0.5
        while True:
            consumer = kafka_aio.reader(self.where, CLIENT_ID, auto_offset_reset="latest", fetch_max_wait_ms=250)
            try:
                await consumer.start()
                await self._assign(consumer)
                self.connected, self.error, backoff = True, None, 0.5
                self.metrics.set("kafka_connected", 1)
                await self._consume(consumer)
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                error = "CancelledError inside the Kafka client"  # aiokafka leaks these on connection loss
            except Exception as exc:  # noqa: BLE001 - the feed must outlive broker outages
                error = f"{type(exc).__name__}: {exc}"
            finally:
                self.connected = False
                await _stop_quietly(consumer)
            self.error = error
            self.metrics.set("kafka_connected", 0)
            self.metrics.inc("kafka_errors_total")
            log.warning(json.dumps({"event": "kafka_error", "error": self.error, "retry_in_s": backoff}))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _consume(self, consumer) -> None:
        next_check = time.monotonic() + self.check_interval_s
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            now = time.time()
            for tp, records in batch.items():
                for rec in records:
                    self.apply(tp, rec, now)
            if time.monotonic() > next_check:
                # aiokafka retries a lost broker quietly; a metadata request tells health the truth
                # (a failure lands in the reconnect path of run(), which resumes at the same offsets).
                await asyncio.wait_for(consumer._client.fetch_all_metadata(), self.check_interval_s)
                if len(self.assigned) < len(TOPICS):
                    await self._assign(consumer)
                next_check = time.monotonic() + self.check_interval_s

    async def _assign(self, consumer) -> None:
        from aiokafka.structs import TopicPartition

        # consumer.topics() fetches fresh metadata but keeps only the names; the partitions are in the
        # same cluster metadata object, which aiokafka's client returns.
        cluster = await consumer._client.fetch_all_metadata()
        parts = []
        for topic in TOPICS:
            parts += [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]
        # Remember where the current assignment stands before it is replaced.
        for tp in consumer.assignment():
            try:
                self.positions[tp] = await consumer.position(tp)
            except Exception:  # noqa: BLE001
                pass
        consumer.assign(parts)
        new = [tp for tp in parts if tp not in self.positions]
        if new:
            since_ms = int((time.time() - self.window_s) * 1000)
            found = await consumer.offsets_for_times({tp: since_ms for tp in new})
            ends = await consumer.end_offsets(new)
            for tp in new:
                self.live_from[tp] = ends[tp]
                hit = found.get(tp)
                self.positions[tp] = hit.offset if hit is not None else ends[tp]
        for tp in parts:
            consumer.seek(tp, self.positions[tp])
        missing = sorted(set(TOPICS) - {tp.topic for tp in parts})
        self.assigned = sorted({tp.topic for tp in parts})
        log.info(json.dumps({"event": "kafka_assigned", "partitions": len(parts), "topics": self.assigned,
                             "missing_topics": missing, "window_s": self.window_s,
                             "backfill": sum(max(0, self.live_from[tp] - self.positions[tp]) for tp in parts)}))

    def apply(self, tp, rec, now: float) -> None:
        """One consumer record into the state, or counted as refused (never raises)."""
        self.positions[tp] = rec.offset + 1
        self.records += 1
        self.last_record_at = now
        self.metrics.inc("records_total", topic=tp.topic)
        if rec.offset < self.live_from.get(tp, 0):
            seen_at = min(now, rec.timestamp / 1000.0) if rec.timestamp and rec.timestamp > 0 else now
        else:
            seen_at = now
        try:
            if tp.topic == topics.RESULTS:
                record, verified = decode_result(rec.value or b"", self.limits, self.result_keys)
                if not verified:
                    self.unverified += 1
                    self.metrics.inc("results_unverified_total")
                self.state.add_result(record, seen_at)
                return
            record = decode(tp.topic, rec.value or b"", self.limits)
            if tp.topic == topics.DEAD_LETTERS:
                self.state.add_dead_letter(record, seen_at)
            elif tp.topic == topics.HEARTBEATS:
                self.state.add_heartbeat(record, seen_at)
            else:
                self.state.add_stage_metrics(record, seen_at)
        except Exception as exc:  # noqa: BLE001 - a bad record is counted, never fatal
            reason = exc.reason if isinstance(exc, Refused) else "error"
            self.refused += 1
            self.metrics.inc("records_refused_total", topic=tp.topic, reason=reason)
            if time.monotonic() - self._last_refusal_log > 10:
                self._last_refusal_log = time.monotonic()
                log.warning(json.dumps({"event": "record_refused", "topic": tp.topic, "partition": tp.partition,
                                        "offset": rec.offset, "reason": reason,
                                        "error": f"{type(exc).__name__}: {exc}"[:300]}))


class RateLimitFilter(logging.Filter):
    """One line per message template per ``every_s``: a lost broker makes aiokafka log the same error
    many times a second; the feed's own ``kafka_error`` events already say what is going on."""

    def __init__(self, every_s: float = 30.0):
        super().__init__()
        self.every_s = every_s
        self.last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < self.every_s:
            return False
        if len(self.last) > 1000:
            self.last.clear()
        self.last[key] = now
        return True


def quiet_kafka_logs() -> None:
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not any(isinstance(f, RateLimitFilter) for f in logging.getLogger("aiokafka").filters):
        for name in ("aiokafka", "aiokafka.consumer.fetcher", "aiokafka.conn", "aiokafka.cluster"):
            logging.getLogger(name).addFilter(RateLimitFilter())
