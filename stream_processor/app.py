"""The Faust stream processor: all wiring in one place.

    frames (sealed)  --process_frames-->  tile-features   (one TileBatch per frame, key = frame id)
                     \\--> tile-jobs  --compute_tile_jobs--> tile-features   (frames >= fanout_min_pixels)
                     \\--> dead-letters   (DeadLetter: stage, reason, original still-encrypted record)
    every 2 s        ------------------>  metrics         (StageMetrics snapshot for the dashboard)

Per frame: verify the device signature (on the loop, ~0.1 ms) -> replay check -> open, decode,
tile and features in a thread pool (``run_in_executor``) so the event loop keeps serving
heartbeats, commits and rebalances -> send the tile records. Agent concurrency stays 1
(faust-streaming #606).

Replays: :mod:`stream_processor.replay` (its docstring has the design). Per camera a durable
record of accepted seqs on the compacted ``replay-marks`` topic, read by every worker at start,
after every rebalance and every ``replay_sync_interval_s``, plus a capture-time window: a frame
accepted before is ``replay`` on any partition, any worker, after any restart; one captured
more than ``max_frame_age_s`` before it reached Kafka is ``stale``. The same record re-read
(same partition and offset: Faust's redelivery after a crash) is processed again. Tile jobs
are checked the same way per band. Not a Faust table: the windowed table that was here before
had its changelog recovered on every rebalance, which paused the frames partitions and lost
frames in 2-worker runs; a group-less reader of a plain compacted topic has no part in
rebalancing.

Tile batches are MACed with the stage key (:mod:`tilestream.stagekeys`, the current one, followed
across rotations) as they are sent: the classifier believes only what a processor wrote.

Delivery: at least once. Faust commits a frame's offset after its tile records were handed
to the producer; a worker killed before that commit has its frames re-read by the next owner.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faust

from kafkaio import Connection, aio, connection
from kafkaio.clients import ensure_topics
from tilestream import topics
from tilestream.config import Settings
from tilestream.crypto import FrameRejected
from tilestream.keys import KeyStore
from tilestream.metrics import Metrics, observe_gc_pauses
from tilestream.stagekeys import StageKeys
from tilestream.records import DeadLetter, StageMetrics

from stream_processor import replay, tilejobs, transport
from stream_processor.pipeline import FrameProcessor, StageTimes

log = logging.getLogger("tilestream.processor")
STAGES = ("verify", "open", "decode", "features")
UNSYNCED = object()  # consumer generation before the first read of replay-marks


def faust_broker(conn: Connection) -> dict:
    """``faust.App`` keyword arguments for the broker: its URL list and the connection's credentials
    (the same TLS context and SASL user every other client of this process uses, from kafkaio)."""
    hosts = ";".join(f"kafka://{h.strip()}" for h in conn.bootstrap.split(",") if h.strip())
    out: dict = {"broker": hosts}
    if conn.sasl:
        out["broker_credentials"] = faust.SASLCredentials(
            username=conn.sasl_username, password=conn.sasl_password, ssl_context=conn.ssl_context(),
            mechanism=conn.sasl_mechanism)
    elif conn.tls:
        out["broker_credentials"] = faust.SSLCredentials(conn.ssl_context())
    return out


def create_app(settings: Settings, where: Connection | str, datadir: Path, web_port: int | None = None) -> faust.App:
    ps = settings.processor
    conn = connection(where)
    app = faust.App(
        ps.app_id,
        **faust_broker(conn),
        datadir=str(datadir),
        web_port=web_port or ps.web_port,
        web_host="127.0.0.1",
        web_bind="127.0.0.1",
        store="memory://",
        topic_replication_factor=settings.kafka.replication_factor,
        topic_partitions=settings.kafka.frames_partitions,
        producer_acks=-1,
        producer_max_request_size=settings.kafka.max_frame_bytes + 64 * 1024,
        consumer_max_fetch_size=settings.kafka.max_frame_bytes + 64 * 1024,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=100,
        broker_commit_interval=1.0,
        broker_session_timeout=ps.session_timeout_s,
        # Not Faust's 90 s: a heartbeat or commit to a hung coordinator gives up after 10 s, not at SIGCONT
        # (kafkaio.aio.CONSUMER_REQUEST_TIMEOUT_MS); Faust refuses one below the session timeout.
        broker_request_timeout=max(ps.session_timeout_s, aio.CONSUMER_REQUEST_TIMEOUT_MS / 1000),
        producer_request_timeout=aio.PRODUCER_REQUEST_TIMEOUT_MS / 1000,  # idempotent: see transport.py
        broker_heartbeat_interval=max(1.0, ps.session_timeout_s / 4),
        # Bounded metadata staleness: see kafkaio.aio.METADATA_MAX_AGE_MS (a processor stuck for
        # minutes on a broker that came back from a hang).
        consumer_metadata_max_age_ms=aio.METADATA_MAX_AGE_MS,
        producer_metadata_max_age_ms=aio.METADATA_MAX_AGE_MS,
        web_enabled=True,
    )
    transport.install(app)
    frames = app.topic(topics.FRAMES, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    tile_features = app.topic(topics.TILE_FEATURES, key_type=bytes, value_type=bytes, key_serializer="raw",
                              value_serializer="raw")
    tile_jobs = app.topic(topics.TILE_JOBS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    dead_letters = app.topic(topics.DEAD_LETTERS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    metrics_topic = app.topic(topics.METRICS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    marks_topic = app.topic(topics.REPLAY_MARKS, key_type=bytes, value_type=bytes, key_serializer="raw",
                            value_serializer="raw")
    replays = replay.ReplayState(ps.replay_window_seqs, ps.max_frame_age_s, ps.max_clock_skew_s)

    metrics = Metrics("tilestream_processor")
    # Keys: the cloud private keys, the admin-signed device registry (refused and counted in
    # registry_refused_total if it does not verify) and the shared tile-job key, which the worker
    # never makes itself (TileKeyMissing: `tilestream keys tile-key create`, copied to every host).
    keystore = KeyStore(settings.keys_path())
    processor = FrameProcessor(
        keystore.cloud_private_keys(),
        keystore.device_registry(metrics=metrics),
        settings.features,
        max_bytes=settings.kafka.max_frame_bytes,
        max_pixels=ps.max_image_pixels,
    )
    tile_key_id, tile_keys = keystore.tile_keys()
    stage_keys = StageKeys(keystore.path).mac_keys()
    stage_keys.current()  # no stage key: refuse to start (ConfigError says how to make one)
    mark_keys = replay.derive_mark_keys(tile_keys)
    marks_reader = replay.MarksFollower(conn, mark_keys)
    marks_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tilestream-marks")  # one reader thread
    marks_sync: dict = {"generation": UNSYNCED, "lock": None}
    n_bands = ps.fanout_bands or settings.kafka.tile_jobs_partitions
    executor = ThreadPoolExecutor(max_workers=ps.workers_threads, thread_name_prefix="tilestream-cpu")
    observe_gc_pauses(metrics)
    instance = f"{socket.gethostname()}:{os.getpid()}"
    app.tilestream_metrics = metrics  # type: ignore[attr-defined]

    def open_frame(env):
        """In the executor: open + decode, then either all tile features or the band jobs.

        The guard of the per-frame work: whatever an authenticated frame's pixels make go wrong
        beyond the refusals we know (a decoder or numpy error we did not foresee) is refused as
        ``internal`` — a counted dead letter with the original — never an exception in the agent."""
        times = StageTimes()
        try:
            gray = processor.open_and_decode(env, times)
            if gray.size >= ps.fanout_min_pixels:
                return None, tilejobs.make_jobs(env.header, gray, settings.features, n_bands, tile_key_id,
                                                tile_keys[tile_key_id]), times
            return processor.features_of(env.header, gray, times), None, times
        except FrameRejected:
            raise
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.exception(json.dumps({"event": "frame_failed", "frame_id": env.header.frame_id}))
            raise FrameRejected("internal", f"{type(exc).__name__}: {exc}", env.header) from None

    async def dead_letter(rej: FrameRejected, event, stage: str = "processor") -> None:
        msg = event.message
        metrics.inc("dead_letters_total", reason=rej.reason)
        fid = rej.header.frame_id if rej.header else None
        log.warning(json.dumps({"event": "dead_letter", "stage": stage, "reason": rej.reason, "frame_id": fid,
                                "partition": msg.partition, "offset": msg.offset, "error": str(rej)}))
        letter = DeadLetter.of(stage, rej.reason, str(rej), event.value, fid, msg.topic, msg.partition, msg.offset)
        await dead_letters.send(key=(fid or "").encode(), value=letter.to_json())

    async def read_marks() -> None:
        """Fold what was added to replay-marks into the state (read in its own thread, merged on the loop)."""
        if marks_sync["lock"] is None:
            marks_sync["lock"] = asyncio.Lock()
        async with marks_sync["lock"]:
            marks = await asyncio.get_running_loop().run_in_executor(marks_io, marks_reader.read_new)
            replay.merge_all(replays, marks)
            metrics.set("replay_marks_refused", float(marks_reader.refused))

    async def replay_state_for(generation: int) -> replay.ReplayState:
        """The replay state, read to the end of replay-marks first after a start or a rebalance.
        Fail closed: until that read succeeds nothing is checked (retried; Faust keeps the membership)."""
        delay = 0.5
        while marks_sync["generation"] != generation:
            try:
                await read_marks()
                marks_sync["generation"] = generation
            except Exception as exc:  # noqa: BLE001 - broker away / topic missing: wait, retry
                log.warning(json.dumps({"event": "replay_marks_unreadable", "error": str(exc), "retry_in_s": delay}))
                await asyncio.sleep(delay)
                delay = min(10.0, delay * 2)
        return replays

    async def write_mark(verdict: replay.Verdict) -> None:
        if verdict.mark is not None:
            key, value = replay.encode_mark(verdict.mark, tile_key_id, mark_keys[tile_key_id])
            await marks_topic.send(key=key, value=value)

    @app.timer(interval=ps.replay_sync_interval_s)
    async def follow_replay_marks():
        if marks_sync["generation"] is not UNSYNCED:  # after the first full read: only what other workers added
            try:
                await read_marks()
            except Exception as exc:  # noqa: BLE001 - retried on the next tick
                log.warning(json.dumps({"event": "replay_marks_unreadable", "error": str(exc)}))

    def ref_ns(msg) -> int | None:
        # The broker's append time when the record carries it (LogAppendTime = 1): no writer sets it.
        if getattr(msg, "timestamp_type", None) == 1 and msg.timestamp:
            return int(msg.timestamp * 1e9)
        return time.time_ns()

    @app.agent(frames)
    async def process_frames(stream):
        loop = asyncio.get_running_loop()
        async for event in stream.events():
            msg = event.message
            t0 = time.perf_counter()
            verdict = None
            try:
                env = processor.verify(event.value)
                h = env.header
                state = await replay_state_for(msg.generation_id)
                verdict = state.check(h.camera_id, replay.NO_BAND, h.seq, h.capture_ns, topics.FRAMES, msg.partition,
                                      msg.offset, ref_ns(msg))
                if verdict.refused:
                    raise FrameRejected(verdict.kind, f"frame {h.frame_id}: {verdict.detail}", h)
                t1 = time.perf_counter()
                records, jobs, times = await loop.run_in_executor(executor, open_frame, env)
            except FrameRejected as rej:
                await dead_letter(rej, event)
                if verdict is not None:  # accepted, then refused by a later stage: a copy is still a replay
                    await write_mark(verdict)
                continue
            if jobs is not None:
                for key, job in jobs:
                    await tile_jobs.send(key=key, value=job)
                metrics.inc("tile_jobs_total", len(jobs))
            else:
                for rec in records:
                    await tile_features.send(key=rec.frame_id.encode(), value=rec.to_wire(*stage_keys.current()))
                metrics.inc("tiles_total", sum(len(r.tiles) for r in records))
            await write_mark(verdict)  # accept-then-mark; handed to the producer before this offset can commit
            metrics.inc("frames_total")
            times.verify = t1 - t0
            for stage in STAGES:
                metrics.observe("stage_seconds", getattr(times, stage), stage=stage)
            metrics.observe("frame_seconds", time.perf_counter() - t0)
            metrics.observe("capture_to_features_seconds", max(0.0, (time.time_ns() - env.header.capture_ns) / 1e9))

    def compute_job(record: bytes):
        try:
            job, band = tilejobs.open_job(record, tile_keys)
            tilejobs.check_binding(job)
        except FrameRejected:
            raise
        except Exception as exc:  # noqa: BLE001 - the guard of one tile-job record, like open_frame's
            log.exception(json.dumps({"event": "tile_job_failed"}))
            raise FrameRejected("internal", f"{type(exc).__name__}: {exc}") from None
        return job, band

    @app.agent(tile_jobs)
    async def compute_tile_jobs(stream):
        loop = asyncio.get_running_loop()
        async for event in stream.events():
            msg = event.message
            t0 = time.perf_counter()
            try:
                job, band = await loop.run_in_executor(executor, compute_job, event.value)
                state = await replay_state_for(msg.generation_id)
                verdict = replay.check_job(state, job, msg.partition, msg.offset, time.time_ns())
                if verdict.refused:
                    raise FrameRejected(verdict.kind, f"tile job {job.frame_id}#{job.band}: {verdict.detail}")
                batch = await loop.run_in_executor(executor, tilejobs.job_features, job, band, settings.features,
                                                   processor.digest)
            except FrameRejected as rej:
                await dead_letter(rej, event, stage="tiles")
                continue
            await tile_features.send(key=batch.frame_id.encode(), value=batch.to_wire(*stage_keys.current()))
            await write_mark(verdict)
            metrics.inc("tiles_total", len(batch.tiles))
            metrics.observe("tile_job_seconds", time.perf_counter() - t0)

    @app.timer(interval=0.5)
    async def event_loop_lag():
        # How late the loop wakes us from a 100 ms sleep: time the loop spent not serving callbacks.
        t0 = time.perf_counter()
        await asyncio.sleep(0.1)
        metrics.observe("event_loop_lag_seconds", max(0.0, time.perf_counter() - t0 - 0.1))

    def consumer_lag() -> dict[str, int]:
        lag = {}
        try:
            for tp in app.consumer.assignment():
                if tp.topic != topics.FRAMES:
                    continue
                read = app.monitor.tp_read_offsets.get(tp)
                high = app.consumer.highwater(tp)
                if high is not None:
                    lag[f"{tp.topic}/{tp.partition}"] = max(0, high - (read + 1 if read is not None else 0))
        except Exception:  # noqa: BLE001 - no assignment yet / consumer not started
            pass
        return lag

    last = {"t": time.monotonic(), "frames": 0.0, "tiles": 0.0}

    @app.timer(interval=ps.metrics_interval_s)
    async def publish_metrics():
        now = time.monotonic()
        dt = max(1e-6, now - last["t"])
        frames_total, tiles_total = metrics.counter("frames_total"), metrics.counter("tiles_total")
        lag = consumer_lag()
        metrics.set("rebalance_acks_refused", float(getattr(app.consumer, "refused_acks", 0)))
        for key, value in lag.items():
            metrics.set("consumer_lag", value, partition=key)
        counters = {"frames_total": frames_total, "tiles_total": tiles_total}
        for (name, labels), value in metrics.counters.items():
            if name == "dead_letters_total":
                counters[f"dead_letters_total:{dict(labels)['reason']}"] = value
        latency = {}
        for stage in STAGES:
            q = metrics.quantiles("stage_seconds", stage=stage)
            if q:
                latency[stage] = {"p50": q[0.5] * 1e3, "p95": q[0.95] * 1e3, "p99": q[0.99] * 1e3}
        loop_lag = metrics.quantiles("event_loop_lag_seconds")
        snap = StageMetrics(
            stage="processor", instance=instance, at_ns=time.time_ns(), interval_s=ps.metrics_interval_s,
            counters=counters,
            rates={"frames_per_s": (frames_total - last["frames"]) / dt, "tiles_per_s": (tiles_total - last["tiles"]) / dt},
            latency_ms=latency, consumer_lag=lag, group=ps.app_id,
            extra={"event_loop_lag_ms_p99": loop_lag.get(0.99, 0.0) * 1e3},
        )
        last.update(t=now, frames=frames_total, tiles=tiles_total)
        await metrics_topic.send(key=f"processor/{instance}".encode(), value=snap.to_json())

    @app.page("/healthz")
    async def healthz(web, request):
        return web.json({"status": "ok", "app": ps.app_id, "instance": instance, "frames": metrics.counter("frames_total")})

    @app.page("/metrics")
    async def metrics_page(web, request):
        return web.text(metrics.render(), content_type="text/plain; version=0.0.4")

    return app


def run_worker(settings: Settings, where: Connection | str, datadir: Path, web_port: int | None = None,
               loglevel: str = "info") -> None:
    """Run one Faust worker in this process until SIGTERM/SIGINT."""
    from faust.worker import Worker

    datadir.mkdir(parents=True, exist_ok=True)
    conn = connection(where)
    k = settings.kafka
    if conn.security_protocol == "PLAINTEXT":
        # A local, unsecured broker: the worker creates what is missing. On a secured cluster the
        # topics are the admin's (`tilestream kafka start`); a worker's principal may not create them.
        ensure_topics(conn, topics.pipeline_topics(k), k.replication_factor,
                      k.min_insync_replicas if k.replication_factor > 1 else None)
    app = create_app(settings, conn, datadir, web_port)
    worker = Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.spinner = None  # a terminal spinner has no place in service logs
    worker.execute_from_commandline()
