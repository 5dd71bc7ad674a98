"""Shared benchmark helpers: machine description, tables, a throw-away local broker, progress."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence


def machine() -> str:
    import cv2
    import numpy as np
    import sklearn

    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), {mem_gib:.1f} GiB, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}, OpenCV {cv2.__version__}, "
            f"scikit-learn {sklearn.__version__}")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (also readable on a terminal)."""
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]  # no rows: header widths
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def verdict(ok: bool | None, measured: int = 1, expected: int | None = None) -> str:
    """A goal's verdict that cannot be "met" on nothing: ``measured`` is how many results the figure
    stands on; fewer than ``expected`` (or none) is reported as not judged, never as met."""
    if ok is None:
        return "n/a"
    if measured <= 0 or (expected is not None and measured < expected):
        return f"**NOT JUDGED** ({measured}{f' of {expected}' if expected is not None else ''} results)"
    return "met" if ok else "**MISSED**"


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def local_broker(version: str | None = None) -> Iterator["object"]:
    """A real Apache Kafka on free loopback ports for the duration of a benchmark."""
    from deploy.local_kafka import DEFAULT_VERSION, LocalKafka, free_port
    from tilestream.config import KafkaSettings
    from tilestream.topics import pipeline_topics

    with tempfile.TemporaryDirectory(prefix="tilestream-bench-") as tmp:
        lk = LocalKafka(version or DEFAULT_VERSION, "127.0.0.1", free_port(), free_port(), state_dir=tmp, progress=progress)
        try:
            lk.start(pipeline_topics(KafkaSettings()))
            yield lk
        finally:
            lk.stop()


def broker_for(broker=None):
    """A context of the broker a step runs on: ``broker`` when given (``benchmarks.run_all``
    shares one; left running on exit), else a fresh :func:`local_broker` (stopped on exit)."""
    return local_broker() if broker is None else contextlib.nullcontext(broker)


class CpuTimer:
    """Wall and process CPU time (all threads of this process) of a block."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


# --------------------------------------------------------------------------- added for issue 7
# Everything below is shared by compute_limit, pipeline_bench, tile_sweep, peers, transport and run_all.

VTEST_JPEG_QUALITY = 80
MAX_FRAME_BYTES = 4 * 1024 * 1024
MAX_PIXELS = 40_000_000


def machine_load(sample_s: float = 1.0) -> str:
    """Load average and the other processes that used CPU during ``sample_s`` (the machine is shared);
    this benchmark's own child processes (broker, workers) are marked "ours"."""

    def ticks() -> dict[int, tuple[str, int, int]]:
        out = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                name = stat[stat.index("(") + 1:stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2:].split()
                out[int(d.name)] = (name, int(fields[11]) + int(fields[12]), int(fields[1]))
            except (OSError, ValueError, IndexError):
                continue
        return out

    a = ticks()
    time.sleep(sample_s)
    b = ticks()
    hz = os.sysconf("SC_CLK_TCK")
    me = os.getpid()

    def ours(pid: int) -> bool:
        for _ in range(64):
            pid = b[pid][2] if pid in b else 0
            if pid == me:
                return True
            if pid <= 1:
                return False
        return False

    busy = sorted(((b[p][1] - a[p][1]) / hz / sample_s, b[p][0], p) for p in b if p in a and p != me)
    top = [f"{name} (pid {pid}{', ours' if ours(pid) else ''}) {share * 100:.0f}% of a core"
           for share, name, pid in reversed(busy) if share >= 0.05]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"load average {load}; other processes busy now: {', '.join(top) if top else 'none'}"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; NaN when empty."""
    if not len(values):
        return float("nan")
    import math

    data = sorted(values)
    k = max(0, min(len(data) - 1, math.ceil(q / 100 * len(data)) - 1))
    return float(data[k])


def proc_status_kib(pid: int, field: str = "VmHWM") -> int:
    """A ``/proc/<pid>/status`` memory field in KiB (VmHWM = peak RSS); 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far; NaN if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def jit_cpu_s(pid: int) -> float:
    """CPU seconds a JVM's JIT compiler threads (``C1/C2 CompilerThread``) used so far; NaN if it is gone.

    Why: a broker compiles its hot paths for minutes after it starts, and that start-up cost is
    not a cost per frame; the pipeline bench warms the broker until this stops growing and shows
    what is left of it in every measured window."""
    total, tck = 0, os.sysconf("SC_CLK_TCK")
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return float("nan")
    for t in tasks:
        try:
            if "CompilerThre" not in Path(f"/proc/{pid}/task/{t}/comm").read_text():
                continue
            stat = Path(f"/proc/{pid}/task/{t}/stat").read_text()
        except OSError:  # a compiler thread that ended (the JVM retires idle ones)
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / tck


def machine_busy_s() -> float:
    """CPU seconds all cores of the machine spent busy (not idle/iowait) since boot, from /proc/stat."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


class OthersCpu:
    """Cores that processes other than ``pids`` (and this one) kept busy during a block: the shared machine's
    disturbance of a measurement. ``.cores`` after the block."""

    def __init__(self, pids):
        self.pids = [p for p in pids if p != os.getpid()]

    def _ours(self) -> float:
        return time.process_time() + sum(proc_cpu_s(p) for p in self.pids)

    def __enter__(self):
        self.w0, self.b0, self.o0 = time.monotonic(), machine_busy_s(), self._ours()
        return self

    def __exit__(self, *exc):
        wall = max(1e-6, time.monotonic() - self.w0)
        self.cores = max(0.0, (machine_busy_s() - self.b0 - (self._ours() - self.o0)) / wall)


def self_peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_keys(path: Path, cameras: Sequence[str] = ("bench-cam",)):
    """A fresh key directory: the cloud, admin and tile-job keys, the model-release key, the stage and
    results keys (tile batches are MACed, results signed) and the given cameras enrolled (their bundles
    in bundles/ next to it)."""
    from tilestream.keys import KeyStore
    from tilestream.stagekeys import StageKeys

    store = KeyStore(path)
    store.init()
    store.init_model_release()  # `classify --model` signs the model it publishes
    StageKeys(path).init()
    for cam in cameras:
        store.enroll(cam)
    return store


class Sealer:
    """Seals encoded images exactly as the edge agent does (crypto.seal_frame), for one camera."""

    def __init__(self, store, camera_id: str):
        self.camera_id = camera_id
        self.cloud_kid, self.suite, self.cloud_public = store.cloud_public_key()
        self.device_kid, self.device_key = store.device_private_key(camera_id)

    def header(self, seq: int, capture_ns: int, width: int, height: int, encoding: str):
        from tilestream.envelope import FrameHeader

        return FrameHeader(camera_id=self.camera_id, seq=seq, capture_ns=capture_ns, width=width, height=height,
                           encoding=encoding, cloud_key_id=self.cloud_kid, device_key_id=self.device_kid, suite=self.suite)

    def seal(self, encoded: "EncodedFrame", seq: int, capture_ns: int | None = None) -> tuple[bytes, bytes]:
        """(key, sealed envelope) of one frame, key = frame id as the agent publishes it."""
        from tilestream import crypto

        h = self.header(seq, time.time_ns() if capture_ns is None else capture_ns, encoded.width, encoded.height,
                        encoded.encoding)
        return h.frame_id.encode(), crypto.seal_frame(encoded.data, h, self.cloud_public, self.device_key)


class EncodedFrame:
    __slots__ = ("data", "width", "height", "encoding")

    def __init__(self, data: bytes, width: int, height: int, encoding: str):
        self.data, self.width, self.height, self.encoding = data, width, height, encoding


def vtest_encoded(n: int, quality: int = VTEST_JPEG_QUALITY) -> list[EncodedFrame]:
    """The first ``n`` frames of vtest.avi (looping) encoded as the agent does (JPEG, BGR)."""
    from edge_agent.encode import encode_image
    import sampledata as samples

    out: list[EncodedFrame] = []
    video = samples.path("vtest.avi")
    while len(out) < n:
        before = len(out)
        for frame in samples.iter_video_frames(video, max_frames=n - len(out)):
            out.append(EncodedFrame(encode_image(frame, "jpeg", quality), frame.shape[1], frame.shape[0], "jpeg"))
        if len(out) == before:
            raise RuntimeError(f"{video} gave no frames")
    return out


def digit_sheets(n: int, seed: int = 0, digits=None) -> list[tuple["object", "object"]]:
    """``n`` 2000x1000 grayscale sheets of 100x50 digits (20 px) drawn from OpenCV's digits.png,
    each a different random arrangement; returns [(sheet uint8 (1000, 2000), labels int (50, 100))]."""
    import numpy as np

    import sampledata as samples

    images, labels = digits if digits is not None else samples.load_digits()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = rng.permutation(len(images))[:5000]
        cells = images[idx].reshape(50, 100, 20, 20)
        sheet = np.ascontiguousarray(cells.swapaxes(1, 2).reshape(1000, 2000))
        out.append((sheet, labels[idx].reshape(50, 100)))
    return out


def make_stage(store, cfg):
    """The processor's stage (:class:`stream_processor.stage.ProcessorStage`, the worker's per-record
    path) with the worker's default limits, the store's keys and feature settings ``cfg``."""
    from stream_processor.stage import ProcessorStage
    from tilestream.config import Settings
    from tilestream.metrics import Metrics

    settings = Settings(keys_dir=str(store.path), features=cfg)
    settings.kafka.max_frame_bytes, settings.processor.max_image_pixels = MAX_FRAME_BYTES, MAX_PIXELS
    return ProcessorStage.create(settings, Metrics("tilestream_bench"))


def make_classifier(store, model):
    """The classifier's stage (:class:`classifier.stage.FrameClassifier`, its service's per-record
    path) with ``model`` and the store's stage keys (tile batches MACed, results signed)."""
    from classifier.stage import FrameClassifier
    from tilestream.metrics import Metrics
    from tilestream.stagekeys import StageKeys

    return FrameClassifier(model, Metrics("tilestream_bench"), keys=StageKeys(store.path).for_classifier())


def frames_producer(bootstrap: str):
    """The edge agent's producer profile (kafkaio "frames": acks=all, idempotent, 1 MB batches)."""
    from kafkaio import clients

    return clients.producer(bootstrap, "frames", client_id="tilestream-bench-sender",
                            max_request_size=MAX_FRAME_BYTES + 64 * 1024, request_timeout_ms=30000)


def commit_group_to_end(bootstrap: str, group_id: str, topic: str) -> dict[int, int]:
    """Commit the topic's current end offsets for a (new, empty) consumer group, so it starts there."""
    from kafka.structs import OffsetAndMetadata

    from kafkaio import clients

    c = clients.consumer(bootstrap, client_id="tilestream-bench", group_id=group_id)
    try:
        parts = clients.partitions(c, topic)
        end = c.end_offsets(parts)
        c.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in end.items()})
        return {tp.partition: o for tp, o in end.items()}
    finally:
        c.close()


def topic_disk_bytes(broker, topic: str) -> int:
    """Bytes of the topic's log segments on the local broker's disk (records + batch headers)."""
    data = Path(broker.state_dir) / "data"
    return sum(f.stat().st_size for d in data.glob(f"{topic}-*") if d.name.rsplit("-", 1)[0] == topic
               for f in d.glob("*.log"))


# Every bench step starts a classifier in a fresh group, which first reads back the results written
# since its first tile minus classifier.dedup_margin_s (120 s by default: a margin for clocks of
# different hosts). Here that was every result of the previous steps: 6,000 warm-up frames before
# a 1-worker closed loop made the classifier 5.5 and 6.1 CPU ms per frame with 120 s against 2.7
# and 2.5 with 1 s (alternating, one sitting, 2026-12-03 03:52); with the read-back taking only
# verified frame ids (tilestream.records.signed_result_frame_id) 3.8 and 3.9 against 2.8 and 2.8.
# One machine has one clock, and a restart's read-back is not a frame's cost, so the bench's
# classifiers use a margin of a second.
BENCH_DEDUP_MARGIN_S = 1.0


def child_env(bootstrap: str, keys_dir: Path, home: Path, **settings: str) -> dict[str, str]:
    """Environment for `tilestream` child processes; ``settings`` are TILESTREAM_* overrides."""
    env = dict(os.environ, TILESTREAM_KAFKA_BOOTSTRAP=bootstrap, TILESTREAM_KEYS_DIR=str(keys_dir),
                TILESTREAM_HOME=str(home), TILESTREAM_LOG_LEVEL="WARNING",
                TILESTREAM_CLASSIFIER_DEDUP_MARGIN_S=str(BENCH_DEDUP_MARGIN_S))
    env.update(settings)
    return env


def _end_offset(consumer, topic: str, partition: int, timeout_s: float = 30.0) -> int:
    """The partition's end offset now (librdkafka), asked again until ``timeout_s``: right after a
    broker starts it answers NOT_LEADER_FOR_PARTITION (not flagged retriable) for a while."""
    from confluent_kafka import KafkaException, TopicPartition

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class ResultsWatcher:
    """A thread reading ``results`` from its end now on: frame id -> (arrival ns, FrameResult).

    The reader shares the pipeline's cores, so it does the least it can while frames flow: a
    librdkafka consumer (fetches parsed in C) and, per record, the signature check and the frame
    id (:func:`tilestream.records.signed_result_frame_id`, ~0.3 ms); the whole result is verified
    and parsed (:func:`classifier.results.verify_result`) only when :meth:`of` asks, after the
    measured window. Reading with ``classifier.results.tail`` (kafka-python, every result parsed
    on arrival) cost 4.0 and 4.5 CPU ms per frame in make bench's closed loops (2026-12-03 04:43):
    a third of a core at 72 frames/s taken from the pipeline it measured."""

    def __init__(self, bootstrap: str, keys_dir: Path):
        import threading

        self.bootstrap = bootstrap
        self.keys_dir = keys_dir  # results are verified with its results/*.pub
        self.arrived: dict[str, tuple[int, bytes]] = {}
        self._parsed: dict[str, tuple[int, object]] = {}
        self.duplicates = 0
        self.refused = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-results", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> "ResultsWatcher":
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("could not start reading the results topic")
        if self.error is not None:
            raise RuntimeError(f"results reader failed: {self.error}")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _keys(self):
        from tilestream.stagekeys import StageKeys

        return StageKeys(self.keys_dir).result_keys()

    def _run(self) -> None:
        import uuid

        from confluent_kafka import TopicPartition

        from kafkaio import rdkafka
        from tilestream import topics
        from tilestream.errors import Refused
        from tilestream.records import signed_result_frame_id

        try:
            keys = self._keys()
            c = rdkafka.group_consumer(self.bootstrap, f"tilestream-bench-results-{uuid.uuid4().hex[:8]}",
                                       "tilestream-bench-results")
            try:
                parts = sorted(c.list_topics(topics.RESULTS, timeout=30).topics[topics.RESULTS].partitions)
                # From the end as it is now, fixed before ready: no result of a later phase is missed.
                c.assign([TopicPartition(topics.RESULTS, p, _end_offset(c, topics.RESULTS, p)) for p in parts])
                self._ready.set()
                while not self._stop.is_set():
                    first = c.poll(0.2)
                    for m in [] if first is None else [first, *c.consume(500, 0)]:
                        if m.error() is not None:
                            continue
                        now = time.time_ns()
                        try:
                            fid = signed_result_frame_id(m.value(), keys)
                        except Refused:
                            self.refused += 1
                            continue
                        if fid in self.arrived:
                            self.duplicates += 1
                        else:
                            self.arrived[fid] = (now, m.value())
            finally:
                c.close()
        except BaseException as exc:  # noqa: BLE001 - reported by wait()
            self.error = exc
            self._ready.set()

    def count(self, camera_id: str) -> int:
        prefix = camera_id + "/"
        return sum(1 for k in list(self.arrived) if k.startswith(prefix))

    def of(self, camera_id: str) -> list[tuple[int, object]]:
        """(arrival ns, FrameResult) of this camera's results so far, each verified and parsed whole."""
        from classifier.results import verify_result

        prefix, keys, out = camera_id + "/", None, []
        for k, (t, raw) in list(self.arrived.items()):
            if not k.startswith(prefix):
                continue
            if k not in self._parsed:
                keys = keys or self._keys()
                self._parsed[k] = (t, verify_result(raw, keys))
            out.append(self._parsed[k])
        return out

    def wait(self, camera_id: str, n: int, timeout_s: float, procs: Sequence = (), what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        last_report = time.monotonic()
        while self.count(camera_id) < n:
            if self.error is not None:
                raise RuntimeError(f"results reader failed: {self.error}")
            for name, p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {p.returncode} while waiting for {what or camera_id}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what or camera_id}: {self.count(camera_id)}/{n} results after {timeout_s:.0f}s")
            if time.monotonic() - last_report > 10:
                progress(f"  {what or camera_id}: {self.count(camera_id)}/{n} results")
                last_report = time.monotonic()
            time.sleep(0.05)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def write_json(path: str | os.PathLike[str] | None, data: dict) -> None:
    if path:
        import json

        Path(path).write_text(json.dumps(data, indent=2, default=str))


def warm_broker(bootstrap: str, seconds: float = 45.0, frame_bytes: int = 77_000, tile_bytes: int = 37_000) -> None:
    """Produce and read frame- and tile-batch-sized records, so the broker's JIT is warm before anything
    is measured (a cold JVM costs several times the CPU per record).

    45 s, not 6: under pipeline-like traffic the broker's JIT compiler thread still used 2.6, 2.7, 1.3,
    0.7, 0.4 ms per frame in successive 30 s windows and settled only after about 3 minutes
    (2026-12-02); with a 6 s warm-up the first step measured (1 worker) charged the broker 8.1 ms per
    frame against 3.3 with 2 workers a few minutes later. 45 s takes the steep part away."""
    from kafka import TopicPartition

    from kafkaio import clients
    from kafkaio.clients import ensure_topics
    from tilestream.topics import TopicSpec

    topic = "bench-warmup"
    ensure_topics(bootstrap, [TopicSpec(topic, 6, {"retention.ms": str(600_000)})])
    big, small = os.urandom(frame_bytes), os.urandom(tile_bytes)
    p = clients.producer(bootstrap, "frames")
    c = clients.consumer(bootstrap, client_id="tilestream-bench-warmup")
    try:
        parts = [TopicPartition(topic, i) for i in range(6)]
        c.assign(parts)
        c.seek_to_end(*parts)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(20):
                p.send(topic, big)
            for _ in range(20):
                p.send(topic, small)
            p.flush(30)
            c.poll(timeout_ms=100, max_records=5000)
    finally:
        p.close()
        c.close()
