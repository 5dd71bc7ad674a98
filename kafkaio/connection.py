"""Where the brokers are and how to talk to them securely: one value handed to every client.

A :class:`Connection` is built once per process from the configuration
(:class:`tilestream.config.KafkaSettings`: file, ``TILESTREAM_KAFKA_*`` environment, flags) and
turned into the keyword arguments of each client library here, so no other module spells a
security setting:

* ``PLAINTEXT`` — the local default on loopback;
* ``SSL`` — TLS with server verification against ``ssl_cafile``; with ``ssl_certfile`` and
  ``ssl_keyfile`` also mutual TLS (the client certificate is the principal); a camera's certificate
  and key come from its device bundle as PEM text instead (``ssl_cert_pem``/``ssl_key_pem``, see
  :meth:`Connection.from_settings`), loaded without ever being written to a file;
* ``SASL_SSL`` — TLS as above plus SASL/SCRAM (``SCRAM-SHA-512`` by default) with a user name
  and a password; ``SASL_PLAINTEXT`` exists for completeness and is refused off loopback.

The password (and a bundle's client key) is never part of the configuration file: it comes from ``$TILESTREAM_SASL_PASSWORD``
or from ``sasl_password_file`` (a file of mode 0600, e.g. the one ``tilestream keys enroll`` writes
into a camera's bundle), and it is left out of ``repr`` and logs.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field, replace
from typing import Any

from tilestream.errors import ConfigError

PASSWORD_ENV = "TILESTREAM_SASL_PASSWORD"
PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
MAX_PEM_CHARS = 64 * 1024  # a certificate chain of a few EC or RSA certificates is a few KB


@dataclass(frozen=True)
class Connection:
    bootstrap: str
    security_protocol: str = "PLAINTEXT"
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    sasl_mechanism: str = "SCRAM-SHA-512"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cert_pem: str = field(default="", repr=False)  # client certificate chain, PEM text (device bundle)
    ssl_key_pem: str = field(default="", repr=False)  # its private key, PEM text: never logged

    def __post_init__(self) -> None:
        if self.security_protocol not in PROTOCOLS:
            raise ConfigError(f"security_protocol {self.security_protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if self.sasl and (self.sasl_mechanism not in SASL_MECHANISMS or not self.sasl_username or not self.sasl_password):
            raise ConfigError(f"{self.security_protocol} needs sasl_mechanism (one of {', '.join(SASL_MECHANISMS)}), "
                                   f"sasl_username and a password (${PASSWORD_ENV} or sasl_password_file)")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ConfigError("mutual TLS needs both ssl_certfile and ssl_keyfile")
        if bool(self.ssl_cert_pem) != bool(self.ssl_key_pem) or (self.ssl_cert_pem and self.ssl_certfile):
            raise ConfigError("mutual TLS needs one client certificate: ssl_certfile + ssl_keyfile, or a bundle's "
                              "certificate and key")
        for name in ("ssl_cert_pem", "ssl_key_pem"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > MAX_PEM_CHARS or (value and "-----BEGIN " not in value):
                raise ConfigError(f"{name} is not PEM text of at most {MAX_PEM_CHARS} characters")

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @classmethod
    def from_settings(cls, kafka, bootstrap: str | None = None, env: dict[str, str] | None = None,
                      credentials: dict | None = None) -> "Connection":
        """The connection described by ``[kafka]`` settings (``bootstrap`` overrides theirs).

        ``credentials``: a principal of its own, e.g. the camera's from its device bundle. Either
        ``sasl_username``, ``sasl_password`` (optional ``sasl_mechanism``): SASL over TLS; or
        ``ssl_certificate`` + ``ssl_key`` (PEM text): mutual TLS (``SSL``), the certificate is the
        principal.
        """
        env = os.environ if env is None else env
        if credentials and "ssl_certificate" in credentials:
            return cls(
                bootstrap=bootstrap or kafka.bootstrap or f"{kafka.host}:{kafka.port}", security_protocol="SSL",
                ssl_cafile=kafka.ssl_cafile, ssl_cert_pem=credentials["ssl_certificate"],
                ssl_key_pem=credentials.get("ssl_key", ""))
        if credentials:
            return cls(
                bootstrap=bootstrap or kafka.bootstrap or f"{kafka.host}:{kafka.port}", security_protocol="SASL_SSL",
                ssl_cafile=kafka.ssl_cafile, ssl_certfile=kafka.ssl_certfile, ssl_keyfile=kafka.ssl_keyfile,
                sasl_mechanism=credentials.get("sasl_mechanism", kafka.sasl_mechanism),
                sasl_username=credentials["sasl_username"], sasl_password=credentials["sasl_password"])
        password = env.get(PASSWORD_ENV, "")
        if not password and kafka.sasl_password_file:
            with open(os.path.expanduser(kafka.sasl_password_file), encoding="utf-8") as fh:
                password = fh.read().strip()
        return cls(
            bootstrap=bootstrap or kafka.bootstrap or f"{kafka.host}:{kafka.port}",
            security_protocol=kafka.security_protocol,
            ssl_cafile=kafka.ssl_cafile, ssl_certfile=kafka.ssl_certfile, ssl_keyfile=kafka.ssl_keyfile,
            sasl_mechanism=kafka.sasl_mechanism, sasl_username=kafka.sasl_username, sasl_password=password,
        )

    def with_bootstrap(self, bootstrap: str) -> "Connection":
        return replace(self, bootstrap=bootstrap)

    def ssl_context(self) -> ssl.SSLContext | None:
        """Server verification against the configured CA (system CAs when none), hostname checked."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ssl_cafile or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ssl_certfile:
            ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        elif self.ssl_cert_pem:
            _load_pem_chain(ctx, self.ssl_cert_pem, self.ssl_key_pem)
        return ctx

    def client_kwargs(self) -> dict[str, Any]:
        """Security keyword arguments shared by kafka-python and aiokafka clients (same names)."""
        kw: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "security_protocol": self.security_protocol}
        if self.tls:
            kw["ssl_context"] = self.ssl_context()
        if self.sasl:
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                      sasl_plain_password=self.sasl_password)
        return kw

    def __str__(self) -> str:  # what logs show: never a secret
        who = self.sasl_username if self.sasl else ("client certificate" if self.ssl_certfile or self.ssl_cert_pem else "")
        return f"{self.bootstrap} ({self.security_protocol}{', ' + who if who else ''})"


def _load_pem_chain(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """``ctx.load_cert_chain`` from PEM text. Python's ssl reads a chain only from a path, so the
    key goes through an anonymous in-memory file (memfd, Linux) that no other process can open by
    name and that is gone when closed; elsewhere through a 0600 temporary file removed at once."""
    data = (key_pem.strip() + "\n" + cert_pem.strip() + "\n").encode()
    try:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("tilestream-client-cert", os.MFD_CLOEXEC)
            try:
                os.write(fd, data)
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            return
        import tempfile

        with tempfile.NamedTemporaryFile(prefix="tilestream-client-", suffix=".pem") as tmp:  # mode 0600
            tmp.write(data)
            tmp.flush()
            ctx.load_cert_chain(tmp.name)
    except ssl.SSLError as exc:
        raise ConfigError(f"the client certificate and key do not load ({exc.reason or exc})") from None


def connection(where: "Connection | str") -> Connection:
    """A :class:`Connection` from a connection or a bare PLAINTEXT bootstrap string (tests, tools)."""
    return where if isinstance(where, Connection) else Connection(bootstrap=where)
