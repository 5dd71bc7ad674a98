"""The dashboard's web server: Kafka in, one server-sent-events stream of snapshots out.

It reads only the topics ``results``, ``dead-letters``, ``heartbeats`` and ``metrics``, with an
aiokafka consumer on the aiohttp event loop: no consumer group and no commits — every partition
is assigned and the reader starts ``window_s`` back in time (offsets by timestamp; the end where
the topic is younger), so a freshly opened dashboard is not empty. Records are aggregated by
:class:`dashboard.state.DashboardState`; one snapshot is computed every ``snapshot_interval_s``
and pushed to every browser as one SSE message (slow browsers skip snapshots, they never
queue them).

HTTP endpoints (all under the same port)::

    GET  /                  the page (static/index.html)             token required
    GET  /static/app.js     the page's script                        token required
    GET  /static/app.css    the page's style (also used by /login)   open
    GET  /events            text/event-stream, ``event: snapshot``   token required
    GET  /api/snapshot      the latest snapshot as JSON              token required
    GET  /login             login form;  POST /login (form field ``token``) sets the cookie
    POST /logout            clears the cookie
    GET  /healthz           {"status": "ok"|"degraded", "kafka": {...}}   open, 503 when Kafka is not read
    GET  /metrics           Prometheus text of the dashboard itself      open (no camera data in it)

Access control: one shared token, accepted as ``Authorization: Bearer <token>``, as ``?token=``
on any page (answered with a redirect to the same URL without it, setting an HttpOnly,
SameSite=Strict cookie) or through the login form. The cookie holds an HMAC of the token, not
the token. Tokens are compared in constant time (SHA-256 digests with hmac.compare_digest).
Wrong tokens are rate limited per client address. A server bound to anything but loopback
refuses to start without a token. The token is never logged: the access log records paths
without query strings.

Pixels: none. The dashboard never reads ``frames`` and holds no key that could open one;
``thumbnails=True`` is refused (not implemented).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from tilestream import topics
from tilestream.metrics import Metrics, setup_logging
from tilestream.records import AgentHeartbeat, DeadLetter, FrameResult, StageMetrics, TileLabel

from dashboard.state import DashboardState, StateConfig

log = logging.getLogger("tilestream.dashboard")

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "tilestream_dashboard"
TOPICS = (topics.RESULTS, topics.DEAD_LETTERS, topics.HEARTBEATS, topics.METRICS)
TOKEN_ENV = "TILESTREAM_DASHBOARD_TOKEN"

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class DashboardError(ValueError):
    """A configuration the dashboard refuses to start with (the message says what to do)."""


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public address


def check_config(host: str, token: str | None, thumbnails: bool = False) -> None:
    if thumbnails:
        raise DashboardError("thumbnails are not implemented: the dashboard shows labels and tile grids, never pixels")
    if not token and not is_loopback(host):
        raise DashboardError(
            f"refusing to serve the dashboard on {host!r} without a token: anyone who can reach that address would "
            f"see every camera. Pass --token (or set {TOKEN_ENV}), or bind to 127.0.0.1."
        )


# -- access control -----------------------------------------------------------------------
class TokenAuth:
    """One shared secret; ``enabled`` is False only for a loopback server started without one."""

    def __init__(self, token: str | None):
        self.enabled = bool(token)
        secret = (token or "").encode()
        self._digest = hashlib.sha256(secret).digest()
        # The cookie carries an HMAC of the token, so the token itself never sits in a cookie jar.
        self.session = hmac.new(secret, b"tilestream-dashboard-session-v1", hashlib.sha256).hexdigest()

    def check(self, given: str | None) -> bool:
        if given is None:
            return False
        return hmac.compare_digest(hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest(), self._digest)

    def check_cookie(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode("utf-8", "surrogatepass"), self.session.encode())

    def bearer(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None


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


def _login_page(message: str = "") -> str:
    note = f'<p class="login-error" role="alert">{message}</p>' if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>tilestream dashboard: sign in</title><link rel="stylesheet" href="/static/app.css"></head>
<body class="login"><form class="login-form" id="login" method="post" action="/login">
<h1>tilestream</h1><p>This dashboard needs its access token.</p>{note}
<label>Token <input type="password" name="token" autocomplete="current-password" autofocus required></label>
<button type="submit">Sign in</button></form></body></html>
"""


# -- snapshot fan-out ------------------------------------------------------------------------
class Hub:
    """The latest snapshot and a condition browsers wait on; a browser only ever gets the newest."""

    def __init__(self):
        self.version = 0
        self.payload: bytes | None = None
        self.published_at = 0.0  # time.monotonic()
        self.clients = 0
        self.closing = False
        self._cond = asyncio.Condition()

    async def publish(self, payload: bytes) -> None:
        async with self._cond:
            self.version += 1
            self.payload = payload
            self.published_at = time.monotonic()
            self._cond.notify_all()

    async def close(self) -> None:
        async with self._cond:
            self.closing = True
            self._cond.notify_all()

    async def next_after(self, version: int, timeout_s: float) -> tuple[int, bytes] | None:
        """The newest snapshot after ``version``, or None on timeout or when closing."""
        async with self._cond:
            try:
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: self.closing or (self.payload is not None and self.version != version)),
                    timeout_s,
                )
            except asyncio.TimeoutError:
                return None
            if self.closing or self.payload is None:
                return None
            return self.version, self.payload


# -- Kafka ---------------------------------------------------------------------------------
def _known_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def decode_record(topic: str, raw: bytes) -> Any:
    """The record of ``topic`` as its dataclass from tilestream.records (unknown fields ignored)."""
    d = json.loads(raw)
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    if topic == topics.RESULTS:
        d = _known_fields(FrameResult, d)
        d["tiles"] = [TileLabel(**_known_fields(TileLabel, t)) for t in d.get("tiles") or []]
        r = FrameResult(**d)
        r.latency_ms = float(r.latency_ms)
        r.probabilities = {str(k): float(v) for k, v in (r.probabilities or {}).items()}
        r.missing_tiles = list(r.missing_tiles or [])
        r.camera_id, r.label = str(r.camera_id), str(r.label)
        for t in r.tiles:
            t.x, t.y, t.w, t.h, t.label = int(t.x), int(t.y), int(t.w), int(t.h), str(t.label)
        return r
    if topic == topics.DEAD_LETTERS:
        d = _known_fields(DeadLetter, d)
        d["original"] = b""  # never kept: the dashboard does not show it (and it is still encrypted)
        dl = DeadLetter(**d)
        dl.reason, dl.stage = str(dl.reason), str(dl.stage)
        return dl
    if topic == topics.HEARTBEATS:
        hb = AgentHeartbeat(**_known_fields(AgentHeartbeat, d))
        hb.camera_id, hb.interval_s = str(hb.camera_id), float(hb.interval_s)
        hb.counters = {str(k): int(v) for k, v in (hb.counters or {}).items()}
        return hb
    if topic == topics.METRICS:
        m = StageMetrics(**_known_fields(StageMetrics, d))
        m.interval_s = float(m.interval_s)
        m.rates = {str(k): float(v) for k, v in (m.rates or {}).items()}
        m.consumer_lag = {str(k): int(v) for k, v in (m.consumer_lag or {}).items()}
        return m
    raise ValueError(f"not a dashboard topic: {topic}")


def _cancelling() -> bool:
    """Whether the current task itself is being cancelled (not a CancelledError leaking from a library)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _stop_quietly(consumer) -> None:
    try:
        await asyncio.wait_for(consumer.stop(), 10)
    except asyncio.CancelledError:
        if _cancelling():
            raise
    except Exception:  # noqa: BLE001 - closing a consumer of a lost broker may fail in many ways
        pass


class KafkaFeed:
    """Reads the four topics into the state, from ``window_s`` ago, reconnecting on errors.

    Records older than the end offsets found at assignment (the back-fill) are placed at their
    Kafka timestamp (never in the future); records that arrive live are placed at their arrival,
    so a camera's clock never decides whether it looks online.
    """

    def __init__(self, bootstrap: str, state: DashboardState, metrics: Metrics, window_s: float = 300.0):
        self.bootstrap = bootstrap
        self.state = state
        self.metrics = metrics
        self.window_s = window_s
        self.check_interval_s = 10.0
        self.connected = False
        self.error: str | None = None
        self.assigned: list[str] = []
        self.records = 0
        self.last_record_at: float | None = None
        self.positions: dict[Any, int] = {}
        self.live_from: dict[Any, int] = {}
        self._last_decode_log = 0.0

    def health(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "topics": self.assigned,
            "records": self.records,
            "last_record_age_s": None if self.last_record_at is None else round(time.time() - self.last_record_at, 1),
            "error": self.error,
        }

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer

        backoff = 0.5
        while True:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                client_id="tilestream-dashboard", auto_offset_reset="latest", fetch_max_wait_ms=250,
            )
            try:
                await consumer.start()
                await self._assign(consumer)
                self.connected, self.error, backoff = True, None, 0.5
                self.metrics.set("kafka_connected", 1)
                await self._consume(consumer)
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                error = "CancelledError inside the Kafka client"  # aiokafka leaks these on connection loss
            except Exception as exc:  # noqa: BLE001 - the feed must outlive broker outages
                error = f"{type(exc).__name__}: {exc}"
            finally:
                self.connected = False
                await _stop_quietly(consumer)
            self.error = error
            self.metrics.set("kafka_connected", 0)
            self.metrics.inc("kafka_errors_total")
            log.warning(json.dumps({"event": "kafka_error", "error": self.error, "retry_in_s": backoff}))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _consume(self, consumer) -> None:
        next_check = time.monotonic() + self.check_interval_s
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            now = time.time()
            for tp, records in batch.items():
                for rec in records:
                    self._apply(tp, rec, now)
            if time.monotonic() > next_check:
                # aiokafka retries a lost broker quietly; a metadata request tells health the truth
                # (a failure lands in the reconnect path of run(), which resumes at the same offsets).
                await asyncio.wait_for(consumer._client.fetch_all_metadata(), self.check_interval_s)
                if len(self.assigned) < len(TOPICS):
                    await self._assign(consumer)
                next_check = time.monotonic() + self.check_interval_s

    async def _assign(self, consumer) -> None:
        from aiokafka.structs import TopicPartition

        # consumer.topics() fetches fresh metadata but keeps only the names; the partitions are in the
        # same cluster metadata object, which aiokafka's client returns.
        cluster = await consumer._client.fetch_all_metadata()
        parts = []
        for topic in TOPICS:
            parts += [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]
        # Remember where the current assignment stands before it is replaced.
        for tp in consumer.assignment():
            try:
                self.positions[tp] = await consumer.position(tp)
            except Exception:  # noqa: BLE001
                pass
        consumer.assign(parts)
        new = [tp for tp in parts if tp not in self.positions]
        if new:
            since_ms = int((time.time() - self.window_s) * 1000)
            found = await consumer.offsets_for_times({tp: since_ms for tp in new})
            ends = await consumer.end_offsets(new)
            for tp in new:
                self.live_from[tp] = ends[tp]
                hit = found.get(tp)
                self.positions[tp] = hit.offset if hit is not None else ends[tp]
        for tp in parts:
            consumer.seek(tp, self.positions[tp])
        missing = sorted(set(TOPICS) - {tp.topic for tp in parts})
        self.assigned = sorted({tp.topic for tp in parts})
        log.info(json.dumps({"event": "kafka_assigned", "partitions": len(parts), "topics": self.assigned,
                             "missing_topics": missing, "window_s": self.window_s,
                             "backfill": sum(max(0, self.live_from[tp] - self.positions[tp]) for tp in parts)}))

    def _apply(self, tp, rec, now: float) -> None:
        self.positions[tp] = rec.offset + 1
        self.records += 1
        self.last_record_at = now
        self.metrics.inc("records_total", topic=tp.topic)
        if rec.offset < self.live_from.get(tp, 0):
            seen_at = min(now, rec.timestamp / 1000.0) if rec.timestamp and rec.timestamp > 0 else now
        else:
            seen_at = now
        try:
            record = decode_record(tp.topic, rec.value or b"")
            if tp.topic == topics.RESULTS:
                self.state.add_result(record, seen_at)
            elif tp.topic == topics.DEAD_LETTERS:
                self.state.add_dead_letter(record, seen_at)
            elif tp.topic == topics.HEARTBEATS:
                self.state.add_heartbeat(record, seen_at)
            else:
                self.state.add_stage_metrics(record, seen_at)
        except Exception as exc:  # noqa: BLE001 - a bad record is counted, never fatal
            self.metrics.inc("decode_errors_total", topic=tp.topic)
            if time.monotonic() - self._last_decode_log > 10:
                self._last_decode_log = time.monotonic()
                log.warning(json.dumps({"event": "record_skipped", "topic": tp.topic, "partition": tp.partition,
                                        "offset": rec.offset, "error": f"{type(exc).__name__}: {exc}"[:300]}))


class RateLimitFilter(logging.Filter):
    """One line per message template per ``every_s``: a lost broker makes aiokafka log the same error
    many times a second; the feed's own ``kafka_error`` events already say what is going on."""

    def __init__(self, every_s: float = 30.0):
        super().__init__()
        self.every_s = every_s
        self.last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < self.every_s:
            return False
        if len(self.last) > 1000:
            self.last.clear()
        self.last[key] = now
        return True


# -- the app -------------------------------------------------------------------------------
class AccessLog(AbstractAccessLogger):
    """One JSON line per request: method, path (never the query string: it may hold a token), status, time."""

    def log(self, request, response, time):  # noqa: A002 - aiohttp's signature
        quiet = request.path in ("/healthz", "/metrics")
        self.logger.log(logging.DEBUG if quiet else logging.INFO, json.dumps({
            "event": "http", "method": request.method, "path": request.path, "status": response.status,
            "ms": round(time * 1000, 1), "remote": request.remote,
        }))


STATE = web.AppKey("state", DashboardState)
HUB = web.AppKey("hub", Hub)
METRICS = web.AppKey("metrics", Metrics)
AUTH = web.AppKey("auth", TokenAuth)
LIMITER = web.AppKey("limiter", FailureLimiter)
FEED = web.AppKey("feed", KafkaFeed)
CONF = web.AppKey("conf", dict)

_OPEN = {"/healthz", "/metrics", "/login", "/static/app.css", "/favicon.ico"}


def _wants_html(request: web.Request) -> bool:
    return request.method == "GET" and not request.path.startswith(("/api/", "/events")) and \
        "text/html" in request.headers.get("Accept", "text/html")


def _unauthorized(request: web.Request, message: str = "") -> web.Response:
    request.app[METRICS].inc("http_unauthorized_total")
    headers = {"WWW-Authenticate": 'Bearer realm="tilestream-dashboard"', "Cache-Control": "no-store"}
    if _wants_html(request):
        return web.Response(status=401, text=_login_page(message), content_type="text/html", headers=headers)
    return web.json_response({"error": "unauthorized", "message": message or "token required"}, status=401, headers=headers)


def _set_session(request: web.Request, response: web.StreamResponse) -> None:
    response.set_cookie(COOKIE, request.app[AUTH].session, httponly=True, samesite="Strict", path="/",
                        secure=request.secure, max_age=7 * 24 * 3600)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for k, v in _SECURITY_HEADERS.items():
        response.headers.setdefault(k, v)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


@web.middleware
async def require_token(request: web.Request, handler):
    auth, limiter = request.app[AUTH], request.app[LIMITER]
    if not auth.enabled or request.path in _OPEN:
        return await handler(request)
    who, now = request.remote or "?", time.monotonic()
    given = request.query.get("token")
    bearer = auth.bearer(request)
    if (given is not None or bearer is not None) and limiter.blocked(who, now):
        return web.json_response({"error": "too many wrong tokens, try again later"}, status=429,
                                 headers={"Retry-After": str(int(limiter.window_s))})
    if given is not None:
        if not auth.check(given):
            limiter.failed(who, now)
            log.warning(json.dumps({"event": "auth_failed", "via": "query", "path": request.path, "remote": who}))
            return _unauthorized(request, "Wrong token.")
        # Good token in the URL: set the cookie and send the browser to the same URL without it.
        query = {k: v for k, v in request.query.items() if k != "token"}
        location = str(request.rel_url.with_query(query)) if query else request.path
        response = _redirect(location)
        _set_session(request, response)
        log.info(json.dumps({"event": "login", "via": "query", "remote": who}))
        return response
    if bearer is not None:
        if auth.check(bearer):
            return await handler(request)
        limiter.failed(who, now)
        log.warning(json.dumps({"event": "auth_failed", "via": "bearer", "path": request.path, "remote": who}))
        return _unauthorized(request, "Wrong token.")
    if auth.check_cookie(request.cookies.get(COOKIE)):
        return await handler(request)
    return _unauthorized(request)


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store", "Content-Type": "text/html; charset=utf-8"})


async def _static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ("app.js", "app.css"):
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})


async def _login_form(request: web.Request) -> web.Response:
    return web.Response(text=_login_page(), content_type="text/html", headers={"Cache-Control": "no-store"})


async def _login(request: web.Request) -> web.StreamResponse:
    auth, limiter = request.app[AUTH], request.app[LIMITER]
    who, now = request.remote or "?", time.monotonic()
    if limiter.blocked(who, now):
        return web.Response(status=429, text=_login_page("Too many wrong tokens: try again in a minute."),
                            content_type="text/html")
    form = await request.post()
    token = form.get("token")
    if not auth.enabled or (isinstance(token, str) and auth.check(token)):
        response = _redirect("/")
        if auth.enabled:
            _set_session(request, response)
        log.info(json.dumps({"event": "login", "via": "form", "remote": who}))
        return response
    limiter.failed(who, now)
    request.app[METRICS].inc("http_unauthorized_total")
    log.warning(json.dumps({"event": "auth_failed", "via": "form", "remote": who}))
    return web.Response(status=401, text=_login_page("Wrong token."), content_type="text/html")


async def _logout(request: web.Request) -> web.StreamResponse:
    response = _redirect("/login")
    response.del_cookie(COOKIE, path="/")
    return response


async def _snapshot(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    if hub.payload is None or time.monotonic() - hub.published_at > request.app[CONF]["snapshot_interval_s"]:
        await _publish(request.app)
    return web.Response(body=hub.payload, content_type="application/json", headers={"Cache-Control": "no-store"})


async def _events(request: web.Request) -> web.StreamResponse:
    app = request.app
    hub, metrics = app[HUB], app[METRICS]
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no",
    })
    await response.prepare(request)
    hub.clients += 1
    metrics.set("sse_clients", hub.clients)
    log.info(json.dumps({"event": "sse_connected", "clients": hub.clients, "remote": request.remote}))
    seen = -1
    try:
        await response.write(b"retry: 2000\n\n")
        while not hub.closing:
            got = await hub.next_after(seen, app[CONF]["keepalive_s"])
            if got is None:
                if hub.closing:
                    break
                await response.write(b": keepalive\n\n")
                continue
            seen, payload = got
            await response.write(b"event: snapshot\nid: %d\ndata: %s\n\n" % (seen, payload))
            metrics.inc("sse_messages_total")
    except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
        pass
    finally:
        hub.clients -= 1
        metrics.set("sse_clients", hub.clients)
        log.info(json.dumps({"event": "sse_disconnected", "clients": hub.clients}))
    return response


async def _no_content(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Cache-Control": "max-age=86400"})


async def _healthz(request: web.Request) -> web.Response:
    app = request.app
    feed = app.get(FEED)
    kafka = feed.health() if feed is not None else {"connected": None, "disabled": True}
    ok = feed is None or feed.connected
    body = {"status": "ok" if ok else "degraded", "kafka": kafka, "clients": app[HUB].clients,
            "cameras": len(app[STATE].cameras), "auth": app[AUTH].enabled}
    return web.json_response(body, status=200 if ok else 503)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[METRICS].render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


async def _publish(app: web.Application) -> None:
    state, metrics = app[STATE], app[METRICS]
    t0 = time.perf_counter()
    snap = state.snapshot(time.time())
    payload = json.dumps(snap, separators=(",", ":")).encode()
    metrics.observe("snapshot_seconds", time.perf_counter() - t0)
    metrics.inc("snapshots_total")
    metrics.set("snapshot_bytes", len(payload))
    metrics.set("cameras", snap["totals"]["cameras"])
    metrics.set("cameras_online", snap["totals"]["online"])
    await app[HUB].publish(payload)


async def _snapshot_loop(app: web.Application) -> None:
    interval = app[CONF]["snapshot_interval_s"]
    while True:
        started = time.monotonic()
        try:
            if app[HUB].clients:  # computed only for someone (/api/snapshot computes its own when stale)
                await _publish(app)
        except Exception:  # noqa: BLE001 - a failing snapshot must not stop the dashboard
            log.exception(json.dumps({"event": "snapshot_failed"}))
        await asyncio.sleep(max(0.05, interval - (time.monotonic() - started)))


async def _background(app: web.Application):
    tasks = [asyncio.create_task(_snapshot_loop(app), name="dashboard-snapshots")]
    if FEED in app:
        tasks.append(asyncio.create_task(app[FEED].run(), name="dashboard-kafka"))
    yield
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _on_shutdown(app: web.Application) -> None:
    await app[HUB].close()  # ends every open event stream, so shutdown does not wait for browsers


def create_app(
    bootstrap: str | None,
    token: str | None,
    *,
    host: str = "127.0.0.1",
    thumbnails: bool = False,
    window_s: float = 300.0,
    snapshot_interval_s: float = 0.5,
    keepalive_s: float = 15.0,
    state: DashboardState | None = None,
    state_config: StateConfig | None = None,
) -> web.Application:
    """The dashboard as an aiohttp application; ``bootstrap=None`` runs it without Kafka (tests feed ``state``)."""
    check_config(host, token, thumbnails)
    app = web.Application(middlewares=[require_token])
    app.on_response_prepare.append(_security_headers)
    app[STATE] = state or DashboardState(state_config)
    app[HUB] = Hub()
    app[METRICS] = Metrics("tilestream_dashboard")
    app[AUTH] = TokenAuth(token)
    app[LIMITER] = FailureLimiter()
    app[CONF] = {"snapshot_interval_s": snapshot_interval_s, "keepalive_s": keepalive_s}
    if bootstrap:
        app[FEED] = KafkaFeed(bootstrap, app[STATE], app[METRICS], window_s)
    app.router.add_get("/", _index)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/events", _events)
    app.router.add_get("/api/snapshot", _snapshot)
    app.router.add_get("/login", _login_form)
    app.router.add_post("/login", _login)
    app.router.add_post("/logout", _logout)
    app.router.add_get("/favicon.ico", _no_content)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_on_shutdown)
    return app


def run_dashboard(bootstrap: str, host: str, port: int, token: str | None, thumbnails: bool = False, *,
                  window_s: float = 300.0, snapshot_interval_s: float = 0.5) -> None:
    """Serve the dashboard until SIGINT/SIGTERM (blocking). Raises DashboardError on a refused configuration."""
    if not logging.getLogger().handlers:
        setup_logging(os.environ.get("TILESTREAM_LOG_LEVEL", "INFO"))
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not any(isinstance(f, RateLimitFilter) for f in logging.getLogger("aiokafka").filters):
        for name in ("aiokafka", "aiokafka.consumer.fetcher", "aiokafka.conn", "aiokafka.cluster"):
            logging.getLogger(name).addFilter(RateLimitFilter())
    app = create_app(bootstrap, token, host=host, thumbnails=thumbnails, window_s=window_s,
                     snapshot_interval_s=snapshot_interval_s)
    if not token:
        log.warning(json.dumps({"event": "no_token", "message": f"no token: anyone on this machine can open the dashboard on {host}"}))
    elif len(token) < 16:
        log.warning(json.dumps({"event": "weak_token", "message": "the token is shorter than 16 characters"}))
    url_host = f"[{host}]" if ":" in host else host
    log.info(json.dumps({"event": "dashboard_listening", "url": f"http://{url_host}:{port}/", "auth": bool(token),
                         "bootstrap": bootstrap, "window_s": window_s}))
    web.run_app(app, host=host, port=port, print=None, access_log_class=AccessLog, access_log=log,
                shutdown_timeout=5.0, handle_signals=True)


class DashboardThread:
    """The app served on its own event loop in a daemon thread (tests, embedding); ``stop()`` ends it."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        import threading

        self.app, self.host, self.port = app, host, port
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="dashboard", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        self.loop.close()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log_class=AccessLog, access_log=log, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for

    def start(self) -> "DashboardThread":
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self._runner is not None and self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(30)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
