"""Record schemas between stages (after the envelope): tile features, results, dead letters.

* :class:`TileBatch` — processor -> classifier, plain JSON (any client can read it) with every
  tile of a frame (or of a band): one record per frame, the feature matrix as base64 of
  little-endian float32 (compact and exact). Read back only through its bounded ``from_bytes``.
  :class:`TileFeatures` is one tile of it in memory.
* :class:`FrameResult` — classifier -> everyone, plain JSON that follows the committed
  JSON Schema ``tilestream/schemas/result.v1.json``.
* :class:`DeadLetter` — any stage -> ``dead-letters``, with the original record (still
  encrypted) so nothing is lost.
* :class:`AgentHeartbeat` — edge agent -> ``heartbeats`` (key camera id), every few seconds.
* :class:`StageMetrics` — processor / classifier -> ``metrics`` (key stage/instance), a
  periodic snapshot of a stage's counters, rates, latencies and consumer lag, so the
  dashboard needs nothing but Kafka.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, List

import numpy as np

from tilestream.errors import Refused

RESULT_SCHEMA_VERSION = 1


def encode_vector(v: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f4")


@dataclass
class TileFeatures:
    """One tile's features in memory (what the classifier assembles); on the wire they travel
    in a :class:`TileBatch`."""

    frame_id: str
    camera_id: str
    seq: int
    capture_ns: int
    frame_width: int
    frame_height: int
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
# a 4K frame in 32 px tiles is 8,100 tiles; HOG vectors here are 100-1,000 floats.
MAX_TILE_BATCH_BYTES = 16 * 1024 * 1024
MAX_TILES = 65_536
MAX_DIM = 8_192
MAX_ID_LEN = 128
MAX_SIDE = 65_535
_I64 = 2**63 - 1


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


@dataclass
class TileBatch:
    """processor -> classifier: the features of all tiles of one frame (or of one band of a
    fanned-out frame) in one record — one Kafka record per frame instead of one per tile.

    ``tiles`` lists ``[index, x, y, w, h]`` per tile; ``features`` is base64 of a little-endian
    float32 matrix of ``len(tiles)`` rows and ``dim`` columns, row i belonging to ``tiles[i]``.
    ``n_tiles`` is the number of tiles of the whole frame. On the wire: compact JSON
    (:meth:`to_bytes`), read back only through the bounded :meth:`from_bytes`.
    """

    frame_id: str
    camera_id: str
    seq: int
    capture_ns: int
    frame_width: int
    frame_height: int
    n_tiles: int
    feature_digest: str
    processed_ns: int
    tiles: List[List[int]]
    dim: int
    features: str

    @classmethod
    def make(cls, frame: Any, n_tiles: int, tiles: list, digest: str, now_ns: int) -> "TileBatch":
        """From anything with the frame's fields (frame_id, camera_id, seq, capture_ns and
        width/height or frame_width/frame_height) and ``[(tile, vector), ...]`` (tile: index, x, y, w, h)."""
        matrix = np.stack([v for _, v in tiles]).astype("<f4") if tiles else np.zeros((0, 0), "<f4")
        return cls(
            frame_id=frame.frame_id, camera_id=frame.camera_id, seq=frame.seq, capture_ns=frame.capture_ns,
            frame_width=getattr(frame, "frame_width", None) or frame.width,
            frame_height=getattr(frame, "frame_height", None) or frame.height,
            n_tiles=n_tiles, feature_digest=digest, processed_ns=now_ns,
            tiles=[[t.index, t.x, t.y, t.w, t.h] for t, _ in tiles], dim=int(matrix.shape[1]) if tiles else 0,
            features=encode_vector(matrix.ravel()),
        )

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    def matrix(self) -> np.ndarray:
        return decode_vector(self.features).reshape(len(self.tiles), self.dim)

    def split(self) -> list[TileFeatures]:
        m = self.matrix()
        return [TileFeatures(self.frame_id, self.camera_id, self.seq, self.capture_ns, self.frame_width,
                             self.frame_height, index, self.n_tiles, x, y, w, h, self.feature_digest,
                             self.processed_ns, m[i])
                for i, (index, x, y, w, h) in enumerate(self.tiles)]

    @classmethod
    def from_bytes(cls, data: bytes) -> "TileBatch":
        """Strict and bounded: every field typed and in range, raises :class:`RecordError`."""
        d = parse_json_object(data, MAX_TILE_BATCH_BYTES, "tile batch")
        unknown = set(d) - _TILE_BATCH_FIELDS
        if unknown:
            raise RecordError(f"unknown fields {sorted(unknown)[:5]}")
        n_tiles, dim = _int(d, "n_tiles", 1, MAX_TILES), _int(d, "dim", 0, MAX_DIM)
        w, h = _int(d, "frame_width", 1, MAX_SIDE), _int(d, "frame_height", 1, MAX_SIDE)
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
            if len(base64.b64decode(features, validate=True)) != want:
                raise ValueError("length")
        except ValueError:
            raise RecordError(f"features is not base64 of {want} bytes") from None
        return cls(frame_id=_str(d, "frame_id"), camera_id=_str(d, "camera_id"), seq=_int(d, "seq"),
                   capture_ns=_int(d, "capture_ns"), frame_width=w, frame_height=h, n_tiles=n_tiles,
                   feature_digest=_str(d, "feature_digest", 64), processed_ns=_int(d, "processed_ns"),
                   tiles=tiles, dim=dim, features=features)


_TILE_BATCH_FIELDS = {f for f in TileBatch.__dataclass_fields__}


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
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "FrameResult":
        d = json.loads(data)
        d["tiles"] = [TileLabel(**t) for t in d["tiles"]]
        return cls(**d)


# What a dead letter keeps of the original record: enough to inspect and replay any legitimate
# frame (4 MiB frames + envelope), while the letter stays under the dead-letters topic's limit
# (max_frame_bytes + 64 KiB) after base64 (4/3). Larger originals keep their head, size and digest.
MAX_DEAD_LETTER_ORIGINAL = 3 * 1024 * 1024


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
        d: dict[str, Any] = asdict(self)
        d["original"] = base64.b64encode(self.original).decode("ascii")
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "DeadLetter":
        d = json.loads(data)
        d["original"] = base64.b64decode(d["original"])
        return cls(**d)


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
