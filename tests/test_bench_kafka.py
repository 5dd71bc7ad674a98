"""The benchmarks' Kafka parts against the real broker: the results reader every latency figure comes
from (benchmarks.common.ResultsWatcher) and Kafka's floor (benchmarks.transport.kafka_floor)."""

import math

from cryptography.hazmat.primitives.asymmetric import ed25519

from benchmarks.common import ResultsWatcher, bench_keys
from benchmarks.transport import FLOOR_FLOW, kafka_floor
from conftest import wait_for
from kafkaio import rdkafka
from tilestream import topics
from tilestream.records import FrameResult, TileLabel
from tilestream.stagekeys import StageKeys


def _result(camera: str, seq: int) -> FrameResult:
    return FrameResult(camera, seq, f"{camera}/{seq}", 1_000 + seq, 2_000 + seq, 0.001, "person",
                       {"person": 0.75, "background": 0.25},
                       [TileLabel(0, 0, 0, 64, 64, "person", 0.75)], True, 1, [], "scene-abc", 1)


def test_the_bench_reader_keeps_each_signed_result_once_and_skips_what_is_not_one(kafka, tmp_path):
    store = bench_keys(tmp_path / "keys", ["cam"])
    kid, key = StageKeys(store.path).for_classifier().signer.current()
    forger = ed25519.Ed25519PrivateKey.generate()
    p = rdkafka.producer(kafka.bootstrap, "stage", max_request_bytes=2**20, delivery_timeout_ms=30000)
    with ResultsWatcher(kafka.bootstrap, store.path) as watcher:
        for value in (_result("cam", 1).to_signed(kid, key), _result("cam", 2).to_signed(kid, key),
                      _result("cam", 1).to_signed(kid, key),  # the same frame again: a duplicate
                      _result("cam", 3).to_signed(kid, forger),  # signed with a key nobody trusts
                      _result("cam", 4).to_json(),  # not signed at all
                      b"\x00 not a result"):
            p.produce(topics.RESULTS, value=value, key=b"cam")
        assert p.flush(30) == 0
        wait_for(lambda: watcher.duplicates + watcher.refused == 4, 60, "the reader to see all six records")
        assert watcher.count("cam") == 2
        got = sorted(watcher.of("cam"), key=lambda ar: ar[1].seq)
    assert [(r.frame_id, r.capture_ns, r.result_ns) for _, r in got] == [("cam/1", 1_001, 2_001), ("cam/2", 1_002, 2_002)]
    assert (watcher.duplicates, watcher.refused) == (1, 3)
    assert all(a > 0 for a, _ in got)


def test_kafka_floor_moves_every_frame_through_every_stage_and_measures_it(kafka):
    sizes = {t: 2_000 for _, _, outs in FLOOR_FLOW for t in outs}
    out = kafka_floor(kafka, sizes, rate=20.0, seconds=2.0, warmup_s=1.0)  # raises unless all frames were read
    assert out["frames"] == 40
    assert out["broker_ms"] > 0 and out["clients_ms"] > 0
    assert 0 < out["latency_p50_ms"] <= out["latency_p99_ms"] and math.isfinite(out["latency_p99_ms"])
