"""The Faust stream processor: all wiring in one place.

    frames (sealed)  --process_frames-->  tile-features   (one TileBatch per frame, key = frame id)
                     \\--> tile-jobs  --compute_tile_jobs--> tile-features   (frames >= fanout_min_pixels)
                     \\--> dead-letters   (DeadLetter: stage, reason, original still-encrypted record)
    every 2 s        ------------------>  metrics         (StageMetrics snapshot for the dashboard)

Per frame: verify the device signature (on the loop, ~0.1 ms) -> replay check -> open, decode,
tile and features in a thread pool (``run_in_executor``) so the event loop keeps serving
heartbeats, commits and rebalances -> send the tile records. Agent concurrency stays 1
(faust-streaming #606).

Replays: :class:`ReplayGuard` remembers where each verified frame id was first seen
(partition:offset) for ``replay_window_s``. The same id at the same offset again is a
redelivery and is processed again; the same id at another offset is a replay and goes to
dead-letters. The memory is per worker (a Faust table would survive rebalances, but its
recovery is one more rebalance path; frames are keyed by frame id, so copies of a frame meet
in one partition). A replay a worker cannot know about still yields no second result: the
classifier reads back what it already answered.

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

from kafkaio import Connection, connection
from tilestream import topics
from tilestream.config import Settings
from tilestream.crypto import FrameRejected
from tilestream.keys import KeyStore
from tilestream.metrics import Metrics, observe_gc_pauses
from tilestream.records import DeadLetter, StageMetrics, TileBatch

from stream_processor import tilejobs, transport
from stream_processor.pipeline import FrameProcessor, ReplayGuard, StageTimes

log = logging.getLogger("tilestream.processor")
STAGES = ("verify", "open", "decode", "features")


def create_app(settings: Settings, where: Connection | str, datadir: Path, web_port: int | None = None) -> faust.App:
    ps = settings.processor
    conn = connection(where)
    app = faust.App(
        ps.app_id,
        **conn.faust_settings(),
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
        broker_heartbeat_interval=max(1.0, ps.session_timeout_s / 4),
        web_enabled=True,
    )
    transport.install(app)
    frames = app.topic(topics.FRAMES, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    tile_features = app.topic(topics.TILE_FEATURES, key_type=bytes, value_type=bytes, key_serializer="raw",
                              value_serializer="raw")
    tile_jobs = app.topic(topics.TILE_JOBS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    dead_letters = app.topic(topics.DEAD_LETTERS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    metrics_topic = app.topic(topics.METRICS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    replays = ReplayGuard(ps.replay_window_s)

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
    n_bands = ps.fanout_bands or settings.kafka.tile_jobs_partitions
    executor = ThreadPoolExecutor(max_workers=ps.workers_threads, thread_name_prefix="tilestream-cpu")
    observe_gc_pauses(metrics)
    instance = f"{socket.gethostname()}:{os.getpid()}"
    app.tilestream_metrics = metrics  # type: ignore[attr-defined]

    def open_frame(env):
        """In the executor: open + decode, then either all tile features or the band jobs."""
        times = StageTimes()
        gray = processor.open_and_decode(env, times)
        if gray.size >= ps.fanout_min_pixels:
            return None, tilejobs.make_jobs(env.header, gray, settings.features, n_bands, tile_key_id,
                                            tile_keys[tile_key_id]), times
        return processor.features_of(env.header, gray, times), None, times

    async def dead_letter(rej: FrameRejected, event, stage: str = "processor") -> None:
        msg = event.message
        metrics.inc("dead_letters_total", reason=rej.reason)
        fid = rej.header.frame_id if rej.header else None
        log.warning(json.dumps({"event": "dead_letter", "stage": stage, "reason": rej.reason, "frame_id": fid,
                                "partition": msg.partition, "offset": msg.offset, "error": str(rej)}))
        letter = DeadLetter.of(stage, rej.reason, str(rej), event.value, fid, msg.topic, msg.partition, msg.offset)
        await dead_letters.send(key=(fid or "").encode(), value=letter.to_json())

    @app.agent(frames)
    async def process_frames(stream):
        loop = asyncio.get_running_loop()
        async for event in stream.events():
            msg = event.message
            t0 = time.perf_counter()
            try:
                env = processor.verify(event.value)
                first = replays.check(env.header.frame_id, msg.partition, msg.offset, time.monotonic())
                if first is not None:
                    raise FrameRejected("replay", f"frame {env.header.frame_id} at {msg.partition}:{msg.offset} "
                                                  f"was already seen at {first[0]}:{first[1]}", env.header)
                t1 = time.perf_counter()
                records, jobs, times = await loop.run_in_executor(executor, open_frame, env)
            except FrameRejected as rej:
                await dead_letter(rej, event)
                continue
            if jobs is not None:
                for key, job in jobs:
                    await tile_jobs.send(key=key, value=job)
                metrics.inc("tile_jobs_total", len(jobs))
            else:
                for rec in records:
                    await tile_features.send(key=rec.frame_id.encode(), value=rec.to_bytes())
                metrics.inc("tiles_total", sum(len(r.tiles) for r in records))
            metrics.inc("frames_total")
            times.verify = t1 - t0
            for stage in STAGES:
                metrics.observe("stage_seconds", getattr(times, stage), stage=stage)
            metrics.observe("frame_seconds", time.perf_counter() - t0)
            metrics.observe("capture_to_features_seconds", max(0.0, (time.time_ns() - env.header.capture_ns) / 1e9))

    def compute_job(record: bytes) -> TileBatch:
        job, band = tilejobs.open_job(record, tile_keys)
        return tilejobs.job_features(job, band, settings.features, processor.digest)

    @app.agent(tile_jobs)
    async def compute_tile_jobs(stream):
        loop = asyncio.get_running_loop()
        async for event in stream.events():
            t0 = time.perf_counter()
            try:
                batch = await loop.run_in_executor(executor, compute_job, event.value)
            except FrameRejected as rej:
                await dead_letter(rej, event, stage="tiles")
                continue
            await tile_features.send(key=batch.frame_id.encode(), value=batch.to_bytes())
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
    topics.ensure_topics(conn.bootstrap, topics.pipeline_topics(settings.kafka))
    app = create_app(settings, conn, datadir, web_port)
    worker = Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.spinner = None  # a terminal spinner has no place in service logs
    worker.execute_from_commandline()
