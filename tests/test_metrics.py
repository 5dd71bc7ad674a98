"""Service metrics that need no broker: garbage-collector pauses."""

from __future__ import annotations

import gc
import json
import logging

from tilestream.metrics import Metrics, observe_gc_pauses


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
