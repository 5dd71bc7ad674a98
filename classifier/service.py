"""The online classifier service: the Kafka shell around :class:`classifier.stage.FrameClassifier`.

    tile-features --(group tilestream-classifier)--> FrameClassifier --> results, dead-letters, metrics

One asyncio loop owns an aiokafka group consumer and an idempotent producer (see
:mod:`kafkaio` for why aiokafka: kafka-python 3.0.12 lost this consumer's group membership
and never rejoined). Parsing and the model run in one worker thread, so the loop, and with it
aiokafka's heartbeat task, is never held for longer than a batch hand-off; a member that is
evicted anyway (a stopped VM, a machine swapping) rejoins on the next ``getmany`` by itself.

Delivery: at least once in, exactly one result per frame out.

* Offsets are committed only after every result and dead letter that depends on them was
  acknowledged by Kafka, and never past a tile of a frame still pending (FrameAssembler); while
  records flow, at most every ``COMMIT_EVERY_S`` (one commit per frame cost as much as reading it).
  A send that fails is retried; one that still fails stops the service with an error
  before anything is committed (a restart re-reads, nothing is lost).
* Tiles re-read after a crash or a rebalance may belong to frames answered already: before
  the first tile of a newly assigned partition is used, the results written since then are
  read back (:class:`classifier.results.AnsweredFrames`) and those frames are not answered again.
* On revocation the service finishes the batch in hand, commits, and forgets the pending
  frames of the revoked partitions (their tiles are re-read by whoever owns them next).

Health is judged from what the service does, not from whether its thread is alive:
``/healthz`` says ``stalled`` (HTTP 503) when the poll loop has not turned for
``stall_after_s``, when records wait on assigned partitions and none was read for that long,
or when the service has held no partition for that long; ``/metrics`` exports the assigned
partitions, rebalances, lag and the seconds since the last record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, KafkaTimeoutError
from aiokafka.structs import TopicPartition

from kafkaio import Connection, aio, connection
from tilestream import topics
from tilestream.errors import TilestreamError
from tilestream.metrics import Liveness, Snapshots, observe_gc_pauses
from tilestream.records import DeadLetter

from classifier.registry import ModelWatcher
from classifier.results import AnsweredFrames
from classifier.stage import FrameClassifier, Output

log = logging.getLogger("tilestream.classifier")

SEND_ATTEMPTS = 3
# How often offsets are committed while records flow (see _loop_until_stopped).
COMMIT_EVERY_S = 0.5
# How long a revocation or the shutdown waits for a commit still out before committing again: one
# consumer request timeout (kafkaio.aio.CONSUMER_REQUEST_TIMEOUT_MS).
CONSUMER_WAIT_S = 10.0


class SendFailed(TilestreamError, RuntimeError):
    """A result or dead letter Kafka did not acknowledge after SEND_ATTEMPTS: the service stops
    before committing anything past it."""


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
        self.max_records = max_records
        observe_gc_pauses(self.metrics)
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self._stop: asyncio.Event | None = None
        self._stop_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="classifier-cpu")
        # Model checks read the models topic (kafka-python) in a thread of their own, and the loop
        # never waits for one: a check that hit a frozen models leader held the loop and the cpu
        # thread, so no tile was classified, for the 22 s it took (py-spy, hung-broker fault test).
        self._models_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="classifier-models")
        self._model_check: asyncio.Future | None = None
        self._commit_task: asyncio.Task | None = None
        self._busy = asyncio.Lock()
        self._unseeded: set[int] = set()
        self._answered: AnsweredFrames | None = None
        self._snapshots = Snapshots(self.metrics, "classifier", self.instance, group_id, metrics_interval_s,
                                    rates={"frames_per_s": "results_total"})
        self.liveness = Liveness(stall_after_s)  # /healthz from what the loop does
        self.assigned: set[int] = set()
        self.lag: dict[int, int] = {}

    # -- control ------------------------------------------------------------------------
    def stop(self) -> None:
        """Thread- and signal-safe: ask the loop to finish (commit, leave the group, close)."""
        self._stop_requested = True
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def run(self) -> None:
        asyncio.run(self.serve())

    def health(self) -> dict:
        problems = self.liveness.problems(sum(self.lag.values()))
        model = self.classifier.model
        return {"status": "stalled" if problems else "ok", "problems": problems, "model_id": model.model_id,
                "model_version": model.version, "assigned_partitions": sorted(self.assigned),
                "pending_frames": len(self.classifier.assembler.pending),
                "seconds_since_record": round(self.liveness.seconds_since_record(), 1)}

    # -- the loop -----------------------------------------------------------------------
    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._stop_requested:  # stop() came before the loop existed
            self._stop.set()
        consumer = aio.group_consumer(self.conn, self.group_id, client_id=f"{self.group_id}-consumer")
        producer = aio.producer(self.conn, client_id=f"{self.group_id}-producer")
        await producer.start()
        try:
            await consumer.start()
            consumer.subscribe([topics.TILE_FEATURES], listener=_Listener(self, consumer, producer))
            await self._loop_until_stopped(consumer, producer)
            async with self._busy:
                await self._commit(consumer, producer, wait=True)
        finally:
            await consumer.stop()  # leaves the group: the partitions move at once, not after the session timeout
            await producer.stop()
            self._cpu.shutdown(wait=True)
            if self._answered is not None:
                self._answered.close()
            if self.models is not None:
                await self._close_models()

    async def _close_models(self) -> None:
        """Close the watcher, unless a check still reads with it (a hung broker): that thread ends
        with its read budget and the process; stopping the service does not wait for it."""
        check = self._model_check
        if check is not None:
            try:
                await asyncio.wait_for(asyncio.shield(check), 5.0)
            except Exception:  # noqa: BLE001 - a failed or stuck check: nothing left to report
                pass
        if check is None or check.done():
            self.models.close()
        self._models_io.shutdown(wait=False, cancel_futures=True)

    async def _loop_until_stopped(self, consumer, producer) -> None:
        loop = asyncio.get_running_loop()
        last_commit = last_metrics = last_model_check = time.monotonic()
        uncommitted = False
        while not self._stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
            now = time.monotonic()
            self.liveness.turned()
            async with self._busy:
                if batch:
                    self.liveness.read()
                # One hand-off to the worker thread per turn (records and timeouts together): each
                # costs a submit and two loop wake-ups, and at camera rates a poll holds one record.
                outputs = await loop.run_in_executor(self._cpu, self._handle_batch, batch, now)
                await self._send(producer, outputs)
                uncommitted = uncommitted or bool(outputs or batch)
                # At most every COMMIT_EVERY_S, not after every poll with a result: at camera rates
                # that was one OffsetCommit request per frame (6 % of the classifier's busy samples
                # at 40 frames/s). Offsets never pass an unacknowledged result either way; a crash
                # re-reads at most this much more, and the read-back of answered frames absorbs it.
                if uncommitted and now - last_commit >= COMMIT_EVERY_S:
                    await self._commit(consumer, producer)
                    last_commit, uncommitted = now, False
            if self.models is not None and now - last_model_check >= 1.0:
                last_model_check = now
                await self._maybe_swap_model(loop, producer)
            if now - last_metrics >= self.metrics_interval_s:
                await self._publish_metrics(consumer, producer, now - last_metrics)
                last_metrics = now

    def _handle_batch(self, batch: dict, now: float) -> list[Output]:
        """In the worker thread: read back answered frames for new partitions, then every record,
        then the frames that timed out."""
        out: list[Output] = []
        if batch:
            fresh = [ms[0].timestamp for tp, ms in batch.items() if tp.partition in self._unseeded and ms]
            if fresh:
                self._seed_dedup(min(fresh))
                self._unseeded -= {tp.partition for tp in batch}
            out = self.classifier.on_records([(m.value, tp.partition, m.offset) for tp, messages in batch.items()
                                              for m in messages], now, time.time_ns())
        return out + self.classifier.on_tick(now, time.time_ns())

    async def _send(self, producer, outputs: list[Output]) -> None:
        """Send and wait for every acknowledgement; retry failures, raise SendFailed at the end."""
        todo = outputs
        for attempt in range(1, SEND_ATTEMPTS + 1):
            if not todo:
                return
            futures = [await self._enqueue(producer, o) for o in todo]
            done = await asyncio.gather(*futures, return_exceptions=True)
            failed = [(o, r) for o, r in zip(todo, done) if isinstance(r, BaseException)]
            for o, err in failed:
                self.metrics.inc("send_errors_total", topic=o.topic)
                log.error(json.dumps({"event": "send_failed", "topic": o.topic, "attempt": attempt,
                                      "error": f"{type(err).__name__}: {err}"}))
            todo = [o for o, _ in failed]
            if todo:
                await asyncio.sleep(0.5 * attempt)
        if todo:
            raise SendFailed(f"{len(todo)} records could not be sent after {SEND_ATTEMPTS} attempts; "
                             "nothing past them was committed")

    async def _enqueue(self, producer, o: Output):
        """``producer.send``, queued again while aiokafka cannot queue it within its request timeout.

        aiokafka raises KafkaTimeoutError from ``send()`` only *before* the record is appended
        (the partition's batch is full while its request is still out to a leader that hung or
        died, or the topic has no metadata yet), so queueing it again cannot write it twice. With
        the 10 s request timeout (kafkaio.aio.PRODUCER_REQUEST_TIMEOUT_MS; it was 40 s) that
        exception ended the service in a controller-kill fault run ("classifier exited with code
        1"); waiting is what the longer timeout did, without the exit."""
        while True:
            try:
                return await producer.send(o.topic, value=o.value, key=o.key)
            except KafkaTimeoutError:
                if self._stop_requested:
                    raise
                self.metrics.inc("send_requeued_total", topic=o.topic)
                log.warning(json.dumps({"event": "send_requeued", "topic": o.topic}))

    async def _commit(self, consumer, producer, wait: bool = False) -> None:
        """Commit what is safe to commit: every result and dead letter was acknowledged in
        :meth:`_send` before this is called, so the offsets never run ahead of them.

        In the loop (``wait`` false) the commit runs as a task of its own and the loop goes on;
        while one is still out, the next call skips (the one after carries the newer offsets).
        Why: a commit waits for the group coordinator to be known, and with a broker hung aiokafka
        can take until the node is back to find it (FindCoordinator goes to a random node, and a
        connection attempt to the hung one holds the client's connection lock for the request
        timeout): an awaited commit held the loop, and every result, for the whole 30 s freeze
        while the fetches and sends had long moved to the new leaders (hung-broker fault test). A
        commit that has not happened only means tiles re-read after a rebalance, which the
        read-back of answered frames absorbs. On revocation and at the end (``wait``) the commit
        is awaited, after the one still out. A commit refused because the group is rebalancing is
        not an error: the revocation callback commits again."""
        offsets = {TopicPartition(topics.TILE_FEATURES, p): o
                   for p, o in self.classifier.assembler.committable().items() if p in self.assigned}
        pending = self._commit_task
        if not wait:
            if offsets and (pending is None or pending.done()):
                self._commit_task = asyncio.ensure_future(self._commit_offsets(consumer, offsets))
            return
        if pending is not None and not pending.done():
            await asyncio.wait([pending], timeout=CONSUMER_WAIT_S)
        if offsets:
            await self._commit_offsets(consumer, offsets)

    async def _commit_offsets(self, consumer, offsets: dict) -> None:
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            self.metrics.inc("commit_refused_total")
            log.info(json.dumps({"event": "commit_refused", "error": f"{type(exc).__name__}: {exc}"}))
        except KafkaError as exc:  # coordinator away: the next commit carries these offsets too
            self.metrics.inc("commit_failed_total")
            log.warning(json.dumps({"event": "commit_failed", "error": f"{type(exc).__name__}: {exc}"}))

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

    async def _maybe_swap_model(self, loop, producer) -> None:
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
            self._model_check = loop.run_in_executor(self._models_io, self.models.poll)
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
        await self._send(producer, letters)
        if model is None:
            return
        old = self.classifier.model
        self.classifier.swap_model(model)
        self.metrics.inc("model_swaps_total")
        log.info(json.dumps({"event": "model_swapped", "from": [old.model_id, old.version],
                             "to": [model.model_id, model.version]}))

    async def _publish_metrics(self, consumer, producer, dt: float) -> None:
        lag = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                try:
                    # Bounded: position() waits for an offset reset when the position is unknown,
                    # and a reset asks the partition's leader, which may be the node that hangs.
                    lag[tp.partition] = max(0, high - await asyncio.wait_for(consumer.position(tp), 1.0))
                except Exception:  # noqa: BLE001 - a partition being revoked right now has no position
                    pass
        self.lag = lag
        m = self.metrics
        m.set("assigned_partitions", float(len(self.assigned)))
        m.set("seconds_since_record", self.liveness.seconds_since_record())
        m.set("healthy", 1.0 if self.health()["status"] == "ok" else 0.0)
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
        # one aiokafka could not queue within its request timeout, a partition's leader away).
        try:
            await producer.send(topics.METRICS, key=f"classifier/{self.instance}".encode(), value=snap.to_json())
        except KafkaTimeoutError:
            self.metrics.inc("metrics_dropped_total")


class _Listener(ConsumerRebalanceListener):
    """aiokafka rebalance callbacks, awaited by its coordinator task on the loop."""

    def __init__(self, svc: ClassifierService, consumer, producer):
        self.svc, self.consumer, self.producer = svc, consumer, producer

    async def on_partitions_revoked(self, revoked) -> None:
        svc = self.svc
        async with svc._busy:  # the batch in hand is finished, sent and committed first
            try:
                await svc._commit(self.consumer, self.producer, wait=True)
            except Exception as exc:  # noqa: BLE001 - the new owner re-reads from the last commit
                log.warning(json.dumps({"event": "commit_on_revoke_failed", "error": f"{type(exc).__name__}: {exc}"}))
            gone = {tp.partition for tp in revoked}
            svc.classifier.assembler.forget_partitions(gone)
            svc.assigned -= gone
            svc._unseeded -= gone
        svc.metrics.inc("rebalances_total")
        svc.liveness.holds(len(svc.assigned))

    async def on_partitions_assigned(self, assigned) -> None:
        svc = self.svc
        now_mine = {tp.partition for tp in assigned}
        svc.assigned = now_mine
        svc.liveness.holds(len(now_mine))
        # Before the first tile of a newly assigned partition is used, the worker thread reads back
        # the results written since then (see _seed_dedup).
        svc._unseeded |= now_mine
        log.info(json.dumps({"event": "assigned", "partitions": sorted(now_mine)}))
