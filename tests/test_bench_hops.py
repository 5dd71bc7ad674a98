"""benchmarks.pipeline_bench.hop_table: the per-hop split of capture-to-result latency."""

import pytest

from benchmarks.pipeline_bench import HOPS, hop_table


def frame(capture, append, tiles, result, read, worker):
    return {"capture": capture, "append": append, "tiles": tiles, "result": result, "read": read, "worker": worker}


def test_hops_add_up_and_a_frame_behind_the_same_workers_previous_one_counts_as_queued():
    frames = {
        # worker 0 busy with a until 30; b arrived at 12: queued 18 ms, then 15 ms of its own
        "a": frame(0, 1, 30, 34, 37, 0),
        "b": frame(10, 12, 45, 50, 52, 0),
        # worker 1 idle when c arrived: nothing queued, although a finished later than c's append
        "c": frame(20, 21, 40, 44, 47, 1),
        # no worker known (partition claimed by two): nothing counted as queued
        "d": frame(25, 26, 55, 60, 61, None),
        "incomplete": {"capture": 0, "append": 1},
    }
    t = hop_table(frames)
    assert t["frames"] == 4 and t["queued_frames"] == 1
    by_hop = {h: t["hops"][h]["max"] for h in HOPS}
    assert by_hop[HOPS[1]] == pytest.approx(18)  # b waited for a
    queued = HOPS[1]
    assert t["hops"][queued]["p50"] == 0
    # every frame's hops sum to its capture-to-read latency
    for f in ("a", "b", "c", "d"):
        one = hop_table({f: frames[f]})
        total = one["total_p50"]
        assert sum(one["hops"][h]["p50"] for h in HOPS) == pytest.approx(total)


def test_a_worker_with_several_partitions_is_followed_in_completion_order():
    # y was appended before x but the worker finished x first (another partition's buffer):
    # y started after x finished
    frames = {"x": frame(0, 5, 20, 22, 24, 0), "y": frame(0, 4, 35, 37, 39, 0)}
    t = hop_table(frames)
    assert t["hops"][HOPS[1]]["max"] == pytest.approx(16)  # y: append 4, x done at 20
    assert t["hops"][HOPS[2]]["max"] == pytest.approx(15)  # x: 5 -> 20, y: 20 -> 35
