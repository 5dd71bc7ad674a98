"""Fan-out of a large frame's tiles: same features as the whole frame, nothing in plaintext."""

from __future__ import annotations


import cv2
import numpy as np
import pytest

from classifier.results import tail
from edge_agent.agent import EdgeAgent
from stream_processor import tilejobs
from stream_processor.pipeline import image_tile_features
from stream_processor.tiling import tile_grid
from tilestream import topics
from tilestream.config import AgentSettings, FeatureConfig
from tilestream.crypto import FrameRejected
from tilestream.envelope import FrameHeader
from tilestream_cli.procs import Children, start_cloud_stages
from tilestream.records import WIRE_DTYPE, TileBatch
from sampledata import iter_video_frames

from conftest import child_env, mac_keys, metric, read_topic, result_keys, wait_for

KEY = bytes(range(32))


def group_members(bootstrap: str, group: str) -> int:
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        desc = admin.describe_groups([group]).get(group) or {}
        return len(desc.get("members", [])) if desc.get("group_state") == "Stable" else 0
    finally:
        admin.close()


def header(w: int, h: int) -> FrameHeader:
    return FrameHeader("cam-big", 3, 123, w, h, "jpeg", b"c" * 8, b"d" * 8)


@pytest.mark.parametrize("cfg", [FeatureConfig(), FeatureConfig(tile_size=48, overlap=16),
                                 FeatureConfig(tile_size=32, hog_cell=16, edge_policy="shrink")])
def test_bands_give_exactly_the_whole_frame_features(cfg, vtest_path):
    frame = next(iter_video_frames(str(vtest_path), max_frames=1))
    gray = cv2.cvtColor(cv2.resize(frame, (1000, 700)), cv2.COLOR_BGR2GRAY)  # does not divide by the tile size
    whole = {t.index: (t, v) for t, v in image_tile_features(gray, cfg)}
    jobs = tilejobs.make_jobs(header(1000, 700), gray, cfg, 4, "k1", KEY)
    assert len(jobs) == 4 and len({k for k, _ in jobs}) == 4
    got = {}
    for _key, record in jobs:
        assert gray[100:101].tobytes() not in record  # pixels are not in plaintext
        job, band = tilejobs.open_job(record, {"k1": KEY})
        for rec in tilejobs.job_features(job, band, cfg, "digest").split():
            got[rec.tile_index] = rec
    assert sorted(got) == sorted(whole)
    for i, rec in got.items():
        t, v = whole[i]
        assert (rec.x, rec.y, rec.w, rec.h, rec.n_tiles) == (t.x, t.y, t.w, t.h, len(whole))
        # As the whole frame's record carries it: the wire dtype (tilestream.records.WIRE_DTYPE).
        np.testing.assert_array_equal(rec.vector(), v.astype(WIRE_DTYPE).astype("<f4"))


def test_tampered_or_foreign_tile_jobs_are_refused():
    gray = np.random.default_rng(1).integers(0, 256, (256, 256), np.uint8)
    [(_, record)] = tilejobs.make_jobs(header(256, 256), gray, FeatureConfig(), 1, "k1", KEY)
    for i in (len(record) - 5, 40):  # the ciphertext, and the (authenticated) header
        bad = bytearray(record)
        bad[i] ^= 1
        with pytest.raises(FrameRejected) as exc:
            tilejobs.open_job(bytes(bad), {"k1": KEY})
        assert exc.value.reason in ("decrypt_failed", "malformed")
    with pytest.raises(FrameRejected, match="unknown tile key"):
        tilejobs.open_job(record, {"k2": KEY})
    with pytest.raises(FrameRejected) as exc:
        tilejobs.open_job(record, {"k1": bytes(32)})
    assert exc.value.reason == "decrypt_failed"


@pytest.mark.kafka
def test_a_frame_is_computed_by_several_workers(kafka, keystore, scene_model, vtest_path, tmp_path):
    """Every frame fans out (threshold 1 pixel) over two workers; results are complete and exact."""
    n = 12
    bootstrap = kafka.bootstrap
    env = child_env(bootstrap, keystore.path, tmp_path / "home")
    env["TILESTREAM_PROCESSOR_FANOUT_MIN_PIXELS"] = "1"
    children = Children()
    try:
        ports = start_cloud_stages(children, env, tmp_path, scene_model, workers=2).worker_ports
        wait_for(lambda: group_members(bootstrap, "tilestream-processor") == 2, 90, "both workers in the group")
        agent = EdgeAgent(AgentSettings(camera_id="cam-test", source=str(vtest_path), max_frames=n), keystore,
                          bootstrap, 4 * 1024 * 1024, state_dir=tmp_path / "agent")
        assert agent.run().sent == n
        results = {}
        for r in tail(bootstrap, keys=result_keys(keystore), from_beginning=True, idle_timeout_s=120):
            results[r.seq] = r
            if len(results) >= n:
                break
        if sorted(results) != list(range(n)):
            missing = sorted(set(range(n)) - set(results))
            jobs = [m.key.decode() for m in read_topic(bootstrap, topics.TILE_JOBS)]
            feats = [t.frame_id for m in read_topic(bootstrap, topics.TILE_FEATURES)
                     for t in TileBatch.from_wire(m.value, mac_keys(keystore)).split()]
            dead = [m.value[:300] for m in read_topic(bootstrap, topics.DEAD_LETTERS)]
            frames = [m.key.decode() for m in read_topic(bootstrap, topics.FRAMES)]
            detail = {s: (frames.count(f"cam-test/{s}"), sum(1 for k in jobs if k.startswith(f"cam-test/{s}#")),
                          feats.count(f"cam-test/{s}")) for s in missing}
            pytest.fail(f"no result for {missing}; (frames, tile jobs, tile features) per missing frame: {detail}; "
                        f"dead letters: {dead}")
        assert all(r.complete and r.n_tiles == 108 for r in results.values())
        tiles_by_worker = [metric(p, "tilestream_processor_tiles_total") for p in ports]
        print(f"tiles computed per worker: {tiles_by_worker}")  # usually both > 0; which worker owns what is Faust's
        assert sum(tiles_by_worker) >= n * 108, tiles_by_worker
    finally:
        children.stop_all()
    jobs = read_topic(bootstrap, topics.TILE_JOBS)
    per_frame = len(tilejobs.bands(tile_grid(576, 768, 64), 576, 6))  # 9 tile rows in bands of 2 -> 5
    assert per_frame == 5
    assert len(jobs) == n * per_frame and len({m.partition for m in jobs}) >= 3
    by_frame: dict[str, set[int]] = {}
    for m in jobs:
        by_frame.setdefault(m.key.decode().split("#")[0], set()).add(m.partition)
    assert all(len(parts) >= 2 for parts in by_frame.values()), "each frame's bands spread over partitions"
    tiles = [t for m in read_topic(bootstrap, topics.TILE_FEATURES) for t in TileBatch.from_wire(m.value, mac_keys(keystore)).split()]
    assert {(t.frame_id, t.tile_index) for t in tiles} == {(f"cam-test/{s}", i) for s in range(n) for i in range(108)}
