"""The spool's head file is checksummed: a bad one is counted, logged and rebuilt from the segment
records (which carry CRC-32C) without dropping a frame and without stopping the agent from starting."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from edge_agent.spool import Spool, _head_crc

from test_spool import check_entries, drain, fill


def _spool_with_acked_prefix(d: Path) -> None:
    """10 frames, 0..3 acknowledged (the head on disk says 3), 4..9 pending; closed."""
    with Spool(d, max_bytes=2**24, segment_bytes=4000, fsync="never") as sp:
        fill(sp, range(10))
        for e in sp.peek(4):
            sp.ack(e.id)
        sp.flush()
        assert sp.head == 3
    assert json.loads((d / "head").read_text())["acked_through"] == 3


BAD_HEADS = {
    "garbage bytes": b"\x00\xffnot json at all",
    "empty": b"",
    "above every id, no crc (v1)": json.dumps({"version": 1, "acked_through": 10**6, "last_seq": 5}).encode(),
    "above every id, right crc": json.dumps({"version": 2, "acked_through": 10**6, "last_seq": 5,
                                             "crc32c": _head_crc(10**6, 5)}).encode(),
    "changed number, old crc": json.dumps({"version": 2, "acked_through": 8, "last_seq": 9,
                                           "crc32c": _head_crc(3, 9)}).encode(),
    "no crc in v2": json.dumps({"version": 2, "acked_through": 8, "last_seq": 9}).encode(),
    "float infinity": b'{"version": 1, "acked_through": 1e400, "last_seq": 1}',
    "beyond 64 bits": json.dumps({"version": 1, "acked_through": 2**70, "last_seq": 1}).encode(),
    "negative": json.dumps({"version": 1, "acked_through": -5, "last_seq": 1}).encode(),
    "a list": b"[1, 2, 3]",
    "string id": json.dumps({"version": 1, "acked_through": "8", "last_seq": 1}).encode(),
    "bool id": json.dumps({"version": 1, "acked_through": True, "last_seq": 1}).encode(),
    "unknown version": json.dumps({"version": 7, "acked_through": 8, "last_seq": 1}).encode(),
    "huge file": b" " * 100_000,
}


@pytest.mark.parametrize("name", list(BAD_HEADS))
def test_a_bad_head_is_rebuilt_from_the_records_without_losing_a_frame(tmp_path, name, caplog):
    d = tmp_path / "spool"
    _spool_with_acked_prefix(d)
    (d / "head").write_bytes(BAD_HEADS[name])
    with caplog.at_level(logging.ERROR, logger="tilestream.spool"):
        sp = Spool(d, max_bytes=2**24, segment_bytes=4000, fsync="never")
    try:
        assert sp.head_rebuilt == 1
        assert any("spool_head_rebuilt" in r.getMessage() for r in caplog.records)
        entries = drain(sp)
        ids = [e.id for e in entries]
        # Every frame not acknowledged is there, intact and in order; acknowledged ones whose segment
        # is still on disk may come back (at least once), nothing behind them is lost.
        assert set(range(4, 10)) <= set(ids) and ids == sorted(ids)
        check_entries(entries, ids, ids)
        assert sp.next_id >= 10 and sp.last_seq == 9
        new = sp.append(b"cam-test/10", b"x", 10)
        assert new >= 10
    finally:
        sp.close()
    # The bad file was replaced by a good one: the next open trusts it and counts nothing.
    with Spool(d, max_bytes=2**24, segment_bytes=4000, fsync="never") as again:
        assert again.head_rebuilt == 0
        assert set(range(4, 11)) <= {e.id for e in drain(again)}


def test_a_good_head_is_trusted_and_written_with_its_checksum(tmp_path):
    d = tmp_path / "spool"
    _spool_with_acked_prefix(d)
    head = json.loads((d / "head").read_text())
    assert head["version"] == 2 and head["crc32c"] == _head_crc(head["acked_through"], head["last_seq"])
    with Spool(d, max_bytes=2**24, segment_bytes=4000, fsync="never") as sp:
        assert sp.head_rebuilt == 0 and sp.head == 3
        check_entries(drain(sp), range(4, 10), range(4, 10))


def test_a_version_1_head_of_an_older_agent_is_still_honoured(tmp_path):
    d = tmp_path / "spool"
    _spool_with_acked_prefix(d)
    (d / "head").write_text(json.dumps({"version": 1, "acked_through": 3, "last_seq": 9}))
    with Spool(d, max_bytes=2**24, segment_bytes=4000, fsync="never") as sp:
        assert sp.head_rebuilt == 0 and sp.head == 3
        check_entries(drain(sp), range(4, 10), range(4, 10))


def test_a_bad_head_of_a_fully_acknowledged_spool_keeps_ids_increasing(tmp_path):
    d = tmp_path / "spool"
    with Spool(d, max_bytes=2**24, segment_bytes=4000, fsync="never") as sp:
        fill(sp, range(5))
        for e in sp.peek(5):
            sp.ack(e.id)
        sp.flush()
    (d / "head").write_bytes(b"garbage")
    with Spool(d, max_bytes=2**24, segment_bytes=4000, fsync="never") as sp:
        assert sp.head_rebuilt == 1
        assert sp.append(b"k", b"v", 5) >= 5  # an id of a frame already sent is not given out again
