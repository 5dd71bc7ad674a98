"""The benchmark's paired ratios: pure functions over result dicts, no broker."""

import math

from benchmarks.peers import PROCESSOR_ORDER, PROCESSOR_REPEATS, pair_ratios, ratios
from benchmarks.pipeline_bench import step_seed_fps


def _runs(fps: list[float]) -> list[dict]:
    kinds = PROCESSOR_ORDER * PROCESSOR_REPEATS
    return [{"kind": k, "fps": f, "cpu_ms_per_frame": 1e3 / f, "run": i + 1} for i, (k, f) in enumerate(zip(kinds, fps))]


def test_pairs_are_adjacent_runs_faust_over_quix_whichever_ran_first():
    res = {"processor": _runs([60, 80, 90, 45, 70, 70, 50, 100])}
    assert PROCESSOR_ORDER * PROCESSOR_REPEATS == ("faust", "quix", "quix", "faust") * 2
    assert pair_ratios(res) == [60 / 80, 45 / 90, 70 / 70, 100 / 50]


def test_a_failed_run_drops_its_pair_only():
    runs = _runs([60, 80, 90, 45, 70, 70, 50, 100])
    runs[2] = {"kind": "quix", "error": "exited", "run": 3}
    assert pair_ratios({"processor": runs}) == [60 / 80, 70 / 70, 100 / 50]


def test_the_goal_ratio_stays_the_ratio_of_the_means():
    res = {"processor": _runs([60, 80, 90, 45, 70, 70, 50, 100]), "seed": [{"processes": 2, "fps": 100.0}],
           "compute_limit_fps": 50.0}
    faust, quix = (60 + 45 + 70 + 100) / 4, (80 + 90 + 70 + 50) / 4
    assert math.isclose(ratios(res)["faust_over_quix"], faust / quix)


def test_the_pool_next_to_a_step_is_the_mean_of_before_and_after():
    assert step_seed_fps({"seed_pool_fps": [90.0, 110.0]}) == 100.0
    assert step_seed_fps({"seed_pool_fps": [float("nan"), 80.0]}) == 80.0
    assert step_seed_fps({}) is None
    assert step_seed_fps({"seed_pool_fps": [None, None]}) is None
