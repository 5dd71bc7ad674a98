"""The classifier alone: CPU per frame in process and over a real broker, and bytes per frame.

    python -m benchmarks.classifier_bench [--frames 800] [--rate 0] [--reps 2] [--dtype float16]
                                          [--fetch-min-bytes N --fetch-max-wait-ms N] [--json out.json]

Tile batches are made once from vtest frames on the processor's real path (``FrameProcessor``,
the scene model trained as the pipeline benchmark trains it), then given new frame ids and MACed
with the stage key as a processor does.

1. **In process** (no Kafka): ``FrameClassifier.on_record`` one record at a time (back to back,
   and one every 50 ms as at 20 frames/s) and ``on_records`` in polls of 16, CPU ms per frame;
   ``TileBatch.make + to_wire`` (the processor's part) and ``from_wire`` alone.
2. **Over a real broker**: ``--frames`` records on ``tile-features``, then ``tilestream
   classify`` as a child process; CPU seconds of the classifier and the broker from /proc between
   the 10th percentile result and the last one, per frame. ``--rate 0`` (default) pre-fills the
   topic (a backlog: big polls); ``--rate R`` writes R records/s while the classifier runs
   (camera rates: one record per poll). ``--fetch-min-bytes``/``--fetch-max-wait-ms`` are passed
   to the classifier's group consumer (A/B of fetch settings). ``tile-features`` bytes per
   frame are its log segments on the broker's disk.

Numbers on a shared machine are noisy: compare variants within one run (``--reps``).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import namedtuple
from pathlib import Path

import numpy as np

from benchmarks.common import (MAX_FRAME_BYTES, MAX_PIXELS, ResultsWatcher, Sealer, bench_keys, child_env,
                               commit_group_to_end, local_broker, percentile, proc_cpu_s, progress, topic_disk_bytes,
                               vtest_encoded, write_json)

_T = namedtuple("_T", "index x y w h")
RDKAFKA_NAMES = {"fetch_min_bytes": "fetch.min.bytes", "fetch_max_wait_ms": "fetch.wait.max.ms"}


def make_processor(store, cfg):
    """The processor's pure compute (FrameProcessor) with the worker's default limits and the store's keys."""
    from stream_processor.pipeline import FrameProcessor

    return FrameProcessor(store.cloud_private_keys(), store.device_registry(), cfg,
                          max_bytes=MAX_FRAME_BYTES, max_pixels=MAX_PIXELS)


def make_batches(store, n: int = 60):
    """(frame, n_tiles, tiles, float32 matrix, digest) of ``n`` vtest frames, and the scene model."""
    from benchmarks.pipeline_bench import prepare_model
    from tilestream.config import FeatureConfig

    model_path, model = prepare_model(Path(store.path).parent, progress_fn=progress)
    fp = make_processor(store, FeatureConfig())
    sealer = Sealer(store, "bench-cam")
    out = []
    for i, enc in enumerate(vtest_encoded(n)):
        _, blob = sealer.seal(enc, i)
        for b in fp.process(blob)[0]:
            out.append((b.frame, b.n_tiles, b.tiles, np.array(b.matrix()), b.feature_digest))
    return model_path, model, out


def wire_records(batches, n: int, camera: str, kid: str, key: bytes, dtype: str | None):
    from tilestream.records import TileBatch

    for i in range(n):
        fr0, n_tiles, tiles, m, digest = batches[i % len(batches)]
        fr = dataclasses.replace(fr0, camera_id=camera, seq=i, frame_id=f"{camera}/{i}")
        b = TileBatch.make(fr, n_tiles, [(_T(*t), r) for t, r in zip(tiles, m)], digest, time.time_ns(), dtype=dtype)
        yield fr.frame_id.encode(), b.to_wire(kid, key)


def in_process(model, batches, ckeys, kid, key, n: int, dtype: str | None) -> dict:
    from classifier.stage import FrameClassifier
    from tilestream.metrics import Metrics
    from tilestream.records import TileBatch

    cpu = time.process_time
    t0 = cpu()
    wires = [v for _, v in wire_records(batches, n, "inproc", kid, key, dtype)]
    make = (cpu() - t0) / n
    t0 = cpu()
    for w in wires:
        TileBatch.from_wire(w, ckeys.mac)
    parse = (cpu() - t0) / n
    fc = FrameClassifier(model, Metrics("bench"), keys=ckeys)
    t0 = cpu()
    for i, w in enumerate(wires):
        fc.on_record(w, 0, i, 0.0, 1)
    one = (cpu() - t0) / n
    fc = FrameClassifier(model, Metrics("bench"), keys=ckeys)
    t0 = cpu()
    for s in range(0, n, 16):
        fc.on_records([(w, 0, s + k) for k, w in enumerate(wires[s:s + 16])], 0.0, 1)
    polls = (cpu() - t0) / n
    # One record every 50 ms, as at 20 frames/s over Kafka: the same calls cost 2-2.5x the back to back
    # figure (caches and branch predictors cold after the gap, on this shared machine: 2.47-2.85
    # against 0.99-1.33 ms, the calling thread alone), the reference for the service at camera rates.
    fc = FrameClassifier(model, Metrics("bench"), keys=ckeys)
    spent, k = 0.0, min(n, 200)
    for i, w in enumerate(wires[:k]):
        time.sleep(0.05)
        t0 = time.thread_time()
        fc.on_record(w, 0, i, 0.0, 1)
        spent += time.thread_time() - t0
    res = {"make_to_wire_ms": make * 1e3, "from_wire_ms": parse * 1e3, "on_record_ms": one * 1e3,
           "on_records_16_ms": polls * 1e3, "on_record_paced_ms": spent / k * 1e3,
           "wire_bytes": float(np.mean([len(w) for w in wires]))}
    progress("in process, per frame: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    return res


def over_broker(lk, store, model_path, batches, kid, key, watcher, n: int, rate: float, dtype: str | None,
                consumer_overrides: dict, tag: str, src: str | None = None) -> dict:
    from tilestream import topics
    from kafkaio import clients

    group = f"bench-cls-{tag}-{uuid.uuid4().hex[:6]}"
    commit_group_to_end(lk.bootstrap, group, topics.TILE_FEATURES)
    disk0 = topic_disk_bytes(lk, topics.TILE_FEATURES)
    records = list(wire_records(batches, n, tag, kid, key, dtype))
    producer = clients.producer(lk.bootstrap, "frames", client_id="bench-tiles", max_request_size=4 << 20)

    sent: dict[str, int] = {}

    def send(paced: bool) -> None:
        t0 = time.monotonic()
        for j, (k, v) in enumerate(records):
            if paced:
                time.sleep(max(0.0, t0 + j / rate - time.monotonic()))
            sent[k.decode()] = time.time_ns()
            producer.send(topics.TILE_FEATURES, key=k, value=v)
            if paced:
                producer.flush(30)  # on its way now, not after the producer's linger
        producer.flush(120)

    if not rate:
        send(False)
    env = child_env(lk.bootstrap, store.path, Path(store.path).parent / "home", TILESTREAM_CLASSIFIER_GROUP_ID=group)
    # The consumer settings under test go to the group consumer of kafkaio.rdkafka (librdkafka names)
    # and, for an older classifier (--alt-src), of kafkaio.aio (aiokafka names); the service has no
    # option for them.
    rd = {RDKAFKA_NAMES[k]: v for k, v in consumer_overrides.items()}
    boot = ("import sys, kafkaio.aio as a, kafkaio.rdkafka as r; o = getattr(a, 'group_consumer', None); "
            "q = getattr(r, 'group_consumer', None); "
            f"a.group_consumer = lambda *x, **k: o(*x, **{{**k, **{consumer_overrides!r}}}); "
            f"r.group_consumer = lambda *x, **k: q(*x, **{{**k, **{rd!r}}}); "
            "from tilestream_cli import main; sys.exit(main(sys.argv[1:]))")
    log = open(Path(store.path).parent / f"classifier-{tag}.log", "wb")
    p = subprocess.Popen([sys.executable, "-c", boot, "classify", "--model", str(model_path), "--model-name",
                          f"bench-{uuid.uuid4().hex[:6]}"], env=env, start_new_session=True, stdout=log,
                         stderr=subprocess.STDOUT, cwd=src)  # src: another version's packages first on its path
    broker_pid = lk.status().pid
    try:
        if rate:
            time.sleep(8.0)  # joined its group
            threading.Thread(target=send, args=(True,), daemon=True).start()
        watcher.wait(tag, max(1, n // 10), timeout_s=180, procs=[("classifier", p)], what=tag)
        c0, b0, n0 = proc_cpu_s(p.pid), proc_cpu_s(broker_pid), watcher.count(tag)
        watcher.wait(tag, n, timeout_s=180 + n / 10, procs=[("classifier", p)], what=tag)
        c1, b1 = proc_cpu_s(p.pid), proc_cpu_s(broker_pid)
    finally:
        p.terminate()
        p.wait(30)
        producer.close()
    k = n - n0
    res = {"classifier_cpu_ms": 1e3 * (c1 - c0) / k, "broker_cpu_ms": 1e3 * (b1 - b0) / k,
           "tile_features_kb": (topic_disk_bytes(lk, topics.TILE_FEATURES) - disk0) / n / 1e3}
    lat = ""
    if rate:
        # What the classifier adds (broker both ways included): tile record handed to the producer
        # -> its result read from `results` by this process, for the frames after the first 10 %.
        # Also to the result's own stamp (result_ns: the classifier's clock when the poll that read
        # the record returned, before the model ran): the tile's trip and the poll alone.
        got = {r.frame_id: (a, r.result_ns) for a, r in watcher.of(tag)}
        tail = [(got[f], t) for f, t in list(sent.items())[n // 10:] if f in got]
        added = [(a - t) / 1e6 for (a, _), t in tail]
        stamped = [(s - t) / 1e6 for (_, s), t in tail]
        res.update(added_p50_ms=percentile(added, 50), added_p99_ms=percentile(added, 99),
                   stamped_p50_ms=percentile(stamped, 50), stamped_p99_ms=percentile(stamped, 99))
        lat = (f", added latency p50 {res['added_p50_ms']:.1f} p99 {res['added_p99_ms']:.1f} ms (to the result's "
               f"stamp p50 {res['stamped_p50_ms']:.1f} p99 {res['stamped_p99_ms']:.1f})")
    progress(f"[{tag}] classifier {res['classifier_cpu_ms']:.2f} CPU ms/frame, broker {res['broker_cpu_ms']:.2f}, "
             f"tile-features {res['tile_features_kb']:.1f} KB/frame{lat}")
    return res


def run(frames: int = 800, rate: float = 0.0, reps: int = 2, dtype: str | None = None,
        consumer_overrides: dict | None = None, alt_src: str | None = None) -> dict:
    from tilestream.stagekeys import StageKeys

    res: dict = {"frames": frames, "rate": rate, "dtype": dtype, "consumer_overrides": consumer_overrides or {},
                 "broker": []}
    with tempfile.TemporaryDirectory(prefix="tilestream-bench-") as tmp, local_broker() as lk:
        store = bench_keys(Path(tmp) / "keys", ["bench-cam"])
        model_path, model, batches = make_batches(store)
        stage = StageKeys(store.path)
        kid, key = stage.mac_keys().current()
        res["in_process"] = in_process(model, batches, stage.for_classifier(), kid, key, min(frames, 400), dtype)
        with ResultsWatcher(lk.bootstrap, store.path) as watcher:
            for r in range(reps):
                # With alt_src, each rep runs this tree's classifier (A) then alt_src's (B), back to back.
                for variant, src in (("A", None), ("B", alt_src)) if alt_src else (("", None),):
                    x = over_broker(lk, store, model_path, batches, kid, key, watcher, frames, rate, dtype,
                                    consumer_overrides or {}, f"cls{r}{variant}", src)
                    res["broker"].append({**x, "variant": variant})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=800)
    ap.add_argument("--rate", type=float, default=0.0, help="records/s while the classifier runs (0: pre-filled)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "float16"], default=None, help="default: the wire dtype")
    ap.add_argument("--fetch-min-bytes", type=int, default=None)
    ap.add_argument("--fetch-max-wait-ms", type=int, default=None)
    ap.add_argument("--alt-src", help="A/B: a directory with another version's classifier/ and kafkaio/ "
                                      "(e.g. from `git archive`), run after this tree's in every rep")
    ap.add_argument("--json")
    a = ap.parse_args()
    overrides = {k: v for k, v in (("fetch_min_bytes", a.fetch_min_bytes), ("fetch_max_wait_ms", a.fetch_max_wait_ms))
                 if v is not None}
    res = run(a.frames, a.rate, a.reps, a.dtype, overrides, a.alt_src)
    for x in res["broker"]:
        print(f"{x['variant'] or '-'}: classifier {x['classifier_cpu_ms']:.2f} CPU ms/frame, broker "
              f"{x['broker_cpu_ms']:.2f}" + (f", added p50 {x['added_p50_ms']:.1f} p99 {x['added_p99_ms']:.1f} ms, "
                                             f"to stamp p50 {x['stamped_p50_ms']:.1f} p99 {x['stamped_p99_ms']:.1f}"
                                             if "added_p50_ms" in x else ""))
    b = res["broker"]
    each = ", ".join(f"{x['classifier_cpu_ms']:.2f}" for x in b)
    print(f"classifier {np.mean([x['classifier_cpu_ms'] for x in b]):.2f} CPU ms/frame ({each}), broker "
          f"{np.mean([x['broker_cpu_ms'] for x in b]):.2f}, tile-features {b[0]['tile_features_kb']:.1f} KB/frame; "
          f"in process: on_record {res['in_process']['on_record_ms']:.2f} ms, polls of 16 "
          f"{res['in_process']['on_records_16_ms']:.2f} ms/frame, one every 50 ms "
          f"{res['in_process']['on_record_paced_ms']:.2f} ms")
    write_json(a.json, res)


if __name__ == "__main__":
    main()
