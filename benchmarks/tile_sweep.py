"""How to choose the tile size: throughput, latency, bytes on Kafka and memory per tile size on vtest frames.

    python -m benchmarks.tile_sweep [--frames 60] [--sizes 32 64 96 128 192 0] [--pipeline-frames 100]
                                    [--load 0.5] [--seconds 20] [--quick] [--json out.json]

Tile sizes 32, 64, 96, 128, 192 px and the whole frame (0: one 768x576 tile, edge policy
"shrink" so no padding is computed). The HOG cell is 16 px for every size (it must divide
the tile size, see stream_processor/features.py), so each size describes the frame with
the same number of HOG cells and the vectors differ only in how they are cut.

For each size, in a fresh process of its own (so peak memory is that size's):

* frames/s and ms/frame of the processor's real path (``ProcessorStage.on_frame``, what the
  worker runs per record: verify, replay check, open, decode, tile, features, the MACed
  records and the replay mark) on sealed vtest frames (JPEG q80), one thread;
* the classifier's per-frame cost, its own per-record path (``FrameClassifier.on_records``: check the
  records' MAC and parse them, classify with a logistic model trained here on the fly on synthetic
  labels — a linear model costs the same whatever it learned — and sign the result);
* bytes on Kafka per frame and topic, as the worker sends them: key + value of the sealed
  frame on `frames`, key + the MACed record of every tile batch on `tile-features`;
* peak RSS (VmHWM) of that process and the Python/numpy allocation peak of one frame
  (tracemalloc).

Then (unless ``--pipeline-frames 0``) each size goes through a real broker with 1 processor
worker + the classifier, started with that size's feature settings, using
benchmarks/pipeline_bench.py's phases:

1. closed loop (``closed_loop``, at least 300 frames): the size's highest sustained end-to-end frames/s;
2. open loop (``open_loop``) with the same warm processes at ``--load`` (default 0.5) of that
   size's own maximum for ``--seconds`` (at least 300 frames): capture-to-result latency
   p50/p99 = result read from `results` minus the capture time in the sealed frame header
   (frames sent on a fixed schedule whatever the responses, so no coordinated omission; below
   saturation, so the percentiles are processing, not queueing behind a backlog);
3. bytes per frame actually on the broker's disk for `frames`, `tile-features` and `results`
   over both phases, and the peak RSS of the worker and the classifier.

Tiles of every size describe the same pixels, so the choice is a trade between cost per frame
(per-tile overhead for small tiles, large arrays for big ones), latency, bytes on
`tile-features` and the spatial resolution the classifier needs (one label per tile).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (OthersCpu, Sealer, bench_keys, machine, machine_load, progress, table, topic_disk_bytes,
                               vtest_encoded, warm_broker, write_json)

SIZES = (32, 64, 96, 128, 192, 0)
HOG_CELL = 16


def cfg_kwargs(size: int, width: int = 768, height: int = 576) -> dict:
    if size == 0:
        side = max(width, height)
        return {"tile_size": side, "hog_cell": HOG_CELL, "edge_policy": "shrink"}
    return {"tile_size": size, "hog_cell": HOG_CELL}


def env_settings(kw: dict) -> dict[str, str]:
    return {f"TILESTREAM_FEATURES_{k.upper()}": str(v) for k, v in kw.items()}


def _one_size(args) -> dict:
    """In a child process: everything for one tile size."""
    keys_dir, blobs, kw, model_out = args
    import tracemalloc

    from classifier.model import TileModel
    from tilestream.config import FeatureConfig
    from tilestream.keys import KeyStore
    from tilestream import topics
    from tilestream.records import TileBatch

    from benchmarks.common import make_classifier, make_stage, proc_status_kib
    import os

    cfg = FeatureConfig(**kw)
    stage = make_stage(KeyStore(keys_dir), cfg)
    mac = stage.stage_keys

    def tile_values(out) -> list[tuple[bytes, bytes]]:
        return [(o.key, o.value) for o in out if o.topic == topics.TILE_FEATURES]

    base_rss = proc_status_kib(os.getpid(), "VmRSS") / 1024
    # Train a logistic model on synthetic labels (tile brighter than the frame's median tile or not).
    # A blob's offset is its index: the same record read again, which the replay check lets through.
    X, y = [], []
    for offset, (key, blob) in enumerate(blobs[:8]):
        recs = [t for _, v in tile_values(stage.on_frame(blob, 0, offset)) for t in TileBatch.from_wire(v, mac).split()]
        v = np.stack([r.vector() for r in recs])
        X.append(v)
        means = np.array([r.vector().mean() for r in recs])
        y.extend(np.where(means >= np.median(means), "bright", "dark"))
    X = np.concatenate(X)
    y = np.asarray(y)
    if len(set(y)) < 2:
        y[::2] = "dark"
        y[1::2] = "bright"
    model = TileModel.train(X, y, cfg, kind="logistic", C=1.0)
    if model_out:
        model.save(model_out)
    proc_t, cls_t, tiles, fr_bytes, tf_bytes, n_rec = [], [], 0, 0, 0, 0
    for i, (offset, (key, blob)) in enumerate([*enumerate(blobs[:2]), *enumerate(blobs)]):
        if i in (0, 2):  # a fresh classifier after the warm-up: it answers a frame id once
            classifier = make_classifier(KeyStore(keys_dir), model)
        t0 = time.perf_counter()
        values = tile_values(stage.on_frame(blob, 0, offset))
        t1 = time.perf_counter()
        # The classifier's per-record path (MAC check, parse, assemble, model, signed result).
        results = classifier.on_records([(v, 0, i * 64 + k) for k, (_, v) in enumerate(values)], time.monotonic(),
                                        time.time_ns())
        t2 = time.perf_counter()
        if [o.topic for o in results] != [topics.RESULTS]:
            raise RuntimeError(f"tile size {kw}: frame {i} gave {[o.topic for o in results]}, not one result")
        if i < 2:
            continue
        batches = [TileBatch.from_wire(v, mac) for _, v in values]
        proc_t.append(t1 - t0)
        cls_t.append(t2 - t1)
        tiles += sum(len(b.tiles) for b in batches)
        n_rec += len(values)
        fr_bytes += len(key) + len(blob)
        tf_bytes += sum(len(k) + len(v) for k, v in values)
    n = len(blobs)
    tracemalloc.start()
    stage.on_frame(blobs[0][1], 0, 0)
    _, tm_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "tile_size": kw["tile_size"], "edge_policy": kw.get("edge_policy", "pad"), "hog_cell": kw["hog_cell"],
        "features_per_tile": int(X.shape[1]), "tiles_per_frame": tiles / n,
        "ms_process": 1e3 * float(np.mean(proc_t)),
        "ms_classify": 1e3 * float(np.mean(cls_t)),
        "fps_process": 1 / float(np.mean(proc_t)),
        "fps_with_classify": 1 / float(np.mean(proc_t) + np.mean(cls_t)),
        "bytes_frames": fr_bytes / n, "bytes_tile_features": tf_bytes / n, "records_per_frame": n_rec / n,
        "peak_rss_mib": proc_status_kib(os.getpid(), "VmHWM") / 1024, "base_rss_mib": base_rss,
        "tracemalloc_peak_mib": tm_peak / 2**20,
    }


def run(frames: int = 60, sizes=SIZES, pipeline_frames: int = 100, quick: bool = False, broker=None,
        load: float = 0.5, seconds: float = 20.0) -> dict:
    if quick:
        frames, seconds = min(frames, 12), min(seconds, 6.0)
    res: dict = {"frames": frames, "rows": [], "load": load, "seconds": seconds}
    with tempfile.TemporaryDirectory(prefix="tilestream-bench-") as tmp_s:
        tmp = Path(tmp_s)
        cameras = ["sweep"] + [f"sweep-{s}{p}" for s in sizes for p in ("", "-lat")]
        store = bench_keys(tmp / "keys", cameras)
        encoded = vtest_encoded(frames)
        sealer = Sealer(store, "sweep")
        blobs = [sealer.seal(e, i) for i, e in enumerate(encoded)]
        ctx = mp.get_context("spawn")
        for s in sizes:
            kw = cfg_kwargs(s)
            progress(f"tile size {s or 'whole frame'}: {frames} frames in a fresh process")
            with ctx.Pool(1) as pool, OthersCpu([w.pid for w in pool._pool]) as others:
                row = pool.apply(_one_size, ((str(store.path), blobs, kw, str(tmp / f"model-{s}.skops")),))
            row["other_processes_cores"] = others.cores
            row["label"] = f"{s} px" if s else "whole frame (768x576)"
            row["size"] = s
            res["rows"].append(row)
        if pipeline_frames:
            # the pipeline sends the first 200 vtest frames (reused with fresh sequence numbers), as pipeline_bench
            from benchmarks.pipeline_bench import POOL_FRAMES

            _pipeline(res, tmp, store, vtest_encoded(POOL_FRAMES), pipeline_frames, broker, load, seconds,
                      min_frames=40 if quick else 300)
    res["tables"] = tables(res)
    return res


def _pipeline(res: dict, tmp: Path, store, encoded, n: int, broker, load: float, seconds: float,
              min_frames: int = 300) -> None:
    from benchmarks.common import ResultsWatcher, broker_for, proc_status_kib
    from benchmarks.pipeline_bench import Bench, closed_loop, open_loop
    from tilestream import topics

    on_disk = (topics.FRAMES, topics.TILE_FEATURES, topics.RESULTS)
    with broker_for(broker) as lk:
        if broker is None:
            progress("warming the broker up (JIT) with frame- and tile-sized records")
            warm_broker(lk.bootstrap)
        with ResultsWatcher(lk.bootstrap, store.path) as watcher:
            for row in res["rows"]:
                s = row["size"]
                cam = f"sweep-{s}"
                b = Bench(lk, tmp, tmp / f"model-{s}.skops", encoded, [cam, f"{cam}-lat"], store)
                b.watcher = watcher
                before = {t: topic_disk_bytes(lk, t) for t in on_disk}
                # at least ~6 s of work per size, and never so few that start-up dominates the closed loop
                m = max(n, min_frames, int(6 * row["fps_process"]))
                progress(f"tile size {s or 'whole frame'} end to end: closed loop ({m} frames), then open loop at "
                         f"{load:.0%} of its max ({machine_load(0.5)})")
                stats, stage = closed_loop(b, 1, m, cam, f"tile{s}", keep_running=True, **env_settings(cfg_kwargs(s)))
                try:
                    row["e2e_fps"] = stats["fps_steady"]
                    row["e2e_cpu_ms"] = sum(stats["cpu_ms_per_frame"].values())
                    row["e2e_frames"] = m
                    if seconds > 0:
                        rate = load * stats["fps_steady"]
                        with OthersCpu([*stage.pids().values(), lk.status().pid]) as others:
                            lat = open_loop(b, stage, rate, max(seconds, min_frames / rate), f"{cam}-lat",
                                            f"tile{s}-{int(load * 100)}%")
                        lat["load"] = load
                        lat["other_processes_cores"] = others.cores
                        progress(f"[tile{s}] other processes on the machine used {others.cores:.2f} cores "
                                 f"during the open loop")
                        row["latency"] = lat
                    row["e2e_peak_rss_mib"] = dict(stage.peak_rss_mib(), broker=proc_status_kib(lk.status().pid) / 1024)
                finally:
                    stage.stop()
                row["disk_bytes_per_frame"] = {t: (topic_disk_bytes(lk, t) - before[t]) / b.frames_sent
                                               for t in on_disk}
                row["disk_bytes_tile_features"] = row["disk_bytes_per_frame"][topics.TILE_FEATURES]


def _f(v, fmt: str) -> str:
    return "-" if v is None or v != v else format(v, fmt)


def tables(res: dict) -> dict[str, str]:
    rows = res["rows"]
    out = {}
    if any("e2e_fps" in r for r in rows):
        head = ["tile size", "tiles/frame", "max frames/s (closed loop)", "latency measured at", "p50 ms", "p99 ms",
                "bytes/frame on Kafka: `frames`", "`tile-features`", "`results`", "total",
                "processor peak RSS MiB", "classifier peak RSS MiB", "processor event-loop lag p99 ms",
                "other processes' CPU during latency, cores"]
        body = []
        for r in rows:
            lat, disk, rss = r.get("latency") or {}, r.get("disk_bytes_per_frame") or {}, r.get("e2e_peak_rss_mib", {})
            at = f"{lat['load']:.0%} load: {lat['rate']:.1f} frames/s x {lat['frames']}" if lat else "-"
            body.append([r["label"], f"{r['tiles_per_frame']:.0f}", f"{r['e2e_fps']:.1f}", at,
                         _f(lat.get("p50"), ".0f"), _f(lat.get("p99"), ".0f"),
                         _f(disk.get("frames"), ".0f"), _f(disk.get("tile-features", r.get("disk_bytes_tile_features")), ".0f"),
                         _f(disk.get("results"), ".0f"), _f(sum(disk.values()) if disk else None, ".0f"),
                         _f(rss.get("processor-0"), ".0f"), _f(rss.get("classifier"), ".0f"),
                         _f(lat.get("loop_lag_p99_ms"), ".0f"), _f(lat.get("other_processes_cores"), ".2f")])
        out["tile_sweep"] = table(head, body)
    head = ["tile size", "tiles/frame", "values/tile", "frames/s process", "ms/frame process", "ms/frame classify",
            "frames/s + classify", "bytes/frame `frames`", "bytes/frame `tile-features`", "tile-features / frames",
            "peak RSS MiB", "alloc peak/frame MiB", "other processes' CPU meanwhile, cores"]
    body = []
    for r in rows:
        body.append([r["label"], f"{r['tiles_per_frame']:.0f}", r["features_per_tile"], f"{r['fps_process']:.1f}",
                     f"{r['ms_process']:.1f}", f"{r['ms_classify']:.1f}", f"{r['fps_with_classify']:.1f}",
                     f"{r['bytes_frames']:.0f}", f"{r['bytes_tile_features']:.0f}",
                     f"{r['bytes_tile_features'] / r['bytes_frames']:.2f}", f"{r['peak_rss_mib']:.0f}",
                     f"{r['tracemalloc_peak_mib']:.1f}", _f(r.get("other_processes_cores"), ".2f")])
    out["tile_sweep_process"] = table(head, body)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=60, help="frames per size in process (default 60)")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="0 = whole frame")
    ap.add_argument("--pipeline-frames", type=int, default=100,
                    help="closed-loop frames per size through the broker, at least 300 and ~6 s of work "
                         "(0: in-process only)")
    ap.add_argument("--load", type=float, default=0.5, help="open-loop rate as a fraction of each size's max (0.5)")
    ap.add_argument("--seconds", type=float, default=20.0, help="open-loop duration per size, >= 300 frames (0: none)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"machine: {machine()}\n{machine_load()}\n", flush=True)
    t0 = time.time()
    res = run(args.frames, args.sizes, args.pipeline_frames, args.quick, load=args.load, seconds=args.seconds)
    if "tile_sweep" in res["tables"]:
        print(f"\nEnd to end, 1 processor worker + classifier per size on a local Kafka; latency = capture time in the "
              f"frame header -> result read from `results`, open loop at {args.load:.0%} of each size's own max")
        print(res["tables"]["tile_sweep"])
    print(f"\nIn process, one thread, {res['frames']} frames per size")
    print(res["tables"]["tile_sweep_process"])
    print(f"\n{time.time() - t0:.0f} s; at the end: {machine_load()}")
    write_json(args.json, {k: v for k, v in res.items() if k != "tables"})


if __name__ == "__main__":
    main()
