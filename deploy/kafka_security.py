"""Security of the local Kafka (``tilestream kafka start --secure``): TLS material, SCRAM users, ACLs.

Threat model (README): an attacker can write any record to any topic *that the broker lets
them write*, and may hold one camera. On a secured broker that means: every client
authenticates (SASL/SCRAM-SHA-512 over TLS), and every principal may do exactly what its
role needs and nothing else (``allow.everyone.if.no.acl.found=false``), so a stolen camera
credential can append frames and heartbeats, but cannot read features or results, write
results or models, or join a stage's consumer group.

TLS material (``<state>/tls``, written once per state dir, keys mode 0600):

    ca.key / ca.pem                   EC P-256 CA, self-signed, 5 years
    node-<i>.keystore.pem             the node's EC P-256 key (PKCS#8) + its cert + the CA cert,
                                      cert subject CN=tilestream-broker,
                                      SAN IP:127.0.0.<i>, DNS:localhost, serverAuth+clientAuth

    clients/<name>.pem / .key         a client certificate (+ CA) and its key (0600) for mutual TLS,
                                      subject OU=tilestream-clients, CN=<principal>, clientAuth only

The broker reads them with ``ssl.keystore.type=PEM`` / ``ssl.truststore.type=PEM`` (no keytool).
The inter-broker (INTERNAL) and controller listeners are SSL with *required* client
certificates: the broker's principal there is ``User:CN=tilestream-broker``, a super user. A
loopback PLAINTEXT inter-broker listener would have been cheaper, but its principal is
``User:ANONYMOUS``, and making that a super user hands the cluster to any local process; SCRAM
cannot authenticate the controller listener (controllers authenticate before the metadata with
the SCRAM credentials is loaded). So certificates: only a holder of the CA key (0600 in the
state dir) can mint a cert that maps to the broker principal.

Mutual TLS for clients (the MTLS listener, SSL with *required* client certificates): a client
certificate issued by the same CA (``issue_client_cert``) authenticates its holder as the principal
its CN names. ``MTLS_PRINCIPAL_RULES`` maps ``CN=<name>,OU=tilestream-clients`` to ``User:<name>``,
so a certificate for ``processor`` is ``User:processor`` and the ACL table below applies unchanged.
The rules end without ``DEFAULT``: a certificate without that OU -- a node certificate, whose
DEFAULT principal ``User:CN=tilestream-broker`` is a super user -- matches no rule, and Kafka
refuses the connection instead of letting it in under its full DN. The OU is no secret: what
keeps anyone from naming themselves ``processor`` is that only the CA key signs.

Cameras with a certificate (``add_camera_cert``, ``tilestream keys enroll --broker --broker-auth
tls``) get a principal of their own *per certificate*: ``camera-<id>@<16 hex>`` (the hex: random,
new for each certificate; ``@`` cannot occur in a camera id). Why not
``camera-<id>`` as for SCRAM: a certificate cannot be deleted -- it stays valid until it expires
(``CAMERA_CERT_DAYS``), and Kafka reads no CRL. Revocation (``revoke_camera_user``) therefore
deletes the ALLOW ACLs of every principal of that camera *and* adds a DENY of every operation on
every resource for each certificate principal. With one principal per certificate, a re-enrolled
camera (same id, new certificate) gets new rights that the stolen old certificate never shares,
and the DENY keeps the old one dead even if someone later re-grants ``camera-<id>``'s ACLs by hand;
a DENY on ``camera-<id>`` itself would have burned the camera id for good.

SCRAM credentials: one user per role (``ROLES``), random 32-byte passwords generated once per
state dir into ``<state>/credentials.json`` (mode 0600, never printed or logged). They are
created at format time (``kafka-storage format --add-scram``, via a Java @argfile so the
passwords never appear in a command line); cameras enrolled later get their own user through
the Admin API (AlterUserScramCredentials) with the agent's ACLs scoped to that principal.

ACLs (``role_acls``), all ALLOW, host ``*``; READ/WRITE imply DESCRIBE in Kafka's authorizer:

    agent       WRITE frames, heartbeats; DESCRIBE frames, heartbeats; READ frames (the spool
                reconciliation reads frames back, group-less); IDEMPOTENT_WRITE cluster
    processor   READ frames, tile-jobs; WRITE tile-features, tile-jobs, dead-letters, metrics;
                READ group prefix ``tilestream-processor``; topics with prefix
                ``tilestream-processor-`` (Faust's internal topics): CREATE, READ, WRITE,
                DESCRIBE, DESCRIBE_CONFIGS; IDEMPOTENT_WRITE cluster
    classifier  READ tile-features, models, results; WRITE results, dead-letters, metrics;
                READ group ``tilestream-classifier``; IDEMPOTENT_WRITE cluster
    dashboard   READ results, metrics, heartbeats, dead-letters (no group: it assigns partitions)
    publisher   READ + WRITE models (the only writer of models); IDEMPOTENT_WRITE cluster
    admin       super user (``super.users``), no ACLs needed
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tilestream import topics
from tilestream.errors import Refused

MECHANISM = "SCRAM-SHA-512"
BROKER_PRINCIPAL = "User:CN=tilestream-broker"
ADMIN = "admin"
ROLES = ("admin", "agent", "processor", "classifier", "dashboard", "publisher")
PROCESSOR_APP_ID = "tilestream-processor"  # tilestream.config.ProcessorSettings.app_id
CLASSIFIER_GROUP = "tilestream-classifier"  # tilestream.config.ClassifierSettings.group_id
CREDENTIALS_FILE = "credentials.json"
# SCRAM user names of cameras: "camera-" + the camera id. The id is bounded and has no
# character that SCRAM (",", "=") or principal strings (":", ";") give a meaning to.
CAMERA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CAMERA_PREFIX = "camera-"
# Mutual TLS: what a client certificate's subject must look like, and the principal it maps to.
CLIENT_OU = "tilestream-clients"
# A principal name in a certificate: a role, camera-<id> or camera-<id>@<16 hex>.
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,71}(@[0-9a-f]{16})?")
MTLS_PRINCIPAL_RULES = rf"RULE:^CN=([A-Za-z0-9][A-Za-z0-9._@-]{{0,90}}),OU={CLIENT_OU}$/$1/"
CLIENT_CERT_DAYS = 825
CAMERA_CERT_DAYS = 397  # a stolen camera certificate is dead by itself after a year, DENY or not


class SecurityError(Refused, ValueError):
    """A refused security operation; ``reason`` is a short machine-readable word."""

    def __init__(self, message: str, reason: str):
        super().__init__(reason, message)


# -- TLS ----------------------------------------------------------------------------------
def _private_tmp(path: Path, data: bytes) -> Path:
    """``data`` in a new file next to ``path``, 0600 from its creation on, under a name no other
    writer uses (mkstemp: a fixed ``.tmp`` name let one thread unlink another's file mid-write)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a file that is 0600 from its creation on (never briefly world-readable);
    readers see the old or the new content, never a part."""
    os.replace(_private_tmp(path, data), path)


def _create_private(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` (0600) unless it exists. ``link`` fails when the name
    exists, so of two writers racing (threads or processes) the first wins and the second reads
    the winner's content."""
    tmp = _private_tmp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    keystores: dict[int, Path]  # node id -> PEM keystore (key + cert chain)


# One maker of TLS material at a time: a 3-node cluster formats its nodes in parallel threads, and
# two threads that both found no CA made two, so node 3 got a certificate of a CA that node 1 no
# longer trusted ("PKIX path validation failed: signature check failed" at start-up).
_TLS_LOCK = threading.RLock()


def _ca(tls_dir: Path):
    """The local CA's (key, certificate) in ``tls_dir``, created once (EC P-256, 5 years)."""
    with _TLS_LOCK:
        return _ca_locked(tls_dir)


def _ca_locked(tls_dir: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key_path, ca_path = tls_dir / "ca.key", tls_dir / "ca.pem"
    now = datetime.datetime.now(datetime.timezone.utc)
    if ca_key_path.exists() and ca_path.exists():
        return (serialization.load_pem_private_key(ca_key_path.read_bytes(), None),
                x509.load_pem_x509_certificate(ca_path.read_bytes()))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tilestream local Kafka CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=5 * 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(ca_key_path, ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return ca_key, ca_cert


def ensure_tls(tls_dir: Path, hosts: dict[int, str]) -> TlsFiles:
    """The CA and one certificate per node (``hosts``: node id -> loopback IP), created once."""
    with _TLS_LOCK:
        return _ensure_tls_locked(tls_dir, hosts)


def _ensure_tls_locked(tls_dir: Path, hosts: dict[int, str]) -> TlsFiles:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key, ca_cert = _ca(tls_dir)
    ca_path = tls_dir / "ca.pem"
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    keystores = {}
    for node_id, host in hosts.items():
        path = tls_dir / f"node-{node_id}.keystore.pem"
        keystores[node_id] = path
        if path.exists():
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tilestream-broker")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        # Kafka's PEM keystore: an unencrypted PKCS#8 key (no ssl.key.password) and the chain.
        _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption())
                       + cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
    return TlsFiles(ca_path, keystores)



@dataclass(frozen=True)
class ClientCert:
    """A client certificate for mutual TLS: PEM text (certificate + CA chain, PKCS#8 key), its principal."""

    principal: str  # the name after "User:" that the broker's mapping rules give it
    cert_pem: str
    key_pem: str = field(repr=False)


def issue_client_cert(ca_dir: Path, name: str, days: int = CLIENT_CERT_DAYS) -> ClientCert:
    """A client certificate ``CN=<name>, OU=tilestream-clients`` signed by the CA in ``ca_dir``
    (``ca.pem`` + ``ca.key``: the local broker's ``<state>/tls``). EC P-256, clientAuth only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not isinstance(name, str) or not CLIENT_NAME.fullmatch(name):
        raise SecurityError(f"client name {name!r} is not a role, camera-<id> or camera-<id>@<kid>", "bad_client_name")
    if not (ca_dir / "ca.key").exists():
        raise SecurityError(f"no CA private key in {ca_dir} (ca.pem + ca.key): client certificates are issued where "
                            f"the CA key is", "no_ca")
    ca_key, ca_cert = _ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        # RDN order OU, CN: Java's RFC 2253 name (what the mapping rules read) is then "CN=..,OU=..".
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, CLIENT_OU),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return ClientCert(name, (cert.public_bytes(pem) + ca_cert.public_bytes(pem)).decode(),
                      key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode())


def client_cert_files(ca_dir: Path, name: str) -> tuple[Path, Path]:
    """``(<ca_dir>/clients/<name>.pem, .key)`` for ``name``, issued on first use; the key is 0600."""
    out = ca_dir / "clients"
    out.mkdir(exist_ok=True, mode=0o700)
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    if not (cert_path.exists() and key_path.exists()):
        cert = issue_client_cert(ca_dir, name)
        _write_private(key_path, cert.key_pem.encode())
        cert_path.write_text(cert.cert_pem)
    return cert_path, key_path


# -- credentials --------------------------------------------------------------------------
_CREDENTIALS_LOCK = threading.Lock()


def load_credentials(state_dir: Path) -> dict:
    """``{"roles": {role: password}, "cameras": {camera_id: password}}``, created on first use."""
    path = state_dir / CREDENTIALS_FILE
    if not path.exists():
        # Three nodes are formatted in parallel threads, each asking for the credentials: two that
        # both generated passwords crashed on a shared temp file (CI, stop 18) and could have given
        # the nodes different passwords. Created once; every caller then reads the one file.
        state_dir.mkdir(parents=True, exist_ok=True)
        _create_private(path, json.dumps({"roles": {r: secrets.token_urlsafe(32) for r in ROLES}, "cameras": {}},
                                         indent=1).encode())
    creds = json.loads(path.read_text())
    if os.stat(path).st_mode & 0o077:
        raise SecurityError(f"{path} is readable by other users; chmod 600 it", "credentials_mode")
    return creds


def _save_credentials(state_dir: Path, creds: dict) -> None:
    _write_private(state_dir / CREDENTIALS_FILE, json.dumps(creds, indent=1).encode())


def scram_format_args(creds: dict) -> list[str]:
    """``kafka-storage format`` arguments that create every role's SCRAM-SHA-512 credential."""
    out = []
    for role, password in creds["roles"].items():
        out += ["--add-scram", f"{MECHANISM}=[name={role},password={password}]"]
    return out


def client_settings(bootstrap: str, ca_file: Path, username: str, password: str) -> dict:
    """kafka-python keyword arguments for a SASL_SSL/SCRAM-SHA-512 client."""
    return {
        "bootstrap_servers": bootstrap,
        "security_protocol": "SASL_SSL",
        "ssl_cafile": str(ca_file),
        "sasl_mechanism": MECHANISM,
        "sasl_plain_username": username,
        "sasl_plain_password": password,
    }


# -- ACLs ---------------------------------------------------------------------------------
def _acl_table(role: str) -> list[tuple[str, str, str, str]]:
    """(resource type, name, pattern, operation) rows of ``role``; see the module docstring."""
    t = topics
    rows: list[tuple[str, str, str, str]] = []

    def topic(name: str, *ops: str, pattern: str = "LITERAL") -> None:
        rows.extend(("TOPIC", name, pattern, op) for op in ops)

    idempotent = ("CLUSTER", "kafka-cluster", "LITERAL", "IDEMPOTENT_WRITE")
    if role == "agent":
        topic(t.FRAMES, "WRITE", "DESCRIBE", "READ")
        topic(t.HEARTBEATS, "WRITE", "DESCRIBE")
        rows.append(idempotent)
    elif role == "processor":
        topic(t.FRAMES, "READ")
        topic(t.TILE_JOBS, "READ", "WRITE")
        topic(t.REPLAY_MARKS, "READ", "WRITE")  # only the processor may write marks (erasing one re-opens a replay)
        for name in (t.TILE_FEATURES, t.DEAD_LETTERS, t.METRICS):
            topic(name, "WRITE")
        topic(PROCESSOR_APP_ID + "-", "CREATE", "READ", "WRITE", "DESCRIBE", "DESCRIBE_CONFIGS", pattern="PREFIXED")
        rows.append(("GROUP", PROCESSOR_APP_ID, "PREFIXED", "READ"))
        rows.append(idempotent)
    elif role == "classifier":
        for name in (t.TILE_FEATURES, t.MODELS):
            topic(name, "READ")
        topic(t.RESULTS, "READ", "WRITE")
        for name in (t.DEAD_LETTERS, t.METRICS):
            topic(name, "WRITE")
        rows.append(("GROUP", CLASSIFIER_GROUP, "LITERAL", "READ"))
        rows.append(idempotent)
    elif role == "dashboard":
        for name in (t.RESULTS, t.METRICS, t.HEARTBEATS, t.DEAD_LETTERS):
            topic(name, "READ")
    elif role == "publisher":
        topic(t.MODELS, "READ", "WRITE")
        rows.append(idempotent)
    elif role == "admin":
        pass  # super user
    else:
        raise SecurityError(f"unknown role {role!r}; roles: {', '.join(ROLES)}", "unknown_role")
    return rows


def role_acls(role: str, username: str | None = None) -> list:
    """kafka-python ``ACL`` objects granting ``role``'s rows to ``User:<username or role>``."""
    from kafka.admin import ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern, ResourceType

    principal = f"User:{username or role}"
    return [
        ACL(principal, "*", ACLOperation[op], ACLPermissionType.ALLOW,
            ResourcePattern(ResourceType[rtype], name, ACLResourcePatternType[pattern]))
        for rtype, name, pattern, op in _acl_table(role)
    ]


def _create_acls(admin, acls: list) -> None:
    result = admin.create_acls(acls)
    if result["failed"]:
        raise SecurityError(f"the broker refused {len(result['failed'])} ACLs: {result['failed'][:3]}", "acl_refused")


def apply_role_acls(admin, roles: Iterable[str] = ROLES) -> int:
    """Create every role's ACLs (idempotent: Kafka keeps one copy of an identical ACL)."""
    acls = [acl for role in roles for acl in role_acls(role)]
    _create_acls(admin, acls)
    return len(acls)


def camera_username(camera_id: str) -> str:
    if not isinstance(camera_id, str) or not CAMERA_ID.fullmatch(camera_id):
        raise SecurityError(f"camera id {camera_id!r} is not 1-64 of [A-Za-z0-9._-] starting alphanumeric",
                            "bad_camera_id")
    return CAMERA_PREFIX + camera_id


def add_camera_user(admin, state_dir: Path | None, camera_id: str) -> str:
    """A SCRAM user ``camera-<id>`` with the agent's ACLs on that principal; returns its password.

    With a local broker's ``state_dir`` the password is also kept in ``<state>/credentials.json``
    (0600) so that ``LocalKafka.client_config(camera=...)`` can hand it out; without one (a real
    cluster, ``tilestream keys enroll --broker``) it goes only into the camera's bundle. A second
    call rotates it.
    """
    from kafka.admin import ScramMechanism, UserScramCredentialUpsertion

    user = camera_username(camera_id)
    password = secrets.token_urlsafe(32)
    errors = admin.alter_user_scram_credentials([UserScramCredentialUpsertion(user, ScramMechanism.SCRAM_SHA_512,
                                                                              password)])
    if errors.get(user):
        raise SecurityError(f"the broker refused the credential of {user}: {errors[user]}", "scram_refused")
    _create_acls(admin, role_acls("agent", user))
    if state_dir is not None:
        with _CREDENTIALS_LOCK:  # read-modify-write: two cameras added at once (threads of one process) both stay
            creds = load_credentials(state_dir)
            creds["cameras"][camera_id] = password
            _save_credentials(state_dir, creds)
    return password


def add_camera_cert(admin, ca_dir: Path, camera_id: str) -> ClientCert:
    """A client certificate for one camera, principal ``camera-<id>@<16 random hex>``, with the
    agent's ACLs on that principal (it is valid only on the brokers' mutual-TLS listener)."""
    user = f"{camera_username(camera_id)}@{secrets.token_hex(8)}"
    cert = issue_client_cert(ca_dir, user, days=CAMERA_CERT_DAYS)
    _create_acls(admin, role_acls("agent", user))
    return cert


def _camera_principals(admin, camera_id: str) -> set[str]:
    """Every principal of ``camera_id`` that has an ACL: ``camera-<id>`` and ``camera-<id>@<hex>``."""
    from kafka.admin import ACLFilter, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePatternFilter, ResourceType

    user = camera_username(camera_id)
    mine = re.compile(re.escape(f"User:{user}") + r"(@[0-9a-f]{16})?")
    acls, error = admin.describe_acls(ACLFilter(None, None, ACLOperation.ANY, ACLPermissionType.ANY,
                                                ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY)))
    from kafka.errors import NoError

    if error is not NoError:
        raise SecurityError(f"listing ACLs failed: {error.__name__}", "acl_refused")
    return {a.principal for a in acls if mine.fullmatch(a.principal)}


def deny_all_acls(principal: str) -> list:
    """DENY of every operation on every topic, group, transactional id and the cluster for ``principal``."""
    from kafka.admin import ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern, ResourceType

    return [ACL(principal, "*", ACLOperation.ALL, ACLPermissionType.DENY,
                ResourcePattern(rtype, name, ACLResourcePatternType.LITERAL))
            for rtype, name in ((ResourceType.TOPIC, "*"), (ResourceType.GROUP, "*"),
                                (ResourceType.TRANSACTIONAL_ID, "*"), (ResourceType.CLUSTER, "kafka-cluster"))]


def revoke_camera_user(admin, state_dir: Path | None, camera_id: str, keep: str | None = None) -> int:
    """Take every broker right of a camera away; returns the number of ALLOW ACLs removed.

    SCRAM user ``camera-<id>``: its ACLs go (effective at once, also on open connections) and its
    credential (no new logins; a live session ends at ``connections.max.reauth.ms``). Certificate
    principals ``camera-<id>@<hex>``: their ACLs go and a DENY of everything is added for each
    (a certificate cannot be deleted; see the module docstring). ``keep``: one principal left alone
    (``keys rotate-device --broker-auth tls``: the new certificate's).
    """
    from kafka.admin import (ACLFilter, ACLOperation, ACLPermissionType, ACLResourcePatternType,
                             ResourcePatternFilter, ResourceType, ScramMechanism, UserScramCredentialDeletion)
    from kafka.errors import NoError

    user = camera_username(camera_id)
    principals = (_camera_principals(admin, camera_id) | {f"User:{user}"}) - {keep}
    removed = 0
    for principal in sorted(principals):
        flt = ACLFilter(principal, None, ACLOperation.ANY, ACLPermissionType.ALLOW,
                        ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY))
        for _, matched, error in admin.delete_acls([flt]):
            if error is not NoError:
                raise SecurityError(f"deleting the ACLs of {principal} failed: {error.__name__}", "acl_refused")
            removed += len(matched)
    certs = sorted(p for p in principals if "@" in p)
    if certs:
        _create_acls(admin, [acl for p in certs for acl in deny_all_acls(p)])
    errors = admin.alter_user_scram_credentials([UserScramCredentialDeletion(user, ScramMechanism.SCRAM_SHA_512)])
    if errors.get(user) and "not found" not in str(errors[user]).lower() and "does not exist" not in str(errors[user]).lower():
        raise SecurityError(f"deleting the credential of {user} failed: {errors[user]}", "scram_refused")
    if state_dir is not None:
        with _CREDENTIALS_LOCK:
            creds = load_credentials(state_dir)
            creds["cameras"].pop(camera_id, None)
            _save_credentials(state_dir, creds)
    return removed


def check_login(settings: dict, timeout_s: float = 15.0) -> None:
    """Log in once with ``settings`` (kafka-python keywords); return if the broker accepts them.

    Raises ``SecurityError`` with reason ``authentication_failed`` and the broker's own words
    (e.g. "invalid credentials with SASL mechanism SCRAM-SHA-512") when it refuses the login,
    ``unreachable`` when no broker answered within ``timeout_s`` (wrong port, a PLAINTEXT
    client on the SASL_SSL port, a TLS failure). kafka-python itself only retries a refused
    login until its bootstrap deadline and then reports "Unable to bootstrap"; the refusal
    is visible only in its connection manager's log records, which is where this looks.

    Best effort: the broker closes the connection right after its refusal, and kafka-python
    3.0.12's transport discards bytes received in the same read as the EOF
    (``kafka/net/transport.py`` ``_sock_recv`` -> ``abort``), so under CPU load every attempt
    can look like a bare disconnect and this reports ``unreachable``. Kafka's Java client
    always reports the refusal (tests/test_kafka_secure.py uses it for that reason).
    """
    import logging

    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError, SaslAuthenticationFailedError

    refused: list[Exception] = []

    class _Refusals(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            args = record.args if isinstance(record.args, tuple) else ()
            refused.extend(a for a in args if isinstance(a, SaslAuthenticationFailedError))

    logger = logging.getLogger("kafka.net.manager")
    handler, level = _Refusals(logging.WARNING), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            # Short attempts: a refusal often reaches kafka-python as a bare disconnect (the
            # broker closes right after its error response), so one attempt may not show it.
            attempt_s = max(0.5, min(3.0, deadline - time.monotonic()))
            try:
                KafkaAdminClient(**settings, client_id="tilestream-login-check", bootstrap_timeout_ms=int(attempt_s * 1000),
                                 request_timeout_ms=int(attempt_s * 1000)).close()
                return
            except KafkaError as exc:
                who = settings.get("sasl_plain_username", "(no user)")
                if refused:
                    raise SecurityError(f"the broker refused the login of {who!r}: {refused[-1]}",
                                        "authentication_failed") from exc
                if time.monotonic() >= deadline:
                    raise SecurityError(f"no broker at {settings.get('bootstrap_servers')} accepted a connection as "
                                        f"{who!r} within {timeout_s:.0f}s ({exc})", "unreachable") from exc
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
