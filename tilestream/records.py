"""Record schemas between stages (after the envelope): tile features, results, dead letters.

* :class:`TileBatch` — processor -> classifier, one binary record per frame (or band) with every
  tile's rectangle and the raw feature matrix (see "Tile batch body" below), MACed by the
  processor (:meth:`TileBatch.to_wire`, see "Record authentication" below). Read back only
  through :meth:`TileBatch.from_wire` (MAC first, then the bounded ``from_bytes``).
  :class:`TileFeatures` is one tile of it in memory. Both (and the processor's tile jobs) name
  their frame with one :class:`FrameRef` — frame id, camera, seq, capture time, size — bounded in
  one place (:meth:`FrameRef.read`); the body's bytes are pinned by ``tests/test_frame_ref.py``.
* :class:`FrameResult` — classifier -> everyone, plain JSON that follows the committed
  JSON Schema ``tilestream/schemas/result.v1.json``, carried signed inside the envelope of
  ``tilestream/schemas/result.v2.json`` (:meth:`FrameResult.to_signed` / :meth:`FrameResult.from_signed`).
* :class:`DeadLetter` — any stage -> ``dead-letters``, with the original record (still
  encrypted) so nothing is lost.
* :class:`AgentHeartbeat` — edge agent -> ``heartbeats`` (key camera id), every few seconds.
* :class:`StageMetrics` — processor / classifier -> ``metrics`` (key stage/instance), a
  periodic snapshot of a stage's counters, rates, latencies and consumer lag, so the
  dashboard needs nothing but Kafka.

Record authentication (anyone with write access to a topic can write anything; a forged tile
batch for a camera that was never enrolled used to come out as a labelled result):

* tile batches: ``b"TSB1" | u8 n | key id (n ASCII bytes) | tag (32 bytes) | TileBatch body``,
  tag = HMAC-SHA256(stage key, ``TILE_BATCH_MAC_CONTEXT`` | everything before the tag | body),
  the stage key being the cloud-internal key of :mod:`tilestream.stagekeys`. The tag covers the
  whole body, so frame_id, camera_id, seq and every feature are bound to it. The classifier
  checks the tag before it parses a byte of the body; no header, an unknown key id or a wrong tag
  is refused (``bad_mac`` / ``unknown_key``) and dead-lettered.
* results: the envelope ``{"schema_version": 2, "result": "<v1 result JSON>", "signature":
  {"alg": "ed25519", "kid": "<16 hex>", "sig": "<base64, 64 bytes>"}}``; the signature is
  Ed25519 over ``RESULT_SIG_CONTEXT`` followed by the UTF-8 (ASCII) bytes of the ``result``
  string. The signed bytes travel as they are, inside a JSON string, so a verifier in any
  language checks exactly the bytes the classifier signed and never re-serialises JSON (which
  is where canonical-form schemes break: float formatting, key order, escapes differ between
  libraries); then it parses that string as a v1 result. The cost: a second JSON parse and
  ~15% more bytes (escaped quotes) on a ~9 KB record.

Tile batch body (:meth:`TileBatch.to_bytes`; all integers little-endian)::

    0   "TBF1"                      magic and version of the body
    4   u8 dtype                    1 = float32, 2 = float16 (nothing else is read)
    5   3 bytes, zero               reserved
    8   u64 seq | u64 capture_ns | u64 processed_ns     (each at most 2**63 - 1)
    32  u32 frame_width | u32 frame_height              (each in [1, 65535])
    40  u32 n_tiles | u32 rows | u32 dim                (n_tiles in [1, MAX_TILES], rows <= n_tiles, dim <= MAX_DIM)
    52  u16 len(frame_id) | u16 len(camera_id) | u16 len(feature_digest) | u16 zero (UTF-8 bytes)
    60  rows x 5 int32: [index, x, y, w, h] per tile
        rows x dim features in dtype (row i belongs to rectangle i)
        frame_id | camera_id | feature_digest

The reader checks the header's bounds before it uses a length, then the exact total length
(nothing missing, no trailing byte), the ids with :meth:`FrameRef.read`, every rectangle at once
with numpy (index below n_tiles and unique, x/y inside the frame, w/h in [1, 65535]) and that
every feature is finite; anything else is :class:`RecordError`. Why binary: the JSON body it
replaced carried the float32 matrix in base64, 94.4 KB per vtest frame (108 tiles x 160 values)
and 0.45 ms to read, 0.52 ms to write; the binary body is 71.4 KB, read in 0.10 ms, written in
0.18 ms (/tmp micro-benchmark of ``to_wire``/``from_wire``, one core). A body that starts with
``{`` is the JSON body of before and is still read (as strictly as it was), so records written
by processors of the previous release are classified during a rolling upgrade; nothing writes it
but :meth:`TileBatch.to_json` (tests, tools).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, List, Mapping

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ed25519

from tilestream.errors import Refused

RESULT_SCHEMA_VERSION = 1
SIGNED_RESULT_SCHEMA_VERSION = 2


def encode_vector(v: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f4")


@dataclass(frozen=True)
class Output:
    """A record a stage's per-record method wants sent: topic, key, value (the service sends it)."""

    topic: str
    key: bytes
    value: bytes


@dataclass(frozen=True)
class FrameRef:
    """Which frame a record is about: the identity every per-frame record carries (a tile batch,
    one tile's features in memory, a tile job), in one place.

    On the wire these six fields stay flat at the head of each record's JSON, in this order
    (:meth:`fields`), so the bytes are the ones written before this type existed; :meth:`read` is
    the one strict, bounded reader of them."""

    frame_id: str
    camera_id: str
    seq: int
    capture_ns: int
    frame_width: int
    frame_height: int

    @classmethod
    def of(cls, frame: Any) -> "FrameRef":
        """From a frame's header (``width``/``height``) or anything with the ``frame_*`` fields."""
        if isinstance(frame, FrameRef):
            return frame
        if isinstance(getattr(frame, "frame", None), FrameRef):  # a record that carries one (a tile job)
            return frame.frame
        return cls(frame.frame_id, frame.camera_id, frame.seq, frame.capture_ns,
                   getattr(frame, "frame_width", None) or frame.width,
                   getattr(frame, "frame_height", None) or frame.height)

    @classmethod
    def read(cls, d: dict) -> "FrameRef":
        """Strict: ids non-empty strings of at most MAX_ID_LEN characters, seq and capture time
        non-negative 64-bit integers, sides in [1, MAX_SIDE]; raises :class:`RecordError`."""
        return cls(frame_id=_str(d, "frame_id"), camera_id=_str(d, "camera_id"), seq=_int(d, "seq"),
                   capture_ns=_int(d, "capture_ns"), frame_width=_int(d, "frame_width", 1, MAX_SIDE),
                   frame_height=_int(d, "frame_height", 1, MAX_SIDE))

    def fields(self) -> dict[str, Any]:
        """The six fields, in wire order."""
        return {"frame_id": self.frame_id, "camera_id": self.camera_id, "seq": self.seq,
                "capture_ns": self.capture_ns, "frame_width": self.frame_width, "frame_height": self.frame_height}


FRAME_FIELDS = tuple(FrameRef.__dataclass_fields__)


class FrameFields:
    """The frame's fields read through a record's ``frame`` (``batch.frame_id`` etc., as before)."""

    frame: FrameRef
    frame_id = property(lambda self: self.frame.frame_id)
    camera_id = property(lambda self: self.frame.camera_id)
    seq = property(lambda self: self.frame.seq)
    capture_ns = property(lambda self: self.frame.capture_ns)
    frame_width = property(lambda self: self.frame.frame_width)
    frame_height = property(lambda self: self.frame.frame_height)


@dataclass
class TileFeatures(FrameFields):
    """One tile's features in memory (what the classifier assembles); on the wire they travel
    in a :class:`TileBatch`."""

    frame: FrameRef
    tile_index: int
    n_tiles: int
    x: int
    y: int
    w: int
    h: int
    feature_digest: str
    processed_ns: int
    vec: np.ndarray

    def vector(self) -> np.ndarray:
        return self.vec


# Bounds of a TileBatch from the wire (tile-features is writable by anyone with broker access):
# a 4K frame in 32 px tiles is 8,100 tiles; HOG vectors of a tile are 100-1,000 floats, but one tile
# covering a whole frame is a setting too (the tile sweep's "whole frame": 20,752 values at 768x576,
# HOG cell 16; a 1080p frame ~73,000), which the old bound of 8,192 refused as malformed. Memory is
# bounded by the record's size (the body's length must match rows x dim exactly), not by this.
MAX_TILE_BATCH_BYTES = 16 * 1024 * 1024
MAX_TILES = 65_536
MAX_DIM = 262_144
MAX_ID_LEN = 128
MAX_SIDE = 65_535
_I64 = 2**63 - 1

# -- strict, bounded readers of the records operators consume -------------------------------------
# Added next to the tolerant ``from_json`` (kept as it was for the pipeline's own round trips):
# ``from_bytes`` is how a consumer that must trust nothing (the dashboard) reads these topics.
# Every field is typed and bounded, unknown fields are ignored (the results schema says consumers
# must), and anything else raises RecordError (reason ``malformed``) or RecordTooLarge (reason
# ``too_large`` / ``too_many_tiles``). The bounds are generous for what the stages write (a
# 108-tile result is ~9 KB; a 4K frame in 32 px tiles, 8,100 tiles, ~650 KB) and small enough
# that one record cannot cost more than a few MB of memory once parsed.
MAX_RESULT_BYTES = 2 * 1024 * 1024
MAX_HEARTBEAT_BYTES = 64 * 1024
MAX_STAGE_METRICS_BYTES = 256 * 1024
MAX_LABEL_LEN = 64  # class names, stage names, reasons, counter names
MAX_TEXT_LEN = 1000  # a dead letter's message (DeadLetter.of cuts it there)
MAX_CLASSES = 256  # entries of a result's probabilities
MAX_MAP_ENTRIES = 256  # counters, rates, consumer lag, extra of one record
MAX_NUMBER = 1e15  # no rate, latency or counter of ours comes near; rejects inf and absurd values


class RecordError(Refused):
    """A record from the wire that does not follow its contract (reason ``malformed``)."""

    def __init__(self, message: str):
        super().__init__("malformed", message)


def _str(d: dict, key: str, max_len: int = MAX_ID_LEN) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not (0 < len(v) <= max_len):
        raise RecordError(f"{key} must be a non-empty string of at most {max_len} characters")
    return v


def _int(d: dict, key: str, lo: int = 0, hi: int = _I64) -> int:
    v = d.get(key)
    if type(v) is not int or not lo <= v <= hi:  # noqa: E721 - bool is not an int here
        raise RecordError(f"{key} must be an integer in [{lo}, {hi}]")
    return v


def parse_json_object(data: bytes | str, max_bytes: int, what: str) -> dict:
    """Bounded JSON parse: size first, then the parse (RecursionError on deep nesting included)."""
    if not isinstance(data, (bytes, bytearray, str)):
        raise RecordError(f"{what} is not bytes")
    if len(data) > max_bytes:
        raise RecordError(f"{what} of {len(data)} bytes exceeds {max_bytes}")
    try:
        d = json.loads(data)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise RecordError(f"{what} is not JSON: {type(exc).__name__}") from None
    if not isinstance(d, dict):
        raise RecordError(f"{what} is not a JSON object")
    return d


# The binary body of a tile batch (what the stage key MACs; see "Tile batch body" in the module
# docstring). Fixed little-endian header, then the tile rectangles as one int32 array, then the
# feature matrix raw, then the three strings; every array starts on a 4-byte boundary.
TILE_BATCH_BODY_MAGIC = b"TBF1"
_BODY_HEAD = struct.Struct("<4sB3sQQQIIIIIHHHH")  # magic, dtype, reserved, seq, capture_ns, processed_ns,
#                                                  width, height, n_tiles, rows, dim, 3 string lengths, reserved
BODY_HEAD_LEN = _BODY_HEAD.size  # 60
# dtype code -> (name, numpy little-endian dtype); nothing else is accepted.
FEATURE_DTYPES = {1: ("float32", "<f4"), 2: ("float16", "<f2")}
_DTYPE_CODES = {name: code for code, (name, _) in FEATURE_DTYPES.items()}
# The dtype processors write: float16 halves the matrix (71.5 -> 36.6 KB per vtest frame) and
# changed no label: digits held-out error 1.00 % (SVM) / 0.80 % (logistic) with float32 and with
# float16 features, 0 of 500 predictions changed; vtest scene model: 0 of 43,200 tile labels and
# 0 of 400 frame labels changed; probabilities move by at most 1.2e-3 (features lie in [0, 1.36],
# float16's relative error is below 4.9e-4). A batch whose values do not fit float16 goes as float32.
WIRE_DTYPE = "float16"
_MAX_ID_BYTES = 4 * MAX_ID_LEN  # UTF-8 of MAX_ID_LEN characters
_MAX_DIGEST_LEN = 64


@dataclass
class TileBatch(FrameFields):
    """processor -> classifier: the features of all tiles of one frame (or of one band of a
    fanned-out frame) in one record — one Kafka record per frame instead of one per tile.

    ``tiles`` lists ``[index, x, y, w, h]`` per tile; ``features`` is the raw little-endian
    matrix of ``len(tiles)`` rows and ``dim`` columns in ``dtype`` (``float32`` or ``float16``),
    row i belonging to ``tiles[i]``; :meth:`matrix` gives it as float32. ``n_tiles`` is the number
    of tiles of the whole frame. On the wire: the binary body (:meth:`to_bytes`), read back only
    through the bounded :meth:`from_bytes`. The frame's identity is :attr:`frame` (its fields
    readable as before: ``batch.frame_id`` ...).
    """

    frame: FrameRef
    n_tiles: int
    feature_digest: str
    processed_ns: int
    tiles: List[List[int]]
    dim: int
    features: bytes
    dtype: str = "float32"

    @classmethod
    def make(cls, frame: Any, n_tiles: int, tiles: list, digest: str, now_ns: int,
             dtype: str | None = None) -> "TileBatch":
        """From anything with the frame's fields (frame_id, camera_id, seq, capture_ns and
        width/height or frame_width/frame_height) and ``[(tile, vector), ...]`` (tile: index, x, y, w, h).
        ``dtype`` (default :data:`WIRE_DTYPE`): a float16 batch whose values do not fit float16
        (|v| > 65504) is written as float32 instead — the header names the dtype."""
        dtype = dtype or WIRE_DTYPE
        np_dtype = FEATURE_DTYPES[_DTYPE_CODES[dtype]][1]
        matrix = np.stack([v for _, v in tiles]) if tiles else np.zeros((0, 0), "<f4")
        with np.errstate(over="ignore"):
            m = matrix.astype(np_dtype)
        if dtype != "float32" and not np.isfinite(m).all() and np.isfinite(matrix).all():
            dtype, m = "float32", matrix.astype("<f4")
        return cls(
            frame=FrameRef.of(frame), n_tiles=n_tiles, feature_digest=digest, processed_ns=now_ns,
            tiles=[[t.index, t.x, t.y, t.w, t.h] for t, _ in tiles], dim=int(matrix.shape[1]) if tiles else 0,
            features=np.ascontiguousarray(m).tobytes(), dtype=dtype,
        )

    def to_bytes(self) -> bytes:
        """The binary body (what the MAC covers); on the wire use :meth:`to_wire`."""
        f = self.frame
        fid, cam, dig = f.frame_id.encode(), f.camera_id.encode(), self.feature_digest.encode()
        rows = len(self.tiles)
        head = _BODY_HEAD.pack(TILE_BATCH_BODY_MAGIC, _DTYPE_CODES[self.dtype], b"\0\0\0", f.seq, f.capture_ns,
                               self.processed_ns, f.frame_width, f.frame_height, self.n_tiles, rows, self.dim,
                               len(fid), len(cam), len(dig), 0)
        rects = np.asarray(self.tiles, dtype="<i4").reshape(rows, 5).tobytes()
        return b"".join((head, rects, self.features, fid, cam, dig))

    def to_json(self) -> bytes:
        """The JSON body processors wrote before the binary one (base64 of the float32 matrix), for
        tests and tools; :meth:`from_bytes` still reads it (see "Tile batch body")."""
        d = {**self.frame.fields(), "n_tiles": self.n_tiles, "feature_digest": self.feature_digest,
             "processed_ns": self.processed_ns, "tiles": self.tiles, "dim": self.dim,
             "features": encode_vector(self.matrix().ravel())}
        return json.dumps(d, separators=(",", ":")).encode()

    def to_wire(self, kid: str, key: bytes) -> bytes:
        """The record the processor writes to ``tile-features``: the body MACed with stage key ``kid``."""
        return seal_tile_batch(self.to_bytes(), kid, key)

    @classmethod
    def from_wire(cls, data: bytes, keys: Callable[[str], bytes | None]) -> "TileBatch":
        """A ``tile-features`` record: MAC checked first (``keys``: key id -> stage key), then the
        bounded parse. Raises :class:`Refused` (``bad_mac``, ``unknown_key``, ``malformed``, ...)."""
        return cls.from_bytes(open_tile_batch(data, keys))

    def matrix(self) -> np.ndarray:
        """The feature matrix, ``len(tiles)`` x ``dim`` float32 (a read-only view for float32 batches)."""
        m = np.frombuffer(self.features, dtype=FEATURE_DTYPES[_DTYPE_CODES[self.dtype]][1])
        return m.reshape(len(self.tiles), self.dim).astype(np.float32, copy=False)

    def split(self) -> list[TileFeatures]:
        m = self.matrix()
        return [TileFeatures(self.frame, index, self.n_tiles, x, y, w, h, self.feature_digest, self.processed_ns, m[i])
                for i, (index, x, y, w, h) in enumerate(self.tiles)]

    @classmethod
    def from_bytes(cls, data: bytes) -> "TileBatch":
        """Strict and bounded: every length checked before it is used, the exact total length,
        every tile inside the frame with a unique index below ``n_tiles``, finite features;
        raises :class:`RecordError`. A body that starts with ``{`` is read as the JSON body of
        before (:meth:`_from_json`)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise RecordError("tile batch is not bytes")
        data = bytes(data)
        if len(data) > MAX_TILE_BATCH_BYTES:
            raise RecordTooLarge(f"tile batch of {len(data)} bytes exceeds {MAX_TILE_BATCH_BYTES}")
        if data[:1] == b"{":
            return cls._from_json(data)
        if len(data) < BODY_HEAD_LEN or data[:4] != TILE_BATCH_BODY_MAGIC:
            raise RecordError(f"tile batch body must start with {TILE_BATCH_BODY_MAGIC!r} and a {BODY_HEAD_LEN}-byte header")
        (_, code, reserved, seq, capture_ns, processed_ns, width, height, n_tiles, rows, dim,
         n_fid, n_cam, n_dig, reserved2) = _BODY_HEAD.unpack_from(data)
        if code not in FEATURE_DTYPES or reserved != b"\0\0\0" or reserved2:
            raise RecordError(f"tile batch dtype code {code} unknown (float32 = 1, float16 = 2) or reserved bytes set")
        dtype, np_dtype = FEATURE_DTYPES[code]
        if not (1 <= n_tiles <= MAX_TILES and rows <= n_tiles and dim <= MAX_DIM):
            raise RecordError(f"tile batch of {rows} rows of {dim} values for {n_tiles} tiles is out of bounds "
                              f"(n_tiles in [1, {MAX_TILES}], rows <= n_tiles, dim <= {MAX_DIM})")
        if not (0 < n_fid <= _MAX_ID_BYTES and 0 < n_cam <= _MAX_ID_BYTES and 0 < n_dig <= _MAX_DIGEST_LEN):
            raise RecordError("tile batch id lengths out of bounds")
        item = np.dtype(np_dtype).itemsize
        rect_end = BODY_HEAD_LEN + 20 * rows
        feat_end = rect_end + rows * dim * item
        if len(data) != feat_end + n_fid + n_cam + n_dig:  # exact: nothing missing, nothing trailing
            raise RecordError(f"tile batch of {len(data)} bytes, its header says {feat_end + n_fid + n_cam + n_dig}")
        try:
            fid = data[feat_end:feat_end + n_fid].decode()
            cam = data[feat_end + n_fid:feat_end + n_fid + n_cam].decode()
            digest = data[feat_end + n_fid + n_cam:].decode()
        except UnicodeDecodeError:
            raise RecordError("tile batch ids are not UTF-8") from None
        frame = FrameRef.read({"frame_id": fid, "camera_id": cam, "seq": seq, "capture_ns": capture_ns,
                               "frame_width": width, "frame_height": height})
        digest = _str({"feature_digest": digest}, "feature_digest", _MAX_DIGEST_LEN)
        if processed_ns > _I64:
            raise RecordError(f"processed_ns must be an integer in [0, {_I64}]")
        t = np.frombuffer(data, dtype="<i4", count=5 * rows, offset=BODY_HEAD_LEN).reshape(rows, 5)
        index, x, y, w, h = t.T
        if rows and not ((index >= 0).all() and (index < n_tiles).all() and (x >= 0).all() and (x < width).all()
                         and (y >= 0).all() and (y < height).all() and (w > 0).all() and (w <= MAX_SIDE).all()
                         and (h > 0).all() and (h <= MAX_SIDE).all()):
            raise RecordError("each tile must be [index < n_tiles, x, y, w, h] inside the frame")
        if rows > 1 and np.unique(index).size != rows:
            raise RecordError("tile indexes must be unique")
        features = data[rect_end:feat_end]
        if not np.isfinite(np.frombuffer(features, dtype=np_dtype)).all():
            raise RecordError("features must be finite numbers")
        return cls(frame=frame, n_tiles=n_tiles, feature_digest=digest, processed_ns=processed_ns,
                   tiles=t.tolist(), dim=dim, features=features, dtype=dtype)

    @classmethod
    def _from_json(cls, data: bytes) -> "TileBatch":
        """The JSON body of before (base64 of float32), read as strictly as it always was."""
        d = parse_json_object(data, MAX_TILE_BATCH_BYTES, "tile batch")
        unknown = set(d) - _TILE_BATCH_JSON_FIELDS
        if unknown:
            raise RecordError(f"unknown fields {sorted(unknown)[:5]}")
        n_tiles, dim = _int(d, "n_tiles", 1, MAX_TILES), _int(d, "dim", 0, MAX_DIM)
        frame = FrameRef.read(d)
        w, h = frame.frame_width, frame.frame_height
        tiles = d.get("tiles")
        if not isinstance(tiles, list) or len(tiles) > n_tiles:
            raise RecordError(f"tiles must be a list of at most n_tiles={n_tiles} entries")
        seen = set()
        for t in tiles:
            if (not isinstance(t, list) or len(t) != 5 or any(type(v) is not int for v in t)  # noqa: E721
                    or not 0 <= t[0] < n_tiles or t[0] in seen or not (0 <= t[1] < w and 0 <= t[2] < h)
                    or not (0 < t[3] <= MAX_SIDE and 0 < t[4] <= MAX_SIDE)):
                raise RecordError("each tile must be [index < n_tiles (unique), x, y, w, h] inside the frame")
            seen.add(t[0])
        features, want = d.get("features"), len(tiles) * dim * 4
        if not isinstance(features, str) or len(features) != 4 * ((want + 2) // 3):
            raise RecordError(f"features must be base64 of {len(tiles)} x {dim} float32")
        try:
            raw = base64.b64decode(features, validate=True)
            if len(raw) != want:
                raise ValueError("length")
        except ValueError:
            raise RecordError(f"features is not base64 of {want} bytes") from None
        if not np.isfinite(np.frombuffer(raw, dtype="<f4")).all():
            raise RecordError("features must be finite numbers")
        return cls(frame=frame, n_tiles=n_tiles, feature_digest=_str(d, "feature_digest", 64),
                   processed_ns=_int(d, "processed_ns"), tiles=tiles, dim=dim, features=raw, dtype="float32")


_TILE_BATCH_JSON_FIELDS = {"n_tiles", "feature_digest", "processed_ns", "tiles", "dim", "features", *FRAME_FIELDS}


@dataclass
class TileLabel:
    index: int
    x: int
    y: int
    w: int
    h: int
    label: str
    probability: float


@dataclass
class FrameResult:
    camera_id: str
    seq: int
    frame_id: str
    capture_ns: int
    result_ns: int
    latency_ms: float
    label: str
    probabilities: dict[str, float]
    tiles: list[TileLabel]
    complete: bool
    n_tiles: int
    missing_tiles: list[int]
    model_id: str
    model_version: int
    schema_version: int = RESULT_SCHEMA_VERSION

    def to_json(self) -> bytes:
        # A flat dict in field order (the bytes asdict gave), not asdict's recursive deep copy:
        # that was 0.9 ms of a 108-tile result, this is ~0.25 ms.
        d: dict[str, Any] = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["tiles"] = [t.__dict__ for t in self.tiles]
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "FrameResult":
        d = json.loads(data)
        d["tiles"] = [TileLabel(**t) for t in d["tiles"]]
        return cls(**d)

    @classmethod
    def from_bytes(cls, data: bytes | str, max_bytes: int = MAX_RESULT_BYTES, max_tiles: int = MAX_TILES) -> "FrameResult":
        """Strict and bounded (see MAX_RESULT_BYTES): raises RecordError / RecordTooLarge.
        ``data`` is the bare v1 JSON (the payload of a signed result)."""
        return _frame_result_from_bytes(cls, data, max_bytes, max_tiles)

    def to_signed(self, kid: str, key: ed25519.Ed25519PrivateKey) -> bytes:
        """The record the classifier writes to ``results``: the v2 envelope signed with ``key``."""
        return sign_result(self.to_json(), kid, key)

    @classmethod
    def from_signed(cls, data: bytes, keys: Callable[[str], ed25519.Ed25519PublicKey | None],
                    max_bytes: int = MAX_RESULT_BYTES, max_tiles: int = MAX_TILES) -> "FrameResult":
        """A ``results`` record, signature verified (``keys``: key id -> trusted public key), then
        the payload read strictly. Raises :class:`Refused` (``unsigned``, ``unknown_key``,
        ``bad_signature``, ``malformed``, ``too_large``, ``too_many_tiles``)."""
        _, payload = open_signed_result(data, keys, max_bytes)
        return cls.from_bytes(payload, max_bytes, max_tiles)


# The head of a result as FrameResult.to_json writes it (fields in dataclass order). After a
# rebalance the classifier reads back every result of its dedup margin (120 s: ~9,600 results at
# 80 frames/s) and needs only their frame ids: the whole FrameResult of a 108-tile result took
# 0.55 ms, signature check + this match 0.16 ms (same sitting, 2026-12-03). Ids no longer than
# MAX_ID_LEN of printable ASCII without quote or backslash (so no escape to interpret, and nothing
# the strict JSON reader refuses, such as a raw control character) and a seq of at most 18 digits
# (within the strict reader's int64); anything else is read whole.
_ID_CHARS = rb'[\x20\x21\x23-\x5b\x5d-\x7e]'
_RESULT_HEAD = re.compile(rb'\{"camera_id":"(%s{1,%d})","seq":(0|[1-9][0-9]{0,17}),"frame_id":"(%s{1,%d})"'
                          % (_ID_CHARS, MAX_ID_LEN, _ID_CHARS, MAX_ID_LEN))


def signed_result_frame_id(data: bytes, keys: Callable[[str], ed25519.Ed25519PublicKey | None],
                           max_bytes: int = MAX_RESULT_BYTES) -> str:
    """The ``frame_id`` of a ``results`` record whose signature verified (see
    :meth:`FrameResult.from_signed`: the same refusals of the envelope and signature). A signed
    payload whose head matches is trusted for the rest (our classifier wrote it); one written in
    another field order is read whole and strictly."""
    _, payload = open_signed_result(data, keys, max_bytes)
    m = _RESULT_HEAD.match(payload)
    if m and m.group(3) == m.group(1) + b"/" + m.group(2):
        return m.group(3).decode("ascii")
    return FrameResult.from_bytes(payload, max_bytes).frame_id


# What a dead letter keeps of the original record: enough to inspect and replay any legitimate
# frame (4 MiB frames + envelope), while the letter stays under the dead-letters topic's limit
# (max_frame_bytes + 64 KiB) after base64 (4/3). Larger originals keep their head, size and digest.
MAX_DEAD_LETTER_ORIGINAL = 3 * 1024 * 1024
# base64 of the largest kept original (4/3) plus the letter's other fields
MAX_DEAD_LETTER_BYTES = (MAX_DEAD_LETTER_ORIGINAL + 2) // 3 * 4 + 64 * 1024


@dataclass
class DeadLetter:
    stage: str
    reason: str
    message: str
    original: bytes
    frame_id: str | None = None
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    at_ns: int = field(default_factory=time.time_ns)
    original_size: int = -1
    original_sha256: str = ""

    @classmethod
    def of(cls, stage: str, reason: str, message: str, original: bytes | None, frame_id: str | None = None,
           topic: str | None = None, partition: int | None = None, offset: int | None = None) -> "DeadLetter":
        """The one way stages build a dead letter: message and ids bounded, original truncated to
        :data:`MAX_DEAD_LETTER_ORIGINAL` with its full size and SHA-256 kept."""
        raw = bytes(original or b"")
        fid = frame_id if isinstance(frame_id, str) and len(frame_id) <= MAX_ID_LEN else None
        return cls(stage, reason, str(message)[:1000], raw[:MAX_DEAD_LETTER_ORIGINAL], fid, topic, partition, offset,
                   original_size=len(raw), original_sha256=hashlib.sha256(raw).hexdigest())

    def to_json(self) -> bytes:
        # Every field is a scalar: a flat dict, not asdict's deep copy (a third of a forged frame's cost).
        d: dict[str, Any] = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["original"] = base64.b64encode(self.original).decode("ascii")
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "DeadLetter":
        d = json.loads(data)
        d["original"] = base64.b64decode(d["original"])
        return cls(**d)

    @classmethod
    def from_bytes(cls, data: bytes | str, max_bytes: int = MAX_DEAD_LETTER_BYTES,
                   keep_original: bool = True) -> "DeadLetter":
        """Strict and bounded; ``keep_original=False`` leaves ``original`` as b"" (checked, not decoded)."""
        return _dead_letter_from_bytes(cls, data, max_bytes, keep_original)


@dataclass
class AgentHeartbeat:
    camera_id: str
    agent_version: str
    at_ns: int
    interval_s: float
    # captured, skipped, sent, spooled, dropped, source_errors, send_errors, too_large
    counters: dict[str, int]
    spool_frames: int = 0
    spool_bytes: int = 0
    fps: float = 0.0
    status: str = "running"  # running | stopping

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "AgentHeartbeat":
        return cls(**json.loads(data))

    @classmethod
    def from_bytes(cls, data: bytes | str, max_bytes: int = MAX_HEARTBEAT_BYTES) -> "AgentHeartbeat":
        """Strict and bounded: raises RecordError / RecordTooLarge."""
        return _heartbeat_from_bytes(cls, data, max_bytes)


@dataclass
class StageMetrics:
    stage: str  # "processor" | "classifier"
    instance: str
    at_ns: int
    interval_s: float
    counters: dict[str, float]  # monotonically increasing totals, e.g. frames_total, dead_letters_total:bad_signature
    rates: dict[str, float]  # per second over the last interval, e.g. frames_per_s
    latency_ms: dict[str, dict[str, float]]  # name -> {"p50": .., "p95": .., "p99": ..}
    consumer_lag: dict[str, int] = field(default_factory=dict)  # "topic/partition" -> lag in records
    group: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. model_id, model_version, event_loop_lag_ms

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "StageMetrics":
        return cls(**json.loads(data))

    @classmethod
    def from_bytes(cls, data: bytes | str, max_bytes: int = MAX_STAGE_METRICS_BYTES) -> "StageMetrics":
        """Strict and bounded: raises RecordError / RecordTooLarge."""
        return _stage_metrics_from_bytes(cls, data, max_bytes)


class RecordTooLarge(RecordError):
    """A record over a size or count bound; ``reason`` says which (``too_large`` by default)."""

    def __init__(self, message: str, reason: str = "too_large"):
        super().__init__(message)
        self.reason = reason


def _check_size(data: Any, max_bytes: int, what: str) -> None:
    if isinstance(data, (bytes, bytearray, str)) and len(data) > max_bytes:
        raise RecordTooLarge(f"{what} of {len(data)} bytes exceeds {max_bytes}")


def _num(d: dict, key: str, lo: float = -MAX_NUMBER, hi: float = MAX_NUMBER, default: Any = None) -> float:
    v = d.get(key, default)
    if type(v) not in (int, float) or not lo <= v <= hi:  # noqa: E721 - bool is not a number here; NaN fails both
        raise RecordError(f"{key} must be a number in [{lo}, {hi}]")
    return float(v)


def _bool(d: dict, key: str) -> bool:
    v = d.get(key)
    if type(v) is not bool:  # noqa: E721
        raise RecordError(f"{key} must be true or false")
    return v


def _opt_str(d: dict, key: str, max_len: int = MAX_ID_LEN, default: str | None = None) -> str | None:
    v = d.get(key, default)
    if v is None or v == default:
        return v
    if not isinstance(v, str) or len(v) > max_len:
        raise RecordError(f"{key} must be a string of at most {max_len} characters")
    return v


def _opt_int(d: dict, key: str, lo: int = 0, hi: int = _I64, default: int | None = None) -> int | None:
    if d.get(key, default) is None:
        return None
    return _int({key: d.get(key, default)}, key, lo, hi)


def _str_map(d: dict, key: str, value: Any, max_entries: int = MAX_MAP_ENTRIES, key_len: int = MAX_LABEL_LEN,
             optional: bool = False) -> dict:
    """A JSON object of at most ``max_entries`` string keys, each value checked by ``value(v) -> v``."""
    m = d.get(key)
    if m is None and optional:
        return {}
    if not isinstance(m, dict) or len(m) > max_entries:
        raise RecordError(f"{key} must be an object of at most {max_entries} entries")
    out = {}
    for k, v in m.items():
        if not 0 < len(k) <= key_len:
            raise RecordError(f"{key} keys must be 1 to {key_len} characters")
        out[k] = value(v)
    return out


def _number_value(lo: float = -MAX_NUMBER, hi: float = MAX_NUMBER):
    def check(v: Any) -> float:
        if type(v) not in (int, float) or not lo <= v <= hi:  # noqa: E721
            raise RecordError(f"values must be numbers in [{lo}, {hi}]")
        return float(v)
    return check


def _int_value(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= _I64:  # noqa: E721
        raise RecordError("values must be non-negative integers")
    return v


def _is_scalar(v: Any) -> bool:
    return (v is None or type(v) in (bool, int) or (type(v) is float and abs(v) <= MAX_NUMBER)  # noqa: E721
            or (isinstance(v, str) and len(v) <= MAX_ID_LEN))


def _extra_value(v: Any) -> Any:
    """A scalar, or a flat list of at most MAX_MAP_ENTRIES scalars (e.g. the classifier's assigned partitions)."""
    if _is_scalar(v) or (isinstance(v, list) and len(v) <= MAX_MAP_ENTRIES and all(_is_scalar(x) for x in v)):
        return v
    raise RecordError(f"extra values must be scalars or flat lists of them (strings of at most {MAX_ID_LEN} characters)")


def _tile_label(t: Any, n_tiles: int) -> TileLabel:
    if not isinstance(t, dict):
        raise RecordError("each tile must be an object")
    return TileLabel(index=_int(t, "index", 0, n_tiles - 1), x=_int(t, "x", 0, MAX_SIDE), y=_int(t, "y", 0, MAX_SIDE),
                     w=_int(t, "w", 1, MAX_SIDE), h=_int(t, "h", 1, MAX_SIDE), label=_str(t, "label", MAX_LABEL_LEN),
                     probability=_num(t, "probability", 0.0, 1.0))


def _frame_result_from_bytes(cls, data: bytes | str, max_bytes: int = MAX_RESULT_BYTES,
                             max_tiles: int = MAX_TILES) -> "FrameResult":
    """Strict and bounded (see the comment above MAX_RESULT_BYTES); ``max_tiles`` bounds the tiles
    listed (reason ``too_many_tiles``), the frame's ``n_tiles`` stays within :data:`MAX_TILES`."""
    _check_size(data, max_bytes, "result")
    d = parse_json_object(data, max_bytes, "result")
    if d.get("schema_version") != RESULT_SCHEMA_VERSION or type(d.get("schema_version")) is not int:  # noqa: E721
        raise RecordError(f"schema_version must be {RESULT_SCHEMA_VERSION}")
    n_tiles = _int(d, "n_tiles", 1, MAX_TILES)
    tiles, missing = d.get("tiles"), d.get("missing_tiles")
    if not isinstance(tiles, list) or not isinstance(missing, list):
        raise RecordError("tiles and missing_tiles must be lists")
    if len(tiles) > min(max_tiles, n_tiles):
        raise RecordTooLarge(f"{len(tiles)} tiles exceed {min(max_tiles, n_tiles)}", "too_many_tiles")
    if len(missing) > n_tiles or any(type(i) is not int or not 0 <= i < n_tiles for i in missing):  # noqa: E721
        raise RecordError("missing_tiles must list at most n_tiles tile indices")
    camera_id, seq = _str(d, "camera_id"), _int(d, "seq")
    frame_id = _str(d, "frame_id")
    if frame_id != f"{camera_id}/{seq}":
        raise RecordError("frame_id must be camera_id/seq")
    probabilities = _str_map(d, "probabilities", _number_value(0.0, 1.0), MAX_CLASSES)
    if not probabilities:
        raise RecordError("probabilities must not be empty")
    return cls(camera_id=camera_id, seq=seq, frame_id=frame_id, capture_ns=_int(d, "capture_ns"),
               result_ns=_int(d, "result_ns"), latency_ms=_num(d, "latency_ms"), label=_str(d, "label", MAX_LABEL_LEN),
               probabilities=probabilities, tiles=[_tile_label(t, n_tiles) for t in tiles],
               complete=_bool(d, "complete"), n_tiles=n_tiles, missing_tiles=list(missing),
               model_id=_str(d, "model_id"), model_version=_int(d, "model_version", 1))


def _dead_letter_from_bytes(cls, data: bytes | str, max_bytes: int = MAX_DEAD_LETTER_BYTES,
                            keep_original: bool = True) -> "DeadLetter":
    """Strict and bounded; ``keep_original=False`` checks the original's size but does not decode it
    (a reader that never shows it, the dashboard, keeps ``b""``)."""
    _check_size(data, max_bytes, "dead letter")
    d = parse_json_object(data, max_bytes, "dead letter")
    original = d.get("original")
    if not isinstance(original, str) or len(original) > (MAX_DEAD_LETTER_ORIGINAL + 2) // 3 * 4:
        raise RecordError("original must be base64 of at most MAX_DEAD_LETTER_ORIGINAL bytes")
    raw = b""
    if keep_original:
        try:
            raw = base64.b64decode(original, validate=True)
        except ValueError:
            raise RecordError("original is not base64") from None
    return cls(stage=_str(d, "stage", MAX_LABEL_LEN), reason=_str(d, "reason", MAX_LABEL_LEN),
               message=_opt_str(d, "message", MAX_TEXT_LEN, "") or "", original=raw,
               frame_id=_opt_str(d, "frame_id"), source_topic=_opt_str(d, "source_topic", 249),
               source_partition=_opt_int(d, "source_partition", 0, 2**31 - 1),
               source_offset=_opt_int(d, "source_offset"), at_ns=_int(d, "at_ns"),
               original_size=_int({"original_size": d.get("original_size", -1)}, "original_size", -1),
               original_sha256=_opt_str(d, "original_sha256", 64, "") or "")


def _heartbeat_from_bytes(cls, data: bytes | str, max_bytes: int = MAX_HEARTBEAT_BYTES) -> "AgentHeartbeat":
    """Strict and bounded: ids and counter names bounded, counters non-negative integers."""
    _check_size(data, max_bytes, "heartbeat")
    d = parse_json_object(data, max_bytes, "heartbeat")
    return cls(camera_id=_str(d, "camera_id"), agent_version=_str(d, "agent_version", MAX_LABEL_LEN),
               at_ns=_int(d, "at_ns"), interval_s=_num(d, "interval_s", 0.0, 86_400.0),
               counters=_str_map(d, "counters", _int_value, 64), spool_frames=_opt_int(d, "spool_frames", default=0) or 0,
               spool_bytes=_opt_int(d, "spool_bytes", default=0) or 0, fps=_num(d, "fps", 0.0, 1e6, 0.0),
               status=_str({"status": d.get("status", "running")}, "status", 32))


def _stage_metrics_from_bytes(cls, data: bytes | str, max_bytes: int = MAX_STAGE_METRICS_BYTES) -> "StageMetrics":
    """Strict and bounded: at most MAX_MAP_ENTRIES counters, rates, lag entries and extras, scalars only in extra."""
    _check_size(data, max_bytes, "stage metrics")
    d = parse_json_object(data, max_bytes, "stage metrics")
    number = _number_value()

    def quantiles(v: Any) -> dict:
        return _str_map({"q": v}, "q", number, 16)

    return cls(stage=_str(d, "stage", MAX_LABEL_LEN), instance=_str(d, "instance"), at_ns=_int(d, "at_ns"),
               interval_s=_num(d, "interval_s", 0.0, 86_400.0), counters=_str_map(d, "counters", number, key_len=MAX_ID_LEN),
               rates=_str_map(d, "rates", number, key_len=MAX_ID_LEN),
               latency_ms=_str_map(d, "latency_ms", quantiles, 64, MAX_ID_LEN),
               consumer_lag=_str_map(d, "consumer_lag", _int_value, key_len=260, optional=True),
               group=_opt_str(d, "group", 255, "") or "",
               extra=_str_map(d, "extra", _extra_value, 64, MAX_ID_LEN, optional=True))



# -- record authentication (pure: keys in, bytes out; the key files are tilestream.stagekeys) ----------
TILE_BATCH_MAGIC = b"TSB1"
TILE_BATCH_MAC_CONTEXT = b"tilestream/tile-batch/v1\x00"
TAG_LEN = 32  # HMAC-SHA256
MAX_KID_LEN = 64  # ours are 16 hex characters
RESULT_SIG_CONTEXT = b"tilestream/result/v2\x00"
_KID_CHARS = frozenset(b"0123456789abcdef")


def _key_of(keys: Callable[[str], Any] | Mapping[str, Any], kid: str) -> Any:
    """``keys`` is a lookup (key id -> key or None, e.g. tilestream.stagekeys.MacKeys) or a mapping."""
    return keys.get(kid) if isinstance(keys, Mapping) else keys(kid)


def _batch_tag(key: bytes, head: bytes, body: bytes) -> hmac.HMAC:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(TILE_BATCH_MAC_CONTEXT)
    h.update(head)
    h.update(body)
    return h


def seal_tile_batch(body: bytes, kid: str, key: bytes) -> bytes:
    """``TSB1 | u8 len(kid) | kid | HMAC-SHA256(key, context | TSB1 | u8 | kid | body) | body``."""
    k = kid.encode("ascii")
    if not 0 < len(k) <= MAX_KID_LEN:
        raise ValueError(f"key id of {len(k)} characters")
    head = TILE_BATCH_MAGIC + bytes([len(k)]) + k
    return head + _batch_tag(key, head, body).finalize() + body


def open_tile_batch(data: bytes, keys: Callable[[str], bytes | None]) -> bytes:
    """The JSON of a MACed tile batch, after its tag verified (nothing of the JSON is read before).

    Raises :class:`Refused`: ``bad_mac`` (no or broken header, wrong tag: altered, truncated,
    or MACed with another key under this id), ``unknown_key`` (a key id this stage does not
    hold), ``too_large``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Refused("bad_mac", "tile batch is not bytes")
    data = bytes(data)
    if len(data) > MAX_TILE_BATCH_BYTES + len(TILE_BATCH_MAGIC) + 1 + MAX_KID_LEN + TAG_LEN:
        raise RecordTooLarge(f"tile batch of {len(data)} bytes exceeds {MAX_TILE_BATCH_BYTES}")
    if not data.startswith(TILE_BATCH_MAGIC) or len(data) < len(TILE_BATCH_MAGIC) + 1:
        raise Refused("bad_mac", "tile batch without a MAC header (TSB1): not written by a processor")
    n = data[4]
    head_len = 5 + n
    kid_raw = data[5:head_len]
    if not 0 < n <= MAX_KID_LEN or len(data) < head_len + TAG_LEN or not set(kid_raw) <= _KID_CHARS:
        raise Refused("bad_mac", "tile batch MAC header is broken")
    kid = kid_raw.decode("ascii")
    key = _key_of(keys, kid)
    if key is None:
        raise Refused("unknown_key", f"tile batch MACed with stage key {kid}, which this classifier does not hold")
    head, tag, body = data[:head_len], data[head_len:head_len + TAG_LEN], data[head_len + TAG_LEN:]
    try:
        _batch_tag(key, head, body).verify(tag)  # constant-time compare
    except InvalidSignature:
        raise Refused("bad_mac", f"tile batch MAC does not verify with stage key {kid}") from None
    return body


def sign_result(payload: bytes, kid: str, key: ed25519.Ed25519PrivateKey) -> bytes:
    """The v2 envelope of a result: ``payload`` (ASCII JSON) carried as a string, and its signature."""
    text = payload.decode("ascii")  # json.dumps escapes everything else: the bytes are the string
    sig = key.sign(RESULT_SIG_CONTEXT + payload)
    return json.dumps({"schema_version": SIGNED_RESULT_SCHEMA_VERSION, "result": text,
                       "signature": {"alg": "ed25519", "kid": kid, "sig": base64.b64encode(sig).decode("ascii")}},
                      separators=(",", ":")).encode()


def result_envelope(data: bytes | str, max_bytes: int = MAX_RESULT_BYTES) -> tuple[bytes, dict | None]:
    """Unverified: (payload bytes, signature object or None) of a ``results`` record — a v2
    envelope's ``result``, or a bare v1 result as it is. For readers that verify themselves or
    that were told to show unverified results; raises :class:`RecordError` on anything else."""
    _check_size(data, max_bytes, "result")
    d = parse_json_object(data, max_bytes, "result")
    if d.get("schema_version") == RESULT_SCHEMA_VERSION and type(d.get("schema_version")) is int:  # noqa: E721
        return (data.encode() if isinstance(data, str) else bytes(data)), None
    if d.get("schema_version") != SIGNED_RESULT_SCHEMA_VERSION or type(d.get("schema_version")) is not int:  # noqa: E721
        raise RecordError(f"schema_version must be {SIGNED_RESULT_SCHEMA_VERSION} (signed) or {RESULT_SCHEMA_VERSION}")
    text, sig = d.get("result"), d.get("signature")
    if not isinstance(text, str) or not text.isascii():
        raise RecordError("result must be a string of ASCII JSON")
    if not isinstance(sig, dict):
        raise RecordError("signature must be an object")
    return text.encode("ascii"), sig


def open_signed_result(data: bytes | str, keys: Callable[[str], ed25519.Ed25519PublicKey | None],
                       max_bytes: int = MAX_RESULT_BYTES) -> tuple[str, bytes]:
    """(key id, payload) of a signed result whose signature verified with a trusted key.

    Raises :class:`Refused`: ``unsigned`` (a bare v1 result), ``unknown_key``, ``bad_signature``,
    ``malformed`` / ``too_large`` (not an envelope)."""
    payload, sig = result_envelope(data, max_bytes)
    if sig is None:
        raise Refused("unsigned", "result without a signature (schema_version 1)")
    alg, kid, b64 = sig.get("alg"), sig.get("kid"), sig.get("sig")
    if alg != "ed25519" or not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LEN or not isinstance(b64, str) \
            or len(b64) != 88:
        raise Refused("bad_signature", "signature must be {alg: ed25519, kid, sig: base64 of 64 bytes}")
    try:
        raw = base64.b64decode(b64, validate=True)
    except ValueError:
        raise Refused("bad_signature", "signature is not base64") from None
    key = _key_of(keys, kid)
    if key is None:
        raise Refused("unknown_key", f"result signed with results key {kid}, which is not trusted here")
    try:
        key.verify(raw, RESULT_SIG_CONTEXT + payload)
    except InvalidSignature:
        raise Refused("bad_signature", f"result signature does not verify with results key {kid}") from None
    return kid, payload
