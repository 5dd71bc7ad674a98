"""The dashboard's web server: routes, the server-sent-events fan-out, and the wiring of the app.

The parts, one job each: :mod:`dashboard.auth` (Host allow-list, token, sessions, login, rate
limiting), :mod:`dashboard.feed` (the Kafka reader and the checking of every record),
:mod:`dashboard.state` (pure aggregation into one bounded snapshot), and this module. One
snapshot is computed every ``snapshot_interval_s`` (only while someone watches) and pushed to
every browser as one SSE message; slow browsers skip snapshots, they never queue them.

HTTP endpoints (all under the same port; every one first passes the Host check)::

    GET  /                  the page (static/index.html)             token required
    GET  /static/app.js     the page's script                        token required
    GET  /static/app.css    the page's style (also used by /login)   open
    GET  /events            text/event-stream, ``event: snapshot``   token required, at most max_sse_clients
    GET  /api/snapshot      the latest snapshot as JSON              token required
    GET  /login             login form;  POST /login (form field ``token``) opens a session
    POST /logout            revokes the session and clears the cookie
    GET  /healthz           {"status": "ok"|"degraded", "kafka": {...}}   open, 503 when Kafka is not read
    GET  /metrics           Prometheus text of the dashboard itself      open (no camera data in it)

Bounds: ``max_sse_clients`` open event streams (default 100; one more gets 503 with Retry-After:
each stream holds a task and a socket, and every snapshot is written to each); one snapshot's
JSON is at most ``StateConfig.max_snapshot_bytes`` (the state fits what it can; should a snapshot
still be larger, a stripped one is sent and ``snapshot_oversize_total`` counted).

Pixels: none. The dashboard never reads ``frames`` and holds no key that could open one;
``thumbnails=True`` is refused (not implemented).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from kafkaio import Connection
from tilestream.metrics import Metrics, setup_logging

from dashboard.auth import (ACCESS, COOKIE, SESSION_TTL_S, TOKEN_ENV, Access, DashboardError, check_bind,
                            check_config, check_host, is_loopback, login, login_form, logout, require_token)
from dashboard.feed import TOPICS, KafkaFeed, RecordLimits, decode, quiet_kafka_logs
from dashboard.state import DashboardState, StateConfig

__all__ = ["COOKIE", "TOKEN_ENV", "TOPICS", "DashboardError", "DashboardThread", "check_config", "create_app",
           "decode", "is_loopback", "run_dashboard"]

log = logging.getLogger("tilestream.dashboard")

STATIC = Path(__file__).resolve().parent / "static"
MAX_SSE_CLIENTS = 100

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


# -- snapshot fan-out ------------------------------------------------------------------------
class Hub:
    """The latest snapshot and a condition browsers wait on; a browser only ever gets the newest."""

    def __init__(self, max_clients: int = MAX_SSE_CLIENTS):
        self.version = 0
        self.payload: bytes | None = None
        self.published_at = 0.0  # time.monotonic()
        self.clients = 0
        self.max_clients = max_clients
        self.closing = False
        self._cond = asyncio.Condition()

    def join(self) -> bool:
        """Take a client slot (False when all ``max_clients`` are taken); synchronous, so no race."""
        if self.clients >= self.max_clients:
            return False
        self.clients += 1
        return True

    def leave(self) -> None:
        self.clients -= 1

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
FEED = web.AppKey("feed", KafkaFeed)
CONF = web.AppKey("conf", dict)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for k, v in _SECURITY_HEADERS.items():
        response.headers.setdefault(k, v)


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store", "Content-Type": "text/html; charset=utf-8"})


async def _static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ("app.js", "app.css"):
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})


async def _snapshot(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    if hub.payload is None or time.monotonic() - hub.published_at > request.app[CONF]["snapshot_interval_s"]:
        await _publish(request.app)
    return web.Response(body=hub.payload, content_type="application/json", headers={"Cache-Control": "no-store"})


async def _events(request: web.Request) -> web.StreamResponse:
    app = request.app
    hub, metrics = app[HUB], app[METRICS]
    if not hub.join():
        metrics.inc("sse_refused_total")
        log.warning(json.dumps({"event": "sse_refused", "clients": hub.clients, "remote": request.remote}))
        return web.json_response({"error": "too many open event streams, try again later"}, status=503,
                                 headers={"Retry-After": "10", "Cache-Control": "no-store"})
    try:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no",
        })
        metrics.set("sse_clients", hub.clients)
        log.info(json.dumps({"event": "sse_connected", "clients": hub.clients, "remote": request.remote}))
        await response.prepare(request)
        seen = -1
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
        hub.leave()
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
            "cameras": len(app[STATE].cameras), "auth": app[ACCESS].enabled}
    return web.json_response(body, status=200 if ok else 503)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[METRICS].render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


def snapshot_payload(state: DashboardState, now: float, metrics: Metrics | None = None) -> bytes:
    """One snapshot as compact JSON, never larger than the state's ``max_snapshot_bytes``."""
    snap = state.snapshot(now)
    payload = json.dumps(snap, separators=(",", ":")).encode()
    limit = state.config.max_snapshot_bytes
    if len(payload) > limit:  # the state's budget should prevent it: the last line of defence
        if metrics is not None:
            metrics.inc("snapshot_oversize_total")
        log.error(json.dumps({"event": "snapshot_oversize", "bytes": len(payload), "limit": limit}))
        snap["cameras"], snap["pipeline"]["stages"], snap["pipeline"]["lag"] = [], [], []
        snap["dead_letters"]["recent"], snap["dead_letters"]["minutes"] = [], []
        snap["totals"]["omitted"] = {"cameras": snap["totals"]["cameras"], "stage_instances": None, "lag_rows": None}
        payload = json.dumps(snap, separators=(",", ":")).encode()
        if len(payload) > limit:
            payload = json.dumps({"type": "snapshot", "generated_at": round(now, 3), "error": "snapshot too large"}).encode()
    return payload


async def _publish(app: web.Application) -> None:
    state, metrics = app[STATE], app[METRICS]
    t0 = time.perf_counter()
    payload = snapshot_payload(state, time.time(), metrics)
    metrics.observe("snapshot_seconds", time.perf_counter() - t0)
    metrics.inc("snapshots_total")
    metrics.set("snapshot_bytes", len(payload))
    metrics.set("cameras", len(state.cameras))
    metrics.set("cameras_refused", state.cameras_refused)
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
    where: Connection | str | None,
    token: str | None = None,
    *,
    token_file: str | None = None,
    host: str = "127.0.0.1",
    allowed_hosts: Iterable[str] = (),
    thumbnails: bool = False,
    window_s: float = 300.0,
    snapshot_interval_s: float = 0.5,
    keepalive_s: float = 15.0,
    max_sse_clients: int = MAX_SSE_CLIENTS,
    session_ttl_s: float = SESSION_TTL_S,
    limits: RecordLimits | None = None,
    state: DashboardState | None = None,
    state_config: StateConfig | None = None,
) -> web.Application:
    """The dashboard as an aiohttp application; ``where=None`` runs it without Kafka (tests feed ``state``).

    ``token`` is a fixed token (embedding, tests); ``token_file`` a file re-read when it changes
    (what the CLIs use). Raises DashboardError on a configuration it refuses.
    """
    allowed_hosts = [h for h in allowed_hosts if h.strip()]
    check_config(host, token or token_file, thumbnails)
    check_bind(host, allowed_hosts)
    if max_sse_clients < 1:
        raise DashboardError("max_sse_clients must be at least 1")
    metrics = Metrics("tilestream_dashboard")
    app = web.Application(middlewares=[check_host, require_token])
    app.on_response_prepare.append(_security_headers)
    app[STATE] = state or DashboardState(state_config)
    app[HUB] = Hub(max_sse_clients)
    app[METRICS] = metrics
    app[ACCESS] = Access(token, token_file=token_file, bind_host=host, allowed_hosts=allowed_hosts,
                         session_ttl_s=session_ttl_s, metrics=metrics)
    app[CONF] = {"snapshot_interval_s": snapshot_interval_s, "keepalive_s": keepalive_s}
    if where:
        app[FEED] = KafkaFeed(where, app[STATE], metrics, window_s, limits)
    app.router.add_get("/", _index)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/events", _events)
    app.router.add_get("/api/snapshot", _snapshot)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/favicon.ico", _no_content)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_on_shutdown)
    return app


def run_dashboard(where: Connection | str, host: str, port: int, token: str | None = None, thumbnails: bool = False, *,
                  token_file: str | None = None, allowed_hosts: Iterable[str] = (), window_s: float = 300.0,
                  snapshot_interval_s: float = 0.5, max_sse_clients: int = MAX_SSE_CLIENTS,
                  session_ttl_s: float = SESSION_TTL_S, limits: RecordLimits | None = None,
                  state_config: StateConfig | None = None) -> None:
    """Serve the dashboard until SIGINT/SIGTERM (blocking). Raises DashboardError on a refused configuration."""
    if not logging.getLogger().handlers:
        setup_logging(os.environ.get("TILESTREAM_LOG_LEVEL", "INFO"))
    quiet_kafka_logs()
    app = create_app(where, token, token_file=token_file, host=host, allowed_hosts=allowed_hosts,
                     thumbnails=thumbnails, window_s=window_s, snapshot_interval_s=snapshot_interval_s,
                     max_sse_clients=max_sse_clients, session_ttl_s=session_ttl_s, limits=limits,
                     state_config=state_config)
    if not (token or token_file):
        log.warning(json.dumps({"event": "no_token", "message": f"no token: anyone on this machine can open the dashboard on {host}"}))
    elif token is not None and len(token) < 16:
        log.warning(json.dumps({"event": "weak_token", "message": "the token is shorter than 16 characters"}))
    url_host = f"[{host}]" if ":" in host else host
    log.info(json.dumps({"event": "dashboard_listening", "url": f"http://{url_host}:{port}/", "auth": bool(token or token_file),
                         "kafka": str(where), "window_s": window_s, "allowed_hosts": sorted(app[ACCESS].hosts.allowed),
                         "max_sse_clients": max_sse_clients, "session_ttl_s": session_ttl_s}))
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

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's loop and return its result (tests poke the state there)."""
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def stop(self) -> None:
        if self._runner is not None and self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(30)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
