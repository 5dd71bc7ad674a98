"""The dashboard's aggregation (dashboard/state.py) with hand-made records and a hand-made clock."""

from __future__ import annotations

import json
import time

import pytest

from dashboard.state import LATENCY_BUCKETS_MS, DashboardState, StateConfig, latency_bucket, quantiles, tile_grid
from tilestream.records import AgentHeartbeat, DeadLetter, FrameResult, StageMetrics, TileLabel

T0 = 1_700_000_000.0  # a whole minute: 1_700_000_000 % 60 == 20, so minute buckets are checked explicitly below


def result(camera="cam-1", seq=1, latency_ms=50.0, label="person", p=0.9, tiles=None, complete=True,
           model_id="scene-abc", model_version=1) -> FrameResult:
    other = "background" if label != "background" else "person"
    if tiles is None:
        tiles = [TileLabel(i, (i % 3) * 64, (i // 3) * 64, 64, 64, label if i % 2 == 0 else other, 0.8) for i in range(6)]
    return FrameResult(
        camera_id=camera, seq=seq, frame_id=f"{camera}/{seq}", capture_ns=0, result_ns=0, latency_ms=latency_ms,
        label=label, probabilities={label: p, other: round(1 - p, 6)}, tiles=tiles, complete=complete,
        n_tiles=len(tiles), missing_tiles=[] if complete else [99], model_id=model_id, model_version=model_version,
    )


def heartbeat(camera="cam-1", interval_s=1.0, **kw) -> AgentHeartbeat:
    counters = kw.pop("counters", {"captured": 100, "skipped": 7, "sent": 90, "dropped": 3})
    return AgentHeartbeat(camera_id=camera, agent_version="0.1.0", at_ns=0, interval_s=interval_s, counters=counters, **kw)


def letter(reason="bad_signature", frame_id="cam-1/5", stage="processor") -> DeadLetter:
    return DeadLetter(stage=stage, reason=reason, message=f"{reason}!", original=b"\x00secret-ciphertext", frame_id=frame_id)


def cam(snap, camera_id):
    return next(c for c in snap["cameras"] if c["id"] == camera_id)


def test_quantiles_are_nearest_rank():
    assert quantiles(range(1, 101)) == {"p50": 50, "p95": 95, "p99": 99}
    assert quantiles([7.0]) == {"p50": 7.0, "p95": 7.0, "p99": 7.0}
    assert quantiles([]) is None
    # Order of arrival does not matter; ten values: p50 is the 5th, p95 and p99 the 10th.
    assert quantiles([10, 1, 9, 2, 8, 3, 7, 4, 6, 5]) == {"p50": 5, "p95": 10, "p99": 10}


def test_latency_quantiles_per_camera_over_the_last_minute():
    s = DashboardState()
    # Old, slow frames (more than a minute before `now`) must not count.
    for i in range(50):
        s.add_result(result(seq=i, latency_ms=10_000.0), T0 + i * 0.01)
    now = T0 + 100
    for i in range(1, 101):  # 1..100 ms within the last minute
        s.add_result(result(seq=100 + i, latency_ms=float(i)), now - 50 + i * 0.4)
    c = cam(s.snapshot(now), "cam-1")
    assert c["latency"] == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert c["latency_n"] == 100
    assert c["frames"] == 150  # the counter counts everything seen
    # Pipeline-wide: the same 100 samples, and the histogram holds exactly them.
    snap = s.snapshot(now)
    assert snap["latency"]["quantiles"] == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert sum(snap["latency"]["counts"]) == snap["latency"]["n"] == 100
    # 1..5 in the first bucket (<= 5 ms), 6..10 in the second, 51..100 in the (50, 100] bucket.
    assert snap["latency"]["counts"][0] == 5 and snap["latency"]["counts"][1] == 5
    assert snap["latency"]["counts"][LATENCY_BUCKETS_MS.index(100)] == 50


def test_latency_histogram_buckets():
    assert latency_bucket(0.3) == 0
    assert latency_bucket(5.0) == 0
    assert latency_bucket(5.01) == 1
    assert latency_bucket(4999) == LATENCY_BUCKETS_MS.index(5000)
    assert latency_bucket(1e9) == len(LATENCY_BUCKETS_MS)


def test_last_label_probability_and_tile_grid():
    s = DashboardState()
    s.add_result(result(seq=1, label="background", p=0.7), T0)
    s.add_result(result(seq=2, label="person", p=0.93, latency_ms=61.26), T0 + 0.1)
    c = cam(s.snapshot(T0 + 0.2), "cam-1")
    assert (c["seq"], c["label"], c["p"], c["latency_ms"]) == (2, "person", 0.93, 61.3)
    grid = c["tiles"]
    assert (grid["cols"], grid["rows"], grid["width"], grid["height"]) == (3, 2, 192, 128)
    assert grid["labels"] == ["background", "person"]
    # Tiles 0,2,4 are "person" (code 1), 1,3,5 "background" (code 0), row by row.
    assert grid["cells"] == "101010"


def test_tile_grid_from_positions_with_missing_tiles_and_any_order():
    tiles = [TileLabel(3, 64, 64, 64, 64, "b", 0.5), TileLabel(0, 0, 0, 64, 64, "a", 0.5),
             TileLabel(1, 64, 0, 64, 64, "c", 0.5)]  # tile 2 (0, 64) is missing
    g = tile_grid(tiles)
    assert (g["cols"], g["rows"], g["labels"], g["cells"]) == (2, 2, ["a", "b", "c"], "02.1")
    assert tile_grid([]) is None


def test_fps_over_the_rate_window():
    s = DashboardState(StateConfig(rate_window_s=10))
    for i in range(300):  # 10 fps for 30 s
        s.add_result(result(seq=i), T0 + i * 0.1)
    now = T0 + 30
    snap = s.snapshot(now)
    assert cam(snap, "cam-1")["fps"] == pytest.approx(10.0, abs=0.15)
    assert snap["totals"]["results_per_s"] == pytest.approx(10.0, abs=1.1)
    # Nothing for a while: the rate goes to zero.
    assert cam(s.snapshot(now + 15), "cam-1")["fps"] == 0


def test_offline_after_three_missed_heartbeats():
    s = DashboardState()
    s.add_heartbeat(heartbeat(interval_s=2.0, spool_frames=12, spool_bytes=4096), T0)
    assert cam(s.snapshot(T0 + 5.9), "cam-1")["status"] == "online"
    c = cam(s.snapshot(T0 + 6.0), "cam-1")
    assert c["status"] == "online"  # exactly 3 x interval: still within
    c = cam(s.snapshot(T0 + 6.1), "cam-1")
    assert c["status"] == "offline"
    a = c["agent"]
    assert (a["spool_frames"], a["spool_bytes"], a["skipped"], a["dropped"], a["timeout_s"]) == (12, 4096, 7, 3, 6.0)
    # A new heartbeat brings it back.
    s.add_heartbeat(heartbeat(interval_s=2.0), T0 + 10)
    assert cam(s.snapshot(T0 + 10.5), "cam-1")["status"] == "online"


def test_online_while_results_arrive_even_without_fresh_heartbeats():
    s = DashboardState(StateConfig(result_timeout_s=10))
    s.add_heartbeat(heartbeat(interval_s=1.0), T0)
    s.add_result(result(), T0 + 5)
    assert cam(s.snapshot(T0 + 7), "cam-1")["status"] == "online"  # heartbeat stale, but a result 2 s ago
    assert cam(s.snapshot(T0 + 8.5), "cam-1")["status"] == "offline"  # 3 x 1 s after the last result
    # A camera that never sent a heartbeat: online while results come within result_timeout_s.
    s.add_result(result(camera="cam-nohb"), T0)
    assert cam(s.snapshot(T0 + 9), "cam-nohb")["status"] == "online"
    assert cam(s.snapshot(T0 + 11), "cam-nohb")["status"] == "offline"


def test_agent_that_says_it_stops_is_stopped_at_once():
    s = DashboardState()
    s.add_heartbeat(heartbeat(status="stopping"), T0)
    assert cam(s.snapshot(T0 + 0.1), "cam-1")["status"] == "stopped"


def test_dead_letters_by_reason_in_minute_buckets():
    s = DashboardState(StateConfig(dead_letter_minutes=30))
    minute0 = 1_700_000_040.0  # a minute boundary
    for _ in range(3):
        s.add_dead_letter(letter("bad_signature"), minute0 + 5)
    s.add_dead_letter(letter("malformed", frame_id=None), minute0 + 30)
    s.add_dead_letter(letter("malformed", frame_id=None), minute0 + 65)  # next minute
    s.add_dead_letter(letter("decode_error"), minute0 - 40 * 60)  # older than the 30 buckets
    snap = s.snapshot(minute0 + 70)
    d = snap["dead_letters"]
    assert d["total"] == 6 and snap["totals"]["dead_letters"] == 6
    assert d["by_reason"] == {"bad_signature": 3, "decode_error": 1, "malformed": 2}
    assert d["window_by_reason"] == {"bad_signature": 3, "malformed": 2}
    assert len(d["minutes"]) == 30
    assert [m["t"] for m in d["minutes"][-2:]] == [minute0, minute0 + 60]
    assert d["minutes"][-2]["counts"] == {"bad_signature": 3, "malformed": 1}
    assert d["minutes"][-1]["counts"] == {"malformed": 1}
    assert all(m["counts"] == {} for m in d["minutes"][:-2])
    recent = d["recent"]
    assert recent[0]["reason"] == "malformed"  # newest first
    assert {r["frame_id"] for r in recent} >= {"cam-1/5"}
    # The original (still encrypted) record is never part of what the browser gets.
    assert "secret-ciphertext" not in json.dumps(snap) and "original" not in json.dumps(d)


def test_dead_letters_count_on_known_cameras_and_reasons_are_bounded():
    s = DashboardState(StateConfig(max_reasons=3))
    s.add_result(result(camera="cam-1"), T0)
    s.add_dead_letter(letter(frame_id="cam-1/9"), T0)
    s.add_dead_letter(letter(frame_id="nobody/1"), T0)  # unknown camera: no card is made for it
    for i in range(10):
        s.add_dead_letter(letter(reason=f"reason-{i}"), T0)
    snap = s.snapshot(T0 + 1)
    assert [c["id"] for c in snap["cameras"]] == ["cam-1"]
    assert cam(snap, "cam-1")["dead_letters"] == 11  # every letter whose frame id names cam-1
    assert set(snap["dead_letters"]["by_reason"]) == {"bad_signature", "reason-0", "reason-1", "other"}
    assert snap["dead_letters"]["by_reason"]["other"] == 8


def test_stage_rates_and_consumer_lag_per_group_and_partition():
    s = DashboardState()

    def sm(stage, instance, rates, lag, group, interval_s=5.0):
        return StageMetrics(stage=stage, instance=instance, at_ns=0, interval_s=interval_s, counters={}, rates=rates,
                            latency_ms={"frame": {"p50": 3.0, "p95": 5.0, "p99": 9.0}}, consumer_lag=lag, group=group,
                            extra={"model_version": 2, "nested": {"x": 1}})

    s.add_stage_metrics(sm("processor", "w1", {"frames_per_s": 10.0}, {"frames/0": 4, "frames/1": 0}, "tilestream-processor"), T0)
    s.add_stage_metrics(sm("processor", "w2", {"frames_per_s": 5.5}, {"frames/2": 7}, "tilestream-processor"), T0 + 1)
    s.add_stage_metrics(sm("classifier", "c1", {"frames_per_s": 15.0}, {"tile-features/0": 120}, "tilestream-classifier"), T0 + 2)
    # After a rebalance w2 reports partition 0 too, later: the most recent report wins.
    s.add_stage_metrics(sm("processor", "w2", {"frames_per_s": 6.0}, {"frames/2": 1, "frames/0": 2}, "tilestream-processor"), T0 + 3)
    snap = s.snapshot(T0 + 4)
    stages = {st["stage"]: st for st in snap["pipeline"]["stages"]}
    assert stages["processor"]["rates"] == {"frames_per_s": 16.0}
    assert stages["processor"]["fresh"] == 2 and stages["classifier"]["rates"] == {"frames_per_s": 15.0}
    assert stages["classifier"]["instances"][0]["extra"] == {"model_version": 2}  # only scalars pass
    lag = {(r["group"], r["topic"], r["partition"]): r["lag"] for r in snap["pipeline"]["lag"]}
    assert lag == {("tilestream-classifier", "tile-features", 0): 120, ("tilestream-processor", "frames", 0): 2,
                   ("tilestream-processor", "frames", 1): 0, ("tilestream-processor", "frames", 2): 1}
    assert snap["pipeline"]["lag_totals"] == {"tilestream-classifier": 120, "tilestream-processor": 3}
    # w1 stops reporting: after 3 x its interval it no longer counts (rates, lag).
    snap = s.snapshot(T0 + 16)
    stages = {st["stage"]: st for st in snap["pipeline"]["stages"]}
    assert stages["processor"]["rates"] == {"frames_per_s": 6.0} and stages["processor"]["fresh"] == 1
    assert ("tilestream-processor", "frames", 1) not in {(r["group"], r["topic"], r["partition"]) for r in snap["pipeline"]["lag"]}


def test_model_in_use_follows_the_latest_result():
    s = DashboardState()
    s.add_result(result(model_id="scene-a", model_version=1), T0)
    s.add_result(result(model_id="scene-a", model_version=2), T0 + 1)
    p = s.snapshot(T0 + 2)["pipeline"]
    assert p["model"] == {"model_id": "scene-a", "model_version": 2}
    assert [(m["model_version"], m["frames"]) for m in p["models"]] == [(2, 1), (1, 1)]
    # Much later, only the current model is listed as active (last 5 minutes).
    s.add_result(result(model_id="scene-a", model_version=2), T0 + 400)
    p = s.snapshot(T0 + 401)["pipeline"]
    assert [m["model_version"] for m in p["models"]] == [2]


def test_incomplete_frames_are_counted():
    s = DashboardState()
    s.add_result(result(seq=1, complete=False), T0)
    s.add_result(result(seq=2), T0 + 0.1)
    c = cam(s.snapshot(T0 + 1), "cam-1")
    assert (c["frames"], c["incomplete"]) == (2, 1)


def test_hundred_cameras_snapshot_is_complete_sorted_and_cheap():
    s = DashboardState()
    tiles = [TileLabel(i, (i % 12) * 64, (i // 12) * 64, 64, 64, "person" if i % 5 == 0 else "background", 0.9)
             for i in range(108)]  # vtest.avi: 768x576 in 64 px tiles
    for sec in range(60):  # a minute at 10 fps for 100 cameras: 60,000 results
        for k in range(10):
            t = T0 + sec + k / 10
            for n in range(100):
                s.add_result(result(camera=f"cam-{n:03d}", seq=sec * 10 + k, latency_ms=20.0 + n, tiles=tiles), t)
    for n in range(0, 100, 2):
        s.add_heartbeat(heartbeat(camera=f"cam-{n:03d}", interval_s=1.0), T0 + 59.5)
    now = T0 + 60
    t0 = time.perf_counter()
    snap = s.snapshot(now)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    s.snapshot(now + 0.5)
    again = time.perf_counter() - t0
    assert [c["id"] for c in snap["cameras"]] == [f"cam-{n:03d}" for n in range(100)]
    assert snap["totals"]["cameras"] == 100 and snap["totals"]["online"] == 100
    c = cam(snap, "cam-042")
    assert c["fps"] == pytest.approx(10.0, abs=0.15) and c["latency"] == {"p50": 62.0, "p95": 62.0, "p99": 62.0}
    assert c["tiles"]["cols"] == 12 and c["tiles"]["rows"] == 9 and len(c["tiles"]["cells"]) == 108
    payload = json.dumps(snap, separators=(",", ":"))
    assert len(payload) < 200_000, len(payload)
    # Generous bounds (2-core CI): computing a snapshot of 100 busy cameras stays well under the push interval.
    assert first < 0.5 and again < 0.5, (first, again)
    # Results stop: cameras with heartbeats (interval 1 s) are offline after 3 s, the others after 10 s.
    later = s.snapshot(now + 5)
    assert {c["id"] for c in later["cameras"] if c["status"] == "online"} == {f"cam-{n:03d}" for n in range(1, 100, 2)}
    later = s.snapshot(now + 11)
    assert later["totals"]["online"] == 0


def test_camera_flood_is_bounded_and_idle_cameras_are_forgotten():
    s = DashboardState(StateConfig(max_cameras=10, forget_camera_after_s=100))
    for n in range(15):
        s.add_result(result(camera=f"c{n}"), T0)
    snap = s.snapshot(T0 + 1)
    assert snap["totals"]["cameras"] == 10 and snap["totals"]["cameras_refused"] == 5
    assert s.snapshot(T0 + 200)["totals"]["cameras"] == 0


def test_stage_model_and_grid_floods_are_bounded():
    s = DashboardState(StateConfig(max_stages=5, max_models=3))
    for i in range(20):
        s.add_stage_metrics(StageMetrics(stage="processor", instance=f"w{i}", at_ns=0, interval_s=5.0, counters={},
                                         rates={f"r{i}-{k}": 1.0 for k in range(40)}, latency_ms={}), T0 + 19)
        s.add_result(result(model_id=f"model-{i}", model_version=1), T0 + i)
    snap = s.snapshot(T0 + 20)
    st = snap["pipeline"]["stages"][0]
    assert len(st["instances"]) == 5 and snap["totals"]["stages_refused"] == 15
    assert len(st["rates"]) == 64  # 5 instances x 40 made-up rate names, summed: at most 64 shown
    assert len(s.models) == 3 and snap["pipeline"]["model"]["model_id"] == "model-19"
    # A grid's cells and labels are bounded: distinct x and y for every tile is not drawn at all.
    assert tile_grid([TileLabel(i, i, i, 1, 1, "x", 1.0) for i in range(200)], max_cells=10_000) is None
    many = tile_grid([TileLabel(i, i, 0, 1, 1, f"label-{i:03d}", 1.0) for i in range(100)])
    assert len(many["labels"]) == 62 and many["cells"].count("?") == 38


def test_snapshot_budget_leaves_out_cameras_and_counts_them():
    s = DashboardState(StateConfig(max_snapshot_bytes=64 * 1024))
    for n in range(200):
        s.add_result(result(camera=f"cam-{n:03d}"), T0)
    snap = s.snapshot(T0 + 1)
    assert len(json.dumps(snap, separators=(",", ":"))) <= 64 * 1024
    omitted = snap["totals"]["omitted"]["cameras"]
    assert snap["totals"]["cameras"] == 200 and 0 < omitted < 200 and len(snap["cameras"]) == 200 - omitted
    assert [c["id"] for c in snap["cameras"]] == [f"cam-{n:03d}" for n in range(200 - omitted)]  # sorted prefix
    assert snap["totals"]["online"] == 200  # the totals still count every camera
