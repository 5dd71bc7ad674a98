"""A real single-node Apache Kafka (KRaft, broker+controller) on loopback, from Maven Central jars.

``tilestream kafka start|stop|status`` is this module. It

1. resolves ``org.apache.kafka:kafka_2.13:<version>`` with its runtime dependencies and an
   explicit Log4j 2 backend (``deploy/kafka/pom.xml``) with ``mvn`` into the per-user cache
   ``~/.cache/tilestream/kafka/kafka-<version>/libs`` (never into the repo);
2. writes ``server.properties`` into a state directory and formats the storage once;
3. starts ``kafka.Kafka`` in its own session, logs to ``<state>/broker.log``;
4. waits until the broker answers a real client request (DescribeCluster);
5. creates the pipeline's topics (``tilestream.topics``) and prints the bootstrap address.

A second ``start`` reuses the broker that is already running. ``stop`` sends SIGTERM
(Kafka shuts down cleanly on it) and SIGKILL only after a deadline.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from tilestream.config import KafkaSettings, cache_home
from tilestream.topics import TopicSpec, ensure_topics, pipeline_topics

DEFAULT_VERSION = "4.1.1"
LEGACY_VERSION = "3.9.1"
HERE = Path(__file__).resolve().parent / "kafka"


class KafkaError(RuntimeError):
    pass


@dataclass
class BrokerInfo:
    pid: int
    version: str
    host: str
    port: int
    controller_port: int
    state_dir: str
    started_at: float

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log(self) -> str:
        return str(Path(self.state_dir) / "broker.log")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_is_kafka(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"kafka.Kafka" in cmdline


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LocalKafka:
    def __init__(
        self,
        version: str = DEFAULT_VERSION,
        host: str = "127.0.0.1",
        port: int = 9092,
        controller_port: int = 9093,
        state_dir: str | os.PathLike[str] | None = None,
        progress: Callable[[str], None] = print,
    ):
        self.version = version
        self.host = host
        self.port = port
        self.controller_port = controller_port
        self.jars = cache_home() / "kafka" / f"kafka-{version}" / "libs"
        self.state_dir = Path(state_dir) if state_dir else cache_home() / "kafka" / f"broker-{port}"
        self.progress = progress

    @classmethod
    def from_settings(cls, kafka: KafkaSettings, **kw) -> "LocalKafka":
        return cls(kafka.version, kafka.host, kafka.port, kafka.controller_port, **kw)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "broker.log"

    @property
    def _info_path(self) -> Path:
        return self.state_dir / "broker.json"

    # -- jars ---------------------------------------------------------------------------
    def ensure_jars(self) -> Path:
        marker = self.jars / ".complete"
        if marker.exists():
            return self.jars
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KafkaError("`mvn` is not on PATH: install Maven (apt-get install maven) to fetch the Kafka jars")
        self.progress(f"resolving Apache Kafka {self.version} jars from Maven Central into {self.jars} ...")
        self.jars.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.jars.parent) as tmp:
            shutil.copy(HERE / "pom.xml", Path(tmp) / "pom.xml")
            out = Path(tmp) / "libs"
            t0 = time.monotonic()
            proc = subprocess.run(
                [mvn, "-B", "-q", "-f", str(Path(tmp) / "pom.xml"), "dependency:copy-dependencies",
                 f"-Dkafka.version={self.version}", f"-DoutputDirectory={out}", "-DincludeScope=runtime"],
                capture_output=True, text=True, stdin=subprocess.DEVNULL,
            )
            if proc.returncode != 0 or not any(out.glob(f"kafka_2.13-{self.version}.jar")):
                raise KafkaError(
                    f"mvn could not resolve org.apache.kafka:kafka_2.13:{self.version}:\n"
                    + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
                )
            (out / ".complete").write_text(self.version)
            if self.jars.exists():
                shutil.rmtree(self.jars)
            os.replace(out, self.jars)
        self.progress(f"resolved {len(list(self.jars.glob('*.jar')))} jars in {time.monotonic() - t0:.1f}s")
        return self.jars

    # -- lifecycle ------------------------------------------------------------------------
    def status(self) -> BrokerInfo | None:
        """The running broker of this state dir, or None (a stale record is removed)."""
        try:
            info = BrokerInfo(**json.loads(self._info_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if _pid_is_kafka(info.pid) and _port_open(info.host, info.port):
            return info
        if not _pid_is_kafka(info.pid):
            self._info_path.unlink(missing_ok=True)
        return None

    def _write_config(self) -> Path:
        data = self.state_dir / "data"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "message.max.bytes": str(8 * 1024 * 1024),
            "replica.fetch.max.bytes": str(8 * 1024 * 1024),
            "log.retention.hours": "24",
        }
        path = self.state_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return path

    def _java(self, *args: str, **kw) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise KafkaError("`java` is not on PATH: Kafka needs Java 17 (apt-get install openjdk-17-jre-headless)")
        return [java, *args, "-cp", str(self.jars / "*")]

    def _format(self, config: Path) -> None:
        if (self.state_dir / "data" / "meta.properties").exists():
            return
        cluster_id = "-"
        while cluster_id.startswith("-"):  # like Kafka's Uuid.randomUuid: a leading "-" reads as an option
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        proc = subprocess.run(
            self._java() + ["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config)],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise KafkaError(f"formatting {self.state_dir / 'data'} failed:\n{proc.stdout}{proc.stderr}")

    def start(self, topics: Iterable[TopicSpec] | None = None, timeout_s: float = 120.0) -> BrokerInfo:
        info = self.status()
        if info is not None:
            if info.version != self.version:
                raise KafkaError(
                    f"Apache Kafka {info.version} is already running at {info.bootstrap} (pid {info.pid}); "
                    f"stop it first to run {self.version}"
                )
            self.progress(f"reusing Apache Kafka {info.version} at {info.bootstrap} (pid {info.pid})")
        else:
            info = self._launch(timeout_s)
        self.create_topics(topics if topics is not None else pipeline_topics(KafkaSettings()))
        return info

    def _launch(self, timeout_s: float) -> BrokerInfo:
        self.ensure_jars()
        for port in (self.port, self.controller_port):
            if _port_open(self.host, port):
                raise KafkaError(f"{self.host}:{port} is already in use by another process; choose other ports (--port, --controller-port)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        self._format(config)
        stdout = self.state_dir / "stdout.log"
        cmd = self._java(
            "-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={HERE / 'log4j2.properties'}",
            f"-Dtilestream.kafka.log={self.log_path}",
        ) + ["kafka.Kafka", str(config)]
        self.progress(f"starting Apache Kafka {self.version} (KRaft) on {self.bootstrap}; log: {self.log_path}")
        with open(stdout, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        info = BrokerInfo(proc.pid, self.version, self.host, self.port, self.controller_port, str(self.state_dir), time.time())
        self._info_path.write_text(json.dumps(asdict(info)))
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._info_path.unlink(missing_ok=True)
                raise KafkaError(
                    f"the broker exited with code {proc.returncode} during start-up; see {self.log_path} and {stdout}:\n"
                    + _tail(self.log_path) + "\n" + _tail(stdout)
                )
            try:
                self._describe_cluster()
                self.progress(f"Apache Kafka {self.version} answers at {self.bootstrap} after {time.monotonic() - t0:.1f}s")
                return info
            except Exception as exc:  # noqa: BLE001 - any client error means "not ready yet"
                last_error = exc
                time.sleep(0.25)
        self.stop()
        raise KafkaError(f"the broker did not answer within {timeout_s:.0f}s ({last_error}); see {self.log_path}")

    def _admin(self):
        from kafka.admin import KafkaAdminClient

        return KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="tilestream-admin", request_timeout_ms=10000)

    def _describe_cluster(self) -> dict:
        if not _port_open(self.host, self.port):
            raise KafkaError("port not open yet")
        admin = self._admin()
        try:
            return admin.describe_cluster()
        finally:
            admin.close()

    def create_topics(self, topics: Iterable[TopicSpec]) -> list[str]:
        created = ensure_topics(self.bootstrap, topics)
        if created:
            self.progress(f"created topics: {', '.join(created)}")
        return created

    def tool(self, main_class: str, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """Run one of Kafka's own Java tools (e.g. the console consumer) against this broker's jars."""
        self.ensure_jars()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = self._java(f"-Dlog4j2.configurationFile={HERE / 'log4j2.properties'}",
                         f"-Dtilestream.kafka.log={self.state_dir / 'tools.log'}") + [main_class, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Stop the broker of this state dir; True if one was running."""
        try:
            info = BrokerInfo(**json.loads(self._info_path.read_text()))
        except (OSError, ValueError, TypeError):
            return False
        stopped = False
        if _pid_is_kafka(info.pid):
            os.kill(info.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _pid_is_kafka(info.pid) and time.monotonic() < deadline:
                _reap(info.pid)
                time.sleep(0.2)
            if _pid_is_kafka(info.pid):
                self.progress(f"broker pid {info.pid} did not stop within {timeout_s:.0f}s; killing it")
                os.kill(info.pid, signal.SIGKILL)
                while _pid_is_kafka(info.pid):
                    _reap(info.pid)
                    time.sleep(0.1)
            stopped = True
            self.progress(f"stopped Apache Kafka {info.version} at {info.bootstrap}")
        self._info_path.unlink(missing_ok=True)
        return stopped


def _reap(pid: int) -> None:
    """Collect the exit status when the broker is our own child (tests), so it is not a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
