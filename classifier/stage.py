"""The classifier stage as one object: tile-feature records in, results and dead letters out.

:class:`FrameClassifier` has no Kafka in it. The service (:mod:`classifier.service`), the tests
and the benchmarks all call the same methods:

* :meth:`FrameClassifier.on_records` — the ``tile-features`` records of one poll (bytes,
  partition, offset each; :meth:`FrameClassifier.on_record` is one of them): verify each one's
  MAC (the stage key, :mod:`tilestream.stagekeys`) before reading a byte of its body, parse it
  within bounds, check it against the model, and return what must be sent: a result, signed
  with the classifier's results key, for each frame the records completed; a dead letter for
  each record refused. A record that carries a whole frame (every frame below the processor's
  fan-out size) is classified from its matrix as it came; bands of a fanned-out frame are
  assembled tile by tile (:mod:`classifier.assembler`). The frames completed by one poll are
  classified with one model call over all their rows;
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
from dataclasses import dataclass

import numpy as np

from tilestream import topics
from tilestream.errors import Refused
from tilestream.metrics import LogBudget, Metrics
from tilestream.records import DeadLetter, FrameRef, FrameResult, Output, TileBatch, TileLabel
from tilestream.stagekeys import ClassifierKeys

from classifier.assembler import FrameAssembler, PendingFrame
from classifier.model import TileModel

log = logging.getLogger("tilestream.classifier")

# Rows of one model call when a poll completed several frames. Bounded because past ~3,000 rows
# (160 values) OpenBLAS splits the product over both cores and the classifier's CPU per frame went
# up, not down (0.044 CPU ms for 0.022 wall ms a vtest frame at 60 frames a call; 0.033 CPU = wall
# at 16 frames, 0.27 ms at one frame a call).
MAX_ROWS_PER_CALL = 2048


def classify_rows(model: TileModel, frame: FrameRef, n_tiles: int, tiles: list, probs: np.ndarray, complete: bool,
                  missing: list[int], now_ns: int) -> FrameResult:
    """Pure: a frame's tiles (``[index, x, y, w, h]``, in index order) and their rows of
    ``model.predict_proba`` -> its result."""
    frame_p = model.frame_probabilities(probs)
    classes = model.classes
    # Per tile at once (argmax/max over rows), not np.argmax/np.max per row: 108 x 2 numpy calls
    # were 0.6 ms of the classifier's ~3 ms per vtest frame. Same values: max of a row is that row's
    # element, and round(float, 6) sees the same float.
    best, top = probs.argmax(axis=1).tolist(), probs.max(axis=1).tolist()
    return FrameResult(
        camera_id=frame.camera_id,
        seq=frame.seq,
        frame_id=frame.frame_id,
        capture_ns=frame.capture_ns,
        result_ns=now_ns,
        latency_ms=round((now_ns - frame.capture_ns) / 1e6, 3),
        label=classes[int(np.argmax(frame_p))],
        probabilities={c: round(float(p), 6) for c, p in zip(classes, frame_p)},
        tiles=[TileLabel(t[0], t[1], t[2], t[3], t[4], classes[b], round(p, 6)) for t, b, p in zip(tiles, best, top)],
        complete=complete,
        n_tiles=n_tiles,
        missing_tiles=missing,
        model_id=model.model_id,
        model_version=model.version,
    )


def frame_rows(frame: PendingFrame) -> tuple[FrameRef, list, np.ndarray]:
    """An assembled frame's identity, tiles in index order and their feature rows."""
    tiles = [frame.tiles[i] for i in sorted(frame.tiles)]
    return (tiles[0].frame, [[t.tile_index, t.x, t.y, t.w, t.h] for t in tiles],
            np.stack([t.vector() for t in tiles]))


def classify_frame(model: TileModel, frame: PendingFrame, now_ns: int) -> FrameResult:
    """Pure: a (complete or timed-out) frame's tiles -> its result."""
    ref, tiles, X = frame_rows(frame)
    return classify_rows(model, ref, frame.n_tiles, tiles, model.predict_proba(X), frame.complete, frame.missing(),
                         now_ns)


@dataclass
class _Ready:
    """A frame to answer in this batch: from one record that carried all its tiles (``pending``
    None) or assembled from several (``pending``); ``record`` is (value, partition, offset) of the
    record that completed it, for a dead letter if answering it fails."""

    frame: FrameRef
    n_tiles: int
    tiles: list
    X: np.ndarray
    pending: PendingFrame | None
    record: tuple


class FrameClassifier:
    """Assembles frames from tile batches and answers each frame once with the current model."""

    def __init__(self, model: TileModel, metrics: Metrics, frame_timeout_s: float = 30.0, *, keys: ClassifierKeys):
        self.model = model
        self.keys = keys
        self.metrics = metrics
        self.assembler = FrameAssembler(frame_timeout_s)
        self._log_budget = LogBudget()
        self._digest_of: TileModel | None = None
        self._digest = ""

    @property
    def digest(self) -> str:
        # Once per model, not per record: the digest hashes the config's JSON (0.05 ms a record).
        model = self.model
        if self._digest_of is not model:
            self._digest, self._digest_of = model.feature_config.digest(), model
        return self._digest

    def swap_model(self, model: TileModel) -> None:
        """Between two records: later frames are answered by ``model`` (same features only)."""
        self.model = model

    def on_record(self, value: bytes, partition: int, offset: int, now: float, now_ns: int) -> list[Output]:
        return self.on_records([(value, partition, offset)], now, now_ns)

    def on_records(self, records, now: float, now_ns: int) -> list[Output]:
        """``records``: (value, partition, offset) of one poll, in order. Each record is read inside
        its own guard; the frames they complete are then answered with one model call over all
        their rows (see :meth:`_answer_all`). Dead letters come first in the outputs, then the
        results in the order their frames completed."""
        out: list[Output] = []
        ready: list[_Ready] = []
        for value, partition, offset in records:
            try:
                self._on_record(value, partition, offset, now, ready)
            except Refused as exc:
                out.append(self.dead_letter(exc.reason, str(exc), value, partition, offset))
            except Exception as exc:  # noqa: BLE001 - the guard: a record never escapes as an exception
                log.exception(json.dumps({"event": "record_failed", "partition": partition, "offset": offset}))
                out.append(self.dead_letter("internal", f"{type(exc).__name__}: {exc}", value, partition, offset))
        return out + self._answer_all(ready, now_ns)

    def _on_record(self, value: bytes, partition: int, offset: int, now: float, ready: list[_Ready]) -> None:
        rec = TileBatch.from_wire(value, self.keys.mac)
        if rec.feature_digest != self.digest:
            raise Refused("feature_mismatch", f"tile features {rec.feature_digest} != model features {self.digest}")
        dim = getattr(self.model.estimator, "n_features_in_", None)
        if rec.tiles and dim is not None and rec.dim != dim:
            raise Refused("dim_mismatch", f"tile vectors of {rec.dim} values, the model takes {dim}")
        if not rec.tiles:
            self.assembler.seen(partition, offset)
            return
        if len(rec.tiles) == rec.n_tiles and rec.frame_id not in self.assembler.pending:
            # The whole frame in one record (every frame below the fan-out size): its matrix as it
            # came, rows in index order, no per-tile objects (108 per vtest frame).
            if self.assembler.take_whole(rec.frame_id, rec.n_tiles, partition, offset):
                X = rec.matrix()
                tiles = rec.tiles
                order = [t[0] for t in tiles]
                if order != sorted(order):
                    idx = np.argsort(order, kind="stable")
                    X, tiles = X[idx], [tiles[i] for i in idx]
                ready.append(_Ready(rec.frame, rec.n_tiles, tiles, X, None, (value, partition, offset)))
            return
        for tile in rec.split():
            frame = self.assembler.add(tile, partition, offset, now)
            if frame is not None:
                ref, tiles, X = frame_rows(frame)
                ready.append(_Ready(ref, frame.n_tiles, tiles, X, frame, (value, partition, offset)))

    def _answer_all(self, ready: list[_Ready], now_ns: int) -> list[Output]:
        """One ``predict_proba`` over the rows of the frames completed by the batch, at most
        :data:`MAX_ROWS_PER_CALL` rows at a time, then each frame's result. One call per vtest frame
        (108 rows) cost 0.27 ms, mostly sklearn's input checks and dispatch; over 16 frames, 0.033 ms
        a frame. Should a call fail, its frames are answered one by one inside the guard, so a frame
        that breaks the model is one ``internal`` dead letter."""
        out: list[Output] = []
        i = 0
        while i < len(ready):
            j, rows = i + 1, len(ready[i].X)
            while j < len(ready) and rows + len(ready[j].X) <= MAX_ROWS_PER_CALL:
                rows += len(ready[j].X)
                j += 1
            group, probs = ready[i:j], None
            if len(group) > 1:
                try:
                    probs = self.model.predict_proba(np.concatenate([r.X for r in group]))
                except Exception:  # noqa: BLE001 - answered one by one below, each in its guard
                    probs = None
            if probs is None:
                out += [self._answer_guarded(r, now_ns) for r in group]
            else:
                bounds = np.cumsum([0] + [len(r.X) for r in group]).tolist()
                out += [self._answer_guarded(r, now_ns, probs[a:b]) for r, a, b in zip(group, bounds, bounds[1:])]
            i = j
        return out

    def _answer_guarded(self, r: _Ready, now_ns: int, probs: np.ndarray | None = None) -> Output:
        try:
            if probs is None:
                probs = self.model.predict_proba(r.X)
            complete = r.pending is None or r.pending.complete
            missing = [] if r.pending is None else r.pending.missing()
            return self._emit(classify_rows(self.model, r.frame, r.n_tiles, r.tiles, probs, complete, missing, now_ns),
                              r.pending)
        except Exception as exc:  # noqa: BLE001 - the guard, as for the record that completed the frame
            value, partition, offset = r.record
            log.exception(json.dumps({"event": "record_failed", "partition": partition, "offset": offset}))
            if r.pending is not None:
                self.assembler.done(r.pending)  # no second attempt from on_tick: the dead letter keeps the record
            return self.dead_letter("internal", f"{type(exc).__name__}: {exc}", value, partition, offset)

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
        return self._emit(classify_frame(self.model, frame, now_ns), frame)

    def _emit(self, result: FrameResult, frame: PendingFrame | None) -> Output:
        if frame is not None:
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
