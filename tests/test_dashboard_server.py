"""The dashboard's HTTP side without Kafka: access control, SSE framing, health, metrics, logging.

The app runs on a free loopback port in a thread (dashboard.server.DashboardThread) with a
hand-filled DashboardState; the live, Kafka-fed dashboard is tested in a real browser in
test_dashboard_browser.py.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.parse

import pytest

from dashboard.server import (COOKIE, DashboardError, DashboardThread, TokenAuth, check_config, create_app,
                              decode_record, is_loopback)
from dashboard.state import DashboardState
from tilestream import topics
from tilestream.records import AgentHeartbeat, DeadLetter, FrameResult, TileLabel

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
    auth = TokenAuth("abc")
    assert auth.check("abc") and not auth.check("abd") and not auth.check("") and not auth.check(None)
    assert not auth.check("abc ") and not auth.check("ab")
    assert auth.session != "abc" and "abc" not in auth.session and auth.check_cookie(auth.session)
    assert not auth.check_cookie("abc") and not auth.check_cookie(None)


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
    assert status == 303 and headers["location"] == "/" and headers["set-cookie"].split(";", 1)[0] == jar
    status, headers, _ = request(server, "POST", "/logout", {"Cookie": jar})
    assert status == 303 and headers["location"] == "/login" and 'Max-Age=0' in headers["set-cookie"]


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


def test_records_are_decoded_tolerantly():
    r = json.loads(FrameResult("c", 1, "c/1", 0, 0, 5, "x", {"x": 1.0}, [TileLabel(0, 0, 0, 8, 8, "x", 1.0)],
                               True, 1, [], "m", 1).to_json())
    r["future_field"] = {"a": 1}
    r["tiles"][0]["score"] = 3
    got = decode_record(topics.RESULTS, json.dumps(r).encode())
    assert got.camera_id == "c" and got.tiles[0].label == "x"
    dl = decode_record(topics.DEAD_LETTERS, DeadLetter("p", "malformed", "m", b"ciphertext").to_json())
    assert dl.reason == "malformed" and dl.original == b""
    with pytest.raises(Exception):
        decode_record(topics.RESULTS, b"not json")
    with pytest.raises(Exception):
        decode_record(topics.HEARTBEATS, b'{"camera_id": "x"}')  # required fields missing
