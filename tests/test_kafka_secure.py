"""The secured local Kafka (``tilestream kafka start --secure``) against a real broker.

One broker for the module, started through the CLI as an operator would. Every role is
checked against an explicit table of what it may and may not do (written out here, not
derived from deploy/kafka_security.py, so a wrong ACL table fails these tests).
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time

import pytest

from deploy.kafka_security import SecurityError, check_login
from deploy.local_kafka import DEFAULT_VERSION, LocalKafka, free_port

pytestmark = pytest.mark.kafka

TOPICS = ("frames", "tile-jobs", "tile-features", "results", "dead-letters", "heartbeats", "metrics", "models",
          "replay-marks")
# role -> topics it may write; every other topic must refuse it.
WRITES = {
    "agent": {"frames", "heartbeats"},
    "processor": {"tile-features", "tile-jobs", "dead-letters", "metrics", "replay-marks"},
    "classifier": {"results", "dead-letters", "metrics"},
    "dashboard": set(),
    "publisher": {"models"},
}
# role -> topics it may read.
READS = {
    "agent": {"frames"},
    "processor": {"frames", "tile-jobs", "replay-marks"},
    "classifier": {"tile-features", "models", "results"},
    "dashboard": {"results", "metrics", "heartbeats", "dead-letters"},
    "publisher": {"models"},
}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tilestream_cli", "kafka", *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    state = tmp_path_factory.mktemp("kafka-secure")
    port, cport, iport = free_port(), free_port(), free_port()
    where = ["--port", str(port), "--controller-port", str(cport), "--state-dir", str(state)]
    try:
        started = cli("start", "--secure", "--internal-port", str(iport), *where)
        assert started.returncode == 0, started.stderr + started.stdout
        lk = LocalKafka(DEFAULT_VERSION, port=port, controller_port=cport, state_dir=state, progress=print)
        assert lk.secure and lk.internal_port == iport  # the mode comes from the state dir
        lk.cli_output = started.stdout + started.stderr
        # One record on partition 0 of every topic, so that a permitted read has something to return.
        from kafka import KafkaProducer

        p = KafkaProducer(**lk.client_config("admin"), acks="all")
        try:
            for t in TOPICS:
                p.send(t, key=b"k", value=b"seed", partition=0).get(timeout=30)
        finally:
            p.close()
        yield lk
    finally:
        LocalKafka(DEFAULT_VERSION, port=port, controller_port=cport, state_dir=state, progress=print).stop()


def _producer(cfg: dict, **kw):
    from kafka import KafkaProducer

    return KafkaProducer(**cfg, acks="all", max_block_ms=15000, **kw)


def _write(producer, topic: str) -> None:
    producer.send(topic, key=b"k", value=b"v", partition=0).get(timeout=15)


def _read(cfg: dict, topic: str) -> list:
    """The records of partition 0 from offset 0, read with an assigned (group-less) consumer."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(**cfg, group_id=None, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        c.end_offsets([tp])
        c.seek(tp, 0)
        out: list = []
        deadline = time.monotonic() + 15
        while not out and time.monotonic() < deadline:
            for records in c.poll(timeout_ms=500).values():
                out.extend(records)
        return out
    finally:
        c.close()


def test_secrets_stay_private(secure):
    creds_path = secure.state_dir / "credentials.json"
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
    for key in ("ca.key", "node-1.keystore.pem"):
        assert stat.S_IMODE((secure.state_dir / "tls" / key).stat().st_mode) == 0o600
    creds = json.loads(creds_path.read_text())
    assert set(creds["roles"]) == {"admin", "agent", "processor", "classifier", "dashboard", "publisher"}
    assert len(set(creds["roles"].values())) == 6  # one random password each
    logs = secure.cli_output + "".join(p.read_text(errors="replace") for p in secure.state_dir.glob("*.log"))
    for password in creds["roles"].values():
        assert password not in logs
    assert not list(secure.state_dir.glob("*.args"))  # the format argfile is gone
    props = (secure.state_dir / "server.properties").read_text()
    for line in ("authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                 "allow.everyone.if.no.acl.found=false", "super.users=User:admin;User:CN=tilestream-broker",
                 "ssl.keystore.type=PEM", "listener.security.protocol.map=CLIENT:SASL_SSL,INTERNAL:SSL,CONTROLLER:SSL,MTLS:SSL"):
        assert line in props.splitlines()


def test_broker_certificate(secure):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (secure.state_dir / "tls" / "node-1.keystore.pem").read_bytes()
    cert, ca_in_chain = x509.load_pem_x509_certificates(pem)
    ca = x509.load_pem_x509_certificate(secure.ca_file.read_bytes())
    assert ca_in_chain == ca and cert.issuer == ca.subject
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert b"PRIVATE KEY" in pem and b"PRIVATE KEY" not in secure.ca_file.read_bytes()


def test_plaintext_client_is_refused(secure):
    with pytest.raises(SecurityError) as err:
        check_login({"bootstrap_servers": secure.bootstrap}, timeout_s=4)
    assert err.value.reason == "unreachable"


def test_internal_listener_needs_a_node_certificate(secure):
    # TLS that trusts the CA but has no client certificate: the SSL inter-broker listener refuses it.
    cfg = {"bootstrap_servers": f"127.0.0.1:{secure.internal_port}", "security_protocol": "SSL",
           "ssl_cafile": str(secure.ca_file)}
    with pytest.raises(SecurityError) as err:
        check_login(cfg, timeout_s=4)
    assert err.value.reason == "unreachable"
    with pytest.raises(SecurityError):  # nor does it speak SASL with the admin password
        check_login(dict(secure.client_config("admin"), bootstrap_servers=f"127.0.0.1:{secure.internal_port}"),
                    timeout_s=4)


def java_login(lk: LocalKafka, tmp_path, username: str, password: str) -> subprocess.CompletedProcess:
    """One login with Kafka's own Java admin client (ClusterTool cluster-id).

    kafka-python drops a response that arrives together with the connection close (its
    transport aborts on EOF before handing over the bytes read with it), and the broker
    closes right after a refused login: kafka-python then often sees a bare disconnect.
    The Java client reports the broker's refusal every time, so the tests use it to see
    *why* a login failed; ``check_login`` is the best-effort kafka-python view.
    """
    props = tmp_path / f"login-{username}.properties"
    props.touch(mode=0o600)
    props.write_text(
        "security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n"
        f"ssl.truststore.type=PEM\nssl.truststore.location={lk.ca_file}\n"
        "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{username}" password="{password}";\n'
    )
    return lk.tool("org.apache.kafka.tools.ClusterTool", "cluster-id", "--bootstrap-server", lk.bootstrap,
                   "--config", str(props), timeout_s=120)


def test_wrong_password_is_an_authentication_error(secure, tmp_path):
    check_login(secure.client_config("agent"))
    good = java_login(secure, tmp_path, "agent", secure.client_config("agent")["sasl_plain_password"])
    assert good.returncode == 0 and "Cluster ID:" in good.stdout, good.stdout + good.stderr
    bad = java_login(secure, tmp_path, "agent", "not-the-password")
    assert bad.returncode != 0
    assert "invalid credentials with SASL mechanism SCRAM-SHA-512" in bad.stdout + bad.stderr
    with pytest.raises(SecurityError) as err:  # kafka-python: refused either way, the reason when it sees it
        check_login(dict(secure.client_config("agent"), sasl_plain_password="not-the-password"), timeout_s=4)
    assert err.value.reason in ("authentication_failed", "unreachable")


@pytest.mark.parametrize("role", sorted(WRITES))
def test_writes_follow_the_role_table(secure, role):
    from kafka.errors import TopicAuthorizationFailedError

    # No idempotence here, so a refusal is about the topic, not about the cluster ACL.
    p = _producer(secure.client_config(role), enable_idempotence=False)
    try:
        for topic in TOPICS:
            if topic in WRITES[role]:
                _write(p, topic)
            else:
                with pytest.raises(TopicAuthorizationFailedError, match=topic):
                    _write(p, topic)
    finally:
        p.close()


@pytest.mark.parametrize("role", sorted(READS))
def test_reads_follow_the_role_table(secure, role):
    from kafka.errors import TopicAuthorizationFailedError

    cfg = secure.client_config(role)
    for topic in TOPICS:
        if topic in READS[role]:
            assert [r.value for r in _read(cfg, topic)][:1] == [b"seed"], (role, topic)
        else:
            with pytest.raises(TopicAuthorizationFailedError, match=topic):
                _read(cfg, topic)


def test_idempotent_producers_where_needed(secure):
    from kafka.errors import KafkaError

    for role in ("agent", "publisher"):  # the agent and `models publish` use enable_idempotence=True
        p = _producer(secure.client_config(role), enable_idempotence=True)
        try:
            _write(p, sorted(WRITES[role])[0])
        finally:
            p.close()
    p = _producer(secure.client_config("dashboard"), enable_idempotence=True)
    try:
        with pytest.raises(KafkaError, match="ClusterAuthorization"):
            _write(p, "results")
    finally:
        p.close()


def test_consumer_groups(secure):
    from kafka import KafkaConsumer
    from kafka.errors import GroupAuthorizationFailedError

    def join(role: str, group: str) -> None:
        c = KafkaConsumer(**secure.client_config(role), group_id=group, enable_auto_commit=False,
                          auto_offset_reset="earliest")
        try:
            c.subscribe([sorted(READS[role])[0]])
            deadline = time.monotonic() + 30
            while not c.assignment() and time.monotonic() < deadline:
                c.poll(timeout_ms=500)
            assert c.assignment(), f"{role} got no assignment in {group}"
            c.commit()
        finally:
            c.close()

    join("classifier", "tilestream-classifier")
    join("processor", "tilestream-processor")
    for role, group in (("classifier", "tilestream-processor"), ("agent", "tilestream-classifier"),
                        ("dashboard", "dashboard")):
        with pytest.raises(GroupAuthorizationFailedError):
            join(role, group)


def test_processor_owns_its_internal_topic_prefix(secure):
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAuthorizationFailedError

    admin = KafkaAdminClient(**secure.client_config("processor"))
    try:
        admin.create_topics([NewTopic("tilestream-processor-__assignor-__leader", 1, 1)])
        with pytest.raises(TopicAuthorizationFailedError):
            admin.create_topics([NewTopic("tilestream-classifier-evil", 1, 1)])
    finally:
        admin.close()
    _write_ok = _producer(secure.client_config("processor"))
    try:
        _write(_write_ok, "tilestream-processor-__assignor-__leader")
    finally:
        _write_ok.close()


def test_camera_enrol_and_revoke(secure, tmp_path):
    from kafka.errors import TopicAuthorizationFailedError

    cfg = secure.add_camera("cam-7")
    assert cfg["sasl_plain_username"] == "camera-cam-7" and cfg["security_protocol"] == "SASL_SSL"
    p = _producer(cfg, enable_idempotence=True)
    try:
        _write(p, "frames")
        _write(p, "heartbeats")
        with pytest.raises(TopicAuthorizationFailedError):
            _write(p, "results")
        assert secure.revoke_camera("cam-7") == 6  # the agent's six ACL rows, on this principal only
        # The open session loses its rights at once (ACLs are checked per request) ...
        with pytest.raises(TopicAuthorizationFailedError):
            _write(p, "frames")
    finally:
        p.close()
    # ... and the credential no longer logs in.
    refused = java_login(secure, tmp_path, cfg["sasl_plain_username"], cfg["sasl_plain_password"])
    assert refused.returncode != 0 and "invalid credentials" in refused.stdout + refused.stderr
    assert "cam-7" not in json.loads((secure.state_dir / "credentials.json").read_text())["cameras"]
    # The shared agent role is untouched by a camera's revocation.
    p = _producer(secure.client_config("agent"))
    try:
        _write(p, "frames")
    finally:
        p.close()


@pytest.mark.parametrize("bad", ["", "a,b", "x=y", "User:x", "a" * 65, "-lead", "cam 1"])
def test_camera_ids_are_bounded(secure, bad):
    with pytest.raises(SecurityError) as err:
        secure.add_camera(bad)
    assert err.value.reason == "bad_camera_id"
