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
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks.common import (Sealer, bench_keys, local_broker, machine, machine_load, make_stage, progress,
                               table, vtest_encoded, write_json)

def record_sizes(tmp: Path) -> tuple[int, int]:
    from tilestream import topics
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


def run(frames: int = 5000, quick: bool = False, broker=None) -> dict:
    from benchmarks.pipeline_bench import _nullctx
    from kafkaio.clients import ensure_topics
    from tilestream.topics import TopicSpec

    if quick:
        frames = min(frames, 300)
    res: dict = {"frames": frames, "rows": []}
    with tempfile.TemporaryDirectory(prefix="tilestream-bench-") as tmp_s, \
            (local_broker() if broker is None else _nullctx(broker)) as lk:
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
