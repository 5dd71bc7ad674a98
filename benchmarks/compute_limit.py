"""Single-process compute limit: what one core does per frame, with no Kafka in between.

    python -m benchmarks.compute_limit [--frames 200] [--sheets 8] [--quick] [--json out.json]

Two workloads, each sealed exactly as the edge agent seals (HPKE X25519 + Ed25519):

* vtest.avi frames, 768x576, JPEG q80, 64 px tiles (108 per frame), default FeatureConfig;
* 2000x1000 digit sheets (100x50 digits of OpenCV's digits.png in random order), PNG,
  20 px tiles (5000 per sheet, one digit each), FeatureConfig(tile_size=20, hog_cell=10).

Per frame, the two stages' own per-record methods, the ones their services run — the
processor's :meth:`ProcessorStage.on_frame` (verify, replay check, HPKE open, decode under
limits, tile, features, the MACed tile batch, the replay mark) and the classifier's
:meth:`FrameClassifier.on_record` (MAC check, parse, assemble, model, the signed result), with a
small logistic model trained here on the fly (the scene model on MOG2 labels for vtest, digit
labels for the sheets) — one after the other in one thread, the records handed over in memory.
The frame must come out as a result, or the run stops.

The **compute limit** is 1 / (on_frame + on_record) per frame on one core: everything the
pipeline's stages must compute for a frame, without Kafka; the rate and CPU the end-to-end
pipeline are compared with. (Until 2026-12-02 it was the processor's ``FrameProcessor.process``
plus ``classify_frame``: the same steps without the replay check, the batch MAC and the result
signature, and with the tile batch's serialisation and parsing left out as transport.)
The breakdown comes from the processor's own timers in the same pass (verify, open, decode,
features; tiling and the classifier's MAC check + parse are timed again apart); ``records`` is the rest of
``on_frame`` (replay check, tile batch build, serialisation and MAC, mark), ``classify`` the
rest of ``on_record`` (assemble, model, result, signature).
The **crypto share** is (seal + sign + verify + open) / the whole per-frame cost from
encode on the camera to the result in the classifier (Kafka transport excluded).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (CpuTimer, EncodedFrame, Sealer, bench_keys, digit_sheets, machine, machine_load,
                               make_classifier, make_stage, progress, table, write_json)

STAGES = ("encode", "seal", "sign", "verify", "open", "decode", "tile", "features", "records", "parse", "classify")
AGENT = ("encode", "seal", "sign")
LIMIT = ("verify", "open", "decode", "tile", "features", "records", "parse", "classify")  # on_frame + on_record
CRYPTO = ("seal", "sign", "verify", "open")
PROCESSOR_TIMERS = ("verify", "open", "decode", "features")  # ProcessorStage's stage_seconds

VTEST_CFG_KW: dict = {}
DIGITS_CFG_KW = {"tile_size": 20, "hog_cell": 10}


def _seal_timed(sealer: Sealer, enc: EncodedFrame, seq: int) -> tuple[bytes, float, float]:
    """crypto.seal_frame split into its two halves (HPKE seal, Ed25519 sign), same bytes."""
    from tilestream import crypto, envelope

    h = sealer.header(seq, time.time_ns(), enc.width, enc.height, enc.encoding)
    hb = h.pack()
    t0 = time.perf_counter()
    sealed = crypto.SUITES[h.suite].encrypt(enc.data, sealer.cloud_public, info=crypto.INFO_PREFIX + hb)
    t1 = time.perf_counter()
    sig = sealer.device_key.sign(envelope.signed_message(h.version, hb, sealed))
    t2 = time.perf_counter()
    return envelope.assemble(hb, sealed, sig), t1 - t0, t2 - t1


def measure(name: str, images, encoding: str, quality: int, cfg, model, store, sealer: Sealer, warmup: int = 3) -> dict:
    """Per-frame stage times (seconds, one list per stage) of ``images`` through agent, processor, classifier."""
    from edge_agent.encode import encode_image
    from stream_processor.pipeline import decode_image
    from stream_processor.tiling import split
    from tilestream import crypto, topics
    from tilestream.records import TileBatch

    stage, classifier = make_stage(store, cfg), make_classifier(store, model)
    fp = stage.processor  # the stage's own compute, for the breakdown
    times = {s: [] for s in STAGES}
    n_tiles = 0
    rec_bytes = 0
    blob_bytes = 0
    images = list(images)
    with CpuTimer() as cpu:
        for i, img in enumerate([*images[:warmup], *images]):
            keep = i >= warmup
            t0 = time.perf_counter()
            data = encode_image(img, encoding, quality)
            t_enc = time.perf_counter() - t0
            enc = EncodedFrame(data, img.shape[1], img.shape[0], encoding)
            blob, t_seal, t_sign = _seal_timed(sealer, enc, i)
            # The processor's per-record method, as the worker runs it; its own timers (verify, open,
            # decode, features) give the breakdown of this same pass.
            before = {k: stage.metrics.counter("stage_seconds_sum", stage=k) for k in PROCESSOR_TIMERS}
            t0 = time.perf_counter()
            outs = stage.on_frame(blob, 0, i)
            t_stage = time.perf_counter() - t0
            st = {k: stage.metrics.counter("stage_seconds_sum", stage=k) - before[k] for k in PROCESSOR_TIMERS}
            values = [o.value for o in outs if o.topic == topics.TILE_FEATURES]
            if not values:
                raise RuntimeError(f"{name}: frame {i} gave no tile batch: {[o.topic for o in outs]}")
            # The classifier's per-record method on each batch, as its service runs it.
            now, now_ns = time.monotonic(), time.time_ns()
            t0 = time.perf_counter()
            results = [o for k, v in enumerate(values) for o in classifier.on_record(v, 0, i * 64 + k, now, now_ns)]
            t_cls = time.perf_counter() - t0
            if [o.topic for o in results] != [topics.RESULTS]:
                raise RuntimeError(f"{name}: frame {i} gave {[o.topic for o in results]}, not one result")
            # Apart, on the same frame: tiling alone (a view per tile, a copy for padded edge tiles),
            # which the processor's timer counts in features; the classifier's MAC check + parse alone.
            env = crypto.verify_frame(blob, fp.devices)
            gray = decode_image(crypto.open_envelope(env, fp.cloud_keys), env.header, fp.max_bytes, fp.max_pixels)
            t0 = time.perf_counter()
            split(gray, cfg)
            t_tile = time.perf_counter() - t0
            t0 = time.perf_counter()
            batches = [TileBatch.from_wire(v, classifier.keys.mac) for v in values]
            t_parse = time.perf_counter() - t0
            if not keep:
                continue
            n_tiles += sum(len(b.tiles) for b in batches)
            rec_bytes += sum(len(v) for v in values)
            blob_bytes += len(blob)
            for s, v in (("encode", t_enc), ("seal", t_seal), ("sign", t_sign), ("verify", st["verify"]),
                         ("open", st["open"]), ("decode", st["decode"]), ("tile", t_tile),
                         ("features", max(0.0, st["features"] - t_tile)),
                         ("records", max(0.0, t_stage - sum(st.values()))),
                         ("parse", t_parse), ("classify", max(0.0, t_cls - t_parse))):
                times[s].append(v)
    n = len(images)
    mean = {s: float(np.mean(v)) for s, v in times.items()}
    limit_s = sum(mean[s] for s in LIMIT)
    no_cls_s = limit_s - mean["classify"] - mean["parse"]
    total_s = sum(mean.values())
    cloud_s = total_s - sum(mean[s] for s in AGENT)
    return {
        "name": name, "frames": n, "tiles_per_frame": n_tiles / n, "width": images[0].shape[1],
        "height": images[0].shape[0], "encoding": encoding, "tile_size": cfg.tile_size, "hog_cell": cfg.hog_cell,
        "sealed_bytes": blob_bytes / n, "tile_record_bytes_per_frame": rec_bytes / n,
        "ms": {s: v * 1e3 for s, v in mean.items()},
        "fps_process": 1 / no_cls_s, "fps_limit": 1 / limit_s, "tiles_per_s_limit": n_tiles / n / limit_s,
        "ms_limit": limit_s * 1e3, "ms_total": total_s * 1e3,
        "crypto_share_total": sum(mean[s] for s in CRYPTO) / total_s,
        "crypto_share_cloud": (mean["verify"] + mean["open"]) / cloud_s,
        "crypto_share_limit": (mean["verify"] + mean["open"]) / limit_s,
        "wall_s": cpu.wall, "cpu_s": cpu.cpu,
    }


def vtest_workload(n: int, store, progress_fn=progress):
    from classifier.train import train_scene_model
    import sampledata as samples
    from tilestream.config import FeatureConfig

    cfg = FeatureConfig(**VTEST_CFG_KW)
    video = str(samples.path("vtest.avi"))
    progress_fn("training the scene model (logistic, 150 frames, MOG2 labels) ...")
    model = train_scene_model(video, cfg, kind="logistic", max_frames=150, progress=lambda m: None)
    frames = list(samples.iter_video_frames(video, max_frames=n))
    return cfg, model, frames


def digits_workload(n: int, progress_fn=progress):
    from classifier.model import TileModel
    from stream_processor.features import tile_features
    import sampledata as samples
    from tilestream.config import FeatureConfig

    cfg = FeatureConfig(**DIGITS_CFG_KW)
    images, labels = samples.load_digits()
    progress_fn("training the digits model (logistic on tile features, even-numbered digits) ...")
    X = np.stack([tile_features(d, cfg) for d in images])
    y = labels.astype(str)
    model = TileModel.train(X[0::2], y[0::2], cfg, kind="logistic", C=1.0)
    acc = float(np.mean(model.estimator.predict(X[1::2]) == y[1::2]))
    sheets = [s for s, _ in digit_sheets(n, digits=(images, labels))]
    return cfg, model, sheets, acc


def run(frames: int = 200, sheets: int = 8, quick: bool = False, progress_fn=progress) -> dict:
    if quick:
        frames, sheets = min(frames, 40), min(sheets, 2)
    with tempfile.TemporaryDirectory(prefix="tilestream-bench-") as tmp:
        store = bench_keys(Path(tmp) / "keys", ["bench-cam"])
        sealer = Sealer(store, "bench-cam")
        cfg, model, vframes = vtest_workload(frames, store, progress_fn)
        progress_fn(f"vtest: {len(vframes)} frames through agent -> processor -> classifier code, one thread")
        vt = measure("vtest 768x576 JPEG q80, 64 px tiles", vframes, "jpeg", 80, cfg, model, store, sealer)
        del vframes
        dcfg, dmodel, dsheets, acc = digits_workload(sheets, progress_fn)
        progress_fn(f"digits: {len(dsheets)} sheets 2000x1000 PNG, 20 px tiles (held-out digit accuracy {acc:.3f})")
        dg = measure("digit sheets 2000x1000 PNG, 20 px tiles", dsheets, "png", 0, dcfg, dmodel, store, sealer,
                     warmup=1)
        dg["digit_accuracy"] = acc
    res = {"vtest": vt, "digits": dg}
    res["tables"] = tables(res)
    return res


def tables(res: dict) -> dict[str, str]:
    vt, dg = res["vtest"], res["digits"]
    both = (vt, dg)
    summary = table(
        ["workload", "frames", "tiles/frame", "frames/s process", "frames/s + classify (compute limit)",
         "tiles/s (limit)", "ms/frame (limit)"],
        [[w["name"], w["frames"], f"{w['tiles_per_frame']:.0f}", f"{w['fps_process']:.1f}", f"{w['fps_limit']:.1f}",
          f"{w['tiles_per_s_limit']:.0f}", f"{w['ms_limit']:.2f}"] for w in both])
    side = {"encode": "agent", "seal": "agent", "sign": "agent"}
    stages = table(
        ["stage", "where", "vtest ms/frame", "vtest %", "digits ms/frame", "digits %"],
        [[s, side.get(s, "compute limit"), f"{vt['ms'][s]:.3f}", f"{100 * vt['ms'][s] / vt['ms_total']:.1f}",
          f"{dg['ms'][s]:.3f}", f"{100 * dg['ms'][s] / dg['ms_total']:.1f}"] for s in STAGES]
        + [["total", "", f"{vt['ms_total']:.2f}", "100", f"{dg['ms_total']:.2f}", "100"]])
    crypto = table(
        ["workload", "seal+sign+verify+open ms", "share of whole frame cost", "verify+open share of cloud side",
         "verify+open share of compute limit"],
        [[w["name"], f"{sum(w['ms'][s] for s in CRYPTO):.3f}", f"{100 * w['crypto_share_total']:.2f}%",
          f"{100 * w['crypto_share_cloud']:.2f}%", f"{100 * w['crypto_share_limit']:.2f}%"] for w in both])
    sizes = table(
        ["workload", "sealed frame bytes", "tile batch bytes/frame (binary, MACed)", "digit accuracy (held out)"],
        [[vt["name"], f"{vt['sealed_bytes']:.0f}", f"{vt['tile_record_bytes_per_frame']:.0f}", "-"],
         [dg["name"], f"{dg['sealed_bytes']:.0f}", f"{dg['tile_record_bytes_per_frame']:.0f}",
          f"{dg.get('digit_accuracy', float('nan')):.3f}"]])
    return {"compute_summary": summary, "compute_stages": stages, "compute_crypto": crypto, "compute_sizes": sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=200, help="vtest frames (default 200)")
    ap.add_argument("--sheets", type=int, default=8, help="digit sheets (default 8)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 40 frames, 2 sheets")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    args = ap.parse_args()
    print(f"machine: {machine()}\n{machine_load()}\n")
    res = run(args.frames, args.sheets, args.quick)
    t = res["tables"]
    print("Single-process compute limit (one thread, no Kafka)\n" + t["compute_summary"])
    print("\nPer-frame cost by stage (mean)\n" + t["compute_stages"])
    print("\nCrypto share of frame cost (goal: <= 2%)\n" + t["compute_crypto"])
    print("\nSizes\n" + t["compute_sizes"])
    write_json(args.json, res)


if __name__ == "__main__":
    main()
