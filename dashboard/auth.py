"""Who may see the dashboard: the Host allow-list, the token, sessions, login/logout, rate limiting.

Checked in this order for every request, before any handler runs (so a refusal costs no work):

1. **Host allow-list** (:class:`HostCheck`): the ``Host`` header must name the server — loopback
   names (``localhost``, ``127.0.0.1``, ``::1``), the bind address unless it is a wildcard, and
   whatever ``allowed_hosts`` adds. Anything else is answered ``421 Misdirected Request``. Why:
   a loopback dashboard without a token is otherwise readable by any web page the operator
   opens, through DNS rebinding (``evil.example`` re-resolved to 127.0.0.1 is same-origin for
   the attacker's script, and its requests carry ``Host: evil.example``). A server bound to a
   wildcard (``0.0.0.0``, ``::``) must be told its names (``--allowed-host``) or it refuses to start.
2. **Token or session** (:class:`Access`): one shared token, from ``$TILESTREAM_DASHBOARD_TOKEN``
   or a file (``--token-file``; never from the command line, where ``ps`` shows it to every
   user). It is accepted as ``Authorization: Bearer <token>``, as ``?token=`` (answered with a
   redirect without it) and through the login form; the last two open a **session**: a random
   256-bit id in an HttpOnly, SameSite=Strict cookie, held server-side (:class:`SessionStore`,
   SHA-256 of the id only) with an absolute lifetime (``session_ttl_s``, 12 h by default).
   Logout revokes the session; a changed token (the token file is re-read when its mtime or
   size changes) revokes every session; a restart forgets them all. Tokens are compared in
   constant time (SHA-256 digests with ``hmac.compare_digest``).
3. **Rate limit** (:class:`FailureLimiter`): at most 20 wrong tokens per client address a minute.

The token is never logged: the access log records paths without query strings.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import os
import secrets
import stat
import time
from typing import Callable, Iterable

from aiohttp import web

from tilestream.errors import ConfigError
from tilestream.metrics import Metrics

log = logging.getLogger("tilestream.dashboard")

TOKEN_ENV = "TILESTREAM_DASHBOARD_TOKEN"
COOKIE = "tilestream_dashboard"
SESSION_TTL_S = 12 * 3600.0
# Paths open without a token (they carry no camera data); the Host check still applies to them.
OPEN_PATHS = frozenset({"/healthz", "/metrics", "/login", "/static/app.css", "/favicon.ico"})
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "127.0.0.1", "::1")


class DashboardError(ConfigError):
    """A configuration the dashboard refuses to start with (the message says what to do)."""


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public address


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def check_config(host: str, token: str | None, thumbnails: bool = False) -> None:
    if thumbnails:
        raise DashboardError("thumbnails are not implemented: the dashboard shows labels and tile grids, never pixels")
    if not token and not is_loopback(host):
        raise DashboardError(
            f"refusing to serve the dashboard on {host!r} without a token: anyone who can reach that address would "
            f"see every camera. Set ${TOKEN_ENV} or pass --token-file, or bind to 127.0.0.1."
        )


# -- the token -----------------------------------------------------------------------------------
def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path`` (surrounding whitespace stripped); refused when others may read the file."""
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            raw = fh.read(4097)
    except OSError as exc:
        raise DashboardError(f"cannot read the token file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise DashboardError(f"the token file {path} is readable by other users: chmod 600 {path}")
    if len(raw) > 4096:
        raise DashboardError(f"the token file {path} is larger than 4 KiB: is it the right file?")
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DashboardError(f"the token file {path} is not UTF-8 text") from None
    if not token:
        raise DashboardError(f"the token file {path} is empty")
    return token


def load_token(token_file: str | None = None, env: dict[str, str] | None = None) -> str | None:
    """The token of a CLI start: ``token_file`` when given, else ``$TILESTREAM_DASHBOARD_TOKEN``, else None."""
    if token_file:
        return read_token_file(token_file)
    env = os.environ if env is None else env
    return env.get(TOKEN_ENV, "").strip() or None


class TokenSource:
    """The current token: fixed, or the content of a token file re-read whenever the file changes.

    ``on_change`` is called when the token changes (the sessions are revoked there). A token file
    that becomes unreadable or empty leaves no valid token: every token is refused (fail closed).
    """

    def __init__(self, token: str | None = None, path: str | os.PathLike[str] | None = None,
                 on_change: Callable[[], None] | None = None):
        self.path = os.fspath(path) if path else None
        self.on_change = on_change
        self._stamp: tuple | None = None
        self._digest: bytes | None = None
        if self.path:
            self._stamp = self._file_stamp()
            token = read_token_file(self.path)
        self.enabled = bool(token) or bool(self.path)
        self._set(token)

    def _set(self, token: str | None) -> None:
        self._digest = hashlib.sha256(token.encode()).digest() if token else None

    def _file_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)  # type: ignore[arg-type]
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def refresh(self) -> None:
        """Re-read the token file if it changed (one stat per call: microseconds)."""
        if not self.path:
            return
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        old = self._digest
        try:
            self._set(read_token_file(self.path))
        except DashboardError as exc:
            self._digest = None
            log.error(json.dumps({"event": "token_file_unusable", "error": str(exc)}))
        if self._digest != old:
            log.warning(json.dumps({"event": "token_changed", "sessions": "revoked"}))
            if self.on_change is not None:
                self.on_change()

    def check(self, given: str | None) -> bool:
        self.refresh()
        if given is None or self._digest is None:
            return False
        return hmac.compare_digest(hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest(), self._digest)


# -- sessions ------------------------------------------------------------------------------------
class SessionStore:
    """Server-side sessions: random ids, an absolute lifetime, revocable one by one or all at once.

    Only SHA-256 of each id is kept. At most ``max_sessions`` live sessions; a new one beyond that
    evicts the oldest (a flood of logins cannot grow memory). ``clock`` is time.monotonic by
    default (tests move it by hand).
    """

    def __init__(self, ttl_s: float = SESSION_TTL_S, max_sessions: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        if not ttl_s > 0:
            raise DashboardError("session_ttl_s must be positive")
        self.ttl_s, self.max_sessions, self.clock = ttl_s, max_sessions, clock
        self._expires: dict[bytes, float] = {}

    @staticmethod
    def _key(session_id: str) -> bytes:
        return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()

    def create(self) -> str:
        now = self.clock()
        self._expire(now)
        while len(self._expires) >= self.max_sessions:
            self._expires.pop(next(iter(self._expires)))
        session_id = secrets.token_urlsafe(32)
        self._expires[self._key(session_id)] = now + self.ttl_s
        return session_id

    def valid(self, session_id: str | None) -> bool:
        if not session_id or len(session_id) > 128:
            return False
        key = self._key(session_id)
        expires = self._expires.get(key)
        if expires is None:
            return False
        if self.clock() >= expires:
            del self._expires[key]
            return False
        return True

    def revoke(self, session_id: str | None) -> bool:
        return bool(session_id) and self._expires.pop(self._key(session_id), None) is not None  # type: ignore[arg-type]

    def revoke_all(self) -> None:
        self._expires.clear()

    def _expire(self, now: float) -> None:
        for key in [k for k, e in self._expires.items() if e <= now]:
            del self._expires[key]

    def __len__(self) -> int:
        return len(self._expires)


class FailureLimiter:
    """At most ``limit`` wrong tokens per client address per ``window_s``; then 429 until they age out."""

    def __init__(self, limit: int = 20, window_s: float = 60.0, max_clients: int = 10_000):
        self.limit, self.window_s, self.max_clients = limit, window_s, max_clients
        self.failures: dict[str, collections.deque] = {}

    def _recent(self, who: str, now: float) -> collections.deque | None:
        dq = self.failures.get(who)
        if dq is not None:
            while dq and dq[0] < now - self.window_s:
                dq.popleft()
        return dq

    def blocked(self, who: str, now: float) -> bool:
        dq = self._recent(who, now)
        return dq is not None and len(dq) >= self.limit

    def failed(self, who: str, now: float) -> None:
        if who not in self.failures and len(self.failures) >= self.max_clients:
            self.failures.pop(next(iter(self.failures)))
        self._recent(who, now)
        self.failures.setdefault(who, collections.deque()).append(now)


# -- Host header ---------------------------------------------------------------------------------
def host_name(header: str | None) -> str | None:
    """The host of a ``Host`` header, lower case, without port or trailing dot (None if malformed)."""
    if not header or len(header) > 255:
        return None
    h = header.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        if end < 0 or (h[end + 1:] and not h[end + 1:].startswith(":")):
            return None
        return h[1:end] or None
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    elif ":" in h:
        return None  # an IPv6 literal must be bracketed in a Host header
    return h.rstrip(".") or None


class HostCheck:
    """The names this server answers to (see the module docstring)."""

    def __init__(self, bind_host: str, allowed_hosts: Iterable[str] = ()):
        names = set(_LOOPBACK_NAMES)
        if not is_wildcard(bind_host):
            names.add(bind_host.strip("[]").lower())
        names.update(h.strip().strip("[]").lower().rstrip(".") for h in allowed_hosts if h.strip())
        self.allowed = frozenset(names)

    def ok(self, header: str | None) -> bool:
        return host_name(header) in self.allowed


def check_bind(host: str, allowed_hosts: Iterable[str]) -> None:
    if is_wildcard(host) and not [h for h in allowed_hosts if h.strip()]:
        raise DashboardError(
            f"the dashboard bound to {host!r} answers only to the names it is given: pass --allowed-host NAME "
            f"(repeatable) for each name or address browsers use to reach it")


# -- the access object and its middleware ---------------------------------------------------------
class Access:
    """Token, sessions, rate limit and Host check of one app."""

    def __init__(self, token: str | None, *, token_file: str | None = None, bind_host: str = "127.0.0.1",
                 allowed_hosts: Iterable[str] = (), session_ttl_s: float = SESSION_TTL_S,
                 metrics: Metrics | None = None):
        self.sessions = SessionStore(session_ttl_s)
        self.token = TokenSource(token, token_file, on_change=self.sessions.revoke_all)
        self.limiter = FailureLimiter()
        self.hosts = HostCheck(bind_host, allowed_hosts)
        self.metrics = metrics or Metrics("tilestream_dashboard")

    @property
    def enabled(self) -> bool:
        return self.token.enabled

    def set_token(self, token: str) -> None:
        """Replace a fixed token (embedding, tests): every session is revoked."""
        self.token._set(token)
        self.token.enabled = True
        self.sessions.revoke_all()


ACCESS = web.AppKey("access", Access)


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def login_page(message: str = "") -> str:
    note = f'<p class="login-error" role="alert">{html.escape(message)}</p>' if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>tilestream dashboard: sign in</title><link rel="stylesheet" href="/static/app.css"></head>
<body class="login"><form class="login-form" id="login" method="post" action="/login">
<h1>tilestream</h1><p>This dashboard needs its access token.</p>{note}
<label>Token <input type="password" name="token" autocomplete="current-password" autofocus required></label>
<button type="submit">Sign in</button></form></body></html>
"""


def _wants_html(request: web.Request) -> bool:
    return request.method == "GET" and not request.path.startswith(("/api/", "/events")) and \
        "text/html" in request.headers.get("Accept", "text/html")


def unauthorized(request: web.Request, message: str = "") -> web.Response:
    request.app[ACCESS].metrics.inc("http_unauthorized_total")
    headers = {"WWW-Authenticate": 'Bearer realm="tilestream-dashboard"', "Cache-Control": "no-store"}
    if _wants_html(request):
        return web.Response(status=401, text=login_page(message), content_type="text/html", headers=headers)
    return web.json_response({"error": "unauthorized", "message": message or "token required"}, status=401, headers=headers)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _start_session(request: web.Request, response: web.StreamResponse) -> None:
    access = request.app[ACCESS]
    response.set_cookie(COOKIE, access.sessions.create(), httponly=True, samesite="Strict", path="/",
                        secure=request.secure, max_age=int(access.sessions.ttl_s))
    access.metrics.set("sessions", len(access.sessions))


@web.middleware
async def check_host(request: web.Request, handler):
    """First middleware: a request for a name this server does not have gets 421 and nothing else."""
    access = request.app[ACCESS]
    if not access.hosts.ok(request.headers.get("Host")):
        access.metrics.inc("http_wrong_host_total")
        return web.Response(status=421, text="misdirected request: unknown Host\n", headers={"Cache-Control": "no-store"})
    return await handler(request)


@web.middleware
async def require_token(request: web.Request, handler):
    access = request.app[ACCESS]
    if not access.enabled or request.path in OPEN_PATHS:
        return await handler(request)
    limiter = access.limiter
    who, now = request.remote or "?", time.monotonic()
    given = request.query.get("token")
    token = bearer(request)
    if (given is not None or token is not None) and limiter.blocked(who, now):
        return web.json_response({"error": "too many wrong tokens, try again later"}, status=429,
                                 headers={"Retry-After": str(int(limiter.window_s))})
    if given is not None:
        if not access.token.check(given):
            limiter.failed(who, now)
            log.warning(json.dumps({"event": "auth_failed", "via": "query", "path": request.path, "remote": who}))
            return unauthorized(request, "Wrong token.")
        # Good token in the URL: open a session and send the browser to the same URL without it.
        query = {k: v for k, v in request.query.items() if k != "token"}
        response = _redirect(str(request.rel_url.with_query(query)) if query else request.path)
        _start_session(request, response)
        log.info(json.dumps({"event": "login", "via": "query", "remote": who}))
        return response
    if token is not None:
        if access.token.check(token):
            return await handler(request)
        limiter.failed(who, now)
        log.warning(json.dumps({"event": "auth_failed", "via": "bearer", "path": request.path, "remote": who}))
        return unauthorized(request, "Wrong token.")
    access.token.refresh()  # a changed token file revokes the sessions before this one is checked
    if access.sessions.valid(request.cookies.get(COOKIE)):
        return await handler(request)
    return unauthorized(request, "Your session has ended: sign in again." if COOKIE in request.cookies else "")


async def login_form(request: web.Request) -> web.Response:
    return web.Response(text=login_page(), content_type="text/html", headers={"Cache-Control": "no-store"})


async def login(request: web.Request) -> web.StreamResponse:
    access = request.app[ACCESS]
    limiter = access.limiter
    who, now = request.remote or "?", time.monotonic()
    if limiter.blocked(who, now):
        return web.Response(status=429, text=login_page("Too many wrong tokens: try again in a minute."),
                            content_type="text/html")
    form = await request.post()
    token = form.get("token")
    if not access.enabled or (isinstance(token, str) and access.token.check(token)):
        response = _redirect("/")
        if access.enabled:
            _start_session(request, response)
        log.info(json.dumps({"event": "login", "via": "form", "remote": who}))
        return response
    limiter.failed(who, now)
    access.metrics.inc("http_unauthorized_total")
    log.warning(json.dumps({"event": "auth_failed", "via": "form", "remote": who}))
    return web.Response(status=401, text=login_page("Wrong token."), content_type="text/html")


async def logout(request: web.Request) -> web.StreamResponse:
    """Revokes the session server-side (a copied cookie stops working too) and clears the cookie."""
    access = request.app[ACCESS]
    if access.sessions.revoke(request.cookies.get(COOKIE)):
        log.info(json.dumps({"event": "logout", "remote": request.remote}))
    access.metrics.set("sessions", len(access.sessions))
    response = _redirect("/login")
    response.del_cookie(COOKIE, path="/")
    return response
