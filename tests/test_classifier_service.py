"""The classifier service on the real broker: it keeps answering after being evicted from its group
(a process frozen past its session timeout, as a stalled VM or a starved machine would be), and its
/healthz judges it by what it does, not by whether its thread is alive."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.error
import urllib.request

import pytest

from classifier.results import tail
from kafkaio import clients
from classifier.service import ClassifierService
from classifier.stage import FrameClassifier
from edge_agent.agent import EdgeAgent
from tilestream.config import AgentSettings
from tilestream.metrics import Liveness, Metrics
from tilestream_cli.procs import Children, start_cloud_stages

from conftest import child_env, metric, result_keys, wait_for

CAMERA = "cam-evicted"
GROUP = "evicted-classifier"


def healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.kafka
def test_an_evicted_classifier_rejoins_by_itself_and_answers_every_frame_once(kafka, keystore, scene_model, vtest_path,
                                                                              tmp_path):
    bootstrap = kafka.bootstrap
    keystore.enroll(CAMERA)
    env = child_env(bootstrap, keystore.path, tmp_path / "home")
    env["TILESTREAM_CLASSIFIER_GROUP_ID"] = GROUP
    children = Children()
    seen: dict[int, int] = {}
    stop = threading.Event()

    def watch():
        for r in tail(bootstrap, keys=result_keys(keystore), from_beginning=True, stop=stop):
            if r.camera_id == CAMERA:
                seen[r.seq] = seen.get(r.seq, 0) + 1

    def send(n: int) -> None:  # seqs continue from the agent's state dir (a new run starts a new block)
        agent = EdgeAgent(AgentSettings(camera_id=CAMERA, source=str(vtest_path), max_frames=n),
                          keystore, bootstrap, 4 * 1024 * 1024, state_dir=tmp_path / "agent")
        assert agent.run().send_errors == 0

    def group_state() -> str:
        admin = clients.admin(bootstrap)
        try:
            g = admin.describe_groups([GROUP])[GROUP]
            return g.get("group_state") or g.get("state") or ""
        finally:
            admin.close()

    try:
        stages = start_cloud_stages(children, env, tmp_path, scene_model)
        cls, port = stages.classifier, stages.metrics_port
        threading.Thread(target=watch, daemon=True).start()
        send(10)
        wait_for(lambda: len(seen) >= 10, 120, "results for the first 10 frames")
        assert healthz(port)[0] == 200
        rebalances = metric(port, "tilestream_classifier_rebalances_total")

        # Frozen past its 10 s session timeout: the coordinator evicts it and the group is empty.
        os.kill(cls.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: group_state() == "Empty", 90, "the frozen classifier to be evicted", interval_s=1.0)
            send(10)  # frames that arrive while the only member is gone
        finally:
            os.kill(cls.pid, signal.SIGCONT)
        wait_for(lambda: len(seen) >= 20, 120, "results for the frames sent while it was evicted")
        wait_for(lambda: metric(port, "tilestream_classifier_rebalances_total") > rebalances, 60,
                 "the rejoin to show in rebalances_total")
        wait_for(lambda: healthz(port)[0] == 200, 30, "/healthz ok after the rejoin")
        assert children.stop(cls, name="classifier") == 0
    finally:
        stop.set()
        children.stop_all()
    final = [r.seq for r in tail(bootstrap, keys=result_keys(keystore), from_beginning=True, idle_timeout_s=5) if r.camera_id == CAMERA]
    assert len(final) == len(set(final)) == 20, f"exactly one result per frame, got seqs {sorted(final)}"


def test_health_reports_a_stage_that_makes_no_progress(scene_model, keystore):
    from classifier.model import TileModel
    from tilestream.stagekeys import StageKeys

    svc = ClassifierService("127.0.0.1:1", FrameClassifier(TileModel.load(scene_model), Metrics("t"),
                                                           keys=StageKeys(keystore.path).for_classifier()), "g",
                            stall_after_s=30)
    clock = [1000.0]
    svc.liveness = Liveness(30, clock=lambda: clock[0])  # the service's judge, on a clock the test moves
    svc.assigned = {0, 1}
    svc.liveness.holds(2)
    assert svc.health()["status"] == "ok"
    svc.lag = {0: 0, 1: 0}
    clock[0] += 100  # idle with nothing to read: fine
    svc.liveness.turned()
    assert svc.health()["status"] == "ok"
    svc.lag = {0: 12}  # records waiting, none read for 100 s
    h = svc.health()
    assert h["status"] == "stalled" and "12 records wait" in h["problems"][0] and h["seconds_since_record"] == 100
    svc.lag, svc.assigned = {}, set()  # evicted ...
    svc.liveness.holds(0)
    clock[0] += 100  # ... and not rejoining
    svc.liveness.turned()
    assert "no partition assigned" in svc.health()["problems"][0]
    svc.assigned = {0}
    svc.liveness.holds(1)
    assert svc.health()["status"] == "ok"  # rejoined
    clock[0] += 100  # the loop itself stopped turning
    assert "has not turned" in svc.health()["problems"][0]
