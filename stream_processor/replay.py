"""Replay protection that survives restarts and rebalances: durable per-camera marks + a freshness window.

What is refused, wherever the record lands (any worker, any partition, after any restart):

* ``stale`` — a frame whose signed capture time is older than ``max_frame_age_s`` or more than
  ``max_clock_skew_s`` in the future, measured against the broker's ``LogAppendTime`` of the
  record (the ``frames`` topic uses it: the broker's clock, which no writer can set; the
  processor's own clock when a record carries a producer-set time). Append time rather than
  "now" so that a processor outage shorter than the frames retention does not turn the backlog
  stale; an agent that spooled frames for longer than ``max_frame_age_s`` loses them as ``stale``
  (a dead letter with the original, counted) — that is the price of the window. Also ``stale``:
  a capture time older than the newest one accepted from the same camera minus the window (a
  check that needs no clock at all).
* ``replay`` — a frame whose ``(camera, seq)`` was accepted before, unless it is *the same
  record* (same partition and offset: Faust re-reading uncommitted frames after a crash or a
  rebalance), which is processed again. Also ``replay``: a seq more than ``replay_window_seqs``
  below the camera's highest accepted seq (its bit has left the window).

Seq and capture time come from the signed envelope header (:mod:`tilestream.envelope`), so they
are trusted once the device signature verified; nothing here runs before that.

State (:class:`ReplayState`, pure): per *stream* — a camera's frames, or one band index of a
camera's fanned-out tile jobs — the highest accepted seq, a bitmap of the ``window`` seqs below
it (reordering across partitions: one camera's frames are keyed by frame id ``camera/seq`` and so
spread over every partition and worker), the newest accepted capture time, and per source
partition the last :data:`PLACES` ``(seq, offset)`` accepted there (redelivery detection).

Durable record: the compacted topic ``replay-marks``. After a frame is accepted the worker
sends one mark through Faust's own producer before it moves on to the next frame; Faust flushes
that producer before it commits offsets, so **a committed frame always has its mark on the
topic** and an uncommitted one is re-read (a redelivery). Key = ``source|partition|band|camera``
(the frames or tile-jobs partition the record came from). Each partition has one owner at a
time, so each key has one writer at a time and its latest value — the writer's whole view of the
stream (bitmap) plus the places on that partition — contains every acceptance on that
partition: compaction, which keeps only the latest value of a key, loses nothing. (One key per
camera would lose the acceptances of a worker whose write was overtaken by another's.)
Readers merge every mark they read (union: highest seq, OR of the bitmaps), so order between
keys does not matter. Every worker reads the topic from the beginning before it checks its first
record, again whenever its consumer generation changes (a rebalance: the previous owner's
last marks were flushed before it let the partition go), and follows it every
``replay_sync_interval_s`` (other workers' marks). A worker that cannot read the topic does not
check anything: it waits and retries (fail closed, while Faust keeps its group membership).

Why not a Faust table: a windowed table was removed before because its changelog recovery on
every rebalance paused the frames partitions and lost frames with two workers (see
:mod:`stream_processor.app`). This topic is read with a group-less kafka-python reader
(:class:`kafkaio.clients.RangeReader`) in its own thread and has no part in rebalancing.

Authenticity: anyone may write to any topic, so a mark is an HMAC-SHA256 (``cryptography``)
over the record key and value, under a key derived with HKDF-SHA256 from the processor's
internal tile key (info ``tilestream/replay-marks/v1``; the key id travels in the record, so
marks made before a rotation still verify while the old key is loaded). A forged mark (say
"camera X reached seq 2^63", which would refuse all of X's frames) is refused and counted. What
a writer *can* still do is erase: a tombstone or garbage under an existing key makes compaction
drop that key's last good mark, so after the next restart the erased acceptances are forgotten.
Then a frame can be replayed once (and is marked again); it must still be fresh, and the
classifier's read-back of answered frames keeps it from being answered twice. Kafka ACLs that let
only the processor's principal write ``replay-marks`` close this; see the deployment notes.

Guarantees, exactly (D = time for a mark to reach another worker: producer flush + up to one
``replay_sync_interval_s`` + one read, ~1 s):

* same worker: a second copy is refused, whenever and on whichever partition it arrives;
* another worker, or after any restart or rebalance: refused if it arrives more than D after
  the first copy was accepted;
* two copies accepted by two workers within D of each other: both are processed (two feature
  sets for one frame id); the classifier answers the frame once (it drops a frame id it already
  answered, and reads back the results topic after a restart or rebalance);
* redelivery (same partition and offset) is recognised for the last :data:`PLACES` frames a camera
  sent through each partition — far more than the frames Faust leaves uncommitted (a commit per
  second or per 100 records); an older one would be refused as ``replay``, and only if its mark
  made it to the topic, which happens after its tile records were handed to the producer.

Trade-offs: a mark per accepted frame (~0.5-1 KB compressed, most of it the places; the bitmap
of contiguous seqs compresses to a few dozen bytes; ~0.2 ms on the event loop) on a single-partition compacted topic;
a startup read of what compaction has not yet removed (``segment.ms`` 10 min bounds it);
a seq counter that goes back (an agent whose state directory was lost) makes its frames
``replay`` until its newest accepted frame is older than the freshness window — after that a
fresher frame starts a new epoch for the camera, which is safe because every frame of the old
epoch is then ``stale``. A camera key held by an attacker can sign seq 2^64-1 and lock its own
camera out; it can already sign anything that camera could.

Tile jobs (:mod:`stream_processor.tilejobs`) are checked the same way, one stream per band index
of a camera: a job's frame id, camera, seq, band and the time it was made are in its AES-GCM
associated data, so a job can only produce features for the frame and band it was made for, and
a copied job record is ``replay`` (a job made again for a redelivered frame is refused the same
way once its band was computed: its features are already on ``tile-features``).
"""

from __future__ import annotations

import collections
import json
import logging
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tilestream import topics
from tilestream.errors import Refused

log = logging.getLogger("tilestream.replay")

FRAMES_SOURCE = topics.FRAMES
JOBS_SOURCE = topics.TILE_JOBS
SOURCES = (FRAMES_SOURCE, JOBS_SOURCE)
NO_BAND = -1  # the stream of a camera's frames (bands are 0..MAX_BANDS-1)
MAX_BANDS = 4096
# (seq, offset) pairs kept per camera and source partition: redeliveries recognised. Faust leaves
# ~1 s or 100 records uncommitted per worker; 256 is a minute of one camera's frames on one of 6
# partitions at 25 fps (a rebalance that refuses commits lasts seconds). Cost: each mark carries
# them (~0.5 KB compressed) and merging them is ~0.1 ms per mark read.
PLACES = 256
# Marks a worker remembers having sent, so that reading them back costs nothing (MarksFollower.sent):
# ~20 are sent between two reads at 40 frames/s; 1024 (~0.5 MB) outlasts a read that stalls for 20 s.
OWN_MARKS = 1024
MAX_WINDOW = 1 << 20  # bits; a mark is refused beyond this (hostile sizes)
MAX_CAMERA = 255
MAX_VALUE = 1 << 20  # bytes of a mark record
MAX_BODY = 1 << 20  # bytes of its decompressed body (a zlib bomb stops here)
U64 = (1 << 64) - 1

MAGIC = b"TSRM"
VERSION = 1
MAC_INFO = b"tilestream/replay-marks/v1"
MAC_DOMAIN = b"tilestream/replay-mark\x00"
MAC_LEN = 32


class BadMark(Refused):
    """A record on ``replay-marks`` that is not a mark we wrote: ignored and counted."""

    def __init__(self, message: str):
        super().__init__("bad_mark", message)


@dataclass
class Mark:
    """One durable mark: a writer's view of one stream after it accepted one record there."""

    source: str  # topic the accepted record came from: frames or tile-jobs
    partition: int  # its partition there (one owner at a time: one writer per key)
    camera: str
    band: int  # NO_BAND for frames
    high: int  # highest accepted seq of the stream
    bits: int  # bit i set: seq high - i accepted (i < window)
    window: int
    newest_ns: int  # newest accepted capture time
    places: list[tuple[int, int]]  # (seq, offset) accepted on (source, partition), oldest first

    def key(self) -> bytes:
        return f"{self.source}|{self.partition}|{self.band}|{self.camera}".encode()


@dataclass
class Verdict:
    """``new`` (accepted: write ``mark``), ``redelivery`` (process again), ``replay`` or ``stale``."""

    kind: str
    detail: str = ""
    mark: Mark | None = None

    @property
    def refused(self) -> bool:
        return self.kind in ("replay", "stale")


@dataclass
class _Stream:
    high: int = -1
    bits: int = 0
    newest_ns: int = 0
    places: dict[tuple[str, int], "collections.OrderedDict[tuple[int, int], None]"] = field(default_factory=dict)


def _shift(bits: int, by: int, window: int) -> int:
    """``bits`` re-based ``by`` seqs higher, cut to the window (never builds a huge int)."""
    if by >= window:
        return 0
    bits <<= by
    return bits & ((1 << window) - 1) if bits.bit_length() > window else bits


class ReplayState:
    """The replay memory of one worker: pure, no I/O; see the module docstring for the rules."""

    def __init__(self, window: int, max_age_s: float, skew_s: float, places: int = PLACES):
        if not 64 <= window <= MAX_WINDOW or window % 8:
            raise ValueError(f"replay window of {window} seqs: want a multiple of 8 in 64..{MAX_WINDOW}")
        self.window = window
        self.max_age_ns = int(max_age_s * 1e9)
        self.skew_ns = int(skew_s * 1e9)
        self.horizon_ns = self.max_age_ns + self.skew_ns
        self.n_places = places
        self.streams: dict[tuple[str, int], _Stream] = {}

    # -- checks -------------------------------------------------------------------------------
    def check(self, camera: str, band: int, seq: int, capture_ns: int, source: str, partition: int, offset: int,
              ref_ns: int | None) -> Verdict:
        """Decide about one record whose (camera, seq, capture time) is authenticated.

        ``ref_ns``: the trusted time the capture time is judged against (None: no absolute
        window, only the one relative to the stream's newest capture). Accepting updates the
        state and returns the mark to write.
        """
        if ref_ns is not None:
            if capture_ns < ref_ns - self.max_age_ns:
                return Verdict("stale", f"captured {(ref_ns - capture_ns) / 1e9:.0f} s before it reached Kafka "
                                        f"(at most {self.max_age_ns / 1e9:.0f} s)")
            if capture_ns > ref_ns + self.skew_ns:
                return Verdict("stale", f"captured {(capture_ns - ref_ns) / 1e9:.0f} s in the future "
                                        f"(camera clock ahead by more than {self.skew_ns / 1e9:.0f} s)")
        s = self.streams.get((camera, band))
        if s is not None:
            if capture_ns < s.newest_ns - self.horizon_ns:
                return Verdict("stale", f"captured {(s.newest_ns - capture_ns) / 1e9:.0f} s before the newest "
                                        f"frame accepted from {camera!r}")
            if capture_ns > s.newest_ns + self.horizon_ns:
                # Everything this stream remembers is stale next to this frame: a new epoch (an agent
                # that lost its seq counter restarts from 0 and is not refused forever).
                log.info(json.dumps({"event": "replay_epoch", "camera": camera, "band": band, "old_high": s.high}))
                s = None
        if s is None:
            s = self.streams[(camera, band)] = _Stream()
        if seq <= s.high:
            age = s.high - seq
            if age >= self.window:
                return Verdict("replay", f"seq {seq} is {age} below the highest accepted ({s.high}), "
                                         f"outside the replay window of {self.window}")
            if (s.bits >> age) & 1:
                ring = s.places.get((source, partition))
                if ring is not None and (seq, offset) in ring:
                    return Verdict("redelivery", f"same record {source}/{partition}:{offset}")
                first = next(((src, p, o) for (src, p), r in s.places.items() for (q, o) in r if q == seq), None)
                where = f" (first at {first[0]}/{first[1]}:{first[2]})" if first else ""
                return Verdict("replay", f"seq {seq} was already accepted{where}; "
                                         f"this copy is at {source}/{partition}:{offset}")
        self._accept(s, seq, capture_ns, source, partition, offset)
        return Verdict("new", mark=self.mark_of(camera, band, source, partition))

    def _accept(self, s: _Stream, seq: int, capture_ns: int, source: str, partition: int, offset: int) -> None:
        if seq > s.high:
            s.bits = _shift(s.bits, seq - s.high, self.window) if s.high >= 0 else 0
            s.high = seq
        s.bits |= 1 << (s.high - seq)
        s.newest_ns = max(s.newest_ns, capture_ns)
        ring = s.places.setdefault((source, partition), collections.OrderedDict())
        ring[(seq, offset)] = None
        while len(ring) > self.n_places:
            ring.popitem(last=False)

    def mark_of(self, camera: str, band: int, source: str, partition: int) -> Mark:
        s = self.streams[(camera, band)]
        ring = s.places.get((source, partition), {})
        return Mark(source, partition, camera, band, s.high, s.bits, self.window, s.newest_ns, list(ring))

    # -- merging marks read back --------------------------------------------------------------
    def merge(self, m: Mark) -> None:
        """Fold a verified mark in (union; idempotent; order-independent within an epoch)."""
        bits = m.bits & ((1 << min(m.window, self.window)) - 1)
        s = self.streams.get((m.camera, m.band))
        if s is not None and m.newest_ns + self.horizon_ns < s.newest_ns:
            return  # an old epoch of this stream: everything in it is stale now
        if s is None or s.newest_ns + self.horizon_ns < m.newest_ns:
            s = self.streams[(m.camera, m.band)] = _Stream()
        if m.high > s.high:
            s.bits = _shift(s.bits, m.high - s.high, self.window) if s.high >= 0 else 0
            s.high = m.high
            s.bits |= bits
        else:
            s.bits |= _shift(bits, s.high - m.high, self.window)
        s.newest_ns = max(s.newest_ns, m.newest_ns)
        ring = s.places.setdefault((m.source, m.partition), collections.OrderedDict())
        merged = sorted(set(ring) | set(m.places), key=lambda p: p[1])[-self.n_places:]
        ring.clear()
        ring.update((p, None) for p in merged)


# -- the record format -----------------------------------------------------------------------------
def derive_mark_keys(tile_keys: Mapping[str, bytes]) -> dict[str, bytes]:
    """HMAC keys for marks (key id -> key), one per internal tile key, domain-separated by HKDF."""
    return {kid: HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=MAC_INFO).derive(key)
            for kid, key in tile_keys.items()}


def _mac(key: bytes, record_key: bytes, head: bytes, body: bytes) -> hmac.HMAC:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(MAC_DOMAIN + struct.pack(">I", len(record_key)) + record_key + head + body)
    return h


def encode_mark(m: Mark, kid: str, key: bytes) -> tuple[bytes, bytes]:
    """(record key, record value) of a mark: ``MAGIC | version | kid | HMAC | zlib(body)``.

    Body: a JSON line (names and numbers), then the bitmap (``window / 8`` bytes, little-endian),
    then the places as u64 pairs, each the difference to the previous pair modulo 2^64 (small
    numbers: zlib makes ~1 KB of 512 of them). Binary because this runs on the event loop for
    every accepted frame (JSON lists and base64 took 1.4 ms).
    """
    pairs = np.array(m.places, dtype=np.uint64).reshape(-1, 2)
    deltas = np.diff(pairs, axis=0, prepend=np.zeros((1, 2), np.uint64))  # uint64 arithmetic wraps mod 2^64
    head_json = json.dumps({"source": m.source, "partition": m.partition, "camera": m.camera, "band": m.band,
                            "high": m.high, "window": m.window, "newest_ns": m.newest_ns, "places": len(m.places)},
                           separators=(",", ":")).encode()
    body = zlib.compress(head_json + b"\n" + m.bits.to_bytes(m.window // 8, "little")
                         + deltas.astype(">u8").tobytes(), 1)
    kid_b = kid.encode()
    head = MAGIC + bytes([VERSION, len(kid_b)]) + kid_b
    record_key = m.key()
    return record_key, head + _mac(key, record_key, head, body).finalize() + body


def _int(d: dict, name: str, lo: int, hi: int) -> int:
    v = d.get(name)
    if type(v) is not int or not lo <= v <= hi:  # noqa: E721 - bool is not a seq
        raise BadMark(f"mark field {name!r} is not an integer in {lo}..{hi}")
    return v


def decode_mark(record_key: bytes | None, value: bytes | None, keys: Mapping[str, bytes]) -> Mark:
    """Verify and parse a mark; raises :class:`BadMark` for anything else (bounded work)."""
    if not isinstance(value, bytes) or not isinstance(record_key, bytes):
        raise BadMark("a mark needs a key and a value (a tombstone is not a mark)")
    if len(value) > MAX_VALUE or len(record_key) > 1024:
        raise BadMark(f"mark of {len(value)} bytes is too large")
    if len(value) < 6 or value[:4] != MAGIC:
        raise BadMark("not a replay mark (bad magic)")
    if value[4] != VERSION:
        raise BadMark(f"replay mark version {value[4]} is not supported")
    n = value[5]
    head, rest = value[:6 + n], value[6 + n:]
    key = keys.get(value[6:6 + n].decode("ascii", "replace"))
    if key is None:
        raise BadMark(f"replay mark under unknown key id {value[6:6 + n]!r}")
    if len(rest) < MAC_LEN:
        raise BadMark("truncated replay mark")
    tag, body = rest[:MAC_LEN], rest[MAC_LEN:]
    try:
        _mac(key, record_key, head, body).verify(tag)
    except InvalidSignature:
        raise BadMark("replay mark does not authenticate") from None
    d = zlib.decompressobj()
    try:
        raw = d.decompress(body, MAX_BODY)
    except zlib.error as exc:
        raise BadMark(f"replay mark body: {exc}") from None
    if d.unconsumed_tail or not d.eof:
        raise BadMark("replay mark body too large or truncated")
    line, sep, binary = raw.partition(b"\n")
    try:
        obj = json.loads(line) if sep else None
    except ValueError as exc:
        raise BadMark(f"replay mark body: {exc}") from None
    if not isinstance(obj, dict):
        raise BadMark("replay mark body is not an object")
    source, camera = obj.get("source"), obj.get("camera")
    if source not in SOURCES or not isinstance(camera, str) or not 0 < len(camera.encode()) <= MAX_CAMERA:
        raise BadMark("replay mark names no known source or camera")
    window = _int(obj, "window", 8, MAX_WINDOW)
    n_places = _int(obj, "places", 0, 4 * PLACES)
    nbits = window // 8
    if window % 8 or len(binary) != nbits + 16 * n_places:
        raise BadMark("replay mark bitmap and places do not match their sizes")
    deltas = np.frombuffer(binary, ">u8", 2 * n_places, nbits).astype(np.uint64).reshape(-1, 2)
    places = [(int(a), int(b)) for a, b in np.cumsum(deltas, axis=0, dtype=np.uint64)]
    m = Mark(source, _int(obj, "partition", 0, 1 << 16), camera, _int(obj, "band", NO_BAND, MAX_BANDS - 1),
             _int(obj, "high", 0, U64), int.from_bytes(binary[:nbits], "little"), window,
             _int(obj, "newest_ns", 0, U64), places)
    if m.key() != record_key:
        raise BadMark("replay mark body does not match its key")
    return m


# -- reading the topic -----------------------------------------------------------------------------
class MarksFollower:
    """Reads ``replay-marks``: from the beginning on the first call, then what was added since.

    Blocking (kafka-python): call it from one thread only (the app gives it its own executor).

    A read that fails or stalls (``read_timeout_s`` without a record before the end offsets: a
    frozen leader) drops the client, and the next call reads with a fresh one that continues at
    the offsets already read (nothing is read twice, nothing skipped). The old client was kept,
    and a kafka-python consumer whose requests hung on a node could keep failing long after the
    node was back (the classifier's read-back client did: 60 s per lookup, three in a row), each
    attempt holding the processor's marks lock, which a rebalance waits for, for its 60 s budget.
    20 s: fencing of the frozen node (9 s) + one request timeout (10 s).

    Own marks: a record byte for byte equal to a mark this worker sent (:meth:`sent`, the last
    :data:`OWN_MARKS` of them) is skipped, neither verified nor returned: the state it came from
    already holds everything in it (marks are only ever unions of what the state accepted), so
    merging it changes nothing. It was verified and merged anyway, on every read: with one
    worker every mark read back is its own, ~0.15 ms of HMAC, zlib and a 256-place merge per
    frame (closed loop, per-thread CPU). Equality of the whole (key, value), not of the MAC
    tag alone: a record that differs in any byte is verified as before. After a restart the
    list is empty and everything is read as before.
    """

    def __init__(self, where, keys: Mapping[str, bytes], read_timeout_s: float = 20.0):
        self.where = where
        self.keys = dict(keys)
        self.read_timeout_s = read_timeout_s
        self.reader = None
        self.next_offsets: dict[int, int] = {}  # partition -> next offset to read, across readers
        self.refused = 0
        self.read = 0
        self.own_skipped = 0
        self._own: collections.OrderedDict[tuple[bytes, bytes], None] = collections.OrderedDict()
        self._own_lock = threading.Lock()

    def sent(self, key: bytes, value: bytes) -> None:
        """Note a mark this worker is about to send (any thread; call it before the send)."""
        with self._own_lock:
            self._own[(key, value)] = None
            while len(self._own) > OWN_MARKS:
                self._own.popitem(last=False)

    def _is_own(self, key, value) -> bool:
        if not isinstance(key, bytes) or not isinstance(value, bytes):
            return False
        with self._own_lock:
            return self._own.pop((key, value), 0) is None

    def read_new(self) -> list[Mark]:
        """Every verified mark added since the previous call (all of them on the first call)."""
        from kafkaio.clients import RangeReader

        budget_ms = int(self.read_timeout_s * 1000)
        if self.reader is None:
            # earliest: a continue-offset that fell out of the log is re-read from the start (a union
            # of marks read twice is the same), never skipped (kafka-python resets to latest).
            reader = RangeReader(self.where, topics.REPLAY_MARKS, client_id="tilestream-replay-marks",
                                 auto_offset_reset="earliest")
            try:
                reader.seek("beginning")
                reader.read_from(self.next_offsets)
            except BaseException:
                reader.close()
                raise
            self.reader = reader
        out: list[Mark] = []
        try:
            for r in self.reader.read_to_end(stall_ms=budget_ms):
                self.read += 1
                if self._is_own(r.key, r.value):
                    self.own_skipped += 1
                    continue
                try:
                    out.append(decode_mark(r.key, r.value, self.keys))
                except BadMark as exc:
                    self.refused += 1
                    log.warning(json.dumps({"event": "replay_mark_refused", "partition": r.partition,
                                            "offset": r.offset, "error": str(exc)}))
        except BaseException:
            # Nothing of this call is returned, so the next one must read it again: continue at
            # where the previous *successful* call stopped, with a fresh client.
            self.close()
            raise
        self.next_offsets.update(self.reader.next_offsets)
        return out

    def close(self) -> None:
        if self.reader is not None:
            reader, self.reader = self.reader, None
            try:
                reader.close()
            except Exception:  # noqa: BLE001 - a client stuck on a hung node may not close cleanly
                pass


def check_job(state: ReplayState, job, partition: int, offset: int, now_ns: int) -> Verdict:
    """A tile job (authenticated, :func:`stream_processor.tilejobs.check_binding` passed) against the state.

    Absolute window on when the job was made (the processor's clock, in the job's associated
    data); the band stream's own checks on (camera, band, seq, capture time).
    """
    made = job.made_ns or job.capture_ns
    if made < now_ns - state.max_age_ns:
        return Verdict("stale", f"made {(now_ns - made) / 1e9:.0f} s ago (at most {state.max_age_ns / 1e9:.0f} s)")
    if made > now_ns + state.skew_ns:
        return Verdict("stale", f"made {(made - now_ns) / 1e9:.0f} s in the future")
    return state.check(job.camera_id, job.band, job.seq, job.capture_ns, JOBS_SOURCE, partition, offset, None)


def merge_all(state: ReplayState, marks: Iterable[Mark]) -> int:
    n = 0
    for m in marks:
        state.merge(m)
        n += 1
    return n
