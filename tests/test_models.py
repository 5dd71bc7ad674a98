"""Model hot swap through the models topic, mid-stream, on the real broker."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request

import pytest

from classifier import registry
from classifier.model import ModelMismatch, TileModel
from classifier.results import tail
from classifier.train import train_scene_model
from edge_agent.agent import EdgeAgent
from tilestream.config import AgentSettings, FeatureConfig
from tilestream_cli.procs import Children, start_cloud_stages

from conftest import child_env, result_keys, wait_for

N_FRAMES = 80


@pytest.fixture(scope="module")
def second_model(tmp_path_factory, vtest_path):
    model = train_scene_model(str(vtest_path), FeatureConfig(), kind="logistic", max_frames=120, progress=print)
    return model.save(tmp_path_factory.mktemp("model2") / "scene2.skops")


def test_a_model_for_other_features_is_refused_before_publishing(kafka, keystore, scene_model):
    with pytest.raises(ModelMismatch, match="retrain"):
        registry.publish(kafka.bootstrap, scene_model, name="mismatch", expected_digest=FeatureConfig(tile_size=32).digest(),
                         keystore=keystore)
    watcher = registry.ModelWatcher(kafka.bootstrap, "mismatch", keys=keystore.model_release_public_keys())
    try:
        assert watcher.latest() == (0, None)
    finally:
        watcher.close()


@pytest.mark.kafka
def test_publishing_a_model_switches_the_running_classifier_without_losing_or_repeating_frames(
        kafka, keystore, scene_model, second_model, vtest_path, tmp_path):
    """Frames flow before, during and after the switch. Nothing here depends on how fast the machine is:
    the second half of the frames is sent only once the classifier itself says it switched."""
    bootstrap = kafka.bootstrap
    env = child_env(bootstrap, keystore.path, tmp_path / "home")
    first_id = TileModel.load(scene_model).model_id
    second_id = TileModel.load(second_model).model_id
    assert first_id != second_id
    children = Children()
    seen = []
    stop = threading.Event()

    def watch():
        for r in tail(bootstrap, keys=result_keys(keystore), from_beginning=True, stop=stop):
            seen.append(r)

    def send(n: int) -> EdgeAgent:
        agent = EdgeAgent(AgentSettings(camera_id="cam-test", source=str(vtest_path), max_frames=n, fps=10,
                                        realtime=True), keystore, bootstrap, 4 * 1024 * 1024, state_dir=tmp_path / "agent")
        return agent

    def model_version(port: int) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return json.loads(resp.read())["model_version"]

    half = N_FRAMES // 2
    try:
        stages = start_cloud_stages(children, env, tmp_path, scene_model)
        cls, port = stages.classifier, stages.metrics_port
        threading.Thread(target=watch, daemon=True).start()
        sender = threading.Thread(target=send(half).run, daemon=True)
        sender.start()
        wait_for(lambda: len(seen) >= 15, 120, "15 results from the first model")
        out = subprocess.run([sys.executable, "-m", "tilestream_cli", "models", "publish", str(second_model)], env=env,
                             capture_output=True, text=True, timeout=120)
        assert "as version 2" in out.stdout, out.stderr[-2000:]
        wait_for(lambda: model_version(port) == 2, 60, "the classifier to switch to version 2")
        sender.join(120)
        send(N_FRAMES - half).run()  # every one of these frames arrives after the switch
        wait_for(lambda: len({r.seq for r in seen}) >= N_FRAMES, 120, "a result for every frame")
        assert children.stop(cls, name="classifier") == 0
    finally:
        stop.set()
        children.stop_all()

    results = list(tail(bootstrap, keys=result_keys(keystore), from_beginning=True, idle_timeout_s=5))
    seqs = sorted(r.seq for r in results)
    assert len(seqs) == len(set(seqs)) == N_FRAMES, f"every frame exactly once, got {seqs}"
    first_run = [r for r in results if r.seq < half]   # the first agent run numbers 0..half-1
    later_run = [r for r in results if r.seq >= half]  # a new run starts a new block of seqs
    assert len(first_run) == half and len(later_run) == N_FRAMES - half
    assert min(first_run, key=lambda r: r.seq).model_id == first_id  # before the switch: the first model
    assert {(r.model_id, r.model_version) for r in later_run} == {(second_id, 2)}
    assert {(r.model_id, r.model_version) for r in results} == {(first_id, 1), (second_id, 2)}
