"""The dashboard's HTTP side: Host allow-list, access control and sessions, SSE framing and its
cap, health, metrics, logging, the CLIs' token rules; and the Kafka feed's refusal of forged
records (over size, over the tile bound, a grid too large) on a real broker.

The app runs on a free loopback port in a thread (dashboard.server.DashboardThread) with a
hand-filled DashboardState, or fed by the module's real broker; the live dashboard with the whole
pipeline is tested in a real browser in test_dashboard_browser.py.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import subprocess
import sys
import time
import urllib.parse

import pytest

from conftest import wait_for
from dashboard.auth import ACCESS, SessionStore, TokenSource, host_name, read_token_file
from dashboard.feed import RecordLimits, decode
from dashboard.server import COOKIE, HUB, DashboardError, DashboardThread, check_config, create_app, is_loopback
from dashboard.state import DashboardState, StateConfig
from tilestream import topics
from tilestream.records import AgentHeartbeat, DeadLetter, FrameResult, RecordError, StageMetrics, TileLabel

TOKEN = "s3cret-token-for-tests-0123456789"


def _state() -> DashboardState:
    s = DashboardState()
    now = time.time()
    s.add_result(FrameResult("cam-a", 1, "cam-a/1", 0, 0, 42.0, "person", {"person": 0.8, "background": 0.2},
                             [TileLabel(0, 0, 0, 64, 64, "person", 0.8)], True, 1, [], "m", 3), now)
    s.add_heartbeat(AgentHeartbeat("cam-a", "0.1.0", 0, 1.0, {"skipped": 1}), now)
    s.add_dead_letter(DeadLetter("processor", "bad_signature", "nope", b"x", "cam-a/2"), now)
    return s


@pytest.fixture
def server():
    dash = DashboardThread(create_app(None, TOKEN, state=_state(), snapshot_interval_s=0.2)).start()
    try:
        yield dash
    finally:
        dash.stop()


def request(dash, method, path, headers=None, body=None):
    conn = http.client.HTTPConnection(dash.host, dash.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_bind_rules_and_token_comparison():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.5")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("dash.example") and not is_loopback("")
    check_config("127.0.0.1", None)  # loopback without a token: allowed (and warned about by run_dashboard)
    check_config("0.0.0.0", "tok")
    with pytest.raises(DashboardError, match="without a token"):
        check_config("0.0.0.0", None)
    with pytest.raises(DashboardError, match="without a token"):
        create_app(None, "", host="::")
    with pytest.raises(DashboardError, match="thumbnails"):
        check_config("127.0.0.1", "tok", thumbnails=True)
    auth = TokenSource("abc")
    assert auth.check("abc") and not auth.check("abd") and not auth.check("") and not auth.check(None)
    assert not auth.check("abc ") and not auth.check("ab")
    # A wildcard bind must be told its names (the Host allow-list would refuse every remote browser).
    with pytest.raises(DashboardError, match="--allowed-host"):
        create_app(None, "tok", host="0.0.0.0")
    create_app(None, "tok", host="0.0.0.0", allowed_hosts=["dash.example"])


def test_requests_without_the_token_are_refused(server):
    for path in ("/", "/events", "/api/snapshot", "/static/app.js"):
        status, headers, body = request(server, "GET", path)
        assert status == 401, path
        assert headers["www-authenticate"].startswith("Bearer")
        assert b"cam-a" not in body
    status, headers, body = request(server, "GET", "/", {"Accept": "text/html"})
    assert status == 401 and b'<form class="login-form"' in body and "text/html" in headers["content-type"]
    status, _, body = request(server, "GET", "/api/snapshot", {"Accept": "application/json"})
    assert status == 401 and json.loads(body)["error"] == "unauthorized"
    for bad in ("Bearer wrong", "Bearer " + TOKEN[:-1], "Basic " + TOKEN, "Bearer"):
        assert request(server, "GET", "/api/snapshot", {"Authorization": bad})[0] == 401, bad
    assert request(server, "GET", "/?token=wrong")[0] == 401
    assert request(server, "GET", "/", {"Cookie": f"{COOKIE}={TOKEN}"})[0] == 401  # the cookie is not the token
    # Open: health, metrics, the stylesheet of the login page, the login form.
    for path in ("/healthz", "/metrics", "/static/app.css", "/login"):
        assert request(server, "GET", path)[0] == 200, path


def test_bearer_token_query_token_and_login_form(server):
    status, headers, body = request(server, "GET", "/api/snapshot", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and headers["cache-control"] == "no-store"
    snap = json.loads(body)
    assert [c["id"] for c in snap["cameras"]] == ["cam-a"]

    # ?token= on first load: a redirect to the same URL without the token, with an HttpOnly cookie.
    status, headers, _ = request(server, "GET", "/?token=" + urllib.parse.quote(TOKEN) + "&x=1")
    assert status == 303 and headers["location"] == "/?x=1"
    cookie = headers["set-cookie"]
    assert cookie.startswith(COOKIE + "=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert TOKEN not in cookie
    jar = cookie.split(";", 1)[0]
    status, headers, body = request(server, "GET", "/", {"Cookie": jar})
    assert status == 200 and b'id="cameras"' in body
    assert "default-src 'none'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    assert request(server, "GET", "/static/app.js", {"Cookie": jar})[0] == 200

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = request(server, "POST", "/login", form, "token=nope")
    assert status == 401 and b"Wrong token" in body
    status, headers, _ = request(server, "POST", "/login", form, "token=" + urllib.parse.quote(TOKEN))
    assert status == 303 and headers["location"] == "/"
    jar2 = headers["set-cookie"].split(";", 1)[0]
    assert jar2 != jar and TOKEN not in jar2  # a new random session id per sign-in
    assert request(server, "GET", "/api/snapshot", {"Cookie": jar2})[0] == 200


def test_wrong_tokens_are_rate_limited():
    dash = DashboardThread(create_app(None, TOKEN, state=DashboardState())).start()
    try:
        statuses = [request(dash, "GET", "/api/snapshot", {"Authorization": "Bearer guess"})[0] for _ in range(22)]
        assert statuses[:20] == [401] * 20 and statuses[20:] == [429, 429]
        # Even the right token waits out the lockout from that address; requests without any token stay 401.
        assert request(dash, "GET", "/api/snapshot", {"Authorization": f"Bearer {TOKEN}"})[0] == 429
        assert request(dash, "GET", "/api/snapshot")[0] == 401
    finally:
        dash.stop()


def test_event_stream_pushes_batched_snapshots(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request("GET", "/events", headers={"Authorization": f"Bearer {TOKEN}"})
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
        messages, ids, started = [], [], time.monotonic()
        event = {}
        while len(messages) < 3 and time.monotonic() - started < 10:
            line = r.fp.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                event["event"] = line[7:]
            elif line.startswith("id: "):
                event["id"] = int(line[4:])
            elif line.startswith("data: "):
                event["data"] = json.loads(line[6:])
            elif line == "" and "data" in event:
                assert event["event"] == "snapshot"
                messages.append(event["data"])
                ids.append(event["id"])
                event = {}
        elapsed = time.monotonic() - started
    finally:
        conn.close()
    assert len(messages) == 3 and ids == sorted(set(ids))
    assert elapsed < 5  # one snapshot per interval (0.2 s here), not per record
    snap = messages[-1]
    assert set(snap) >= {"cameras", "totals", "pipeline", "latency", "dead_letters", "generated_at"}
    cam = snap["cameras"][0]
    assert (cam["id"], cam["label"], cam["status"], cam["agent"]["skipped"]) == ("cam-a", "person", "online", 1)
    assert snap["dead_letters"]["recent"][0]["reason"] == "bad_signature"
    assert snap["pipeline"]["model"] == {"model_id": "m", "model_version": 3}


def test_health_and_prometheus_metrics(server):
    status, _, body = request(server, "GET", "/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["auth"] is True and health["cameras"] == 1
    request(server, "GET", "/api/snapshot")  # one 401
    request(server, "GET", "/api/snapshot", {"Authorization": f"Bearer {TOKEN}"})  # one snapshot computed
    status, headers, body = request(server, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert "tilestream_dashboard_uptime_seconds" in text
    assert "tilestream_dashboard_http_unauthorized_total" in text
    assert "tilestream_dashboard_snapshots_total" in text
    assert "cam-a" not in text  # no camera data on the open endpoint


def test_the_token_is_never_logged(server, caplog):
    caplog.set_level(logging.DEBUG)
    request(server, "GET", "/?token=" + TOKEN)
    request(server, "GET", "/?token=wrong-" + TOKEN)
    request(server, "GET", "/api/snapshot", {"Authorization": f"Bearer {TOKEN}"})
    request(server, "GET", "/api/snapshot", {"Authorization": "Bearer wrong-" + TOKEN})
    request(server, "POST", "/login", {"Content-Type": "application/x-www-form-urlencoded"}, "token=" + TOKEN)
    time.sleep(0.2)  # the access log line is written after the response
    assert "auth_failed" in caplog.text and '"path": "/"' in caplog.text
    assert TOKEN not in caplog.text


# -- records: strict, bounded decoding ------------------------------------------------------------
def _result(camera="c", seq=1, tiles=None, **kw) -> FrameResult:
    tiles = [TileLabel(0, 0, 0, 8, 8, "x", 1.0)] if tiles is None else tiles
    return FrameResult(camera, seq, f"{camera}/{seq}", 0, 0, 5.0, "x", {"x": 1.0}, tiles, True, max(1, len(tiles)), [],
                       "m", 1, **kw)


def test_records_are_decoded_strictly_and_within_bounds():
    r = json.loads(_result().to_json())
    r["future_field"] = {"a": 1}  # the results schema: consumers ignore unknown fields
    r["tiles"][0]["score"] = 3
    got = decode(topics.RESULTS, json.dumps(r).encode())
    assert got.camera_id == "c" and got.tiles[0].label == "x"
    dl = decode(topics.DEAD_LETTERS, DeadLetter.of("p", "malformed", "m", b"ciphertext", "c/1").to_json())
    assert dl.reason == "malformed" and dl.original == b""  # never decoded: the dashboard does not show it
    sm = StageMetrics("processor", "w1", 1, 5.0, {"frames_total": 3.0}, {"frames_per_s": 1.5},
                      {"frame": {"p50": 1.0}}, {"frames/0": 2}, "g", {"model_version": 2, "assigned_partitions": [0, 1]})
    assert decode(topics.METRICS, sm.to_json()).consumer_lag == {"frames/0": 2}  # the classifier's extra: a flat list

    def reason(topic, raw, limits=RecordLimits()):
        with pytest.raises(RecordError) as info:
            decode(topic, raw, limits)
        return info.value.reason

    assert reason(topics.RESULTS, b"not json") == "malformed"
    assert reason(topics.HEARTBEATS, b'{"camera_id": "x"}') == "malformed"  # required fields missing
    for field, bad in [("seq", "1"), ("seq", True), ("latency_ms", 1e300), ("label", "x" * 65), ("camera_id", ""),
                       ("probabilities", {}), ("probabilities", {"x": 2.0}), ("frame_id", "other/1"),
                       ("missing_tiles", [5]), ("schema_version", 2), ("complete", 1)]:
        assert reason(topics.RESULTS, json.dumps(dict(r, **{field: bad})).encode()) == "malformed", (field, bad)
    hb = json.loads(AgentHeartbeat("cam", "0.1", 0, 1.0, {"sent": 1}).to_json())
    assert reason(topics.HEARTBEATS, json.dumps(dict(hb, counters={f"k{i}": i for i in range(65)})).encode()) == "malformed"
    assert reason(topics.HEARTBEATS, json.dumps(dict(hb, counters={"sent": -1})).encode()) == "malformed"
    sm.extra = {"nested": {"a": [1]}}
    assert reason(topics.METRICS, sm.to_json()) == "malformed"
    # The dashboard's own bounds, each with its reason.
    assert reason(topics.RESULTS, _result(tiles=[TileLabel(i, i, 0, 1, 1, "x", 1.0) for i in range(5)]).to_json(),
                  RecordLimits(max_tiles=4)) == "too_many_tiles"
    assert reason(topics.RESULTS, _result().to_json(), RecordLimits(max_record_bytes=100)) == "too_large"
    sparse = _result(tiles=[TileLabel(i, i, i, 1, 1, "x", 1.0) for i in range(200)])  # 200 x 200 cells
    assert reason(topics.RESULTS, sparse.to_json(), RecordLimits(max_grid_cells=10_000)) == "grid_too_large"


def _forged_large(size: int) -> bytes:
    """A result of ``size`` bytes that is otherwise well-formed (an unknown field pads it)."""
    r = json.loads(_result("forged-big").to_json())
    r["pad"] = ""
    r["pad"] = "A" * (size - len(json.dumps(r, separators=(",", ":"))))
    raw = json.dumps(r, separators=(",", ":")).encode()
    assert len(raw) == size
    return raw


def _forged_tiles(camera: str, n: int, diagonal: bool) -> bytes:
    """A result of ``n`` tiles, all at distinct x and y when ``diagonal`` (an n x n grid)."""
    tiles = [TileLabel(i, i, i if diagonal else 0, 1, 1, "x", 1.0) for i in range(n)]
    return _result(camera, tiles=tiles).to_json()


@pytest.mark.kafka
def test_forged_results_on_kafka_do_not_blow_up_the_snapshot(kafka, monkeypatch, tmp_path):
    """The security review's records, through a real broker: a 1.1 MB result, a 10,000-tile result and
    a 3,000-tile result whose tiles sit at distinct x and y (a 9,000,000-cell grid). Each is ignored
    and counted with its reason; the snapshot stays small; a real result next to them is shown."""
    from kafka import KafkaProducer

    monkeypatch.setenv("TILESTREAM_KEYS_DIR", str(tmp_path / "no-keys"))  # no results key: results shown unverified
    limits = RecordLimits(max_record_bytes=1024 * 1024)  # so the 10,000 compact tiles (~740 KB) meet the tile bound
    state = DashboardState(StateConfig(max_snapshot_bytes=256 * 1024))
    dash = DashboardThread(create_app(kafka.bootstrap, TOKEN, state=state, limits=limits, snapshot_interval_s=0.2)).start()
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, max_request_size=8 * 1024 * 1024, acks="all")
    try:
        wait_for(lambda: json.loads(request(dash, "GET", "/healthz")[2])["kafka"]["connected"], 60, "the feed to connect")
        forged = {"too_large": _forged_large(1_100_000), "too_many_tiles": _forged_tiles("forged-many", 10_000, False),
                  "grid_too_large": _forged_tiles("forged-sparse", 3_000, True)}
        assert len(forged["too_many_tiles"]) < limits.max_record_bytes < len(forged["too_large"])
        for raw in forged.values():
            producer.send(topics.RESULTS, key=b"forged", value=raw).get(30)
        producer.send(topics.RESULTS, key=b"cam-real", value=_result("cam-real").to_json()).get(30)
        producer.flush()

        def refused():
            text = request(dash, "GET", "/metrics")[2].decode()
            return all(f'records_refused_total{{reason="{r}",topic="results"}} 1' in text for r in forged) and text

        wait_for(refused, 60, "the three forged results counted as refused, each with its reason")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        snap = wait_for(lambda: (b := request(dash, "GET", "/api/snapshot", auth)[2]) and b"cam-real" in b and b, 30,
                        "the real result on the dashboard")
        assert len(snap) <= 256 * 1024, len(snap)
        cams = [c["id"] for c in json.loads(snap)["cameras"]]
        assert cams == ["cam-real"], cams
        assert json.loads(request(dash, "GET", "/healthz")[2])["kafka"]["refused"] == 3
        assert "tilestream_dashboard_snapshot_bytes" in request(dash, "GET", "/metrics")[2].decode()
    finally:
        producer.close()
        dash.stop()


def test_snapshot_is_bounded_whatever_the_state_holds():
    """Bypassing the feed's checks (records straight into the state): a 10,000-tile result at distinct
    positions draws no grid, and 600 cameras with 4,000-tile grids (4 KB of cells each) fit the byte
    budget, the others counted as omitted."""
    s = DashboardState(StateConfig(max_snapshot_bytes=1024 * 1024))
    now = time.time()
    s.add_result(_result("diag", tiles=[TileLabel(i, i, i, 1, 1, f"l{i}", 1.0) for i in range(10_000)]), now)
    grid = [TileLabel(i, i % 100, i // 100, 1, 1, f"l{i % 70}", 1.0) for i in range(4000)]  # 100 x 40, 70 labels
    for n in range(600):
        s.add_result(_result(f"cam-{n:04d}", tiles=grid), now)
    payload = json.dumps(s.snapshot(now + 1), separators=(",", ":"))
    snap = json.loads(payload)
    assert len(payload) <= 1024 * 1024, len(payload)
    assert snap["totals"]["cameras"] == 601 and snap["totals"]["omitted"]["cameras"] > 0
    assert len(snap["cameras"]) + snap["totals"]["omitted"]["cameras"] == 601
    shown = {c["id"]: c for c in snap["cameras"]}
    assert shown["cam-0000"]["tiles"]["cols"] == 100 and len(shown["cam-0000"]["tiles"]["labels"]) == 62
    assert "diag" not in shown or shown["diag"]["tiles"] is None


# -- Host allow-list -------------------------------------------------------------------------------
def test_host_header_allow_list(server):
    assert host_name("127.0.0.1:8080") == "127.0.0.1" and host_name("[::1]:80") == "::1"
    assert host_name("LocalHost.") == "localhost" and host_name("a:b:c") is None and host_name("") is None
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for good in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "localhost", f"[::1]:{server.port}"):
        assert request(server, "GET", "/api/snapshot", dict(auth, Host=good))[0] == 200, good
    # DNS rebinding: the attacker's name resolved to 127.0.0.1. Refused before any work, even open paths.
    before = server.call(lambda: server.app[HUB].version)
    for bad in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example", "[::1", ""):
        for path in ("/api/snapshot", "/healthz", "/login", "/?token=" + TOKEN):
            status, headers, body = request(server, "GET", path, dict(auth, Host=bad))
            assert status == 421 and b"cam-a" not in body and "set-cookie" not in headers, (bad, path)
    assert server.call(lambda: server.app[HUB].version) == before  # no snapshot was computed for them
    assert "tilestream_dashboard_http_wrong_host_total 20" in request(server, "GET", "/metrics")[2].decode()
    # Configured names are allowed in addition to loopback names and the bind address.
    dash = DashboardThread(create_app(None, TOKEN, state=_state(), allowed_hosts=["dash.example"])).start()
    try:
        assert request(dash, "GET", "/api/snapshot", dict(auth, Host="dash.example:8080"))[0] == 200
        assert request(dash, "GET", "/api/snapshot", dict(auth, Host="evil.example"))[0] == 421
    finally:
        dash.stop()


# -- SSE cap -----------------------------------------------------------------------------------------
def _open_stream(dash, token=TOKEN):
    conn = http.client.HTTPConnection(dash.host, dash.port, timeout=10)
    conn.request("GET", "/events", headers={"Authorization": f"Bearer {token}"})
    return conn, conn.getresponse()


def test_event_streams_are_capped():
    dash = DashboardThread(create_app(None, TOKEN, state=_state(), snapshot_interval_s=0.2, max_sse_clients=2)).start()
    opened = []
    try:
        for _ in range(2):
            conn, r = _open_stream(dash)
            assert r.status == 200
            opened.append(conn)
        wait_for(lambda: json.loads(request(dash, "GET", "/healthz")[2])["clients"] == 2, 10, "two open streams")
        conn, r = _open_stream(dash)
        assert r.status == 503 and r.getheader("Retry-After") == "10"
        conn.close()
        assert json.loads(request(dash, "GET", "/healthz")[2])["clients"] == 2
        assert "tilestream_dashboard_sse_refused_total 1" in request(dash, "GET", "/metrics")[2].decode()
        opened.pop().close()  # a slot frees when a browser leaves
        wait_for(lambda: json.loads(request(dash, "GET", "/healthz")[2])["clients"] == 1, 10, "the closed stream to end")
        conn, r = _open_stream(dash)
        opened.append(conn)
        assert r.status == 200
    finally:
        for c in opened:
            c.close()
        dash.stop()


# -- sessions ----------------------------------------------------------------------------------------
def test_session_store_expires_revokes_and_is_bounded():
    clock = [1000.0]
    store = SessionStore(ttl_s=60, max_sessions=3, clock=lambda: clock[0])
    a = store.create()
    assert len(a) >= 40 and store.valid(a) and not store.valid(a + "x") and not store.valid(None)
    clock[0] += 59.9
    assert store.valid(a)
    clock[0] += 0.1
    assert not store.valid(a)  # expired at exactly ttl_s
    b, c = store.create(), store.create()
    assert store.revoke(b) and not store.valid(b) and store.valid(c)
    more = [store.create() for _ in range(4)]  # beyond max_sessions: the oldest go
    assert len(store) == 3 and not store.valid(c) and all(store.valid(s) for s in more[-3:])
    store.revoke_all()
    assert not any(store.valid(s) for s in more)


def _sign_in(dash, token=TOKEN) -> str:
    status, headers, _ = request(dash, "POST", "/login", {"Content-Type": "application/x-www-form-urlencoded"},
                                 "token=" + urllib.parse.quote(token))
    assert status == 303, status
    return headers["set-cookie"].split(";", 1)[0]


def test_expired_and_revoked_sessions_are_refused(server):
    jar = _sign_in(server)
    assert request(server, "GET", "/api/snapshot", {"Cookie": jar})[0] == 200
    # Logout revokes the session on the server: the same cookie, replayed, no longer opens anything.
    status, headers, _ = request(server, "POST", "/logout", {"Cookie": jar})
    assert status == 303 and headers["location"] == "/login" and "Max-Age=0" in headers["set-cookie"]
    status, _, body = request(server, "GET", "/api/snapshot", {"Cookie": jar})
    assert status == 401 and b"cam-a" not in body
    # Expiry: the session's clock is moved past its lifetime (12 h by default) on the server's loop.
    jar = _sign_in(server)
    sessions = server.app[ACCESS].sessions
    assert sessions.ttl_s == 12 * 3600
    assert "Max-Age=43200" in request(server, "POST", "/login", {"Content-Type": "application/x-www-form-urlencoded"},
                                      "token=" + urllib.parse.quote(TOKEN))[1]["set-cookie"]
    real = sessions.clock
    server.call(setattr, sessions, "clock", lambda: real() + 12 * 3600 + 1)
    status, headers, body = request(server, "GET", "/", {"Cookie": jar, "Accept": "text/html"})
    assert status == 401 and b"session has ended" in body
    server.call(setattr, sessions, "clock", real)
    assert request(server, "GET", "/api/snapshot", {"Cookie": jar})[0] == 401  # expired sessions are deleted


def test_changing_the_token_file_revokes_every_session(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    dash = DashboardThread(create_app(None, token_file=str(path), state=_state())).start()
    try:
        jar = _sign_in(dash)
        assert request(dash, "GET", "/api/snapshot", {"Cookie": jar})[0] == 200
        new = "another-token-0123456789abcdef"
        path.write_text(new + "\n")  # a new size: the change is seen even where mtime is coarse
        assert request(dash, "GET", "/api/snapshot", {"Cookie": jar})[0] == 401
        assert request(dash, "GET", "/api/snapshot", {"Authorization": f"Bearer {TOKEN}"})[0] == 401
        assert request(dash, "GET", "/api/snapshot", {"Authorization": f"Bearer {new}"})[0] == 200
        path.unlink()  # fail closed: no readable token file, no access
        assert request(dash, "GET", "/api/snapshot", {"Authorization": f"Bearer {new}"})[0] == 401
    finally:
        dash.stop()


# -- the token: never from argv ------------------------------------------------------------------
def test_token_file_rules(tmp_path):
    path = tmp_path / "token"
    path.write_text("  tok-from-file \n")
    path.chmod(0o644)
    with pytest.raises(DashboardError, match="chmod 600"):
        read_token_file(path)
    path.chmod(0o600)
    assert read_token_file(path) == "tok-from-file"
    path.write_text("\n")
    with pytest.raises(DashboardError, match="empty"):
        read_token_file(path)
    with pytest.raises(DashboardError, match="cannot read"):
        read_token_file(tmp_path / "missing")


@pytest.mark.parametrize("argv", [
    [sys.executable, "-m", "dashboard", "--token", TOKEN],
    [sys.executable, "-m", "dashboard", f"--token={TOKEN}"],
    [sys.executable, "-m", "tilestream_cli", "dashboard", "--token", TOKEN],
])
def test_the_token_is_not_accepted_from_argv(argv, tmp_path):
    env = dict(os.environ, TILESTREAM_HOME=str(tmp_path))
    env.pop("TILESTREAM_DASHBOARD_TOKEN", None)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--token is not accepted" in done.stderr and "--token-file" in done.stderr
    assert TOKEN not in done.stderr + done.stdout  # refused without echoing it


def test_the_cli_takes_the_token_from_a_file(tmp_path):
    """``python -m dashboard --token-file``: the file's token opens the dashboard, and it never reaches the log
    (no broker here: the dashboard serves, degraded, while its feed retries)."""
    from deploy.local_kafka import free_port

    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    port = free_port()
    env = dict(os.environ, TILESTREAM_HOME=str(tmp_path))
    env.pop("TILESTREAM_DASHBOARD_TOKEN", None)
    log_path = tmp_path / "dashboard.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "dashboard", "--bootstrap", f"127.0.0.1:{free_port()}",
                                 "--port", str(port), "--token-file", str(path)],
                                env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        def get(path_, headers=None):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", path_, headers=headers or {})
                return conn.getresponse().status
            except OSError:
                return None

        wait_for(lambda: proc.poll() is not None or get("/login") == 200, 60, "the dashboard to listen")
        assert proc.poll() is None, log_path.read_text()
        assert get("/api/snapshot") == 401
        assert get("/api/snapshot", {"Authorization": f"Bearer {TOKEN}"}) == 200
        assert get("/api/snapshot", {"Authorization": f"Bearer {TOKEN}", "Host": "evil.example"}) == 421
    finally:
        proc.terminate()
        proc.wait(30)
    assert TOKEN not in log_path.read_text()


def _feed_record(feed, raw: bytes, offset: int = 0):
    """One results record through KafkaFeed.apply, as the consumer hands it over."""
    from types import SimpleNamespace

    from aiokafka.structs import TopicPartition

    feed.apply(TopicPartition(topics.RESULTS, 0), SimpleNamespace(offset=offset, timestamp=0, value=raw), time.time())


def test_with_a_results_key_only_verified_results_are_shown(tmp_path):
    """Keys configured: a signed result is shown; unsigned, re-signed by a stranger, altered, or signed
    with an untrusted key is refused and counted with its reason. No key: shown and counted unverified."""
    from dashboard.feed import KafkaFeed
    from tilestream.metrics import Metrics
    from tilestream.stagekeys import StageKeys

    classifier_keys = StageKeys(tmp_path / "classifier")
    classifier_keys.init()
    kid, key = classifier_keys.results_private_key()
    consumer = StageKeys(tmp_path / "dashboard")  # public keys only
    consumer.trust_results(tmp_path / "classifier" / "results" / f"{kid}.pub")
    assert not (tmp_path / "dashboard" / "results" / f"{kid}.key").exists()
    stranger = StageKeys(tmp_path / "stranger")
    stranger.init()
    s_kid, s_key = stranger.results_private_key()

    good = _result("cam-good").to_signed(kid, key)
    envelope = json.loads(good)
    altered = dict(envelope, result=envelope["result"].replace('"cam-good"', '"cam-evil"').replace("cam-good/", "cam-evil/"))
    resigned = dict(envelope, signature=dict(envelope["signature"], sig=json.loads(
        _result("cam-good").to_signed(kid, s_key))["signature"]["sig"]))  # our key id, the stranger's signature
    forged = {"unsigned": _result("cam-plain").to_json(),
              "bad_signature": json.dumps(altered).encode(),
              "unknown_key": _result("cam-stranger").to_signed(s_kid, s_key)}
    state = DashboardState()
    metrics = Metrics("tilestream_dashboard")
    feed = KafkaFeed(None, state, metrics, result_keys=consumer.result_keys())
    assert feed.health()["verifying"]
    for i, raw in enumerate([good, *forged.values(), json.dumps(resigned).encode()]):
        _feed_record(feed, raw, i)
    assert [c["id"] for c in state.snapshot(time.time())["cameras"]] == ["cam-good"]
    for reason, n in (("unsigned", 1), ("unknown_key", 1), ("bad_signature", 2)):  # altered, and re-signed
        assert metrics.counter("records_refused_total", topic=topics.RESULTS, reason=reason) == n, reason
    assert feed.refused == 4 and feed.unverified == 0

    # Without a key the dashboard still works: everything well-formed is shown, counted unverified.
    state, metrics = DashboardState(), Metrics("tilestream_dashboard")
    feed = KafkaFeed(None, state, metrics, result_keys=StageKeys(tmp_path / "empty").result_keys())
    assert not feed.health()["verifying"]
    for i, raw in enumerate([good, forged["unsigned"], forged["unknown_key"]]):
        _feed_record(feed, raw, i)
    assert sorted(c["id"] for c in state.snapshot(time.time())["cameras"]) == ["cam-good", "cam-plain", "cam-stranger"]
    assert feed.unverified == 3 and metrics.counter("results_unverified_total") == 3 and feed.refused == 0
