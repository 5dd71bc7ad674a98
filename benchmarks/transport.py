"""Kafka alone on this machine: how many of our records the local broker moves, with Kafka's own tools.

    python -m benchmarks.transport [--frames 2000] [--quick]

Records of the size of a sealed vtest frame (measured: JPEG q80 768x576, sealed as the agent
seals) and of one tile batch on `tile-features` (measured: the processor's record of all 108 64 px
tiles of a frame, MAC header included), through Kafka's own ``org.apache.kafka.tools.ProducerPerformance`` and
``ConsumerPerformance`` (run with ``LocalKafka.tool`` from the same jars as the broker) and
through kafka-python, the client the agent and the classifier use, against the same local
broker. A frame puts one record on each topic, so records/s is also the frames/s the transport
alone would carry (until 2026-12-02 this step sent one record per *tile*, 50x as many, the layout
before TileBatch).

:func:`kafka_floor` (called by the pipeline bench after its steps, with the sizes and the rate it
measured) is what Kafka alone costs per frame in the pipeline's own record flow: frame -> tile
batch + replay mark -> result -> reader, one record per request as at camera rates. Found with it
(2026-12-03 06:38, warm broker, 77/37/11.5 KB records at 65 frames/s): the broker 2.4-2.6 CPU ms
per frame, the four librdkafka clients 1.1 together, and three hops p50 2.4-2.7 / p99 5.7-5.8
ms with no stage work in them. It is paid per request more than per byte: in one later sitting
(07:11, a slower minute) 150-byte records cost the broker 2.3 and 2.9 ms per frame against 3.2
and 3.0 with the real sizes, and 2.8-3.3 with half the tile and a quarter of the result bytes.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks.common import (Sealer, bench_keys, broker_for, jit_cpu_s, machine, machine_load, make_stage,
                               percentile, proc_cpu_s, progress, table, vtest_encoded, write_json)
from tilestream import topics


def record_sizes(tmp: Path) -> tuple[int, int]:
    from tilestream.config import FeatureConfig

    store = bench_keys(tmp / "keys", ["size"])
    s = Sealer(store, "size")
    blobs = [s.seal(e, i)[1] for i, e in enumerate(vtest_encoded(30))]
    stage = make_stage(store, FeatureConfig())  # the worker's path: tile batches as sent, MAC header included
    tiles = [len(o.value) for i, b in enumerate(blobs[:5]) for o in stage.on_frame(b, 0, i)
             if o.topic == topics.TILE_FEATURES]
    return int(np.mean([len(b) for b in blobs])), int(np.mean(tiles))


def java_produce(lk, topic: str, n: int, size: int, props: dict) -> dict:
    args = ["--topic", topic, "--num-records", str(n), "--record-size", str(size), "--throughput", "-1",
            "--producer-props", f"bootstrap.servers={lk.bootstrap}", *[f"{k}={v}" for k, v in props.items()]]
    r = lk.tool("org.apache.kafka.tools.ProducerPerformance", *args, timeout_s=600)
    line = next((l for l in reversed(r.stdout.splitlines()) if "records sent" in l), "")
    m = re.search(r"([\d.]+) records/sec \(([\d.]+) MB/sec\), ([\d.]+) ms avg latency, ([\d.]+) ms max latency, "
                  r"(\d+) ms 50th, (\d+) ms 95th, (\d+) ms 99th", line)
    if not m:
        raise RuntimeError(f"ProducerPerformance said:\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
    rps, mbs, avg, mx, p50, p95, p99 = map(float, m.groups())
    return {"records_per_s": rps, "mb_per_s": mbs, "p50_ms": p50, "p99_ms": p99}


def java_consume(lk, topic: str, n: int) -> dict:
    r = lk.tool("org.apache.kafka.tools.ConsumerPerformance", "--bootstrap-server", lk.bootstrap, "--topic", topic,
                "--messages", str(n), "--group", f"perf-{uuid.uuid4().hex[:6]}", "--timeout", "60000",
                timeout_s=600)
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    hi = next((i for i, l in enumerate(lines) if l.startswith("start.time")), None)
    if hi is None or hi + 1 >= len(lines):
        raise RuntimeError(f"ConsumerPerformance said:\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
    cols = dict(zip([c.strip() for c in lines[hi].split(",")], [v.strip() for v in lines[hi + 1].split(",")]))
    # fetch.* excludes the group join (rebalance.time.ms); that is the transport's own rate.
    return {"records_per_s": float(cols["fetch.nMsg.sec"]), "mb_per_s": float(cols["fetch.MB.sec"]),
            "with_join_records_per_s": float(cols["nMsg.sec"])}


def python_produce(lk, topic: str, n: int, size: int, agent_like: bool) -> dict:
    from benchmarks.common import frames_producer
    from kafkaio import clients

    payload = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    p = frames_producer(lk.bootstrap) if agent_like else clients.producer(lk.bootstrap, "stage", linger_ms=0, enable_idempotence=False)
    try:
        p.partitions_for(topic)
        t0 = time.perf_counter()
        for i in range(n):
            p.send(topic, key=f"k{i}".encode(), value=payload)
        p.flush(300)
        dt = time.perf_counter() - t0
    finally:
        p.close()
    return {"records_per_s": n / dt, "mb_per_s": n * size / dt / 2**20}


def python_consume(lk, topic: str, n: int) -> dict:
    from kafkaio import clients

    c = clients.consumer(lk.bootstrap, client_id="tilestream-bench-consume",
                         max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
    try:
        parts = clients.partitions(c, topic)
        c.assign(parts)
        c.seek_to_beginning(*parts)
        got, size = 0, 0
        t0 = time.perf_counter()
        while got < n and time.perf_counter() - t0 < 300:
            for records in c.poll(timeout_ms=500, max_records=10000).values():
                got += len(records)
                size += sum(len(m.value) for m in records)
        dt = time.perf_counter() - t0
    finally:
        c.close()
    return {"records_per_s": got / dt, "mb_per_s": size / dt / 2**20}


# --------------------------------------------------------------------------- Kafka's floor for a frame

# A frame's records, in the order the pipeline writes them: what each stage reads, and what it writes
# for every record it read (the processor: the tile batch, then the replay mark; see
# stream_processor.stage). The reader at the end plays the services that consume `results`.
FLOOR_FLOW = (("camera", None, (topics.FRAMES,)),
              ("processor", topics.FRAMES, (topics.TILE_FEATURES, topics.REPLAY_MARKS)),
              ("classifier", topics.TILE_FEATURES, (topics.RESULTS,)),
              ("reader", topics.RESULTS, ()))


def kafka_floor(lk, record_bytes: dict[str, int], rate: float, seconds: float = 20.0, warmup_s: float = 10.0) -> dict:
    """What Kafka alone costs per frame: the pipeline's records, passed stage to stage at ``rate``
    frames/s by librdkafka clients that do nothing else, on topics made as the pipeline's are.

    ``record_bytes``: bytes per frame of each topic of :data:`FLOOR_FLOW` (what the pipeline step
    measured on the broker's disk; random bytes, as incompressible as sealed frames and MACed
    batches). Every stage is a group consumer and an idempotent ``acks=all`` producer of
    ``kafkaio.rdkafka`` with the profiles the agent (``frames``) and the classifier (``stage``) use,
    committing every second as the services do; the four run as threads of this process.

    Returns the broker's CPU ms per frame (its JIT compiler threads' share shown apart), this
    process's (the four clients, their Python loop included) and the camera-to-reader latency of
    the three hops. It is a reference, not a proof: clients that batch more (longer lingers and
    fetch waits) make fewer requests and cost the broker less, at the price of latency; at camera
    rates, one record per request is what the services do. Measured after ``warmup_s`` unmeasured
    seconds at the same rate."""
    import threading

    from kafkaio import rdkafka
    from kafkaio.clients import ensure_topics
    from tilestream.config import KafkaSettings
    from tilestream.topics import TopicSpec, pipeline_topics

    tag = uuid.uuid4().hex[:6]
    names = {t: f"floor-{t}-{tag}" for _, _, outs in FLOOR_FLOW for t in outs}
    specs = {s.name: s for s in pipeline_topics(KafkaSettings())}
    ensure_topics(lk.bootstrap, [TopicSpec(n, specs[t].partitions, specs[t].configs) for t, n in names.items()])
    rng = np.random.default_rng(0)
    payload = {t: rng.integers(0, 256, max(1, record_bytes[t]), dtype=np.uint8).tobytes() for t in names}
    stop, read = threading.Event(), [0]
    latency: list[float] = []  # the reader's receive time minus the frame's scheduled send time, s
    first_measured = [1 << 62]  # the first frame of the measured window
    t0 = time.perf_counter() + 1.0  # the camera's clock starts once the consumers had a second to join
    errors: list[BaseException] = []

    def producer(profile: str):
        return rdkafka.producer(lk.bootstrap, profile, max_request_bytes=4 * 2**20, delivery_timeout_ms=60000)

    def relay(name: str, src: str, outs: tuple[str, ...]) -> None:
        try:
            # Offsets stored as consumed, committed once a second, as the services commit.
            c = rdkafka.group_consumer(lk.bootstrap, f"floor-{name}-{tag}", f"floor-{name}",
                                       **{"enable.auto.offset.store": True})
            # No linger, as the services' librdkafka producers. (A 1 ms linger for the processor's
            # two records, to put them in one request as aiokafka does, made the broker no cheaper:
            # 2.7-3.3 ms/frame and p50 4.0 ms at 07:08, against 2.4-2.6 and 2.4-2.8 without it at
            # 06:38-06:56; minutes apart on a drifting host, but not the drop it would have to be.)
            p = producer("stage") if outs else None
            c.subscribe([names[src]])
            last_commit = time.monotonic()
            while not stop.is_set():
                # As the classifier reads: poll() returns at the first record, consume(n, 0) takes
                # what is already fetched (consume(n, timeout) would wait for n or the timeout).
                first = c.poll(0.1)
                msgs = [] if first is None else [first, *c.consume(499, 0)]
                for m in msgs:
                    if m.error() is None:
                        for t in outs:
                            p.produce(names[t], value=payload[t], key=m.key())
                        if name == "reader":
                            read[0] += 1
                            i = int(m.key().rpartition(b"/")[2])
                            if i >= first_measured[0]:
                                latency.append(time.perf_counter() - t0 - i / rate)
                if p is not None:
                    p.poll(0)
                if msgs and time.monotonic() - last_commit >= 1.0:
                    c.commit(asynchronous=True)
                    last_commit = time.monotonic()
            if p is not None:
                p.flush(30)
            c.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=relay, args=(n, src, outs), daemon=True)
               for n, src, outs in FLOOR_FLOW if src is not None]
    for th in threads:
        th.start()
    cam = producer("frames")
    broker_pid, me = lk.status().pid, os.getpid()
    total = warmup_s + seconds
    progress(f"Kafka's floor: the pipeline's records at {rate:.1f} frames/s, {warmup_s:.0f} s unmeasured, "
             f"then {seconds:.0f} s measured")
    marks: dict[str, tuple] = {}
    i = 0
    while True:
        el = time.perf_counter() - t0
        if "start" not in marks and el >= warmup_s:
            marks["start"] = (i, proc_cpu_s(broker_pid), jit_cpu_s(broker_pid), proc_cpu_s(me))
            first_measured[0] = i
        if el >= total:
            break
        due = i / rate
        if el < due:
            time.sleep(min(due - el, 0.05))
            continue
        cam.produce(names[topics.FRAMES], value=payload[topics.FRAMES], key=f"floor/{i}".encode())
        cam.poll(0)
        i += 1
    marks["end"] = (i, proc_cpu_s(broker_pid), jit_cpu_s(broker_pid), proc_cpu_s(me))
    cam.flush(30)
    deadline = time.monotonic() + 60
    while read[0] < i and time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    stop.set()
    for th in threads:
        th.join(60)
    if errors:
        raise RuntimeError(f"Kafka's floor: a client failed: {errors[0]!r}")
    if read[0] < i:
        raise RuntimeError(f"Kafka's floor: {read[0]} of {i} frames reached the reader in 60 s")
    (n0, b0, j0, c0), (n1, b1, j1, c1) = marks["start"], marks["end"]
    n = max(1, n1 - n0)
    lat_ms = [1e3 * x for x in latency]
    out = {"rate": rate, "frames": n, "seconds": seconds, "record_bytes": dict(record_bytes),
           "broker_ms": (b1 - b0) * 1e3 / n, "broker_jit_ms": (j1 - j0) * 1e3 / n, "clients_ms": (c1 - c0) * 1e3 / n,
           "latency_p50_ms": percentile(lat_ms, 50), "latency_p99_ms": percentile(lat_ms, 99)}
    progress(f"Kafka's floor: broker {out['broker_ms']:.2f} ms/frame (JIT {out['broker_jit_ms']:.2f}), "
             f"librdkafka clients {out['clients_ms']:.2f} ms/frame; camera -> reader p50 "
             f"{out['latency_p50_ms']:.1f} ms, p99 {out['latency_p99_ms']:.1f} ms")
    return out


def run(frames: int = 5000, quick: bool = False, broker=None) -> dict:
    from kafkaio.clients import ensure_topics
    from tilestream.topics import TopicSpec

    if quick:
        frames = min(frames, 300)
    res: dict = {"frames": frames, "rows": []}
    with tempfile.TemporaryDirectory(prefix="tilestream-bench-") as tmp_s, \
            broker_for(broker) as lk:
        frame_size, tile_size = record_sizes(Path(tmp_s))
        res["frame_record_bytes"], res["tile_record_bytes"] = frame_size, tile_size
        tag = uuid.uuid4().hex[:6]
        big, small, pybig, pysmall = (f"perf-frames-{tag}", f"perf-tiles-{tag}", f"perf-pyframes-{tag}",
                                      f"perf-pytiles-{tag}")
        ensure_topics(lk.bootstrap, [TopicSpec(t, 6, {"max.message.bytes": str(5 * 1024 * 1024)})
                                     for t in (big, small, pybig, pysmall)])
        n_tiles = frames  # one tile batch per frame
        frame_props = {"acks": "all", "linger.ms": 5, "batch.size": 1024 * 1024, "max.request.size": 5 * 1024 * 1024}
        tile_props = {"acks": "all"}

        def add(what, size, client, direction, r, per_frame):
            r.update(what=what, size=size, client=client, direction=direction,
                     frames_per_s=r["records_per_s"] / per_frame)
            res["rows"].append(r)
            progress(f"{client} {direction} {what}: {r['records_per_s']:.0f} records/s, {r['mb_per_s']:.1f} MB/s")

        progress(f"sealed frame {frame_size} B, tile batch {tile_size} B; Kafka's own perf tools")
        add("sealed frame", frame_size, "Java ProducerPerformance (acks=all, 1 MB batches)", "produce",
            java_produce(lk, big, frames, frame_size, frame_props), 1)
        add("sealed frame", frame_size, "Java ConsumerPerformance", "consume", java_consume(lk, big, frames), 1)
        add("tile batch", tile_size, "Java ProducerPerformance (acks=all, default batching)", "produce",
            java_produce(lk, small, n_tiles, tile_size, tile_props), 1)
        add("tile batch", tile_size, "Java ConsumerPerformance", "consume", java_consume(lk, small, n_tiles), 1)
        progress("kafka-python, the agent's and the classifier's client")
        py_frames = min(frames, 2000)
        add("sealed frame", frame_size, "kafka-python producer (agent settings)", "produce",
            python_produce(lk, pybig, py_frames, frame_size, True), 1)
        add("sealed frame", frame_size, "kafka-python consumer", "consume", python_consume(lk, pybig, py_frames), 1)
        n_py_tiles = min(n_tiles, 40_000)
        add("tile batch", tile_size, "kafka-python producer (acks=all)", "produce",
            python_produce(lk, pysmall, n_py_tiles, tile_size, False), 1)
        add("tile batch", tile_size, "kafka-python consumer (as the classifier reads)", "consume",
            python_consume(lk, pysmall, n_py_tiles), 1)
    res["tables"] = {"transport": table(
        ["record", "bytes", "client", "direction", "records/s", "MB/s", "frames/s equivalent", "producer p99 ms"],
        [[r["what"], r["size"], r["client"], r["direction"], f"{r['records_per_s']:.0f}", f"{r['mb_per_s']:.1f}",
          f"{r['frames_per_s']:.0f}", f"{r['p99_ms']:.0f}" if "p99_ms" in r else ""] for r in res["rows"]])}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=5000, help="frame-sized records (and as many tile batches)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"machine: {machine()}\n{machine_load()}\n")
    res = run(args.frames, args.quick)
    print(res["tables"]["transport"])
    write_json(args.json, {k: v for k, v in res.items() if k != "tables"})


if __name__ == "__main__":
    main()
