"""The edge agent against a real broker that goes away, and a real process that is SIGKILLed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest

from edge_agent.agent import EdgeAgent, changed_enough, encode_within, thumbnail
from tilestream import envelope, topics
from tilestream.config import AgentSettings
from sampledata import iter_video_frames

from conftest import child_env, read_topic, wait_for


def frames_on_topic(bootstrap: str, camera: str) -> list[tuple[int, int]]:
    """(partition, seq) of every record of ``camera`` on the frames topic, in offset order per partition."""
    out = []
    for m in read_topic(bootstrap, topics.FRAMES):
        h = envelope.parse(m.value).header
        if h.camera_id == camera:
            out.append((m.partition, h.seq))
    return out


def assert_exactly_once_in_order(records: list[tuple[int, int]], expected: list[int]) -> None:
    seqs = [s for _, s in records]
    dupes = sorted({s for s in seqs if seqs.count(s) > 1})
    assert not dupes, f"duplicated seqs on the topic: {dupes}"
    assert sorted(seqs) == expected, f"missing: {sorted(set(expected) - set(seqs))}"
    by_partition: dict[int, list[int]] = {}
    for p, s in records:
        by_partition.setdefault(p, []).append(s)
    for p, ss in by_partition.items():
        assert ss == sorted(ss), f"partition {p} is out of seq order: {ss}"


# -- pure policy ------------------------------------------------------------------------------
def test_change_gating_sees_motion_not_noise(vtest_path):
    frames = list(iter_video_frames(str(vtest_path), max_frames=1))
    base = np.full((120, 160, 3), 100, np.uint8)
    noisy = base.copy()
    noisy[::7, ::7] = 103  # sensor noise
    moved = base.copy()
    moved[30:90, 40:100] = 250  # something entered the scene
    assert not changed_enough(thumbnail(base), thumbnail(noisy), 2.0)
    assert changed_enough(thumbnail(base), thumbnail(moved), 2.0)
    assert changed_enough(None, thumbnail(base), 2.0)
    assert thumbnail(frames[0]).shape == (48, 64)  # 768x576 -> 64 px wide, aspect kept


def test_oversize_frames_are_reencoded_or_rejected():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (576, 768, 3), np.uint8)  # incompressible
    image, data, tries = encode_within(noise, "jpeg", 95, 60_000, reencode=True)
    assert len(data) <= 60_000 and tries > 0
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == image.shape
    with pytest.raises(ValueError, match="bytes"):
        encode_within(noise, "jpeg", 95, 60_000, reencode=False)


# -- against the real broker ------------------------------------------------------------------
@pytest.mark.kafka
def test_broker_outage_of_30_seconds_loses_and_repeats_nothing(kafka, keystore, vtest_path, tmp_path):
    """Stop the broker while the agent publishes, start it again 30 s later."""
    n = 120
    sent = []
    agent = EdgeAgent(
        AgentSettings(camera_id="cam-test", source=str(vtest_path), max_frames=n, realtime=True, max_side=384,
                      heartbeat_interval_s=1.0, drain_timeout_s=120, backoff_max_s=2.0),
        keystore, kafka.bootstrap, max_frame_bytes=4 * 1024 * 1024, state_dir=tmp_path / "agent",
    )
    runner = threading.Thread(target=agent.run, kwargs={"on_sent": sent.append}, daemon=True)
    runner.start()
    try:
        wait_for(lambda: len(sent) >= 20, 60, "20 frames acknowledged before the outage")
        kafka.stop()
        at_stop = agent.counters.sent
        wait_for(lambda: agent.spool.frames >= 20 and agent.counters.captured >= at_stop + 20, 60,
                 "frames to pile up in the spool while the broker is down")
        import time as _time

        outage_end = _time.monotonic() + 30
        wait_for(lambda: _time.monotonic() >= outage_end, 40, "30 s of outage")
        spooled_during_outage = agent.spool.frames
        kafka.start(topics=[])
        runner.join(180)
        assert not runner.is_alive(), "agent did not finish after the broker came back"
    finally:
        agent.stop()
        runner.join(30)
    assert spooled_during_outage >= 20
    assert agent.counters.captured == n and agent.spool.frames == 0
    assert_exactly_once_in_order(frames_on_topic(kafka.bootstrap, "cam-test"), list(range(n)))


@pytest.mark.kafka
def test_sigkill_while_draining_then_restart_loses_and_repeats_nothing(kafka_any, keystore, vtest_path, tmp_path):
    broker = kafka_any()
    empty = tmp_path / "no-new-images"
    empty.mkdir()
    env = child_env(broker.bootstrap, keystore.path, tmp_path / "home")
    # A camera of its own: the module's broker already holds cam-test frames of the outage test.
    keystore.enroll("cam-kill")
    common = ["--camera-id", "cam-kill", "--state-dir", str(tmp_path / "agent")]
    n = 400

    # 1. Broker down: the agent captures n frames into its spool and gives up draining after 1 s.
    broker.stop()
    first = subprocess.run([sys.executable, "-m", "tilestream_cli", "agent", "--source", str(vtest_path), "--max-frames",
                            str(n), "--max-side", "320", "--drain-timeout-s", "1", *common],
                           env=env, capture_output=True, text=True, timeout=300)
    done = json.loads(first.stdout.strip().splitlines()[-1])
    assert done["sealed"] == n and done["sent"] == 0, first.stderr[-2000:]

    # 2. Broker up: drain one frame at a time and SIGKILL the agent half-way.
    broker.start(topics=[])
    env_slow = dict(env, TILESTREAM_AGENT_MAX_IN_FLIGHT="1")
    drain = subprocess.Popen([sys.executable, "-m", "tilestream_cli", "agent", "--source", str(empty), "--drain-timeout-s",
                              "300", *common], env=env_slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        wait_for(lambda: len(frames_on_topic(broker.bootstrap, "cam-kill")) >= 30, 120, "the drain to be under way")
        drain.send_signal(signal.SIGKILL)
        drain.wait(10)
    finally:
        if drain.poll() is None:
            drain.kill()
            drain.wait()
    partial = len(frames_on_topic(broker.bootstrap, "cam-kill"))
    assert 30 <= partial < n, f"the kill did not land mid-drain ({partial}/{n} on the topic)"

    # 3. Restart: the rest is sent, nothing twice.
    third = subprocess.run([sys.executable, "-m", "tilestream_cli", "agent", "--source", str(empty), "--drain-timeout-s",
                            "120", *common], env=env, capture_output=True, text=True, timeout=300)
    done = json.loads(third.stdout.strip().splitlines()[-1])
    print(f"after the SIGKILL at {partial}/{n}: restart sent {done['sent']}, found {done['already_on_topic']} already on the topic")
    assert done["sent"] + done["already_on_topic"] >= n - partial, third.stderr[-2000:]
    assert_exactly_once_in_order(frames_on_topic(broker.bootstrap, "cam-kill"), list(range(n)))


@pytest.mark.kafka
def test_bad_images_in_the_source_are_counted_and_the_agent_goes_on(kafka, keystore, vtest_path, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    good = 0
    for i, frame in enumerate(iter_video_frames(str(vtest_path), max_frames=20)):
        path = folder / f"{i:03d}.jpg"
        if i % 5 == 4:
            path.write_bytes(b"\xff\xd8 this is not a jpeg")  # every 5th file is corrupt
        else:
            cv2.imwrite(str(path), frame)
            good += 1
    keystore.enroll("cam-folder")
    agent = EdgeAgent(AgentSettings(camera_id="cam-folder", source=str(folder)), keystore, kafka.bootstrap,
                      max_frame_bytes=4 * 1024 * 1024, state_dir=tmp_path / "agent")
    counters = agent.run()
    assert counters.source_errors == 4
    assert counters.sent == good == 16
    assert len(frames_on_topic(kafka.bootstrap, "cam-folder")) == 16


@pytest.mark.kafka
def test_hostile_files_in_the_folder_are_refused_before_decoding_counted_per_reason_and_nothing_is_resent(
        kafka, keystore, tmp_path):
    """A good image, a corrupt .jpg, a 30000x30000 PNG header bomb (875 KB of it took 18.7 s and
    5.2 GiB to decode), a .gif: the good image is sent exactly once, the rest counted per reason."""
    from test_agent_sources import hostile_folder

    folder = hostile_folder(tmp_path / "images")
    keystore.enroll("cam-hostile")
    agent = EdgeAgent(AgentSettings(camera_id="cam-hostile", source=str(folder)), keystore, kafka.bootstrap,
                      max_frame_bytes=4 * 1024 * 1024, state_dir=tmp_path / "agent")
    counters = agent.run()
    assert counters.sent == counters.captured == 1
    assert counters.source_errors == 4
    for reason, n in {"bad_image": 1, "too_large": 1, "unsupported_format": 2}.items():
        assert agent.metrics.counter("source_errors_total", reason=reason) == n, reason
    assert 'tilestream_agent_source_errors_total{reason="too_large"} 1' in agent.render_metrics()
    assert [seq for _, seq in frames_on_topic(kafka.bootstrap, "cam-hostile")] == [0]  # once, with the first seq


@pytest.fixture
def flaky_mjpeg_camera():
    """A real HTTP MJPEG camera that drops the connection after every 5 frames."""
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    frames = [cv2.imencode(".jpg", np.full((120, 160, 3), 20 * i, np.uint8))[1].tobytes() for i in range(5)]

    class Camera(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            for f in frames:
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(f) + f + b"\r\n")
                self.wfile.flush()
                time.sleep(0.02)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Camera)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/stream.mjpg"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.kafka
def test_a_stream_that_drops_every_5_frames_is_reopened_counted_and_heartbeats_flow(kafka, keystore, flaky_mjpeg_camera,
                                                                                    tmp_path):
    keystore.enroll("cam-mjpeg")
    agent = EdgeAgent(AgentSettings(camera_id="cam-mjpeg", source=flaky_mjpeg_camera, max_frames=12, backoff_max_s=0.5,
                                    heartbeat_interval_s=0.2), keystore, kafka.bootstrap,
                      max_frame_bytes=4 * 1024 * 1024, state_dir=tmp_path / "agent")
    counters = agent.run()
    assert counters.captured == 12 and counters.sent == 12
    assert counters.source_errors >= 2  # the stream ended twice before 12 frames were read
    metrics = agent.render_metrics()
    assert "tilestream_agent_source_errors_total" in metrics and "tilestream_agent_sent_total 12" in metrics
    from tilestream.records import AgentHeartbeat

    beats = [AgentHeartbeat.from_json(m.value) for m in read_topic(kafka.bootstrap, topics.HEARTBEATS)
             if m.key == b"cam-mjpeg"]
    assert beats and beats[-1].status == "stopped" and beats[-1].counters["sent"] == 12
    assert beats[-1].counters["source_errors"] == counters.source_errors


@pytest.mark.kafka
def test_reconciliation_trusts_a_frame_on_the_topic_only_with_its_own_bytes(kafka, keystore, vtest_path, tmp_path):
    """A record that carries a spooled frame's key but other bytes (anyone with write access can
    write one) must not make the agent drop the genuine frame from its spool."""
    from edge_agent.sender import frames_on_topic as spooled_frames_on_topic
    from kafkaio import clients

    agent = EdgeAgent(AgentSettings(camera_id="cam-test", source=str(vtest_path)), keystore, kafka.bootstrap,
                      4 * 1024 * 1024, state_dir=tmp_path / "agent")
    header, genuine = agent.seal(next(iter_video_frames(str(vtest_path), max_frames=1)), 1)
    key = f"{header.frame_id}-reconcile".encode()
    producer = clients.producer(kafka.bootstrap)
    try:
        producer.send(topics.FRAMES, key=key, value=b"forged: same key, other bytes").get(timeout=30)
        assert spooled_frames_on_topic(kafka.bootstrap, {key: genuine}, {}, 0) == set()
        producer.send(topics.FRAMES, key=key, value=genuine).get(timeout=30)
        assert spooled_frames_on_topic(kafka.bootstrap, {key: genuine}, {}, 0) == {key}
    finally:
        producer.close()


def test_a_frame_acknowledged_without_its_offset_is_still_covered_by_reconciliation(tmp_path):
    """librdkafka acknowledges a retried frame whose first attempt was written (answer "duplicate
    sequence", seen after a 30 s SIGSTOP of the leader) without an offset. The frame is on the
    topic between the offsets acknowledged before and after it on its partition, so where
    reconciliation starts after a crash must not be past it (else it is sent twice)."""
    from edge_agent.agent import AgentCounters
    from edge_agent.sender import FrameSender
    from edge_agent.spool import Spool
    from kafkaio import Connection, rdkafka
    from tilestream.metrics import Metrics

    spool = Spool(tmp_path / "spool", 1 << 20, fsync="never", sync_interval=3600)
    for i in range(3):
        spool.append(b"k%d" % i, b"frame %d" % i, i)
    sender = FrameSender(AgentSettings(camera_id="cam-offsets"), Connection("127.0.0.1:1"), spool, AgentCounters(),
                         Metrics("test"), tmp_path / "state", 1 << 20, threading.Event())
    # A real producer, to an address where no broker listens: the sends stay queued in it, and
    # Kafka's answers are handed to on_ack as its delivery reports would be.
    sender.producer = rdkafka.producer("127.0.0.1:1", max_request_bytes=1 << 20, delivery_timeout_ms=60000)
    try:
        e0, e1, e2 = spool.peek(3)
        for e in (e0, e1, e2):
            sender.send(e)
        sender.on_ack(e0.id, e0.key, 0, 10)
        spool.flush()  # the persisted head now covers e0 only
        sender.on_ack(e1.id, e1.key, 0, None)  # really at offset 11
        sender.on_ack(e2.id, e2.key, 0, 12)
        sender.save_offsets()
    finally:
        sender.producer.purge()
        sender.producer = None
    assert spool.frames == 0 and sender.counters.sent == 3
    assert json.loads((tmp_path / "state" / "reconcile-from.json").read_text()) == {"0": 11}
    spool.close()


@pytest.mark.kafka
def test_the_sender_serves_kafkas_answer_when_no_next_frame_comes(kafka, tmp_path):
    """The sender thread waits for the next frame, not for Kafka's answer to the last one (one
    wake-up per frame at camera rate; the answer is served by the next turn). With no next frame
    the answer is still served within the sender's wait (POLL_WAIT_S): each frame leaves the
    spool on its own, once on the topic, and send_seconds is librdkafka's latency of it."""
    from edge_agent.agent import AgentCounters
    from edge_agent.sender import FrameSender
    from edge_agent.spool import Spool
    from kafkaio import Connection
    from tilestream.metrics import Metrics

    spool = Spool(tmp_path / "spool", 1 << 24, fsync="never")
    stop = threading.Event()
    sender = FrameSender(AgentSettings(camera_id="cam-lone"), Connection(kafka.bootstrap), spool, AgentCounters(),
                         Metrics("test"), tmp_path / "state", 1 << 20, stop)
    thread = threading.Thread(target=sender.run, daemon=True)
    thread.start()
    keys = [b"cam-lone/%d" % i for i in range(3)]
    try:
        for i, key in enumerate(keys):
            spool.append(key, b"frame %d" % i, i)
            wait_for(lambda: spool.frames == 0, 30, f"frame {i}'s acknowledgement with no frame after it")
    finally:
        stop.set()
        thread.join(30)
        sender.close()
        spool.close()
    assert not thread.is_alive() and sender.counters.sent == 3 and sender.counters.send_errors == 0
    assert sorted(m.key for m in read_topic(kafka.bootstrap, topics.FRAMES) if m.key in keys) == keys  # each once
    latencies = list(sender.metrics.samples[("send_seconds", ())])
    assert len(latencies) == 3 and all(0 < s < 30 for s in latencies), latencies
