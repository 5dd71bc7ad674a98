"""The agent's sender: spooled frames -> Kafka, each acknowledged in the spool once Kafka acknowledged it.

One object, :class:`FrameSender`, whose :meth:`~FrameSender.step` is one turn of the sender
thread (connect, serve Kafka's answers, heartbeat, save offsets, retry, reconcile, send what fits
in flight) and whose :meth:`~FrameSender.send` hands one spooled entry to the producer; Kafka's
answers come back through :meth:`~FrameSender.on_ack` / :meth:`~FrameSender.on_error`, librdkafka
delivery reports served by ``producer.poll`` in :meth:`~FrameSender.step`, so in the sender thread.

* The producer is librdkafka's (confluent-kafka, :mod:`kafkaio.rdkafka`) with kafkaio's ``frames``
  profile (``acks=all``, idempotent, no linger). Why not kafka-python, the library of the other
  synchronous clients, with the figures that decided it: :mod:`kafkaio.rdkafka`.
* The producer is made lazily and kept only once a broker answered (a metadata request, see
  :meth:`~FrameSender._connect`): a broker that does not answer leaves the agent spooling,
  retried with capped backoff. A fatal producer error (librdkafka's idempotence state is lost)
  drops the producer: what it had in flight goes back to the spool and a new one reconciles first.
* At most ``max_in_flight`` entries are with the producer; an entry whose send failed is
  released back to the spool and sent again after a reconciliation.
* No duplicates on the topic: within one producer session the idempotent producer de-duplicates
  its own retries (and keeps each partition in send order). Across sessions (agent restart after
  ``kill -9``, a delivery timeout, a producer dropped after a fatal error) the sender first
  *reconciles*, once nothing is in flight any more: it reads the ``frames`` partitions from the
  offsets it saved (see :meth:`~FrameSender.save_offsets`) and drops from the spool every frame
  whose key *and bytes* are already on the topic (:func:`frames_on_topic`).
* No frame is lost while the broker is away: an entry leaves the spool only when Kafka
  acknowledged it (its delivery report says so); librdkafka retries until the delivery timeout,
  then reports the failure and the entry goes back to the spool.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kafkaio import Connection, clients, rdkafka
from tilestream import __version__, envelope, topics
from tilestream.config import AgentSettings
from tilestream.metrics import Metrics
from tilestream.records import AgentHeartbeat

from edge_agent.sources import Backoff
from edge_agent.spool import Entry, Spool

if TYPE_CHECKING:
    from edge_agent.agent import AgentCounters

log = logging.getLogger("tilestream.agent")

# How long a client may wait for a broker's first answer (the producer's connect check, the
# reconciliation reader's bootstrap). Bounded so that a SIGTERM while the broker is away is
# honoured within seconds (kafka-python's default 30 s outlived the drain timeout and systemd's
# stop timeout).
BOOTSTRAP_TIMEOUT_MS = 5000
# Longest the sender thread waits for a new frame in the spool (or, with max_in_flight frames out,
# for Kafka's answer) before it turns again: so also how late a delivery report may be served while
# no frame comes, and how soon a stop is noticed (see step).
POLL_WAIT_S = 0.25
# How often the sender saves where reconciliation starts (save_offsets; also at a clean stop). An
# older save is safe: every frame a crash can bring back (past the spool's persisted head, which
# only moves forward) was acknowledged after it, or is covered by it, so it lies at or after the
# saved start; reconciliation reads at most this long of frames more and still finds each one.
# Each save is a small file write + rename, ~0.2-0.3 CPU ms at camera rate (ext4 flushes a renamed
# file's data): 0.02-0.03 ms per frame at 10 fps when it was every second.
OFFSETS_SAVE_S = 5.0


class FrameSender:
    """Delivers the spool to ``frames``; shared state with the capture side is the spool and the counters."""

    def __init__(self, settings: AgentSettings, conn: Connection, spool: Spool, counters: AgentCounters,
                 metrics: Metrics, state_dir: Path, max_frame_bytes: int, stop: threading.Event):
        self.settings = settings
        self.conn = conn
        self.spool = spool
        self.counters = counters
        self.metrics = metrics
        self.max_frame_bytes = max_frame_bytes
        self.stop = stop  # set: leave the loop (after draining, or at shutdown)
        self.on_sent: Callable[[bytes], None] | None = None  # called with a frame's key once Kafka has it
        self.producer = None
        self.connected = False
        self._lock = threading.Lock()  # in_flight, failed and the offsets below: delivery reports write them
        self._in_flight: dict[int, bool] = {}
        self._failed: list[int] = []
        self._backoff = Backoff(0.5, settings.backoff_max_s)
        # Between producers dropped after a fatal error (a revoked camera: every new producer is refused
        # its idempotence id at once); reset by the first acknowledged frame.
        self._fatal_backoff = Backoff(0.5, settings.backoff_max_s)
        self._need_reconcile = spool.frames > 0  # frames left by a previous run may already be on the topic
        self._last_heartbeat = 0.0
        self._last_offsets_save = time.monotonic()
        # Where reconciliation starts reading each partition (see save_offsets).
        self._reconcile_from_path = state_dir / "reconcile-from.json"
        self._old_offsets_path = state_dir / "acked-offsets.json"
        self._reconcile_from: dict[int, int] = self._load_offsets()
        self._max_acked: dict[int, int] = {}
        self._acked_past_head: dict[int, tuple[int, int]] = {}  # entry id -> (partition, offset)
        self._fatal: str | None = None  # set by a fatal producer error: the producer is dropped in step

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        """The sender thread: turn until ``stop``; then give what is in flight a moment to be
        acknowledged (the rest stays spooled)."""
        while not self.stop.is_set():
            self.step()
        deadline = time.monotonic() + 10
        while self._in_flight and self.producer is not None and time.monotonic() < deadline:
            self.producer.poll(0.05)

    def step(self) -> None:
        """One turn: connect if needed, serve Kafka's answers, heartbeat and save offsets when due,
        release failed sends, reconcile when needed, then send what fits in flight.

        Waits at most :data:`POLL_WAIT_S` for the next frame in the spool, also while frames are
        in flight: their delivery reports wait in librdkafka's queue and are served by the
        ``poll(0)`` of the next turn, which the next frame (or the end of the wait) starts. Only
        with ``max_in_flight`` frames out does it wait in ``producer.poll`` for an answer. So at
        camera rate the thread wakes for each frame only, not again for its answer a few ms later
        (nor, with the 0.1 s wait of before at 10 fps, a third time when the wait ran out just
        before the next frame): 3.3-3.8 context switches per frame (GIL hand-overs included) and
        0.24-0.34 CPU ms per frame before, 2.1-2.3 and 0.18-0.20 ms after (10 and 25 fps,
        ``benchmarks.agent_bench`` per thread). An acknowledgement reaches the spool at most one
        frame period (or :data:`POLL_WAIT_S`) late, well within the spool's ``sync_interval`` (a
        record unacknowledged for that long is fsynced); ``send_seconds`` is librdkafka's own
        latency of the message (produce to broker answer), not when its report was served. While
        a backlog drains the spool always has frames and nothing waits.
        """
        s = self.settings
        if self._fatal:
            self._drop_producer()
            self.stop.wait(self._fatal_backoff.next())
            return
        if self.producer is None and not self._connect():
            return
        self.producer.poll(0)  # delivery reports and errors: on_ack / on_error / _on_client_error here
        now = time.monotonic()
        if now - self._last_heartbeat >= s.heartbeat_interval_s:
            self.publish_heartbeat()
            self._last_heartbeat = now
        if now - self._last_offsets_save > OFFSETS_SAVE_S:
            self.save_offsets()
            self._last_offsets_save = now
        with self._lock:
            retry, self._failed = self._failed, []
            busy = len(self._in_flight)
        if retry:
            self.spool.release(retry)
            self._need_reconcile = True
        if self._need_reconcile:
            if busy:  # let what is in flight finish first, so the topic shows everything sent
                self.producer.poll(0.05)
                return
            try:
                self.reconcile()
                self._need_reconcile = False
                self._backoff.reset()
            except Exception as exc:  # noqa: BLE001 - broker still away: retry after a pause
                delay = self._backoff.next()
                log.warning(json.dumps({"event": "reconcile_failed", "error": str(exc), "retry_in_s": delay}))
                self.stop.wait(delay)
                return
        room = s.max_in_flight - busy
        if room <= 0:
            self.producer.poll(POLL_WAIT_S)  # returns as soon as an answer was served
            return
        for e in self.spool.peek(room, timeout=POLL_WAIT_S):
            self.send(e)

    def _connect(self) -> bool:
        try:
            p = self._make_producer()
            try:
                rdkafka.check_connected(p, BOOTSTRAP_TIMEOUT_MS / 1000)  # raises unless a broker answered
            except BaseException:
                p.purge()
                raise
            self.producer = p
            self.connected = True
            self._backoff.reset()
            return True
        except Exception as exc:  # noqa: BLE001 - broker unreachable: keep spooling, retry later
            self.connected = False
            delay = self._backoff.next()
            log.warning(json.dumps({"event": "broker_unreachable", "error": str(exc), "retry_in_s": delay,
                                    "spooled": self.spool.frames}))
            self.stop.wait(delay)
            return False

    def _make_producer(self):
        return rdkafka.producer(
            self.conn, "frames", client_id=f"tilestream-agent-{self.settings.camera_id}",
            max_request_bytes=self.max_frame_bytes + 64 * 1024,
            delivery_timeout_ms=int(self.settings.delivery_timeout_s * 1000),
            reconnect_backoff_max_ms=int(self.settings.backoff_max_s * 1000),
            error_cb=self._on_client_error, logger=logging.getLogger("tilestream.agent.kafka"),
        )

    def _on_client_error(self, err) -> None:
        """librdkafka's errors outside a delivery report (served by poll, in the sender thread):
        all brokers down, authentication refused, and fatal ones (the idempotent producer's state
        is lost: this producer cannot go on, see _drop_producer)."""
        if err.fatal():
            self._fatal = err.str()
        if rdkafka.means_disconnected(err):
            self.connected = False
        log.warning(json.dumps({"event": "kafka_client_error", "error": err.str(), "fatal": bool(err.fatal())}))

    def _drop_producer(self) -> None:
        """Leave a producer that hit a fatal error: what it had in flight gets no answer any more,
        so it goes back to the spool (released in step) and the next producer reconciles first."""
        log.warning(json.dumps({"event": "producer_dropped", "error": self._fatal}))
        p, self.producer, self._fatal = self.producer, None, None
        if p is not None:
            try:
                p.purge()
            except Exception:  # noqa: BLE001 - a producer in a fatal state may refuse even this
                pass
        with self._lock:
            self._failed.extend(self._in_flight)
            self._in_flight.clear()
        self.connected = False

    # -- one entry --------------------------------------------------------------------------
    def send(self, e: Entry) -> None:
        """Hand one spooled entry to the producer; its answer comes back to on_ack / on_error."""
        with self._lock:
            self._in_flight[e.id] = True
        try:
            self.producer.produce(topics.FRAMES, key=e.key, value=e.value,
                                  on_delivery=lambda err, msg, eid=e.id, key=e.key: self._delivered(eid, key, err, msg))
        except Exception as exc:  # noqa: BLE001 - local queue full, record too large: retry the entry later
            self.on_error(e.id, exc)

    def _delivered(self, entry_id: int, key: bytes, err, msg) -> None:
        """librdkafka's delivery report of one frame (served by poll in the sender thread: an
        exception here would leave poll and end the thread, so none does)."""
        try:
            if err is None:
                self.on_ack(entry_id, key, msg.partition(), msg.offset(), msg.latency())
            else:
                self.on_error(entry_id, rdkafka.as_exception(err))
        except Exception:  # noqa: BLE001 - a bug here must not stop delivery; the entry stays spooled
            log.exception(json.dumps({"event": "delivery_report_failed", "entry": entry_id}))

    def on_ack(self, entry_id: int, key: bytes, partition: int, offset: int | None,
               latency_s: float | None = None) -> None:
        """Kafka has the frame at ``offset`` of ``partition``. ``offset`` None (or negative):
        written, offset unknown — librdkafka says so when a retry's answer is "duplicate
        sequence" (the first attempt was written while its answer was lost: seen after a 30 s
        SIGSTOP of the leader). Reports come in send order per partition, so the frame lies past
        every offset acknowledged on that partition so far: that is where reconciliation must
        start for it (see save_offsets). ``latency_s``: from produce to Kafka's answer, as
        librdkafka measured it (``send_seconds``; None: not known, not observed)."""
        with self._lock:
            if self._in_flight.pop(entry_id, None) is None:
                return  # not ours any more (its producer was dropped): back in the spool already
            if offset is None or offset < 0:
                self._acked_past_head[entry_id] = (partition, self._max_acked.get(
                    partition, self._reconcile_from.get(partition, 0) - 1) + 1)
            else:
                self._max_acked[partition] = max(self._max_acked.get(partition, -1), offset)
                self._acked_past_head[entry_id] = (partition, offset)
        self.spool.ack(entry_id)
        self.counters.sent += 1
        self.connected = True
        self._fatal_backoff.reset()
        if latency_s is not None:
            self.metrics.observe("send_seconds", latency_s)
        if self.on_sent:
            self.on_sent(key)

    def on_error(self, entry_id: int, exc: Exception) -> None:
        with self._lock:
            if self._in_flight.pop(entry_id, None) is None:
                return  # already released with its dropped producer
            self._failed.append(entry_id)
        self.counters.send_errors += 1
        self.connected = False
        log.warning(json.dumps({"event": "send_failed", "entry": entry_id, "error": str(exc)}))

    # -- reconciliation, heartbeats, shutdown -----------------------------------------------
    def reconcile(self) -> None:
        """Drop from the spool the frames that are already on the topic (sent by an earlier session)."""
        pending = self.spool.peek(1_000_000)
        if not pending:
            return
        present: set[bytes] = set()
        try:
            keys = {e.key: e.id for e in pending}
            present = frames_on_topic(self.conn, {e.key: e.value for e in pending}, self._reconcile_from,
                                      _oldest_capture_ms(pending))
            for key in present:
                self.spool.ack(keys[key])
            self.counters.already_on_topic += len(present)
            log.info(json.dumps({"event": "reconciled", "pending": len(pending), "already_on_topic": len(present)}))
        finally:
            self.spool.release([e.id for e in pending if e.key not in present])

    def publish_heartbeat(self, status: str = "running") -> None:
        if self.producer is None:
            return
        hb = AgentHeartbeat(
            camera_id=self.settings.camera_id, agent_version=__version__, at_ns=time.time_ns(),
            interval_s=self.settings.heartbeat_interval_s,
            counters={k: int(v) for k, v in asdict(self.counters).items() if k != "last_seq"},
            spool_frames=self.spool.frames, spool_bytes=self.spool.live_bytes, status=status,
        )
        try:
            self.producer.produce(topics.HEARTBEATS, key=self.settings.camera_id.encode(), value=hb.to_json(),
                                  on_delivery=lambda err, _msg: setattr(self, "connected", err is None))
            self.counters.heartbeats += 1
        except Exception as exc:  # noqa: BLE001 - a missed heartbeat is not worth a crash
            log.warning(json.dumps({"event": "heartbeat_failed", "error": str(exc)}))

    def close(self) -> None:
        """Give what is queued (the last heartbeat, frames in flight) up to 5 s to be delivered,
        then drop the rest: unacknowledged frames stay in the spool for the next run. Called by
        the agent once the sender thread has ended, so the delivery reports served by flush
        here race with nobody."""
        if self.producer is not None:
            try:
                if self.producer.flush(5):
                    self.producer.purge()  # a dead broker: leave now, without their reports
            except Exception:  # noqa: BLE001 - closing a producer to a dead broker may fail
                pass
            self.producer = None

    # -- where reconciliation starts ----------------------------------------------------------
    def _load_offsets(self) -> dict[int, int]:
        try:
            return {int(k): int(v) for k, v in json.loads(self._reconcile_from_path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            pass
        try:  # an older agent's acked-offsets.json: the last acknowledged offset per partition
            old = json.loads(self._old_offsets_path.read_text())
            return {int(k): int(v) + 1 for k, v in old.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def save_offsets(self) -> None:
        """Save, per partition, the first offset reconciliation must read after a crash.

        After a crash the spool hands back every entry past its *persisted* head, and acks are
        out of order across partitions: an entry acknowledged long ago can still be past the
        head. So the start is the lowest offset of an acknowledged entry the persisted head
        does not cover yet, else one past the highest acknowledged offset (entries not
        acknowledged yet land after it: the idempotent producer keeps a partition in send
        order). Saving "the last acknowledged offset" instead skipped such entries and sent
        them twice after a SIGKILL (seen under load in the SIGKILL-while-draining test).
        """
        head = self.spool.persisted_head
        with self._lock:
            for eid in [e for e in self._acked_past_head if e <= head]:
                del self._acked_past_head[eid]
            start = {p: o + 1 for p, o in self._max_acked.items()}
            for p, o in self._acked_past_head.values():
                start[p] = min(start.get(p, o), o)
        start = {**self._reconcile_from, **start}  # partitions not written to since keep their start
        self._reconcile_from = start
        self._reconcile_from_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._reconcile_from_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(start))
        tmp.replace(self._reconcile_from_path)


def _oldest_capture_ms(entries) -> int:
    try:
        return min(envelope.parse(e.value).header.capture_ns for e in entries) // 1_000_000
    except envelope.EnvelopeError:
        return 0


def frames_on_topic(where: Connection | str, wanted: dict[bytes, bytes], start_offsets: dict[int, int],
                    oldest_capture_ms: int, clock_margin_ms: int = 3600_000) -> set[bytes]:
    """Which of the spooled frames ``wanted`` (key -> sealed bytes) are already on the frames topic.

    A frame counts as present only when a record with its key *and the same bytes* is there:
    anyone who can write to the topic can write a record with a genuine frame's key, and
    trusting the key alone would make the agent drop that genuine frame from its spool.

    Each partition is read from ``start_offsets[partition]`` (the first offset the persisted
    spool head does not cover, see :meth:`FrameSender.save_offsets`; for a partition it has none
    for, from the broker time of the oldest pending capture minus a margin for camera clock error)
    up to its end now.
    """

    with clients.RangeReader(where, topics.FRAMES, client_id="tilestream-agent-reconcile", request_timeout_ms=10000,
                             bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS) as reader:
        unknown = [tp.partition for tp in reader.parts if tp.partition not in start_offsets]
        by_time = {}
        if unknown:
            found = reader.consumer.offsets_for_times(
                {tp: max(0, oldest_capture_ms - clock_margin_ms) for tp in reader.parts if tp.partition in unknown})
            by_time = {tp.partition: (o.offset if o is not None else None) for tp, o in found.items()}
        reader.seek(lambda p: start_offsets[p] if p in start_offsets else by_time.get(p))
        return {m.key for m in reader.read_to_end() if m.key in wanted and wanted[m.key] == m.value}
