"""The 3-node local Kafka cluster (``tilestream kafka start --brokers 3``) against real brokers.

One cluster for the module (three JVMs on 127.0.0.1-3), started through the CLI; single nodes
are SIGKILLed / SIGSTOPped / restarted through ``LocalKafka``. The property under test is the
one min.insync.replicas=2 with acks=all promises: with one node gone, writes go on, and every
record the cluster acknowledged is still there afterwards.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

from deploy.local_kafka import DEFAULT_VERSION, LocalKafka, cluster_hosts, free_port_on
from tests.conftest import wait_for
from tilestream.config import KafkaSettings
from kafkaio.clients import ensure_topics
from tilestream.topics import TopicSpec, pipeline_topics

pytestmark = pytest.mark.kafka


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tilestream_cli", "kafka", *args], capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("kafka-cluster")
    hosts = cluster_hosts("127.0.0.1", 3)
    port, cport = free_port_on(hosts), free_port_on(hosts)
    where = ["--port", str(port), "--controller-port", str(cport), "--state-dir", str(state)]
    try:
        started = cli("start", "--brokers", "3", *where)
        assert started.returncode == 0, started.stderr + started.stdout
        lk = LocalKafka(DEFAULT_VERSION, port=port, controller_port=cport, state_dir=state, progress=print)
        assert lk.brokers == 3  # the layout comes from the state dir
        lk.cli_output = started.stdout
        lk.cli_where = where
        yield lk
    finally:
        LocalKafka(DEFAULT_VERSION, port=port, controller_port=cport, state_dir=state, progress=print).stop(timeout_s=30)


def test_three_nodes_each_on_its_own_address(cluster):
    port = cluster.port
    assert cluster.bootstrap == f"127.0.0.1:{port},127.0.0.2:{port},127.0.0.3:{port}"
    assert f"bootstrap: {cluster.bootstrap}" in cluster.cli_output
    pids = cluster.node_pids()
    assert sorted(pids) == [1, 2, 3] and len(set(pids.values())) == 3
    status = cli("status", *cluster.cli_where)
    assert status.returncode == 0, status.stderr
    for i in (1, 2, 3):
        node_dir = cluster.state_dir / f"node-{i}"
        assert f"node {i}: up at 127.0.0.{i}:{port} (pid {pids[i]})" in status.stdout
        props = (node_dir / "server.properties").read_text().splitlines()
        assert f"node.id={i}" in props
        assert f"listeners=PLAINTEXT://127.0.0.{i}:{port},CONTROLLER://127.0.0.{i}:{cluster.controller_port}" in props
        cp = cluster.controller_port
        assert f"controller.quorum.voters=1@127.0.0.1:{cp},2@127.0.0.2:{cp},3@127.0.0.3:{cp}" in props
        assert "Kafka Server started" in (node_dir / "broker.log").read_text()
        assert (node_dir / "data" / "meta.properties").exists()
    assert cluster.active_controller() in (1, 2, 3)


def test_pipeline_topics_have_three_replicas_and_min_isr_two(cluster):
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    names = [t.name for t in pipeline_topics(KafkaSettings())]
    admin = KafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    try:
        for t in admin.describe_topics(names):
            for p in t["partitions"]:
                assert sorted(p["replica_nodes"]) == [1, 2, 3], (t["name"], p)
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])["topic"]
        assert {n: configs[n]["min.insync.replicas"]["value"] for n in names} == {n: "2" for n in names}
    finally:
        admin.close()
    with pytest.raises(ValueError):
        ensure_topics(cluster.bootstrap, [TopicSpec("bad", 1)], replication=3, min_insync_replicas=4)


def _produce(bootstrap: str, topic: str, values: list[bytes], timeout_s: float) -> list[bytes]:
    """Send ``values`` with acks=all (idempotent); return those the cluster acknowledged."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                      request_timeout_ms=10000, delivery_timeout_ms=int(timeout_s * 1000), retry_backoff_ms=200)
    acked = []
    try:
        futures = [(v, p.send(topic, value=v, partition=0)) for v in values]
        for v, f in futures:
            try:
                f.get(timeout=timeout_s)
                acked.append(v)
            except Exception:  # noqa: BLE001 - counted below: the test asserts on what was acknowledged
                pass
    finally:
        p.close(timeout=10)
    return acked


def _read_all(bootstrap: str, topic: str) -> list[bytes]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        end = c.end_offsets([tp])[tp]
        c.seek(tp, 0)
        out: list[bytes] = []

        def done():
            for records in c.poll(timeout_ms=500).values():
                out.extend(r.value for r in records)
            return c.position(tp) >= end

        wait_for(done, 60, f"reading {end} records of {topic}")
        return out
    finally:
        c.close()


def test_sigkill_of_the_leader_loses_no_acknowledged_record(cluster):
    topic = "durable-kill"
    ensure_topics(cluster.bootstrap, [TopicSpec(topic, 1)], replication=3, min_insync_replicas=2)
    wait_for(lambda: len(cluster.partition_state(topic, 0)["isr"]) == 3, 60, f"{topic} fully replicated")
    leader = cluster.leader_of(topic, 0)
    before = [f"before-{i}".encode() for i in range(300)]
    after = [f"after-{i}".encode() for i in range(300)]
    try:
        assert _produce(cluster.bootstrap, topic, before, 60) == before
        # Kill the leader while a second producer is mid-stream.
        acked_after: list[bytes] = []
        t = threading.Thread(target=lambda: acked_after.extend(_produce(cluster.bootstrap, topic, after, 90)))
        t.start()
        cluster.kill_node(leader, signal.SIGKILL)
        t.join(timeout=150)
        assert not t.is_alive()
        assert leader not in cluster.node_pids()
        # Writes went on: with two of three in sync, min.insync.replicas=2 is met.
        assert acked_after == after
        state = wait_for(lambda: (s := cluster.partition_state(topic, 0))["leader"] not in (-1, leader) and s,
                         60, "a new leader")
        assert leader not in state["isr"]
        assert _produce(cluster.bootstrap, topic, [b"with-two"], 60) == [b"with-two"]
        read = _read_all(cluster.bootstrap, topic)
        # Nothing acknowledged is lost, nothing is duplicated (idempotent producer), order kept.
        assert read == before + acked_after + [b"with-two"]
    finally:
        cluster.start_node(leader)
    wait_for(lambda: len(cluster.partition_state(topic, 0)["isr"]) == 3, 90, f"node {leader} back in the ISR")
    assert len(cluster.node_pids()) == 3


# It failed once with a busy core on races of the harness, not of Kafka: answering_bootstrap() still
# listed the node right after SIGSTOP, and partition_state() asked a node that did not know the new
# topic yet. LocalKafka now waits for the stop, probes each node with a deadline and asks again.
def test_sigstopped_follower_leaves_the_isr_and_writes_go_on(cluster):
    topic = "durable-stop"
    ensure_topics(cluster.bootstrap, [TopicSpec(topic, 1)], replication=3, min_insync_replicas=2)
    wait_for(lambda: len(cluster.partition_state(topic, 0)["isr"]) == 3, 60, f"{topic} fully replicated")
    state = cluster.partition_state(topic, 0)
    follower = next(r for r in state["replicas"] if r != state["leader"])
    cluster.kill_node(follower, signal.SIGSTOP)
    try:
        # A frozen node still accepts TCP connections: a client bootstrapping from it would
        # wait out its request timeout, so clients get the nodes that answer.
        live = cluster.answering_bootstrap()
        assert live.count(",") == 1 and f"127.0.0.{follower}:" not in live
        # acks=all waits for the frozen follower until it leaves the ISR: in KRaft the controller
        # fences a broker whose heartbeats stop for broker.session.timeout.ms (9 s), else the
        # leader drops it after replica.lag.time.max.ms (30 s); then the two others satisfy
        # min.insync.replicas=2.
        assert _produce(live, topic, [b"during-stop"], 120) == [b"during-stop"]
        assert follower not in cluster.partition_state(topic, 0)["isr"]
        assert follower in cluster.node_pids()  # frozen, not dead
    finally:
        cluster.kill_node(follower, signal.SIGCONT)
    wait_for(lambda: len(cluster.partition_state(topic, 0)["isr"]) == 3, 90, f"node {follower} back in the ISR")
    assert _read_all(cluster.bootstrap, topic) == [b"during-stop"]
