"""`tilestream kafka start|status|stop` as a user runs it, against the real jars."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from deploy.local_kafka import DEFAULT_VERSION, KafkaError, LocalKafka, free_port
from tilestream.config import KafkaSettings
from tilestream.topics import pipeline_topics


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tilestream_cli", "kafka", *args], capture_output=True, text=True, timeout=180)


@pytest.mark.kafka
def test_start_status_reuse_stop(tmp_path):
    port, cport = free_port(), free_port()
    where = ["--port", str(port), "--controller-port", str(cport), "--state-dir", str(tmp_path / "k")]
    try:
        down = cli("status", *where)
        assert down.returncode == 3 and "down" in down.stdout

        started = cli("start", *where)
        assert started.returncode == 0, started.stderr + started.stdout
        assert f"bootstrap: 127.0.0.1:{port}" in started.stdout
        names = ", ".join(t.name for t in pipeline_topics(KafkaSettings()))
        assert f"created topics: {names}" in started.stdout
        assert "frames" in names and "results" in names and "dead-letters" in names

        status = cli("status", *where)
        assert status.returncode == 0
        assert f"up: Apache Kafka {DEFAULT_VERSION} at 127.0.0.1:{port}" in status.stdout
        assert str(tmp_path / "k" / "broker.log") in status.stdout
        assert "Kafka Server started" in (tmp_path / "k" / "broker.log").read_text()

        again = cli("start", *where)
        assert again.returncode == 0 and "reusing Apache Kafka" in again.stdout

        # The topics have the partition counts and configs the pipeline relies on.
        from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        try:
            desc = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(["frames", "results"])}
            assert desc == {"frames": 6, "results": 3}
            cfg = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, "frames")])["topic"]["frames"]
            assert cfg["message.timestamp.type"]["value"] == "LogAppendTime"
        finally:
            admin.close()

        stopped = cli("stop", *where)
        assert stopped.returncode == 0 and "stopped Apache Kafka" in stopped.stdout
        assert cli("status", *where).returncode == 3
    finally:
        LocalKafka(DEFAULT_VERSION, port=port, controller_port=cport, state_dir=tmp_path / "k").stop()


@pytest.mark.kafka
def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        lk = LocalKafka(DEFAULT_VERSION, port=busy, controller_port=free_port(), state_dir=tmp_path / "k", progress=lambda m: None)
        with pytest.raises(KafkaError, match=f"127.0.0.1:{busy} is already in use"):
            lk.start(topics=[])
    assert lk.status() is None


def test_cluster_and_secure_options_are_checked_before_anything_starts(tmp_path):
    from deploy.local_kafka import cluster_hosts

    assert cluster_hosts("127.0.0.1", 3) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert cluster_hosts("127.0.0.1", 1) == ["127.0.0.1"]
    with pytest.raises(KafkaError, match="loopback"):
        cluster_hosts("127.255.255.254", 3)
    with pytest.raises(KafkaError, match="brokers must be 1..9"):
        LocalKafka(DEFAULT_VERSION, state_dir=tmp_path / "z", brokers=0)
    # A state dir keeps its mode: asking it for another one is a clear error, and a plain
    # LocalKafka on it takes the recorded mode.
    state = tmp_path / "k"
    state.mkdir()
    (state / "layout.json").write_text('{"brokers": 3, "secure": false, "internal_port": null}')
    assert LocalKafka(DEFAULT_VERSION, state_dir=state).brokers == 3
    lk = LocalKafka(DEFAULT_VERSION, port=free_port(), controller_port=free_port(), state_dir=state, brokers=1,
                    progress=lambda m: None)
    with pytest.raises(KafkaError, match="holds a 3-node PLAINTEXT Kafka"):
        lk.start(topics=[])
    assert lk.status() is None


def test_cluster_status_when_down(tmp_path):
    state = tmp_path / "k"
    where = ["--port", str(free_port()), "--controller-port", str(free_port()), "--state-dir", str(state)]
    down = cli("status", "--brokers", "3", *where)
    assert down.returncode == 3 and "down" in down.stdout
    bad = cli("status", "--brokers", "12", *where)
    assert bad.returncode == 1 and "brokers must be 1..9" in bad.stderr
