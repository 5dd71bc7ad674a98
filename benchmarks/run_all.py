"""All of tilestream's benchmarks in one run, and benchmarks/REPORT.md with tables and charts.

    python -m benchmarks.run_all [--quick] [--soak] [--skip compute transport pipeline sweep peers]
                                 [--profile/--no-profile] [--out benchmarks/REPORT.md]
    python -m benchmarks.run_all --only sweep --merge /tmp/tilestream-bench-last.json   # re-measure one step

`make bench` runs this. Steps (each can be skipped):

1. compute    benchmarks/compute_limit.py   single-process compute limit, stages, crypto share
2. transport  benchmarks/transport.py       Kafka's own perf tools with our record sizes
3. pipeline   benchmarks/pipeline_bench.py  end to end, 1 and 2 workers, closed + open loop, py-spy profile
4. sweep      benchmarks/tile_sweep.py      tile sizes 32..192 and whole frame, in process and end to end
                                            (max frames/s, p50/p99 latency at 50% load, bytes, memory)
5. peers      benchmarks/peers.py           seed Pool design, Quix Streams processor

One local Apache Kafka serves steps 2-5 (warmed up first). Every ratio in the report is
between two numbers measured in this one run on this machine. ``--quick`` is a smoke run
(minutes, numbers not representative); the default run takes about 10-11 minutes on
2 cores (the tile sweep about 4 of them); ``--soak`` adds 10 minutes at 50% load (RSS slope, latency drift).

``--only STEP.. --merge FULL_JSON`` measures only those steps (with their own broker) and puts
them into a previous run's full results (the per-frame JSON every run leaves in
/tmp/tilestream-bench-last.json); the report then says which sections were re-measured when.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import local_broker, machine, machine_load, progress, table, verdict, warm_broker
from benchmarks.pipeline_bench import step_seed_fps, step_work_ms

HERE = Path(__file__).resolve().parent
STEPS = ("compute", "transport", "pipeline", "sweep", "peers", "agent")

GOALS = {
    "e2e": 0.8,  # end-to-end throughput >= 0.8x the single-process compute limit
    "seed": 0.8,  # end to end with 2 workers >= 0.8x the seed Pool design's throughput (issue 12)
    "quix": 1.0,  # the Faust processor at least as fast as the same stage in Quix Streams (issue 12)
    "cpu": 1.2,  # pipeline CPU per frame <= 1.2x the single-process work of the frame (issue 12)
    "p99_x": 2.0,  # capture-to-result p99 at 50% load <= 2x the compute limit's ms per frame (issue 12)
    "agent_x": 1.5,  # agent CPU per frame at camera rate <= 1.5x capture+encode (issue 12)
    "crypto": 0.02,  # crypto <= 2% of frame cost
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run")
    ap.add_argument("--soak", action="store_true", help="also 10 min at 50%% load (1 worker)")
    ap.add_argument("--soak-minutes", type=float, default=10.0)
    ap.add_argument("--skip", nargs="*", default=[], choices=STEPS)
    ap.add_argument("--only", nargs="+", choices=STEPS, help="run only these steps")
    ap.add_argument("--merge", metavar="FULL_JSON",
                    help="put the steps measured now into this previous run's full results and report both")
    ap.add_argument("--no-profile", action="store_true", help="no py-spy profile of the pipeline")
    ap.add_argument("--out", default=str(HERE / "REPORT.md"))
    ap.add_argument("--charts-dir", default=str(HERE))
    ap.add_argument("--render-only", metavar="FULL_JSON",
                    help="only write the report and charts from a previous run's full results")
    args = ap.parse_args()
    if args.only:
        args.skip = [s for s in STEPS if s not in args.only]
    if args.merge and args.quick:
        ap.error("--merge takes a full run's numbers; a --quick smoke run's do not belong in the report")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.charts_dir).mkdir(parents=True, exist_ok=True)
    if args.render_only:
        res = json.loads(Path(args.render_only).read_text())
        from benchmarks import compute_limit, peers, pipeline_bench, tile_sweep

        for name, mod in (("compute", compute_limit), ("pipeline", pipeline_bench), ("sweep", tile_sweep),
                          ("peers", peers)):  # agent: its one table is kept in the results
            if res.get(name):
                res[name]["tables"] = mod.tables(res[name])
        finish(res, args, time.time())
        return

    t_start = time.time()
    m, load = machine(), machine_load()
    print(f"machine: {m}\n{load}\n", flush=True)
    res: dict = {"machine": m, "load_at_start": load, "quick": args.quick, "errors": {},
                 "generated_at": time.strftime("%Y-%m-%d %H:%M %Z")}
    q = args.quick

    def step(name, fn):
        if name in args.skip:
            progress(f"== {name}: skipped")
            return None
        progress(f"== {name}")
        t0 = time.time()
        try:
            out = fn()
            out["seconds"] = time.time() - t0
            res[name] = out
            for tname, t in out.get("tables", {}).items():
                print(f"\n{tname}\n{t}\n", flush=True)
            return out
        except Exception as exc:  # noqa: BLE001 - one failed step must not lose the others
            traceback.print_exc()
            res["errors"][name] = f"{type(exc).__name__}: {exc}"
            return None

    from benchmarks import agent_bench, compute_limit, peers, pipeline_bench, tile_sweep, transport

    cl = step("compute", lambda: compute_limit.run(quick=q))
    limit = cl["vtest"]["fps_limit"] if cl else None
    need_broker = any(s not in args.skip for s in ("transport", "pipeline", "sweep", "peers", "agent"))
    if need_broker:
        with local_broker() as lk:
            progress("warming the broker up (JIT)")
            warm_broker(lk.bootstrap)
            step("transport", lambda: transport.run(quick=q, broker=lk))
            pl = step("pipeline", lambda: pipeline_bench.run(
                frames=1000, workers=(1, 2), seconds=30.0, loads=(0.5, 0.9), profile=not args.no_profile,
                compute_limit_fps=limit, quick=q, broker=lk, soak_minutes=args.soak_minutes if args.soak else 0.0,
                latency_repeats=3))  # the latency goal is judged on three consecutive runs
            e2e = max((r["fps_steady"] for r in pl["runs"]), default=None) if pl else None
            step("sweep", lambda: tile_sweep.run(frames=40, pipeline_frames=0 if q else 100, quick=q, broker=lk,
                                                 load=0.5, seconds=20.0))
            step("peers", lambda: peers.run(frames=160, quix_frames=500, e2e_fps=e2e, compute_limit_fps=limit,
                                            quick=q, broker=lk))
            step("agent", lambda: agent_bench.run(rates=(10.0, 25.0), seconds=15.0, reps=2, quick=q, broker=lk))
    res["seconds"] = time.time() - t_start
    if args.merge:
        res = merge(res, Path(args.merge))
    full = Path(tempfile.gettempdir()) / "tilestream-bench-last.json"
    full.write_text(json.dumps(res, default=str))
    progress(f"full results (with per-frame data) in {full}; re-render with --render-only {full}")
    finish(res, args, t_start)


def merge(new: dict, base_path: Path) -> dict:
    """A previous run's full results with the steps measured now in place of its own."""
    base = json.loads(base_path.read_text())
    if base.get("quick"):
        raise SystemExit(f"{base_path} is a --quick smoke run: nothing to merge into")
    base.setdefault("generated_at", time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(base_path.stat().st_mtime)))
    done = [s for s in STEPS if s in new]
    for s in done:
        base[s] = new[s]
        base["errors"].pop(s, None)
    base["errors"].update(new["errors"])
    base.setdefault("remeasured", []).append({"steps": done, "failed": list(new["errors"]), "at": new["generated_at"],
                                              "load_at_start": new["load_at_start"], "seconds": new["seconds"]})
    return base


def finish(res: dict, args, t_start: float) -> None:
    charts = make_charts(res, Path(args.charts_dir))
    report = render(res, charts, Path(args.out).parent)
    Path(args.out).write_text(report)
    raw = Path(args.out).with_suffix(".json")
    raw.write_text(json.dumps(strip(res), indent=1, default=str))
    print("\n" + headline(res)[0])
    print(f"\nwrote {args.out}, {raw.name} and {len(charts)} chart(s) in {time.time() - t_start:.0f} s")
    if res["errors"]:
        print("steps that failed: " + ", ".join(res["errors"]), file=sys.stderr)
        sys.exit(1)


def strip(res: dict) -> dict:
    """The raw numbers without per-frame lists (kept small enough to diff)."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in ("arrivals_s", "latency_ms", "labels", "tables")}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return clean(res)


# --------------------------------------------------------------------------- headline


def _verdict(ok: bool | None, measured: int = 1) -> str:
    return verdict(ok, measured)


def _work_note(run: dict) -> str:
    ref = run.get("inprocess_ms")
    return f"; in-process work measured before / after the step: {ref[0]:.1f} / {ref[1]:.1f} ms" if ref else ""


def headline(res: dict) -> tuple[str, str]:
    cl, pl, pe = res.get("compute"), res.get("pipeline"), res.get("peers")
    ratios, goals = [], []
    limit = cl["vtest"]["fps_limit"] if cl else (pl or {}).get("compute_limit_fps")
    best = max(pl["runs"], key=lambda r: r["fps_steady"]) if pl else None
    if best and limit:
        r = best["fps_steady"] / limit
        per = ", ".join(f"{x['workers']} worker{'s' if x['workers'] > 1 else ''} {x['fps_steady'] / limit:.2f}x"
                        for x in pl["runs"])
        ratios.append(["end-to-end throughput / single-process compute limit",
                       f"**{r:.2f}x**", f"{best['fps_steady']:.1f} / {limit:.1f} frames/s ({per})"])
        goals.append(["end-to-end throughput >= 0.8x the compute limit (2 cores, broker included)",
                      f"{r:.2f}x ({best['workers']} workers)", _verdict(r >= GOALS["e2e"])])
        for x in pl["runs"]:
            if x.get("pipeline_cpu_ms"):
                tot, work = sum(x["pipeline_cpu_ms"].values()), step_work_ms(x, limit)
                goals.append([f"pipeline CPU per frame <= {GOALS['cpu']}x the in-process work ({x['workers']} worker"
                              f"{'s' if x['workers'] > 1 else ''}; sender, broker, processors, classifier)",
                              f"{tot / work:.2f}x ({tot:.1f} / {work:.1f} ms{_work_note(x)})",
                              _verdict(tot / work <= GOALS["cpu"])])
    # The e2e / Pool goal against the Pool measured right before and after the step (pipeline_bench.
    # seed_pool_fps); the peers step's own Pool, minutes away, only when the step has none.
    seeded = [x for x in pl["runs"] if step_seed_fps(x)] if pl else []
    if seeded:
        x = max(seeded, key=lambda r: r["workers"])
        sp = step_seed_fps(x)
        r = x["fps_steady"] / sp
        per = ", ".join(f"{y['workers']} worker{'s' if y['workers'] > 1 else ''} {y['fps_steady'] / step_seed_fps(y):.2f}x"
                        for y in seeded)
        ratios.append(["tilestream end to end / seed Pool design, measured next to each other",
                       f"**{r:.2f}x**", f"{x['fps_steady']:.1f} / {sp:.1f} frames/s ({per}); Pool(n) before / after "
                       f"the {x['workers']}-worker step: " + " / ".join(f"{v:.1f}" for v in x["seed_pool_fps"])])
        goals.append([f">= {GOALS['seed']}x the seed Pool design's throughput (end to end, {x['workers']} worker"
                      f"{'s' if x['workers'] > 1 else ''}, Pool measured before and after the step)", f"{r:.2f}x",
                      _verdict(r >= GOALS["seed"])])
    if pe:
        pr = peers.ratios(pe) if (peers := _peers()) else {}
        seed = pr.get("seed_pool_fps")
        if "e2e_over_seed" in pr and not seeded:
            ratios.append(["tilestream end to end / seed Pool design", f"**{pr['e2e_over_seed']:.2f}x**",
                           f"{pe['e2e_fps']:.1f} / {seed:.1f} frames/s (in-process, 1 thread: "
                           f"{pr['in_process_over_seed']:.2f}x)"])
            goals.append([f">= {GOALS['seed']}x the seed Pool design's throughput (end to end, 2 workers)",
                          f"{pr['e2e_over_seed']:.2f}x", _verdict(pr["e2e_over_seed"] >= GOALS["seed"])])
        else:
            ratios.append(["tilestream in-process / seed Pool design" + (" (peers step)" if seeded else ""),
                           f"**{pr['in_process_over_seed']:.2f}x**", f"{pe['compute_limit_fps']:.1f} / {seed:.1f} frames/s"])
        if "faust_over_quix" in pr:
            ok = peers.processor_means(pe)
            pairs = peers.pair_ratios(pe)
            ratios.append(["tilestream processor (Faust) / Quix Streams processor",
                           f"**{pr['faust_over_quix']:.2f}x**",
                           f"{ok['faust']['fps']:.1f} / {ok['quix']['fps']:.1f} frames/s, one process each, "
                           f"mean of {ok['faust']['runs']} + {ok['quix']['runs']} runs (ABBA)"
                           + (f"; adjacent pairs {', '.join(f'{v:.2f}' for v in pairs)}x" if pairs else "")])
            goals.append(["Faust processor >= Quix Streams processor (same stage, one process each)",
                          f"{pr['faust_over_quix']:.2f}x", _verdict(pr["faust_over_quix"] >= GOALS["quix"])])
    if cl:
        v = cl["vtest"]
        ratios.append(["crypto share of frame cost (seal+sign+verify+open / whole frame, vtest)",
                       f"**{100 * v['crypto_share_total']:.2f}%**",
                       f"{sum(v['ms'][s] for s in ('seal', 'sign', 'verify', 'open')):.2f} of {v['ms_total']:.1f} ms; "
                       f"cloud side verify+open {100 * v['crypto_share_cloud']:.2f}%; "
                       f"digit sheets {100 * cl['digits']['crypto_share_total']:.2f}%"])
        goals.append(["crypto <= 2% of frame cost", f"{100 * v['crypto_share_total']:.2f}% (vtest)",
                      _verdict(v["crypto_share_total"] <= GOALS["crypto"])])
    ag = res.get("agent")
    if ag:
        for rate, r in ag["ratios"].items():
            goals.append([f"edge agent CPU per frame at {rate} fps <= {GOALS['agent_x']}x capture + encode "
                          f"(median of {ag['reps']} paced runs)", f"{r:.2f}x", _verdict(r <= GOALS["agent_x"])])
    if pl and limit:
        for r in pl["runs"]:
            work_ms = step_work_ms(r, limit)
            for lat in r["latency"]:
                if abs(lat["load"] - 0.5) < 1e-9:
                    run = f", run {lat['repeat']}" if pl.get("latency_repeats", 1) > 1 else ""
                    goals.append([f"capture-to-result p99 at 50% load <= {GOALS['p99_x']:.0f}x one frame's in-process "
                                  f"work ({r['workers']} worker{'s' if r['workers'] > 1 else ''}, {lat['rate']:.1f} "
                                  f"frames/s{run})",
                                  f"{lat['p99'] / work_ms:.2f}x (p99 {lat['p99']:.0f} ms / {work_ms:.1f} ms; "
                                  f"p50 {lat['p50']:.0f})",
                                  _verdict(lat["p99"] <= GOALS["p99_x"] * work_ms, lat.get("results", lat["frames"]))])
    return (table(["ratio (same run, same machine)", "value", "numbers"], ratios) if ratios else "(no ratios)",
            table(["goal", "measured", "verdict"], goals) if goals else "(no goals measured)")


def _peers():
    from benchmarks import peers

    return peers


def _run_cpu(run: dict) -> dict[str, float]:
    """A closed-loop step's CPU ms per frame by process: the pipeline's own (sender and broker intake
    in, bench reader out), else, for results from before that split, every sampled process."""
    return run.get("pipeline_cpu_ms") or run["cpu_ms_per_frame"]


def explain(res: dict) -> list[str]:
    """Why the misses, from the measured CPU split and the py-spy profile of this run."""
    out = []
    pl, cl, pe, tr = res.get("pipeline"), res.get("compute"), res.get("peers"), res.get("transport")
    if pl and pl["runs"]:
        limit = pl["compute_limit_fps"]
        for r in pl["runs"]:
            cpu = _run_cpu(r)
            if not cpu:
                continue
            tot, work = sum(cpu.values()), step_work_ms(r, limit)
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))
            out.append(f"With {r['workers']} worker(s) the pipeline spends **{tot:.1f} CPU ms per frame** ({parts}) "
                       f"against {work:.1f} ms in one process without Kafka, measured before and after the step "
                       f"(the compute step said {1e3 / limit:.1f}): {tot / work:.2f}x the work. "
                       f"At {r['fps_steady']:.1f} frames/s that keeps {tot * r['fps_steady'] / 1e3:.2f} of the 2 cores "
                       f"busy; the rest of the cores were {'taken by other processes on this shared machine' if tot * r['fps_steady'] / 1e3 < 1.6 else 'all used'}."
                       + (f" (The bench's own results reader and /metrics scrapes took {r['cpu_ms_per_frame']['bench']:.1f}"
                          " ms more, not counted.)" if r.get("pipeline_cpu_ms") and "bench" in r["cpu_ms_per_frame"] else ""))
            pm = r.get("processor_ms") or {}
            if "send_and_loop" in pm:
                out.append(f"{r['workers']} worker(s), the workers' own timers: a frame takes {pm['frame']:.1f} ms on "
                           f"the event loop, of which verify+open+decode+features {pm['frame'] - pm['send_and_loop']:.1f}"
                           f" ms and sending its tile records (one TileBatch per frame) "
                           f"{pm['send_and_loop']:.1f} ms; the agent handles one frame at a time (concurrency 1).")
        fl = pl.get("kafka_floor")
        if fl and pl["runs"]:
            r = pl["runs"][0]
            work, floor = step_work_ms(r, limit), fl["broker_ms"] + fl["clients_ms"]
            tot = sum(_run_cpu(r).values())
            out.append(f"Kafka alone, moving the same records stage to stage at the same {fl['rate']:.1f} frames/s with "
                       f"librdkafka clients that do nothing else, costs the broker {fl['broker_ms']:.2f} ms and the "
                       f"clients {fl['clients_ms']:.2f} ms per frame: {floor:.1f} ms, {floor / work:.2f}x the "
                       f"{work:.1f} ms of in-process work before any stage code runs, where the CPU goal leaves "
                       f"{GOALS['cpu'] - 1:.1f}x for everything. What the {r['workers']}-worker pipeline spends "
                       f"beyond its in-process work and that floor: {tot - work - floor:.1f} ms "
                       f"({(tot - work - floor) / work:.2f}x)"
                       + (f", where the in-process work itself measured {min(r['inprocess_ms']):.1f} and "
                          f"{max(r['inprocess_ms']):.1f} ms around the step" if r.get("inprocess_ms") else "")
                       + "."
                       + (f" The same records take p50 {fl['latency_p50_ms']:.1f} / p99 {fl['latency_p99_ms']:.1f} ms "
                          f"from the camera to the reader through the three hops, with no stage work in them."
                          if "latency_p99_ms" in fl else ""))
        prof = next((r.get("profile") for r in pl["runs"] if r.get("profile")), None)
        if prof:
            for proc, p in prof.items():
                tot = max(1, p["total"])
                top = ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in list(p["categories"].items())[:5])
                out.append(f"py-spy, {proc}: {top}.")
    if tr:
        rows = {(r["client"].split(" (")[0], r["what"], r["direction"]): r for r in tr["rows"]}
        cons = rows.get(("kafka-python consumer", "tile batch", "consume"))
        if cons:
            out.append(f"kafka-python alone reads {cons['records_per_s']:.0f} tile batches/s ({cons['size'] / 1e3:.0f} KB, "
                       f"one per frame) here with nothing else to do.")
    if cl:
        v = cl["vtest"]
        out.append(f"In one process, features are {100 * v['ms']['features'] / v['ms_total']:.0f}% of the whole "
                   f"frame cost; handing the features from one stage to the next (replay check, tile batch build, "
                   f"MAC and mark {v['ms']['records']:.2f} ms; MAC check and parse {v['ms']['parse']:.2f} ms per "
                   f"frame) is part of the compute limit, Kafka is not.")
        if v["crypto_share_total"] > GOALS["crypto"]:
            out.append(f"Crypto is {v['crypto_share_total'] * 100:.1f}% of the whole vtest frame: every frame costs an "
                       f"X25519 key agreement on each side (HPKE), AES-GCM over the ~{v['sealed_bytes'] / 1e3:.0f} KB "
                       f"frame, a SHA-256 of it on each side and one Ed25519 signature and verification of that digest, "
                       f"{sum(v['ms'][s] for s in ('seal', 'sign', 'verify', 'open')):.2f} ms together; "
                       f"on the cloud side alone (verify+open) it is {v['crypto_share_cloud'] * 100:.1f}%.")
    if pe and pe.get("seed"):
        s = max(pe["seed"], key=lambda x: x["processes"])
        out.append(f"The seed Pool design does only decode + features with {s['processes']} processes and no "
                   f"transport: {s['fps']:.1f} frames/s; tilestream's end-to-end path adds the broker, records and "
                   f"two more Python processes on the same 2 cores.")
    return out


# --------------------------------------------------------------------------- physical limits


def limits(res: dict) -> str | None:
    """What the pipeline is compared against: each unavoidable piece of work per vtest frame, measured
    alone in this run, and the frames/s one core (and the 2 cores) could do if it were all there was."""
    cl, pl, tr, pe = res.get("compute"), res.get("pipeline"), res.get("transport"), res.get("peers")
    if not cl:
        return None
    v, rows = cl["vtest"], []
    ncpu = os.cpu_count() or 1

    def row(what, ms, source):
        rows.append([what, f"{ms:.2f}", f"{1e3 / ms:.0f}" if ms > 0 else "-", f"{ncpu * 1e3 / ms:.0f}" if ms > 0 else "-",
                     source])

    ms = v["ms"]
    row("decode (JPEG q80 768x576 -> grey, OpenCV)", ms["decode"], "compute_limit, one thread")
    row("tiling + features (108 tiles: a*I+b, T, w, sums, HOG)", ms["tile"] + ms["features"], "compute_limit")
    row("model (108 tiles, predict_proba)", ms["classify"], "compute_limit")
    row("crypto, cloud side (Ed25519 verify + HPKE open)", ms["verify"] + ms["open"], "compute_limit")
    row("crypto, camera side (HPKE seal + Ed25519 sign)", ms["seal"] + ms["sign"], "compute_limit (on the camera)")
    row("replay check, tile batch build + MAC, mark; MAC check + parse", ms["records"] + ms["parse"], "compute_limit")
    row("**the in-process work of a frame** (compute limit)", v["ms_limit"], "compute_limit: on_frame + on_record")
    fl = (pl or {}).get("kafka_floor")
    if fl:
        row(f"Kafka alone: the frame's records through the broker at {fl['rate']:.0f} frames/s (broker "
            f"{fl['broker_ms']:.2f} + librdkafka clients {fl['clients_ms']:.2f})", fl["broker_ms"] + fl["clients_ms"],
            "pipeline_bench: transport.kafka_floor")
    if pe and pe.get("seed"):
        s = max(pe["seed"], key=lambda x: x["processes"])
        rows.append([f"seed Pool({s['processes']}) design: decode + features, no crypto, no Kafka", "",
                     "", f"{s['fps']:.0f} (measured)", "peers"])
    out = table(["work per vtest frame", "ms", "frames/s, one core", f"frames/s, {ncpu} cores", "measured by"], rows)
    wire = []
    if pl and pl.get("topic_bytes_per_frame"):
        tot = sum(pl["topic_bytes_per_frame"].values())
        for t, b in pl["topic_bytes_per_frame"].items():
            wire.append([f"`{t}`", f"{b / 1e3:.1f}", ""])
        wire.append(["all three", f"{tot / 1e3:.1f}", ""])
    if tr:
        for r in tr["rows"]:
            if r["client"].startswith("Java"):
                wire.append([f"{r['what']} ({r['size'] / 1e3:.0f} KB), {r['client'].split(' (')[0]} {r['direction']}", "",
                             f"{r['records_per_s']:.0f} records/s, {r['mb_per_s']:.0f} MB/s"])
    if wire:
        out += "\n\nBytes on the wire per frame (on the broker's disk) and what Kafka's own tools move on this " \
               "machine with nothing else running:\n\n" + table(["bytes per frame / record", "KB", "Kafka alone"], wire)
    return out


# --------------------------------------------------------------------------- charts


def make_charts(res: dict, where: Path) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed (pip install matplotlib): no charts")
        return {}
    import numpy as np

    charts = {}
    pl, sw, pe, cl = res.get("pipeline"), res.get("sweep"), res.get("peers"), res.get("compute")
    if pl and any(r["latency"] for r in pl["runs"]):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in pl["runs"]:
            for lat in r["latency"]:
                v = np.sort(np.array(lat["latency_ms"]))
                ax.plot(v, np.arange(1, len(v) + 1) / len(v),
                        label=f"{r['workers']} worker(s), {int(lat['load'] * 100)}% load ({lat['rate']:.1f} fps): "
                              f"p99 {lat['p99']:.0f} ms")
        work_ms = 1e3 / pl["compute_limit_fps"]
        ax.axvline(GOALS["p99_x"] * work_ms, color="red", ls="--", lw=1,
                   label=f"goal: p99 <= {GOALS['p99_x']:.0f}x one frame's in-process work = "
                         f"{GOALS['p99_x'] * work_ms:.0f} ms at 50% load")
        ax.axhline(0.99, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("capture-to-result latency, ms (log)")
        ax.set_ylabel("fraction of frames")
        ax.set_title("Capture-to-result latency, open loop (vtest, real broker)")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
        charts["latency"] = _save(fig, where / "latency.png")
    if pl and pl["runs"]:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        names = [f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}\nend to end" for r in pl["runs"]]
        vals = [r["fps_steady"] for r in pl["runs"]]
        colors = ["tab:blue"] * len(vals)
        if pe and pe.get("seed"):
            for s in pe["seed"]:
                names.append(f"seed Pool({s['processes']})\nno crypto/Kafka")
                vals.append(s["fps"])
                colors.append("tab:grey")
        for p in (pe or {}).get("processor", []):
            if "fps" in p:
                names.append({"faust": "Faust processor\nalone", "quix": "Quix processor\nalone"}[p["kind"]]
                             + (f", run {p['run']}" if "run" in p else ""))
                vals.append(p["fps"])
                colors.append("tab:orange" if p["kind"] == "faust" else "tab:green")
        ax.bar(names, vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=9)
        lim = pl["compute_limit_fps"]
        ax.axhline(lim, color="black", ls="--", lw=1, label=f"single-process compute limit {lim:.1f} fps")
        ax.axhline(GOALS["e2e"] * lim, color="red", ls=":", lw=1, label=f"goal 0.8x limit = {GOALS['e2e'] * lim:.1f} fps")
        ax.set_ylabel("frames/s (vtest 768x576, 64 px tiles)")
        ax.set_title("Throughput vs processor workers and peers (2 cores, same run)")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        charts["throughput"] = _save(fig, where / "throughput.png")
    if sw and sw.get("rows"):
        rows = sw["rows"]
        has_lat = any(r.get("latency") for r in rows)
        if has_lat:
            fig, (ax, ax3) = plt.subplots(2, 1, figsize=(8, 8), gridspec_kw={"height_ratios": [3, 2]})
        else:
            fig, ax = plt.subplots(figsize=(8, 4.5))
        x = np.arange(len(rows))
        labels = [r["label"].replace(" (768x576)", "") for r in rows]
        ax.plot(x, [r["fps_process"] for r in rows], "o-", label="processor, in-process frames/s")
        ax.plot(x, [r["fps_with_classify"] for r in rows], "s-", label="+ classify, in-process frames/s")
        if any("e2e_fps" in r for r in rows):
            ax.plot(x, [r.get("e2e_fps", np.nan) for r in rows], "^-", label="end to end, 1 worker, frames/s")
        ax.set_xticks(x, labels)
        ax.set_xlabel("tile size")
        ax.set_ylabel("frames/s")
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.bar(x, [r["bytes_tile_features"] / 1e3 for r in rows], alpha=0.25, color="tab:purple",
                label="tile-features KB/frame")
        ax2.axhline(rows[0]["bytes_frames"] / 1e3, color="tab:purple", ls=":", lw=1, label="frames KB/frame (sealed)")
        ax2.set_ylabel("KB per frame on Kafka")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
        ax.set_title("Tile-size sweep (vtest 768x576, HOG cell 16)")
        if has_lat:
            lat = [r.get("latency") or {} for r in rows]
            for k, (q, off) in enumerate((("p50", -0.2), ("p99", 0.2))):
                vals = [v.get(q, np.nan) for v in lat]
                ax3.bar(x + off, vals, width=0.4, label=f"{q} capture-to-result ms", color=("tab:blue", "tab:red")[k])
                for xi, v in zip(x + off, vals):
                    if v == v:
                        ax3.text(xi, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
            ax3.set_xticks(x, [f"{lb}\n{v['rate']:.1f} fps" if v else lb for lb, v in zip(labels, lat)], fontsize=8)
            load = next(v["load"] for v in lat if v)
            ax3.set_title(f"Latency end to end, 1 worker, open loop at {load:.0%} of each size's max (rate below)",
                          fontsize=10)
            ax3.set_ylabel("ms")
            ax3.grid(alpha=0.3, axis="y")
            ax3.legend(fontsize=8)
        else:
            fig.set_size_inches(8, 5.2)
        charts["tile_sweep"] = _save(fig, where / "tile_sweep.png")
    if cl and pl and any(r.get("pipeline_cpu_ms") for r in pl["runs"]):
        from benchmarks.compute_limit import LIMIT

        v = cl["vtest"]
        fig, ax = plt.subplots(figsize=(8, 4.2))
        bars = [("in one thread\n(compute limit)", [(s, v["ms"][s]) for s in LIMIT])]
        for r in pl["runs"]:
            if r.get("pipeline_cpu_ms"):
                w = f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}"
                if r.get("inprocess_ms"):
                    bars.append((f"in one thread,\nnext to the {w} step", [("in-process work", step_work_ms(r, 1.0))]))
                bars.append((f"pipeline,\n{w}", list(r["pipeline_cpu_ms"].items())))
        colors, cmap = {}, plt.get_cmap("tab20")
        for y, (name, parts) in enumerate(bars):
            left = 0.0
            for part, w in parts:
                key = "processor" if part.startswith("processor") else part
                if key not in colors:
                    colors[key] = cmap(len(colors))
                ax.barh([y], [w], left=left, color=colors[key], edgecolor="white",
                        label=key if key not in ax.get_legend_handles_labels()[1] else None)
                if w >= 1.2:
                    ax.text(left + w / 2, y, f"{w:.1f}", ha="center", va="center", fontsize=7)
                left += w
            ax.text(left, y, f" {left:.1f} ms", va="center", fontsize=9)
        refs = [step_work_ms(r, 1e3 / v["ms_limit"]) for r in pl["runs"] if r.get("pipeline_cpu_ms")]
        goal = GOALS["cpu"] * sum(refs) / len(refs)
        ax.axvline(goal, color="red", ls="--", lw=1, label=f"goal {GOALS['cpu']}x = {goal:.1f} ms")
        ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("CPU ms per vtest frame")
        ax.set_title("CPU per frame: each process of the pipeline vs the same work in one thread")
        ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.18))
        charts["cpu"] = _save(fig, where / "cpu.png")
    if cl:
        v = cl["vtest"]
        from benchmarks.compute_limit import STAGES

        fig, ax = plt.subplots(figsize=(8, 3.8))
        left = 0.0
        cmap = plt.get_cmap("tab20")
        for i, s in enumerate(STAGES):
            w = v["ms"][s]
            ax.barh([0], [w], left=left, color=cmap(i), label=f"{s} {w:.2f} ms")
            left += w
        ax.set_yticks([])
        ax.set_xlabel("ms per vtest frame, one thread")
        ax.set_title(f"Where one frame's cost goes (crypto = seal+sign+verify+open: "
                     f"{100 * v['crypto_share_total']:.1f}%)")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.3))
        charts["stages"] = _save(fig, where / "stages.png")
    return charts


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


# --------------------------------------------------------------------------- report


def render(res: dict, charts: dict[str, str], where: Path) -> str:
    ratios, goals = headline(res)
    lines = [
        "# tilestream benchmarks",
        "",
        f"Generated by `python -m benchmarks.run_all{' --quick' if res['quick'] else ''}` on "
        f"{res.get('generated_at') or time.strftime('%Y-%m-%d %H:%M %Z')} in {res['seconds'] / 60:.1f} min.",
        "",
    ]
    for r in res.get("remeasured", []):
        lines += [f"Re-measured alone on {r['at']} in {r['seconds'] / 60:.1f} min (`python -m benchmarks.run_all --only "
                  f"{' '.join(r['steps'] + r['failed'])} --merge ...`): {', '.join(r['steps']) or 'nothing'}"
                  f"{'; failed: ' + ', '.join(r['failed']) if r['failed'] else ''}. Load when it started: "
                  f"{r['load_at_start']}. The other sections are from the run above.", ""]
    lines += [
        f"**Machine:** {res['machine']}",
        "",
        f"**Load when the run started:** {res['load_at_start']}. The machine is shared: every ratio below "
        "compares two numbers measured in this one run, not across runs or machines.",
        "",
    ]
    if res["quick"]:
        lines += ["> **Smoke run (`--quick`)**: small samples, one worker count; the numbers show that everything "
                  "runs, they are not representative.", ""]
    lines += ["## Headline ratios", "", ratios, "", "## Goals", "", goals, ""]
    why = explain(res)
    if why:
        lines += ["### Why (measured in this run)", ""] + [f"- {w}" for w in why] + [""]
    lim = limits(res)
    if lim:
        lines += ["## Physical limits (what the pipeline is compared against)", "", lim, ""]
    if "cpu" in charts:
        lines += ["Where the CPU of a frame goes, per process, against the same frame's work in one thread:", "",
                  f"![cpu]({charts['cpu']})", ""]
    if res["errors"]:
        lines += ["## Steps that failed", ""] + [f"- `{k}`: {v}" for k, v in res["errors"].items()] + [""]
    sections = [
        ("compute", "Single-process compute limit (benchmarks/compute_limit.py)",
         ["compute_summary", "compute_stages", "compute_crypto", "compute_sizes"], ["stages"]),
        ("pipeline", "End to end over the real broker (benchmarks/pipeline_bench.py)",
         ["pipeline_throughput", "pipeline_processor_ms", "pipeline_latency", "pipeline_hops", "pipeline_cpu", "pipeline_kafka_floor", "pipeline_rss",
          "pipeline_bytes",
          "pipeline_profile", "pipeline_profile_leaves", "pipeline_soak"], ["throughput", "latency"]),
        ("sweep", "Choosing the tile size (benchmarks/tile_sweep.py)", ["tile_sweep", "tile_sweep_process"],
         ["tile_sweep"]),
        ("peers", "Peers: the seed Pool design and Quix Streams (benchmarks/peers.py)",
         ["peers_seed", "peers_processor"], []),
        ("agent", "The edge agent at camera rate (benchmarks/agent_bench.py)", ["agent_paced"], []),
        ("transport", "Kafka alone with our record sizes (benchmarks/transport.py)", ["transport"], []),
    ]
    captions = {
        "compute_summary": "Frames/s and tiles/s of one thread, no Kafka.",
        "compute_stages": "Mean ms per frame by stage (agent = on the camera; transport = only because tiles travel "
                          "as Kafka records).",
        "compute_crypto": "Crypto share of frame cost.",
        "pipeline_throughput": "Closed loop: N frames pre-filled, then the workers start; sustained = frames from "
                               "the moment the workers had processed 10% of them until the last result arrived.",
        "pipeline_processor_ms": "The processor workers' own timers (/metrics), mean ms per frame: the executor's "
                                 "stages and the whole frame on the event loop.",
        "pipeline_latency": "Open loop at a fixed rate (capture time = scheduled send time, so no coordinated "
                            "omission); latency = result read from `results` minus capture.",
        "pipeline_hops": "Where the open loop's latency goes, per hop, from honest timestamps of each frame "
                         "(sealed capture time, `frames` LogAppendTime, `tile-features` and `results` CreateTime, "
                         "the reader's receive time); 'queued' = waiting for the same worker's previous frame "
                         "(its tile-features time), derived from the partition each worker holds.",
        "pipeline_cpu": "CPU ms per frame of each process over the closed loop's sustained window (/proc).",
        "pipeline_kafka_floor": "What Kafka alone costs per frame: after the steps, on the same warm broker, the "
                                "records a frame puts on `frames`, `tile-features`, `replay-marks` and `results` "
                                "(their measured sizes) passed stage to stage at the 1-worker step's rate by "
                                "librdkafka clients that do nothing else, as the services' clients are set up "
                                "(acks=all, idempotent, commits every second). CPU ms per frame over the measured "
                                "window (/proc); latency = the reader's receive time minus the frame's scheduled "
                                "send time.",
        "pipeline_rss": "Peak RSS (VmHWM) of each process, read before it was stopped.",
        "pipeline_bytes": "Bytes on the broker's disk per frame sent (records and batch headers).",
        "pipeline_profile": "py-spy samples of the 1-worker processor and the classifier during a closed-loop burst.",
        "pipeline_profile_leaves": "Hottest functions (self samples).",
        "tile_sweep": "End to end on the real broker, per size 1 processor worker + the classifier started with "
                      "that size's feature settings (vtest 768x576, JPEG q80, HOG cell 16). Max = closed loop; "
                      "latency = open loop at the rate shown (a fraction of that size's own max, so below "
                      "saturation), capture time in the sealed frame header to the result read from `results`; "
                      "bytes on the broker's disk per frame over both phases; event-loop lag = how late the "
                      "worker's loop woke a 100 ms sleep during the open loop; other processes' CPU = what the "
                      "rest of this shared machine used meanwhile (disturbance).",
        "agent_paced": "vtest.avi (768x576) at JPEG q80 paced like a camera; the real agent (capture, seal, sign, "
                       "spool, publish to the broker with acks=all and idempotence) against capture + encode alone on "
                       "the same frames; CPU of every thread from the scheduler over a steady window; median of the "
                       "runs.",
        "tile_sweep_process": "In process, one thread, one fresh process per size; bytes computed exactly as the "
                              "processor serialises them.",
    }
    for key, title, tabs, chs in sections:
        sec = res.get(key)
        if not sec:
            continue
        lines += [f"## {title}", ""]
        for t in tabs:
            if t in sec.get("tables", {}):
                if t in captions:
                    lines += [captions[t], ""]
                lines += [sec["tables"][t], ""]
        for c in chs:
            if c in charts:
                lines += [f"![{c}]({charts[c]})", ""]
        if key == "compute":
            lines += [f"Digit sheets: held-out tile (digit) accuracy of the on-the-fly model "
                      f"{sec['digits'].get('digit_accuracy', float('nan')):.3f}.", ""]
    lines += ["## How to run", "", "```sh",
              "make bench                                   # this report (python -m benchmarks.run_all)",
              "python -m benchmarks.run_all --quick         # smoke run, a few minutes",
              "python -m benchmarks.run_all --soak          # + 10 min at 50% load: RSS slope, latency drift",
              "python -m benchmarks.compute_limit | pipeline_bench | tile_sweep | peers | transport   # one step",
              "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
