"""The processor stage as one object: sealed frames and tile jobs in; tile batches, tile jobs,
dead letters and replay marks out.

:class:`ProcessorStage` has no Faust and no Kafka in it. The worker (:mod:`stream_processor.app`),
the tests and the benchmarks all run the same per-record path:

* :meth:`ProcessorStage.frame` — one ``frames`` record (bytes, partition, offset, reference
  time): verify the device signature -> replay check -> open, decode, then either the tile
  features of the whole frame (one :class:`~tilestream.records.TileBatch`, MACed with the stage
  key) or, for a frame of at least ``fanout_min_pixels``, one encrypted tile job per band
  (:mod:`stream_processor.tilejobs`) -> the replay mark;
* :meth:`ProcessorStage.tile_job` — one ``tile-jobs`` record: open and authenticate the job ->
  replay check of its band -> the band's features (a MACed TileBatch) -> the replay mark.

Both are coroutines because a record's work crosses three places, and which place runs a step
is the worker's business, not the stage's (:class:`StageIO`): the signature check and the
replay check run on the event loop (~0.1 ms; the replay state is only ever touched there), the
replay state must be current before the check (``await io.replay_state()``: after a start or a
rebalance the worker first reads ``replay-marks`` to the end), the heavy work runs where
``io.compute`` puts it, told the step's declared pixels (the worker: inline for a small frame,
its thread pool for a large one or a tile job, so the loop keeps serving commits and
rebalances), and ``io.send`` hands the records to the producer in order: the tile records
first, the replay mark after them (accept-then-mark, see :mod:`stream_processor.replay`).
:meth:`ProcessorStage.on_frame` and :meth:`ProcessorStage.on_tile_job` run the same coroutine
with everything inline and return what it sent, as ``list[Output]`` — what the tests and the
benchmarks call.

Every record is handled inside one guard: a known refusal (``FrameRejected``, ``Refused``)
keeps its reason; anything else — a decoder or numpy error we did not foresee — is a counted
``internal`` dead letter with the original (still encrypted) record, never an exception that
leaves the agent. A frame accepted by the replay check and refused by a later step still gets
its mark: a copy of it is a replay too.

Metrics are only touched from the coroutine's own steps (the event loop in the worker), never
from ``io.compute``: the snapshot publisher iterates the counters on the loop.

:class:`ReplaySync` keeps the stage's replay state current from ``replay-marks`` (asyncio plus
one reader thread; the reader is :class:`stream_processor.replay.MarksFollower`, given).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine

from tilestream import topics
from tilestream.config import FeatureConfig, Settings
from tilestream.crypto import FrameRejected
from tilestream.envelope import Envelope
from tilestream.errors import Refused
from tilestream.keys import KeyStore
from tilestream.metrics import Metrics
from tilestream.records import DeadLetter, Output, TileBatch
from tilestream.stagekeys import StageKeys

from stream_processor import replay, tilejobs
from stream_processor.pipeline import FrameProcessor, StageTimes

log = logging.getLogger("tilestream.processor")
STAGES = ("verify", "open", "decode", "features")
UNSYNCED = object()  # consumer generation before the first read of replay-marks


class StageIO:
    """Where the steps of a record run. This one runs everything inline and keeps what was sent
    (tests, benchmarks); the worker's runs ``compute`` in its thread pool, waits for the
    replay-marks read in ``replay_state`` and sends through Faust."""

    def __init__(self) -> None:
        self.sent: list[Output] = []

    async def compute(self, fn: Callable[..., Any], *args: Any, pixels: int | None = None) -> Any:
        """Run ``fn(*args)``. ``pixels``: the most pixels the step may decode or compute on (the
        signed header's width x height, which the decoder holds the image to), when known; the
        worker runs a small step inline and a large or unknown one in its thread pool."""
        return fn(*args)

    async def replay_state(self) -> None:
        return None

    async def send(self, outputs: list[Output]) -> None:
        self.sent += outputs


def run_inline(coro: Coroutine) -> Any:
    """Run a coroutine that never waits on anything (the inline :class:`StageIO`) to its end, without a loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the record's path waited on something: not an inline StageIO")


@dataclass
class _Record:
    """One record on its way through the steps."""

    value: bytes
    partition: int
    offset: int
    t0: float = field(default_factory=time.perf_counter)
    rejected: FrameRejected | None = None
    verdict: replay.Verdict | None = None  # set once the replay check accepted it

    @property
    def going(self) -> bool:
        return self.rejected is None


@dataclass
class _Frame(_Record):
    env: Envelope | None = None
    t_checked: float = 0.0
    times: StageTimes = field(default_factory=StageTimes)
    batches: list[TileBatch] | None = None
    jobs: list[tuple[bytes, bytes]] | None = None


@dataclass
class _Job(_Record):
    job: tilejobs.TileJob | None = None
    band: Any = None
    batch: TileBatch | None = None


def _refusal(exc: BaseException, what: str, header=None) -> FrameRejected:
    """The guard: a known refusal keeps its reason, anything else is ``internal`` (and logged with its trace)."""
    if isinstance(exc, FrameRejected):
        return exc
    if isinstance(exc, Refused):
        return FrameRejected(exc.reason, str(exc), header)
    log.error(json.dumps({"event": what}), exc_info=exc)
    return FrameRejected("internal", f"{type(exc).__name__}: {exc}", header)


class ProcessorStage:
    """The processor's per-record work, its replay state and its counters."""

    def __init__(self, processor: FrameProcessor, replays: replay.ReplayState, *, tile_key_id: str,
                 tile_keys: dict[str, bytes], stage_keys, metrics: Metrics, features: FeatureConfig,
                 fanout_min_pixels: int, n_bands: int):
        self.processor = processor
        self.replays = replays
        self.tile_key_id, self.tile_keys = tile_key_id, tile_keys
        self.mark_keys = replay.derive_mark_keys(tile_keys)
        self.stage_keys = stage_keys  # followed across rotations: .current() -> (kid, key) per record
        self.metrics = metrics
        self.features = features
        self.fanout_min_pixels = fanout_min_pixels
        self.n_bands = n_bands

    @classmethod
    def create(cls, settings: Settings, metrics: Metrics) -> "ProcessorStage":
        """The stage of a worker with ``settings``, its keys read from ``settings.keys_path()``.

        Keys: the cloud private keys, the admin-signed device registry (refused and counted in
        registry_refused_total if it does not verify), the shared tile-job key, which the worker
        never makes itself (TileKeyMissing: `tilestream keys tile-key create`, copied to every
        host), and the stage key (none: ConfigError, which says how to make one)."""
        ps = settings.processor
        keystore = KeyStore(settings.keys_path())
        processor = FrameProcessor(keystore.cloud_private_keys(), keystore.device_registry(metrics=metrics),
                                   settings.features, max_bytes=settings.kafka.max_frame_bytes,
                                   max_pixels=ps.max_image_pixels)
        tile_key_id, tile_keys = keystore.tile_keys()
        stage_keys = StageKeys(keystore.path).mac_keys()
        stage_keys.current()
        return cls(processor, replay.ReplayState(ps.replay_window_seqs, ps.max_frame_age_s, ps.max_clock_skew_s),
                   tile_key_id=tile_key_id, tile_keys=tile_keys, stage_keys=stage_keys, metrics=metrics,
                   features=settings.features, fanout_min_pixels=ps.fanout_min_pixels,
                   n_bands=ps.fanout_bands or settings.kafka.tile_jobs_partitions)

    # -- per record, inline (tests, benchmarks) ---------------------------------------------------
    def on_frame(self, value: bytes, partition: int, offset: int, ref_ns: int | None = None) -> list[Output]:
        """What :meth:`frame` sends for one ``frames`` record, everything run here.
        ``ref_ns``: the broker's append time of the record (default: now)."""
        io = StageIO()
        run_inline(self.frame(value, partition, offset, time.time_ns() if ref_ns is None else ref_ns, io))
        return io.sent

    def on_tile_job(self, value: bytes, partition: int, offset: int) -> list[Output]:
        """What :meth:`tile_job` sends for one ``tile-jobs`` record, everything run here."""
        io = StageIO()
        run_inline(self.tile_job(value, partition, offset, io))
        return io.sent

    # -- frames -----------------------------------------------------------------------------------
    async def frame(self, value: bytes, partition: int, offset: int, ref_ns: int, io: StageIO) -> None:
        """One ``frames`` record, start to end (see the module docstring for where each step runs)."""
        f = _Frame(value, partition, offset)
        self._verify(f)
        if f.going:
            await io.replay_state()
            self._check_frame(f, ref_ns)
        if f.going:
            await io.compute(self._open_frame, f, pixels=f.env.header.width * f.env.header.height)
        await io.send(self._frame_outputs(f))
        if f.going:
            self._frame_done(f)

    def _verify(self, f: _Frame) -> None:
        try:
            f.env = self.processor.verify(f.value)
        except Exception as exc:  # noqa: BLE001 - the guard (module docstring)
            f.rejected = _refusal(exc, "frame_failed")

    def _check_frame(self, f: _Frame, ref_ns: int) -> None:
        h = f.env.header
        try:
            verdict = self.replays.check(h.camera_id, replay.NO_BAND, h.seq, h.capture_ns, topics.FRAMES, f.partition,
                                         f.offset, ref_ns)
        except Exception as exc:  # noqa: BLE001 - the guard
            f.rejected = _refusal(exc, "frame_failed", h)
            return
        if verdict.refused:
            f.rejected = FrameRejected(verdict.kind, f"frame {h.frame_id}: {verdict.detail}", h)
        else:
            f.verdict = verdict
            if verdict.kind == "redelivery":  # processed again: the work Faust's commits did not cover
                self.metrics.inc("redeliveries_total")
        f.t_checked = time.perf_counter()

    def _open_frame(self, f: _Frame) -> None:
        """Where ``io.compute`` runs it: open + decode, then the whole frame's features or the band jobs."""
        env = f.env
        try:
            gray = self.processor.open_and_decode(env, f.times)
            if gray.size >= self.fanout_min_pixels:
                f.jobs = tilejobs.make_jobs(env.header, gray, self.features, self.n_bands, self.tile_key_id,
                                            self.tile_keys[self.tile_key_id])
            else:
                f.batches = self.processor.features_of(env.header, gray, f.times)
        except FrameRejected as rej:
            f.rejected = rej
        except Exception as exc:  # noqa: BLE001 - the guard
            log.exception(json.dumps({"event": "frame_failed", "frame_id": env.header.frame_id}))
            f.rejected = FrameRejected("internal", f"{type(exc).__name__}: {exc}", env.header)

    def _frame_outputs(self, f: _Frame) -> list[Output]:
        if f.rejected is not None:
            # accepted, then refused by a later step: a copy is still a replay, so it keeps its mark
            return [self.dead_letter(f.rejected, f.value, topics.FRAMES, f.partition, f.offset), *self._mark(f.verdict)]
        out: list[Output] = []
        if f.jobs is not None:
            out += [Output(topics.TILE_JOBS, key, job) for key, job in f.jobs]
            self.metrics.inc("tile_jobs_total", len(f.jobs))
        else:
            out += [Output(topics.TILE_FEATURES, rec.frame_id.encode(), rec.to_wire(*self.stage_keys.current()))
                    for rec in f.batches]
            self.metrics.inc("tiles_total", sum(len(r.tiles) for r in f.batches))
        return out + self._mark(f.verdict)  # accept-then-mark: sent after the records it vouches for

    def _frame_done(self, f: _Frame) -> None:
        """After the sends (so ``frame_seconds`` is the whole of the record's time in the agent)."""
        m, times = self.metrics, f.times
        m.inc("frames_total")
        times.verify = f.t_checked - f.t0
        for stage in STAGES:
            m.observe("stage_seconds", getattr(times, stage), stage=stage)
        m.observe("frame_seconds", time.perf_counter() - f.t0)
        m.observe("capture_to_features_seconds", max(0.0, (time.time_ns() - f.env.header.capture_ns) / 1e9))

    # -- tile jobs --------------------------------------------------------------------------------
    async def tile_job(self, value: bytes, partition: int, offset: int, io: StageIO) -> None:
        """One ``tile-jobs`` record, start to end."""
        j = _Job(value, partition, offset)
        await io.compute(self._open_job, j)
        if j.going:
            await io.replay_state()
            self._check_job(j, time.time_ns())
        if j.going:
            await io.compute(self._job_features, j)
        await io.send(self._job_outputs(j))
        if j.going:
            self.metrics.observe("tile_job_seconds", time.perf_counter() - j.t0)

    def _open_job(self, j: _Job) -> None:
        try:
            j.job, j.band = tilejobs.open_job(j.value, self.tile_keys)
            tilejobs.check_binding(j.job)
        except FrameRejected as rej:
            j.rejected = rej
        except Exception as exc:  # noqa: BLE001 - the guard of one tile-job record
            log.exception(json.dumps({"event": "tile_job_failed"}))
            j.rejected = FrameRejected("internal", f"{type(exc).__name__}: {exc}")

    def _check_job(self, j: _Job, now_ns: int) -> None:
        try:
            verdict = replay.check_job(self.replays, j.job, j.partition, j.offset, now_ns)
        except Exception as exc:  # noqa: BLE001 - the guard
            j.rejected = _refusal(exc, "tile_job_failed")
            return
        if verdict.refused:
            j.rejected = FrameRejected(verdict.kind, f"tile job {j.job.frame_id}#{j.job.band}: {verdict.detail}")
        else:
            j.verdict = verdict

    def _job_features(self, j: _Job) -> None:
        try:
            j.batch = tilejobs.job_features(j.job, j.band, self.features, self.processor.digest)
        except Exception as exc:  # noqa: BLE001 - the guard
            log.exception(json.dumps({"event": "tile_job_failed", "frame_id": j.job.frame_id}))
            j.rejected = FrameRejected("internal", f"{type(exc).__name__}: {exc}")

    def _job_outputs(self, j: _Job) -> list[Output]:
        if j.rejected is not None:
            return [self.dead_letter(j.rejected, j.value, topics.TILE_JOBS, j.partition, j.offset, stage="tiles"),
                    *self._mark(j.verdict)]
        self.metrics.inc("tiles_total", len(j.batch.tiles))
        return [Output(topics.TILE_FEATURES, j.batch.frame_id.encode(), j.batch.to_wire(*self.stage_keys.current())),
                *self._mark(j.verdict)]

    # -- shared -----------------------------------------------------------------------------------
    def _mark(self, verdict: replay.Verdict | None) -> list[Output]:
        if verdict is None or verdict.mark is None:
            return []
        key, value = replay.encode_mark(verdict.mark, self.tile_key_id, self.mark_keys[self.tile_key_id])
        return [Output(topics.REPLAY_MARKS, key, value)]

    def dead_letter(self, rej: FrameRejected, value: bytes, topic: str, partition: int, offset: int,
                    stage: str = "processor") -> Output:
        """Counted, logged, and built by :meth:`DeadLetter.of` with the original record."""
        self.metrics.inc("dead_letters_total", reason=rej.reason)
        fid = rej.header.frame_id if rej.header else None
        log.warning(json.dumps({"event": "dead_letter", "stage": stage, "reason": rej.reason, "frame_id": fid,
                                "partition": partition, "offset": offset, "error": str(rej)}))
        letter = DeadLetter.of(stage, rej.reason, str(rej), value, fid, topic, partition, offset)
        return Output(topics.DEAD_LETTERS, (fid or "").encode(), letter.to_json())


class ReplaySync:
    """The stage's replay state, kept current from ``replay-marks`` (design: :mod:`stream_processor.replay`).

    :meth:`ready` reads the topic to its end after a start or a rebalance (a new consumer
    generation) before anything is checked, and fails closed: until that read succeeds it
    retries (backoff up to 10 s) and nothing is checked, while Faust keeps the group membership.
    :meth:`follow` adds what other workers marked since (a timer). Reads run in one thread of
    their own (the reader is blocking); merging happens on the loop, where the checks run."""

    def __init__(self, replays: replay.ReplayState, reader, metrics: Metrics):
        self.replays = replays
        self.reader = reader  # .read_new() -> [Mark], .refused
        self.metrics = metrics
        self.generation: Any = UNSYNCED
        self._lock: asyncio.Lock | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tilestream-marks")

    async def read(self) -> None:
        """Fold what was added to replay-marks into the state."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            marks = await asyncio.get_running_loop().run_in_executor(self._io, self.reader.read_new)
            replay.merge_all(self.replays, marks)
            self.metrics.set("replay_marks_refused", float(self.reader.refused))

    async def ready(self, generation: int) -> None:
        delay = 0.5
        while self.generation != generation:
            try:
                await self.read()
                self.generation = generation
            except Exception as exc:  # noqa: BLE001 - broker away / topic missing: wait, retry
                log.warning(json.dumps({"event": "replay_marks_unreadable", "error": str(exc), "retry_in_s": delay}))
                await asyncio.sleep(delay)
                delay = min(10.0, delay * 2)

    async def follow(self) -> None:
        if self.generation is not UNSYNCED:  # after the first full read: only what other workers added
            try:
                await self.read()
            except Exception as exc:  # noqa: BLE001 - retried on the next tick
                log.warning(json.dumps({"event": "replay_marks_unreadable", "error": str(exc)}))
