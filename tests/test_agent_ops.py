"""The edge agent as it is operated: a watched image folder, SIGTERM of the real ``tilestream agent``
process with the broker up and down, its /healthz and /metrics over HTTP, a real RTSP camera, and
cameras that are not there (an RTSP URL with no server, a V4L2 device index with no device).

Everything runs against the module's real Kafka broker; the CLI tests start ``python -m tilestream_cli
agent`` as a child process and talk to it only through signals, HTTP, its stdout/stderr, its state
directory and Kafka.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest

from deploy.local_kafka import free_port
from edge_agent.agent import EdgeAgent
from edge_agent.spool import Spool
from tilestream import crypto, envelope, topics
from tilestream.config import AgentSettings
from tilestream.keys import DeviceRegistry
from tilestream.metrics import Metrics
from tilestream.records import AgentHeartbeat

from conftest import child_env, read_topic, wait_for
from test_agent import assert_exactly_once_in_order, frames_on_topic

MAX_FRAME_BYTES = 4 * 1024 * 1024


# -- helpers ----------------------------------------------------------------------------------
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+-?\d+)?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text exposition (0.0.4) -> {(name, labels): value}; fails on any line it cannot parse
    and on a series that appears twice."""
    out: dict[tuple[str, frozenset], float] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"line {n} is not a Prometheus sample: {line!r}"
        name, _, inner, value, _ts = m.groups()
        labels = {}
        pos = 0
        while inner and pos < len(inner):
            lm = _LABEL.match(inner, pos)
            assert lm and lm.end() > pos, f"line {n}: bad labels {inner!r}"
            labels[lm.group(1)] = lm.group(2)
            pos = lm.end()
        try:
            v = float(value)  # also NaN, +Inf, -Inf
        except ValueError:
            raise AssertionError(f"line {n}: value {value!r} is not a number") from None
        key = (name, frozenset(labels.items()))
        assert key not in out, f"line {n}: series {name}{labels} appears twice"
        out[key] = v
    return out


def sample(metrics: dict, name: str, **labels: str) -> float | None:
    return metrics.get((name, frozenset(labels.items())))


def http_get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


class AgentProcess:
    """``python -m tilestream_cli agent ...`` as a child process, its output in files (a full pipe would block it)."""

    def __init__(self, tmp: Path, name: str, bootstrap: str, keys_dir: Path, args: list[str], env: dict | None = None,
                 http: bool = True):
        self.http_port = free_port() if http else 0
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        cmd = [sys.executable, "-m", "tilestream_cli", "agent", *args]
        if http:
            cmd += ["--http-port", str(self.http_port)]
        full_env = dict(child_env(bootstrap, keys_dir, tmp / "home"), **(env or {}))
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=err, start_new_session=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def metrics(self) -> dict:
        status, ctype, body = http_get(self.url("/metrics"))
        assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
        return parse_prometheus(body)

    def health(self) -> dict:
        status, ctype, body = http_get(self.url("/healthz"))
        assert ctype == "application/json", ctype
        h = json.loads(body)
        assert status == (200 if h.get("status") == "ok" else 503)
        return h

    def serving(self) -> bool:
        assert self.proc.poll() is None, f"the agent exited early:\n{self.stderr()[-3000:]}"
        try:
            return http_get(self.url("/healthz"))[0] == 200
        except OSError:
            return False

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def events(self, name: str) -> list[dict]:
        """The agent's structured log records with ``event == name``."""
        out = []
        for line in self.stderr().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("event") == name:
                out.append(rec)
        return out

    def done(self) -> dict:
        """The final ``agent_done`` line of stdout."""
        lines = [ln for ln in self.out.read_text().splitlines() if ln.startswith("{")]
        assert lines, f"no agent_done line; stderr:\n{self.stderr()[-3000:]}"
        done = json.loads(lines[-1])
        assert done["event"] == "agent_done"
        return done

    def terminate(self, timeout_s: float, then: Callable[[], None] | None = None) -> tuple[int | None, float]:
        """SIGTERM, then ``then()`` if given; (exit code or None if still running after
        ``timeout_s``, seconds it took)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        if then is not None:
            then()
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def agents():
    """Every agent process a test starts is killed at teardown, also when the test fails."""
    started: list[AgentProcess] = []

    def start(*args, **kwargs) -> AgentProcess:
        a = AgentProcess(*args, **kwargs)
        started.append(a)
        return a

    yield start
    for a in started:
        a.kill()


def dead_bootstrap() -> str:
    """A loopback address with no broker behind it."""
    return f"127.0.0.1:{free_port()}"


def open_frames(bootstrap: str, keystore, camera: str) -> dict[int, np.ndarray]:
    """seq -> decoded image of every frame of ``camera`` on the topic (verified and opened like the cloud does)."""
    devices = DeviceRegistry(keystore.registry_path, check_every_s=0)
    out = {}
    for m in read_topic(bootstrap, topics.FRAMES):
        if envelope.parse(m.value).header.camera_id != camera:
            continue
        header, data = crypto.open_frame(m.value, keystore.cloud_private_keys(), devices)
        out[header.seq] = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return out


# -- Prometheus rendering (pure) --------------------------------------------------------------
def test_metrics_render_large_counters_exactly_and_parse():
    m = Metrics("tilestream_agent")
    m.set("spool_bytes", 19_931_365)  # {:g} rendered this as 1.99314e+07
    m.inc("captured_total", 1_234_567)
    m.inc("source_errors_total", reason="open_failed")
    m.observe("send_seconds", 0.0125)
    parsed = parse_prometheus(m.render())
    assert sample(parsed, "tilestream_agent_spool_bytes") == 19_931_365
    assert sample(parsed, "tilestream_agent_captured_total") == 1_234_567
    assert sample(parsed, "tilestream_agent_source_errors_total", reason="open_failed") == 1
    assert sample(parsed, "tilestream_agent_send_seconds_sum") == 0.0125
    assert sample(parsed, "tilestream_agent_send_seconds", quantile="0.5") == 0.0125


# -- 1. watched image folder ------------------------------------------------------------------
def _test_image(level: int) -> np.ndarray:
    """A 240x320 image of mean ``level`` with fixed texture (so its JPEG is ~20 KB, worth cutting in half)."""
    rng = np.random.default_rng(level)
    texture = rng.integers(-12, 13, (240, 320, 1)).repeat(3, axis=2)
    return np.clip(level + texture, 0, 255).astype(np.uint8)


LEVELS = [20 + 25 * i for i in range(9)]  # file i has mean LEVELS[i]


def _jpeg(i: int) -> bytes:
    return cv2.imencode(".jpg", _test_image(LEVELS[i]), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def _which_file(image: np.ndarray) -> int:
    """Index of the test file a received frame shows; both halves must match (a truncated JPEG
    decodes with grey rows at the bottom)."""
    h = image.shape[0] // 2
    top, bottom = float(image[:h].mean()), float(image[h:].mean())
    i = int(np.argmin([abs(top - lv) for lv in LEVELS]))
    assert abs(top - LEVELS[i]) < 5 and abs(bottom - LEVELS[i]) < 5, f"frame is not a whole test file: {top:.1f}/{bottom:.1f}"
    return i


@pytest.mark.kafka
def test_watched_folder_delivers_new_files_once_in_name_order_and_survives_bad_files(kafka, keystore, tmp_path):
    keystore.enroll("cam-watch")
    watched = tmp_path / "watched"
    watched.mkdir()
    sent: list[bytes] = []
    agent = EdgeAgent(AgentSettings(camera_id="cam-watch", source=str(watched), watch=True, heartbeat_interval_s=0.5,
                                    backoff_max_s=0.5), keystore, kafka.bootstrap, MAX_FRAME_BYTES,
                      state_dir=tmp_path / "agent")
    runner = threading.Thread(target=agent.run, kwargs={"on_sent": sent.append}, daemon=True)
    runner.start()
    c = agent.counters
    try:
        # a) Five files appear at once, created in reverse name order (a whole directory renamed over
        #    the empty watched one, so the agent's listing sees all or none): delivered in name order.
        staging = tmp_path / "staging"
        staging.mkdir()
        for i in reversed(range(5)):
            (staging / f"{i:03d}.jpg").write_bytes(_jpeg(i))
        os.rename(staging, watched)
        wait_for(lambda: c.sent == 5, 30, "the 5 new files to be sent")

        # b) A file being written: half of it is there for several polls (a paused writer): it must not
        #    be delivered as a frame; a truncated JPEG is a source error; once complete it is delivered.
        half = _jpeg(5)
        with open(watched / "005.jpg", "wb") as f:
            f.write(half[: len(half) // 2])
        wait_for(lambda: c.source_errors == 1, 15, "the half-written JPEG to be counted as a source error")
        assert c.sent == 5 and c.captured == 5
        with open(watched / "005.jpg", "ab") as f:
            f.write(half[len(half) // 2:])
        wait_for(lambda: c.sent == 6, 15, "the completed file to be sent")

        # c) A file that is not an image at all, next to a good one: counted, skipped, the agent goes on.
        (watched / "006.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
        (watched / "007.jpg").write_bytes(_jpeg(7))
        wait_for(lambda: c.sent == 7 and c.source_errors == 2, 15, "the corrupt file counted and the good one sent")

        # d) The folder goes away (unmounted, renamed) and comes back: counted once, nothing sent twice.
        os.rename(watched, tmp_path / "away")
        wait_for(lambda: c.source_errors == 3, 15, "the missing folder to be counted")
        os.rename(tmp_path / "away", watched)
        (watched / "008.jpg").write_bytes(_jpeg(8))
        wait_for(lambda: c.sent == 8, 15, "the file added after the folder came back")
        time.sleep(1.5)  # three more polls: nothing else may be picked up (an upper bound, not a wait for success)
        assert c.captured == 8 and runner.is_alive()
    finally:
        agent.stop()
        runner.join(60)
    assert not runner.is_alive()
    assert agent.metrics.counter("source_errors_total", reason="bad_image") == 2
    assert agent.metrics.counter("source_errors_total", reason="not_found") == 1
    records = frames_on_topic(kafka.bootstrap, "cam-watch")
    assert_exactly_once_in_order(records, list(range(8)))
    frames = open_frames(kafka.bootstrap, keystore, "cam-watch")
    assert [_which_file(frames[seq]) for seq in range(8)] == [0, 1, 2, 3, 4, 5, 7, 8]


# -- 2. SIGTERM of the real agent process ----------------------------------------------------
@pytest.mark.kafka
def test_sigterm_mid_stream_drains_every_sealed_frame_exactly_once(kafka, keystore, vtest_path, tmp_path, agents):
    keystore.enroll("cam-term")
    drain_s = 60
    agent = agents(tmp_path, "agent", kafka.bootstrap, keystore.path,
                   ["--source", str(vtest_path), "--loop", "--max-side", "320", "--camera-id", "cam-term",
                    "--state-dir", str(tmp_path / "agent"), "--drain-timeout-s", str(drain_s)],
                   env={"TILESTREAM_AGENT_MAX_IN_FLIGHT": "1"})
    wait_for(agent.serving, 30, "the agent's HTTP endpoint")
    wait_for(lambda: (agent.metrics().get(("tilestream_agent_sent_total", frozenset())) or 0) >= 20, 60,
             "20 frames sent")
    # A backlog at SIGTERM, made rather than hoped for: the broker hangs (SIGSTOP) while capture goes on,
    # so frames pile up in the spool behind the one in flight. Waiting for capture to outrun sending was
    # machine-dependent: with the agent's producer on librdkafka, sending kept up and CI timed out
    # waiting for the backlog (clean-clone CI, 2026-12-02).
    broker_pid = next(iter(kafka.node_pids().values()))
    os.kill(broker_pid, signal.SIGSTOP)
    resume = lambda: os.kill(broker_pid, signal.SIGCONT)  # noqa: E731 - idempotent
    try:
        backlog = wait_for(lambda: (f := agent.health()["spool_frames"]) >= 10 and f, 30,
                           "a backlog in the spool while the broker hangs")
        rc, took = agent.terminate(drain_s + 15, then=resume)  # SIGTERM while the broker still hangs
    finally:
        resume()
    assert rc == 0, f"exit code {rc} after SIGTERM ({took:.1f}s):\n{agent.stderr()[-3000:]}"
    done = agent.done()
    print(f"SIGTERM with {backlog} frames spooled: exited after {took:.1f}s, sealed {done['sealed']}, sent {done['sent']}")
    assert done["sealed"] == done["captured"] and done["dropped"] == 0 and done["too_large"] == 0
    assert done["sent"] == done["sealed"], "frames were left unsent although the broker was up"
    assert_exactly_once_in_order(frames_on_topic(kafka.bootstrap, "cam-term"), list(range(done["sealed"])))
    assert not agent.events("exit_with_spooled_frames")


@pytest.mark.kafka
def test_sigterm_with_broker_down_keeps_the_spool_and_a_restart_sends_it_once_in_order(kafka, keystore, vtest_path,
                                                                                       tmp_path, agents):
    keystore.enroll("cam-down")
    state = tmp_path / "agent"
    drain_s = 3
    common = ["--camera-id", "cam-down", "--state-dir", str(state)]
    agent = agents(tmp_path, "down", dead_bootstrap(), keystore.path,
                   ["--source", str(vtest_path), "--realtime", "--max-side", "320", "--drain-timeout-s", str(drain_s),
                    *common])
    wait_for(agent.serving, 30, "the agent's HTTP endpoint")
    # The spool grows while nothing is sent; /metrics and /healthz say so.
    m1 = wait_for(lambda: (m := agent.metrics()).get(("tilestream_agent_spool_frames", frozenset()), 0) >= 10 and m,
                  30, "10 frames in the spool")
    m2 = wait_for(lambda: (m := agent.metrics())[("tilestream_agent_spool_frames", frozenset())] >= 30 and m,
                  30, "30 frames in the spool")
    for m in (m1, m2):
        assert sample(m, "tilestream_agent_sent_total") == 0 and sample(m, "tilestream_agent_connected") == 0
        assert sample(m, "tilestream_agent_send_seconds_count") is None
    assert sample(m2, "tilestream_agent_spool_bytes") > sample(m1, "tilestream_agent_spool_bytes") > 0
    assert sample(m2, "tilestream_agent_captured_total") > sample(m1, "tilestream_agent_captured_total")
    h = agent.health()
    assert h["status"] == "ok" and h["connected"] is False and h["spool_frames"] >= 30 and h["sent"] == 0

    rc, took = agent.terminate(drain_s + 60)
    assert rc == 0, f"exit code {rc} {took:.1f}s after SIGTERM:\n{agent.stderr()[-3000:]}"
    done = agent.done()
    n = done["sealed"]
    assert done["sent"] == 0 and n >= 30 and done["dropped"] == 0
    assert agent.events("exit_with_spooled_frames")[-1]["frames"] == n
    spool = Spool(state / "spool", 1 << 30)
    try:
        entries = spool.peek(1_000_000)
        assert sorted(envelope.parse(e.value).header.seq for e in entries) == list(range(n))
    finally:
        spool.close()

    # Restart with the broker up and nothing new to capture: the spool goes out, once, in seq order.
    empty = tmp_path / "nothing-new"
    empty.mkdir()
    again = agents(tmp_path, "restart", kafka.bootstrap, keystore.path,
                   ["--source", str(empty), "--drain-timeout-s", "60", *common], http=False)
    assert again.proc.wait(120) == 0, again.stderr()[-3000:]
    assert again.done()["sent"] == n
    assert_exactly_once_in_order(frames_on_topic(kafka.bootstrap, "cam-down"), list(range(n)))
    print(f"broker down: SIGTERM to exit {took:.1f}s (drain timeout {drain_s}s), {n} frames kept and sent after restart")
    # The drain timeout plus at most one bounded broker look-up (sender.BOOTSTRAP_TIMEOUT_MS) and slack.
    assert took <= drain_s + 10, f"exit took {took:.1f}s after SIGTERM with the broker down (drain timeout {drain_s}s)"


def test_sigterm_with_a_full_blocking_spool_and_the_broker_down_still_exits(keystore, vtest_path, tmp_path, agents):
    keystore.enroll("cam-full")
    drain_s = 2
    agent = agents(tmp_path, "full", dead_bootstrap(), keystore.path,
                   ["--source", str(vtest_path), "--max-side", "320", "--camera-id", "cam-full",
                    "--state-dir", str(tmp_path / "agent"), "--drain-timeout-s", str(drain_s),
                    "--spool-max-bytes", "1000000", "--spool-when-full", "block"])
    wait_for(agent.serving, 30, "the agent's HTTP endpoint")
    wait_for(lambda: agent.metrics()[("tilestream_agent_paused_total", frozenset())] >= 1, 30, "capture to pause")
    rc, took = agent.terminate(drain_s + 30)
    assert rc == 0, f"still running {took:.0f}s after SIGTERM" if rc is None else f"exit code {rc}"
    assert took <= drain_s + 10, f"exit took {took:.1f}s after SIGTERM (drain timeout {drain_s}s)"
    # The one frame that waited for room had nowhere to go: dropped, counted and logged, never silently.
    done = agent.done()
    assert done["dropped"] == 1 and done["paused"] == 1 and done["sent"] == 0
    assert [e["reason"] for e in agent.events("frame_dropped_at_shutdown")] == ["spool full"]


# -- 3. /healthz and /metrics of the running process -----------------------------------------
@pytest.mark.kafka
def test_running_agent_serves_healthz_and_prometheus_metrics_that_move(kafka, keystore, vtest_path, tmp_path, agents):
    keystore.enroll("cam-http")
    agent = agents(tmp_path, "agent", kafka.bootstrap, keystore.path,
                   ["--source", str(vtest_path), "--realtime", "--max-side", "320", "--camera-id", "cam-http",
                    "--state-dir", str(tmp_path / "agent"), "--heartbeat-interval-s", "0.5"])
    wait_for(agent.serving, 30, "the agent's HTTP endpoint")
    status, _, _ = http_get(agent.url("/nope"))
    assert status == 404

    def scrape_after(sent: float):
        m = agent.metrics()
        return m if (sample(m, "tilestream_agent_sent_total") or 0) >= sent else None

    m1 = wait_for(lambda: scrape_after(5), 30, "5 frames sent")
    m2 = wait_for(lambda: scrape_after(sample(m1, "tilestream_agent_sent_total") + 10), 30, "10 more frames sent")
    for name in ("captured_total", "sealed_total", "sent_total", "send_seconds_count", "send_seconds_sum",
                 "heartbeats_total", "uptime_seconds", "last_seq"):
        a, b = sample(m1, f"tilestream_agent_{name}"), sample(m2, f"tilestream_agent_{name}")
        assert a is not None and b is not None and b > a, f"{name} did not move: {a} -> {b}"
    for m in (m1, m2):
        assert sample(m, "tilestream_agent_connected") == 1
        assert sample(m, "tilestream_agent_source_errors_total") == 0 and sample(m, "tilestream_agent_dropped_total") == 0
        assert sample(m, "tilestream_agent_sealed_total") >= sample(m, "tilestream_agent_sent_total")
        # spool gauges: whole numbers, and frames + bytes agree (empty together or both non-zero)
        frames, nbytes = sample(m, "tilestream_agent_spool_frames"), sample(m, "tilestream_agent_spool_bytes")
        assert frames == int(frames) and nbytes == int(nbytes) and (frames == 0) == (nbytes == 0)
        # send latency summary: quantiles ordered, within the observed range, consistent with _sum/_count
        q = [sample(m, "tilestream_agent_send_seconds", quantile=x) for x in ("0.5", "0.95", "0.99")]
        assert all(v is not None for v in q) and 0 < q[0] <= q[1] <= q[2] < 10, q
        count, total = sample(m, "tilestream_agent_send_seconds_count"), sample(m, "tilestream_agent_send_seconds_sum")
        assert 0 < total / count < 10 and math.isfinite(total)
    h = agent.health()
    assert h["status"] == "ok" and h["camera_id"] == "cam-http" and h["connected"] is True
    assert h["sent"] >= sample(m2, "tilestream_agent_sent_total") and h["source_errors"] == 0
    rc, took = agent.terminate(30)
    assert rc == 0, agent.stderr()[-3000:]
    done = agent.done()
    assert done["sent"] == done["sealed"] >= sample(m2, "tilestream_agent_sealed_total")


# -- 4./5. cameras that are not there ---------------------------------------------------------
NO_DEVICE = "63"  # /dev/video63


@pytest.mark.kafka
@pytest.mark.parametrize("kind", ["rtsp-no-server", "v4l2-no-device"])
def test_a_camera_that_is_not_there_is_retried_with_backoff_and_counted(kind, kafka, keystore, tmp_path, agents):
    if kind == "v4l2-no-device" and Path(f"/dev/video{NO_DEVICE}").exists():
        pytest.skip(f"/dev/video{NO_DEVICE} exists on this machine")
    source = f"rtsp://127.0.0.1:{free_port()}/cam" if kind == "rtsp-no-server" else NO_DEVICE
    camera = f"cam-{kind}"
    keystore.enroll(camera)
    agent = agents(tmp_path, "agent", kafka.bootstrap, keystore.path,
                   ["--source", source, "--camera-id", camera, "--state-dir", str(tmp_path / "agent"),
                    "--heartbeat-interval-s", "0.5"], env={"TILESTREAM_AGENT_BACKOFF_MAX_S": "2"})
    wait_for(agent.serving, 30, "the agent's HTTP endpoint")
    retries = wait_for(lambda: len(r := agent.events("source_retry")) >= 5 and r, 30, "5 retries of the source")
    assert [r["retry_in_s"] for r in retries[:5]] == [0.5, 1.0, 2.0, 2.0, 2.0]  # doubling, capped at backoff_max_s
    assert {r["reason"] for r in retries} == {"open_failed"}
    assert all(source in r["error"] for r in retries)
    m = agent.metrics()
    assert sample(m, "tilestream_agent_source_errors_total", reason="open_failed") >= 5
    assert sample(m, "tilestream_agent_captured_total") == 0
    h = agent.health()
    assert h["status"] == "ok" and h["source_errors"] >= 5 and h["captured"] == 0

    def beat():
        beats = [AgentHeartbeat.from_json(r.value) for r in read_topic(kafka.bootstrap, topics.HEARTBEATS)
                 if r.key == camera.encode()]
        return beats and beats[-1].counters["source_errors"] >= 5 and beats[-1]
    last = wait_for(beat, 30, "a heartbeat that reports the source errors")
    assert last.status == "running" and last.counters["captured"] == 0

    assert agent.proc.poll() is None, "the agent exited because of a missing camera"
    rc, took = agent.terminate(15)
    assert rc == 0, agent.stderr()[-3000:]
    done = agent.done()
    assert done["captured"] == 0 and done["source_errors"] >= 5


# -- 4. a real RTSP camera --------------------------------------------------------------------
RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")
SYSTEM_PYTHON = "/usr/bin/python3"


class RtspCamera:
    """tests/rtsp_server.py (GStreamer's gst-rtsp-server) under the system Python, on a fixed port."""

    def __init__(self, log: Path):
        self.log = log
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(RTSP_SERVER), str(self.port)], stdout=subprocess.PIPE,
                                     stderr=open(self.log, "ab"), text=True, start_new_session=True)
        line = self.proc.stdout.readline()  # "ready PORT", or EOF if it died
        if not line.startswith("ready "):
            self.proc.wait(10)
            raise RuntimeError(f"RTSP server did not start (exit {self.proc.returncode}): {self.log.read_text()[-2000:]}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"


def _rtsp_server_missing() -> str | None:
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} is not installed"
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "import sys; sys.exit(any(Gst.ElementFactory.find(e) is None for e in ('videotestsrc', 'jpegenc', 'rtpjpegpay')))")
    r = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
    if r.returncode:
        why = (r.stderr.strip().splitlines() or ["(no output)"])[-1][-300:]
        return ("GStreamer's RTSP server is not installed (Debian: python3-gi gir1.2-gst-rtsp-server-1.0 "
                f"gstreamer1.0-plugins-base gstreamer1.0-plugins-good; `make setup` installs them): {why}")
    return None


@pytest.fixture
def rtsp_camera(tmp_path):
    missing = _rtsp_server_missing()
    if missing:
        pytest.skip(missing)
    cam = RtspCamera(tmp_path / "rtsp-server.log")
    cam.start()
    try:
        yield cam
    finally:
        cam.stop()


@pytest.mark.kafka
def test_frames_of_a_real_rtsp_camera_are_published_and_a_server_restart_is_survived(kafka, keystore, rtsp_camera,
                                                                                      tmp_path):
    keystore.enroll("cam-rtsp")
    n = 40
    agent = EdgeAgent(AgentSettings(camera_id="cam-rtsp", source=rtsp_camera.url, max_frames=n, backoff_max_s=0.5),
                      keystore, kafka.bootstrap, MAX_FRAME_BYTES, state_dir=tmp_path / "agent")
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        wait_for(lambda: agent.counters.sent >= 15, 30, "15 frames from the RTSP camera sent")
        rtsp_camera.stop()  # the camera reboots: the stream breaks, the agent reopens it
        wait_for(lambda: agent.counters.source_errors >= 1, 30, "the broken stream to be counted")
        rtsp_camera.start()  # same port
        runner.join(60)
        assert not runner.is_alive(), "the agent did not finish after the camera came back"
    finally:
        agent.stop()
        runner.join(30)
    c = agent.counters
    assert c.captured == n and c.sent == n and c.source_errors >= 1
    reasons = {dict(labels).get("reason") for (name, labels) in agent.metrics.counters if name == "source_errors_total"}
    assert reasons <= {"read_failed", "open_failed"} and "read_failed" in reasons, reasons
    assert_exactly_once_in_order(frames_on_topic(kafka.bootstrap, "cam-rtsp"), list(range(n)))
    frames = open_frames(kafka.bootstrap, keystore, "cam-rtsp")
    assert all(f.shape == (240, 320, 3) for f in frames.values())
    # A live picture, not a frozen or blank one: a white ball on black that moves from frame to frame.
    moved = sum(float(np.abs(frames[i].astype(np.int16) - frames[i + 1]).mean()) > 0.2 for i in range(n - 1))
    assert all(f.max() > 200 for f in frames.values()) and moved >= (n - 1) // 2, f"only {moved} frames changed"
