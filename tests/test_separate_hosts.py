"""The three-host layout of the README, on one machine: every role a "host" of its own.

A secured 3-node cluster (``LocalKafka(brokers=3, secure=True)`` on 127.0.0.1-3, replication 3,
min.insync.replicas 2) plays ``kafka-1..3``. Each other host is a directory of its own holding only
what its role needs, installed the way an operator would: its key directory made with ``tilestream
keys export --role ROLE`` on the admin workstation, its Kafka client certificate and key (mutual
TLS), the cluster's CA and its own ``tilestream.env`` (like ``deploy/config/tilestream.env``) that
is the whole environment of its process:

    admin workstation  the full key directory (admin and release private keys); enrols the
                       camera (`keys enroll --broker --broker-auth tls`), publishes the model
    processor-1, -2    `tilestream process`: cloud HPKE private keys, tile-job keys, admin/*.pub,
                       the signed registry, the stage MAC key
    classifier         `tilestream classify --model`: stage MAC key, results signing key,
                       release/*.pub, the model file
    camera             `tilestream agent --bundle`: its device bundle (with its client
                       certificate) and the CA, nothing else
    reader             results/*.pub and the dashboard's certificate: verifies every result

Asserted: exactly one verified result per frame, both processor hosts did work, and no host holds
a secret of another role (by file list and by content).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.local_kafka import DEFAULT_VERSION, LocalKafka, cluster_hosts, free_port, free_port_on
from tilestream.stagekeys import StageKeys
from tilestream_cli.procs import Children, wait_http

from conftest import wait_for

pytestmark = pytest.mark.kafka
N_FRAMES = 16
CAMERA = "cam-hosts"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    hosts = cluster_hosts("127.0.0.1", 3)
    lk = LocalKafka(DEFAULT_VERSION, "127.0.0.1", free_port_on(hosts), free_port_on(hosts),
                    state_dir=tmp_path_factory.mktemp("kafka-3-secure"), progress=print, brokers=3, secure=True,
                    internal_port=free_port_on(hosts), mtls_port=free_port_on(hosts))
    try:
        lk.start()
        yield lk
    finally:
        lk.stop(timeout_s=30)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, # comments: what systemd's EnvironmentFile= reads."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


class Host:
    """One machine: a directory with its keys, Kafka credentials, CA and ``tilestream.env``."""

    def __init__(self, root: Path, name: str):
        self.name, self.dir = name, root / name
        self.dir.mkdir(parents=True, mode=0o700)
        self.keys = self.dir / "keys"

    def install_kafka_identity(self, lk: LocalKafka, role: str | None) -> dict[str, str]:
        """The cluster's CA, and (for a service) its role's client certificate and key, 0600."""
        kdir = self.dir / "kafka"
        kdir.mkdir(mode=0o700)
        shutil.copy(lk.ca_file, kdir / "ca.pem")
        env = {"TILESTREAM_KAFKA_BOOTSTRAP": lk.mtls_bootstrap, "TILESTREAM_KAFKA_SECURITY_PROTOCOL": "SSL",
               "TILESTREAM_KAFKA_SSL_CAFILE": str(kdir / "ca.pem")}
        if role is not None:
            cfg = lk.client_config(role, tls=True)
            shutil.copy(cfg["ssl_certfile"], kdir / "client.pem")
            (kdir / "client.key").touch(mode=0o600)
            (kdir / "client.key").write_bytes(Path(cfg["ssl_keyfile"]).read_bytes())
            env |= {"TILESTREAM_KAFKA_SSL_CERTFILE": str(kdir / "client.pem"),
                    "TILESTREAM_KAFKA_SSL_KEYFILE": str(kdir / "client.key")}
        return env

    def write_env(self, settings: dict[str, str]) -> Path:
        path = self.dir / "tilestream.env"
        lines = [f"# {self.name}: the EnvironmentFile of its tilestream unit (deploy/config/tilestream.env)",
                 "TILESTREAM_KAFKA_REPLICATION_FACTOR=3", "TILESTREAM_KAFKA_MIN_INSYNC_REPLICAS=2",
                 "TILESTREAM_LOG_LEVEL=INFO", f"TILESTREAM_KEYS_DIR={self.keys}",
                 f"TILESTREAM_HOME={self.dir / 'home'}"]
        path.write_text("\n".join(lines + [f"{k}={v}" for k, v in settings.items()]) + "\n")
        return path

    def env(self) -> dict[str, str]:
        """The process environment: the machine's basics (PATH, ...) and this host's file, nothing of ours."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("TILESTREAM_")}
        return base | read_env_file(self.dir / "tilestream.env")

    def files(self) -> list[Path]:
        return sorted(p for p in self.dir.rglob("*") if p.is_file())


def cli(argv: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "tilestream_cli", *argv], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"tilestream {' '.join(argv)}:\n{out.stderr[-3000:]}"
    return out


def _secrets(keys_dir: Path, patterns: tuple[str, ...]) -> dict[str, bytes]:
    return {str(p.relative_to(keys_dir)): p.read_bytes() for pat in patterns for p in sorted(keys_dir.glob(pat))}


def _flat(data: bytes) -> bytes:
    """Without line breaks, raw or JSON-escaped: a PEM key inside a bundle's JSON is found too."""
    return data.replace(b"\\n", b"").replace(b"\n", b"").replace(b"\r", b"")


def _holds(host: Host, secret: bytes) -> bool:
    """Whether any file of ``host`` contains ``secret`` (as is, or with its lines joined)."""
    needle = _flat(secret.strip())
    return any(needle in _flat(f.read_bytes()) for f in host.files())


def test_processors_and_classifier_on_their_own_hosts_with_only_their_keys(cluster, keystore, scene_model, vtest_path,
                                                                           tmp_path):
    from classifier.results import tail
    from kafkaio import Connection

    lk, root = cluster, tmp_path / "hosts"
    admin_ws = Host(root, "admin-ws")  # the admin workstation: the full key directory
    admin_ws.keys = keystore.path
    admin_ws.write_env(admin_ws.install_kafka_identity(lk, "admin"))
    publisher = lk.client_config("publisher", tls=True)  # `models publish` runs as the publisher principal
    publisher_env = admin_ws.env() | {"TILESTREAM_KAFKA_SSL_CERTFILE": publisher["ssl_certfile"],
                                      "TILESTREAM_KAFKA_SSL_KEYFILE": publisher["ssl_keyfile"]}

    # Admin workstation: the camera's bundle (device key + client certificate), then the model.
    camera = Host(root, "camera")
    bundle = camera.dir / f"{CAMERA}.bundle"
    cli(["keys", "enroll", CAMERA, "--broker", "--broker-auth", "tls", "--client-ca", str(lk.state_dir / "tls"),
         "--out", str(bundle)], admin_ws.env(), 120)
    cli(["models", "publish", str(scene_model)], publisher_env)

    # Each host's key directory: exported after the enrolment (the registry names the camera).
    procs = [Host(root, f"processor-{i}") for i in (1, 2)]
    classifier, reader = Host(root, "classifier"), Host(root, "reader")
    for host, role in [(p, "processor") for p in procs] + [(classifier, "classifier"), (reader, "consumer")]:
        out = cli(["keys", "export", "--role", role, "--out", str(host.keys)], admin_ws.env())
        assert f"exported the {role} keys" in out.stdout
        host.write_env(host.install_kafka_identity(lk, {"consumer": "dashboard"}.get(role, role)))
    for f in scene_model.parent.glob(scene_model.name + "*"):  # the model and its metadata (scene.skops.json)
        shutil.copy(f, classifier.dir / f.name.replace(scene_model.name, "scene.skops"))
    camera.keys = camera.dir / "no-keys"  # the agent reads its bundle only: no key directory at all
    camera.write_env(camera.install_kafka_identity(lk, None))

    # -- custody: each host holds its role's secrets and nobody else's -----------------------------
    everyone = _secrets(keystore.path, ("cloud/*.key", "tile/*.key", "admin/*.key", "release/*.key", "stage/*.key",
                                        "results/*.key"))
    device_key = json.loads(bundle.read_text())["device_key"]["ed25519"].encode()
    kafka_keys = {role: Path(lk.client_config(role, tls=True)["ssl_keyfile"]).read_bytes()
                  for role in ("admin", "publisher", "processor", "classifier", "dashboard")}
    camera_kafka_key = json.loads(bundle.read_text())["kafka"]["ssl_key"].encode()
    may_hold = {
        "processor": ("cloud/", "tile/", "stage/"),
        "classifier": ("stage/", "results/"),
        "reader": (),
        "camera": (),
    }
    for host, role, kafka_role in [(procs[0], "processor", "processor"), (procs[1], "processor", "processor"),
                                   (classifier, "classifier", "classifier"), (reader, "reader", "dashboard"),
                                   (camera, "camera", None)]:
        for name, secret in everyone.items():
            assert _holds(host, secret) == name.startswith(may_hold[role]), (host.name, name)
        assert _holds(host, device_key) == (role == "camera"), host.name
        assert _holds(host, camera_kafka_key) == (role == "camera"), host.name
        for other, secret in kafka_keys.items():
            assert _holds(host, secret) == (other == kafka_role), (host.name, other)
        for f in host.files():
            if f.suffix == ".key" or f.suffix == ".bundle":
                assert f.stat().st_mode & 0o077 == 0, f
    assert sorted(str(f.relative_to(classifier.keys)) for f in classifier.keys.rglob("*") if f.is_file()) == sorted(
        str(f.relative_to(keystore.path)) for pat in ("stage/*", "results/*", "release/*.pub")
        for f in keystore.path.glob(pat))
    assert not (procs[0].keys / "results").exists() and not (procs[0].keys / "release").exists()
    assert not list(procs[0].keys.rglob("admin/*.key")) and (procs[0].keys / "registry.json").exists()

    # -- the run ---------------------------------------------------------------------------------
    children = Children()
    try:
        ports = [free_port() for _ in procs]
        workers = [children.start(h.name, ["process", "--http-port", str(port), "--datadir", str(h.dir / "faust")],
                                  h.env()) for h, port in zip(procs, ports)]
        cport = free_port()
        cls = children.start("classifier", ["classify", "--model", str(classifier.dir / "scene.skops"),
                                            "--http-port", str(cport)], classifier.env())
        for port, proc in zip(ports, workers):
            wait_http(f"http://127.0.0.1:{port}/healthz", 180, proc)
        wait_http(f"http://127.0.0.1:{cport}/healthz", 180, cls)

        from kafka.admin import KafkaAdminClient

        admin = KafkaAdminClient(**lk.client_config("admin", tls=True), request_timeout_ms=15000)
        try:
            def both_workers_in_the_group() -> bool:
                group = admin.describe_groups(["tilestream-processor"])["tilestream-processor"]
                return group.get("group_state") == "Stable" and len(group.get("members") or []) == 2

            wait_for(both_workers_in_the_group, 180, "both processor hosts in the processor group", interval_s=1.0)
        finally:
            admin.close()

        out = cli(["agent", "--camera-id", CAMERA, "--bundle", str(bundle), "--source", str(vtest_path),
                   "--max-frames", str(N_FRAMES), "--drain-timeout-s", "60", "--state-dir", str(camera.dir / "agent")],
                  camera.env())
        assert json.loads(out.stdout.strip().splitlines()[-1])["sent"] == N_FRAMES

        reader_env = read_env_file(reader.dir / "tilestream.env")
        conn = Connection(reader_env["TILESTREAM_KAFKA_BOOTSTRAP"], "SSL",
                          ssl_cafile=reader_env["TILESTREAM_KAFKA_SSL_CAFILE"],
                          ssl_certfile=reader_env["TILESTREAM_KAFKA_SSL_CERTFILE"],
                          ssl_keyfile=reader_env["TILESTREAM_KAFKA_SSL_KEYFILE"])
        keys = StageKeys(reader.keys).results_public_keys()  # the reader verifies, it cannot sign
        assert keys and not list(reader.keys.rglob("*.key"))

        def results() -> list[int]:
            return [r.seq for r in tail(conn, keys=keys, from_beginning=True, idle_timeout_s=3) if r.camera_id == CAMERA]

        wait_for(lambda: len(set(results())) >= N_FRAMES, 240, f"{N_FRAMES} verified results", interval_s=1.0)
        assert children.stop(cls, name="classifier") == 0
        assert sorted(results()) == list(range(N_FRAMES)), "exactly one verified result per frame"

        import urllib.request

        done = [json.loads(urllib.request.urlopen(f"http://127.0.0.1:{p}/healthz", timeout=5).read())["frames"]
                for p in ports]
        assert sum(done) >= N_FRAMES and all(n > 0 for n in done), f"frames per processor host: {done}"
    finally:
        children.stop_all()
