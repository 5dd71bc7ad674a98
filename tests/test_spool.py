"""The store-and-forward spool (edge_agent/spool.py) on real files: order, acks, caps, torn and
corrupt records, a real kill -9, space reclamation, concurrent append/ack."""

from __future__ import annotations

import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import wait_for
from edge_agent.spool import HEADER_BYTES, Entry, Spool, SpoolFull, SpoolLocked

# Deterministic, verifiable records: shared verbatim with the kill -9 child process.
PAYLOAD_SRC = textwrap.dedent('''
    import random

    def payload(seq, max_len=150_000):
        r = random.Random(seq)
        n = r.randrange(1, max_len)
        block = r.randbytes(4096)  # cheap to make even for big records: the child should mostly be writing
        return b"cam-test/%d" % seq, (block * (n // 4096 + 1))[:n]
''')
_ns: dict = {}
exec(PAYLOAD_SRC, _ns)
payload = _ns["payload"]


def rec_size(key: bytes, value: bytes) -> int:
    return HEADER_BYTES + len(key) + len(value)


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("seg-*.log"))


def drain(sp: Spool) -> list[Entry]:
    return sp.peek(10**9)


def fill(sp: Spool, seqs, max_len=5000) -> list[int]:
    return [sp.append(*payload(s, max_len), s) for s in seqs]


def check_entries(entries: list[Entry], ids, seqs, max_len=5000) -> None:
    assert [e.id for e in entries] == list(ids)
    assert [e.seq for e in entries] == list(seqs)
    for e in entries:
        assert (e.key, e.value) == payload(e.seq, max_len), f"entry {e.id} garbled"


def test_fifo_round_trip_across_reopen_and_ids_and_seqs_continue(tmp_path):
    d = tmp_path / "spool"
    with Spool(d, max_bytes=10 * 2**20, segment_bytes=20_000) as sp:
        ids = fill(sp, range(1000, 1050))
        assert ids == list(range(50))
        assert sp.frames == 50 and sp.appended == 50
        assert len(segments(d)) > 3  # rolled over several segments
        assert sp.bytes == sum(p.stat().st_size for p in segments(d))
        first = sp.peek(7)
        check_entries(first, range(7), range(1000, 1007))
    with Spool(d, max_bytes=10 * 2**20, segment_bytes=20_000) as sp:
        assert sp.frames == 50 and sp.next_id == 50 and sp.last_seq == 1049
        assert sp.torn_records_discarded == 0 and sp.corrupt_records_skipped == 0
        check_entries(drain(sp), range(50), range(1000, 1050))  # in-flight before close: back again
        assert fill(sp, [sp.last_seq + 1]) == [50]
    with Spool(d, max_bytes=10 * 2**20) as sp:
        check_entries(drain(sp), range(51), range(1000, 1051))
        assert sp.last_seq == 1050


def test_peek_hands_out_once_and_release_puts_back_in_order(tmp_path):
    with Spool(tmp_path, max_bytes=2**20) as sp:
        fill(sp, range(6))
        assert [e.id for e in sp.peek(3)] == [0, 1, 2]
        assert [e.id for e in sp.peek(2)] == [3, 4]
        assert sp.in_flight == 5
        assert sp.release([3, 1, 99]) == 2
        assert sp.nack(0) and not sp.nack(0)
        assert [e.id for e in sp.peek(10)] == [0, 1, 3, 5]
        assert sp.peek(10) == []
        assert sp.ack(2) and not sp.ack(2) and not sp.ack(1234)
        assert (sp.frames, sp.in_flight, sp.head) == (5, 5, -1)


def test_out_of_order_acks_advance_head_over_contiguous_prefix_only(tmp_path):
    d = tmp_path / "spool"
    with Spool(d, max_bytes=2**20, segment_bytes=3 * 6000) as sp:
        fill(sp, range(100, 108))
        entries = sp.peek(8)
        for i in (2, 4, 5):
            assert sp.ack(entries[i].id)
        assert sp.head == -1 and sp.frames == 5 and sp.acked == 3
        assert sp.ack(0)
        assert sp.head == 0
        assert sp.ack(1)
        assert sp.head == 2  # 0, 1, 2 contiguous; 3 still out; 4, 5 acked past it
        assert sp.frames == 3  # 3, 6, 7
        assert not sp.ack(1)  # behind the head: gone
    with Spool(d, max_bytes=2**20) as sp:
        assert sp.head == 2
        # 3 un-acked, 4 and 5 acked but not behind the head (at least once), 6 and 7 never sent.
        check_entries(drain(sp), range(3, 8), range(103, 108))
        assert sp.frames == 5
        assert fill(sp, [sp.last_seq + 1]) == [8]


def test_head_is_persisted_every_n_acks_without_touching_segments(tmp_path):
    d = tmp_path / "spool"
    sp = Spool(d, max_bytes=2**20, segment_bytes=4000, fsync="never", head_sync_acks=4)
    try:
        fill(sp, range(12), max_len=1000)
        files, size = segments(d), sp.bytes
        for e in sp.peek(12)[:8]:
            sp.ack(e.id)
        assert '"acked_through": 7' in (d / "head").read_text()
        assert segments(d) == files and sp.bytes == size  # ack never deletes
        sp.flush()
        assert len(segments(d)) < len(files) and sp.bytes < size
    finally:
        sp.close()


def test_drop_oldest_at_the_byte_cap_drops_exactly_the_oldest(tmp_path):
    d = tmp_path / "spool"
    key, value = b"k", b"v" * 1000
    size = rec_size(key, value)
    with Spool(d, max_bytes=10 * size, when_full="drop_oldest", segment_bytes=3 * size) as sp:
        for s in range(10):
            sp.append(key, value, s)
        assert (sp.dropped, sp.frames, sp.live_bytes) == (0, 10, 10 * size)
        inflight = sp.peek(2)  # in flight entries are dropped too, and counted
        assert sp.append(key, value, 10) == 10
        assert (sp.dropped, sp.frames, sp.head) == (1, 10, 0)
        for s in range(11, 14):
            sp.append(key, value, s)
        assert (sp.dropped, sp.frames, sp.head, sp.in_flight) == (4, 10, 3, 0)
        assert not sp.ack(inflight[1].id)  # a dropped entry cannot be acked any more
        assert [e.seq for e in drain(sp)] == list(range(4, 14))
        assert sp.live_bytes == 10 * size
        for s in range(14, 1014):  # hours of dropping with nobody peeking must not hoard memory
            sp.append(key, value, s)
        assert sp.dropped == 1004 and len(sp._pending) <= sp.frames
        assert sp.bytes <= 10 * size + 3 * size  # at most one segment of dead prefix on disk
        assert sp.bytes == sum(p.stat().st_size for p in segments(d))
    with Spool(d, max_bytes=10 * size, segment_bytes=3 * size) as sp:
        assert [e.seq for e in drain(sp)] == list(range(1004, 1014))


def test_acked_space_is_reused_before_dropping(tmp_path):
    key, value = b"k", b"x" * 500
    size = rec_size(key, value)
    with Spool(tmp_path, max_bytes=4 * size, segment_bytes=2 * size) as sp:
        for s in range(4):
            sp.append(key, value, s)
        for e in sp.peek(2):
            sp.ack(e.id)
        sp.append(key, value, 4)
        sp.append(key, value, 5)
        assert sp.dropped == 0 and [e.seq for e in drain(sp)] == [2, 3, 4, 5]


def test_block_raises_spoolfull_without_losing_or_corrupting_anything(tmp_path):
    d = tmp_path / "spool"
    key, value = b"k", b"b" * 2000
    size = rec_size(key, value)
    with Spool(d, max_bytes=5 * size, when_full="block", segment_bytes=2 * size) as sp:
        for s in range(5):
            sp.append(key, value, s)
        on_disk = sorted((p.name, p.read_bytes()) for p in segments(d))
        before = (sp.frames, sp.bytes, sp.live_bytes, sp.appended, sp.next_id)
        with pytest.raises(SpoolFull) as info:
            sp.append(key, value, 5)
        assert info.value.needed == size and info.value.free == 0
        assert (sp.frames, sp.bytes, sp.live_bytes, sp.appended, sp.next_id) == before
        assert sp.full_rejections == 1 and sp.dropped == 0
        assert sorted((p.name, p.read_bytes()) for p in segments(d)) == on_disk
        assert not sp.wait_for_space(len(key) + len(value), timeout=0.01)

        # A waiter wakes up when acks free space (condition, not polling).
        entries = sp.peek(2)
        got: list[bool] = []
        waiter = threading.Thread(target=lambda: got.append(sp.wait_for_space(len(key) + len(value), timeout=30)))
        waiter.start()
        sp.ack(entries[1].id)  # not the head: frees nothing
        assert got == []
        sp.ack(entries[0].id)
        waiter.join(timeout=30)
        assert got == [True]
        sp.append(key, value, 5)
        sp.append(key, value, 6)
        with pytest.raises(SpoolFull):
            sp.append(key, value, 7)
        assert sp.full_rejections == 2
    with Spool(d, max_bytes=5 * size, when_full="block") as sp:
        entries = drain(sp)
        assert [e.seq for e in entries] == [2, 3, 4, 5, 6]
        assert all(e.key == key and e.value == value for e in entries)
        assert sp.corrupt_records_skipped == 0 and sp.torn_records_discarded == 0


def _one_segment_spool(d: Path, n: int = 5) -> list[int]:
    """n records in a single segment; returns each record's offset (and the file end)."""
    with Spool(d, max_bytes=2**24, segment_bytes=2**24) as sp:
        fill(sp, range(n))
    (seg,) = segments(d)
    offsets, off = [], 0
    for s in range(n):
        offsets.append(off)
        off += rec_size(*payload(s, 5000))
    assert off == seg.stat().st_size
    return offsets + [off]


@pytest.mark.parametrize("cut", ["0", "1", "4", "12", "31", "32", "33", "mid", "end-1"])
def test_torn_tail_is_truncated_and_counted(tmp_path, cut):
    d = tmp_path / "spool"
    offsets = _one_segment_spool(d)
    (seg,) = segments(d)
    last, end = offsets[-2], offsets[-1]
    at = {"mid": (last + end) // 2, "end-1": end - 1}.get(cut) or last + int(cut)
    os.truncate(seg, at)
    torn = at > last
    with Spool(d, max_bytes=2**24) as sp:
        assert sp.torn_records_discarded == int(torn)
        assert sp.corrupt_records_skipped == 0
        check_entries(drain(sp), range(4), range(4))  # at the boundary the last record is simply absent
        assert seg.stat().st_size == last  # the torn bytes are gone from disk
        assert fill(sp, [100]) == [4]  # appends continue after the last complete record
    with Spool(d, max_bytes=2**24) as sp:
        assert sp.torn_records_discarded == 0
        check_entries(drain(sp), range(5), [0, 1, 2, 3, 100])


def test_garbage_tail_is_discarded(tmp_path):
    d = tmp_path / "spool"
    _one_segment_spool(d, 3)
    (seg,) = segments(d)
    with open(seg, "ab") as f:
        f.write(b"\0" * 4096)  # e.g. a zero-filled extent after power loss
    with Spool(d, max_bytes=2**24) as sp:
        assert sp.torn_records_discarded == 1
        check_entries(drain(sp), range(3), range(3))


@pytest.mark.parametrize("where", [0, 3, 5, 9, 17, 27, HEADER_BYTES + 1, "payload"])
def test_flipped_byte_in_a_middle_record_is_skipped_and_counted(tmp_path, where):
    d = tmp_path / "spool"
    offsets = _one_segment_spool(d)
    (seg,) = segments(d)
    pos = offsets[2] + (where if where != "payload" else (offsets[3] - offsets[2]) // 2)
    data = bytearray(seg.read_bytes())
    data[pos] ^= 0x5A
    seg.write_bytes(bytes(data))
    with Spool(d, max_bytes=2**24) as sp:
        assert sp.corrupt_records_skipped == 1
        assert sp.torn_records_discarded == 0
        entries = drain(sp)
        check_entries(entries, [0, 1, 3, 4], [0, 1, 3, 4])
        assert fill(sp, [5]) == [5]
    with Spool(d, max_bytes=2**24) as sp:
        check_entries(drain(sp), [0, 1, 3, 4, 5], [0, 1, 3, 4, 5])


def test_corruption_in_an_older_segment_is_skipped(tmp_path):
    d = tmp_path / "spool"
    with Spool(d, max_bytes=2**24, segment_bytes=3 * 5100) as sp:
        fill(sp, range(12))
    segs = segments(d)
    assert len(segs) >= 3
    data = bytearray(segs[0].read_bytes())
    data[-10] ^= 0xFF  # last record of the first segment
    segs[0].write_bytes(bytes(data))
    with Spool(d, max_bytes=2**24) as sp:
        assert sp.corrupt_records_skipped == 1 and sp.torn_records_discarded == 0
        entries = drain(sp)
        assert len(entries) == 11 and [e.id for e in entries] == sorted(e.id for e in entries)
        for e in entries:
            assert (e.key, e.value) == payload(e.seq, 5000)


def test_record_corrupted_after_open_is_never_handed_out(tmp_path):
    d = tmp_path / "spool"
    offsets = _one_segment_spool(d, 3)
    with Spool(d, max_bytes=2**24) as sp:
        (seg,) = [p for p in segments(d) if p.stat().st_size]
        with open(seg, "r+b") as f:  # bit rot under a running spool
            f.seek(offsets[1] + 100)
            b = f.read(1)
            f.seek(offsets[1] + 100)
            f.write(bytes([b[0] ^ 1]))
        entries = drain(sp)
        check_entries(entries, [0, 2], [0, 2])
        assert sp.corrupt_records_skipped == 1 and sp.frames == 2


def test_batch_mode_syncs_only_records_that_wait_for_their_ack(tmp_path):
    """A sender that keeps up never makes the spool fsync (no CPU for it, no flash wear for frames
    Kafka already has); a record left unacknowledged for an interval is synced soon after."""
    with Spool(tmp_path / "spool", max_bytes=2**26, fsync="batch", sync_interval=0.05) as sp:
        deadline = time.monotonic() + 0.6  # a dozen sync intervals of appends acknowledged at once
        seq = 0
        while time.monotonic() < deadline:
            sp.append(*payload(seq, 5000), seq)
            (e,) = sp.peek(1)
            assert sp.ack(e.id)
            seq += 1
            time.sleep(0.002)
        assert seq > 100 and sp.syncs == 0, f"{sp.syncs} syncs for {seq} records acknowledged right away"
        sp.append(*payload(seq, 5000), seq)  # this one waits (broker away)
        deadline = time.monotonic() + 10
        while sp.syncs == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sp.syncs >= 1, "an unacknowledged record was never synced"
        (e,) = sp.peek(1)
        assert e.seq == seq and sp.ack(e.id)


def test_batch_mode_persists_a_moving_head_once_per_head_sync_interval_not_every_sync_interval(tmp_path):
    """With a sender that keeps up the head moves on every ack; the syncer writes it durably (file and
    directory fsync, ~0.5 CPU ms each) at most once per head_sync_interval, not on each of its ticks,
    and the head file still catches up with the acknowledged head within about that interval (what a
    power loss can bring back as pending: acknowledged records of that long, never a lost one)."""
    import json

    d = tmp_path / "spool"
    with Spool(d, max_bytes=2**26, fsync="batch", sync_interval=0.02, head_sync_interval=0.3,
               head_sync_acks=10**6) as sp:  # no head write from ack(): only the syncer's count
        start = time.monotonic()
        seq = 0
        while time.monotonic() - start < 1.0:  # 50 sync intervals, the head moving in each
            sp.append(*payload(seq, 2000), seq)
            (e,) = sp.peek(1)
            assert sp.ack(e.id)
            seq += 1
            time.sleep(0.002)
        elapsed = time.monotonic() - start
        writes = sp.head_syncs
        assert writes <= elapsed / 0.3 + 1, f"{writes} durable head writes in {elapsed:.2f} s (interval 0.3 s)"
        head = sp.head

        def on_disk() -> int:
            try:
                return json.loads((d / "head").read_text())["acked_through"]
            except FileNotFoundError:
                return -1

        wait_for(lambda: on_disk() == head, 10, "the head file to catch up with the last acknowledgement")
        assert sp.head_syncs >= 1
        assert sp.syncs == 0  # nothing waited for its ack: no segment was fsynced
    with pytest.raises(ValueError):
        Spool(tmp_path / "other", max_bytes=2**20, head_sync_interval=0)


def test_records_of_the_older_crc32_format_are_still_read(tmp_path):
    """Spools written before the CRC-32C records (magic TSPL, zlib CRC-32) recover after an upgrade,
    and a flipped byte in such a record is still caught."""
    import struct
    import zlib

    d = tmp_path / "spool"
    offsets = _one_segment_spool(d, 3)
    (seg,) = segments(d)
    data = bytearray(seg.read_bytes())
    for start, end in zip(offsets, offsets[1:]):  # rewrite every record in the old format
        data[start:start + 4] = b"TSPL"
        data[start + 4:start + 8] = struct.pack("<I", zlib.crc32(data[start + 8:end]))
    data[offsets[1] + 200] ^= 1
    seg.write_bytes(bytes(data))
    with Spool(d, max_bytes=2**24) as sp:
        check_entries(drain(sp), [0, 2], [0, 2])
        assert sp.corrupt_records_skipped == 1
        fill(sp, [3])  # new appends use the new format beside the old records
    with Spool(d, max_bytes=2**24) as sp:
        check_entries(drain(sp), [0, 2, 3], [0, 2, 3])
        assert sp.corrupt_records_skipped == 1


def test_fresh_appends_are_handed_out_from_memory_and_the_rest_from_disk(tmp_path):
    """Up to cache_bytes of new records are handed out without reading the disk back (so bit rot
    between append and peek does not reach the sender); beyond that, and after a release, the
    disk copy is read and checked."""
    d = tmp_path / "spool"
    size = rec_size(*payload(0, 5000))
    with Spool(d, max_bytes=2**24, segment_bytes=2**24, cache_bytes=size + rec_size(*payload(1, 5000))) as sp:
        fill(sp, range(4))  # 0 and 1 cached, 2 and 3 only on disk
        (seg,) = segments(d)
        with open(seg, "r+b") as f:  # flip a byte in records 0 (cached) and 2 (not cached)
            for off in (100, size + rec_size(*payload(1, 5000)) + 100):
                f.seek(off)
                b = f.read(1)
                f.seek(off)
                f.write(bytes([b[0] ^ 1]))
        entries = drain(sp)
        check_entries(entries, [0, 1, 3], [0, 1, 3])
        assert sp.corrupt_records_skipped == 1
        assert sp.release([0]) == 1  # a retry reads the disk copy, which is now bad
        assert drain(sp) == [] and sp.corrupt_records_skipped == 2


CHILD = PAYLOAD_SRC + textwrap.dedent('''
    import random, sys
    from edge_agent.spool import Spool

    directory, fsync, seed, max_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    sp = Spool(directory, max_bytes=1 << 32, when_full="block", segment_bytes=4 << 20, fsync=fsync,
               sync_interval=0.02, head_sync_acks=8)
    out = sys.stdout
    for e in sp.peek(1 << 30):  # settle what a previous run left behind
        out.write(f"A {e.id}\\n")  # reported *before* the ack: the parent may only over-count acks
        out.flush()
        sp.ack(e.id)
    out.write(f"R {sp.next_id}\\n")
    out.flush()
    mine = []
    n = 0
    while True:
        seq = sp.last_seq + 1
        key, value = payload(seq, max_len)
        eid = sp.append(key, value, seq)
        out.write(f"D {eid} {seq}\\n")  # append returned: survives the death of this process
        out.flush()
        mine.append(eid)
        n += 1
        if n % 4 == 0 and len(mine) > 12:
            batch = mine[:4]
            del mine[:4]
            rng.shuffle(batch)  # out of order, as acks from several partitions
            for i in batch:
                out.write(f"A {i}\\n")
                out.flush()
                sp.ack(i)
        if n % 40 == 0:
            sp.flush()
            out.write(f"F {sp.head}\\n")
            out.flush()
''')


ROUNDS = 4
KILL_MAX_LEN = 2_000_000  # big records: a good share of the child's time is spent inside write()


def _run_child_and_kill(script: Path, d: Path, fsync: str, seed: int, kill_after: int, jitter: float,
                        lines: list[str]) -> None:
    """Start the child, read its reports until ``kill_after`` durable ids, then SIGKILL it
    ``jitter`` seconds later (still reading), so the kill lands at a random point of the
    child's loop (reacting to a report at once would always hit it just after a print)."""
    proc = subprocess.Popen([sys.executable, str(script), str(d), fsync, str(seed), str(KILL_MAX_LEN)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(Path(__file__).parent.parent))
    sel = selectors.DefaultSelector()
    try:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 120
        kill_at = None
        buf = b""
        while kill_at is None or time.monotonic() < kill_at:
            if kill_at is None and buf.count(b"\nD ") >= kill_after:  # the first line is never a D line
                kill_at = time.monotonic() + jitter
                continue
            left = (kill_at or deadline) - time.monotonic()
            assert time.monotonic() < deadline, f"child too slow: {buf.decode(errors='replace')[-500:]}"
            if not sel.select(timeout=max(left, 0)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"child exited early: {proc.wait()} {proc.stderr.read().decode()}")
            buf += chunk
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream, possibly mid-write
        rest = proc.stdout.read()  # whatever it reported before dying
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    text = (buf + rest).decode()
    complete = text[: text.rfind("\n") + 1]  # a half-printed last line reports nothing
    lines.extend(complete.splitlines())


@pytest.mark.parametrize("fsync", ["batch", "always"])
def test_kill_9_mid_stream_loses_nothing_reported_and_garbles_nothing(tmp_path, fsync):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    d = tmp_path / "spool"
    durable: dict[int, int] = {}  # id -> seq, reported after append returned
    acked: set[int] = set()
    flushed_head = -1
    seen: set[int] = set()  # ids found by earlier recoveries
    rng = random.Random(fsync)
    torn = 0
    for round_ in range(ROUNDS):
        lines: list[str] = []
        _run_child_and_kill(script, d, fsync, round_, rng.randrange(20, 60), rng.uniform(0, 0.01), lines)
        round_max = -1
        for line in lines:
            kind, *args = line.split()
            if kind == "D":
                eid, seq = int(args[0]), int(args[1])
                assert eid not in durable and eid not in seen, "entry id reused"
                durable[eid] = seq
                round_max = eid
            elif kind == "A":
                acked.add(int(args[0]))
            elif kind == "F":
                flushed_head = max(flushed_head, int(args[0]))
            elif kind == "R":
                assert int(args[0]) > max([*durable, *seen], default=-1)
        assert round_max >= 0

        with Spool(d, max_bytes=1 << 32) as sp:
            entries = drain(sp)
            torn += sp.torn_records_discarded
            assert sp.corrupt_records_skipped == 0
            assert sp.torn_records_discarded <= 1
        ids = [e.id for e in entries]
        assert ids == sorted(set(ids)), "order broken or duplicates"
        seqs = [e.seq for e in entries]
        assert seqs == sorted(set(seqs)), "capture order broken"
        for e in entries:
            assert (e.key, e.value) == payload(e.seq, KILL_MAX_LEN), f"entry {e.id} garbled"
            if e.id in durable:
                assert durable[e.id] == e.seq
        present = set(ids)
        must = {i for i in [*durable, *seen] if i not in acked and i > flushed_head}
        assert must <= present, f"lost durable entries {sorted(must - present)[:10]}"
        assert all(i > flushed_head for i in present), "an entry behind the flushed head came back"
        unreported = present - durable.keys() - seen
        # Only the one append that returned right before the kill may be unreported.
        assert len(unreported) <= 1 and all(i > round_max for i in unreported)
        seen |= present
    print(f"fsync={fsync}: {len(durable)} records over {ROUNDS} kills, torn tails found: {torn}")
    shutil.rmtree(d)  # a few hundred MB: do not keep it in pytest's retained tmp dirs


def test_segments_of_fully_acked_entries_are_deleted(tmp_path):
    d = tmp_path / "spool"
    key, value = b"k", b"r" * 3000
    size = rec_size(key, value)
    with Spool(d, max_bytes=2**24, segment_bytes=2 * size) as sp:
        for s in range(10):
            sp.append(key, value, s)
        assert len(segments(d)) == 5 and sp.bytes == 10 * size
        entries = sp.peek(10)
        for e in entries[:3]:
            sp.ack(e.id)
        sp.flush()
        assert len(segments(d)) == 4 and sp.bytes == 8 * size  # 0,1 gone; 2 acked but shares with 3
        assert '"acked_through": 2' in (d / "head").read_text()
        for e in reversed(entries[3:]):
            sp.ack(e.id)
        assert sp.head == 9 and sp.frames == 0 and sp.live_bytes == 0
        sp.flush()
        # Only the active segment remains (fully acked, deleted on the next roll or open).
        assert len(segments(d)) == 1 and sp.bytes == 2 * size
        assert sp.bytes == sum(p.stat().st_size for p in segments(d))
    with Spool(d, max_bytes=2**24, segment_bytes=2 * size) as sp:
        assert sp.frames == 0 and sp.bytes == 0 and drain(sp) == []
        assert [p.stat().st_size for p in segments(d)] == [0]
        assert sp.append(key, value, 10) == 10 and sp.last_seq == 10


def test_dead_segments_are_reclaimed_while_appending(tmp_path):
    key, value = b"k", b"q" * 1000
    size = rec_size(key, value)
    with Spool(tmp_path, max_bytes=2**24, segment_bytes=4 * size, fsync="always") as sp:
        for s in range(200):
            eid = sp.append(key, value, s)
            for e in sp.peek(10):
                sp.ack(e.id)
            assert eid == s
        assert len(segments(tmp_path)) <= 2 and sp.bytes <= 8 * size
        assert sp.appended == sp.acked == 200


def test_concurrent_append_and_out_of_order_acks(tmp_path):
    d = tmp_path / "spool"
    n = 3000
    sp = Spool(d, max_bytes=2**26, segment_bytes=64 * 1024, head_sync_acks=16, sync_interval=0.01)
    done = threading.Event()
    errors: list[BaseException] = []
    got: list[Entry] = []

    def capture():
        try:
            for s in range(n):
                sp.append(b"k%d" % s, b"%d" % s * 50, s)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    def sender():
        try:
            rng = random.Random(7)
            deadline = time.monotonic() + 60
            while len(got) < n and time.monotonic() < deadline:
                batch = sp.peek(rng.randrange(1, 40), timeout=0.5)  # wakes on append or release
                if not batch:
                    continue
                got.extend(batch)
                rng.shuffle(batch)
                for e in batch[: len(batch) // 4]:
                    sp.nack(e.id)
                    got.remove(e)
                for e in batch[len(batch) // 4:]:
                    sp.ack(e.id)
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=capture), threading.Thread(target=sender)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    try:
        assert not errors and not any(t.is_alive() for t in threads)
        assert sorted(e.seq for e in got) == list(range(n))
        assert all(e.value == b"%d" % e.seq * 50 and e.id == e.seq for e in got)
        assert (sp.frames, sp.in_flight, sp.live_bytes, sp.head, sp.acked) == (0, 0, 0, n - 1, n)
    finally:
        sp.close()
    with Spool(d, max_bytes=2**26) as sp:
        assert sp.frames == 0 and sp.next_id == n


def test_peek_waits_for_an_append_or_a_release(tmp_path):
    with Spool(tmp_path, max_bytes=2**20) as sp:
        assert sp.peek(5, timeout=0.01) == []
        got: list[list[Entry]] = []
        t = threading.Thread(target=lambda: got.append(sp.peek(5, timeout=30)))
        t.start()
        sp.append(b"k", b"v", 7)
        t.join(timeout=30)
        assert [[(e.id, e.seq) for e in batch] for batch in got] == [[(0, 7)]]
        t = threading.Thread(target=lambda: got.append(sp.peek(5, timeout=30)))
        t.start()
        sp.nack(0)
        t.join(timeout=30)
        assert [e.id for e in got[1]] == [0]

        def wait_forever():
            try:
                got.append(sp.peek(5, timeout=None))
            except ValueError:  # closed before it even started waiting
                got.append([])

        t = threading.Thread(target=wait_forever)
        t.start()
    t.join(timeout=30)  # close wakes a waiting sender with nothing
    assert not t.is_alive() and got[2] == []


def test_one_open_spool_per_directory_and_closed_spool_refuses_work(tmp_path):
    sp = Spool(tmp_path, max_bytes=2**20)
    with pytest.raises(SpoolLocked):
        Spool(tmp_path, max_bytes=2**20)
    sp.close()
    sp.close()  # idempotent
    with pytest.raises(ValueError):
        sp.append(b"k", b"v", 0)
    assert not sp.ack(0)
    with Spool(tmp_path, max_bytes=2**20) as again:
        with pytest.raises(ValueError):
            again.append(b"k", b"v" * 2**20, 0)  # can never fit
