"""Service metrics that need no broker: garbage-collector pauses, the stage snapshot both stages publish."""

from __future__ import annotations

import gc
import json
import logging

from tilestream.metrics import Metrics, Snapshots, freeze_long_lived, observe_gc_pauses
from tilestream.records import StageMetrics


def test_gc_pauses_are_timed_per_generation_and_long_ones_logged(caplog):
    m = Metrics("tilestream_test")
    cb = observe_gc_pauses(m, log_over_s=0.0)  # log every pause, to see the log line
    try:
        junk = [[i] for i in range(200_000)]  # something for a full collection to walk
        with caplog.at_level(logging.WARNING, logger="tilestream.gc"):
            gc.collect()
        del junk
    finally:
        gc.callbacks.remove(cb)
    assert m.counter("gc_pause_seconds_count", generation="2") >= 1
    pause = m.counter("gc_pause_seconds_sum", generation="2")
    assert 0 < pause < 10
    assert 0 < m.gauges[("gc_pause_max_seconds", (("generation", "2"),))] <= pause
    assert 'tilestream_test_gc_pause_seconds{generation="2",quantile="0.99"}' in m.render()
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tilestream.gc"]
    assert any(e["event"] == "gc_pause" and e["generation"] == 2 and e["ms"] >= 0 for e in events)


class _Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the collector frees it


def test_freezing_long_lived_objects_collects_garbage_first_and_lets_a_repeat_free_what_was_frozen():
    import weakref

    dead, alive = _Node(), _Node()
    dead_ref, alive_ref = weakref.ref(dead), weakref.ref(alive)
    del dead
    try:
        frozen = freeze_long_lived()
        assert dead_ref() is None, "garbage alive at the call was collected, not frozen"
        assert frozen == gc.get_freeze_count() > 0
        assert not any(o is alive for o in gc.get_objects()), "what lives is in the permanent generation"
        gc.collect()
        assert alive_ref() is not None
        del alive  # garbage now, but frozen: a plain collection keeps it ...
        gc.collect()
        assert alive_ref() is not None
        freeze_long_lived()  # ... a repeat call (after a model swap) frees it
        assert alive_ref() is None
    finally:
        gc.unfreeze()


def test_the_stage_snapshot_has_dead_letters_by_reason_rates_and_latencies_and_reads_back_strictly():
    m = Metrics("tilestream_test")
    snaps = Snapshots(m, "processor", "host:1", "grp", 2.0, rates={"frames_per_s": "frames_total"})
    m.inc("frames_total", 10)
    m.inc("dead_letters_total", reason="replay")
    m.inc("dead_letters_total", 2, reason="bad_signature")
    for ms in range(1, 101):
        m.observe("stage_seconds", ms / 1e3, stage="decode")
    snap = snaps.take({"frames_total": m.counter("frames_total")},
                      {"decode": ("stage_seconds", {"stage": "decode"}), "open": ("stage_seconds", {"stage": "open"})},
                      {"frames/0": 3}, {"k": "v"}, dt=2.0)
    assert list(snap.counters) == ["frames_total", "dead_letters_total:replay", "dead_letters_total:bad_signature"]
    assert snap.counters["dead_letters_total:bad_signature"] == 2
    assert snap.rates == {"frames_per_s": 5.0}
    assert snap.latency_ms == {"decode": {"p50": 51.0, "p95": 96.0, "p99": 100.0}}  # "open" has no samples: left out
    assert (snap.stage, snap.instance, snap.group, snap.interval_s) == ("processor", "host:1", "grp", 2.0)
    assert snap.consumer_lag == {"frames/0": 3} and snap.extra == {"k": "v"}
    assert StageMetrics.from_bytes(snap.to_json()) == snap
    m.inc("frames_total", 4)
    assert snaps.take({"frames_total": m.counter("frames_total")}, {}, {}, {}, dt=1.0).rates == {"frames_per_s": 4.0}


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_liveness_reports_each_kind_of_stall_and_clears_when_progress_resumes():
    from tilestream.metrics import Liveness

    clock = FakeClock()
    live = Liveness(stall_after_s=10, clock=clock)
    live.holds(3)
    live.turned()
    assert live.problems(waiting=5) == []
    clock.t += 11  # the loop went round, but nothing was read while 5 records wait
    live.turned()
    assert [p.split(" ")[1:4] for p in live.problems(waiting=5)] == [["records", "wait", "on"]]
    assert live.problems(waiting=0) == []  # nothing waits: idle, not stalled
    live.read()
    assert live.problems(waiting=5) == []
    clock.t += 11  # the loop itself stopped turning
    assert any(p.startswith("loop has not turned for 11s") for p in live.problems(waiting=0))
    live.turned()
    live.holds(0)  # evicted
    clock.t += 5
    assert live.problems(waiting=0) == []  # a rebalance, not yet a stall
    clock.t += 6
    live.turned()
    assert live.problems(waiting=0) == ["no partition assigned for 11s (evicted, not rejoining?)"]
    live.turned()
    live.holds(2)  # rejoined: a fresh assignment has its own stall_after_s to read
    assert live.problems(waiting=7) == []
    assert live.seconds_since_record() == 0
