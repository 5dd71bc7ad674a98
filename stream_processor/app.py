"""The Faust stream processor: the Faust wiring around :class:`stream_processor.stage.ProcessorStage`.

    frames (sealed)  --process_frames-->  tile-features   (one TileBatch per frame, key = frame id)
                     \\--> tile-jobs  --compute_tile_jobs--> tile-features   (frames >= fanout_min_pixels)
                     \\--> dead-letters   (DeadLetter: stage, reason, original still-encrypted record)
                     \\--> replay-marks   (one mark per accepted frame or band, after its records)
    every 2 s        ------------------>  metrics         (StageMetrics snapshot for the dashboard)

What a record becomes is the stage's (:mod:`stream_processor.stage`: verify, replay check, open,
decode, features or fan-out, dead letters, marks — the same path the tests and the benchmarks
run). This module only says where each step runs: the agents are short loops that hand each
record to the stage with a :class:`WorkerIO` — the signature and replay checks on the event loop
(~0.1 ms), the replay state read to the end of ``replay-marks`` for the record's consumer
generation first (:class:`stream_processor.stage.ReplaySync`), open/decode/tile/features of a
frame of up to :data:`INLINE_MAX_PIXELS` (declared, signed) on the loop and of a larger frame or a
tile job in a thread pool (``run_in_executor``; heartbeats are the consumer thread's either way,
see there), and the stage's outputs sent in order through Faust's producer. Agent concurrency stays 1
(faust-streaming #606). Also here: the timers (replay-marks follower, event-loop lag, the
metrics snapshot built by :class:`tilestream.metrics.Snapshots`), ``/healthz`` and ``/metrics``
(``frame_wait_seconds``: a frame's time from the broker's append to this agent, i.e. the fetch
and the queue in front of the agent; measured at 11 frames/s on the shared machine: 3.7-4.8 ms
mean without queueing, 42-240 ms when the machine was saturated and the work outgrew the period),
and our transport (:mod:`stream_processor.transport`: a Consumer that refuses acks of skipped
messages).

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

Delivery: at least once. Faust commits a frame's offset after its tile records (and then its
mark) were handed to the producer and flushed; a worker killed before that commit has its frames
re-read by the next owner. A rebalance commits what was finished first (our transport: Faust
itself forgot it, and the next owner processed up to a second's frames again; a re-read frame is
a ``redelivery``, processed in full, counted in ``redeliveries_total``).
"""

from __future__ import annotations

import asyncio
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
from tilestream.metrics import Liveness, Metrics, Snapshots, freeze_long_lived, observe_gc_pauses

from stream_processor import replay, transport
from stream_processor.stage import STAGES, ProcessorStage, ReplaySync, StageIO


# The largest frame (declared pixels, signed header; the decoder refuses an image of any other size
# before decoding it) whose open/decode/features run on the event loop instead of in the thread pool.
# The pool bought nothing for such a frame: agent concurrency is 1, so the loop only waited for it,
# and Faust's consumer (fetches, heartbeats) runs in a thread of its own, with its own loop
# (faust ThreadDelegateConsumer), served by the GIL's switch interval whatever the loop does. What
# it cost: two thread hand-offs per frame and the GIL ping-pong around them (py-spy of one worker
# on pre-filled vtest frames: the loop thread in socket writes and GIL re-acquisition 11 % of its
# busy samples with the pool, 5 % inline). Measured back to back on the shared 2-core machine
# (noisy; figures in the commit messages): one worker alone, CPU ms/frame 22.7 inline vs 23.7 with
# the pool over 6 runs, frames/s 0.96x Quix's vs 0.82x; 2 workers in the closed loop, processors'
# CPU 22.7-25.4 vs 30.1-32.3 ms/frame and broker 6.1-6.9 vs 10.1-11.3 in 3 pairs. What inline
# costs: the loop's timers, commits and web pages wait for the frame: vtest 768x576 (442,368
# pixels) ~20 ms; at this bound (e.g. 1280x800) about twice that by scale, a 64-scan progressive
# JPEG (imageinfo.MAX_SCANS) more; never near the 2.5 s heartbeat interval, which is the consumer
# thread's anyway. Larger frames (and tile jobs: >= fanout_min_pixels) keep the pool, so a worker
# stays responsive on 4K frames.
INLINE_MAX_PIXELS = 1_048_576


def runs_inline(pixels: int | None) -> bool:
    """Whether a step on ``pixels`` declared pixels runs on the loop (None: unknown, the pool)."""
    return pixels is not None and 0 <= pixels <= INLINE_MAX_PIXELS


# Loop turns given before an inline step. aiokafka's producer needs three turns from send() to its
# request on the socket (the accumulator's waiter wakes asyncio.wait, which wakes the sender task,
# which starts the produce task, which writes): with one turn, the previous frame's tile records
# waited on this loop for the whole next frame. Measured (python -m benchmarks.producer_turns:
# a local broker, send one 37 KB record, N turns, block the loop 60 ms, LogAppendTime - send
# time, 8 sends each): 1 turn 62-65 ms, 2 turns 62-71 ms, 3 turns 1-2 ms, 4 turns 1-2 ms. One
# more than needed, in case a reply (the previous request's acknowledgement) is due first.
INLINE_TURNS = 4


async def run_step(executor, fn, *args, pixels: int | None = None):
    """``fn(*args)``: on this loop when :func:`runs_inline` says so, else in ``executor``.

    Inline, the loop turns :data:`INLINE_TURNS` times first: the agent takes buffered frames
    without waiting, so without the turns the producer's sender task (on this loop) sent nothing
    and no timer ran until a backlog was drained (2 workers at 50 % load: event-loop lag p99 150
    ms, capture to result p99 3.8 s in one run; with one turn 24 ms and 137 ms), and with one turn
    the tile records of the frame before still waited for this one (see INLINE_TURNS)."""
    if runs_inline(pixels):
        for _ in range(INLINE_TURNS):
            await asyncio.sleep(0)
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


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
        broker_commit_every=ps.commit_every,
        broker_commit_interval=ps.commit_interval_s,
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
    faust_topics = {name: app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
                  for name in (topics.FRAMES, topics.TILE_FEATURES, topics.TILE_JOBS, topics.DEAD_LETTERS,
                               topics.METRICS, topics.REPLAY_MARKS)}

    metrics = Metrics("tilestream_processor")
    stage = ProcessorStage.create(settings, metrics)
    follower = replay.MarksFollower(conn, stage.mark_keys)
    marks = ReplaySync(stage.replays, follower, metrics)
    executor = ThreadPoolExecutor(max_workers=ps.workers_threads, thread_name_prefix="tilestream-cpu")
    observe_gc_pauses(metrics)
    liveness = Liveness(ps.stall_after_s)
    instance = f"{socket.gethostname()}:{os.getpid()}"
    snapshots = Snapshots(metrics, "processor", instance, ps.app_id, ps.metrics_interval_s,
                          rates={"frames_per_s": "frames_total", "tiles_per_s": "tiles_total"})

    class WorkerIO(StageIO):
        """The stage's steps in this worker: heavy work in the thread pool, the replay state read
        for this record's consumer generation, records handed to Faust's producer in order."""

        def __init__(self, loop: asyncio.AbstractEventLoop, generation: int):
            self.loop, self.generation = loop, generation

        async def compute(self, fn, *args, pixels=None):
            return await run_step(executor, fn, *args, pixels=pixels)

        async def replay_state(self) -> None:
            await marks.ready(self.generation)

        async def send(self, outputs) -> None:
            for o in outputs:
                if o.topic == topics.REPLAY_MARKS:
                    follower.sent(o.key, o.value)  # before the send: read back, it is skipped
                await faust_topics[o.topic].send(key=o.key, value=o.value)

    @app.agent(faust_topics[topics.FRAMES])
    async def process_frames(stream):
        loop = asyncio.get_running_loop()
        async for event in stream.events():
            msg = event.message
            liveness.read()
            if msg.timestamp_type == 1 and msg.timestamp:
                # How long the record waited between the broker's append (LogAppendTime: the
                # broker's clock, never the writer's) and this agent: the fetch, Faust's delivery
                # and the frames queued in front of it.
                metrics.observe("frame_wait_seconds", max(0.0, time.time() - msg.timestamp))
            await stage.frame(event.value, msg.partition, msg.offset, ref_ns(msg), WorkerIO(loop, msg.generation_id))

    @app.agent(faust_topics[topics.TILE_JOBS])
    async def compute_tile_jobs(stream):
        loop = asyncio.get_running_loop()
        async for event in stream.events():
            msg = event.message
            liveness.read()
            await stage.tile_job(event.value, msg.partition, msg.offset, WorkerIO(loop, msg.generation_id))

    @app.task
    async def freeze_after_start():
        # Faust, the clients and the stage are made once the app's tasks start: later full
        # collections skip them (a 37-42 ms pause of the loop each otherwise, see freeze_long_lived).
        freeze_long_lived()

    @app.timer(interval=ps.replay_sync_interval_s)
    async def follow_replay_marks():
        await marks.follow()

    @app.timer(interval=0.5)
    async def event_loop_lag():
        # How late the loop wakes us from a 100 ms sleep: time the loop spent not serving callbacks.
        liveness.turned()
        t0 = time.perf_counter()
        await asyncio.sleep(0.1)
        metrics.observe("event_loop_lag_seconds", max(0.0, time.perf_counter() - t0 - 0.1))

    def consumer_lag(topic_names=(topics.FRAMES,)) -> dict[str, int]:
        lag = {}
        try:
            for tp in app.consumer.assignment():
                if tp.topic not in topic_names:
                    continue
                read = app.monitor.tp_read_offsets.get(tp)
                high = app.consumer.highwater(tp)
                if high is not None:
                    lag[f"{tp.topic}/{tp.partition}"] = max(0, high - (read + 1 if read is not None else 0))
        except Exception:  # noqa: BLE001 - no assignment yet / consumer not started
            pass
        return lag

    @app.timer(interval=ps.metrics_interval_s)
    async def publish_metrics():
        lag = consumer_lag()
        held = held_partitions()
        liveness.holds(held)
        metrics.set("assigned_partitions", float(held))
        metrics.set("seconds_since_record", liveness.seconds_since_record())
        metrics.set("rebalance_acks_refused", float(getattr(app.consumer, "refused_acks", 0)))
        metrics.set("revoke_commits", float(getattr(app.consumer, "revoke_commits", 0)))
        for key, value in lag.items():
            metrics.set("consumer_lag", value, partition=key)
        snap = snapshots.take(
            {"frames_total": metrics.counter("frames_total"), "tiles_total": metrics.counter("tiles_total")},
            {stage_name: ("stage_seconds", {"stage": stage_name}) for stage_name in STAGES}, lag,
            {"event_loop_lag_ms_p99": metrics.quantiles("event_loop_lag_seconds").get(0.99, 0.0) * 1e3})
        await faust_topics[topics.METRICS].send(key=f"processor/{instance}".encode(), value=snap.to_json())

    def held_partitions() -> int:
        try:
            return sum(1 for tp in app.consumer.assignment() if tp.topic in (topics.FRAMES, topics.TILE_JOBS))
        except Exception:  # noqa: BLE001 - consumer not started yet: holds nothing
            return 0

    @app.page("/healthz")
    async def healthz(web, request):
        """503 ``stalled`` when the worker stops making progress while up (:class:`Liveness`)."""
        held = held_partitions()
        liveness.holds(held)
        problems = liveness.problems(sum(consumer_lag((topics.FRAMES, topics.TILE_JOBS)).values()))
        return web.json({"status": "stalled" if problems else "ok", "problems": problems, "app": ps.app_id,
                         "instance": instance, "frames": metrics.counter("frames_total"),
                         "assigned_partitions": held,
                         "seconds_since_record": round(liveness.seconds_since_record(), 1)},
                        status=503 if problems else 200)

    @app.page("/metrics")
    async def metrics_page(web, request):
        return web.text(metrics.render(), content_type="text/plain; version=0.0.4")

    return app


def ref_ns(msg) -> int | None:
    """The replay check's reference time of a record: the broker's append time when the record
    carries it (LogAppendTime = 1: no writer sets it), else this worker's clock."""
    if getattr(msg, "timestamp_type", None) == 1 and msg.timestamp:
        return int(msg.timestamp * 1e9)
    return time.time_ns()


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
