"""The Faust stream processor: all wiring in one place.

    frames (sealed)  --process_frames-->  tile-features   (one TileFeatures per tile)
                     \\--> dead-letters   (DeadLetter with the original, still-encrypted record)

The agent is a short async function; the CPU work (verify, open, decode, tile, features)
runs in a thread pool through ``run_in_executor`` so Faust's event loop keeps serving
heartbeats, commits and rebalances. Agent concurrency stays 1 (faust-streaming #606).
Delivery: at least once — Faust commits a frame's offset after its tiles were sent;
the classifier drops repeated tiles and frames.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faust

from tilestream import topics
from tilestream.config import Settings
from tilestream.crypto import FrameRejected
from tilestream.keys import DeviceRegistry, KeyStore
from tilestream.metrics import Metrics
from tilestream.records import DeadLetter, TileFeatures

from stream_processor.pipeline import FrameProcessor

log = logging.getLogger("tilestream.processor")


def create_app(settings: Settings, bootstrap: str, datadir: Path, web_port: int | None = None) -> faust.App:
    ps = settings.processor
    app = faust.App(
        ps.app_id,
        broker=f"kafka://{bootstrap}",
        datadir=str(datadir),
        web_port=web_port or ps.web_port,
        web_host="127.0.0.1",
        web_bind="127.0.0.1",
        store="memory://",
        topic_replication_factor=1,
        topic_partitions=settings.kafka.frames_partitions,
        producer_acks=-1,
        producer_max_request_size=settings.kafka.max_frame_bytes + 64 * 1024,
        consumer_max_fetch_size=settings.kafka.max_frame_bytes + 64 * 1024,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=100,
        broker_commit_interval=1.0,
        web_enabled=True,
    )
    frames = app.topic(topics.FRAMES, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    tile_features = app.topic(topics.TILE_FEATURES, key_type=bytes, value_type=TileFeatures, key_serializer="raw")
    dead_letters = app.topic(topics.DEAD_LETTERS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    keystore = KeyStore(settings.keys_path())
    processor = FrameProcessor(
        keystore.cloud_private_keys(),
        DeviceRegistry(keystore.registry_path),
        settings.features,
        max_bytes=settings.kafka.max_frame_bytes,
        max_pixels=ps.max_image_pixels,
    )
    executor = ThreadPoolExecutor(max_workers=ps.workers_threads, thread_name_prefix="tilestream-cpu")
    metrics = Metrics("tilestream_processor")
    app.tilestream_metrics = metrics  # type: ignore[attr-defined]

    @app.agent(frames)
    async def process_frames(stream):
        loop = asyncio.get_running_loop()
        async for event in stream.events():
            msg = event.message
            t0 = time.perf_counter()
            try:
                records, times = await loop.run_in_executor(executor, processor.process, event.value)
            except FrameRejected as rej:
                metrics.inc("dead_letters_total", reason=rej.reason)
                fid = rej.header.frame_id if rej.header else None
                log.warning(json.dumps({"event": "dead_letter", "reason": rej.reason, "frame_id": fid,
                                        "partition": msg.partition, "offset": msg.offset, "error": str(rej)}))
                letter = DeadLetter("processor", rej.reason, str(rej), event.value, fid, msg.topic, msg.partition, msg.offset)
                await dead_letters.send(key=(fid or "").encode(), value=letter.to_json())
                continue
            for rec in records:
                await tile_features.send(key=rec.frame_id.encode(), value=rec)
            metrics.inc("frames_total")
            metrics.inc("tiles_total", len(records))
            for stage in ("verify", "open", "decode", "features"):
                metrics.observe("stage_seconds", getattr(times, stage), stage=stage)
            metrics.observe("frame_seconds", time.perf_counter() - t0)

    @app.timer(interval=0.5)
    async def event_loop_lag():
        # How late the loop wakes us from a 100 ms sleep: time the loop spent not serving callbacks.
        t0 = time.perf_counter()
        await asyncio.sleep(0.1)
        metrics.observe("event_loop_lag_seconds", max(0.0, time.perf_counter() - t0 - 0.1))

    @app.page("/healthz")
    async def healthz(web, request):
        return web.json({"status": "ok", "app": ps.app_id, "frames": metrics.counter("frames_total")})

    @app.page("/metrics")
    async def metrics_page(web, request):
        return web.text(metrics.render(), content_type="text/plain; version=0.0.4")

    return app


def run_worker(settings: Settings, bootstrap: str, datadir: Path, web_port: int | None = None, loglevel: str = "info") -> None:
    """Run one Faust worker in this process until SIGTERM/SIGINT."""
    from faust.worker import Worker

    datadir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings, bootstrap, datadir, web_port)
    worker = Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
