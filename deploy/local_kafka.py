"""A real Apache Kafka (KRaft, combined broker+controller nodes) on loopback, from Maven Central jars.

``tilestream kafka start|stop|status`` is this module. It

1. resolves ``org.apache.kafka:kafka_2.13:<version>`` with its runtime dependencies and an
   explicit Log4j 2 backend (``deploy/kafka/pom.xml``) with ``mvn`` into the per-user cache
   ``~/.cache/tilestream/kafka/kafka-<version>/libs`` (never into the repo);
2. writes ``server.properties`` per node into a state directory and formats the storage once;
3. starts ``kafka.Kafka`` per node in its own session, logs to ``<node dir>/broker.log``;
4. waits until every node answers a real client request (DescribeCluster lists all brokers
   unfenced);
5. (secure mode) creates the roles' ACLs; creates the pipeline's topics (``tilestream.topics``)
   with the mode's replication factor and ``min.insync.replicas``; prints the bootstrap string.

A second ``start`` reuses the nodes that are running (and starts the ones that are not).
``stop`` sends SIGTERM to every node (Kafka shuts down cleanly on it) and SIGKILL only after
a deadline. The mode of a state dir is recorded in ``<state>/layout.json`` at the first start,
so ``status``/``stop`` need only ``--state-dir`` (or ``--port``).

Modes (they combine: ``--brokers 3 --secure`` is a secured 3-node cluster)

    tilestream kafka start                    one node, PLAINTEXT, the default for development
        node 1  127.0.0.1:9092 (client, PLAINTEXT)  127.0.0.1:9093 (controller)
        state   ~/.cache/tilestream/kafka/broker-9092/{server.properties,data,broker.log,broker.json}
        topics  replication factor 1, min.insync.replicas 1

    tilestream kafka start --brokers 3        three nodes, each its own JVM (-Xmx512m) and address
        node i  127.0.0.<i>:9092 (client)  127.0.0.<i>:9093 (controller), i = 1, 2, 3
                (the same port numbers on three loopback addresses: Linux routes all of
                127/8 to lo, so no port juggling and every node looks like its own host)
        state   <state>/node-<i>/{server.properties,data,broker.log,broker.json}
        quorum  3 voters via ``controller.quorum.voters`` (static quorum: supported by 3.9 and
                4.x alike; the node set is fixed, so KIP-853 reconfiguration buys nothing here)
        topics  replication factor 3, min.insync.replicas 2 (acks=all survives one lost node);
                internal topics (offsets, transactions) likewise
        bootstrap 127.0.0.1:9092,127.0.0.2:9092,127.0.0.3:9092

    tilestream kafka start --secure           one node, authenticated and authorized
        node 1  127.0.0.1:9092 CLIENT     SASL_SSL, SCRAM-SHA-512, server cert only
                127.0.0.1:9094 INTERNAL   SSL with required client certs (inter-broker)
                127.0.0.1:9093 CONTROLLER SSL with required client certs
                127.0.0.1:9095 MTLS       SSL with required client certs: clients by certificate
                (INTERNAL defaults to controller port + 1, ``--internal-port``; MTLS to controller
                port + 2 or, when that port is taken, a free one, ``--mtls-port``; both recorded
                in layout.json)
        state   <state>/tls/{ca.pem,ca.key,node-<i>.keystore.pem}, <state>/credentials.json (0600),
                <state>/tls/clients/<name>.{pem,key} (client certificates, keys 0600)
        authz   StandardAuthorizer, allow.everyone.if.no.acl.found=false,
                super.users = User:admin;User:CN=tilestream-broker; one SCRAM user + ACLs per role
                (deploy/kafka_security.py has the table and why the inter-broker listener is SSL)
        clients ``LocalKafka.client_config(role)`` -> kafka-python keyword arguments (SCRAM);
                ``client_config(role, tls=True)`` / ``connection(role, tls=True)``: the role's
                client certificate on the MTLS listener, principal ``User:<role>`` as with SCRAM
                (CN -> principal: ``kafka_security.MTLS_PRINCIPAL_RULES``), so one ACL table
                serves both; ``add_camera(id, tls=True)`` issues a camera certificate

Tests and operators can disturb single nodes: ``node_pids()``, ``kill_node(i, signal)``
(SIGKILL / SIGSTOP / SIGCONT / SIGTERM), ``start_node(i)``, ``leader_of(topic, partition)``,
``partition_state(topic, partition)`` and ``active_controller()`` (DescribeQuorum).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

from tilestream.config import KafkaSettings, cache_home
from kafkaio import Connection
from kafkaio.clients import ensure_topics
from tilestream.errors import TilestreamError
from tilestream.topics import TopicSpec, pipeline_topics

DEFAULT_VERSION = "4.1.1"
LEGACY_VERSION = "3.9.1"
HERE = Path(__file__).resolve().parent / "kafka"
MAX_BROKERS = 9  # node ids 1..9 on 127.0.0.<base>..<base+8>; 3 is what the project runs


class KafkaError(TilestreamError, RuntimeError):
    """The local broker could not be fetched, formatted, started or stopped."""


@dataclass
class BrokerInfo:
    pid: int
    version: str
    host: str
    port: int
    controller_port: int
    state_dir: str
    started_at: float
    node_id: int = 1
    bootstrap_servers: str = ""  # the whole cluster's; empty on a single node

    @property
    def bootstrap(self) -> str:
        return self.bootstrap_servers or f"{self.host}:{self.port}"

    @property
    def log(self) -> str:
        return str(Path(self.state_dir) / "broker.log")


@dataclass(frozen=True)
class Node:
    """One KRaft node (broker + controller) of the local cluster."""

    node_id: int
    host: str
    port: int
    controller_port: int
    internal_port: int | None  # secure mode only: the SSL inter-broker listener
    dir: Path
    mtls_port: int | None = None  # secure mode only: clients with certificates (SSL, client auth required)

    @property
    def info_path(self) -> Path:
        return self.dir / "broker.json"

    @property
    def log_path(self) -> Path:
        return self.dir / "broker.log"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_on(hosts: Iterable[str]) -> int:
    """A port free on every address of ``hosts`` (for a cluster's same-port-per-node layout)."""
    hosts = list(hosts)
    for _ in range(100):
        port = free_port(hosts[0])
        if all(_bindable(h, port) for h in hosts[1:]):
            return port
    raise KafkaError(f"no port is free on all of {hosts}")


def cluster_hosts(host: str, brokers: int) -> list[str]:
    """127.0.0.1, 127.0.0.2, ... for ``brokers`` nodes counted up from ``host``."""
    if brokers == 1:
        return [host]
    base = ipaddress.ip_address(host)
    hosts = [str(base + i) for i in range(brokers)]
    if not all(ipaddress.ip_address(h) in ipaddress.ip_network("127.0.0.0/8") for h in hosts):
        raise KafkaError(f"a {brokers}-node cluster needs {brokers} loopback addresses from {host}; use 127.0.0.1")
    return hosts


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


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


# How long a node may take to answer one ApiVersions request before answering_bootstrap leaves
# it out. A live broker answers in milliseconds; 3 s leaves room for a GC pause or a busy core
# (the clean-clone runs share 2 cores with a busy loop), and a frozen one never answers.
PROBE_DEADLINE_S = 3.0


def _answers(host: str, port: int, ctx: "ssl.SSLContext | None", deadline_s: float) -> bool:
    """True if the broker at ``host:port`` answers an ApiVersions (v0) request within ``deadline_s``
    (over TLS when ``ctx`` is given: brokers answer ApiVersions before SASL authentication)."""
    end = time.monotonic() + deadline_s
    request = struct.pack(">hhih", 18, 0, 0x7E57, 5) + b"probe"  # ApiVersions v0, correlation id, client id
    try:
        with socket.create_connection((host, port), timeout=deadline_s) as raw:
            sock = raw
            if ctx is not None:
                raw.settimeout(max(0.01, end - time.monotonic()))
                sock = ctx.wrap_socket(raw, server_hostname=host)
            sock.sendall(struct.pack(">i", len(request)) + request)
            got = b""
            while len(got) < 8:
                sock.settimeout(max(0.01, end - time.monotonic()))
                chunk = sock.recv(8 - len(got))
                if not chunk:
                    return False
                got += chunk
            return struct.unpack(">i", got[4:8])[0] == 0x7E57
    except (OSError, ValueError):  # refused, reset, timed out, TLS failure
        return False


def _is_stopped(pid: int) -> bool:
    """True if ``pid`` is SIGSTOPped (state T in /proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].startswith(("T", "t"))


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _read_info(path: Path) -> BrokerInfo | None:
    try:
        return BrokerInfo(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _argfile_quote(arg: str) -> str:
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


class LocalKafka:
    def __init__(
        self,
        version: str = DEFAULT_VERSION,
        host: str = "127.0.0.1",
        port: int = 9092,
        controller_port: int = 9093,
        state_dir: str | os.PathLike[str] | None = None,
        progress: Callable[[str], None] = print,
        brokers: int | None = None,
        secure: bool | None = None,
        internal_port: int | None = None,
        mtls_port: int | None = None,
    ):
        """``brokers``/``secure``/``internal_port``/``mtls_port`` left as None take the state dir's
        recorded layout (``layout.json``), else 1 node, PLAINTEXT, controller port + 1 (+ 2)."""
        self.version = version
        self.host = host
        self.port = port
        self.controller_port = controller_port
        self.jars = cache_home() / "kafka" / f"kafka-{version}" / "libs"
        self.state_dir = Path(state_dir) if state_dir else cache_home() / "kafka" / f"broker-{port}"
        self.progress = progress
        saved = self._saved_layout()
        self._requested = {"brokers": brokers, "secure": secure, "internal_port": internal_port, "mtls_port": mtls_port}
        self.brokers = brokers if brokers is not None else int(saved.get("brokers", 1))
        self.secure = secure if secure is not None else bool(saved.get("secure", False))
        self.internal_port = (internal_port if internal_port is not None
                              else saved.get("internal_port") or controller_port + 1)
        if not 1 <= self.brokers <= MAX_BROKERS:
            raise KafkaError(f"brokers must be 1..{MAX_BROKERS}, not {self.brokers}")
        hosts = cluster_hosts(host, self.brokers)
        self.mtls_port = mtls_port if mtls_port is not None else saved.get("mtls_port")
        if self.mtls_port is None and self.secure:
            # Controller port + 2 as documented; a free port when it is taken (the choice is
            # recorded in layout.json at the first start and printed).
            self.mtls_port = controller_port + 2
            if not all(_bindable(h, self.mtls_port) for h in hosts):
                self.mtls_port = free_port_on(hosts)
        self.nodes = [
            Node(i + 1, h, port, controller_port, self.internal_port if self.secure else None,
                 self.state_dir if self.brokers == 1 else self.state_dir / f"node-{i + 1}",
                 self.mtls_port if self.secure else None)
            for i, h in enumerate(hosts)
        ]

    @classmethod
    def from_settings(cls, kafka: KafkaSettings, **kw) -> "LocalKafka":
        return cls(kafka.version, kafka.host, kafka.port, kafka.controller_port, **kw)

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{n.host}:{n.port}" for n in self.nodes)

    @property
    def log_path(self) -> Path:
        return self.nodes[0].log_path

    @property
    def _info_path(self) -> Path:
        return self.nodes[0].info_path

    @property
    def replication_factor(self) -> int:
        return min(3, self.brokers)

    @property
    def min_insync_replicas(self) -> int:
        return min(2, self.brokers)

    def node(self, node_id: int) -> Node:
        if not 1 <= node_id <= len(self.nodes):
            raise KafkaError(f"no node {node_id}: this cluster has nodes 1..{len(self.nodes)}")
        return self.nodes[node_id - 1]

    # -- layout ---------------------------------------------------------------------------
    @property
    def _layout_path(self) -> Path:
        return self.state_dir / "layout.json"

    def _saved_layout(self) -> dict:
        try:
            return json.loads(self._layout_path.read_text())
        except (OSError, ValueError):
            return {}

    def _check_layout(self) -> None:
        saved = self._saved_layout()
        if not saved:
            return
        for key, want in self._requested.items():
            if want is not None and key in saved and saved[key] != want and not (key.endswith("_port") and not self.secure):
                raise KafkaError(f"{self.state_dir} holds a {saved.get('brokers')}-node "
                                 f"{'secure' if saved.get('secure') else 'PLAINTEXT'} Kafka "
                                 f"({key}={saved[key]!r}); use another --state-dir for {key}={want!r}")

    def _write_layout(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._layout_path.write_text(json.dumps({"brokers": self.brokers, "secure": self.secure,
                                                 "internal_port": self.internal_port if self.secure else None,
                                                 "mtls_port": self.mtls_port if self.secure else None}))

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

    # -- security -------------------------------------------------------------------------
    @property
    def ca_file(self) -> Path:
        return self.state_dir / "tls" / "ca.pem"

    def _tls(self):
        from deploy.kafka_security import ensure_tls

        return ensure_tls(self.state_dir / "tls", {n.node_id: n.host for n in self.nodes})

    def _credentials(self) -> dict:
        from deploy.kafka_security import load_credentials

        return load_credentials(self.state_dir)

    @property
    def mtls_bootstrap(self) -> str:
        """The MTLS listeners (clients authenticated by certificate) of every node."""
        self._require_secure()
        return ",".join(f"{n.host}:{n.mtls_port}" for n in self.nodes)

    def client_config(self, role: str | None = None, camera: str | None = None, tls: bool = False) -> dict:
        """kafka-python keyword arguments to reach this Kafka as ``role`` (or as ``camera``).

        PLAINTEXT: just ``bootstrap_servers``. Secure: SASL_SSL + SCRAM-SHA-512 with the
        role's password from ``<state>/credentials.json`` and the local CA as ``ssl_cafile``;
        with ``tls=True`` SSL on the MTLS listener with the role's client certificate
        (``<state>/tls/clients/<role>.{pem,key}``, issued on first use by the local CA).
        """
        if not self.secure:
            return {"bootstrap_servers": self.bootstrap}
        from deploy.kafka_security import ROLES, SecurityError, camera_username, client_cert_files, client_settings

        if tls:
            if camera is not None:
                raise SecurityError("a camera's certificate is in its bundle (add_camera(id, tls=True))", "unknown_camera")
            role = role or "admin"
            if role not in ROLES:
                raise SecurityError(f"unknown role {role!r}; roles: {', '.join(ROLES)}", "unknown_role")
            cert, key = client_cert_files(self.state_dir / "tls", role)
            return {"bootstrap_servers": self.mtls_bootstrap, "security_protocol": "SSL", "ssl_cafile": str(self.ca_file),
                    "ssl_certfile": str(cert), "ssl_keyfile": str(key)}

        creds = self._credentials()
        if camera is not None:
            if camera not in creds["cameras"]:
                raise SecurityError(f"camera {camera!r} has no Kafka credential here", "unknown_camera")
            return client_settings(self.bootstrap, self.ca_file, camera_username(camera), creds["cameras"][camera])
        role = role or "admin"
        if role not in creds["roles"]:
            raise SecurityError(f"unknown role {role!r}; roles: {', '.join(creds['roles'])}", "unknown_role")
        return client_settings(self.bootstrap, self.ca_file, role, creds["roles"][role])

    def connection(self, role: str | None = None, camera: str | None = None, tls: bool = False) -> Connection:
        """The :class:`kafkaio.Connection` of ``role`` (or ``camera``): what tilestream's clients take.
        ``tls=True``: the role's client certificate on the MTLS listener."""
        if not self.secure:
            return Connection(self.bootstrap)
        c = self.client_config(role, camera, tls)
        if tls:
            return Connection(c["bootstrap_servers"], "SSL", ssl_cafile=c["ssl_cafile"], ssl_certfile=c["ssl_certfile"],
                              ssl_keyfile=c["ssl_keyfile"])
        return Connection(c["bootstrap_servers"], c["security_protocol"], ssl_cafile=c["ssl_cafile"],
                          sasl_mechanism=c["sasl_mechanism"], sasl_username=c["sasl_plain_username"],
                          sasl_password=c["sasl_plain_password"])

    def add_camera(self, camera_id: str, tls: bool = False):
        """A Kafka user for one camera with the agent's ACLs; returns its ``client_config``.

        ``tls=True``: a client certificate instead (principal ``camera-<id>@<hex>``, agent ACLs),
        returned as a :class:`deploy.kafka_security.ClientCert` (what goes into its bundle)."""
        from deploy.kafka_security import add_camera_cert, add_camera_user, camera_username

        self._require_secure()
        camera_username(camera_id)  # refuse a bad id before connecting
        admin = self._admin()
        try:
            if tls:
                return add_camera_cert(admin, self.state_dir / "tls", camera_id)
            add_camera_user(admin, self.state_dir, camera_id)
        finally:
            admin.close()
        return self.client_config(camera=camera_id)

    def revoke_camera(self, camera_id: str) -> int:
        """Delete the camera's ACLs and SCRAM credential, DENY its certificates; returns the number
        of ALLOW ACLs removed (``kafka_security.revoke_camera_user``)."""
        from deploy.kafka_security import revoke_camera_user

        self._require_secure()
        admin = self._admin()
        try:
            return revoke_camera_user(admin, self.state_dir, camera_id)
        finally:
            admin.close()

    def _require_secure(self) -> None:
        if not self.secure:
            raise KafkaError(f"the Kafka of {self.state_dir} is not secured (start it with --secure)")

    # -- lifecycle ------------------------------------------------------------------------
    def _node_status(self, node: Node) -> BrokerInfo | None:
        info = _read_info(node.info_path)
        if info is None:
            return None
        if _pid_is_kafka(info.pid) and _port_open(info.host, info.port):
            return info
        if not _pid_is_kafka(info.pid):
            node.info_path.unlink(missing_ok=True)
        return None

    def nodes_status(self) -> dict[int, BrokerInfo | None]:
        return {n.node_id: self._node_status(n) for n in self.nodes}

    def status(self) -> BrokerInfo | None:
        """The running broker of this state dir, or None (a stale record is removed).

        On a cluster: the first node that answers, with ``bootstrap`` the whole cluster's."""
        if self.brokers == 1:
            return self._node_status(self.nodes[0])
        for info in self.nodes_status().values():
            if info is not None:
                return replace(info, bootstrap_servers=self.bootstrap)
        return None

    def node_pids(self) -> dict[int, int]:
        """Node id -> pid of every node process alive (also a SIGSTOPped one)."""
        out = {}
        for n in self.nodes:
            info = _read_info(n.info_path)
            if info is not None and _pid_is_kafka(info.pid):
                out[n.node_id] = info.pid
        return out

    def _write_config(self, node: Node | None = None) -> Path:
        node = node or self.nodes[0]
        data = node.dir / "data"
        rf, isr = str(self.replication_factor), str(self.min_insync_replicas)
        voters = ",".join(f"{n.node_id}@{n.host}:{n.controller_port}" for n in self.nodes)
        h = node.host
        if self.secure:
            listeners = (f"CLIENT://{h}:{node.port},INTERNAL://{h}:{node.internal_port},"
                         f"CONTROLLER://{h}:{node.controller_port},MTLS://{h}:{node.mtls_port}")
            advertised = f"CLIENT://{h}:{node.port},INTERNAL://{h}:{node.internal_port},MTLS://{h}:{node.mtls_port}"
            inter, protocols = "INTERNAL", "CLIENT:SASL_SSL,INTERNAL:SSL,CONTROLLER:SSL,MTLS:SSL"
        else:
            listeners = f"PLAINTEXT://{h}:{node.port},CONTROLLER://{h}:{node.controller_port}"
            advertised = f"PLAINTEXT://{h}:{node.port}"
            inter, protocols = "PLAINTEXT", "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": listeners,
            "advertised.listeners": advertised,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": inter,
            "listener.security.protocol.map": protocols,
            "log.dirs": str(data),
            "num.partitions": "1",
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "message.max.bytes": str(8 * 1024 * 1024),
            "replica.fetch.max.bytes": str(8 * 1024 * 1024),
            "log.retention.hours": "24",
        }
        if self.brokers == 1:
            # The controller appends a no-op record to the metadata log every 500 ms by default
            # (KIP-835: lets brokers see the log's end advance); on one node there is no other
            # broker to tell, and each one is a Raft append with its fsync. Idle broker CPU, back
            # to back on the shared 2-core machine: 31.0, 31.0 ms/s at 500 ms, 23.5, 22.5 at 5 s
            # (~8 ms/s: 0.2 ms per frame at 40 frames/s). Clusters keep the default: their fault
            # tests time fencing and leader moves.
            props["metadata.max.idle.interval.ms"] = "5000"
        if self.brokers > 1:
            props |= {
                # Auto-created topics get the same durability as the pipeline's.
                "default.replication.factor": rf,
                "min.insync.replicas": isr,
                "unclean.leader.election.enable": "false",
            }
        if self.secure:
            tls = self._tls()
            props |= {
                "auto.create.topics.enable": "false",  # topics come from `ensure_topics` (admin) only
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(tls.keystores[node.node_id]),
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": str(tls.ca_cert),
                "ssl.client.auth": "required",  # INTERNAL and CONTROLLER: only holders of a node cert
                "listener.name.client.ssl.client.auth": "none",  # clients authenticate with SCRAM
                # MTLS: clients by certificate; CN=<name>,OU=tilestream-clients -> User:<name>, nothing
                # else (no DEFAULT rule: a node certificate is refused here, see kafka_security).
                "listener.name.mtls.ssl.client.auth": "required",
                "listener.name.mtls.ssl.principal.mapping.rules": _mtls_rules(),
                "listener.name.client.sasl.enabled.mechanisms": "SCRAM-SHA-512",
                "listener.name.client.scram-sha-512.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                # A deleted credential ends a live session within 10 minutes (ACL removal is immediate).
                "connections.max.reauth.ms": str(10 * 60 * 1000),
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "allow.everyone.if.no.acl.found": "false",
                "super.users": "User:admin;" + _broker_principal(),
            }
        node.dir.mkdir(parents=True, exist_ok=True)
        path = node.dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return path

    def _java(self, *args: str, **kw) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise KafkaError("`java` is not on PATH: Kafka needs Java 17 (apt-get install openjdk-17-jre-headless)")
        return [java, *args, "-cp", str(self.jars / "*")]

    def _cluster_id(self) -> str:
        """The id the formatted nodes already carry, else a new one (like Kafka's Uuid.randomUuid)."""
        for n in self.nodes:
            try:
                for line in (n.dir / "data" / "meta.properties").read_text().splitlines():
                    if line.startswith("cluster.id="):
                        return line.split("=", 1)[1].strip()
            except OSError:
                continue
        cluster_id = "-"
        while cluster_id.startswith("-"):  # a leading "-" reads as an option
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        return cluster_id

    def _format(self, config: Path, node: Node | None = None, cluster_id: str | None = None) -> None:
        node = node or self.nodes[0]
        if (node.dir / "data" / "meta.properties").exists():
            return
        args = ["kafka.tools.StorageTool", "format", "-t", cluster_id or self._cluster_id(), "-c", str(config)]
        argfile = None
        if self.secure:
            from deploy.kafka_security import _write_private, scram_format_args

            # The passwords go through a Java @argfile (0600, deleted at once), not the
            # command line, which every local user can read in /proc.
            argfile = node.dir / "format.args"
            _write_private(argfile, "\n".join(_argfile_quote(a) for a in args + scram_format_args(self._credentials())).encode())
            args = [f"@{argfile}"]
        try:
            proc = subprocess.run(self._java() + args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        finally:
            if argfile is not None:
                argfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise KafkaError(f"formatting {node.dir / 'data'} failed:\n{proc.stdout}{proc.stderr}")

    def start(self, topics: Iterable[TopicSpec] | None = None, timeout_s: float = 120.0) -> BrokerInfo:
        live = self.nodes_status()
        running = [i for i in live.values() if i is not None]
        for info in running:
            if info.version != self.version:
                raise KafkaError(
                    f"Apache Kafka {info.version} is already running at {info.bootstrap} (pid {info.pid}); "
                    f"stop it first to run {self.version}"
                )
        if len(running) == len(self.nodes):
            for info in running:
                self.progress(f"reusing Apache Kafka {info.version} at {info.host}:{info.port} (pid {info.pid})")
        else:
            self._launch([n for n in self.nodes if live[n.node_id] is None], timeout_s)
        if self.secure:
            self._apply_acls()
        self.create_topics(topics if topics is not None else pipeline_topics(KafkaSettings()))
        info = self.status()
        if info is None:
            raise KafkaError(f"the Kafka of {self.state_dir} stopped right after start-up; see {self.log_path}")
        return info

    def _launch(self, nodes: list[Node], timeout_s: float) -> None:
        self._check_layout()
        self.ensure_jars()
        for n in nodes:
            for port in (n.port, n.controller_port) + ((n.internal_port, n.mtls_port) if self.secure else ()):
                if _port_open(n.host, port):
                    raise KafkaError(f"{n.host}:{port} is already in use by another process; choose other ports (--port, --controller-port)")
        self._write_layout()
        if self.secure:
            self.state_dir.chmod(0o700)  # the metadata log holds the salted SCRAM credentials
        cluster_id = self._cluster_id()
        if self.secure:
            self._tls()  # the CA and every node's certificate, once, before the nodes are formatted in parallel
            self._credentials()  # likewise the role passwords: every node's format must get the same ones
        if len(nodes) > 1:
            # Format in parallel: each format is a JVM start (~3 s); in sequence that was 8 s of 18.
            with ThreadPoolExecutor(len(nodes)) as pool:
                list(pool.map(lambda n: self._format(self._write_config(n), n, cluster_id), nodes))
        procs = {n.node_id: self._spawn(n, cluster_id) for n in nodes}
        self._wait_ready(procs, timeout_s)

    def _spawn(self, node: Node, cluster_id: str | None = None) -> subprocess.Popen:
        node.dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config(node)
        self._format(config, node, cluster_id)
        stdout = node.dir / "stdout.log"
        # One node keeps the heap it always had; a cluster runs three JVMs on a 2-core,
        # shared machine, where 512 MB each is ample for test traffic.
        heap = ("-Xms256m", "-Xmx1g") if self.brokers == 1 else ("-Xms128m", "-Xmx512m")
        # Kafka's defaults for threads and G1 stay: fewer broker threads (num.network.threads=1,
        # num.io.threads=2, background.threads=2) and/or -XX:+UseSerialGC did not make a frame
        # cheaper for the broker (benchmarks.transport.kafka_floor at 65 frames/s, third run on each
        # fresh broker, 2026-12-03 08:53-09:03: 2.78 default, 2.66 threads, 3.32 SerialGC, 2.88 and
        # 3.98 both, ms/frame; idle 22-32 ms/s for all), so nothing to trade defaults for.
        cmd = self._java(
            *heap, "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={HERE / 'log4j2.properties'}",
            f"-Dtilestream.kafka.log={node.log_path}",
        ) + ["kafka.Kafka", str(config)]
        where = f"{node.host}:{node.port}" + (f" (node {node.node_id})" if self.brokers > 1 else "")
        mode = "KRaft" + (f", SASL_SSL; mTLS clients on :{node.mtls_port}" if self.secure else "")
        self.progress(f"starting Apache Kafka {self.version} ({mode}) on {where}; log: {node.log_path}")
        with open(stdout, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        info = BrokerInfo(proc.pid, self.version, node.host, node.port, node.controller_port, str(node.dir), time.time(),
                          node.node_id, self.bootstrap if self.brokers > 1 else "")
        node.info_path.write_text(json.dumps(asdict(info)))
        return proc

    def _wait_ready(self, procs: dict[int, subprocess.Popen], timeout_s: float) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            for node_id, proc in procs.items():
                if proc.poll() is not None:
                    node = self.node(node_id)
                    node.info_path.unlink(missing_ok=True)
                    self.stop()
                    raise KafkaError(
                        f"the broker exited with code {proc.returncode} during start-up; see {node.log_path} and "
                        f"{node.dir / 'stdout.log'}:\n" + _tail(node.log_path) + "\n" + _tail(node.dir / "stdout.log")
                    )
            try:
                up = self._unfenced_brokers()
                missing = set(procs) - up
                if missing:
                    raise KafkaError(f"nodes {sorted(missing)} not registered yet")
                # Unfenced is not listening: a KRaft broker waits to be unfenced and only then
                # opens its listeners (BrokerServer.startup), so the cluster can name a node
                # unfenced while its port still refuses (CI: the 3-node fixture's first admin
                # call got ECONNREFUSED from node 1 right after "answers"). Each node must answer.
                ctx = self._probe_context()
                silent = [i for i in sorted(procs) if not _answers(self.node(i).host, self.node(i).port, ctx, PROBE_DEADLINE_S)]
                if silent:
                    raise KafkaError(f"nodes {silent} do not answer on their listener yet")
                self.progress(f"Apache Kafka {self.version} answers at {self.bootstrap} after {time.monotonic() - t0:.1f}s")
                return
            except Exception as exc:  # noqa: BLE001 - any client error means "not ready yet"
                last_error = exc
                time.sleep(0.25)
        self.stop()
        raise KafkaError(f"the broker did not answer within {timeout_s:.0f}s ({last_error}); see {self.log_path}")

    def answering_bootstrap(self, deadline_s: float = PROBE_DEADLINE_S) -> str:
        """The bootstrap string without nodes that are dead, SIGSTOPped or do not answer.

        A frozen node still accepts TCP connections (the kernel does), and a kafka-python
        client whose bootstrap picks it waits out its request timeout and then fails
        ("Unable to bootstrap"): the admin calls here must not stall on a node a test froze.
        Each node is asked for its API versions (:func:`_answers`), all at once, each with
        ``deadline_s``; a node whose process is stopped is left out without asking. Checking
        the process state alone raced with the signal: right after SIGSTOP, with the core busy,
        the JVM was not stopped yet and stayed in the list (a clean-clone run's failure).
        """
        if self.brokers == 1:
            return self.bootstrap
        ctx = self._probe_context()
        candidates = []
        for n in self.nodes:
            info = _read_info(n.info_path)
            if info is not None and _pid_is_kafka(info.pid) and not _is_stopped(info.pid):
                candidates.append(n)
        with ThreadPoolExecutor(max_workers=max(1, len(candidates))) as pool:
            answers = list(pool.map(lambda n: _answers(n.host, n.port, ctx, deadline_s), candidates))
        alive = [f"{n.host}:{n.port}" for n, ok in zip(candidates, answers) if ok]
        return ",".join(alive) or self.bootstrap

    def _probe_context(self) -> "ssl.SSLContext | None":
        """The TLS context of :func:`_answers` on a secure cluster (None: plaintext)."""
        if not self.secure:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.check_hostname = False  # a liveness probe; the clients verify the name
        return ctx

    def _admin(self, **kw):
        from kafka.admin import KafkaAdminClient

        cfg = dict(self.client_config("admin"), bootstrap_servers=self.answering_bootstrap())
        return KafkaAdminClient(**cfg, client_id="tilestream-admin", request_timeout_ms=10000, **kw)

    def _describe_cluster(self) -> dict:
        if not any(_port_open(n.host, n.port) for n in self.nodes):
            raise KafkaError("port not open yet")
        admin = self._admin()
        try:
            return admin.describe_cluster()
        finally:
            admin.close()

    def _unfenced_brokers(self) -> set[int]:
        return {b["broker_id"] for b in self._describe_cluster()["brokers"] if not b.get("is_fenced")}

    def _apply_acls(self) -> None:
        from deploy.kafka_security import apply_role_acls

        admin = self._admin()
        try:
            n = apply_role_acls(admin)
        finally:
            admin.close()
        self.progress(f"ACLs of roles in place ({n}); credentials: {self.state_dir / 'credentials.json'}, CA: {self.ca_file}")

    def create_topics(self, topics: Iterable[TopicSpec]) -> list[str]:
        created = ensure_topics(self.connection("admin"), topics, self.replication_factor,
                                min_insync_replicas=self.min_insync_replicas if self.brokers > 1 else None)
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

    # -- single nodes ---------------------------------------------------------------------
    def kill_node(self, node_id: int, sig: int = signal.SIGKILL, timeout_s: float = 60.0) -> int:
        """Send ``sig`` to one node; for SIGKILL/SIGTERM wait until it is gone. Returns its pid."""
        node = self.node(node_id)
        info = _read_info(node.info_path)
        if info is None or not _pid_is_kafka(info.pid):
            raise KafkaError(f"node {node_id} of {self.state_dir} is not running")
        os.kill(info.pid, sig)
        if sig == signal.SIGSTOP:
            # The stop takes effect when the JVM's threads are next scheduled: on a busy core that
            # is later than kill() returning, and a caller asks the cluster about the node next.
            deadline = time.monotonic() + timeout_s
            while not _is_stopped(info.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            if sig == signal.SIGTERM:
                os.kill(info.pid, signal.SIGCONT)  # a stopped JVM would never see the TERM
            if not _wait_gone(info.pid, timeout_s):
                raise KafkaError(f"node {node_id} (pid {info.pid}) is still alive {timeout_s:.0f}s after signal {sig}")
            node.info_path.unlink(missing_ok=True)
        return info.pid

    def start_node(self, node_id: int, timeout_s: float = 120.0) -> BrokerInfo:
        """(Re)start one node of this cluster and wait until it is a registered, unfenced broker."""
        node = self.node(node_id)
        info = self._node_status(node)
        if info is None:
            deadline = time.monotonic() + timeout_s
            self.ensure_jars()
            self._wait_ready({node_id: self._spawn(node, self._cluster_id())}, timeout_s)
            # The cluster may still list the node's previous incarnation as unfenced (a SIGKILLed
            # node is fenced only after broker.session.timeout.ms): wait for this one's listener too.
            while (info := self._node_status(node)) is None and time.monotonic() < deadline:
                time.sleep(0.25)
        if info is None:
            raise KafkaError(f"node {node_id} did not come up; see {node.log_path}")
        return info

    def partition_state(self, topic: str, partition: int, timeout_s: float = 15.0) -> dict:
        """``{"leader": id, "replicas": [...], "isr": [...]}`` from the cluster's metadata.

        Each KRaft broker applies the metadata log at its own pace, so a topic created a moment
        ago can be missing from the answer of the node asked while another node already knew it
        (a clean-clone run with a busy core failed "no partition durable-stop-0" right after
        the same call had answered): asked again, with a new client, until ``timeout_s``."""
        from kafka.errors import UnknownTopicOrPartitionError

        deadline = time.monotonic() + timeout_s
        while True:
            admin = self._admin()
            try:
                for t in admin.describe_topics([topic]):
                    for p in t["partitions"]:
                        if p["partition_index"] == partition:
                            return {"leader": p["leader_id"], "replicas": list(p["replica_nodes"]),
                                    "isr": list(p["isr_nodes"])}
            except UnknownTopicOrPartitionError:
                pass
            finally:
                admin.close()
            if time.monotonic() > deadline:
                raise KafkaError(f"no partition {topic}-{partition}")
            time.sleep(0.2)

    def leader_of(self, topic: str, partition: int) -> int:
        """The node id leading ``topic``-``partition`` (-1 while it has none)."""
        return self.partition_state(topic, partition)["leader"]

    def active_controller(self) -> int:
        """The node id of the KRaft quorum leader (DescribeQuorum); -1 while none can be asked or named
        (right after the leader died, the node asked may be the dead one)."""
        from kafka.errors import KafkaError as ClientError

        try:
            admin = self._admin()
            try:
                quorum = admin.describe_metadata_quorum()
            finally:
                admin.close()
        except ClientError:
            return -1
        return quorum["topics"][0]["partitions"][0]["leader_id"]

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Stop every node of this state dir; True if one was running."""
        records = [(n, _read_info(n.info_path)) for n in self.nodes]
        # Records of another layout under the same state dir (e.g. started with other --brokers).
        for extra in sorted(self.state_dir.glob("node-*/broker.json")) + [self.state_dir / "broker.json"]:
            if all(extra != n.info_path for n, _ in records):
                info = _read_info(extra)
                if info is not None:
                    records.append((Node(info.node_id, info.host, info.port, info.controller_port, None, extra.parent), info))
        live = [(n, i) for n, i in records if i is not None and _pid_is_kafka(i.pid)]
        # All at once: a combined node waits for the quorum during its controlled shutdown,
        # so stopping one by one would leave the last one waiting for a majority that is gone.
        for _, info in live:
            os.kill(info.pid, signal.SIGTERM)
            os.kill(info.pid, signal.SIGCONT)  # a SIGSTOPped node would never see the TERM
        deadline = time.monotonic() + timeout_s
        for _, info in live:
            if not _wait_gone(info.pid, max(0.0, deadline - time.monotonic())):
                self.progress(f"broker pid {info.pid} did not stop within {timeout_s:.0f}s; killing it")
                os.kill(info.pid, signal.SIGKILL)
                _wait_gone(info.pid, 60.0)
        for _, info in live:
            self.progress(f"stopped Apache Kafka {info.version} at {info.host}:{info.port}")
        for n, info in records:
            if info is not None:
                n.info_path.unlink(missing_ok=True)
        return bool(live)


def _mtls_rules() -> str:
    from deploy.kafka_security import MTLS_PRINCIPAL_RULES

    return MTLS_PRINCIPAL_RULES


def _broker_principal() -> str:
    from deploy.kafka_security import BROKER_PRINCIPAL

    return BROKER_PRINCIPAL


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _pid_is_kafka(pid):
        _reap(pid)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    """Collect the exit status when the broker is our own child (tests), so it is not a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
