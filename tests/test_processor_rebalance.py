"""A second processor worker joining: the first one's finished frames are not processed again.

Faust forgets a revoked partition's acked offsets before its revocation commit
(stream_processor/transport.py, ``GuardedConsumer.on_partitions_revoked``), so every frame
finished since the last periodic commit was read again by the partition's next owner. Made
deterministic here, whatever the machine's speed: the periodic commit is pushed out of the test
(``commit_interval_s`` 600 s, fewer frames than ``commit_every``), so at the moment the second
worker joins, every frame the first one processed is acked and uncommitted, and only the
revocation can commit it. The end of the re-reading is known without waiting and hoping: after
the rebalance one more frame goes to each partition, and a partition is read in order, so once
those frames' tile batches are out, anything re-read before them was processed (and counted) too.
"""

from __future__ import annotations

import time

import pytest

from conftest import child_env, mac_keys, metric, read_topic, wait_for

FRAMES_BEFORE = 18  # 3 per partition, < commit_every (100)
PARTITIONS = 6  # frames partitions of KafkaSettings()


def healthz(port: int) -> dict:
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return json.loads(r.read())
    except OSError as exc:  # a 503 carries the same body
        body = getattr(exc, "read", lambda: b"{}")()
        return json.loads(body or b"{}")


def start_processor(children, env, tmp_path, name: str) -> int:
    from deploy.local_kafka import free_port
    from tilestream_cli.procs import wait_http

    port = free_port()
    proc = children.start(name, ["process", "--http-port", str(port), "--datadir", str(tmp_path / name)], env)
    wait_http(f"http://127.0.0.1:{port}/healthz", 90, proc)
    return port


@pytest.mark.kafka
def test_frames_finished_before_a_rebalance_are_not_processed_again(kafka, keystore, vtest_path, tmp_path):
    from edge_agent.agent import EdgeAgent
    from kafkaio import clients
    from sampledata import iter_video_frames
    from tilestream import topics
    from tilestream.config import AgentSettings
    from tilestream.records import TileBatch
    from tilestream_cli.procs import Children

    from test_replay import committed_everything

    camera, group = "cam-rebalance", "rebalance-test"
    keystore.enroll(camera)
    bootstrap = kafka.bootstrap
    env = child_env(bootstrap, keystore.path, tmp_path / "home")
    env.update(TILESTREAM_PROCESSOR_APP_ID=group, TILESTREAM_PROCESSOR_COMMIT_INTERVAL_S="600")
    agent = EdgeAgent(AgentSettings(camera_id=camera, source=str(vtest_path)), keystore, bootstrap, 4 * 1024 * 1024,
                      state_dir=tmp_path / "agent")
    images = list(iter_video_frames(str(vtest_path), max_frames=FRAMES_BEFORE + PARTITIONS))
    sealed = [agent.seal(img, time.time_ns()) for img in images]
    keys = mac_keys(keystore)

    def batches() -> dict[str, int]:
        out: dict[str, int] = {}
        for m in read_topic(bootstrap, topics.TILE_FEATURES):
            b = TileBatch.from_wire(m.value, keys)
            out[b.frame_id] = out.get(b.frame_id, 0) + 1
        return out

    children = Children()
    producer = clients.producer(bootstrap)
    try:
        port1 = start_processor(children, env, tmp_path, "processor-1")
        for i, (h, blob) in enumerate(sealed[:FRAMES_BEFORE]):
            producer.send(topics.FRAMES, key=h.frame_id.encode(), value=blob, partition=i % PARTITIONS)
        producer.flush(30)
        wait_for(lambda: metric(port1, "tilestream_processor_frames_total") >= FRAMES_BEFORE, 120,
                 "the first worker processing every frame")
        # The precondition that makes this test able to fail: nothing of it committed yet.
        assert not committed_everything(bootstrap, group, topics.FRAMES)

        port2 = start_processor(children, env, tmp_path, "processor-2")
        wait_for(lambda: healthz(port2).get("assigned_partitions", 0) > 0
                 and healthz(port1).get("assigned_partitions", 0) < 2 * PARTITIONS, 120,
                 "the partitions shared between the two workers")
        for p, (h, blob) in enumerate(sealed[FRAMES_BEFORE:]):
            producer.send(topics.FRAMES, key=h.frame_id.encode(), value=blob, partition=p)
        producer.flush(30)
        last = [h.frame_id for h, _ in sealed[FRAMES_BEFORE:]]
        wait_for(lambda: all(f in batches() for f in last), 120, "the frames sent after the rebalance processed")

        redelivered = sum(metric(p, "tilestream_processor_redeliveries_total") for p in (port1, port2))
        processed = sum(metric(p, "tilestream_processor_frames_total") for p in (port1, port2))
        waits = sum(metric(p, "tilestream_processor_frame_wait_seconds_count") for p in (port1, port2))
    finally:
        producer.close()
        children.stop_all()

    assert redelivered == 0, f"{redelivered:.0f} frames finished before the rebalance were processed again"
    assert processed == FRAMES_BEFORE + PARTITIONS
    assert waits == processed  # every frame's wait since the broker's append (frames: LogAppendTime)
    got = batches()
    assert sorted(got) == sorted(h.frame_id for h, _ in sealed) and set(got.values()) == {1}, got
