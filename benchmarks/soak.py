"""Soak on the 3-broker cluster: N cameras in real time for D minutes, one broker restart in the middle.

    python -m benchmarks.soak [--cameras 4] [--minutes 30] [--workers 1] [--restart-node 2] [--json out.json]

A local 3-node KRaft cluster (deploy/local_kafka.py, replication 3, min.insync.replicas 2),
``--workers`` `tilestream process` workers and one `tilestream classify` (child processes, their
Faust topics replicated 3 too), and ``--cameras`` EdgeAgents in this process (threads), each
streaming vtest.avi at its own 10 frames/s in real time (looping) through its own spool, as a
camera does. Half-way through, one broker is restarted (SIGTERM, start, back in the ISR of every
partition).

Every 10 s it samples

* the RSS (``/proc/PID/status`` VmRSS) of every process: this one (the agents), each processor,
  the classifier and the three broker JVMs (a restarted broker is a new pid, same name);
* the consumer lag of the processor's group on ``frames`` and of the classifier's group on
  ``tile-features``: end offsets minus the group's committed offsets (admin), summed over partitions.

At the end the cameras stop and drain, the classifier is stopped cleanly, and ``frames`` and
``results`` are read whole: frames sealed / acknowledged / on the topic, results, duplicates and
frames lost (no result). The table gives, per process, the RSS slope in MiB/min (least squares over
the second half of the run, so start-up growth does not count) and per group the largest lag.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import bench_keys, child_env, machine, machine_load, proc_status_kib, progress, table, verdict, write_json

SAMPLE_S = 10.0


def start_cluster(tmp: Path):
    from deploy.local_kafka import DEFAULT_VERSION, LocalKafka, cluster_hosts, free_port_on
    from tilestream.config import KafkaSettings
    from tilestream.topics import pipeline_topics

    hosts = cluster_hosts("127.0.0.1", 3)
    lk = LocalKafka(DEFAULT_VERSION, port=free_port_on(hosts), controller_port=free_port_on(hosts),
                    state_dir=tmp / "kafka", progress=progress, brokers=3)
    lk.start(pipeline_topics(KafkaSettings()))
    return lk


def start_stages(children, env: dict, tmp: Path, model: Path, workers: int) -> tuple[dict, list[int], int]:
    """Processor workers and a classifier, logging to files under ``tmp``; returns (name -> Popen, web ports, metrics port)."""
    from deploy.local_kafka import free_port
    from tilestream_cli.procs import wait_http

    procs, ports = {}, []
    for i in range(workers):
        port = free_port()
        with open(tmp / f"processor-{i}.log", "ab") as log:
            procs[f"processor-{i}"] = children.start(f"processor-{i}", ["process", "--http-port", str(port), "--datadir",
                                                                      str(tmp / f"faust-{i}")], env,
                                                     stdout=log, stderr=subprocess.STDOUT)
        ports.append(port)
    mport = free_port()
    with open(tmp / "classifier.log", "ab") as log:
        procs["classifier"] = children.start("classifier", ["classify", "--model", str(model), "--http-port", str(mport)],
                                             env, stdout=log, stderr=subprocess.STDOUT)
    for port, name in zip(ports + [mport], procs):
        wait_http(f"http://127.0.0.1:{port}/healthz", 120, procs[name])
    return procs, ports, mport


class Lag:
    """Consumer lag of a group on a topic: end offsets - committed offsets, summed (None if unreadable now)."""

    def __init__(self, cluster):
        self.cluster = cluster

    def __call__(self, group: str, topic: str) -> int | None:
        from kafkaio import clients

        where = self.cluster.answering_bootstrap()
        try:
            admin = clients.admin(where)
            try:
                committed = admin.list_group_offsets(group).get(group, {})
            finally:
                admin.close()
            c = clients.consumer(where, client_id="soak-lag")
            try:
                parts = clients.partitions(c, topic, wait_s=5)
                end = c.end_offsets(parts, timeout_ms=10000)
            finally:
                c.close()
        except Exception:  # noqa: BLE001 - a broker being restarted: no sample this time
            return None
        return sum(max(0, end[tp] - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0))
                   for tp in parts)


def out_of_isr(cluster, node: int) -> list[str]:
    from kafkaio import clients

    admin = clients.admin(cluster.answering_bootstrap())
    try:
        return [f"{t['name']}-{p['partition_index']}" for t in admin.describe_topics(admin.list_topics())
                for p in t["partitions"] if node in p["replica_nodes"] and node not in p["isr_nodes"]]
    finally:
        admin.close()


def restart_broker(cluster, node: int, timeout_s: float = 180.0) -> float:
    """SIGTERM ``node``, start it, wait until it is in the ISR of every partition it replicates; seconds taken."""
    t0 = time.monotonic()
    cluster.kill_node(node, signal.SIGTERM)
    cluster.start_node(node)
    while True:
        try:
            if not out_of_isr(cluster, node):
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - metadata not answerable yet
            pass
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"node {node} not back in the ISR within {timeout_s:.0f}s")
        time.sleep(1.0)


def slope_mib_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) over the second half of the run, in MiB/min (pure)."""
    if not points:
        return float("nan")
    half = points[-1][0] / 2
    pts = [p for p in points if p[0] >= half]
    if len(pts) < 3:
        return float("nan")
    t, m = np.array(pts).T
    return float(np.polyfit(t / 60.0, m, 1)[0])


def metric(port: int, name: str) -> float | None:
    from tilestream.metrics import scrape

    return scrape(port, name, timeout_s=2)


def run(cameras: int = 4, minutes: float = 30.0, workers: int = 1, restart_node: int | None = None) -> dict:
    from benchmarks.pipeline_bench import prepare_model
    from edge_agent.agent import EdgeAgent
    from kafkaio.clients import read_range
    import sampledata as samples
    from classifier.results import verify_result
    from tilestream import envelope, topics
    from tilestream.config import AgentSettings
    from tilestream_cli.procs import Children
    from tilestream.stagekeys import StageKeys

    names = [f"soak-cam-{i}" for i in range(cameras)]
    res: dict = {"cameras": cameras, "minutes": minutes, "workers": workers, "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="tilestream-soak-") as tmp_s:
        tmp = Path(tmp_s)
        cluster = start_cluster(tmp)
        children = Children()
        agents: list[EdgeAgent] = []
        threads: list[threading.Thread] = []
        try:
            store = bench_keys(tmp / "keys", names)
            model, _ = prepare_model(tmp)
            app_id, group = "soak-processor", "soak-classifier"
            env = child_env(cluster.bootstrap, store.path, tmp / "home", TILESTREAM_PROCESSOR_APP_ID=app_id,
                            TILESTREAM_CLASSIFIER_GROUP_ID=group, TILESTREAM_KAFKA_REPLICATION_FACTOR="3",
                            TILESTREAM_KAFKA_MIN_INSYNC_REPLICAS="2")
            procs, ports, mport = start_stages(children, env, tmp, model, workers)
            progress(f"stages up: {', '.join(f'{n} (pid {p.pid})' for n, p in procs.items())}; logs in {tmp}")
            video = str(samples.path("vtest.avi"))
            for cam in names:
                agent = EdgeAgent(AgentSettings(camera_id=cam, source=video, realtime=True, loop=True, drain_timeout_s=120),
                                  store, cluster.bootstrap, max_frame_bytes=4 * 1024 * 1024, state_dir=tmp / "agents" / cam)
                agents.append(agent)
                threads.append(threading.Thread(target=agent.run, name=f"agent-{cam}", daemon=True))
            lag = Lag(cluster)
            rss: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
            lags: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
            restart: dict = {}
            node = restart_node or 2
            restarter: threading.Thread | None = None

            def do_restart():
                restart["at_s"] = time.monotonic() - t0
                progress(f"restarting broker {node} (SIGTERM, start, back in the ISR of every partition) ...")
                try:
                    restart["took_s"] = restart_broker(cluster, node)
                    progress(f"broker {node} back in the ISR after {restart['took_s']:.1f}s")
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    restart["error"] = f"{type(exc).__name__}: {exc}"
                    progress(f"broker restart failed: {restart['error']}")

            for t in threads:
                t.start()
            t0 = time.monotonic()
            end = t0 + minutes * 60
            progress(f"{cameras} cameras streaming vtest.avi at 10 frames/s each for {minutes:g} min; "
                     f"broker {node} restarts at {minutes / 2:g} min")
            while time.monotonic() < end:
                now = time.monotonic() - t0
                pids = {"bench (agents)": os.getpid(), **{n: p.pid for n, p in procs.items()},
                        **{f"broker-{i}": pid for i, pid in cluster.node_pids().items()}}
                for name, pid in pids.items():
                    kib = proc_status_kib(pid, "VmRSS")
                    if kib:
                        rss[name].append((now, kib / 1024))
                for key, (g, topic) in {"processor": (app_id, topics.FRAMES), "classifier": (group, topics.TILE_FEATURES)}.items():
                    v = lag(g, topic)
                    if v is not None:
                        lags[key].append((now, v))
                for name, p in procs.items():
                    if p.poll() is not None:
                        raise RuntimeError(f"{name} exited with code {p.returncode}; see {tmp / (name + '.log')}")
                sent = sum(a.counters.sent for a in agents)
                results = metric(mport, "tilestream_classifier_results_total")
                progress(f"{now / 60:5.1f}/{minutes:g} min: {sent} frames acknowledged, {results:.0f} results, lag "
                         f"processor {lags['processor'][-1][1] if lags['processor'] else '?'} / classifier "
                         f"{lags['classifier'][-1][1] if lags['classifier'] else '?'}, RSS "
                         + ", ".join(f"{n} {v[-1][1]:.0f}" for n, v in rss.items() if v) + " MiB")
                if restarter is None and now >= minutes * 30:
                    restarter = threading.Thread(target=do_restart, daemon=True)
                    restarter.start()
                time.sleep(max(0.0, min(SAMPLE_S - (time.monotonic() - t0 - now), end - time.monotonic())))
            if restarter is not None:
                restarter.join(300)
            progress("stopping the cameras (each drains its spool) ...")
            for a in agents:
                a.stop()
            for t in threads:
                t.join(180)
            sealed = {a.settings.camera_id: a.counters.sealed for a in agents}
            acked = sum(a.counters.sent for a in agents)
            deadline = time.monotonic() + 300
            want = sum(sealed.values())
            while (got := metric(mport, "tilestream_classifier_results_total") or 0) < want and time.monotonic() < deadline:
                if procs["classifier"].poll() is not None:
                    break
                time.sleep(1.0)
            progress(f"{got:.0f} of {want} results; stopping the stages and reading the topics ...")
            children.stop(procs["classifier"], name="classifier")
            children.stop_all()
            frames = collections.Counter()
            for m in read_range(cluster.answering_bootstrap(), topics.FRAMES):
                h = envelope.parse(m.value).header
                frames[(h.camera_id, h.seq)] += 1
            answered = collections.Counter()
            for m in read_range(cluster.answering_bootstrap(), topics.RESULTS):
                r = verify_result(m.value, StageKeys(store.path).result_keys())
                answered[(r.camera_id, r.seq)] += 1
            expected = {(c, s) for c, n in sealed.items() for s in range(n)}
            res.update(
                frames_sealed=want, frames_acknowledged=acked, frames_on_topic=len(frames),
                frames_missing_on_topic=len(expected - set(frames)),
                frames_duplicated_on_topic=sum(n - 1 for n in frames.values() if n > 1),
                results=sum(answered.values()), results_duplicated=sum(n - 1 for n in answered.values() if n > 1),
                frames_lost=len(expected - set(answered)), restart=dict(restart, node=node),
                rss_mib={k: {"first": v[0][1], "last": v[-1][1], "max": max(x for _, x in v),
                             "slope_mib_per_min_second_half": slope_mib_per_min(v)} for k, v in rss.items()},
                lag={k: {"max": max(x for _, x in v), "last": v[-1][1], "samples": len(v)} for k, v in lags.items()},
                machine_load=machine_load(),
            )
        finally:
            for a in agents:
                a.stop()
            children.stop_all()
            cluster.stop(timeout_s=30)
    return res


def report(res: dict) -> str:
    rows = [(name, f"{v['first']:.0f}", f"{v['last']:.0f}", f"{v['max']:.0f}", f"{v['slope_mib_per_min_second_half']:+.2f}")
            for name, v in res["rss_mib"].items()]
    out = [f"## Soak: {res['cameras']} cameras x 10 frames/s, {res['minutes']:g} min, 3 brokers, "
           f"{res['workers']} processor worker(s), broker {res['restart'].get('node')} restarted at "
           f"{res['restart'].get('at_s', float('nan')) / 60:.1f} min (back in the ISR after "
           f"{res['restart'].get('took_s', float('nan')):.1f}s{'; ' + res['restart']['error'] if 'error' in res['restart'] else ''})",
           "", res["machine"], res["machine_load"], "",
           table(["process", "RSS first MiB", "RSS last MiB", "RSS max MiB", "slope MiB/min (2nd half)"], rows), "",
           table(["consumer group", "max lag (records)", "last lag", "samples"],
                 [(k, v["max"], v["last"], v["samples"]) for k, v in res["lag"].items()]), ""]
    ok = res["frames_lost"] == 0 and res["results_duplicated"] == 0 and res["frames_duplicated_on_topic"] == 0 \
        and res["frames_missing_on_topic"] == 0
    out.append(table(["frames sealed", "acknowledged", "on frames", "missing on frames", "duplicated on frames",
                      "results", "duplicate results", "lost (no result)", "every frame exactly once"],
                     [(res["frames_sealed"], res["frames_acknowledged"], res["frames_on_topic"],
                       res["frames_missing_on_topic"], res["frames_duplicated_on_topic"], res["results"],
                       res["results_duplicated"], res["frames_lost"], verdict(ok, res["frames_sealed"]))]))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=1, help="processor workers (default 1)")
    ap.add_argument("--restart-node", type=int, choices=(1, 2, 3), help="broker restarted half-way (default 2)")
    ap.add_argument("--json")
    args = ap.parse_args()
    res = run(args.cameras, args.minutes, args.workers, args.restart_node)
    print(report(res))
    write_json(args.json, res)


if __name__ == "__main__":
    main()
