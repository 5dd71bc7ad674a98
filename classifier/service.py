"""The online classifier service: the Kafka shell around :class:`classifier.stage.FrameClassifier`.

    tile-features --(group tilestream-classifier)--> FrameClassifier --> results, dead-letters, metrics

One plain loop in one thread: a librdkafka group consumer and an idempotent librdkafka producer
(:mod:`kafkaio.rdkafka`), no event loop and no worker thread. librdkafka does the network I/O,
the heartbeats and the produce requests in its own C threads, so a model call in the loop never
delays a heartbeat; only ``max.poll.interval.ms`` (120 s) between two polls counts, and a member
that is evicted anyway (a stopped VM, a machine swapping) rejoins by itself in a later poll.
Why not asyncio (aiokafka) any more: its loop (socket writes, wake-ups, callbacks), the hand-off
to a model thread and the wait for every result's acknowledgement before the next poll were most
of its CPU (py-spy: event loop 32 %, select/wait 26 %, executor plumbing 11 %, records 11 %,
model 10 %). Back to back (benchmarks/classifier_bench.py --rate 20 --alt-src, 3 reps), CPU ms per
frame of the classifier process at 20 frames/s: 2.78, 3.04, 2.88 on librdkafka against 4.63,
4.68, 3.59 on aiokafka; the same records cost 2.64 ms in process when they come one every 50 ms
(1.22 back to back: caches go cold between frames), so what is left is mostly the frame's own
work (the loop thread 2.75 ms a frame, librdkafka's threads 0.33, /proc per thread). In the
closed-loop pipeline (pipeline_bench, 1 worker) 3.3, 2.6, 3.3, 3.1 against 4.3, 3.8, 3.7, 3.6.

Delivery: at least once in, exactly one result per frame out.

* The loop does not wait for a poll's results to be acknowledged before it polls again: the
  acknowledgements come back as delivery reports, and offsets are committed only up to the
  newest poll whose outputs, and every earlier poll's, Kafka acknowledged
  (:class:`classifier.acks.AckedOffsets`); never past a tile of a frame still pending
  (FrameAssembler) either. While records flow, commits go out at most every ``COMMIT_EVERY_S``
  and asynchronously. A send that fails (its delivery report says so, after librdkafka's own
  retries for ``DELIVERY_TIMEOUT_MS``) is sent again; one that still fails after
  ``SEND_ATTEMPTS`` stops the service with an error before anything is committed past it (a
  restart re-reads, nothing is lost). At most ``MAX_UNACKED`` outputs are in flight: beyond
  that the loop waits for acknowledgements before it reads on (bounded memory).
* Tiles re-read after a crash or a rebalance may belong to frames answered already: before
  the first tile of a newly assigned partition is used, the results written since then are
  read back (:class:`classifier.results.AnsweredFrames`) and those frames are not answered again.
* On revocation (librdkafka calls back inside a poll, in this thread, so between two batches)
  the service waits for the acknowledgements of what it sent, commits what is safe, and forgets
  the pending frames and the uncommitted offsets of the revoked partitions (their tiles are
  re-read by whoever owns them next). Partitions *lost* (this member was evicted) are forgotten
  without a commit.

Health is judged from what the service does, not from whether its thread is alive:
``/healthz`` says ``stalled`` (HTTP 503) when the poll loop has not turned for
``stall_after_s``, when records wait on assigned partitions and none was read for that long,
or when the service has held no partition for that long; ``/metrics`` exports the assigned
partitions, rebalances, lag and the seconds since the last record.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor

from confluent_kafka import KafkaException, TopicPartition

from kafkaio import Connection, connection, rdkafka
from tilestream import topics
from tilestream.errors import TilestreamError
from tilestream.metrics import Liveness, Snapshots, freeze_long_lived, observe_gc_pauses
from tilestream.records import DeadLetter

from classifier.acks import AckedOffsets, Batch
from classifier.registry import ModelWatcher
from classifier.results import AnsweredFrames
from classifier.stage import FrameClassifier, Output

log = logging.getLogger("tilestream.classifier")

SEND_ATTEMPTS = 3
# How often offsets are committed while records flow: one commit per frame cost as much as reading
# it (6 % of the classifier's busy samples at 40 frames/s, when it committed after every poll).
COMMIT_EVERY_S = 0.5
# How long a revocation or the shutdown waits for the acknowledgements of what was sent before it
# commits what is safe: one request timeout (kafkaio.rdkafka.REQUEST_TIMEOUT_MS).
CONSUMER_WAIT_S = 10.0
# After a commit failed (coordinator away or stuck), no commit for this long: a commit request
# holds the heartbeats behind it on the coordinator connection (see kafkaio.rdkafka.GROUP_TIMING),
# so commits sent back to back at a stuck coordinator starve the session.
COMMIT_BACKOFF_S = 10.0
# How long a poll waits for the first record. Stop requests, model checks and metrics are served
# between polls, so this bounds how late they are; an idle classifier wakes 5 times a second.
POLL_S = 0.2
# Outputs sent and not yet acknowledged, at most (bounded memory while a leader is away): at 1-20 KB
# a result, ~20 MB. Backlog polls of 500 records make 500 results; two polls stay in flight.
MAX_UNACKED = 1000
# How long librdkafka may try to deliver one output (its own retries included) before its delivery
# report says it failed and the service sends it again (SEND_ATTEMPTS). Longer than a broker freeze
# plus fencing and a leader move (~30 s in the hung-broker fault test).
DELIVERY_TIMEOUT_MS = 60000
# The largest request the producer makes: a dead letter carries the refused record (a
# tile-features record is at most the topic's 1 MB, 1.4 MB as base64 in the letter's JSON).
MAX_REQUEST_BYTES = 4 * 1024 * 1024


class SendFailed(TilestreamError, RuntimeError):
    """A result or dead letter Kafka did not acknowledge after SEND_ATTEMPTS: the service stops
    before committing anything past it."""


class KafkaFatal(TilestreamError, RuntimeError):
    """librdkafka reported a fatal error (the idempotent producer or the consumer can go on no
    more): the service stops, nothing unacknowledged was committed, a restart re-reads."""


class ClassifierService:
    def __init__(self, where: Connection | str, classifier: FrameClassifier, group_id: str,
                 dedup_margin_s: float = 120.0, metrics_interval_s: float = 2.0, models: ModelWatcher | None = None,
                 stall_after_s: float = 60.0, max_records: int = 500):
        self.conn = connection(where)
        self.classifier = classifier
        self.metrics = classifier.metrics
        self.models = models
        self.group_id = group_id
        self.dedup_margin_s = dedup_margin_s
        self.metrics_interval_s = metrics_interval_s
        self.max_records = max(1, max_records)
        observe_gc_pauses(self.metrics)
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self._stop_requested = False
        # Model checks read the models topic (kafka-python) in a thread of their own, and the loop
        # never waits for one: a check that hit a frozen models leader held the loop, so no tile was
        # classified, for the 22 s it took (py-spy, hung-broker fault test).
        self._models_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="classifier-models")
        self._model_check: Future | None = None
        self._unseeded: set[int] = set()
        self._answered: AnsweredFrames | None = None
        self._snapshots = Snapshots(self.metrics, "classifier", self.instance, group_id, metrics_interval_s,
                                    rates={"frames_per_s": "results_total"})
        self.liveness = Liveness(stall_after_s)  # /healthz from what the loop does
        self.assigned: set[int] = set()
        self.lag: dict[int, int] = {}
        self.acks = AckedOffsets()
        self.committed: dict[int, int] = {}  # partition -> offset Kafka confirmed committed
        self._commit_out_since: float | None = None
        self._commit_not_before = 0.0  # backoff after a failed commit (COMMIT_BACKOFF_S)
        self._retry: list[tuple[Output, Batch, int]] = []
        self._failure: Exception | None = None
        self._producer = None

    # -- control ------------------------------------------------------------------------
    def stop(self) -> None:
        """Thread- and signal-safe: ask the loop to finish (drain, commit, leave the group, close)."""
        self._stop_requested = True

    def run(self) -> None:
        self.serve()

    def health(self) -> dict:
        problems = self.liveness.problems(sum(self.lag.values()))
        model = self.classifier.model
        return {"status": "stalled" if problems else "ok", "problems": problems, "model_id": model.model_id,
                "model_version": model.version, "assigned_partitions": sorted(self.assigned),
                "pending_frames": len(self.classifier.assembler.pending),
                "seconds_since_record": round(self.liveness.seconds_since_record(), 1)}

    # -- the loop -----------------------------------------------------------------------
    def serve(self) -> None:
        kafka_log = logging.getLogger("tilestream.classifier.kafka")
        producer = rdkafka.producer(self.conn, "stage", f"{self.group_id}-producer",
                                    max_request_bytes=MAX_REQUEST_BYTES, delivery_timeout_ms=DELIVERY_TIMEOUT_MS,
                                    error_cb=self._on_kafka_error, logger=kafka_log)
        self._producer = producer
        consumer = rdkafka.group_consumer(self.conn, self.group_id, f"{self.group_id}-consumer",
                                          error_cb=self._on_kafka_error, logger=kafka_log, on_commit=self._on_commit)
        try:
            consumer.subscribe([topics.TILE_FEATURES], on_assign=self._on_assign, on_revoke=self._on_revoke,
                               on_lost=self._on_lost)
            # Model, modules and clients are made: later full collections skip them (a 65 ms pause
            # each otherwise, see freeze_long_lived).
            freeze_long_lived()
            self._loop_until_stopped(consumer, producer)
            self._drain(producer, CONSUMER_WAIT_S)
            self._commit(consumer, wait=True)
        finally:
            try:
                # Leaves the group: the partitions move at once, not after the session timeout. The
                # revocation callback runs in here and commits only what was acknowledged.
                consumer.close()
            finally:
                producer.flush(5.0)  # the last metrics snapshot; results were drained above
                if self._answered is not None:
                    self._answered.close()
                if self.models is not None:
                    self._close_models()

    def _close_models(self) -> None:
        """Close the watcher, unless a check still reads with it (a hung broker): that thread ends
        with its read budget and the process; stopping the service does not wait for it."""
        check = self._model_check
        if check is not None:
            try:
                check.result(5.0)
            except Exception:  # noqa: BLE001 - a failed or stuck check: nothing left to report
                pass
        if check is None or check.done():
            self.models.close()
        self._models_io.shutdown(wait=False, cancel_futures=True)

    def _loop_until_stopped(self, consumer, producer) -> None:
        last_commit = last_metrics = last_model_check = time.monotonic()
        while not self._stop_requested:
            self._serve_deliveries(producer, 0)
            if self.acks.unacked > MAX_UNACKED:
                self._wait_for_room(producer)
                continue
            # poll() returns at the first record; consume(n, 0) then takes what is already fetched
            # (consume(n, timeout) would wait for n records or the whole timeout).
            first = consumer.poll(POLL_S)
            msgs = [] if first is None else [first, *(consumer.consume(self.max_records - 1, 0)
                                                      if self.max_records > 1 else ())]
            now = time.monotonic()
            self.liveness.turned()
            outputs = self._handle_batch(self._records(msgs), now)
            self._send(producer, outputs)
            if now - last_commit >= COMMIT_EVERY_S:
                self._commit(consumer)
                last_commit = now
            if self.models is not None and now - last_model_check >= 1.0:
                last_model_check = now
                self._maybe_swap_model(producer)
            if now - last_metrics >= self.metrics_interval_s:
                self._publish_metrics(consumer, producer, now - last_metrics)
                last_metrics = now

    def _records(self, msgs: list) -> list:
        """The records of a poll, without librdkafka's error events (counted and logged) and without
        records of partitions revoked while this poll ran (their next owner reads them)."""
        out = []
        for m in msgs:
            err = m.error()
            if err is not None:
                self.metrics.inc("consume_errors_total")
                log.warning(json.dumps({"event": "consume_error", "error": err.str(), "partition": m.partition()}))
            elif m.partition() in self.assigned:
                out.append(m)
        if out:
            self.liveness.read()
        return out

    def _handle_batch(self, msgs: list, now: float) -> list[Output]:
        """Read back answered frames for new partitions, then every record, then the frames that
        timed out; the batch's outputs are tracked with the offsets they guard."""
        out: list[Output] = []
        if msgs:
            fresh = [m.timestamp()[1] for m in msgs if m.partition() in self._unseeded]
            if fresh:
                self._seed_dedup(min(fresh))
                self._unseeded -= {m.partition() for m in msgs}
            out = self.classifier.on_records([(m.value(), m.partition(), m.offset()) for m in msgs], now,
                                             time.time_ns())
        return out + self.classifier.on_tick(now, time.time_ns())

    # -- sending ------------------------------------------------------------------------
    def _send(self, producer, outputs: list[Output], guards_offsets: bool = True) -> None:
        """Hand ``outputs`` to librdkafka as one batch of :class:`AckedOffsets`: its offsets (those
        committable now) become safe when every output of it and of the batches before is acked."""
        offsets = ({p: o for p, o in self.classifier.assembler.committable().items() if p in self.assigned}
                   if guards_offsets else {})
        batch = self.acks.add(len(outputs), offsets)
        for o in outputs:
            self._produce(producer, o, batch, 1)
        if outputs:
            producer.poll(0)  # serve the delivery reports already in (cheap: no wait)

    def _produce(self, producer, o: Output, batch: Batch, attempt: int) -> None:
        def delivered(err, _msg) -> None:  # in this thread, inside producer.poll()/flush()
            if err is None:
                self.acks.acked(batch)
                return
            self._send_failed(o, batch, attempt, rdkafka.as_exception(err))

        while True:
            try:
                producer.produce(o.topic, value=o.value, key=o.key, on_delivery=delivered)
                return
            except BufferError:
                # librdkafka's queue is full (a leader away): serve delivery reports, then queue it
                # again; nothing was appended, so it cannot be written twice.
                if self._stop_requested:
                    raise SendFailed("stopping while librdkafka's queue is full; nothing past it was committed")
                self.metrics.inc("send_requeued_total", topic=o.topic)
                producer.poll(0.1)
            except KafkaException as exc:  # refused before it was queued (e.g. too large): no retry helps
                self._send_failed(o, batch, SEND_ATTEMPTS, exc)
                return

    def _send_failed(self, o: Output, batch: Batch, attempt: int, err: Exception) -> None:
        self.metrics.inc("send_errors_total", topic=o.topic)
        log.error(json.dumps({"event": "send_failed", "topic": o.topic, "attempt": attempt,
                              "error": f"{type(err).__name__}: {err}"}))
        if attempt < SEND_ATTEMPTS:
            self._retry.append((o, batch, attempt + 1))
        elif self._failure is None:
            self._failure = SendFailed(f"a record to {o.topic} could not be sent after {SEND_ATTEMPTS} attempts "
                                       f"({err}); nothing past it was committed")

    def _serve_deliveries(self, producer, timeout_s: float) -> None:
        """Delivery reports (acks advance the safe offsets), then the failed sends again; raises
        the failure that ends the service."""
        producer.poll(timeout_s)
        while self._retry and self._failure is None:
            retry, self._retry = self._retry, []
            for o, batch, attempt in retry:
                self._produce(producer, o, batch, attempt)
        if self._failure is not None:
            raise self._failure

    def _wait_for_room(self, producer) -> None:
        """More than MAX_UNACKED outputs in flight: wait for acknowledgements (up to a poll's time)."""
        deadline = time.monotonic() + POLL_S
        while self.acks.unacked > MAX_UNACKED and time.monotonic() < deadline and not self._stop_requested:
            self._serve_deliveries(producer, 0.05)

    def _drain(self, producer, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every output sent to be acknowledged (or to fail for good)."""
        deadline = time.monotonic() + timeout_s
        while self.acks.unacked > 0 or self._retry:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            producer.flush(min(left, 1.0))
            self._serve_deliveries(producer, 0)
        return True

    def _on_kafka_error(self, err) -> None:
        """librdkafka's client errors (broker down, authentication...), in this thread."""
        self.metrics.inc("kafka_errors_total")
        log.warning(json.dumps({"event": "kafka_error", "error": err.str(), "fatal": err.fatal()}))
        if err.fatal() and self._failure is None:
            self._failure = KafkaFatal(f"librdkafka: {err.str()}")

    # -- commits ------------------------------------------------------------------------
    def _commit(self, consumer, wait: bool = False) -> None:
        """Commit what is safe (:class:`AckedOffsets`) and not committed yet, for the partitions held.

        In the loop (``wait`` false) asynchronously: the loop goes on and the outcome comes back
        to :meth:`_on_commit` in a later poll; while one is out (for at most CONSUMER_WAIT_S), the
        next call skips (the one after carries the newer offsets). An awaited commit held the
        loop, and every result, for a whole 30 s broker freeze when the coordinator was the frozen
        node (hung-broker fault test, aiokafka). A commit that has not happened only means tiles
        re-read after a rebalance, which the read-back of answered frames absorbs. On revocation
        and at the end (``wait``) the commit is waited for. A commit refused because the group is
        rebalancing is not an error: the revocation callback commits again."""
        offsets = {p: o for p, o in self.acks.safe.items() if p in self.assigned and self.committed.get(p) != o}
        if not offsets:
            return
        tps = [TopicPartition(topics.TILE_FEATURES, p, o) for p, o in sorted(offsets.items())]
        now = time.monotonic()
        if not wait:
            if self._commit_out_since is not None and now - self._commit_out_since < CONSUMER_WAIT_S:
                return
            if now < self._commit_not_before:
                return
            self._commit_out_since = now
            try:
                consumer.commit(offsets=tps, asynchronous=True)
            except KafkaException as exc:
                self._commit_outcome(exc.args[0] if exc.args else None, [])
            return
        try:
            self._commit_outcome(None, consumer.commit(offsets=tps, asynchronous=False))
        except KafkaException as exc:
            self._commit_outcome(exc.args[0] if exc.args else None, [])

    def _on_commit(self, err, partitions) -> None:
        self._commit_out_since = None
        self._commit_outcome(err, partitions)

    def _commit_outcome(self, err, partitions) -> None:
        if err is None:
            failed = [tp for tp in partitions or [] if tp.error is not None]
            for tp in partitions or []:
                if tp.error is None and tp.topic == topics.TILE_FEATURES:
                    self.committed[tp.partition] = tp.offset
            if not failed:
                return
            err = failed[0].error
        if hasattr(err, "code") and rdkafka.is_rebalance_refusal(err):
            self.metrics.inc("commit_refused_total")
            log.info(json.dumps({"event": "commit_refused", "error": str(err)}))
        else:  # coordinator away: the next commit carries these offsets too
            self._commit_not_before = time.monotonic() + COMMIT_BACKOFF_S
            self.metrics.inc("commit_failed_total")
            log.warning(json.dumps({"event": "commit_failed", "error": str(err)}))

    # -- rebalances (librdkafka calls these inside poll()/consume()/close(), in this thread) ------
    def _on_assign(self, consumer, partitions) -> None:
        now_mine = {tp.partition for tp in partitions}
        self.assigned = now_mine
        self.liveness.holds(len(now_mine))
        # Before the first tile of a newly assigned partition is used, the results written since
        # then are read back (see _seed_dedup).
        self._unseeded |= now_mine
        log.info(json.dumps({"event": "assigned", "partitions": sorted(now_mine)}))

    def _on_revoke(self, consumer, partitions) -> None:
        try:  # what was sent is acknowledged and committed first
            if self._producer is not None:
                self._drain(self._producer, CONSUMER_WAIT_S)
            self._commit(consumer, wait=True)
        except Exception as exc:  # noqa: BLE001 - the new owner re-reads from the last commit
            log.warning(json.dumps({"event": "commit_on_revoke_failed", "error": f"{type(exc).__name__}: {exc}"}))
        self._forget({tp.partition for tp in partitions})

    def _on_lost(self, consumer, partitions) -> None:
        """Evicted (a session that expired): the partitions are someone else's already; no commit."""
        log.warning(json.dumps({"event": "partitions_lost", "partitions": sorted(tp.partition for tp in partitions)}))
        self._forget({tp.partition for tp in partitions})

    def _forget(self, gone: set[int]) -> None:
        self.classifier.assembler.forget_partitions(gone)
        self.acks.forget(gone)
        for p in gone:
            self.committed.pop(p, None)
        self.assigned -= gone
        self._unseeded -= gone
        self.metrics.inc("rebalances_total")
        self.liveness.holds(len(self.assigned))

    def _seed_dedup(self, first_tile_ms: int) -> None:
        """Remember the frames already answered since ``first_tile_ms - margin``.

        Tiles re-read after a crash or a rebalance start at the committed offset; every result
        that could have been produced from them was written after that tile was, so reading
        the results topic from the tile's timestamp (minus a margin for clock differences
        between producers) finds every frame that must not be answered again.
        """
        since = first_tile_ms - int(self.dedup_margin_s * 1000)
        t0 = time.monotonic()
        delay = 0.5
        while True:
            # No tile of the batch is used before the read-back succeeded (answering without it
            # could answer a frame twice), so a failure is retried, not raised: raising here ended
            # the service when a broker hung for 30 s (the read's ListOffsets timed out, and the
            # classifier exited). The loop, and with it the group heartbeat, goes on meanwhile;
            # /healthz says "stalled" if this outlasts stall_after_s.
            try:
                if self._answered is None:
                    self._answered = AnsweredFrames(self.conn, self.classifier.keys.results)  # verified results only
                ids = self._answered.catch_up(since)
                break
            except Exception as exc:  # noqa: BLE001 - broker away or hung: retry with backoff
                if self._stop_requested:
                    raise
                self.metrics.inc("dedup_seed_failures_total")
                log.warning(json.dumps({"event": "dedup_seed_failed", "error": f"{type(exc).__name__}: {exc}",
                                        "retry_in_s": delay}))
                # A fresh client for the next try: kafka-python 3.0.12's consumer that had requests
                # pending on the hung node kept failing every lookup (60 s each, three in a row) long
                # after the node was back; a new one read the topic at once.
                answered, self._answered = self._answered, None
                if answered is not None:
                    try:
                        answered.close()
                    except Exception:  # noqa: BLE001 - a client that is stuck may not close cleanly
                        pass
                time.sleep(delay)
                delay = min(10.0, delay * 2)
        self.classifier.assembler.remember(ids)
        self.metrics.set("results_unverified_skipped", float(self._answered.skipped))
        log.info(json.dumps({"event": "dedup_seeded", "frames": len(ids), "seconds": round(time.monotonic() - t0, 3),
                             "skipped": self._answered.skipped_by_reason}))

    def _maybe_swap_model(self, producer) -> None:
        """Between two batches: switch to a newer published model (same features only).

        The check itself (:meth:`ModelWatcher.poll`) runs in its own thread, started by one call
        and collected by a later one, so a slow read of the models topic delays a model swap,
        never a tile. A refused model record (unsigned, bad signature, unknown key, outside the
        allow-list...) never replaces the running model: it is counted, logged and dead-lettered
        (reason ``model_refused``, the record's first 4 KiB as original). A check that fails to
        read (a broker away or hung) is counted in ``model_checks_failed_total`` and made again.
        """
        check = self._model_check
        if check is None:
            self._model_check = self._models_io.submit(self.models.poll)
            return
        if not check.done():
            return  # still reading; the loop goes on
        self._model_check = None
        try:
            model = check.result()
        except Exception as exc:  # noqa: BLE001 - keep serving the current model
            model = None
            self.metrics.inc("model_checks_failed_total")
            log.warning(json.dumps({"event": "model_check_failed", "version": self.models.version,
                                    "error": f"{type(exc).__name__}: {exc}"}))
        letters = []
        for r in self.models.take_refusals():
            self.metrics.inc("models_refused_total")
            self.metrics.inc("dead_letters_total", reason="model_refused")
            log.error(json.dumps({"event": "model_refused", "reason": r.reason, "offset": r.offset, "error": r.message}))
            letter = DeadLetter.of("classifier", "model_refused", f"{r.reason}: {r.message} (record of {r.size} bytes)",
                                   r.head, None, topics.MODELS, r.partition, r.offset)
            letters.append(Output(topics.DEAD_LETTERS, b"", letter.to_json()))
        if letters:  # acknowledged like results: a failure stops the service (SEND_ATTEMPTS)
            self._send(producer, letters, guards_offsets=False)
        if model is None:
            return
        old = self.classifier.model
        self.classifier.swap_model(model)
        self.metrics.inc("model_swaps_total")
        log.info(json.dumps({"event": "model_swapped", "from": [old.model_id, old.version],
                             "to": [model.model_id, model.version]}))
        del old
        freeze_long_lived()  # the new model frozen, the old one collectable (one full pause per swap)

    def _publish_metrics(self, consumer, producer, dt: float) -> None:
        lag = {}
        try:
            # Both local (no request): the position is the next offset this consumer hands over,
            # the high watermark the one of the partition's last fetch response.
            positions = consumer.position(consumer.assignment())
        except KafkaException:  # a rebalance right now: no lag this time
            positions = []
        for tp in positions:
            try:
                _, high = consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if high >= 0 and tp.offset >= 0:
                lag[tp.partition] = max(0, high - tp.offset)
        self.lag = lag
        m = self.metrics
        m.set("assigned_partitions", float(len(self.assigned)))
        m.set("seconds_since_record", self.liveness.seconds_since_record())
        m.set("healthy", 1.0 if self.health()["status"] == "ok" else 0.0)
        m.set("unacked_outputs", float(self.acks.unacked))
        for p, v in lag.items():
            m.set("consumer_lag", float(v), partition=f"{topics.TILE_FEATURES}/{p}")
        results = m.counter("results_total")
        counters = {"results_total": results, "frames_incomplete_total": m.counter("frames_incomplete_total"),
                    "duplicates_dropped_total": float(self.classifier.assembler.duplicates),
                    "rebalances_total": m.counter("rebalances_total")}
        model = self.classifier.model
        snap = self._snapshots.take(
            counters, {"capture_to_result": ("capture_to_result_seconds", {})},
            {f"{topics.TILE_FEATURES}/{p}": v for p, v in lag.items()},
            {"model_id": model.model_id, "model_version": model.version,
             "pending_frames": len(self.classifier.assembler.pending), "assigned_partitions": sorted(self.assigned)},
            dt=dt)
        # Metrics are best effort: a lost snapshot is replaced by the next one, never retried (also
        # one librdkafka could not queue, a partition's leader away).
        try:
            producer.produce(topics.METRICS, key=f"classifier/{self.instance}".encode(), value=snap.to_json())
        except (BufferError, KafkaException):
            self.metrics.inc("metrics_dropped_total")
