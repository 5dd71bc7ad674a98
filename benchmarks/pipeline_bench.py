"""End to end over a real broker: sealed frames -> processor worker(s) -> classifier -> results.

    python -m benchmarks.pipeline_bench [--frames 800] [--workers 1 2] [--seconds 25] [--loads 0.5 0.9]
                                        [--profile] [--quick] [--warmup-frames 400] [--json out.json]

Everything runs on this machine's cores: a local Apache Kafka 4.1.1 (KRaft), `tilestream
process` workers and one `tilestream classify`, started as child processes exactly as
operators start them (``tilestream_cli.procs.Children``), plus this process, which plays the
cameras (frames sealed as the agent seals them, published with the agent's producer settings)
and reads `results`.

First, unmeasured, the broker is warmed up: frame- and tile-sized records for 45 s
(``warm_broker``), then the pipeline itself in rounds of ``--warmup-frames`` frames with the most
workers (the same request mix as the steps) until the broker's JIT compiler threads are quiet, so
that no step pays for the broker's start-up (``warm_until_jit_quiet``; what JIT is left in a step
is shown beside the broker's CPU).
Then, for each worker count:

1. **Closed loop (highest sustained rate).** N sealed vtest frames are put on `frames` first;
   then the classifier and the workers start (fresh consumer groups, committed at the
   topics' ends so earlier phases are not re-read) and the clock runs until all N results
   arrived. The sustained rate is taken between the 10th and 90th percentile result
   (start-up and the tail excluded); the cold figure (from process start) is shown too.
   CPU seconds per frame of every process are read from /proc over the same window.
2. **Open loop (latency).** With the same warm processes, a sender publishes frames on a fixed
   schedule at 50% and 90% of that rate for ``--seconds``, whatever the responses (no
   coordinated omission): each frame's capture time *is* its scheduled send time, so a
   sender that falls behind shows up as latency too. Capture-to-result latency = when this
   process read the result from `results` minus the capture time (the classifier's own
   stamp, result produced minus capture, is shown too). The processor workers' event-loop lag
   (how late the loop wakes a 100 ms sleep, probed every ~0.6 s) is taken from their /metrics
   over the same phase (p99 of a few dozen probes per worker: close to their maximum).

After the steps, on the same warm broker, Kafka alone moves the same records at the 1-worker
step's rate (``transport.kafka_floor``): the part of the pipeline's CPU and latency no stage code
can remove.

Peak RSS of each process is its VmHWM, read just before it is stopped. The compute limit
(benchmarks/compute_limit.py) is measured in the same run, unless given.
With ``--profile``, py-spy samples the (1-worker) processor and the classifier during an
extra closed-loop burst and the CPU samples are grouped by what the code was doing.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import (ResultsWatcher, Sealer, bench_keys, broker_for, child_env, commit_group_to_end,
                               frames_producer, jit_cpu_s, machine, machine_load, percentile, proc_cpu_s, proc_status_kib,
                               progress, self_peak_rss_mib, table, topic_disk_bytes, vtest_encoded, warm_broker,
                               write_json)
from benchmarks.transport import kafka_floor

POOL_FRAMES = 200  # distinct vtest frames, reused with fresh sequence numbers


# --------------------------------------------------------------------------- processes


@dataclass
class Stage:
    """Processor worker(s) and a classifier started as `tilestream` child processes."""

    env: dict
    logs: Path
    children: object = None
    procs: list = field(default_factory=list)  # (name, Popen)
    web_ports: list = field(default_factory=list)
    classifier_port: int | None = None

    def start(self, workers: int, model_path: Path | None, classifier: bool = True, tag: str = "") -> None:
        from deploy.local_kafka import free_port
        from tilestream_cli.procs import Children, wait_http

        self.children = Children()
        self.logs.mkdir(parents=True, exist_ok=True)
        waits = []
        if classifier:
            port = free_port()
            with open(self.logs / f"classifier{tag}.log", "ab") as log:
                # Its own model name: the shared `models` registry may hold models of other feature configs
                # (a classifier given --model exits when the newest model of its name has other features).
                p = self.children.start("classifier", ["classify", "--model", str(model_path), "--metrics-port", str(port),
                                                       "--model-name", f"bench-{tag or 'x'}-{uuid.uuid4().hex[:6]}"],
                                        self.env, stdout=log, stderr=subprocess.STDOUT)
            self.procs.append(("classifier", p))
            self.classifier_port = port
            waits.append((port, p))
        for i in range(workers):
            port = free_port()
            with open(self.logs / f"processor-{i}{tag}.log", "ab") as log:
                p = self.children.start(f"processor-{i}", ["process", "--web-port", str(port), "--datadir",
                                                           str(self.logs / f"faust-{i}{tag}-{uuid.uuid4().hex[:6]}")],
                                        self.env, stdout=log, stderr=subprocess.STDOUT)
            self.procs.append((f"processor-{i}", p))
            self.web_ports.append(port)
            waits.append((port, p))
        self._waits = waits
        self._wait_http = wait_http

    def wait_healthy(self, timeout_s: float = 120) -> None:
        for port, p in self._waits:
            self._wait_http(f"http://127.0.0.1:{port}/healthz", timeout_s, p)

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs}

    def peak_rss_mib(self) -> dict[str, float]:
        return {name: proc_status_kib(p.pid, "VmHWM") / 1024 for name, p in self.procs}

    @staticmethod
    def metrics_page(port: int) -> str | None:
        """The /metrics page of the service on ``port`` (None when it does not answer)."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()
        except OSError:
            return None

    def metrics_pages(self) -> list[str | None]:
        """Each worker's /metrics page (None for a worker that does not answer)."""
        return [self.metrics_page(port) for port in self.web_ports]

    def gc_full_collections(self) -> dict[str, tuple[float, float]]:
        """(count, seconds) of each service's full (generation 2) collections so far, from /metrics."""
        ports = [(f"processor-{i}", p) for i, p in enumerate(self.web_ports)]
        if self.classifier_port:
            ports.append(("classifier", self.classifier_port))
        out = {}
        for name, port in ports:
            text = self.metrics_page(port)
            if text is None:
                continue
            vals = {}
            for line in text.splitlines():
                for k in ("count", "sum"):
                    if line.startswith("tilestream_") and f'gc_pause_seconds_{k}{{generation="2"}}' in line:
                        vals[k] = float(line.split()[-1])
            if len(vals) == 2:
                out[name] = (vals["count"], vals["sum"])
        return out

    def processor_frames(self) -> list[float]:
        """frames_total of each worker from its /metrics page."""
        return [float("nan") if text is None else
                next((float(l.split()[1]) for l in text.splitlines() if l.startswith("tilestream_processor_frames_total ")),
                     0.0)
                for text in self.metrics_pages()]

    def processor_means_ms(self) -> dict[str, float]:
        """Mean ms per frame of the workers' own stage timers (/metrics): verify, open, decode, features,
        and the whole frame on the event loop (frame = verify + executor + sending the tile records)."""
        sums: dict[str, float] = collections.defaultdict(float)
        for text in self.metrics_pages():
            if text is None:
                continue
            for line in text.splitlines():
                name, _, value = line.rpartition(" ")
                for stage in ("verify", "open", "decode", "features"):
                    if name == f'tilestream_processor_stage_seconds_sum{{stage="{stage}"}}':
                        sums[f"{stage}_sum"] += float(value)
                    elif name == f'tilestream_processor_stage_seconds_count{{stage="{stage}"}}':
                        sums[f"{stage}_count"] += float(value)
                if name == "tilestream_processor_frame_seconds_sum":
                    sums["frame_sum"] += float(value)
                elif name == "tilestream_processor_frame_seconds_count":
                    sums["frame_count"] += float(value)
        out = {k: 1e3 * sums[f"{k}_sum"] / sums[f"{k}_count"]
               for k in ("verify", "open", "decode", "features", "frame") if sums.get(f"{k}_count")}
        if "frame" in out:
            out["send_and_loop"] = out["frame"] - sum(out.get(k, 0.0) for k in ("verify", "open", "decode", "features"))
        return out

    def frames_partitions(self) -> dict[int, int]:
        """frames partition -> worker index, from the workers' consumer_lag gauges (set for each
        partition a worker holds, every metrics interval); a partition two workers claim is left out."""
        owners: dict[int, set[int]] = collections.defaultdict(set)
        for i, text in enumerate(self.metrics_pages()):
            for line in (text or "").splitlines():
                if line.startswith('tilestream_processor_consumer_lag{partition="frames/'):
                    owners[int(line.split('frames/')[1].split('"')[0])].add(i)
        return {p: next(iter(w)) for p, w in owners.items() if len(w) == 1}

    def loop_lag_counters(self) -> list[tuple[float, float]]:
        """(count, sum seconds) of each worker's event-loop lag probes from its /metrics page."""
        out = []
        for text in self.metrics_pages():
            count = total = float("nan")
            for line in (text or "").splitlines():
                if line.startswith("tilestream_processor_event_loop_lag_seconds_count "):
                    count = float(line.split()[1])
                elif line.startswith("tilestream_processor_event_loop_lag_seconds_sum "):
                    total = float(line.split()[1])
            out.append((count, total))
        return out

    def log_events(self, name: str) -> dict[str, list[dict]]:
        """Structured log records with ``"event": name`` in each process's log (Faust prefixes its own
        format to our JSON lines, so the JSON object is looked for inside the line)."""
        import json

        out: dict[str, list[dict]] = {}
        for f in sorted(self.logs.glob("*.log")):
            found = []
            for line in f.read_text(errors="replace").splitlines():
                if f'"event": "{name}"' in line:
                    try:
                        found.append(json.loads(line[line.index("{"):]))
                    except ValueError:
                        continue
            out[f.stem] = found
        return out

    def tail_logs(self, n: int = 15) -> str:
        parts = []
        for f in sorted(self.logs.glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        if self.children is not None:
            self.children.stop_all()


class CpuSampler:
    """Every 0.2 s in a thread: (wall ns, results so far, frames processed so far, CPU seconds per pid,
    CPU seconds of the broker's JIT compiler threads, already in the broker's)."""

    def __init__(self, pids: dict[str, int], counter, processed=lambda: 0.0):
        self.pids, self.counter, self.processed = pids, counter, processed
        self.samples: list[tuple[int, int, float, dict[str, float], float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)
        self._sample()

    def _sample(self):
        try:
            done = float(self.processed())
        except Exception:  # noqa: BLE001 - a worker busy starting up
            done = float("nan")
        self.samples.append((time.time_ns(), self.counter(), done,
                             {n: proc_cpu_s(p) for n, p in self.pids.items()},
                             jit_cpu_s(self.pids["broker"]) if "broker" in self.pids else float("nan")))

    def _run(self):
        while not self._stop.wait(0.2):
            self._sample()

    def first(self, processed_at_least: float):
        return next((s for s in self.samples if s[2] >= processed_at_least), None)


class LoopLagSampler:
    """The workers' event-loop lag probes during one phase, in a thread.

    A worker probes its loop every ~0.6 s (a 100 ms sleep, every 0.5 s) and its /metrics quantiles
    cover its last 2048 probes, i.e. everything since it started here, so they cannot say what the
    lag was during one phase. The probes' _count and _sum can: scraped every 0.25 s, each scrape sees
    at most one new probe, whose lag is the increase of _sum (several at once count as their mean)."""

    def __init__(self, stage: Stage, every_s: float = 0.25):
        self.stage, self.every_s = stage, every_s
        self.lags_ms: list[float] = []
        self._last: list[tuple[float, float]] | None = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._last = self.stage.loop_lag_counters()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)

    def _run(self):
        while not self._stop.wait(self.every_s):
            now = self.stage.loop_lag_counters()
            for (c0, s0), (c1, s1) in zip(self._last, now):
                if c1 == c1 and c0 == c0 and c1 > c0:  # not NaN, new probes
                    self.lags_ms += [1e3 * (s1 - s0) / (c1 - c0)] * int(c1 - c0)
            self._last = [n if n[0] == n[0] else o for o, n in zip(self._last, now)]


# --------------------------------------------------------------------------- context


class Bench:
    """Broker, keys, model, encoded frames and the results reader shared by the phases of a run."""

    def __init__(self, broker, tmp: Path, model_path: Path, encoded, cameras: list[str], store, model=None):
        self.broker, self.tmp, self.model_path, self.encoded, self.store = broker, tmp, model_path, encoded, store
        self.model = model
        self.bootstrap = broker.bootstrap
        self.sealers = {c: Sealer(store, c) for c in cameras}
        self.watcher: ResultsWatcher | None = None
        self.frames_sent = 0

    def env(self, tag: str, **settings: str) -> tuple[dict, str, str]:
        from tilestream import topics

        app_id, group = f"bench-proc-{tag}-{uuid.uuid4().hex[:6]}", f"bench-cls-{tag}-{uuid.uuid4().hex[:6]}"
        commit_group_to_end(self.bootstrap, app_id, topics.FRAMES)
        commit_group_to_end(self.bootstrap, group, topics.TILE_FEATURES)
        env = child_env(self.bootstrap, self.store.path, self.tmp / "home", TILESTREAM_PROCESSOR_APP_ID=app_id,
                        TILESTREAM_CLASSIFIER_GROUP_ID=group, **settings)
        return env, app_id, group

    def seal(self, camera: str, n: int, capture_ns=None) -> list[tuple[bytes, bytes]]:
        s = self.sealers[camera]
        return [s.seal(self.encoded[i % len(self.encoded)], i, None if capture_ns is None else capture_ns[i])
                for i in range(n)]

    def publish(self, records) -> None:
        from tilestream import topics

        producer = frames_producer(self.bootstrap)
        try:
            for key, value in records:
                producer.send(topics.FRAMES, key=key, value=value)
            producer.flush(120)
        finally:
            producer.close()
        self.frames_sent += len(records)


# --------------------------------------------------------------------------- phases


def pipeline_cpu_ms(cpu_ms: dict[str, float], ingest: dict[str, float]) -> dict[str, float] | None:
    """CPU ms per frame of the pipeline itself, by part: the sender and the broker taking the frame in
    (the pre-fill), then every service process and the broker over the sustained window. Not in it:
    this bench process during the window (results reader verifying every signed result, /metrics
    scrapes every 0.2 s), which is the measurement, not the pipeline; it is reported on its own."""
    if not cpu_ms:
        return None
    parts = {"sender": ingest["sender"], "broker": cpu_ms.get("broker", 0.0) + ingest["broker"]}
    parts.update({k: v for k, v in cpu_ms.items() if k not in ("broker", "bench")})
    return parts


def _part_order(name: str) -> tuple:
    """Processes in the order a frame meets them."""
    order = ("sender", "broker", "processor", "classifier")
    return next((i for i, p in enumerate(order) if name.startswith(p)), len(order)), name


# How many frames the in-process reference of a step runs, before and after it (~1.5 s each).
INPROCESS_FRAMES = 60


def inprocess_ms(b: Bench, frames: int = INPROCESS_FRAMES, warmup: int = 5) -> float:
    """CPU ms of one vtest frame's in-process work, measured now in this thread: the stages'
    per-record methods (``ProcessorStage.on_frame`` + ``FrameClassifier.on_record``) on sealed
    frames, as the compute limit runs them, without the agent's side (encode, seal).

    The denominator of a step's CPU ratio is measured right before and right after the step, not
    only in the compute step minutes earlier: the host's speed drifts within a run (make bench
    2026-12-03 04:12: the compute step put the in-process work at 16.4 ms a frame, while the
    1-worker processor minutes later did all of its part of it, Kafka included, in 13.2)."""
    from benchmarks.common import make_classifier, make_stage
    from tilestream import topics
    from tilestream.config import FeatureConfig

    if b.model is None:
        raise ValueError("inprocess_ms needs the Bench's model")
    stage, classifier = make_stage(b.store, FeatureConfig()), make_classifier(b.store, b.model)
    blobs = [v for _, v in b.seal("limit", warmup + frames)]

    def one(i: int) -> None:
        for o in stage.on_frame(blobs[i], 0, i):
            if o.topic == topics.TILE_FEATURES:
                classifier.on_record(o.value, 0, i, time.monotonic(), time.time_ns())

    for i in range(warmup):
        one(i)
    c0 = time.thread_time()
    for i in range(warmup, warmup + frames):
        one(i)
    return (time.thread_time() - c0) / frames * 1e3


# How many frames the seed Pool design runs before and after a step (~3-4 s each at 2 processes).
SEED_POOL_FRAMES = 2 * POOL_FRAMES


def seed_pool_fps(b: Bench) -> float:
    """The seed Pool design's frames/s (:func:`benchmarks.peers.seed_pool`, one process per core),
    measured now on the step's own frames: the denominator of the end-to-end / Pool goal. Measured
    next to the step for the reason :func:`inprocess_ms` is: in make bench 2026-12-03 07:34 the peers
    step, minutes after the 2-worker step, had Pool(2) at 60.2 frames/s against 105.7 an hour
    before, which turned the goal from 0.77x (missed) to 1.22x ("met") with the pipeline unchanged."""
    from benchmarks.peers import seed_pool
    from tilestream.config import FeatureConfig

    jpegs = [e.data for e in b.encoded]
    jpegs = (jpegs * (SEED_POOL_FRAMES // max(1, len(jpegs)) + 1))[:SEED_POOL_FRAMES]
    return seed_pool(jpegs, b.model, FeatureConfig(), os.cpu_count() or 2, context="forkserver")["fps"]


def step_work_ms(run: dict, limit_fps: float) -> float:
    """One frame's in-process work for a closed-loop step: the mean of what :func:`inprocess_ms`
    measured before and after it, else the compute limit's (``limit_fps``)."""
    ref = [v for v in run.get("inprocess_ms") or () if v == v]
    return sum(ref) / len(ref) if ref else 1e3 / limit_fps


def step_seed_fps(run: dict) -> float | None:
    """The seed Pool design's frames/s next to a closed-loop step: the mean of what
    :func:`seed_pool_fps` measured before and after it (None when it was not measured)."""
    v = [x for x in run.get("seed_pool_fps") or () if x and x == x]
    return sum(v) / len(v) if v else None


def closed_loop(b: Bench, workers: int, n: int, camera: str, tag: str, keep_running: bool = False,
                reference: bool = False, **settings):
    """Pre-fill n frames, then start the stage and time until n results. Returns (stats, stage).
    ``reference``: also measure the in-process work of a frame before and after (:func:`inprocess_ms`)."""
    ref_before = inprocess_ms(b) if reference else None
    seed_before = seed_pool_fps(b) if reference else None
    env, app_id, group = b.env(tag, **settings)
    progress(f"[{tag}] pre-filling `frames` with {n} sealed frames")
    records = b.seal(camera, n)
    # The frames' way in counts too: this process's CPU while it publishes them (the agent's producer
    # settings, kafka-python's I/O thread included) and the broker's while it takes them in. The
    # sustained window below only sees the broker serving them out again.
    broker_pid = b.broker.status().pid
    c0, bk0 = time.process_time(), proc_cpu_s(broker_pid)
    b.publish(records)
    ingest = {"sender": (time.process_time() - c0) / n * 1e3, "broker": (proc_cpu_s(broker_pid) - bk0) / n * 1e3}
    stage = Stage(env, b.tmp / "logs" / tag)
    try:
        t_start = time.monotonic()
        t_start_ns = time.time_ns()
        stage.start(workers, b.model_path, tag=tag)
        pids = dict(stage.pids(), broker=b.broker.status().pid, bench=os.getpid())
        progress(f"[{tag}] started {workers} processor worker(s) and the classifier; waiting for {n} results")
        with CpuSampler(pids, lambda: b.watcher.count(camera),
                        lambda: sum(x for x in stage.processor_frames() if x == x)) as sampler:
            b.watcher.wait(camera, n, timeout_s=120 + n / 2.0, procs=stage.procs, what=tag)
        t_end = time.monotonic()
        arrivals = np.sort(np.array([a for a, _ in b.watcher.of(camera)], dtype=np.float64))
        rel = (arrivals - t_start_ns) / 1e9
        lo, hi = int(0.1 * n), int(0.9 * n) - 1
        # Sustained: from when the workers had processed 10% of the frames (start-up and group join behind
        # them) until the last result arrived. The classifier polls up to 1000 tiles at a time, so results
        # come in bursts; a window ending at the last result is not fooled by them.
        s10, last = sampler.first(0.1 * n), sampler.samples[-1]
        if s10 is not None and arrivals[-1] > s10[0]:
            steady = (n - s10[2]) / ((arrivals[-1] - s10[0]) / 1e9)
            frames_win = n - s10[2]
            cpu_ms = {k: (last[3][k] - s10[3][k]) / frames_win * 1e3 for k in pids}
            broker_jit = max(0.0, last[4] - s10[4]) / frames_win * 1e3
        else:  # no /metrics samples: fall back to the results
            steady = (hi - lo) / (rel[hi] - rel[lo])
            cpu_ms, broker_jit = {}, float("nan")
        stats = {
            "workers": workers, "frames": n, "cold_s": t_end - t_start, "first_result_s": float(rel[0]),
            "fps_cold": n / (t_end - t_start), "fps_first_last": (n - 1) / (rel[-1] - rel[0]),
            "fps_results_10_90": (hi - lo) / (rel[hi] - rel[lo]),
            "fps_steady": steady, "cpu_ms_per_frame": cpu_ms, "longest_gap_s": float(np.diff(rel).max()) if n > 1 else 0.0,
            "per_worker_frames": stage.processor_frames(), "arrivals_s": rel.tolist(),
            "processor_ms": stage.processor_means_ms(), "ingest_cpu_ms_per_frame": ingest,
            "pipeline_cpu_ms": pipeline_cpu_ms(cpu_ms, ingest), "broker_jit_ms": broker_jit,
        }
        if ref_before is not None:
            ref_after = inprocess_ms(b)
            stats["inprocess_ms"] = [ref_before, ref_after]
            stats["seed_pool_fps"] = [seed_before, seed_pool_fps(b)]
            progress(f"[{tag}] in-process work of a frame, before / after the step: {ref_before:.2f} / {ref_after:.2f} ms; "
                     f"seed Pool design {stats['seed_pool_fps'][0]:.1f} / {stats['seed_pool_fps'][1]:.1f} frames/s")
        progress(f"[{tag}] {n} results: steady {steady:.1f} frames/s, cold {stats['fps_cold']:.1f} frames/s; "
                 f"CPU ms/frame {', '.join(f'{k} {v:.1f}' for k, v in cpu_ms.items())} "
                 f"(of the broker's, JIT compiling {broker_jit:.2f})")
        if not keep_running:
            stats["peak_rss_mib"] = dict(stage.peak_rss_mib(), broker=proc_status_kib(pids["broker"]) / 1024)
            stage.stop()
            return stats, None
        return stats, stage
    except BaseException:
        progress(f"[{tag}] failed; last log lines:\n{stage.tail_logs()}")
        stage.stop()
        raise


def warm_until_jit_quiet(b: Bench, workers: int, frames: int) -> list[float]:
    """Unmeasured closed-loop rounds until the broker's JIT compiler threads are quiet (see
    JIT_QUIET_MS); returns the compiler's CPU ms per frame of each round."""
    jit = []
    for r in range(1, WARMUP_ROUNDS + 1):
        stats, _ = closed_loop(b, workers, frames, f"warmup-{r}", f"warmup-{r}")
        jit.append(stats["broker_jit_ms"])
        if stats["broker_jit_ms"] <= JIT_QUIET_MS:
            break
    progress(f"[warmup] broker JIT ms/frame by round: {', '.join(f'{j:.2f}' for j in jit)}")
    return jit


def open_loop(b: Bench, stage: Stage, rate: float, seconds: float, camera: str, tag: str,
              by_seq: bool = False) -> dict:
    """Publish frames on a fixed schedule at ``rate`` for ``seconds``; latency from the scheduled time.
    ``by_seq``: each frame on partition seq mod partitions (an even spread) instead of by its key's hash."""
    from tilestream import topics

    n = max(20, int(rate * seconds))
    period_ns = 1e9 / rate
    lead_s = 1.0 + n * 0.0015  # time to seal everything in advance
    t0_ns = time.time_ns() + int(lead_s * 1e9)
    schedule = [t0_ns + int(i * period_ns) for i in range(n)]
    records = b.seal(camera, n, schedule)
    producer = frames_producer(b.bootstrap)
    n_parts = len(producer.partitions_for(topics.FRAMES))  # metadata before the first scheduled send
    lag = np.zeros(n)
    progress(f"[{tag}] open loop: {n} frames at {rate:.1f} frames/s ({seconds:.0f} s)")
    # This process holds every sealed frame and result: its own full garbage collections paused its
    # sender and results reader for ~100 ms (measured with gc.callbacks), which showed up as the
    # pipeline's p99. Freeze what exists now so that collections during the loop skip it.
    gc.collect()
    gc.freeze()
    gc_before = stage.log_events("gc_pause")
    with LoopLagSampler(stage) as loop_lag:
        try:
            for i, (key, value) in enumerate(records):
                delay = (schedule[i] - time.time_ns()) / 1e9
                if delay > 0:
                    time.sleep(delay)
                lag[i] = (time.time_ns() - schedule[i]) / 1e6
                producer.send(topics.FRAMES, key=key, value=value, partition=i % n_parts if by_seq else None)
            producer.flush(60)
        finally:
            producer.close()
        b.frames_sent += n
        try:
            b.watcher.wait(camera, n, timeout_s=120 + seconds, procs=stage.procs, what=tag)
        finally:
            gc.unfreeze()
    got = b.watcher.of(camera)
    # the services' own garbage-collector pauses over 50 ms during the phase (they log each one)
    service_gc = sorted(e["ms"] for proc, events in stage.log_events("gc_pause").items()
                        for e in events[len(gc_before.get(proc, [])):])
    observed = np.array([(a - r.capture_ns) / 1e6 for a, r in got])
    stamped = np.array([r.latency_ms for _, r in got])
    out = {"rate": rate, "frames": n, "results": len(got), "seconds": seconds,
           "send_lag_p99_ms": percentile(lag, 99), "send_lag_max_ms": float(lag.max()),
           "service_gc_pauses_ms": service_gc, "latency_ms": observed.tolist(),
           "incomplete": sum(1 for _, r in got if not r.complete),
           "loop_lag_p99_ms": percentile(loop_lag.lags_ms, 99), "loop_lag_probes": len(loop_lag.lags_ms)}
    try:
        out["hops"] = hop_breakdown(b, stage, camera, t0_ns, got)
    except Exception as exc:  # noqa: BLE001 - the breakdown is extra; the latency stands without it
        progress(f"[{tag}] no per-hop breakdown: {type(exc).__name__}: {exc}")
    for q in (50, 95, 99):
        out[f"p{q}"] = percentile(observed, q)
        out[f"stamped_p{q}"] = percentile(stamped, q)
    out["max"] = float(observed.max())
    progress(f"[{tag}] latency p50 {out['p50']:.0f} ms, p95 {out['p95']:.0f} ms, p99 {out['p99']:.0f} ms "
             f"(sender lag p99 {out['send_lag_p99_ms']:.1f} ms; processor event-loop lag p99 "
             f"{out['loop_lag_p99_ms']:.1f} ms over {out['loop_lag_probes']} probes)")
    if out.get("hops"):
        progress(f"[{tag}] hops p50/p99/tail-2% mean ms: " + "; ".join(
            f"{k} {v['p50']:.1f}/{v['p99']:.1f}/{v['tail_mean']:.1f}" for k, v in out["hops"]["hops"].items())
                 + f"; frames queued behind another {out['hops']['queued_frames']}/{out['hops']['frames']}")
    return out


HOPS = ("sender -> frames append", "queued behind the worker's previous frame", "processor: fetch + compute + send",
        "tile-features -> result produced (classifier)", "result produced -> bench reader")


def read_topic_since(bootstrap: str, topic: str, since_ms: int, prefix: str) -> list:
    """Records of ``topic`` appended since ``since_ms`` (group-less read to the end now) whose key
    starts with ``prefix``: (key, timestamp ms, partition, value)."""
    from kafkaio.clients import RangeReader

    with RangeReader(bootstrap, topic, client_id="bench-hops") as reader:
        reader.seek(since_ms)
        pre = prefix.encode()
        return [(m.key, m.timestamp, m.partition, m.value) for m in reader.read_to_end() if (m.key or b"").startswith(pre)]


def hop_table(frames: dict[str, dict]) -> dict:
    """Per-hop latency of each frame from honest timestamps (all one machine's wall clock, ms):
    capture (sealed header) -> `frames` append (LogAppendTime, the broker's) -> last `tile-features`
    record (CreateTime: aiokafka stamps a record when Faust hands it over, i.e. after the compute)
    -> `results` record (CreateTime: librdkafka, when the classifier produced it) -> the bench
    reader's receive time. The processor hop is split by the worker that owns the frame's partition:
    the part spent queued behind the frame that worker finished before it (its tile-features time,
    if later than this frame's append) and the rest (fetch, Faust's delivery, the compute, the hand-over).
    Returns percentiles per hop over all frames and the hops' mean over the slowest 2 % (the tail)."""
    rows = []
    done = [f for f in frames.values() if all(k in f for k in ("capture", "append", "tiles", "result", "read"))]
    # A worker runs one frame at a time (agent concurrency 1; frames inline on its loop), so a frame
    # started no earlier than the frame the same worker finished just before it (completion order:
    # a worker with several partitions does not take them in append order).
    prev: dict[int, float] = {}
    for f in sorted(done, key=lambda f: f["tiles"]):
        w = f.get("worker")
        start = max(f["append"], prev.get(w, f["append"])) if w is not None else f["append"]
        if w is not None:
            prev[w] = f["tiles"]
        rows.append((f["read"] - f["capture"],
                     [f["append"] - f["capture"], start - f["append"], f["tiles"] - start, f["result"] - f["tiles"],
                      f["read"] - f["result"]]))
    if not rows:
        return {}
    total = np.array([r[0] for r in rows])
    parts = np.array([r[1] for r in rows])
    tail = total >= np.percentile(total, 98)
    out = {"frames": len(rows), "tail_frames": int(tail.sum()), "total_p50": float(np.percentile(total, 50)),
           "total_p99": float(np.percentile(total, 99)), "tail_total_mean": float(total[tail].mean()),
           "queued_frames": int((parts[:, 1] > 0).sum()), "hops": {}}
    for i, name in enumerate(HOPS):
        out["hops"][name] = {"p50": float(np.percentile(parts[:, i], 50)), "p99": float(np.percentile(parts[:, i], 99)),
                             "max": float(parts[:, i].max()), "tail_mean": float(parts[tail, i].mean())}
    return out


def hop_breakdown(b: Bench, stage: Stage, camera: str, since_ns: int, got: list) -> dict:
    """:func:`hop_table` of one open-loop phase: the phase's records read back from the three topics."""
    from classifier.results import verify_result
    from tilestream import topics
    from tilestream.stagekeys import StageKeys

    since_ms = since_ns // 1_000_000 - 2000
    owner = stage.frames_partitions()
    frames: dict[str, dict] = {r.frame_id: {"capture": r.capture_ns / 1e6, "read": a / 1e6} for a, r in got}
    for key, ts, part, _ in read_topic_since(b.bootstrap, topics.FRAMES, since_ms, camera + "/"):
        f = frames.get(key.decode(errors="replace"))
        if f is not None:
            f["append"], f["worker"] = float(ts), owner.get(part)
    for key, ts, _, _ in read_topic_since(b.bootstrap, topics.TILE_FEATURES, since_ms, camera + "/"):
        f = frames.get(key.decode(errors="replace"))
        if f is not None:
            f["tiles"] = max(f.get("tiles", 0.0), float(ts))
    keys = StageKeys(b.store.path).result_keys()
    for _, ts, _, value in read_topic_since(b.bootstrap, topics.RESULTS, since_ms, camera):
        try:
            r = verify_result(value, keys)
        except Exception:  # noqa: BLE001 - not ours
            continue
        f = frames.get(r.frame_id)
        if f is not None and "result" not in f:
            f["result"] = float(ts)
    return hop_table(frames)


def soak(b: Bench, stage: Stage, rate: float, minutes: float, camera: str, tag: str = "soak") -> dict:
    """Open loop at ``rate`` for ``minutes``: frames sealed on the fly (capture time = scheduled time);
    RSS of every process every 5 s (slope by least squares) and latency per minute (drift)."""
    from tilestream import topics

    period_ns = 1e9 / rate
    n = int(rate * minutes * 60)
    sealer = b.sealers[camera]
    pids = dict(stage.pids(), broker=b.broker.status().pid)
    rss: dict[str, list[tuple[float, float]]] = {k: [] for k in pids}
    producer = frames_producer(b.bootstrap)
    producer.partitions_for(topics.FRAMES)
    progress(f"[{tag}] soak: {n} frames at {rate:.1f} frames/s for {minutes:.0f} min")
    t0_ns = time.time_ns() + 500_000_000
    t0 = time.monotonic()
    next_rss = 0.0
    try:
        for i in range(n):
            due = t0_ns + int(i * period_ns)
            delay = (due - time.time_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)
            key, value = sealer.seal(b.encoded[i % len(b.encoded)], i, due)
            producer.send(topics.FRAMES, key=key, value=value)
            now = time.monotonic() - t0
            if now >= next_rss:
                for k, pid in pids.items():
                    rss[k].append((now, proc_status_kib(pid, "VmRSS") / 1024))
                next_rss = now + 5.0
            if i % max(1, int(rate * 60)) == 0 and i:
                progress(f"[{tag}] {i}/{n} frames sent, {b.watcher.count(camera)} results")
            for name, p in stage.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {p.returncode} during the soak")
        producer.flush(60)
    finally:
        producer.close()
    b.frames_sent += n
    b.watcher.wait(camera, n, timeout_s=300, procs=stage.procs, what=tag)
    got = b.watcher.of(camera)
    by_minute: dict[int, list[float]] = collections.defaultdict(list)
    for a, r in got:
        by_minute[int((r.capture_ns - t0_ns) // 60_000_000_000)].append((a - r.capture_ns) / 1e6)
    minutes_rows = [(m, percentile(v, 50), percentile(v, 99), len(v)) for m, v in sorted(by_minute.items())]
    slopes = {}
    for k, pts in rss.items():
        if len(pts) >= 3:
            t, m = np.array(pts).T
            slopes[k] = float(np.polyfit(t / 60.0, m, 1)[0])  # MiB per minute
    out = {"rate": rate, "minutes": minutes, "frames": n, "per_minute": minutes_rows, "rss_slope_mib_per_min": slopes,
           "rss_first_last_mib": {k: (v[0][1], v[-1][1]) for k, v in rss.items() if v}}
    first, last = minutes_rows[0], minutes_rows[-1]
    out["p99_drift_ms"] = last[2] - first[2]
    progress(f"[{tag}] p99 first minute {first[2]:.0f} ms, last minute {last[2]:.0f} ms; RSS slopes "
             + ", ".join(f"{k} {v:+.2f} MiB/min" for k, v in slopes.items()))
    return out


# --------------------------------------------------------------------------- profile (py-spy)

CATEGORIES = [  # (category, substrings of a frame "function (file:line)"), matched leaf first
    ("features (numpy/OpenCV)", ("stream_processor/features.py",)),
    ("tiling", ("stream_processor/tiling.py",)),
    ("decode", ("decode_image", "tilestream/imageinfo.py")),
    ("crypto (verify/open)", ("tilestream/crypto.py", "tilestream/envelope.py", "cryptography/")),
    ("records: build + JSON/base64", ("json/", "tilestream/records.py", "faust/models/", "faust/serializers/",
                                      "mode/utils/", "base64.py")),
    ("model (scikit-learn)", ("sklearn/", "classifier/model.py")),
    ("assemble/classify glue", ("classifier/",)),
    ("Kafka client (aiokafka/kafka-python)", ("aiokafka/", "kafka/")),
    ("Faust/mode framework", ("faust/", "mode/")),
    ("asyncio event loop (socket writes, wake-ups, callbacks)", ("asyncio/", "uvloop", "selectors.py")),
    ("threads/executor plumbing", ("threading.py", "concurrent/futures/", "queue.py")),
]


WAITS = ("Selector.select (", "Condition.wait (", "Event.wait (", "time.sleep", "KqueueSelector")


def pyspy_start(pid: int, out: Path) -> subprocess.Popen | None:
    import shutil
    import sys

    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        progress("py-spy not installed (pip install py-spy): no profile")
        return None
    return subprocess.Popen([exe, "record", "-p", str(pid), "-f", "raw", "-o", str(out), "--nonblocking", "-r", "200"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def pyspy_stop(p: subprocess.Popen | None) -> None:
    if p is None:
        return
    p.send_signal(signal.SIGINT)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def summarize_profile(path: Path, top: int = 12) -> dict:
    """On-CPU samples of a py-spy raw (collapsed) file grouped by category, and the hottest leaf functions."""
    cats: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    if not path.exists():
        return {"total": 0, "categories": {}, "leaves": {}}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        try:
            c = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        total += c
        leaf = frames[-1]
        leaves[leaf.split(" (")[0] + " (" + leaf.split(" (")[-1].split("/")[-1]] += c
        if any(w in leaf for w in WAITS):
            cats["waiting in select/epoll/Condition.wait (sampled as running)"] += c
            continue
        for fr in reversed(frames):
            cat = next((name for name, keys in CATEGORIES if any(k in fr for k in keys)), None)
            if cat:
                cats[cat] += c
                break
        else:
            cats["other"] += c
    return {"total": total, "categories": dict(cats.most_common()), "leaves": dict(leaves.most_common(top))}


def profile_burst(b: Bench, stage: Stage, n: int, camera: str, tag: str) -> dict:
    outs = {}
    spies = {}
    for name, p in stage.procs:
        outs[name] = b.tmp / f"pyspy-{tag}-{name}.txt"
        spies[name] = pyspy_start(p.pid, outs[name])
    time.sleep(1.0)
    try:
        progress(f"[{tag}] profiling with py-spy: {n} frames in a burst")
        b.publish(b.seal(camera, n))
        b.watcher.wait(camera, n, timeout_s=120 + n / 2.0, procs=stage.procs, what=tag)
    finally:
        for s in spies.values():
            pyspy_stop(s)
    return {name: summarize_profile(path) for name, path in outs.items()}


# --------------------------------------------------------------------------- run


def prepare_model(tmp: Path, cfg=None, progress_fn=progress) -> tuple[Path, object]:
    from classifier.train import train_scene_model
    import sampledata as samples
    from tilestream.config import FeatureConfig

    cfg = cfg or FeatureConfig()
    progress_fn("training the scene model (logistic, 150 frames, MOG2 labels), as the tests do ...")
    model = train_scene_model(str(samples.path("vtest.avi")), cfg, kind="logistic", max_frames=150,
                              progress=lambda m: None)
    return model.save(tmp / "models" / "scene.skops"), model


def latency_phases(loads, repeats: int) -> list[tuple[float, int]]:
    """(load, repeat) of the open loops: the 50% load (the latency goal's) ``repeats`` times in a row."""
    return [(l, k) for l in loads for k in range(repeats if abs(l - 0.5) < 1e-9 else 1)]


def _phase_camera(w: int, load: float, k: int) -> str:
    return f"w{w}-load{int(load * 100)}" + (f"-r{k + 1}" if k else "")


# Frames of the unmeasured pipeline run before the measured steps (see run()).
WARMUP_FRAMES = 1000
# Warm-up rounds (of WARMUP_FRAMES each, the most workers) go on until the broker's JIT compiler
# threads used at most JIT_QUIET_MS per frame in one round, or WARMUP_ROUNDS rounds ran. Why: a
# broker compiles the pipeline's request mix for minutes; with one 400-frame round the 1-worker step
# measured broker 3.8-4.8 ms/frame, of which C1/C2 compiler threads took 42 % (per-thread /proc,
# 2026-12-02 22:20); 90 s later, same run, the compiler used 0.01 core and the broker ~2.0 ms/frame.
# A broker in service has long finished that: it is start-up, not per-frame, cost. What is left of
# it in a measured window is shown in its own column (and still counted in the broker's CPU).
JIT_QUIET_MS = 0.2
WARMUP_ROUNDS = 8


def run(frames: int = 800, workers=(1, 2), seconds: float = 25.0, loads=(0.5, 0.9), profile: bool = False,
        compute_limit_fps: float | None = None, quick: bool = False, broker=None, soak_minutes: float = 0.0,
        latency_repeats: int = 1, warmup_frames: int = WARMUP_FRAMES) -> dict:
    if quick:
        frames, workers, seconds, loads = min(frames, 150), tuple(workers)[:1], min(seconds, 8.0), tuple(loads)
        latency_repeats = 1
    phases = latency_phases(loads, latency_repeats)
    res: dict = {"frames": frames, "workers": list(workers), "seconds": seconds, "loads": list(loads), "runs": [],
                 "latency_repeats": latency_repeats}
    with tempfile.TemporaryDirectory(prefix="tilestream-bench-") as tmp_s, \
            broker_for(broker) as lk:
        tmp = Path(tmp_s)
        cameras = [f"w{w}-closed" for w in workers] + [_phase_camera(w, l, k) for w in workers for l, k in phases]
        cameras += ["profile", "limit", "soak"] + [f"warmup-{r}" for r in range(1, WARMUP_ROUNDS + 1)]
        store = bench_keys(tmp / "keys", cameras)
        model_path, model = prepare_model(tmp)
        encoded = vtest_encoded(POOL_FRAMES)
        if compute_limit_fps is None:
            from benchmarks.compute_limit import measure
            import sampledata as samples
            from tilestream.config import FeatureConfig

            progress("compute limit in this run (60 vtest frames, one thread)")
            imgs = list(samples.iter_video_frames(samples.path("vtest.avi"), max_frames=60))
            cl = measure("vtest", imgs, "jpeg", 80, FeatureConfig(), model, store, Sealer(store, "limit"))
            compute_limit_fps = cl["fps_limit"]
        res["compute_limit_fps"] = compute_limit_fps
        b = Bench(lk, tmp, model_path, encoded, cameras, store, model)
        progress("warming the broker up (JIT) with frame- and tile-sized records")
        warm_broker(lk.bootstrap)
        with ResultsWatcher(lk.bootstrap, store.path) as watcher:
            b.watcher = watcher
            if warmup_frames and not quick:
                # Unmeasured: the broker's JIT warmed by the pipeline's own request mix (aiokafka and
                # librdkafka fetches, produce requests, commits), which warm_broker's kafka-python
                # records do not exercise. Without it the first step measured paid for the warm-up:
                # broker ms/frame 8.6 for 1 worker run first vs 4.6 run second (--workers 1 2 vs
                # 2 1, one sitting, 2026-12-02 15:13-15:17); with it 4.6 first, 3.8 second; and make
                # bench always ran 1 worker first (broker 5.9 vs 2.3 ms/frame with 2 workers).
                res["warmup_rounds"] = warm_until_jit_quiet(b, max(workers), warmup_frames)
                res["warmup_frames"] = warmup_frames
            for w in workers:
                stats, stage = closed_loop(b, w, frames, f"w{w}-closed", f"{w}w", keep_running=True, reference=True)
                try:
                    stats["ratio_to_limit"] = stats["fps_steady"] / compute_limit_fps
                    stats["latency"] = []
                    for load, k in phases:
                        lat = open_loop(b, stage, load * stats["fps_steady"], seconds, _phase_camera(w, load, k),
                                        f"{w}w-{int(load * 100)}%" + (f" run {k + 1}" if k else ""))
                        lat["load"], lat["repeat"] = load, k + 1
                        stats["latency"].append(lat)
                    if profile and w == min(workers):
                        stats["profile"] = profile_burst(b, stage, max(150, frames // 2), "profile", f"{w}w-profile")
                    if soak_minutes and w == min(workers):
                        res["soak"] = soak(b, stage, 0.5 * stats["fps_steady"], soak_minutes, "soak")
                        res["soak"]["workers"] = w
                    stats["peak_rss_mib"] = dict(stage.peak_rss_mib(), broker=proc_status_kib(lk.status().pid) / 1024)
                finally:
                    stage.stop()
                res["runs"].append(stats)
            res["duplicates"] = watcher.duplicates
        from tilestream import topics

        res["topic_bytes_per_frame"] = {t: topic_disk_bytes(lk, t) / max(1, b.frames_sent)
                                        for t in (topics.FRAMES, topics.TILE_FEATURES, topics.RESULTS)}
        if res["runs"]:
            # Kafka alone with the same records at the fewest workers' rate, on the same warm broker:
            # the part of the pipeline's CPU no stage code can remove (see transport.kafka_floor).
            marks_bytes = topic_disk_bytes(lk, topics.REPLAY_MARKS) / max(1, b.frames_sent)
            res["kafka_floor"] = kafka_floor(
                lk, {**{t: round(v) for t, v in res["topic_bytes_per_frame"].items()},
                     topics.REPLAY_MARKS: round(marks_bytes)},
                res["runs"][0]["fps_steady"], seconds=4.0 if quick else 20.0, warmup_s=2.0 if quick else 5.0)
        res["bench_peak_rss_mib"] = self_peak_rss_mib()
    res["tables"] = tables(res)
    return res


def _cell(v, fmt: str) -> str:
    return "-" if v is None or v != v else format(v, fmt)


def tables(res: dict) -> dict[str, str]:
    lim = res["compute_limit_fps"]
    thr = table(
        ["processor workers", "frames", "sustained frames/s", "results 10-90% frames/s", "cold frames/s (incl. start)",
         "end-to-end / compute limit", "seed Pool design before / after the step frames/s", "end-to-end / that Pool",
         "frames per worker", "longest gap between results s"],
        [[r["workers"], r["frames"], f"{r['fps_steady']:.1f}", f"{r.get('fps_results_10_90', float('nan')):.1f}",
          f"{r['fps_cold']:.1f}",
          f"{r['ratio_to_limit']:.2f}x",
          " / ".join(f"{v:.1f}" for v in r["seed_pool_fps"]) if step_seed_fps(r) else "-",
          f"{r['fps_steady'] / step_seed_fps(r):.2f}x" if step_seed_fps(r) else "-",
          "/".join(f"{x:.0f}" for x in r["per_worker_frames"]),
          f"{r.get('longest_gap_s', float('nan')):.2f}"] for r in res["runs"]]
        + [["compute limit (1 thread, no Kafka)", "", f"{lim:.1f}", "", "", "1.00x", "", "", "", ""]])
    has_loop = any("loop_lag_p99_ms" in l for r in res["runs"] for l in r["latency"])  # not in older results
    has_gc = any("service_gc_pauses_ms" in l for r in res["runs"] for l in r["latency"])

    def gc_cell(pauses: list[float]) -> str:
        return f"{len(pauses)}, max {max(pauses):.0f} ms" if pauses else "0"

    lat = table(
        ["workers", "load", "offered frames/s", "frames", "p50 ms", "p95 ms", "p99 ms", "max ms",
         "classifier-stamped p99 ms", "sender lag p99 / max ms", *(["processor event-loop lag p99 ms (probes)"] * has_loop),
         *(["service GC pauses > 50 ms"] * has_gc)],
        [[r["workers"], f"{int(l['load'] * 100)}%" + (f" run {l.get('repeat', 1)}" if res.get("latency_repeats", 1) > 1
                                                       and abs(l["load"] - 0.5) < 1e-9 else ""),
          f"{l['rate']:.1f}", l["frames"], f"{l['p50']:.0f}", f"{l['p95']:.0f}",
          f"{l['p99']:.0f}", f"{l['max']:.0f}", f"{l['stamped_p99']:.0f}",
          f"{l['send_lag_p99_ms']:.1f} / {_cell(l.get('send_lag_max_ms'), '.0f')}",
          *([f"{_cell(l.get('loop_lag_p99_ms'), '.1f')} ({l.get('loop_lag_probes', 0)})"] * has_loop),
          *([gc_cell(l.get("service_gc_pauses_ms", []))] * has_gc)]
         for r in res["runs"] for l in r["latency"]])
    if all(r.get("pipeline_cpu_ms") for r in res["runs"]):
        names = sorted({k for r in res["runs"] for k in r["pipeline_cpu_ms"]}, key=_part_order)
        cpu = table(
            ["workers", *[f"{n} ms" for n in names], "of the broker's: JIT compiling ms", "pipeline CPU ms/frame",
             "in-process work before / after the step ms", "/ that work", "/ compute limit", "cores busy at that rate",
             "bench reader ms (not in total)"],
            [[r["workers"], *[_cell(r["pipeline_cpu_ms"].get(n), ".1f") for n in names],
              _cell(r.get("broker_jit_ms"), ".2f"),
              f"{sum(r['pipeline_cpu_ms'].values()):.1f}",
              " / ".join(f"{v:.1f}" for v in r["inprocess_ms"]) if r.get("inprocess_ms") else "-",
              f"{sum(r['pipeline_cpu_ms'].values()) / step_work_ms(r, lim):.2f}x" if r.get("inprocess_ms") else "-",
              f"{sum(r['pipeline_cpu_ms'].values()) * lim / 1e3:.2f}x",
              f"{sum(r['pipeline_cpu_ms'].values()) * r['fps_steady'] / 1e3:.2f}",
              _cell(r["cpu_ms_per_frame"].get("bench"), ".1f")] for r in res["runs"]]
            + [["compute limit (1 thread)", *["" for _ in names], "", f"{1e3 / lim:.1f}", "", "", "1.00x", "1.00", ""]])
    else:  # results from before the pipeline's own total (the bench process counted in)
        names = sorted({k for r in res["runs"] for k in r["cpu_ms_per_frame"]})
        cpu = table(
            ["workers", *[f"{n} CPU ms/frame" for n in names], "total CPU ms/frame", "cores busy at that rate"],
            [[r["workers"], *[_cell(r["cpu_ms_per_frame"].get(n), ".1f") for n in names],
              f"{sum(r['cpu_ms_per_frame'].values()):.1f}",
              f"{sum(r['cpu_ms_per_frame'].values()) * r['fps_steady'] / 1e3:.2f}"] for r in res["runs"]]
            + [["compute limit", *["" for _ in names], f"{1e3 / lim:.1f}", "1.00"]])
    rss_names = sorted({k for r in res["runs"] for k in r.get("peak_rss_mib", {})})
    rss = table(["workers", *[f"{n} MiB" for n in rss_names]],
                [[r["workers"], *[_cell(r["peak_rss_mib"].get(n), ".0f") for n in rss_names]]
                 for r in res["runs"]])
    if res.get("soak"):
        sk = res["soak"]
        rows = [[f"minute {m + 1}", n, f"{p50:.0f}", f"{p99:.0f}"] for m, p50, p99, n in sk["per_minute"]]
        soak_t = table(["soak at 50% load", "frames", "p50 ms", "p99 ms"], rows) + "\n\n" + table(
            ["process", "RSS first MiB", "RSS last MiB", "slope MiB/min"],
            [[k, f"{a:.0f}", f"{z:.0f}", f"{sk['rss_slope_mib_per_min'].get(k, float('nan')):+.2f}"]
             for k, (a, z) in sk["rss_first_last_mib"].items()])
    pm = table(["workers", "verify", "open", "decode", "features (+ tiling)", "frame on the event loop",
                "of which sending the tile records + loop"],
               [[r["workers"], *[f"{r.get('processor_ms', {}).get(k, float('nan')):.1f}" for k in
                                 ("verify", "open", "decode", "features", "frame", "send_and_loop")]]
                for r in res["runs"]])
    hop_rows = [[r["workers"], f"{int(l['load'] * 100)}%" + (f" run {l.get('repeat', 1)}" if l.get("repeat", 1) > 1 else ""),
                 f"{l['hops']['total_p50']:.0f} / {l['hops']['total_p99']:.0f} / {l['hops']['tail_total_mean']:.0f}",
                 *[f"{h['p50']:.1f} / {h['p99']:.1f} / {h['tail_mean']:.1f}" for h in l["hops"]["hops"].values()],
                 f"{l['hops']['queued_frames']}/{l['hops']['frames']}"]
                for r in res["runs"] for l in r["latency"] if l.get("hops")]
    out = {"pipeline_throughput": thr, "pipeline_processor_ms": pm, "pipeline_latency": lat, "pipeline_cpu": cpu, "pipeline_rss": rss,
           "pipeline_bytes": table(["topic", "bytes on the broker's disk per frame"],
                                   [[t, f"{v:.0f}"] for t, v in res["topic_bytes_per_frame"].items()])}
    fl = res.get("kafka_floor")
    if fl and res["runs"]:
        work = step_work_ms(res["runs"][0], lim)
        out["pipeline_kafka_floor"] = table(
            ["Kafka alone: the same records, stage to stage", "frames/s", "broker ms", "of the broker's: JIT ms",
             "librdkafka clients ms", "together ms", "/ in-process work of the step",
             "camera -> reader, 3 hops: p50 / p99 ms"],
            [["4 librdkafka clients that do nothing else (transport.kafka_floor)", f"{fl['rate']:.1f}",
              f"{fl['broker_ms']:.2f}", f"{fl['broker_jit_ms']:.2f}", f"{fl['clients_ms']:.2f}",
              f"{fl['broker_ms'] + fl['clients_ms']:.2f}", f"{(fl['broker_ms'] + fl['clients_ms']) / work:.2f}x",
              f"{_cell(fl.get('latency_p50_ms'), '.1f')} / {_cell(fl.get('latency_p99_ms'), '.1f')}"]])
    if hop_rows:
        out["pipeline_hops"] = table(["workers", "load", "capture -> read ms (p50 / p99 / slowest 2 % mean)",
                                      *[f"{h} ms (p50 / p99 / slowest 2 % mean)" for h in HOPS],
                                      "frames queued behind another"], hop_rows)
    if res.get("soak"):
        out["pipeline_soak"] = soak_t
    for r in res["runs"]:
        prof = r.get("profile")
        if not prof:
            continue
        rows = []
        for proc, p in prof.items():
            tot = max(1, p["total"])
            for cat, c in p["categories"].items():
                rows.append([proc, cat, f"{100 * c / tot:.1f}%"])
        out["pipeline_profile"] = table(["process", "on-CPU samples spent in", "share"], rows)
        leaves = []
        for proc, p in prof.items():
            tot = max(1, p["total"])
            for leaf, c in list(p["leaves"].items())[:8]:
                leaves.append([proc, leaf, f"{100 * c / tot:.1f}%"])
        out["pipeline_profile_leaves"] = table(["process", "hottest function (self)", "share"], leaves)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=800, help="closed-loop frames per worker count (default 800)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seconds", type=float, default=25.0, help="open-loop duration per load (default 25)")
    ap.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.9])
    ap.add_argument("--profile", action="store_true", help="py-spy the 1-worker processor and classifier")
    ap.add_argument("--compute-limit", type=float, help="frames/s of the compute limit (default: measured here)")
    ap.add_argument("--soak-minutes", type=float, default=0.0, help="also soak the 1-worker stage at 50%% load")
    ap.add_argument("--latency-repeats", type=int, default=1, help="open loops at 50%% load in a row (default 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 150 frames, 1 worker, 8 s per load")
    ap.add_argument("--warmup-frames", type=int, default=WARMUP_FRAMES,
                    help=f"frames per unmeasured warm-up round before the steps, 0: none (default {WARMUP_FRAMES})")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"machine: {machine()}\n{machine_load()}\n")
    res = run(args.frames, args.workers, args.seconds, args.loads, args.profile, args.compute_limit, args.quick,
              soak_minutes=args.soak_minutes, latency_repeats=args.latency_repeats, warmup_frames=args.warmup_frames)
    for name, t in res["tables"].items():
        print(f"\n{name}\n{t}")
    write_json(args.json, {k: v for k, v in res.items() if k != "tables"})


if __name__ == "__main__":
    main()
