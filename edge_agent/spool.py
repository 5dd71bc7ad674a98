"""Store-and-forward spool: a bounded, crash-safe, on-disk FIFO of sealed frames.

The agent appends every sealed frame here and a sender hands spooled frames to Kafka; a
frame leaves the spool only once Kafka acknowledged it *and* every older frame. While the
broker is unreachable the spool simply grows, up to ``max_bytes``.

Public API
----------
``Spool(directory, max_bytes, when_full="drop_oldest", segment_bytes=8 MiB, fsync="batch")``
    (keyword-only tuning: ``sync_interval=0.5``, ``head_sync_interval=5.0``, ``head_sync_acks=64``,
    ``cache_bytes=32 MiB``)
    Opens (recovering) or creates the spool; one process at a time (``flock`` on ``.lock``).
``append(key, value, seq) -> int``
    Stores one frame and returns its entry id (ids increase with each append and continue
    across restarts; an id whose record did not survive a crash may be given out again).
    Never blocks on a full spool: when live data would exceed ``max_bytes``,
    ``"drop_oldest"`` drops just enough of the oldest not-yet-acknowledged entries (in
    flight ones too: a late ack of them is ignored; all counted in ``dropped``) and
    ``"block"`` raises :class:`SpoolFull` without changing anything (the agent pauses
    capture and counts it; ``full_rejections`` counts it too). ``wait_for_space(nbytes,
    timeout) -> bool`` waits until an append with ``len(key) + len(value) == nbytes`` fits.
    A disk error (``OSError``, e.g. ENOSPC) propagates and leaves no partial record behind.
``peek(max_entries, timeout=0) -> list[Entry]``
    Hands out up to ``max_entries`` of the oldest entries not currently handed out, in
    capture order, and marks them in flight (so several batches can be outstanding); waits
    up to ``timeout`` for a first one. It removes nothing.
``ack(entry_id) -> bool``
    Marks an entry delivered, in any order. The spool's head advances over the contiguous
    acknowledged prefix only; entries behind the head are gone for good (space reclaimed,
    never re-delivered after a restart). No disk I/O except, at most once per
    ``head_sync_acks`` acks, the small head file.
``release(entry_ids) -> int`` / ``nack(entry_id)``
    Puts in-flight entries back (after a failed send); the next ``peek`` returns them first.
``flush()``  syncs data and head to disk and deletes fully acknowledged segments.
``close()``  flush, stop the background syncer, release the directory lock.

Delivery is **at least once**: after a crash (or restart) every entry past the persisted
head comes back as pending, including entries that were acknowledged out of order but not
yet behind the head, and entries acknowledged after the last head write (at most
``head_sync_acks`` acks or ``head_sync_interval`` seconds old, see Durability). Kafka keys
(the frame id) make the duplicates recognisable downstream.

Counters (plain attributes, per process): ``appended``, ``acked``, ``dropped``,
``full_rejections``, ``torn_records_discarded``, ``corrupt_records_skipped``, ``head_rebuilt``,
``syncs`` (segment fdatasyncs), ``head_syncs`` (durable head writes); gauges:
``frames`` (entries neither acknowledged nor dropped), ``in_flight``, ``live_bytes`` (bytes
of entries past the head: what ``max_bytes`` bounds) and ``bytes`` (size of the segment
files on disk). ``bytes`` may exceed ``max_bytes`` by at most one segment (the partly
acknowledged oldest segment, or the fully acknowledged active one) and drops only when a
segment is deleted, which happens in ``append``/``flush``/``close``, never in ``ack``.

On-disk format
--------------
``seg-<first entry id, 20 digits>.log``  append-only segment files, records back to back::

    offset size  field
    0      4     magic  b"TSPC" (b"TSPL" in spools written before: read as well)
    4      4     CRC-32C (b"TSPL": zlib's CRC-32), little endian, of bytes 8..end of the record
    8      4     key length   (u32 LE)
    12     4     value length (u32 LE)
    16     8     entry id     (u64 LE)
    24     8     seq          (i64 LE)
    32     ...   key, then value

Appends also keep the newest records in memory (up to ``cache_bytes``) until they are first
handed out, so a sender that keeps up never reads back what was just written; the disk copy
is what survives a crash, and whatever is not cached (a backlog, a retry) is read from disk
and CRC-checked.

``head``  JSON ``{"version": 2, "acked_through": <id>, "last_seq": <seq>, "crc32c": <c>}`` written
atomically (temp file + ``os.replace``): every entry with id <= ``acked_through`` is gone.
``c`` is the CRC-32C of ``HEAD_CRC_CONTEXT + acked_through + last_seq`` (two i64 LE). One wrong
number here would drop every spooled frame (an ``acked_through`` above them) or stop the agent
from starting at all (one that is not a 64-bit integer), so a head that does not check -- bad
CRC, not JSON, a number out of range, or an ``acked_through`` above every id the segments
know of -- is counted in ``head_rebuilt``, logged, and rebuilt from the segment records
(which carry their own CRC): the head is put just before the oldest record on disk, so
nothing is lost and at worst some acknowledged frames are sent again (at least once; the
agent's reconciliation drops the ones already on the topic). Version 1 heads (no CRC,
written before) are read with the same range checks.
``.lock`` the process lock. A segment is written by one process only; each open starts a
new segment (named after the next entry id, so even an empty spool remembers its ids).

Recovery (on open) reads every segment and checks each record (magic, lengths within the
file, CRC, ids increasing). On a bad record it looks for the next position holding the
magic *and* a fully valid record. If there is one, the bad span is skipped and counted in
``corrupt_records_skipped`` (one per span; the span stays on disk, so it is counted again
on each open until the segment is reclaimed). If there is none, the rest of the file is a
torn tail: it is truncated away and counted in ``torn_records_discarded`` (or in
``corrupt_records_skipped`` when it is not the newest segment). A corrupted *last* record
looks exactly like a torn one and is counted as torn. Records are also CRC-checked when
``peek`` reads them; a bad one is skipped (counted as corrupt), never handed out.

Durability (``fsync``)
----------------------
When ``append`` returns, the record is in the kernel: it survives the process dying
(``kill -9``) in every mode. ``"always"``: it is also fdatasync'ed (and new segment files
dir-synced) before ``append`` returns, so it survives power loss. ``"batch"``: every
``sync_interval`` seconds a background thread syncs the segments that hold a record which has
waited a whole interval for its acknowledgement, then the directory, so power loss costs at
most about two intervals of unacknowledged records (unchanged). The same thread writes the head
durably (file and directory fsync) at most once per ``head_sync_interval`` seconds (5 s), when it
moved; segment deletion writes it durably before a segment goes. So a power loss brings back as
pending the records acknowledged in about the last ``head_sync_interval`` + ``sync_interval``
seconds (before: about ``sync_interval``), a crash of the process those of at most
``head_sync_acks`` acks or ``head_sync_interval`` seconds (the non-durable head write in ``ack``);
none is lost either way (at least once; the agent's reconciliation drops those already on the
topic instead of sending them again). It wrote the head every ``sync_interval`` before: two durable
head writes a second cost the syncer thread 0.13-0.17 CPU ms per frame at 10 fps (0.5 ms each,
file + directory fsync on ext4; ``benchmarks/agent_bench.py``), 5 % of the agent's whole CPU, for
half a second less of frames to re-read after a power loss. A sender that keeps up
never makes the spool sync: its records are acknowledged within the interval and their
segments deleted, usually before the kernel writes them back, so an agent that is online
neither pays for fsync nor wears the camera's flash with frames Kafka already has (counted
in ``syncs``). ``"never"``: the OS decides. Segments whose records are all acknowledged are
never synced.
A record either reads back exactly or is discarded: it is never handed out garbled.

Typical agent use::

    try:
        spool.append(key, blob, header.seq)
    except SpoolFull:                     # when_full="block"
        counters.paused += 1
        spool.wait_for_space(len(key) + len(blob), timeout=1.0)

    # sender thread
    for e in spool.peek(64, timeout=0.5):
        fut = producer.send(topic, key=e.key, value=e.value)
        fut.add_callback(lambda _md, i=e.id: spool.ack(i))
        fut.add_errback(lambda _exc, i=e.id: spool.nack(i))
"""

from __future__ import annotations

import fcntl
import heapq
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections import deque

from crc32c import crc32c
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from tilestream.errors import TilestreamError

log = logging.getLogger("tilestream.spool")

MiB = 1024 * 1024
MAGIC = b"TSPC"  # records with a CRC-32C (hardware-accelerated)
MAGIC_V1 = b"TSPL"  # records with zlib's CRC-32, from spools written before (still read)
_CRC = {MAGIC: crc32c, MAGIC_V1: zlib.crc32}
_HEADER = struct.Struct("<4sIIIQq")
_TAIL = struct.Struct("<IIQq")  # the header after magic and crc: what the crc starts with
HEADER_BYTES = _HEADER.size  # 32
_CRC_FROM = 8
_MAX_FIELD = 2**32 - 1

_SEG_PREFIX = "seg-"
_SEG_SUFFIX = ".log"
HEAD_FILE = "head"
HEAD_CRC_CONTEXT = b"tilestream/spool-head/2\x00"
_HEAD_NUMS = struct.Struct("<qq")
_MAX_ID = 2**63 - 1
LOCK_FILE = ".lock"

_fdatasync = getattr(os, "fdatasync", os.fsync)

# Entry states.
_PENDING, _INFLIGHT, _ACKED, _GONE = 0, 1, 2, 3


class SpoolFull(TilestreamError):
    """``append`` with ``when_full="block"`` found no room; nothing was written."""

    def __init__(self, needed: int, free: int):
        super().__init__(f"spool full: record needs {needed} bytes, {free} free")
        self.needed = needed
        self.free = free


class SpoolLocked(TilestreamError, RuntimeError):
    """Another open :class:`Spool` (this or another process) owns the directory."""


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    key: bytes
    value: bytes
    seq: int


class _Segment:
    __slots__ = ("first_id", "path", "fd", "size", "synced", "last_id")

    def __init__(self, first_id: int, path: Path, fd: int, size: int, synced: int, last_id: int):
        self.first_id = first_id
        self.path = path
        self.fd = fd
        self.size = size
        self.synced = synced
        self.last_id = last_id  # id of the last record in it (first_id - 1 when empty)


class _Rec:
    __slots__ = ("id", "seq", "seg", "off", "klen", "vlen", "state", "entry")

    def __init__(self, eid: int, seq: int, seg: _Segment, off: int, klen: int, vlen: int):
        self.id = eid
        self.seq = seq
        self.seg = seg
        self.off = off
        self.klen = klen
        self.vlen = vlen
        self.state = _PENDING
        self.entry: Entry | None = None  # in-memory copy until first handed out (see cache_bytes)

    @property
    def size(self) -> int:
        return HEADER_BYTES + self.klen + self.vlen

    def __lt__(self, other: "_Rec") -> bool:  # for the heap of released entries
        return self.id < other.id


def _head_crc(head: int, last_seq: int) -> int:
    return crc32c(HEAD_CRC_CONTEXT + _HEAD_NUMS.pack(head, last_seq))


def _seg_name(first_id: int) -> str:
    return f"{_SEG_PREFIX}{first_id:020d}{_SEG_SUFFIX}"


def _parse(data: bytes, mv: memoryview, off: int, after_id: int) -> tuple[int, int, int, int] | None:
    """(key_len, value_len, id, seq) of a fully valid record at ``off``, else None."""
    n = len(data)
    if off + HEADER_BYTES > n:
        return None
    magic, crc, klen, vlen, eid, seq = _HEADER.unpack_from(data, off)
    crc_of = _CRC.get(magic)
    if crc_of is None:
        return None
    end = off + HEADER_BYTES + klen + vlen
    if end > n or eid <= after_id:
        return None
    if crc_of(mv[off + _CRC_FROM:end]) != crc:
        return None
    return klen, vlen, eid, seq


def _find_magic(data: bytes, start: int) -> int:
    found = [i for i in (data.find(MAGIC, start), data.find(MAGIC_V1, start)) if i != -1]
    return min(found) if found else -1


def _scan(data: bytes, after_id: int) -> tuple[list[tuple[int, int, int, int, int]], int, int, bool]:
    """Records of one segment: ([(offset, klen, vlen, id, seq)], valid_end, corrupt_spans, tail_garbage)."""
    mv = memoryview(data)
    out: list[tuple[int, int, int, int, int]] = []
    corrupt = 0
    off = 0
    last = after_id
    while off < len(data):
        rec = _parse(data, mv, off, last)
        if rec is not None:
            klen, vlen, eid, seq = rec
            out.append((off, klen, vlen, eid, seq))
            last = eid
            off += HEADER_BYTES + klen + vlen
            continue
        # Bad record: resynchronise on the next magic that starts a fully valid record.
        nxt = _find_magic(data, off + 1)
        while nxt != -1 and _parse(data, mv, nxt, last) is None:
            nxt = _find_magic(data, nxt + 1)
        if nxt == -1:
            return out, off, corrupt, True
        corrupt += 1
        off = nxt
    return out, off, corrupt, False


class Spool:
    """A bounded, crash-safe on-disk FIFO of sealed frames (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_bytes: int,
        when_full: Literal["drop_oldest", "block"] = "drop_oldest",
        segment_bytes: int = 8 * MiB,
        fsync: Literal["always", "batch", "never"] = "batch",
        *,
        sync_interval: float = 0.5,
        head_sync_interval: float = 5.0,
        head_sync_acks: int = 64,
        cache_bytes: int = 32 * MiB,
    ):
        if when_full not in ("drop_oldest", "block"):
            raise ValueError(f"when_full must be 'drop_oldest' or 'block', not {when_full!r}")
        if fsync not in ("always", "batch", "never"):
            raise ValueError(f"fsync must be 'always', 'batch' or 'never', not {fsync!r}")
        if max_bytes <= HEADER_BYTES:
            raise ValueError(f"max_bytes must exceed the {HEADER_BYTES}-byte record header")
        if segment_bytes <= 0 or sync_interval <= 0 or head_sync_interval <= 0 or head_sync_acks <= 0:
            raise ValueError("segment_bytes, sync_interval, head_sync_interval and head_sync_acks must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.when_full = when_full
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.sync_interval = sync_interval
        self.head_sync_interval = head_sync_interval
        self.head_sync_acks = head_sync_acks
        self.cache_bytes = cache_bytes
        self._cached = 0  # bytes of records held in memory (_Rec.entry)

        # Counters (since this open) and gauges.
        self.appended = 0
        self.acked = 0
        self.dropped = 0
        self.full_rejections = 0
        self.torn_records_discarded = 0
        self.corrupt_records_skipped = 0
        self.head_rebuilt = 0
        self.frames = 0
        self.in_flight = 0
        self.live_bytes = 0
        self.bytes = 0
        self.syncs = 0  # fdatasync calls on segments
        self.head_syncs = 0  # durable head writes (fsync of the head file and the directory)

        # Lock order: _wlock -> _lock; _hlock is never taken while holding _lock.
        self._wlock = threading.Lock()  # writers: append, roll, reclaim, flush, close
        self._lock = threading.Lock()  # in-memory state; ack/peek/release take only this
        self._space = threading.Condition(self._lock)  # acks/drops freed space
        self._data = threading.Condition(self._lock)  # an entry became available to peek
        self._hlock = threading.Lock()  # the head file

        self._recs: deque[_Rec] = deque()  # entries past the head, in id order
        self._index: dict[int, _Rec] = {}
        self._pending: deque[_Rec] = deque()  # never handed out, in id order (stale ones skipped)
        self._released: list[_Rec] = []  # heap: handed out then released (all older than _pending)
        self._segments: list[_Segment] = []
        self._active: _Segment | None = None
        self._head = -1
        self._next_id = 0
        self._last_seq = -1
        self._acks_since_head = 0
        self._head_written = -1
        self._head_durable = -1
        self._head_closed = False
        self._dir_dirty = False
        self._roll_next = False
        self._closed = False
        self._drop_logged_at = float("-inf")

        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(f"spool {self.directory} is already open") from None
        try:
            self._recover()
        except BaseException:
            for seg in self._segments:
                os.close(seg.fd)
            os.close(self._lock_fd)
            raise
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        if fsync == "batch":
            self._syncer = threading.Thread(target=self._sync_loop, name=f"spool-sync:{self.directory.name}", daemon=True)
            self._syncer.start()

    # ------------------------------------------------------------------ public API

    @property
    def persisted_head(self) -> int:
        """The head as last written to the head file: after a crash, everything past it comes back."""
        return self._head_written

    @property
    def head(self) -> int:
        """Id of the newest entry that, with every older one, is acknowledged or dropped (-1: none)."""
        return self._head

    @property
    def next_id(self) -> int:
        return self._next_id

    @property
    def last_seq(self) -> int:
        """Highest seq ever appended (also across restarts; -1 if none)."""
        return self._last_seq

    @property
    def closed(self) -> bool:
        return self._closed

    def append(self, key: bytes, value: bytes, seq: int) -> int:
        klen, vlen = len(key), len(value)
        size = HEADER_BYTES + klen + vlen
        if size > self.max_bytes or klen > _MAX_FIELD or vlen > _MAX_FIELD:
            raise ValueError(f"record of {size} bytes can never fit a spool of {self.max_bytes} bytes")
        with self._wlock:
            with self._lock:
                self._check_open()
                if self.live_bytes + size > self.max_bytes:
                    if self.when_full == "block":
                        self.full_rejections += 1
                        raise SpoolFull(size, self.max_bytes - self.live_bytes)
                    self._drop_oldest_locked(size)
                eid = self._next_id
                self._next_id += 1
            self._reclaim()
            seg = self._active
            assert seg is not None
            if self._roll_next or (seg.size > 0 and seg.size + size > self.segment_bytes):
                seg = self._roll(eid)
            tail = _TAIL.pack(klen, vlen, eid, seq)
            crc = crc32c(value, crc32c(key, crc32c(tail)))
            off = seg.size
            self._write_record(seg, (MAGIC + struct.pack("<I", crc) + tail, key, value), off, size)
            if self.fsync == "always":
                _fdatasync(seg.fd)
            with self._lock:
                seg.size = off + size
                seg.last_id = eid
                if self.fsync == "always":
                    seg.synced = seg.size
                rec = _Rec(eid, seq, seg, off, klen, vlen)
                if self._cached + size <= self.cache_bytes and type(key) is bytes and type(value) is bytes:
                    rec.entry = Entry(eid, key, value, seq)
                    self._cached += size
                self._recs.append(rec)
                self._index[eid] = rec
                self._pending.append(rec)
                self.live_bytes += size
                self.bytes += size
                self.frames += 1
                self.appended += 1
                if seq > self._last_seq:
                    self._last_seq = seq
                self._data.notify_all()
            return eid

    def wait_for_space(self, nbytes: int, timeout: float | None = None) -> bool:
        """Wait until an append with ``len(key) + len(value) == nbytes`` would fit; False on timeout/close."""
        need = HEADER_BYTES + nbytes
        if need > self.max_bytes:
            return False
        with self._space:
            ok = self._space.wait_for(lambda: self._closed or self.live_bytes + need <= self.max_bytes, timeout)
            return bool(ok) and not self._closed

    def peek(self, max_entries: int, timeout: float | None = 0.0) -> list[Entry]:
        """Hand out up to ``max_entries`` oldest entries not currently handed out (marked in flight).

        ``timeout``: how long to wait for at least one (0: do not wait, None: until there is
        one or the spool is closed). Returns [] when there is nothing.
        """
        out: list[Entry] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._check_open()
            while True:
                self._take_locked(out, max_entries)
                if out or max_entries <= 0 or self._closed:
                    return out
                if deadline is None:
                    self._data.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return out
                    self._data.wait(left)

    def ack(self, entry_id: int) -> bool:
        """True if this acknowledged a live entry (False: unknown, dropped or already acked)."""
        with self._lock:
            if self._closed:
                return False
            rec = self._index.get(entry_id)
            if rec is None or rec.state == _ACKED:
                return False
            self.acked += 1
            self._finish_locked(rec)
            self._acks_since_head += 1
            if self._acks_since_head < self.head_sync_acks or self._head <= self._head_written:
                return True
            self._acks_since_head = 0
            head, last_seq = self._head, self._last_seq
        try:
            self._write_head(head, last_seq, durable=self.fsync == "always")
        except OSError:  # never raise into the producer's I/O thread; a later write catches up
            log.exception("spool: could not persist the head")
        return True

    def release(self, entry_ids: Iterable[int]) -> int:
        """Put in-flight entries back for a retry; returns how many were released."""
        n = 0
        with self._lock:
            for eid in entry_ids:
                rec = self._index.get(eid)
                if rec is not None and rec.state == _INFLIGHT:
                    rec.state = _PENDING
                    self.in_flight -= 1
                    heapq.heappush(self._released, rec)
                    n += 1
            if n:
                self._data.notify_all()
        return n

    def nack(self, entry_id: int) -> bool:
        return self.release((entry_id,)) == 1

    def flush(self) -> None:
        """Sync segments (unless fsync="never"), persist the head, delete fully acknowledged segments."""
        with self._wlock:
            with self._lock:
                self._check_open()
            self._flush_locked()

    def close(self) -> None:
        with self._wlock:
            if self._closed:
                return
            self._stop.set()
            if self._syncer is not None:
                self._syncer.join()
            try:
                self._flush_locked()
            finally:
                with self._hlock:
                    self._head_closed = True
                with self._lock:
                    self._closed = True
                    for seg in self._segments:
                        os.close(seg.fd)
                    self._segments.clear()
                    self._active = None
                    self._space.notify_all()
                    self._data.notify_all()
                os.close(self._lock_fd)

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Spool({str(self.directory)!r}, frames={self.frames}, bytes={self.bytes}, head={self._head}, "
                f"next_id={self._next_id})")

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("spool is closed")

    def _take_locked(self, out: list[Entry], max_entries: int) -> None:
        while len(out) < max_entries:
            rec = self._next_pending_locked()
            if rec is None:
                return
            entry = rec.entry
            if entry is not None:
                self._uncache_locked(rec)
            else:
                raw = self._read_locked(rec)
                if raw is None:
                    self.corrupt_records_skipped += 1
                    log.error(json.dumps({"event": "spool_corrupt_record", "entry_id": rec.id,
                                          "segment": rec.seg.path.name, "offset": rec.off}))
                    self._finish_locked(rec)
                    continue
                k = HEADER_BYTES + rec.klen
                entry = Entry(rec.id, raw[HEADER_BYTES:k], raw[k:], rec.seq)
            rec.state = _INFLIGHT
            self.in_flight += 1
            out.append(entry)

    def _next_pending_locked(self) -> _Rec | None:
        while self._released:
            rec = heapq.heappop(self._released)
            if rec.state == _PENDING:
                return rec
        while self._pending:
            rec = self._pending.popleft()
            if rec.state == _PENDING:
                return rec
        return None

    def _read_locked(self, rec: _Rec) -> bytes | None:
        size = rec.size
        raw = os.pread(rec.seg.fd, size, rec.off)
        while 0 < len(raw) < size:
            more = os.pread(rec.seg.fd, size - len(raw), rec.off + len(raw))
            if not more:
                break
            raw += more
        if len(raw) != size:
            return None
        magic, crc, klen, vlen, eid, _seq = _HEADER.unpack_from(raw)
        crc_of = _CRC.get(magic)
        if crc_of is None or (klen, vlen, eid) != (rec.klen, rec.vlen, rec.id):
            return None
        if crc_of(memoryview(raw)[_CRC_FROM:]) != crc:
            return None
        return raw

    def _uncache_locked(self, rec: _Rec) -> None:
        if rec.entry is not None:
            rec.entry = None
            self._cached -= rec.size

    def _finish_locked(self, rec: _Rec) -> None:
        """Mark acknowledged (or unreadable) and advance the head over the acked prefix."""
        if rec.state == _INFLIGHT:
            self.in_flight -= 1
        rec.state = _ACKED
        self._uncache_locked(rec)
        self.frames -= 1
        if self._recs and self._recs[0] is rec:
            while self._recs and self._recs[0].state == _ACKED:
                self._pop_head_locked()
            self._trim_stale_locked()
            self._space.notify_all()

    def _pop_head_locked(self) -> _Rec:
        rec = self._recs.popleft()
        del self._index[rec.id]
        self._head = rec.id
        self.live_bytes -= rec.size
        return rec

    def _trim_stale_locked(self) -> None:
        # Entries the head passed while they waited to be handed out (dropped, or acked
        # before a peek) sit at the front of _pending/_released; without this a spool that
        # drops for hours while nobody peeks would hoard them.
        while self._pending and self._pending[0].state != _PENDING:
            self._pending.popleft()
        while self._released and self._released[0].state != _PENDING:
            heapq.heappop(self._released)

    def _drop_oldest_locked(self, size: int) -> None:
        dropped = []
        while self._recs and self.live_bytes + size > self.max_bytes:
            rec = self._pop_head_locked()
            if rec.state != _ACKED:
                if rec.state == _INFLIGHT:
                    self.in_flight -= 1
                rec.state = _GONE
                self._uncache_locked(rec)
                self.frames -= 1
                self.dropped += 1
                dropped.append(rec.id)
            while self._recs and self._recs[0].state == _ACKED:
                self._pop_head_locked()
        self._trim_stale_locked()
        now = time.monotonic()
        if dropped and now - self._drop_logged_at >= 1.0:  # counted always, logged at most once a second
            self._drop_logged_at = now
            log.warning(json.dumps({"event": "spool_dropped_oldest", "count": len(dropped), "first_id": dropped[0],
                                    "last_id": dropped[-1], "dropped_total": self.dropped, "max_bytes": self.max_bytes}))

    def _write_record(self, seg: _Segment, parts: tuple[bytes, bytes, bytes], off: int, size: int) -> None:
        try:
            n = os.pwritev(seg.fd, parts, off)
            if n < size:  # short write (e.g. nearly full disk): finish it byte-exactly
                rest = memoryview(b"".join(parts))[n:]
                while rest:
                    w = os.pwrite(seg.fd, rest, off + n)
                    if w <= 0:
                        raise OSError("spool: write made no progress")
                    n += w
                    rest = rest[w:]
        except BaseException:
            # Leave no partial record in the middle of a segment: cut it off, or failing
            # that seal this segment (recovery then sees a torn tail, counted and dropped).
            try:
                os.ftruncate(seg.fd, off)
            except OSError:
                self._roll_next = True
            raise

    def _roll(self, first_id: int) -> _Segment:
        path = self.directory / _seg_name(first_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        seg = _Segment(first_id, path, fd, 0, 0, first_id - 1)
        if self.fsync == "always":
            self._fsync_dir()
        with self._lock:
            self._segments.append(seg)
            self._active = seg
            if self.fsync == "batch":
                self._dir_dirty = True
        self._roll_next = False
        return seg

    def _reclaim(self) -> None:
        """Delete sealed segments whose entries are all behind the head (caller holds _wlock)."""
        with self._lock:
            dead = []
            for seg in self._segments:
                if seg is self._active or seg.last_id > self._head:
                    break
                dead.append(seg)
            if not dead:
                return
            head, last_seq = self._head, self._last_seq
        # The head must be on disk before the entries it covers disappear.
        self._write_head(head, last_seq, durable=self.fsync != "never")
        with self._lock:
            del self._segments[: len(dead)]
            for seg in dead:
                os.close(seg.fd)
                self.bytes -= seg.size
        for seg in dead:
            try:
                os.unlink(seg.path)
            except FileNotFoundError:
                pass

    def _flush_locked(self) -> None:
        self._sync_segments()
        with self._lock:
            head, last_seq = self._head, self._last_seq
        self._write_head(head, last_seq, durable=self.fsync != "never")
        self._reclaim()

    def _sync_segments(self) -> None:
        if self.fsync == "never":
            return
        with self._lock:
            # Only segments that still hold unacknowledged records are worth the disk.
            todo = [(os.dup(seg.fd), seg, seg.size) for seg in self._segments
                    if seg.synced < seg.size and seg.last_id > self._head]
            dir_dirty, self._dir_dirty = self._dir_dirty, False
        try:
            for fd, _seg, _size in todo:
                _fdatasync(fd)
                self.syncs += 1
            if dir_dirty:
                self._fsync_dir()
        except BaseException:
            with self._lock:
                self._dir_dirty = self._dir_dirty or dir_dirty
            raise
        finally:
            for fd, _seg, _size in todo:
                os.close(fd)
        with self._lock:
            for _fd, seg, size in todo:
                seg.synced = max(seg.synced, size)

    def _sync_loop(self) -> None:
        appended_before_last_tick = -1  # newest entry id at the previous tick
        head_synced_at = time.monotonic()
        while not self._stop.wait(self.sync_interval):
            try:
                with self._lock:
                    waited = self._head < appended_before_last_tick  # a record older than one interval is unacked
                    appended_before_last_tick = self._next_id - 1
                if waited:
                    self._sync_segments()
                now = time.monotonic()
                if now - head_synced_at < self.head_sync_interval:
                    continue
                with self._lock:
                    head, last_seq = self._head, self._last_seq
                if head > self._head_durable:
                    self._write_head(head, last_seq, durable=True)
                    head_synced_at = now
            except Exception:
                log.exception("spool: background sync failed")

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_head(self, head: int, last_seq: int, durable: bool) -> None:
        with self._hlock:
            if self._head_closed or head < self._head_written:
                return
            if head == self._head_written and (not durable or self._head_durable >= head):
                return
            path = self.directory / HEAD_FILE
            tmp = self.directory / (HEAD_FILE + ".tmp")
            data = json.dumps({"version": 2, "acked_through": head, "last_seq": last_seq,
                               "crc32c": _head_crc(head, last_seq)}).encode()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if durable:
                self._fsync_dir()
                self._head_durable = head
                self.head_syncs += 1
            self._head_written = head

    def _read_head(self) -> tuple[int, int] | None:
        """(acked_through, last_seq) of the head file, (-1, -1) without one, None if it does not check."""
        path = self.directory / HEAD_FILE
        try:
            with open(path, "rb") as fh:
                blob = fh.read(4097)
        except FileNotFoundError:
            return -1, -1
        except OSError as e:
            log.error(json.dumps({"event": "spool_head_unreadable", "path": str(path), "error": str(e)}))
            return None
        try:
            if len(blob) > 4096:
                raise ValueError("larger than 4096 bytes")
            d = json.loads(blob)
            head, last_seq, version = d["acked_through"], d.get("last_seq", -1), d.get("version")
            for v in (head, last_seq):
                if type(v) is not int or not -1 <= v <= _MAX_ID:
                    raise ValueError(f"{str(v)[:40]!r} is not an entry id or seq")
            if version == 2:
                if d.get("crc32c") != _head_crc(head, last_seq):
                    raise ValueError("CRC-32C does not match")
            elif version != 1:
                raise ValueError(f"unknown version {str(version)[:20]!r}")
            return head, last_seq
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.error(json.dumps({"event": "spool_head_unreadable", "path": str(path), "error": str(e)}))
            return None

    def _recover(self) -> None:
        read = self._read_head()
        try:
            (self.directory / (HEAD_FILE + ".tmp")).unlink()
        except FileNotFoundError:
            pass
        found: list[tuple[int, Path]] = []
        for p in self.directory.iterdir():
            name = p.name
            if name.startswith(_SEG_PREFIX) and name.endswith(_SEG_SUFFIX):
                digits = name[len(_SEG_PREFIX):-len(_SEG_SUFFIX)]
                if digits.isdigit() and int(digits) <= _MAX_ID:
                    found.append((int(digits), p))
        found.sort()

        # Pass 1: check every record (independent of the head).
        after_id = -1
        scanned: list[tuple[int, Path, list[tuple[int, int, int, int, int]], int]] = []
        for i, (first_id, path) in enumerate(found):
            newest = i == len(found) - 1
            data = path.read_bytes()
            recs, end, corrupt, garbage = _scan(data, after_id)
            if corrupt:
                self.corrupt_records_skipped += corrupt
            if garbage:
                if newest:
                    self.torn_records_discarded += 1
                else:
                    self.corrupt_records_skipped += 1
                log.warning(json.dumps({"event": "spool_tail_truncated", "segment": path.name, "offset": end,
                                        "discarded_bytes": len(data) - end, "newest": newest}))
                os.truncate(path, end)
            if corrupt:
                log.error(json.dumps({"event": "spool_corrupt_span", "segment": path.name, "spans": corrupt}))
            if recs:
                after_id = recs[-1][3]
            scanned.append((first_id, path, recs, end))

        # The head: trusted only if it checks and is not above every id the segments know of
        # (segments behind the head are deleted only up to the newest, which names the next id).
        known = max([first_id - 1 for first_id, *_ in scanned] + [r[-1][3] for _, _, r, _ in scanned if r] + [-1])
        if read is not None and scanned and read[0] > known:
            log.error(json.dumps({"event": "spool_head_unreadable", "path": str(self.directory / HEAD_FILE),
                                  "error": f"acked_through {read[0]} is above every entry id on disk ({known})"}))
            read = None
        rebuilt = read is None
        if rebuilt:
            oldest = min((r[0][3] for _, _, r, _ in scanned if r), default=known + 1)
            head, last_seq = oldest - 1, -1
            self.head_rebuilt += 1
            log.error(json.dumps({"event": "spool_head_rebuilt", "path": str(self.directory / HEAD_FILE),
                                  "acked_through": head, "note": "every record on disk is pending again"}))
        else:
            head, last_seq = read

        # Pass 2: keep what is past the head.
        floor = head + 1  # next id is above every id ever used, also of deleted segments
        keep: list[tuple[_Segment, list[tuple[int, int, int, int, int]]]] = []
        remove: list[Path] = []
        last_empty: tuple[int, Path] | None = None
        for i, (first_id, path, recs, end) in enumerate(scanned):
            newest = i == len(scanned) - 1
            floor = max(floor, first_id)
            if recs:
                floor = max(floor, recs[-1][3] + 1)
                last_seq = max(last_seq, max(r[4] for r in recs))
            if recs and recs[-1][3] > head:
                seg = _Segment(first_id, path, -1, end, 0, recs[-1][3])
                keep.append((seg, recs))
            elif newest and not recs:
                last_empty = (first_id, path)
            else:
                remove.append(path)

        self._next_id = floor
        self._head = head
        self._head_written = self._head_durable = -2 if rebuilt else head
        self._last_seq = last_seq
        if rebuilt:  # replace the bad file now, before anything relies on it
            self._write_head(head, last_seq, durable=self.fsync != "never")
        # Segments entirely behind the (persisted) head, or empty: delete.
        if last_empty is not None and last_empty[0] != floor:
            remove.append(last_empty[1])
            last_empty = None
        for path in remove:
            path.unlink()
        for seg, recs in keep:
            seg.fd = os.open(seg.path, os.O_RDONLY)
            self._segments.append(seg)
            for off, klen, vlen, eid, seq in recs:
                if eid <= head:
                    continue
                rec = _Rec(eid, seq, seg, off, klen, vlen)
                self._recs.append(rec)
                self._index[eid] = rec
                self._pending.append(rec)
                self.live_bytes += rec.size
            self.bytes += seg.size
        self.frames = len(self._recs)
        # A fresh segment for this process's appends (reuse an untouched empty one).
        if last_empty is not None:
            fd = os.open(last_empty[1], os.O_RDWR)
            active = _Segment(floor, last_empty[1], fd, 0, 0, floor - 1)
            self._segments.append(active)
            self._active = active
        else:
            self._roll(floor)
