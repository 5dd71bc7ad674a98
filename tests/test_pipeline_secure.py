"""The whole pipeline over SASL_SSL on the secured broker, every stage with its own principal:
the camera's own SCRAM user, `processor` (Faust), `classifier` (aiokafka), `publisher` for the model,
`dashboard` (read-only) to read the results. Nothing runs as admin but the set-up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from classifier.results import tail
from deploy.local_kafka import DEFAULT_VERSION, LocalKafka, free_port
from edge_agent.agent import EdgeAgent
from kafkaio import Connection
from kafkaio.connection import PASSWORD_ENV
from tilestream.config import AgentSettings
from tilestream_cli.procs import Children, wait_http

from conftest import result_keys, wait_for

pytestmark = pytest.mark.kafka
N_FRAMES = 12
CAMERA = "cam-secure"


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory):
    lk = LocalKafka(DEFAULT_VERSION, "127.0.0.1", free_port(), free_port(), state_dir=tmp_path_factory.mktemp("ksec"),
                    progress=print, secure=True, internal_port=free_port())
    try:
        lk.start()
        yield lk
    finally:
        lk.stop()


def role_env(conn: Connection, base: dict[str, str]) -> dict[str, str]:
    """What a systemd unit of this role would have: TLS + SCRAM settings, the password in the environment."""
    return dict(base, TILESTREAM_KAFKA_BOOTSTRAP=conn.bootstrap, TILESTREAM_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
                TILESTREAM_KAFKA_SSL_CAFILE=conn.ssl_cafile, TILESTREAM_KAFKA_SASL_USERNAME=conn.sasl_username,
                **{PASSWORD_ENV: conn.sasl_password})


def test_the_pipeline_runs_over_sasl_ssl_with_one_principal_per_role(secure_kafka, keystore, scene_model, vtest_path,
                                                                      tmp_path):
    lk = secure_kafka
    keystore.enroll(CAMERA)
    base = dict(os.environ, TILESTREAM_KEYS_DIR=str(keystore.path), TILESTREAM_HOME=str(tmp_path / "home"))
    base.pop(PASSWORD_ENV, None)

    publish = subprocess.run([sys.executable, "-m", "tilestream_cli", "models", "publish", str(scene_model)],
                             env=role_env(lk.connection("publisher"), base), capture_output=True, text=True, timeout=180)
    assert publish.returncode == 0, publish.stderr[-2000:]

    children = Children()
    try:
        wport, cport = free_port(), free_port()
        proc = children.start("processor", ["process", "--http-port", str(wport), "--datadir", str(tmp_path / "faust")],
                              role_env(lk.connection("processor"), base))
        cls = children.start("classifier", ["classify", "--http-port", str(cport)],
                             role_env(lk.connection("classifier"), base))
        wait_http(f"http://127.0.0.1:{wport}/healthz", 120, proc)
        wait_http(f"http://127.0.0.1:{cport}/healthz", 120, cls)

        lk.add_camera(CAMERA)
        agent = EdgeAgent(AgentSettings(camera_id=CAMERA, source=str(vtest_path), max_frames=N_FRAMES), keystore,
                          lk.connection(camera=CAMERA), 4 * 1024 * 1024, state_dir=tmp_path / "agent")
        counters = agent.run()
        assert counters.sent == N_FRAMES and counters.send_errors == 0

        reader = lk.connection("dashboard")  # read-only: it may read results, nothing else
        seen: dict[int, int] = {}

        def all_answered() -> bool:
            for r in tail(reader, keys=result_keys(keystore), from_beginning=True, idle_timeout_s=3):
                seen[r.seq] = seen.get(r.seq, 0) + 1 if r.camera_id == CAMERA else 0
            return len([s for s, n in seen.items() if n]) >= N_FRAMES

        wait_for(all_answered, 180, f"{N_FRAMES} results over SASL_SSL", interval_s=1.0)
        seen.clear()
        assert children.stop(cls, name="classifier") == 0
        results = [r.seq for r in tail(reader, keys=result_keys(keystore), from_beginning=True, idle_timeout_s=5) if r.camera_id == CAMERA]
        assert sorted(results) == list(range(N_FRAMES)), "exactly one result per frame"
    finally:
        children.stop_all()


def test_keys_enroll_issues_the_cameras_own_broker_credential_and_revoke_takes_it_away(secure_kafka, keystore,
                                                                                        vtest_path, tmp_path):
    """`keys enroll --broker` (as admin) puts a SCRAM user with the agent's ACLs into the camera's bundle; the
    agent runs with nothing but the bundle and the cluster's CA; `keys revoke --broker` ends its writes."""
    import json

    from conftest import read_topic
    from tilestream import envelope, topics

    lk, camera = secure_kafka, "cam-enrolled"
    base = dict(os.environ, TILESTREAM_KEYS_DIR=str(keystore.path), TILESTREAM_HOME=str(tmp_path / "home"))
    base.pop(PASSWORD_ENV, None)
    admin_env = role_env(lk.connection("admin"), base)
    enrolled = subprocess.run([sys.executable, "-m", "tilestream_cli", "keys", "enroll", camera, "--broker"],
                              env=admin_env, capture_output=True, text=True, timeout=120)
    assert enrolled.returncode == 0, enrolled.stderr[-2000:]
    bundle = json.loads(keystore.bundle_path(camera).read_text())
    assert bundle["kafka"]["sasl_username"] == f"camera-{camera}" and len(bundle["kafka"]["sasl_password"]) >= 32

    # The camera: TLS settings and the CA, no user and no password of its own in the environment.
    cam_env = dict(base, TILESTREAM_KAFKA_BOOTSTRAP=lk.bootstrap, TILESTREAM_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
                   TILESTREAM_KAFKA_SSL_CAFILE=str(lk.ca_file))

    def run_agent(n: int, drain_s: int) -> dict:
        out = subprocess.run([sys.executable, "-m", "tilestream_cli", "agent", "--camera-id", camera, "--source",
                              str(vtest_path), "--max-frames", str(n), "--drain-timeout-s", str(drain_s),
                              "--state-dir", str(tmp_path / "agent")], env=cam_env, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert run_agent(3, 60)["sent"] == 3
    on_topic = [envelope.parse(m.value).header.seq for m in read_topic(lk.connection("admin"), topics.FRAMES)
                if envelope.parse(m.value).header.camera_id == camera]
    assert sorted(on_topic) == [0, 1, 2]

    revoked = subprocess.run([sys.executable, "-m", "tilestream_cli", "keys", "revoke", camera, "--broker"],
                             env=admin_env, capture_output=True, text=True, timeout=120)
    assert revoked.returncode == 0 and "SCRAM credential" in revoked.stdout, revoked.stderr[-2000:]
    after = run_agent(2, 8)
    assert after["sent"] == 0 and after["sealed"] == 2  # sealed and kept in the spool, never accepted by Kafka
