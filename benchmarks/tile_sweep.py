"""How to choose the tile size: cost, bytes on Kafka and memory per tile size on vtest frames.

    python -m benchmarks.tile_sweep [--frames 60] [--sizes 32 64 96 128 192 0] [--pipeline-frames 0] [--quick]

Tile sizes 32, 64, 96, 128, 192 px and the whole frame (0: one 768x576 tile, edge policy
"shrink" so no padding is computed). The HOG cell is 16 px for every size (it must divide
the tile size, see stream_processor/features.py), so each size describes the frame with
the same number of HOG cells and the vectors differ only in how they are cut.

For each size, in a fresh process of its own (so peak memory is that size's):

* frames/s and ms/frame of the processor's real path (``FrameProcessor.process``: verify,
  open, decode, tile, features, records) on sealed vtest frames (JPEG q80), one thread;
* the classifier's per-frame cost (parse the records, classify with a logistic model trained
  here on the fly on synthetic labels: a linear model costs the same whatever it learned);
* bytes on Kafka per frame and topic, computed exactly as the processor produces them:
  key + value of the sealed frame on `frames`, key + the record's own JSON serialisation
  (what Faust sends) of every tile on `tile-features`;
* peak RSS (VmHWM) of that process and the Python/numpy allocation peak of one frame
  (tracemalloc).

With ``--pipeline-frames N`` each size also goes through the real broker (1 processor
worker + classifier, closed loop, as benchmarks/pipeline_bench.py) for end-to-end frames/s
and the tile-features bytes actually on the broker's disk.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (Sealer, bench_keys, machine, machine_load, progress, table, topic_disk_bytes,
                               vtest_encoded, write_json)

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

    from classifier.assembler import FrameAssembler
    from classifier.model import TileModel
    from classifier.service import classify_frame
    from tilestream.config import FeatureConfig
    from tilestream.keys import KeyStore
    from tilestream.records import TileBatch

    from benchmarks.common import make_processor, proc_status_kib
    import os

    cfg = FeatureConfig(**kw)
    fp = make_processor(KeyStore(keys_dir), cfg)
    base_rss = proc_status_kib(os.getpid(), "VmRSS") / 1024
    # Train a logistic model on synthetic labels (tile brighter than the frame's median tile or not).
    X, y = [], []
    for key, blob in blobs[:8]:
        recs = [t for r in fp.process(blob)[0] for t in r.split()]
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
    proc_t, cls_t, ser_t, tiles, fr_bytes, tf_bytes, n_rec = [], [], [], 0, 0, 0, 0
    for i, (key, blob) in enumerate([*blobs[:2], *blobs]):
        t0 = time.perf_counter()
        records, _ = fp.process(blob)
        t1 = time.perf_counter()
        values = [(r.frame_id.encode(), r.dumps()) for r in records]
        t2 = time.perf_counter()
        asm = FrameAssembler()
        frame = None
        for k, (_, v) in enumerate(values):
            for t in TileBatch.from_bytes(v).split():
                frame = asm.add(t, 0, k, 0.0) or frame
        classify_frame(model, frame, time.time_ns()).to_json()
        t3 = time.perf_counter()
        if i < 2:
            continue
        proc_t.append(t1 - t0)
        ser_t.append(t2 - t1)
        cls_t.append(t3 - t2)
        tiles += sum(len(r.tiles) for r in records)
        n_rec += len(records)
        fr_bytes += len(key) + len(blob)
        tf_bytes += sum(len(k) + len(v) for k, v in values)
    n = len(blobs)
    tracemalloc.start()
    records, _ = fp.process(blobs[0][1])
    [r.dumps() for r in records]
    _, tm_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "tile_size": kw["tile_size"], "edge_policy": kw.get("edge_policy", "pad"), "hog_cell": kw["hog_cell"],
        "features_per_tile": int(X.shape[1]), "tiles_per_frame": tiles / n,
        "ms_process": 1e3 * float(np.mean(proc_t)), "ms_serialize": 1e3 * float(np.mean(ser_t)),
        "ms_classify": 1e3 * float(np.mean(cls_t)),
        "fps_process": 1 / float(np.mean(proc_t)),
        "fps_with_classify": 1 / float(np.mean(proc_t) + np.mean(cls_t)),
        "bytes_frames": fr_bytes / n, "bytes_tile_features": tf_bytes / n, "records_per_frame": n_rec / n,
        "peak_rss_mib": proc_status_kib(os.getpid(), "VmHWM") / 1024, "base_rss_mib": base_rss,
        "tracemalloc_peak_mib": tm_peak / 2**20,
    }


def run(frames: int = 60, sizes=SIZES, pipeline_frames: int = 0, quick: bool = False, broker=None) -> dict:
    if quick:
        frames = min(frames, 12)
    res: dict = {"frames": frames, "rows": []}
    with tempfile.TemporaryDirectory(prefix="tilestream-bench-") as tmp_s:
        tmp = Path(tmp_s)
        cameras = ["sweep"] + [f"sweep-{s}" for s in sizes]
        store = bench_keys(tmp / "keys", cameras)
        encoded = vtest_encoded(frames)
        sealer = Sealer(store, "sweep")
        blobs = [sealer.seal(e, i) for i, e in enumerate(encoded)]
        ctx = mp.get_context("spawn")
        for s in sizes:
            kw = cfg_kwargs(s)
            progress(f"tile size {s or 'whole frame'}: {frames} frames in a fresh process")
            with ctx.Pool(1) as pool:
                row = pool.apply(_one_size, ((str(store.path), blobs, kw, str(tmp / f"model-{s}.skops")),))
            row["label"] = f"{s} px" if s else "whole frame (768x576)"
            row["size"] = s
            res["rows"].append(row)
        if pipeline_frames:
            _pipeline(res, tmp, store, encoded, sizes, pipeline_frames, broker)
    res["tables"] = tables(res)
    return res


def _pipeline(res: dict, tmp: Path, store, encoded, sizes, n: int, broker) -> None:
    from benchmarks.common import ResultsWatcher, local_broker
    from benchmarks.pipeline_bench import Bench, _nullctx, closed_loop
    from tilestream import topics

    with (local_broker() if broker is None else _nullctx(broker)) as lk:
        with ResultsWatcher(lk.bootstrap) as watcher:
            for row in res["rows"]:
                s = row["size"]
                b = Bench(lk, tmp, tmp / f"model-{s}.skops", encoded, [f"sweep-{s}"], store)
                b.watcher = watcher
                before = topic_disk_bytes(lk, topics.TILE_FEATURES)
                m = max(n, int(6 * row["fps_process"]))  # at least ~6 s of work per size
                stats, _ = closed_loop(b, 1, m, f"sweep-{s}", f"tile{s}", **env_settings(cfg_kwargs(s)))
                row["e2e_fps"] = stats["fps_steady"]
                row["e2e_cpu_ms"] = sum(stats["cpu_ms_per_frame"].values())
                row["e2e_peak_rss_mib"] = stats["peak_rss_mib"]
                row["disk_bytes_tile_features"] = (topic_disk_bytes(lk, topics.TILE_FEATURES) - before) / m
                row["e2e_frames"] = m


def tables(res: dict) -> dict[str, str]:
    rows = res["rows"]
    has_e2e = any("e2e_fps" in r for r in rows)
    head = ["tile size", "tiles/frame", "values/tile", "frames/s process", "ms/frame process", "ms/frame classify",
            "frames/s + classify", "bytes/frame `frames`", "bytes/frame `tile-features`", "tile-features / frames",
            "peak RSS MiB", "alloc peak/frame MiB"]
    if has_e2e:
        head += ["end-to-end frames/s (1 worker)", "tile-features bytes/frame on disk", "processor peak RSS MiB"]
    body = []
    for r in rows:
        line = [r["label"], f"{r['tiles_per_frame']:.0f}", r["features_per_tile"], f"{r['fps_process']:.1f}",
                f"{r['ms_process']:.1f}", f"{r['ms_classify']:.1f}", f"{r['fps_with_classify']:.1f}",
                f"{r['bytes_frames']:.0f}", f"{r['bytes_tile_features']:.0f}",
                f"{r['bytes_tile_features'] / r['bytes_frames']:.2f}", f"{r['peak_rss_mib']:.0f}",
                f"{r['tracemalloc_peak_mib']:.1f}"]
        if has_e2e:
            line += [f"{r.get('e2e_fps', float('nan')):.1f}", f"{r.get('disk_bytes_tile_features', float('nan')):.0f}",
                     f"{r.get('e2e_peak_rss_mib', {}).get('processor-0', float('nan')):.0f}"]
        body.append(line)
    return {"tile_sweep": table(head, body)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="0 = whole frame")
    ap.add_argument("--pipeline-frames", type=int, default=0, help="also run each size end to end (closed loop)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"machine: {machine()}\n{machine_load()}\n")
    res = run(args.frames, args.sizes, args.pipeline_frames, args.quick)
    print(res["tables"]["tile_sweep"])
    write_json(args.json, {k: v for k, v in res.items() if k != "tables"})


if __name__ == "__main__":
    main()
