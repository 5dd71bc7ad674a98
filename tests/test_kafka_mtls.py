"""Mutual TLS on the secured local Kafka: clients authenticated by certificate alone.

One secured broker for the module (``LocalKafka(secure=True)``), whose MTLS listener requires a
client certificate from the local CA and maps ``CN=<name>,OU=tilestream-clients`` to
``User:<name>`` (deploy/kafka_security.py), so the role ACLs of the SCRAM principals apply
unchanged. Every client kind of the project connects there with a certificate and nothing else:
librdkafka (the agent's producer, with the camera's certificate and key handed over in memory),
kafka-python (the agent's reconciliation consumer, the admin client), Faust
(the processor, through ``stream_processor.app.faust_broker``), aiokafka (the classifier, the
dashboard's feed, ``results tail``). Refused: no certificate, a certificate of another CA, a
node certificate, a revoked camera's certificate.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from deploy.kafka_security import MTLS_PRINCIPAL_RULES, SecurityError, _ca, check_login, client_cert_files
from deploy.local_kafka import DEFAULT_VERSION, LocalKafka, free_port
from kafkaio import Connection
from kafkaio.connection import PASSWORD_ENV
from tilestream_cli.procs import Children, wait_http

from conftest import read_topic, result_keys, wait_for

pytestmark = pytest.mark.kafka
N_FRAMES = 8


@pytest.fixture(scope="module")
def mtls_kafka(tmp_path_factory):
    lk = LocalKafka(DEFAULT_VERSION, "127.0.0.1", free_port(), free_port(), state_dir=tmp_path_factory.mktemp("kmtls"),
                    progress=print, secure=True, internal_port=free_port(), mtls_port=free_port())
    try:
        lk.start()
        yield lk
    finally:
        lk.stop()


def _producer(cfg: dict, **kw):
    from kafka import KafkaProducer

    return KafkaProducer(**cfg, acks="all", max_block_ms=15000, **kw)


def _write(producer, topic: str) -> None:
    producer.send(topic, key=b"k", value=b"v", partition=0).get(timeout=15)


def test_the_mtls_listener_requires_client_certificates_and_maps_their_cn(mtls_kafka):
    lk = mtls_kafka
    props = (lk.state_dir / "server.properties").read_text().splitlines()
    assert f"listeners=CLIENT://127.0.0.1:{lk.port},INTERNAL://127.0.0.1:{lk.internal_port}," \
           f"CONTROLLER://127.0.0.1:{lk.controller_port},MTLS://127.0.0.1:{lk.mtls_port}" in props
    assert "listener.security.protocol.map=CLIENT:SASL_SSL,INTERNAL:SSL,CONTROLLER:SSL,MTLS:SSL" in props
    assert "listener.name.mtls.ssl.client.auth=required" in props
    assert f"listener.name.mtls.ssl.principal.mapping.rules={MTLS_PRINCIPAL_RULES}" in props
    assert json.loads((lk.state_dir / "layout.json").read_text())["mtls_port"] == lk.mtls_port

    from cryptography import x509

    cfg = lk.client_config("processor", tls=True)
    assert cfg["security_protocol"] == "SSL" and cfg["bootstrap_servers"] == f"127.0.0.1:{lk.mtls_port}"
    cert = x509.load_pem_x509_certificates(open(cfg["ssl_certfile"], "rb").read())[0]
    assert cert.subject.rfc4514_string() == "CN=processor,OU=tilestream-clients"
    assert stat.S_IMODE(os.stat(cfg["ssl_keyfile"]).st_mode) == 0o600
    assert b"PRIVATE KEY" not in open(cfg["ssl_certfile"], "rb").read()


@pytest.mark.parametrize("role,allowed,refused", [
    ("agent", "frames", "results"),
    ("classifier", "results", "models"),
    ("publisher", "models", "frames"),
])
def test_a_role_certificate_is_that_role_under_the_same_acls(mtls_kafka, role, allowed, refused):
    from kafka.errors import TopicAuthorizationFailedError

    p = _producer(mtls_kafka.client_config(role, tls=True), enable_idempotence=False)
    try:
        _write(p, allowed)
        with pytest.raises(TopicAuthorizationFailedError, match=refused):
            _write(p, refused)
    finally:
        p.close()
    # kafka-python's group-less consumer (the agent's reconciliation reads frames this way)
    if role == "agent":
        records = read_topic(mtls_kafka.connection("agent", tls=True), "frames")
        assert any(r.value == b"v" for r in records)


def test_the_faust_ssl_context_carries_the_client_certificate(mtls_kafka):
    """The very context ``faust_broker`` hands Faust logs in on the listener that requires a certificate."""
    from kafka.admin import KafkaAdminClient

    from stream_processor.app import faust_broker

    conn = mtls_kafka.connection("processor", tls=True)
    creds = faust_broker(conn)["broker_credentials"]
    assert conn.tls and not conn.sasl and creds.protocol.name == "SSL"
    admin = KafkaAdminClient(bootstrap_servers=conn.bootstrap, security_protocol="SSL", ssl_context=creds.context,
                             request_timeout_ms=15000)
    try:
        assert admin.describe_cluster()["brokers"]
    finally:
        admin.close()
    # The same without the certificate is refused (below): so it is the certificate that got in.


def test_refused_without_a_certificate_with_another_cas_or_a_node_certificate(mtls_kafka, tmp_path):
    lk = mtls_kafka
    good = lk.client_config("dashboard", tls=True)
    check_login(good)  # the positive control: the same settings with the right certificate
    no_cert = {k: v for k, v in good.items() if k not in ("ssl_certfile", "ssl_keyfile")}
    other_ca = tmp_path / "other-ca"
    _ca(other_ca)
    stranger_cert, stranger_key = client_cert_files(other_ca, "dashboard")
    stranger = dict(good, ssl_certfile=str(stranger_cert), ssl_keyfile=str(stranger_key))
    # A node certificate is a super user on INTERNAL; on MTLS it matches no mapping rule.
    node = str(lk.state_dir / "tls" / "node-1.keystore.pem")
    as_node = dict(good, ssl_certfile=node, ssl_keyfile=node)
    for what, cfg in (("no certificate", no_cert), ("another CA", stranger), ("node certificate", as_node)):
        with pytest.raises(SecurityError) as err:
            check_login(cfg, timeout_s=4)
        assert err.value.reason == "unreachable", what
    # Refused for the reasons meant: the TLS handshake (no or a foreign certificate), and no mapping
    # rule for a DN outside OU=tilestream-clients (Kafka's own words in the broker log).
    log = lk.log_path.read_text(errors="replace")
    assert "SSL handshake failed" in log
    assert "Failed to map name for 'CN=tilestream-broker' based on SSL principal mapping rules" in log
    # SCRAM on the MTLS port is no way in either.
    with pytest.raises(SecurityError):
        check_login(dict(lk.client_config("admin"), bootstrap_servers=lk.mtls_bootstrap), timeout_s=4)


def test_a_camera_certificate_writes_frames_only_and_is_dead_after_revocation(mtls_kafka):
    from kafka.errors import KafkaError, TopicAuthorizationFailedError

    lk = mtls_kafka
    cert = lk.add_camera("cam-cert", tls=True)
    assert cert.principal.startswith("camera-cam-cert@") and len(cert.principal) == len("camera-cam-cert@") + 16
    conn = Connection(lk.mtls_bootstrap, "SSL", ssl_cafile=str(lk.ca_file), ssl_cert_pem=cert.cert_pem,
                      ssl_key_pem=cert.key_pem)
    assert cert.key_pem not in repr(conn) + str(conn)
    kw = conn.client_kwargs()
    p = _producer(kw, enable_idempotence=True)
    try:
        _write(p, "frames")
        _write(p, "heartbeats")
        with pytest.raises(TopicAuthorizationFailedError):
            _write(p, "tile-features")
        assert lk.revoke_camera("cam-cert") == 6  # the agent's six ALLOW rows of that certificate
        with pytest.raises(KafkaError):  # the open connection: DENY applies to the next request
            _write(p, "frames")
    finally:
        p.close()
    p = _producer(conn.client_kwargs(), enable_idempotence=False)  # and a fresh one
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            _write(p, "frames")
    finally:
        p.close()
    # A second certificate for the same camera id is a new principal: the DENY of the old one
    # does not touch it, and the revoked one stays dead.
    again = lk.add_camera("cam-cert", tls=True)
    assert again.principal != cert.principal
    p = _producer(Connection(lk.mtls_bootstrap, "SSL", ssl_cafile=str(lk.ca_file), ssl_cert_pem=again.cert_pem,
                             ssl_key_pem=again.key_pem).client_kwargs(), enable_idempotence=False)
    try:
        _write(p, "frames")
    finally:
        p.close()


def _rd_write(p, topic: str):
    """One record through a librdkafka producer: its delivery report's error (None: acknowledged),
    or the fatal error that ended the producer (flush raises it)."""
    from confluent_kafka import KafkaException

    reports = []
    try:
        p.produce(topic, key=b"k", value=b"v", partition=0, on_delivery=lambda err, _msg: reports.append(err))
        assert p.flush(30) == 0 and len(reports) == 1, "no delivery report within 30 s"
    except KafkaException as exc:
        return exc.args[0]
    return reports[0]


def test_the_agents_librdkafka_producer_logs_in_with_the_certificate_held_in_memory(mtls_kafka):
    """The edge agent's producer (kafkaio.rdkafka, the frames profile: idempotent, acks=all) with a
    camera's certificate and key as PEM text: writes frames and heartbeats, refused elsewhere and
    after the camera's revocation."""
    from confluent_kafka import KafkaError

    from kafkaio import rdkafka

    lk = mtls_kafka
    cert = lk.add_camera("cam-rdk", tls=True)
    conn = Connection(lk.mtls_bootstrap, "SSL", ssl_cafile=str(lk.ca_file), ssl_cert_pem=cert.cert_pem,
                      ssl_key_pem=cert.key_pem)
    cfg = rdkafka.security_config(conn)
    assert cfg["ssl.key.pem"] == cert.key_pem and "ssl.key.location" not in cfg and "ssl.certificate.location" not in cfg
    assert cfg["ssl.endpoint.identification.algorithm"] == "https"

    def make():
        p = rdkafka.producer(conn, client_id="test-cam-rdk", max_request_bytes=1024 * 1024, delivery_timeout_ms=20000)
        rdkafka.check_connected(p, 15)
        return p

    # The camera's ACLs were just written: until the broker applies them, a producer is refused its
    # idempotence id (fatal for that producer; the agent then makes a new one after a backoff).
    made: list = []
    wait_for(lambda: _rd_write(made.append(make()) or made[-1], "frames") is None, 60,
             "the new camera's certificate may write frames", interval_s=1.0)
    p = made[-1]
    assert _rd_write(p, "heartbeats") is None
    assert _rd_write(p, "tile-features").code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert lk.revoke_camera("cam-rdk") == 6
    assert _rd_write(p, "frames") is not None  # the open connection: DENY applies to the next request
    del p
    assert _rd_write(make(), "frames") is not None  # and a fresh producer (its idempotence id is refused: fatal)
    # No certificate: the listener refuses the handshake, no broker answers.
    bare = Connection(lk.mtls_bootstrap, "SSL", ssl_cafile=str(lk.ca_file))
    with pytest.raises(Exception):
        rdkafka.check_connected(rdkafka.producer(bare, max_request_bytes=1024 * 1024, delivery_timeout_ms=5000), 5)


def test_a_bundles_certificate_is_checked_and_never_shown(tmp_path):
    """Bundle credentials are hostile input too: bounded PEM text, a key that matches, no secret in repr."""
    from deploy.kafka_security import issue_client_cert
    from tilestream.config import KafkaSettings
    from tilestream.errors import ConfigError

    _ca(tmp_path / "ca")
    one, two = issue_client_cert(tmp_path / "ca", "camera-a"), issue_client_cert(tmp_path / "ca", "camera-b")
    kafka = KafkaSettings(ssl_cafile=str(tmp_path / "ca" / "ca.pem"))
    conn = Connection.from_settings(kafka, "127.0.0.1:1", credentials={"ssl_certificate": one.cert_pem,
                                                                       "ssl_key": one.key_pem})
    assert conn.security_protocol == "SSL" and conn.ssl_context() is not None
    assert one.key_pem not in repr(conn) and one.key_pem not in str(conn) and one.key_pem not in repr(one)
    bad = [{"ssl_certificate": one.cert_pem, "ssl_key": two.key_pem},  # someone else's key
           {"ssl_certificate": one.cert_pem},  # no key
           {"ssl_certificate": one.cert_pem, "ssl_key": 7},
           {"ssl_certificate": "x" * 100_000, "ssl_key": one.key_pem},
           {"ssl_certificate": one.cert_pem, "ssl_key": "-----BEGIN PRIVATE KEY-----\nnot base64\n"}]
    for creds in bad:
        with pytest.raises(ConfigError):
            Connection.from_settings(kafka, "127.0.0.1:1", credentials=creds).ssl_context()


def tls_env(lk: LocalKafka, role: str, base: dict[str, str]) -> dict[str, str]:
    """What a systemd unit of this role would set for mutual TLS: no user, no password, a certificate."""
    c = lk.client_config(role, tls=True)
    return dict(base, TILESTREAM_KAFKA_BOOTSTRAP=c["bootstrap_servers"], TILESTREAM_KAFKA_SECURITY_PROTOCOL="SSL",
                TILESTREAM_KAFKA_SSL_CAFILE=c["ssl_cafile"], TILESTREAM_KAFKA_SSL_CERTFILE=c["ssl_certfile"],
                TILESTREAM_KAFKA_SSL_KEYFILE=c["ssl_keyfile"])


def _dashboard_feed_results(conn: Connection, keys, camera: str, n: int, timeout_s: float) -> int:
    """Run the dashboard's Kafka feed (aiokafka) until it holds ``n`` results of ``camera``."""
    from dashboard.feed import KafkaFeed
    from dashboard.state import DashboardState
    from tilestream.metrics import Metrics

    state = DashboardState()
    feed = KafkaFeed(conn, state, Metrics("tilestream_dashboard"), result_keys=keys)

    async def main() -> int:
        task = asyncio.create_task(feed.run())
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                cam = state.cameras.get(camera)
                if feed.connected and cam is not None and state.results_total >= n:
                    return state.results_total
                await asyncio.sleep(0.5)
            raise AssertionError(f"the dashboard feed saw {state.results_total} results ({feed.health()})")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return asyncio.run(main())


def test_the_pipeline_runs_over_mutual_tls_and_a_revoked_camera_certificate_stops_writing(
        mtls_kafka, keystore, scene_model, vtest_path, tmp_path):
    """Every stage with its own certificate: the camera enrolled by `keys enroll --broker --broker-auth
    tls` (its certificate in its bundle), `processor` (Faust), `classifier` (aiokafka), `publisher`,
    `admin` for the enrolment, `dashboard` reading results; `keys revoke --broker` ends the camera."""
    from classifier.results import tail
    from tilestream import envelope, topics

    lk, camera = mtls_kafka, "cam-mtls"
    base = dict(os.environ, TILESTREAM_KEYS_DIR=str(keystore.path), TILESTREAM_HOME=str(tmp_path / "home"))
    base.pop(PASSWORD_ENV, None)

    def cli(argv: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tilestream_cli", *argv], env=env, capture_output=True,
                              text=True, timeout=timeout)

    published = cli(["models", "publish", str(scene_model)], tls_env(lk, "publisher", base))
    assert published.returncode == 0, published.stderr[-2000:]
    admin_env = tls_env(lk, "admin", base)
    enrolled = cli(["keys", "enroll", camera, "--broker", "--broker-auth", "tls", "--client-ca",
                    str(lk.state_dir / "tls")], admin_env, 120)
    assert enrolled.returncode == 0, enrolled.stderr[-2000:]
    bundle_path = keystore.bundle_path(camera)
    bundle = json.loads(bundle_path.read_text())["kafka"]
    assert stat.S_IMODE(bundle_path.stat().st_mode) == 0o600
    assert bundle["principal"].startswith(f"camera-{camera}@") and "PRIVATE KEY" in bundle["ssl_key"]
    assert bundle["ssl_key"].strip() not in enrolled.stdout + enrolled.stderr
    assert "sasl_password" not in bundle

    children = Children()
    try:
        wport, cport = free_port(), free_port()
        proc = children.start("processor", ["process", "--http-port", str(wport), "--datadir", str(tmp_path / "faust")],
                              tls_env(lk, "processor", base))
        cls = children.start("classifier", ["classify", "--http-port", str(cport)], tls_env(lk, "classifier", base))
        wait_http(f"http://127.0.0.1:{wport}/healthz", 120, proc)
        wait_http(f"http://127.0.0.1:{cport}/healthz", 120, cls)

        # The camera: the mTLS address and the CA; its certificate and key only in its bundle.
        cam_env = dict(base, TILESTREAM_KAFKA_BOOTSTRAP=lk.mtls_bootstrap, TILESTREAM_KAFKA_SECURITY_PROTOCOL="SSL",
                       TILESTREAM_KAFKA_SSL_CAFILE=str(lk.ca_file))

        def run_agent(n: int, drain_s: int) -> dict:
            out = cli(["agent", "--camera-id", camera, "--source", str(vtest_path), "--max-frames", str(n),
                       "--drain-timeout-s", str(drain_s), "--state-dir", str(tmp_path / "agent")], cam_env)
            assert out.returncode == 0, out.stderr[-2000:]
            assert bundle["ssl_key"].strip() not in out.stdout + out.stderr
            return json.loads(out.stdout.strip().splitlines()[-1])

        assert run_agent(N_FRAMES, 60)["sent"] == N_FRAMES

        reader = lk.connection("dashboard", tls=True)
        seen: list[int] = []

        def all_answered() -> bool:
            seen[:] = [r.seq for r in tail(reader, keys=result_keys(keystore), from_beginning=True, idle_timeout_s=3)
                       if r.camera_id == camera]
            return len(set(seen)) >= N_FRAMES

        wait_for(all_answered, 180, f"{N_FRAMES} results over mutual TLS", interval_s=1.0)
        assert _dashboard_feed_results(reader, result_keys(keystore), camera, N_FRAMES, 60) >= N_FRAMES
        assert children.stop(cls, name="classifier") == 0
        results = [r.seq for r in tail(reader, keys=result_keys(keystore), from_beginning=True, idle_timeout_s=5)
                   if r.camera_id == camera]
        assert sorted(results) == list(range(N_FRAMES)), "exactly one result per frame"
    finally:
        children.stop_all()

    revoked = cli(["keys", "revoke", camera, "--broker"], admin_env, 120)
    assert revoked.returncode == 0 and "denied" in revoked.stdout, revoked.stderr[-2000:]
    after = run_agent(2, 8)
    assert after["sent"] == 0 and after["sealed"] == 2  # sealed and spooled, never accepted by Kafka
    on_topic = [envelope.parse(m.value).header.seq for m in read_topic(lk.connection("admin", tls=True), topics.FRAMES)
                if m.value != b"v" and envelope.parse(m.value).header.camera_id == camera]
    assert sorted(on_topic) == list(range(N_FRAMES))


def test_rotate_device_with_a_certificate_retires_the_cameras_older_credentials(mtls_kafka, keystore, tmp_path):
    """`keys rotate-device --broker --broker-auth tls`: the new bundle's certificate writes; the certificate
    of the bundle it replaces (and any SCRAM user of the camera) is revoked like `keys revoke --broker`."""
    from kafka.errors import TopicAuthorizationFailedError

    lk, camera = mtls_kafka, "cam-rot"
    env = tls_env(lk, "admin", dict(os.environ, TILESTREAM_KEYS_DIR=str(keystore.path),
                                    TILESTREAM_HOME=str(tmp_path / "home")))
    ca = ["--broker", "--broker-auth", "tls", "--client-ca", str(lk.state_dir / "tls")]
    lk.add_camera(camera)  # a SCRAM user from before: rotation to a certificate retires it too

    def bundle_conn() -> tuple[str, Connection]:
        k = json.loads(keystore.bundle_path(camera).read_text())["kafka"]
        return k["principal"], Connection(lk.mtls_bootstrap, "SSL", ssl_cafile=str(lk.ca_file),
                                          ssl_cert_pem=k["ssl_certificate"], ssl_key_pem=k["ssl_key"])

    for argv in (["keys", "enroll", camera, *ca], ["keys", "rotate-device", camera, *ca]):
        if argv[1] == "rotate-device":
            old_principal, old_conn = bundle_conn()
        out = subprocess.run([sys.executable, "-m", "tilestream_cli", *argv], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
    assert "older certificates denied" in out.stdout
    principal, conn = bundle_conn()
    assert principal != old_principal
    p = _producer(conn.client_kwargs(), enable_idempotence=False)
    try:
        _write(p, "frames")
    finally:
        p.close()
    p = _producer(old_conn.client_kwargs(), enable_idempotence=False)
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            _write(p, "frames")
    finally:
        p.close()
    from kafka.admin import ACLFilter, ACLOperation, ACLPermissionType, ACLResourcePatternType, KafkaAdminClient
    from kafka.admin import ResourcePatternFilter, ResourceType

    admin = KafkaAdminClient(**lk.client_config("admin", tls=True))
    try:
        acls, _ = admin.describe_acls(ACLFilter(f"User:camera-{camera}", None, ACLOperation.ANY,
                                                ACLPermissionType.ANY,
                                                ResourcePatternFilter(ResourceType.ANY, None,
                                                                      ACLResourcePatternType.ANY)))
    finally:
        admin.close()
    assert acls == []  # the SCRAM user's rights are gone
