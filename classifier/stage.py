"""The classifier stage as one object: tile-feature records in, results and dead letters out.

:class:`FrameClassifier` has no Kafka in it. The service (:mod:`classifier.service`), the tests
and the benchmarks all call the same two methods:

* :meth:`FrameClassifier.on_record` — one ``tile-features`` record (bytes, partition, offset):
  verify its MAC (the stage key, :mod:`tilestream.stagekeys`) before reading a byte of its JSON,
  parse it within bounds, check it against the model, add its tiles, and return what must be
  sent (a result, signed with the classifier's results key, when the record completed a frame;
  a dead letter when the record was refused);
* :meth:`FrameClassifier.on_tick` — frames whose tiles stopped coming (timeout) are answered
  incomplete.

Every record is handled inside one guard: whatever a record makes go wrong ends as a counted
dead letter with one reason (``bad_mac``, ``unknown_key``, ``malformed``, ``feature_mismatch``,
``dim_mismatch``, or ``internal`` for a bug of ours), never as an exception that leaves the loop.
A record without a valid MAC never reaches the assembler: a forged batch for a camera that was
never enrolled cannot become a result.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from tilestream import topics
from tilestream.errors import Refused
from tilestream.metrics import LogBudget, Metrics
from tilestream.records import DeadLetter, FrameResult, Output, TileBatch, TileLabel
from tilestream.stagekeys import ClassifierKeys

from classifier.assembler import FrameAssembler, PendingFrame
from classifier.model import TileModel

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


class FrameClassifier:
    """Assembles frames from tile batches and answers each frame once with the current model."""

    def __init__(self, model: TileModel, metrics: Metrics, frame_timeout_s: float = 30.0, *, keys: ClassifierKeys):
        self.model = model
        self.keys = keys
        self.metrics = metrics
        self.assembler = FrameAssembler(frame_timeout_s)
        self._log_budget = LogBudget()

    @property
    def digest(self) -> str:
        return self.model.feature_config.digest()

    def swap_model(self, model: TileModel) -> None:
        """Between two records: later frames are answered by ``model`` (same features only)."""
        self.model = model

    def on_record(self, value: bytes, partition: int, offset: int, now: float, now_ns: int) -> list[Output]:
        try:
            return self._on_record(value, partition, offset, now, now_ns)
        except Refused as exc:
            return [self.dead_letter(exc.reason, str(exc), value, partition, offset)]
        except Exception as exc:  # noqa: BLE001 - the guard: a record never escapes as an exception
            log.exception(json.dumps({"event": "record_failed", "partition": partition, "offset": offset}))
            return [self.dead_letter("internal", f"{type(exc).__name__}: {exc}", value, partition, offset)]

    def _on_record(self, value: bytes, partition: int, offset: int, now: float, now_ns: int) -> list[Output]:
        rec = TileBatch.from_wire(value, self.keys.mac)
        if rec.feature_digest != self.digest:
            raise Refused("feature_mismatch", f"tile features {rec.feature_digest} != model features {self.digest}")
        dim = getattr(self.model.estimator, "n_features_in_", None)
        if rec.tiles and dim is not None and rec.dim != dim:
            raise Refused("dim_mismatch", f"tile vectors of {rec.dim} values, the model takes {dim}")
        out: list[Output] = []
        tiles = rec.split()
        if not tiles:
            self.assembler.seen(partition, offset)
        for tile in tiles:
            frame = self.assembler.add(tile, partition, offset, now)
            if frame is not None:
                out.append(self._answer(frame, now_ns))
        return out

    def on_tick(self, now: float, now_ns: int) -> list[Output]:
        """Answer the frames whose tiles stopped coming (``frame_timeout_s``), marked incomplete."""
        out = []
        for frame in self.assembler.expired(now):
            self.metrics.inc("frames_incomplete_total")
            log.warning(json.dumps({"event": "frame_incomplete", "frame_id": frame.frame_id,
                                    "missing_tiles": frame.missing()}))
            out.append(self._answer(frame, now_ns))
        return out

    def _answer(self, frame: PendingFrame, now_ns: int) -> Output:
        result = classify_frame(self.model, frame, now_ns)
        self.assembler.done(frame)
        self.metrics.inc("results_total")
        self.metrics.observe("capture_to_result_seconds", max(0.0, result.latency_ms / 1e3))
        return Output(topics.RESULTS, result.camera_id.encode(), result.to_signed(*self.keys.signer.current()))

    def dead_letter(self, reason: str, message: str, value: bytes | None, partition: int, offset: int,
                    frame_id: str | None = None) -> Output:
        self.assembler.seen(partition, offset)
        self.metrics.inc("dead_letters_total", reason=reason)
        held = self._log_budget.take()
        if held is not None:
            log.warning(json.dumps({"event": "dead_letter", "reason": reason, "partition": partition, "offset": offset,
                                    "not_logged_before": held}))
        letter = DeadLetter.of("classifier", reason, message, value, frame_id, topics.TILE_FEATURES, partition, offset)
        return Output(topics.DEAD_LETTERS, (letter.frame_id or "").encode(), letter.to_json())
