"""Record schemas between stages (after the envelope): tile features, results, dead letters.

* :class:`TileBatch` — processor -> classifier, a ``faust.Record`` (JSON, no Faust
  metadata, so any client can read it) with every tile of a frame (or of a band): one record
  per frame, the feature matrix as base64 of little-endian float32 (compact and exact).
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
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, List

import faust
import numpy as np

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


class TileBatch(faust.Record, serializer="json", include_metadata=False):
    """processor -> classifier: the features of all tiles of one frame (or of one band of a
    fanned-out frame) in one record — one Kafka record per frame instead of one per tile.

    ``tiles`` lists ``[index, x, y, w, h]`` per tile; ``features`` is base64 of a little-endian
    float32 matrix of ``len(tiles)`` rows and ``dim`` columns, row i belonging to ``tiles[i]``.
    ``n_tiles`` is the number of tiles of the whole frame.
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
        return cls.from_data(json.loads(data))


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
