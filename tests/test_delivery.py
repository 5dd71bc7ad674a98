"""Delivery under failure, on the real broker: workers are SIGKILLed mid-stream.

Two processor workers share the frames; one is killed with SIGKILL while frames flow; later the
classifier is killed with SIGKILL and a new one started. Afterwards every frame has all its
tile features on `tile-features` and exactly one result on `results`.
"""

from __future__ import annotations

import signal
import threading

import pytest

from classifier.results import tail
from deploy.local_kafka import free_port
from edge_agent.agent import EdgeAgent
from stream_processor.tiling import tile_grid
from tilestream import topics
from tilestream.config import AgentSettings
from tilestream_cli.procs import Children, start_cloud_stages
from tilestream.records import TileBatch

from conftest import child_env, mac_keys, metric, read_topic, result_keys, wait_for

N_FRAMES = 150
CAMERA = "cam-delivery"  # its own camera: the session broker is shared with other tests


def frames_done(port: int) -> float:
    return metric(port, "tilestream_processor_frames_total")


@pytest.mark.kafka
def test_sigkill_of_a_processor_and_of_the_classifier_loses_and_repeats_nothing(kafka, keystore, scene_model, vtest_path, tmp_path):
    bootstrap = kafka.bootstrap
    keystore.enroll(CAMERA)
    env = child_env(bootstrap, keystore.path, tmp_path / "home")
    env["TILESTREAM_PROCESSOR_APP_ID"] = "delivery-test"
    env["TILESTREAM_CLASSIFIER_GROUP_ID"] = "delivery-test-classifier"
    children = Children()
    seen: dict[int, int] = {}
    stop_tail = threading.Event()

    def watch():
        for r in tail(bootstrap, keys=result_keys(keystore), from_beginning=True, stop=stop_tail):
            if r.camera_id == CAMERA:
                seen[r.seq] = seen.get(r.seq, 0) + 1

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        stages = start_cloud_stages(children, env, tmp_path, scene_model, workers=2)
        ports, workers, cls = stages.worker_ports, stages.workers, stages.classifier
        watcher.start()

        agent = EdgeAgent(
            AgentSettings(camera_id=CAMERA, source=str(vtest_path), max_frames=N_FRAMES, fps=25.0, realtime=True),
            keystore, bootstrap, max_frame_bytes=4 * 1024 * 1024, state_dir=tmp_path / "agent",
        )
        sender = threading.Thread(target=agent.run, daemon=True)
        sender.start()

        wait_for(lambda: len(seen) >= 20, 120, "20 results before killing a processor worker")
        # Kill a worker that is really processing frames (it owns some of the partitions).
        def busy_worker():
            for i, port in enumerate(ports):
                if frames_done(port) >= 5:
                    return (i,)
            return None

        (victim,) = wait_for(busy_worker, 60, "a worker that has processed frames")
        workers[victim].send_signal(signal.SIGKILL)
        workers[victim].wait(10)

        wait_for(lambda: len(seen) >= 60, 120, "60 results before killing the classifier")
        cls.send_signal(signal.SIGKILL)
        cls.wait(10)
        metrics_port2 = free_port()
        cls2 = children.start("classifier-2", ["classify", "--model", str(scene_model), "--metrics-port", str(metrics_port2)], env)

        sender.join(120)
        assert agent.counters.sent == N_FRAMES
        wait_for(lambda: len(seen) >= N_FRAMES, 180, f"results for all {N_FRAMES} frames")
        # Stop the second classifier cleanly, then read the whole results topic: any repeat is there.
        assert children.stop(cls2, name="classifier-2") == 0
    finally:
        stop_tail.set()
        children.stop_all()

    results = [r for r in tail(bootstrap, keys=result_keys(keystore), from_beginning=True, idle_timeout_s=5) if r.camera_id == CAMERA]
    per_seq: dict[int, int] = {}
    for r in results:
        per_seq[r.seq] = per_seq.get(r.seq, 0) + 1
    repeated = {s: n for s, n in per_seq.items() if n > 1}
    assert not repeated, f"frames answered more than once: {repeated}"
    assert sorted(per_seq) == list(range(N_FRAMES))
    n_tiles = len(tile_grid(576, 768, 64, 0, "pad"))
    assert all(r.complete and len(r.tiles) == n_tiles for r in results)

    records = [t for m in read_topic(bootstrap, topics.TILE_FEATURES) for t in TileBatch.from_wire(m.value, mac_keys(keystore)).split()]
    tiles = {(t.frame_id, t.tile_index) for t in records if t.camera_id == CAMERA}
    print(f"tile records {len(records)}, distinct {len(tiles)} (the difference was redelivered after the SIGKILL)")
    assert tiles == {(f"{CAMERA}/{s}", i) for s in range(N_FRAMES) for i in range(n_tiles)}
