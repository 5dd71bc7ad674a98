"""Fan-out of one large frame's tiles over several workers, without plaintext pixels on Kafka.

A frame of at least ``processor.fanout_min_pixels`` is cut into horizontal bands of whole
tile rows; each band becomes a *tile job* on the ``tile-jobs`` topic, keyed by
``frame_id#band`` so the bands of one frame spread over the partitions, and so over the
workers. The band's grayscale pixels are encrypted with AES-256-GCM (``cryptography``'s
AESGCM; random 96-bit nonce) under the cloud's internal tile key, with the job header as
associated data. A tile worker opens the job and computes exactly the features the whole
frame would have given (same tile grid, same padding; tested).

Binding to the frame: everything that names the job — frame id, camera, seq, capture time,
band, and ``made_ns`` (when the processor made it) — is in that associated data, so a job
cannot be moved to another frame or band, and :func:`check_binding` refuses a header whose
frame id is not its (camera, seq). Before computing, the tile worker checks (camera, band, seq)
against the replay state (:mod:`stream_processor.replay`): a copied job is ``replay`` and
produces no second feature set; a job made more than ``max_frame_age_s`` ago is ``stale``.

Record layout: ``b"TSTJ" | u8 version | u32 header length | header JSON | nonce (12) | ciphertext``.
Pure functions; no Kafka here.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tilestream.config import FeatureConfig
from tilestream.crypto import FrameRejected
from tilestream.envelope import FrameHeader, frame_id
from tilestream.records import FRAME_FIELDS, FrameFields, FrameRef, RecordError, TileBatch, parse_json_object

from stream_processor.features import tiles_features
from stream_processor.tiling import Tile, extract_tile, tile_grid

MAGIC = b"TSTJ"
VERSION = 1
_HEAD = struct.Struct(">4sBI")
_NONCE, _TAG = 12, 16  # AES-GCM: 96-bit random nonce, 128-bit tag
MAX_JOB_HEADER = 4096  # the JSON header of a job is ~300 bytes
MAX_BANDS = 4096


@dataclass
class TileJob(FrameFields):
    """The header of a tile job: its frame (:class:`~tilestream.records.FrameRef`, flat at the head
    of the JSON like every per-frame record's) and the band. The JSON is the AES-GCM associated data."""

    frame: FrameRef
    n_tiles: int
    band: int
    n_bands: int
    y0: int
    band_height: int
    first_tile: int  # tile indices [first_tile, last_tile) of the frame's grid
    last_tile: int
    key_id: str
    made_ns: int = 0  # when the processor made the job (0: a job from before this field)

    def header_json(self) -> bytes:
        d = {**self.frame.fields(), **{k: getattr(self, k) for k in self.__dataclass_fields__ if k != "frame"}}
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_header(cls, d: dict) -> "TileJob":
        """From a parsed header, as it is (an authenticated job's types are checked by
        :func:`check_binding`); a missing or unknown field raises TypeError."""
        d = dict(d)
        frame = {k: d.pop(k) for k in FRAME_FIELDS if k in d}
        return cls(FrameRef(**frame), **d)


def bands(tiles: list[Tile], height: int, n_bands: int) -> list[tuple[int, int, int, int]]:
    """Split a row-major tile grid into up to ``n_bands`` bands of whole tile rows.

    Returns (first tile index, last tile index (excl.), y0, y1): the pixel rows [y0, y1) that
    hold every tile of the band.
    """
    rows: dict[int, list[Tile]] = {}
    for t in tiles:
        rows.setdefault(t.y, []).append(t)
    row_list = [rows[y] for y in sorted(rows)]
    n = max(1, min(n_bands, len(row_list)))
    per = -(-len(row_list) // n)
    out = []
    for i in range(0, len(row_list), per):
        group = [t for row in row_list[i:i + per] for t in row]
        y0 = min(t.y for t in group)
        y1 = min(height, max(t.y + t.h for t in group))
        out.append((group[0].index, group[-1].index + 1, y0, y1))
    return out


def make_jobs(header: FrameHeader, gray: np.ndarray, cfg: FeatureConfig, n_bands: int, key_id: str,
              key: bytes) -> list[tuple[bytes, bytes]]:
    """(Kafka key, record) per band of ``gray``, each band encrypted."""
    tiles = tile_grid(gray.shape[0], gray.shape[1], cfg.tile_size, cfg.overlap, cfg.edge_policy)
    aead = AESGCM(key)
    out = []
    split = bands(tiles, gray.shape[0], n_bands)
    for i, (first, last, y0, y1) in enumerate(split):
        frame = FrameRef(header.frame_id, header.camera_id, header.seq, header.capture_ns, gray.shape[1], gray.shape[0])
        job = TileJob(frame, len(tiles), i, len(split), y0, y1 - y0, first, last, key_id, time.time_ns())
        head = job.header_json()
        nonce = os.urandom(_NONCE)
        band = np.ascontiguousarray(gray[y0:y1])
        record = _HEAD.pack(MAGIC, VERSION, len(head)) + head + nonce + aead.encrypt(nonce, band.tobytes(), head)
        out.append((f"{header.frame_id}#{i}".encode(), record))
    return out


def open_job(record: bytes, keys: dict[str, bytes]) -> tuple[TileJob, np.ndarray]:
    """Decrypt a tile job; raises FrameRejected (malformed / unsupported_version / decrypt_failed)."""
    if len(record) < _HEAD.size:
        raise FrameRejected("malformed", "tile job shorter than its header")
    magic, version, n = _HEAD.unpack_from(record)
    if magic != MAGIC:
        raise FrameRejected("malformed", "not a tile job")
    if version != VERSION:
        raise FrameRejected("unsupported_version", f"tile job version {version}")
    # Everything before the tag check is read from an unauthenticated record: bounded and typed.
    if n > MAX_JOB_HEADER or len(record) < _HEAD.size + n + _NONCE + _TAG:
        raise FrameRejected("malformed", "tile job shorter than its header, nonce and tag (or header too large)")
    head = record[_HEAD.size:_HEAD.size + n]
    try:
        job = TileJob.from_header(parse_json_object(head, MAX_JOB_HEADER, "tile job header"))
    except RecordError as exc:
        raise FrameRejected("malformed", str(exc)) from None
    except TypeError as exc:
        raise FrameRejected("malformed", f"tile job header: {exc}") from None
    if not isinstance(job.key_id, str) or len(job.key_id) > 64:
        raise FrameRejected("malformed", "tile job key id is not a short string")
    key = keys.get(job.key_id)
    if key is None:
        raise FrameRejected("decrypt_failed", f"tile job {str(job.frame_id)[:128]}: unknown tile key {job.key_id}")
    nonce = record[_HEAD.size + n:_HEAD.size + n + _NONCE]
    try:
        data = AESGCM(key).decrypt(nonce, record[_HEAD.size + n + _NONCE:], head)
    except InvalidTag:
        raise FrameRejected("decrypt_failed", f"tile job {str(job.frame_id)[:128]} does not authenticate") from None
    if len(data) != job.band_height * job.frame_width:
        raise FrameRejected("malformed", f"tile job {job.frame_id}#{job.band}: band size does not match its header")
    return job, np.frombuffer(data, np.uint8).reshape(job.band_height, job.frame_width)


def check_binding(job: TileJob) -> None:
    """An opened (authenticated) job must name one frame consistently; raises FrameRejected("malformed")."""
    ints = (job.seq, job.capture_ns, job.band, job.n_bands, job.made_ns)
    if not all(type(v) is int for v in ints) or not isinstance(job.camera_id, str):  # noqa: E721
        raise FrameRejected("malformed", f"tile job {job.frame_id!r}: header fields of the wrong type")
    if job.frame_id != frame_id(job.camera_id, job.seq):
        raise FrameRejected("malformed", f"tile job names frame {job.frame_id!r} but camera {job.camera_id!r} "
                                         f"seq {job.seq}")
    if not 0 <= job.band < job.n_bands <= MAX_BANDS:
        raise FrameRejected("malformed", f"tile job {job.frame_id}: band {job.band} of {job.n_bands}")


def job_features(job: TileJob, band: np.ndarray, cfg: FeatureConfig, digest: str) -> TileBatch:
    """The features of a band's tiles, one TileBatch — equal to the whole frame's for those tiles."""
    grid = tile_grid(job.frame_height, job.frame_width, cfg.tile_size, cfg.overlap, cfg.edge_policy)
    tiles = grid[job.first_tile:job.last_tile]
    pixels = [extract_tile(band, Tile(t.index, t.x, t.y - job.y0, t.w, t.h), cfg.tile_size, cfg.edge_policy)
              for t in tiles]
    X = tiles_features(pixels, cfg)  # the whole frame's batched path (bit for bit tile_features)
    return TileBatch.make(job, job.n_tiles, [(t, X[i]) for i, t in enumerate(tiles)], digest, time.time_ns())
