"""Edge agent cost on vtest.avi at JPEG q80: capture+encode alone vs capture+encode+seal+sign+publish.

    python -m benchmarks.agent_bench [--rates 10 25] [--seconds 20] [--reps 2] [--frames 600] [--rounds 3]
    python -m benchmarks.agent_bench --quick      # about 2 minutes: 8 s per rate, 1 rep, 1 short round

Goals: issue 3, sealing, signing and publishing add at most 10% CPU over capture+encode (as fast
as possible); issue 12 section 3, the whole agent uses at most 1.5x the CPU of capture+encode
per frame at camera rate (vtest's own 10 fps, and 25 fps).

**At camera rate** (``--rates``, the issue-12 figure). For each rate, ``--reps`` times, two runs
alternate on the same frames, paced by the same clock (one frame every 1/rate s, like a camera):

1. capture + encode alone (the baseline),
2. the real agent (``EdgeAgent.run``: capture thread, sender thread, the Kafka client's I/O
   threads (librdkafka's ``rdk:main`` and ``rdk:broker<n>``, native threads told apart by their
   kernel name; kafka-python's ``<client_id>-network-thread`` before), the spool's syncer;
   acks=all and idempotence) publishing to a local broker.

Both are measured over a steady window: from the arrival of frame ``rate * 3`` (the producer is
connected, the first heartbeat and metadata are done) to the arrival of ``--seconds * rate``
frames later, so the window holds exactly that many frame periods. The CPU of every thread is
read from the scheduler (``/proc/self/task/<tid>/schedstat``: user + system nanoseconds) at both
ends; no sampler thread runs. Both count FFmpeg's decoder thread (native, about 0.1 ms per
frame) as capture. Inside the agent the crypto of each frame (``crypto.seal_frame``:
HPKE seal, SHA-256 digest, Ed25519 signature, envelope assembly) and the spool append are timed
with ``time.thread_time`` around the calls, so the capture threads' CPU splits into capture +
encode, crypto and spool. The source is the bench's pacer in place of the agent's
``open_source`` (the agent's own ``realtime`` pacing knows only the file's 10 fps).

**As fast as possible** (``--rounds``, issue 3). Each round runs, on the same frames of the file:
capture + encode; + seal + sign (``EdgeAgent.seal``); + spool (append, hand out, acknowledge);
the real agent. CPU is this process's CPU time (all threads); the table shows the median of the
rounds (the machine is shared: the spread is printed too). Here kafka-python puts several frames
in one produce request, which a camera never does.

What one produce request costs at camera rate, with nothing else in the process: the same
paced loop sends pre-sealed vtest frames with the agent's producer settings (acks=all,
idempotent, no linger) through kafka-python and, when installed (``.[bench]`` brings it with
quixstreams), through librdkafka (confluent-kafka); CPU of all threads per frame.

Last, each operation the agent adds is timed alone (median CPU per frame): HPKE seal, SHA-256,
Ed25519 sign, spool append.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import CpuTimer, broker_for, local_broker, machine, machine_load, progress, table
import edge_agent.agent as agent_module
from edge_agent.agent import EdgeAgent
from edge_agent.encode import encode_image
from edge_agent.sources import Captured, iter_capture
from edge_agent.spool import Spool
import sampledata as samples
from tilestream import crypto
from tilestream.config import AgentSettings
from tilestream.keys import KeyStore

MAX_FRAME_BYTES = 4 * 1024 * 1024


class ThreadCpu:
    """Samples the CPU time of every thread of this process until stopped.

    Exact scheduler nanoseconds from ``/proc/self/task/<tid>/schedstat`` (``stat``'s user and
    system ticks are sampled at 100 Hz and mis-charge threads that wake on timers). Threads
    that exit keep their last sample, so their totals are short by at most one sampling
    interval. ``own_cpu`` is the sampler's own CPU, to subtract from a process-wide figure.
    """

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.last: dict[int, tuple[str, float]] = {}  # tid -> (name, CPU seconds)
        self.start: dict[int, float] = {}
        self.own_cpu = 0.0
        self._stop = threading.Event()
        self._me = 0
        self._thread = threading.Thread(target=self._run, name="bench-thread-cpu", daemon=True)

    def _sample(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        for tid in os.listdir("/proc/self/task"):
            try:
                cpu = int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                continue
            t = int(tid)
            self.start.setdefault(t, cpu)
            self.last[t] = (names.get(t) or self.last.get(t, (native_name(t), 0.0))[0], cpu)

    def _run(self) -> None:
        self._me = threading.get_native_id()
        start = time.thread_time()
        while not self._stop.wait(self.interval_s):
            self._sample()
        self.own_cpu = time.thread_time() - start

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_role(self) -> dict[str, float]:
        """CPU seconds used inside the block by the capture / sender / Kafka client I/O / other threads."""
        out: dict[str, float] = {}
        main = threading.main_thread().native_id
        for tid, (name, cpu) in self.last.items():
            if tid == self._me:
                continue
            if tid == main:
                role = "capture (main thread)"
            elif name.startswith("tilestream-sender"):
                role = "sender"
            elif name.endswith("-network-thread") or name.startswith("?rdk:"):  # kafka-python's, librdkafka's
                role = "Kafka client I/O"
            else:
                role = "other (spool sync, FFmpeg decoder)"
            out[role] = out.get(role, 0.0) + cpu - self.start.get(tid, cpu)
        return out


def captures(video: str, n: int):
    for i, captured in enumerate(iter_capture(video, loop=True)):
        if i >= n:
            return
        yield captured


def run_baseline(video: str, n: int) -> CpuTimer:
    with CpuTimer() as t:
        for captured in captures(video, n):
            encode_image(captured.image, "jpeg", 80)
    return t


def run_sealed(video: str, n: int, agent: EdgeAgent, spool: Spool | None) -> CpuTimer:
    with CpuTimer() as t:
        for captured in captures(video, n):
            header, blob = agent.seal(captured.image, captured.capture_ns)
            if spool is not None:
                spool.append(header.frame_id.encode(), blob, header.seq)
                for e in spool.peek(16):
                    spool.ack(e.id)
    return t


def run_agent(video: str, n: int, store: KeyStore, bootstrap: str, state: Path):
    """The real agent on n frames: (CPU s/frame, wall s, {thread role: CPU s/frame})."""
    settings = AgentSettings(camera_id="bench-cam", source=video, max_frames=n, loop=True, jpeg_quality=80,
                             drain_timeout_s=120, heartbeat_interval_s=5)
    agent = EdgeAgent(settings, store, bootstrap, MAX_FRAME_BYTES, state_dir=state)
    with ThreadCpu() as tc, CpuTimer() as t:
        counters = agent.run()
    assert counters.sent == counters.sealed == n, counters
    return (t.cpu - tc.own_cpu) / n, t.wall, {k: v / n for k, v in tc.by_role().items()}


def per_frame_operations(video: str, n: int, sealer: EdgeAgent, spool_dir: Path) -> list[tuple[str, float]]:
    """CPU seconds per frame of each operation the agent adds, on the first n frames (median over frames)."""
    import hashlib

    from tilestream import crypto, envelope

    data, headers, blobs = [], [], []
    for captured in captures(video, n):
        data.append(encode_image(captured.image, "jpeg", 80))
        header, blob = sealer.seal(captured.image, captured.capture_ns)
        headers.append(header)
        blobs.append(blob)
    suite = crypto.SUITES[sealer.suite]
    envs = [envelope.parse(b) for b in blobs]
    sealed = [e.sealed for e in envs]
    messages = [envelope.signed_message(e.header.version, e.header_bytes, e.sealed) for e in envs]

    def each(fn) -> float:
        times = []
        for i in range(n):
            t0 = time.thread_time()
            fn(i)
            times.append(time.thread_time() - t0)
        return statistics.median(times)

    with Spool(spool_dir, 1 << 31) as spool:
        ops = [
            ("HPKE seal (X25519 KEM + AES-256-GCM)",
             each(lambda i: suite.encrypt(data[i], sealer.cloud_public, info=crypto.INFO_PREFIX + headers[i].pack()))),
            ("SHA-256 of header + ciphertext", each(lambda i: hashlib.sha256(sealed[i]).digest())),
            ("Ed25519 sign (of the digest)", each(lambda i: sealer.device_key.sign(messages[i]))),
            ("spool append (CRC-32C, write)", each(lambda i: spool.append(b"k%d" % i, blobs[i], i))),
        ]
    return ops



# ------------------------------------------------------------------------------ at camera rate

WARMUP_S = 3.0  # frames before the window: producer connected, first heartbeat and metadata done


def native_name(tid: int | str) -> str:
    """A thread unknown to Python: "?" plus its kernel name (``comm``, e.g. librdkafka's ``rdk:broker1``)."""
    try:
        return "?" + Path(f"/proc/self/task/{tid}/comm").read_text().strip()
    except OSError:
        return "?"


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system, scheduler nanoseconds) of every thread of this process now."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            cpu = int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
        out[int(tid)] = (names.get(int(tid)) or native_name(tid), cpu)
    return out


def role(tid: int, name: str) -> str:
    if name.startswith("?rdk:"):  # librdkafka's threads (native): rdk:main, rdk:broker<n>, rdk:bootstrap
        return "Kafka client I/O"
    # Other threads unknown to Python are native: FFmpeg's decoder thread (about 0.1 ms per vtest
    # frame), which the capture + encode baseline has as well.
    if tid == threading.main_thread().native_id or name.startswith("?"):
        return "capture"
    if name.startswith("tilestream-sender"):
        return "sender"
    if name.endswith("-network-thread"):  # kafka-python's producer I/O thread: <client_id>-network-thread
        return "Kafka client I/O"
    if name.startswith("spool-sync"):
        return "spool syncer"
    return "other"


class Window:
    """CPU of each thread between two marks: ``start()`` and ``stop()`` (threads born in between count from 0)."""

    def __init__(self):
        self.a: dict[int, tuple[str, float]] = {}
        self.b: dict[int, tuple[str, float]] = {}
        self.wall = 0.0

    def start(self) -> None:
        self.a = thread_cpu()
        self.wall = time.perf_counter()

    def stop(self) -> None:
        self.b = thread_cpu()
        self.wall = time.perf_counter() - self.wall

    def by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for tid, (name, cpu) in self.b.items():
            r = role(tid, name)
            out[r] = out.get(r, 0.0) + cpu - self.a.get(tid, (name, 0.0))[1]
        return out


def paced(video: str, rate: float, warm: int, n: int, window: Window):
    """vtest frames (looped), one every 1/rate s; ``window`` spans the arrivals of frames warm and warm + n."""
    period = 1.0 / rate
    next_at = time.monotonic()
    for i, captured in enumerate(iter_capture(video, loop=True)):
        next_at += period
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if i == warm:
            window.start()
        elif i == warm + n:
            window.stop()
            return
        yield Captured(captured.image, time.time_ns())


def paced_baseline(video: str, rate: float, warm: int, n: int) -> float:
    """Capture + encode at ``rate``: CPU seconds per frame over the window (all threads: the decoder's too)."""
    w = Window()
    for captured in paced(video, rate, warm, n, w):
        encode_image(captured.image, "jpeg", 80)
    return sum(w.by_role().values()) / n


class Timed:
    """Wraps a callable; adds the calling thread's CPU time inside it to ``cpu`` (while ``on``)."""

    def __init__(self, fn):
        self.fn = fn
        self.cpu = 0.0

    def __call__(self, *args, **kw):
        t0 = time.thread_time()
        try:
            return self.fn(*args, **kw)
        finally:
            self.cpu += time.thread_time() - t0


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield value
    finally:
        setattr(obj, name, old)


def paced_agent(video: str, rate: float, warm: int, n: int, store: KeyStore, bootstrap: str, state: Path) -> dict[str, float]:
    """The real agent at ``rate``: CPU seconds per frame over the window, by thread, plus
    ``crypto`` and ``spool append`` (parts of the capture thread's) and ``frames sent``."""
    w = Window()
    settings = AgentSettings(camera_id="bench-cam", source=video, max_frames=0, loop=True, jpeg_quality=80,
                             drain_timeout_s=120, heartbeat_interval_s=5)
    agent = EdgeAgent(settings, store, bootstrap, MAX_FRAME_BYTES, state_dir=state)
    seal = Timed(crypto.seal_frame)
    append = Timed(agent.spool.append)
    marks = {}

    def source(*_a, **_kw):
        for captured in paced(video, rate, warm, n, w):
            if not marks and w.a:
                marks["a"] = (seal.cpu, append.cpu)
            yield captured
        marks["b"] = (seal.cpu, append.cpu)

    with patched(agent_module, "open_source", source), patched(crypto, "seal_frame", seal), \
            patched(agent.spool, "append", append):
        counters = agent.run()
    assert counters.sent == counters.sealed == warm + n, counters
    out = {k: v / n for k, v in w.by_role().items()}
    out["crypto"] = (marks["b"][0] - marks["a"][0]) / n
    out["spool append"] = (marks["b"][1] - marks["a"][1]) / n
    out["wall"] = w.wall
    return out



def paced_client(client: str, blobs: list[bytes], rate: float, warm: int, n: int, bootstrap: str) -> float:
    """The Kafka client alone at ``rate``: one sealed frame produced per period from this thread,
    acks=all, idempotent, no linger, as the agent's producer; CPU seconds per frame of all threads
    over the window (what one produce request costs a camera, with no capture, crypto or spool)."""
    from tilestream import topics

    acked = [0]

    def count(*_a):
        acked[0] += 1

    w = Window()
    period, total = 1.0 / rate, warm + n
    if client == "kafka-python":
        from kafkaio import clients

        prod = clients.producer(bootstrap, "frames", client_id="bench-client-alone", metrics_enabled=False,
                                max_request_size=MAX_FRAME_BYTES + 64 * 1024)
        send = lambda i: prod.send(topics.FRAMES, key=b"alone-%d" % i, value=blobs[i % len(blobs)]).add_callback(count)  # noqa: E731
        serve = lambda: None  # noqa: E731
        close = lambda: prod.close(timeout=10)  # noqa: E731
    else:  # librdkafka, the same settings
        from confluent_kafka import Producer

        prod = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 0,
                         "batch.size": 1024 * 1024, "message.max.bytes": MAX_FRAME_BYTES + 64 * 1024})
        send = lambda i: prod.produce(topics.FRAMES, key=b"alone-%d" % i, value=blobs[i % len(blobs)], on_delivery=count)  # noqa: E731
        serve = lambda: prod.poll(0)  # noqa: E731
        close = lambda: prod.flush(10)  # noqa: E731
    next_at = time.monotonic()
    for i in range(total + 1):
        next_at += period
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        serve()
        if i == warm:
            w.start()
        elif i == total:
            w.stop()
            break
        send(i)
    close()
    assert acked[0] == total, (client, acked[0], total)
    return sum(w.by_role().values()) / n


def client_names() -> list[str]:
    try:
        import confluent_kafka  # noqa: F401 - installed with the bench extra (quixstreams)
        return ["kafka-python", "librdkafka"]
    except ImportError:
        return ["kafka-python"]

PACED_ROWS = [  # (label, how to get it from one agent run's figures and the baseline)
    ("capture + encode (alone: the baseline)", lambda a, b: b),
    ("agent capture threads: capture + encode", lambda a, b: a["capture"] - a["crypto"] - a["spool append"]),
    ("agent capture threads: crypto (seal + digest + sign)", lambda a, b: a["crypto"]),
    ("agent capture threads: spool append", lambda a, b: a["spool append"]),
    ("sender thread (spool hand-out, produce, delivery reports)", lambda a, b: a.get("sender", 0.0)),
    ("Kafka client I/O threads (librdkafka rdk:*)", lambda a, b: a.get("Kafka client I/O", 0.0)),
    ("spool syncer thread", lambda a, b: a.get("spool syncer", 0.0)),
    ("other threads", lambda a, b: a.get("other", 0.0)),
]
AGENT_THREADS = ("capture", "sender", "Kafka client I/O", "spool syncer", "other")


def run_paced(video: str, rates: list[float], seconds: float, reps: int, store: KeyStore, bootstrap: str,
              tmp: Path, blobs: list[bytes]) -> list[tuple[float, list[float], list[dict[str, float]]]]:
    out = []
    for rate in rates:
        warm, n = round(WARMUP_S * rate), round(seconds * rate)
        bases, agents = [], []
        for r in range(reps):
            progress(f"{rate:g} fps, rep {r + 1}/{reps}: capture + encode, {warm} + {n} frames")
            bases.append(paced_baseline(video, rate, warm, n))
            progress(f"{rate:g} fps, rep {r + 1}/{reps}: the agent, {warm} + {n} frames")
            agents.append(paced_agent(video, rate, warm, n, store, bootstrap, tmp / f"paced-{rate:g}-{r}"))
            a = agents[-1]
            total = sum(a.get(k, 0.0) for k in AGENT_THREADS)
            progress(f"  baseline {bases[-1] * 1e3:.2f} ms/frame, agent {total * 1e3:.2f} ms/frame "
                     f"(client I/O {a.get('Kafka client I/O', 0.0) * 1e3:.2f}, sender {a.get('sender', 0.0) * 1e3:.2f}, "
                     f"crypto {a['crypto'] * 1e3:.2f}) = {total / bases[-1]:.2f}x")
            for client in client_names():
                progress(f"{rate:g} fps, rep {r + 1}/{reps}: {client} alone, {warm} + {n} sealed frames")
                a[f"client: {client}"] = paced_client(client, blobs, rate, warm, n, bootstrap)
                progress(f"  {client} alone: {a[f'client: {client}'] * 1e3:.2f} ms/frame")
        out.append((rate, bases, agents))
    return out


def paced_table(results) -> str:
    head = ["CPU ms per frame"] + [f"{rate:g} fps" for rate, _, _ in results]
    rows = []
    med = lambda xs: statistics.median(xs)  # noqa: E731
    for label, get in PACED_ROWS:
        rows.append([label] + [med([get(a, b) for a, b in zip(agents, bases)]) * 1e3 for _, bases, agents in results])
    totals = [[sum(a.get(k, 0.0) for k in AGENT_THREADS) for a in agents] for _, _, agents in results]
    rows.append(["**agent total** (all threads)"] + [med(t) * 1e3 for t in totals])
    ratios = [[t / b for t, b in zip(tt, bases)] for tt, (_, bases, _) in zip(totals, results)]
    rows.append(["**ratio** total / capture + encode"] + [f"**{med(r):.2f}x**" + (f" ({min(r):.2f}-{max(r):.2f})" if len(r) > 1 else "")
                                                          for r in ratios])
    rows.append(["crypto share of the agent total"] + [f"{med([a['crypto'] / t for a, t in zip(agents, tt)]) * 100:.1f}%"
                                                       for tt, (_, _, agents) in zip(totals, results)])
    verdicts = ["met" if med(r) <= 1.5 else "MISSED" for r in ratios]
    rows.append(["goal: ratio <= 1.5x"] + verdicts)
    for client in client_names():
        rows.append([f"the Kafka client alone, per produce request: {client}"]
                    + [med([a[f"client: {client}"] for a in agents]) * 1e3 for _, _, agents in results])
    return table(head, rows)


def paced_ratios(results) -> dict[str, float]:
    """Median total / capture + encode per rate (``"10"``, ``"25"``): the issue-12 figure."""
    return {f"{rate:g}": statistics.median(sum(a.get(k, 0.0) for k in AGENT_THREADS) / b for a, b in zip(agents, bases))
            for rate, bases, agents in results}


def enrolled_camera(tmp: Path, video: str, bootstrap: str) -> tuple[KeyStore, EdgeAgent, list[bytes]]:
    """A fresh key store with camera ``bench-cam`` enrolled, an agent that seals for it, and 50 of the
    video's frames sealed by it (the client-alone runs send these)."""
    store = KeyStore(tmp / "keys")
    store.init()
    store.enroll("bench-cam")
    sealer = EdgeAgent(AgentSettings(camera_id="bench-cam", source=video, jpeg_quality=80), store,
                       bootstrap, MAX_FRAME_BYTES, state_dir=tmp / "sealer")
    return store, sealer, [sealer.seal(c.image, c.capture_ns)[1] for c in captures(video, 50)]


def run(rates=(10.0, 25.0), seconds: float = 15.0, reps: int = 2, quick: bool = False, broker=None) -> dict:
    """The camera-rate measurement alone, for ``benchmarks.run_all`` (its broker given)."""
    if quick:
        seconds, reps = min(seconds, 8.0), 1
    video = str(samples.path("vtest.avi"))
    with tempfile.TemporaryDirectory() as tmp, broker_for(broker) as lk:
        store, sealer, blobs = enrolled_camera(Path(tmp), video, lk.bootstrap)
        sealer.spool.close()
        results = run_paced(video, list(rates), seconds, reps, store, lk.bootstrap, Path(tmp), blobs)
    return {"rates": list(rates), "seconds": seconds, "reps": reps, "paced": results, "ratios": paced_ratios(results),
            "tables": {"agent_paced": paced_table(results)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="*", default=[10.0, 25.0], metavar="FPS",
                    help="camera rates to measure the agent at (none: skip); default 10 25")
    ap.add_argument("--seconds", type=float, help="measured window per paced run, after 3 s warm-up (default 20)")
    ap.add_argument("--reps", type=int, help="paced runs per rate, baseline and agent alternating (default 2)")
    ap.add_argument("--frames", type=int, help="frames per as-fast-as-possible round (default 600)")
    ap.add_argument("--rounds", type=int, help="as-fast-as-possible rounds, 0: skip (default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="defaults of 8 s per rate, 1 rep, 1 round of 200 frames (about 2 minutes)")
    args = ap.parse_args()
    for name, normal, quick in (("seconds", 20.0, 8.0), ("reps", 2, 1), ("frames", 600, 200), ("rounds", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    video = str(samples.path("vtest.avi"))
    n = args.frames
    print(f"machine: {machine()}")
    print(f"{machine_load()}\n")

    cpu: dict[str, list[float]] = {k: [] for k in ("base", "seal", "spool", "agent")}
    wall: dict[str, list[float]] = {k: [] for k in cpu}
    threads: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp, local_broker() as broker:
        store, sealer, blobs = enrolled_camera(Path(tmp), video, broker.bootstrap)
        paced_results = run_paced(video, args.rates, args.seconds, args.reps, store, broker.bootstrap, Path(tmp), blobs)
        for r in range(args.rounds):
            progress(f"round {r + 1}/{args.rounds}: capture + encode, {n} frames")
            t = run_baseline(video, n)
            cpu["base"].append(t.cpu / n)
            wall["base"].append(t.wall)

            progress(f"round {r + 1}/{args.rounds}: + seal + sign")
            t = run_sealed(video, n, sealer, None)
            cpu["seal"].append(t.cpu / n)
            wall["seal"].append(t.wall)

            progress(f"round {r + 1}/{args.rounds}: + seal + sign + spool (no Kafka)")
            with Spool(Path(tmp) / f"spool-only-{r}", sealer.settings.spool_max_bytes) as spool:
                t = run_sealed(video, n, sealer, spool)
            cpu["spool"].append(t.cpu / n)
            wall["spool"].append(t.wall)

            progress(f"round {r + 1}/{args.rounds}: the agent, seal + sign + spool + publish to Kafka")
            per_frame, w, by_thread = run_agent(video, n, store, broker.bootstrap, Path(tmp) / f"agent-{r}")
            cpu["agent"].append(per_frame)
            wall["agent"].append(w)
            threads.append(by_thread)

        progress("each added operation alone")
        ops = per_frame_operations(video, min(n, 200), sealer, Path(tmp) / "ops-spool")
        sealer.spool.close()

    if paced_results:
        print(f"The agent at camera rate: vtest.avi (768x576) at JPEG q80, paced; {args.seconds:g} s window after "
              f"{WARMUP_S:g} s warm-up, median of {args.reps} run(s) per rate; CPU from the scheduler, per thread\n")
        print(paced_table(paced_results))
        print()

    if args.rounds:
        base = statistics.median(cpu["base"])
        labels = {"base": "capture + encode", "seal": "+ seal + sign", "spool": "+ seal + sign + spool",
                  "agent": "+ seal + sign + spool + publish (the agent)"}
        rows = []
        for k, label in labels.items():
            c = statistics.median(cpu[k])
            spread = (max(cpu[k]) - min(cpu[k])) / 2 / c * 100
            rows.append([label, n / statistics.median(wall[k]), c * 1e3, f"±{spread:.0f}%", c / base,
                         f"{(c / base - 1) * 100:+.1f}%"])
        print(f"{n} frames of vtest.avi (768x576) at JPEG q80, as fast as possible, median of {args.rounds} rounds\n")
        print(table(["pipeline", "frames/s", "CPU ms/frame", "spread", "CPU ratio", "added CPU"], rows))

        roles = sorted({k for t in threads for k in t})
        print("\nwhere the agent's CPU goes as fast as possible, by thread (ms per frame):\n")
        print(table(["thread", "as fast as possible"],
                    [[r, statistics.median(t.get(r, 0.0) for t in threads) * 1e3] for r in roles]))

        print("\neach operation the agent adds, alone (median CPU per frame over the first frames):\n")
        floor = sum(t for _, t in ops[:3])
        print(table(["operation", "CPU ms/frame", "share of capture + encode"],
                    [[name, t * 1e3, f"{t / base * 100:.1f}%"] for name, t in ops]
                    + [["HPKE + SHA-256 + Ed25519: the crypto every frame needs", floor * 1e3,
                        f"{floor / base * 100:.1f}%"]]))
        extra = (statistics.median(cpu["agent"]) / base - 1) * 100
        print(f"\nas fast as possible, sealing, signing, spooling and publishing add {extra:.1f}% CPU over "
              f"capture+encode (issue 3 goal: at most 10%) — {'met' if extra <= 10 else 'MISSED'}")


if __name__ == "__main__":
    main()
