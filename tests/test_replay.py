"""Replay protection (stream_processor/replay.py): the pure state and mark format, then the
real thing on a real broker — a processor restarted between a frame and its copy, a copy on
another partition, a stale frame, a replayed tile job."""

from __future__ import annotations

import dataclasses
import os
import time
import zlib

import numpy as np
import pytest

from stream_processor import replay, tilejobs
from stream_processor.replay import NO_BAND, BadMark, Mark, ReplayState, decode_mark, encode_mark
from tilestream.config import FeatureConfig
from tilestream.crypto import FrameRejected
from tilestream.envelope import FrameHeader

F = replay.FRAMES_SOURCE
S = 1_000_000_000  # ns
NOW = 1_700_000_000 * S
KEYS = replay.derive_mark_keys({"k1": bytes(range(32))})


def state(window: int = 64) -> ReplayState:
    return ReplayState(window, max_age_s=3600, skew_s=60)


def check(st: ReplayState, seq: int, partition: int = 0, offset: int = 0, capture: int = NOW, ref: int | None = NOW,
          camera: str = "cam"):
    return st.check(camera, NO_BAND, seq, capture, F, partition, offset, ref)


def test_a_seq_is_accepted_once_anywhere_and_its_own_record_again():
    st = state()
    assert check(st, 5, 0, 10).kind == "new"
    assert check(st, 5, 0, 10).kind == "redelivery"  # Faust re-reads the same record
    v = check(st, 5, 0, 11)
    assert v.kind == "replay" and "frames/0:10" in v.detail  # same partition, later offset
    assert check(st, 5, 3, 10).kind == "replay"  # same offset number, another partition
    assert check(st, 5, 0, 10, camera="other").kind == "new"  # cameras are separate streams
    assert check(st, 6, 1, 0).kind == "new" and check(st, 4, 2, 0).kind == "new"  # reordering below the high


def test_the_window_in_seqs_and_in_time():
    st = state(window=64)
    assert check(st, 100, 0, 0).kind == "new"
    assert check(st, 37, 0, 1).kind == "new"  # 63 below: inside the window
    v = check(st, 36, 0, 2)
    assert v.kind == "replay" and "outside the replay window" in v.detail
    assert check(st, 101, 0, 3, capture=NOW - 3601 * S).kind == "stale"  # older than max_age
    assert check(st, 101, 0, 3, capture=NOW + 61 * S).kind == "stale"  # camera clock too far ahead
    assert check(st, 101, 0, 3, capture=NOW + 59 * S).kind == "new"  # skew allowance
    # Without a trusted clock (tile jobs), the window is relative to the newest capture accepted.
    v = check(st, 102, 0, 4, capture=NOW - 3700 * S, ref=None)
    assert v.kind == "stale" and "before the newest" in v.detail
    # A refused record changes nothing.
    assert check(st, 36, 0, 9).kind == "replay" and st.streams[("cam", NO_BAND)].high == 101


def test_a_camera_that_restarts_its_seqs_starts_a_new_epoch_once_the_old_one_is_stale():
    st = state()
    assert check(st, 5000, 0, 0, capture=NOW).kind == "new"
    assert check(st, 3, 0, 1, capture=NOW + 10 * S, ref=NOW + 10 * S).kind == "replay"  # below the window
    later = NOW + 3700 * S  # the newest accepted frame is now older than max_age + skew
    assert check(st, 3, 0, 2, capture=later, ref=later).kind == "new"
    assert check(st, 4000, 0, 3, capture=NOW, ref=later).kind == "stale"  # the old epoch stays refused


def test_marks_round_trip_and_rebuild_the_state_after_a_restart():
    before = state(window=256)
    marks = {}
    for seq, (p, off) in enumerate([(0, 7), (1, 3), (0, 8), (2, 1), (1, 4)]):
        v = check(before, seq, p, off)
        marks[v.mark.key()] = encode_mark(v.mark, "k1", KEYS["k1"])  # the compacted topic: latest per key
    assert len(marks) == 3  # one key per source partition
    after = state(window=256)
    for key, value in reversed(list(marks.values())):  # order between keys does not matter
        after.merge(decode_mark(key, value, KEYS))
    assert check(after, 2, 0, 8).kind == "redelivery"  # the same record, re-read by the new owner
    assert check(after, 2, 0, 9).kind == "replay"
    assert check(after, 2, 1, 8).kind == "replay"
    assert check(after, 5, 1, 5).kind == "new"
    st = state(window=256)  # merging a mark twice is a no-op
    for key, value in marks.values():
        st.merge(decode_mark(key, value, KEYS))
        st.merge(decode_mark(key, value, KEYS))
    assert st.streams[("cam", NO_BAND)].bits == before.streams[("cam", NO_BAND)].bits


def test_two_workers_converge_and_the_race_is_bounded_to_marks_in_flight():
    a, b = state(), state()
    va = check(a, 10, 0, 1)
    vb = check(b, 10, 4, 1)  # a copy on another partition, checked before a's mark arrived: accepted
    assert va.kind == vb.kind == "new"
    for st in (a, b):
        for v in (va, vb):
            st.merge(decode_mark(*encode_mark(v.mark, "k1", KEYS["k1"]), KEYS))
    assert check(a, 10, 5, 1).kind == check(b, 10, 5, 1).kind == "replay"  # once marks met: refused everywhere
    assert check(b, 10, 0, 1).kind == "redelivery"  # and a's own record is still a's redelivery


def test_the_mark_format_keeps_every_field_even_at_the_limits():
    for places in ([], [(9, 1), (3, 2), (2 ** 64 - 1, 3), (0, 10 ** 12)]):  # seqs going down, u64 wrap-around
        m = Mark(F, 2, "cam/ü", NO_BAND, 2 ** 64 - 1, (1 << 64) - 7, 64, NOW, places)
        assert decode_mark(*encode_mark(m, "k1", KEYS["k1"]), KEYS) == m


def test_marks_from_anyone_else_are_refused():
    st = state()
    v = check(st, 1, 0, 0)
    key, value = encode_mark(v.mark, "k1", KEYS["k1"])
    assert decode_mark(key, value, KEYS).high == 1
    forged = Mark(F, 0, "cam", NO_BAND, 2 ** 63, 1, 64, NOW, [])
    fkey, fvalue = encode_mark(forged, "k1", os.urandom(32))  # "cam reached seq 2^63" without the key
    bad = [
        (fkey, fvalue),
        (b"frames|1|-1|cam", value),  # a good value moved to another key
        (key, None),  # tombstone
        (key, b""), (key, b"TSRM"), (key, value[:-3]),
        (key, value[:20] + bytes([value[20] ^ 1]) + value[21:]),
        (key, value.replace(b"k1", b"k9", 1)),  # unknown key id
        (None, value),
    ]
    for k, val in bad:
        with pytest.raises(BadMark):
            decode_mark(k, val, KEYS)
    # A zlib bomb under a valid MAC (a bug or a stolen key) stops at the body limit.
    head = replay.MAGIC + bytes([replay.VERSION, 2]) + b"k1"
    body = zlib.compress(b" " * (replay.MAX_BODY + 1000), 9)
    bomb = head + replay._mac(KEYS["k1"], key, head, body).finalize() + body
    assert len(bomb) < 10_000
    with pytest.raises(BadMark, match="too large"):
        decode_mark(key, bomb, KEYS)


def test_a_huge_seq_from_a_held_camera_costs_nothing():
    st = state(window=1 << 16)
    assert check(st, 1, 0, 0).kind == "new"
    assert check(st, 2 ** 64 - 1, 0, 1).kind == "new"  # shifts are cut to the window, no 2^64-bit integer
    assert st.streams[("cam", NO_BAND)].bits.bit_length() <= 1 << 16
    assert check(st, 1, 0, 2).kind == "replay"


def job_header(seq: int = 3) -> FrameHeader:
    return FrameHeader("cam-big", seq, time.time_ns(), 256, 256, "jpeg", b"c" * 8, b"d" * 8)


def test_a_tile_job_is_computed_once_for_its_frame_and_band():
    key = bytes(range(32))
    gray = np.random.default_rng(1).integers(0, 256, (256, 256), np.uint8)
    jobs = tilejobs.make_jobs(job_header(), gray, FeatureConfig(), 2, "k1", key)
    st = ReplayState(64, max_age_s=3600, skew_s=60)
    now = time.time_ns()
    opened = [tilejobs.open_job(rec, {"k1": key})[0] for _, rec in jobs]
    for job in opened:
        tilejobs.check_binding(job)
    assert [replay.check_job(st, j, j.band, 5, now).kind for j in opened] == ["new", "new"]
    assert replay.check_job(st, opened[0], 0, 5, now).kind == "redelivery"
    assert replay.check_job(st, opened[0], 3, 9, now).kind == "replay"  # the record copied elsewhere
    # A job made again for the same frame (a redelivered frame) is refused once its band was computed.
    again = [tilejobs.open_job(rec, {"k1": key})[0]
             for _, rec in tilejobs.make_jobs(job_header(), gray, FeatureConfig(), 2, "k1", key)]
    assert replay.check_job(st, again[1], 1, 6, now).kind == "replay"
    # Another frame of the same camera is new; a job made long ago is stale.
    other = tilejobs.open_job(tilejobs.make_jobs(job_header(4), gray, FeatureConfig(), 1, "k1", key)[0][1],
                              {"k1": key})[0]
    assert replay.check_job(st, other, 0, 7, now).kind == "new"
    assert replay.check_job(st, other, 0, 8, now + 3601 * S).kind == "stale"


def test_a_tile_job_cannot_be_spliced_into_another_frame():
    key = bytes(range(32))
    gray = np.zeros((128, 128), np.uint8)
    [(_, record)] = tilejobs.make_jobs(job_header(3), gray, FeatureConfig(), 1, "k1", key)
    spliced = record.replace(b'"frame_id":"cam-big/3"', b'"frame_id":"cam-big/4"').replace(b'"seq":3', b'"seq":4')
    assert spliced != record
    with pytest.raises(FrameRejected) as exc:
        tilejobs.open_job(spliced, {"k1": key})
    assert exc.value.reason == "decrypt_failed"
    # Even a job made with the key (a processor bug) must name one frame consistently.
    job, _ = tilejobs.open_job(record, {"k1": key})
    job.frame = dataclasses.replace(job.frame, seq=4)
    with pytest.raises(FrameRejected, match="names frame"):
        tilejobs.check_binding(job)
    job.frame, job.band = dataclasses.replace(job.frame, seq=3), 1
    with pytest.raises(FrameRejected, match="band 1 of 1"):
        tilejobs.check_binding(job)


# -- on a real broker -------------------------------------------------------------------------------
def committed_everything(bootstrap: str, group: str, topic: str) -> bool:
    """Whether ``group`` has committed every record of ``topic`` (so a restart re-reads none of them)."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        done = {tp.partition: om.offset for tp, om in admin.list_group_offsets({group: None}).get(group, {}).items()
                if tp.topic == topic}
        parts = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic)]
        return all(done.get(tp.partition, 0) >= end for tp, end in c.end_offsets(parts).items())
    finally:
        c.close()
        admin.close()


def letters(bootstrap: str):
    from tilestream import topics
    from tilestream.records import DeadLetter

    from conftest import read_topic

    return [DeadLetter.from_json(m.value) for m in read_topic(bootstrap, topics.DEAD_LETTERS)]


def batches(bootstrap: str, frame_id: str, keystore) -> list:
    """The tile batches of ``frame_id`` on tile-features, each MAC verified with the stage keys."""
    from tilestream import topics
    from tilestream.records import TileBatch

    from conftest import mac_keys, read_topic

    keys = mac_keys(keystore)  # this test's keys: records of the module's other tests carry other MACs
    return [b for b in (TileBatch.from_wire(m.value, keys) for m in read_topic(bootstrap, topics.TILE_FEATURES)
                        if m.key == frame_id.encode())  # the processor keys tile batches by frame id
            if b.frame_id == frame_id]


def start_processor(children, env, tmp_path, name: str):
    from deploy.local_kafka import free_port
    from tilestream_cli.procs import wait_http

    port = free_port()
    proc = children.start(name, ["process", "--http-port", str(port), "--datadir", str(tmp_path / name)], env)
    wait_http(f"http://127.0.0.1:{port}/healthz", 90, proc)
    return proc


@pytest.mark.kafka
def test_replays_after_a_restart_or_on_another_partition_and_stale_frames_are_refused(kafka, keystore, vtest_path,
                                                                                        tmp_path):
    import hashlib

    from edge_agent.agent import EdgeAgent
    from kafkaio import clients
    from tilestream import topics
    from tilestream.config import AgentSettings
    from tilestream_cli.procs import Children
    from sampledata import iter_video_frames

    from conftest import child_env, wait_for

    camera, group = "cam-replay", "replay-test"
    keystore.enroll(camera)
    bootstrap = kafka.bootstrap
    env = child_env(bootstrap, keystore.path, tmp_path / "home")
    env["TILESTREAM_PROCESSOR_APP_ID"] = group
    agent = EdgeAgent(AgentSettings(camera_id=camera, source=str(vtest_path)), keystore, bootstrap, 4 * 1024 * 1024,
                      state_dir=tmp_path / "agent")
    images = list(iter_video_frames(str(vtest_path), max_frames=4))
    now = time.time_ns()
    h0, first = agent.seal(images[0], now)
    h1, old = agent.seal(images[1], now - 7 * 3600 * S)  # older than max_frame_age_s (6 h)
    h2, future = agent.seal(images[2], now + 3600 * S)  # a camera clock an hour ahead
    h3, last = agent.seal(images[3], now)
    mine = lambda d: d.frame_id is not None and d.frame_id.startswith(camera + "/")  # noqa: E731

    children = Children()
    producer = clients.producer(bootstrap)
    try:
        proc = start_processor(children, env, tmp_path, "processor-1")
        md = producer.send(topics.FRAMES, key=h0.frame_id.encode(), value=first).get(timeout=30)
        wait_for(lambda: batches(bootstrap, h0.frame_id, keystore), 90, "the frame's tile features")
        wait_for(lambda: committed_everything(bootstrap, group, topics.FRAMES), 60, "the frame's offset committed")
        assert children.stop(proc, name="processor-1") == 0

        # A new process: it knows about the first frame only from replay-marks.
        start_processor(children, env, tmp_path, "processor-2")
        elsewhere = (md.partition + 1) % KAFKA_PARTITIONS
        producer.send(topics.FRAMES, key=h0.frame_id.encode(), value=first)  # same partition, later offset
        producer.send(topics.FRAMES, key=b"anything", value=first, partition=elsewhere)  # another partition
        for h, blob in ((h1, old), (h2, future), (h3, last)):
            producer.send(topics.FRAMES, key=h.frame_id.encode(), value=blob)
        producer.flush(30)
        wait_for(lambda: batches(bootstrap, h3.frame_id, keystore) and len([d for d in letters(bootstrap) if mine(d)]) >= 4,
                 90, "the last frame's features and four dead letters")
    finally:
        producer.close()
        children.stop_all()

    got = sorted(((d.reason, d.frame_id, d.source_partition) for d in letters(bootstrap) if mine(d)),
                 key=lambda t: (t[0], t[1], t[2] == elsewhere))
    assert got == [("replay", h0.frame_id, md.partition), ("replay", h0.frame_id, elsewhere),
                   ("stale", h1.frame_id, got[2][2]), ("stale", h2.frame_id, got[3][2])], got
    digest = hashlib.sha256(first).hexdigest()
    assert [d.original_sha256 for d in letters(bootstrap) if mine(d) and d.reason == "replay"] == [digest, digest]
    assert len(batches(bootstrap, h0.frame_id, keystore)) == 1, "a replay produced a second feature set"
    assert not batches(bootstrap, h1.frame_id, keystore) and not batches(bootstrap, h2.frame_id, keystore)


@pytest.mark.kafka
def test_a_replayed_tile_job_produces_no_second_feature_set(kafka, keystore, vtest_path, tmp_path):
    from edge_agent.agent import EdgeAgent
    from kafkaio import clients
    from tilestream import topics
    from tilestream.config import AgentSettings
    from tilestream_cli.procs import Children
    from sampledata import iter_video_frames

    from conftest import child_env, read_topic, wait_for

    camera, group = "cam-jobs", "replay-jobs-test"
    keystore.enroll(camera)
    bootstrap = kafka.bootstrap
    env = child_env(bootstrap, keystore.path, tmp_path / "home")
    env["TILESTREAM_PROCESSOR_APP_ID"] = group
    env["TILESTREAM_PROCESSOR_FANOUT_MIN_PIXELS"] = "1"  # every frame goes through tile jobs
    agent = EdgeAgent(AgentSettings(camera_id=camera, source=str(vtest_path)), keystore, bootstrap, 4 * 1024 * 1024,
                      state_dir=tmp_path / "agent")
    images = list(iter_video_frames(str(vtest_path), max_frames=2))
    h0, first = agent.seal(images[0], time.time_ns())
    h1, second = agent.seal(images[1], time.time_ns())
    n_tiles = 108

    def tiles_of(fid: str) -> list[int]:
        return sorted(t.tile_index for b in batches(bootstrap, fid, keystore) for t in b.split())

    children = Children()
    producer = clients.producer(bootstrap)
    try:
        proc = start_processor(children, env, tmp_path, "processor-1")
        producer.send(topics.FRAMES, key=h0.frame_id.encode(), value=first).get(timeout=30)
        wait_for(lambda: len(tiles_of(h0.frame_id)) >= n_tiles, 90, "every tile of the frame")
        wait_for(lambda: committed_everything(bootstrap, group, topics.TILE_JOBS), 60, "the tile jobs committed")
        assert children.stop(proc, name="processor-1") == 0
        jobs = [m for m in read_topic(bootstrap, topics.TILE_JOBS) if m.key.decode().startswith(h0.frame_id + "#")]
        assert len(jobs) == 5

        start_processor(children, env, tmp_path, "processor-2")
        copied = jobs[0]
        producer.send(topics.TILE_JOBS, key=copied.key, value=copied.value)  # same partition, later offset
        producer.send(topics.TILE_JOBS, key=b"x", value=copied.value, partition=(copied.partition + 1) % KAFKA_PARTITIONS)
        producer.send(topics.FRAMES, key=h1.frame_id.encode(), value=second)
        producer.flush(30)

        def replayed_jobs():
            return [d for d in letters(bootstrap) if d.stage == "tiles" and d.original == copied.value]

        wait_for(lambda: len(tiles_of(h1.frame_id)) >= n_tiles and len(replayed_jobs()) >= 2, 90,
                 "the next frame's tiles and two refused tile jobs")
    finally:
        producer.close()
        children.stop_all()
    assert [d.reason for d in replayed_jobs()] == ["replay", "replay"]
    assert tiles_of(h0.frame_id) == list(range(n_tiles)), "a replayed tile job produced a second feature set"


KAFKA_PARTITIONS = 6  # frames and tile-jobs partitions of KafkaSettings()


def test_the_follower_skips_its_own_marks_and_reads_everything_else(kafka):
    """Marks this worker sent come back unread (its state already holds them); anyone else's are
    verified and returned, and so is a second copy of an own mark or a copy changed in any byte."""
    from kafkaio import clients
    from kafkaio.clients import ensure_topics
    from tilestream import topics
    from tilestream.config import KafkaSettings

    ensure_topics(kafka.bootstrap, [t for t in topics.pipeline_topics(KafkaSettings()) if t.name == topics.REPLAY_MARKS],
                  1)
    mine, other = state(), state()
    own = [encode_mark(check(mine, seq, 0, seq, camera="cam-own").mark, "k1", KEYS["k1"]) for seq in range(3)]
    theirs = encode_mark(check(other, 7, 1, 7, camera="cam-own").mark, "k1", KEYS["k1"])
    key, value = own[0]
    changed = (key, value[:-1] + bytes([value[-1] ^ 1]))  # not byte-identical: verified (and refused)
    follower = replay.MarksFollower(kafka.bootstrap, KEYS)
    producer = clients.producer(kafka.bootstrap)
    try:
        follower.read_new()  # from the beginning: whatever earlier tests left
        for k, v in own:
            follower.sent(k, v)
        for k, v in [*own, theirs, own[1], changed]:
            producer.send(topics.REPLAY_MARKS, key=k, value=v).get(timeout=30)
        refused = follower.refused
        got = follower.read_new()
        assert follower.own_skipped == 3
        assert [(m.camera, m.high, m.partition) for m in got] == [("cam-own", 7, 1), ("cam-own", 1, 0)]
        assert follower.refused == refused + 1
    finally:
        producer.close()
        follower.close()
