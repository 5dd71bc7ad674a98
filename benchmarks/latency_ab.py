"""A/B of the open-loop latency: variants run alternately on one broker, back to back.

    python -m benchmarks.latency_ab --workers 2 --rate 44 --seconds 20 --reps 3 \\
        --variant base --variant rr:partition=seq --variant old:code=HEAD~1 \\
        --variant linger:env.TILESTREAM_PROCESSOR_...=...

The shared machine's load moves by the minute, so a latency figure means something only next to
the other variant's measured minutes apart: every repetition runs each variant once (the order
reversed every other repetition: ABBA), each on freshly started processor worker(s) and classifier
(started as operators start them, :class:`benchmarks.pipeline_bench.Stage`), warmed by a short
burst, then one open loop (:func:`benchmarks.pipeline_bench.open_loop`: fixed schedule, latency
from the capture time, the per-hop breakdown). CPU ms per frame of each process over the open loop
(/proc) is reported with it, since latency can be bought with CPU.

A variant is ``name[:k=v,k=v...]`` with
``partition=key|seq`` (frames by their key's hash, or on partition seq mod partitions),
``code=<git revision>`` (the services run that revision's code: ``git archive`` into a temporary
directory put first on their PYTHONPATH; this process, the sender, keeps the work tree's) and
``env.NAME=VALUE`` (environment of the services).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (ResultsWatcher, bench_keys, local_broker, machine_load, proc_cpu_s, progress,
                               table, vtest_encoded, warm_broker, write_json)
from benchmarks.pipeline_bench import HOPS, POOL_FRAMES, Bench, Stage, open_loop, prepare_model


def parse_variant(spec: str) -> dict:
    name, _, rest = spec.partition(":")
    v = {"name": name, "partition": "key", "code": None, "env": {}}
    for item in filter(None, rest.split(",")):
        k, _, val = item.partition("=")
        if k == "partition" and val in ("key", "seq"):
            v["partition"] = val
        elif k == "code":
            v["code"] = val
        elif k.startswith("env.") and k[4:]:
            v["env"][k[4:]] = val
        else:
            raise SystemExit(f"bad variant item {item!r} in {spec!r}")
    return v


def export_code(rev: str, where: Path) -> Path:
    """The Python packages of git revision ``rev`` in ``where`` (for a PYTHONPATH)."""
    root = Path(__file__).resolve().parent.parent
    data = subprocess.run(["git", "-C", str(root), "archive", rev], check=True, capture_output=True).stdout
    where.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(where, filter="data")
    return where


def one_run(b: Bench, v: dict, workers: int, rate: float, seconds: float, camera: str, warm: int) -> dict:
    env, _, _ = b.env(camera, **v["env"])
    if v.get("pythonpath"):
        env["PYTHONPATH"] = v["pythonpath"] + os.pathsep + env.get("PYTHONPATH", "")
    stage = Stage(env, b.tmp / "logs" / camera)
    try:
        stage.start(workers, b.model_path, tag=camera)
        stage.wait_healthy()
        b.publish(b.seal(camera + "-warm", warm))  # caches, JIT of the new consumers' paths, group settled
        b.watcher.wait(camera + "-warm", warm, timeout_s=180, procs=stage.procs, what=camera + " warm-up")
        time.sleep(1.0)
        pids = dict(stage.pids(), broker=b.broker.status().pid)
        c0 = {k: proc_cpu_s(p) for k, p in pids.items()}
        g0, f0 = stage.gc_full_collections(), stage.processor_frames()
        out = open_loop(b, stage, rate, seconds, camera, camera, by_seq=v["partition"] == "seq")
        g1 = stage.gc_full_collections()
        out["frames_per_worker"] = [b1 - a1 for a1, b1 in zip(f0, stage.processor_frames())]
        out["gc_full"] = {k: (g1[k][0] - g0[k][0], 1e3 * (g1[k][1] - g0[k][1])) for k in g1 if k in g0}
        n = out["frames"]
        out["cpu_ms"] = {k: (proc_cpu_s(p) - c0[k]) / n * 1e3 for k, p in pids.items()}
        out.pop("latency_ms", None)
        return out
    finally:
        stage.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rate", type=float, required=True, help="offered frames/s (50%% load: half the closed loop's)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warm", type=int, default=60, help="frames of the warm-up burst before each open loop")
    ap.add_argument("--warm-broker", type=float, default=30.0, help="seconds of broker JIT warm-up")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--json")
    args = ap.parse_args()
    variants = [parse_variant(s) for s in args.variant]
    print(machine_load())
    res = {"args": vars(args), "runs": []}
    with tempfile.TemporaryDirectory(prefix="tilestream-ab-") as tmp_s, local_broker() as lk:
        tmp = Path(tmp_s)
        for v in variants:
            if v["code"]:
                v["pythonpath"] = str(export_code(v["code"], tmp / f"code-{v['name']}"))
        cams = [f"ab{r}-{v['name']}" for r in range(args.reps) for v in variants] + ["ab-discard"]
        store = bench_keys(tmp / "keys", cams + [c + "-warm" for c in cams])
        model_path, _ = prepare_model(tmp)
        b = Bench(lk, tmp, model_path, vtest_encoded(POOL_FRAMES), cams + [c + "-warm" for c in cams], store)
        warm_broker(lk.bootstrap, seconds=args.warm_broker)
        with ResultsWatcher(lk.bootstrap, store.path) as watcher:
            b.watcher = watcher
            # One open loop not counted: the broker's JIT still charged the first run here (broker CPU
            # 13.6-14.5 ms/frame against 4-7 in the later ones, and its p99 the worst of the sitting).
            one_run(b, variants[0], args.workers, args.rate, min(10.0, args.seconds), "ab-discard", args.warm)
            for r in range(args.reps):
                for v in (variants if r % 2 == 0 else variants[::-1]):
                    cam = f"ab{r}-{v['name']}"
                    load = os.getloadavg()[0]
                    out = one_run(b, v, args.workers, args.rate, args.seconds, cam, args.warm)
                    out.update(variant=v["name"], rep=r + 1, loadavg_1m=load, at=time.strftime("%H:%M:%S"))
                    res["runs"].append(out)
                    progress(f"== {v['name']} rep {r + 1}: p50 {out['p50']:.0f} p99 {out['p99']:.0f} stamped p99 "
                             f"{out['stamped_p99']:.0f} ms, CPU ms/frame "
                             + ", ".join(f"{k} {x:.1f}" for k, x in out["cpu_ms"].items())
                             + f" (load {load:.1f})")
    rows = []
    for o in res["runs"]:
        h = o.get("hops", {}).get("hops", {})
        rows.append([o["variant"], o["rep"], o["at"], f"{o['loadavg_1m']:.1f}", f"{o['p50']:.0f}", f"{o['p99']:.0f}",
                     f"{o['stamped_p99']:.0f}", f"{o['max']:.0f}",
                     *[f"{h[k]['p99']:.1f} / {h[k]['tail_mean']:.1f}" if k in h else "-" for k in HOPS],
                     f"{o.get('hops', {}).get('queued_frames', 0)}",
                     "/".join(f"{x:.0f}" for x in o.get("frames_per_worker", [])),
                     f"{sum(v for k, v in o['cpu_ms'].items()):.1f}",
                     " ".join(f"{k.split('-')[0][:4]}{k.split('-')[-1][-1] if '-' in k else ''} {v:.1f}"
                              for k, v in o["cpu_ms"].items()),
                     f"{len(o['service_gc_pauses_ms'])}",
                     " ".join(f"{k.split('-')[0][:4]}{k.split('-')[-1][-1] if '-' in k else ''} {c:.0f}/{ms:.0f}"
                              for k, (c, ms) in o.get("gc_full", {}).items())])
    print(table(["variant", "rep", "at", "load 1m", "p50", "p99", "stamped p99", "max",
                 *[f"{k} p99 / tail mean" for k in HOPS], "queued", "frames per worker", "CPU ms/frame (services+broker)", "per process",
                 "GC > 50 ms", "full collections / ms"], rows))
    for v in variants:
        mine = [o for o in res["runs"] if o["variant"] == v["name"]]
        print(f"{v['name']}: p99 " + "/".join(f"{o['p99']:.0f}" for o in mine) + f" (median {np.median([o['p99'] for o in mine]):.0f})"
              + ", p50 " + "/".join(f"{o['p50']:.0f}" for o in mine)
              + f", CPU ms/frame median {np.median([sum(o['cpu_ms'].values()) for o in mine]):.1f}")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
