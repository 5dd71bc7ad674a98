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

from conftest import child_env, metric, read_topic, result_keys, wait_for

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

        # Frozen past its 30 s session timeout (kafkaio.rdkafka.GROUP_TIMING): the coordinator evicts it
        # and the group is empty.
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


# -- commits never pass an unacknowledged output --------------------------------------------------
def test_acked_offsets_advance_only_past_batches_whose_outputs_and_predecessors_were_acked():
    from classifier.acks import AckedOffsets

    acks = AckedOffsets()
    a = acks.add(2, {0: 5})
    b = acks.add(1, {0: 7, 1: 3})
    c = acks.add(0, {0: 9, 1: 4})  # a poll with nothing to send: safe when b is, so merged into b
    assert c is b and acks.batches_waiting == 2
    assert acks.safe == {} and acks.unacked == 3
    acks.acked(b)  # a later batch acknowledged first: nothing before it is, so nothing is safe
    assert acks.safe == {}
    acks.acked(a)
    assert acks.safe == {}  # one output of the first batch still out
    acks.acked(a)
    assert acks.safe == {0: 9, 1: 4} and acks.unacked == 0 and acks.batches_waiting == 0  # a, b and c at once
    d = acks.add(1, {0: 12, 1: 6})
    acks.add(0, {0: 13, 1: 6})
    acks.forget({1})  # partition 1 revoked: no offset of it from before is committed later
    assert acks.safe == {0: 9}
    acks.acked(d)
    assert acks.safe == {0: 13}
    with pytest.raises(ValueError):
        acks.acked(d)
    assert acks.add(0, {0: 14}).remaining == 0 and acks.safe == {0: 14}  # nothing waiting: safe at once


class _Frame:
    camera_id, capture_ns, width, height = "cam-acks", 1_000, 128, 64

    def __init__(self, seq: int):
        self.seq, self.frame_id = seq, f"cam-acks/{seq}"


def _small_model():
    import numpy as np

    from classifier.model import TileModel
    from tilestream.config import FeatureConfig

    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (60, 8)), rng.normal(3, 1, (60, 8))]).astype(np.float32)
    return TileModel.train(X, np.array(["background"] * 60 + ["person"] * 60), FeatureConfig(), kind="logistic")


def _tile_batch(model, seq: int, mac) -> bytes:
    import numpy as np

    from stream_processor.tiling import Tile
    from tilestream.records import TileBatch

    tiles = [(Tile(i, 64 * i, 0, 64, 64), np.full(8, float(i), np.float32)) for i in (0, 1)]
    return TileBatch.make(_Frame(seq), 2, tiles, model.feature_config.digest(), 2_000).to_wire(*mac)


def _committed(bootstrap: str, group: str, partition: int) -> int:
    from tilestream import topics

    admin = clients.admin(bootstrap)
    try:
        got = admin.list_group_offsets({group: None}).get(group, {})
    except Exception:  # noqa: BLE001 - no coordinator yet (a fresh broker): nothing committed
        return -1
    finally:
        admin.close()
    return next((om.offset for tp, om in got.items() if tp.topic == topics.TILE_FEATURES and tp.partition == partition),
                -1)


def _results_max_bytes(bootstrap: str, value: str | None) -> None:
    from kafka.admin import AlterConfigOp, ConfigResource, ConfigResourceType

    from tilestream import topics

    op = (AlterConfigOp.SET, value) if value is not None else (AlterConfigOp.DELETE, None)
    admin = clients.admin(bootstrap)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topics.RESULTS,
                                            configs={"max.message.bytes": op})])
    finally:
        admin.close()


@pytest.mark.kafka
def test_offsets_are_never_committed_past_a_result_kafka_did_not_acknowledge(kafka, keystore):
    """The loop polls on while results are in flight; a result the broker refuses (here: the
    results topic takes no record this large) stops the service, the committed offset stays
    before its tile although a later record's dead letter was acknowledged, and a restart
    answers the frame (re-emitted, not lost)."""
    from kafka import KafkaProducer

    from tilestream import topics
    from tilestream.records import DeadLetter
    from tilestream.stagekeys import StageKeys

    from classifier.service import SendFailed

    bootstrap, group = kafka.bootstrap, "acked-commits"
    stage = StageKeys(keystore.path)
    mac, model = stage.mac_keys().current(), _small_model()

    def service() -> ClassifierService:
        return ClassifierService(bootstrap, FrameClassifier(model, Metrics("t"), keys=stage.for_classifier()), group,
                                 metrics_interval_s=3600)

    errors: list[BaseException] = []

    def run(svc: ClassifierService) -> threading.Thread:
        def target():
            try:
                svc.run()
            except BaseException as exc:  # noqa: BLE001 - what the test looks at
                errors.append(exc)
        t = threading.Thread(target=target, daemon=True)
        t.start()
        return t

    producer = KafkaProducer(bootstrap_servers=bootstrap)

    def send(value: bytes) -> int:
        return producer.send(topics.TILE_FEATURES, value=value, partition=0).get(timeout=30).offset

    svc = run_thread = None
    try:
        svc = service()
        run_thread = run(svc)
        first = send(_tile_batch(model, 1, mac))
        wait_for(lambda: _committed(bootstrap, group, 0) == first + 1, 60, "the first frame's offset committed")
        _results_max_bytes(bootstrap, "256")  # a signed result is a few KB: refused from now on

        def refused() -> bool:
            probe = KafkaProducer(bootstrap_servers=bootstrap)  # a refusal ends a producer: one per probe
            try:
                probe.send(topics.RESULTS, value=b"x" * 4096).get(timeout=10)
                return False  # the new limit has not reached the broker yet
            except Exception:  # noqa: BLE001 - MessageSizeTooLarge: it has
                return True
            finally:
                probe.close(timeout=5)
        wait_for(refused, 30, "the results topic to refuse large records")
        second = send(_tile_batch(model, 2, mac))
        garbage = send(b"not a tile batch")  # a dead letter, acknowledged after the refused result
        wait_for(lambda: not run_thread.is_alive(), 120, "the service to stop on the result it could not send")
        assert len(errors) == 1 and isinstance(errors[0], SendFailed), errors
        assert svc.metrics.counter("send_errors_total", topic=topics.RESULTS) >= 3
        letters = [DeadLetter.from_json(m.value) for m in read_topic(bootstrap, topics.DEAD_LETTERS)]
        assert any(d.source_offset == garbage and d.reason == "bad_mac" for d in letters), letters
        assert _committed(bootstrap, group, 0) == first + 1 == second, "committed past an unacknowledged result"

        _results_max_bytes(bootstrap, None)  # back to the default; a restart answers frame 2
        errors.clear()
        svc = service()
        run_thread = run(svc)
        wait_for(lambda: _committed(bootstrap, group, 0) == garbage + 1, 60, "the restart to commit past both")
        seqs = [r.seq for r in tail(bootstrap, keys=result_keys(keystore), from_beginning=True, idle_timeout_s=3)
                if r.camera_id == "cam-acks"]
        assert sorted(seqs) == [1, 2], seqs
        assert not errors
    finally:
        _results_max_bytes(bootstrap, None)
        producer.close()
        if svc is not None:
            svc.stop()
        if run_thread is not None:
            run_thread.join(30)
