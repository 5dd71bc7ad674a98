"""The online classifier: tile-features -> assemble frames -> model -> results (thin Kafka shell).

A kafka-python consumer group on ``tile-features``. Tiles are keyed by frame id, so all the
tiles of one frame land in one partition and one classifier instance assembles them.
Offsets are committed only after the results that depend on them were acknowledged by
Kafka (producer flush), and never past a tile of a frame still pending.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Callable

import numpy as np

from tilestream import topics
from tilestream.metrics import Metrics, observe_gc_pauses
from tilestream.records import DeadLetter, FrameResult, StageMetrics, TileBatch, TileLabel

from classifier.assembler import FrameAssembler, PendingFrame
from classifier.model import TileModel
from classifier.registry import ModelWatcher
from classifier.results import AnsweredFrames

log = logging.getLogger("tilestream.classifier")


def classify_frame(model: TileModel, frame: PendingFrame, now_ns: int) -> FrameResult:
    """Pure: a (complete or timed-out) frame's tiles -> its result."""
    tiles = [frame.tiles[i] for i in sorted(frame.tiles)]
    X = np.stack([t.vector() for t in tiles])
    probs = model.predict_proba(X)
    frame_p = model.frame_probabilities(probs)
    classes = model.classes
    first = tiles[0]
    return FrameResult(
        camera_id=first.camera_id,
        seq=first.seq,
        frame_id=first.frame_id,
        capture_ns=first.capture_ns,
        result_ns=now_ns,
        latency_ms=round((now_ns - first.capture_ns) / 1e6, 3),
        label=classes[int(np.argmax(frame_p))],
        probabilities={c: round(float(p), 6) for c, p in zip(classes, frame_p)},
        tiles=[
            TileLabel(t.tile_index, t.x, t.y, t.w, t.h, classes[int(np.argmax(p))], round(float(np.max(p)), 6))
            for t, p in zip(tiles, probs)
        ],
        complete=frame.complete,
        n_tiles=frame.n_tiles,
        missing_tiles=frame.missing(),
        model_id=model.model_id,
        model_version=model.version,
    )


class ClassifierService:
    def __init__(self, bootstrap: str, model: TileModel, group_id: str, frame_timeout_s: float = 30.0,
                 dedup_margin_s: float = 120.0, metrics_interval_s: float = 2.0, models: ModelWatcher | None = None):
        self.bootstrap = bootstrap
        self.model = model
        self.models = models
        self.digest = model.feature_config.digest()
        self.group_id = group_id
        self.assembler = FrameAssembler(frame_timeout_s)
        self.dedup_margin_s = dedup_margin_s
        self.metrics_interval_s = metrics_interval_s
        self.metrics = Metrics("tilestream_classifier")
        observe_gc_pauses(self.metrics)
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._unseeded: set[int] = set()
        self._revoked: set[int] = set()
        self._last_results = 0.0
        self._answered: AnsweredFrames | None = None

    def stop(self) -> None:
        self._stop.set()

    def health(self) -> dict:
        return {"status": "ok", "model_id": self.model.model_id, "model_version": self.model.version,
                "pending_frames": len(self.assembler.pending)}

    def run(self, on_result: Callable[[FrameResult], None] | None = None) -> None:
        from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
        from kafka.structs import OffsetAndMetadata, TopicPartition

        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            client_id=f"{self.group_id}-consumer",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=1000,
            session_timeout_ms=10000,
            heartbeat_interval_ms=3000,
            max_poll_interval_ms=60000,
        )
        producer = KafkaProducer(
            bootstrap_servers=self.bootstrap, client_id=f"{self.group_id}-producer",
            acks="all", enable_idempotence=True, linger_ms=5,
        )
        svc = self

        def commit() -> None:
            offsets = {
                TopicPartition(topics.TILE_FEATURES, p): OffsetAndMetadata(o, "", -1)
                for p, o in svc.assembler.committable().items()
            }
            if offsets:
                producer.flush()
                consumer.commit(offsets)

        class Rebalance(ConsumerRebalanceListener):
            # kafka-python 3 listeners may not block on the network, so offsets are committed after
            # every emitted batch rather than here. Pending frames are forgotten only for partitions
            # that really went to another member (the eager protocol revokes everything, then often
            # hands the same partitions back — and kafka-python then keeps reading where it was, so
            # forgetting them would lose the tiles already read).
            def on_partitions_revoked(self, revoked):
                svc._revoked = {tp.partition for tp in revoked}

            def on_partitions_assigned(self, assigned):
                now_mine = {tp.partition for tp in assigned}
                svc.assembler.forget_partitions(svc._revoked - now_mine)
                svc._revoked = set()
                # Before the first tile of a newly assigned partition is used, the main loop reads
                # back the results written since then (see _seed_dedup).
                svc._unseeded.update(now_mine)
                log.info(json.dumps({"event": "assigned", "partitions": sorted(now_mine)}))

        # Join the group only once this client has the topic's partition metadata: kafka-python
        # joining without it is assigned nothing and (seen here) never rebalances to get partitions.
        deadline = time.monotonic() + 60
        while not consumer.partitions_for_topic(topics.TILE_FEATURES):
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topics.TILE_FEATURES} has no partitions at {self.bootstrap}")
            time.sleep(0.2)
        consumer.subscribe([topics.TILE_FEATURES], listener=Rebalance())
        last_commit = last_metrics = last_model_check = time.monotonic()
        self.last_loop = time.monotonic()
        try:
            while not self._stop.is_set():
                batch = consumer.poll(timeout_ms=200)
                now = self.last_loop = time.monotonic()
                emitted = 0
                fresh = [ms[0].timestamp for tp, ms in batch.items() if tp.partition in self._unseeded and ms]
                if fresh:
                    self._seed_dedup(min(fresh))
                    self._unseeded -= {tp.partition for tp in batch}
                for tp, messages in batch.items():
                    for m in messages:
                        try:
                            rec = TileBatch.from_bytes(m.value)
                            tiles = rec.split()
                        except Exception as exc:  # noqa: BLE001 - anything unparsable is a dead letter
                            self._dead(producer, "malformed", f"tile record does not parse: {exc}", m)
                            continue
                        if rec.feature_digest != self.digest:
                            self._dead(producer, "feature_mismatch",
                                       f"tile features {rec.feature_digest} != model features {self.digest}", m,
                                       rec.frame_id)
                            continue
                        if not tiles:
                            self.assembler.seen(tp.partition, m.offset)
                        for tile in tiles:
                            frame = self.assembler.add(tile, tp.partition, m.offset, now)
                            if frame is not None:
                                self._emit(producer, frame, on_result)
                                emitted += 1
                for frame in self.assembler.expired(now):
                    self.metrics.inc("frames_incomplete_total")
                    log.warning(json.dumps({"event": "frame_incomplete", "frame_id": frame.frame_id,
                                            "missing_tiles": frame.missing()}))
                    self._emit(producer, frame, on_result)
                    emitted += 1
                if emitted or (batch and now - last_commit > 1.0):
                    commit()
                    last_commit = now
                if self.models is not None and now - last_model_check >= 1.0:
                    self._maybe_swap_model(producer)
                    last_model_check = now
                if now - last_metrics >= self.metrics_interval_s:
                    self._publish_metrics(producer, consumer, now - last_metrics)
                    last_metrics = now
            commit()
        finally:
            producer.flush()
            producer.close()
            consumer.close(autocommit=False)
            if self._answered is not None:
                self._answered.close()
            if self.models is not None:
                self.models.close()

    def start_watchdog(self, stall_s: float, on_stall) -> None:
        """Call ``on_stall`` if the poll loop makes no progress for ``stall_s`` seconds.

        kafka-python 3.0.12 was seen (rarely, at start-up) to block forever inside
        ``KafkaConsumer.poll`` while looking for the group coordinator. Restarting is safe by
        design — offsets and the read-back of answered frames make a restart lose and repeat
        nothing — so a stalled classifier restarts itself rather than sit silent.
        """
        self.last_loop = time.monotonic()

        def watch():
            while not self._stop.wait(1.0):
                if time.monotonic() - self.last_loop > stall_s:
                    on_stall()
                    return

        threading.Thread(target=watch, name="classifier-watchdog", daemon=True).start()

    def _maybe_swap_model(self, producer=None) -> None:
        """Between two batches: switch to a newer published model (same features only).

        A refused model record (unsigned, bad signature, unknown key, outside the allow-list...)
        never replaces the running model: it is counted, logged and dead-lettered (reason
        ``model_refused``, the record's first 4 KiB as original).
        """
        try:
            model = self.models.poll()
        except Exception as exc:  # noqa: BLE001 - keep serving the current model
            model = None
            self.metrics.inc("models_refused_total")
            log.error(json.dumps({"event": "model_refused", "version": self.models.version, "error": str(exc)}))
        for r in self.models.take_refusals():
            self.metrics.inc("models_refused_total")
            log.error(json.dumps({"event": "model_refused", "reason": r.reason, "offset": r.offset, "error": r.message}))
            if producer is not None:
                self.metrics.inc("dead_letters_total", reason="model_refused")
                letter = DeadLetter("classifier", "model_refused", f"{r.reason}: {r.message} (record of {r.size} bytes)",
                                    r.head, None, topics.MODELS, r.partition, r.offset)
                producer.send(topics.DEAD_LETTERS, key=b"", value=letter.to_json())
        if model is None:
            return
        old = self.model
        self.model = model
        self.metrics.inc("model_swaps_total")
        log.info(json.dumps({"event": "model_swapped", "from": [old.model_id, old.version],
                             "to": [model.model_id, model.version]}))

    def _seed_dedup(self, first_tile_ms: int) -> None:
        """Remember the frames already answered since ``first_tile_ms - margin``.

        Tiles re-read after a crash or a rebalance start at the committed offset; every result
        that could have been produced from them was written after that tile was, so reading
        the results topic from the tile's timestamp (minus a margin for clock differences
        between producers) finds every frame that must not be answered again.
        """
        since = first_tile_ms - int(self.dedup_margin_s * 1000)
        t0 = time.monotonic()
        if self._answered is None:
            self._answered = AnsweredFrames(self.bootstrap)
        ids = self._answered.catch_up(since)
        self.assembler.remember(ids)
        log.info(json.dumps({"event": "dedup_seeded", "frames": len(ids), "seconds": round(time.monotonic() - t0, 3)}))

    def _publish_metrics(self, producer, consumer, dt: float) -> None:
        results = self.metrics.counter("results_total")
        lag = {}
        try:
            for tp in consumer.assignment():
                high = consumer.highwater(tp)
                if high is not None:
                    lag[f"{tp.topic}/{tp.partition}"] = max(0, high - consumer.position(tp))
        except Exception:  # noqa: BLE001 - metrics must never stop the classifier
            pass
        q = self.metrics.quantiles("capture_to_result_seconds")
        counters = {"results_total": results, "frames_incomplete_total": self.metrics.counter("frames_incomplete_total"),
                    "duplicates_dropped_total": float(self.assembler.duplicates)}
        for (name, labels), value in self.metrics.counters.items():
            if name == "dead_letters_total":
                counters[f"dead_letters_total:{dict(labels)['reason']}"] = value
        snap = StageMetrics(
            stage="classifier", instance=self.instance, at_ns=time.time_ns(), interval_s=self.metrics_interval_s,
            counters=counters, rates={"frames_per_s": (results - self._last_results) / max(dt, 1e-6)},
            latency_ms={"capture_to_result": {f"p{int(k * 100)}": v * 1e3 for k, v in q.items()}} if q else {},
            consumer_lag=lag, group=self.group_id,
            extra={"model_id": self.model.model_id, "model_version": self.model.version,
                   "pending_frames": len(self.assembler.pending)},
        )
        self._last_results = results
        producer.send(topics.METRICS, key=f"classifier/{self.instance}".encode(), value=snap.to_json())

    def _emit(self, producer, frame: PendingFrame, on_result) -> None:
        result = classify_frame(self.model, frame, time.time_ns())
        producer.send(topics.RESULTS, key=result.camera_id.encode(), value=result.to_json())
        self.assembler.done(frame)
        self.metrics.inc("results_total")
        self.metrics.observe("capture_to_result_seconds", result.latency_ms / 1e3)
        if on_result is not None:
            on_result(result)

    def _dead(self, producer, reason: str, message: str, m, frame_id: str | None = None) -> None:
        self.assembler.seen(m.partition, m.offset)
        self.metrics.inc("dead_letters_total", reason=reason)
        log.warning(json.dumps({"event": "dead_letter", "reason": reason, "partition": m.partition, "offset": m.offset}))
        letter = DeadLetter("classifier", reason, message, m.value, frame_id, m.topic, m.partition, m.offset)
        producer.send(topics.DEAD_LETTERS, key=(frame_id or "").encode(), value=letter.to_json())
